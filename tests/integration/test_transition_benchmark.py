"""A fast subset of the transitions benchmark (benchmarks/transitions): real recorded runs, scored by replay.

The full benchmark (336 runs, tuning and three held-out sets) is a script, not a test; this checks that the
pipeline works end to end and that the monitor's detection keeps its recall, its latency and its silence on staged
runs and controls (superposition's slow drop is reported within 150 steps of its start only with L(w*)).
"""

import pytest

from benchmarks.transitions.families import BUILDERS
from benchmarks.transitions.ground_truth import episodes
from benchmarks.transitions.record import record
from benchmarks.transitions.score import score_run


@pytest.mark.slow
@pytest.mark.parametrize(("family", "seed"), [("dln", 1), ("tms", 0), ("parity", 1), ("finetune", 1), ("digits", 1)])
def test_a_recorded_run_is_scored_against_its_loss_curve(family, seed, tmp_path):
    series = record(BUILDERS[family](seed), directory=tmp_path)
    assert len(series["minibatch_loss"]) == series["steps"] and series["llc"]
    score = score_run(series)
    if family in ("dln", "tms", "parity"):
        assert episodes(series["full_loss"]), "the staged run should have a ground-truth drop"
        assert score.found == score.episodes and score.false == 0
        assert max(score.latencies) <= 150
    else:
        assert score.reports == 0
    assert score.impossible == 0
