"""RequantPoint (the 8-bit rounding of an integer runtime, in the model) and
the integer bias folding of integer_fold.py, against hand-computed values.

Pure PyTorch / numpy: nothing from mmengine / mmpretrain.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from gmpq_mm.quantization.bits import activation_levels, weight_levels
from gmpq_mm.quantization.convert import to_quantized
from gmpq_mm.quantization.integer_fold import (code_multiplier,
                                               folded_bias_shift,
                                               is_integer_conv)
from gmpq_mm.quantization.requant_point import (POINT_STATE, RequantPoint,
                                                is_requant_point)

# Ranges chosen so that every step is a power of two (exact in float32):
# uint8: 255 / 64 -> step 1 / 64; int8: 127 / 32 -> step 1 / 32.
U_RANGE = 255 / 64  # 3.984375
S_RANGE = 127 / 32  # 3.96875


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------
# RequantPoint
# ---------------------------------------------------------------------------
def test_unsigned_first_batch_sets_range_and_rounds():
    point = RequantPoint(signed=False).train()
    assert point.qrange == (0, 255) and point.levels == 255
    assert not point.calibrated and float(point.point_range) == 0.0
    x = _t(-1.0, 0.0, 0.1, 0.2, 0.5, U_RANGE)
    y = point(x)
    # the first training batch sets the range to its maximum
    assert float(point.point_range) == U_RANGE
    assert point.calibrated and point.scale() == 1 / 64
    # step 1/64: -1 -> 0 (clipped), 0.1 * 64 = 6.4 -> 6, 0.2 * 64 = 12.8
    # -> 13, 0.5 * 64 = 32, 3.984375 * 64 = 255
    want = _t(0.0, 0.0, 6 / 64, 13 / 64, 32 / 64, 255 / 64)
    assert torch.equal(y, want), (y, want)


def test_unsigned_range_ignores_negative_batch_max():
    point = RequantPoint(signed=False).train()
    point(_t(-3.0, -1.0, 0.5))  # max 0.5: the negatives do not count
    assert float(point.point_range) == 0.5


def test_signed_scale_and_codes():
    point = RequantPoint(signed=True).train()
    assert point.qrange == (-128, 127) and point.levels == 127
    x = _t(-S_RANGE, -0.3, 0.0, 0.7, 1.0)
    y = point(x)
    # range = max |x| = 127 / 32, step range / 127 = 1 / 32
    assert float(point.point_range) == S_RANGE
    assert point.scale() == 1 / 32
    # codes: -127, -0.3 * 32 = -9.6 -> -10, 0, 0.7 * 32 = 22.4 -> 22, 32
    want = _t(-127 / 32, -10 / 32, 0.0, 22 / 32, 32 / 32)
    assert torch.equal(y, want), (y, want)
    # eval, range fixed: codes saturate at -128 and 127 (int8), not at
    # +-127: -5 -> -128 / 32 = -4.0, 5 -> 127 / 32
    point.eval()
    y = point(_t(-5.0, -4.0, 5.0))
    assert torch.equal(y, _t(-4.0, -4.0, 127 / 32)), y
    codes = torch.round(point(torch.linspace(-9, 9, 301)) * 32)
    assert int(codes.min()) == -128 and int(codes.max()) == 127


def test_ema_of_the_batch_maxima():
    point = RequantPoint(signed=False).train()
    point(_t(0.0, U_RANGE))  # r = 3.984375
    point(_t(0.25, 1.0))  # M2 = 1.0
    # r + 0.01 * (M2 - r) = 3.984375 - 0.01 * 2.984375 = 3.95453125
    assert float(point.point_range) == pytest.approx(3.95453125, abs=1e-6)
    # signed: the EMA of max |x|
    point = RequantPoint(signed=True, momentum=0.5).train()
    point(_t(-2.0, 1.0))  # r = 2
    point(_t(0.5, -6.0))  # M2 = 6: 2 + 0.5 * (6 - 2) = 4
    assert float(point.point_range) == 4.0


def test_second_batch_is_rounded_with_the_updated_range():
    point = RequantPoint(signed=False, momentum=1.0).train()
    point(_t(0.0, 10.0))
    y = point(_t(0.0, 0.3, 2.55))  # momentum 1: r = 2.55, step 0.01
    assert float(point.point_range) == pytest.approx(2.55)
    assert torch.allclose(y, _t(0.0, 0.3, 2.55), atol=1e-6)


def test_eval_mode():
    # uncalibrated: the point is the identity (the very same tensor)
    point = RequantPoint(signed=False).eval()
    x = _t(-1.0, 0.123456, 100.0)
    assert point(x) is x
    assert float(point.point_range) == 0.0
    # calibrated: fixed range, values above it clip to the range
    point.train()
    point(_t(0.0, U_RANGE))
    point.eval()
    y = point(_t(-1.0, 0.1, 50.0))
    assert float(point.point_range) == U_RANGE  # not moved by 50
    assert torch.equal(y, _t(0.0, 6 / 64, U_RANGE))


def test_straight_through_gradient():
    point = RequantPoint(signed=False).train()
    point(_t(0.0, U_RANGE))
    point.eval()
    x = _t(-0.5, 0.5, 3.0, 5.0).requires_grad_()
    point(x).sum().backward()
    # 1 inside [0, range], 0 outside
    assert torch.equal(x.grad, _t(0.0, 1.0, 1.0, 0.0))
    signed = RequantPoint(signed=True).train()
    signed(_t(-S_RANGE, 1.0))
    signed.eval()
    x = _t(-5.0, -1.0, 1.0, 5.0).requires_grad_()
    signed(x).sum().backward()
    assert torch.equal(x.grad, _t(0.0, 1.0, 1.0, 0.0))


@pytest.mark.parametrize('momentum', [0.0, -0.1, 1.5])
def test_momentum_out_of_range(momentum):
    with pytest.raises(ValueError, match='momentum'):
        RequantPoint(signed=False, momentum=momentum)


def test_momentum_one_allowed_and_state_dict():
    point = RequantPoint(signed=True, momentum=1.0)
    assert list(point.state_dict()) == ['point_range'] == [POINT_STATE]
    assert is_requant_point(point) and not is_requant_point(nn.ReLU())
    point.train()
    point(_t(1.5))
    other = RequantPoint(signed=True)
    other.load_state_dict(point.state_dict())
    assert float(other.point_range) == 1.5 and other.calibrated


# ---------------------------------------------------------------------------
# code_multiplier
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    'w_bits, act_levels, want',
    [
        # n_w = 2^(2-1) - 1 = 1: min(127 // 1, 16383 // (3 * 1) = 5461)
        (2, 3, 127),
        # n_w = 7: min(127 // 7 = 18, 16383 // (255 * 7 = 1785) = 9)
        (4, 255, 9),
        # n_w = 127: min(127 // 127 = 1, 16383 // 32385 = 0) -> max(1, 0)
        (8, 255, 1),
    ])
def test_code_multiplier_by_hand(w_bits, act_levels, want):
    assert weight_levels(2) == 1 and weight_levels(4) == 7
    assert weight_levels(8) == 127
    m = code_multiplier(w_bits, act_levels)
    assert m == want
    n_w = weight_levels(w_bits)
    assert n_w * m <= 127  # the codes fit int8
    if m > 1:  # two products of codes fit int16
        assert 2 * act_levels * n_w * m <= 32767


# ---------------------------------------------------------------------------
# folded_bias_shift
# ---------------------------------------------------------------------------
def _conv_bn(bits, c_out=6):
    """conv (4 -> c_out) + BatchNorm, quantized, eval mode, every quantity
    set by hand: input range 1.75 (3 bits: s_x = 1.75 / 7 = 0.25), weight
    threshold 0.875 (4 bits: s_w = 0.875 / 7 = 0.125), BatchNorm stats
    with one negative gamma."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(4, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))
    to_quantized(net, {'0': bits})
    conv, bn = net
    with torch.no_grad():
        conv.weight.uniform_(-1.0, 1.0)
        conv.calibrate_activation(1.75)
        conv.calibrate_weight(0.875)
        bn.weight.copy_(torch.linspace(0.5, 1.5, c_out))
        bn.weight[2] = -0.8
        bn.bias.copy_(torch.linspace(-0.3, 0.4, c_out))
        bn.running_mean.copy_(torch.linspace(-0.7, 0.9, c_out))
        bn.running_var.copy_(torch.linspace(0.2, 2.0, c_out))
    return net.eval()


def test_folded_bias_shift_by_hand():
    net = _conv_bn((4, 3))
    conv, bn = net
    assert is_integer_conv(conv)
    shift = folded_bias_shift(conv, bn)
    assert shift.dtype == torch.float32 and shift.shape == (6, )
    # independently, in float64
    gamma = bn.weight.detach().double().numpy()
    beta = bn.bias.detach().double().numpy()
    mean = bn.running_mean.double().numpy()
    var = bn.running_var.double().numpy()
    g = gamma / np.sqrt(var + 1e-5)
    b = beta - mean * g
    s_x = 1.75 / 7
    s_w = 0.875 / 7
    m = 127 // 7  # 18; 16383 // (7 * 7) = 334 is larger
    assert code_multiplier(4, activation_levels(3)) == m
    unit = s_x * np.abs(s_w * g) / m
    want = np.rint(b / unit) * unit - b
    np.testing.assert_allclose(shift.numpy(), want, rtol=0, atol=1e-7)
    # a rounding: at most half a unit, and not zero everywhere
    assert np.all(np.abs(want) <= unit / 2 + 1e-12)
    assert np.abs(want).max() > 0


def test_folded_bias_shift_zero_cases():
    # a 32-bit input: no integer conv, no rounding
    net = _conv_bn((4, 32))
    assert not is_integer_conv(net[0])
    assert torch.equal(folded_bias_shift(*net), torch.zeros(6))
    # a training-mode BatchNorm (batch statistics): nothing to fold
    net = _conv_bn((4, 3))
    net[1].train()
    assert torch.equal(folded_bias_shift(*net), torch.zeros(6))
    # no BatchNorm after the conv
    assert torch.equal(
        folded_bias_shift(net[0], nn.Identity()), torch.zeros(6))


def test_zero_shift_on_the_conv_device():
    conv = nn.Conv2d(4, 6, 3, device='meta')  # a float conv in a block
    bn = nn.BatchNorm2d(6, device='meta').eval()
    assert folded_bias_shift(conv, bn).device == conv.weight.device


def test_folded_bias_lands_on_the_unit_grid():
    """The shift moves the bias onto the unit grid: b + shift is an integer
    number of units in every channel."""
    net = _conv_bn((4, 3))
    conv, bn = net
    shift = folded_bias_shift(conv, bn).double().numpy()
    g = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    b = (bn.bias.detach().double() - bn.running_mean.double() * g).numpy()
    unit = 0.25 * np.abs(0.125 * g.numpy()) / 18
    k = (b + shift) / unit
    assert all(math.isclose(v, round(v), abs_tol=1e-4) for v in k), k


@pytest.mark.parametrize('qrange', [(0, 255), (-128, 127)])
def test_plain_fake_quantize_equals_torch(qrange):
    """The CPU path computes exactly what torch's fused op computes (values
    and gradient), ties and both saturations included."""
    from gmpq_mm.quantization.requant_point import fake_quantize_8bit
    scale = torch.tensor([0.0123])
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(4000, generator=gen) * 2,
        (torch.arange(-300, 300) + 0.5) * scale,  # halfway between codes
        torch.tensor([-10.0, 10.0, 0.0])
    ]).requires_grad_()
    ours = fake_quantize_8bit(x, scale, *qrange)
    ref = torch.fake_quantize_per_tensor_affine(
        x, scale, torch.zeros(1, dtype=torch.int32), *qrange)
    assert torch.equal(ours, ref)
    g_ours, = torch.autograd.grad(ours.sum(), x)
    g_ref, = torch.autograd.grad(ref.sum(), x)
    assert torch.equal(g_ours, g_ref)
    assert 0 < g_ours.sum() < len(x)  # some inside, some outside
