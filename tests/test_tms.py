"""The flagship example end to end: the toy model of superposition goes through two transitions and the first
climb of λ̂ is reported while the loss drops, with no alarm outside the drops (the full run the README shows)."""

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
        monitor, record, _ = train(steps=3000, every=50, chains=32, draws=400, log_dir=str(tmp_path))

    losses = record.losses
    assert losses[0] > 0.045 and losses[FIRST_DROP[1]] < 0.017 < losses[FIRST_DROP[0]]
    assert losses[SECOND_DROP[0]] > 0.014 and losses[3000] < 0.012
    assert describe_columns(record.weights[1000]).startswith("4 columns")  # the plateau between the drops
    assert describe_columns(record.weights[3000]).startswith("5 columns")

    llc = {estimate.step: estimate.llc_mean for estimate in monitor.history}
    assert llc[0] < 0 and 3.0 < llc[FIRST_DROP[1]] < llc[3000]

    onsets = [t.step for t in monitor.transitions if t.is_onset]
    assert any(FIRST_DROP[0] <= step <= FIRST_DROP[1] for step in onsets), monitor.transitions
    assert all(FIRST_DROP[0] <= step <= FIRST_DROP[1] or SECOND_DROP[0] <= step <= SECOND_DROP[1] for step in onsets)
