"""A fast subset of the precision benchmark (benchmarks/precision.py): LLCMonitor on an ordinary regression run, its
late estimates against long references at the same weights and settings.

The full benchmark (seven runs, references of 2 × 4 chains × 2000 draws, the monitor with no arguments) is a script,
not a test; this checks that the pipeline works end to end, that the late points sit near their references, and
that their intervals cover them. The monitor runs on a fixed schedule (every 300 steps): the default schedule sizes
and places its estimates by the wall-clock budget, so its late points, and whether they are covered, depend on the
machine's speed.
"""

import argparse

import pytest

from benchmarks.precision import benchmark


@pytest.mark.slow
def test_late_estimates_of_a_regression_run_sit_near_their_long_references():
    args = argparse.Namespace(
        monitor={"every_n_steps": 300}, max_points=3, reference_chains=4, reference_draws=600, reference_burnin=300, tilted=False,
        groups=False,
    )  # fmt: skip
    result = benchmark("regression", 0, args)
    points = result["points"]
    assert result["estimates"] >= 6 and len(points) >= 2
    assert all(point["healthy"] for point in points)
    assert all(point["relaxed_share"] > 0.9 for point in points), "warm-started chains relax within the run"
    assert sorted(point["error"] for point in points)[len(points) // 2] < 0.15
    assert sum(point["covered"] for point in points) >= len(points) - 1
