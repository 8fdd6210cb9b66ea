# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Which kernels run the quantizers, and the constants they share.

Two backends compute the same maths: ``'eager'`` (:mod:`.eager_kernels`,
plain PyTorch ops) and ``'compile'`` (:mod:`.fused_kernels` handed to
``torch.compile``). The default setting, ``'auto'``, runs eager in short
processes (tests, tools) and compiles for a training run long enough to
earn the compile time back (:func:`plan_run`); :func:`set_kernel_backend`
or the ``GMPQ_QUANT_BACKEND`` environment variable pins either.
"""
import contextlib
import functools
import os
import warnings
from typing import NamedTuple, Tuple

import torch
from torch import Tensor

from gmpq_mm.compat import enable_compile_cache, is_autocast_enabled
from .bits import FP_BITS, activation_levels, weight_levels
from .eager_kernels import (act_backward_eager, act_forward_eager,
                            weight_backward_eager, weight_forward_eager)
from .fused_kernels import (act_backward_fused, act_forward_fused,
                            weight_backward_fused, weight_forward_fused)

__all__ = [
    'MIN_ACT_RANGE', 'AUTO_COMPILE_SAMPLES', 'set_kernel_backend',
    'get_kernel_backend', 'get_kernel_backend_setting', 'plan_run',
    'run_kernel', 'autocast_off', 'candidate_table', 'act_params'
]

# 'auto' (the default) runs eager until a training loop announces a run
# long enough to pay for compiling (:func:`plan_run`), then 'compile'.
_KERNEL_BACKENDS = ('auto', 'eager', 'compile')
ENV_VAR = 'GMPQ_QUANT_BACKEND'
# A run of at least this many samples (iterations x batch size, at 32 x 32
# pixels; larger images count more) compiles under 'auto'. Measured on a
# 2-core CPU (docs/user_guides/benchmarks.md): compiling costs about as
# much as 3,000 - 6,000 search samples save, with a cold cache.
AUTO_COMPILE_SAMPLES = 20000
_kernel_backend = os.environ.get(ENV_VAR, 'auto') or 'auto'
if _kernel_backend not in _KERNEL_BACKENDS:
    warnings.warn(f'{ENV_VAR}={_kernel_backend!r} is not one of '
                  f'{_KERNEL_BACKENDS}; using auto')
    _kernel_backend = 'auto'
_long_run = False  # what 'auto' runs: set by plan_run
_compile_failed = False
_compiled_kernels = {}


def set_kernel_backend(backend: str) -> None:
    """Choose how the quantization kernels run.

    Args:
        backend (str): ``'auto'`` (the default: ``'eager'``, until
            :func:`plan_run` announces a run long enough to pay for
            compiling, then ``'compile'``), ``'eager'`` (plain PyTorch
            ops) or ``'compile'`` (``torch.compile`` of the fused kernels;
            falls back to eager with a warning if compiling fails). The
            environment variable ``GMPQ_QUANT_BACKEND`` sets the default.
    """
    global _kernel_backend, _compile_failed
    if backend not in _KERNEL_BACKENDS:
        raise ValueError(f'kernel backend {backend!r} is not one of '
                         f'{_KERNEL_BACKENDS}')
    _kernel_backend = backend
    if backend == 'compile':
        _compile_failed = False  # asked for explicitly: try again


def get_kernel_backend() -> str:
    """The kernels that run now: ``'eager'`` or ``'compile'``."""
    if _compile_failed:
        return 'eager'
    if _kernel_backend == 'auto':
        return 'compile' if _long_run else 'eager'
    return _kernel_backend


def get_kernel_backend_setting() -> str:
    """The setting (``'auto'``, ``'eager'`` or ``'compile'``)."""
    return _kernel_backend


def plan_run(samples: int, pixels: int = 32 * 32) -> str:
    """Tell ``'auto'`` how much training this process is about to run.

    Training loops call it before their first step (see
    ``QuantKernelHook``); a run of at least :data:`AUTO_COMPILE_SAMPLES`
    samples (counted at 32 x 32 pixels) compiles, a shorter one (tests,
    tools, a demo) stays eager: compiling costs tens of seconds that only
    a long run earns back.

    Args:
        samples (int): Samples the run will process (iterations x batch).
        pixels (int): Pixels of one input image (``H * W``).

    Returns:
        str: The kernels that will run: ``'eager'`` or ``'compile'``.
    """
    global _long_run
    _long_run = samples * max(pixels, 1) / 1024 >= AUTO_COMPILE_SAMPLES
    return get_kernel_backend()


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
    """Run kernel ``name`` with the backend of :func:`get_kernel_backend`.

    A compiler failure (no C++ compiler, a torch whose compiler does not
    support this Python, ...) warns once and falls back to eager for the
    rest of the process: same values, only slower.
    """
    global _compile_failed
    eager_fn, fused_fn = _KERNELS[name]
    with autocast_off(x.device):
        if get_kernel_backend() == 'compile':
            try:
                fn = _compiled_kernels.get(name)
                if fn is None:
                    enable_compile_cache()
                    fn = _compiled_kernels[name] = torch.compile(
                        fused_fn, dynamic=True)
                return fn(x, *args)
            except Exception as err:  # noqa: BLE001 - any compiler failure
                warnings.warn('gmpq_mm: compiling the quantization kernels '
                              f'failed ({type(err).__name__}: {err}); '
                              'falling back to the eager backend')
                _compile_failed = True
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
