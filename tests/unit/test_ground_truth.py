"""λ̂ against known values (docs/mathematics.md). Seeds are fixed; tolerances are set from the chains' own spread."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_devinterp import estimate_llc
from lightning_devinterp.theory import aoyagi_lambda, quadratic_sgld_llc
from tests.helpers.models import Potential, deep_linear_network, gaussian_nll, set_to_rank, teacher_data

NO_DATA = TensorDataset(torch.zeros(64, 1))


@pytest.mark.parametrize(
    ("h", "nbeta", "gamma", "epsilon"),
    [
        ([0.5, 1.0, 2.0, 4.0], 100.0, 10.0, 5e-3),  # strong discretization: the (1 - ε(...)/4) factor is 0.49 for h=4
        ([1.0, 1.0, 3.0], 1000.0, 100.0, 1e-3),
    ],
)
def test_quadratic_matches_exact_sgld_formula_within_3_percent(h, nbeta, gamma, epsilon):
    curvature = torch.tensor(h)
    result = estimate_llc(
        Potential(len(h)),
        NO_DATA,
        lambda model, batch: 0.5 * (curvature * model.w**2).sum(),
        batch_size=8,
        nbeta=nbeta,
        gamma=gamma,
        epsilon=epsilon,
        num_chains=16,
        num_draws=3000,
        num_burnin_steps=300,
        seed=0,
    )
    expected = quadratic_sgld_llc(h, nbeta, gamma, epsilon)
    assert result.llc_mean == pytest.approx(expected, rel=0.03)
    # Deliberately coarse steps: the discrete chain is exact, but far from the continuous-time λ, and says so.
    assert any("MALA acceptance" in w for w in result.warnings)


def test_regular_linear_regression_is_half_the_parameter_count():
    generator = torch.Generator().manual_seed(1)
    model = deep_linear_network([6, 4])
    data = teacher_data(model, 20000, generator, noise=0.0)
    result = estimate_llc(
        model,
        data,
        gaussian_nll,
        batch_size=500,
        epsilon=3e-5,
        gamma=1.0,
        num_chains=8,
        num_draws=2000,
        num_burnin_steps=1000,
        seed=0,
    )
    assert result.llc_mean == pytest.approx(24 / 2, rel=0.10)
    assert result.nbeta == pytest.approx(20000 / math.log(20000))


@pytest.mark.parametrize(("widths", "rank"), [([5, 3, 5], 0), ([2, 2, 2], 1), ([4, 4, 4, 4], 2)])
def test_deep_linear_network_matches_aoyagi_within_15_percent(widths, rank):
    """Near the published reference settings of Furman & Lau 2024 (nbeta = n/log n, gamma = 1, batch 500, n = 20000, 2000 + 3000 steps).

    Two deliberate changes cut the chains' spread so that 15% is a real test rather than luck: the teacher's
    labels carry no noise (λ depends only on K(w) = E½‖(W − W*)x‖²; label noise adds only minibatch variance,
    about 1 unit of λ̂ per chain here), and epsilon is 3e-5 instead of 1e-5, which lets the degenerate
    directions spread out within the burn-in (1e-5 still underestimates by ~13% after 2000 steps).
    """
    generator = torch.Generator().manual_seed(sum(widths) + rank)
    network = deep_linear_network(widths)
    set_to_rank(network, rank, generator)
    data = teacher_data(network, 20000, generator, noise=0.0)
    result = estimate_llc(
        network,
        data,
        gaussian_nll,
        batch_size=500,
        epsilon=3e-5,
        gamma=1.0,
        num_chains=8,
        num_draws=3000,
        num_burnin_steps=2000,
        seed=0,
    )
    assert result.llc_mean == pytest.approx(aoyagi_lambda(widths, rank), rel=0.15)


def test_polynomial_potential_w1_squared_plus_w2_to_the_fourth():
    """K = w₁² + w₂⁴ has λ = 1/2 + 1/4 = 3/4.

    At finite nbeta and epsilon the w₁² part carries the exact discretization bias of the quadratic formula
    (h = 2), which we add; the quartic part is sampled without a closed form, so the tolerance is 10%: the
    chains' own standard error here is about 3%, and SGLD's known underestimate of degenerate directions at
    finite nbeta accounts for the rest.
    """
    nbeta, gamma, epsilon = 1e4, 1.0, 2e-5
    result = estimate_llc(
        Potential(2),
        NO_DATA,
        lambda model, batch: model.w[0] ** 2 + model.w[1] ** 4,
        batch_size=8,
        nbeta=nbeta,
        gamma=gamma,
        epsilon=epsilon,
        num_chains=16,
        num_draws=4000,
        num_burnin_steps=1000,
        seed=0,
    )
    expected = quadratic_sgld_llc([2.0], nbeta, gamma, epsilon) + 0.25
    assert result.llc_mean == pytest.approx(expected, rel=0.10)
