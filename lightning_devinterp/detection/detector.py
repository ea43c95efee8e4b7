"""Online change-point detection for a noisy, irregularly sampled series such as λ̂ during training.

Method (one pass, O(window²) per update, plus a least-squares scan over at most ``slope_window`` points):

1. The detector keeps a *segment*: the recent points (at most ``window``) of the current regime.
2. Once the segment holds ``warmup`` points, each new point is compared with the segment's robust linear trend
   (Theil-Sen: median of pairwise slopes against the step, median intercept) extrapolated to the new step.
3. The residual is divided by a noise scale ``sigma = max(s, std)``. ``s`` is 1.4826 x the median of the segment's
   one-step-ahead prediction errors once ``warmup`` of them exist (robust, and honest about extrapolation error;
   only errors below half the threshold count, so a slow excursion is not learnt as noise); before that, the
   robust spread of the segment's successive differences, doubled for the small sample. ``std`` is the point's
   own uncertainty (for λ̂, the standard error over chains), a floor for the noise. sigma is also floored at
   ``relative_noise_floor`` x the segment's level so a nearly constant series does not make every wiggle
   significant.
4. An *onset* needs ``score = |residual| / sigma >= threshold`` and a change of at least ``min_relative_change`` of
   the level: significant against the noise and large in absolute terms. A smooth drift is what the trend follows;
   a jump is what it cannot explain.
   A transition can also be a *ramp* that takes several points, each within the noise (λ̂ climbing while a loss
   drop unfolds). For these a two-sided CUSUM adds up the signed residuals in noise units, less
   ``drift_allowance`` per point; when one side reaches ``drift_threshold`` (and the residuals it added up reach
   ``min_relative_change`` of the level) that is an onset too ("sustained drift"). The trend keeps adapting, so only
   ramps that outpace it are caught. ``drift_threshold=None`` turns it off.
   A ramp that starts from a plateau is also a *change of slope*. Over the longer history of the regime (up to
   ``slope_window`` points) the detector compares one straight line with a line that bends at some earlier point
   (a hinge, scanned over every point with at least ``warmup`` before and ``MIN_POINTS_AFTER_BEND`` after it). When
   the bend explains the points better by ``slope_threshold`` noise units (the square root of the drop in squared
   residuals over sigma²) and the level change it implies by now is at least ``min_relative_change`` of the
   level, that is an onset too ("change of slope"). This is the online form of reading stage boundaries off
   the slope of λ̂ (Hoogland et al. 2024). ``slope_threshold=None`` turns it off.
   On 8-sigma level shifts spread over 8 points (tests/test_transitions.py) the share found during the ramp is
   about 20% for the jump rule alone, 40% with the drift rule and 78% with both; false onsets on stationary and
   trending series without transitions stay at 0.65-0.7 per 100 points.
5. Transitions often take several points (λ̂ dives and recovers while the loss falls). After an onset the detector
   waits until the series *settles*: ``settle_points`` successive differences each below ``settle_fraction`` of
   the onset's jump, or ``window`` points, whichever comes first. It then reports the *end* of the transition,
   from the level before the onset to the settled value, and starts a new segment from the settled points. So one
   transition gives an onset and an end, labelled in ``reason``, and nothing in between.

Points from estimates marked unhealthy still count, and their alerts say so in ``reason`` (a negative or spiking
λ̂ while the loss falls fast is itself a sign of a transition). Non-finite values are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median
from typing import Any, Literal

import numpy as np

SMALL_SAMPLE_INFLATION = 2.0
"""Widens the difference-based noise scale used while fewer than ``warmup`` prediction errors exist."""

MIN_POINTS_AFTER_BEND = 3
"""A change of slope is only considered once this many points follow the bend."""

INLIER_FRACTION = 0.5
"""Only prediction errors below this fraction of ``threshold`` (in noise units) update the noise scale, so a slow
excursion cannot teach the detector that it is noise."""


class TransitionWarning(UserWarning):
    """Issued when a monitored metric jumps: a possible phase transition."""


@dataclass(frozen=True)
class Transition:
    """A detected jump at ``step``: the trend predicted ``before``, the series showed ``after``."""

    step: int
    metric: str
    before: float
    after: float
    score: float
    direction: Literal["up", "down"]
    reason: str

    @property
    def is_onset(self) -> bool:
        return self.reason.startswith("onset")

    def describe(self) -> str:
        return (
            f"possible phase transition at step {self.step}: {self.metric} {self.before:.4g} -> {self.after:.4g} "
            f"({self.direction}, score {self.score:.1f}; {self.reason})"
        )


def _theil_sen(steps: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    slopes = [
        (values[j] - values[i]) / (steps[j] - steps[i])
        for i in range(len(steps))
        for j in range(i + 1, len(steps))
        if steps[j] != steps[i]
    ]
    slope = median(slopes) if slopes else 0.0
    intercept = median(v - slope * s for s, v in zip(steps, values))
    return slope, intercept


class TransitionDetector:
    """Flags jumps that a series' recent robust trend cannot explain, as an onset and an end (see the module docstring).

    Args:
        metric: the name reported in each :class:`Transition`.
        threshold: minimum residual of an onset, in units of the noise scale.
        min_relative_change: minimum residual of an onset as a fraction of the segment's typical magnitude.
        warmup: points a segment needs before it can raise an onset.
        window: most recent points of a segment used for the trend and the noise scale; also the longest a
            transition may last (in points) before its end is reported.
        relative_noise_floor: lower bound of the noise scale as a fraction of the segment's typical magnitude.
        settle_fraction, settle_points: a transition has ended when ``settle_points`` successive differences are
            each below ``settle_fraction`` of its onset jump.
        drift_threshold: CUSUM level (in noise units) at which a sustained one-sided drift is an onset; None turns
            the drift rule off.
        drift_allowance: noise units subtracted from each residual before it is added up, so that noise alone
            rarely accumulates.
        slope_threshold: improvement (in noise units) a bent line must make over a straight one for a change of
            slope to be an onset; None turns the slope rule off.
        slope_window: most recent points of the regime the slope rule looks at.
    """

    def __init__(
        self,
        metric: str = "llc/mean",
        threshold: float = 4.0,
        min_relative_change: float = 0.05,
        warmup: int = 5,
        window: int = 10,
        relative_noise_floor: float = 0.01,
        settle_fraction: float = 0.25,
        settle_points: int = 2,
        drift_threshold: float | None = 8.0,
        drift_allowance: float = 0.5,
        slope_threshold: float | None = 5.0,
        slope_window: int = 30,
    ) -> None:
        numbers = (
            ("threshold", threshold),
            ("drift_threshold", 0.0 if drift_threshold is None else drift_threshold),
            ("drift_allowance", drift_allowance),
            ("slope_threshold", 0.0 if slope_threshold is None else slope_threshold),
            ("min_relative_change", min_relative_change),
            ("relative_noise_floor", relative_noise_floor),
            ("settle_fraction", settle_fraction),
        )
        for name, value in numbers:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 3:
            raise ValueError(f"warmup must be an integer >= 3 (a trend and a noise scale need points), got {warmup!r}.")
        if isinstance(window, bool) or not isinstance(window, int) or window < warmup:
            raise ValueError(f"window must be an integer >= warmup ({warmup}), got {window!r}.")
        if isinstance(slope_window, bool) or not isinstance(slope_window, int) or slope_window < warmup + MIN_POINTS_AFTER_BEND:
            raise ValueError(f"slope_window must be an integer >= warmup + {MIN_POINTS_AFTER_BEND}, got {slope_window!r}.")
        if isinstance(settle_points, bool) or not isinstance(settle_points, int) or not 1 <= settle_points < window:
            raise ValueError(f"settle_points must be an integer in [1, window), got {settle_points!r}.")
        self.metric = metric
        self.threshold = float(threshold)
        self.min_relative_change = float(min_relative_change)
        self.warmup = warmup
        self.window = window
        self.relative_noise_floor = float(relative_noise_floor)
        self.settle_fraction = float(settle_fraction)
        self.settle_points = settle_points
        self.drift_threshold = None if drift_threshold is None else float(drift_threshold)
        self.drift_allowance = float(drift_allowance)
        self.slope_threshold = None if slope_threshold is None else float(slope_threshold)
        self.slope_window = slope_window
        self.reset()

    def reset(self) -> None:
        """Forget the series."""
        self._segment: list[tuple[int, float]] = []
        self._errors: list[float] = []
        self._onset: dict[str, Any] | None = None
        self._transient: list[tuple[int, float]] = []
        self._cusum = [0.0, 0.0]
        self._drift = [0.0, 0.0]
        self._regime: list[tuple[int, float]] = []

    @property
    def in_transition(self) -> bool:
        """True between an onset and its end."""
        return self._onset is not None

    def score(self, step: int, value: float, std: float | None = None) -> tuple[float, float, float]:
        """``(score, predicted, sigma)`` of a candidate point against the current segment, without recording it."""
        steps = [float(s) for s, _ in self._segment]
        values = [v for _, v in self._segment]
        slope, intercept = _theil_sen(steps, values)
        predicted = intercept + slope * step
        if len(self._errors) >= self.warmup:
            residual_scale = 1.4826 * median(self._errors)
        else:
            differences = [b - a for a, b in zip(values, values[1:])]
            typical = median(differences)
            residual_scale = SMALL_SAMPLE_INFLATION * 1.4826 * median(abs(d - typical) for d in differences) / math.sqrt(2)
        level = median(abs(v) for v in values)
        sigma = max(residual_scale, std or 0.0, self.relative_noise_floor * level, 1e-12)
        return abs(value - predicted) / sigma, predicted, sigma

    def update(self, step: int, value: float, std: float | None = None, healthy: bool = True) -> Transition | None:
        """Add one point; return a :class:`Transition` (an onset or an end) or None."""
        value = float(value)
        if not math.isfinite(value):
            return None
        if std is not None and not math.isfinite(std):
            std = None
        point = (int(step), value)
        if self._onset is not None:
            return self._follow_transition(point, healthy)
        if len(self._segment) >= self.warmup:
            score, predicted, sigma = self.score(step, value, std)
            change = abs(value - predicted)
            level = median(abs(v) for _, v in self._segment)
            if score >= self.threshold and change >= self.min_relative_change * level:
                return self._begin(point, predicted, score, sigma, "onset: jump beyond the recent trend", healthy)
            drift = self._accumulate_drift(value - predicted, sigma)
            if self.drift_threshold is not None and max(self._cusum) >= self.drift_threshold and drift >= self.min_relative_change * level:
                return self._begin(point, predicted, max(self._cusum), sigma, "onset: sustained drift away from the recent trend", healthy)
            if self.slope_threshold is not None:
                bend_score, before, bend_change = self._slope_change([*self._regime, point], sigma)
                if bend_score >= self.slope_threshold and abs(bend_change) >= self.min_relative_change * level:
                    return self._begin(point, before, bend_score, sigma, "onset: change of slope", healthy, abs(bend_change))
            if score < INLIER_FRACTION * self.threshold:
                self._errors.append(change)
                del self._errors[: -2 * self.window]
        self._segment.append(point)
        del self._segment[: -self.window]
        self._regime.append(point)
        del self._regime[: -self.slope_window]
        return None

    def _accumulate_drift(self, residual: float, sigma: float) -> float:
        """Update the two one-sided CUSUMs (up, down) with a residual; return the change the leading side has added up."""
        for side, signed in enumerate((residual, -residual)):
            grown = self._cusum[side] + signed / sigma - self.drift_allowance
            self._cusum[side] = max(0.0, grown)
            self._drift[side] = self._drift[side] + signed if grown > 0 else 0.0
        return self._drift[0] if self._cusum[0] >= self._cusum[1] else self._drift[1]

    def _slope_change(self, points: list[tuple[int, float]], sigma: float) -> tuple[float, float, float]:
        """Best bend of ``points``: ``(score, before, change)``, with the score in noise units, ``before`` the line
        before the bend extended to the last point, and ``change`` what the bend adds there.

        Adding a hinge regressor h to a straight-line fit lowers the squared residuals by (h⊥·y)² / (h⊥·h⊥), with h⊥
        the part of h that the line cannot express, so all bends are scored in one batch of matrix products."""
        if len(points) < self.warmup + MIN_POINTS_AFTER_BEND:
            return 0.0, points[-1][1], 0.0
        steps = np.array([s for s, _ in points], dtype=float)
        values = np.array([v for _, v in points])
        time = (steps - steps.mean()) / max(float(steps.std()), 1e-12)
        line = np.stack([np.ones_like(time), time], axis=1)
        hinges = np.maximum(0.0, time[None, :] - time[self.warmup - 1 : len(points) - MIN_POINTS_AFTER_BEND, None])
        projection = line @ np.linalg.pinv(line)
        beyond_line = hinges - hinges @ projection
        norms = np.einsum("ij,ij->i", beyond_line, beyond_line)
        explained = beyond_line @ values
        gains = np.where(norms > 1e-12, explained**2 / np.maximum(norms, 1e-12), 0.0) / sigma**2
        best = int(np.argmax(gains))
        if gains[best] <= 0.0:
            return 0.0, points[-1][1], 0.0
        extra = explained[best] / norms[best]
        intercept, slope = np.linalg.lstsq(line, values - extra * hinges[best], rcond=None)[0]
        return math.sqrt(float(gains[best])), float(intercept + slope * time[-1]), float(extra * hinges[best, -1])

    def _begin(
        self, point: tuple[int, float], predicted: float, score: float, sigma: float, reason: str, healthy: bool,
        jump: float | None = None,
    ) -> Transition:
        """Open a transition at ``point``; it ends once successive differences fall well below ``jump`` (by default
        the distance from the prediction)."""
        self._onset = {"step": point[0], "before": predicted, "jump": abs(point[1] - predicted) if jump is None else jump, "sigma": sigma}
        self._transient = [point]
        self._cusum = [0.0, 0.0]
        self._drift = [0.0, 0.0]
        self._regime = []
        return self._make(point, predicted, score, reason, healthy)

    def _follow_transition(self, point: tuple[int, float], healthy: bool) -> Transition | None:
        assert self._onset is not None
        self._transient.append(point)
        recent = [v for _, v in self._transient[-(self.settle_points + 1) :]]
        settled = len(recent) == self.settle_points + 1 and all(
            abs(b - a) < self.settle_fraction * self._onset["jump"] for a, b in zip(recent, recent[1:])
        )
        if not settled and len(self._transient) < self.window:
            return None
        before = self._onset["before"]
        reason = f"end of the transition that began at step {self._onset['step']}" + ("" if settled else " (did not settle)")
        transition = self._make(point, before, abs(point[1] - before) / self._onset["sigma"], reason, healthy)
        self._segment = self._transient[-self.settle_points :]
        self._regime = list(self._segment)
        self._errors = []
        self._onset = None
        self._transient = []
        return transition

    def _make(self, point: tuple[int, float], before: float, score: float, reason: str, healthy: bool) -> Transition:
        if not healthy:
            reason += "; the estimate was marked unhealthy, so read it as a symptom, not a measurement"
        return Transition(
            step=point[0],
            metric=self.metric,
            before=before,
            after=point[1],
            score=score,
            direction="up" if point[1] > before else "down",
            reason=reason,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "segment": [list(p) for p in self._segment],
            "errors": list(self._errors),
            "onset": dict(self._onset) if self._onset is not None else None,
            "transient": [list(p) for p in self._transient],
            "cusum": list(self._cusum),
            "drift": list(self._drift),
            "regime": [list(p) for p in self._regime],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._segment = [(int(step), float(value)) for step, value in state["segment"]]
        self._errors = [float(error) for error in state["errors"]]
        self._onset = dict(state["onset"]) if state["onset"] is not None else None
        self._transient = [(int(step), float(value)) for step, value in state["transient"]]
        self._cusum = [float(c) for c in state["cusum"]]
        self._drift = [float(d) for d in state["drift"]]
        self._regime = [(int(step), float(value)) for step, value in state["regime"]]


def detect_transitions(
    steps: Sequence[int],
    values: Sequence[float],
    stds: Sequence[float | None] | None = None,
    *,
    metric: str = "value",
    **detector_kwargs: Any,
) -> list[Transition]:
    """Run :class:`TransitionDetector` over a whole series (post-hoc analysis); same method and defaults as online."""
    if len(steps) != len(values) or (stds is not None and len(stds) != len(values)):
        raise ValueError("steps, values and stds must have the same length.")
    detector = TransitionDetector(metric=metric, **detector_kwargs)
    found = []
    for index, (step, value) in enumerate(zip(steps, values)):
        event = detector.update(step, value, None if stds is None else stds[index])
        if event is not None:
            found.append(event)
    return found
