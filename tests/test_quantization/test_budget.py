"""Tests of gmpq_mm.quantization.budget (exact policy under a budget)."""
import itertools
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from gmpq_mm.quantization.budget import (best_policy_under_budget,
                                         log_probs_from_model, policy_cost)
from gmpq_mm.quantization.complexity import count_macs
from gmpq_mm.quantization.convert import to_mixed_precision
from gmpq_mm.quantization.solver import Constraint, solve_policy

W, A = (2, 4), (2, 4)
# Probabilities of the candidates (2, 4) of each layer.
PROBS = {
    'a': ([0.3, 0.7], [0.4, 0.6]),
    'b': ([0.3, 0.7], [0.2, 0.8]),
    'c': ([0.6, 0.4], [0.2, 0.8]),
}
MACS = {'a': 1, 'b': 3, 'c': 4}
LOGP = {n: (np.log(pw), np.log(pa)) for n, (pw, pa) in PROBS.items()}


def score(log_probs, w_cands, a_cands, policy):
    return sum(log_probs[n][0][w_cands.index(w)] +
               log_probs[n][1][a_cands.index(a)]
               for n, (w, a) in policy.items())


def brute_force(log_probs, macs, w_cands, a_cands, budget):
    names = list(log_probs)
    pairs = list(itertools.product(w_cands, a_cands))
    best, best_score = None, -math.inf
    for combo in itertools.product(pairs, repeat=len(names)):
        policy = dict(zip(names, combo))
        if policy_cost(macs, policy) > budget:
            continue
        s = score(log_probs, w_cands, a_cands, policy)
        if s > best_score:
            best, best_score = policy, s
    return best, best_score


def greedy(log_probs, macs, w_cands, a_cands, budget):
    """From the argmax, repeatedly make the cheapest move in score lost per
    BitOP saved until the policy fits: a natural but inexact heuristic."""
    policy = {
        n: (w_cands[int(np.argmax(lw))], a_cands[int(np.argmax(la))])
        for n, (lw, la) in log_probs.items()
    }
    while policy_cost(macs, policy) > budget:
        moves = []
        for n, (w0, a0) in policy.items():
            for w, a in itertools.product(w_cands, a_cands):
                saved = macs[n] * (w0 * a0 - w * a)
                if saved > 0:
                    lost = (
                        score(log_probs, w_cands, a_cands, {n: (w0, a0)}) -
                        score(log_probs, w_cands, a_cands, {n: (w, a)}))
                    moves.append((lost / saved, n, (w, a)))
        _, n, bits = min(moves)
        policy[n] = bits
    return policy


def test_exact_where_greedy_fails():
    budget = 44
    # argmax: a (4, 4), b (4, 4), c (2, 4) = 16 + 48 + 32 = 96 BitOPs
    best, best_score = brute_force(LOGP, MACS, W, A, budget)
    # by hand: a (2, 2) = 4, b (2, 4) = 24, c (2, 2) = 16 -> 44 = budget
    assert best == {'a': (2, 2), 'b': (2, 4), 'c': (2, 2)}
    got = best_policy_under_budget(LOGP, MACS, W, A, budget)
    assert got == best and list(got) == ['a', 'b', 'c']
    assert policy_cost(MACS, got) == 44
    assert score(LOGP, W, A, got) == pytest.approx(best_score)
    # greedy lands on a (4, 2), b (2, 2), c (2, 2): 36 BitOPs, worse score
    g = greedy(LOGP, MACS, W, A, budget)
    assert g == {'a': (4, 2), 'b': (2, 2), 'c': (2, 2)}
    assert score(LOGP, W, A, g) < best_score - 0.5


@pytest.mark.parametrize('budget', [36, 40, 50, 60, 70, 80, 90])
def test_matches_brute_force_over_budgets(budget):
    best, _ = brute_force(LOGP, MACS, W, A, budget)
    assert best_policy_under_budget(LOGP, MACS, W, A, budget) == best


def test_argmax_shortcut_and_infeasible():
    argmax = {'a': (4, 4), 'b': (4, 4), 'c': (2, 4)}
    assert best_policy_under_budget(LOGP, MACS, W, A, 96) == argmax
    assert best_policy_under_budget(LOGP, MACS, W, A, 1e12) == argmax
    # cheapest: every layer at W2A2 = 4 * (1 + 3 + 4) = 32 BitOPs
    assert best_policy_under_budget(LOGP, MACS, W, A, 32) == {
        n: (2, 2)
        for n in MACS
    }
    with pytest.raises(ValueError) as err:
        best_policy_under_budget(LOGP, MACS, W, A, 31)
    msg = str(err.value)
    assert 'smallest reachable' in msg and '(32)' in msg and '31' in msg

    big = {n: m * 10**8 for n, m in MACS.items()}
    with pytest.raises(
            ValueError, match=r'2\.50G \(2500000000\).*'
            r'3\.20G \(3200000000\)'):
        best_policy_under_budget(LOGP, big, W, A, 2.5e9)


def test_input_errors_and_forbidden_candidates():
    with pytest.raises(ValueError, match="'a'.*3 log-probs"):
        best_policy_under_budget({'a': ([0, 0, 0], [0, 0])}, MACS, W, A, 100)
    with pytest.raises(ValueError, match="'z'"):
        best_policy_under_budget({'z': ([0, 0], [0, 0])}, MACS, W, A, 100)
    # -inf forbids a candidate: c may not take 2-bit weights
    logp = dict(LOGP, c=(np.array([-np.inf, np.log(0.4)]), LOGP['c'][1]))
    # cheapest now: a (2, 2) + b (2, 2) + c (4, 2) = 4 + 12 + 32 = 48
    with pytest.raises(ValueError, match=r'\(48\)'):
        best_policy_under_budget(logp, MACS, W, A, 47)
    got = best_policy_under_budget(logp, MACS, W, A, 56)
    assert got['c'][0] == 4
    assert got == brute_force(logp, MACS, W, A, 56)[0]
    # tensors (with grad) are accepted as log-probs
    alpha = torch.zeros(2, requires_grad=True)
    lp = {'a': (torch.log_softmax(alpha, 0), torch.log_softmax(alpha, 0))}
    assert best_policy_under_budget(lp, {'a': 5}, W, A, 20) == {'a': (2, 2)}


def dp_optimum(log_probs, macs, w_cands, a_cands, budget):
    """Exact optimum by dynamic programming over integer costs."""
    best = {0: 0.0}
    for n, (lw, la) in log_probs.items():
        nxt = {}
        for cost, s in best.items():
            for (i, w), (j, a) in itertools.product(
                    enumerate(w_cands), enumerate(a_cands)):
                c = cost + macs[n] * w * a
                if c <= budget and s + lw[i] + la[j] > nxt.get(c, -math.inf):
                    nxt[c] = s + lw[i] + la[j]
        best = nxt
    return max(best.values())


def test_medium_instance_matches_dynamic_programming():
    rng = np.random.default_rng(0)
    cands = (2, 3, 4, 6)
    names = [f'layer{i}' for i in range(12)]
    macs = {n: int(rng.integers(1, 6)) for n in names}
    log_probs = {
        n:
        (np.log(rng.dirichlet(np.ones(4))), np.log(rng.dirichlet(np.ones(4))))
        for n in names
    }
    full = sum(m * 36 for m in macs.values())
    for budget in (full * 0.2, full * 0.35, full * 0.5):
        got = best_policy_under_budget(log_probs, macs, cands, cands, budget)
        assert policy_cost(macs, got) <= budget
        assert score(log_probs, cands, cands, got) == pytest.approx(
            dp_optimum(log_probs, macs, cands, cands, budget), abs=1e-9)


def test_supernet_under_budget():
    """52 layers x 16 pairs with ResNet-50-like MACs solves in seconds."""
    rng = np.random.default_rng(1)
    cands = (2, 3, 4, 6)
    names = [f'l{i}' for i in range(52)]
    macs = {n: int(rng.integers(10**6, 10**8)) for n in names}
    log_probs = {
        n:
        (np.log(rng.dirichlet(np.ones(4))), np.log(rng.dirichlet(np.ones(4))))
        for n in names
    }
    budget = 9.5 * sum(macs.values())  # about 3 x 3 bits on average
    start = time.perf_counter()
    got = best_policy_under_budget(log_probs, macs, cands, cands, budget)
    assert time.perf_counter() - start < 20
    assert policy_cost(macs, got) <= budget

    # the log-probs of a real supernet and its MACs plug in directly
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 16, 3, stride=2, padding=1))
    to_mixed_precision(model, cands, cands)
    with torch.no_grad():
        model[1].alpha_w.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0]))
        model[1].alpha_a.copy_(torch.tensor([0.0, 0.0, 0.0, 3.0]))
    lp = log_probs_from_model(model)
    assert list(lp) == ['1', '2']
    layer_macs = count_macs(model, (3, 8, 8))
    argmax = best_policy_under_budget(lp, layer_macs, cands, cands, 1e12)
    assert argmax == {'1': (6, 6), '2': (2, 2)}  # ties -> first candidate
    # layer '1' must drop to fit 8 x 8 x 9 x 64 x 16 = 589,824 BitOPs
    cheap = best_policy_under_budget(lp, layer_macs, cands, cands, 589_824)
    assert policy_cost(layer_macs, cheap) <= 589_824
    assert cheap['1'] != (6, 6)


# --- solve_policy: any scores, several budgets with tolerance bands -------
def brute_force_general(scores, constraints):
    """Best total score over every policy in every band (None if none)."""
    names = list(scores)
    best, best_score = None, -math.inf
    for combo in itertools.product(*[list(scores[n]) for n in names]):
        policy = dict(zip(names, combo))
        if not all(c.holds(c.cost(policy)) for c in constraints):
            continue
        s = sum(scores[n][p] for n, p in policy.items())
        if s > best_score:
            best, best_score = policy, s
    return best, best_score


def random_instance(rng, n_layers, pairs):
    names = [f'l{i}' for i in range(n_layers)]
    # not separable into a weight and an activation part
    scores = {n: {p: float(rng.normal()) for p in pairs} for n in names}
    macs = {n: int(rng.integers(1, 20)) for n in names}
    params = {n: int(rng.integers(1, 50)) for n in names}
    bitops = {n: {(w, a): macs[n] * w * a for w, a in pairs} for n in names}
    size = {n: {(w, a): params[n] * w for w, a in pairs} for n in names}
    return scores, bitops, size


@pytest.mark.parametrize('seed', range(6))
def test_solve_policy_matches_brute_force_two_bands(seed):
    rng = np.random.default_rng(seed)
    pairs = [(2, 4), (4, 4), (4, 8), (8, 8)]
    scores, bitops, size = random_instance(rng, 5, pairs)
    top_b = sum(max(c.values()) for c in bitops.values())
    top_s = sum(max(c.values()) for c in size.values())
    checked = 0
    for fb, fs, tol in [(0.5, 0.6, 0.1), (0.4, 0.9, 0.05), (0.7, 0.4, 0.2),
                        (0.3, 0.3, None)]:
        cons = [
            Constraint('BitOPs', bitops, fb * top_b, tolerance=tol),
            Constraint('size', size, fs * top_s, tolerance=tol)
        ]
        best, best_score = brute_force_general(scores, cons)
        if best is None:
            with pytest.raises(ValueError, match='BitOPs|size'):
                solve_policy(scores, cons)
            continue
        got = solve_policy(scores, cons)
        assert all(c.holds(c.cost(got)) for c in cons)
        assert sum(scores[n][p] for n, p in got.items()) == pytest.approx(
            best_score, abs=1e-12)
        checked += 1
    assert checked >= 2


def test_solve_policy_hand_case_and_ties():
    scores = {'a': {(2, 8): 0.0, (4, 8): 1.0}, 'b': {(2, 8): 0.0, (4, 8): 2.0}}
    size = {n: {(2, 8): 2, (4, 8): 4} for n in scores}
    # no budget: the argmax; 6 units: only one layer gets 4 bits, b (+2)
    assert solve_policy(scores) == {'a': (4, 8), 'b': (4, 8)}
    assert solve_policy(scores, [Constraint('size', size, 6)]) == {
        'a': (2, 8),
        'b': (4, 8)
    }
    # band [5.4, 6]: a policy of 4 units (both 2-bit) is refused, 6 kept
    assert solve_policy(scores, [Constraint('size', size, 6, 0.1)]) == {
        'a': (2, 8),
        'b': (4, 8)
    }
    # a floor pulls the argmax up: only 8 units lie in [7, 8]
    low = {n: {(2, 8): 1.0, (4, 8): 0.0} for n in scores}
    assert solve_policy(low, [Constraint('size', size, 8, floor=7)]) == {
        'a': (4, 8),
        'b': (4, 8)
    }
    # ties keep the pair listed first
    tie = {'a': {(4, 8): 0.5, (2, 8): 0.5}}
    assert solve_policy(tie) == {'a': (4, 8)}


def test_solve_policy_errors():
    scores = {'a': {(2, 8): 0.0, (4, 8): 1.0}, 'b': {(2, 8): 0.0, (4, 8): 2.0}}
    size = {n: {(2, 8): 2, (4, 8): 4} for n in scores}
    with pytest.raises(
            ValueError,
            match=r'size budget 3 \(3\) is below the '
            r'smallest reachable 4 \(4\)'):
        solve_policy(scores, [Constraint('size', size, 3)])
    with pytest.raises(ValueError, match='size floor .* above the largest'):
        solve_policy(scores, [Constraint('size', size, 20, floor=9)])
    # each band reachable alone, not together
    ops = {n: {(2, 8): 10, (4, 8): 1} for n in scores}
    with pytest.raises(ValueError, match='no policy meets all of size in'):
        solve_policy(scores,
                     [Constraint('size', size, 4),
                      Constraint('ops', ops, 11)])
    with pytest.raises(ValueError, match="no cost for layer 'b'"):
        solve_policy(
            scores,
            [Constraint('size', {
                'a': size['a'],
                'b': {
                    (2, 8): 1
                }
            }, 9)])
    with pytest.raises(
            ValueError, match=r"costs given for layer\(s\) \['z'\]"):
        solve_policy(scores, [Constraint('size', dict(size, z={}), 9)])
    with pytest.raises(ValueError, match="layer 'a': every pair is forbidden"):
        solve_policy({'a': {(2, 8): -math.inf}})
    for bad in (math.nan, math.inf, True, 'x'):
        with pytest.raises(ValueError, match="layer 'a': score of"):
            solve_policy({'a': {(2, 8): bad}})
    with pytest.raises(ValueError, match='bit width 9'):
        solve_policy({'a': {(9, 8): 0.0}})
    for bad in ('abc', True, [1, 2], math.nan):
        with pytest.raises(ValueError, match='size budget must be'):
            Constraint('size', size, bad)
    with pytest.raises(ValueError, match='size tolerance must be in'):
        Constraint('size', size, 5, tolerance=1.5)


# --- the model-size budget -------------------------------------------------
def _small_net():
    torch.manual_seed(0)
    # odd weight counts (3*5*9 = 135, 5*7*9 = 315, 7*3 = 21) so that packing
    # rounds up to whole bytes
    return nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5),
        nn.Conv2d(5, 7, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(7, 3))


def test_size_terms_and_policy_size_by_hand():
    import copy

    from gmpq_mm.quantization.budget import policy_size_mb
    from gmpq_mm.quantization.complexity import (complexity_report, size_terms,
                                                 weight_size_bits)
    from gmpq_mm.quantization.convert import to_quantized
    net = _small_net()
    supernet = to_mixed_precision(
        copy.deepcopy(net), (2, 3, 8), (4, 8),
        names=['0', '2', '5'],
        input_shape=(3, 6, 6))
    fixed, numels = size_terms(supernet, ['0', '2', '5'])
    assert numels == {'0': 135, '2': 315, '5': 21}
    # fixed: biases 5 + 7 + 3, BatchNorm 5 + 5, one activation range per
    # layer (3, not the supernet's 2 per layer), all at 32 bits
    assert fixed == (5 + 7 + 3 + 10 + 3) * 32
    assert weight_size_bits(135, 3) == 51 * 8  # 405 bits -> 51 bytes
    assert weight_size_bits(21, 32) == 21 * 32
    layers = {'0': (3, 4), '2': (2, 8), '5': (8, 8)}
    by_hand = (fixed + 51 * 8 + 79 * 8 + 21 * 8) / 8 / 1e6
    assert policy_size_mb(fixed, numels, layers) == pytest.approx(
        by_hand, rel=1e-15)
    # the fixed-bit model the policy makes reports the same size
    fixed_net = to_quantized(copy.deepcopy(net), layers, input_shape=(3, 6, 6))
    report = complexity_report(fixed_net, (3, 6, 6))
    assert report['totals']['size_mb'] == pytest.approx(by_hand, rel=1e-15)


def test_size_budget_matches_brute_force_with_and_without_bitops():
    from gmpq_mm.quantization.budget import (bitops_constraint, policy_size_mb,
                                             size_constraint)
    rng = np.random.default_rng(3)
    numels = {'a': 135, 'b': 315, 'c': 21, 'd': 600}
    macs = {'a': 4860, 'b': 11340, 'c': 21, 'd': 5000}
    fixed = 28 * 32
    cands = (2, 4, 8)
    scores = {
        n: {
            (w, a): float(rng.normal())
            for w in cands
            for a in cands
        }
        for n in numels
    }
    sizes = [
        policy_size_mb(fixed, numels, {n: (w, 8)
                                       for n in numels}) for w in cands
    ]
    for budget_mb in np.linspace(sizes[0], sizes[-1], 6)[1:]:
        for tol in (None, 0.05):
            for with_bitops in (False, True):
                cons = [size_constraint(fixed, numels, budget_mb, tol)]
                if with_bitops:
                    cons.append(
                        bitops_constraint(macs, numels,
                                          30 * sum(macs.values()), 0.2))
                best, best_score = brute_force_general(scores, cons)
                if best is None:
                    with pytest.raises(ValueError):
                        solve_policy(scores, cons)
                    continue
                got = solve_policy(scores, cons)
                size = policy_size_mb(fixed, numels, got)
                assert size <= budget_mb
                if tol is not None:
                    assert size >= (1 - tol) * budget_mb
                assert sum(scores[n][p] for n, p in got.items()) == \
                    pytest.approx(best_score, abs=1e-12)
    # all 2-bit: 112 fixed bytes + 34 + 79 + 6 + 150 packed = 381 bytes
    with pytest.raises(
            ValueError,
            match=r'size budget 0.0001 MB is below the smallest '
            r'reachable 0\.000381 MB of these 4 layers'):
        solve_policy(scores, [size_constraint(fixed, numels, 1e-4)])


@pytest.mark.parametrize('value', ['abc', [1, 2], True, False, math.nan, 0])
def test_budget_values_are_checked(value):
    from gmpq_mm.quantization.budget import BudgetError, check_budget
    with pytest.raises(BudgetError) as err:
        check_budget(value, 'model.target_size_mb', '5.5')
    assert str(err.value).startswith('model.target_size_mb must be a '
                                     'positive number such as 5.5, got')
    assert '\n' not in str(err.value)
