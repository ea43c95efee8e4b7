"""Robust statistics shared by the detectors: a spread and a line that a few outliers cannot pull."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import median


def robust_std(values: Sequence[float]) -> float:
    """1.4826 x the median absolute deviation: a standard deviation that outliers cannot inflate.

    Args:
        values: at least one number.
    """
    centre = median(values)
    return 1.4826 * median(abs(v - centre) for v in values)


def theil_sen(steps: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """The Theil-Sen line: the median pairwise slope and the median intercept for it.

    Args:
        steps: the x values, distinct.
        values: the y values.

    Returns:
        ``(slope, intercept)``; the slope is 0 for a single point.
    """
    slopes = [
        (values[j] - values[i]) / (steps[j] - steps[i]) for i in range(len(steps)) for j in range(i + 1, len(steps))
    ]
    slope = median(slopes) if slopes else 0.0
    return slope, median(v - slope * t for t, v in zip(steps, values))
