"""Pictures of logged λ̂ runs: λ̂ beside the training loss, transitions marked, and each parameter group's λ̂.

:func:`read_runs` reads the scalars an :class:`~lightning_devinterp.LLCMonitor` wrote to TensorBoard (with
TensorBoard's own reader); :func:`plot_runs` draws them. ``lightning-devinterp plot`` is these two functions. Plotting
needs matplotlib (the ``[plot]`` extra); everything else here does not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning_devinterp import metric_names as names

Scalars = dict[str, list[tuple[int, float]]]
"""One run's scalars: tag -> (step, value) pairs in step order."""


def pyplot() -> Any:
    """Matplotlib's pyplot on the non-interactive Agg backend; an ImportError that says how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'lightning-devinterp[plot]'") from None
    return plt


def read_runs(log_dir: str | Path) -> dict[str, Scalars]:
    """The scalars of every TensorBoard run (a folder holding event files) under ``log_dir``, by run and tag.

    Args:
        log_dir: a TensorBoard log directory, searched recursively.

    Raises:
        FileNotFoundError: ``log_dir`` does not exist or holds no event files.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = Path(log_dir)
    if not log_dir.is_dir():
        raise FileNotFoundError(f"no such directory: {log_dir}")
    run_dirs = sorted({path.parent for path in log_dir.rglob("events.out.tfevents.*")})
    if not run_dirs:
        raise FileNotFoundError(f"no TensorBoard event files under {log_dir}")
    runs = {}
    for run_dir in run_dirs:
        events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        events.Reload()
        name = run_dir.relative_to(log_dir) if run_dir != log_dir else Path(*log_dir.resolve().parts[-2:])
        runs[str(name)] = {
            tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]
        }
    return runs


def _loss_tag(tags: Sequence[str]) -> str | None:
    """The training loss among ``tags``: ``train_loss`` and its usual spellings first, then any loss."""
    for pattern in (r"^train[_/-]?loss(_step)?$", r"^loss$", r".*loss.*"):
        matches = [tag for tag in tags if re.match(pattern, tag) and not tag.startswith(names.PREFIX)]
        if matches:
            return sorted(matches)[0]
    return None


def _transition_steps(scalars: Scalars) -> tuple[list[int], list[int]]:
    """Steps of the reported onsets and ends (logs of older versions, with one ``transitions/<metric>`` tag, count
    as onsets).
    """
    onsets = [step for step, _ in scalars.get(names.TRANSITION_ONSET, [])]
    ends = [step for step, _ in scalars.get(names.TRANSITION_END, [])]
    for tag, points in scalars.items():
        if tag.startswith(names.TRANSITIONS_PREFIX) and tag not in (names.TRANSITION_ONSET, names.TRANSITION_END):
            onsets += [step for step, _ in points]
    return sorted(set(onsets)), sorted(set(ends))


def _mark_transitions(axis: Any, scalars: Scalars) -> list[Any]:
    """Onsets as dashed red lines, ends as dotted grey ones; the legend handles (one per kind)."""
    handles = []
    onsets, ends = _transition_steps(scalars)
    styles = (
        (onsets, {"color": "tab:red", "linestyle": "--"}, "transition onset"),
        (ends, {"color": "gray", "linestyle": ":"}, "transition end"),
    )
    for steps_of, style, label in styles:
        for index, step in enumerate(steps_of):
            line = axis.axvline(step, linewidth=1.2, label=label if index == 0 else None, **style)
            if index == 0:
                handles.append(line)
    return handles


def _draw_llc(axis: Any, name: str, scalars: Scalars) -> list[Any]:
    steps, means = zip(*scalars[names.LLC_MEAN])
    handles: list[Any] = axis.plot(steps, means, color="tab:blue", marker=".", label="λ̂")
    if names.LLC_LOWER in scalars and names.LLC_UPPER in scalars:
        lowest, highest = dict(scalars[names.LLC_LOWER]), dict(scalars[names.LLC_UPPER])
        lower = [lowest.get(s, m) for s, m in zip(steps, means)]
        upper = [highest.get(s, m) for s, m in zip(steps, means)]
        axis.fill_between(steps, lower, upper, color="tab:blue", alpha=0.2, label="90% interval")
    axis.set_ylabel("λ̂", color="tab:blue")
    axis.set_title(name)
    loss_tag = _loss_tag(list(scalars))
    if loss_tag is not None:
        loss_axis = axis.twinx()
        handles += loss_axis.plot(*zip(*scalars[loss_tag]), color="tab:orange", alpha=0.7, label=loss_tag)
        loss_axis.set_yscale("log")
        loss_axis.set_ylabel(f"{loss_tag} (log scale)", color="tab:orange")
    return handles


def _draw_groups(axis: Any, name: str, scalars: Scalars, groups: list[str]) -> list[Any]:
    handles: list[Any] = axis.plot(
        *zip(*scalars[names.LLC_MEAN]), color="black", linestyle="--", linewidth=1, label="full model"
    )
    for group in groups:
        handles += axis.plot(*zip(*scalars[names.group_metric(group, "mean")]), marker=".", label=group)
    axis.set_ylabel("restricted λ̂")
    axis.set_title(f"{name}: λ̂ by component")
    return handles


def runs_figure(runs: dict[str, Scalars], log_x: bool = False) -> Any:
    """Each run that has λ̂ as a panel: λ̂ with its 90% interval (left axis), the training loss (right axis, log scale),
    transition onsets as dashed red lines and ends as dotted grey ones, with a legend. A run logged with
    ``param_groups`` gets a second panel: each group's λ̂ (``llc/<group>/mean``) beside the full model's.

    Args:
        runs: scalars by run name, as :func:`read_runs` returns them.
        log_x: a log-scaled step axis.

    Returns:
        The matplotlib figure (the caller closes or saves it).

    Raises:
        ValueError: no run has ``llc/mean`` scalars.
        ImportError: matplotlib is not installed.
    """
    plt = pyplot()
    with_llc = {name: scalars for name, scalars in runs.items() if names.LLC_MEAN in scalars}
    if not with_llc:
        raise ValueError(f"no run has {names.LLC_MEAN} scalars (was LLCMonitor attached with a TensorBoardLogger?)")
    panels: list[tuple[str, Scalars, list[str] | None]] = []
    for name, scalars in with_llc.items():
        panels.append((name, scalars, None))
        found = sorted(match.group(1) for match in map(names.GROUP_MEAN.match, scalars) if match)
        if found:
            panels.append((name, scalars, found))
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 3.4 * len(panels)), squeeze=False)
    for axis, (name, scalars, groups) in zip(axes[:, 0], panels):
        handles = _draw_llc(axis, name, scalars) if groups is None else _draw_groups(axis, name, scalars, groups)
        handles += _mark_transitions(axis, scalars)
        if log_x:
            axis.set_xscale("symlog", linthresh=1)
        axis.set_xlabel("step")
        axis.legend(handles=handles, loc="best", fontsize="small", ncol=1 if groups is None or len(groups) < 5 else 2)
    figure.tight_layout()
    return figure


def plot_runs(runs: dict[str, Scalars], output: str | Path, log_x: bool = False) -> Path:
    """Draw each run that has λ̂ into one PNG (:func:`runs_figure`).

    Args:
        runs: scalars by run name, as :func:`read_runs` returns them.
        output: the PNG to write; its folder is created.
        log_x: a log-scaled step axis.

    Returns:
        The path written.

    Raises:
        ValueError: no run has ``llc/mean`` scalars.
        ImportError: matplotlib is not installed.
    """
    figure = runs_figure(runs, log_x)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    pyplot().close(figure)
    return output


def _symmetric_scale(values: Iterable[float]) -> float:
    """The largest absolute value that is not NaN (1 when there is none, or it is 0): the colours span ±scale."""
    return max((abs(value) for value in values if not math.isnan(value)), default=1.0) or 1.0


def susceptibility_heatmap(summary: dict[str, dict[str, float]], title: str = "") -> Any:
    """A heatmap of susceptibilities, groups (rows) × probe labels (columns), diverging around zero.

    Args:
        summary: ``{group: {label: χ}}``, as :meth:`~lightning_devinterp.LLCResult.susceptibility_summary` gives.
        title: the figure's title.

    Returns:
        The matplotlib figure (the caller closes or saves it).

    Raises:
        ImportError: matplotlib is not installed.
    """
    plt = pyplot()
    groups = list(summary)
    labels = list(dict.fromkeys(label for row in summary.values() for label in row))
    values = [[summary[group].get(label, float("nan")) for label in labels] for group in groups]
    scale = _symmetric_scale(value for row in values for value in row)
    figure, axis = plt.subplots(figsize=(1.2 + 0.9 * len(labels), 0.8 + 0.45 * len(groups)))
    image = axis.imshow(values, cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axis.set_yticks(range(len(groups)), groups)
    for row, entries in enumerate(values):
        for column, value in enumerate(entries):
            axis.text(column, row, f"{value:.2g}", ha="center", va="center", fontsize=7)
    figure.colorbar(image, ax=axis, label="χ")
    if title:
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure


def plot_susceptibility_history(history: Sequence[tuple[int, dict[str, dict[str, float]]]], output: str | Path) -> Path:
    """Susceptibilities over training: one heatmap per probe label, groups (rows) × estimate steps (columns).

    Args:
        history: ``(step, summary)`` per estimate, each summary as
            :meth:`~lightning_devinterp.LLCResult.susceptibility_summary` gives.
        output: where to write the PNG.

    Returns:
        The path written.

    Raises:
        ValueError: no estimate has susceptibilities.
        ImportError: matplotlib is not installed.
    """
    history = [(step, summary) for step, summary in history if summary]
    if not history:
        raise ValueError("no estimate has susceptibilities to draw")
    plt = pyplot()
    groups = list(dict.fromkeys(group for _, summary in history for group in summary))
    labels = list(dict.fromkeys(label for _, summary in history for row in summary.values() for label in row))
    steps = [step for step, _ in history]
    figure, axes = plt.subplots(
        1, len(labels), figsize=(1.5 + 3.2 * len(labels), 0.9 + 0.4 * len(groups)), squeeze=False, sharey=True
    )
    values = {
        label: [[summary.get(group, {}).get(label, float("nan")) for _, summary in history] for group in groups]
        for label in labels
    }
    scale = _symmetric_scale(value for grid in values.values() for row in grid for value in row)
    for axis, label in zip(axes[0], labels):
        image = axis.imshow(values[label], cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
        ticks = sorted({0, len(steps) // 2, len(steps) - 1})
        axis.set_xticks(ticks, [str(steps[i]) for i in ticks])
        axis.set_yticks(range(len(groups)), groups)
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("step")
    figure.colorbar(image, ax=list(axes[0]), label="χ")
    output = Path(output)
    figure.savefig(output, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return output
