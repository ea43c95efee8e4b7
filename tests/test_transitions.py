"""TransitionDetector on synthetic series with known change points, and TransitionMonitor in a real fit."""

import math
import os

import lightning.pytorch as pl
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_devinterp import Transition, TransitionDetector, TransitionMonitor, TransitionWarning, detect_transitions
from lightning_helpers import Regressor, make_trainer, regression_loader

NOISE = 1.0


def synthetic_series(rng, n=100, jumps=(), jump_size=0.0, trend=None):
    """Irregularly spaced steps; level 10 with unit noise, an optional smooth trend, and planted level shifts."""
    steps = np.cumsum(rng.integers(50, 150, n))
    values = np.full(n, 10.0)
    if trend == "exponential":
        values += 20 * (1 - np.exp(-3 * steps / steps[-1]))
    elif trend == "linear":
        values += 10 * steps / steps[-1]
    for index in jumps:
        values[index:] += jump_size * NOISE
    return steps.tolist(), (values + rng.normal(0, NOISE, n)).tolist()


@pytest.mark.parametrize("trend", [None, "exponential", "linear"])
def test_at_most_one_false_alarm_per_100_points_without_transitions(trend):
    rng = np.random.default_rng(1)
    alarms = points = 0
    for _ in range(40):
        steps, values = synthetic_series(rng, trend=trend)
        alarms += sum(t.is_onset for t in detect_transitions(steps, values))
        points += len(values)
    assert 100 * alarms / points <= 1.0


@pytest.mark.parametrize("trend", [None, "exponential"])
def test_large_planted_jumps_are_found_on_time(trend):
    """8-sigma shifts: recall >= 85%, found at the jump or one point later, few alarms elsewhere, each onset ended."""
    rng = np.random.default_rng(2)
    found = planted = false_alarms = 0
    lags = []
    for _ in range(40):
        jumps = (30, 65)
        steps, values = synthetic_series(rng, jumps=jumps, jump_size=8.0, trend=trend)
        events = detect_transitions(steps, values)
        onsets = [t for t in events if t.is_onset]
        assert len(events) - len(onsets) >= len(onsets) - 1  # every onset but perhaps the last has its end
        indices = [steps.index(t.step) for t in onsets]
        for jump in jumps:
            planted += 1
            near = [i - jump for i in indices if 0 <= i - jump <= 2]
            if near:
                found += 1
                lags.append(min(near))
        false_alarms += sum(1 for i in indices if not any(0 <= i - j <= 2 for j in jumps))
    assert found / planted >= 0.85
    assert np.mean(lags) <= 0.5
    assert 100 * false_alarms / (40 * 100) <= 1.0


def test_small_jumps_are_rarely_reported():
    """2-sigma shifts are within the noise: the detector is for transitions, not for every wiggle."""
    rng = np.random.default_rng(3)
    reported = 0
    for _ in range(30):
        steps, values = synthetic_series(rng, jumps=(50,), jump_size=2.0)
        reported += any(t.is_onset and 0 <= steps.index(t.step) - 50 <= 2 for t in detect_transitions(steps, values))
    assert reported / 30 <= 0.2


def ramp_recall(length: int = 8, **detector_kwargs) -> float:
    """Share of 40 series where a level shift of 8 sigma spread over ``length`` points raises an onset during the ramp."""
    rng = np.random.default_rng(5)
    found = 0
    for _ in range(40):
        steps, values = synthetic_series(rng)
        ramp = np.clip((np.arange(len(values)) - 39) / length, 0, 1) * 8.0 * NOISE
        events = detect_transitions(steps, (np.array(values) + ramp).tolist(), **detector_kwargs)
        found += any(t.is_onset and 40 <= steps.index(t.step) < 40 + length for t in events)
    return found / 40


def test_the_drift_and_slope_rules_catch_ramps_that_single_jumps_miss():
    """No single step of the ramp is a jump, but its residuals keep one sign and the series bends."""
    jumps_only = ramp_recall(drift_threshold=None, slope_threshold=None)
    with_drift = ramp_recall(slope_threshold=None)
    with_both = ramp_recall()
    assert with_drift >= jumps_only + 0.15
    assert with_both >= with_drift + 0.2
    assert with_both >= 0.7


def test_the_slope_rule_reports_where_a_plateau_starts_to_climb():
    """A plateau, then a climb of one noise unit per point: a change of slope within 10 points of the bend."""
    steps = list(range(0, 4000, 100))
    found = {"with": 0, "without": 0}
    for seed in range(6):
        rng = np.random.default_rng(seed)
        values = [10.0 + 0.1 * max(0, i - 19) + rng.normal(0, 0.1) for i in range(40)]
        for rule, kwargs in (("with", {}), ("without", {"slope_threshold": None})):
            onsets = [t for t in detect_transitions(steps, values, **kwargs) if t.is_onset]
            if onsets and 2000 <= onsets[0].step < 3000 and onsets[0].direction == "up":
                found[rule] += 1
                assert rule == "without" or onsets[0].reason == "onset: change of slope"
    assert found["with"] == 6 and found["without"] <= 1


def test_one_transition_gives_an_onset_and_an_end():
    steps = list(range(0, 4000, 100))
    values = [10.0 + 0.1 * math.sin(i) for i in range(20)] + [30.0 + 0.1 * math.cos(i) for i in range(20)]
    onset, end = detect_transitions(steps, values, metric="llc/mean")
    assert onset.is_onset and onset.step == 2000 and onset.direction == "up" and onset.metric == "llc/mean"
    assert onset.before == pytest.approx(10.0, abs=0.3) and onset.after == pytest.approx(30.0, abs=0.2)
    assert onset.score >= 4.0
    assert not end.is_onset and "began at step 2000" in end.reason and end.step == 2200
    assert end.before == onset.before and end.after == pytest.approx(30.0, abs=0.2)


def test_a_multi_point_excursion_is_one_transition():
    """λ̂ diving over several estimates and recovering (as around a loss drop) is one onset and one end."""
    steps = list(range(0, 3000, 100))
    values = [5.0 + 0.2 * math.sin(i) for i in range(12)] + [-10.0, -40.0, -80.0, -60.0, -20.0] + [12.0 + 0.2 * math.cos(i) for i in range(13)]
    events = detect_transitions(steps, values)
    assert [t.is_onset for t in events] == [True, False]
    assert events[0].step == 1200 and events[0].direction == "down"
    assert events[1].direction == "up" and events[1].after == pytest.approx(12.0, abs=0.5)


def test_no_alert_during_warm_up():
    detector = TransitionDetector(warmup=5)
    values = [1.0, 1.1, 0.9, 1.0, 50.0]
    assert all(detector.update(step, value) is None for step, value in enumerate(values))


def test_unhealthy_estimates_are_marked_not_dropped():
    detector = TransitionDetector()
    for step in range(12):
        assert detector.update(step, 5.0 + 0.01 * (-1) ** step) is None
    event = detector.update(12, -40.0, healthy=False)
    assert event is not None and "unhealthy" in event.reason and event.direction == "down"


def test_non_finite_values_are_ignored():
    detector = TransitionDetector()
    assert detector.update(0, float("nan")) is None
    assert detector.state_dict()["segment"] == []


@settings(max_examples=30, deadline=None)
@given(cut=st.integers(min_value=1, max_value=59), seed=st.integers(min_value=0, max_value=1000))
def test_state_dict_round_trip_continues_exactly(cut, seed):
    rng = np.random.default_rng(seed)
    steps, values = synthetic_series(rng, n=60, jumps=(35,), jump_size=10.0)
    uninterrupted = TransitionDetector()
    first = [uninterrupted.update(s, v) for s, v in zip(steps, values)]
    before = TransitionDetector()
    head = [before.update(s, v) for s, v in zip(steps[:cut], values[:cut])]
    after = TransitionDetector()
    after.load_state_dict(before.state_dict())
    tail = [after.update(s, v) for s, v in zip(steps[cut:], values[cut:])]
    assert head + tail == first


def test_offline_detection_equals_online_updates():
    rng = np.random.default_rng(4)
    steps, values = synthetic_series(rng, jumps=(40, 70), jump_size=9.0, trend="exponential")
    detector = TransitionDetector(metric="value")
    online = [e for e in (detector.update(s, v) for s, v in zip(steps, values)) if e is not None]
    assert online == detect_transitions(steps, values) and online


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": -1}, "threshold"),
        ({"warmup": 2}, "warmup"),
        ({"window": 3}, "window"),
        ({"min_relative_change": float("nan")}, "min_relative_change"),
        ({"settle_points": 10}, "settle_points"),
        ({"settle_fraction": -0.1}, "settle_fraction"),
        ({"drift_threshold": -1.0}, "drift_threshold"),
        ({"drift_allowance": float("inf")}, "drift_allowance"),
        ({"slope_threshold": -2.0}, "slope_threshold"),
        ({"slope_window": 6}, "slope_window"),
    ],
)
def test_bad_detector_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransitionDetector(**kwargs)


def test_mismatched_series_lengths_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        detect_transitions([1, 2], [1.0])


class JumpingSignal(Regressor):
    """Logs a synthetic metric that jumps at step 30, beside a normal training loss."""

    def training_step(self, batch, batch_idx):
        step = self.global_step
        wiggle = 0.05 * math.sin(step)
        self.log("signal", (1.0 if step < 30 else 3.0) + wiggle)
        return super().training_step(batch, batch_idx)


def test_transition_monitor_alerts_everywhere_it_should(tmp_path):
    seen = []
    logger = TensorBoardLogger(str(tmp_path), name="tm")
    monitor = TransitionMonitor(monitor="signal", on_transition=lambda trainer, module, t: seen.append((trainer.global_step, t)), save_checkpoint=True)
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], logger=logger, max_steps=45, log_every_n_steps=1)
    with pytest.warns(TransitionWarning, match="step 31: signal .* onset"):
        trainer.fit(JumpingSignal(), regression_loader())
    # logged during step 30's batch, read after its optimizer step; the end follows once the signal has settled
    assert [(t.step, t.is_onset) for t in monitor.transitions] == [(31, True), (33, False)]
    assert seen == [(t.step, t) for t in monitor.transitions]
    for step in (31, 33):
        assert os.path.exists(tmp_path / "tm" / "version_0" / "checkpoints" / f"transition-signal-step={step}.ckpt")
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("transitions/signal")] == [31, 33]
    assert "transitions/signal/text_summary" in events.Tags()["tensors"]
    restored = TransitionMonitor(monitor="signal")
    restored.load_state_dict(monitor.state_dict())
    assert restored.transitions == monitor.transitions


def test_transition_is_a_small_frozen_record():
    event = Transition(step=3, metric="m", before=1.0, after=2.0, score=5.0, direction="up", reason="r")
    with pytest.raises(AttributeError):
        event.step = 4  # type: ignore[misc]
    assert "step 3" in event.describe()
