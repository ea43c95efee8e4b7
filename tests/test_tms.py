"""The flagship example end to end: the toy model of superposition goes through two stages; the sudden first one
is reported (an onset when the loss falls after its plateau, an end with λ̂ before and after), nothing else is
(the second stage is a slow ramp, by the benchmark's rule not a sudden transition); the full run the README shows."""

import sys
import warnings
from pathlib import Path

import pytest

from lightning_devinterp import TransitionWarning

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from tms import describe_columns, train  # noqa: E402

FIRST_DROP = (250, 700)
SECOND_DROP = (1200, 2100)


@pytest.mark.slow
def test_two_stages_of_the_toy_model_of_superposition(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TransitionWarning)
        monitor, record, _ = train(steps=3000, every=50, chains=64, draws=800, log_dir=str(tmp_path))

    losses = record.losses
    assert losses[0] > 0.045 and losses[FIRST_DROP[1]] < 0.017 < losses[FIRST_DROP[0]]
    assert losses[SECOND_DROP[0]] > 0.014 and losses[3000] < 0.012
    assert describe_columns(record.weights[1000]).startswith("4 columns")  # the plateau between the drops
    assert describe_columns(record.weights[3000]).startswith("5 columns")

    llc = {estimate.step: estimate.llc_mean for estimate in monitor.history}
    assert llc[0] < 0 and 3.0 < llc[FIRST_DROP[1]] < llc[SECOND_DROP[0]] < llc[3000]

    onset, end = monitor.transitions
    assert onset.is_onset and FIRST_DROP[0] <= onset.step <= FIRST_DROP[1] and onset.evidence == "loss drop"
    assert onset.direction == "down" and onset.before > onset.after
    assert not end.is_onset and end.evidence == "both" and end.direction == "up" and end.metric == "llc/mean"
    assert end.step < SECOND_DROP[0] and end.after > end.before
