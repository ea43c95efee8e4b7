"""LLCMonitor: estimate the local learning coefficient during ``Trainer.fit`` and log it beside the loss."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from lightning_devinterp._rng import preserved_rng_states
from lightning_devinterp.alerts import TransitionHook, announce_transition, log_scalars, tensorboard_loggers
from lightning_devinterp.calibration import CalibrationResult, calibrate_on_source
from lightning_devinterp.data import MinibatchSource
from lightning_devinterp.distributed import chains_per_rank, derive_seed, gather_runs
from lightning_devinterp.functional import LossFn, resolve_loss_fn
from lightning_devinterp.llc import LLCEstimationError, LLCResult, SamplingConfig, default_nbeta, run_chains, summarize_chains
from lightning_devinterp.params import select_parameter_names
from lightning_devinterp.schedule import EstimateSchedule
from lightning_devinterp.transitions import Transition, TransitionDetector

log = logging.getLogger(__name__)

SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


class LLCEstimateWarning(UserWarning):
    """An estimate failed and was skipped (``on_error="warn"``); training went on."""


@dataclasses.dataclass(frozen=True)
class LLCRecord:
    """One estimate taken during training, at optimizer step ``step``; ``seconds`` is its wall time."""

    step: int
    llc_mean: float
    llc_std: float
    result: LLCResult
    seconds: float

    @property
    def healthy(self) -> bool:
        return self.result.healthy


class _Replay(IterableDataset):
    """Replays buffered training batches as they were, for data that only exists as a stream."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)


class LLCMonitor(Callback):
    """Estimate λ̂ every so often during training, log it to every logger, and flag sudden jumps.

    Add it to a Trainer and nothing else changes: the estimate runs on the live module through a functional view
    (no deep copy), from a private data stream and private generators, so a seeded run ends with bit-identical
    weights and RNG states with or without the monitor.

    Schedule (choose at most one; default ``max_overhead=0.1``): ``every_n_steps``, ``log_spaced`` (K estimates
    log-uniform over the run) or ``max_overhead`` (estimate whenever the monitor's share of wall time stays at or
    below this fraction). Estimates also run at step 0 and at the end of training (the latter within the budget in
    ``max_overhead`` mode). Under ``fast_dev_run`` the monitor does nothing.

    Sampling arguments are those of :func:`~lightning_devinterp.estimate_llc`; the defaults here are lighter
    (100 draws after 50 burn-in steps) because estimates repeat. ``epsilon="auto"`` runs
    :func:`~lightning_devinterp.calibrate` at the first estimate and keeps its choice for the whole run (logged as
    ``llc/epsilon``, with the calibration table as TensorBoard text, and kept in checkpoints); while no epsilon
    qualifies (early in training w* is rarely near a minimum) the estimate is skipped with a warning and
    calibration is retried at the next one. ``nbeta`` defaults to ``n / log n`` with n the
    training set size; for an iterable training set without a length, pass ``nbeta``.

    Data: by default a private view of the training dataset (its collate_fn, the training batch size, its own
    generator, no workers); for an iterable dataset, the last ``buffer_size`` training batches. Or pass
    ``dataloader``. Loss: ``loss_fn(module, batch)``, default the module's ``training_step`` loss with ``self.log``
    silenced (modules with manual optimization must pass ``loss_fn``).

    Logged at ``trainer.global_step`` to every logger: ``llc/mean``, ``llc/std``, ``llc/lower``, ``llc/upper``
    (mean ± std), ``llc/init_loss``, ``llc/nbeta``, ``llc/epsilon``, ``llc/acceptance`` (mean MALA acceptance),
    ``llc/healthy`` (1 or 0) and ``llc/seconds``. ``llc/mean``
    is also in ``trainer.callback_metrics`` (for EarlyStopping/ModelCheckpoint) and the progress bar shows ``llc``.
    With a TensorBoardLogger a custom-scalars layout ("devinterp") and the configuration as text are written once.

    Transitions: each estimate is fed to ``detector`` (a :class:`TransitionDetector` by default; ``False`` turns
    detection off); a jump warns with :class:`TransitionWarning`, is logged, optionally checkpointed
    (``save_checkpoint``) and passed to ``on_transition(trainer, pl_module, transition)``.

    Faults: an estimate that raises is reported as :class:`LLCEstimateWarning` and skipped (``on_error="warn"``)
    or re-raised (``"raise"``). Under DDP the chains are split across ranks and gathered, so every rank holds the
    same history; sharded strategies (FSDP, DeepSpeed, ModelParallel) are rejected.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        log_spaced: int | None = None,
        max_overhead: float | None = None,
        num_chains: int = 4,
        num_draws: int = 100,
        num_burnin_steps: int = 50,
        num_steps_bw_draws: int = 1,
        epsilon: float | Literal["auto"] = 1e-4,
        gamma: float = 100.0,
        nbeta: float | None = None,
        sampler: str = "sgld",
        loss_fn: LossFn | None = None,
        dataloader: DataLoader | None = None,
        batch_size: int | None = None,
        params: str | list[str] | None = None,
        seed: int = 0,
        detector: TransitionDetector | Literal[False] | None = None,
        on_transition: TransitionHook | None = None,
        save_checkpoint: bool = False,
        on_error: Literal["warn", "raise"] = "warn",
        buffer_size: int = 32,
        vectorize: bool | Literal["auto"] = "auto",
    ) -> None:
        super().__init__()
        self.config = SamplingConfig(
            num_chains=num_chains,
            num_draws=num_draws,
            num_burnin_steps=num_burnin_steps,
            num_steps_bw_draws=num_steps_bw_draws,
            epsilon=epsilon,
            gamma=gamma,
            nbeta=nbeta,
            batch_size=batch_size,
            params=params,
            sampler=sampler,
            vectorize=vectorize,
        )
        self.schedule = EstimateSchedule(every_n_steps, log_spaced, max_overhead)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(module, batch), got {type(loss_fn).__name__}.")
        if dataloader is not None and not isinstance(dataloader, DataLoader):
            raise TypeError(f"dataloader must be a torch DataLoader, got {type(dataloader).__name__}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}.")
        if detector is not None and detector is not False and not isinstance(detector, TransitionDetector):
            raise TypeError(f"detector must be a TransitionDetector, False or None, got {type(detector).__name__}.")
        if on_transition is not None and not callable(on_transition):
            raise TypeError("on_transition must be callable as on_transition(trainer, pl_module, transition).")
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', got {on_error!r}.")
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be an integer >= 1, got {buffer_size!r}.")
        self.loss_fn = loss_fn
        self.dataloader = dataloader
        self.seed = seed
        self.detector: TransitionDetector | None = (
            None if detector is False else detector if detector is not None else TransitionDetector(metric="llc/mean")
        )
        self.on_transition = on_transition
        self.save_checkpoint = save_checkpoint
        self.on_error = on_error
        self.buffer_size = buffer_size
        self.history: list[LLCRecord] = []
        self.transitions: list[Transition] = []
        self._last_step = -1
        self._warned_unhealthy = False
        self._disabled = False
        self._source: MinibatchSource | None = None
        self._buffer: deque[Any] | None = None
        self._resolved_loss: LossFn | None = None
        self._nbeta: float | None = None
        self._epsilon: float | None = None if epsilon == "auto" else float(epsilon)
        self.calibration: CalibrationResult | None = None

    @property
    def epsilon(self) -> float | None:
        """The SGLD step size in use; with ``epsilon="auto"``, None until calibration has chosen one."""
        return self._epsilon

    @property
    def state_key(self) -> str:
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
        if trainer.world_size > self.config.num_chains:
            raise MisconfigurationException(
                f"LLCMonitor: num_chains={self.config.num_chains} cannot be split across {trainer.world_size} processes; "
                f"use at least {trainer.world_size} chains."
            )
        self._resolved_loss = resolve_loss_fn(pl_module, self.loss_fn)
        select_parameter_names(pl_module, self.config.params)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            self._disabled = True
            rank_zero_info("LLCMonitor: fast_dev_run is set, so no LLC estimates are taken.")
            return
        self._disabled = False
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self.schedule.start(int(total) if math.isfinite(total) else None)
        started = time.perf_counter()
        with preserved_rng_states():
            self._prepare_data(trainer, pl_module)
        self.schedule.charge(time.perf_counter() - started)
        self._write_tensorboard_header(trainer)
        rank_zero_info(f"LLCMonitor: estimating {self.schedule.describe()}, nbeta = {self._nbeta:.6g}.")
        if trainer.global_step == 0 and self._last_step < 0 and self._buffer is None:
            self._estimate(trainer, pl_module)

    def _prepare_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set up where estimates take their data from, and the nbeta they use (n is the training set size)."""
        device = pl_module.device
        if self.dataloader is not None:
            self._source = MinibatchSource(self.dataloader, self.config.batch_size, device)
            num_samples = self._source.num_samples
        else:
            loader = trainer.train_dataloader
            if not isinstance(loader, DataLoader):
                raise MisconfigurationException(
                    "LLCMonitor: the training data is not a single DataLoader; pass dataloader=... to choose the data."
                )
            batch_size = self.config.batch_size or loader.batch_size
            if batch_size is None:
                raise MisconfigurationException("LLCMonitor: the training DataLoader has no batch_size; pass batch_size=...")
            dataset = loader.dataset
            if isinstance(dataset, IterableDataset):
                self._buffer = deque(maxlen=self.buffer_size)
                if self.config.nbeta is None and getattr(dataset, "__len__", None) is None:
                    raise MisconfigurationException(
                        "LLCMonitor: the training set is an IterableDataset without a length, so n for nbeta = n / log n "
                        "is unknown; pass nbeta=..."
                    )
                num_samples = None if self.config.nbeta is not None else len(dataset)  # type: ignore[arg-type]
            else:
                private = DataLoader(dataset, batch_size=batch_size, collate_fn=loader.collate_fn)
                self._source = MinibatchSource(private, batch_size, device)
                num_samples = self._source.num_samples
        self._nbeta = self.config.nbeta if self.config.nbeta is not None else default_nbeta(num_samples)  # type: ignore[arg-type]

    def _write_tensorboard_header(self, trainer: pl.Trainer) -> None:
        layout = {
            "devinterp": {
                "LLC (mean ± std over chains)": ["Margin", ["llc/mean", "llc/lower", "llc/upper"]],
                "LLC and training loss": ["Multiline", [r"^llc/mean$", r"^(train[_/-]?)?loss(_step|_epoch)?$"]],
                "LLC health (1 = healthy)": ["Multiline", [r"^llc/healthy$"]],
                "Transitions (score)": ["Multiline", [r"^transitions/.*"]],
            }
        }
        settings = {**dataclasses.asdict(self.config), "nbeta (used)": self._nbeta, "schedule": self.schedule.describe(), "seed": self.seed}
        table = "| setting | value |\n|---|---|\n" + "\n".join(f"| {key} | {value} |" for key, value in settings.items())
        for logger in tensorboard_loggers(trainer):
            logger.experiment.add_custom_scalars(layout)
            logger.experiment.add_text("devinterp/config", table, global_step=trainer.global_step)

    # ---- when ----------------------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Buffer the batch (iterable data); with a buffer, the step-0 estimate waits for this first batch."""
        if self._disabled or self._buffer is None:
            return
        self._buffer.append(batch)
        if trainer.global_step == 0 and self._last_step < 0:
            self._estimate(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._disabled:
            return
        step = trainer.global_step
        if step > self._last_step and self._agreed(trainer, self.schedule.is_due(step)):
            self._estimate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._disabled or trainer.global_step <= self._last_step:
            return
        if self._agreed(trainer, self.schedule.within_budget()):
            self._estimate(trainer, pl_module)

    def _agreed(self, trainer: pl.Trainer, decision: bool) -> bool:
        """Rank zero's decision on every rank: time-based decisions could differ and deadlock the gather."""
        if trainer.world_size > 1 and self.schedule.is_budgeted:
            return bool(trainer.strategy.broadcast(decision, src=0))
        return decision

    # ---- what ----------------------------------------------------------------------------------------------

    def _data_source(self, pl_module: pl.LightningModule) -> MinibatchSource:
        if self._source is not None:
            return self._source
        assert self._buffer is not None
        if not self._buffer:
            raise LLCEstimationError("no training batches buffered yet.")
        replay = DataLoader(_Replay(list(self._buffer)), batch_size=None)
        batch_size = self.config.batch_size or int(torch.utils._pytree.tree_flatten(self._buffer[0])[0][0].shape[0])
        return MinibatchSource(replay, batch_size, pl_module.device)

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """Resolve ``epsilon="auto"`` once: calibrate on every rank alike, then take rank zero's choice everywhere."""
        config = dataclasses.replace(self.config, nbeta=self._nbeta)
        with preserved_rng_states():
            source = self._data_source(pl_module)
        assert self._resolved_loss is not None
        calibration, _ = calibrate_on_source(
            pl_module,
            self._resolved_loss,
            source,
            config,
            seed=derive_seed(self.seed, step, 0),
            forward_context=trainer.strategy.precision_plugin.forward_context,
        )
        chosen = calibration.best.epsilon if calibration.best is not None else 0.0
        if trainer.world_size > 1:
            chosen = float(trainer.strategy.broadcast(chosen, src=0))
        if not chosen:
            raise LLCEstimationError(f"epsilon='auto' at step {step}: {calibration.message} Calibration is retried at the next estimate.")
        self._epsilon, self.calibration = chosen, calibration
        rank_zero_info(f"LLCMonitor: epsilon = {chosen:g}, chosen at step {step} in {calibration.seconds:.1f}s: {calibration.message}")
        rows = sorted(calibration.table, key=lambda row: (row["nbeta"], row["epsilon"]))
        table = "| epsilon | nbeta | llc | acceptance | healthy | stable |\n|---|---|---|---|---|---|\n" + "\n".join(
            f"| {r['epsilon']:.3g} | {r['nbeta']:.4g} | {r['llc_mean']:.4g} | {r['acceptance']:.3f} | {r['healthy']} | {r['stable']} |" for r in rows
        )
        for logger in tensorboard_loggers(trainer):
            logger.experiment.add_text("devinterp/calibration", f"{calibration.message}\n\n{table}", global_step=step)

    def _sample(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> LLCResult:
        if self._epsilon is None:
            self._calibrate(trainer, pl_module, step)
        config = dataclasses.replace(self.config, nbeta=self._nbeta, epsilon=self._epsilon)
        counts = chains_per_rank(config.num_chains, trainer.world_size)
        local, error = None, None
        try:
            with preserved_rng_states():
                source = self._data_source(pl_module)
            assert self._resolved_loss is not None
            local = run_chains(
                pl_module,
                self._resolved_loss,
                source,
                config,
                num_chains=counts[trainer.global_rank],
                seed=derive_seed(self.seed, step, trainer.global_rank),
                forward_context=trainer.strategy.precision_plugin.forward_context,
            )
        except Exception as caught:
            if trainer.world_size == 1:
                raise
            error = caught
        if trainer.world_size == 1:
            assert local is not None
            return summarize_chains(local, config)
        gathered = gather_runs(trainer.strategy, local, counts, config.num_steps)
        if gathered is None:
            if error is not None:
                raise error
            raise LLCEstimationError("the estimate failed on another rank.")
        return summarize_chains(gathered, config)

    def _estimate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        self._last_step = step
        started = time.perf_counter()
        try:
            result = self._sample(trainer, pl_module, step)
        except Exception as error:
            self.schedule.record(time.perf_counter() - started)
            if self.on_error == "raise":
                raise
            rank_zero_warn(
                f"LLCMonitor: the estimate at step {step} failed and was skipped ({type(error).__name__}: {error}). "
                "Training continues.",
                category=LLCEstimateWarning,
            )
            return
        seconds = time.perf_counter() - started
        record = LLCRecord(step, result.llc_mean, result.llc_std, result, seconds)
        self.history.append(record)
        self._report(trainer, record)
        self._detect(trainer, pl_module, record)
        self.schedule.record(time.perf_counter() - started)

    # ---- where ---------------------------------------------------------------------------------------------

    def _report(self, trainer: pl.Trainer, record: LLCRecord) -> None:
        result = record.result
        log_scalars(
            trainer,
            {
                "llc/mean": record.llc_mean,
                "llc/std": record.llc_std,
                "llc/lower": record.llc_mean - record.llc_std,
                "llc/upper": record.llc_mean + record.llc_std,
                "llc/init_loss": result.init_loss,
                "llc/nbeta": result.nbeta,
                "llc/acceptance": result.acceptance_mean,
                "llc/epsilon": result.epsilon,
                "llc/healthy": float(result.healthy),
                "llc/seconds": record.seconds,
            },
            record.step,
        )
        trainer.callback_metrics["llc/mean"] = torch.tensor(record.llc_mean)
        trainer.progress_bar_metrics["llc"] = round(record.llc_mean, 3)
        if trainer.is_global_zero:
            log.info(
                "step %d: llc = %.4g ± %.3g (%.2fs)%s", record.step, record.llc_mean, record.llc_std, record.seconds,
                "" if result.healthy else " [unhealthy: " + " ".join(result.warnings) + "]",
            )
        if not result.healthy and not self._warned_unhealthy:
            self._warned_unhealthy = True
            rank_zero_warn(
                f"LLCMonitor: the estimate at step {record.step} is marked unhealthy: {' '.join(result.warnings)} "
                "Later unhealthy estimates are marked by llc/healthy = 0 and in the INFO log, without another warning.",
                category=LLCEstimateWarning,
            )

    def _detect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: LLCRecord) -> None:
        if self.detector is None:
            return
        alive = record.result.num_chains_used
        standard_error = record.llc_std / math.sqrt(alive) if alive > 1 else None
        transition = self.detector.update(record.step, record.llc_mean, standard_error, healthy=record.healthy)
        if transition is not None:
            self.transitions.append(transition)
            announce_transition(trainer, pl_module, transition, on_transition=self.on_transition, save_checkpoint=self.save_checkpoint)

    # ---- persistence ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [
                {**{f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != "result"}, "result": dataclasses.asdict(record.result)}
                for record in self.history
            ],
            "transitions": [dataclasses.asdict(transition) for transition in self.transitions],
            "last_step": self._last_step,
            "schedule": self.schedule.state_dict(),
            "detector": self.detector.state_dict() if self.detector is not None else None,
            "epsilon": self._epsilon,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [LLCRecord(**{**record, "result": LLCResult(**record["result"])}) for record in state_dict["history"]]
        self.transitions = [Transition(**transition) for transition in state_dict["transitions"]]
        self._last_step = state_dict["last_step"]
        self.schedule.load_state_dict(state_dict["schedule"])
        if self.detector is not None and state_dict["detector"] is not None:
            self.detector.load_state_dict(state_dict["detector"])
        if self.config.epsilon == "auto" and state_dict.get("epsilon") is not None:
            self._epsilon = state_dict["epsilon"]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._source = None
        self._buffer = None
