"""The LLC estimate made from raw chains: ``LLCResult`` and the summary that produces it, health findings included."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_devinterp.sampling.chains import FULL_MODEL, ChainRun
from lightning_devinterp.sampling.config import SamplingConfig
from lightning_devinterp.sampling.health import diagnose, first_failures
from lightning_devinterp.sampling.susceptibility import (
    PROBE_LOSS,
    check_labels,
    label_means,
    probe_covariance,
    susceptibility,
)
from lightning_devinterp.sampling.uncertainty import MeanError, mean_error, relaxed_share


class LLCEstimationError(RuntimeError):
    """No estimate could be made: every chain diverged, or (in the monitor) there was no data or another rank failed."""


@dataclass(frozen=True)
class LLCResult:
    """One LLC estimate, with its uncertainty and health findings.

    Each chain's λ̂ is ``nbeta`` times the mean increase of its draws' losses over the loss at w*: with ``paired``
    draws (the default) the increase of each draw over the same minibatch's loss at w*, L_B(w_t) − L_B(w*), else over
    L(w*) on the whole data. ``llc_mean`` is the mean over chains; ``llc_std`` the spread of the per-chain values
    (ddof 1); ``llc_stderr`` the standard error of ``llc_mean``, from all the draws and their autocorrelation or from
    the spread of the chains, whichever is wider (:mod:`~lightning_devinterp.sampling.uncertainty`), with
    ``stderr_degrees`` degrees of freedom; ``effective_draws`` the draws' effective sample size; and ``llc_interval``
    a 90% interval for λ̂.

    Chains started at w* read low until they have relaxed: ``steps_before_draws`` counts the SGLD steps they had run
    since that start when the first draw was taken (more than the burn-in when the monitor warm-starts them), and
    ``relaxed_share`` is a lower bound on the share of the long-run value the draws reached (plain SGLD only, else NaN).

    Chains that diverged are excluded and hold NaN in ``llc_per_chain`` and ``acceptance``; ``loss_trace`` (and
    ``anchor_loss_trace``) hold NaN from the draw where they failed. ``acceptance`` is each chain's mean MALA
    acceptance probability of its SGLD proposals. ``calibration`` is the :class:`~lightning_devinterp.CalibrationResult`
    behind ``epsilon="auto"``, else None. ``observations`` holds the traces ``[num_chains, num_draws, ...]`` of any
    extra observables passed in. ``tilted`` says whether the loss was tilted by its gradient at w*
    (:class:`~lightning_devinterp.SamplingConfig`). ``groups`` holds, with ``param_groups``, the restricted LLC of each named group (an
    ``LLCResult`` each, from chains of its own sampled in the same pass; the others frozen at w*).
    """

    llc_mean: float
    llc_std: float
    llc_per_chain: Tensor
    loss_trace: Tensor
    acceptance: Tensor
    init_loss: float
    nbeta: float
    warnings: list[str] = field(default_factory=list)
    failed_chains: tuple[int, ...] = ()
    epsilon: float = 0.0
    gamma: float = 0.0
    sampler: str = "sgld"
    num_samples: int = 0
    seed: int = 0
    vectorized: bool = True
    calibration: Any = None
    observations: dict[str, Tensor] = field(default_factory=dict)
    groups: dict[str, LLCResult] = field(default_factory=dict)
    llc_stderr: float = math.nan
    effective_draws: float = math.nan
    anchor_loss_trace: Tensor | None = None
    tilted: bool = False
    susceptibility: Tensor | None = None
    susceptibility_std: Tensor | None = None
    probe_labels: Any = None
    steps_before_draws: int | None = None
    relaxed_share: float = math.nan
    stderr_degrees: float = math.nan

    @property
    def paired(self) -> bool:
        """Whether each draw was scored against the same minibatch's loss at w*."""
        return self.anchor_loss_trace is not None

    @property
    def pairing_gain(self) -> float:
        """How many times smaller the variance of λ̂ is with paired draws than it would have been unpaired (over L(w*)),
        from the same draws; NaN for unpaired draws. Pairing removes the minibatch noise of L_B(w*), which is
        independent from draw to draw, so unpaired the mean of the draws would carry its variance over the number of
        draws on top of the paired estimate's squared standard error (mostly the chains' slow wander, which pairing
        cannot cancel). Near 1, pairing cancelled little of the estimate's error: the batch's loss at w* hardly varies
        (as at zero loss), or the wander dominates.
        """
        if self.anchor_loss_trace is None:
            return math.nan
        finite = torch.isfinite(self.loss_trace) & torch.isfinite(self.anchor_loss_trace)
        paired = (self.loss_trace - self.anchor_loss_trace)[finite].double()
        unpaired = self.loss_trace[finite].double() - self.init_loss
        variance = (self.llc_stderr / self.nbeta) ** 2 if self.nbeta > 0 else math.nan
        if paired.numel() < 2 or not variance > 0:
            return math.nan
        return 1.0 + float(unpaired.var() - paired.var()) / paired.numel() / variance

    @property
    def sampling_error(self) -> MeanError:
        """The standard error of ``llc_mean`` with its effective draws and degrees of freedom."""
        return MeanError(self.llc_stderr, self.effective_draws, self.stderr_degrees)

    @property
    def llc_interval(self) -> tuple[float, float]:
        """A 90% interval for λ̂: ``llc_mean`` ± a Student-t quantile times ``llc_stderr``, the upper end divided by
        ``relaxed_share`` when the chains may not have relaxed (a positive estimate can then be up to that much low).
        """
        half = self.sampling_error.half_width()
        lower, upper = self.llc_mean - half, self.llc_mean + half
        if 0 < self.relaxed_share < 1 and upper > 0:
            upper /= self.relaxed_share
        return lower, upper

    @property
    def susceptibility_by_label(self) -> dict[str, float]:
        """The mean susceptibility per probe label (empty without a probe or ``probe_labels``)."""
        if self.susceptibility is None or self.probe_labels is None:
            return {}
        return label_means(self.susceptibility, self.probe_labels)

    def susceptibility_summary(self) -> dict[str, dict[str, float]]:
        """The mean susceptibility per group (``"all"`` for the full model, then each of ``groups``) and per probe
        label (``"mean"`` over the whole probe without labels); empty without a probe.
        """
        if self.susceptibility is None:
            return {}
        parts = {FULL_MODEL: self, **self.groups}
        return {
            name: part.susceptibility_by_label or {"mean": float(part.susceptibility.nanmean())}
            for name, part in parts.items()
            if part.susceptibility is not None
        }

    def with_probe_labels(self, labels: Any) -> LLCResult:
        """This result (and its groups) with ``probe_labels`` set, checked against the probe's shape.

        Args:
            labels: one label per probe sample or per token, or None.

        Raises:
            ValueError: labels that do not match the probe.
        """
        if labels is not None and self.susceptibility is not None:
            check_labels(self.susceptibility, labels)
        return dataclasses.replace(
            self,
            probe_labels=labels,
            groups={name: group.with_probe_labels(labels) for name, group in self.groups.items()},
        )

    def probe_covariance(self) -> Tensor:
        """The Bayesian influence between probe samples, −Cov[ℓ_i, ℓ_j] over the draws, ``[samples, samples]``.

        Raises:
            ValueError: the estimate had no probe.
        """
        if PROBE_LOSS not in self.observations:
            raise ValueError("probe_covariance needs an estimate with a probe (probe=..., per_sample_loss_fn=...).")
        return probe_covariance(self.observations[PROBE_LOSS])

    def influence(self, i: int, j: int) -> float:
        """The Bayesian influence of probe sample ``i`` on probe sample ``j``, −Cov[ℓ_i, ℓ_j].

        Args:
            i: a probe sample's index.
            j: another (or the same) probe sample's index.
        """
        return float(self.probe_covariance()[i, j])

    @property
    def acceptance_mean(self) -> float:
        """Mean MALA acceptance probability of the surviving chains' proposals; healthy chains sit near 0.9."""
        return float(self.acceptance.nanmean())

    @property
    def num_chains_used(self) -> int:
        """Chains that did not diverge: those behind ``llc_mean`` and ``llc_std``."""
        return self.llc_per_chain.numel() - len(self.failed_chains)

    @property
    def healthy(self) -> bool:
        """True when no diagnostic found a reason to distrust the estimate (see ``warnings``)."""
        return not self.warnings


def summarize_chains(run: ChainRun, config: SamplingConfig, prior_steps: int = 0) -> LLCResult:
    """The LLC estimate and its health findings from raw chains: the full model's, with each group's in ``groups``.

    Args:
        run: the chains (possibly gathered from several processes).
        config: the resolved settings they were sampled with.
        prior_steps: SGLD steps the chains had run before this run, since they started at w* (a warm start).

    Raises:
        LLCEstimationError: every chain of a group diverged.
    """
    assert config.num_burnin_steps is not None and config.num_draws is not None
    steps_before_draws = prior_steps + config.num_burnin_steps
    share = (
        relaxed_share(run.epsilon * config.gamma, steps_before_draws, config.num_draws, config.num_steps_bw_draws)
        if config.sampler == "sgld"
        else math.nan
    )
    full, *parts = (
        dataclasses.replace(
            _summarize_group(run, config, index), steps_before_draws=steps_before_draws, relaxed_share=share
        )
        for index in range(len(run.groups))
    )
    return dataclasses.replace(full, groups=dict(zip(run.groups[1:], parts)))


def _summarize_group(run: ChainRun, config: SamplingConfig, group: int) -> LLCResult:
    assert config.num_burnin_steps is not None
    failures = first_failures(run.failed_at[group])
    draws = run.observations["loss"][group].clone()
    anchors = run.observations["anchor_loss"][group].clone() if "anchor_loss" in run.observations else None
    num_chains, num_draws = draws.shape
    draw_steps = [config.num_burnin_steps + index * config.num_steps_bw_draws for index in range(num_draws)]
    for chain, step in failures.items():
        failed = [index for index, draw_step in enumerate(draw_steps) if draw_step >= step]
        draws[chain, failed] = float("nan")
        if anchors is not None:
            anchors[chain, failed] = float("nan")
    increases = draws - (anchors if anchors is not None else run.init_loss)
    llc_per_chain = run.nbeta * increases.mean(dim=1)
    alive = [chain for chain in range(num_chains) if chain not in failures]
    if not alive:
        where = "" if group == 0 else f" of group {run.groups[group]!r}"
        raise LLCEstimationError(
            f"all {num_chains} chains{where} diverged (loss became NaN/Inf; first at step {min(failures.values())}); "
            f"try a smaller epsilon than {run.epsilon:g} or a larger gamma than {config.gamma:g}."
        )
    llc_mean = float(llc_per_chain[alive].mean())
    llc_std = float(llc_per_chain[alive].std()) if len(alive) > 1 else float("nan")
    error = mean_error(increases[alive])
    chi = susceptibility(increases, run.observations[PROBE_LOSS][group]) if PROBE_LOSS in run.observations else None
    acceptance = run.acceptance[group].clone()
    acceptance[list(failures)] = float("nan")
    findings = diagnose(
        increases,
        run.init_loss,
        llc_mean,
        failures,
        acceptance=acceptance,
        epsilon=run.epsilon,
        num_burnin_steps=config.num_burnin_steps,
        num_steps_bw_draws=config.num_steps_bw_draws,
    )
    return LLCResult(
        llc_mean=llc_mean,
        llc_std=llc_std,
        llc_per_chain=llc_per_chain.float(),
        loss_trace=draws.float(),
        acceptance=acceptance.float(),
        init_loss=run.init_loss,
        nbeta=run.nbeta,
        warnings=findings,
        failed_chains=tuple(sorted(failures)),
        epsilon=run.epsilon,
        gamma=float(config.gamma),
        sampler=config.sampler,
        num_samples=run.num_samples,
        seed=run.seed,
        vectorized=run.vectorized,
        observations={
            name: trace[group] for name, trace in run.observations.items() if name not in ("loss", "anchor_loss")
        },
        llc_stderr=run.nbeta * error.standard_error,
        effective_draws=error.effective_draws,
        stderr_degrees=error.degrees_of_freedom,
        anchor_loss_trace=anchors.float() if anchors is not None else None,
        tilted=config.tilted,
        susceptibility=None if chi is None else chi.value.float(),
        susceptibility_std=None if chi is None else chi.stderr.float(),
    )
