"""Known learning coefficients, for checking estimates: Aoyagi's closed form for deep linear networks (Aoyagi 2024),
and the exact expectation of the SGLD estimator on a quadratic loss.
"""

from __future__ import annotations

import math


def aoyagi_lambda(widths: list[int], rank: int) -> float:
    """λ of a bias-free deep linear network whose true product matrix has a given rank (Aoyagi 2024).

    With ``M_j = H_j - rank``, the index set Σ (|Σ| = ℓ + 1) is the smallest prefix of the indices sorted by M with
    ``max_Σ M < min_rest M``, ``Σ_Σ M >= ℓ max_Σ M`` and ``Σ_Σ M < ℓ min_rest M`` (the last two only while a rest
    remains); then with ``S = Σ_Σ M``, ``M̄ = ceil(S / ℓ)``, ``a = S - (M̄ - 1) ℓ``::

        λ = (-r² + r (H_0 + H_L)) / 2 + a (ℓ - a) / (4ℓ) - ℓ (ℓ - 1) / 4 (S / ℓ)² + ½ Σ_{i<j in Σ} M_i M_j

    Used by Furman & Lau 2024 (arXiv 2402.03698) to validate LLC estimates.

    Args:
        widths: ``H_0`` (input), ..., ``H_L`` (output).
        rank: the rank r of the true product matrix.

    Raises:
        ValueError: fewer than two widths, or a rank outside ``[0, min(widths)]``.
    """
    if len(widths) < 2 or rank < 0 or rank > min(widths):
        raise ValueError(f"need at least two widths and 0 <= rank <= min(widths), got widths={widths}, rank={rank}.")
    M = [h - rank for h in widths]
    order = sorted(range(len(widths)), key=lambda j: M[j])
    for size in range(2, len(widths) + 1):
        sigma, rest = order[:size], order[size:]
        ell = size - 1
        S = sum(M[j] for j in sigma)
        largest = max(M[j] for j in sigma)
        if not rest:
            break
        smallest_rest = min(M[j] for j in rest)
        if largest < smallest_rest and S >= ell * largest and S < ell * smallest_rest:
            break
    M_bar = math.ceil(S / ell)
    a = S - (M_bar - 1) * ell
    pairs = sum(M[sigma[i]] * M[sigma[j]] for i in range(len(sigma)) for j in range(i + 1, len(sigma)))
    return (
        (-(rank**2) + rank * (widths[0] + widths[-1])) / 2
        + a * (ell - a) / (4 * ell)
        - (ell * (ell - 1) / 4) * (S / ell) ** 2
        + pairs / 2
    )


def sgld_stationary_variance(curvature: float, nbeta: float, gamma: float, epsilon: float) -> float:
    """The stationary variance of SGLD along a direction of curvature ``h`` of a quadratic loss:
    ``1 / (a (1 − ε a / 4))`` with ``a = nβ h + γ`` (derived in docs/mathematics.md).

    Args:
        curvature: the curvature h of the loss along the direction.
        nbeta: n times the inverse temperature.
        gamma: the localization strength.
        epsilon: the step size; 0 gives the continuous-time value.

    Raises:
        ValueError: the chain is unstable: ε (nβ h + γ) >= 4.
    """
    a = nbeta * curvature + gamma
    if epsilon * a >= 4:
        raise ValueError(
            f"epsilon = {epsilon:g} is unstable for curvature {curvature:g}: need epsilon (nbeta h + gamma) < 4."
        )
    return 1.0 / (a * (1 - epsilon * a / 4))


def quadratic_sgld_llc(curvatures: list[float], nbeta: float, gamma: float, epsilon: float) -> float:
    """The stationary expectation of λ̂ for SGLD on the quadratic loss L(w) = ½ Σ h_i w_i².

    The chain is Gaussian there, with the variance of :func:`sgld_stationary_variance` along each direction, so::

        E[λ̂] = Σ_i (nβ h_i / 2) / ((nβ h_i + γ) (1 − ε (nβ h_i + γ) / 4))

    Args:
        curvatures: the h_i.
        nbeta: n times the inverse temperature.
        gamma: the localization strength.
        epsilon: the step size; 0 gives the continuous-time value.

    Raises:
        ValueError: the chain is unstable: ε (nβ h_i + γ) >= 4 for some i.
    """
    return sum(nbeta * h / 2 * sgld_stationary_variance(h, nbeta, gamma, epsilon) for h in curvatures)
