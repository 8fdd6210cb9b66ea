# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Which kernels run the quantizers, and the constants they share.

Two backends compute the same maths (:func:`set_kernel_backend`, or the
``GMPQ_QUANT_BACKEND`` environment variable): ``'eager'``
(:mod:`.eager_kernels`, plain PyTorch ops) and ``'compile'``
(:mod:`.fused_kernels` handed to ``torch.compile``).
"""
import contextlib
import functools
import os
import warnings
from typing import NamedTuple, Tuple

import torch
from torch import Tensor

from gmpq_mm.compat import is_autocast_enabled
from .bits import FP_BITS, activation_levels, weight_levels
from .eager_kernels import (act_backward_eager, act_forward_eager,
                            weight_backward_eager, weight_forward_eager)
from .fused_kernels import (act_backward_fused, act_forward_fused,
                            weight_backward_fused, weight_forward_fused)

__all__ = [
    'MIN_ACT_RANGE', 'set_kernel_backend', 'get_kernel_backend', 'run_kernel',
    'autocast_off', 'candidate_table', 'act_params'
]

# 'compile' is opt-in: compiling takes tens of seconds per process.
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


def autocast_off(device: torch.device):
    """A context that turns autocast off on ``device`` if it is on.

    The kernels' matrix-vector products are on autocast's low-precision
    list; the sums over millions of elements they compute (the alpha and
    range gradients) must stay in the tensors' own precision.
    """
    if device.type in ('cpu', 'cuda') and is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def run_kernel(name: str, x: Tensor, *args):
    eager_fn, fused_fn = _KERNELS[name]
    with autocast_off(x.device):
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


_KERNELS = {
    'act_forward': (act_forward_eager, act_forward_fused),
    'act_backward': (act_backward_eager, act_backward_fused),
    'weight_forward': (weight_forward_eager, weight_forward_fused),
    'weight_backward': (weight_backward_eager, weight_backward_fused),
}


class _Table(NamedTuple):
    """Per-candidate constants of one candidate list."""
    n: Tensor  # positive levels n_k (1 for FP candidates)
    is_fp: Tensor  # which candidates are FP (pass the input through)
    levels: Tuple[float, ...]  # n_k as Python numbers
    lo: Tuple[float, ...]  # bounds of the integer codes (+-inf for FP)
    hi: Tuple[float, ...]
    fp_rows: Tuple[int, ...]  # indices of the FP candidates


@functools.lru_cache(maxsize=None)
def candidate_table(bits: Tuple[int, ...], signed: bool, for_weight: bool,
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


def act_params(ranges: Tensor, bits: Tuple[int, ...], signed: bool,
               dtype: torch.dtype):
    """The candidate table plus the range-dependent ``inv`` (``n / r``),
    ``scale`` (``r / n``) and ``r_eff`` (the range of the STE masks; ``inf``
    for FP candidates)."""
    table = candidate_table(bits, signed, False, ranges.device, dtype)
    # SGD can push a learnable range to 0 or below; quantizing to
    # [0, MIN_ACT_RANGE] then (masks included) keeps n / r finite (no NaN
    # from 0 * inf) and lets dq/dr = 1[x > r] pull the range back up.
    r = ranges.detach().to(dtype).clamp_min(MIN_ACT_RANGE)
    one = torch.ones_like(r)
    inv = torch.where(table.is_fp, one, table.n / r)
    scale = torch.where(table.is_fp, one, r / table.n)
    r_eff = torch.where(table.is_fp, torch.full_like(r, float('inf')), r)
    return table, inv, scale, r_eff
