"""The ratio reading of the benchmark tools, on made-up timings."""
import pytest

from gmpq_mm.utils.timing import load_average, summarize_ratio


def test_steady_rounds_read_as_one_ratio():
    fp = [1.0, 2.0, 1.0, 1.0, 4.0]  # the load changed, the ratio did not
    search = [1.5, 3.0, 1.5, 1.5, 6.0]
    s = summarize_ratio(search, fp)
    assert s.median == pytest.approx(1.5)
    assert (s.low, s.high) == (pytest.approx(1.5), pytest.approx(1.5))
    assert s.spread == pytest.approx(0.0)
    assert s.readable and s.warnings == []
    assert s.format() == 'x1.50 [1.50-1.50]'


def test_median_and_range_by_hand():
    # ratios 1.4, 1.5, 1.6, 1.5, 1.45 -> median 1.5, spread 0.2 / 1.5
    s = summarize_ratio([1.4, 3.0, 1.6, 1.5, 2.9], [1, 2, 1, 1, 2])
    assert s.median == pytest.approx(1.5)
    assert s.low == pytest.approx(1.4) and s.high == pytest.approx(1.6)
    assert s.spread == pytest.approx(0.2 / 1.5)
    assert s.readable and s.rounds == 5


def test_wide_spread_is_flagged():
    # One round ran while something else took the cores from the FP step.
    s = summarize_ratio([1.5, 1.5, 1.5, 1.5, 1.5], [1.0, 1.0, 0.6, 1.0, 1.0])
    assert s.high == pytest.approx(2.5)
    assert not s.readable
    assert 'rounds disagree' in s.warnings[0]
    assert s.format().endswith('NOISY')
    # A looser limit reads the same rounds.
    assert summarize_ratio(
        [1.5] * 5, [1.0, 1.0, 0.6, 1.0, 1.0], max_spread=1.0).readable


def test_implausible_ratio_below_one_is_never_silent():
    # Tight rounds, but below 1.0: the FP rounds were slowed by other work.
    s = summarize_ratio([1.0, 1.0, 1.0], [1.1, 1.1, 1.12])
    assert s.spread < 0.05
    assert not s.readable
    assert any('not plausible' in w for w in s.warnings)
    assert 'NOISY' in s.format()
    # A comparison where faster is possible can switch the check off.
    assert summarize_ratio([1.0] * 3, [1.1, 1.1, 1.12], at_least=None).readable


def test_too_few_rounds_are_flagged():
    s = summarize_ratio([1.5, 1.5], [1.0, 1.0])
    assert not s.readable
    assert 'only 2 round(s)' in s.warnings[0]


@pytest.mark.parametrize('times,base,match', [
    ([1.0, 2.0], [1.0], 'rounds of the variant'),
    ([], [], 'no timed rounds'),
    ([1.0, 0.0, 1.0], [1.0, 1.0, 1.0], 'took no time'),
])
def test_bad_timings_are_refused(times, base, match):
    with pytest.raises(ValueError, match=match):
        summarize_ratio(times, base)


def test_load_average_text():
    text = load_average()
    assert text == 'n/a' or len(text.split(', ')) == 3
