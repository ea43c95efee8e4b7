"""LossDropDetector on synthetic losses: falls after a plateau, on the minibatch loss and on the fixed-data loss."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_devinterp.detection.loss_drops import FIXED_DATA_METRIC, LossDropDetector
from tests.helpers.series import loss_curve, slow_fall


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


def decay_with_a_spike(step, rate, spike, start, length, plateau_end=800):
    """A plateau at 1 until ``plateau_end``, then a decay of ``rate`` (log units) per 100 steps, no faster than a
    plateau may fall, with the loss raised by ``spike`` (log units) over ``length`` steps from ``start`` (shorter
    than a plateau)."""
    trend = -rate * max(0, step - plateau_end) / 100
    return math.exp(trend + (spike if start <= step < start + length else 0.0))


@given(rate=st.floats(0.0, 0.05), spike=st.floats(0.2, 0.7), readings=st.integers(1, 3), delay=st.integers(2, 10))
@settings(max_examples=60, deadline=None)
def test_a_spike_in_a_slow_decay_after_a_plateau_is_not_a_drop(rate, spike, readings, delay):
    """The loss comes back down from the spike fast, and ends below the plateau, but from its lowest value since
    the plateau it falls no faster than before (Adam late in training decays so, spikes and all): neither the
    every-step loss nor the fixed-data loss read every 25 steps (the spike over 1-3 readings) reports it."""
    start, length = 800 + 25 * delay, 25 * readings
    steps = list(range(1800))
    losses = [decay_with_a_spike(step, rate, spike, start, length) for step in steps]
    assert run_loss(steps, losses) == []
    detector = LossDropDetector()
    events = [detector.update_fixed_data(step, losses[step]) for step in range(25, 1800, 25)]
    assert [event for event in events if event is not None] == []


def test_a_fall_that_speeds_up_after_a_slow_decay_since_the_plateau_is_reported():
    """The counterpart: a decay as slow as above, then a fall at three times the threshold, on both series."""
    steps = list(range(1800))
    losses = [math.exp(-0.06 * max(0, s - 800) / 100 - 0.24 * max(0, s - 1000) / 100) for s in steps]
    onsets = [event.step for event in run_loss(steps, losses) if event.is_onset]
    assert len(onsets) == 1 and 1000 < onsets[0] <= 1100
    detector = LossDropDetector()
    fixed = [detector.update_fixed_data(step, losses[step]) for step in range(25, 1800, 25)]
    (onset,) = [event.step for event in fixed if event is not None and event.is_onset]
    assert 1000 < onset <= 1100


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


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"plateau": 0.2}, "plateau"), ({"window": 0}, "window"), ({"direction": "up"}, "direction")]
)
def test_bad_loss_detector_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossDropDetector(**kwargs)


def staircase(rng, stages, steps, noise=0.3):
    """A minibatch loss falling by ``fall`` (log units) over each ``(start, duration, fall)`` stage, flat between."""
    t = np.arange(steps)
    log_loss = np.zeros(steps)
    for start, duration, fall in stages:
        log_loss -= fall * np.clip((t - start) / duration, 0, 1)
    return t.tolist(), np.exp(log_loss + rng.normal(0, noise, steps)).tolist()


def test_stages_a_short_pause_apart_each_get_an_onset_and_an_end():
    """Three falls of 10x over 100 steps, 150-step pauses between: each fall is closed when it stops, and the next
    one is a stage of its own (a pause shorter than a plateau is enough once a fall has ended)."""
    rng = np.random.default_rng(7)
    found = 0
    for _ in range(20):
        events = run_loss(*staircase(rng, [(500, 100, 2.3), (750, 100, 2.3), (1000, 100, 2.3)], steps=1500))
        onsets = [e.step for e in events if e.is_onset]
        ends = [e.step for e in events if not e.is_onset]
        found += (
            [e.is_onset for e in events] == [True, False] * 3
            and all(start <= onset <= start + 100 for start, onset in zip((500, 750, 1000), onsets))
            and all(stop <= end <= stop + 175 for stop, end in zip((600, 850, 1100), ends))
        )
    assert found >= 19


def test_a_slow_stage_after_a_fast_one_is_a_stage_and_the_first_ends_first():
    """A fall of 10x in 100 steps, a 100-step pause, then a fall of 25% per 100 steps for 800 steps (under this noise
    only the longer time scales see it, so its onset comes up to 300 steps in)."""
    rng = np.random.default_rng(8)
    found = 0
    for _ in range(20):
        events = run_loss(*staircase(rng, [(500, 100, 2.3), (700, 800, 2.0)], steps=2300))
        found += (
            [e.is_onset for e in events] == [True, False, True, False]
            and events[1].step <= 775
            and 700 <= events[2].step <= 1000
        )
    assert found >= 19


@pytest.mark.parametrize(
    "stages",
    [
        pytest.param([(500, 100, 2.3), (680, 100, 2.3)], id="an 80-step pause"),
        pytest.param([(500, 100, 1.5), (600, 90, 0.12), (690, 150, 1.5)], id="a pause that only slows the fall"),
    ],
)
def test_stages_closer_than_the_lag_and_a_half_an_end_needs_each_get_an_onset(stages):
    """The pause between two falls is shorter than the 150 steps a calm end takes to confirm (or the loss keeps
    falling through it at a twelfth of the stages' rate): the rate's dip and rise close the first stage there, and
    the second gets its own onset. The first stage's ``after`` and the second's ``before`` are the loss near the
    pause, not the loss partway down the second fall."""
    pause = math.exp(-sum(fall for _, _, fall in stages[:-1]))
    rng = np.random.default_rng(10)
    found = 0
    for _ in range(20):
        events = run_loss(*staircase(rng, stages, steps=1500))
        ends = [e for e in events if not e.is_onset]
        onsets = [e for e in events if e.is_onset]
        found += (
            [e.is_onset for e in events] == [True, False, True, False]
            and ends[0].step <= stages[-1][0] + 100
            and stages[-1][0] <= onsets[1].step <= stages[-1][0] + 150
            and all(pause / 2 <= value <= 1.2 * pause for value in (ends[0].after, onsets[1].before))
        )
    assert found >= 18


def test_the_end_of_a_fall_first_seen_on_the_fixed_data_is_judged_on_the_every_step_loss():
    """The fixed-data loss at dense estimates (every 25 steps) reports the onset; the every-step loss, which sees
    the fall clearly too and resolves time as finely, judges its end, within 150 steps of it."""
    rng = np.random.default_rng(9)
    for _ in range(10):
        steps, minibatch = staircase(rng, [(1000, 200, 2.0)], steps=2000, noise=0.2)

        def exact(step):
            return math.exp(-2.0 * min(max(step - 1000, 0), 200) / 200)

        onset, end = run_both(steps, minibatch, exact, every=25)
        assert onset.metric == FIXED_DATA_METRIC and end.metric == "train_loss"
        assert 1200 <= end.step <= 1350
