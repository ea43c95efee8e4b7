"""Report what the monitors find: scalars to every logger, TensorBoard extras, and transition alerts."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_devinterp.transitions import Transition, TransitionWarning

log = logging.getLogger(__name__)

TransitionHook = Callable[[pl.Trainer, pl.LightningModule, Transition], None]


def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` at ``step`` to every logger directly, bypassing ``log_every_n_steps`` (loggers are rank-zero only)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def transition_checkpoint_path(trainer: pl.Trainer, transition: Transition) -> str:
    """``<checkpoint dir>/transition-<metric>-step=<step>.ckpt``, beside the trainer's own checkpoints."""
    callback = trainer.checkpoint_callback
    directory = getattr(callback, "dirpath", None) or os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
    metric = transition.metric.replace("/", "_")
    return os.path.join(directory, f"transition-{metric}-step={transition.step}.ckpt")


def announce_transition(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    transition: Transition,
    *,
    on_transition: TransitionHook | None,
    save_checkpoint: bool,
) -> None:
    """Warn (rank zero), log a marker scalar and a text entry, optionally checkpoint, then call the user's hook.

    Runs on every rank with the same ``transition`` (decisions are made from gathered values), so the collective
    checkpoint save is safe under DDP.
    """
    message = transition.describe()
    rank_zero_warn(message, category=TransitionWarning)
    if trainer.is_global_zero:
        log.warning(message)
    log_scalars(trainer, {f"transitions/{transition.metric}": transition.score}, transition.step)
    for logger in tensorboard_loggers(trainer):
        logger.experiment.add_text(f"transitions/{transition.metric}", message, global_step=transition.step)
        logger.experiment.flush()
    if save_checkpoint:
        trainer.save_checkpoint(transition_checkpoint_path(trainer, transition))
    if on_transition is not None:
        on_transition(trainer, pl_module, transition)
