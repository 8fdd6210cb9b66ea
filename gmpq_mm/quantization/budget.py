"""The most likely bit policy that fits a BitOPs budget.

The released GMPQ code has no budget: users tune the complexity weight ``cd``
until the argmax policy lands near the BitOPs they want. Here the search's
architecture distribution is read as a score instead: each layer ``l`` picks
one (weight bits, activation bits) pair ``(i, j)`` and we solve, exactly,

    maximise   sum_l  log p_w,l[i] + log p_a,l[j]
    subject to sum_l  MACs_l * bw_i * ba_j <= budget

a multiple-choice knapsack, as a small 0/1 integer program (one binary per
layer and pair, one equality per layer, one budget row) with
``scipy.optimize.milp``. Greedy "lower the cheapest layer" heuristics are not
optimal for it; with about 50 layers x 16 pairs the exact solve takes
milliseconds.

Pure PyTorch / numpy / scipy: nothing from mmengine / mmpretrain is imported.
"""
from collections import OrderedDict
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .bits import check_candidates
from .complexity import LayerMacs, human_units
from .layers import is_mixed_layer

__all__ = [
    'best_policy_under_budget', 'log_probs_from_model', 'policy_cost',
    'random_policy_near_budget'
]

Bits = Tuple[int, int]


def _as_array(values, name: str, kind: str, size: int) -> np.ndarray:
    if torch.is_tensor(values):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size != size:
        raise ValueError(f'layer {name!r}: {arr.size} log-probs for {kind} '
                         f'but {size} candidates')
    if np.isnan(arr).any() or np.isposinf(arr).any():
        raise ValueError(f'layer {name!r}: {kind} log-probs must be finite '
                         f'or -inf, got {arr.tolist()}')
    return arr


def _macs_int(macs: Mapping, name: str) -> int:
    if name not in macs:
        raise ValueError(f'no MACs given for layer {name!r}')
    value = macs[name]
    value = value.macs if isinstance(value, LayerMacs) else value
    if int(value) != value or value < 0:
        raise ValueError(f'MACs of {name!r} must be a non-negative integer, '
                         f'got {value!r}')
    return int(value)


def policy_cost(macs: Mapping, layers: Mapping) -> int:
    """BitOPs of ``name -> (w_bits, a_bits)``, in exact integer arithmetic."""
    return sum(
        _macs_int(macs, name) * int(w) * int(a)
        for name, (w, a) in layers.items())


def log_probs_from_model(model: nn.Module) -> 'OrderedDict[str, tuple]':
    """``name -> (log p_w, log p_a)`` of every mixed layer of a supernet."""
    out = OrderedDict()
    with torch.no_grad():
        for name, module in model.named_modules():
            if is_mixed_layer(module):
                p_w, p_a = module.probs()
                out[name] = (torch.log(p_w).tolist(), torch.log(p_a).tolist())
    return out


def best_policy_under_budget(log_probs: Mapping[str, Tuple[Sequence[float],
                                                           Sequence[float]]],
                             macs: Mapping,
                             w_candidates: Sequence[int],
                             a_candidates: Sequence[int],
                             budget: float,
                             min_bitops: float = 0) -> Dict[str, Bits]:
    """Exact most-likely policy with ``min_bitops <= BitOPs <= budget``.

    Args:
        log_probs: ``name -> (logp_w [K_w], logp_a [K_a])`` (lists, arrays
            or tensors; ``-inf`` forbids a candidate), in network order.
        macs: ``name -> MACs`` (int or :class:`LayerMacs`).
        w_candidates / a_candidates: Bit widths the log-probs index.
        budget: BitOPs allowed over these layers.
        min_bitops: BitOPs the policy must at least use (e.g.
            ``0.98 * budget``, so that policies compared at a budget all
            spend it). Defaults to 0.

    Returns:
        dict: ``name -> (w_bits, a_bits)`` in ``log_probs`` order. The
        argmax policy itself when it already fits.

    Raises:
        ValueError: If even the cheapest policy exceeds ``budget`` (the
            message states the smallest reachable BitOPs), or inputs
            disagree.
        RuntimeError: If the solver fails to prove an optimum.

    Example:
        >>> import math
        >>> log_probs = {'a': ([math.log(.1), math.log(.9)],   # w: 2, 4
        ...                    [math.log(.5), math.log(.5)]),  # a: 2, 4
        ...              'b': ([math.log(.4), math.log(.6)],
        ...                    [math.log(.9), math.log(.1)])}
        >>> macs = {'a': 100, 'b': 1000}
        >>> dict(best_policy_under_budget(log_probs, macs, (2, 4), (2, 4),
        ...                               budget=1e6))  # the argmax
        {'a': (4, 2), 'b': (4, 2)}
        >>> dict(best_policy_under_budget(log_probs, macs, (2, 4), (2, 4),
        ...                               budget=5000))  # 100*8 + 1000*4
        {'a': (4, 2), 'b': (2, 2)}
    """
    # scipy is imported here, not at the top: it costs seconds, and only
    # the budget solver needs it.
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    w_cands = check_candidates(w_candidates, where='w_candidates')
    a_cands = check_candidates(a_candidates, where='a_candidates')
    budget = float(budget)
    if not np.isfinite(budget) or budget < 0:
        raise ValueError(f'budget must be a finite non-negative number of '
                         f'BitOPs, got {budget!r}')
    names = list(log_probs)
    if not names:
        raise ValueError('no layers given')

    # Per layer: score and cost of every allowed (i, j) pair.
    pairs = [(i, j) for i in range(len(w_cands)) for j in range(len(a_cands))]
    scores, costs, allowed = [], [], []
    for name in names:
        logp_w, logp_a = log_probs[name]
        lw = _as_array(logp_w, name, 'weight', len(w_cands))
        la = _as_array(logp_a, name, 'activation', len(a_cands))
        layer_macs = _macs_int(macs, name)
        ok = [(i, j) for i, j in pairs
              if np.isfinite(lw[i]) and np.isfinite(la[j])]
        if not ok:
            raise ValueError(f'layer {name!r}: every candidate has '
                             f'probability zero')
        allowed.append(ok)
        scores.append([lw[i] + la[j] for i, j in ok])
        costs.append([layer_macs * w_cands[i] * a_cands[j] for i, j in ok])

    # Shortcut: the argmax policy is the unconstrained optimum.
    argmax = [ok[int(np.argmax(s))] for ok, s in zip(allowed, scores)]
    argmax_cost = sum(c[ok.index(p)]
                      for ok, c, p in zip(allowed, costs, argmax))
    min_bitops = float(min_bitops)
    if min_bitops > budget:
        raise ValueError(f'min_bitops {min_bitops:.0f} is above the budget '
                         f'{budget:.0f}')
    if min_bitops <= argmax_cost <= budget:
        return OrderedDict((name, (w_cands[i], a_cands[j]))
                           for name, (i, j) in zip(names, argmax))

    cheapest = sum(min(c) for c in costs)
    if cheapest > budget:
        raise ValueError(
            f'BitOPs budget {human_units(budget)} ({budget:.0f}) is below '
            f'the smallest reachable {human_units(cheapest)} ({cheapest}) '
            f'BitOPs of these {len(names)} layers (every layer at its '
            f'cheapest allowed bits)')

    dearest = sum(max(c) for c in costs)
    if dearest < min_bitops:
        raise ValueError(
            f'min_bitops {min_bitops:.0f} is above the largest reachable '
            f'{human_units(dearest)} ({dearest}) BitOPs of these '
            f'{len(names)} layers (every layer at its dearest allowed bits)')

    # 0/1 program: x[l, p] = 1 iff layer l takes pair p.
    offsets = np.cumsum([0] + [len(ok) for ok in allowed])
    n_vars = int(offsets[-1])
    objective = -np.concatenate([np.asarray(s) for s in scores])
    flat_costs = np.concatenate(
        [np.asarray(c, dtype=np.float64) for c in costs])
    one_hot = lil_matrix((len(names), n_vars))
    for row in range(len(names)):
        one_hot[row, offsets[row]:offsets[row + 1]] = 1.0
    # Costs are scaled by the budget so the row is O(1) for the solver's
    # absolute feasibility tolerance; feasibility is re-checked exactly below.
    scale = budget if budget > 0 else 1.0
    rhs = budget / scale
    for _ in range(5):
        result = milp(
            objective,
            integrality=np.ones(n_vars),
            bounds=Bounds(0, 1),
            constraints=[
                LinearConstraint(one_hot.tocsr(), 1, 1),
                LinearConstraint(
                    flat_costs[None, :] / scale,
                    min_bitops / scale if min_bitops > 0 else -np.inf, rhs)
            ],
            options={'mip_rel_gap': 0.0})
        if not result.success or result.x is None:
            raise RuntimeError(f'budget MILP failed: {result.message}')
        choice = [
            allowed[row][int(
                np.argmax(result.x[offsets[row]:offsets[row + 1]]))]
            for row in range(len(names))
        ]
        policy = OrderedDict((name, (w_cands[i], a_cands[j]))
                             for name, (i, j) in zip(names, choice))
        cost = policy_cost(macs, policy)
        if cost <= budget:
            if cost < min_bitops:
                raise RuntimeError(
                    f'budget MILP returned {cost} BitOPs, below min_bitops '
                    f'{min_bitops:.0f}')
            return policy
        # Within the solver's tolerance but over in exact arithmetic:
        # tighten the right-hand side by the overshoot and solve again.
        rhs -= max((cost - budget) / scale * 1.01, 1e-6)
    raise RuntimeError(f'budget MILP kept returning policies over the budget '
                       f'({cost} > {budget:.0f} BitOPs)')


def random_policy_near_budget(macs: Mapping,
                              w_candidates: Sequence[int],
                              a_candidates: Sequence[int],
                              budget: float,
                              seed: int,
                              tolerance: float = 0.02,
                              mix_steps: int = 50) -> Dict[str, Bits]:
    """A random policy over the whole candidate space with
    ``(1 - tolerance) * budget <= BitOPs <= budget``.

    Every layer starts at a uniformly drawn (w, a) pair. A random walk then
    changes one layer at a time to a uniformly drawn pair, keeping only the
    changes that bring the cost closer to the band, until it is in the band;
    then ``mix_steps`` moves per layer that stay in the band spread the
    policy over the band (so it is not the first policy the walk met).

    Args:
        macs: ``name -> MACs``, in network order (the policy's order).
        w_candidates / a_candidates: Bit widths to draw from.
        budget: BitOPs allowed over these layers.
        seed: Seed of the draw (same seed, same policy).
        tolerance: Width of the band below ``budget``, as a fraction.
        mix_steps: In-band moves per layer after the band is reached.

    Returns:
        dict: ``name -> (w_bits, a_bits)``.
    """
    w_cands = check_candidates(w_candidates, where='w_candidates')
    a_cands = check_candidates(a_candidates, where='a_candidates')
    if not 0 < tolerance < 1:
        raise ValueError(f'tolerance must be in (0, 1), got {tolerance}')
    names = list(macs)
    if not names:
        raise ValueError('no layers given')
    layer_macs = np.array([_macs_int(macs, n) for n in names], dtype=np.int64)
    pairs = [(w, a) for w in w_cands for a in a_cands]
    pair_bits = np.array([w * a for w, a in pairs], dtype=np.int64)
    low, high = (1 - tolerance) * float(budget), float(budget)
    cheapest = int(layer_macs.sum() * pair_bits.min())
    dearest = int(layer_macs.sum() * pair_bits.max())
    if cheapest > high or dearest < low:
        raise ValueError(
            f'no policy of these {len(names)} layers has BitOPs in '
            f'[{low:.0f}, {high:.0f}]: they range over [{cheapest}, '
            f'{dearest}]')
    rng = np.random.RandomState(seed)

    def gap(c):
        return max(low - c, c - high, 0.0)

    # Greedy walks can get stuck a coarse step away from a narrow band:
    # start again from a fresh uniform draw then.
    for _ in range(100):
        choice = rng.randint(len(pairs), size=len(names))
        cost = int((layer_macs * pair_bits[choice]).sum())
        for _ in range(200 * len(names)):
            if gap(cost) == 0:
                break
            layer, pair = rng.randint(len(names)), rng.randint(len(pairs))
            new = cost + int(layer_macs[layer] *
                             (pair_bits[pair] - pair_bits[choice[layer]]))
            if gap(new) < gap(cost):
                choice[layer], cost = pair, new
        if gap(cost) == 0:
            break
    else:
        raise RuntimeError(f'random walks did not reach BitOPs in '
                           f'[{low:.0f}, {high:.0f}] (last at {cost})')
    for _ in range(mix_steps * len(names)):
        layer, pair = rng.randint(len(names)), rng.randint(len(pairs))
        new = cost + int(layer_macs[layer] *
                         (pair_bits[pair] - pair_bits[choice[layer]]))
        if gap(new) == 0:
            choice[layer], cost = pair, new
    policy = OrderedDict(
        (name, pairs[int(c)]) for name, c in zip(names, choice))
    assert policy_cost(macs, policy) == cost
    return policy
