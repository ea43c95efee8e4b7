"""Choose the SGLD step size for the user: the range of epsilon where λ̂ does not depend on it (a plateau).

λ̂ carries an epsilon-dependent bias: too large a step inflates it (discretization, minibatch gradient noise),
too small a step leaves the chains where they started within the burn-in and deflates it. MALA acceptance sees
only the first, and high acceptance alone picks steps so small that the chains have not moved. So the rule looks
for the range where neighbouring steps agree:

1. the top of the healthy range is found by adapting epsilon toward the target MALA acceptance (dual averaging,
   as ``epsilon="adaptive"`` does), unless a grid is given;
2. from there the grid is walked down by halving, one estimate per step size;
3. the first two neighbours whose estimates are healthy and agree (within :data:`STABLE_RELATIVE`, or two standard
   errors if that is more) start a plateau; if the next smaller step agrees too, the middle of the three is
   chosen (the top of a plateau still carries the most bias), otherwise the top of the two (below it, chains no
   longer settle within the burn-in);
4. if no two neighbours agree, nothing is chosen and the message says what to change (λ̂ that keeps rising with
   epsilon usually means the chains equilibrate too slowly: a larger gamma, or more burn-in).

What the rule cannot see: a direction of the loss so flat that it relaxes far more slowly than the chains run, and
that contributes little to λ̂ at the steps tried, changes λ̂ by little between neighbouring steps and can pass for
a plateau. More burn-in, or a larger gamma (which bounds the slowest relaxation at 1 / (epsilon gamma) steps),
is the remedy; the health check on the loss trace catches such drift only when it exceeds the draws' noise.
"""

from __future__ import annotations

import dataclasses
import functools
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

from lightning_devinterp.plotting import pyplot
from lightning_devinterp.sampling.chains import run_chains
from lightning_devinterp.sampling.config import ESTIMATE_DEFAULTS, Epsilon, SamplingConfig, check_setting_names
from lightning_devinterp.sampling.data import MinibatchSource
from lightning_devinterp.sampling.inputs import prepare_estimate
from lightning_devinterp.sampling.model_view import LossFn
from lightning_devinterp.sampling.observables import Observable
from lightning_devinterp.sampling.result import LLCEstimationError, LLCResult, summarize_chains

log = logging.getLogger(__name__)

STABLE_RELATIVE = 0.1
"""Two neighbouring step sizes agree when their λ̂ differ by at most this share (or two standard errors, if more)."""

GRID_FACTOR = 2.0
"""Neighbouring step sizes of the default grid differ by this factor: close enough that chains equilibrate about
as well at both, so that disagreement means bias rather than a shorter effective run."""

GRID_STEPS = 10
"""Steps below the adapted step size that the default grid walks down (three decades)."""


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
        """Save λ̂ (± its standard error) and the MALA acceptance against epsilon (log scale), the choice marked.

        Args:
            path: the PNG to write.

        Returns:
            The path written.

        Raises:
            ImportError: matplotlib is not installed.
        """
        plt = pyplot()
        figure, (llc_axis, acceptance_axis) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        for nbeta in sorted({row["nbeta"] for row in self.table}):
            rows = sorted((r for r in self.table if r["nbeta"] == nbeta and r["ran"]), key=lambda r: r["epsilon"])
            epsilons = [r["epsilon"] for r in rows]
            llc_axis.errorbar(
                epsilons,
                [r["llc_mean"] for r in rows],
                yerr=[r["llc_stderr"] for r in rows],
                marker="o",
                label=f"nβ = {nbeta:.4g}",
            )
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
            "epsilon": epsilon,
            "nbeta": nbeta,
            "ran": note == "all chains diverged",
            "llc_mean": math.nan,
            "llc_std": math.nan,
            "llc_stderr": math.nan,
            "acceptance": math.nan,
            "diverged": True,
            "healthy": False,
            "stable": None,
            "warnings": [note],
        }
    return {
        "epsilon": epsilon,
        "nbeta": nbeta,
        "ran": True,
        "llc_mean": result.llc_mean,
        "llc_std": result.llc_std,
        "llc_stderr": result.llc_stderr,
        "acceptance": result.acceptance_mean,
        "diverged": bool(result.failed_chains),
        "healthy": result.healthy,
        "stable": None,
        "warnings": list(result.warnings),
    }


def _agree(coarse: LLCResult, fine: LLCResult) -> bool:
    """λ̂ barely moves between neighbouring step sizes: within STABLE_RELATIVE of the finer value or two standard errors."""
    standard_error = math.sqrt(
        sum(result.llc_stderr**2 for result in (coarse, fine) if math.isfinite(result.llc_stderr))
    )
    return abs(coarse.llc_mean - fine.llc_mean) <= max(STABLE_RELATIVE * abs(fine.llc_mean), 2.0 * standard_error)


def _decline_message(rows: list[dict[str, Any]]) -> str:
    """What to change when no plateau was found, read off the measured λ̂ against epsilon."""
    measured = sorted((r["epsilon"], r["llc_mean"]) for r in rows if r["ran"] and math.isfinite(r["llc_mean"]))
    shown = ", ".join(f"{llc:.3g} at {epsilon:.2g}" for epsilon, llc in measured)
    rising = len(measured) >= 3 and all(b[1] > a[1] for a, b in zip(measured, measured[1:]))
    if rising:
        return (
            f"λ̂ rises with epsilon across the whole range tried ({shown}): there is no range where it is stable. "
            "Try a larger gamma (e.g. 10x), so that chains settle within the burn-in at small steps, or more "
            "burn-in steps and draws."
        )
    return (
        f"no two neighbouring step sizes gave healthy estimates that agree ({shown or 'nothing finished'}; see the "
        "table's warnings). Try a larger gamma, more burn-in steps, or estimate at a point closer to a local minimum."
    )


def _first_plateau(grid: list[float], estimate_at: Callable[[float], LLCResult | None]) -> list[LLCResult] | None:
    """Walk ``grid`` (step sizes, largest first), estimating lazily, to the first two neighbours whose healthy estimates
    agree, with the next one too if it also agrees: the plateau (two or three estimates); None if there is none.
    """
    estimates: dict[int, LLCResult | None] = {}

    def at(index: int) -> LLCResult | None:
        if index >= len(grid):
            return None
        if index not in estimates:
            estimates[index] = estimate_at(grid[index])
        return estimates[index]

    def agree(upper: LLCResult | None, lower: LLCResult | None) -> bool:
        return upper is not None and lower is not None and upper.healthy and lower.healthy and _agree(upper, lower)

    for index in range(len(grid) - 1):
        upper, lower = at(index), at(index + 1)
        if agree(upper, lower):
            assert upper is not None and lower is not None
            below = at(index + 2)
            return [upper, lower, below] if below is not None and agree(lower, below) else [upper, lower]
    return None


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
    """:func:`calibrate` on prepared data; also returns every estimate it ran, keyed by (epsilon, nbeta).

    Args:
        model: the model at w*.
        loss_fn: the resolved loss function.
        source: the prepared minibatches.
        config: the sampling settings (its epsilon is ignored).
        seed: seeds every trial.
        epsilons: the step sizes to walk, instead of the adapted top and its halvings.
        nbetas: the inverse temperatures (times n) to try; default the config's.
        num_chains: chains per trial; default the config's.
        observables: extra draw-time observables for every trial.
        forward_context: wraps every loss evaluation (a Trainer's autocast, for instance).
    """
    started = time.perf_counter()
    if epsilons is not None and (not len(epsilons) or any(not (math.isfinite(e) and e > 0) for e in epsilons)):
        raise ValueError(f"epsilons must be positive finite numbers, got {list(epsilons)!r}.")
    resolved = config.resolved(num_samples=source.dataset_size, epsilon=1.0)
    assert resolved.nbeta is not None
    temperatures = [float(b) for b in (nbetas if nbetas is not None else [resolved.nbeta])]
    if not temperatures or any(not (math.isfinite(b) and b > 0) for b in temperatures):
        raise ValueError(f"nbetas must be positive finite numbers, got {list(temperatures)!r}.")
    chains = num_chains or resolved.num_chains
    assert chains is not None
    results: dict[tuple[float, float], LLCResult] = {}
    table: list[dict[str, Any]] = []

    def estimate(epsilon: Epsilon, nbeta: float) -> LLCResult | None:
        trial = dataclasses.replace(resolved, epsilon=epsilon, nbeta=nbeta)
        try:
            run = run_chains(
                model,
                loss_fn,
                source,
                trial,
                num_chains=chains,
                seed=seed,
                observables=observables,
                forward_context=forward_context,
            )
            result = summarize_chains(run, trial)
        except LLCEstimationError:
            table.append(
                _row(float(epsilon) if epsilon != "adaptive" else math.nan, nbeta, None, "all chains diverged")
            )
            return None
        results[(result.epsilon, nbeta)] = result
        table.append(_row(result.epsilon, nbeta, result))
        return result

    def measured(epsilon: float, nbeta: float) -> LLCResult | None:
        return results.get((epsilon, nbeta)) or estimate(epsilon, nbeta)

    best = None
    for nbeta in temperatures:
        if epsilons is None:
            top = estimate("adaptive", nbeta)
            if top is None:
                continue
            grid = [top.epsilon / GRID_FACTOR**k for k in range(GRID_STEPS + 1)]
        else:
            grid = sorted((float(e) for e in epsilons), reverse=True)
        plateau = _first_plateau(grid, functools.partial(measured, nbeta=nbeta))
        if plateau is None:
            continue
        chosen = plateau[len(plateau) // 2 - (len(plateau) == 2)]
        for row in table:
            if row["nbeta"] == nbeta and any(row["epsilon"] == point.epsilon for point in plateau):
                row["stable"] = True
        best = CalibrationChoice(
            epsilon=chosen.epsilon,
            nbeta=nbeta,
            llc_mean=chosen.llc_mean,
            acceptance=chosen.acceptance_mean,
            reason=(
                f"the {'middle' if len(plateau) == 3 else 'top'} of the plateau "
                f"{', '.join(f'{point.llc_mean:.4g} at {point.epsilon:.3g}' for point in plateau)}: healthy "
                f"estimates (finite chains that level off within the burn-in, λ̂ > 0, MALA acceptance "
                f"{chosen.acceptance_mean:.2f} at the choice) whose neighbours agree within {STABLE_RELATIVE:.0%} (or two "
                "standard errors)"
            ),
        )
        break
    if best is not None:
        message = f"chose epsilon = {best.epsilon:.3g} at nbeta = {best.nbeta:.6g}: {best.reason}."
    else:
        message = _decline_message(table)
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
    """Choose epsilon (and, if several are given, nbeta): a step size on a plateau of λ̂ against epsilon.

    For each nbeta in ``nbetas`` (tried in order): adapt epsilon toward the target MALA acceptance to find the top of
    the healthy range (or take the given ``epsilons``), then walk down by halving to the first plateau, neighbouring
    steps whose estimates are healthy and agree within 10% or two standard errors, and choose its middle (of three)
    or its top (of two). If no two neighbours agree, ``best`` is None and ``message`` says what to change (usually a
    larger gamma). The module docstring says why acceptance alone is not enough. The model and the global RNG states
    are left as they were; every trial uses the same seed.

    Args:
        model: the model at w*.
        data: a DataLoader or a map-style Dataset (then ``batch_size`` is required), as for
            :func:`~lightning_devinterp.estimate_llc`.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss; default the ``training_step`` loss of a LightningModule.
        epsilons: the step sizes to walk, instead of the adapted top and its halvings.
        nbetas: the inverse temperatures (times n) to try; default ``[n / log n]``.
        seed: seeds every trial; None draws one.
        device: where chains run; default the model's.
        **settings: the other sampling settings of :class:`~lightning_devinterp.SamplingConfig` (``epsilon`` is what
            is being chosen).

    Returns:
        Every trial (``table``), the choice (``best``) and why (``message``).

    Raises:
        TypeError: ``epsilon`` was given, or an unknown setting.
        ValueError: bad grids or settings.
    """
    if "epsilon" in settings:
        raise TypeError("calibrate chooses epsilon: pass the grid as epsilons=[...], not epsilon.")
    check_setting_names(settings)
    config = SamplingConfig(**settings, epsilon="auto").with_defaults(**ESTIMATE_DEFAULTS)
    loss_fn, source, seed = prepare_estimate(model, data, loss_fn, config, seed=seed, device=device)
    return calibrate_on_source(model, loss_fn, source, config, seed=seed, epsilons=epsilons, nbetas=nbetas)[0]
