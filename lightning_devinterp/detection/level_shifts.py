"""Change-point detection for a sparse, noisy series such as λ̂ during training: shifts between settled levels.

The detector keeps the current *regime*: the last ``window`` healthy points since the last change. Its robust
trend (Theil-Sen: median pairwise slope, median intercept; flat until the regime has ``TREND_POINTS`` points)
predicts the next point. The noise scale is

    S = max(σ, the points' own standard errors (median), relative_floor x |level|, absolute_floor x max(1, |level|))
        x √(1 + 2 / n)

where σ = 1.4826 x MAD of the successive differences of the last ``NOISE_POINTS`` healthy points / √2 (robust to
drift, and not reset by each regime, so a short regime does not make the noise look small), n the regime's size,
and the *level* the median of the regime's last three points. A new healthy point within ``threshold`` noise
units of the prediction joins the regime, so a smooth drift, however long, moves the regime with it and is never
reported. A point farther out, and by at least ``min_relative_change`` of the level, is a *candidate*; ``confirm``
successive candidates on the same side are a transition, reported at the step of the last of them (when it is
known; the reason names the first) with ``before`` = the level (a median of values the series showed, never an
extrapolation) and ``after`` = the candidates' median; they then start the new regime. A candidate followed by a
point back inside the band was noise and is forgotten.

A regime needs ``warmup`` points before it can be left; points from unhealthy estimates (w* not at a minimum, a
coarse step) never join a regime or confirm a change, but they are what an onset of a loss drop is often
accompanied by (see :class:`~lightning_devinterp.detection.combined.TransitionEvidence`). Non-finite values are
ignored; steps must increase strictly.
"""

from __future__ import annotations

import math
from statistics import median
from typing import Any

from lightning_devinterp._checks import check_count, check_number, is_integer
from lightning_devinterp.detection.robust import robust_std, theil_sen
from lightning_devinterp.detection.transition import Transition
from lightning_devinterp.metric_names import LLC_MEAN

TREND_POINTS = 6
"""A regime's trend is used once it has this many points; before, its level alone predicts the next point."""

NOISE_POINTS = 20
"""Healthy points (across regimes) whose successive differences give the noise scale."""


class LevelShiftDetector:
    """Reports shifts of a sparse series between settled levels (see the module docstring).

    Args:
        metric: the name reported in each :class:`Transition`.
        threshold: distance from the regime's level, in noise units, beyond which a point is a candidate.
        min_relative_change: a candidate must also differ from the level by this share of it.
        warmup: points a regime needs before it can be left.
        window: most recent regime points used for its level and noise scale.
        confirm: successive candidates on one side that make a transition.
        relative_floor: lower bound of the noise scale as a share of the level.
        absolute_floor: lower bound of the noise scale, so that a constant series does not make every blip count.
    """

    def __init__(
        self,
        metric: str = LLC_MEAN,
        threshold: float = 5.0,
        min_relative_change: float = 0.2,
        warmup: int = 4,
        window: int = 8,
        confirm: int = 3,
        relative_floor: float = 0.03,
        absolute_floor: float = 1e-6,
    ) -> None:
        for name, value in (
            ("threshold", threshold),
            ("min_relative_change", min_relative_change),
            ("relative_floor", relative_floor),
        ):
            check_number(name, value)
        check_number("absolute_floor", absolute_floor, allow_minimum=False)
        check_count("warmup", warmup, 3)
        check_count("confirm", confirm, 1)
        if not is_integer(window) or window < warmup:
            raise ValueError(f"window must be an integer >= warmup ({warmup}), got {window!r}.")
        self.metric = metric
        self.threshold = float(threshold)
        self.min_relative_change = float(min_relative_change)
        self.warmup, self.window, self.confirm = warmup, window, confirm
        self.relative_floor, self.absolute_floor = float(relative_floor), float(absolute_floor)
        self.reset()

    def reset(self) -> None:
        """Forget the series (a change of estimator settings makes the old level incomparable)."""
        self._regime: list[tuple[int, float, float]] = []
        self._candidates: list[tuple[int, float, float]] = []
        self._recent: list[float] = []
        self._last_step: int | None = None

    @property
    def in_transition(self) -> bool:
        """True while points are leaving the regime but the change is not confirmed yet."""
        return bool(self._candidates)

    @property
    def level(self) -> float | None:
        """The current regime's level, the median of its last three points (None before ``warmup`` points)."""
        return median(v for _, v, _ in self._regime[-3:]) if len(self._regime) >= self.warmup else None

    def _trend(self) -> tuple[float, float]:
        if len(self._regime) < TREND_POINTS:
            return 0.0, median(v for _, v, _ in self._regime)
        steps = [s - self._regime[0][0] for s, _, _ in self._regime]
        return theil_sen(steps, [v for _, v, _ in self._regime])

    def predict(self, step: int) -> float:
        """The regime's trend at ``step``."""
        slope, intercept = self._trend()
        return intercept + slope * (step - self._regime[0][0])

    def scale(self) -> float:
        """The noise scale S of the next point's distance from the regime's prediction (see the module docstring)."""
        differences = [b - a for a, b in zip(self._recent, self._recent[1:])]
        sigma = robust_std(differences) / math.sqrt(2) if len(differences) >= 2 else 0.0
        stds = [e for _, _, e in self._regime if e > 0]
        level = self.level if self.level is not None else median(v for _, v, _ in self._regime)
        floor = max(
            sigma,
            median(stds) if stds else 0.0,
            self.relative_floor * abs(level),
            self.absolute_floor * max(1.0, abs(level)),
        )
        return floor * math.sqrt(1.0 + 2.0 / len(self._regime))

    def update(self, step: int, value: float, std: float | None = None, healthy: bool = True) -> Transition | None:
        """Add one point; return a :class:`Transition` or None."""
        if not is_integer(step):
            raise ValueError(f"steps must be integers, got {step!r}.")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"steps must increase strictly: {step} after {self._last_step}.")
        if std is not None and (not isinstance(std, (int, float)) or (math.isfinite(std) and std < 0)):
            raise ValueError(f"std must be a number >= 0, got {std!r}.")
        self._last_step = int(step)
        value = float(value)
        if not math.isfinite(value) or not healthy:
            return None
        point = (int(step), value, float(std) if std is not None and math.isfinite(std) else 0.0)
        self._recent.append(value)
        del self._recent[:-NOISE_POINTS]
        level = self.level
        if level is None:
            self._join(point)
            return None
        scale = self.scale()
        distance = value - self.predict(step)
        if abs(distance) < self.threshold * scale or abs(value - level) < self.min_relative_change * abs(level):
            self._candidates = []
            self._join(point)
            return None
        if self._candidates and (self._candidates[0][1] - level) * distance < 0:
            self._candidates = []
        self._candidates.append(point)
        if len(self._candidates) < self.confirm:
            return None
        after = median(v for _, v, _ in self._candidates)
        transition = Transition(
            step=int(step),
            metric=self.metric,
            before=level,
            after=after,
            score=abs(after - level) / scale,
            direction="up" if after > level else "down",
            reason=(
                f"onset: {self.metric} left the level of its last {len(self._regime)} points at step {self._candidates[0][0]} "
                f"and stayed away for {self.confirm}"
            ),
            evidence="λ̂ change",
        )
        self._regime, self._candidates = list(self._candidates), []
        return transition

    def _join(self, point: tuple[int, float, float]) -> None:
        self._regime.append(point)
        del self._regime[: -self.window]

    def state_dict(self) -> dict[str, Any]:
        return {
            "regime": [list(p) for p in self._regime],
            "candidates": [list(p) for p in self._candidates],
            "recent": list(self._recent),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._regime = [(int(s), float(v), float(e)) for s, v, e in state["regime"]]
        self._candidates = [(int(s), float(v), float(e)) for s, v, e in state["candidates"]]
        self._recent = [float(v) for v in state["recent"]]
        self._last_step = state["last_step"]


TransitionDetector = LevelShiftDetector
"""The name :class:`LevelShiftDetector` had before 0.3; kept so that existing code keeps working."""
