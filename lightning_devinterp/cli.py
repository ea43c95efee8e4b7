"""``lightning-devinterp``: plot logged λ̂ runs, and estimate λ̂ over saved checkpoints after the fact."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_devinterp.detection.combined import detect_transitions
from lightning_devinterp.detection.detector import Transition
from lightning_devinterp.sampling.config import ESTIMATE_DEFAULTS, SamplingConfig
from lightning_devinterp.sampling.model_view import training_step_loss
from lightning_devinterp.sampling.result import LLCEstimationError

RESULT_COLUMNS = ["step", "checkpoint", "llc_mean", "llc_std", "init_loss", "acceptance", "epsilon", "healthy", "seconds"]


class CLIError(Exception):
    """A problem with the user's input, reported as one line and a non-zero exit status."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (naming the option) and exit status 2, like every other error here."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _theirs(spec: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` (the user's, imported from ``spec``) with its exceptions reported as its own, in one line."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            raise CLIError(f"{spec} raised {type(error).__name__}: {error}") from error

    return call


def _import(spec: str) -> Any:
    """``package.module:attribute`` -> the attribute (the current directory is importable)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise CLIError(f"expected 'package.module:name', got {spec!r}")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except ImportError as error:
        raise CLIError(
            f"cannot import {spec}: {error}; the module must be importable: run from the directory that holds it, or add "
            "that directory to PYTHONPATH"
        ) from None
    except AttributeError as error:
        raise CLIError(f"cannot import {spec}: {error}") from None


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("plotting needs matplotlib: pip install 'lightning-devinterp[plot]'") from None
    return plt


# ---- plot ------------------------------------------------------------------------------------------------------

def read_runs(log_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Scalars of every TensorBoard run (a folder holding event files) under ``log_dir``, by run and tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not log_dir.is_dir():
        raise CLIError(f"no such directory: {log_dir}")
    run_dirs = sorted({path.parent for path in log_dir.rglob("events.out.tfevents.*")})
    if not run_dirs:
        raise CLIError(f"no TensorBoard event files under {log_dir}")
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
    for pattern in (r"^train[_/-]?loss(_step)?$", r"^loss$", r".*loss.*"):
        matches = [tag for tag in tags if re.match(pattern, tag) and not tag.startswith("llc/")]
        if matches:
            return sorted(matches)[0]
    return None


def _transition_steps(scalars: dict[str, list[tuple[int, float]]]) -> tuple[list[int], list[int]]:
    """Steps of the reported onsets and ends (logs of older versions, with one ``transitions/<metric>`` tag, count
    as onsets)."""
    onsets = [step for step, _ in scalars.get("transitions/onset", [])]
    ends = [step for step, _ in scalars.get("transitions/end", [])]
    for tag, points in scalars.items():
        if tag.startswith("transitions/") and tag not in ("transitions/onset", "transitions/end"):
            onsets += [step for step, _ in points]
    return sorted(set(onsets)), sorted(set(ends))


GROUP_TAG = re.compile(r"^llc/([^/]+)/mean$")


def _mark_transitions(axis: Any, scalars: dict[str, list[tuple[int, float]]]) -> list[Any]:
    """Onsets as dashed red lines, ends as dotted grey ones; the legend handles (one per kind)."""
    handles = []
    onsets, ends = _transition_steps(scalars)
    for steps_of, style, label in ((onsets, dict(color="tab:red", linestyle="--"), "transition onset"), (ends, dict(color="gray", linestyle=":"), "transition end")):
        for index, step in enumerate(steps_of):
            line = axis.axvline(step, linewidth=1.2, label=label if index == 0 else None, **style)
            if index == 0:
                handles.append(line)
    return handles


def _draw_llc(axis: Any, name: str, scalars: dict[str, list[tuple[int, float]]]) -> list[Any]:
    steps, means = zip(*scalars["llc/mean"])
    handles = axis.plot(steps, means, color="tab:blue", marker=".", label="λ̂")
    if "llc/std" in scalars:
        stds = dict(scalars["llc/std"])
        axis.fill_between(steps, [m - stds.get(s, 0.0) for s, m in zip(steps, means)],
                          [m + stds.get(s, 0.0) for s, m in zip(steps, means)], color="tab:blue", alpha=0.2)
    axis.set_ylabel("λ̂", color="tab:blue")
    axis.set_title(name)
    loss_tag = _loss_tag(list(scalars))
    if loss_tag is not None:
        loss_axis = axis.twinx()
        handles += loss_axis.plot(*zip(*scalars[loss_tag]), color="tab:orange", alpha=0.7, label=loss_tag)
        loss_axis.set_yscale("log")
        loss_axis.set_ylabel(f"{loss_tag} (log scale)", color="tab:orange")
    return handles


def _draw_groups(axis: Any, name: str, scalars: dict[str, list[tuple[int, float]]], groups: list[str]) -> list[Any]:
    handles = axis.plot(*zip(*scalars["llc/mean"]), color="black", linestyle="--", linewidth=1, label="full model")
    for group in groups:
        handles += axis.plot(*zip(*scalars[f"llc/{group}/mean"]), marker=".", label=group)
    axis.set_ylabel("restricted λ̂")
    axis.set_title(f"{name}: λ̂ by component")
    return handles


def plot_runs(runs: dict[str, dict[str, list[tuple[int, float]]]], output: Path, log_x: bool = False) -> Path:
    """One panel per run, titled with its name: λ̂ ± std (left axis), the training loss (right axis, log scale),
    transition onsets as dashed red lines and ends as dotted grey lines, with a legend. A run logged with
    ``param_groups`` gets a second panel: each group's λ̂ (``llc/<group>/mean``) beside the full model's."""
    plt = _pyplot()
    with_llc = {name: scalars for name, scalars in runs.items() if "llc/mean" in scalars}
    if not with_llc:
        raise CLIError("no run has llc/mean scalars (was LLCMonitor attached with a TensorBoardLogger?)")
    panels = []
    for name, scalars in with_llc.items():
        panels.append((name, scalars, None))
        groups = sorted(match.group(1) for match in map(GROUP_TAG.match, scalars) if match)
        if groups:
            panels.append((name, scalars, groups))
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 3.4 * len(panels)), squeeze=False)
    for axis, (name, scalars, groups) in zip(axes[:, 0], panels):
        handles = _draw_llc(axis, name, scalars) if groups is None else _draw_groups(axis, name, scalars, groups)
        handles += _mark_transitions(axis, scalars)
        if log_x:
            axis.set_xscale("symlog", linthresh=1)
        axis.set_xlabel("step")
        axis.legend(handles=handles, loc="best", fontsize="small", ncol=1 if groups is None or len(groups) < 5 else 2)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def _plot_command(args: argparse.Namespace) -> int:
    log_dir = Path(args.logdir)
    output = Path(args.output) if args.output else log_dir / "llc.png"
    try:
        path = plot_runs(read_runs(log_dir), output, log_x=args.log_x)
    except OSError as error:
        raise CLIError(f"cannot write {output}: {error.strerror or error}") from None
    print(f"wrote {path}")
    return 0


# ---- analyze ---------------------------------------------------------------------------------------------------

def _checkpoint_step(path: Path) -> int:
    match = re.search(r"step=(\d+)", path.name)
    if match:
        return int(match.group(1))
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
    except Exception as error:
        raise CLIError(f"cannot read the step of {path}: {error}") from None


def result_columns(groups: Sequence[str]) -> list[str]:
    """The CSV's columns: :data:`RESULT_COLUMNS`, then the mean and std of each group's λ̂."""
    return RESULT_COLUMNS + [f"{group}_{field}" for group in groups for field in ("llc_mean", "llc_std")]


def _done_steps(csv_path: Path, columns: list[str]) -> set[int]:
    """Steps already in ``csv_path`` (a previous run of analyze), so that a rerun skips them."""
    if not csv_path.exists():
        return set()
    with csv_path.open() as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != columns:
            raise CLIError(f"{csv_path} exists but was not written by this version of analyze (its columns differ); choose another -o")
        try:
            return {int(row["step"]) for row in reader}
        except (TypeError, ValueError):
            raise CLIError(f"{csv_path} has a row whose step is not an integer; fix or remove the file") from None


def analyze(
    checkpoint_dir: Path,
    load_module: Callable[[str], Any],
    make_data: Callable[[], Any],
    csv_path: Path,
    *,
    loss_fn: Callable | None = None,
    estimate_kwargs: dict[str, Any],
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[Transition]]:
    """Estimate λ̂ for each checkpoint in step order, appending to ``csv_path`` as results come (reruns skip them)."""
    from tqdm import tqdm

    from lightning_devinterp.sampling.estimate import estimate_llc

    if not checkpoint_dir.is_dir():
        raise CLIError(f"no such directory: {checkpoint_dir}")
    checkpoints = sorted(((_checkpoint_step(path), path) for path in checkpoint_dir.rglob("*.ckpt")), key=lambda item: item[0])
    if not checkpoints:
        raise CLIError(f"no .ckpt files under {checkpoint_dir}")
    columns = result_columns(list(estimate_kwargs.get("param_groups") or {}))
    done = _done_steps(csv_path, columns)
    data = make_data()
    new_file = not csv_path.exists()
    try:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        handle = csv_path.open("a", newline="")
    except OSError as error:
        raise CLIError(f"cannot write {csv_path}: {error.strerror or error}") from None
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
                raise CLIError(f"cannot load {path}: {type(error).__name__}: {error}") from None
            started = time.perf_counter()
            result = estimate_llc(module, data, loss_fn, **estimate_kwargs)
            writer.writerow(
                {
                    "step": step, "checkpoint": str(path), "llc_mean": result.llc_mean, "llc_std": result.llc_std,
                    "init_loss": result.init_loss, "acceptance": result.acceptance_mean, "epsilon": result.epsilon, "healthy": result.healthy,
                    "seconds": round(time.perf_counter() - started, 3),
                    **{f"{name}_{field}": getattr(group, field) for name, group in result.groups.items() for field in ("llc_mean", "llc_std")},
                }
            )
            handle.flush()
    with csv_path.open() as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: int(row["step"]))
    transitions = detect_transitions(
        [int(r["step"]) for r in rows],
        [float(r["llc_mean"]) for r in rows],
        metric="llc/mean",
        healthy=[r["healthy"] == "True" for r in rows],
        fixed_losses=[float(r["init_loss"]) for r in rows],
    )
    return rows, transitions


def _analyze_command(args: argparse.Namespace) -> int:
    module_class = _import(args.module)
    if not hasattr(module_class, "load_from_checkpoint"):
        raise CLIError(f"{args.module} has no load_from_checkpoint (expected a LightningModule class)")
    make_data = _theirs(f"--data {args.data}", _import(args.data))
    loss_fn = _theirs(f"--loss {args.loss}", _import(args.loss)) if args.loss else _theirs(f"{args.module}.training_step", training_step_loss)
    csv_path = Path(args.output) if args.output else Path(args.checkpoint_dir) / "llc.csv"
    estimate_kwargs = {**sampling_settings(args), "seed": args.seed, "device": args.device}
    rows, transitions = analyze(
        Path(args.checkpoint_dir),
        lambda path: module_class.load_from_checkpoint(path, map_location=args.device),
        make_data,
        csv_path,
        loss_fn=loss_fn,
        estimate_kwargs=estimate_kwargs,
    )
    print(f"{len(rows)} estimates in {csv_path}")
    transitions_path = csv_path.with_name(csv_path.stem + "_transitions.csv")
    with transitions_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[field.name for field in dataclasses.fields(Transition)])
        writer.writeheader()
        for transition in transitions:
            writer.writerow(dataclasses.asdict(transition))
            print("  " + transition.describe())
    print(f"{len(transitions)} transition event(s) in {transitions_path}")
    if not args.no_plot:
        plt = _pyplot()
        figure, axis = plt.subplots(figsize=(8, 3.5))
        steps = [int(r["step"]) for r in rows]
        axis.errorbar(steps, [float(r["llc_mean"]) for r in rows], yerr=[float(r["llc_std"]) for r in rows], marker="o")
        for transition in transitions:
            axis.axvline(transition.step, color="gray", linestyle="--")
        axis.set_xlabel("step")
        axis.set_ylabel("λ̂")
        figure.tight_layout()
        plot_path = csv_path.with_suffix(".png")
        figure.savefig(plot_path, dpi=120)
        plt.close(figure)
        print(f"wrote {plot_path}")
    return 0


def _setting_help() -> dict[str, str]:
    """Each sampling setting's description, read from the ``Args:`` section of SamplingConfig's docstring."""
    helps: dict[str, str] = {}
    name = None
    for line in (SamplingConfig.__doc__ or "").split("Args:", 1)[-1].splitlines():
        match = re.match(r"\s{8}(\w+): (.*)", line)
        if match:
            name, helps[match.group(1)] = match.group(1), match.group(2)
        elif name and line.strip():
            helps[name] += " " + line.strip()
    return helps


def _parse_setting(name: str, kind: Any) -> Callable[[str], Any]:
    """A string converter for a SamplingConfig field of type ``kind``, whose errors name the option."""
    options = [kind] if typing.get_origin(kind) not in (typing.Union, types.UnionType) else list(typing.get_args(kind))
    literals = [value for option in options if typing.get_origin(option) is typing.Literal for value in typing.get_args(option)]

    def parse(text: str) -> Any:
        if text in literals:
            return text
        if bool in options and text.lower() in ("true", "false"):
            return text.lower() == "true"
        for number in (int, float):
            if number in options:
                try:
                    return number(text)
                except ValueError:
                    pass
        if str in options:
            return text
        allowed = " or ".join([*(repr(v) for v in literals), *(o.__name__ for o in options if o in (int, float, bool))])
        raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} takes {allowed}, got {text!r}")

    return parse


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per SamplingConfig field (``--num-chains``, ``--epsilon``, ...), typed and described as the field is."""
    hints, helps = typing.get_type_hints(SamplingConfig), _setting_help()
    for field in dataclasses.fields(SamplingConfig):
        option, default = "--" + field.name.replace("_", "-"), ESTIMATE_DEFAULTS.get(field.name, field.default)
        described = f"{helps.get(field.name, '')} (default: {default})"
        if field.name == "params":
            parser.add_argument(option, nargs="+", default=None, help=described)
        elif field.name == "param_groups":
            parser.add_argument(option, nargs="+", default=None, metavar="NAME=PATTERN[,PATTERN]", help=described)
        elif field.name == "sampler_kwargs":
            parser.add_argument(option, nargs="+", default=None, metavar="KEY=VALUE", help=described)
        else:
            parser.add_argument(option, type=_parse_setting(field.name, hints[field.name]), default=default, help=described)


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings given on the command line, as keyword arguments for SamplingConfig."""
    settings = {field.name: getattr(args, field.name) for field in dataclasses.fields(SamplingConfig)}
    if settings["param_groups"] is not None:
        groups = [item.partition("=") for item in settings["param_groups"]]
        if any(not sep or not name or not patterns for name, sep, patterns in groups):
            raise CLIError("--param-groups takes NAME=PATTERN[,PATTERN] items, e.g. attn=blocks.*.attn mlp=blocks.*.mlp")
        settings["param_groups"] = {name: patterns.split(",") for name, _, patterns in groups}
    if settings["sampler_kwargs"] is not None:
        pairs = [item.partition("=") for item in settings["sampler_kwargs"]]
        if any(not sep for _, sep, _ in pairs):
            raise CLIError("--sampler-kwargs takes KEY=VALUE pairs, e.g. alpha=0.99")
        try:
            settings["sampler_kwargs"] = {key: float(value) for key, _, value in pairs}
        except ValueError as error:
            raise CLIError(f"--sampler-kwargs: {error}") from None
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="lightning-devinterp",
        description="Look at local learning coefficient estimates: plot the ones LLCMonitor logged, or estimate them "
        "for a folder of saved checkpoints.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    plot = verbs.add_parser(
        "plot", help="draw λ̂ ± std and the training loss from TensorBoard logs, with transitions marked",
        description="Read the TensorBoard event files under LOGDIR (one panel per run that has llc/mean) and draw λ̂ ± std "
        "with the training loss on a twin axis and transitions as vertical lines.",
    )
    plot.add_argument("logdir", help="a TensorBoard log directory (searched recursively for runs)")
    plot.add_argument("-o", "--output", help="PNG to write; its folder is created (default: LOGDIR/llc.png)")
    plot.add_argument("--log-x", action="store_true", help="log-scaled step axis")
    plot.set_defaults(handler=_plot_command)
    analyze_parser = verbs.add_parser(
        "analyze", help="estimate λ̂ for every checkpoint in a folder, in step order, resumably",
        description="Estimate λ̂ for each .ckpt under CKPT_DIR in step order (the step comes from 'step=N' in the file name "
        "or the checkpoint itself). Results are appended to a CSV as they come, so a rerun skips finished checkpoints. "
        "Then detect transitions over the series and write them, and a plot, next to the CSV.",
    )
    analyze_parser.add_argument(
        "checkpoint_dir", metavar="CKPT_DIR", help="a folder of Lightning checkpoints (.ckpt, searched recursively), e.g. ModelCheckpoint's dirpath"
    )
    analyze_parser.add_argument(
        "--module", required=True,
        help="the LightningModule class, as package.module:Class; the module must be importable (run from its folder, or add it to PYTHONPATH)",
    )
    analyze_parser.add_argument("--data", required=True, help="a function returning a DataLoader or Dataset, as package.module:function")
    analyze_parser.add_argument("--loss", help="loss_fn(model, batch) as package.module:function (default: training_step's loss)")
    analyze_parser.add_argument("-o", "--output", help="CSV to write (default: CKPT_DIR/llc.csv)")
    add_sampling_arguments(analyze_parser)
    analyze_parser.add_argument("--seed", type=int, default=0, help="seeds every estimate (default: 0)")
    analyze_parser.add_argument("--device", default="cpu", help="where checkpoints are loaded and chains run, e.g. cuda (default: cpu)")
    analyze_parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    analyze_parser.set_defaults(handler=_analyze_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CLIError, LLCEstimationError, ValueError, TypeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"lightning-devinterp {args.verb}: error: {first_line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
