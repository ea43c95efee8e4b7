"""calibrate() and epsilon="auto": ground-truth accuracy, divergence exclusion, transparency, failure advice."""

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_devinterp import LLCEstimationError, calibrate, estimate_llc
from lightning_devinterp.theory import aoyagi_lambda, quadratic_sgld_llc
from tests.helpers.models import Potential, deep_linear_network, gaussian_nll, set_to_rank, teacher_data


def test_auto_epsilon_recovers_half_the_parameter_count_of_linear_regression():
    generator = torch.Generator().manual_seed(1)
    model = deep_linear_network([3, 2])
    data = teacher_data(model, 5000, generator, noise=0.0)
    result = estimate_llc(
        model,
        data,
        gaussian_nll,
        batch_size=250,
        gamma=1.0,
        num_chains=4,
        num_draws=400,
        num_burnin_steps=200,
        seed=0,
        epsilon="auto",
    )
    assert result.llc_mean == pytest.approx(6 / 2, rel=0.10)
    assert result.calibration is not None and result.epsilon == result.calibration.best.epsilon
    assert result.healthy and result.acceptance_mean >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize(("widths", "rank"), [([5, 3, 5], 0), ([2, 2, 2], 1), ([4, 3, 8], 0)])
def test_auto_epsilon_matches_aoyagi_within_15_percent(widths, rank):
    """At published-style settings (8 chains, 2000 burn-in steps, 3000 draws, gamma = 1, nbeta = n / log n)."""
    generator = torch.Generator().manual_seed(sum(widths) + rank)
    network = deep_linear_network(widths)
    set_to_rank(network, rank, generator)
    data = teacher_data(network, 20000, generator, noise=0.0)
    result = estimate_llc(
        network,
        data,
        gaussian_nll,
        batch_size=500,
        gamma=1.0,
        num_chains=8,
        num_draws=3000,
        num_burnin_steps=2000,
        seed=0,
        epsilon="auto",
    )
    assert result.llc_mean == pytest.approx(aoyagi_lambda(widths, rank), rel=0.15)
    assert "plateau" in result.calibration.message


def test_the_choice_lies_on_a_plateau_near_the_continuous_time_value():
    """L = ½ Σ h w²: λ̂ at the chosen epsilon is within 5% of the epsilon -> 0 value, which acceptance alone misses."""
    h, nbeta, gamma = [0.5, 1.0, 2.0, 4.0], 100.0, 10.0
    curvature = torch.tensor(h)
    data = TensorDataset(torch.zeros(16, 1))
    result = calibrate(
        Potential(4),
        data,
        lambda model, batch: 0.5 * (curvature * model.w**2).sum(),
        nbetas=[nbeta],
        gamma=gamma,
        batch_size=4,
        num_chains=16,
        num_draws=1000,
        num_burnin_steps=300,
        seed=0,
    )
    assert result.best is not None, result.message
    assert result.best.llc_mean == pytest.approx(quadratic_sgld_llc(h, nbeta, gamma, 0.0), rel=0.05)
    top = result.table[0]
    assert top["epsilon"] > result.best.epsilon  # the adapted top of the range was passed over for the plateau


def test_lambda_rising_across_the_grid_is_declined_with_advice():
    """200 directions, nbeta h + gamma = 101, and 50 steps: only the adapted top step lets the chains settle, so λ̂
    (100 when settled) halves with each halving of the step. A slope, not a plateau: nothing may be chosen."""
    data = TensorDataset(torch.zeros(16, 1))
    result = calibrate(
        Potential(200),
        data,
        lambda model, batch: 0.5 * (model.w**2).sum(),
        nbetas=[100.0],
        gamma=1.0,
        batch_size=4,
        num_chains=16,
        num_draws=40,
        num_burnin_steps=10,
        seed=0,
    )
    assert result.best is None
    assert "rises with epsilon" in result.message and "larger gamma" in result.message


def test_diverging_epsilons_are_never_chosen():
    """L = ½ · 10 · |w|² at nbeta = 1000: the SGLD update is unstable for epsilon > 4 / (nbeta h + gamma) ≈ 4e-4."""
    data = TensorDataset(torch.zeros(16, 1))
    grid = [3e-3 / 2**k for k in range(12)]
    result = calibrate(
        Potential(3),
        data,
        lambda model, batch: 5.0 * (model.w**2).sum(),
        epsilons=grid,
        nbetas=[1000.0],
        batch_size=4,
        gamma=1.0,
        num_draws=400,
        seed=0,
    )
    diverged = [row["epsilon"] for row in result.table if row["diverged"]]
    assert diverged and min(diverged) > 4e-4
    assert result.best is not None and result.best.epsilon < 4 / (1000 * 10 + 1)
    assert "plateau" in result.best.reason


def test_calibration_leaves_model_and_global_rng_untouched():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.3), nn.Linear(4, 2)).train()
    data = TensorDataset(torch.randn(64, 3), torch.randn(64, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    calibrate(
        model, data, gaussian_nll, epsilons=[1e-4, 1e-3], batch_size=16, num_draws=30, num_burnin_steps=10, seed=0
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and model[1].training
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]


def test_no_healthy_epsilon_gives_advice_and_auto_raises_it():
    data = TensorDataset(torch.zeros(16, 1))
    away_from_minimum = lambda model, batch: 0.5 * ((model.w - 3.0) ** 2).sum()  # noqa: E731
    result = calibrate(
        Potential(2), data, away_from_minimum, epsilons=[1e-4, 1e-3], batch_size=4, num_draws=100, seed=0
    )
    assert result.best is None and "Try" in result.message
    with pytest.raises(LLCEstimationError, match="Try"):
        estimate_llc(Potential(2), data, away_from_minimum, epsilon="auto", batch_size=4, num_draws=100, seed=0)


def test_bad_grids_are_rejected():
    data = TensorDataset(torch.zeros(16, 1))
    with pytest.raises(ValueError, match="epsilons"):
        calibrate(Potential(2), data, lambda m, b: (m.w**2).sum(), epsilons=[1e-3, -1.0], batch_size=4)
    with pytest.raises(ValueError, match="nbetas"):
        calibrate(Potential(2), data, lambda m, b: (m.w**2).sum(), nbetas=[0.0], batch_size=4)


def test_plot_writes_a_png_and_explains_a_missing_matplotlib(tmp_path, monkeypatch):
    data = TensorDataset(torch.zeros(16, 1))
    result = calibrate(
        Potential(2),
        data,
        lambda m, b: 0.5 * (m.w**2).sum(),
        nbetas=[100.0],
        epsilons=[1e-3, 1e-2],
        batch_size=4,
        num_draws=50,
        seed=0,
    )
    path = result.plot(tmp_path / "calibration.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"lightning-devinterp\[plot\]"):
        result.plot(tmp_path / "again.png")
