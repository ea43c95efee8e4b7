"""The flagship example end to end: the toy model of superposition goes through two stages, and each is reported
(the first with an onset when the loss on the training set falls below its plateau at an estimate, within one
estimation interval of the fall's start, and an end with λ̂ now; the second, a slower fall, with an onset and an
end once the pentagon has formed, with λ̂ before and after), nothing else is; the full run the README shows."""

import warnings

import pytest

from examples.tms import describe_columns, train
from lightning_devinterp import TransitionWarning

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

    onset, end, second_onset, second_end = monitor.transitions
    assert onset.is_onset and FIRST_DROP[0] <= onset.step <= FIRST_DROP[0] + 100 and onset.evidence == "loss drop"
    assert onset.metric == "llc/init_loss" and onset.direction == "down" and onset.before > onset.after
    assert not end.is_onset and end.metric == "llc/init_loss" and end.step < SECOND_DROP[0]
    assert end.after == pytest.approx(losses[end.step], rel=1e-4) and end.after < 0.017
    # Every estimate before the onset was negative and unhealthy (a saddle): no λ̂ before, λ̂ now instead.
    assert all(not estimate.healthy for estimate in monitor.history if estimate.step <= onset.step)
    assert f"λ̂ now {llc[end.step]:.4g}, with no healthy estimate before the onset" in end.reason

    assert second_onset.is_onset and SECOND_DROP[0] <= second_onset.step <= SECOND_DROP[1]
    assert not second_end.is_onset and second_onset.step < second_end.step <= SECOND_DROP[1]
    assert describe_columns(record.weights[second_end.step]).startswith("5 columns")
    assert second_end.metric == "llc/mean" and second_end.before < second_end.after
