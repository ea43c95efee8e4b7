"""LLCMonitor() with no arguments: a planned, budgeted curve at one adapted step size, in real fits."""

import dataclasses
import time
import warnings

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_devinterp import LLCEstimateWarning, LLCMonitor, LLCResult, SamplingConfig, TransitionDetector
from lightning_devinterp.callbacks.tracker import LLCTracker
from lightning_devinterp.detection.combined import TransitionEvidence
from lightning_devinterp.callbacks.schedule import EARLY_FRACTION, TARGET_ESTIMATES, EstimateSchedule, planned_steps
from lightning_helpers import AtMinimum, Regressor, make_trainer, regression_loader
from models import gaussian_nll


@settings(max_examples=50, deadline=None)
@given(total=st.integers(min_value=1, max_value=10**7))
def test_the_plan_is_log_spaced_early_then_even(total):
    steps = planned_steps(total)
    assert steps == sorted(set(steps)) and 1 <= steps[0] and steps[-1] == total
    assert len(steps) <= TARGET_ESTIMATES
    if total >= 10_000:
        assert len(steps) == TARGET_ESTIMATES
        early = [s for s in steps if s <= EARLY_FRACTION * total]
        assert len(early) >= 9 and all(b / a == pytest.approx(early[1] / early[0], rel=0.02) for a, b in zip(early, early[1:]))
        late_gaps = {b - a for a, b in zip(steps[10:], steps[11:])}
        assert max(late_gaps) - min(late_gaps) <= 1


def test_a_budget_too_small_for_the_plan_thins_it_evenly():
    """Training takes 1 ms a step and an estimate 60 ms. 10% of 3000 steps is 0.3 s; stretched for a curve, at most
    0.6 s: ten of the 30 planned estimates. The ones that run are spread over the plan, not bunched at its end."""
    now = [0.0]
    schedule = EstimateSchedule(max_overhead=0.1, clock=lambda: now[0])
    schedule.start(3000)
    schedule.record(0.06)
    kept = []
    for step in schedule.plan:
        now[0] = step * 0.001 + schedule.own_seconds
        allowed = schedule.allowance(step, smallest_cost=0.06)
        if allowed:
            kept.append(step)
            schedule.own_seconds += allowed
    assert 9 <= len(kept) <= 11, kept
    assert kept[0] <= 0.1 * 3000 and kept[-1] >= 0.8 * 3000
    assert schedule.own_seconds <= 2 * 0.1 * 3 + 0.06


def fit(tmp_path, module, monitor, steps):
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LLCEstimateWarning)
        trainer.fit(module, regression_loader())
    return trainer


class TwoMillisecondSteps(AtMinimum):
    """Training steps at least 2 ms longer, as a real model's would be, with the same loss to sample: the tiny
    regression's own step (about 1 ms, mostly Lightning's loop) is so cheap that what the budget affords would
    depend on the machine's speed."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        time.sleep(0.002)


@pytest.mark.slow
def test_default_monitor_gives_a_curve_at_one_adapted_step(tmp_path):
    monitor = LLCMonitor()
    fit(tmp_path, TwoMillisecondSteps(), monitor, 3000)
    steps = [record.step for record in monitor.history]
    assert len(steps) >= 20 and steps[0] > 0 and steps[-1] >= 2400  # no estimate at a random initialisation
    epsilons = {record.result.epsilon for record in monitor.history}
    assert len(epsilons) == 1 and not any(record.epsilon_changed for record in monitor.history)
    assert sum(record.healthy for record in monitor.history[2:]) >= 0.9 * len(monitor.history[2:])
    assert monitor.schedule.own_seconds >= sum(record.seconds for record in monitor.history)  # hooks are counted too


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


def test_a_change_of_step_size_starts_the_llc_series_over():
    """λ̂ at a new step size is not comparable with the old: the λ̂ detector forgets its level there."""
    evidence = TransitionEvidence(None, TransitionDetector())
    tracker = LLCTracker(SamplingConfig(), seed=0, evidence=evidence)
    result = LLCResult(
        llc_mean=5.0, llc_std=0.1, llc_per_chain=torch.full((4,), 5.0), loss_trace=torch.zeros(4, 10),
        acceptance=torch.full((4,), 0.95), init_loss=0.0, nbeta=10.0, epsilon=1e-4,
    )
    for step in range(0, 500, 100):
        tracker.detect(tracker.record(step, result, 0.1))
    assert evidence.llc.level == 5.0
    changed = tracker.record(500, dataclasses.replace(result, llc_mean=50.0, epsilon=1e-5), 0.1, epsilon_changed=True)
    assert tracker.detect(changed) is None and evidence.llc.level is None


def test_a_plan_the_budget_cannot_afford_is_announced_once(tmp_path):
    monitor = LLCMonitor(max_overhead=0.001)
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=300)
    with pytest.warns(LLCEstimateWarning, match="affords about") as caught:
        trainer.fit(AtMinimum(), regression_loader())
    assert len([w for w in caught if "affords about" in str(w.message)]) == 1
    assert 1 <= len(monitor.history) < 20
