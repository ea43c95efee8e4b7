"""Precision of one estimate: paired draws cancel the minibatch noise, the standard error is honest, the interval
covers, and the tilted loss makes a point that is no minimum measure as one would (docs/mathematics.md)."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from lightning_devinterp import LLCResult, estimate_llc
from lightning_devinterp.sampling.uncertainty import mean_error, relaxed_share, student_t_quantile
from lightning_devinterp.theory import quadratic_sgld_llc
from tests.helpers.models import Potential, gaussian_nll
from tests.helpers.results import an_estimate

NO_DATA = TensorDataset(torch.zeros(64, 1))


def noisy_regression(n=2000, seed=0):
    """Linear regression with heavy label noise, at its least-squares fit: each minibatch's loss at w* is far from
    L(w*), while the loss increase of a draw over the same batch is small."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]) + 3.0 * torch.randn(n, 1, generator=generator)
    model = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    return model, TensorDataset(x, y)


def test_paired_draws_follow_the_same_chains_and_cancel_the_minibatch_noise():
    model, data = noisy_regression()
    settings = dict(batch_size=32, num_chains=4, num_draws=40, num_burnin_steps=200, epsilon=1e-4, gamma=100.0)
    paired = [estimate_llc(model, data, gaussian_nll, seed=seed, **settings) for seed in range(8)]
    plain = [estimate_llc(model, data, gaussian_nll, seed=seed, paired=False, **settings) for seed in range(8)]
    assert torch.equal(paired[0].loss_trace, plain[0].loss_trace)  # scoring draws no randomness of its own
    assert paired[0].paired and not plain[0].paired and plain[0].anchor_loss_trace is None
    spread_paired = statistics.stdev(r.llc_mean for r in paired)
    spread_plain = statistics.stdev(r.llc_mean for r in plain)
    assert spread_paired < 0.25 * spread_plain
    # Same draws, two scores: they differ by nβ times how far the batches' loss at w* strayed from L(w*), whose
    # expectation is zero, so both estimate the same λ.
    for a, b in zip(paired, plain):
        strayed = a.nbeta * (float(a.anchor_loss_trace.double().mean()) - a.init_loss)
        assert b.llc_mean - a.llc_mean == pytest.approx(strayed, rel=1e-4, abs=1e-3)


def test_the_standard_error_is_the_spread_of_repeated_estimates_and_the_interval_covers():
    """On L = ½ Σ h w² the chain is exact and its draws autocorrelated (AR(1) per coordinate): the reported standard
    error must match the spread of estimates over seeds, and 90% intervals cover the exact value about 90% of the
    time."""
    curvature = torch.tensor([1.0, 2.0, 4.0])
    settings = dict(
        batch_size=8, nbeta=100.0, gamma=10.0, epsilon=2e-3, num_chains=4, num_draws=150, num_burnin_steps=300
    )
    results = [
        estimate_llc(Potential(3), NO_DATA, lambda m, b: 0.5 * (curvature * m.w**2).sum(), seed=seed, **settings)
        for seed in range(40)
    ]
    exact = quadratic_sgld_llc([1.0, 2.0, 4.0], 100.0, 10.0, 2e-3)
    spread = statistics.stdev(r.llc_mean for r in results)
    reported = statistics.mean(r.llc_stderr for r in results)
    assert 0.7 < reported / spread < 1.4
    covered = sum(r.llc_interval[0] <= exact <= r.llc_interval[1] for r in results) / len(results)
    assert 0.75 <= covered <= 1.0
    assert all(r.llc_std / math.sqrt(4) < r.llc_stderr * 3 for r in results)


@settings(max_examples=20, deadline=None)
@given(phi=st.floats(0.0, 0.95), seed=st.integers(0, 1000))
def test_the_effective_sample_size_of_an_autoregressive_series(phi, seed):
    """AR(1) with coefficient phi has integrated autocorrelation time (1 + phi) / (1 - phi)."""
    generator = torch.Generator().manual_seed(seed)
    chains, length = 4, 4000
    noise = torch.randn(chains, length, generator=generator, dtype=torch.float64)
    series = torch.zeros_like(noise)
    series[:, 0] = noise[:, 0] / math.sqrt(1 - phi**2)
    for t in range(1, length):
        series[:, t] = phi * series[:, t - 1] + noise[:, t]
    expected = chains * length * (1 - phi) / (1 + phi)
    assert mean_error(series).effective_draws == pytest.approx(expected, rel=0.3)


@pytest.mark.parametrize(("chains", "correlation_time"), [(4, 10.0), (4, 40.0), (8, 40.0)])
def test_the_interval_covers_when_a_slow_component_hides_under_fast_noise(chains, correlation_time):
    """Short chains whose draws are white noise (minibatch noise) plus a slow AR(1) wander (the loss at the chains'
    positions, correlated over tens of draws): the autocorrelation sees almost independent draws and alone covers the
    mean on about 70% of runs; the chains' spread restores the nominal 90%."""
    generator = torch.Generator().manual_seed(0)
    runs, draws, slow_sd, fast_sd = 400, 30, 1.3, 4.2
    phi = math.exp(-1.0 / correlation_time)
    slow = torch.empty(runs, chains, draws, dtype=torch.float64)
    slow[..., 0] = slow_sd * torch.randn(runs, chains, generator=generator, dtype=torch.float64)
    for t in range(1, draws):
        step_noise = torch.randn(runs, chains, generator=generator, dtype=torch.float64)
        slow[..., t] = phi * slow[..., t - 1] + math.sqrt(1 - phi**2) * slow_sd * step_noise
    traces = slow + fast_sd * torch.randn(runs, chains, draws, generator=generator, dtype=torch.float64)
    covered = [abs(float(trace.mean())) <= mean_error(trace).half_width() for trace in traces]
    assert 0.85 <= sum(covered) / runs <= 0.97


def test_a_trend_within_the_chains_lowers_the_effective_sample_size():
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(4, 200, generator=generator, dtype=torch.float64)
    trending = flat + torch.linspace(0, 3, 200, dtype=torch.float64)
    assert mean_error(trending).standard_error > 2 * mean_error(flat).standard_error


@settings(max_examples=200, deadline=None)
@given(
    curvature=st.floats(0.0, 50.0),
    gamma=st.floats(0.1, 1000.0),
    epsilon=st.floats(1e-6, 1e-1),
    steps_before_draws=st.integers(0, 3000),
    num_draws=st.integers(1, 300),
    steps_between_draws=st.integers(1, 5),
)
def test_the_relaxed_share_bounds_every_stable_quadratic_direction(
    curvature, gamma, epsilon, steps_before_draws, num_draws, steps_between_draws
):
    """From w*, a direction of curvature h holds 1 - a^(2t) of its long-run variance after t steps, with
    a = 1 - ε (h + γ) / 2: the bound must not exceed that share averaged over the draws, for any h >= 0."""
    rate = epsilon * (curvature + gamma)
    if rate >= 4 - epsilon * gamma:  # an unstable step; no chain runs there
        return
    shrink = (1 - rate / 2) ** 2
    steps = [steps_before_draws + k * steps_between_draws for k in range(num_draws)]
    exact = 1 - sum(shrink**t for t in steps) / num_draws
    assert relaxed_share(epsilon * gamma, steps_before_draws, num_draws, steps_between_draws) <= exact + 1e-9


def test_chains_started_at_w_star_read_low_until_relaxed_and_the_interval_allows_for_it():
    """L = ½ Σ h w² with nβ h far below γ: the localization alone pulls the chains out, so after a short burn-in they
    read less than half the long-run value. The bound says so nearly exactly, the sampling error alone would claim a
    precision the estimate does not have, and the interval's allowance covers the long-run value."""
    curvature = [0.01, 0.02, 0.04]
    weights = torch.tensor(curvature)
    settings = dict(batch_size=8, nbeta=100.0, gamma=100.0, epsilon=2.5e-4, num_chains=16, num_draws=40)

    def loss(model, batch):
        return 0.5 * (weights * model.w**2).sum()

    stationary = quadratic_sgld_llc(curvature, 100.0, 100.0, 2.5e-4)
    short = [estimate_llc(Potential(3), NO_DATA, loss, num_burnin_steps=5, seed=seed, **settings) for seed in range(20)]
    exact_share = 0.0
    for h in curvature:
        shrink = (1 - 2.5e-4 * (100.0 * h + 100.0) / 2) ** 2
        reached = 1 - sum(shrink ** (5 + k) for k in range(40)) / 40
        exact_share += reached * quadratic_sgld_llc([h], 100.0, 100.0, 2.5e-4) / stationary
    assert short[0].steps_before_draws == 5
    assert 0.9 * exact_share < short[0].relaxed_share <= exact_share < 0.5
    assert statistics.mean(r.llc_mean for r in short) == pytest.approx(exact_share * stationary, rel=0.15)
    sampling_only = [abs(r.llc_mean - stationary) <= r.sampling_error.half_width() for r in short]
    assert sum(sampling_only) <= 2
    assert sum(r.llc_interval[0] <= stationary <= r.llc_interval[1] for r in short) >= 17
    relaxed = estimate_llc(Potential(3), NO_DATA, loss, num_burnin_steps=2000, seed=0, **settings)
    half = relaxed.sampling_error.half_width()
    assert relaxed.relaxed_share > 0.999
    assert relaxed.llc_interval[1] - relaxed.llc_mean == pytest.approx(half, rel=1e-3)


@pytest.mark.parametrize(
    ("degrees", "quantile"), [(1, 6.314), (2, 2.920), (3, 2.353), (5, 2.015), (10, 1.812), (1e6, 1.645)]
)
def test_student_t_quantiles(degrees, quantile):
    assert student_t_quantile(0.95, degrees) == pytest.approx(quantile, abs=0.01)


def test_the_tilted_loss_measures_a_point_that_is_no_minimum_as_if_it_were_one():
    """L = ½ Σ h (w − c)² at w* = 0 ≠ c: the plain estimate includes the drift down the gradient (negative here), the
    tilted one is the exact SGLD expectation of a minimum with the same curvature."""
    curvature, centre = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, -0.3, 0.2])

    def loss(model, batch):
        return 0.5 * (curvature * (model.w - centre) ** 2).sum()

    settings = dict(
        batch_size=8, nbeta=100.0, gamma=10.0, epsilon=2e-3, num_chains=8, num_draws=1000, num_burnin_steps=300, seed=0
    )
    tilted = estimate_llc(Potential(3), NO_DATA, loss, tilted=True, **settings)
    plain = estimate_llc(Potential(3), NO_DATA, loss, **settings)
    exact = quadratic_sgld_llc([1.0, 2.0, 4.0], 100.0, 10.0, 2e-3)
    assert tilted.tilted and tilted.llc_mean == pytest.approx(exact, rel=0.05)
    assert plain.llc_mean < 0 < exact


def test_the_pairing_gain_is_the_variance_of_the_estimate_that_pairing_removes():
    """Draws whose minibatch noise is shared with the loss at w*: pairing removes it. Independent draws: the estimate's
    variance falls as each draw's (gain = total / residual variance). Chains that each wander far from the others
    (the slow part of a draw's noise): pairing still removes most of each draw's variance, but little of the
    estimate's. Draws at zero loss, where the loss at w* is zero on every batch: pairing removes nothing."""
    generator = torch.Generator().manual_seed(0)
    chains, draws = 400, 50
    independent = torch.randn(chains, draws, generator=generator)
    batch_noise = 2.0 * torch.randn(chains, draws, generator=generator)

    def result(loss: torch.Tensor, anchor: torch.Tensor | None) -> LLCResult:
        paired = loss if anchor is None else loss - anchor
        error = mean_error(paired)
        return an_estimate(
            loss_trace=loss, anchor_loss_trace=anchor, nbeta=1.0, init_loss=0.0, llc_stderr=error.standard_error
        )

    shared = result(independent + batch_noise, batch_noise)
    assert shared.pairing_gain == pytest.approx(1 + 4.0, rel=0.15)
    wandering = torch.randn(chains, 1, generator=generator) + 0.5 * independent
    # unpaired, the mean carries 4 / draws per chain besides the wander's 1 + 0.25 / draws
    assert result(wandering + batch_noise, batch_noise).pairing_gain - 1 == pytest.approx(4 / (draws + 0.25), rel=0.2)
    assert result(wandering, torch.zeros(chains, draws)).pairing_gain == pytest.approx(1.0)
    assert math.isnan(result(wandering, None).pairing_gain)
