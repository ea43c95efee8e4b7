"""The flagship example end to end: the toy model of superposition goes through two transitions, and each climb
of λ̂ is reported while its loss drop unfolds, with no alarm outside the drops (the full run the README shows)."""

import sys
import warnings
from pathlib import Path

from lightning_devinterp import TransitionWarning

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from tms import describe_columns, train  # noqa: E402

FIRST_DROP = (250, 700)
SECOND_DROP = (1200, 2100)


def test_two_transitions_of_the_toy_model_of_superposition(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TransitionWarning)
        monitor, record, _ = train(steps=3000, every=50, chains=64, draws=800, log_dir=str(tmp_path))

    losses = record.losses
    assert losses[0] > 0.045 and losses[FIRST_DROP[1]] < 0.017 < losses[FIRST_DROP[0]]
    assert losses[SECOND_DROP[0]] > 0.014 and losses[3000] < 0.012
    assert describe_columns(record.weights[1000]).startswith("4 columns")  # the plateau between the drops
    assert describe_columns(record.weights[3000]).startswith("5 columns")

    llc = {estimate.step: estimate.llc_mean for estimate in monitor.history}
    assert llc[0] < 0 and 3.0 < llc[FIRST_DROP[1]] < llc[3000]

    onsets = [(t.step, t.direction) for t in monitor.transitions if t.is_onset]
    assert [(low <= step <= high, direction) for (step, direction), (low, high) in zip(onsets, (FIRST_DROP, SECOND_DROP))] == [
        (True, "up"),
        (True, "up"),
    ], monitor.transitions
    assert len(onsets) == 2, monitor.transitions
