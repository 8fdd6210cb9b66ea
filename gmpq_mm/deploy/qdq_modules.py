"""Export-time stand-ins of the fixed-bit layers, in plain torch ops.

Every quantized layer of a finetuned network (``QuantizedConv2d`` /
``QuantizedLinear``) is replaced, in a copy of the network, by a
:class:`QDQConv2d` / :class:`QDQLinear` that computes the same function with
ops the TorchScript ONNX exporter maps to Clip / QuantizeLinear /
DequantizeLinear / Conv / Gemm (``clamp``, ``fake_quantize_per_tensor_affine``,
``fake_quantize_per_channel_affine``, ``conv2d`` / ``linear``); the custom
autograd functions of the training layers cannot be traced. The grids are
described in :mod:`gmpq_mm.deploy.onnx_graph`.

Pure PyTorch: nothing from mmengine / mmpretrain.
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmpq_mm.quantization.export import weight_codes
from gmpq_mm.quantization.layers import is_mixed_layer, is_quantized_layer
from gmpq_mm.quantization.quantizers import (FP_BITS, MIN_ACT_RANGE,
                                             activation_levels, weight_levels)
from gmpq_mm.quantization.requant_point import is_requant_point

__all__ = [
    'QDQConv2d', 'QDQLinear', 'QDQRequantPoint', 'qdq_layer', 'qdq_module',
    'qdq_layer_info', 'float_module', 'uniform_bits_module',
    'requant_point_count'
]


class _QDQMixin:
    """Quantizer constants of one fixed-bit layer, as plain numbers."""

    def _init_qdq(self, layer: nn.Module, name: str) -> None:
        self.layer_name = name
        self.w_bits, self.a_bits = layer.bits
        self.signed = bool(layer.signed)
        weight = layer.weight.detach().float()
        bias = None if layer.bias is None else layer.bias.detach().float()
        self.register_buffer('bias', bias)
        self.w_per_channel = False
        if self.w_bits == FP_BITS:
            self.register_buffer('weight', weight.clone())
            self.register_buffer('codes', None)
            self.register_buffer('w_scale', None)
        else:
            codes, t = weight_codes(layer)
            n = weight_levels(self.w_bits)
            # T == 0 only for an all-zero weight / channel (codes 0): any
            # positive scale reproduces it.
            scale = torch.where(t > 0, t / n, torch.full_like(t, 1.0 / n))
            self.w_per_channel = scale.dim() > 0
            shape = (-1, ) + (1, ) * (weight.dim() - 1)
            s = scale.reshape(shape) if self.w_per_channel else scale
            self.register_buffer('codes', codes.to(torch.int8))
            self.register_buffer('w_scale', scale.float())
            self.w_scale_value = None if self.w_per_channel else float(scale)
            # The float weight the exporter sees; c * s exactly.
            self.register_buffer('weight', codes.float() * s)
        if self.a_bits == FP_BITS:
            self.act_levels = None
            self.act_range = None
            self.act_scale = None
        else:
            n = activation_levels(self.a_bits, self.signed)
            r = layer.act_range.detach().float().clamp_min(MIN_ACT_RANGE)
            self.act_levels = n
            self.act_range = float(r)
            self.act_scale = float(r / n)  # the float32 r / n, exactly
        # int8 holds [-n, n] (signed) and [0, n] for n <= 127.
        self.act_qrange = (0, 255) if (self.act_levels or 0) > 127 else (-128,
                                                                         127)

    def _quant_input(self, x: Tensor) -> Tensor:
        if self.act_levels is None:
            return x
        lo = -self.act_range if self.signed else 0.0
        x = torch.clamp(x, lo, self.act_range)
        return torch.fake_quantize_per_tensor_affine(x, self.act_scale, 0,
                                                     *self.act_qrange)

    def _quant_weight(self) -> Tensor:
        if self.codes is None:
            return self.weight
        if self.w_per_channel:
            zero = torch.zeros(
                self.w_scale.numel(),
                dtype=torch.int32,
                device=self.weight.device)
            return torch.fake_quantize_per_channel_affine(
                self.weight, self.w_scale, zero, 0, -128, 127)
        return torch.fake_quantize_per_tensor_affine(self.weight,
                                                     self.w_scale_value, 0,
                                                     -128, 127)

    def extra_repr(self) -> str:
        return (f'{self.layer_name}: w_bits={self.w_bits}, '
                f'a_bits={self.a_bits}, signed={self.signed}')


class QDQConv2d(_QDQMixin, nn.Module):
    """Export-time stand-in for a ``QuantizedConv2d`` (plain torch ops)."""

    def __init__(self, layer: nn.Conv2d, name: str = ''):
        super().__init__()
        if layer.padding_mode != 'zeros' or isinstance(layer.padding, str):
            raise ValueError(f'{name}: ONNX export needs numeric zero '
                             f'padding, got padding={layer.padding!r}, '
                             f'padding_mode={layer.padding_mode!r}')
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self._init_qdq(layer, name)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(
            self._quant_input(x), self._quant_weight(), self.bias, self.stride,
            self.padding, self.dilation, self.groups)


class QDQLinear(_QDQMixin, nn.Module):
    """Export-time stand-in for a ``QuantizedLinear`` (plain torch ops)."""

    def __init__(self, layer: nn.Linear, name: str = ''):
        super().__init__()
        self._init_qdq(layer, name)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._quant_input(x), self._quant_weight(), self.bias)


class QDQRequantPoint(nn.Module):
    """Export-time stand-in for a calibrated ``RequantPoint``: its 8-bit
    rounding as one ``QuantizeLinear -> DequantizeLinear`` pair."""

    def __init__(self, point: nn.Module, name: str = ''):
        super().__init__()
        self.point_name = name
        self.signed = point.signed
        self.scale = point.scale()
        self.qrange = point.qrange

    def forward(self, x: Tensor) -> Tensor:
        return torch.fake_quantize_per_tensor_affine(x, self.scale, 0,
                                                     *self.qrange)

    def extra_repr(self) -> str:
        return (f'{self.point_name}: {"int8" if self.signed else "uint8"}, '
                f'scale={self.scale:g}')


def _swap_points(model: nn.Module, keep: bool) -> None:
    """Replace every ``RequantPoint`` of ``model`` (in place): by its
    :class:`QDQRequantPoint` when ``keep`` and it is calibrated, else by
    ``nn.Identity``."""
    for name in [n for n, m in model.named_modules() if is_requant_point(m)]:
        parent_name, _, attr = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        point = getattr(parent, attr)
        setattr(
            parent, attr,
            QDQRequantPoint(point, name)
            if keep and point.calibrated else nn.Identity())


def requant_point_count(module: nn.Module) -> int:
    """The :class:`QDQRequantPoint` s of an export-time module."""
    return sum(isinstance(m, QDQRequantPoint) for m in module.modules())


def qdq_layer(layer: nn.Module, name: str = '') -> nn.Module:
    """The :class:`QDQConv2d` / :class:`QDQLinear` of a fixed-bit layer."""
    if isinstance(layer, nn.Conv2d):
        return QDQConv2d(layer, name)
    if isinstance(layer, nn.Linear):
        return QDQLinear(layer, name)
    raise TypeError(f'{name}: cannot export a {type(layer).__name__}')


def qdq_module(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every fixed-bit layer replaced
    by its export-time stand-in, and every calibrated requantization point
    by its Q / DQ pair (an uncalibrated one by nothing); ``model`` is left
    untouched.

    Raises:
        ValueError: if ``model`` has searchable (mixed-precision) layers or
            no fixed-bit layer at all.
    """
    import copy

    mixed = [n for n, m in model.named_modules() if is_mixed_layer(m)]
    if mixed:
        raise ValueError(
            f'the network has {len(mixed)} searchable mixed-precision '
            f'layers (e.g. {mixed[0]!r}): a search supernet, not a '
            'finetuned fixed-bit network; finetune it with the searched '
            'policy first')
    names = [n for n, m in model.named_modules() if is_quantized_layer(m)]
    if not names:
        raise ValueError('the network has no quantized layer: a full-'
                         'precision model, nothing to export as QDQ')
    copied = copy.deepcopy(model).eval()
    for module in copied.modules():
        # blocks that emulate the integer runtime's rounded bias in eval
        # (gmpq_mm.models.utils.requant_blocks) hold it in plain BatchNorm
        if hasattr(module, 'bake_folded_bias'):
            module.bake_folded_bias()
    for name in names:
        parent_name, _, attr = name.rpartition('.')
        parent = copied.get_submodule(parent_name) if parent_name else copied
        setattr(parent, attr, qdq_layer(getattr(parent, attr), name))
    _swap_points(copied, keep=True)
    return copied


def qdq_layer_info(module: nn.Module,
                   prefix: str = '') -> 'OrderedDict[str, dict]':
    """``name -> {w_bits, a_bits, signed, per_channel, weight}`` of the
    :class:`QDQConv2d` / :class:`QDQLinear` layers of ``module``; ``weight``
    is the buffer name the exporter gives the layer's weight initializer
    (``prefix`` + module name + ``.weight``)."""
    info = OrderedDict()
    for name, m in module.named_modules():
        if isinstance(m, _QDQMixin):
            info[m.layer_name or name] = dict(
                w_bits=m.w_bits,
                a_bits=m.a_bits,
                signed=m.signed,
                per_channel=m.w_per_channel,
                weight=f'{prefix}{name}.weight',
                codes=None if m.codes is None else m.codes,
                w_scale=None if m.w_scale is None else m.w_scale,
                act_range=m.act_range,
                act_scale=m.act_scale)
    return info


def float_module(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every quantized layer back to a
    float ``nn.Conv2d`` / ``nn.Linear`` holding its latent weights and
    without requantization points: the network without quantizers (the FP
    baseline of a benchmark)."""
    import copy
    fp = copy.deepcopy(model).eval()
    names = [n for n, m in fp.named_modules() if is_quantized_layer(m)]
    for name in names:
        parent_name, _, attr = name.rpartition('.')
        parent = fp.get_submodule(parent_name) if parent_name else fp
        q = getattr(parent, attr)
        if isinstance(q, nn.Conv2d):
            new = nn.Conv2d(q.in_channels, q.out_channels, q.kernel_size,
                            q.stride, q.padding, q.dilation, q.groups, q.bias
                            is not None)
        else:
            new = nn.Linear(q.in_features, q.out_features, q.bias is not None)
        new.load_state_dict({
            k: v
            for k, v in q.state_dict().items() if k in ('weight', 'bias')
        })
        setattr(parent, attr, new)
    _swap_points(fp, keep=False)
    return fp


def uniform_bits_module(model: nn.Module,
                        w_bits: int = 8,
                        a_bits: int = 8) -> nn.Module:
    """A copy of ``model`` (eval mode) whose quantized layers all use
    ``w_bits`` / ``a_bits``, with the same weights and ranges (e.g. the
    uniform W8A8 baseline of a benchmark)."""
    import copy

    from gmpq_mm.quantization.bits import check_bits
    uniform = copy.deepcopy(model).eval()
    for name, m in uniform.named_modules():
        if is_quantized_layer(m):
            m._w_bits = check_bits(w_bits, name)
            m._a_bits = check_bits(a_bits, name)
    return uniform
