"""The best bit policy under linear budgets: an exact multiple-choice knapsack.

Every layer ``l`` takes one (weight bits, activation bits) pair ``p`` out of
the pairs it allows. Given any score per layer and pair (a log-probability,
minus a sensitivity, ...) and any number of budgets whose cost is a sum over
layers (BitOPs, model size, ...), :func:`solve_policy` finds, exactly,

    maximise   sum_l score_l[p_l]
    subject to (1 - tol_k) * budget_k <= sum_l cost_k,l[p_l] <= budget_k

as a small 0/1 integer program (one binary per layer and pair, one equality
per layer, one row per budget) with ``scipy.optimize.milp``. The policy it
returns is re-checked against every budget in exact Python arithmetic (ints
stay ints), so a policy the solver's float tolerance let slip over a budget
is never returned. With about 50 layers x 16 pairs the solve takes
milliseconds.

Pure numpy / scipy: nothing from mmengine / mmpretrain is imported.
"""
import math
import numbers
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .bits import check_bits

__all__ = ['BudgetError', 'Constraint', 'solve_policy']

Bits = Tuple[int, int]


class BudgetError(ValueError):
    """A budget that is not a number, or that no policy can meet."""


def _default_fmt(value: float) -> str:
    from .complexity import human_units
    return f'{human_units(value)} ({value:.0f})'


def _check_number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BudgetError(f'{what} must be a number, got {value!r}')
    if not math.isfinite(float(value)):
        raise BudgetError(f'{what} must be finite, got {value!r}')
    return value


class Constraint:
    """One linear budget: ``sum_l costs[l][pair_l]`` within a band.

    Args:
        name (str): What the cost is (``'BitOPs'``, ``'size'``), used in
            error messages.
        costs: ``layer -> {(w_bits, a_bits): cost}``, every layer of the
            scores and every pair they allow (ints are kept exact).
        budget (float): The upper end of the band.
        tolerance (float, optional): The band is ``[(1 - tolerance) *
            budget, budget]``; ``None`` (default): no lower end.
        floor (float, optional): An explicit lower end instead of
            ``tolerance`` (give at most one of them).
        fmt (callable, optional): ``value -> str`` for error messages;
            default ``'1.20G (1200000000)'``.
    """

    def __init__(self,
                 name: str,
                 costs: Mapping[str, Mapping[Bits, float]],
                 budget: float,
                 tolerance: Optional[float] = None,
                 floor: Optional[float] = None,
                 fmt: Optional[Callable[[float], str]] = None):
        self.name = str(name)
        self.costs = costs
        self.budget = _check_number(budget, f'{self.name} budget')
        if tolerance is not None and floor is not None:
            raise BudgetError(f'{self.name}: give tolerance or floor, '
                              f'not both')
        if tolerance is not None:
            _check_number(tolerance, f'{self.name} tolerance')
            if not 0 <= tolerance <= 1:
                raise BudgetError(f'{self.name} tolerance must be in [0, 1], '
                                  f'got {tolerance!r}')
            floor = (1 - tolerance) * budget
        elif floor is not None:
            _check_number(floor, f'{self.name} floor')
            if floor > budget:
                raise BudgetError(
                    f'{self.name} floor {floor:.0f} is above the budget '
                    f'{budget:.0f}')
        self.floor = floor
        self.fmt = fmt or _default_fmt

    def __repr__(self) -> str:
        return (f'Constraint({self.name!r}, budget={self.budget!r}, '
                f'floor={self.floor!r})')

    def cost(self, policy: Mapping[str, Bits]):
        """Exact cost of ``name -> (w_bits, a_bits)``."""
        return sum(self.costs[name][tuple(bits)]
                   for name, bits in policy.items())

    def holds(self, cost) -> bool:
        """Whether ``cost`` lies in the band."""
        return cost <= self.budget and (self.floor is None
                                        or cost >= self.floor)

    def band(self) -> str:
        low = '-inf' if self.floor is None else self.fmt(self.floor)
        return f'{self.name} in [{low}, {self.fmt(self.budget)}]'


def _pair(key, layer: str) -> Bits:
    if not isinstance(key, (tuple, list)) or len(key) != 2:
        raise ValueError(f'layer {layer!r}: score keys must be (w_bits, '
                         f'a_bits) pairs, got {key!r}')
    return (check_bits(key[0], f'layer {layer!r}'),
            check_bits(key[1], f'layer {layer!r}'))


def _allowed(scores: Mapping) -> 'OrderedDict[str, Dict[Bits, float]]':
    """Per layer, the pairs with a finite score (``-inf`` forbids one)."""
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError('scores must be a non-empty dict layer -> '
                         '{(w_bits, a_bits): score}')
    out = OrderedDict()
    for layer, per_pair in scores.items():
        if not isinstance(per_pair, Mapping) or not per_pair:
            raise ValueError(f'layer {layer!r}: scores must be a non-empty '
                             f'dict (w_bits, a_bits) -> score')
        ok = OrderedDict()
        for key, value in per_pair.items():
            pair = _pair(key, layer)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or math.isnan(value) or value == math.inf):
                raise ValueError(f'layer {layer!r}: score of {pair} must be '
                                 f'a finite number or -inf, got {value!r}')
            if value != -math.inf:
                ok[pair] = float(value)
        if not ok:
            raise ValueError(f'layer {layer!r}: every pair is forbidden '
                             f'(score -inf)')
        out[layer] = ok
    return out


def _check_costs(con: Constraint, allowed: Mapping) -> None:
    extra = [name for name in con.costs if name not in allowed]
    if extra:
        raise ValueError(f'{con.name}: costs given for layer(s) {extra} '
                         f'that have no scores')
    for layer, pairs in allowed.items():
        if layer not in con.costs:
            raise ValueError(f'{con.name}: no costs for layer {layer!r}')
        for pair in pairs:
            if pair not in con.costs[layer]:
                raise ValueError(f'{con.name}: no cost for layer {layer!r} '
                                 f'at bits {pair}')
            _check_number(con.costs[layer][pair],
                          f'{con.name} cost of layer {layer!r} at {pair}')


def _check_reachable(con: Constraint, allowed: Mapping) -> None:
    per_layer = [[con.costs[n][p] for p in pairs]
                 for n, pairs in allowed.items()]
    cheapest = sum(min(c) for c in per_layer)
    dearest = sum(max(c) for c in per_layer)
    what = f'of these {len(per_layer)} layers'
    if cheapest > con.budget:
        raise BudgetError(
            f'{con.name} budget {con.fmt(con.budget)} is below the smallest '
            f'reachable {con.fmt(cheapest)} {what} (every layer at its '
            f'cheapest allowed bits)')
    if con.floor is not None and dearest < con.floor:
        raise BudgetError(
            f'{con.name} floor {con.fmt(con.floor)} is above the largest '
            f'reachable {con.fmt(dearest)} {what} (every layer at its '
            f'dearest allowed bits)')


def solve_policy(
        scores: Mapping[str, Mapping[Bits, float]],
        constraints: Sequence[Constraint] = (),
) -> 'OrderedDict[str, Bits]':
    """The policy of largest total score within every constraint's band.

    Args:
        scores: ``layer -> {(w_bits, a_bits): score}``, in network order.
            Any float per layer and pair (it need not split into a weight
            and an activation part); ``-inf`` forbids a pair, a missing pair
            is not a candidate of that layer. Ties go to the pair listed
            first.
        constraints: :class:`Constraint` objects, each with a cost for every
            layer and allowed pair; all must hold at once.

    Returns:
        OrderedDict: ``layer -> (w_bits, a_bits)`` in ``scores`` order, an
        exact optimum. The per-layer argmax when it already meets every
        constraint.

    Raises:
        BudgetError: If a constraint cannot be met by itself (the message
            names it and the smallest / largest reachable cost), or the
            constraints cannot be met together (a ``ValueError``).
        ValueError: If inputs disagree.
        RuntimeError: If the solver fails to prove an optimum.

    Example:
        >>> scores = {'a': {(2, 8): 0.0, (4, 8): 1.0},
        ...           'b': {(2, 8): 0.0, (4, 8): 2.0}}
        >>> size = Constraint('size', {'a': {(2, 8): 2, (4, 8): 4},
        ...                            'b': {(2, 8): 2, (4, 8): 4}}, 6)
        >>> dict(solve_policy(scores, [size]))  # b gains more from 4 bits
        {'a': (2, 8), 'b': (4, 8)}
    """
    allowed = _allowed(scores)
    constraints = list(constraints)
    for con in constraints:
        if not isinstance(con, Constraint):
            raise TypeError(f'constraints must be Constraint objects, got '
                            f'{con!r}')
        _check_costs(con, allowed)
    names = list(allowed)

    # max() keeps the first of equal scores.
    argmax = OrderedDict((n, max(p, key=p.get)) for n, p in allowed.items())
    if all(con.holds(con.cost(argmax)) for con in constraints):
        return argmax
    for con in constraints:
        _check_reachable(con, allowed)
    return _milp(allowed, names, constraints)


def _milp(allowed: Mapping, names: List[str],
          constraints: Sequence[Constraint]) -> 'OrderedDict[str, Bits]':
    # scipy is imported here, not at the top: it costs seconds, and only
    # the solver needs it.
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    pairs = [list(allowed[n]) for n in names]
    offsets = np.cumsum([0] + [len(p) for p in pairs])
    n_vars = int(offsets[-1])
    objective = -np.array(
        [allowed[n][p] for n, ps in zip(names, pairs) for p in ps])
    one_hot = lil_matrix((len(names), n_vars))
    for row in range(len(names)):
        one_hot[row, offsets[row]:offsets[row + 1]] = 1.0
    rows, lows, highs, scales = [], [], [], []
    for con in constraints:
        # Each row is scaled to O(1) for the solver's absolute feasibility
        # tolerance; feasibility is re-checked exactly below.
        scale = abs(float(con.budget)) or 1.0
        scales.append(scale)
        rows.append(
            np.array([
                float(con.costs[n][p]) for n, ps in zip(names, pairs)
                for p in ps
            ]) / scale)
        lows.append(-np.inf if con.floor is None else con.floor / scale)
        highs.append(con.budget / scale)

    for _ in range(6):
        linear = [LinearConstraint(one_hot.tocsr(), 1, 1)]
        if rows:
            linear.append(
                LinearConstraint(
                    np.stack(rows), np.array(lows), np.array(highs)))
        result = milp(
            objective,
            integrality=np.ones(n_vars),
            bounds=Bounds(0, 1),
            constraints=linear,
            options={'mip_rel_gap': 0.0})
        if result.status == 2:
            raise BudgetError('no policy meets all of ' +
                              ', '.join(con.band() for con in constraints) +
                              f' at once over these {len(names)} layers')
        if not result.success or result.x is None:
            raise RuntimeError(f'policy MILP failed: {result.message}')
        policy = OrderedDict(
            (n, ps[int(np.argmax(result.x[offsets[r]:offsets[r + 1]]))])
            for r, (n, ps) in enumerate(zip(names, pairs)))
        ok = True
        for k, con in enumerate(constraints):
            cost = con.cost(policy)
            # Within the solver's tolerance but outside the band in exact
            # arithmetic: tighten that side by the miss and solve again.
            if cost > con.budget:
                highs[k] -= max((cost - con.budget) / scales[k] * 1.01, 1e-6)
                ok = False
            elif con.floor is not None and cost < con.floor:
                lows[k] += max((con.floor - cost) / scales[k] * 1.01, 1e-6)
                ok = False
        if ok:
            return policy
    raise RuntimeError('policy MILP kept returning policies outside the '
                       'bands: ' + ', '.join(c.band() for c in constraints))
