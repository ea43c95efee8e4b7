"""How precise are the monitor's λ̂ points? LLCMonitor() with no arguments on ordinary runs, against long references.

For each run (ordinary CPU runs nobody tuned the monitor for: classifiers trained towards zero loss, a regression, an
MLP and a CNN on digits, an attention model, a staged deep linear network), the script

1. trains once without the monitor and once with ``LLCMonitor()`` (same training seed, so the same weights), and
   reports the wall-time overhead and the number of estimates;
2. keeps the weights at every estimate in the second half of training, and estimates a long reference there at the
   estimate's own settings (its step size, nβ, γ and batch size): two seeds of ``--reference-chains`` chains ×
   ``--reference-draws`` draws after ``--reference-burnin`` burn-in steps, cold-started at w*;
3. reports each point's relative error against its reference, whether the reported interval (``llc/lower`` to
   ``llc/upper``) covers the reference, and, per run and over all runs, the median and 90th-percentile error and
   the coverage.

Seeds pick each run's data, initialisation and (for odd seeds) a wider network: seed 0 is what defaults are tuned
on, seeds 1-2 are held out. Results are also written as JSON under ``benchmarks/precision_results/`` (ignored by git).

    python -m benchmarks.precision [--runs moons cancer regression mlp cnn attention staged] [--seeds 0]
    python -m benchmarks.precision --figure before after -o docs/precision.png   # two recorded labels, side by side
    python -m benchmarks.precision --relaxation --runs cnn attention   # do warm starts carry the relaxation?
    python -m benchmarks.precision --noise --runs mlp cnn      # where a draw's noise comes from
    python -m benchmarks.precision --pairing --runs moons mlp  # does pairing_gain say what pairing buys λ̂?
    python -m benchmarks.precision --groups --label groups      # the monitor with param_groups, references per group
    python -m benchmarks.precision --figure groups --groups -o precision-groups.png  # one panel per group
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.func import jvp, vmap
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.ordinary_runs import Classifier, Regressor, SmallCNN, TinyTransformer, digits, sequences
from examples.dln_stagewise import teacher_data
from lightning_devinterp import LLCMonitor, SamplingConfig, estimate_llc
from lightning_devinterp.sampling.chains import FULL_MODEL, mean_init_gradient
from lightning_devinterp.sampling.data import MinibatchSource
from lightning_devinterp.sampling.inputs import prepare_estimate
from lightning_devinterp.sampling.model_view import FunctionalLoss, quiet_evaluation
from lightning_devinterp.sampling.observables import Draw
from lightning_devinterp.sampling.uncertainty import mean_error

RESULTS = Path(__file__).resolve().parent / "precision_results"


def two_moons(seed: int, n: int = 2000, noise: float = 0.15) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=generator) * math.pi
    label = torch.randint(0, 2, (n,), generator=generator)
    upper = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    lower = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], 1)
    x = torch.where(label[:, None] == 1, lower, upper) + noise * torch.randn(n, 2, generator=generator)
    return TensorDataset(x, label)


def breast_cancer(seed: int) -> TensorDataset:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    return TensorDataset((x - x.mean(0)) / x.std(0), torch.tensor(y))


def regression_data(seed: int, n: int = 2000, features: int = 8) -> TensorDataset:
    """A smooth nonlinear target with unit-variance noise, so the Gaussian NLL below is correctly scaled."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    target = torch.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3] + 0.5 * x[:, 3:4]
    return TensorDataset(x, target + torch.randn(n, 1, generator=generator))


def staged_network(width: int) -> Regressor:
    """A deep linear network from a tiny initialisation, trained by SGD: it learns a rank-3 teacher mode by mode."""
    net = nn.Sequential(nn.Linear(8, width, bias=False), nn.Linear(width, 8, bias=False))
    with torch.no_grad():
        for layer in net:
            layer.weight.normal_(0.0, 1e-5)
    return Regressor(net, lr=2.5e-3, optimizer=torch.optim.SGD)


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


@dataclasses.dataclass(frozen=True)
class Run:
    """One benchmark run, built from a seed (odd seeds take a wider network)."""

    name: str
    make_module: Callable[[int], pl.LightningModule]
    make_data: Callable[[int], TensorDataset]
    steps: int
    batch_size: int
    groups: dict[str, Any] | None = None
    """``param_groups`` for ``--groups``: the run's natural components."""


def _wide(seed: int) -> int:
    return 2 if seed % 2 else 1


RUNS = {
    "moons": Run(
        "2-D classifier (two moons)",
        lambda s: Classifier(mlp([2, 32 * _wide(s), 32 * _wide(s), 2])),
        two_moons,
        3000,
        32,
    ),
    "cancer": Run(
        "tabular classifier (breast cancer)",
        lambda s: Classifier(mlp([30, 64 * _wide(s), 64 * _wide(s), 2])),
        breast_cancer,
        3000,
        32,
    ),
    "regression": Run(
        "regression (8 features)",
        lambda s: Regressor(mlp([8, 64 * _wide(s), 64 * _wide(s), 1])),
        regression_data,
        3000,
        32,
    ),
    "mlp": Run(
        "MLP on digits",
        lambda s: Classifier(mlp([64, 128 * _wide(s), 64 * _wide(s), 10])),
        lambda s: digits(),
        6000,
        64,
    ),
    "cnn": Run(
        "CNN on digits",
        lambda s: Classifier(SmallCNN()),
        lambda s: digits(),
        4000,
        64,
        groups={"convolutions": "net.features.*", "dense": "net.head.*"},
    ),
    "attention": Run(
        "2-block attention",
        lambda s: Classifier(TinyTransformer(width=32 * _wide(s)), lr=3e-3),
        lambda s: sequences(seed=s),
        4000,
        64,
        groups={"attention": ["net.blocks.*.qkv.*", "net.blocks.*.out.*"], "mlp": "net.blocks.*.mlp.*"},
    ),
    "staged": Run(
        "staged deep linear network", lambda s: staged_network(8 * _wide(s)), lambda s: teacher_data(seed=s), 5000, 100
    ),
}


class KeepLateWeights(pl.Callback):
    """After each of the monitor's estimates in the second half of training, a copy of the weights it was taken at."""

    def __init__(self, monitor: LLCMonitor, steps: int) -> None:
        self.monitor, self.steps = monitor, steps
        self.kept: dict[int, dict[str, torch.Tensor]] = {}

    def _keep(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        history = self.monitor.history
        if history and history[-1].step == trainer.global_step and trainer.global_step >= self.steps // 2:
            self.kept.setdefault(trainer.global_step, copy.deepcopy(pl_module.state_dict()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self._keep(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self._keep(trainer, pl_module)


def fit(
    run: Run, seed: int, callbacks: list[pl.Callback], steps: int | None = None
) -> tuple[pl.LightningModule, float]:
    pl.seed_everything(seed, verbose=False)
    module = run.make_module(seed)
    trainer = pl.Trainer(
        max_steps=steps or run.steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    loader = DataLoader(run.make_data(seed), batch_size=run.batch_size, shuffle=True)
    started = time.perf_counter()
    trainer.fit(module, loader)
    return module, time.perf_counter() - started


def interval(result: Any, record: Any) -> tuple[float, float]:
    """The interval the monitor logs as llc/lower and llc/upper (mean ± std over chains before it had one)."""
    if hasattr(result, "llc_interval"):
        return result.llc_interval
    return record.llc_mean - record.llc_std, record.llc_mean + record.llc_std


def reference(
    run: Run, seed: int, weights: dict[str, torch.Tensor], result: Any, args: argparse.Namespace, **extra: Any
) -> dict[str, float]:
    """Long references at ``weights`` and the estimate's settings (its loss tilted or not, unless ``extra`` says): the
    full model's under ``"all"`` and, with ``--groups``, each group's.
    """
    module = run.make_module(seed)
    module.load_state_dict(weights)
    values: dict[str, list[float]] = {}
    for reference_seed in range(2):
        long = estimate_llc(
            module, run.make_data(seed), batch_size=run.batch_size, epsilon=result.epsilon, nbeta=result.nbeta,
            gamma=result.gamma, num_chains=args.reference_chains, num_draws=args.reference_draws,
            num_burnin_steps=args.reference_burnin, seed=1000 + reference_seed,
            param_groups=run.groups if args.groups else None, **{"tilted": getattr(result, "tilted", False), **extra},
        )  # fmt: skip
        for name, part in {FULL_MODEL: long, **long.groups}.items():
            values.setdefault(name, []).append(part.llc_mean)
    return {name: statistics.mean(means) for name, means in values.items()}


def compare(result: Any, llc: float, bounds: tuple[float, float], truth: float) -> dict[str, Any]:
    """One estimate (``llc`` with its interval ``bounds``) against its reference ``truth``."""
    lower, upper = bounds
    return {
        "llc": llc, "lower": lower, "upper": upper, "reference": truth, "error": abs(llc - truth) / abs(truth),
        "covered": lower <= truth <= upper, "relaxed_share": getattr(result, "relaxed_share", math.nan),
        "covered_by_sampling_error": abs(llc - truth) <= result.sampling_error.half_width(),
    }  # fmt: skip


def movement(values: list[float]) -> float:
    """The median change between consecutive values, relative to their mean magnitude: how much a series jumps."""
    changes = [abs(b - a) / max((abs(a) + abs(b)) / 2, 1e-12) for a, b in zip(values, values[1:])]
    return statistics.median(changes) if changes else math.nan


def monitor_settings(run: Run, args: argparse.Namespace) -> dict[str, Any]:
    """``--monitor``'s arguments, with the run's groups under ``--groups``."""
    return {**args.monitor, "param_groups": run.groups} if args.groups else args.monitor


def benchmark(key: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    run = RUNS[key]
    fit(
        run, seed, [LLCMonitor(**monitor_settings(run, args))], steps=50
    )  # warm-up: imports and first-call costs, outside the timed runs
    _, plain = fit(run, seed, [])
    monitor = LLCMonitor(**monitor_settings(run, args))
    keeper = KeepLateWeights(monitor, run.steps)
    _, watched = fit(run, seed, [monitor, keeper])
    points = []
    records = {record.step: record for record in monitor.history}
    for step, weights in sorted(keeper.kept.items())[-args.max_points :]:
        record = records[step]
        truth = reference(run, seed, weights, record.result, args)
        tilted = reference(run, seed, weights, record.result, args, tilted=True) if args.tilted else {}
        points.append(
            {
                **compare(record.result, record.llc_mean, interval(record.result, record), truth[FULL_MODEL]),
                "tilted_reference": tilted.get(FULL_MODEL, math.nan),
                "step": step, "healthy": record.healthy, "chains": record.result.llc_per_chain.numel(),
                "draws": record.result.loss_trace.shape[1], "epsilon": record.result.epsilon,
                "steps_before_draws": record.result.steps_before_draws,
                "groups": {
                    name: compare(group, group.llc_mean, group.llc_interval, truth[name])
                    for name, group in record.result.groups.items()
                },
            }
        )  # fmt: skip
    late = [r for r in monitor.history if r.step >= 0.1 * run.steps]
    return {
        "run": key, "seed": seed, "steps": run.steps, "plain_seconds": plain, "watched_seconds": watched,
        "overhead": watched / plain - 1, "own": monitor.schedule.own_seconds / watched, "estimates": len(monitor.history),
        "healthy_after_10pct": sum(r.healthy for r in late) / max(len(late), 1), "points": points,
        "unpaired": sum(not r.result.paired for r in monitor.history),
    }  # fmt: skip


def relaxation(key: str, seed: int, args: argparse.Namespace) -> None:
    """Do the monitor's warm starts carry the chains' relaxation? Train with ``LLCMonitor()``; at the last estimate's
    weights, print its (warm-started) λ̂, cold estimates of the same chain shape and step started at w* with more and
    more burn-in, and the long-run value (the second half of one long cold trace), each as a share of the last.
    """
    run = RUNS[key]
    monitor = LLCMonitor(**args.monitor)
    module, _ = fit(run, seed, [monitor])
    record = monitor.history[-1]
    result = record.result
    draws = result.loss_trace.shape[1]
    settings: dict[str, Any] = dict(
        batch_size=run.batch_size, epsilon=result.epsilon, nbeta=result.nbeta, gamma=result.gamma,
        num_chains=result.llc_per_chain.numel(),
    )  # fmt: skip
    data = run.make_data(seed)
    long = estimate_llc(module, data, num_draws=2 * args.reference_draws, num_burnin_steps=0, seed=1000, **settings)
    trace = result.nbeta * (long.loss_trace - long.anchor_loss_trace).double().mean(dim=0)
    long_run = float(trace[trace.numel() // 2 :].mean())
    cold = {
        extra: estimate_llc(module, data, num_draws=draws, num_burnin_steps=10 + extra, seed=2000, **settings).llc_mean
        for extra in (0, 100, 300, 1000)
    }
    print(
        f"{key:<10} seed {seed}, step {record.step} (ε γ = {result.epsilon * result.gamma:.2g}, warm chains had run "
        f"{result.steps_before_draws} steps, bound {result.relaxed_share:.0%}): long-run λ̂ {long_run:.3g}; "
        f"the monitor's {record.llc_mean / long_run:.0%}; cold, 10 + N burn-in steps: "
        + ", ".join(f"N={extra} {value / long_run:.0%}" for extra, value in cold.items()),
        flush=True,
    )


PAIRING_REPEATS = 24
"""Repeated estimates per state in ``--pairing``."""


def pairing(key: str, seed: int, args: argparse.Namespace) -> None:
    """Does ``pairing_gain`` say how much pairing narrows λ̂? At the weights after 10%, 50% and all of training: repeated
    estimates of the monitor's smallest shape (4 chains × 30 draws) after 300 burn-in steps (as relaxed as warm chains
    get), each giving the paired λ̂ and the unpaired λ̂ of the same draws. Prints the variance of the unpaired over
    the paired across the repeats (what pairing bought the estimate), the median of ``pairing_gain`` and the median
    per-draw variance ratio.
    """
    run = RUNS[key]
    data = run.make_data(seed)
    for steps in (run.steps // 10, run.steps // 2, run.steps):
        module, _ = fit(run, seed, [], steps=steps)
        results: list[Any] = []
        epsilon: float | str = "adaptive"
        for repeat in range(PAIRING_REPEATS):
            result = estimate_llc(
                module, data, batch_size=run.batch_size, num_chains=4, num_draws=30,
                num_burnin_steps=300, epsilon=epsilon, seed=repeat,
            )  # fmt: skip
            epsilon = result.epsilon
            results.append(result)
        unpaired = [float(r.nbeta * (r.loss_trace.double() - r.init_loss).mean()) for r in results]
        per_draw = [
            float((r.loss_trace.double() - r.init_loss).var() / (r.loss_trace.double() - r.anchor_loss_trace).var())
            for r in results
        ]
        bought = statistics.variance(unpaired) / statistics.variance([r.llc_mean for r in results])
        print(
            f"{key:<10} seed {seed}, step {steps}: λ̂ {statistics.mean(r.llc_mean for r in results):.3g}; pairing "
            f"narrowed it {bought:.2f}-fold; pairing_gain median {statistics.median(r.pairing_gain for r in results):.2f}"
            f", per-draw ratio median {statistics.median(per_draw):.2f}",
            flush=True,
        )


class NoiseParts:
    """Per draw and chain: the exact increase over the whole data set, L(w_t) − L(w*), and the first-order part of the
    paired increase's minibatch noise, (∇L_B(w*) − ∇L(w*))·(w_t − w*), a forward-mode derivative at w*.
    """

    name = "noise_parts"

    def __init__(self, module: nn.Module, loss: FunctionalLoss, source: MinibatchSource) -> None:
        self.loss, self.source = loss, source
        with quiet_evaluation(module):
            self.gradient = mean_init_gradient(loss, source, chunk_size=256)

    def observe(self, draw: Draw) -> torch.Tensor:
        chains = draw.losses.shape[0]
        offsets = {name: w - self.loss.anchor[name] for name, w in draw.position.items()}
        exact = torch.zeros(chains, dtype=torch.float64)
        for batch, size in self.source.init_loss_batches(256):
            stacked = tree_map(lambda t: t.unsqueeze(0).expand(chains, *t.shape), batch)
            exact += size * (draw.chain_losses(draw.position, stacked) - draw.anchor_losses(stacked)).double()
        exact /= self.source.num_samples

        def first_order(offset: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
            return jvp(lambda params: self.loss(params, batch), (self.loss.anchor,), (offset,))[1]

        batch_term = vmap(first_order)(offsets, draw.batch).double()
        full_term = torch.stack([(self.gradient[n] * o).flatten(1).sum(1) for n, o in offsets.items()]).sum(0).double()
        return torch.stack([exact, batch_term - full_term], dim=1)


def noise(key: str, seed: int, args: argparse.Namespace) -> None:
    """Where a draw's noise comes from, at the final weights of a run trained with ``LLCMonitor()``, at its settings
    (4 chains × ``--reference-draws`` / 10 draws after ``--reference-burnin`` steps): the paired increase, the
    unpaired one (over L(w*)), the exact increase over the whole data set, and the paired increase less its
    first-order minibatch noise (a second control variate); each one's spread per draw, effective sample size and
    standard error, in units of λ̂.
    """
    run = RUNS[key]
    monitor = LLCMonitor(**args.monitor)
    module, _ = fit(run, seed, [monitor])
    settings = monitor.history[-1].result
    data = run.make_data(seed)
    config = SamplingConfig(batch_size=run.batch_size)
    loss_fn, source, _ = prepare_estimate(module, data, None, config, seed=0, device="cpu")
    parts = NoiseParts(
        module, FunctionalLoss(module, loss_fn, [n for n, _ in module.named_parameters()], source.device), source
    )
    result = estimate_llc(
        module, data, batch_size=run.batch_size, epsilon=settings.epsilon, nbeta=settings.nbeta, gamma=settings.gamma,
        num_chains=4, num_draws=args.reference_draws // 10, num_burnin_steps=args.reference_burnin, seed=1000,
        observables=[parts],
    )  # fmt: skip
    assert result.anchor_loss_trace is not None
    paired = (result.loss_trace - result.anchor_loss_trace).double()
    observed = result.observations[NoiseParts.name].double()
    traces = {
        "paired": paired,
        "unpaired": result.loss_trace.double() - result.init_loss,
        "exact": observed[..., 0],
        "paired less first order": paired - observed[..., 1],
    }
    print(f"{key:<10} seed {seed}, λ̂ {result.llc_mean:.3g} ({paired.numel()} draws):", flush=True)
    for name, trace in traces.items():
        error = mean_error(trace)
        print(
            f"    {name:<24} per-draw sd {result.nbeta * float(trace.std()):7.3g}, ESS {error.effective_draws:6.0f}, "
            f"standard error {result.nbeta * error.standard_error:.3g}",
            flush=True,
        )


def summary(points: list[dict[str, Any]]) -> str:
    if not points:
        return "no points"
    errors = sorted(point["error"] for point in points)
    p90 = errors[min(len(errors) - 1, math.ceil(0.9 * len(errors)) - 1)]
    covered = sum(point["covered"] for point in points) / len(points)
    sampling_only = [point["covered_by_sampling_error"] for point in points if "covered_by_sampling_error" in point]
    without = f" ({sum(sampling_only) / len(sampling_only):.0%} from the sampling error alone)" if sampling_only else ""
    return (
        f"median error {statistics.median(errors):.0%}, 90th percentile {p90:.0%}, coverage {covered:.0%}{without} "
        f"of {len(points)}"
    )


def figure(labels: list[str], path: str, seeds: list[int] | None = None, by_group: bool = False) -> None:
    """Each recorded point's λ̂ and interval over its reference, one panel per label (e.g. before and after), for the
    runs of ``seeds`` (all when None); with ``by_group``, one panel per part (the full model, then each group) of
    one label recorded with ``--groups``.
    """
    from lightning_devinterp.plotting import pyplot

    plt = pyplot()
    recorded = {
        label: [r for r in json.loads((RESULTS / f"{label}.json").read_text()) if seeds is None or r["seed"] in seeds]
        for label in labels
    }
    panels: list[tuple[str, list[tuple[str, list[dict[str, Any]]]]]] = []
    for label, results in recorded.items():
        runs = [(f"{r['run']} {r['seed']}", r["points"]) for r in results if r["points"]]
        panels.append((label if not by_group else f"{label}, full model", runs))
        groups = dict.fromkeys(name for r in results for p in r["points"] for name in p.get("groups", {}))
        for group in groups if by_group else ():
            parts = [
                (run, [p["groups"][group] for p in points if group in p.get("groups", {})]) for run, points in runs
            ]
            panels.append((f"{label}, {group}", [(run, points) for run, points in parts if points]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels):
        position, ticks = 0, []
        for run, points in runs:
            xs = list(range(position, position + len(points)))
            ratio = [p["llc"] / p["reference"] for p in points]
            below = [max(r - p["lower"] / p["reference"], 0.0) for r, p in zip(ratio, points)]
            above = [max(p["upper"] / p["reference"] - r, 0.0) for r, p in zip(ratio, points)]
            colors = ["tab:blue" if p["covered"] else "tab:red" for p in points]
            ax.errorbar(xs, ratio, yerr=[below, above], fmt="none", ecolor=colors, elinewidth=1.2)
            ax.scatter(xs, ratio, c=colors, s=14, zorder=3)
            ticks.append((position + (len(points) - 1) / 2, run))
            position += len(points) + 1
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhspan(0.9, 1.1, color="tab:green", alpha=0.12)
        ax.set_xticks([t for t, _ in ticks], [name for _, name in ticks], rotation=30, fontsize=8)
        ax.set_title(f"{title}\n{summary([p for _, points in runs for p in points])}", fontsize=8)
        ax.set_ylim(0, 2.5)
    axes[0][0].set_ylabel("λ̂ / long reference (90% interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-points", type=int, default=6, help="late points per run that get a reference")
    parser.add_argument("--reference-chains", type=int, default=4)
    parser.add_argument("--reference-draws", type=int, default=2000)
    parser.add_argument("--reference-burnin", type=int, default=500)
    parser.add_argument("--label", default="run", help="name of the JSON file written under precision_results/")
    parser.add_argument("--monitor", type=json.loads, default={}, help="LLCMonitor arguments, as JSON (default: none)")
    parser.add_argument(
        "--tilted",
        action="store_true",
        help="also a tilted reference at each point (tilted=True), and how much each kind moves",
    )
    parser.add_argument(
        "--relaxation",
        action="store_true",
        help="instead: whether warm starts carry the chains' relaxation (cold estimates and a long trace at the end)",
    )
    parser.add_argument(
        "--noise",
        action="store_true",
        help="instead: where a draw's noise comes from, at the final weights (minibatch, the chains' wander, first order)",
    )
    parser.add_argument(
        "--pairing",
        action="store_true",
        help="instead: whether pairing_gain says how much pairing narrows λ̂ (repeated estimates at three points)",
    )
    parser.add_argument(
        "--groups",
        action="store_true",
        help="the monitor with each run's param_groups (runs without groups are skipped), and references per group",
    )
    parser.add_argument("--figure", nargs="+", metavar="LABEL", help="draw recorded labels side by side, run nothing")
    parser.add_argument("-o", "--output", default="precision.png", help="where --figure writes")
    args = parser.parse_args()
    if args.figure:
        figure(args.figure, args.output, args.seeds if "--seeds" in sys.argv else None, by_group=args.groups)
        return
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    instead = relaxation if args.relaxation else noise if args.noise else pairing if args.pairing else None
    if instead is not None:
        for seed in args.seeds:
            for key in args.runs:
                instead(key, seed, args)
        return
    results = []
    for seed in args.seeds:
        for key in args.runs:
            if args.groups and RUNS[key].groups is None:
                continue
            result = benchmark(key, seed, args)
            results.append(result)
            errors = " ".join(
                f"{p['step']}:{p['llc']:.3g}/{p['reference']:.3g}{'' if p['covered'] else '!'}"
                for p in result["points"]
            )
            print(
                f"{key:<10} seed {seed}: {result['estimates']:>3} estimates, overhead {result['overhead']:+.0%} "
                f"(own {result['own']:.0%}, {result['unpaired']} unpaired), healthy {result['healthy_after_10pct']:.0%}; "
                f"{summary(result['points'])}\n    {errors}"
                + (
                    f"\n    references move {movement([p['reference'] for p in result['points']]):.0%} between points, "
                    f"tilted ones {movement([p['tilted_reference'] for p in result['points']]):.0%}"
                    if args.tilted
                    else ""
                ),
                flush=True,
            )
            for group in result["points"][0]["groups"] if result["points"] else ():
                print(f"    {group}: {summary([p['groups'][group] for p in result['points']])}", flush=True)
    print("all runs:", summary([point for result in results for point in result["points"]]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.label}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
