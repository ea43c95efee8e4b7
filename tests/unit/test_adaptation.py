"""Step-size adaptation (dual averaging) and the adaptive default, against exact values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from lightning_devinterp import estimate_llc
from lightning_devinterp.sampling.adaptation import DualAveraging
from lightning_devinterp.theory import aoyagi_lambda, quadratic_sgld_llc
from tests.helpers.models import Potential, deep_linear_network, gaussian_nll, set_to_rank, teacher_data

NO_DATA = TensorDataset(torch.zeros(64, 1))


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(min_value=1e-7, max_value=1e-1),
    target=st.floats(min_value=0.6, max_value=0.98),
    start=st.floats(min_value=0.01, max_value=4.0),
)
def test_dual_averaging_finds_the_step_with_the_target_acceptance(scale, target, start):
    """With acceptance exp(-epsilon / scale), the adapted step is accepted at the target rate. Starts span what the
    initial search yields: within a factor 4 of the step accepted half the time (0.69 scale)."""
    adaptation = DualAveraging(initial=start * scale, target=target)
    for _ in range(500):
        adaptation.update(math.exp(-adaptation.current / scale))
    assert math.exp(-adaptation.final / scale) == pytest.approx(target, abs=0.01)


def test_a_diverging_step_counts_as_no_acceptance():
    adaptation = DualAveraging(initial=1e-3, target=0.9)
    adaptation.update(float("nan"))
    assert adaptation.current < 1e-2


@pytest.mark.parametrize(("h", "nbeta", "gamma"), [([0.5, 1.0, 2.0, 4.0], 100.0, 10.0), ([1.0] * 20, 1000.0, 100.0)])
def test_adaptive_step_reaches_its_target_and_matches_the_exact_formula_there(h, nbeta, gamma):
    curvature = torch.tensor(h)
    result = estimate_llc(
        Potential(len(h)),
        NO_DATA,
        lambda model, batch: 0.5 * (curvature * model.w**2).sum(),
        batch_size=8,
        nbeta=nbeta,
        gamma=gamma,
        num_chains=16,
        num_draws=3000,
        num_burnin_steps=600,
        seed=0,
    )
    assert result.acceptance_mean == pytest.approx(0.95, abs=0.03)
    assert result.llc_mean == pytest.approx(quadratic_sgld_llc(h, nbeta, gamma, result.epsilon), rel=0.03)
    continuous = quadratic_sgld_llc(h, nbeta, gamma, 0.0)
    assert result.llc_mean == pytest.approx(continuous, rel=0.15)  # what acceptance 0.95 costs in bias here
    assert result.healthy, result.warnings


def test_adaptation_from_a_point_with_zero_gradient_stays_local():
    """At w* = 0 of a deep linear network the gradient vanishes, so the first trial steps are far too large; the
    Metropolis correction while adapting keeps chains from being thrown away from w* (λ = 8 for 5-4-5, r = 0)."""
    generator = torch.Generator().manual_seed(9)
    network = deep_linear_network([5, 4, 5])
    set_to_rank(network, 0, generator)
    data = teacher_data(network, 20000, generator, noise=0.0)
    result = estimate_llc(
        network,
        data,
        gaussian_nll,
        batch_size=500,
        gamma=1.0,
        num_chains=8,
        num_draws=1000,
        num_burnin_steps=1000,
        seed=0,
    )
    assert 1e-6 < result.epsilon < 1e-2
    assert result.llc_mean == pytest.approx(aoyagi_lambda([5, 4, 5], 0), rel=0.15)


def test_adaptive_without_burn_in_is_a_clear_error():
    with pytest.raises(ValueError, match="burn-in"):
        estimate_llc(Potential(2), NO_DATA, lambda m, b: (m.w**2).sum(), batch_size=8, num_burnin_steps=1)


def test_small_minibatches_do_not_heat_the_chains():
    """A linear regression (10 inputs and a bias to 3 outputs, label noise 0.5) at its least-squares fit, sampled
    with minibatches of 32: the Metropolis check cannot see the minibatch gradient noise, which alone led the
    adaptation to a step where λ̂ was 2.3 times the exact value. The adapted step stays below the gradient-noise
    ceiling, and λ̂ matches the exact SGLD formula for the data's curvatures at that step."""
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(2000, 10, generator=generator)
    y = x @ torch.randn(10, 3, generator=generator) + 0.5 * torch.randn(2000, 3, generator=generator)
    inputs = torch.cat([x, torch.ones(2000, 1)], 1)
    fit = torch.linalg.lstsq(inputs, y).solution
    model = torch.nn.Linear(10, 3)
    with torch.no_grad():
        model.weight.copy_(fit[:10].T)
        model.bias.copy_(fit[10])
    result = estimate_llc(
        model,
        TensorDataset(x, y),
        gaussian_nll,
        batch_size=32,
        epsilon="adaptive",
        num_chains=4,
        num_burnin_steps=200,
        num_draws=400,
        seed=0,
    )
    curvatures = torch.linalg.eigvalsh(inputs.T @ inputs / 2000).tolist() * 3
    expected = quadratic_sgld_llc(curvatures, result.nbeta, result.gamma, result.epsilon)
    assert result.llc_mean == pytest.approx(expected, rel=0.1)
