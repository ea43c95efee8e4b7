"""LLCMonitor: estimate the local learning coefficient during ``Trainer.fit`` and log it beside the loss.

The callback is the Lightning adapter: its hooks decide *when*, :class:`~lightning_devinterp.tracking.tracker.LLCTracker`
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
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lightning_devinterp import metric_names as names
from lightning_devinterp._checks import check_callable, check_count, is_integer
from lightning_devinterp._rng import preserved_rng_states
from lightning_devinterp.callbacks.reporting import (
    TransitionHook,
    announce_transition,
    log_scalars,
    report_calibration,
    report_epsilon,
    report_estimate,
    report_figure,
    write_run_header,
)
from lightning_devinterp.callbacks.training_data import TrainingData
from lightning_devinterp.detection.combined import TransitionEvidence
from lightning_devinterp.detection.level_shifts import LevelShiftDetector
from lightning_devinterp.detection.loss_drops import LossDropDetector
from lightning_devinterp.detection.transition import Transition
from lightning_devinterp.sampling.calibration import CalibrationResult
from lightning_devinterp.sampling.config import SamplingConfig, check_setting_names
from lightning_devinterp.sampling.model_view import LossFn, resolve_loss_fn
from lightning_devinterp.sampling.params import select_parameter_names
from lightning_devinterp.sampling.susceptibility import PerSampleLossFn, ProbeSpec
from lightning_devinterp.tracking.clock import working_time
from lightning_devinterp.tracking.distributed import Collective
from lightning_devinterp.tracking.schedule import EstimateSchedule, FixedLossReadings
from lightning_devinterp.tracking.tracker import EstimateInputs, LLCRecord, LLCTracker, Processes

log = logging.getLogger(__name__)

SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)

LOSS_FLUSH_EVERY = 10
"""Training losses are kept on their device and handed to the loss-drop detector every this many steps, so that
reading them does not force a device synchronisation at every step."""

RELAXED_ENOUGH = 0.9
"""Below this share of the long-run value that the last estimate's draws are sure to have reached, the monitor says
at the end of training that λ̂ may read low (:attr:`~lightning_devinterp.LLCResult.relaxed_share`)."""

DENSE_EVERY = 25
"""While a transition may be under way, the budgeted schedule adds an estimate every this many steps (if the
budget has room for it beyond the planned ones)."""


class LLCEstimateWarning(UserWarning):
    """An estimate failed and was skipped (``on_error="warn"``), was marked unhealthy, or (at the end of training) may
    read low because its chains had too few steps to relax; training went on.
    """


@dataclasses.dataclass(frozen=True)
class FitHistory:
    """What a monitor recorded during an earlier ``fit`` (kept in ``LLCMonitor.previous_fits``)."""

    history: list[LLCRecord]
    transitions: list[Transition]


class LLCMonitor(Callback):
    """Estimate λ̂ every so often during training, log it beside the loss, and report phase transitions.

    Add it to a Trainer and nothing else about the run changes: estimates run on the live module through a
    functional view (no deep copy), from a private data stream and private generators, so a seeded run ends with
    bit-identical weights and RNG states with or without the monitor. Under ``fast_dev_run`` it does nothing; under
    DDP the chains are split across ranks and gathered, so every rank holds the same history; sharded strategies
    (FSDP, DeepSpeed, ModelParallel) are rejected in ``setup``.

    Each estimate is logged at ``trainer.global_step`` to every logger (the names are in
    :mod:`lightning_devinterp.metric_names`); a healthy one also goes to ``trainer.callback_metrics`` (so
    ``EarlyStopping`` and ``ModelCheckpoint`` can monitor ``llc/mean``) and the progress bar. Transitions are found
    from the training loss at every step, L(w*) at each estimate and every few dozen steps between them, and λ̂
    itself (see :class:`~lightning_devinterp.detection.combined.TransitionEvidence`); each report is a
    :class:`~lightning_devinterp.TransitionWarning`, a logged marker and text, optionally a checkpoint, and a call
    of ``on_transition``. The history, schedule, step size and detector state are saved in checkpoints, so a resumed
    run neither repeats nor forgets an estimate. See docs/monitor.md for the whole story.

    Args:
        every_n_steps: estimate at the first step past every multiple of this many optimizer steps, at step 0 and at
            the end. At most one of ``every_n_steps``, ``log_spaced`` and ``max_overhead`` may be given.
        log_spaced: estimate at this many steps spaced log-uniformly over the run (needs a known run length), at
            step 0 and at the end.
        max_overhead: the default schedule (0.1 when no schedule is given): 30 planned estimates, dense early,
            each sized so that the monitor's wall time stays within this fraction of the training time (stretched
            up to twice that on short runs, to afford a curve of 20), with extra estimates while a transition may
            be under way.
        loss_fn: ``loss_fn(module, batch) -> scalar`` mean negative log-likelihood; default the module's
            ``training_step`` loss with ``self.log`` silenced (modules with manual optimization must pass one).
        dataloader: the data to sample on; default a private view of the training dataset (its collate_fn and
            batch size, no workers, its own generator) or, for an iterable dataset, the last ``buffer_size``
            training batches.
        seed: seeds the chains; with the training step and the rank it makes every estimate reproducible.
        detector: the detector of shifts between settled λ̂ levels; ``False`` turns it off.
        loss_detector: the detector of falls of the loss after a plateau; ``False`` turns it off.
        on_transition: called as ``on_transition(trainer, pl_module, transition)`` at each report.
        save_checkpoint: save a checkpoint at each report (``transition-<metric>-step=<step>.ckpt``).
        on_error: ``"warn"``: an estimate that raises is skipped with an
            :class:`LLCEstimateWarning` (the same failure again goes to the INFO log only); ``"raise"``: re-raise.
        buffer_size: training batches kept for iterable training data.
        clock: the clock the budget reads (seconds); a deterministic one makes the budgeted schedule
            reproducible, e.g. in tests or simulations. Default: the wall clock for training time, and for the
            monitor's own time the wall clock less garbage-collection pauses (which would have paused training
            anyway).
        probe: samples to attribute to (a Dataset or DataLoader, read whole); with ``per_sample_loss_fn``, every
            estimate carries each probe sample's susceptibility per group, logged as
            ``susceptibility/<group>/<label>`` and drawn as a heatmap of groups × labels (docs/components.md).
        per_sample_loss_fn: ``per_sample_loss_fn(module, batch) -> Tensor[batch]`` (or ``[batch, tokens]``).
        probe_labels: a label per probe sample (or per token); the logs then hold the mean susceptibility per label.
        probe_every: read the probe at every ``probe_every``-th draw.
        **sampling: the sampling settings of :class:`~lightning_devinterp.SamplingConfig`. Chain-shape settings
            left unset are sized to the budget and to a 5% relative standard error (4 chains; 10-50 burn-in steps;
            10-200 draws); ``epsilon="adaptive"``
            (the default) adapts the step at the first estimate after step 0 and keeps it, adapting again only when
            health demands; ``epsilon="auto"`` calibrates at the first estimate and keeps the choice; ``nbeta``
            defaults to n / log n with n the training set size (pass it for iterable data without a length).

    Raises:
        ValueError, TypeError: a bad argument, named in the message.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        log_spaced: int | None = None,
        max_overhead: float | None = None,
        loss_fn: LossFn | None = None,
        dataloader: DataLoader | None = None,
        seed: int = 0,
        detector: LevelShiftDetector | Literal[False] | None = None,
        loss_detector: LossDropDetector | Literal[False] | None = None,
        on_transition: TransitionHook | None = None,
        save_checkpoint: bool = False,
        on_error: Literal["warn", "raise"] = "warn",
        buffer_size: int = 32,
        clock: Callable[[], float] | None = None,
        probe: DataLoader | Dataset | None = None,
        per_sample_loss_fn: PerSampleLossFn | None = None,
        probe_labels: Sequence[Any] | torch.Tensor | None = None,
        probe_every: int = 1,
        **sampling: Any,
    ) -> None:
        super().__init__()
        check_setting_names(sampling)
        probe_spec = ProbeSpec.from_arguments(probe, per_sample_loss_fn, probe_labels, probe_every)
        self.config = SamplingConfig(**sampling)
        work_clock = clock or working_time
        self.schedule = EstimateSchedule(
            every_n_steps, log_spaced, max_overhead, clock=clock or time.perf_counter, work_clock=work_clock
        )
        check_callable("loss_fn", loss_fn, "loss_fn(module, batch)")
        if dataloader is not None and not isinstance(dataloader, DataLoader):
            raise TypeError(f"dataloader must be a torch DataLoader, got {type(dataloader).__name__}.")
        if not is_integer(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        if detector is not None and detector is not False and not isinstance(detector, LevelShiftDetector):
            raise TypeError(f"detector must be a LevelShiftDetector, False or None, got {type(detector).__name__}.")
        if loss_detector is not None and loss_detector is not False and not isinstance(loss_detector, LossDropDetector):
            raise TypeError(
                f"loss_detector must be a LossDropDetector, False or None, got {type(loss_detector).__name__}."
            )
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
            None if detector is False else detector or LevelShiftDetector(metric=names.LLC_MEAN),
        )
        self.tracker = LLCTracker(self.config, seed, evidence, clock=work_clock, probe=probe_spec)
        self.clock = work_clock
        self._losses: list[tuple[int, Any]] = []
        self._readings = FixedLossReadings()
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
    def detector(self) -> LevelShiftDetector | None:
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
        and starts afresh: steps of two runs must not mix, nor the first run's last step silence the second's.
        """
        if not self._restored and (self.tracker.history or self.tracker.transitions):
            self.previous_fits.append(FitHistory(list(self.tracker.history), list(self.tracker.transitions)))
            self.tracker.reset()
            self.schedule.reset()
            self._reset_warnings()
        self._restored = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_a_new_history()
        self._readings = FixedLossReadings()
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self.schedule.start(int(total) if math.isfinite(total) else None)
        with self.schedule.timed():
            self._start(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(trainer, "fast_dev_run", False):
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
        settings = {
            **dataclasses.asdict(self.config),
            "nbeta (used)": self.tracker.nbeta,
            "schedule": self.schedule.describe(),
            "seed": self.seed,
        }
        write_run_header(trainer, settings, with_groups=self.config.param_groups is not None)
        rank_zero_info(f"LLCMonitor: estimating {self.schedule.describe()}, nbeta = {self.tracker.nbeta:.6g}.")
        if (
            self.schedule.estimates_step_zero
            and trainer.global_step == 0
            and self.tracker.last_step < 0
            and not self.data.buffers_batches
        ):
            self._estimate(trainer, pl_module)

    # ---- when ----------------------------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Buffer the batch (iterable data); with a buffer, the step-0 estimate waits for this first batch."""
        if self._disabled or not self.data.buffers_batches:
            return
        with self.schedule.timed():
            self.data.remember(batch)
            if self.schedule.estimates_step_zero and trainer.global_step == 0 and self.tracker.last_step < 0:
                self._estimate(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._disabled:
            return
        with self.schedule.timed():
            step = trainer.global_step
            self.schedule.note_step(step)
            self._remember_loss(trainer, pl_module, step, outputs)
            if step > self.tracker.last_step and self._agreed(trainer, self._due(step)):
                self._flush_losses(trainer, pl_module)
                self._estimate(trainer, pl_module)
            elif self._fixed_loss_due(trainer, step):
                self._flush_losses(trainer, pl_module)
                self._read_fixed_loss(trainer, pl_module, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A last estimate at the final step (within the budget), then the λ̂ figure of the whole run."""
        if self._disabled:
            return
        with self.schedule.timed():
            if trainer.global_step > self.tracker.last_step:
                self._flush_losses(trainer, pl_module)
                if self._agreed(trainer, self.schedule.plan is not None or self.schedule.within_budget()):
                    self._estimate(trainer, pl_module)
            report_figure(trainer, trainer.global_step)
        self._say_if_the_last_chains_had_not_relaxed()

    def _due(self, step: int) -> bool:
        """A planned or scheduled step, or (default schedule) a denser estimate while a transition may be under way."""
        if self.schedule.is_due(step, self.tracker.last_step):
            return True
        dense = (
            self.schedule.is_budgeted
            and self.tracker.evidence.wants_dense_estimates
            and step - self.tracker.last_step >= DENSE_EVERY
        )
        return dense and self.schedule.has_room(step, self.tracker.smallest_cost())

    def _fixed_loss_due(self, trainer: pl.Trainer, step: int) -> bool:
        """A reading of L(w*) between estimates (see :class:`~lightning_devinterp.tracking.schedule.FixedLossReadings`):
        only for the loss-drop detector, only where L(w*) is computed on data that stays the same (not on replayed
        training batches), and under the budgeted schedule only when the budget has room for it (if not, the next
        reading is considered a spacing later, not at every step).
        """
        if self.tracker.evidence.loss is None or self.data.buffers_batches:
            return False
        if not self._readings.due(step, self.tracker.last_step):
            return False
        if self.schedule.is_budgeted and not self._agreed(
            trainer, self.schedule.has_room(step, self.tracker.smallest_cost())
        ):
            self._readings.last_step = step
            return False
        return True

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
            trainer,
            pl_module,
            transition,
            on_transition=self.on_transition,
            save_checkpoint=self.save_checkpoint,
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
        started = self.clock()
        collective = cast(Collective, trainer.strategy) if trainer.world_size > 1 else None
        processes = Processes(trainer.world_size, trainer.global_rank, collective)
        allowance = self.schedule.allowance(step, self.tracker.smallest_cost())
        shape = processes.agree(self.tracker.shape_for(allowance, budgeted=self.schedule.is_budgeted))
        if shape is None:
            self._say_once_what_the_budget_affords(step)
            return
        shape = dataclasses.replace(shape, num_chains=max(shape.num_chains, trainer.world_size))
        try:
            inputs = self._inputs(trainer, pl_module, processes)
            if self.tracker.epsilon is None and self.config.epsilon == "auto":
                calibration = self.tracker.calibrate(step, inputs)
                rank_zero_info(
                    f"LLCMonitor: epsilon = {self.tracker.epsilon:g}, chosen at step {step} in {calibration.seconds:.1f}s: {calibration.message}"
                )
                report_calibration(trainer, calibration, step)
            previous_epsilon = self.tracker.epsilon
            result, epsilon_changed = self.tracker.sample(step, inputs, shape)
        except Exception as error:
            self.schedule.record(self.clock() - started)
            trainer.progress_bar_metrics.pop("llc", None)
            if self.on_error == "raise":
                raise
            self._warn_once_per_failure(step, error)
            return
        record = self.tracker.record(step, result, self.clock() - started, epsilon_changed)
        if previous_epsilon is None or epsilon_changed:
            report_epsilon(trainer, record, previous_epsilon)
        report_estimate(trainer, record)
        self._warn_once_if_unhealthy(record)
        transition = self.tracker.detect(record, fixed_data=not self.data.buffers_batches)
        if transition is not None:
            self._announce(trainer, pl_module, transition)
        self.schedule.record(self.clock() - started)

    def _inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule, processes: Processes) -> EstimateInputs:
        """What an estimate or a reading of L(w*) is taken of: the module, its loss, the data (chosen with the global
        RNG states kept), the processes that share the work and the Trainer's forward context.
        """
        assert self._resolved_loss is not None
        with preserved_rng_states():
            source = self.data.source(pl_module.device)
        forward_context = trainer.strategy.precision_plugin.forward_context
        return EstimateInputs(pl_module, self._resolved_loss, source, processes, forward_context)

    def _read_fixed_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Read L(w*) between estimates, log it as ``llc/init_loss``, pass on a transition it shows, and space the
        next reading so that readings cost at most their share of the training time.
        """
        started = self.clock()
        self._readings.last_step = step
        try:
            value, transition = self.tracker.read_fixed_loss(step, self._inputs(trainer, pl_module, Processes()))
        except Exception as error:
            if self.on_error == "raise":
                raise
            self._warn_once_per_failure(step, error, what="reading of L(w*)")
            return
        log_scalars(trainer, {names.LLC_INIT_LOSS: value}, step)
        if transition is not None:
            self._announce(trainer, pl_module, transition)
        every = self._readings.spacing_after(self.clock() - started, self.schedule.typical_step_seconds())
        # Timing differs between ranks; the spacing must not, or the ranks' detectors would part ways.
        self._readings.every = int(trainer.strategy.broadcast(every, src=0)) if trainer.world_size > 1 else every

    def _say_once_what_the_budget_affords(self, step: int) -> None:
        """A planned estimate did not fit the budget even at its smallest: say once what the plan would cost."""
        if self._warned_budget:
            return
        self._warned_budget = True
        assert self.schedule.max_overhead is not None
        shape = self.tracker.smallest_shape()
        smallest = self.tracker.smallest_cost() or 0.0
        training = max(self.schedule.projected_training_seconds(step), 1e-9)
        planned = len(self.schedule.plan or []) or 1
        affordable = len(self.history) + int(self.schedule.affordable(step, smallest))
        rank_zero_warn(
            f"LLCMonitor: even the smallest estimate ({shape.num_chains} chains x {shape.num_steps} SGLD steps) takes about {smallest:.2g}s here, so within "
            f"max_overhead={self.schedule.max_overhead:g} this run affords about {affordable} "
            f"of the {planned} planned estimates; some are skipped. All of them would cost about {planned * smallest / training:.0%} "
            "of the training time: raise max_overhead, or choose every_n_steps=... .",
            category=LLCEstimateWarning,
        )

    def _say_if_the_last_chains_had_not_relaxed(self) -> None:
        """At the end of training: if the last estimate's chains may not have relaxed, say how low λ̂ may read and why."""
        if not self.history:
            return
        last = self.history[-1].result
        if not last.relaxed_share < RELAXED_ENOUGH or last.llc_mean <= 0:
            return
        rank_zero_warn(
            f"LLCMonitor: the last estimate's chains had run {last.steps_before_draws} SGLD steps since they started at "
            f"w*, and the localization pulls them out at only epsilon * gamma = {last.epsilon * last.gamma:.2g} per step, "
            f"so λ̂ may read up to {1 - last.relaxed_share:.0%} low (llc/upper allows for it). More steps relax them: "
            "a longer run (the budget grows with it), a larger max_overhead, or a larger gamma.",
            category=LLCEstimateWarning,
        )

    def _warn_once_per_failure(self, step: int, error: Exception, what: str = "estimate") -> None:
        """Warn about a failed estimate (or reading of L(w*), ``what``); the same failure again (say, a diverged
        training run) only goes to the log.
        """
        reason = f"{type(error).__name__}: {error}"
        if reason in self._failures_seen:
            log.info("LLCMonitor: the %s at step %d failed again (%s)", what, step, reason)
            return
        self._failures_seen.add(reason)
        rank_zero_warn(
            f"LLCMonitor: the {what} at step {step} failed and was skipped ({reason}). Training continues; the same "
            "failure later is logged at INFO, not warned again.",
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
        return {
            **self.tracker.state_dict(),
            "schedule": self.schedule.state_dict(),
            "warned_unhealthy": self._warned_unhealthy,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)
        self.schedule.load_state_dict(state_dict["schedule"])
        self._warned_unhealthy = state_dict.get("warned_unhealthy", False)
        self._restored = True

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """A checkpoint saved by a monitor with another configuration (a changed schedule, say) is stored under another
        key, which Lightning would skip with a generic warning. With exactly one such state and none of this
        monitor's own, continue its history and say so; with several, say why none is continued.
        """
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
