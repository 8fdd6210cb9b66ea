"""How an integer runtime folds a quantized conv and its BatchNorm.

``QLinearConv`` computes ``acc = sum(x_codes * w_codes) + b_codes`` in int32
and requantizes ``acc * s_x * s_w`` onto its output grid. With the
BatchNorm after the conv folded in, the per-channel factor
``g = gamma / sqrt(var + eps)`` goes into the weight scale and the shift
``(bias - mean) * g + beta`` becomes ``b_codes``, an integer number of
units ``s_x * s_w``: the runtime's bias is the network's rounded to that
unit. :func:`fold_conv_scales` is that arithmetic, shared by the ONNX
rewrite (:mod:`gmpq_mm.deploy.onnx_integer`) and by
:func:`folded_bias_shift`, which gives the PyTorch network the same rounded
bias (the requantization points of
:mod:`gmpq_mm.models.utils.requant_blocks` use it in eval mode).

Two details keep the rounding small and the file fast:

* the weight codes sit in the int8 container multiplied by an integer
  ``m`` (:func:`code_multiplier`), the weight scale divided by it: the same
  weights on the same ``2^b`` levels, an ``m`` times finer bias unit;
* ``m`` keeps two products of input and weight codes inside int16, which
  x86 integer kernels without VNNI accumulate in.

Pure numpy / PyTorch: nothing from mmengine / mmpretrain.
"""
from typing import Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .quantizers import (FP_BITS, MIN_ACT_RANGE, activation_levels,
                         weight_levels)

__all__ = [
    'code_multiplier', 'fold_conv_scales', 'folded_bias_shift',
    'is_integer_conv'
]


def code_multiplier(w_bits: int, act_levels: int) -> int:
    """The integer the int8 weight codes of a ``w_bits`` layer reading an
    input of ``act_levels`` levels are multiplied by: ``|codes| <= 127``
    and ``2 * act_levels * n_w * m <= 32767``."""
    n_w = weight_levels(w_bits)
    return max(1, min(127 // n_w, 16383 // max(1, int(act_levels) * n_w)))


def fold_conv_scales(s_x: float, s_w: np.ndarray, bias: np.ndarray,
                     g: np.ndarray, m: int) -> Tuple[np.ndarray, ...]:
    """Scales and int32 bias of a folded integer conv.

    Args:
        s_x: The input's scale (float32, ``r / n``).
        s_w: Per-output-channel weight scale (``T / n``), before folding.
        bias: Per-channel float shift after folding (float64).
        g: Per-channel BatchNorm factor (ones without a BatchNorm).
        m: :func:`code_multiplier`.

    Returns:
        tuple: ``sign`` (int8, -1 where ``s_w * g < 0``: those channels'
        codes are negated), ``w_scale`` (float32, ``|s_w * g| / m``),
        ``b_scale`` (float64, ``s_x * w_scale``) and ``b_codes`` (float64
        integers, ``rint(bias / b_scale)``).
    """
    s_w = np.asarray(s_w, np.float64) * np.asarray(g, np.float64)
    sign = np.where(s_w < 0, -1, 1).astype(np.int8)
    w_scale = np.abs(s_w) / m
    w_scale = np.where(w_scale > 0, w_scale, 1.0).astype(np.float32)
    b_scale = np.float64(np.float32(s_x)) * w_scale.astype(np.float64)
    b_codes = np.rint(np.asarray(bias, np.float64) / b_scale)
    return sign, w_scale, b_scale, b_codes


def is_integer_conv(conv: nn.Module) -> bool:
    """A fixed-bit conv with a quantized weight and a quantized input: the
    layers an integer runtime runs as ``QLinearConv``."""
    from .layers import QuantizedConv2d
    return isinstance(conv, QuantizedConv2d) and \
        conv.w_bits != FP_BITS and conv.a_bits != FP_BITS


@torch.no_grad()
def folded_bias_shift(conv: nn.Module, norm: nn.Module) -> Tensor:
    """Per-channel ``rounded - exact`` shift of ``norm(conv(x))`` in an
    integer runtime (float32, ``(C, )``): add it to the eval output to
    compute what the runtime computes. Zero where ``conv`` is not an
    integer conv or ``norm`` not an eval-mode BatchNorm with running
    statistics."""
    from .export import weight_codes
    if not is_integer_conv(conv):
        return conv.weight.new_zeros(conv.weight.shape[0])
    c_out = conv.out_channels
    if not isinstance(
            norm, nn.modules.batchnorm._BatchNorm) or \
            norm.running_var is None or norm.training:
        return conv.weight.new_zeros(c_out)
    n_x = activation_levels(conv.a_bits, conv.signed)
    r = conv.act_range.detach().float().clamp_min(MIN_ACT_RANGE)
    s_x = float(r / n_x)
    _, t = weight_codes(conv)
    n_w = weight_levels(conv.w_bits)
    # float32 as the export writes them, then float64 as it folds them
    s_w = torch.where(t > 0, t / n_w, torch.full_like(t, 1.0 / n_w))
    s_w = s_w.reshape(-1).expand(c_out).double().cpu().numpy()
    var = norm.running_var.double().cpu().numpy()
    eps = float(np.float32(norm.eps))
    g = 1.0 / np.sqrt(var + eps)
    if norm.weight is not None:
        g = norm.weight.double().cpu().numpy() * g
    beta = norm.bias.double().cpu().numpy() if norm.bias is not None \
        else 0.0
    b = -norm.running_mean.double().cpu().numpy()
    if conv.bias is not None:
        b = b + conv.bias.double().cpu().numpy()
    bias = b * g + beta
    _, _, b_scale, b_codes = fold_conv_scales(
        s_x, s_w, bias, g, code_multiplier(conv.w_bits, n_x))
    shift = torch.from_numpy(b_codes * b_scale - bias)
    return shift.to(device=conv.weight.device, dtype=torch.float32)
