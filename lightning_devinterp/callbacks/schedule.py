"""When the monitor estimates: every N steps, K log-spaced steps, or as often as a wall-time budget allows."""

from __future__ import annotations

import math
import time
from typing import Any


class EstimateSchedule:
    """Decides at which optimizer steps an estimate is due. Exactly one mode is active.

    - ``every_n_steps=N``: at every multiple of N.
    - ``log_spaced=K``: at K steps spread log-uniformly over ``[1, total_steps]`` (duplicates merged), dense early
      when most structure forms.
    - ``max_overhead=f``: whenever another estimate, predicted to cost as much as the last one, keeps the
      monitor's share of wall time since training started at or below f. The first estimate always runs (it
      measures the cost); the one at the end of training obeys the budget like any other.
    """

    def __init__(self, every_n_steps: int | None = None, log_spaced: int | None = None, max_overhead: float | None = None) -> None:
        chosen = [name for name, value in (("every_n_steps", every_n_steps), ("log_spaced", log_spaced), ("max_overhead", max_overhead)) if value is not None]
        if len(chosen) > 1:
            raise ValueError(f"choose one schedule, got {' and '.join(chosen)}.")
        if not chosen:
            max_overhead = 0.1
        for name, value in (("every_n_steps", every_n_steps), ("log_spaced", log_spaced)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if max_overhead is not None and not (isinstance(max_overhead, (int, float)) and 0 < max_overhead < 1):
            raise ValueError(f"max_overhead must be a fraction of wall time in (0, 1), got {max_overhead!r}.")
        self.every_n_steps = every_n_steps
        self.log_spaced = log_spaced
        self.max_overhead = max_overhead
        self._log_steps: set[int] = set()
        self._clock_start = time.perf_counter()
        self._elapsed_before = 0.0
        self.own_seconds = 0.0
        self.last_cost: float | None = None

    @property
    def is_budgeted(self) -> bool:
        return self.max_overhead is not None

    def describe(self) -> str:
        if self.every_n_steps is not None:
            return f"every {self.every_n_steps} steps"
        if self.log_spaced is not None:
            return f"{self.log_spaced} log-spaced steps"
        return f"at most {self.max_overhead:.0%} of wall time"

    def start(self, total_steps: int | None) -> None:
        """Begin timing (for the budget) and lay out log-spaced steps over ``total_steps``."""
        self._clock_start = time.perf_counter()
        if self.log_spaced is not None:
            if not total_steps or total_steps < 1 or math.isinf(total_steps):
                raise ValueError("log_spaced needs a known number of training steps: set max_steps or max_epochs on the Trainer.")
            self._log_steps = {
                max(1, round(math.exp(math.log(total_steps) * k / max(1, self.log_spaced - 1)))) for k in range(self.log_spaced)
            }

    def elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._clock_start

    def is_due(self, step: int) -> bool:
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        if self.log_spaced is not None:
            return step in self._log_steps
        return self.within_budget()

    def within_budget(self) -> bool:
        if not self.is_budgeted or self.last_cost is None:
            return True
        return self.own_seconds + self.last_cost <= self.max_overhead * (self.elapsed() + self.last_cost)

    def charge(self, seconds: float) -> None:
        """Count the monitor's own wall time that is not an estimate (data preparation)."""
        self.own_seconds += seconds

    def record(self, seconds: float) -> None:
        """Account for one estimate's wall time; it predicts the next one's."""
        self.own_seconds += seconds
        self.last_cost = seconds

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed(), "own_seconds": self.own_seconds, "last_cost": self.last_cost}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._elapsed_before = state["elapsed"]
        self._clock_start = time.perf_counter()
        self.own_seconds = state["own_seconds"]
        self.last_cost = state["last_cost"]
