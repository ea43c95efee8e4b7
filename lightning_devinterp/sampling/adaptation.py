"""Step-size adaptation during burn-in: dual averaging toward a target MALA acceptance (Hoffman & Gelman 2014).

Dual averaging is what Stan's and BlackJAX's warm-up use. With α_t the acceptance at adaptation step t::

    H̄_t = (1 - 1/(t + t0)) H̄_{t-1} + (δ - α_t) / (t + t0)
    log ε_t = μ - (√t / γ) H̄_t
    log ε̄_t = t^(-κ) log ε_t + (1 - t^(-κ)) log ε̄_{t-1}

with μ = log(10 ε_0). Chains move with ε_t while adapting and with the averaged ε̄ afterwards, so draws are taken
at one fixed step size. The defaults γ = 0.05, t0 = 10, κ = 0.75 are the paper's (§3.2). Both steps stay under a
ceiling where minibatch gradient noise, which the acceptance cannot see, would heat the chains
(:func:`gradient_noise_ceiling`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

INITIAL_EPSILON = 1e-4
"""Where the search for a starting step size begins."""

SEARCH_FACTOR = 4.0
"""The starting step is found by multiplying or dividing by this until one step's acceptance crosses one half."""

MAX_SEARCH = 12
"""At most this many multiplications or divisions (4^12 spans seven decades either way)."""

GRADIENT_NOISE_SHARE = 0.05
"""The minibatch gradient noise in SGLD's drift may add at most this share to the variance of the injected noise."""


def gradient_noise_ceiling(
    gradient_variance: float, dimension: int, nbeta: float, share: float = GRADIENT_NOISE_SHARE
) -> float:
    """The largest SGLD step at which minibatch gradient noise stays small beside the injected noise.

    SGLD's drift (ε/2) nβ ∇L_B carries the minibatch noise of ∇L_B, of variance (ε nβ / 2)² tr Cov(∇L_B) in all;
    the injected noise has variance ε d. Keeping the first within ``share`` of the second gives
    ε ≤ 4 share d / (nβ² tr Cov(∇L_B)). The Metropolis check cannot see this noise (each check uses one minibatch),
    and above the ceiling it heats the chains and inflates λ̂ (docs/choosing-settings.md shows by how much).

    Args:
        gradient_variance: tr Cov(∇L_B), the total variance of the minibatch gradient; zero (full-batch gradients)
            leaves the step unbounded.
        dimension: d, the number of sampled parameters.
        nbeta: n times the inverse temperature.
        share: the largest share of the injected noise's variance that gradient noise may add.
    """
    if not gradient_variance > 0 or not math.isfinite(gradient_variance):
        return math.inf
    return 4.0 * share * dimension / (nbeta**2 * gradient_variance)


@dataclass
class DualAveraging:
    """Adapts a step size toward ``target`` mean acceptance; :meth:`update` after each step, then :attr:`final`.
    Neither the current nor the final step exceeds ``ceiling``.
    """

    initial: float
    target: float
    ceiling: float = math.inf
    gamma: float = 0.05
    t0: float = 10.0
    kappa: float = 0.75
    steps: int = 0
    _mu: float = field(init=False)
    _h_bar: float = field(init=False, default=0.0)
    _log_epsilon: float = field(init=False)
    _log_epsilon_bar: float = field(init=False)

    def __post_init__(self) -> None:
        self._mu = math.log(10.0 * self.initial)
        self._log_epsilon = math.log(self.initial)
        self._log_epsilon_bar = math.log(self.initial)

    @property
    def current(self) -> float:
        """The step size to move with at the next adaptation step."""
        return min(math.exp(self._log_epsilon), self.ceiling)

    @property
    def final(self) -> float:
        """The averaged step size: what to sample with once adaptation ends."""
        return min(math.exp(self._log_epsilon_bar), self.ceiling)

    def update(self, acceptance: float) -> None:
        """Account for the mean acceptance of the step just taken (NaN counts as 0: a diverging step)."""
        acceptance = 0.0 if not math.isfinite(acceptance) else min(max(acceptance, 0.0), 1.0)
        self.steps += 1
        t = self.steps
        self._h_bar = (1.0 - 1.0 / (t + self.t0)) * self._h_bar + (self.target - acceptance) / (t + self.t0)
        self._log_epsilon = self._mu - math.sqrt(t) / self.gamma * self._h_bar
        weight = t ** (-self.kappa)
        self._log_epsilon_bar = weight * self._log_epsilon + (1.0 - weight) * self._log_epsilon_bar
