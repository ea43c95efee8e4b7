"""LLCMonitor: estimate the local learning coefficient during ``Trainer.fit`` and log it beside the loss.

The callback is the Lightning adapter: its hooks decide *when*, :class:`~lightning_devinterp.callbacks.tracker.LLCTracker`
does the work, :mod:`~lightning_devinterp.callbacks.reporting` writes the results; the callback also holds the
persisted state and the error policy.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lightning_devinterp._checks import check_callable, check_count, is_integer
from lightning_devinterp._rng import preserved_rng_states
from lightning_devinterp.callbacks.reporting import (
    TransitionHook,
    announce_transition,
    report_calibration,
    report_epsilon,
    report_estimate,
    write_run_header,
)
from lightning_devinterp.callbacks.schedule import EstimateSchedule
from lightning_devinterp.callbacks.tracker import SMALLEST, EstimateInputs, LLCRecord, LLCTracker, Processes
from lightning_devinterp.callbacks.training_data import TrainingData
from lightning_devinterp.detection.combined import TransitionEvidence
from lightning_devinterp.detection.detector import Transition, TransitionDetector
from lightning_devinterp.detection.loss_drops import LossDropDetector
from lightning_devinterp.sampling.calibration import CalibrationResult
from lightning_devinterp.sampling.config import SamplingConfig, check_setting_names
from lightning_devinterp.sampling.model_view import LossFn, resolve_loss_fn
from lightning_devinterp.sampling.params import select_parameter_names

log = logging.getLogger(__name__)

SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)

LOSS_FLUSH_EVERY = 10
"""Training losses are kept on their device and handed to the loss-drop detector every this many steps, so that
reading them does not force a device synchronisation at every step."""

DENSE_EVERY = 25
"""While a transition may be under way, the budgeted schedule adds an estimate every this many steps (if the
budget has room for it beyond the planned ones)."""

class LLCEstimateWarning(UserWarning):
    """An estimate failed and was skipped (``on_error="warn"``), or was marked unhealthy; training went on."""


@dataclasses.dataclass(frozen=True)
class FitHistory:
    """What a monitor recorded during an earlier ``fit`` (kept in ``LLCMonitor.previous_fits``)."""

    history: list[LLCRecord]
    transitions: list[Transition]


class LLCMonitor(Callback):
    """Estimate λ̂ every so often during training, log it to every logger, and flag sudden jumps.

    Add it to a Trainer and nothing else changes: the estimate runs on the live module through a functional view
    (no deep copy), from a private data stream and private generators, so a seeded run ends with bit-identical
    weights and RNG states with or without the monitor.

    Schedule (choose at most one; default ``max_overhead=0.1``): ``every_n_steps``, ``log_spaced`` (K estimates
    log-uniform over the run) or ``max_overhead`` (estimate whenever the monitor's share of wall time stays at or
    below this fraction). Estimates also run at step 0 and at the end of training (the latter within the budget in
    ``max_overhead`` mode). Under ``fast_dev_run`` the monitor does nothing.

    Sampling settings (``**sampling``) are those of :class:`~lightning_devinterp.SamplingConfig`, as for
    :func:`~lightning_devinterp.estimate_llc`; the chain shape defaults here are lighter (4 chains, 100 draws after
    50 burn-in steps) because estimates repeat. ``epsilon="auto"`` runs :func:`~lightning_devinterp.calibrate` at
    the first estimate and keeps its choice for the whole run (logged as ``llc/epsilon``, with the calibration
    table as TensorBoard text, and kept in checkpoints); while no epsilon qualifies (early in training w* is rarely
    near a minimum) the estimate is skipped with a warning and calibration is retried at the next one. ``nbeta``
    defaults to ``n / log n`` with n the training set size; for an iterable training set without a length, pass
    ``nbeta``.

    Data: by default a private view of the training dataset (its collate_fn, the training batch size, its own
    generator, no workers); for an iterable dataset, the last ``buffer_size`` training batches. Or pass
    ``dataloader``. Loss: ``loss_fn(module, batch)``, default the module's ``training_step`` loss with ``self.log``
    silenced (modules with manual optimization must pass ``loss_fn``).

    Logged at ``trainer.global_step`` to every logger: ``llc/mean``, ``llc/std``, ``llc/lower``, ``llc/upper``
    (mean ± std), ``llc/init_loss``, ``llc/nbeta``, ``llc/epsilon``, ``llc/acceptance`` (mean MALA acceptance),
    ``llc/healthy`` (1 or 0) and ``llc/seconds``. ``llc/mean``
    is also in ``trainer.callback_metrics`` (for EarlyStopping/ModelCheckpoint) and the progress bar shows ``llc``.
    With a TensorBoardLogger a custom-scalars layout ("devinterp") and the configuration as text are written once.

    Transitions (:class:`~lightning_devinterp.detection.combined.TransitionEvidence`): the training loss at every
    step goes to ``loss_detector`` (a :class:`LossDropDetector` by default), whose onsets, a fall after a plateau,
    are reported at once; so does each estimate's L(w*), the loss on the monitor's data, which has no minibatch
    noise and so shows a slow fall sooner (not when that data is a buffer of recent batches, which changes); each
    estimate goes to ``detector`` (a :class:`TransitionDetector`), whose shifts between
    settled λ̂ levels are reported when no loss drop explains them, and each drop's end report gives λ̂ before and
    after it. Each report says which evidence fired. ``False`` turns either off. While a transition may be under
    way, the default schedule estimates every 25 steps if the budget has room, so transitions come with λ̂ points.
    A report warns with :class:`TransitionWarning`, is logged (a marker on the λ̂ chart, ``transitions/onset`` or
    ``transitions/end``), optionally checkpointed (``save_checkpoint``) and passed to
    ``on_transition(trainer, pl_module, transition)``.

    Faults: an estimate that raises is reported as :class:`LLCEstimateWarning` and skipped (``on_error="warn"``;
    the same failure again only goes to the INFO log) or re-raised (``"raise"``). A monitor reused for a second
    ``fit`` starts a fresh history and keeps the first in ``previous_fits``; a resume continues the saved history,
    also one saved under another configuration (a changed schedule) if it is the only one. Under DDP the chains are
    split across ranks and gathered, so every rank holds the same history; sharded strategies (FSDP, DeepSpeed,
    ModelParallel) are rejected.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        log_spaced: int | None = None,
        max_overhead: float | None = None,
        loss_fn: LossFn | None = None,
        dataloader: DataLoader | None = None,
        seed: int = 0,
        detector: TransitionDetector | Literal[False] | None = None,
        loss_detector: LossDropDetector | Literal[False] | None = None,
        on_transition: TransitionHook | None = None,
        save_checkpoint: bool = False,
        on_error: Literal["warn", "raise"] = "warn",
        buffer_size: int = 32,
        **sampling: Any,
    ) -> None:
        super().__init__()
        check_setting_names(sampling)
        self.config = SamplingConfig(**sampling)
        self.schedule = EstimateSchedule(every_n_steps, log_spaced, max_overhead)
        check_callable("loss_fn", loss_fn, "loss_fn(module, batch)")
        if dataloader is not None and not isinstance(dataloader, DataLoader):
            raise TypeError(f"dataloader must be a torch DataLoader, got {type(dataloader).__name__}.")
        if not is_integer(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        if detector is not None and detector is not False and not isinstance(detector, TransitionDetector):
            raise TypeError(f"detector must be a TransitionDetector, False or None, got {type(detector).__name__}.")
        if loss_detector is not None and loss_detector is not False and not isinstance(loss_detector, LossDropDetector):
            raise TypeError(f"loss_detector must be a LossDropDetector, False or None, got {type(loss_detector).__name__}.")
        check_callable("on_transition", on_transition, "on_transition(trainer, pl_module, transition)")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}.")
        check_count("buffer_size", buffer_size, 1)
        self.loss_fn = loss_fn
        self.seed = seed
        self.on_transition = on_transition
        self.save_checkpoint = save_checkpoint
        self.on_error = on_error
        self.data = TrainingData(dataloader, self.config.batch_size, buffer_size, self.config.max_samples)
        evidence = TransitionEvidence(
            None if loss_detector is False else loss_detector or LossDropDetector(),
            None if detector is False else detector or TransitionDetector(metric="llc/mean"),
        )
        self.tracker = LLCTracker(self.config, seed, evidence)
        self._losses: list[tuple[int, Any]] = []
        self.previous_fits: list[FitHistory] = []
        self._reset_warnings()
        self._restored = False
        self._disabled = False
        self._resolved_loss: LossFn | None = None

    def _reset_warnings(self) -> None:
        self._warned_unhealthy = False
        self._warned_budget = False
        self._failures_seen: set[str] = set()

    # ---- what the tracker holds, under the names users know ------------------------------------------------

    @property
    def history(self) -> list[LLCRecord]:
        """Every estimate of the run, in step order."""
        return self.tracker.history

    @property
    def transitions(self) -> list[Transition]:
        """Every transition the detector reported (onsets and ends)."""
        return self.tracker.transitions

    @property
    def detector(self) -> TransitionDetector | None:
        """The detector on λ̂ (None when turned off)."""
        return self.tracker.evidence.llc

    @property
    def loss_detector(self) -> LossDropDetector | None:
        """The detector on the training loss (None when turned off)."""
        return self.tracker.evidence.loss

    @property
    def calibration(self) -> CalibrationResult | None:
        """The calibration behind ``epsilon="auto"``, once it has chosen."""
        return self.tracker.calibration

    @property
    def epsilon(self) -> float | None:
        """The SGLD step size in use; with ``epsilon="auto"``, None until calibration has chosen one."""
        return self.tracker.epsilon

    @functools.cached_property
    def state_key(self) -> str:
        """Lightning reads it at every hook call (for its profiler), so it is built once; its inputs never change."""
        return self._generate_state_key(
            every_n_steps=self.schedule.every_n_steps,
            log_spaced=self.schedule.log_spaced,
            max_overhead=self.schedule.max_overhead,
            params=self.config.params,
            seed=self.seed,
        )

    # ---- set-up --------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, SHARDED_STRATEGIES):
            raise MisconfigurationException(
                f"LLCMonitor does not support {type(trainer.strategy).__name__}: each rank holds only a shard of the "
                "parameters. Use DDP (chains are split across ranks) or a single device."
            )
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "LLCMonitor: this module uses manual optimization, so its training_step steps the optimizer and "
                "cannot serve as a loss. Pass loss_fn=lambda module, batch: ..."
            )
        if self.config.num_chains is not None and trainer.world_size > self.config.num_chains:
            raise MisconfigurationException(
                f"LLCMonitor: num_chains={self.config.num_chains} cannot be split across {trainer.world_size} processes; "
                f"use at least {trainer.world_size} chains."
            )
        self._resolved_loss = resolve_loss_fn(pl_module, self.loss_fn)
        select_parameter_names(pl_module, self.config.params)

    def _start_a_new_history(self) -> None:
        """A monitor reused for another fit (not a resume) keeps the earlier fit's estimates in ``previous_fits``
        and starts afresh: steps of two runs must not mix, nor the first run's last step silence the second's."""
        if not self._restored and (self.tracker.history or self.tracker.transitions):
            self.previous_fits.append(FitHistory(list(self.tracker.history), list(self.tracker.transitions)))
            self.tracker.reset()
            self.schedule.reset()
            self._reset_warnings()
        self._restored = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_a_new_history()
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self.schedule.start(int(total) if math.isfinite(total) else None)
        with self.schedule.timed():
            self._start(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            self._disabled = True
            rank_zero_info("LLCMonitor: fast_dev_run is set, so no LLC estimates are taken.")
            return
        self._disabled = False
        with preserved_rng_states():
            self.data.prepare(trainer, pl_module.device)
        try:
            self.tracker.start(self.data.num_samples)
        except ValueError as error:
            raise MisconfigurationException(f"LLCMonitor: the training set has no length. {error}") from None
        settings = {**dataclasses.asdict(self.config), "nbeta (used)": self.tracker.nbeta, "schedule": self.schedule.describe(), "seed": self.seed}
        write_run_header(trainer, settings)
        rank_zero_info(f"LLCMonitor: estimating {self.schedule.describe()}, nbeta = {self.tracker.nbeta:.6g}.")
        if self.schedule.estimates_step_zero and trainer.global_step == 0 and self.tracker.last_step < 0 and not self.data.buffers_batches:
            self._estimate(trainer, pl_module)

    # ---- when ----------------------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Buffer the batch (iterable data); with a buffer, the step-0 estimate waits for this first batch."""
        if self._disabled or not self.data.buffers_batches:
            return
        with self.schedule.timed():
            self.data.remember(batch)
            if self.schedule.estimates_step_zero and trainer.global_step == 0 and self.tracker.last_step < 0:
                self._estimate(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._disabled:
            return
        with self.schedule.timed():
            step = trainer.global_step
            self._remember_loss(trainer, pl_module, step, outputs)
            if step > self.tracker.last_step and self._agreed(trainer, self._due(step)):
                self._flush_losses(trainer, pl_module)
                self._estimate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._disabled or trainer.global_step <= self.tracker.last_step:
            return
        with self.schedule.timed():
            self._flush_losses(trainer, pl_module)
            if self._agreed(trainer, self.schedule.plan is not None or self.schedule.within_budget()):
                self._estimate(trainer, pl_module)

    def _due(self, step: int) -> bool:
        """A planned or scheduled step, or (default schedule) a denser estimate while a transition may be under way."""
        if self.schedule.is_due(step, self.tracker.last_step):
            return True
        dense = self.schedule.is_budgeted and self.tracker.evidence.wants_dense_estimates and step - self.tracker.last_step >= DENSE_EVERY
        return dense and self.schedule.has_room(step, self.tracker.smallest_cost())

    def _remember_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, outputs: Any) -> None:
        """Keep this step's training loss (on its device) for the loss-drop detector; hand them over every few steps."""
        if self.tracker.evidence.loss is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append((step, loss.detach()))
        if self._losses and step - self._losses[0][0] >= LOSS_FLUSH_EVERY:
            self._flush_losses(trainer, pl_module)

    def _flush_losses(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hand the kept losses to the detector (their mean over ranks under DDP, so every rank decides alike)."""
        if not self._losses:
            return
        steps, values = zip(*self._losses)
        self._losses = []
        stacked = torch.stack([v.float().reshape(()) for v in values])
        if trainer.world_size > 1:
            stacked = trainer.strategy.reduce(stacked.to(trainer.strategy.root_device), reduce_op="mean")
        for step, value in zip(steps, stacked.tolist()):
            transition = self.tracker.observe_loss(step, value)
            if transition is not None:
                self._announce(trainer, pl_module, transition)

    def _announce(self, trainer: pl.Trainer, pl_module: pl.LightningModule, transition: Transition) -> None:
        announce_transition(
            trainer, pl_module, transition, llc_value=self.tracker.llc_marker(), on_transition=self.on_transition, save_checkpoint=self.save_checkpoint
        )

    def _agreed(self, trainer: pl.Trainer, decision: bool) -> bool:
        """Rank zero's decision on every rank: time-based decisions could differ and deadlock the gather."""
        if trainer.world_size > 1 and self.schedule.is_budgeted:
            return bool(trainer.strategy.broadcast(decision, src=0))
        return decision

    # ---- doing it, under the error policy -------------------------------------------------------------------

    def _estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        self.tracker.last_step = step
        started = time.perf_counter()
        processes = Processes(trainer.world_size, trainer.global_rank, trainer.strategy if trainer.world_size > 1 else None)
        allowance = self.schedule.allowance(step, self.tracker.smallest_cost())
        shape = processes.agree(self.tracker.shape_for(allowance, budgeted=self.schedule.is_budgeted))
        if shape is None:
            self._say_once_what_the_budget_affords(step)
            return
        shape = dataclasses.replace(shape, num_chains=max(shape.num_chains, trainer.world_size))
        assert self._resolved_loss is not None
        try:
            with preserved_rng_states():
                source = self.data.source(pl_module.device)
            inputs = EstimateInputs(pl_module, self._resolved_loss, source, processes, trainer.strategy.precision_plugin.forward_context)
            if self.tracker.epsilon is None and self.config.epsilon == "auto":
                calibration = self.tracker.calibrate(step, inputs)
                rank_zero_info(
                    f"LLCMonitor: epsilon = {self.tracker.epsilon:g}, chosen at step {step} in {calibration.seconds:.1f}s: {calibration.message}"
                )
                report_calibration(trainer, calibration, step)
            previous_epsilon = self.tracker.epsilon
            result, epsilon_changed = self.tracker.sample(step, inputs, shape)
        except Exception as error:
            self.schedule.record(time.perf_counter() - started)
            trainer.progress_bar_metrics.pop("llc", None)
            if self.on_error == "raise":
                raise
            self._warn_once_per_failure(step, error)
            return
        record = self.tracker.record(step, result, time.perf_counter() - started, epsilon_changed)
        if previous_epsilon is None or epsilon_changed:
            report_epsilon(trainer, record, previous_epsilon)
        report_estimate(trainer, record)
        self._warn_once_if_unhealthy(record)
        transition = self.tracker.detect(record, fixed_data=not self.data.buffers_batches)
        if transition is not None:
            self._announce(trainer, pl_module, transition)
        self.schedule.record(time.perf_counter() - started)

    def _say_once_what_the_budget_affords(self, step: int) -> None:
        """A planned estimate did not fit the budget even at its smallest: say once what the plan would cost."""
        if self._warned_budget:
            return
        self._warned_budget = True
        smallest = self.tracker.smallest_cost() or 0.0
        training = max(self.schedule.elapsed() - self.schedule.own_seconds, 1e-9) / max(step, 1) * (self.schedule.total_steps or step)
        planned = len(self.schedule.plan or []) or 1
        rank_zero_warn(
            f"LLCMonitor: even the smallest estimate ({SMALLEST.num_chains} chains x {SMALLEST.num_steps} SGLD steps) takes about {smallest:.2g}s here, so within "
            f"max_overhead={self.schedule.max_overhead:g} this run affords about {int(self.schedule.max_overhead * training / max(smallest, 1e-9))} "
            f"of the {planned} planned estimates; some are skipped. All of them would cost about {planned * smallest / training:.0%} "
            "of the training time: raise max_overhead, or choose every_n_steps=... .",
            category=LLCEstimateWarning,
        )

    def _warn_once_per_failure(self, step: int, error: Exception) -> None:
        """Warn about a failed estimate; the same failure again (say, a diverged training run) only goes to the log."""
        reason = f"{type(error).__name__}: {error}"
        if reason in self._failures_seen:
            log.info("LLCMonitor: the estimate at step %d failed again (%s)", step, reason)
            return
        self._failures_seen.add(reason)
        rank_zero_warn(
            f"LLCMonitor: the estimate at step {step} failed and was skipped ({reason}). Training continues; the same failure "
            "at later estimates is logged at INFO, not warned again.",
            category=LLCEstimateWarning,
        )

    def _warn_once_if_unhealthy(self, record: LLCRecord) -> None:
        if record.healthy or self._warned_unhealthy:
            return
        self._warned_unhealthy = True
        rank_zero_warn(
            f"LLCMonitor: the estimate at step {record.step} is marked unhealthy: {' '.join(record.result.warnings)} "
            "Later unhealthy estimates are marked by llc/healthy = 0 and in the INFO log, without another warning.",
            category=LLCEstimateWarning,
        )

    # ---- persistence ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**self.tracker.state_dict(), "schedule": self.schedule.state_dict(), "warned_unhealthy": self._warned_unhealthy}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)
        self.schedule.load_state_dict(state_dict["schedule"])
        self._warned_unhealthy = state_dict.get("warned_unhealthy", False)
        self._restored = True

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved by a monitor with another configuration (a changed schedule, say) is stored under another
        key, which Lightning would skip with a generic warning. With exactly one such state and none of this
        monitor's own, continue its history and say so; with several, say why none is continued."""
        saved = checkpoint.get("callbacks", {})
        if self.state_key in saved:
            return
        others = [key for key in saved if key.startswith(f"{type(self).__qualname__}{{")]
        if len(others) == 1:
            self.load_state_dict(copy.deepcopy(saved[others[0]]))
            rank_zero_info(
                f"LLCMonitor: continuing the history saved under another configuration ({others[0]}); later estimates use "
                "this monitor's settings."
            )
        elif others:
            rank_zero_warn(
                f"LLCMonitor: the checkpoint holds {len(others)} monitor states under other configurations ({', '.join(others)}) "
                "and none under this one; this monitor starts a fresh history."
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.data.release()
