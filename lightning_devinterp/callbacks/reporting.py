"""Where results go: scalars to every logger, TensorBoard layout and text, and transition alerts."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_devinterp import metric_names as names
from lightning_devinterp.detection.transition import Transition, TransitionWarning
from lightning_devinterp.plotting import pyplot, read_runs, runs_figure, susceptibility_heatmap
from lightning_devinterp.sampling.calibration import CalibrationResult
from lightning_devinterp.sampling.result import LLCResult
from lightning_devinterp.tracking.tracker import LLCRecord

log = logging.getLogger(__name__)

TransitionHook = Callable[[pl.Trainer, pl.LightningModule, Transition], None]


def _exactly(name: str) -> str:
    return f"^{re.escape(name)}$"


def tensorboard_layout(with_groups: bool) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars charts written once per run, only those that will have content (TensorBoard regexes are
    matched with ``re.match``). λ̂ and the loss have charts of their own: TensorBoard draws one y-axis per chart, and
    their scales have nothing in common. Transitions are drawn in the Images tab (:func:`report_figure`), where onsets
    and ends can be told apart.

    Args:
        with_groups: whether the monitor estimates ``param_groups`` (then each group's λ̂ gets a chart beside the full
            model's).
    """
    charts: dict[str, list[Any]] = {
        "LLC (mean, 90% interval)": ["Margin", [names.LLC_MEAN, names.LLC_LOWER, names.LLC_UPPER]],
        "Training loss": ["Multiline", [r"^(train[_/-]?)?loss(_step|_epoch)?$"]],
        "LLC health (1 = healthy)": ["Multiline", [_exactly(names.LLC_HEALTHY)]],
    }
    if with_groups:
        charts["LLC by component (param_groups)"] = ["Multiline", [_exactly(names.LLC_MEAN), names.GROUP_MEAN.pattern]]
    return {"devinterp": charts}


def tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    """The trainer's TensorBoard loggers (none under ``fast_dev_run``, which replaces the loggers).

    Args:
        trainer: the running Trainer.
    """
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write scalars to every logger directly, bypassing ``log_every_n_steps`` (loggers write on rank zero only).

    Args:
        trainer: the running Trainer.
        metrics: scalar values by name.
        step: the step they belong to.
    """
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table, as TensorBoard's text dashboard renders it.

    Args:
        header: the column titles.
        rows: the cells, row by row.
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def write_run_header(trainer: pl.Trainer, settings: dict[str, Any], with_groups: bool) -> None:
    """The custom-scalars layout and the monitor's settings as a text table, once per TensorBoard run.

    Args:
        trainer: the running Trainer.
        settings: the settings to show, by name.
        with_groups: whether the monitor estimates ``param_groups``.
    """
    table = markdown_table(["setting", "value"], [[key, value] for key, value in settings.items()])
    for logger in tensorboard_loggers(trainer):
        logger.experiment.add_custom_scalars(tensorboard_layout(with_groups))
        logger.experiment.add_text("devinterp/config", table, global_step=trainer.global_step)


def report_calibration(trainer: pl.Trainer, calibration: CalibrationResult, step: int) -> None:
    """The calibration's message and table as TensorBoard text.

    Args:
        trainer: the running Trainer.
        calibration: what ``epsilon="auto"`` measured and chose.
        step: the step it was run at.
    """
    rows = sorted(calibration.table, key=lambda row: (row["nbeta"], row["epsilon"]))
    table = markdown_table(
        ["epsilon", "nbeta", "llc", "acceptance", "healthy", "stable"],
        [
            [
                f"{r['epsilon']:.3g}",
                f"{r['nbeta']:.4g}",
                f"{r['llc_mean']:.4g}",
                f"{r['acceptance']:.3f}",
                r["healthy"],
                r["stable"],
            ]
            for r in rows
        ],
    )
    for logger in tensorboard_loggers(trainer):
        logger.experiment.add_text("devinterp/calibration", f"{calibration.message}\n\n{table}", global_step=step)


def report_epsilon(trainer: pl.Trainer, record: LLCRecord, previous: float | None) -> None:
    """Say which step size the estimates use from this one on: once adapted, and again whenever health changed it.

    Args:
        trainer: the running Trainer.
        record: the estimate that first used the step.
        previous: the step used before, or None at the first adaptation.
    """
    epsilon = record.result.epsilon
    if previous is None:
        message = f"LLCMonitor: step size epsilon = {epsilon:.3g}, adapted at step {record.step} (kept for the run unless health demands a change)."
    else:
        message = (
            f"LLCMonitor: step size changed from {previous:.3g} to {epsilon:.3g} at step {record.step}, because the chains at the "
            "old step diverged or fell below the acceptance floor; λ̂ before and after is not directly comparable."
        )
    if trainer.is_global_zero:
        log.info(message)
    for logger in tensorboard_loggers(trainer):
        logger.experiment.add_text("devinterp/epsilon", message, global_step=record.step)


_LLC_FIELDS = ("mean", "std", "stderr", "lower", "upper")
"""What is logged of λ̂, for the full model (``llc/<field>``) and each group (``llc/<group>/<field>``)."""


def _llc_fields(result: LLCResult) -> tuple[float, ...]:
    """λ̂, the spread over chains, the standard error and the 90% interval, in the order of :data:`_LLC_FIELDS`."""
    lower, upper = result.llc_interval
    return result.llc_mean, result.llc_std, result.llc_stderr, lower, upper


def report_estimate(trainer: pl.Trainer, record: LLCRecord) -> None:
    """Log an estimate: ``llc/*`` scalars to every logger at its step, and a healthy one to the Trainer's metrics.

    A healthy estimate also goes into ``trainer.callback_metrics`` (``llc/mean``, each ``llc/<group>/mean``, and
    ``llc/step``, the step it was taken at) and the progress bar; an unhealthy one does not, and the progress bar
    drops ``llc`` until a healthy one comes, so that neither shows a number that is not a measurement.

    Args:
        trainer: the running Trainer.
        record: the estimate.
    """
    result = record.result
    full_model = (names.LLC_MEAN, names.LLC_STD, names.LLC_STDERR, names.LLC_LOWER, names.LLC_UPPER)
    log_scalars(
        trainer,
        {
            **dict(zip(full_model, _llc_fields(result))),
            names.LLC_INIT_LOSS: result.init_loss,
            names.LLC_NBETA: result.nbeta,
            names.LLC_ACCEPTANCE: result.acceptance_mean,
            names.LLC_EPSILON: result.epsilon,
            names.LLC_HEALTHY: float(result.healthy),
            names.LLC_SECONDS: record.seconds,
            **{
                names.group_metric(name, field): value
                for name, group in result.groups.items()
                for field, value in zip(_LLC_FIELDS, _llc_fields(group))
            },
            **{
                names.susceptibility_metric(group, label): value
                for group, row in result.susceptibility_summary().items()
                for label, value in row.items()
            },
        },
        record.step,
    )
    report_susceptibility_heatmap(trainer, record)
    if result.healthy:
        trainer.callback_metrics[names.LLC_MEAN] = torch.tensor(record.llc_mean)
        trainer.callback_metrics[names.LLC_STEP] = torch.tensor(float(record.step))
        for name, group in result.groups.items():
            trainer.callback_metrics[names.group_metric(name, "mean")] = torch.tensor(group.llc_mean)
        trainer.progress_bar_metrics["llc"] = round(record.llc_mean, 3)
    else:
        trainer.progress_bar_metrics.pop("llc", None)
    if trainer.is_global_zero:
        log.info(
            "step %d: llc = %.4g ± %.3g (standard error; %.2fs)%s",
            record.step,
            record.llc_mean,
            result.llc_stderr,
            record.seconds,
            "" if result.healthy else " [unhealthy: " + " ".join(result.warnings) + "]",
        )


def report_susceptibility_heatmap(trainer: pl.Trainer, record: LLCRecord) -> None:
    """Draw the estimate's susceptibilities (groups × probe labels) into TensorBoard's Images tab, if it has any;
    without matplotlib, say once how to get the picture (the scalars are logged regardless).

    Args:
        trainer: the running Trainer.
        record: the estimate.
    """
    summary = record.result.susceptibility_summary()
    loggers = tensorboard_loggers(trainer)
    if not summary or not loggers or not trainer.is_global_zero:
        return
    figure = _figure_or_note(
        "susceptibility heatmap", lambda: susceptibility_heatmap(summary, f"susceptibility at step {record.step}")
    )
    if figure is not None:
        _add_figure(loggers, "devinterp/susceptibility", figure, record.step)


def report_figure(trainer: pl.Trainer, step: int) -> None:
    """Draw λ̂ beside the training loss, onsets and ends marked (and each group's λ̂ when there are groups), as
    ``lightning-devinterp plot`` does, from what this run's TensorBoard logs hold so far, into the Images tab at
    ``step``. Nothing is drawn before the first λ̂ is logged; without matplotlib, say once how to get the picture.

    Args:
        trainer: the running Trainer.
        step: the step the picture is filed under.
    """
    loggers = tensorboard_loggers(trainer)
    if not loggers or not trainer.is_global_zero:
        return
    for logger in loggers:
        logger.experiment.flush()
        runs = {name: scalars for name, scalars in read_runs(logger.log_dir).items() if names.LLC_MEAN in scalars}
        if not runs:
            continue
        figure = _figure_or_note("λ̂ figure", functools.partial(runs_figure, runs))
        if figure is None:
            return
        _add_figure([logger], names.FIGURE, figure, step)
        logger.experiment.flush()


def _figure_or_note(what: str, draw: Callable[[], Any]) -> Any:
    """``draw()``'s figure, or None without matplotlib, saying so once per process for each kind of picture."""
    try:
        return draw()
    except ImportError as error:
        if what not in _said_once:
            _said_once.add(what)
            rank_zero_info(f"LLCMonitor: no {what} in TensorBoard's Images tab ({error}); the scalars are logged.")
        return None


def _add_figure(loggers: list[TensorBoardLogger], tag: str, figure: Any, step: int) -> None:
    """File ``figure`` under ``tag`` at ``step`` in each logger's Images tab, then close it."""
    for logger in loggers:
        logger.experiment.add_figure(tag, figure, global_step=step, close=False)
    pyplot().close(figure)


_said_once: set[str] = set()
"""Pictures this process has already said it cannot draw (once per process is enough)."""


def transition_checkpoint_path(trainer: pl.Trainer, transition: Transition) -> str:
    """``<checkpoint dir>/transition-<metric>-step=<step>.ckpt``, beside the trainer's own checkpoints.

    Args:
        trainer: the running Trainer.
        transition: the report the checkpoint is saved for.
    """
    callback = trainer.checkpoint_callback
    directory = getattr(callback, "dirpath", None) or os.path.join(
        trainer.log_dir or trainer.default_root_dir, "checkpoints"
    )
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
    """Warn once (rank zero; the same text goes to the INFO log), log the onset or end as a scalar and a text entry,
    redraw the λ̂ figure with it (:func:`report_figure`), optionally checkpoint, then call the user's hook.

    Runs on every rank with the same ``transition`` (decisions are made from gathered values), so the collective
    checkpoint save is safe under DDP.

    Args:
        trainer: the running Trainer.
        pl_module: the module being trained (passed to the hook).
        transition: the report.
        on_transition: the user's hook, or None.
        save_checkpoint: save a checkpoint at the report.
    """
    message = transition.describe()
    rank_zero_warn(message, category=TransitionWarning)
    if trainer.is_global_zero:
        log.info(message)
    log_scalars(trainer, {names.transition_metric(transition.is_onset): transition.score}, transition.step)
    for logger in tensorboard_loggers(trainer):
        logger.experiment.add_text(
            f"{names.TRANSITIONS_PREFIX}{transition.metric}", message, global_step=transition.step
        )
    report_figure(trainer, transition.step)
    if save_checkpoint:
        trainer.save_checkpoint(transition_checkpoint_path(trainer, transition))
    if on_transition is not None:
        on_transition(trainer, pl_module, transition)
