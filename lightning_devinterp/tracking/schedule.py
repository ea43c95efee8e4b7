"""When the monitor estimates (and reads L(w*) between estimates), and how much wall time each estimate may take."""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lightning_devinterp._checks import check_count

TARGET_ESTIMATES = 30
"""Estimates the budgeted schedule plans over a run of known length."""

EARLY_ESTIMATES = 10
"""Of those, how many are log-spaced over the first :data:`EARLY_FRACTION` of training (transitions cluster early)."""

EARLY_FRACTION = 0.1
"""The part of training the early, log-spaced estimates cover; the rest are evenly spaced."""

MIN_ESTIMATES = 20
"""A curve needs points: on short runs the budget may stretch, up to twice ``max_overhead``, to afford this many
estimates of the smallest size."""

PACE_STEPS = 256
"""The recent optimizer steps whose median duration projects the training time."""

FIRST_FRACTION = 0.005
"""The first planned estimate comes after this share of training (at least one step): at a random
initialisation w* is no minimum, and λ̂ there is not a measurement."""

FIXED_LOSS_EVERY = 25
"""Between estimates, L(w*) on the estimates' fixed data (a forward pass, no chains) is read for the loss-drop
detector every this many steps: it is the detector's series without minibatch noise, and estimates far apart
(an explicit schedule) would leave it too coarse to date the stages of a staircase."""

FIXED_LOSS_SHARE = 0.03
"""Readings of L(w*) between estimates are spaced so that they cost at most this share of the training time (further
apart than :data:`FIXED_LOSS_EVERY` where the fixed data is large); under the budgeted schedule they are extras,
taken only when the budget has room beyond the planned estimates."""


def planned_steps(total_steps: int, count: int = TARGET_ESTIMATES) -> list[int]:
    """The budgeted schedule's plan: log-spaced from :data:`FIRST_FRACTION` to :data:`EARLY_FRACTION` of the run,
    then evenly spaced to its last step.

    Args:
        total_steps: the run's length in optimizer steps.
        count: how many steps (fewer on short runs, where they coincide).
    """
    first = max(1, round(FIRST_FRACTION * total_steps))
    early_end = max(first, round(EARLY_FRACTION * total_steps))
    early = [round(first * (early_end / first) ** (k / (EARLY_ESTIMATES - 1))) for k in range(EARLY_ESTIMATES)]
    late_count = count - EARLY_ESTIMATES
    late = [round(early_end + (total_steps - early_end) * (k + 1) / late_count) for k in range(late_count)]
    return sorted(set(early + late))


class EstimateSchedule:
    """Which steps get an estimate, and the wall-time budget of the default schedule.

    Choose at most one of ``every_n_steps`` (every n optimizer steps, and step 0), ``log_spaced`` (K steps
    log-uniform over the run, and step 0) or ``max_overhead`` (the default, 0.1). With ``max_overhead=f`` and a
    known run length, :data:`TARGET_ESTIMATES` steps are planned by :func:`planned_steps`, and each estimate is
    sized so that the monitor's wall time stays within ``f`` of the training time: the budget counts everything
    the monitor does in its hooks (data preparation, step-size adaptation, sampling, logging), not only sampling.
    On short runs, where that would leave fewer than :data:`MIN_ESTIMATES` estimates, the budget stretches up to
    ``2 f`` to afford them. The early, log-spaced estimates are taken at the smallest size (the projection of the
    run's length is least reliable then, and they are many). When even that cannot afford every planned estimate at its smallest size, the plan is
    thinned evenly (error diffusion: each planned step adds the affordable share to a credit, and runs when the
    credit reaches one), so the curve keeps points early and late. Without a known run length, an estimate runs
    whenever the budget allows.

    Args:
        every_n_steps: estimate every this many optimizer steps (and at step 0).
        log_spaced: estimate at this many log-spaced steps (and at step 0).
        max_overhead: the budget, as a fraction of the training time (the default schedule, 0.1).
        clock: the wall clock the budget reads, in seconds: training time is read from it.
        work_clock: what the monitor's own time (:meth:`timed`) is read from; default ``clock``.

    Raises:
        ValueError: more than one schedule, or a bad value.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        log_spaced: int | None = None,
        max_overhead: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
        work_clock: Callable[[], float] | None = None,
    ) -> None:
        chosen = [
            name
            for name, value in (
                ("every_n_steps", every_n_steps),
                ("log_spaced", log_spaced),
                ("max_overhead", max_overhead),
            )
            if value is not None
        ]
        if len(chosen) > 1:
            raise ValueError(f"choose one schedule, got {' and '.join(chosen)}.")
        if not chosen:
            max_overhead = 0.1
        for name, value in (("every_n_steps", every_n_steps), ("log_spaced", log_spaced)):
            if value is not None:
                check_count(name, value, 1)
        if max_overhead is not None and not (
            isinstance(max_overhead, (int, float)) and not isinstance(max_overhead, bool) and 0 < max_overhead < 1
        ):
            raise ValueError(f"max_overhead must be a fraction of wall time in (0, 1), got {max_overhead!r}.")
        self.every_n_steps = every_n_steps
        self.log_spaced = log_spaced
        self.max_overhead = max_overhead
        self.clock = clock
        self.work_clock = work_clock or clock
        self.reset()

    def reset(self) -> None:
        """Forget a run's timing and plan."""
        self.total_steps: int | None = None
        self.plan: list[int] | None = None
        self._clock_start = self.clock()
        self._elapsed_before = 0.0
        self.own_seconds = 0.0
        self.first_seconds = 0.0
        self.estimate_seconds = 0.0
        self.last_cost: float | None = None
        self._thinning_credit = 0.5
        self._last_step: tuple[int, float] | None = None
        self._step_seconds: deque[float] = deque(maxlen=PACE_STEPS)

    @property
    def is_budgeted(self) -> bool:
        return self.max_overhead is not None

    @property
    def estimates_step_zero(self) -> bool:
        """The explicit schedules also estimate at step 0 (a reference point, usually not at a minimum)."""
        return not self.is_budgeted

    def describe(self) -> str:
        if self.every_n_steps is not None:
            return f"every {self.every_n_steps} steps"
        if self.log_spaced is not None:
            return f"{self.log_spaced} log-spaced steps"
        planned = f"{len(self.plan)} planned steps, " if self.plan else ""
        return f"{planned}within {self.max_overhead:.0%} of the training time"

    def start(self, total_steps: int | None) -> None:
        """Begin timing (for the budget) and lay out the planned steps over ``total_steps`` (None if unknown)."""
        self._clock_start = self.clock()
        self.total_steps = total_steps
        if self.log_spaced is not None:
            if not total_steps or total_steps < 1:
                raise ValueError(
                    "log_spaced needs a known number of training steps: set max_steps or max_epochs on the Trainer."
                )
            self.plan = sorted(
                {
                    max(1, round(math.exp(math.log(total_steps) * k / max(1, self.log_spaced - 1))))
                    for k in range(self.log_spaced)
                }
            )
        elif self.is_budgeted and total_steps:
            self.plan = planned_steps(total_steps)

    def elapsed(self) -> float:
        return self._elapsed_before + self.clock() - self._clock_start

    def is_due(self, step: int, last_step: int) -> bool:
        """Whether an estimate belongs at ``step``, the previous one having been at ``last_step``: a planned step in
        ``(last_step, step]`` (so a step skipped by the optimizer, e.g. with several optimizers, is not missed).
        """
        if self.every_n_steps is not None:
            return step // self.every_n_steps > max(last_step, -1) // self.every_n_steps or (
                last_step < 0 and step == 0
            )
        if self.plan is not None:
            return any(last_step < planned <= step for planned in self.plan)
        return self.within_budget()

    def remaining_planned(self, step: int) -> int:
        """Planned estimates from ``step`` on (this one included)."""
        return sum(planned >= step for planned in self.plan) if self.plan is not None else 1

    def training_seconds(self) -> float:
        """Training's wall time so far: everything since the start that was not the monitor's own."""
        return max(self.elapsed() - self.own_seconds, 0.0)

    def note_step(self, step: int) -> None:
        """Called after every training batch with the optimizer step reached: notes the training time each step took
        (for the pace), from the first batch that reached one step to the first that reached the next, so that the
        batches a step accumulates all count.
        """
        if self._last_step is not None and step <= self._last_step[0]:
            return
        now = self.training_seconds()
        if self._last_step is not None:
            self._step_seconds.append((now - self._last_step[1]) / (step - self._last_step[0]))
        self._last_step = (step, now)

    def projected_training_seconds(self, step: int) -> float:
        """The training time of the whole run, projected at ``step``: the time so far, and the rest at the pace of
        a typical step lately (the median of the last :data:`PACE_STEPS`). One-off pauses (the first batch, a
        garbage collection of 0.1-0.3 s, a validation loop) count once they have happened but are not projected
        over the rest of the run: early in a short run, one of them would multiply the budget, and the estimates it
        paid for would leave nothing for the end.
        """
        training = self.training_seconds()
        typical = self.typical_step_seconds()
        if typical is None:
            return self._over_the_run(training, step)
        return training + typical * (self._run_steps(step) - step)

    def typical_step_seconds(self) -> float | None:
        """The training time of a typical optimizer step lately (the median of the last :data:`PACE_STEPS`); None
        before two steps have been timed.
        """
        return statistics.median(self._step_seconds) if self._step_seconds else None

    def _run_steps(self, step: int) -> int:
        """The run's length in optimizer steps, as known at ``step`` (``step`` itself when unknown or passed)."""
        return max(self.total_steps or step, step)

    def _over_the_run(self, seconds: float, step: int) -> float:
        """``seconds`` spent over ``step`` steps, projected at that average pace over the whole run."""
        return seconds / max(step, 1) * self._run_steps(step)

    def _budget(self, step: int, smallest_cost: float | None) -> float:
        """The monitor's seconds for the whole run: ``max_overhead`` of the projected training time, stretched (up
        to twice that) to afford :data:`MIN_ESTIMATES` of ``smallest_cost`` besides its per-step work (the loss fed
        to the transition detector), projected likewise.
        """
        assert self.max_overhead is not None
        budget = self.max_overhead * self.projected_training_seconds(step)
        if smallest_cost is None:
            return budget
        per_step_costs = self._over_the_run(max(self.own_seconds - self.estimate_seconds, 0.0), step)
        return max(budget, min(per_step_costs + self.first_seconds + MIN_ESTIMATES * smallest_cost, 2 * budget))

    def allowance(self, step: int, smallest_cost: float | None = None) -> float | None:
        """Seconds the estimate at ``step`` may take within the budget (None when not budgeted or not yet known):
        what the budget has left over the projected run, shared among the planned estimates still to come.
        ``smallest_cost`` (seconds of the smallest estimate) lets a short run's budget stretch to a curve.
        """
        if not self.is_budgeted or step < 1 or self.last_cost is None:
            return None
        share = (self._budget(step, smallest_cost) - self.own_seconds) / self.remaining_planned(step)
        if smallest_cost is None:
            return share
        if share >= smallest_cost:
            early = self.total_steps is not None and step <= EARLY_FRACTION * self.total_steps
            return smallest_cost if early else share
        self._thinning_credit += max(share, 0.0) / smallest_cost
        if self._thinning_credit >= 1.0:
            self._thinning_credit -= 1.0
            return smallest_cost
        return 0.0

    def affordable(self, step: int, smallest_cost: float) -> float:
        """How many more estimates of ``smallest_cost`` seconds the budget affords from ``step`` to the end of the run
        (stretched as for :meth:`allowance`), besides what the monitor has spent so far.
        """
        return max(self._budget(step, smallest_cost) - self.own_seconds, 0.0) / max(smallest_cost, 1e-9)

    def has_room(self, step: int, smallest_cost: float | None) -> bool:
        """Whether an estimate beyond the plan fits: the budget then still affords every planned estimate at the
        smallest size (for the denser estimates around a transition).
        """
        if smallest_cost is None or not self.is_budgeted or step < 1 or self.last_cost is None:
            return False
        return self._budget(step, smallest_cost) - self.own_seconds >= smallest_cost * (
            self.remaining_planned(step + 1) + 1
        )

    def within_budget(self) -> bool:
        """For runs of unknown length: another estimate like the last keeps the monitor within its share."""
        if not self.is_budgeted or self.last_cost is None:
            return True
        assert self.max_overhead is not None
        return self.own_seconds + self.last_cost <= self.max_overhead * self.training_seconds()

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Count the time of the block, by the work clock, as the monitor's own (every hook runs inside one)."""
        started = self.work_clock()
        try:
            yield
        finally:
            self.own_seconds += self.work_clock() - started

    def record(self, seconds: float) -> None:
        """The last estimate's wall time: it predicts the next one's in runs of unknown length. At the first, the
        monitor's time so far (set-up and that estimate) is noted as its fixed cost.
        """
        if self.last_cost is None:
            self.first_seconds = self.own_seconds + seconds
        self.last_cost = seconds
        self.estimate_seconds += seconds

    def state_dict(self) -> dict[str, Any]:
        return {
            "elapsed": self.elapsed(),
            "own_seconds": self.own_seconds,
            "first_seconds": self.first_seconds,
            "estimate_seconds": self.estimate_seconds,
            "last_cost": self.last_cost,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._elapsed_before = state["elapsed"]
        self._clock_start = self.clock()
        self.own_seconds = state["own_seconds"]
        self.first_seconds = state.get("first_seconds", 0.0)
        self.estimate_seconds = state.get("estimate_seconds", 0.0)
        self.last_cost = state["last_cost"]


class FixedLossReadings:
    """When to read L(w*) between estimates: :data:`FIXED_LOSS_EVERY` steps after the last reading or estimate, or
    further apart when the cheapest reading so far would cost more than :data:`FIXED_LOSS_SHARE` of training.
    """

    def __init__(self) -> None:
        self.last_step = -1
        self.every = FIXED_LOSS_EVERY
        self.cheapest = math.inf

    def due(self, step: int, last_estimate: int) -> bool:
        """Whether a reading belongs at ``step``, the last estimate having been at ``last_estimate``."""
        return step - max(last_estimate, self.last_step, 0) >= self.every

    def spacing_after(self, seconds: float, typical_step_seconds: float | None) -> int:
        """The steps to the next reading, given this one's cost and a typical training step's."""
        self.cheapest = min(self.cheapest, seconds)
        if not typical_step_seconds:
            return FIXED_LOSS_EVERY
        return max(FIXED_LOSS_EVERY, math.ceil(self.cheapest / (FIXED_LOSS_SHARE * typical_step_seconds)))
