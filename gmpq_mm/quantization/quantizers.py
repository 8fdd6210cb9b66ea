# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Activation and weight quantizers of GMPQ (pure PyTorch).

The semantics follow the released GMPQ / EdMIPS code (see
``docs/method.md``, Quantizers):

* activations, PACT-style: ``q = round(clamp(x, 0, r) / s) * s`` with
  ``s = r / (2^b - 1)``; the signed variant clamps to ``[-r, r]`` and uses
  ``s = r / (2^(b-1) - 1)``. Straight-through estimator (STE):
  ``dq/dx = 1[0 <= x <= r]`` and ``dq/dr = 1[x > r]`` (signed: ``+1`` above
  ``r``, ``-1`` below ``-r``).
* weights, symmetric: ``q = round(clamp(w, -T, T) / s) * s`` with
  ``s = T / (2^(b-1) - 1)`` and ``T = max|w|`` of the current (detached)
  weights unless calibrated; identity STE.

The mixed (supernet) variants compute ``sum_i p_i * q_i(.)`` inside one
autograd function that keeps only its inputs and recomputes the candidates
in backward: letting autograd record every candidate would keep ``K``
quantized copies of each activation alive until backward.
:func:`quantized_conv2d` goes one step further for a whole layer: it keeps
the conv input ``x`` (which the preceding ReLU keeps anyway) instead of the
quantized ``x~`` and recomputes ``x~`` in backward.

Internally ``clamp(x, lo, r) / s`` is evaluated as ``clamp(x * (n / r),
lo * n, n)``: the same value (up to float rounding at exact ties, where
``round`` goes to even) with one multiply instead of a division.

Two kernel backends compute the same maths (:func:`set_kernel_backend`, or
the ``GMPQ_QUANT_BACKEND`` environment variable): ``'eager'`` (default,
plain PyTorch ops) and ``'compile'`` (``torch.compile``-fused elementwise
kernels: much faster on CPU, but compiling takes tens of seconds per
process).
"""
import contextlib
import functools
import numbers
import os
import warnings
from collections.abc import Iterable
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from gmpq_mm.compat import is_autocast_enabled

FP_BITS = 32
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 32)

__all__ = [
    'FP_BITS', 'SUPPORTED_BITS', 'check_bits', 'check_candidates',
    'activation_levels', 'weight_levels', 'quantize_activation',
    'quantize_weight', 'weight_threshold', 'mixed_activation', 'mixed_weight',
    'quantized_conv2d', 'ActivationQuantizer', 'WeightQuantizer',
    'as_threshold_buffer', 'resize_threshold_buffer', 'set_kernel_backend',
    'get_kernel_backend'
]


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------
def check_bits(bits, where: str = '') -> int:
    """Validate one bit width.

    Args:
        bits: The bit width. A Python integer (``bool`` excluded) in 2..8,
            or 32 for full precision.
        where (str): Where the value comes from (e.g. a layer name such as
            ``'layer1.0.conv1'``), put in front of the error message.

    Returns:
        int: ``bits`` as a plain ``int``.

    Raises:
        ValueError: If ``bits`` is not supported.
    """
    ok = (
        isinstance(bits, numbers.Integral) and not isinstance(bits, bool)
        and int(bits) in SUPPORTED_BITS)
    if not ok:
        prefix = f'{where}: ' if where else ''
        raise ValueError(f'{prefix}bit width {bits!r} is not supported; use '
                         f'an int in 2..8, or {FP_BITS} for full precision')
    return int(bits)


def check_candidates(cands: Iterable, where: str = '') -> Tuple[int, ...]:
    """Validate a list of candidate bit widths of one searched layer.

    The order is kept as given, since the architecture parameters are
    indexed by it.

    Args:
        cands (Iterable[int]): The candidate bit widths.
        where (str): Where they come from, for error messages.

    Returns:
        tuple[int]: The candidates as a tuple of ``int``.

    Raises:
        ValueError: If the list is empty, not a sequence of ints, holds an
            unsupported width or a duplicate.
    """
    prefix = f'{where}: ' if where else ''
    if isinstance(cands, (str, bytes)) or not isinstance(cands, Iterable):
        raise ValueError(f'{prefix}bit candidates must be a sequence of ints, '
                         f'got {cands!r}')
    cands = tuple(cands)
    if len(cands) == 0:
        raise ValueError(f'{prefix}bit candidates must not be empty')
    checked = tuple(check_bits(b, where) for b in cands)
    if len(set(checked)) != len(checked):
        raise ValueError(f'{prefix}bit candidates {cands!r} hold duplicates')
    return checked


def activation_levels(bits: int, signed: bool = False) -> int:
    """Number of positive quantization steps ``n`` of an activation.

    ``s = r / n``: ``n = 2^b - 1`` unsigned, ``2^(b-1) - 1`` signed.
    """
    return 2**(bits - 1) - 1 if signed else 2**bits - 1


def weight_levels(bits: int) -> int:
    """Number of positive weight levels ``n = 2^(b-1) - 1`` (``s = T / n``)."""
    return 2**(bits - 1) - 1


# ---------------------------------------------------------------------------
# Kernel backends
# ---------------------------------------------------------------------------
# Every elementwise pass over an activation costs a full trip through
# memory (and, on a busy CPU, a thread hand-off). The eager kernels write
# the integer codes of all K candidates into one (K, N) buffer and let
# matrix-vector products do the probability-weighted sum and the
# per-candidate reductions (the probability and range gradients), so few
# passes and no per-candidate temporaries are needed. The 'compile' backend
# hands the same maths, written as plain functions, to ``torch.compile``,
# which fuses each direction into one or two loops without any (K, N)
# buffer; it is opt-in because compiling takes tens of seconds per process.
_KERNEL_BACKENDS = ('eager', 'compile')
_kernel_backend = os.environ.get('GMPQ_QUANT_BACKEND', 'eager')
if _kernel_backend not in _KERNEL_BACKENDS:
    warnings.warn(f'GMPQ_QUANT_BACKEND={_kernel_backend!r} is not one of '
                  f'{_KERNEL_BACKENDS}; using eager')
    _kernel_backend = 'eager'
_compiled_kernels = {}


def set_kernel_backend(backend: str) -> None:
    """Choose how the quantization kernels run.

    Args:
        backend (str): ``'eager'`` (plain PyTorch ops, the default) or
            ``'compile'`` (``torch.compile`` of the fused kernels; falls
            back to eager with a warning if compiling fails). The
            environment variable ``GMPQ_QUANT_BACKEND`` sets the default.
    """
    global _kernel_backend
    if backend not in _KERNEL_BACKENDS:
        raise ValueError(f'kernel backend {backend!r} is not one of '
                         f'{_KERNEL_BACKENDS}')
    _kernel_backend = backend


def get_kernel_backend() -> str:
    """The current kernel backend (``'eager'`` or ``'compile'``)."""
    return _kernel_backend


def _autocast_off(device: torch.device):
    """A context that turns autocast off on ``device`` if it is on.

    The kernels' matrix-vector products are on autocast's low-precision
    list; the sums over millions of elements they compute (the alpha and
    range gradients) must stay in the tensors' own precision.
    """
    if device.type in ('cpu', 'cuda') and is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _run_kernel(name: str, x: Tensor, *args):
    eager_fn, fused_fn = _KERNELS[name]
    with _autocast_off(x.device):
        if _kernel_backend == 'compile':
            fn = _compiled_kernels.get(name)
            if fn is None:
                fn = _compiled_kernels[name] = torch.compile(
                    fused_fn, dynamic=True)
            try:
                return fn(x, *args)
            except Exception as err:  # noqa: BLE001 - any compiler failure
                warnings.warn('gmpq_mm: compiling the quantization kernels '
                              f'failed ({type(err).__name__}: {err}); '
                              'falling back to the eager backend')
                set_kernel_backend('eager')
        return eager_fn(x, *args)


class _Table(NamedTuple):
    """Per-candidate constants of one candidate list."""
    n: Tensor  # positive levels n_k (1 for FP candidates)
    is_fp: Tensor  # which candidates are FP (pass the input through)
    levels: Tuple[float, ...]  # n_k as Python numbers
    lo: Tuple[float, ...]  # bounds of the integer codes (+-inf for FP)
    hi: Tuple[float, ...]
    fp_rows: Tuple[int, ...]  # indices of the FP candidates


@functools.lru_cache(maxsize=None)
def _candidate_table(bits: Tuple[int, ...], signed: bool, for_weight: bool,
                     device: torch.device, dtype: torch.dtype) -> _Table:
    """The :class:`_Table` of ``bits`` (cached: built once per config)."""
    levels, lo, hi = [], [], []
    for b in bits:
        if b == FP_BITS:
            levels.append(1.0)
            lo.append(float('-inf'))
            hi.append(float('inf'))
            continue
        n = float(
            weight_levels(b) if for_weight else activation_levels(b, signed))
        levels.append(n)
        lo.append(-n if (signed or for_weight) else 0.0)
        hi.append(n)
    return _Table(
        n=torch.tensor(levels, dtype=dtype, device=device),
        is_fp=torch.tensor([b == FP_BITS for b in bits], device=device),
        levels=tuple(levels),
        lo=tuple(lo),
        hi=tuple(hi),
        fp_rows=tuple(k for k, b in enumerate(bits) if b == FP_BITS))


MIN_ACT_RANGE = 1e-4


def _act_params(ranges: Tensor, bits: Tuple[int, ...], signed: bool,
                dtype: torch.dtype):
    """The candidate table plus the range-dependent ``inv`` (``n / r``),
    ``scale`` (``r / n``) and ``r_eff`` (the range of the STE masks; ``inf``
    for FP candidates)."""
    table = _candidate_table(bits, signed, False, ranges.device, dtype)
    # SGD can push a learnable range to 0 or below; quantizing to
    # [0, MIN_ACT_RANGE] then (masks included) keeps n / r finite (no NaN
    # from 0 * inf) and lets dq/dr = 1[x > r] pull the range back up.
    r = ranges.detach().to(dtype).clamp_min(MIN_ACT_RANGE)
    one = torch.ones_like(r)
    inv = torch.where(table.is_fp, one, table.n / r)
    scale = torch.where(table.is_fp, one, r / table.n)
    r_eff = torch.where(table.is_fp, torch.full_like(r, float('inf')), r)
    return table, inv, scale, r_eff


# --- activation kernels, eager ---------------------------------------------
def _act_codes_eager(x_flat: Tensor, inv: Tensor, lo, hi,
                     fp_rows: Tuple[int, ...]) -> Tensor:
    """``(K, N)`` codes ``round(clamp(x * inv_k, lo_k, hi_k))``; FP rows: x.

    Row by row with scalar bounds: as much memory traffic as broadcasting
    over the (K, N) block, but plain vectorised loops.
    """
    codes = x_flat.new_empty((len(lo), x_flat.numel()))
    for k in range(len(lo)):
        if k in fp_rows:
            codes[k].copy_(x_flat)
        else:
            torch.mul(x_flat, inv[k], out=codes[k])
            codes[k].clamp_(lo[k], hi[k]).round_()
    return codes


def _mix_rows(codes: Tensor, coef: Tensor) -> Tensor:
    """``sum_k coef_k * codes_k`` (consumes ``codes`` when K == 1)."""
    if codes.shape[0] == 1:
        return codes[0].mul_(coef[0])
    return torch.mv(codes.t(), coef)


def _act_forward_eager(x, coef, inv, lo, hi, is_fp, fp_rows):
    """``sum_k coef_k * codes_k(x)`` with ``coef_k = p_k * s_k``."""
    codes = _act_codes_eager(x.reshape(-1), inv, lo, hi, fp_rows)
    return _mix_rows(codes, coef).view(x.shape)


def _act_backward_eager(x,
                        g,
                        p,
                        scale,
                        inv,
                        lo,
                        hi,
                        is_fp,
                        fp_rows,
                        r_eff,
                        signed,
                        need_x,
                        need_p,
                        need_r,
                        codes=None):
    """Gradients of ``sum_k p_k q_k(x)`` w.r.t. ``x``, ``p`` and ``r``.

    ``codes``: the (K, N) codes of ``x`` if the caller has them already;
    they are overwritten.
    """
    x_flat, g_flat = x.reshape(-1), g.reshape(-1)
    grad_x = grad_p = grad_r = None
    buf = codes
    if len(lo) == 1 and not fp_rows and (need_x or need_r):
        # One quantized candidate (a fixed-bit layer): plain masks.
        if need_p:
            grad_p = scale * torch.dot(
                g_flat,
                _act_codes_eager(x_flat, inv, lo, hi, fp_rows)[0]
                if buf is None else buf[0])
        grad_x, grad_r = _act_backward_single_eager(x_flat, g_flat, p, r_eff,
                                                    signed)
        return grad_x.view(x.shape), grad_p, grad_r
    if need_p:
        # sum(g * q_k) = s_k * <codes_k, g>
        if buf is None:
            buf = _act_codes_eager(x_flat, inv, lo, hi, fp_rows)
        grad_p = torch.mv(buf, g_flat).mul_(scale)
    if need_x or need_r:
        if buf is None:
            buf = x_flat.new_empty((p.numel(), x_flat.numel()))
        x_row = x_flat.unsqueeze(0)
        torch.gt(x_row, r_eff.unsqueeze(1), out=buf)  # 1[x > r_k]
        if need_r:
            grad_r = torch.mv(buf, g_flat)
        if need_x:
            blocked = torch.mv(buf.t(), p)  # sum_k p_k 1[x > r_k]
        if signed:
            torch.lt(x_row, -r_eff.unsqueeze(1), out=buf)  # 1[x < -r_k]
            if need_r:
                grad_r.sub_(torch.mv(buf, g_flat))
            if need_x:
                blocked.add_(torch.mv(buf.t(), p))
        del buf
        if need_r:
            grad_r.mul_(p)
        if need_x:
            # Weight of the candidates whose STE passes each element.
            if signed:
                passed = blocked.neg_().add_(p.sum())
            else:
                passed = blocked.neg_().add_(p.masked_fill(is_fp, 0).sum())
                # Unsigned quantizers block x < 0; FP candidates never block.
                passed.masked_fill_(x_flat < 0, 0)
                if fp_rows:
                    passed.add_(p[list(fp_rows)].sum())
            grad_x = passed.mul_(g_flat).view(x.shape)
    return grad_x, grad_p, grad_r


def _act_backward_single_eager(x_flat, g_flat, p, r_eff, signed):
    """``grad_x = p g 1[lo <= x <= r]`` and ``grad_r = p sum(g dq/dr)`` of
    one quantizer, in a few passes."""
    above = torch.gt(x_flat, r_eff[0], out=torch.empty_like(g_flat))
    grad_r = torch.dot(above, g_flat)
    if signed:
        below = torch.lt(x_flat, -r_eff[0], out=torch.empty_like(g_flat))
        grad_r = grad_r - torch.dot(below, g_flat)
        passed = below.add_(above).neg_().add_(1)  # 1 - above - below
    else:
        passed = torch.ge(x_flat, 0, out=torch.empty_like(g_flat))
        passed.sub_(above)  # 1[x >= 0] - 1[x > r] = 1[0 <= x <= r]
    del above
    grad_x = passed.mul_(g_flat).mul_(p[0])
    return grad_x, (grad_r * p).reshape(1)


# --- activation kernels for torch.compile (same maths, functional) ---------
# Written candidate by candidate: the loop unrolls at trace time into plain
# elementwise maths that inductor fuses into one pass over ``x``, whereas a
# reduction over a (K, N) view compiles into a much slower strided loop.
def _act_forward_fused(x, coef, inv, lo, hi, is_fp, fp_rows):
    out = None
    for k in range(len(lo)):
        if k in fp_rows:
            q = x
        else:
            q = torch.clamp(x * inv[k], lo[k], hi[k]).round()
        out = q * coef[k] if out is None else out + q * coef[k]
    return out


def _act_backward_fused(x, g, p, scale, inv, lo, hi, is_fp, fp_rows, r_eff,
                        signed, need_x, need_p, need_r):
    grad_p, grad_r = [], []
    weight = None
    for k in range(len(lo)):
        if k in fp_rows:
            if need_p:
                grad_p.append((g * x).sum())
            grad_r.append(torch.zeros_like(p[k]))
            passed = torch.ones_like(x, dtype=torch.bool)
        else:
            if need_p:
                codes = torch.clamp(x * inv[k], lo[k], hi[k]).round()
                grad_p.append((g * codes).sum() * scale[k])
            above = x > r_eff[k]
            g_r = torch.where(above, g, 0).sum()
            passed = ~above
            if signed:
                below = x < -r_eff[k]
                g_r = g_r - torch.where(below, g, 0).sum()
                passed = passed & ~below
            else:
                passed = passed & (x >= 0)
            grad_r.append(g_r * p[k])
        term = passed * p[k]
        weight = term if weight is None else weight + term
    return (g * weight if need_x else None,
            torch.stack(grad_p) if need_p else None,
            torch.stack(grad_r) if need_r else None)


# --- weight kernels ---------------------------------------------------------
def _safe_threshold(t: Tensor) -> Tensor:
    # T == 0 only for an all-zero weight (or channel): any divisor works.
    return torch.where(t > 0, t, torch.ones_like(t))


def _weight_codes_eager(u_flat, levels, lo, hi, fp_rows, clamp):
    """``(K, N)`` codes ``round(clamp(u * n_k, -n_k, n_k))``, ``u = w / T``.
    """
    codes = u_flat.new_empty((len(levels), u_flat.numel()))
    for k in range(len(levels)):
        if k in fp_rows:
            codes[k].copy_(u_flat)
            continue
        torch.mul(u_flat, levels[k], out=codes[k])
        if clamp:  # with T = max|w| the codes are already within +-n
            codes[k].clamp_(lo[k], hi[k])
        codes[k].round_()
    return codes


def _weight_forward_eager(w, p, t, n, levels, lo, hi, fp_rows, clamp):
    """``T * sum_k (p_k / n_k) * codes_k``."""
    u_flat = (w / _safe_threshold(t)).reshape(-1)
    codes = _weight_codes_eager(u_flat, levels, lo, hi, fp_rows, clamp)
    return _mix_rows(codes, p / n).view(w.shape).mul_(t)


def _weight_backward_eager(w, g, p, t, n, levels, lo, hi, fp_rows, clamp):
    """``grad_w = g * sum(p)`` (identity STE), ``grad_p_k = sum(g q_k)``."""
    u_flat = (w / _safe_threshold(t)).reshape(-1)
    codes = _weight_codes_eager(u_flat, levels, lo, hi, fp_rows, clamp)
    grad_p = torch.mv(codes, (g * t).reshape(-1)).div_(n)
    return g * p.sum(), grad_p


def _weight_forward_fused(w, p, t, n, levels, lo, hi, fp_rows, clamp):
    u = w / _safe_threshold(t)
    out = None
    for k in range(len(levels)):
        if k in fp_rows:
            term = u * p[k]
        else:
            codes = u * levels[k]
            if clamp:
                codes = torch.clamp(codes, lo[k], hi[k])
            term = codes.round() * (p[k] / levels[k])
        out = term if out is None else out + term
    return out * t


def _weight_backward_fused(w, g, p, t, n, levels, lo, hi, fp_rows, clamp):
    u = w / _safe_threshold(t)
    g_t = g * t
    grad_p = []
    for k in range(len(levels)):
        if k in fp_rows:
            grad_p.append((g_t * u).sum())
            continue
        codes = u * levels[k]
        if clamp:
            codes = torch.clamp(codes, lo[k], hi[k])
        grad_p.append((g_t * codes.round()).sum() / levels[k])
    return g * p.sum(), torch.stack(grad_p)


_KERNELS = {
    'act_forward': (_act_forward_eager, _act_forward_fused),
    'act_backward': (_act_backward_eager, _act_backward_fused),
    'weight_forward': (_weight_forward_eager, _weight_forward_fused),
    'weight_backward': (_weight_backward_eager, _weight_backward_fused),
}


def weight_threshold(w: Tensor,
                     threshold: Optional[Union[Tensor, float]] = None,
                     per_channel: bool = False) -> Tensor:
    """The clipping threshold ``T`` of a weight, shaped to broadcast with it.

    Args:
        w (Tensor): The weight, output channels in dim 0.
        threshold (Tensor | float, optional): A calibrated threshold: a
            scalar, or one value per output channel. ``None`` or an empty
            tensor means ``max|w|`` of the current weights.
        per_channel (bool): Use one ``max|w|`` per output channel.

    Returns:
        Tensor: A detached threshold, 0-d or of shape ``(C_out, 1, ...)``.
    """
    if threshold is not None and not isinstance(threshold, Tensor):
        threshold = torch.tensor(
            float(threshold), dtype=w.dtype, device=w.device)
    if threshold is not None and threshold.numel() > 0:
        t = threshold.detach().to(device=w.device, dtype=w.dtype)
        if t.numel() == 1:
            return t.reshape(())
        if w.dim() == 0 or t.numel() != w.shape[0]:
            raise ValueError(f'weight threshold of {t.numel()} values does '
                             f'not match a weight of shape {tuple(w.shape)}')
        return t.reshape((-1, ) + (1, ) * (w.dim() - 1))
    w = w.detach()
    if per_channel and w.dim() > 1:
        t = torch.linalg.vector_norm(w.flatten(1), float('inf'), dim=1)
        return t.reshape((-1, ) + (1, ) * (w.dim() - 1))
    return torch.linalg.vector_norm(w, float('inf'))


# ---------------------------------------------------------------------------
# Autograd functions
# ---------------------------------------------------------------------------
def _act_forward(x, probs, ranges, bits, signed) -> Tensor:
    """``sum_k p_k q_a(x; r_k, b_k)`` (no autograd)."""
    table, inv, scale, _ = _act_params(ranges, bits, signed, x.dtype)
    coef = probs.detach().to(x.dtype) * scale
    return _run_kernel('act_forward', x, coef, inv, table.lo, table.hi,
                       table.is_fp, table.fp_rows)


def _act_recompute(x, probs, ranges, bits, signed, keep_codes: bool):
    """:func:`_act_forward` for a backward pass: ``(x~, codes)``.

    With ``keep_codes`` and the eager backend, ``codes`` are the (K, N)
    integer codes behind ``x~``, for :func:`_act_backward` to reuse instead
    of computing them again; otherwise ``None``.
    """
    if not (keep_codes and _kernel_backend == 'eager'):
        return _act_forward(x, probs, ranges, bits, signed), None
    table, inv, scale, _ = _act_params(ranges, bits, signed, x.dtype)
    coef = probs.detach().to(x.dtype) * scale
    with _autocast_off(x.device):
        codes = _act_codes_eager(
            x.reshape(-1), inv, table.lo, table.hi, table.fp_rows)
        # _mix_rows scales a single row in place: give it a copy.
        mixed = _mix_rows(codes.clone() if len(bits) == 1 else codes, coef)
    return mixed.view(x.shape), codes


def _act_backward(x,
                  grad_out,
                  probs,
                  ranges,
                  bits,
                  signed,
                  need_x,
                  need_p,
                  need_r,
                  codes=None):
    """Gradients of :func:`_act_forward` w.r.t. ``x``, ``probs``,
    ``ranges`` (``None`` where not needed). ``codes``: what
    :func:`_act_recompute` returned, if anything (overwritten).
    """
    table, inv, scale, r_eff = _act_params(ranges, bits, signed, x.dtype)
    args = (x, grad_out.contiguous(), probs.detach().to(x.dtype), scale, inv,
            table.lo, table.hi, table.is_fp, table.fp_rows, r_eff, signed,
            need_x, need_p, need_r)
    if codes is not None:
        with _autocast_off(x.device):
            grads = _act_backward_eager(*args, codes=codes)
    else:
        grads = _run_kernel('act_backward', *args)
    grad_x, grad_p, grad_r = grads
    return (grad_x if need_x else None,
            grad_p.to(probs.dtype) if need_p else None,
            grad_r.to(ranges.dtype) if need_r else None)


def _weight_forward(w, probs, t, bits, clamp) -> Tensor:
    """``sum_j p_j q_w(w; T, b_j)`` (no autograd)."""
    table = _candidate_table(bits, True, True, w.device, w.dtype)
    return _run_kernel('weight_forward', w,
                       probs.detach().to(w.dtype), t, table.n, table.levels,
                       table.lo, table.hi, table.fp_rows, clamp)


def _weight_backward(w, grad_out, probs, t, bits, clamp, need_w, need_p):
    """Gradients of :func:`_weight_forward` w.r.t. ``w`` and ``probs``."""
    if not need_p:
        # The identity STE needs no recomputation.
        grad_w = grad_out * probs.detach().sum().to(w.dtype)
        return grad_w if need_w else None, None
    table = _candidate_table(bits, True, True, w.device, w.dtype)
    grad_w, grad_p = _run_kernel('weight_backward', w, grad_out.contiguous(),
                                 probs.detach().to(w.dtype), t, table.n,
                                 table.levels, table.lo, table.hi,
                                 table.fp_rows, clamp)
    return grad_w if need_w else None, grad_p.to(probs.dtype)


class _MixedActivationFunction(Function):
    """``sum_i p_i * q_a(x; r_i, b_i)``; keeps only ``x``, ``p`` and ``r``.

    With one candidate and ``p = [1]`` it is the plain PACT quantizer.
    """

    @staticmethod
    def forward(ctx, x: Tensor, probs: Tensor, ranges: Tensor,
                bits: Tuple[int, ...], signed: bool) -> Tensor:
        ctx.bits, ctx.signed = bits, signed
        ctx.save_for_backward(x, probs, ranges)
        return _act_forward(x, probs, ranges, bits, signed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, probs, ranges = ctx.saved_tensors
        grads = _act_backward(x, grad_out, probs, ranges, ctx.bits, ctx.signed,
                              *ctx.needs_input_grad[:3])
        return grads + (None, None)


class _MixedWeightFunction(Function):
    """``sum_j p_j * q_w(w; b_j)``; keeps only ``w``, ``p`` and ``T``.

    With one candidate and ``p = [1]`` it is the plain weight quantizer.
    """

    @staticmethod
    def forward(ctx, w: Tensor, probs: Tensor, t: Tensor,
                bits: Tuple[int, ...], clamp: bool) -> Tensor:
        ctx.bits, ctx.clamp = bits, clamp
        ctx.save_for_backward(w, probs, t)
        return _weight_forward(w, probs, t, bits, clamp)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        w, probs, t = ctx.saved_tensors
        grads = _weight_backward(w, grad_out, probs, t, ctx.bits, ctx.clamp,
                                 *ctx.needs_input_grad[:2])
        return grads + (None, None, None)


class _ConvSpec(NamedTuple):
    """Static arguments of :class:`_QuantConv2dFunction`."""
    a_bits: Tuple[int, ...]
    w_bits: Tuple[int, ...]
    signed: bool
    clamp: bool
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int


class _QuantConv2dFunction(Function):
    """``conv2d(x~, W~)`` with quantized (mixed) operands.

    Autograd would keep ``x~`` alive for the weight gradient: a second copy
    of every searched layer's input next to ``x``, which the preceding ReLU
    keeps anyway. This function keeps ``x`` only and recomputes ``x~`` in
    backward (one elementwise pass), so the quantized network needs about
    the memory of the full-precision one.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a_probs, a_ranges, w_probs, t,
                spec: _ConvSpec):
        x_q = (
            x if spec.a_bits == (FP_BITS, ) else _act_forward(
                x, a_probs, a_ranges, spec.a_bits, spec.signed))
        w_q = (
            weight if spec.w_bits == (FP_BITS, ) else _weight_forward(
                weight, w_probs, t, spec.w_bits, spec.clamp))
        out = F.conv2d(x_q, w_q, bias, spec.stride, spec.padding,
                       spec.dilation, spec.groups)
        ctx.spec = spec
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.bias_dtype = None if bias is None else bias.dtype
        # Under autocast the conv ran in a lower precision than its inputs;
        # its backward must run in that precision too.
        ctx.conv_dtype = out.dtype
        ctx.save_for_backward(x, weight, a_probs, a_ranges, w_probs, t, w_q)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, a_probs, a_ranges, w_probs, t, w_q = ctx.saved_tensors
        spec = ctx.spec
        (need_x, need_w, need_b, need_pa, need_r, need_pw, _,
         _) = ctx.needs_input_grad
        quant_a = spec.a_bits != (FP_BITS, )
        codes = None
        if quant_a:
            # The eager backend reuses the recomputed codes for the
            # probability gradients.
            x_q, codes = _act_recompute(
                x,
                a_probs,
                a_ranges,
                spec.a_bits,
                spec.signed,
                keep_codes=need_pa)
        else:
            x_q = x
        dtype = ctx.conv_dtype
        grad_xq, grad_wq, grad_b = torch.ops.aten.convolution_backward(
            grad_out.to(dtype), x_q.to(dtype), w_q.to(dtype), ctx.bias_sizes,
            spec.stride, spec.padding, spec.dilation, False, [0, 0],
            spec.groups,
            [need_x or need_pa or need_r, need_w or need_pw, need_b])
        del x_q
        if grad_xq is not None:
            grad_xq = grad_xq.to(x.dtype)
        if grad_wq is not None:
            grad_wq = grad_wq.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        grad_x = grad_pa = grad_r = grad_w = grad_pw = None
        if quant_a:
            if grad_xq is not None:
                grad_x, grad_pa, grad_r = _act_backward(
                    x,
                    grad_xq,
                    a_probs,
                    a_ranges,
                    spec.a_bits,
                    spec.signed,
                    need_x,
                    need_pa,
                    need_r,
                    codes=codes)
                del codes
        else:
            grad_x = grad_xq
        if spec.w_bits != (FP_BITS, ):
            if grad_wq is not None:
                grad_w, grad_pw = _weight_backward(weight, grad_wq, w_probs, t,
                                                   spec.w_bits, spec.clamp,
                                                   need_w, need_pw)
        else:
            grad_w = grad_wq
        return (grad_x, grad_w, grad_b if need_b else None, grad_pa, grad_r,
                grad_pw, None, None)


# ---------------------------------------------------------------------------
# Functional interface
# ---------------------------------------------------------------------------
def quantize_activation(x: Tensor,
                        r: Tensor,
                        bits: int,
                        signed: bool = False) -> Tensor:
    """Quantize an activation with a learnable clipping range ``r``.

    Args:
        x (Tensor): The activation.
        r (Tensor | float): The clipping range (a scalar tensor, usually a
            ``nn.Parameter``).
        bits (int): The bit width; 32 returns ``x`` unchanged.
        signed (bool): Clip to ``[-r, r]`` instead of ``[0, r]``.

    Returns:
        Tensor: ``round(clamp(x, lo, r) / s) * s``. Gradients follow the
        STE: ``dq/dx = 1[lo <= x <= r]``, ``dq/dr = 1[x > r]`` (signed:
        ``-1`` for ``x < -r`` too), summed to ``r``'s shape.
    """
    bits = check_bits(bits)
    if bits == FP_BITS:
        return x
    if not isinstance(r, Tensor):
        r = torch.tensor(float(r), dtype=x.dtype, device=x.device)
    if r.numel() != 1:
        raise ValueError(f'the activation range must hold one value, got '
                         f'shape {tuple(r.shape)}')
    # The reshape is a view: the range gradient flows back to r's shape.
    return _MixedActivationFunction.apply(x, _ones(x), r.reshape(1), (bits, ),
                                          bool(signed))


def quantize_weight(w: Tensor,
                    bits: int,
                    threshold: Optional[Union[Tensor, float]] = None,
                    per_channel: bool = False) -> Tensor:
    """Quantize a weight symmetrically to ``2^b - 1`` levels.

    Args:
        w (Tensor): The weight (output channels in dim 0).
        bits (int): The bit width; 32 returns ``w`` unchanged.
        threshold (Tensor | float, optional): A calibrated clipping
            threshold ``T``; ``None`` or empty means ``max|w|`` of the
            current weights (detached, recomputed every call).
        per_channel (bool): One ``T`` per output channel.

    Returns:
        Tensor: ``round(clamp(w, -T, T) / s) * s`` with
        ``s = T / (2^(b-1) - 1)``; its gradient to ``w`` is the identity.
    """
    bits = check_bits(bits)
    if bits == FP_BITS:
        return w
    t = weight_threshold(w, threshold, per_channel)
    return _MixedWeightFunction.apply(w, _ones(w), t, (bits, ),
                                      _is_calibrated(threshold))


def _ones(like: Tensor) -> Tensor:
    """The probabilities ``[1]`` of a single candidate (no gradient)."""
    return torch.ones(1, dtype=like.dtype, device=like.device)


def _is_calibrated(threshold) -> bool:
    """Whether a threshold is given (so the clamp is not a no-op)."""
    if threshold is None:
        return False
    return not isinstance(threshold, Tensor) or threshold.numel() > 0


def _as_vector(values, like: Tensor) -> Tensor:
    if isinstance(values, Tensor):
        return values.reshape(-1)
    return torch.stack([
        v if isinstance(v, Tensor) else torch.tensor(
            float(v), dtype=like.dtype, device=like.device) for v in values
    ]).reshape(-1)


def mixed_activation(x: Tensor,
                     probs: Tensor,
                     ranges: Tensor,
                     bits: Sequence[int],
                     signed: bool = False) -> Tensor:
    """Probability-weighted sum of activation quantizers (EdMIPS composite).

    ``out = sum_i probs[i] * q_a(x; ranges[i], bits[i])`` computed by one
    autograd function that saves only ``x``, ``probs`` and ``ranges`` and
    recomputes each candidate in backward.

    Args:
        x (Tensor): The activation.
        probs (Tensor): ``(K,)`` candidate weights, usually
            ``softmax(alpha)`` computed by the caller so that the alphas get
            their gradient through the softmax.
        ranges (Tensor): ``(K,)`` clipping ranges, one per candidate.
        bits (Sequence[int]): ``K`` candidate bit widths (32 = identity).
        signed (bool): Signed quantizers.

    Returns:
        Tensor: The mixed activation. Gradients: ``x``:
        ``sum_i p_i 1[lo <= x <= r_i]``; ``ranges[i]``:
        ``p_i * sum(g * dq_i/dr_i)``; ``probs[i]``: ``sum(g * q_i(x))``.
    """
    bits = check_candidates(bits)
    probs = _as_vector(probs, x)
    ranges = _as_vector(ranges, x)
    if probs.numel() != len(bits) or ranges.numel() != len(bits):
        raise ValueError(f'{len(bits)} candidates need as many probs and '
                         f'ranges, got {probs.numel()} and {ranges.numel()}')
    return _MixedActivationFunction.apply(x, probs, ranges, bits, bool(signed))


def mixed_weight(w: Tensor,
                 probs: Tensor,
                 bits: Sequence[int],
                 per_channel: bool = False,
                 threshold: Optional[Union[Tensor, float]] = None) -> Tensor:
    """Probability-weighted sum of weight quantizers (EdMIPS composite).

    All candidates share one threshold ``T`` (``max|w|`` of the current
    weights unless ``threshold`` is given).

    Args:
        w (Tensor): The shared full-precision weight.
        probs (Tensor): ``(K,)`` candidate weights, usually a softmax.
        bits (Sequence[int]): ``K`` candidate bit widths (32 = identity).
        per_channel (bool): One threshold per output channel.
        threshold (Tensor | float, optional): A calibrated threshold.

    Returns:
        Tensor: ``sum_j probs[j] * q_w(w; bits[j])``. Gradients: ``w``:
        ``sum_j p_j * g`` (identity STE); ``probs[j]``: ``sum(g * q_j(w))``.
    """
    bits = check_candidates(bits)
    probs = _as_vector(probs, w)
    if probs.numel() != len(bits):
        raise ValueError(f'{len(bits)} candidates need as many probs, got '
                         f'{probs.numel()}')
    t = weight_threshold(w, threshold, per_channel)
    return _MixedWeightFunction.apply(w, probs, t, bits,
                                      _is_calibrated(threshold))


def quantized_conv2d(x: Tensor,
                     weight: Tensor,
                     bias: Optional[Tensor] = None,
                     *,
                     a_bits: Sequence[int],
                     w_bits: Sequence[int],
                     a_probs: Optional[Tensor] = None,
                     a_ranges: Optional[Tensor] = None,
                     w_probs: Optional[Tensor] = None,
                     signed: bool = False,
                     per_channel: bool = False,
                     threshold: Optional[Union[Tensor, float]] = None,
                     stride=1,
                     padding=0,
                     dilation=1,
                     groups: int = 1) -> Tensor:
    """``conv2d(mixed_activation(x), mixed_weight(weight))`` in one function.

    The same values and gradients as composing :func:`mixed_activation`,
    :func:`mixed_weight` and ``F.conv2d`` (one convolution call), but the
    quantized input is recomputed in backward instead of being kept, so the
    layer stores no more activations than a full-precision conv.

    Args:
        x (Tensor): The input ``(N, C, H, W)``.
        weight (Tensor): The full-precision weight.
        bias (Tensor, optional): The bias (never quantized).
        a_bits (Sequence[int]): Activation candidates (``(32, )``: the input
            stays full precision).
        w_bits (Sequence[int]): Weight candidates (``(32, )``: the weight
            stays full precision).
        a_probs (Tensor, optional): ``(K_a,)`` activation candidate weights;
            ``None`` for a single candidate.
        a_ranges (Tensor): ``(K_a,)`` activation ranges (unused for 32).
        w_probs (Tensor, optional): ``(K_w,)`` weight candidate weights;
            ``None`` for a single candidate.
        signed, per_channel, threshold: As in :func:`mixed_activation` and
            :func:`mixed_weight`.
        stride, padding, dilation, groups: As in ``F.conv2d``; ``padding``
            must be numeric (zero padding).

    Returns:
        Tensor: The convolution output.
    """
    a_bits, w_bits = check_candidates(a_bits), check_candidates(w_bits)
    if isinstance(padding, str):
        raise ValueError('quantized_conv2d needs numeric padding, got '
                         f'{padding!r}')
    a_probs = _ones(x) if a_probs is None else _as_vector(a_probs, x)
    w_probs = _ones(weight) if w_probs is None else _as_vector(w_probs, weight)
    if a_ranges is None:
        if a_bits != (FP_BITS, ):
            raise ValueError('quantized activations need a_ranges')
        a_ranges = torch.full((len(a_bits), ),
                              float('inf'),
                              dtype=x.dtype,
                              device=x.device)
    a_ranges = _as_vector(a_ranges, x)
    if a_probs.numel() != len(a_bits) or a_ranges.numel() != len(a_bits):
        raise ValueError(f'{len(a_bits)} activation candidates need as many '
                         f'probs and ranges, got {a_probs.numel()} and '
                         f'{a_ranges.numel()}')
    if w_probs.numel() != len(w_bits):
        raise ValueError(f'{len(w_bits)} weight candidates need as many '
                         f'probs, got {w_probs.numel()}')
    t = weight_threshold(weight, threshold, per_channel)
    spec = _ConvSpec(a_bits, w_bits, bool(signed), _is_calibrated(threshold),
                     _pair(stride), _pair(padding), _pair(dilation),
                     int(groups))
    return _QuantConv2dFunction.apply(x, weight, bias, a_probs, a_ranges,
                                      w_probs, t, spec)


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------
class ActivationQuantizer(nn.Module):
    """A PACT activation quantizer with a learnable range.

    Args:
        bits (int): Bit width (2..8, or 32 for identity).
        signed (bool): Clip to ``[-r, r]``. Defaults to False.
        init_range (float): Initial ``r``. Defaults to 6.0.
        name (str): A name used in error messages (e.g. the layer name).
    """

    def __init__(self,
                 bits: int,
                 signed: bool = False,
                 init_range: float = 6.0,
                 name: str = ''):
        super().__init__()
        self.name = name
        self.bits = check_bits(bits, name)
        self.signed = bool(signed)
        self.range = nn.Parameter(torch.tensor(float(init_range)))

    def forward(self, x: Tensor) -> Tensor:
        return quantize_activation(x, self.range, self.bits, self.signed)

    def extra_repr(self) -> str:
        return f'bits={self.bits}, signed={self.signed}'


class WeightQuantizer(nn.Module):
    """A symmetric weight quantizer.

    The buffer ``threshold`` is empty until :meth:`calibrate` sets it; while
    empty, ``T = max|w|`` of the weights passed to :meth:`forward`.

    Args:
        bits (int): Bit width (2..8, or 32 for identity).
        per_channel (bool): One threshold per output channel.
        name (str): A name used in error messages.
    """

    def __init__(self, bits: int, per_channel: bool = False, name: str = ''):
        super().__init__()
        self.name = name
        self.bits = check_bits(bits, name)
        self.per_channel = bool(per_channel)
        self.register_buffer('threshold', torch.empty(0))

    def calibrate(self, threshold: Optional[Union[Tensor, float]]) -> None:
        """Set (a tensor or float) or clear (``None`` or 0) the threshold."""
        self.threshold = as_threshold_buffer(threshold, self.threshold)

    def forward(self, w: Tensor) -> Tensor:
        return quantize_weight(w, self.bits, self.threshold, self.per_channel)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        resize_threshold_buffer(self, 'threshold', state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f'bits={self.bits}, per_channel={self.per_channel}'


def as_threshold_buffer(threshold, like: Tensor) -> Tensor:
    """Build a threshold buffer value; ``None`` / all-zero -> empty."""
    if threshold is None:
        return like.new_empty(0)
    t = torch.as_tensor(threshold).detach().to(like.device, like.dtype)
    t = t.reshape(-1).clone()
    if t.numel() == 0 or not bool((t != 0).any()):
        return like.new_empty(0)
    if bool((t < 0).any()):
        raise ValueError(f'a weight threshold must be >= 0, got {threshold}')
    return t


def resize_threshold_buffer(module: nn.Module, name: str, state_dict: dict,
                            prefix: str) -> None:
    """Let a (possibly empty) threshold buffer take the stored shape.

    A calibrated threshold may have a different size (scalar or per channel)
    from the module's empty default; ``load_state_dict`` would otherwise
    reject it as a shape mismatch. An all-zero stored value means "from the
    current weights" and loads as empty.
    """
    key = prefix + name
    if key not in state_dict:
        return
    value = state_dict[key]
    buf = getattr(module, name)
    new = as_threshold_buffer(value, buf)
    # Make the stored entry match what the buffer now holds.
    setattr(module, name, torch.empty_like(new))
    state_dict[key] = new
