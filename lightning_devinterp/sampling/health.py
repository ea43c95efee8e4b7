"""Findings about a finished set of chains that tell a user when not to trust an estimate."""

from __future__ import annotations

import math

from torch import Tensor

MAX_SHARE_BELOW_INIT = 0.7
"""At a local minimum minibatch noise puts at most about half of the draws below L(w*); far more means descent."""

DRIFT_T_STAT = 4.0
"""A first-to-last-quarter change of the draws must be this many standard errors (across chains) to count as
drift, or more with few chains (see :func:`drift_threshold`)..."""

_T_QUANTILES = (63.66, 9.92, 5.84, 4.60, 4.03)
"""Two-sided 1% quantiles of Student's t for 1..5 degrees of freedom (from 6 on they are below 4)."""


def drift_threshold(num_chains: int) -> float:
    """Standard errors a drift must exceed: :data:`DRIFT_T_STAT`, or the two-sided 1% Student-t quantile when
    that is larger. Few chains estimate their own spread poorly: with two, a fixed 4 would flag about one
    levelled-off estimate in six.

    Args:
        num_chains: the chains whose spread the standard error comes from (at least 2).
    """
    degrees = num_chains - 1
    return max(DRIFT_T_STAT, _T_QUANTILES[degrees - 1] if degrees <= len(_T_QUANTILES) else 0.0)


DRIFT_RELATIVE = 0.25
"""...and at least this share of the mean loss increase over L(w*), so that tiny but consistent drifts pass."""

MIN_ACCEPTANCE = 0.8
"""Below this mean MALA acceptance the SGLD discretization is too coarse to trust (practitioners aim near 0.9;
docs/choosing-settings.md shows how far λ̂ is off below it)."""


def first_failures(failed_at: Tensor) -> dict[int, int]:
    """For each chain whose loss became NaN/Inf, the first SGLD step (0-based) where it did.

    Args:
        failed_at: per chain, that step, or -1 for chains that never failed.
    """
    return {chain: int(step) for chain, step in enumerate(failed_at.tolist()) if step >= 0}


def _describe_step(step: int, num_burnin_steps: int, num_steps_bw_draws: int) -> str:
    if step < num_burnin_steps:
        return f"burn-in step {step}"
    return f"draw {(step - num_burnin_steps) // num_steps_bw_draws}"


def diagnose(
    increases: Tensor,
    init_loss: float,
    llc_mean: float,
    failures: dict[int, int],
    *,
    acceptance: Tensor,
    epsilon: float,
    num_burnin_steps: int,
    num_steps_bw_draws: int,
) -> list[str]:
    """Human-readable findings; an empty list means the estimate looks healthy.

    Failed chains are ignored in the checks. The levelling-off check compares the first and last quarter of each
    chain's draws and judges the change against its spread across chains, so it needs two surviving chains.

    Args:
        increases: each draw's loss minus the loss at w* (on the same minibatch when draws are paired, else L(w*) over
            the data), ``[num_chains, num_draws]``.
        init_loss: L(w*), for the messages.
        llc_mean: the estimate.
        failures: the first failing step of each diverged chain (:func:`first_failures`).
        acceptance: each chain's mean MALA acceptance.
        epsilon: the step size, for the advice.
        num_burnin_steps: burn-in steps, to say where a chain failed.
        num_steps_bw_draws: steps between draws, likewise.
    """
    findings = []
    for chain, step in failures.items():
        findings.append(
            f"chain {chain} diverged at {_describe_step(step, num_burnin_steps, num_steps_bw_draws)} (loss became NaN/Inf) "
            f"and was excluded; try a smaller epsilon than {epsilon:g}."
        )
    alive = [chain for chain in range(increases.shape[0]) if chain not in failures]
    if not alive:
        return findings
    good = increases[alive].double()
    share_below = float((good < 0).double().mean())
    if share_below > MAX_SHARE_BELOW_INIT:
        findings.append(
            f"{share_below:.0%} of the draws lie below the loss at w* (L(w*) = {init_loss:.4g}): w* is not a local "
            "minimum of the loss (the sampler keeps descending); train longer, increase gamma, or decrease epsilon."
        )
    mean_acceptance = float(acceptance.nanmean())
    if mean_acceptance < MIN_ACCEPTANCE:
        findings.append(
            f"the mean MALA acceptance of the SGLD proposals is {mean_acceptance:.2f} (healthy chains sit near 0.9): the "
            f"step is too coarse for this loss; try a smaller epsilon than {epsilon:g}."
        )
    if llc_mean < 0:
        findings.append(
            f"the estimate is negative (llc = {llc_mean:.4g}): the chains found lower loss than at w*, so w* is not a "
            "local minimum or epsilon is too large."
        )
    quarter = good.shape[1] // 4
    if quarter >= 1 and len(alive) > 1:
        change = good[:, -quarter:].mean(dim=1) - good[:, :quarter].mean(dim=1)
        mean_change = float(change.mean())
        elevation = abs(float(good.mean()))
        standard_error = float(change.std()) / math.sqrt(len(alive))
        if abs(mean_change) > max(drift_threshold(len(alive)) * standard_error, DRIFT_RELATIVE * elevation):
            findings.append(
                f"the loss trace has not levelled off after burn-in (the mean draw moved by {mean_change:+.3g} between the "
                f"first and last quarter of the draws); use more burn-in steps or a larger epsilon."
            )
    return findings
