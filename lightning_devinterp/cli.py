"""``lightning-devinterp``, the console script: ``plot`` (:mod:`lightning_devinterp.plotting`) and ``analyze``
(:mod:`lightning_devinterp.analysis`) as commands, with every error reported in one line.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_devinterp.analysis import AnalysisError, analyze, plot_analysis
from lightning_devinterp.detection.transition import Transition
from lightning_devinterp.plotting import plot_runs, read_runs
from lightning_devinterp.sampling.config import ESTIMATE_DEFAULTS, SamplingConfig
from lightning_devinterp.sampling.model_view import training_step_loss
from lightning_devinterp.sampling.result import LLCEstimationError


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


def _plot_command(args: argparse.Namespace) -> int:
    log_dir = Path(args.logdir)
    output = Path(args.output) if args.output else log_dir / "llc.png"
    runs = read_runs(log_dir)
    try:
        path = plot_runs(runs, output, log_x=args.log_x)
    except OSError as error:
        raise CLIError(f"cannot write {output}: {error.strerror or error}") from None
    print(f"wrote {path}")
    return 0


def _analyze_command(args: argparse.Namespace) -> int:
    module_class = _import(args.module)
    if not hasattr(module_class, "load_from_checkpoint"):
        raise CLIError(f"{args.module} has no load_from_checkpoint (expected a LightningModule class)")
    make_data = _theirs(f"--data {args.data}", _import(args.data))
    loss_fn = (
        _theirs(f"--loss {args.loss}", _import(args.loss))
        if args.loss
        else _theirs(f"{args.module}.training_step", training_step_loss)
    )
    csv_path = Path(args.output) if args.output else Path(args.checkpoint_dir) / "llc.csv"
    settings = sampling_settings(args)
    rows, transitions = analyze(
        Path(args.checkpoint_dir),
        lambda path: module_class.load_from_checkpoint(path, map_location=args.device),
        make_data,
        csv_path,
        loss_fn=loss_fn,
        estimate_kwargs={**settings, "seed": args.seed, "device": args.device},
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
        print(
            f"wrote {plot_analysis(rows, transitions, csv_path.with_suffix('.png'), list(settings['param_groups'] or {}))}"
        )
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
    literals = [
        value for option in options if typing.get_origin(option) is typing.Literal for value in typing.get_args(option)
    ]

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
    """Add one option per SamplingConfig field (``--num-chains``, ``--epsilon``, ...), typed and described as it is.

    Args:
        parser: the parser (or sub-command parser) to extend.
    """
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
            parser.add_argument(
                option, type=_parse_setting(field.name, hints[field.name]), default=default, help=described
            )


def sampling_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling settings given on the command line, as keyword arguments for SamplingConfig.

    Args:
        args: the parsed command line.

    Raises:
        CLIError: ``--param-groups`` or ``--sampler-kwargs`` items that are not NAME=VALUE.
    """
    settings = {field.name: getattr(args, field.name) for field in dataclasses.fields(SamplingConfig)}
    if settings["param_groups"] is not None:
        groups = [item.partition("=") for item in settings["param_groups"]]
        if any(not sep or not name or not patterns for name, sep, patterns in groups):
            raise CLIError(
                "--param-groups takes NAME=PATTERN[,PATTERN] items, e.g. attn=blocks.*.attn mlp=blocks.*.mlp"
            )
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
    """The ``lightning-devinterp`` argument parser, with its ``plot`` and ``analyze`` commands."""
    parser = _OneLineParser(
        prog="lightning-devinterp",
        description="Look at local learning coefficient estimates: plot the ones LLCMonitor logged, or estimate them "
        "for a folder of saved checkpoints.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    plot = verbs.add_parser(
        "plot",
        help="draw λ̂ with its 90% interval and the training loss from TensorBoard logs, with transitions marked",
        description="Read the TensorBoard event files under LOGDIR (one panel per run that has llc/mean) and draw λ̂ with its 90% interval "
        "with the training loss on a twin axis and transitions as vertical lines.",
    )
    plot.add_argument("logdir", help="a TensorBoard log directory (searched recursively for runs)")
    plot.add_argument("-o", "--output", help="PNG to write; its folder is created (default: LOGDIR/llc.png)")
    plot.add_argument("--log-x", action="store_true", help="log-scaled step axis")
    plot.set_defaults(handler=_plot_command)
    analyze_parser = verbs.add_parser(
        "analyze",
        help="estimate λ̂ for every checkpoint in a folder, in step order, resumably",
        description="Estimate λ̂ for each .ckpt under CKPT_DIR in step order (the step comes from 'step=N' in the file name "
        "or the checkpoint itself). Results are appended to a CSV as they come, so a rerun skips finished checkpoints. "
        "Then detect transitions over the series and write them, and a plot, next to the CSV.",
    )
    analyze_parser.add_argument(
        "checkpoint_dir",
        metavar="CKPT_DIR",
        help="a folder of Lightning checkpoints (.ckpt, searched recursively), e.g. ModelCheckpoint's dirpath",
    )
    analyze_parser.add_argument(
        "--module",
        required=True,
        help="the LightningModule class, as package.module:Class; the module must be importable (run from its folder, or add it to PYTHONPATH)",
    )
    analyze_parser.add_argument(
        "--data", required=True, help="a function returning a DataLoader or Dataset, as package.module:function"
    )
    analyze_parser.add_argument(
        "--loss", help="loss_fn(model, batch) as package.module:function (default: training_step's loss)"
    )
    analyze_parser.add_argument("-o", "--output", help="CSV to write (default: CKPT_DIR/llc.csv)")
    add_sampling_arguments(analyze_parser)
    analyze_parser.add_argument("--seed", type=int, default=0, help="seeds every estimate (default: 0)")
    analyze_parser.add_argument(
        "--device", default="cpu", help="where checkpoints are loaded and chains run, e.g. cuda (default: cpu)"
    )
    analyze_parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    analyze_parser.set_defaults(handler=_analyze_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script on ``argv`` (default: the command line); the exit status.

    Args:
        argv: the arguments after the program name.

    Returns:
        0 on success, 1 for an error in the input (reported in one line), 2 for a bad option (from argparse).
    """
    args = build_parser().parse_args(argv)
    try:
        status: int = args.handler(args)
        return status
    except (
        CLIError,
        AnalysisError,
        LLCEstimationError,
        FileNotFoundError,
        ImportError,
        ValueError,
        TypeError,
    ) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"lightning-devinterp {args.verb}: error: {first_line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
