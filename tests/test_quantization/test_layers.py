# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Mixed-precision and fixed-bit layers."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gmpq_mm.quantization.layers import (MixedPrecisionConv2d,
                                         MixedPrecisionLinear, QuantizedConv2d,
                                         QuantizedLinear, is_mixed_layer,
                                         is_quantized_layer)
from gmpq_mm.quantization.quantizers import quantized_conv2d


def t(values):
    return torch.tensor(values, dtype=torch.float32)


# Reference quantizers from plain autograd ops (see test_quantizers.py).
def ref_activation(x, r, bits, signed=False):
    if bits == 32:
        return x
    n = 2**(bits - 1) - 1 if signed else 2**bits - 1
    r_d = r.detach()
    lo = -r_d if signed else torch.zeros_like(r_d)
    inside = ((x >= lo) & (x <= r_d)).to(x.dtype)
    above = (x > r_d).to(x.dtype)
    below = (x < lo).to(x.dtype) if signed else torch.zeros_like(x)
    clipped = x * inside + r * above - r * below
    levels = torch.round(clipped.detach() * (n / r_d)) * (r_d / n)
    return clipped + (levels - clipped.detach())


def ref_weight(w, bits, threshold=None):
    if bits == 32:
        return w
    n = 2**(bits - 1) - 1
    thr = w.detach().abs().max() if threshold is None else t(threshold)
    clipped = torch.maximum(torch.minimum(w.detach(), thr), -thr)
    levels = torch.round(clipped / thr * n) * (thr / n)
    return w + (levels - w.detach())


def make_mixed_conv(memory_efficient=True, **kwargs):
    torch.manual_seed(0)
    conv = MixedPrecisionConv2d(
        3,
        4,
        3,
        stride=2,
        padding=1,
        w_candidates=(2, 3, 4, 6),
        a_candidates=(2, 3, 4, 6),
        memory_efficient=memory_efficient,
        **kwargs)
    with torch.no_grad():
        conv.alpha_w.copy_(t([0.3, -0.2, 0.5, 0.1]))
        conv.alpha_a.copy_(t([-0.1, 0.4, 0.0, 0.2]))
        conv.act_ranges.copy_(t([1.0, 1.5, 2.0, 3.0]))
    return conv


# ---------------------------------------------------------------------------
# MixedPrecisionConv2d
# ---------------------------------------------------------------------------
def test_mixed_conv_parameters():
    conv = MixedPrecisionConv2d(
        8, 16, 3, padding=1, a_candidates=(2, 4, 8), layer_name='layer1.0')
    assert isinstance(conv, nn.Conv2d)
    assert conv.w_candidates == (2, 3, 4, 6)
    assert conv.a_candidates == (2, 4, 8)
    assert conv.layer_name == 'layer1.0' and conv.signed is False
    assert torch.equal(conv.alpha_w.data, torch.full((4, ), 0.01))
    assert torch.equal(conv.alpha_a.data, torch.full((3, ), 0.01))
    assert torch.equal(conv.act_ranges.data, torch.full((3, ), 6.0))
    names = [name for name, _ in conv.named_parameters()]
    assert names == ['weight', 'bias', 'alpha_w', 'alpha_a', 'act_ranges']
    arch = conv.arch_parameters()
    assert len(arch) == 2
    assert arch[0] is conv.alpha_w and arch[1] is conv.alpha_a
    text = repr(conv)
    assert 'w_candidates=(2, 3, 4, 6)' in text
    assert 'a_candidates=(2, 4, 8)' in text
    with pytest.raises(ValueError, match=r'layer3\.1\.conv2: bit width 9'):
        MixedPrecisionConv2d(
            2, 2, 1, w_candidates=(2, 9), layer_name='layer3.1.conv2')


@pytest.mark.parametrize('memory_efficient', [True, False])
def test_mixed_conv_equals_weighted_sum_formula(memory_efficient):
    conv = make_mixed_conv(memory_efficient)
    torch.manual_seed(1)
    x = (torch.randn(2, 3, 7, 7) * 1.5).relu().requires_grad_()
    g = torch.randn(2, 4, 4, 4)
    out = conv(x)
    params = [
        x, conv.weight, conv.bias, conv.alpha_w, conv.alpha_a, conv.act_ranges
    ]
    grads = torch.autograd.grad(out, params, g)

    p_w = torch.softmax(conv.alpha_w, 0)
    p_a = torch.softmax(conv.alpha_a, 0)
    x_mix = sum(p_a[i] * ref_activation(x, conv.act_ranges[i], b)
                for i, b in enumerate((2, 3, 4, 6)))
    w_mix = sum(p_w[j] * ref_weight(conv.weight, b)
                for j, b in enumerate((2, 3, 4, 6)))
    ref = F.conv2d(x_mix, w_mix, conv.bias, stride=2, padding=1)
    ref_grads = torch.autograd.grad(ref, params, g)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mixed_conv_signed_and_per_channel():
    conv = make_mixed_conv(signed=True, per_channel=True)
    torch.manual_seed(3)
    x = torch.randn(1, 3, 5, 5).requires_grad_()
    out = conv(x)
    p_w = torch.softmax(conv.alpha_w, 0)
    p_a = torch.softmax(conv.alpha_a, 0)
    x_mix = sum(p_a[i] * ref_activation(x, conv.act_ranges[i], b, True)
                for i, b in enumerate((2, 3, 4, 6)))
    w = conv.weight
    thr = w.detach().abs().amax(dim=(1, 2, 3), keepdim=True)
    w_mix = 0
    for j, b in enumerate((2, 3, 4, 6)):
        n = 2**(b - 1) - 1
        w_mix = w_mix + p_w[j] * (torch.round(w.detach() / thr * n) * thr / n)
    ref = F.conv2d(x_mix, w_mix, conv.bias, stride=2, padding=1)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize('memory_efficient', [True, False])
def test_mixed_conv_calls_conv_once(monkeypatch, memory_efficient):
    conv = make_mixed_conv(memory_efficient)
    calls = []
    original = F.conv2d

    def counting_conv2d(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, 'conv2d', counting_conv2d)
    x = torch.rand(2, 3, 7, 7, requires_grad=True)
    out = conv(x)
    assert len(calls) == 1
    assert calls[0] == x.shape
    out.sum().backward()
    assert len(calls) == 1  # backward does not run the forward conv again


def test_mixed_conv_keeps_no_quantized_copy():
    """The memory-efficient path saves x itself, not the mixed x~."""
    conv = make_mixed_conv(True)
    x = torch.rand(2, 3, 7, 7, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        conv(x)
    like_x = [s for s in saved if s.shape == x.shape]
    assert len(like_x) == 1 and like_x[0].data_ptr() == x.data_ptr()


def test_expected_bits_and_gradient():
    conv = MixedPrecisionConv2d(2, 2, 1)
    e_w, e_a = conv.expected_bits()
    assert e_w.dim() == 0 and e_a.dim() == 0
    torch.testing.assert_close(e_w, t(3.75))  # uniform: (2+3+4+6)/4
    torch.testing.assert_close(e_a, t(3.75))
    with torch.no_grad():
        conv.alpha_w.copy_(t([0.0, 0.0, math.log(2.0), 0.0]))
    e_w, _ = conv.expected_bits()
    # p = [.2, .2, .4, .2] -> E = (2 + 3 + 8 + 6) / 5
    torch.testing.assert_close(e_w, t(3.8))
    e_w.backward()
    # dE/dalpha_k = p_k (b_k - E)
    torch.testing.assert_close(conv.alpha_w.grad, t([-0.36, -0.16, 0.08,
                                                     0.44]))
    assert conv.alpha_a.grad is None
    p_w, p_a = conv.probs()
    torch.testing.assert_close(p_w, t([0.2, 0.2, 0.4, 0.2]))
    torch.testing.assert_close(p_a, torch.full((4, ), 0.25))


def test_choice_is_argmax():
    conv = MixedPrecisionConv2d(2, 2, 1, a_candidates=(2, 4, 8))
    assert conv.choice() == (2, 2)  # ties: first candidate
    with torch.no_grad():
        conv.alpha_w.copy_(t([0.1, 0.5, 0.2, 0.0]))
        conv.alpha_a.copy_(t([0.0, -1.0, 1.0]))
    w_bits, a_bits = conv.choice()
    assert (w_bits, a_bits) == (3, 8)
    assert type(w_bits) is int and type(a_bits) is int


def test_mixed_from_float_shares_parameters():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    conv.eval()
    mixed = MixedPrecisionConv2d.from_float(
        conv, a_candidates=(4, 8), layer_name='layer2.0.conv1')
    assert mixed.weight is conv.weight and mixed.bias is conv.bias
    assert (mixed.in_channels, mixed.out_channels) == (4, 6)
    assert mixed.kernel_size == (3, 3) and mixed.stride == (2, 2)
    assert mixed.padding == (1, 1) and mixed.groups == 2
    assert mixed.a_candidates == (4, 8)
    assert mixed.layer_name == 'layer2.0.conv1'
    assert not mixed.training
    x = torch.rand(1, 4, 6, 6)
    assert mixed(x).shape == conv(x).shape
    no_bias = MixedPrecisionConv2d.from_float(nn.Conv2d(2, 2, 1, bias=False))
    assert no_bias.bias is None
    with pytest.raises(TypeError):
        MixedPrecisionConv2d.from_float(nn.Linear(2, 2))


def test_fp_state_dict_loads_with_only_quantizer_keys_missing():
    fp = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    mixed = nn.Sequential(
        MixedPrecisionConv2d(3, 4, 3), nn.BatchNorm2d(4),
        QuantizedConv2d(4, 2, 1, w_bits=4, a_bits=4))
    result = mixed.load_state_dict(fp.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted([
        '0.alpha_w', '0.alpha_a', '0.act_ranges', '2.act_range',
        '2.w_threshold'
    ])
    assert result.unexpected_keys == []
    assert torch.equal(mixed[0].weight, fp[0].weight)
    assert torch.equal(mixed[2].bias, fp[2].bias)


# ---------------------------------------------------------------------------
# QuantizedConv2d
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('memory_efficient', [True, False])
def test_quantized_conv_full_precision_equals_conv(memory_efficient):
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    quant = QuantizedConv2d.from_float(
        conv, 32, 32, memory_efficient=memory_efficient)
    assert quant.bits == (32, 32)
    assert not quant.act_range.requires_grad  # unused: frozen for DDP
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    g = torch.randn(2, 5, 4, 4)
    out = quant(x)
    grads = torch.autograd.grad(out, [x, conv.weight, conv.bias], g)
    ref = conv(x)
    ref_grads = torch.autograd.grad(ref, [x, conv.weight, conv.bias], g)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_quantized_conv_hand():
    quant = QuantizedConv2d(1, 1, 1, bias=False, w_bits=3, a_bits=2)
    with torch.no_grad():
        quant.weight.fill_(0.3)
    quant.calibrate_activation(1.0)
    x = t([0.4, 1.5]).reshape(1, 1, 1, 2).requires_grad_()
    out = quant(x)
    # q_a = [1/3, 1] (r = 1, s = 1/3); q_w = 0.3 (T = 0.3, on the grid)
    torch.testing.assert_close(out.flatten(), t([0.1, 0.3]))
    out.sum().backward()
    # d/dx = w~ * 1[0 <= x <= r]; d/dr = w~ * 1[x > r]
    torch.testing.assert_close(x.grad.flatten(), t([0.3, 0.0]))
    torch.testing.assert_close(quant.act_range.grad, t(0.3))
    # identity STE: d/dW = sum of q_a
    torch.testing.assert_close(quant.weight.grad.flatten(), t([4 / 3]))


@pytest.mark.parametrize('memory_efficient', [True, False])
def test_quantized_conv_matches_reference(memory_efficient):
    torch.manual_seed(5)
    quant = QuantizedConv2d(
        3,
        4,
        3,
        padding=1,
        w_bits=4,
        a_bits=3,
        init_range=1.5,
        memory_efficient=memory_efficient)
    quant.calibrate_weight(0.1)
    x = torch.randn(2, 3, 6, 6).relu().requires_grad_()
    g = torch.randn(2, 4, 6, 6)
    params = [x, quant.weight, quant.bias, quant.act_range]
    out = quant(x)
    grads = torch.autograd.grad(out, params, g)
    ref = F.conv2d(
        ref_activation(x, quant.act_range, 3),
        ref_weight(quant.weight, 4, 0.1),
        quant.bias,
        padding=1)
    ref_grads = torch.autograd.grad(ref, params, g)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_quantized_conv_calibration_state_dict():
    torch.manual_seed(6)
    quant = QuantizedConv2d(2, 3, 1, w_bits=2, a_bits=4, per_channel=True)
    assert quant.w_threshold.numel() == 0
    quant.calibrate_weight(t([0.1, 0.2, 0.3]))
    quant.calibrate_activation(2.5)
    fresh = QuantizedConv2d(2, 3, 1, w_bits=2, a_bits=4, per_channel=True)
    fresh.load_state_dict(quant.state_dict())
    torch.testing.assert_close(fresh.w_threshold, t([0.1, 0.2, 0.3]))
    assert fresh.act_range.item() == 2.5
    x = torch.rand(1, 2, 3, 3) * 3
    torch.testing.assert_close(fresh(x), quant(x))
    # 2 bits, T per output channel: every weight becomes -T_c, 0 or T_c
    thr = t([0.1, 0.2, 0.3]).reshape(3, 1, 1, 1)
    w_q = torch.round(torch.clamp(fresh.weight.detach(), -thr, thr) / thr)
    ref = F.conv2d(
        ref_activation(x, t(2.5), 4), w_q * thr, fresh.bias.detach())
    torch.testing.assert_close(fresh(x), ref)
    quant.calibrate_weight(None)
    assert quant.w_threshold.numel() == 0


def test_quantized_conv_rejects_bad_bits():
    with pytest.raises(ValueError, match=r'layer1\.0\.conv1: bit width 9'):
        QuantizedConv2d(
            2, 2, 1, w_bits=9, a_bits=4, layer_name='layer1.0.conv1')
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1: bit width '4'"):
        QuantizedConv2d(
            2, 2, 1, w_bits=4, a_bits='4', layer_name='layer1.0.conv1')
    with pytest.raises(TypeError):
        QuantizedConv2d(2, 2, 1)  # the bit widths are required


def test_quantized_conv_from_float_and_repr():
    conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
    quant = QuantizedConv2d.from_float(conv, 4, 6, layer_name='layer1.1')
    assert quant.weight is conv.weight and quant.bias is None
    assert quant.bits == (4, 6) and quant.layer_name == 'layer1.1'
    assert 'w_bits=4, a_bits=6' in repr(quant)
    assert isinstance(quant.act_range, nn.Parameter)
    assert quant.act_range.shape == ()


def test_quantized_conv_calls_conv_once(monkeypatch):
    quant = QuantizedConv2d(3, 2, 3, w_bits=4, a_bits=4)
    calls = []
    original = F.conv2d

    def counting_conv2d(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, 'conv2d', counting_conv2d)
    quant(torch.rand(1, 3, 5, 5))
    assert len(calls) == 1


def test_string_padding_falls_back_to_autograd():
    conv = MixedPrecisionConv2d(2, 2, 3, padding='same')
    x = torch.rand(1, 2, 5, 5, requires_grad=True)
    out = conv(x)
    assert out.shape == (1, 2, 5, 5)
    out.sum().backward()
    assert conv.alpha_a.grad is not None
    with pytest.raises(ValueError, match='numeric padding'):
        quantized_conv2d(
            x,
            conv.weight,
            a_bits=(4, ),
            w_bits=(4, ),
            a_ranges=t([1.0]),
            padding='same')


# ---------------------------------------------------------------------------
# Linear layers and predicates
# ---------------------------------------------------------------------------
def test_mixed_linear_equals_formula():
    torch.manual_seed(7)
    fc = nn.Linear(5, 3)
    mixed = MixedPrecisionLinear.from_float(
        fc, w_candidates=(2, 4), a_candidates=(3, 8), layer_name='fc')
    assert mixed.weight is fc.weight and mixed.bias is fc.bias
    with torch.no_grad():
        mixed.alpha_w.copy_(t([0.2, -0.3]))
        mixed.act_ranges.copy_(t([1.0, 2.0]))
    x = torch.randn(4, 5).relu().requires_grad_()
    out = mixed(x)
    p_w = torch.softmax(mixed.alpha_w, 0)
    p_a = torch.softmax(mixed.alpha_a, 0)
    x_mix = sum(p_a[i] * ref_activation(x, mixed.act_ranges[i], b)
                for i, b in enumerate((3, 8)))
    w_mix = sum(p_w[j] * ref_weight(mixed.weight, b)
                for j, b in enumerate((2, 4)))
    torch.testing.assert_close(out, F.linear(x_mix, w_mix, mixed.bias))
    assert mixed.choice() == (2, 3)
    assert 'w_candidates=(2, 4)' in repr(mixed)


def test_quantized_linear():
    torch.manual_seed(8)
    fc = nn.Linear(4, 2)
    quant = QuantizedLinear.from_float(fc, 3, 4, init_range=2.0)
    x = torch.randn(3, 4).relu()
    ref = F.linear(
        ref_activation(x, t(2.0), 4), ref_weight(fc.weight, 3), fc.bias)
    torch.testing.assert_close(quant(x), ref)
    full = QuantizedLinear.from_float(fc, 32, 32)
    torch.testing.assert_close(full(x), fc(x))
    result = QuantizedLinear(
        4, 2, w_bits=4, a_bits=4).load_state_dict(
            fc.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ['act_range', 'w_threshold']


def test_predicates():
    mixed = MixedPrecisionConv2d(2, 2, 1)
    assert is_mixed_layer(mixed) and not is_quantized_layer(mixed)
    assert is_mixed_layer(MixedPrecisionLinear(2, 2))
    quant = QuantizedLinear(2, 2, w_bits=4, a_bits=4)
    assert is_quantized_layer(quant) and not is_mixed_layer(quant)
    assert is_quantized_layer(QuantizedConv2d(2, 2, 1, w_bits=2, a_bits=2))
    assert not is_mixed_layer(nn.Conv2d(2, 2, 1))
    assert not is_quantized_layer(nn.Linear(2, 2))


@pytest.mark.parametrize('cls,kwargs',
                         [(MixedPrecisionConv2d, {}),
                          (QuantizedConv2d, dict(w_bits=4, a_bits=4))])
def test_autocast_matches_plain_autograd(cls, kwargs):
    """Under autocast the fused layer runs its conv (and the conv's
    backward) in the low precision, like the plain composition does."""
    results = []
    for memory_efficient in (True, False):
        torch.manual_seed(9)
        layer = cls(
            3, 4, 3, padding=1, memory_efficient=memory_efficient, **kwargs)
        x = (torch.rand(2, 3, 6, 6) * 2).requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        params = [x] + [p for p in layer.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.float().sum(), params)
        assert all(g.dtype == p.dtype for g, p in zip(grads, params))
        results.append((out, ) + grads)
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain)


@pytest.mark.slow  # compiling the kernels takes about a minute on CPU
def test_compile_backend_layers_match_reference():
    from gmpq_mm.quantization.kernel_backend import (
        get_kernel_backend, get_kernel_backend_setting, set_kernel_backend)
    previous = get_kernel_backend_setting()
    set_kernel_backend('compile')
    try:
        test_mixed_conv_equals_weighted_sum_formula(True)
        test_quantized_conv_matches_reference(True)
        test_quantized_conv_hand()
        assert get_kernel_backend() == 'compile', 'fell back to eager'
    finally:
        set_kernel_backend(previous)


def test_temperature_scales_the_softmax():
    conv = MixedPrecisionConv2d(2, 2, 1)
    with torch.no_grad():
        conv.alpha_w.copy_(t([0.0, 0.0, math.log(2.0), 0.0]))
    conv.temperature = 0.5
    # softmax(alpha / 0.5): exp = [1, 1, 4, 1] -> [1/7, 1/7, 4/7, 1/7]
    p_w, p_a = conv.probs()
    torch.testing.assert_close(p_w, t([1 / 7, 1 / 7, 4 / 7, 1 / 7]))
    torch.testing.assert_close(p_a, torch.full((4, ), 0.25))
    e_w, _ = conv.expected_bits()
    torch.testing.assert_close(e_w, t((2 + 3 + 16 + 6) / 7))
    # the forward mixes with the sharpened probabilities too
    x = torch.rand(1, 2, 3, 3)
    y_half = conv(x)
    conv.temperature = 1.0
    assert not torch.allclose(y_half, conv(x))
    # the ranking (the policy) does not depend on T
    assert conv.choice() == (4, 2)
    conv.temperature = 0.0
    with pytest.raises(ValueError, match='temperature must be > 0'):
        conv.probs()
    # not state: a checkpoint neither holds nor needs it
    assert not any('temperature' in k for k in conv.state_dict())
