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

Two kernel backends compute the same maths: ``'eager'`` (plain PyTorch
ops) and ``'compile'`` (``torch.compile``-fused elementwise kernels: much
faster, but compiling takes tens of seconds per process). The default
setting ``'auto'`` compiles only for a training run long enough to earn
that back (:mod:`.kernel_backend`); :func:`set_kernel_backend` or the
``GMPQ_QUANT_BACKEND`` environment variable pins one.

This file is the public face of the quantizers: the functional API and the
modules. The rest lives beside it: :mod:`.bits` (bit-width checks and
levels), :mod:`.kernel_backend` (which kernels run, and their constants),
:mod:`.eager_kernels` and :mod:`.fused_kernels` (the two backends) and
:mod:`.autograd_functions` (what autograd records).
"""
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.modules.utils import _pair

from .autograd_functions import (ConvSpec, MixedActivationFunction,
                                 MixedWeightFunction, QuantConv2dFunction)
from .bits import (FP_BITS, SUPPORTED_BITS, activation_levels, check_bits,
                   check_candidates, weight_levels)
from .kernel_backend import (MIN_ACT_RANGE, get_kernel_backend,
                             set_kernel_backend)

__all__ = [
    'FP_BITS', 'SUPPORTED_BITS', 'check_bits', 'check_candidates',
    'activation_levels', 'weight_levels', 'quantize_activation',
    'quantize_weight', 'weight_threshold', 'mixed_activation', 'mixed_weight',
    'quantized_conv2d', 'ActivationQuantizer', 'WeightQuantizer',
    'as_threshold_buffer', 'resize_threshold_buffer', 'set_kernel_backend',
    'get_kernel_backend', 'MIN_ACT_RANGE'
]


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
    return MixedActivationFunction.apply(x, _ones(x), r.reshape(1), (bits, ),
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
    return MixedWeightFunction.apply(w, _ones(w), t, (bits, ),
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
    return MixedActivationFunction.apply(x, probs, ranges, bits, bool(signed))


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
    return MixedWeightFunction.apply(w, probs, t, bits,
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
    spec = ConvSpec(a_bits, w_bits, bool(signed), _is_calibrated(threshold),
                    _pair(stride), _pair(padding), _pair(dilation),
                    int(groups))
    return QuantConv2dFunction.apply(x, weight, bias, a_probs, a_ranges,
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
