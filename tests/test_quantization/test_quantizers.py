# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Quantizer numerics, checked against hand-computed numbers."""
import numpy as np
import pytest
import torch

from gmpq_mm.quantization.kernel_backend import get_kernel_backend_setting
# yapf: disable
from gmpq_mm.quantization.quantizers import (FP_BITS, SUPPORTED_BITS,
                                             ActivationQuantizer,
                                             WeightQuantizer, check_bits,
                                             check_candidates,
                                             get_kernel_backend,
                                             mixed_activation, mixed_weight,
                                             quantize_activation,
                                             quantize_weight,
                                             set_kernel_backend)

# yapf: enable


def t(values):
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------
# Plain reference quantizers, built from ordinary autograd ops
# ---------------------------------------------------------------------------
def ref_activation(x, r, bits, signed=False):
    """PACT with its STE written out: the clipped value carries the
    gradient (1 inside [lo, r] to x, 1 above r / -1 below -r to r); the
    rounding is a detached offset."""
    if bits == FP_BITS:
        return x
    n = 2**(bits - 1) - 1 if signed else 2**bits - 1
    lo = -r.detach() if signed else torch.zeros_like(r.detach())
    inside = ((x >= lo) & (x <= r.detach())).to(x.dtype)
    above = (x > r.detach()).to(x.dtype)
    below = (x < lo).to(x.dtype) if signed else torch.zeros_like(x)
    clipped = x * inside + r * above - r * below
    levels = torch.round(clipped.detach() * (n / r.detach())) * (
        r.detach() / n)
    return clipped + (levels - clipped.detach())


def ref_weight(w, bits, threshold=None, per_channel=False):
    """Symmetric quantizer with the identity STE (a detached offset)."""
    if bits == FP_BITS:
        return w
    n = 2**(bits - 1) - 1
    if threshold is not None:
        thr = torch.as_tensor(threshold, dtype=w.dtype)
        if thr.numel() > 1:
            thr = thr.reshape(-1, *([1] * (w.dim() - 1)))
    elif per_channel:
        thr = w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    else:
        thr = w.detach().abs().max()
    clipped = torch.maximum(torch.minimum(w.detach(), thr), -thr)
    levels = torch.round(clipped / thr * n) * (thr / n)
    return w + (levels - w.detach())


# ---------------------------------------------------------------------------
# Bit-width validation
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('bits', SUPPORTED_BITS)
def test_check_bits_accepts_supported(bits):
    assert check_bits(bits) == bits
    assert type(check_bits(np.int64(bits))) is int


@pytest.mark.parametrize('bad', [0, 1, 9, 16, 3.5, '4', True, None, -2])
def test_check_bits_rejects(bad):
    with pytest.raises(ValueError) as info:
        check_bits(bad, where='layer1.0.conv1')
    msg = str(info.value)
    assert msg.startswith('layer1.0.conv1: ')
    assert f'bit width {bad!r} is not supported' in msg
    assert '2..8' in msg and '32' in msg


def test_check_bits_message_for_string():
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1: bit width '4'"):
        check_bits('4', 'layer1.0.conv1')


def test_check_candidates():
    assert check_candidates([6, 2, 4], 'x') == (6, 2, 4)  # order kept
    assert check_candidates((32, 8)) == (32, 8)
    with pytest.raises(ValueError, match='layer2.conv: .*must not be empty'):
        check_candidates([], 'layer2.conv')
    with pytest.raises(ValueError, match='duplicates'):
        check_candidates([2, 4, 2], 'layer2.conv')
    with pytest.raises(ValueError, match=r"layer2\.conv: bit width 1 "):
        check_candidates([2, 1], 'layer2.conv')
    with pytest.raises(ValueError, match='sequence of ints'):
        check_candidates('234', 'layer2.conv')


def test_kernel_backend_switch():
    assert get_kernel_backend() in ('eager', 'compile')
    with pytest.raises(ValueError, match='not one of'):
        set_kernel_backend('triton')


# ---------------------------------------------------------------------------
# Weight quantizer
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('bits,levels', [(2, 3), (3, 7), (4, 15), (5, 31),
                                         (6, 63), (8, 255)])
def test_weight_levels_dense(bits, levels):
    w = torch.linspace(-1.0, 1.0, 4001)
    q = quantize_weight(w, bits)
    values = torch.unique(q)
    assert values.numel() == levels
    assert (values > 0).sum() == 2**(bits - 1) - 1
    assert values.max() == 1.0 and values.min() == -1.0
    # symmetric grid
    torch.testing.assert_close(values, -values.flip(0))


def test_weight_exact_small():
    w = t([-1.0, -0.55, -0.1, 0.2, 0.45, 0.8])  # T = max|w| = 1
    torch.testing.assert_close(
        quantize_weight(w, 2), t([-1.0, -1.0, 0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(
        quantize_weight(w, 3), t([-1.0, -2 / 3, 0.0, 1 / 3, 1 / 3, 2 / 3]))
    torch.testing.assert_close(
        quantize_weight(w, 4), t([-1.0, -4 / 7, -1 / 7, 1 / 7, 3 / 7, 6 / 7]))
    # calibrated T = 0.5, 3 bits: s = 1/6, clipped to [-0.5, 0.5]
    torch.testing.assert_close(
        quantize_weight(w, 3, threshold=0.5),
        t([-0.5, -0.5, -1 / 6, 1 / 6, 0.5, 0.5]))
    assert quantize_weight(w, 32) is w


def test_weight_threshold_follows_current_weights():
    w = t([0.3, -0.6])
    torch.testing.assert_close(quantize_weight(w, 2), t([0.0, -0.6]))
    w2 = w * 0.5  # T is recomputed, not frozen at the first call
    torch.testing.assert_close(quantize_weight(w2, 2), t([0.0, -0.3]))


def test_weight_per_channel():
    w = t([[0.6, -0.2], [2.0, 1.1]])
    # T = 0.6 and 2.0 per row; 2 bits: s = T
    torch.testing.assert_close(
        quantize_weight(w, 2, per_channel=True), t([[0.6, 0.0], [2.0, 2.0]]))
    torch.testing.assert_close(
        quantize_weight(w, 2), t([[0.0, 0.0], [2.0, 2.0]]))
    torch.testing.assert_close(
        quantize_weight(w, 2, threshold=t([1.0, 1.0])),
        t([[1.0, 0.0], [1.0, 1.0]]))


def test_weight_zero_guard():
    w = torch.zeros(3, 2, requires_grad=True)
    q = quantize_weight(w, 4)
    assert torch.equal(q, torch.zeros(3, 2))
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones(3, 2))
    w2 = t([[0.0, 0.0], [0.5, -0.8]])
    q2 = quantize_weight(w2, 2, per_channel=True)
    assert not torch.isnan(q2).any()
    torch.testing.assert_close(q2, t([[0.0, 0.0], [0.8, -0.8]]))
    q3 = mixed_weight(torch.zeros(4), torch.full((2, ), 0.5), (2, 4))
    assert torch.equal(q3, torch.zeros(4))


def test_weight_ste_identity():
    w = t([-1.0, 0.2, 0.45, 0.8]).requires_grad_()
    g = t([1.0, 2.0, 3.0, 4.0])
    # values beyond a calibrated T still get the identity gradient
    quantize_weight(w, 3, threshold=0.5).backward(g)
    torch.testing.assert_close(w.grad, g)


# ---------------------------------------------------------------------------
# Activation quantizer
# ---------------------------------------------------------------------------
def test_activation_exact_unsigned():
    x = t([-0.5, 0.0, 0.1, 0.2, 0.6, 0.9, 1.0, 1.7])
    # r = 1, 2 bits: s = 1/3
    torch.testing.assert_close(
        quantize_activation(x, t(1.0), 2),
        t([0.0, 0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0]))
    # r = 2, 3 bits: s = 2/7
    x = t([0.1, 0.3, 0.5, 1.1, 1.9, 2.5])
    torch.testing.assert_close(
        quantize_activation(x, t(2.0), 3),
        t([0.0, 2 / 7, 4 / 7, 8 / 7, 2.0, 2.0]))


def test_activation_exact_signed():
    x = t([-1.5, -0.9, -0.4, -0.1, 0.0, 0.2, 0.7, 1.2])
    # r = 1, 3 bits signed: s = 1 / (2^2 - 1) = 1/3, clip to [-1, 1]
    torch.testing.assert_close(
        quantize_activation(x, t(1.0), 3, signed=True),
        t([-1.0, -1.0, -1 / 3, 0.0, 0.0, 1 / 3, 2 / 3, 1.0]))


@pytest.mark.parametrize('bits', [2, 3, 4, 6, 8])
def test_activation_levels(bits):
    x = torch.linspace(-0.5, 1.5, 20001)
    q = quantize_activation(x, t(1.0), bits)
    assert torch.unique(q).numel() == 2**bits
    assert q.min() == 0.0 and q.max() == 1.0
    qs = quantize_activation(x - 0.5, t(1.0), bits, signed=True)
    assert torch.unique(qs).numel() == 2**bits - 1


def test_activation_ste_unsigned():
    x = t([-0.5, 0.0, 0.5, 1.0, 1.5, 3.0]).requires_grad_()
    r = torch.nn.Parameter(t(1.0))
    quantize_activation(x, r, 4).backward(t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    # dq/dx = 1[0 <= x <= r]; dq/dr = 1[x > r]
    torch.testing.assert_close(x.grad, t([0.0, 2.0, 3.0, 4.0, 0.0, 0.0]))
    assert r.grad.shape == r.shape
    torch.testing.assert_close(r.grad, t(11.0))


def test_activation_ste_signed():
    x = t([-3.0, -1.0, -0.5, 0.5, 1.0, 2.0]).requires_grad_()
    r = torch.nn.Parameter(t(1.0))
    quantize_activation(
        x, r, 3, signed=True).backward(t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    torch.testing.assert_close(x.grad, t([0.0, 2.0, 3.0, 4.0, 5.0, 0.0]))
    torch.testing.assert_close(r.grad, t(6.0 - 1.0))


def test_activation_full_precision_passthrough():
    x = t([-1.0, 7.0]).requires_grad_()
    r = torch.nn.Parameter(t(1.0))
    assert quantize_activation(x, r, 32) is x
    assert r.grad is None


@pytest.mark.parametrize('signed', [False, True])
def test_activation_matches_reference(signed):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 4, 4) * 2).requires_grad_()
    r = torch.nn.Parameter(t([1.7]))
    g = torch.randn(2, 3, 4, 4)
    out = quantize_activation(x, r, 3, signed)
    gx, gr = torch.autograd.grad(out, [x, r], g)
    ref = ref_activation(x, r, 3, signed)
    rx, rr = torch.autograd.grad(ref, [x, r], g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gr, rr)


# ---------------------------------------------------------------------------
# Mixed quantizers
# ---------------------------------------------------------------------------
def test_mixed_activation_hand():
    x = t([0.4, 1.5]).requires_grad_()
    probs = t([0.25, 0.75]).requires_grad_()
    ranges = t([1.0, 2.0]).requires_grad_()
    out = mixed_activation(x, probs, ranges, (2, 3))
    # q0 (r=1, s=1/3) = [1/3, 1]; q1 (r=2, s=2/7) = [2/7, 10/7]
    torch.testing.assert_close(
        out, t([0.25 / 3 + 0.75 * 2 / 7, 0.25 + 0.75 * 10 / 7]))
    out.backward(t([1.0, 1.0]))
    # 1.5 > r0 blocks candidate 0 only
    torch.testing.assert_close(x.grad, t([1.0, 0.75]))
    torch.testing.assert_close(ranges.grad, t([0.25, 0.0]))
    torch.testing.assert_close(probs.grad, t([1 / 3 + 1.0, 2 / 7 + 10 / 7]))


def test_mixed_weight_hand():
    w = t([0.3, -1.0]).requires_grad_()
    probs = t([0.5, 0.5]).requires_grad_()
    out = mixed_weight(w, probs, (2, 3))
    # q0 = [0, -1]; q1 = [1/3, -1]
    torch.testing.assert_close(out, t([1 / 6, -1.0]))
    out.backward(t([1.0, 2.0]))
    torch.testing.assert_close(w.grad, t([1.0, 2.0]))
    torch.testing.assert_close(probs.grad, t([-2.0, 1 / 3 - 2.0]))


def _check_mixed_activation(bits, signed):
    torch.manual_seed(1)
    x = (torch.randn(2, 3, 5, 5) * 2).requires_grad_()
    alpha = torch.randn(len(bits)).requires_grad_()
    ranges = (torch.rand(len(bits)) * 2 + 0.5).requires_grad_()
    g = torch.randn(2, 3, 5, 5)
    out = mixed_activation(x, torch.softmax(alpha, 0), ranges, bits, signed)
    grads = torch.autograd.grad(out, [x, alpha, ranges], g)
    probs = torch.softmax(alpha, 0)
    ref = sum(probs[i] * ref_activation(x, ranges[i], b, signed)
              for i, b in enumerate(bits))
    ref_grads = torch.autograd.grad(ref, [x, alpha, ranges], g)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def _check_mixed_weight(bits, per_channel, threshold):
    torch.manual_seed(2)
    w = torch.randn(4, 3, 3, 3).requires_grad_()
    alpha = torch.randn(len(bits)).requires_grad_()
    g = torch.randn(4, 3, 3, 3)
    out = mixed_weight(w, torch.softmax(alpha, 0), bits, per_channel,
                       threshold)
    grads = torch.autograd.grad(out, [w, alpha], g)
    probs = torch.softmax(alpha, 0)
    ref = sum(probs[j] * ref_weight(w, b, threshold, per_channel)
              for j, b in enumerate(bits))
    ref_grads = torch.autograd.grad(ref, [w, alpha], g)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


CANDIDATE_SETS = [(2, 3, 4, 6), (2, 3, 4), (4, ), (6, 2, 32)]


@pytest.mark.parametrize('bits', CANDIDATE_SETS)
@pytest.mark.parametrize('signed', [False, True])
def test_mixed_activation_matches_reference(bits, signed):
    _check_mixed_activation(bits, signed)


@pytest.mark.parametrize('bits', CANDIDATE_SETS)
@pytest.mark.parametrize('per_channel,threshold', [(False, None), (True, None),
                                                   (False, 0.8)])
def test_mixed_weight_matches_reference(bits, per_channel, threshold):
    _check_mixed_weight(bits, per_channel, threshold)


def test_mixed_activation_saves_only_inputs():
    """Backward keeps x, probs and ranges: no per-candidate copies."""
    x = torch.rand(2, 4, 6, 6).requires_grad_()
    probs = torch.softmax(torch.zeros(4, requires_grad=True), 0)
    ranges = torch.full((4, ), 0.7, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mixed_activation(x, probs, ranges, (2, 3, 4, 6))
    assert len(saved) == 3
    for kept, given in zip(saved, (x, probs, ranges)):
        assert kept.data_ptr() == given.data_ptr()
        assert kept.shape == given.shape
    out.sum().backward()
    assert x.grad is not None


def test_mixed_validates_lengths():
    with pytest.raises(ValueError, match='as many probs'):
        mixed_activation(torch.rand(3), t([0.5, 0.5]), t([1.0]), (2, 4))
    with pytest.raises(ValueError, match='as many probs'):
        mixed_weight(torch.rand(3), t([1.0]), (2, 4))
    with pytest.raises(ValueError, match='bit width 9'):
        mixed_weight(torch.rand(3), t([0.5, 0.5]), (2, 9))


@pytest.mark.slow  # compiling the kernels takes about a minute on CPU
def test_compile_backend_matches_reference():
    previous = get_kernel_backend_setting()
    set_kernel_backend('compile')
    try:
        for bits in [(2, 3, 4, 6), (6, 2, 32)]:
            for signed in (False, True):
                _check_mixed_activation(bits, signed)
            _check_mixed_weight(bits, False, None)
            _check_mixed_weight(bits, True, None)
        assert get_kernel_backend() == 'compile', 'fell back to eager'
    finally:
        set_kernel_backend(previous)


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------
def test_activation_quantizer_module():
    quant = ActivationQuantizer(2, init_range=1.0, name='layer1.0.conv1')
    assert isinstance(quant.range, torch.nn.Parameter)
    assert quant.range.shape == () and quant.range.item() == 1.0
    x = t([0.1, 0.2, 0.6, 1.7])
    torch.testing.assert_close(quant(x), t([0.0, 1 / 3, 2 / 3, 1.0]))
    assert ActivationQuantizer(4).range.item() == 6.0
    with pytest.raises(ValueError, match='layer1.0.conv1: bit width 1 '):
        ActivationQuantizer(1, name='layer1.0.conv1')


def test_weight_quantizer_module_and_calibration():
    quant = WeightQuantizer(3)
    assert quant.threshold.numel() == 0
    w = t([-1.0, -0.55, -0.1, 0.2, 0.45, 0.8])
    torch.testing.assert_close(
        quant(w), t([-1.0, -2 / 3, 0.0, 1 / 3, 1 / 3, 2 / 3]))
    quant.calibrate(0.5)
    torch.testing.assert_close(
        quant(w), t([-0.5, -0.5, -1 / 6, 1 / 6, 0.5, 0.5]))
    # a calibrated threshold survives a state_dict round trip into a fresh
    # (uncalibrated) quantizer
    fresh = WeightQuantizer(3)
    fresh.load_state_dict(quant.state_dict())
    torch.testing.assert_close(fresh.threshold, t([0.5]))
    torch.testing.assert_close(fresh(w), quant(w))
    quant.calibrate(None)
    assert quant.threshold.numel() == 0
    quant.calibrate(0.0)  # zero means "from the current weights"
    assert quant.threshold.numel() == 0
    with pytest.raises(ValueError, match='>= 0'):
        quant.calibrate(-1.0)
    with pytest.raises(ValueError, match="bit width '8'"):
        WeightQuantizer('8')


@pytest.mark.parametrize('r', [0.0, -0.46, -7.9])
@pytest.mark.parametrize('signed', [False, True])
def test_non_positive_range_gives_no_nan_and_pulls_range_up(r, signed):
    # SGD can drive a PACT range to or below zero; the quantizer then clips
    # to a tiny range instead of producing 0 * inf = NaN.
    x = torch.tensor([0.0, 0.5, 1.0, -1.0], requires_grad=True)
    rng = torch.tensor(r, requires_grad=True)
    y = quantize_activation(x, rng, 4, signed=signed)
    y.sum().backward()
    assert torch.isfinite(y).all() and y.abs().max() <= 1e-4 + 1e-9
    assert torch.isfinite(x.grad).all()
    # dq/dr = 1[x > r] (+1 for 0.5 and 1.0); signed also -1 for x < -r.
    assert rng.grad.item() == (1.0 if signed else 2.0)
