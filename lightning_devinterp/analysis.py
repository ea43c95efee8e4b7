"""λ̂ after the fact: estimate every saved checkpoint of a run, in step order, and find transitions over the series.

This is the post-hoc workflow behind ``lightning-devinterp analyze``: results are appended to a CSV as they come, so
that a rerun skips the checkpoints already done, and the transitions are found by the monitor's own method
(:func:`~lightning_devinterp.detect_transitions`, given each checkpoint's λ̂ and L(w*)).
"""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_devinterp import metric_names as names
from lightning_devinterp.detection.combined import detect_transitions
from lightning_devinterp.detection.transition import Transition
from lightning_devinterp.plotting import Scalars, plot_runs
from lightning_devinterp.sampling.estimate import estimate_llc
from lightning_devinterp.sampling.model_view import LossFn
from lightning_devinterp.sampling.susceptibility import flat_labels

RESULT_COLUMNS = [
    "step",
    "checkpoint",
    "llc_mean",
    "llc_std",
    "llc_stderr",
    "llc_lower",
    "llc_upper",
    "init_loss",
    "acceptance",
    "epsilon",
    "healthy",
    "seconds",
]
"""The CSV's columns for the full model; each parameter group adds ``<group>_llc_mean`` and ``<group>_llc_std``, and
a probe adds ``susceptibility_<group>_<label>`` for the full model (group ``all``) and each group."""


class AnalysisError(Exception):
    """The checkpoints or the output of an analysis cannot be used as given (the message says which and why)."""


def checkpoint_step(path: Path) -> int:
    """The training step of a checkpoint: ``step=N`` in its file name, else its ``global_step`` entry.

    Args:
        path: a Lightning checkpoint.

    Raises:
        AnalysisError: neither the name nor the checkpoint says its step.
    """
    match = re.search(r"step=(\d+)", path.name)
    if match:
        return int(match.group(1))
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except Exception as error:
        raise AnalysisError(f"cannot read the step of {path}: {error}") from None


def result_columns(groups: Sequence[str], susceptibility_labels: Sequence[str] = ()) -> list[str]:
    """The CSV's columns: :data:`RESULT_COLUMNS`, the mean and std of each group's λ̂, then the mean susceptibility
    per group and probe label.

    Args:
        groups: the names of the parameter groups, in order.
        susceptibility_labels: the probe's labels (``["mean"]`` for a probe without labels; none without a probe).
    """
    return (
        RESULT_COLUMNS
        + [f"{group}_{field}" for group in groups for field in ("llc_mean", "llc_std")]
        + [
            susceptibility_column(group, label)
            for group in [names.FULL_MODEL, *groups]
            for label in susceptibility_labels
        ]
    )


def susceptibility_column(group: str, label: str) -> str:
    """The CSV column of a group's mean susceptibility over the probe samples with ``label``.

    Args:
        group: a parameter group's name, or ``"all"`` for the full model.
        label: a probe label, or ``"mean"``.
    """
    return f"susceptibility_{group}_{label}"


def _susceptibility_labels(estimate_kwargs: dict[str, Any]) -> list[str]:
    if estimate_kwargs.get("probe") is None:
        return []
    labels = estimate_kwargs.get("probe_labels")
    if labels is None:
        return ["mean"]
    return [str(label) for label in dict.fromkeys(flat_labels(labels))]


def _done_steps(csv_path: Path, columns: list[str]) -> set[int]:
    """Steps already in ``csv_path`` (a previous run of analyze), so that a rerun skips them."""
    if not csv_path.exists():
        return set()
    with csv_path.open() as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != columns:
            raise AnalysisError(
                f"{csv_path} exists but was not written by this version of analyze (its columns differ); choose another output"
            )
        try:
            return {int(row["step"]) for row in reader}
        except (TypeError, ValueError):
            raise AnalysisError(f"{csv_path} has a row whose step is not an integer; fix or remove the file") from None


def analyze(
    checkpoint_dir: str | Path,
    load_module: Callable[[str], Any],
    make_data: Callable[[], Any],
    csv_path: str | Path,
    *,
    loss_fn: LossFn | None = None,
    estimate_kwargs: dict[str, Any],
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[Transition]]:
    """Estimate λ̂ for each checkpoint under ``checkpoint_dir`` in step order, then find transitions over the series.

    Args:
        checkpoint_dir: a folder of Lightning checkpoints (``.ckpt``, searched recursively).
        load_module: loads one checkpoint (its path) into a model, e.g. ``MyModule.load_from_checkpoint``.
        make_data: returns the data to sample on (a DataLoader or Dataset), called once.
        csv_path: the CSV the results are appended to; checkpoints whose step it already holds are skipped.
        loss_fn: ``loss_fn(model, batch)``; default, for a LightningModule, its ``training_step`` loss.
        estimate_kwargs: keyword arguments of :func:`~lightning_devinterp.estimate_llc` (sampling settings, seed,
            device; ``probe``, ``per_sample_loss_fn`` and ``probe_labels`` add susceptibility columns).
        progress: show a progress bar.

    Returns:
        Every row of the CSV in step order (strings, as read back), and the transitions found over them.

    Raises:
        AnalysisError: no such folder, no checkpoint in it, a checkpoint that does not load, or a CSV that cannot be
            written or was not written by this function.
    """
    from tqdm import tqdm

    checkpoint_dir, csv_path = Path(checkpoint_dir), Path(csv_path)
    if not checkpoint_dir.is_dir():
        raise AnalysisError(f"no such directory: {checkpoint_dir}")
    checkpoints = sorted(
        ((checkpoint_step(path), path) for path in checkpoint_dir.rglob("*.ckpt")), key=lambda item: item[0]
    )
    if not checkpoints:
        raise AnalysisError(f"no .ckpt files under {checkpoint_dir}")
    columns = result_columns(list(estimate_kwargs.get("param_groups") or {}), _susceptibility_labels(estimate_kwargs))
    done = _done_steps(csv_path, columns)
    data = make_data()
    new_file = not csv_path.exists()
    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        handle = csv_path.open("a", newline="")
    except OSError as error:
        raise AnalysisError(f"cannot write {csv_path}: {error.strerror or error}") from None
    with handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new_file:
            writer.writeheader()
        todo = [(step, path) for step, path in checkpoints if step not in done]
        if len(todo) < len(checkpoints):
            print(f"skipping {len(checkpoints) - len(todo)} checkpoint(s) already in {csv_path}")
        for step, path in tqdm(todo, desc="checkpoints", disable=not progress):
            try:
                module = load_module(str(path))
            except Exception as error:
                raise AnalysisError(f"cannot load {path}: {type(error).__name__}: {error}") from None
            started = time.perf_counter()
            result = estimate_llc(module, data, loss_fn, **estimate_kwargs)
            writer.writerow(
                {
                    "step": step,
                    "checkpoint": str(path),
                    "llc_mean": result.llc_mean,
                    "llc_std": result.llc_std,
                    "llc_stderr": result.llc_stderr,
                    "llc_lower": result.llc_interval[0],
                    "llc_upper": result.llc_interval[1],
                    "init_loss": result.init_loss,
                    "acceptance": result.acceptance_mean,
                    "epsilon": result.epsilon,
                    "healthy": result.healthy,
                    "seconds": round(time.perf_counter() - started, 3),
                    **{
                        f"{name}_{field}": getattr(group, field)
                        for name, group in result.groups.items()
                        for field in ("llc_mean", "llc_std")
                    },
                    **{
                        susceptibility_column(group, label): value
                        for group, row in result.susceptibility_summary().items()
                        for label, value in row.items()
                    },
                }
            )
            handle.flush()
    with csv_path.open() as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: int(row["step"]))
    transitions = detect_transitions(
        [int(r["step"]) for r in rows],
        [float(r["llc_mean"]) for r in rows],
        metric=names.LLC_MEAN,
        healthy=[r["healthy"] == "True" for r in rows],
        fixed_losses=[float(r["init_loss"]) for r in rows],
    )
    return rows, transitions


def _as_scalars(rows: list[dict[str, Any]], transitions: list[Transition], groups: Sequence[str] = ()) -> Scalars:
    """An analysis's rows and transitions under the names the monitor logs, so :func:`plot_runs` draws them alike
    (L(w*) in the loss's place).
    """

    def column(name: str) -> list[tuple[int, float]]:
        return [(int(row["step"]), float(row[name])) for row in rows]

    scalars = {
        names.LLC_MEAN: column("llc_mean"),
        names.LLC_LOWER: column("llc_lower"),
        names.LLC_UPPER: column("llc_upper"),
        "init_loss": column("init_loss"),
    }
    for group in groups:
        scalars[names.group_metric(group, "mean")] = column(f"{group}_llc_mean")
    for transition in transitions:
        scalars.setdefault(names.transition_metric(transition.is_onset), []).append((transition.step, transition.score))
    return scalars


def plot_analysis(
    rows: list[dict[str, Any]], transitions: list[Transition], output: str | Path, groups: Sequence[str] = ()
) -> Path:
    """The picture of an analysis, drawn as :func:`~lightning_devinterp.plotting.plot_runs` draws a monitored run.

    Args:
        rows: the rows :func:`analyze` returned.
        transitions: the transitions it found.
        output: the PNG to write.
        groups: the parameter groups whose columns the rows hold.

    Returns:
        The path written.
    """
    return plot_runs({Path(output).stem: _as_scalars(rows, transitions, groups)}, output)
