"""LevelShiftDetector (and ``detect_transitions`` on λ̂ alone) on synthetic series with known level shifts."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_devinterp import Transition, TransitionDetector, detect_transitions
from tests.helpers.series import sparse_series


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
    [
        ({"threshold": -1}, "threshold"),
        ({"warmup": 2}, "warmup"),
        ({"window": 3}, "window"),
        ({"confirm": 0}, "confirm"),
        ({"min_relative_change": float("nan")}, "min_relative_change"),
        ({"absolute_floor": 0.0}, "absolute_floor"),
    ],
)
def test_bad_detector_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransitionDetector(**kwargs)


def test_mismatched_series_lengths_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        detect_transitions([1, 2], [1.0])


def test_transition_is_a_small_frozen_record():
    event = Transition(
        step=3, metric="m", before=1.0, after=2.0, score=5.0, direction="up", reason="onset: r", evidence="λ̂ change"
    )
    with pytest.raises(AttributeError):
        event.step = 4  # type: ignore[misc]
    assert "step 3" in event.describe() and "evidence: λ̂ change" in event.describe()
