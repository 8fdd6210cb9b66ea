# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Mixed-precision (search) and fixed-bit (finetune) conv / linear layers.

The layers subclass ``nn.Conv2d`` / ``nn.Linear`` so that the full-precision
parameters keep their names (``weight``, ``bias``): swapping a layer in
place leaves module names unchanged, and a full-precision ``state_dict``
loads with only the new quantizer entries reported missing.

* :class:`MixedPrecisionConv2d` / :class:`MixedPrecisionLinear`: the EdMIPS
  composite layer, ``y = conv(sum_i p_i q_a(x; b_i), sum_j p_j q_w(W; b_j))``
  with ``p = softmax(alpha / T)`` (``T``: the layer's ``temperature``, 1 by
  default). One convolution per forward, one shared weight.
* :class:`QuantizedConv2d` / :class:`QuantizedLinear`: one weight and one
  activation bit width (32 keeps that side in full precision).
"""
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gmpq_mm.quantization.quantizers import (FP_BITS, as_threshold_buffer,
                                             check_bits, check_candidates,
                                             mixed_activation, mixed_weight,
                                             quantize_activation,
                                             quantize_weight, quantized_conv2d,
                                             resize_threshold_buffer)

__all__ = [
    'MixedPrecisionConv2d', 'MixedPrecisionLinear', 'QuantizedConv2d',
    'QuantizedLinear', 'is_mixed_layer', 'is_quantized_layer'
]

_DEFAULT_CANDIDATES = (2, 3, 4, 6)


def _conv_config(conv: nn.Conv2d) -> dict:
    """Constructor arguments that rebuild ``conv`` (weights excluded)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f'expected an nn.Conv2d, got {type(conv).__name__}')
    return dict(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype)


def _linear_config(linear: nn.Linear) -> dict:
    """Constructor arguments that rebuild ``linear`` (weights excluded)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f'expected an nn.Linear, got {type(linear).__name__}')
    return dict(
        in_features=linear.in_features,
        out_features=linear.out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype)


def _can_fuse(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` may use :func:`quantized_conv2d` (numeric zero
    padding; asked for by ``memory_efficient``)."""
    return (getattr(conv, 'memory_efficient', True)
            and conv.padding_mode == 'zeros'
            and not isinstance(conv.padding, str))


def _adopt_parameters(new: nn.Module, old: nn.Module) -> nn.Module:
    """Make ``new`` share ``old``'s weight / bias Parameters and mode."""
    new.weight = old.weight
    new.bias = old.bias
    new.train(old.training)
    return new


# ---------------------------------------------------------------------------
# Mixed-precision (supernet) layers
# ---------------------------------------------------------------------------
class _MixedPrecisionMixin:
    """Search parameters and helpers shared by the mixed conv and linear."""

    def _init_search(self, w_candidates, a_candidates, signed: bool,
                     init_range: float, alpha_init: float, per_channel: bool,
                     layer_name: str) -> None:
        self.layer_name = layer_name
        self.w_candidates = check_candidates(w_candidates, layer_name)
        self.a_candidates = check_candidates(a_candidates, layer_name)
        self.signed = bool(signed)
        self.per_channel = bool(per_channel)
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        k_w, k_a = len(self.w_candidates), len(self.a_candidates)
        self.alpha_w = nn.Parameter(
            torch.full((k_w, ), float(alpha_init), **factory))
        self.alpha_a = nn.Parameter(
            torch.full((k_a, ), float(alpha_init), **factory))
        self.act_ranges = nn.Parameter(
            torch.full((k_a, ), float(init_range), **factory))
        # Softmax temperature: a plain attribute, not state (a search sets
        # it from its iteration, see SearchLoop's ``temperature``).
        self.temperature = 1.0
        # Bit values as tensors for the expected-bits dot products; derived
        # from the candidates, so kept out of the state_dict.
        self.register_buffer(
            '_w_cand_bits',
            torch.tensor(self.w_candidates, **factory),
            persistent=False)
        self.register_buffer(
            '_a_cand_bits',
            torch.tensor(self.a_candidates, **factory),
            persistent=False)

    def probs(self) -> Tuple[Tensor, Tensor]:
        """Candidate probabilities ``(softmax(alpha_w / T), softmax(alpha_a /
        T))`` with ``T = self.temperature`` (1: the released code's softmax).

        ``T`` rescales the logits only, so the ranking of the candidates
        (``choice``) and the most likely policy under a budget do not depend
        on it.
        """
        t = float(self.temperature)
        if not t > 0:
            raise ValueError(f'{self.layer_name or type(self).__name__}: '
                             f'temperature must be > 0, got {t!r}')
        p_w = torch.softmax(self.alpha_w / t, dim=0)
        p_a = torch.softmax(self.alpha_a / t, dim=0)
        return p_w, p_a

    def expected_bits(self) -> Tuple[Tensor, Tensor]:
        """Expected weight and activation bit widths (0-d tensors).

        Differentiable w.r.t. the alphas (used by the complexity loss).
        """
        p_w, p_a = self.probs()
        return ((p_w * self._w_cand_bits.to(p_w.dtype)).sum(),
                (p_a * self._a_cand_bits.to(p_a.dtype)).sum())

    def choice(self) -> Tuple[int, int]:
        """The argmax policy ``(w_bits, a_bits)`` (first maximum on ties)."""
        i_w = int(torch.argmax(self.alpha_w.detach()))
        i_a = int(torch.argmax(self.alpha_a.detach()))
        return self.w_candidates[i_w], self.a_candidates[i_a]

    def arch_parameters(self) -> list:
        """The architecture parameters ``[alpha_w, alpha_a]``."""
        return [self.alpha_w, self.alpha_a]

    def _mixed_inputs(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """The composite activation and weight."""
        p_w, p_a = self.probs()
        x_mixed = mixed_activation(x, p_a, self.act_ranges, self.a_candidates,
                                   self.signed)
        w_mixed = mixed_weight(
            self.weight, p_w, self.w_candidates, per_channel=self.per_channel)
        return x_mixed, w_mixed

    def _search_repr(self) -> str:
        s = (f', w_candidates={self.w_candidates}, '
             f'a_candidates={self.a_candidates}')
        if self.signed:
            s += ', signed=True'
        if self.per_channel:
            s += ', per_channel=True'
        return s


class MixedPrecisionConv2d(_MixedPrecisionMixin, nn.Conv2d):
    """A searchable conv: soft mixture of weight and activation bit widths.

    ``y = conv(x~, W~)`` with ``x~ = sum_i softmax(alpha_a)_i q_a(x; r_i,
    a_i)`` and ``W~ = sum_j softmax(alpha_w)_j q_w(W; w_j)``: one
    convolution and one shared FP weight, whatever the number of candidates.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
        groups, bias: As in ``nn.Conv2d``.
        w_candidates (Sequence[int]): Weight bit candidates.
        a_candidates (Sequence[int]): Activation bit candidates.
        signed (bool): Signed activation quantizers (inputs that can be
            negative).
        init_range (float): Initial activation range of every candidate.
        alpha_init (float): Initial value of every alpha.
        per_channel (bool): Per-output-channel weight thresholds.
        layer_name (str): The module name, for messages and policies.
        memory_efficient (bool): Compute the layer with
            :func:`quantized_conv2d`, which keeps the input instead of its
            quantized copy for backward and recomputes the copy there (one
            elementwise pass): about half the activation memory. False (or
            a string / non-zero padding mode) composes plain autograd ops.
            Same values and gradients either way. Defaults to True.
        padding_mode, device, dtype: As in ``nn.Conv2d`` (keyword only).
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size,
                 stride=1,
                 padding=0,
                 dilation=1,
                 groups: int = 1,
                 bias: bool = True,
                 *,
                 w_candidates=_DEFAULT_CANDIDATES,
                 a_candidates=_DEFAULT_CANDIDATES,
                 signed: bool = False,
                 init_range: float = 6.0,
                 alpha_init: float = 0.01,
                 per_channel: bool = False,
                 layer_name: str = '',
                 memory_efficient: bool = True,
                 padding_mode: str = 'zeros',
                 device=None,
                 dtype=None):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype)
        self._init_search(w_candidates, a_candidates, signed, init_range,
                          alpha_init, per_channel, layer_name)
        self.memory_efficient = bool(memory_efficient)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, **kwargs) -> 'MixedPrecisionConv2d':
        """Wrap ``conv``, sharing its ``weight`` / ``bias`` Parameters.

        ``kwargs`` are the keyword-only search options (candidates, ...).
        """
        return _adopt_parameters(cls(**_conv_config(conv), **kwargs), conv)

    def forward(self, x: Tensor) -> Tensor:
        if _can_fuse(self):
            p_w, p_a = self.probs()
            return quantized_conv2d(
                x,
                self.weight,
                self.bias,
                a_bits=self.a_candidates,
                w_bits=self.w_candidates,
                a_probs=p_a,
                a_ranges=self.act_ranges,
                w_probs=p_w,
                signed=self.signed,
                per_channel=self.per_channel,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                groups=self.groups)
        x_mixed, w_mixed = self._mixed_inputs(x)
        return self._conv_forward(x_mixed, w_mixed, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._search_repr()


class MixedPrecisionLinear(_MixedPrecisionMixin, nn.Linear):
    """A searchable linear layer; see :class:`MixedPrecisionConv2d`.

    Args:
        in_features, out_features, bias: As in ``nn.Linear``.
        w_candidates, a_candidates, signed, init_range, alpha_init,
        per_channel, layer_name: As in :class:`MixedPrecisionConv2d`.
    """

    def __init__(self,
                 in_features: int,
                 out_features: int,
                 bias: bool = True,
                 *,
                 w_candidates=_DEFAULT_CANDIDATES,
                 a_candidates=_DEFAULT_CANDIDATES,
                 signed: bool = False,
                 init_range: float = 6.0,
                 alpha_init: float = 0.01,
                 per_channel: bool = False,
                 layer_name: str = '',
                 device=None,
                 dtype=None):
        super().__init__(
            in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_search(w_candidates, a_candidates, signed, init_range,
                          alpha_init, per_channel, layer_name)

    @classmethod
    def from_float(cls, linear: nn.Linear, **kwargs) -> 'MixedPrecisionLinear':
        """Wrap ``linear``, sharing its ``weight`` / ``bias`` Parameters."""
        return _adopt_parameters(
            cls(**_linear_config(linear), **kwargs), linear)

    def forward(self, x: Tensor) -> Tensor:
        x_mixed, w_mixed = self._mixed_inputs(x)
        return F.linear(x_mixed, w_mixed, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._search_repr()


# ---------------------------------------------------------------------------
# Fixed-bit layers
# ---------------------------------------------------------------------------
class _QuantizedMixin:
    """Quantizer state shared by the fixed-bit conv and linear."""

    def _init_quant(self, w_bits: int, a_bits: int, signed: bool,
                    init_range: float, per_channel: bool,
                    layer_name: str) -> None:
        self.layer_name = layer_name
        self._w_bits = check_bits(w_bits, layer_name)
        self._a_bits = check_bits(a_bits, layer_name)
        self.signed = bool(signed)
        self.per_channel = bool(per_channel)
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        # Always present so every policy gives the same state_dict keys;
        # frozen when unused so DDP does not wait for its gradient.
        self.act_range = nn.Parameter(
            torch.tensor(float(init_range), **factory),
            requires_grad=self._a_bits != FP_BITS)
        # Empty = threshold from the current weights (max|W|).
        self.register_buffer('w_threshold', torch.empty(0, **factory))

    @property
    def bits(self) -> Tuple[int, int]:
        """The ``(w_bits, a_bits)`` of this layer."""
        return self._w_bits, self._a_bits

    @property
    def w_bits(self) -> int:
        return self._w_bits

    @property
    def a_bits(self) -> int:
        return self._a_bits

    def calibrate_weight(self, threshold: Optional[Union[Tensor,
                                                         float]]) -> None:
        """Set the weight threshold ``T`` (scalar or one per output
        channel); ``None`` or 0 goes back to ``max|W|``."""
        self.w_threshold = as_threshold_buffer(threshold, self.w_threshold)

    def calibrate_activation(self, r: Union[Tensor, float]) -> None:
        """Set the activation range ``r``."""
        with torch.no_grad():
            self.act_range.fill_(float(r))

    def _quantized_inputs(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x_q = quantize_activation(x, self.act_range, self._a_bits, self.signed)
        w_q = quantize_weight(
            self.weight,
            self._w_bits,
            threshold=self.w_threshold,
            per_channel=self.per_channel)
        return x_q, w_q

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        resize_threshold_buffer(self, 'w_threshold', state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _quant_repr(self) -> str:
        s = f', w_bits={self._w_bits}, a_bits={self._a_bits}'
        if self.signed:
            s += ', signed=True'
        if self.per_channel:
            s += ', per_channel=True'
        return s


class QuantizedConv2d(_QuantizedMixin, nn.Conv2d):
    """A conv with fixed weight / activation bit widths.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
        groups, bias: As in ``nn.Conv2d``.
        w_bits (int): Weight bits (2..8, 32 = full precision).
        a_bits (int): Input activation bits (2..8, 32 = full precision).
        signed (bool): Signed activation quantizer.
        init_range (float): Initial activation range ``act_range``.
        per_channel (bool): Per-output-channel weight thresholds.
        layer_name (str): The module name, for messages.
        memory_efficient (bool): As in :class:`MixedPrecisionConv2d`.
        padding_mode, device, dtype: As in ``nn.Conv2d`` (keyword only).
    """

    def __init__(self,
                 in_channels: int,
                 out_channels: int,
                 kernel_size,
                 stride=1,
                 padding=0,
                 dilation=1,
                 groups: int = 1,
                 bias: bool = True,
                 *,
                 w_bits: int,
                 a_bits: int,
                 signed: bool = False,
                 init_range: float = 6.0,
                 per_channel: bool = False,
                 layer_name: str = '',
                 memory_efficient: bool = True,
                 padding_mode: str = 'zeros',
                 device=None,
                 dtype=None):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype)
        self._init_quant(w_bits, a_bits, signed, init_range, per_channel,
                         layer_name)
        self.memory_efficient = bool(memory_efficient)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int,
                   **kwargs) -> 'QuantizedConv2d':
        """Wrap ``conv``, sharing its ``weight`` / ``bias`` Parameters."""
        return _adopt_parameters(
            cls(**_conv_config(conv), w_bits=w_bits, a_bits=a_bits, **kwargs),
            conv)

    def forward(self, x: Tensor) -> Tensor:
        if _can_fuse(self):
            return quantized_conv2d(
                x,
                self.weight,
                self.bias,
                a_bits=(self._a_bits, ),
                w_bits=(self._w_bits, ),
                a_ranges=self.act_range.reshape(1),
                signed=self.signed,
                per_channel=self.per_channel,
                threshold=self.w_threshold,
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                groups=self.groups)
        x_q, w_q = self._quantized_inputs(x)
        return self._conv_forward(x_q, w_q, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._quant_repr()


class QuantizedLinear(_QuantizedMixin, nn.Linear):
    """A linear layer with fixed weight / activation bit widths.

    Args:
        in_features, out_features, bias: As in ``nn.Linear``.
        w_bits, a_bits, signed, init_range, per_channel, layer_name: As in
        :class:`QuantizedConv2d`.
    """

    def __init__(self,
                 in_features: int,
                 out_features: int,
                 bias: bool = True,
                 *,
                 w_bits: int,
                 a_bits: int,
                 signed: bool = False,
                 init_range: float = 6.0,
                 per_channel: bool = False,
                 layer_name: str = '',
                 device=None,
                 dtype=None):
        super().__init__(
            in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_quant(w_bits, a_bits, signed, init_range, per_channel,
                         layer_name)

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int,
                   **kwargs) -> 'QuantizedLinear':
        """Wrap ``linear``, sharing its ``weight`` / ``bias`` Parameters."""
        return _adopt_parameters(
            cls(**_linear_config(linear),
                w_bits=w_bits,
                a_bits=a_bits,
                **kwargs), linear)

    def forward(self, x: Tensor) -> Tensor:
        x_q, w_q = self._quantized_inputs(x)
        return F.linear(x_q, w_q, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._quant_repr()


def is_mixed_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a mixed-precision (searchable) layer."""
    return isinstance(module, (MixedPrecisionConv2d, MixedPrecisionLinear))


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a fixed-bit quantized layer."""
    return isinstance(module, (QuantizedConv2d, QuantizedLinear))
