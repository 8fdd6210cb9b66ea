# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Activation and weight quantizers of GMPQ (pure PyTorch).

The semantics follow the released GMPQ / EdMIPS code (see
``docs/GMPQ_SPEC.md`` section 2):

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

Internally ``clamp(x, lo, r) / s`` is evaluated as ``clamp(x * (n / r),
lo * n, n)``: the same value (up to float rounding at exact ties) with one
multiply instead of a clamp against a tensor and a division.
"""
import numbers
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd import Function

FP_BITS = 32
SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 32)

# Smallest threshold treated as non-zero; keeps an all-zero weight from
# producing 0 / 0.
_EPS = 1e-12

__all__ = [
    'FP_BITS', 'SUPPORTED_BITS', 'check_bits', 'check_candidates',
    'activation_levels', 'weight_levels', 'quantize_activation',
    'quantize_weight', 'weight_threshold', 'mixed_activation',
    'mixed_weight', 'ActivationQuantizer', 'WeightQuantizer',
    'as_threshold_buffer', 'resize_threshold_buffer'
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
    ok = (isinstance(bits, numbers.Integral) and not isinstance(bits, bool)
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
# Shared kernels (no autograd; called inside the autograd functions)
# ---------------------------------------------------------------------------
def _act_quant_into(x: Tensor, r: Tensor, n: int, signed: bool,
                    out: Optional[Tensor] = None) -> Tensor:
    """Integer codes ``round(clamp(x, lo, r) / s)`` written into ``out``.

    The result is still in units of ``s``; multiply by ``r / n`` for values.
    """
    inv_scale = n / r.clamp_min(_EPS)
    out = torch.mul(x, inv_scale, out=out) if out is not None else x * inv_scale
    return out.clamp_(-n if signed else 0, n).round_()


def _act_range_grad(x: Tensor, g: Tensor, r: Tensor, signed: bool) -> Tensor:
    """``sum(g * dq/dr)``: ``+g`` where ``x > r`` (and ``-g`` where ``x < -r``
    when signed)."""
    grad = torch.where(x > r, g, 0).sum()
    if signed:
        grad = grad - torch.where(x < -r, g, 0).sum()
    return grad


def _act_pass_mask(x: Tensor, r: Tensor, signed: bool) -> Tensor:
    """Boolean ``1[lo <= x <= r]`` (``lo`` is 0, or ``-r`` when signed)."""
    lo = -r if signed else 0
    return (x >= lo) & (x <= r)


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
    w_abs = w.detach().abs()
    if per_channel and w.dim() > 1:
        return w_abs.amax(dim=tuple(range(1, w.dim())), keepdim=True)
    return w_abs.max()


def _weight_quant(w: Tensor, t: Tensor, n: int) -> Tensor:
    """``round(clamp(w, -T, T) / s) * s`` with ``s = T / n``; zero where
    ``T == 0``."""
    t_safe = t.clamp_min(_EPS)
    codes = torch.maximum(torch.minimum(w, t), -t).mul_(n / t_safe).round_()
    return codes.mul_(t_safe / n)


# ---------------------------------------------------------------------------
# Single-candidate quantizers
# ---------------------------------------------------------------------------
class _ActivationQuantFunction(Function):
    """PACT activation quantization with the STE of the released code."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor, bits: int, signed: bool) -> Tensor:
        ctx.signed = signed
        # Only x and r are kept: the pass-through mask is recomputed in
        # backward, and x is usually already saved by the preceding ReLU.
        ctx.save_for_backward(x, r)
        n = activation_levels(bits, signed)
        out = _act_quant_into(x, r, n, signed)
        return out.mul_(r.clamp_min(_EPS) / n)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, r = ctx.saved_tensors
        grad_x = grad_r = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out * _act_pass_mask(x, r, ctx.signed)
        if ctx.needs_input_grad[1]:
            grad_r = _act_range_grad(x, grad_out, r, ctx.signed)
            grad_r = grad_r.reshape(r.shape).to(r.dtype)
        return grad_x, grad_r, None, None


def quantize_activation(x: Tensor,
                        r: Tensor,
                        bits: int,
                        signed: bool = False) -> Tensor:
    """Quantize an activation with a learnable clipping range ``r``.

    Args:
        x (Tensor): The activation.
        r (Tensor): The clipping range (a scalar tensor, usually a
            ``nn.Parameter``).
        bits (int): The bit width; 32 returns ``x`` unchanged.
        signed (bool): Clip to ``[-r, r]`` instead of ``[0, r]``.

    Returns:
        Tensor: The quantized activation. Gradients follow the STE:
        ``dq/dx = 1[lo <= x <= r]``, ``dq/dr = 1[x > r]`` (signed: ``-1``
        for ``x < -r`` too).
    """
    bits = check_bits(bits)
    if bits == FP_BITS:
        return x
    if not isinstance(r, Tensor):
        r = torch.tensor(float(r), dtype=x.dtype, device=x.device)
    return _ActivationQuantFunction.apply(x, r, bits, bool(signed))


class _WeightQuantFunction(Function):
    """Symmetric weight quantization with an identity STE."""

    @staticmethod
    def forward(ctx, w: Tensor, t: Tensor, bits: int) -> Tensor:
        return _weight_quant(w, t, weight_levels(bits))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return grad_out, None, None


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
        Tensor: The quantized weight; its gradient to ``w`` is the identity.
    """
    bits = check_bits(bits)
    if bits == FP_BITS:
        return w
    t = weight_threshold(w, threshold, per_channel)
    return _WeightQuantFunction.apply(w, t, bits)


# ---------------------------------------------------------------------------
# Mixed (supernet) quantizers
# ---------------------------------------------------------------------------
class _MixedActivationFunction(Function):
    """``sum_i p_i * q_a(x; r_i, b_i)`` with recomputation in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, probs: Tensor, ranges: Tensor,
                bits: Tuple[int, ...], signed: bool) -> Tensor:
        ctx.bits, ctx.signed = bits, signed
        ctx.save_for_backward(x, probs, ranges)
        out = None
        codes = None  # one scratch buffer reused by every candidate
        for i, b in enumerate(bits):
            if b == FP_BITS:
                term, coef = x, probs[i]
            else:
                n = activation_levels(b, signed)
                r = ranges[i]
                codes = _act_quant_into(x, r, n, signed, out=codes)
                term, coef = codes, probs[i] * r.clamp_min(_EPS) / n
            if out is None:
                out = term * coef
            else:
                out.addcmul_(term, coef)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, probs, ranges = ctx.saved_tensors
        bits, signed = ctx.bits, ctx.signed
        need_x, need_p, need_r = ctx.needs_input_grad[:3]
        grad_x = grad_p = grad_r = None
        g = grad_out.contiguous()
        g_flat = g.reshape(-1)
        if need_p:
            grad_p = torch.zeros_like(probs)
        if need_r:
            grad_r = torch.zeros_like(ranges)
        # Per-element sum of p_i over the candidates whose STE passes x.
        pass_weight = None
        codes = None
        for i, b in enumerate(bits):
            p = probs[i]
            if b == FP_BITS:
                if need_p:
                    grad_p[i] = torch.dot(g_flat, x.reshape(-1).to(g.dtype))
                if need_x:
                    # The identity candidate passes every element.
                    if pass_weight is None:
                        pass_weight = torch.empty_like(g).fill_(p)
                    else:
                        pass_weight.add_(p)
                continue
            r = ranges[i]
            if need_p:
                n = activation_levels(b, signed)
                codes = _act_quant_into(x, r, n, signed, out=codes)
                dot = torch.dot(g_flat, codes.reshape(-1).to(g.dtype))
                grad_p[i] = dot * (r.clamp_min(_EPS) / n)
            if need_r:
                grad_r[i] = p * _act_range_grad(x, g, r, signed)
            if need_x:
                mask = _act_pass_mask(x, r, signed)
                if pass_weight is None:
                    pass_weight = mask * p.to(g.dtype)
                else:
                    pass_weight.addcmul_(mask, p.to(g.dtype))
        if need_x:
            grad_x = pass_weight.mul_(g)
        return grad_x, grad_p, grad_r, None, None


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
    return _MixedActivationFunction.apply(x, probs, ranges, bits,
                                          bool(signed))


class _MixedWeightFunction(Function):
    """``sum_j p_j * q_w(w; b_j)`` with recomputation in backward."""

    @staticmethod
    def forward(ctx, w: Tensor, probs: Tensor, t: Tensor,
                bits: Tuple[int, ...]) -> Tensor:
        ctx.bits = bits
        ctx.save_for_backward(w, probs, t)
        out = None
        for j, b in enumerate(bits):
            q = w if b == FP_BITS else _weight_quant(w, t, weight_levels(b))
            if out is None:
                out = q * probs[j]
            else:
                out.add_(q * probs[j])
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        w, probs, t = ctx.saved_tensors
        grad_w = grad_p = None
        if ctx.needs_input_grad[0]:
            # Identity STE for every candidate, weighted by its probability.
            grad_w = grad_out * probs.sum()
        if ctx.needs_input_grad[1]:
            g_flat = grad_out.reshape(-1)
            grad_p = torch.stack([
                torch.dot(
                    g_flat, (w if b == FP_BITS else _weight_quant(
                        w, t, weight_levels(b))).reshape(-1))
                for b in ctx.bits
            ]).to(probs.dtype)
        return grad_w, grad_p, None, None


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
    return _MixedWeightFunction.apply(w, probs, t, bits)


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
