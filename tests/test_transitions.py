"""The detectors on synthetic series with known changes, and TransitionMonitor in a real fit."""

import json
import math
import os
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_devinterp import LLCMonitor, Transition, TransitionDetector, TransitionMonitor, TransitionWarning, detect_transitions
from lightning_devinterp.detection.combined import TransitionEvidence
from lightning_devinterp.detection.loss_drops import FIXED_DATA_METRIC, LossDropDetector
from lightning_helpers import Regressor, make_trainer, regression_loader


def sparse_series(rng, n=60, level=10.0, noise=1.0, trend=None, shift_at=None, shift=0.0):
    """Irregularly spaced steps; a level with noise, an optional smooth trend and an optional level shift."""
    steps = np.cumsum(rng.integers(50, 150, n))
    values = np.full(n, level)
    if trend == "exponential":
        values += 20 * (1 - np.exp(-3 * steps / steps[-1]))
    elif trend == "linear":
        values -= 5 * steps / steps[-1]
    if shift_at is not None:
        values[shift_at:] += shift
    return steps.tolist(), (values + rng.normal(0, noise, n)).tolist()


# ---- λ̂: shifts between settled levels ----------------------------------------------------------------------------

@pytest.mark.parametrize("trend", [None, "exponential", "linear"])
def test_no_report_on_stationary_or_smoothly_drifting_series(trend):
    rng = np.random.default_rng(1)
    reports = sum(len(detect_transitions(*sparse_series(rng, trend=trend))) for _ in range(40))
    assert reports / (40 * 60) <= 0.005


def test_a_level_shift_is_reported_once_with_values_the_series_showed():
    rng = np.random.default_rng(2)
    found = 0
    for _ in range(40):
        steps, values = sparse_series(rng, shift_at=30, shift=10.0, noise=0.5)
        events = detect_transitions(steps, values)
        assert len(events) <= 1
        if events and steps.index(events[0].step) in (30, 31, 32):
            found += 1
            event = events[0]
            assert event.direction == "up" and event.evidence == "λ̂ change"
            assert min(values[:30]) <= event.before <= max(values[:30])
            assert event.after == pytest.approx(20.0, abs=1.5)
    assert found / 40 >= 0.9


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), shift=st.floats(-30, 30), scale=st.sampled_from([1e-3, 1.0, 1e6]))
def test_before_is_never_a_value_the_series_did_not_show(seed, shift, scale):
    rng = np.random.default_rng(seed)
    steps, values = sparse_series(rng, shift_at=int(rng.integers(5, 55)), shift=shift)
    values = [v * scale for v in values]
    for event in detect_transitions(steps, values):
        shown = values[: steps.index(event.step) + 1]
        assert min(shown) <= event.before <= max(shown)


def test_unhealthy_points_neither_join_a_level_nor_confirm_a_change():
    detector = TransitionDetector()
    for step in range(6):
        assert detector.update(step, 5.0 + 0.01 * (-1) ** step) is None
    assert detector.update(6, -40.0, healthy=False) is None
    assert detector.update(7, -40.0, healthy=False) is None
    assert detector.level == pytest.approx(5.0, abs=0.02)


@pytest.mark.parametrize(
    ("steps", "values", "stds", "match"),
    [
        ([1, 2, 2], [1.0, 1.0, 1.0], None, "increase strictly"),
        ([3, 2, 1], [1.0, 1.0, 1.0], None, "increase strictly"),
        ([1, 2.5, 3], [1.0, 1.0, 1.0], None, "integers"),
        ([1, 2, 3], [1.0, 1.0, 1.0], [0.1, -0.1, 0.1], "std"),
    ],
)
def test_bad_series_are_rejected(steps, values, stds, match):
    with pytest.raises(ValueError, match=match):
        detect_transitions(steps, values, stds)


def test_a_tiny_blip_on_a_constant_series_and_huge_values_are_handled():
    assert detect_transitions(list(range(20)), [0.0] * 10 + [1e-9, 1e-9] + [0.0] * 8) == []
    huge = [1e154 * (1 + 0.01 * math.sin(i)) for i in range(20)]
    assert detect_transitions(list(range(20)), huge) == []


@settings(max_examples=30, deadline=None)
@given(cut=st.integers(min_value=1, max_value=59), seed=st.integers(min_value=0, max_value=1000))
def test_state_dict_round_trip_continues_exactly(cut, seed):
    rng = np.random.default_rng(seed)
    steps, values = sparse_series(rng, shift_at=35, shift=10.0)
    uninterrupted = TransitionDetector()
    first = [uninterrupted.update(s, v) for s, v in zip(steps, values)]
    before = TransitionDetector()
    head = [before.update(s, v) for s, v in zip(steps[:cut], values[:cut])]
    after = TransitionDetector()
    after.load_state_dict(before.state_dict())
    assert head + [after.update(s, v) for s, v in zip(steps[cut:], values[cut:])] == first


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"threshold": -1}, "threshold"), ({"warmup": 2}, "warmup"), ({"window": 3}, "window"), ({"confirm": 0}, "confirm"),
     ({"min_relative_change": float("nan")}, "min_relative_change"), ({"absolute_floor": 0.0}, "absolute_floor")],
)
def test_bad_detector_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransitionDetector(**kwargs)


def test_mismatched_series_lengths_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        detect_transitions([1, 2], [1.0])


# ---- the training loss: a fall after a plateau ------------------------------------------------------------------

def loss_curve(rng, steps=2000, drops=(), noise=0.05, decay=None):
    """A minibatch loss: plateaus at 1 falling by 10x at each of ``drops`` (over 100 steps), or a smooth decay."""
    t = np.arange(steps)
    log_loss = np.zeros(steps)
    for start in drops:
        log_loss -= math.log(10) * np.clip((t - start) / 100, 0, 1)
    if decay is not None:
        log_loss -= t / decay
    return t.tolist(), np.exp(log_loss + rng.normal(0, noise, steps)).tolist()


def run_loss(steps, losses, **kwargs):
    detector = LossDropDetector(**kwargs)
    return [event for event in (detector.update(s, v) for s, v in zip(steps, losses)) if event is not None]


def test_each_drop_after_a_plateau_gives_an_onset_soon_and_an_end():
    rng = np.random.default_rng(0)
    for _ in range(20):
        events = run_loss(*loss_curve(rng, drops=(500, 1300), noise=0.3))
        onsets = [e for e in events if e.is_onset]
        assert [e.is_onset for e in events] == [True, False, True, False]
        assert 500 <= onsets[0].step <= 600 and 1300 <= onsets[1].step <= 1400
        assert onsets[0].direction == "down" and onsets[0].evidence == "loss drop"
        assert onsets[0].before == pytest.approx(1.0, rel=0.1)


def test_a_second_drop_soon_after_the_first_is_reported():
    """Stages 400 steps apart: the plateau between them starts where the first fall stopped, not where its end was
    confirmed (a lag and a half later), so it is long enough to be seen."""
    rng = np.random.default_rng(1)
    found = 0
    for _ in range(20):
        onsets = [e.step for e in run_loss(*loss_curve(rng, steps=1700, drops=(500, 900), noise=0.3)) if e.is_onset]
        found += len(onsets) == 2 and 900 <= onsets[1] <= 1000
    assert found >= 18


def test_a_fall_that_begins_slowly_does_not_raise_its_own_noise_floor():
    """After a plateau the fall speeds up over 800 steps to 25% per 100 steps, under heavy minibatch noise. The rates
    behind the noise estimate are those that share no data with the rate being judged, so the slow start of the
    fall does not count as noise."""
    rng = np.random.default_rng(3)
    t = np.arange(3000)
    found = 0
    for _ in range(20):
        log_loss = -np.cumsum(np.clip((t - 1000) / 800, 0, 1) * 0.25 / 100) + rng.normal(0, 0.5, t.size)
        found += any(e.is_onset and 1000 <= e.step <= 2200 for e in run_loss(t.tolist(), np.exp(log_loss).tolist()))
    assert found >= 19


def test_a_spike_that_returns_to_the_plateau_is_not_a_drop():
    """A loss that jumps 3x for 60 steps and comes back (an optimizer's spike) falls fast afterwards, but not below
    the plateau it left."""
    rng = np.random.default_rng(2)
    t = np.arange(2000)
    for _ in range(20):
        log_loss = np.where((t >= 1000) & (t < 1060), math.log(3.0), 0.0) + rng.normal(0, 0.3, t.size)
        assert not [e for e in run_loss(t.tolist(), np.exp(log_loss).tolist()) if e.is_onset]


@pytest.mark.parametrize("decay", [300.0, 3000.0])
def test_a_smooth_decay_from_initialisation_is_never_reported(decay):
    """Decays 3x faster and 3x slower than the threshold rate (10% per 100 steps). Close to that rate, noise can
    make a stretch look flat and what follows look fast: a documented limitation (README, Transition detection)."""
    rng = np.random.default_rng(1)
    assert all(run_loss(*loss_curve(rng, decay=decay, noise=0.2)) == [] for _ in range(20))


def test_noisy_minibatch_losses_alone_are_never_reported():
    rng = np.random.default_rng(2)
    assert all(run_loss(*loss_curve(rng, steps=3000, noise=1.0)) == [] for _ in range(20))


def test_loss_detector_state_round_trip():
    steps, losses = loss_curve(np.random.default_rng(3), drops=(600,), noise=0.2)
    whole = run_loss(steps, losses)
    first = LossDropDetector()
    head = [first.update(s, v) for s, v in zip(steps[:650], losses[:650])]
    second = LossDropDetector()
    second.load_state_dict(first.state_dict())
    tail = [second.update(s, v) for s, v in zip(steps[650:], losses[650:])]
    assert [e for e in head + tail if e is not None] == whole


# ---- the loss on fixed data at each estimate (L(w*)) --------------------------------------------------------------

def slow_fall(rng, start=1000, steps=2500, rate=0.12, noise=0.5):
    """A plateau, then a fall of ``rate`` (log units) per 100 steps from ``start``: the minibatch loss under heavy
    noise, and the noiseless loss on fixed data, as functions of the step."""
    def exact(step):
        return math.exp(-rate * max(step - start, 0) / 100)

    t = np.arange(steps)
    minibatch = np.exp(np.log([exact(step) for step in t]) + rng.normal(0, noise, steps))
    return t.tolist(), minibatch.tolist(), exact


def run_both(steps, minibatch, exact, every=100, detector=None):
    """Feed the minibatch loss at every step and the fixed-data loss every ``every`` steps."""
    detector = detector or LossDropDetector()
    events = []
    for step, value in zip(steps, minibatch):
        events.append(detector.update(step, value))
        if step % every == 0 and step > 0:
            events.append(detector.update_fixed_data(step, exact(step)))
    return [event for event in events if event is not None]


def test_a_slow_fall_under_heavy_noise_is_reported_at_the_next_estimates_when_fixed_data_shows_it():
    """12% per 100 steps under per-step log-noise 0.5: the minibatch loss alone needs hundreds of steps to see it,
    the noiseless loss at the estimates about one interval. The onset says where its values come from, and the
    minibatch loss, falling too, reports no second onset."""
    rng = np.random.default_rng(5)
    for _ in range(10):
        steps, minibatch, exact = slow_fall(rng)
        alone = [e.step for e in run_loss(steps, minibatch) if e.is_onset]
        (onset,) = run_both(steps, minibatch, exact)
        assert onset.is_onset and onset.metric == FIXED_DATA_METRIC and 1100 <= onset.step <= 1200
        assert onset.before == pytest.approx(1.0) and onset.after < 0.9
        assert not alone or alone[0] > onset.step + 100


def test_the_fall_ends_when_the_fixed_data_loss_stops_falling():
    rng = np.random.default_rng(6)
    steps, minibatch, exact = slow_fall(rng, steps=3000)

    def stops(step):
        return exact(min(step, 1800))

    onset, end = run_both(steps, minibatch, stops)
    assert onset.step < 1300 and 1800 <= end.step <= 2000
    assert end.before == pytest.approx(1.0) and end.after == pytest.approx(stops(1800))


def test_a_pause_in_a_steadily_falling_loss_is_not_a_plateau():
    """A loss falling 15% per 100 steps, pausing now and then and catching up after (as Adam's does late in
    training): two estimates that agree are no plateau when the loss has kept falling that fast before them."""
    decrements = [0.15] * 6 + [0.0, 0.3] + [0.15] * 5 + [0.0, 0.3] + [0.15] * 5
    levels = np.exp(-np.cumsum(decrements))
    detector = LossDropDetector()
    events = [detector.update_fixed_data(100 * (i + 1), value) for i, value in enumerate(levels)]
    assert [e for e in events if e is not None] == []


def test_a_fixed_data_fall_after_a_plateau_asks_for_estimates_sooner():
    detector = LossDropDetector()
    for step in range(100, 600, 100):
        detector.update_fixed_data(step, 1.0)
    assert not detector.leaving_plateau
    detector.update_fixed_data(600, 0.96)
    assert detector.leaving_plateau


def test_loss_detector_state_round_trip_with_fixed_data():
    rng = np.random.default_rng(7)
    steps, minibatch, exact = slow_fall(rng)
    whole = run_both(steps, minibatch, exact)
    first = LossDropDetector()
    head = run_both(steps[:1150], minibatch[:1150], exact, detector=first)
    second = LossDropDetector()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = run_both(steps[1150:], minibatch[1150:], exact, detector=second)
    assert head + tail == whole


def monitor_reports(seed, llc_at, healthy_at=lambda step: True):
    """The combined evidence's reports on a slow fall that stops at step 1800, with λ̂ (``llc_at(step)``) and L(w*)
    every 100 steps, fed in the monitor's order."""
    steps, minibatch, exact = slow_fall(np.random.default_rng(seed), steps=3000)
    evidence = TransitionEvidence(LossDropDetector(), TransitionDetector())
    reports = []
    for step, value in zip(steps, minibatch):
        reports.append(evidence.observe_loss(step, value))
        if step % 100 == 0 and step > 0:
            reports.append(evidence.observe_llc(step, llc_at(step), 0.05, healthy=healthy_at(step), fixed_loss=exact(min(step, 1800))))
    return [report for report in reports if report is not None]


def test_the_monitor_reports_a_fixed_data_onset_once_with_llc_before_and_after_at_its_end():
    onset, end = monitor_reports(8, lambda step: (5.0 if step < 1100 else 9.0) + 0.05 * math.sin(step))
    assert onset.metric == FIXED_DATA_METRIC and onset.evidence == "loss drop"
    assert not end.is_onset and end.evidence == "both" and end.before == pytest.approx(5.0, abs=0.1)


def test_a_drop_with_no_healthy_llc_before_it_ends_with_llc_now():
    """On a saddle λ̂ is negative and unhealthy until the drop: the end has no λ̂ before to compare, so it says
    where λ̂ is now."""
    onset, end = monitor_reports(9, lambda step: 9.0 if step >= 1300 else -2.0, healthy_at=lambda step: step >= 1300)
    assert end.metric == FIXED_DATA_METRIC and "λ̂ now 9, with no healthy estimate before the onset" in end.reason


def test_offline_detection_with_the_losses_makes_the_monitors_reports():
    """detect_transitions given the training loss and L(w*) runs the monitor's evidence in the monitor's order, so
    post-hoc analysis of a run and the alerts during it agree report for report."""
    rng = np.random.default_rng(10)
    steps, minibatch, exact = slow_fall(rng, steps=3000)
    estimates = list(range(100, 3000, 100))
    llc = [(5.0 if step < 1100 else 9.0) + 0.05 * math.sin(step) for step in estimates]
    fixed = [exact(min(step, 1800)) for step in estimates]
    evidence = TransitionEvidence(LossDropDetector(), TransitionDetector(metric="llc/mean"))
    online = []
    for step, value in zip(steps, minibatch):
        online.append(evidence.observe_loss(step, value))
        if step in estimates:
            index = estimates.index(step)
            online.append(evidence.observe_llc(step, llc[index], 0.05, fixed_loss=fixed[index]))
    online = [report for report in online if report is not None]
    offline = detect_transitions(
        estimates, llc, [0.05] * len(llc), metric="llc/mean", fixed_losses=fixed, training_losses=list(zip(steps, minibatch))
    )
    assert len(online) == 2 and offline == online
    assert detect_transitions(estimates, llc, [0.05] * len(llc), metric="llc/mean", fixed_losses=fixed)[0].metric == FIXED_DATA_METRIC
    with pytest.raises(ValueError, match="fixed_losses"):
        detect_transitions(estimates, llc, fixed_losses=fixed[:-1])


@pytest.mark.parametrize(("kwargs", "match"), [({"plateau": 0.2}, "plateau"), ({"window": 0}, "window"), ({"direction": "up"}, "direction")])
def test_bad_loss_detector_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossDropDetector(**kwargs)


# ---- both together -----------------------------------------------------------------------------------------------

def test_a_drop_across_which_llc_changed_ends_with_both_kinds_of_evidence():
    rng = np.random.default_rng(4)
    steps, losses = loss_curve(rng, drops=(600,), noise=0.2)
    evidence = TransitionEvidence(LossDropDetector(), TransitionDetector())
    reports, dense = [], []
    for step, loss in zip(steps, losses):
        found = evidence.observe_loss(step, loss)
        dense.append(evidence.wants_dense_estimates)
        if step % 50 == 0 and step > 0:
            llc = (5.0 if step < 650 else 9.0) + 0.05 * math.sin(step)
            found = found or evidence.observe_llc(step, llc, 0.05, healthy=not 650 <= step < 750)
        if found is not None:
            reports.append(found)
    onset, end = reports
    assert onset.is_onset and onset.evidence == "loss drop" and onset.metric == "train_loss"
    assert not end.is_onset and end.evidence == "both" and end.metric == "llc/mean"
    assert end.before == pytest.approx(5.0, abs=0.1) and end.after == pytest.approx(9.0, abs=0.1)
    assert "unhealthy" in end.reason
    assert any(dense[600:800]) and not any(dense[:500])


def test_a_llc_shift_without_a_loss_drop_is_reported_on_its_own():
    evidence = TransitionEvidence(LossDropDetector(), TransitionDetector())
    reports = []
    for step in range(1, 3001):
        evidence.observe_loss(step, 1.0)
        if step % 100 == 0:
            found = evidence.observe_llc(step, (5.0 if step < 1500 else 8.0) + 0.05 * math.cos(step), 0.05)
            if found is not None:
                reports.append(found)
    assert [(r.evidence, r.direction) for r in reports] == [("λ̂ change", "up")]


def test_llc_seen_while_the_loss_settles_is_not_a_level_to_compare_with():
    """While a model converges from initialisation w* is still moving and λ̂ (here 30) is not yet what it settles to
    (20, once the loss is flat): that is no transition."""
    rng = np.random.default_rng(0)
    evidence = TransitionEvidence(LossDropDetector(), TransitionDetector())
    reports = []
    for step in range(1, 2001):
        evidence.observe_loss(step, (1 + 10 * math.exp(-step / 100)) * math.exp(rng.normal(0, 0.05)))
        if step % 25 == 0:
            found = evidence.observe_llc(step, (30.0 if step < 550 else 20.0) + 0.3 * math.cos(step), 0.3)
            if found is not None:
                reports.append(found)
    assert reports == []


# ---- TransitionMonitor in a real fit --------------------------------------------------------------------------------

class JumpingSignal(Regressor):
    """Logs a synthetic metric that drops from 3 to 1 at step 40, beside a normal training loss."""

    def training_step(self, batch, batch_idx):
        step = self.global_step
        self.log("signal", (3.0 if step < 40 else 1.0) + 0.02 * math.sin(step))
        return super().training_step(batch, batch_idx)


def test_transition_monitor_alerts_everywhere_it_should(tmp_path):
    seen = []
    logger = TensorBoardLogger(str(tmp_path), name="tm")
    detector = LossDropDetector(metric="signal", window=5, lag=10, plateau_steps=10)
    monitor = TransitionMonitor(monitor="signal", detector=detector, on_transition=lambda trainer, module, t: seen.append((trainer.global_step, t)), save_checkpoint=True)
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], logger=logger, max_steps=80, log_every_n_steps=1)
    with pytest.warns(TransitionWarning, match="signal .* onset"):
        trainer.fit(JumpingSignal(), regression_loader())
    onset, end = monitor.transitions
    assert onset.is_onset and 41 <= onset.step <= 46 and not end.is_onset
    assert seen == [(t.step, t) for t in monitor.transitions]
    for t in monitor.transitions:
        assert os.path.exists(tmp_path / "tm" / "version_0" / "checkpoints" / f"transition-signal-step={t.step}.ckpt")
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("transitions/onset")] == [onset.step]
    assert [e.step for e in events.Scalars("transitions/end")] == [end.step]
    assert "transitions/signal/text_summary" in events.Tags()["tensors"]
    restored = TransitionMonitor(monitor="signal")
    restored.load_state_dict(monitor.state_dict())
    assert restored.transitions == monitor.transitions


class EveryTenSteps(Regressor):
    """Logs a metric every ten steps only: Lightning keeps the last value in ``callback_metrics`` in between."""

    def training_step(self, batch, batch_idx):
        if self.global_step % 10 == 0:
            self.log("sparse", 2.0 + 0.01 * self.global_step)
        return super().training_step(batch, batch_idx)


def test_a_metric_logged_every_few_steps_is_fed_once_per_value(tmp_path):
    monitor = TransitionMonitor(monitor="sparse", detector=TransitionDetector(metric="sparse"))
    pl.seed_everything(0)
    make_trainer(tmp_path, [monitor], max_steps=60).fit(EveryTenSteps(), regression_loader())
    fed = monitor.detector.state_dict()["regime"]
    assert [step for step, _, _ in fed] == [1, 11, 21, 31, 41, 51]  # read after the optimizer step it was logged in
    assert [value for _, value, _ in fed] == pytest.approx([2.0, 2.1, 2.2, 2.3, 2.4, 2.5])


def test_a_metric_that_is_never_logged_is_named_once(tmp_path):
    monitor = TransitionMonitor(monitor="trian_loss")
    pl.seed_everything(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [monitor], max_epochs=2, max_steps=-1).fit(Regressor(), regression_loader())
    messages = [str(w.message) for w in caught if "never logged" in str(w.message)]
    assert len(messages) == 1 and "train_loss" in messages[0]


def test_a_llc_series_is_not_called_missing_before_any_healthy_estimate(tmp_path):
    """λ̂ reaches callback_metrics only with a healthy estimate, here after the first epochs (8 steps each): no
    warning for the right name, one for a misspelled group once λ̂ metrics have appeared."""
    right, wrong = TransitionMonitor(monitor="llc/mean"), TransitionMonitor(monitor="llc/atn/mean")
    llc = LLCMonitor(every_n_steps=20, num_chains=2, num_draws=20, num_burnin_steps=20)
    pl.seed_everything(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [llc, right, wrong], max_epochs=6, max_steps=-1).fit(Regressor(), regression_loader())
    assert any(record.healthy and record.step > 0 for record in llc.history)
    missing = [str(w.message) for w in caught if "never logged" in str(w.message)]
    assert len(missing) == 1 and "llc/atn/mean" in missing[0]


def test_transition_is_a_small_frozen_record():
    event = Transition(step=3, metric="m", before=1.0, after=2.0, score=5.0, direction="up", reason="onset: r", evidence="λ̂ change")
    with pytest.raises(AttributeError):
        event.step = 4  # type: ignore[misc]
    assert "step 3" in event.describe() and "evidence: λ̂ change" in event.describe()
