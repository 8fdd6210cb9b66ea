"""The study's conclusions in words: per block (a setting and a budget) and
across blocks, from the rows :func:`gmpq_mm.study.report.collect` builds.

Plain numpy; the test itself is :mod:`gmpq_mm.study.stats`.
"""
from typing import List

import numpy as np

from .stats import (binomial_tail, rank_among, rank_chance, rank_sum_chance,
                    stats)

__all__ = ['verdict', 'tops', 'ranks', 'METHOD_LABELS', 'SHORT']

METHOD_LABELS = dict(
    gmpq='GMPQ search (attribution on)',
    aw0='same search, aw = 0 (EdMIPS-style)',
    sensitivity='sensitivity allocation (training-free)')
SHORT = dict(gmpq='GMPQ', aw0='aw = 0', sensitivity='sensitivity')


def _gap_line(g: dict, other: dict, label: str) -> str:
    gap = g['mean'] - other['mean']
    wins = gap > max(g['std'], other['std'])
    return (f'- GMPQ - {label}: {gap:+.2f} points (stds {g["std"]:.2f} / '
            f'{other["std"]:.2f}): {"beats" if wins else "does NOT beat"} '
            'it by more than the spread')


def _rank_line(mean: float, means: List[float]) -> str:
    r, n = rank_among(mean, means), len(means)
    return (f"- GMPQ's rank among the {n} random policies' means: {r} of "
            f'{n + 1}; as one more random draw, rank {r} or better has '
            f'chance {r}/{n + 1} = {rank_chance(r, n):.2f}')


def verdict(block: dict) -> List[str]:
    """The gaps the study asks about, from the rows of one budget: GMPQ -
    random (with the spread), the headroom under the FP network, GMPQ's
    rank among the random policies, GMPQ - uniform, GMPQ - sensitivity,
    GMPQ - aw0, and each method's search seconds."""
    by = {r['kind']: r for r in block['rows']}
    g = stats(by['gmpq']['top1'])
    pool = by['random_pooled']
    rnd = stats(pool['top1'])
    unif = [
        r for r in block['rows'] if r['kind'] == 'uniform'
        and r['bitops'] is not None and r['bitops'] <= block['budget']
    ]
    lines = []
    if not g['n'] or not rnd['n']:
        return ['- gaps: not enough finished runs yet']
    means = pool['policy_means']
    means_range = float(np.ptp(means)) if len(means) > 1 else 0.0
    # the stricter bar: beyond the pooled std, GMPQ's own std AND the
    # range of the random policies' means (one random draw vs another)
    spread = max(rnd['std'], g['std'], means_range)
    gap = g['mean'] - rnd['mean']
    lines.append(
        f"- GMPQ - random: {gap:+.2f} points (random pooled std "
        f"{rnd['std']:.2f}, GMPQ std {g['std']:.2f}, range of the "
        f"{len(means)} random policies' means {means_range:.2f}): "
        f"{'beats' if gap > spread else 'does NOT beat'} random by more "
        f'than the largest of the three ({spread:.2f})')
    if block.get('fp_top1') is not None:
        # how far random sits below the FP network that every finetune
        # starts from: a policy can hardly win more than that
        head = block['fp_top1'] - rnd['mean']
        bar = block.get('headroom_bar')
        meets = '' if bar is None else \
            f" ({'meets' if head >= bar else 'BELOW'} the {bar:g}-point bar)"
        lines.append(f"- headroom: FP teacher {block['fp_top1']:.2f} - "
                     f"random mean {rnd['mean']:.2f} = {head:+.2f} points" +
                     meets)
    if means:
        above = sum(g['mean'] > m for m in means)
        lines.append(f'- GMPQ mean above {above} of the {len(means)} '
                     "random policies' means (best random policy "
                     f"{max(means):.2f})")
        lines.append(_rank_line(g['mean'], means))
    if unif:
        u = stats(unif[-1]['top1'])
        if u['n']:
            lines.append(_gap_line(g, u, unif[-1]['label']))
    for kind, label in (('sensitivity', 'sensitivity'),
                        ('aw0', 'aw0 (attribution on - off)')):
        other = stats(by[kind]['top1']) if kind in by else dict(n=0)
        if other['n']:
            lines.append(_gap_line(g, other, label))
    cost = [(SHORT[k], by[k]['seconds']) for k in METHOD_LABELS
            if k in by and by[k].get('seconds') is not None]
    if cost:
        lines.append('- search cost (wall seconds of the run, this '
                     'machine): ' + ', '.join(f'{name} {s:.0f} s'
                                              for name, s in cost))
    return lines


def _blocks(data: dict, method: str):
    """``(method's mean, random policies' means)`` of every block where
    the method and every random policy have finished."""
    for d in data.values():
        for block in d['blocks']:
            by = {r['kind']: r for r in block['rows']}
            randoms = [r for r in block['rows'] if r['kind'] == 'random']
            if method not in by or not by[method]['top1'] or not randoms \
                    or not all(r['top1'] for r in randoms):
                continue
            yield float(np.mean(by[method]['top1'])), [
                float(np.mean(r['top1'])) for r in randoms
            ]


def tops(data: dict) -> List[str]:
    """How often each method's mean tops every random policy's mean, and
    how likely that is by chance.

    If a method's policy were one more draw of the random policies
    (exchangeable with them), its mean would be the highest of the ``N + 1``
    with probability ``1 / (N + 1)`` in each block; the blocks are taken as
    independent, so ``X`` tops in ``Y`` blocks has the binomial tail
    ``P(>= X)``. Blocks with a missing run are left out.
    """
    lines = []
    for method, label in METHOD_LABELS.items():
        found = list(_blocks(data, method))
        if not found:
            continue
        wins = sum(all(m > r for r in rs) for m, rs in found)
        n_rand = len(found[-1][1])
        tail = binomial_tail(wins, len(found), 1.0 / (n_rand + 1))
        lines.append(
            f"- {label}: mean above all {n_rand} random policies' means in "
            f'{wins} of {len(found)} blocks; as one more random draw it '
            f'would do that in at least {wins} with probability {tail:.2g}')
    return lines


def ranks(data: dict) -> List[str]:
    """Each method's rank among the random policies' means per block, and
    the chance of so low a rank sum were it one more random draw
    (:func:`gmpq_mm.study.stats.rank_sum_chance`)."""
    lines = []
    for method, label in METHOD_LABELS.items():
        found = list(_blocks(data, method))
        if not found:
            continue
        rk = [rank_among(m, rs) for m, rs in found]
        sizes = [len(rs) for _, rs in found]
        every = float(np.prod([rank_chance(r, n) for r, n in zip(rk, sizes)]))
        lines.append(
            f'- {label}: ranks {rk} among {sizes[-1]} random policies + '
            f'itself in {len(rk)} blocks (sum {sum(rk)}); as one more '
            f'random draw, a rank sum of {sum(rk)} or less has probability '
            f'{rank_sum_chance(rk, sizes):.2g}, ranks this good in every '
            f'block {every:.2g}')
    return lines
