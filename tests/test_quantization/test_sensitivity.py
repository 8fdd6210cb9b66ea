"""Per-layer sensitivity (floor 1): Hutchinson traces against exact
Hessians, both methods re-derived by hand, the allocation against brute
force."""
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gmpq_mm.quantization.budget import bitops_constraint
from gmpq_mm.quantization.hessian import hutchinson_traces
from gmpq_mm.quantization.sensitivity import allocate_bits, layer_sensitivity


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Small tensors: one thread is faster than several on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _exact_and_spread(hessian, i, group):
    """Exact trace of block ``i`` of a block Hessian and the standard
    deviation of one Hutchinson sample of it, ``v_i^T (H v)_i``: within the
    block ``2 sum_{a != b} H_ab^2``, plus ``|H_ij|_F^2`` from each other
    block ``j`` of its ``group`` (those share the product)."""

    def flat(block):
        rows = block.shape[:block.dim() // 2].numel()
        return block.reshape(rows, -1)

    h = flat(hessian[i][i])
    off = h - torch.diag(torch.diag(h))
    var = 2 * (off**2).sum()
    for j in group:
        if j != i:
            var = var + (flat(hessian[i][j])**2).sum()
    return float(torch.trace(h)), float(torch.sqrt(var))


def test_hutchinson_matches_exact_hessian_trace_of_weight_and_input():
    net = _tiny_net()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    weight = net[2].weight
    with torch.no_grad():
        hidden = net[1](net[0](x))  # the input of net[2], the batch tensor

    def loss(w, h):
        return F.cross_entropy(F.linear(h, w, net[2].bias), y)

    hessian = torch.autograd.functional.hessian(loss,
                                                (weight.detach(), hidden))
    # Weights and inputs are estimated with separate products.
    exact_w, spread_w = _exact_and_spread(hessian, 0, [0])
    exact_x, spread_x = _exact_and_spread(hessian, 1, [1])
    samples = 400
    est = hutchinson_traces(
        net,
        _ce, [(x, y)], {'w2': weight},
        inputs_of=['2'],
        num_samples=samples,
        seed=1)
    # Unbiased, with the spread of a mean of `samples` draws: 4 sigma.
    assert abs(est['weight']['w2'] - exact_w) <= \
        4 * spread_w / math.sqrt(samples)
    assert abs(est['input']['2'] - exact_x) <= \
        4 * spread_x / math.sqrt(samples)
    # Not trivial: the bound is far tighter than the traces themselves.
    assert 4 * spread_w / math.sqrt(samples) < 0.25 * exact_w
    assert 4 * spread_x / math.sqrt(samples) < 0.25 * exact_x
    assert est['input_numel']['2'] == hidden.numel()
    # The parameters and the training flags are left as they were.
    assert net.training and torch.equal(net[2].weight, weight)


def test_hutchinson_averages_batches_and_is_exact_for_diagonal_hessians():
    # L = sum c_i w_i^2 per batch: H = diag(2c), every sample exact.
    lin = nn.Linear(3, 1, bias=False)
    batches = [torch.tensor([[1., 2., 3.]]), torch.tensor([[0., 0., 1.]])]
    est = hutchinson_traces(
        lin,
        lambda m, c: (c * m.weight**2).sum(),
        batches, {'w': lin.weight},
        num_samples=2)
    assert est['weight']['w'] == pytest.approx((12 + 2) / 2)
    assert est['batches'] == 2


def _hand_case():
    """One bias-free 2x2 linear layer, W = diag(1, 0.4), inputs
    x = (1, +-0.4), loss 0.5 * sum |W x|^2. Every Hessian block is
    diagonal (sum_i x_i1 x_i2 = 0), so Hutchinson is exact."""
    lin = nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1., 0.], [0., .4]]))
    net = nn.Sequential(lin)
    x = torch.tensor([[1., .4], [1., -.4]], dtype=torch.float64)
    return net, [x], lambda m, b: 0.5 * (m(b)**2).sum()


def test_hessian_sensitivity_by_hand():
    net, batches, loss = _hand_case()
    out = layer_sensitivity(
        net, ['0'],
        loss,
        batches, (2, 3), (2, 3),
        method='hessian',
        signed={'0': True},
        calib_method='max',
        num_samples=3)
    row = out['layers']['0']
    # H_W = diag(sum_i x_i x_i^T) per row = diag(2, .32, 2, .32): trace
    # 4.64 over 4 weights; H_x = W^T W per sample = diag(1, .16): 2.32 over
    # 4 input elements.
    assert row['weight_trace'] == pytest.approx(4.64)
    assert row['input_trace'] == pytest.approx(2.32)
    # Weights, T = max|W| = 1: 2 bits (step 1) sends .4 to 0, 3 bits (step
    # 1/3) to 1/3. Inputs, signed, r = max|x| = 1: the same on +-.4.
    assert row['w_error'] == pytest.approx({2: .16, 3: (.4 - 1 / 3)**2})
    assert row['a_error'] == pytest.approx({
        2: 2 * .16,
        3: 2 * (.4 - 1 / 3)**2
    })
    per_w, per_x = 4.64 / 4, 2.32 / 4
    for (w, a), s in row['sensitivity'].items():
        expected = 0.5 * (
            per_w * row['w_error'][w] + per_x * row['a_error'][a])
        assert s == pytest.approx(expected), (w, a)
    assert row['sensitivity'][(2, 2)] == pytest.approx(0.1856)
    assert out['base_loss'] == pytest.approx(0.5 * 2 * (1 + .16**2))


def test_perturbation_sensitivity_by_hand():
    net, batches, loss = _hand_case()
    before = net[0].weight.clone()
    out = layer_sensitivity(
        net, ['0'],
        loss,
        batches, (2, 3), (2, 3),
        method='perturbation',
        signed={'0': True},
        calib_method='max')
    s = out['layers']['0']['sensitivity']
    base = 0.5 * 2 * (1 + .16**2)  # |W x|^2 = 1 + .16^2 per sample
    # (2, 2): Q(W) = diag(1, 0), Q(x) = (1, 0): loss 0.5 * 2 * 1.
    assert s[(2, 2)] == pytest.approx(1.0 - base)
    # (3, 3): Q(W) = diag(1, 1/3), Q(x) = (1, +-1/3): |.|^2 = 1 + 1/81.
    assert s[(3, 3)] == pytest.approx(1 + 1 / 81 - base)
    # (2, 3): the weight zeroes the second input whatever its bits.
    assert s[(2, 3)] == pytest.approx(1.0 - base)
    # (3, 2): inputs (1, 0): the second weight multiplies 0.
    assert s[(3, 2)] == pytest.approx(1.0 - base)
    # The layer is the FP layer again afterwards.
    assert torch.equal(net[0].weight, before)
    assert float(loss(net, batches[0]).detach()) == pytest.approx(base)
    assert 'forward' not in vars(net[0])


def test_unsigned_inputs_and_release_calibration_run_on_a_conv_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    batches = [(torch.randn(8, 1, 6, 6), torch.randint(3, (8, )))
               for _ in range(2)]
    for method in ('hessian', 'perturbation'):
        out = layer_sensitivity(
            net, ['2', '5'],
            _ce,
            batches, (2, 4, 6), (2, 8),
            method=method,
            num_samples=4)
        for name in ('2', '5'):
            s = out['layers'][name]['sensitivity']
            assert len(s) == 6 and all(math.isfinite(v) for v in s.values())
        if method == 'hessian':
            # More bits, less error: monotone in each coordinate.
            s = out['layers']['2']['sensitivity']
            assert s[(2, 2)] >= s[(4, 2)] >= s[(6, 2)] >= s[(6, 8)] >= 0


def test_refuses_quantized_or_unknown_layers():
    from gmpq_mm.quantization.convert import to_quantized
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    batches = [(torch.randn(2, 1, 6, 6), None)]

    def loss(m, b):
        return m(b[0]).pow(2).mean()

    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['9'\]"):
        layer_sensitivity(net, ['9'], loss, batches, (2, ), (2, ))
    with pytest.raises(ValueError, match='method'):
        layer_sensitivity(
            net, ['2'], loss, batches, (2, ), (2, ), method='fisher')
    to_quantized(net, {'2': (4, 4)}, names=['2'])
    with pytest.raises(ValueError, match="layer '2' is a QuantizedConv2d"):
        layer_sensitivity(net, ['2'], loss, batches, (2, ), (2, ))


def _brute_force(sens, macs, budget, tolerance):
    names = list(sens)
    best, best_policy = math.inf, None
    for choice in itertools.product(*[list(sens[n]) for n in names]):
        cost = sum(macs[n] * w * a for n, (w, a) in zip(names, choice))
        if not (1 - tolerance) * budget <= cost <= budget:
            continue
        total = sum(sens[n][p] for n, p in zip(names, choice))
        if total < best:
            best, best_policy = total, choice
    return best, best_policy


@pytest.mark.parametrize('case', range(12))
def test_allocation_is_optimal_against_brute_force(case):
    rng = random.Random(case)
    pairs = [(w, a) for w in (2, 3, 4) for a in (2, 4)]
    names = [f'l{i}' for i in range(rng.randint(2, 4))]
    macs = {n: rng.choice([10, 25, 40, 100]) for n in names}
    sens = {
        n: {
            p: rng.expovariate(1.0) / (p[0] * p[1])
            for p in pairs
        }
        for n in names
    }
    cheapest = sum(macs[n] * 4 for n in names)
    dearest = sum(macs[n] * 16 for n in names)
    budget = rng.uniform(cheapest, dearest)
    tolerance = rng.choice([0.05, 0.2, 0.5])
    best, _ = _brute_force(sens, macs, budget, tolerance)
    constraint = bitops_constraint(macs, names, budget, tolerance)
    if best == math.inf:
        with pytest.raises(ValueError):
            allocate_bits(sens, [constraint])
        return
    policy = allocate_bits(sens, [constraint])
    cost = sum(macs[n] * w * a for n, (w, a) in policy.items())
    assert (1 - tolerance) * budget <= cost <= budget
    assert sum(sens[n][tuple(p)] for n, p in policy.items()) == \
        pytest.approx(best, rel=1e-9, abs=1e-12)


def test_allocation_refuses_an_unreachable_budget():
    sens = {'a': {(2, 2): 1.0, (4, 4): 0.0}}
    with pytest.raises(
            ValueError,
            match='BitOPs budget .* is below the '
            'smallest reachable'):
        allocate_bits(sens, [bitops_constraint({'a': 100}, sens, 399)])
