"""The budgeted schedule's plan and thinning, and the tracker's response to a change of step size, without a Trainer."""

import dataclasses
import gc
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_devinterp import SamplingConfig, TransitionDetector
from lightning_devinterp.detection.combined import TransitionEvidence
from lightning_devinterp.tracking.clock import working_time
from lightning_devinterp.tracking.schedule import (
    EARLY_FRACTION,
    FIXED_LOSS_EVERY,
    FIXED_LOSS_SHARE,
    TARGET_ESTIMATES,
    EstimateSchedule,
    FixedLossReadings,
    planned_steps,
)
from lightning_devinterp.tracking.tracker import (
    FEWEST_DRAWS,
    LARGEST,
    PAIRING_RECHECK,
    SMALLEST,
    TARGET_RELATIVE_ERROR,
    LLCTracker,
)
from tests.helpers.results import an_estimate


@settings(max_examples=50, deadline=None)
@given(total=st.integers(min_value=1, max_value=10**7))
def test_the_plan_is_log_spaced_early_then_even(total):
    steps = planned_steps(total)
    assert steps == sorted(set(steps)) and 1 <= steps[0] and steps[-1] == total
    assert len(steps) <= TARGET_ESTIMATES
    if total >= 10_000:
        assert len(steps) == TARGET_ESTIMATES
        early = [s for s in steps if s <= EARLY_FRACTION * total]
        assert len(early) >= 9 and all(
            b / a == pytest.approx(early[1] / early[0], rel=0.02) for a, b in zip(early, early[1:])
        )
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


def test_a_pause_early_in_training_is_not_projected_over_the_run():
    """Training takes 1 ms a step, but step 12 waits 0.3 s (a garbage collection, say). Projected at the pace so far,
    that pause would make the run 30 times longer at step 20 and the early estimates would spend the whole budget;
    projected at a typical step's pace, the estimates that run reach the end of training within the budget."""
    now = [0.0]
    schedule = EstimateSchedule(max_overhead=0.1, clock=lambda: now[0])
    schedule.start(3000)
    schedule.record(0.06)
    kept, last = [], 0
    for step in range(1, 3001):
        now[0] += 0.001 + (0.3 if step == 12 else 0.0)
        schedule.note_step(step)
        if schedule.is_due(step, last):
            last = step
            allowed = schedule.allowance(step, smallest_cost=0.06)
            if allowed:
                kept.append(step)
                schedule.own_seconds += allowed
                now[0] += allowed
    assert kept[-1] >= 0.8 * 3000, kept
    assert schedule.own_seconds <= 2 * 0.1 * 3.3 + 0.06


def test_the_pace_counts_every_batch_a_step_accumulates():
    """Four batches of 1 ms each make an optimizer step: the run of 1000 steps is projected at 4 s, not 1 s."""
    now = [0.0]
    schedule = EstimateSchedule(max_overhead=0.1, clock=lambda: now[0])
    schedule.start(1000)
    for batch in range(1, 401):
        now[0] += 0.001
        schedule.note_step(batch // 4)
    assert schedule.projected_training_seconds(100) == pytest.approx(4.0, rel=0.01)


def test_a_garbage_collection_inside_a_hook_is_not_the_monitors_time():
    """With the default clocks, a full collection that starts inside a hook is left out of the monitor's time."""
    heap = [[index] for index in range(1_000_000)]
    schedule = EstimateSchedule(max_overhead=0.1, work_clock=working_time)
    started = time.perf_counter()
    with schedule.timed():
        gc.collect()
    wall = time.perf_counter() - started
    del heap
    assert wall > 0.005 and schedule.own_seconds < 0.2 * wall


def test_a_change_of_step_size_starts_the_llc_series_over():
    """λ̂ at a new step size is not comparable with the old: the λ̂ detector forgets its level there."""
    evidence = TransitionEvidence(None, TransitionDetector())
    tracker = LLCTracker(SamplingConfig(), seed=0, evidence=evidence)
    result = an_estimate(5.0, epsilon=1e-4)
    for step in range(0, 500, 100):
        tracker.detect(tracker.record(step, result, 0.1))
    assert evidence.llc.level == 5.0
    changed = tracker.record(500, dataclasses.replace(result, llc_mean=50.0, epsilon=1e-5), 0.1, epsilon_changed=True)
    assert tracker.detect(changed) is None and evidence.llc.level is None


@pytest.mark.parametrize("costs", [(0.01, 0.001), (0.01, 0.0017), (0.0377, 0.0013), (0.05, 0.001)])
def test_the_smallest_estimate_fits_the_allowance_of_exactly_its_cost(costs):
    """When the schedule thins its plan (and early in training) it grants exactly the smallest estimate's predicted
    cost; that estimate must then run, whatever the rounding of the costs."""
    tracker = LLCTracker(SamplingConfig(), seed=0, evidence=TransitionEvidence(None, None))
    tracker._costs[(4, True)] = costs  # seconds: fixed, per chain step
    shape = tracker.shape_for(allowance=tracker.smallest_cost(), budgeted=True)
    assert shape == SMALLEST
    assert tracker.shape_for(allowance=0.99 * tracker.smallest_cost(), budgeted=True) is None


def _tracker_after(relative_error: float, relaxed_share: float = 1.0, draws: int = 30) -> LLCTracker:
    """A tracker whose last three estimates had ``draws`` draws per chain and this relative standard error."""
    tracker = LLCTracker(SamplingConfig(), seed=0, evidence=TransitionEvidence(None, None))
    tracker._costs[(4, True)] = (0.01, 0.001)
    for step in (100, 200, 300):
        result = an_estimate(
            10.0, draws=draws, llc_std=1.0, llc_stderr=10.0 * relative_error, relaxed_share=relaxed_share
        )
        tracker.record(step, result, 0.1)
    return tracker


@settings(max_examples=50, deadline=None)
@given(relative_error=st.floats(0.005, 0.5), draws=st.integers(10, 200))
def test_estimates_are_sized_for_the_target_error(relative_error, draws):
    """Draws scale as one over the squared relative error: the budget gets the draws that recent estimates say
    reach the target, never fewer than FEWEST_DRAWS, and never more than fit."""
    tracker = _tracker_after(relative_error, draws=draws)
    needed = draws * (relative_error / TARGET_RELATIVE_ERROR) ** 2
    assert tracker.draws_for_target() == pytest.approx(needed, abs=1.0)
    ample = tracker.shape_for(allowance=100.0, budgeted=True)
    assert ample is not None
    assert abs(ample.num_draws - min(max(needed, FEWEST_DRAWS), LARGEST.num_draws)) <= 1
    smallest = tracker.smallest_shape()
    assert FEWEST_DRAWS <= smallest.num_draws <= SMALLEST.num_draws
    assert tracker.shape_for(allowance=tracker.smallest_cost(), budgeted=True) == smallest


def test_precise_estimates_make_the_smallest_cheaper_and_imprecise_ones_do_not():
    precise, imprecise = _tracker_after(0.02), _tracker_after(0.2)
    assert precise.smallest_shape().num_draws == FEWEST_DRAWS
    assert precise.smallest_cost() < imprecise.smallest_cost()
    assert imprecise.smallest_shape() == SMALLEST
    assert imprecise.shape_for(allowance=100.0, budgeted=True) == LARGEST


def test_chains_that_have_not_relaxed_are_not_cut_to_the_target():
    """Until the chains have relaxed, the steps spent sampling also bring λ̂ up to its long-run value."""
    tracker = _tracker_after(0.02, relaxed_share=0.5)
    assert tracker.draws_for_target() is None
    assert tracker.smallest_shape() == SMALLEST
    assert tracker.shape_for(allowance=100.0, budgeted=True) == LARGEST


def test_explicit_schedules_and_configured_draws_keep_their_shape():
    tracker = _tracker_after(0.02)
    assert tracker.shape_for(allowance=None, budgeted=False) == LARGEST
    tracker.config = SamplingConfig(num_draws=120)
    assert tracker.shape_for(allowance=100.0, budgeted=True).num_draws == 120
    assert tracker.smallest_shape() == SMALLEST


def _paired(gain_noise: float, warnings: list[str] | None = None):
    """A paired estimate whose draws' batch noise (sd ``gain_noise``) pairing removes, over a wander of sd 1."""
    generator = torch.Generator().manual_seed(0)
    wander = torch.randn(4, 30, generator=generator)
    noise = gain_noise * torch.randn(4, 30, generator=generator)
    return an_estimate(
        loss_trace=wander + noise, anchor_loss_trace=noise, nbeta=1.0, llc_stderr=0.1, warnings=warnings or []
    )


def test_pairing_stops_where_a_healthy_estimate_shows_it_buys_nothing_and_rechecks():
    """Unpaired after a healthy paired estimate whose gain is low, paired again every PAIRING_RECHECK-th estimate; an
    unhealthy estimate (its error the chains' drift) neither stops nor resumes pairing."""
    tracker = LLCTracker(SamplingConfig(), seed=0, evidence=TransitionEvidence(None, None))
    assert tracker.pairs_next()
    tracker.record(10, _paired(0.0, warnings=["w* is not a local minimum"]), 0.1)
    assert tracker.history[-1].result.pairing_gain == pytest.approx(1.0) and tracker.pairs_next()
    tracker.record(20, _paired(3.0), 0.1)
    assert tracker.history[-1].result.pairing_gain > 2 and tracker.pairs_next()
    tracker.record(30, _paired(0.0), 0.1)
    decisions = []
    for step in range(40, 40 + 20 * PAIRING_RECHECK, 10):
        decisions.append(tracker.pairs_next())
        if not decisions[-1]:
            tracker.record(step, an_estimate(), 0.1)
        else:
            tracker.record(step, _paired(0.0, warnings=["drifting"]), 0.1)
    assert decisions == [False] * (PAIRING_RECHECK - 1) + [True] * (PAIRING_RECHECK + 1)


@settings(deadline=None)
@given(
    readings=st.lists(st.floats(1e-5, 1.0), min_size=1, max_size=5),
    step_seconds=st.floats(1e-4, 1.0),
)
def test_readings_of_the_loss_at_w_star_are_spaced_to_cost_a_small_share_of_training(readings, step_seconds):
    """As close as every FIXED_LOSS_EVERY steps, no closer than their share of training allows, judged by the
    cheapest reading so far (one slowed by a pause elsewhere does not thin them out)."""
    spacing = FixedLossReadings()
    for seconds in readings:
        every = spacing.spacing_after(seconds, step_seconds)
    cheapest = min(readings)
    assert every >= FIXED_LOSS_EVERY
    assert cheapest <= FIXED_LOSS_SHARE * every * step_seconds * (1 + 1e-9)
    assert every == FIXED_LOSS_EVERY or cheapest > FIXED_LOSS_SHARE * (every - 1) * step_seconds
    assert spacing.spacing_after(cheapest, None) == FIXED_LOSS_EVERY


def test_a_reading_is_due_its_spacing_after_the_last_reading_or_estimate():
    readings = FixedLossReadings()
    assert not readings.due(FIXED_LOSS_EVERY - 1, last_estimate=-1) and readings.due(FIXED_LOSS_EVERY, last_estimate=-1)
    readings.last_step = 100
    assert not readings.due(100 + FIXED_LOSS_EVERY, last_estimate=110)
    assert readings.due(110 + FIXED_LOSS_EVERY, last_estimate=110)
