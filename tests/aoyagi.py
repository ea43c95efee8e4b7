"""Aoyagi's closed form for the learning coefficient of deep linear networks (GUIDE section 2; Aoyagi 2024)."""

from __future__ import annotations

import math


def aoyagi_lambda(widths: list[int], rank: int) -> float:
    """λ for a deep linear network with layer widths ``H_0 (input), ..., H_L (output)`` and a true product of rank ``rank``."""
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
