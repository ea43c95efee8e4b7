"""How precise an estimate is: the standard error of a mean over autocorrelated chains, and an interval for it.

The draws of one chain are correlated (each SGLD step moves the chain a little), so neither the spread of the draws
nor the spread of the per-chain means over ``sqrt(chains)`` is the error of their mean. The effective sample size
(ESS) accounts for both: the chains are split in halves (so a trend within a chain shows as disagreement between its
halves), the autocorrelation is estimated across all of them and summed with Geyer's initial monotone sequence, and
the variance includes the spread between chains (Vehtari et al. 2021, "Rank-normalization, folding, and
localization: an improved R̂"; ArviZ's ``ess(method="mean")`` is the reference implementation). The standard error
of the mean is ``sqrt(var / ESS)``.

That estimate misses a slow component hidden under fast noise: minibatch noise makes the draws look nearly
independent, so the estimated autocorrelation falls into noise within a few lags, while the loss at the chains'
positions wanders on a time scale of tens of draws, longer than a short chain. The chains themselves are independent
replications, so the spread of their means is an unbiased, if rough (chains − 1 degrees of freedom), estimate of the
grand mean's variance whatever the autocorrelation. The reported error is whichever of the two gives the wider
interval.

Sampling noise is not the only error of a short estimate: chains started at w* take time to spread out, so their
draws read low until they have relaxed. :func:`relaxed_share` bounds how far (docs/mathematics.md), and the interval
of :class:`~lightning_devinterp.LLCResult` allows for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

INTERVAL_LEVEL = 0.9
"""The probability the reported interval is meant to cover the long-run value."""


@dataclass(frozen=True)
class MeanError:
    """The standard error of a mean over chains, the effective number of independent draws (ESS) the draws'
    autocorrelation implies, and the degrees of freedom of the standard error (NaN: ESS − 1).
    """

    standard_error: float
    effective_draws: float
    degrees_of_freedom: float = math.nan

    def half_width(self, level: float = INTERVAL_LEVEL) -> float:
        """Half the width of a two-sided interval for the mean at ``level`` (Student's t).

        Args:
            level: the probability the interval should cover the mean's long-run value.
        """
        if not math.isfinite(self.standard_error):
            return math.nan
        degrees = self.degrees_of_freedom if math.isfinite(self.degrees_of_freedom) else self.effective_draws - 1.0
        return student_t_quantile(0.5 + level / 2, max(degrees, 1.0)) * self.standard_error


def _autocovariance(chains: Tensor) -> Tensor:
    """Each row's autocovariance at every lag (biased, divided by the length), by FFT."""
    length = chains.shape[1]
    centred = chains - chains.mean(dim=1, keepdim=True)
    size = 1 << (2 * length - 1).bit_length()
    spectrum = torch.fft.rfft(centred, n=size, dim=1)
    covariance: Tensor = torch.fft.irfft(spectrum * spectrum.conj(), n=size, dim=1)[:, :length] / length
    return covariance


def mean_error(trace: Tensor) -> MeanError:
    """The standard error of the grand mean of ``trace``: from the draws' autocorrelation or from the spread of the
    chains' means, whichever gives the wider interval; and the effective sample size.

    Args:
        trace: draws ``[chains, draws]``, all finite; each chain is split in halves first, so at least 4 draws per
            chain are needed for an autocorrelation estimate (with fewer, the draws count as independent).

    Returns:
        The standard error, its degrees of freedom, and the ESS from the autocorrelation (at most the number of draws
        times a small factor, for antithetic chains).
    """
    trace = trace.double()
    from_draws = _autocorrelation_error(trace)
    chains = trace.shape[0]
    if chains < 2 or not math.isfinite(from_draws.standard_error):
        return from_draws
    from_chains = MeanError(
        float(trace.mean(dim=1).std()) / math.sqrt(chains), from_draws.effective_draws, chains - 1.0
    )
    return max(from_draws, from_chains, key=lambda error: error.half_width())


def _autocorrelation_error(trace: Tensor) -> MeanError:
    """The standard error of the grand mean of ``trace`` ``[chains, draws]`` from its split-chain ESS."""
    chains, draws = trace.shape
    total = chains * draws
    if total < 2:
        return MeanError(math.nan, float(total))
    if draws < 4:
        return MeanError(float(trace.std()) / math.sqrt(total), float(total))
    half = draws // 2
    split = torch.cat([trace[:, :half], trace[:, draws - half :]])
    count, length = split.shape
    autocovariance = _autocovariance(split)
    within = float(autocovariance[:, 0].mean()) * length / (length - 1)
    between = float(split.mean(dim=1).var()) if count > 1 else 0.0
    variance = within * (length - 1) / length + between
    if variance <= 0:
        return MeanError(0.0, float(total))
    mean_autocovariance = autocovariance.mean(dim=0)
    rho = 1.0 - (within - mean_autocovariance) / variance
    rho[0] = 1.0
    # Geyer's initial positive sequence: sum pairs while they are positive, keeping the pair sums monotone.
    tau = -1.0
    previous = math.inf
    for lag in range(0, length - 1, 2):
        pair = float(rho[lag] + rho[lag + 1])
        if pair <= 0:
            break
        pair = min(pair, previous)
        tau += 2.0 * pair
        previous = pair
    effective = count * length / max(tau, 1.0 / math.log10(max(count * length, 10)))
    return MeanError(math.sqrt(variance / effective), effective)


def relaxed_share(rate: float, steps_before_draws: int, num_draws: int, steps_between_draws: int = 1) -> float:
    """A lower bound on the share of its long-run value that the mean draw of chains started at w* has reached.

    One SGLD step with localization γ and step ε multiplies the gap between each direction's offset variance and its
    long-run value by ``(1 - ε (h + γ) / 2)² <= exp(-ε γ)`` wherever the curvature ``h`` of ``nβ L`` is not negative
    (and the step is stable), however flat the loss is there. So ``t`` steps after a start at w* every direction holds
    at least ``1 - exp(-ε γ t)`` of its long-run variance, and the loss increase at least that share of its long-run
    value. This averages the bound over the draws (docs/mathematics.md).

    Args:
        rate: ``ε γ``, the slowest relaxation rate per step; not positive (no localization) gives NaN, no bound.
        steps_before_draws: SGLD steps the chains had run since they started at w* when the first draw was taken.
        num_draws: draws in the mean.
        steps_between_draws: SGLD steps from one draw to the next.
    """
    if not rate > 0 or not math.isfinite(rate) or num_draws < 1:
        return math.nan
    per_draw = rate * steps_between_draws
    mean_remaining = (
        math.exp(-rate * steps_before_draws) * math.expm1(-per_draw * num_draws) / (num_draws * math.expm1(-per_draw))
    )
    return 1.0 - mean_remaining


def student_t_quantile(probability: float, degrees: float) -> float:
    """The ``probability`` quantile of Student's t with ``degrees`` degrees of freedom (exact for 1 and 2, a
    Cornish-Fisher expansion about the normal quantile beyond, accurate to about 1e-3 from 3 on).

    Args:
        probability: in (0, 1).
        degrees: at least 1.
    """
    if degrees < 1.5:
        return math.tan(math.pi * (probability - 0.5))
    if degrees < 2.5:
        return (2 * probability - 1) / math.sqrt(2 * probability * (1 - probability))
    z = math.sqrt(2) * _inverse_erf(2 * probability - 1)
    nu = degrees
    return (
        z
        + (z**3 + z) / (4 * nu)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * nu**3)
    )


def _inverse_erf(value: float) -> float:
    return float(torch.special.erfinv(torch.tensor(value, dtype=torch.float64)))
