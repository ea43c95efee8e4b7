"""TransitionMonitor: watch any logged metric for transitions, EarlyStopping-style."""

from __future__ import annotations

import dataclasses
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_devinterp import metric_names as names
from lightning_devinterp._checks import check_callable
from lightning_devinterp.callbacks.reporting import TransitionHook, announce_transition
from lightning_devinterp.detection.level_shifts import LevelShiftDetector
from lightning_devinterp.detection.loss_drops import LossDropDetector
from lightning_devinterp.detection.transition import Transition


class TransitionMonitor(Callback):
    """Feed ``trainer.callback_metrics[monitor]`` to a detector and alert on transitions.

    The default detector is a :class:`LossDropDetector` with ``direction="both"``: it smooths the metric over 50
    steps on a log scale, judges changes against its own robust noise, and reports a fast fall (or rise) only after
    a plateau, so minibatch noise and smooth decays raise nothing. It needs a positive metric logged every step (a
    loss, an accuracy). For a λ̂ series (a ``monitor`` starting with ``llc/``, such as the ``llc/<group>/mean`` of an
    :class:`LLCMonitor` with ``param_groups``) the default is a :class:`LevelShiftDetector`, which looks for shifts
    between settled levels of a sparse series; pass ``detector=LevelShiftDetector(...)`` for any other metric logged
    rarely.

    The metric is read after each optimizer step, after each validation run and at the end of training, once per
    step (a λ̂ series is dated by ``llc/step``, the step its estimate was taken at). Only new values are fed: a step
    where it was not logged, or where ``callback_metrics`` still holds the value last fed (a metric logged every few
    steps or at validation), is skipped. If it was never logged by the end of the first epoch (for a λ̂ series: by
    the end of an epoch in which another λ̂ metric appeared, or of training) a warning lists the metrics that were.
    Alerts are those of :class:`LLCMonitor`: a :class:`TransitionWarning` (also at INFO on the
    ``lightning_devinterp`` logger), a ``transitions/onset`` or ``transitions/end`` scalar and a TensorBoard text
    entry, an optional checkpoint and the ``on_transition(trainer, pl_module, transition)`` hook. Under DDP the
    detector sees the mean of the metric over ranks (one small all-reduce per step), so every rank decides alike.

    Args:
        monitor: the name of a logged metric (as in ``trainer.callback_metrics``).
        detector: the detector to feed; default as described above.
        on_transition: called as ``on_transition(trainer, pl_module, transition)`` at each report.
        save_checkpoint: save a checkpoint at each report (``transition-<metric>-step=<step>.ckpt``).

    Raises:
        ValueError, TypeError: a bad argument, named in the message.
    """

    def __init__(
        self,
        monitor: str = "train_loss",
        detector: LossDropDetector | LevelShiftDetector | None = None,
        on_transition: TransitionHook | None = None,
        save_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be the name of a logged metric, got {monitor!r}.")
        if detector is not None and not isinstance(detector, (LossDropDetector, LevelShiftDetector)):
            raise TypeError(
                f"detector must be a LossDropDetector, a LevelShiftDetector or None, got {type(detector).__name__}."
            )
        check_callable("on_transition", on_transition, "on_transition(trainer, pl_module, transition)")
        self.monitor = monitor
        self._llc_series = monitor.startswith(
            names.PREFIX
        )  # an LLCMonitor's λ̂: sparse, dated by llc/step, healthy only
        if detector is None:
            detector = (
                LevelShiftDetector(metric=monitor)
                if self._llc_series
                else LossDropDetector(metric=monitor, direction="both")
            )
        self.detector = detector
        self.on_transition = on_transition
        self.save_checkpoint = save_checkpoint
        self.transitions: list[Transition] = []
        self._last_step = -1
        self._last_value: float | None = None
        self._seen = False
        self._warned_missing = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    def _observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer, "fast_dev_run", False) or trainer.sanity_checking or trainer.global_step <= self._last_step:
            return
        logged = trainer.callback_metrics.get(self.monitor)
        value = None if logged is None else float(logged)
        if trainer.world_size > 1:
            present_and_value = torch.tensor([0.0 if value is None else 1.0, 0.0 if value is None else value])
            present, total = trainer.strategy.reduce(
                present_and_value.to(trainer.strategy.root_device), reduce_op="sum"
            ).tolist()
            value = total / present if present == trainer.world_size else None
        if value is None:
            return
        self._seen = True
        step = self._step_of(trainer)
        if value == self._last_value or step <= self._last_step:
            return
        self._last_step, self._last_value = step, value
        transition = self.detector.update(step, value)
        if transition is not None:
            self.transitions.append(transition)
            announce_transition(
                trainer,
                pl_module,
                transition,
                on_transition=self.on_transition,
                save_checkpoint=self.save_checkpoint,
            )

    def _step_of(self, trainer: pl.Trainer) -> int:
        """The step the value belongs to: ``llc/step`` for a λ̂ series (estimates can be read a step after they are
        taken), the current step otherwise.
        """
        taken_at = trainer.callback_metrics.get(names.LLC_STEP) if self._llc_series else None
        return int(taken_at) if taken_at is not None else trainer.global_step

    def _warn_if_never_seen(self, trainer: pl.Trainer, finished: bool) -> None:
        """Warn once that the metric never appeared: at the end of an epoch, or for a λ̂ series (which appears only
        with a healthy estimate) once some other λ̂ metric has, or when training ends.
        """
        if self._seen or self._warned_missing or getattr(trainer, "fast_dev_run", False):
            return
        if not finished and self._llc_series and names.LLC_STEP not in trainer.callback_metrics:
            return
        self._warned_missing = True
        logged = ", ".join(sorted(trainer.callback_metrics)) or "none"
        rank_zero_warn(
            f"TransitionMonitor: the metric {self.monitor!r} was never logged, so nothing is watched. Metrics logged so far: {logged}. "
            "Log it with self.log(...) or pass monitor=<one of these>."
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._observe(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._observe(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._warn_if_never_seen(trainer, finished=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._observe(trainer, pl_module)
        self._warn_if_never_seen(trainer, finished=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector.state_dict(),
            "transitions": [dataclasses.asdict(t) for t in self.transitions],
            "last_step": self._last_step,
            "last_value": self._last_value,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.load_state_dict(state_dict["detector"])
        self.transitions = [Transition(**t) for t in state_dict["transitions"]]
        self._last_step = state_dict["last_step"]
        self._last_value = state_dict.get("last_value")
