"""One stream of transition reports from two kinds of evidence: the training loss (dense) and λ̂ (sparse).

- A fall of the training loss after a plateau (:class:`~lightning_devinterp.detection.loss_drops.LossDropDetector`)
  is reported at once, as the onset of a transition (evidence ``"loss drop"``): a fall of the minibatch loss, or
  of the loss on the monitor's data at w* that comes with each estimate, whichever shows first.
- When the fall ends, the end is reported with λ̂ before and after it: ``before`` is λ̂'s settled level before the
  onset, ``after`` the latest healthy estimate; the evidence is ``"both"`` when λ̂ moved by more than the λ̂
  detector's threshold (in its noise units and relative terms), else ``"loss drop"``. λ̂ going negative or
  unhealthy while the loss falls is what a model mid-transition looks like (w* has left its minimum), and the
  end report says so.
- A shift of λ̂ between settled levels while the loss sits on a plateau
  (:class:`~lightning_devinterp.detection.level_shifts.LevelShiftDetector`) is reported on its own (``"λ̂ change"``);
  within a drop, or shortly after it, it belongs to that drop's report, and while the loss is still settling (a
  model converging from initialisation, or after a drop) λ̂ is expected to move and is not reported; the values
  seen then do not form the level that later ones are compared with (w* was still moving).

:attr:`TransitionEvidence.wants_dense_estimates` tells the monitor when to estimate more often: while the loss is
leaving its plateau or falling, and while λ̂ has left its level without the change being confirmed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from lightning_devinterp.detection.level_shifts import LevelShiftDetector
from lightning_devinterp.detection.loss_drops import LossDropDetector
from lightning_devinterp.detection.transition import Transition
from lightning_devinterp.metric_names import LLC_MEAN


class TransitionEvidence:
    """Combines the loss's evidence and λ̂'s into one stream of reports (see the module docstring).

    Args:
        loss: the detector of falls of the training loss and of L(w*), or None.
        llc: the detector of shifts between settled λ̂ levels, or None.
        attribution_steps: for this many steps after a loss drop ends, λ̂ changes still belong to it (default: the
            loss detector's ``lag``).
    """

    def __init__(
        self,
        loss: LossDropDetector | None = None,
        llc: LevelShiftDetector | None = None,
        attribution_steps: int | None = None,
    ) -> None:
        self.loss = loss
        self.llc = llc
        self.attribution_steps = (
            attribution_steps if attribution_steps is not None else (loss.lag if loss is not None else 0)
        )
        self._episode: dict[str, Any] | None = None
        self._last_end: int | None = None
        self._last_healthy: tuple[int, float] | None = None
        self._settling = True

    @property
    def wants_dense_estimates(self) -> bool:
        """True while a transition may be under way: estimates there are worth more."""
        loss = self.loss is not None and (self.loss.leaving_plateau or self.loss.in_transition)
        return loss or (self.llc is not None and self.llc.in_transition)

    def _llc_level(self) -> float | None:
        if self.llc is not None and self.llc.level is not None:
            return self.llc.level
        return self._last_healthy[1] if self._last_healthy is not None else None

    def observe_loss(self, step: int, loss: float) -> Transition | None:
        """Feed the training loss at ``step``; the onset or end of a loss drop, if one is reported."""
        if self.loss is None:
            return None
        return self._loss_report(self.loss.update(step, loss))

    def _loss_report(self, found: Transition | None) -> Transition | None:
        """Open the episode at a loss drop's onset; at its end, the report with λ̂ before and after."""
        if found is None:
            return None
        if found.is_onset:
            self._episode = {"step": found.step, "llc_before": self._llc_level(), "lowest": math.inf, "unhealthy": 0}
            return found
        return self._end(found)

    def _end(self, loss_end: Transition) -> Transition:
        episode, self._episode = self._episode or {}, None
        self._last_end = loss_end.step
        self._settling = True
        before, after = episode.get("llc_before"), self._last_healthy[1] if self._last_healthy is not None else None
        loss_words = f"loss {loss_end.before:.4g} -> {loss_end.after:.4g}"
        if after is not None and before is None:
            # λ̂ had no healthy level before the onset (w* at a saddle, or the loss still settling): say where it is now.
            return dataclasses.replace(
                loss_end,
                reason=f"{loss_end.reason}; λ̂ now {after:.4g}, with no healthy estimate before the onset to compare",
            )
        if before is None or after is None:
            return loss_end
        lowest, unhealthy = episode["lowest"], episode["unhealthy"]
        symptoms = ""
        if unhealthy or lowest < 0:
            symptoms = f"; during the fall λ̂ went as low as {lowest:.4g}" + (
                f" with {unhealthy} unhealthy estimate(s)" if unhealthy else ""
            )
            symptoms += " (w* left its minimum)"
        moved = self.llc is not None and self._is_change(before, after)
        return Transition(
            step=loss_end.step,
            metric=self.llc.metric if self.llc is not None else LLC_MEAN,
            before=before,
            after=after,
            score=loss_end.score,
            direction="up" if after > before else "down",
            reason=f"{loss_end.reason}: {loss_words}{symptoms}",
            evidence="both" if moved else "loss drop",
        )

    def _is_change(self, before: float, after: float) -> bool:
        assert self.llc is not None
        scale = self.llc.scale() if self.llc.level is not None else self.llc.relative_floor * abs(before)
        return abs(after - before) >= max(self.llc.threshold * scale, self.llc.min_relative_change * abs(before))

    def observe_fixed_loss(self, step: int, fixed_loss: float) -> Transition | None:
        """Feed L(w*), the loss on the sampler's fixed data at w*, at a step between estimates (it needs only a forward
        pass, so it can come more often than λ̂); the onset or end of a loss drop seen on it, if one is reported.
        """
        if self.loss is None:
            return None
        return self._loss_report(self.loss.update_fixed_data(step, fixed_loss))

    def observe_llc(
        self, step: int, value: float, std: float | None = None, healthy: bool = True, fixed_loss: float | None = None
    ) -> Transition | None:
        """Feed one λ̂ estimate, with the loss on the sampler's fixed data at w* (``fixed_loss``, L(w*)) when that data
        does not change between estimates; the onset or end of a loss drop seen on ``fixed_loss``, else a λ̂-only
        transition, if one is reported (changes within a loss drop belong to it).
        """
        loss_found = (
            self.loss.update_fixed_data(step, fixed_loss) if self.loss is not None and fixed_loss is not None else None
        )
        # An onset opens the episode before this estimate is seen (λ̂'s level before it is the one before the drop);
        # an end is reported after it (the latest λ̂ is this one).
        onset = self._loss_report(loss_found) if loss_found is not None and loss_found.is_onset else None
        llc_found = self._observe_llc_value(step, value, std, healthy)
        if onset is not None:
            return onset
        return self._loss_report(loss_found) if loss_found is not None else llc_found

    def _observe_llc_value(self, step: int, value: float, std: float | None, healthy: bool) -> Transition | None:
        if math.isfinite(value):
            if healthy:
                self._last_healthy = (step, value)
            if self._episode is not None:
                self._episode["lowest"] = min(self._episode["lowest"], value)
                self._episode["unhealthy"] += not healthy
        if self.llc is None:
            return None
        if self._settling and self.loss is not None and self._episode is None:
            # Until the loss first sits on a plateau (after initialisation or a drop) w* is still moving: the λ̂ seen
            # then is no level to compare later values with, so the level starts over at each point.
            self.llc.reset()
            self._settling = not self.loss.on_plateau
        found = self.llc.update(step, value, std, healthy)
        if found is None:
            return None
        recently_ended = self._last_end is not None and found.step - self._last_end <= self.attribution_steps
        if self._episode is not None or recently_ended or (self.loss is not None and not self.loss.on_plateau):
            return None
        return found

    def reset(self) -> None:
        """Forget both series (a new training run)."""
        for detector in (self.loss, self.llc):
            if detector is not None:
                detector.reset()
        self._episode, self._last_end, self._last_healthy = None, None, None
        self._settling = True

    def reset_llc(self) -> None:
        """λ̂ is no longer comparable with what came before (the step size changed): start its series over."""
        if self.llc is not None:
            self.llc.reset()
        self._last_healthy = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss.state_dict() if self.loss is not None else None,
            "llc": self.llc.state_dict() if self.llc is not None else None,
            "episode": dict(self._episode) if self._episode is not None else None,
            "last_end": self._last_end,
            "last_healthy": list(self._last_healthy) if self._last_healthy is not None else None,
            "settling": self._settling,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.loss is not None and state.get("loss") is not None:
            self.loss.load_state_dict(state["loss"])
        if self.llc is not None and state.get("llc") is not None:
            self.llc.load_state_dict(state["llc"])
        self._episode = dict(state["episode"]) if state.get("episode") is not None else None
        self._last_end = state.get("last_end")
        last_healthy = state.get("last_healthy")
        self._last_healthy = (int(last_healthy[0]), float(last_healthy[1])) if last_healthy is not None else None
        self._settling = state.get("settling", True)


def detect_transitions(
    steps: Sequence[int],
    values: Sequence[float],
    stds: Sequence[float | None] | None = None,
    *,
    metric: str = "value",
    healthy: Sequence[bool] | None = None,
    fixed_losses: Sequence[float] | None = None,
    training_losses: Sequence[tuple[int, float]] | None = None,
    **detector_kwargs: Any,
) -> list[Transition]:
    """The reports the online monitor would have made on a whole series (post-hoc analysis), by the same method.

    ``steps``, ``values`` (λ̂) and optionally ``stds`` (their standard errors) and ``healthy`` go to a
    :class:`LevelShiftDetector` (``detector_kwargs``). Given the loss as well, each estimate's L(w*) (``fixed_losses``)
    and/or the training loss at every step (``training_losses``, (step, loss) pairs), it is the monitor's
    :class:`TransitionEvidence` with a default :class:`LossDropDetector`, fed in the monitor's order: the training
    losses up to an estimate's step, then the estimate. Reports come in the order they were made.

    Args:
        steps: the estimates' training steps, strictly increasing.
        values: the λ̂ estimates.
        stds: their standard errors (None where unknown).
        metric: the name the λ̂ reports carry.
        healthy: whether each estimate is healthy (default: all are); unhealthy ones never form a level.
        fixed_losses: each estimate's L(w*), the loss on fixed data at w*.
        training_losses: (step, loss) pairs of the training loss.
        **detector_kwargs: settings of the :class:`LevelShiftDetector`.

    Returns:
        The onsets and ends reported, in order.

    Raises:
        ValueError: the columns differ in length, or the steps do not increase.
    """
    for name, column in (("stds", stds), ("healthy", healthy), ("fixed_losses", fixed_losses)):
        if column is not None and len(column) != len(values):
            raise ValueError(f"steps, values and {name} must have the same length.")
    if len(steps) != len(values):
        raise ValueError("steps and values must have the same length.")
    llc = LevelShiftDetector(metric=metric, **detector_kwargs)
    with_loss = fixed_losses is not None or training_losses is not None
    evidence = TransitionEvidence(LossDropDetector(), llc) if with_loss else None
    losses = sorted(training_losses or [])
    fed = 0
    found = []
    for index, (step, value) in enumerate(zip(steps, values)):
        std = None if stds is None else stds[index]
        is_healthy = True if healthy is None else bool(healthy[index])
        if evidence is None:
            found.append(llc.update(step, value, std, is_healthy))
            continue
        while fed < len(losses) and losses[fed][0] <= step:
            found.append(evidence.observe_loss(*losses[fed]))
            fed += 1
        fixed = None if fixed_losses is None else fixed_losses[index]
        found.append(evidence.observe_llc(step, value, std, is_healthy, fixed_loss=fixed))
    if evidence is not None:
        found += [evidence.observe_loss(*pair) for pair in losses[fed:]]
    return [event for event in found if event is not None]
