"""LLCMonitor() with no arguments: a planned, budgeted curve at one adapted step size, in real fits."""

import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_devinterp import LLCEstimateWarning, LLCMonitor
from tests.helpers.models import gaussian_nll
from tests.helpers.trainers import AtMinimum, Regressor, make_trainer, regression_loader


def fit(tmp_path, module, monitor, steps):
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LLCEstimateWarning)
        trainer.fit(module, regression_loader())
    return trainer


class CountedWork(AtMinimum):
    """A machine of known speed: every call of the loss advances a clock, by 3 ms in a training step and by 0.3 ms in
    one of the monitor's evaluations (one vectorized step of all its chains, which run in eval mode), so what the
    budget affords is the same on every machine."""

    def __init__(self):
        super().__init__()
        self.seconds = 0.0

    def clock(self) -> float:
        return self.seconds

    def training_step(self, batch, batch_idx):
        self.seconds += 0.003 if self.training else 0.0003
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
def test_default_monitor_gives_a_curve_at_one_adapted_step(tmp_path):
    module = CountedWork()
    monitor = LLCMonitor(clock=module.clock)
    fit(tmp_path, module, monitor, 3000)
    steps = [record.step for record in monitor.history]
    assert len(steps) >= 20 and steps[0] > 0 and steps[-1] >= 2400  # no estimate at a random initialisation
    epsilons = {record.result.epsilon for record in monitor.history}
    assert len(epsilons) == 1 and not any(record.epsilon_changed for record in monitor.history)
    assert sum(record.healthy for record in monitor.history[2:]) >= 0.9 * len(monitor.history[2:])
    assert monitor.schedule.own_seconds == pytest.approx(sum(record.seconds for record in monitor.history))
    assert monitor.schedule.own_seconds <= 0.2 * 3000 * 0.003  # within the budget, stretched at most to twice 10%


class Sharpening(Regressor):
    """The loss is multiplied by 400 from step 12 on: the same minima, 400 times the curvature."""

    def training_step(self, batch, batch_idx):
        scale = 400.0 if self.global_step >= 12 else 1.0
        return scale * gaussian_nll(self.net, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-6)


def test_the_step_is_readapted_when_the_landscape_sharpens_and_the_detector_is_told(tmp_path):
    monitor = LLCMonitor(every_n_steps=5, num_chains=4, num_draws=30, num_burnin_steps=20)
    fit(tmp_path, Sharpening(), monitor, 20)
    by_step = {record.step: record for record in monitor.history}
    assert not by_step[10].epsilon_changed
    changed = by_step[15]
    assert changed.epsilon_changed and changed.result.epsilon < by_step[10].result.epsilon / 5
    assert changed.result.acceptance_mean > 0.8  # the retry at the new step is what was recorded


def test_the_step_adapted_at_a_random_initialisation_is_not_kept(tmp_path):
    """An explicit schedule also estimates at step 0, where w* is a random initialisation: that estimate adapts a step
    for itself, and the first estimate after training began adapts the one the run keeps (unmarked: no change)."""
    monitor = LLCMonitor(every_n_steps=10, num_chains=4, num_draws=30, num_burnin_steps=20)
    fit(tmp_path, Regressor(), monitor, 40)
    first, *trained = monitor.history
    assert first.step == 0 and len(trained) >= 3
    assert {record.result.epsilon for record in trained} == {trained[0].result.epsilon} != {first.result.epsilon}
    assert not any(record.epsilon_changed for record in trained)


def test_a_plan_the_budget_cannot_afford_is_announced_once(tmp_path):
    module = CountedWork()
    monitor = LLCMonitor(max_overhead=0.001, clock=module.clock)
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=300)
    with pytest.warns(LLCEstimateWarning, match="affords about") as caught:
        trainer.fit(module, regression_loader())
    assert len([w for w in caught if "affords about" in str(w.message)]) == 1
    assert 1 <= len(monitor.history) < 20
