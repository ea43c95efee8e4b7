"""Susceptibilities against their exact value, and what users see around them (docs/mathematics.md).

On a linear model at its least-squares fit, with inputs whitened so that the Hessian is the identity, SGLD's draws are
Gaussian with per-coordinate variance s (``sgld_stationary_variance``), and for a probe (x, y) with zero residual at w*
the susceptibility is χ_xy = ½ s² Σ_outputs (d − |x|²) for a block with d inputs; independent blocks add.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_devinterp import estimate_llc
from lightning_devinterp.sampling.susceptibility import label_means, susceptibility
from lightning_devinterp.theory import sgld_stationary_variance

INPUTS, SAMPLES = 4, 256
NBETA, GAMMA, EPSILON = 50.0, 10.0, 0.012


class TwoBlocks(nn.Module):
    """Two independent linear maps of the same input, their outputs side by side."""

    def __init__(self, first_outputs: int = 1, second_outputs: int = 2) -> None:
        super().__init__()
        self.first = nn.Linear(INPUTS, first_outputs, bias=False)
        self.second = nn.Linear(INPUTS, second_outputs, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first(x), self.second(x)], dim=-1)


def squared_error(model, batch):
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(-1)


def mean_squared_error(model, batch):
    return squared_error(model, batch).mean()


def fitted(seed=0):
    """The model at its least-squares fit on whitened inputs (XᵀX/n = I), and its data as one item (so that every
    minibatch is the whole set: no minibatch noise, and the Hessian is exactly the identity)."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(SAMPLES, INPUTS, generator=generator))
    x = q * math.sqrt(SAMPLES)
    model = TwoBlocks()
    y = model(x).detach() + 0.3 * torch.randn(SAMPLES, 3, generator=generator)
    solution = torch.linalg.lstsq(x, y).solution.T
    with torch.no_grad():
        model.first.weight.copy_(solution[:1])
        model.second.weight.copy_(solution[1:])
    return model, TensorDataset(x[None], y[None])


def zero_residual_probe(model, count=24, seed=1):
    """Probe inputs of varied norm, labelled with the model's own outputs (zero residual at w*)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, INPUTS, generator=generator) * torch.linspace(0.2, 1.6, count)[:, None]
    with torch.no_grad():
        return TensorDataset(x, model(x))


def exact(probe, outputs):
    s = sgld_stationary_variance(1.0, NBETA, GAMMA, EPSILON)
    return 0.5 * s**2 * outputs * (INPUTS - (probe.tensors[0] ** 2).sum(-1))


def slope_and_correlation(estimate, truth):
    slope = float((estimate * truth).sum() / (truth * truth).sum())
    correlation = float(torch.corrcoef(torch.stack([estimate, truth]))[0, 1])
    return slope, correlation


@pytest.fixture(scope="module")
def exact_case():
    model, data = fitted()
    probe = zero_residual_probe(model)
    result = estimate_llc(
        model, data, mean_squared_error, probe=probe, per_sample_loss_fn=squared_error,
        param_groups={"first": "first.*", "second": "second.*"}, batch_size=1, nbeta=NBETA, gamma=GAMMA,
        epsilon=EPSILON, num_chains=8, num_draws=800, num_burnin_steps=200, num_steps_bw_draws=2, seed=0,
    )  # fmt: skip
    return result, probe


@pytest.mark.parametrize(("group", "outputs"), [(None, 3), ("first", 1), ("second", 2)])
def test_susceptibility_matches_its_exact_value_for_the_model_and_each_group(exact_case, group, outputs):
    result, probe = exact_case
    part = result if group is None else result.groups[group]
    truth = exact(probe, outputs)
    assert part.susceptibility.shape == truth.shape
    slope, correlation = slope_and_correlation(part.susceptibility.double(), truth.double())
    assert abs(slope - 1) < 0.15
    assert correlation >= 0.9
    # The standard error is of the size of the actual errors (neither hiding them nor drowning the signal).
    ratio = float(((part.susceptibility - truth) / part.susceptibility_std).pow(2).mean().sqrt())
    assert 0.4 < ratio < 2.5


def test_blocks_add_up_to_the_full_model(exact_case):
    result, probe = exact_case
    parts = result.groups["first"].susceptibility + result.groups["second"].susceptibility
    scale = float(exact(probe, 3).abs().max())
    assert float((parts - result.susceptibility).abs().max()) < 0.25 * scale


def test_reading_the_probe_every_third_draw_estimates_the_same(exact_case):
    result, probe = exact_case
    model, data = fitted()
    sparse = estimate_llc(
        model, data, mean_squared_error, probe=probe, per_sample_loss_fn=squared_error, probe_every=3,
        param_groups={"first": "first.*", "second": "second.*"}, batch_size=1, nbeta=NBETA, gamma=GAMMA, epsilon=EPSILON, num_chains=8, num_draws=800,
        num_burnin_steps=200, num_steps_bw_draws=2, seed=0,
    )  # fmt: skip
    # Reading the probe draws nothing from the chains' generators: the same chains (up to float rounding).
    assert torch.allclose(sparse.loss_trace, result.loss_trace, rtol=1e-5)
    slope, correlation = slope_and_correlation(sparse.susceptibility.double(), exact(probe, 3).double())
    assert abs(slope - 1) < 0.2 and correlation >= 0.85
    assert bool((sparse.susceptibility_std > result.susceptibility_std).float().mean() > 0.5)


def test_labels_give_the_mean_per_label_and_influence_is_minus_the_covariance(exact_case):
    result, probe = exact_case
    labels = ["short" if float(x.norm()) < 1.5 else "long" for x in probe.tensors[0]]
    labelled = result.with_probe_labels(labels)
    by_label = labelled.susceptibility_by_label
    assert set(by_label) == {"short", "long"}
    assert by_label["short"] > by_label["long"]  # χ ∝ d − |x|²: shorter inputs respond more
    assert set(labelled.groups["first"].susceptibility_by_label) == {"short", "long"}
    covariance = result.probe_covariance()
    assert covariance.shape == (len(probe), len(probe))
    assert torch.allclose(covariance, covariance.T)
    assert bool((covariance.diagonal() <= 0).all())  # −Var[ℓ_i]
    assert result.influence(0, 1) == pytest.approx(float(covariance[0, 1]))


def test_per_token_losses_give_a_susceptibility_per_token():
    model, data = fitted()
    probe = zero_residual_probe(model, count=6)

    def per_output(model, batch):
        x, y = batch
        return 0.5 * (model(x) - y) ** 2

    result = estimate_llc(
        model, data, mean_squared_error, probe=DataLoader(probe, batch_size=4), per_sample_loss_fn=per_output,
        probe_labels=[0, 0, 0, 1, 1, 1], batch_size=1, nbeta=NBETA, gamma=GAMMA, epsilon=EPSILON,
        num_chains=2, num_draws=50, num_burnin_steps=20, seed=0,
    )  # fmt: skip
    assert result.susceptibility.shape == (6, 3)
    assert set(result.susceptibility_by_label) == {"0", "1"}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(probe=TensorDataset(torch.zeros(3, INPUTS), torch.zeros(3, 3))), "per_sample_loss_fn is missing"),
        (dict(per_sample_loss_fn=squared_error), "probe is missing"),
        (dict(probe_labels=["a"]), "needs a probe"),
        (
            dict(
                probe=TensorDataset(torch.zeros(3, INPUTS), torch.zeros(3, 3)),
                per_sample_loss_fn=squared_error,
                probe_labels=["a", "b"],
            ),
            "one label per probe sample",
        ),  # fmt: skip
        (
            dict(probe=TensorDataset(torch.zeros(3, INPUTS), torch.zeros(3, 3)), per_sample_loss_fn=mean_squared_error),
            "one loss per sample",
        ),  # fmt: skip
        (
            dict(
                probe=TensorDataset(torch.zeros(3, INPUTS), torch.zeros(3, 3)),
                per_sample_loss_fn=squared_error,
                probe_every=0,
            ),
            "probe_every",
        ),  # fmt: skip
    ],
)
def test_bad_probe_arguments_are_clear_errors(arguments, message):
    model, data = fitted()
    with pytest.raises(ValueError, match=message):
        estimate_llc(
            model, data, mean_squared_error, batch_size=1, nbeta=NBETA, num_chains=2, num_draws=4, num_burnin_steps=2,
            epsilon=1e-3, seed=0, **arguments,
        )  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 4), st.integers(2, 30), st.integers(1, 5), st.floats(0.1, 10), st.floats(-5, 5)
)  # fmt: skip
def test_susceptibility_is_minus_the_plain_covariance_and_ignores_shifts(chains, draws, samples, scale, shift):
    generator = torch.Generator().manual_seed(chains * 1000 + draws * 10 + samples)
    increases = torch.randn(chains, draws, generator=generator, dtype=torch.float64)
    losses = scale * torch.randn(chains, draws, samples, generator=generator, dtype=torch.float64)
    chi = susceptibility(increases, losses).value
    x = increases.flatten()
    for i in range(samples):
        y = losses[..., i].flatten() - x
        expected = -float(((x - x.mean()) * (y - y.mean())).mean())
        assert float(chi[i]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert torch.allclose(susceptibility(increases + shift, losses + shift).value, chi)


def test_label_means_accept_per_token_labels():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert label_means(values, ["a", "b"]) == {"a": 1.5, "b": 3.5}
    assert label_means(values, torch.tensor([[0, 1], [1, 1]])) == {"0": 1.0, "1": 3.0}
    assert label_means(values, [["x", "y"], ["y", "y"]]) == {"x": 1.0, "y": 3.0}
