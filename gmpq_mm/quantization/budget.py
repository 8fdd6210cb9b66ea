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

from .complexity import LayerMacs, human_units
from .layers import is_mixed_layer
from .quantizers import check_candidates

__all__ = ['best_policy_under_budget', 'log_probs_from_model', 'policy_cost']

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
                             macs: Mapping, w_candidates: Sequence[int],
                             a_candidates: Sequence[int],
                             budget: float) -> Dict[str, Bits]:
    """Exact most-likely policy with ``BitOPs <= budget``.

    Args:
        log_probs: ``name -> (logp_w [K_w], logp_a [K_a])`` (lists, arrays
            or tensors; ``-inf`` forbids a candidate), in network order.
        macs: ``name -> MACs`` (int or :class:`LayerMacs`).
        w_candidates / a_candidates: Bit widths the log-probs index.
        budget: BitOPs allowed over these layers.

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
    if argmax_cost <= budget:
        return OrderedDict((name, (w_cands[i], a_cands[j]))
                           for name, (i, j) in zip(names, argmax))

    cheapest = sum(min(c) for c in costs)
    if cheapest > budget:
        raise ValueError(
            f'BitOPs budget {human_units(budget)} ({budget:.0f}) is below '
            f'the smallest reachable {human_units(cheapest)} ({cheapest}) '
            f'BitOPs of these {len(names)} layers (every layer at its '
            f'cheapest allowed bits)')

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
                LinearConstraint(flat_costs[None, :] / scale, -np.inf, rhs)
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
            return policy
        # Within the solver's tolerance but over in exact arithmetic:
        # tighten the right-hand side by the overshoot and solve again.
        rhs -= max((cost - budget) / scale * 1.01, 1e-6)
    raise RuntimeError(f'budget MILP kept returning policies over the budget '
                       f'({cost} > {budget:.0f} BitOPs)')
