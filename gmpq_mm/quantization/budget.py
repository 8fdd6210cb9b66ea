"""The most likely bit policy that fits a BitOPs budget.

The released GMPQ code has no budget: users tune the complexity weight ``cd``
until the argmax policy lands near the BitOPs they want. Here the search's
architecture distribution is read as a score instead: each layer ``l`` picks
one (weight bits, activation bits) pair ``(i, j)`` and we solve, exactly,

    maximise   sum_l  log p_w,l[i] + log p_a,l[j]
    subject to sum_l  MACs_l * bw_i * ba_j <= budget

a multiple-choice knapsack, solved exactly by :func:`.solver.solve_policy`
(any per-layer-per-pair score, any number of linear budgets; this module
builds the log-prob scores and the BitOPs row). Greedy "lower the cheapest
layer" heuristics are not optimal for it; with about 50 layers x 16 pairs
the exact solve takes milliseconds.

Pure PyTorch / numpy / scipy: nothing from mmengine / mmpretrain is imported.
"""
import math
import numbers
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .bits import SUPPORTED_BITS, check_candidates
from .complexity import MB, LayerMacs, weight_size_bits
from .layers import is_mixed_layer
from .solver import BudgetError, Constraint, solve_policy

__all__ = [
    'best_policy_under_budget', 'bitops_constraint', 'size_constraint',
    'policy_size_mb', 'log_probs_from_model', 'policy_cost',
    'random_policy_near_budget', 'check_budget', 'check_tolerance',
    'BudgetError', 'Constraint', 'solve_policy'
]

Bits = Tuple[int, int]


def check_budget(value, field: str, example: str = '8.9e9'):
    """A budget read from a config: ``None`` or a positive finite number.

    Args:
        value: The configured value.
        field (str): Its config key (e.g. ``'model.target_bitops'``), named
            in the error.
        example (str): A valid value to show in the error.

    Returns:
        float | None: ``value`` as a float.

    Raises:
        BudgetError: One line naming ``field``, for a string, a list, a
            boolean (``True`` is not a budget of 1), NaN / inf, or a value
            that is not positive.

    Example:
        >>> check_budget(True, 'model.target_bitops')
        Traceback (most recent call last):
        ...
        gmpq_mm.quantization.solver.BudgetError: model.target_bitops must ...
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(float(value)) or value <= 0:
        raise BudgetError(f'{field} must be a positive number such as '
                          f'{example}, got {value!r} '
                          f'({type(value).__name__})')
    return float(value)


def check_tolerance(value, field: str, budget_field: str, budget):
    """A budget's tolerance: ``None``, or a number in ``[0, 1)`` set
    together with its budget (``budget_field``)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not 0 <= value < 1:
        raise BudgetError(f'{field} must be a number in [0, 1) such as '
                          f'0.02, got {value!r} ({type(value).__name__})')
    if budget is None:
        raise BudgetError(f'{field} needs {budget_field} (the budget it is '
                          f'a fraction of)')
    return float(value)


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
    w_cands = check_candidates(w_candidates, where='w_candidates')
    a_cands = check_candidates(a_candidates, where='a_candidates')
    if isinstance(budget, bool) or not isinstance(
            budget, numbers.Real) or (not np.isfinite(budget) or budget < 0):
        raise ValueError(f'budget must be a finite non-negative number of '
                         f'BitOPs, got {budget!r}')
    names = list(log_probs)
    if not names:
        raise ValueError('no layers given')
    scores = OrderedDict()
    for name in names:
        logp_w, logp_a = log_probs[name]
        lw = _as_array(logp_w, name, 'weight', len(w_cands))
        la = _as_array(logp_a, name, 'activation', len(a_cands))
        scores[name] = OrderedDict(((w, a), lw[i] + la[j])
                                   for i, w in enumerate(w_cands)
                                   for j, a in enumerate(a_cands))
    min_bitops = float(min_bitops)
    if min_bitops > budget:
        raise ValueError(f'min_bitops {min_bitops:.0f} is above the budget '
                         f'{float(budget):.0f}')
    return solve_policy(scores, [
        bitops_constraint(
            macs, scores, budget, floor=min_bitops if min_bitops > 0 else None)
    ])


def bitops_constraint(macs: Mapping,
                      layers: Sequence[str],
                      budget: float,
                      tolerance: Optional[float] = None,
                      floor: Optional[float] = None) -> Constraint:
    """The BitOPs budget of ``layers`` as a :class:`Constraint`.

    Args:
        macs: ``name -> MACs`` (int or :class:`LayerMacs`).
        layers: The searched layer names (e.g. the scores' keys).
        budget / tolerance / floor: As in :class:`Constraint`.

    Returns:
        Constraint: named ``'BitOPs'``, cost ``MACs * w_bits * a_bits`` of
        every supported pair (exact ints).
    """
    pairs = [(w, a) for w in SUPPORTED_BITS for a in SUPPORTED_BITS]
    costs = OrderedDict()
    for name in layers:
        layer_macs = _macs_int(macs, name)
        costs[name] = {(w, a): layer_macs * w * a for w, a in pairs}
    return Constraint(
        'BitOPs', costs, budget, tolerance=tolerance, floor=floor)


def policy_size_mb(fixed_bits: int, numels: Mapping, layers: Mapping) -> float:
    """Model size in MB (1e6 bytes) of ``name -> (w_bits, a_bits)``.

    ``fixed_bits`` and ``numels`` as :func:`.complexity.size_terms` returns
    them: everything but the layers' weights, and their weight counts.
    """
    bits = fixed_bits + sum(
        weight_size_bits(numels[name], int(w))
        for name, (w, _) in layers.items())
    return bits / 8 / MB


def size_constraint(fixed_bits: int,
                    numels: Mapping,
                    budget_mb: float,
                    tolerance: Optional[float] = None) -> Constraint:
    """A model-size budget (MB of 1e6 bytes) as a :class:`Constraint`.

    The cost of a layer at ``(w, a)`` is its weight packed at ``w`` bits
    (:func:`.complexity.weight_size_bits`); the row's budget is the size
    budget less ``fixed_bits`` (everything else at 32 bits), so the band
    ``[(1 - tolerance) * budget_mb, budget_mb]`` is on the whole model's
    size. Costs are exact ints (bits).

    Args:
        fixed_bits / numels: As :func:`.complexity.size_terms` returns them.
        budget_mb (float): The model size allowed.
        tolerance (float, optional): Width of the band below the budget.
    """
    budget_bits = budget_mb * 8 * MB
    floor = None if tolerance is None else (1 - tolerance) * budget_bits
    costs = OrderedDict((name, {
        (w, a): weight_size_bits(n, w)
        for w in SUPPORTED_BITS
        for a in SUPPORTED_BITS
    }) for name, n in numels.items())

    def fmt(bits):
        return f'{(bits + fixed_bits) / 8 / MB:.6g} MB'

    return Constraint(
        'size',
        costs,
        budget_bits - fixed_bits,
        floor=None if floor is None else floor - fixed_bits,
        fmt=fmt)


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
