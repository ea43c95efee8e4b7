"""LLCMonitor() with no arguments: a planned, budgeted curve at one adapted step size, in real fits."""

import re
import statistics
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_devinterp import LLCEstimateWarning, LLCMonitor
from lightning_devinterp.theory import quadratic_sgld_llc
from lightning_devinterp.tracking.schedule import FIXED_LOSS_SHARE
from lightning_devinterp.tracking.tracker import PAIRING_PAYS, PAIRING_RECHECK, SMALLEST, TARGET_RELATIVE_ERROR
from tests.helpers.models import gaussian_nll
from tests.helpers.trainers import AtMinimum, Regressor, make_trainer, regression_loader


def fit(tmp_path, module, monitor, steps, loader=None):
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LLCEstimateWarning)
        trainer.fit(module, loader or regression_loader())
    return trainer


class CountedWork(AtMinimum):
    """A machine of known speed: every call of the loss advances a clock, by 3 ms in a training step and by 0.3 ms in
    one of the monitor's evaluations (one vectorized step of all its chains, which run in eval mode), so what the
    budget affords is the same on every machine."""

    def __init__(self, data=None):
        super().__init__(data)
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
    readings = []  # the counted seconds of each reading of L(w*) between estimates
    read = monitor.tracker.read_fixed_loss

    def timed_read(step, inputs):
        started = module.clock()
        found = read(step, inputs)
        readings.append(module.clock() - started)
        return found

    monitor.tracker.read_fixed_loss = timed_read
    fit(tmp_path, module, monitor, 3000)
    steps = [record.step for record in monitor.history]
    assert len(steps) >= 20 and steps[0] > 0 and steps[-1] >= 2400  # no estimate at a random initialisation
    epsilons = {record.result.epsilon for record in monitor.history}
    assert len(epsilons) == 1 and not any(record.epsilon_changed for record in monitor.history)
    assert sum(record.healthy for record in monitor.history[2:]) >= 0.9 * len(monitor.history[2:])
    estimates = sum(record.seconds for record in monitor.history)
    assert monitor.schedule.own_seconds == pytest.approx(estimates + sum(readings))
    assert monitor.schedule.own_seconds <= 0.2 * 3000 * 0.003  # within the budget, stretched at most to twice 10%
    assert readings and sum(readings) <= FIXED_LOSS_SHARE * 3000 * 0.003  # extras the budget had room for


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


def test_a_plan_the_budget_cannot_afford_is_announced_once_with_what_it_affords(tmp_path):
    module = CountedWork()
    monitor = LLCMonitor(max_overhead=0.01, clock=module.clock, paired=False)  # every estimate costs the same
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=3000)
    with pytest.warns(LLCEstimateWarning, match="affords about") as caught:
        trainer.fit(module, regression_loader())
    said = [str(w.message) for w in caught if "affords about" in str(w.message)]
    assert len(said) == 1
    assert 1 <= len(monitor.history) < 20
    affordable = int(re.search(r"affords about (\d+) of", said[0]).group(1))
    # what the run then got, within the error of the first cost measurement (it includes the step-size adaptation)
    assert abs(affordable - len(monitor.history)) <= len(monitor.history) / 3


def wide_regression() -> TensorDataset:
    """Noisy linear data from 24 features to 8 outputs: at its least-squares fit (200 parameters) λ̂ is large and
    its relative error small."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 24, generator=generator)
    return TensorDataset(x, x @ torch.randn(24, 8, generator=generator) + torch.randn(1024, 8, generator=generator))


def test_precise_estimates_take_fewer_draws_and_stay_exact(tmp_path):
    """Once recent estimates reach the target error with draws to spare, the next take fewer (down to 10 a chain, at
    the smallest); those still match the exact SGLD expectation at their settings."""
    module = CountedWork(wide_regression())
    monitor = LLCMonitor(clock=module.clock)
    fit(tmp_path, module, monitor, 1500, DataLoader(module.data, batch_size=32, shuffle=True))
    draws = [record.result.loss_trace.shape[1] for record in monitor.history]
    assert len(draws) >= 20 and min(draws[3:]) < SMALLEST.num_draws
    late = [record.result for record in monitor.history[3:]]
    errors = [
        result.llc_mean / quadratic_sgld_llc(module.curvatures, result.nbeta, result.gamma, result.epsilon) - 1
        for result in late
    ]
    assert statistics.median(abs(error) for error in errors) <= 0.1 and abs(statistics.mean(errors)) <= 0.1
    assert statistics.median(result.llc_stderr / result.llc_mean for result in late) <= 2 * TARGET_RELATIVE_ERROR


def test_the_monitor_pairs_its_draws_only_while_pairing_pays(tmp_path):
    """At the least-squares fit of nearly noiseless data every minibatch's loss at w* is nearly zero: pairing cancels
    nothing, so after the first estimate the monitor draws unpaired (one forward pass a step fewer) and pairs again
    every fifth estimate to check; the unpaired estimates still match the exact SGLD expectation. Where the data are
    noisy, pairing cuts the variance of λ̂ two- to sixfold and every estimate pairs."""
    module = CountedWork()
    monitor = LLCMonitor(clock=module.clock)
    fit(tmp_path, module, monitor, 1500)
    paired = [record.result.paired for record in monitor.history]
    assert paired[0] and monitor.history[0].result.pairing_gain < PAIRING_PAYS
    assert paired == [index % PAIRING_RECHECK == 0 for index in range(len(paired))]
    errors = [
        abs(r.llc_mean / quadratic_sgld_llc(module.curvatures, r.result.nbeta, r.result.gamma, r.result.epsilon) - 1)
        for r in monitor.history[1:]
        if not r.result.paired
    ]
    assert len(errors) >= 5 and statistics.median(errors) <= 0.15

    noisy = CountedWork(wide_regression())
    noisy_monitor = LLCMonitor(clock=noisy.clock)
    fit(tmp_path, noisy, noisy_monitor, 300, DataLoader(noisy.data, batch_size=32, shuffle=True))
    assert all(record.result.paired and record.result.pairing_gain > 2 for record in noisy_monitor.history)
