"""A real staged run: a deep linear network learns a rank-3 teacher mode by mode while LLCMonitor watches.

Uses the stage-wise example's model and data (8-8-8 network, init 1e-5, SGD, singular values 4, 2, 1). Each loss
drop must fall inside a reported transition (between an onset and its end, give or take 300 steps), with at most
one alarm elsewhere; then the converged network, fine-tuned with a small learning rate, must raise no alarm.
"""

import warnings

import lightning.pytorch as pl
import pytest
from torch.utils.data import DataLoader

from examples.dln_stagewise import DeepLinearNetwork, LossAtEstimates, teacher_data
from lightning_devinterp import LLCMonitor, TransitionWarning

MONITOR = dict(every_n_steps=100, num_chains=4, num_draws=100, num_burnin_steps=50, epsilon=1e-4, gamma=300.0)


def loss_drops(losses: dict[int, float], window: int = 50, lag: int = 300) -> list[int]:
    """First step of each stretch where the windowed loss is below 60% of its value ``lag`` steps earlier."""
    steps = sorted(losses)
    smoothed = {
        s: sum(losses[t] for t in range(s - window + 1, s + 1)) / window for s in steps if s - window + 1 in losses
    }
    falling = [s for s in smoothed if s - lag in smoothed and smoothed[s] < 0.6 * smoothed[s - lag]]
    drops = []
    for step in falling:
        if not drops or step - drops[-1][-1] > lag:
            drops.append([step])
        else:
            drops[-1].append(step)
    return [stretch[0] for stretch in drops]


def fit(module, monitor, steps, tmp_path):
    recorder = LossAtEstimates()
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[monitor, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TransitionWarning)
        trainer.fit(module, DataLoader(teacher_data(), batch_size=100, shuffle=True))
    return recorder.losses


@pytest.mark.slow
def test_every_loss_drop_is_reported_and_a_converged_network_raises_no_alarm(tmp_path):
    pl.seed_everything(0)
    module = DeepLinearNetwork()
    monitor = LLCMonitor(**MONITOR)
    losses = fit(module, monitor, 5000, tmp_path)
    drops = loss_drops(losses)
    assert len(drops) == 3, drops  # the three modes, learnt one at a time

    onsets = [t for t in monitor.transitions if t.is_onset]
    ends = [t for t in monitor.transitions if not t.is_onset]
    intervals = [
        (onset.step, next((end.step for end in ends if end.step > onset.step), onset.step)) for onset in onsets
    ]
    for drop in drops:
        assert any(start - 300 <= drop <= stop + 300 for start, stop in intervals), (drop, intervals)
    unexplained = [start for start, stop in intervals if not any(start - 300 <= drop <= stop + 300 for drop in drops)]
    assert len(unexplained) <= 1, intervals

    module.lr = 1e-4
    fine_tuning = LLCMonitor(**MONITOR)
    fit(module, fine_tuning, 2000, tmp_path / "fine_tune")
    assert len(fine_tuning.history) == 21
    assert fine_tuning.transitions == []
