"""Online change-point detection for a noisy, irregularly sampled series such as λ̂ during training.

Method (one pass, O(window) per update):

1. The detector keeps the current *segment*: the last ``window`` points since the start or since the last alert.
2. Once the segment holds ``warmup`` points, each new point is compared with the segment's robust linear trend
   (Theil-Sen: median of pairwise slopes against the step, median intercept) extrapolated to the new step.
3. The residual is divided by a noise scale ``sigma = sqrt(s**2 + std**2)``, where ``s`` is 1.4826 x the median
   of the last ``2 * window`` one-step-ahead prediction errors (robust, and honest about extrapolation error;
   kept across transitions, since the noise level rarely changes with the level) and ``std`` the new point's
   own uncertainty (for λ̂, the standard error over chains); sigma is floored at ``relative_noise_floor`` x the
   segment's level so a nearly constant series does not make every wiggle significant. No alert is raised before
   ``warmup`` prediction errors exist (the first ``2 * warmup`` points), whatever ``std`` says: an estimate's own
   spread over chains understates how much consecutive estimates scatter.
4. An alert needs ``score = |residual| / sigma >= threshold`` *and* a change of at least ``min_relative_change``
   of the level: a jump must be both significant against the noise and large in absolute terms. Following a smooth
   drift is what the trend is for; a jump is what it cannot explain.
5. After an alert the segment restarts at the new point, so the new regime needs its own ``warmup`` points before
   the next alert: one transition gives one alert.

Points from estimates marked unhealthy still count, and their alerts say so in ``reason`` (a negative or spiking
λ̂ while the loss falls fast is itself a sign of a transition). Non-finite values are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median
from typing import Any, Literal


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
    """Flags points that a series' recent robust trend cannot explain (see the module docstring for the method).

    Args:
        metric: the name reported in each :class:`Transition`.
        threshold: minimum residual in units of the noise scale.
        min_relative_change: minimum residual as a fraction of the segment's typical magnitude.
        warmup: points a segment needs before it can raise an alert.
        window: most recent points of the segment used for the trend and the noise scale.
        relative_noise_floor: lower bound of the noise scale as a fraction of the segment's typical magnitude.
    """

    def __init__(
        self,
        metric: str = "llc/mean",
        threshold: float = 4.0,
        min_relative_change: float = 0.1,
        warmup: int = 5,
        window: int = 10,
        relative_noise_floor: float = 0.02,
    ) -> None:
        for name, value in (("threshold", threshold), ("min_relative_change", min_relative_change), ("relative_noise_floor", relative_noise_floor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 3:
            raise ValueError(f"warmup must be an integer >= 3 (a trend and a noise scale need points), got {warmup!r}.")
        if isinstance(window, bool) or not isinstance(window, int) or window < warmup:
            raise ValueError(f"window must be an integer >= warmup ({warmup}), got {window!r}.")
        self.metric = metric
        self.threshold = float(threshold)
        self.min_relative_change = float(min_relative_change)
        self.warmup = warmup
        self.window = window
        self.relative_noise_floor = float(relative_noise_floor)
        self._segment: list[tuple[int, float]] = []
        self._errors: list[float] = []

    def reset(self) -> None:
        """Forget the series."""
        self._segment = []
        self._errors = []

    def score(self, step: int, value: float, std: float | None = None) -> tuple[float, float, float]:
        """``(score, predicted, sigma)`` of a candidate point against the current segment, without recording it."""
        steps = [float(s) for s, _ in self._segment]
        values = [v for _, v in self._segment]
        slope, intercept = _theil_sen(steps, values)
        predicted = intercept + slope * step
        residual_scale = 1.4826 * median(self._errors) if self._errors else 0.0
        level = median(abs(v) for v in values)
        sigma = max(math.hypot(residual_scale, std or 0.0), self.relative_noise_floor * level, 1e-12)
        return abs(value - predicted) / sigma, predicted, sigma

    def update(self, step: int, value: float, std: float | None = None, healthy: bool = True) -> Transition | None:
        """Add one point; return a :class:`Transition` if it is a jump, else None."""
        value = float(value)
        if not math.isfinite(value):
            return None
        if std is not None and not math.isfinite(std):
            std = None
        transition = None
        if len(self._segment) >= self.warmup:
            score, predicted, _ = self.score(step, value, std)
            level = median(abs(v) for _, v in self._segment)
            change = abs(value - predicted)
            noise_known = len(self._errors) >= self.warmup
            if noise_known and score >= self.threshold and change >= self.min_relative_change * level:
                reason = "jump beyond the recent trend"
                if not healthy:
                    reason += "; the estimate was marked unhealthy, so read it as a symptom, not a measurement"
                transition = Transition(
                    step=int(step),
                    metric=self.metric,
                    before=predicted,
                    after=value,
                    score=score,
                    direction="up" if value > predicted else "down",
                    reason=reason,
                )
                self._segment = []
            else:
                self._errors.append(change)
                del self._errors[: -2 * self.window]
        self._segment.append((int(step), value))
        del self._segment[: -self.window]
        return transition

    def state_dict(self) -> dict[str, Any]:
        return {"segment": [list(point) for point in self._segment], "errors": list(self._errors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._segment = [(int(step), float(value)) for step, value in state["segment"]]
        self._errors = [float(error) for error in state["errors"]]


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
