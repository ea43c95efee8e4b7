"""Choose the SGLD step size for the user: a grid of epsilons, the health checks, and a halving test."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_devinterp.sampling.chains import run_chains
from lightning_devinterp.sampling.config import ESTIMATE_DEFAULTS, SamplingConfig, check_setting_names
from lightning_devinterp.sampling.data import MinibatchSource
from lightning_devinterp.sampling.inputs import prepare_estimate
from lightning_devinterp.sampling.model_view import LossFn
from lightning_devinterp.sampling.observables import Observable
from lightning_devinterp.sampling.result import LLCEstimationError, LLCResult, summarize_chains

log = logging.getLogger(__name__)

DEFAULT_EPSILONS = tuple(10.0 ** (-k / 2) for k in range(14, 3, -1))
"""1e-7 to 1e-2 in half-decades."""

STABLE_RELATIVE = 0.1
"""λ̂ at epsilon and at epsilon / 2 may differ by this share (or by two standard errors, if more) to count as stable."""

CHOICE_ACCEPTANCE = (0.95, 1.0)
"""The MALA acceptance band a chosen epsilon must sit in: stricter than the 0.8 health floor, because on the
ground-truth models acceptance near 0.9 still came with 15-20% discretization bias in λ̂."""


@dataclasses.dataclass(frozen=True)
class CalibrationChoice:
    """The recommended step size and inverse temperature, with what was measured there and why it was chosen."""

    epsilon: float
    nbeta: float
    llc_mean: float
    acceptance: float
    reason: str


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate` measured (``table``: one row per tried (epsilon, nbeta)) and recommends (``best``).

    ``best`` is None when no epsilon on the grid was healthy and stable; ``message`` then says what to try.
    """

    table: list[dict[str, Any]]
    best: CalibrationChoice | None
    message: str
    seconds: float

    def plot(self, path: str | Path) -> Path:
        """Save λ̂ ± std and the MALA acceptance against epsilon (log scale), the choice marked. Needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError("CalibrationResult.plot needs matplotlib: pip install 'lightning-devinterp[plot]'") from error
        figure, (llc_axis, acceptance_axis) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        for nbeta in sorted({row["nbeta"] for row in self.table}):
            rows = sorted((r for r in self.table if r["nbeta"] == nbeta and r["ran"]), key=lambda r: r["epsilon"])
            epsilons = [r["epsilon"] for r in rows]
            llc_axis.errorbar(epsilons, [r["llc_mean"] for r in rows], yerr=[r["llc_std"] for r in rows], marker="o", label=f"nβ = {nbeta:.4g}")
            acceptance_axis.plot(epsilons, [r["acceptance"] for r in rows], marker="o")
        if self.best is not None:
            for axis in (llc_axis, acceptance_axis):
                axis.axvline(self.best.epsilon, color="gray", linestyle="--")
        llc_axis.set_xscale("log")
        llc_axis.set_ylabel("λ̂")
        llc_axis.legend()
        acceptance_axis.set_ylabel("MALA acceptance")
        acceptance_axis.set_xlabel("epsilon")
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path


def _row(epsilon: float, nbeta: float, result: LLCResult | None, note: str = "") -> dict[str, Any]:
    if result is None:
        return {
            "epsilon": epsilon, "nbeta": nbeta, "ran": bool(note == "all chains diverged"), "llc_mean": math.nan,
            "llc_std": math.nan, "acceptance": math.nan, "diverged": True, "healthy": False, "stable": None,
            "warnings": [note],
        }
    return {
        "epsilon": epsilon,
        "nbeta": nbeta,
        "ran": True,
        "llc_mean": result.llc_mean,
        "llc_std": result.llc_std,
        "acceptance": result.acceptance_mean,
        "diverged": bool(result.failed_chains),
        "healthy": result.healthy,
        "stable": None,
        "warnings": list(result.warnings),
    }


def _stable(coarse: LLCResult, fine: LLCResult) -> bool:
    """λ̂ barely moves when epsilon is halved: within STABLE_RELATIVE of the finer value or two standard errors."""
    standard_error = math.sqrt(
        (coarse.llc_std**2 / max(coarse.num_chains_used, 1) if math.isfinite(coarse.llc_std) else 0.0)
        + (fine.llc_std**2 / max(fine.num_chains_used, 1) if math.isfinite(fine.llc_std) else 0.0)
    )
    return abs(coarse.llc_mean - fine.llc_mean) <= max(STABLE_RELATIVE * abs(fine.llc_mean), 2.0 * standard_error)


def calibrate_on_source(
    model: nn.Module,
    loss_fn: LossFn,
    source: MinibatchSource,
    config: SamplingConfig,
    *,
    seed: int,
    epsilons: Sequence[float] | None = None,
    nbetas: Sequence[float] | None = None,
    num_chains: int | None = None,
    observables: Sequence[Observable] = (),
    forward_context: Callable[[], ContextManager[Any]] = nullcontext,
) -> tuple[CalibrationResult, dict[tuple[float, float], LLCResult]]:
    """:func:`calibrate` on prepared data; also returns every estimate it ran, keyed by (epsilon, nbeta)."""
    started = time.perf_counter()
    grid = sorted(float(e) for e in (epsilons if epsilons is not None else DEFAULT_EPSILONS))
    if not grid or any(not (math.isfinite(e) and e > 0) for e in grid):
        raise ValueError(f"epsilons must be positive finite numbers, got {list(grid)!r}.")
    resolved = config.resolved(num_samples=source.num_samples, epsilon=grid[0])
    temperatures = [float(b) for b in (nbetas if nbetas is not None else [resolved.nbeta])]
    if not temperatures or any(not (math.isfinite(b) and b > 0) for b in temperatures):
        raise ValueError(f"nbetas must be positive finite numbers, got {list(temperatures)!r}.")
    chains = num_chains or resolved.num_chains
    results: dict[tuple[float, float], LLCResult] = {}
    table: list[dict[str, Any]] = []

    def estimate(epsilon: float, nbeta: float) -> LLCResult | None:
        key = (epsilon, nbeta)
        if key not in results:
            trial = dataclasses.replace(resolved, epsilon=epsilon, nbeta=nbeta)
            try:
                run = run_chains(
                    model, loss_fn, source, trial, num_chains=chains, seed=seed, observables=observables, forward_context=forward_context
                )
                results[key] = summarize_chains(run, trial)
            except LLCEstimationError:
                table.append(_row(epsilon, nbeta, None, "all chains diverged"))
                return None
            table.append(_row(epsilon, nbeta, results[key]))
        return results[key]

    best = None
    for nbeta in temperatures:
        diverged_at = None
        for epsilon in grid:
            if diverged_at is not None:
                table.append(_row(epsilon, nbeta, None, f"skipped: epsilon {diverged_at:g} already diverged"))
                continue
            result = estimate(epsilon, nbeta)
            if result is None:
                diverged_at = epsilon
        low, high = CHOICE_ACCEPTANCE
        candidates = sorted(
            (
                e
                for e in grid
                if (e, nbeta) in results and results[(e, nbeta)].healthy and low <= results[(e, nbeta)].acceptance_mean <= high
            ),
            reverse=True,
        )
        for epsilon in candidates:
            halved = estimate(epsilon / 2, nbeta)
            stable = halved is not None and _stable(results[(epsilon, nbeta)], halved)
            for row in table:
                if row["epsilon"] == epsilon and row["nbeta"] == nbeta:
                    row["stable"] = stable
            if stable:
                chosen = results[(epsilon, nbeta)]
                best = CalibrationChoice(
                    epsilon=epsilon,
                    nbeta=nbeta,
                    llc_mean=chosen.llc_mean,
                    acceptance=chosen.acceptance_mean,
                    reason=(
                        f"the largest epsilon on the grid whose chains stay finite and level off within the burn-in, "
                        f"with λ̂ = {chosen.llc_mean:.4g} > 0, MALA acceptance {chosen.acceptance_mean:.2f}, and λ̂ within "
                        f"{STABLE_RELATIVE:.0%} (or two standard errors) of its value at epsilon / 2"
                    ),
                )
                break
        if best is not None:
            break
    if best is not None:
        message = f"chose epsilon = {best.epsilon:g} at nbeta = {best.nbeta:.6g}: {best.reason}."
    else:
        message = (
            f"no epsilon in {grid[0]:g}..{grid[-1]:g} gave a healthy estimate that is stable against halving epsilon "
            "(see the table's warnings). Try a grid of smaller epsilons, a larger gamma, more burn-in steps, or "
            "estimate at a point closer to a local minimum of the loss."
        )
    log.info("calibration: %s", message)
    return CalibrationResult(table=table, best=best, message=message, seconds=time.perf_counter() - started), results


def calibrate(
    model: nn.Module,
    data: DataLoader | Dataset,
    loss_fn: LossFn | None = None,
    *,
    epsilons: Sequence[float] | None = None,
    nbetas: Sequence[float] | None = None,
    seed: int | None = None,
    device: str | torch.device | None = None,
    **settings: Any,
) -> CalibrationResult:
    """Choose epsilon (and, if several are given, nbeta) by running short estimates on a grid.

    Selection rule: for each nbeta in ``nbetas`` (default: ``[n / log n]``, tried in order), estimate at every
    epsilon of the log grid ``epsilons`` (default 1e-7 to 1e-2 in half-decades; once every chain diverges, larger
    epsilons are skipped). A candidate passes the health checks of :class:`~lightning_devinterp.LLCResult`: all
    chains finite, loss trace levelled off within the burn-in, λ̂ > 0, at most 70% of draws below L(w*), and mean
    MALA acceptance in the band [0.95, 1]. The choice is the largest candidate whose λ̂ is also stable against
    halving epsilon (within 10% or two standard errors of the estimate at epsilon / 2). A diverging epsilon is never chosen; if
    nothing qualifies, ``best`` is None and ``message`` says what to try.

    The model and the global RNG states are left as they were. ``settings`` are the sampling settings of
    :class:`~lightning_devinterp.SamplingConfig` (as for :func:`~lightning_devinterp.estimate_llc`; ``epsilon`` is
    what is being chosen); every trial uses the same ``seed``.
    """
    if "epsilon" in settings:
        raise TypeError("calibrate chooses epsilon: pass the grid as epsilons=[...], not epsilon.")
    check_setting_names(settings)
    config = SamplingConfig(**settings, epsilon="auto").with_defaults(**ESTIMATE_DEFAULTS)
    loss_fn, source, seed = prepare_estimate(model, data, loss_fn, config, seed=seed, device=device)
    return calibrate_on_source(model, loss_fn, source, config, seed=seed, epsilons=epsilons, nbetas=nbetas)[0]
