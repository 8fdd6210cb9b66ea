# Copyright (c) gmpq_mm contributors. All rights reserved.
"""Read a time ratio from interleaved benchmark rounds, or refuse to.

The benchmark tools time a variant and the full-precision (FP) baseline in
the same process, round by round, and divide per round. On a shared
machine the rounds disagree when the load changes under them; a median of
such rounds can land anywhere, even below 1.0 for a step that does
strictly more work than FP. :func:`summarize_ratio` therefore reports the
spread of the per-round ratios and says, in words, when it is too wide to
read a ratio from, or when the ratio is not plausible.

Pure Python (no torch): the tools import it before their heavy imports.
"""
import os
import statistics
from typing import List, NamedTuple, Optional, Sequence

__all__ = ['RatioSummary', 'summarize_ratio', 'load_average']

# The widest relative min-max spread of the per-round ratios that still
# reads as one ratio: (max - min) / median.
MAX_SPREAD = 0.25
MIN_ROUNDS = 3


class RatioSummary(NamedTuple):
    """Per-round ratios of a variant's step time to the baseline's."""
    median: float
    low: float  # smallest per-round ratio
    high: float  # largest per-round ratio
    spread: float  # (high - low) / median
    rounds: int
    warnings: List[str]

    @property
    def readable(self) -> bool:
        """Whether the ratio can be read (no warning was raised)."""
        return not self.warnings

    def format(self) -> str:
        """``x1.52 [1.48-1.57]``, with ``NOISY`` when it cannot be read."""
        text = f'x{self.median:.2f} [{self.low:.2f}-{self.high:.2f}]'
        return text if self.readable else text + ' NOISY'


def summarize_ratio(times: Sequence[float],
                    base_times: Sequence[float],
                    max_spread: float = MAX_SPREAD,
                    min_rounds: int = MIN_ROUNDS,
                    at_least: Optional[float] = 1.0,
                    what: str = 'time') -> RatioSummary:
    """Median, range and warnings of the per-round ratios ``t / t_base``.

    Args:
        times (Sequence[float]): The variant's time in each round.
        base_times (Sequence[float]): The baseline's time in the same
            rounds (same length).
        max_spread (float): The widest ``(max - min) / median`` of the
            per-round ratios that is still read as one ratio.
        min_rounds (int): Fewer rounds give no spread worth the name.
        at_least (float, optional): The smallest plausible ratio (1.0 for a
            step that does more work than the baseline); ``None``: any.
        what (str): The quantity, for the warnings (``'wall time'``).

    Returns:
        RatioSummary: ``warnings`` says why the ratio cannot be read; empty
        when it can.

    Raises:
        ValueError: If the lists differ in length, are empty, or hold a time
            that is not positive.
    """
    if len(times) != len(base_times):
        raise ValueError(f'{what}: {len(times)} rounds of the variant but '
                         f'{len(base_times)} of the baseline')
    if not times:
        raise ValueError(f'{what}: no timed rounds')
    if min(min(times), min(base_times)) <= 0:
        raise ValueError(f'{what}: a round took no time; the clock cannot '
                         'time these steps')
    ratios = [t / b for t, b in zip(times, base_times)]
    median = statistics.median(ratios)
    low, high = min(ratios), max(ratios)
    spread = (high - low) / median
    warnings = []
    if len(ratios) < min_rounds:
        warnings.append(f'{what}: only {len(ratios)} round(s); run at least '
                        f'{min_rounds} to see the spread')
    if spread > max_spread:
        warnings.append(
            f'{what}: the rounds disagree (ratios {low:.2f}..{high:.2f}, '
            f'spread {spread:.0%} of the median > {max_spread:.0%}); the '
            'machine load changed under the rounds: rerun on a quiet '
            'machine or with more rounds')
    if at_least is not None and median < at_least:
        warnings.append(
            f'{what}: ratio {median:.2f} < {at_least:.2f} is not plausible '
            '(the step does more work than the baseline); the rounds were '
            'disturbed')
    return RatioSummary(median, low, high, spread, len(ratios), warnings)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages as text (``'n/a'`` if the
    system has none)."""
    try:
        return ', '.join(f'{x:.2f}' for x in os.getloadavg())
    except (AttributeError, OSError):
        return 'n/a'
