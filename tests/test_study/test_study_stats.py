"""The study's rank test and verdict lines, against hand-computed values."""
import itertools

import pytest

from gmpq_mm.study.stats import (binomial_tail, rank_among, rank_chance,
                                 rank_sum_chance)
from gmpq_mm.study.verdict import ranks, verdict


def test_rank_among_counts_ties_against_the_method():
    assert rank_among(90.0, [80.0, 85.0]) == 1
    assert rank_among(84.0, [80.0, 85.0, 86.0]) == 3
    # a tie ranks the other one above
    assert rank_among(85.0, [85.0, 80.0]) == 2
    assert rank_among(70.0, []) == 1
    assert rank_chance(3, 10) == pytest.approx(3 / 11)


@pytest.mark.parametrize('ranks_,sizes', [([1], [10]), ([1, 1], [10, 10]),
                                          ([2, 5, 1], [10, 10, 10]),
                                          ([3, 2], [4, 6]),
                                          ([11, 11], [10, 10])])
def test_rank_sum_chance_by_enumeration(ranks_, sizes):
    # every combination of ranks, each equally likely
    combos = list(itertools.product(*[range(1, n + 2) for n in sizes]))
    low = sum(sum(c) <= sum(ranks_) for c in combos)
    assert rank_sum_chance(ranks_, sizes) == pytest.approx(low / len(combos))


def test_rank_sum_chance_by_hand():
    # rank 1 of 11 in both of two blocks: 1 / 121
    assert rank_sum_chance([1, 1], [10, 10]) == pytest.approx(1 / 121)
    # sum 3 over two blocks of 11: (1,1), (1,2), (2,1) -> 3 / 121
    assert rank_sum_chance([2, 1], [10, 10]) == pytest.approx(3 / 121)
    assert rank_sum_chance([11, 11], [10, 10]) == pytest.approx(1.0)


def test_binomial_tail_by_hand():
    # 2 of 4 with p = 1/6: 1 - (5/6)^4 - 4 (1/6) (5/6)^3
    p = 1 / 6
    assert binomial_tail(2, 4, p) == pytest.approx(1 - (5 / 6)**4 - 4 * p *
                                                   (5 / 6)**3)
    assert binomial_tail(0, 3, 0.3) == pytest.approx(1.0)


def _block(gmpq, randoms, **rows):
    out = [dict(kind='gmpq', top1=gmpq, bitops=99, seconds=120.0)]
    out += [
        dict(kind=k, top1=v, bitops=99, seconds=s)
        for k, (v, s) in rows.items()
    ]
    means = [sum(r) / len(r) for r in randoms]
    out.append(
        dict(
            kind='random_pooled',
            top1=[v for r in randoms for v in r],
            policy_means=means,
            bitops=None))
    out += [dict(kind='random', top1=r, bitops=98) for r in randoms]
    return dict(budget=100, rows=out)


def test_verdict_states_sensitivity_aw0_rank_and_seconds():
    randoms = [[80.0, 82.0], [84.0, 84.0], [86.0, 88.0]]
    block = _block([85.0, 87.0],
                   randoms,
                   sensitivity=([83.0, 83.0], 4.2),
                   aw0=([86.0, 86.0], 118.0))
    block.update(fp_top1=90.0, headroom_bar=3.0)
    lines = '\n'.join(verdict(block))
    # GMPQ 86; sensitivity 83 (stds 1.41 / 0): +3.00 > 1.41
    assert '- GMPQ - sensitivity: +3.00 points (stds 1.41 / 0.00): beats ' \
        'it by more than the spread' in lines
    assert '- GMPQ - aw0 (attribution on - off): +0.00 points (stds 1.41 / ' \
        '0.00): does NOT beat it by more than the spread' in lines
    # random means 81, 84, 87: GMPQ 86 is second of four
    assert "- GMPQ's rank among the 3 random policies' means: 2 of 4; as " \
        'one more random draw, rank 2 or better has chance 2/4 = 0.50' \
        in lines
    # pooled random mean 84: 90 - 84 = 6 >= 3
    assert '= +6.00 points (meets the 3-point bar)' in lines
    assert '- search cost (wall seconds of the run, this machine): GMPQ ' \
        '120 s, aw = 0 118 s, sensitivity 4 s' in lines
    block['fp_top1'] = 86.0
    assert '= +2.00 points (BELOW the 3-point bar)' in '\n'.join(
        verdict(block))


def test_ranks_across_blocks():
    randoms = [[80.0], [84.0], [87.0]]
    data = dict(
        small_to_large=dict(blocks=[
            _block([90.0], randoms, sensitivity=([85.0], 1.0)),
            _block([86.0], randoms, sensitivity=([70.0], 1.0)),
        ]))
    gmpq, sens = ranks(data)
    # GMPQ ranks 1 and 2 of 4: sums <= 3 of 16 pairs: (1,1), (1,2), (2,1)
    assert gmpq.startswith('- GMPQ search (attribution on): ranks [1, 2] '
                           'among 3 random policies + itself in 2 blocks '
                           '(sum 3); as one more random draw, a rank sum of '
                           '3 or less has probability 0.19, ranks this good '
                           'in every block 0.12')
    # sensitivity ranks 2 and 4: only (3,4), (4,3), (4,4) sum above 6, so
    # P(sum <= 6) = 13 / 16; both ranks this good: 2/4 x 4/4
    assert '(sum 6)' in sens and 'probability 0.81' in sens
    assert sens.endswith('in every block 0.5')
