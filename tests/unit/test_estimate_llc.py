"""Behaviour of estimate_llc apart from its accuracy: determinism, transparency, restriction, health, bad input."""

import logging
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import lightning_devinterp.sampling.data as data_module
from lightning_devinterp import LLCEstimationError, estimate_llc
from tests.helpers.models import Potential, gaussian_nll

FAST = dict(num_chains=3, num_draws=20, num_burnin_steps=5, epsilon=1e-4, gamma=100.0)


def regression_data(n=256, d_in=5, d_out=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    return TensorDataset(x, x @ torch.randn(d_in, d_out, generator=g) + 0.1 * torch.randn(n, d_out, generator=g))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))


class Regressor(pl.LightningModule):
    def __init__(self, returns_dict=False):
        super().__init__()
        self.net = mlp()
        self.returns_dict = returns_dict

    def training_step(self, batch, batch_idx):
        loss = gaussian_nll(self.net, batch)
        self.log("train_loss", loss)
        return {"loss": loss} if self.returns_dict else loss


def test_same_seed_is_bit_identical_and_other_seeds_differ():
    data = regression_data()
    first = estimate_llc(mlp(), data, gaussian_nll, batch_size=32, seed=7, **FAST)
    again = estimate_llc(mlp(), data, gaussian_nll, batch_size=32, seed=7, **FAST)
    other = estimate_llc(mlp(), data, gaussian_nll, batch_size=32, seed=8, **FAST)
    assert torch.equal(first.loss_trace, again.loss_trace)
    assert first.llc_mean == again.llc_mean
    assert not torch.equal(first.loss_trace, other.loss_trace)
    assert first.seed == 7


def test_seed_none_draws_a_recorded_seed_that_reproduces_the_run():
    data = regression_data()
    unseeded = estimate_llc(mlp(), data, gaussian_nll, batch_size=32, **FAST)
    replay = estimate_llc(mlp(), data, gaussian_nll, batch_size=32, seed=unseeded.seed, **FAST)
    assert torch.equal(unseeded.loss_trace, replay.loss_trace)


@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld"])
def test_vectorized_and_sequential_chains_agree(sampler):
    data = regression_data()
    kwargs = dict(batch_size=32, seed=3, sampler=sampler, **FAST)
    vectorized = estimate_llc(mlp(), data, gaussian_nll, vectorize=True, **kwargs)
    sequential = estimate_llc(mlp(), data, gaussian_nll, vectorize=False, **kwargs)
    assert vectorized.vectorized and not sequential.vectorized
    torch.testing.assert_close(vectorized.loss_trace, sequential.loss_trace, rtol=1e-5, atol=1e-6)
    assert vectorized.llc_mean == pytest.approx(sequential.llc_mean, rel=1e-4, abs=1e-4)


class ItemInForward(nn.Module):
    """Data-dependent control flow through .item(): vmap cannot batch this."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        out = self.net(x)
        return out * 2 if out.sum().item() > 1e9 else out


def test_auto_falls_back_to_sequential_once_logged_and_gives_the_same_numbers(caplog):
    data = regression_data()
    with caplog.at_level(logging.WARNING, logger="lightning_devinterp"):
        auto = estimate_llc(ItemInForward(), data, gaussian_nll, batch_size=32, seed=1, **FAST)
        estimate_llc(ItemInForward(), data, gaussian_nll, batch_size=32, seed=1, **FAST)
    sequential = estimate_llc(ItemInForward(), data, gaussian_nll, batch_size=32, seed=1, vectorize=False, **FAST)
    assert not auto.vectorized
    assert torch.equal(auto.loss_trace, sequential.loss_trace)
    fallbacks = [r for r in caplog.records if "vmap cannot batch" in r.getMessage()]
    assert len(fallbacks) == 1 and ".item()" in fallbacks[0].getMessage()
    with pytest.raises(RuntimeError):
        estimate_llc(ItemInForward(), data, gaussian_nll, batch_size=32, seed=1, vectorize=True, **FAST)


class NoisyDataset(Dataset):
    """Draws from every global RNG in __getitem__, like a dataset with random augmentation."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        random.random()
        np.random.rand()
        x, y = self.base[i]
        return x + 0.0 * torch.rand(()), y


def test_model_and_global_rng_are_left_exactly_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()
    model[3].eval()
    model[0].bias.requires_grad_(False)
    model[3].weight.grad = torch.ones_like(model[3].weight)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    hooks_before = dict(model._forward_hooks)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    flags_before = [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    rng_before = (torch.get_rng_state(), np.random.get_state(), random.getstate())

    result = estimate_llc(model, NoisyDataset(regression_data()), gaussian_nll, batch_size=32, seed=0, **FAST)

    assert np.isfinite(result.llc_mean)
    assert all(torch.equal(state_before[k], v) for k, v in model.state_dict().items())
    assert flags_before == [
        (m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()
    ]
    assert torch.equal(model[3].weight.grad, torch.ones_like(model[3].weight))
    assert model[0].weight.grad is None
    assert dict(model._forward_hooks) == hooks_before and not calls  # the hook stays, and sampling never called it
    assert torch.equal(torch.get_rng_state(), rng_before[0])
    assert np.random.get_state()[1].tolist() == rng_before[1][1].tolist()
    assert random.getstate() == rng_before[2]


def test_dataloader_sampler_and_generator_are_not_advanced():
    generator = torch.Generator().manual_seed(5)
    loader = DataLoader(regression_data(), batch_size=32, shuffle=True, generator=generator)
    before = generator.get_state()
    result = estimate_llc(mlp(), loader, gaussian_nll, seed=0, **FAST)
    assert torch.equal(generator.get_state(), before)
    assert result.num_samples == 256


def test_lightning_module_defaults_to_its_training_step_loss_without_logging(recwarn):
    data = regression_data()
    for returns_dict in (False, True):
        module = Regressor(returns_dict=returns_dict)
        default = estimate_llc(module, data, batch_size=32, seed=2, **FAST)
        explicit = estimate_llc(module.net, data, gaussian_nll, batch_size=32, seed=2, **FAST)
        assert torch.equal(default.loss_trace, explicit.loss_trace)
        assert "log" not in module.__dict__
    assert not [w for w in recwarn if "log" in str(w.message)]


def test_restricted_llc_equals_the_llc_of_the_equivalent_smaller_model():
    """Sampling only the head of a frozen-feature network is sampling a linear model on those features."""
    data = regression_data(n=512)
    features = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
    head = nn.Linear(8, 2)
    full = nn.Sequential(features, head)
    x, y = data.tensors
    with torch.no_grad():
        feature_data = TensorDataset(features(x), y)
        design = torch.cat([feature_data.tensors[0], torch.ones(len(x), 1)], dim=1)
        solution = torch.linalg.lstsq(design, y).solution
        head.weight.copy_(solution[:-1].T)
        head.bias.copy_(solution[-1])
    kwargs = dict(batch_size=64, seed=11, num_chains=4, num_draws=200, num_burnin_steps=50, epsilon=1e-4)
    restricted = estimate_llc(full, data, gaussian_nll, params=["1"], **kwargs)
    smaller = estimate_llc(head, feature_data, gaussian_nll, **kwargs)
    assert restricted.llc_mean == pytest.approx(smaller.llc_mean, rel=1e-3)
    assert restricted.llc_mean > 0 and restricted.healthy, restricted.warnings
    assert estimate_llc(full, data, gaussian_nll, params="1.*", **kwargs).llc_mean == restricted.llc_mean
    assert (
        estimate_llc(full, data, gaussian_nll, params=["1.weight", "1.bias"], **kwargs).llc_mean == restricted.llc_mean
    )


def test_a_diverging_chain_is_excluded_and_named():
    """Sample 0 poisons the chains' loss (not L(w*), computed without gradients); with batch 1, n = 32 and 22 steps
    about half of 16 chains ever draw it."""
    poison = TensorDataset(torch.arange(32.0).unsqueeze(1))

    def loss_fn(model, batch):
        (index,) = batch
        poisoned = torch.inf if torch.is_grad_enabled() else 0.0
        return 0.5 * (model.w**2).sum() + torch.where(index == 0, poisoned, 0.0).sum()

    result = estimate_llc(
        Potential(2),
        poison,
        loss_fn,
        batch_size=1,
        nbeta=10.0,
        gamma=1.0,
        epsilon=1e-2,
        num_chains=16,
        num_draws=20,
        num_burnin_steps=2,
        seed=0,
    )
    assert 0 < len(result.failed_chains) < 16
    alive = [c for c in range(16) if c not in result.failed_chains]
    assert torch.isnan(result.llc_per_chain[list(result.failed_chains)]).all()
    assert result.llc_mean == pytest.approx(float(result.llc_per_chain[alive].double().mean()))
    assert not result.healthy
    for chain in result.failed_chains:
        assert any(f"chain {chain} diverged" in w and "smaller epsilon" in w for w in result.warnings)


def test_every_chain_diverging_raises_with_advice():
    with pytest.raises(LLCEstimationError, match="smaller epsilon"):
        estimate_llc(
            Potential(3),
            TensorDataset(torch.zeros(8, 1)),
            lambda m, b: (m.w**2).sum(),
            batch_size=2,
            nbeta=1000.0,
            epsilon=0.1,
            num_draws=300,
        )


def test_not_a_local_minimum_is_reported():
    result = estimate_llc(
        Potential(2),
        TensorDataset(torch.zeros(8, 1)),
        lambda m, b: 0.5 * ((m.w - 3) ** 2).sum(),
        batch_size=2,
        nbeta=100.0,
        gamma=1.0,
        epsilon=1e-3,
        num_chains=4,
        num_draws=100,
        num_burnin_steps=10,
        seed=0,
    )
    assert result.llc_mean < 0
    assert not result.healthy
    assert any("not a local minimum" in w for w in result.warnings)
    assert any("negative" in w for w in result.warnings)


def test_a_trace_still_rising_after_burn_in_is_reported():
    """Without burn-in and with a tiny step, the chains are still spreading out from w* while the draws are taken."""
    result = estimate_llc(
        Potential(4),
        TensorDataset(torch.zeros(8, 1)),
        lambda m, b: 0.5 * (m.w**2).sum(),
        batch_size=2,
        nbeta=100.0,
        gamma=1.0,
        epsilon=1e-4,
        num_chains=8,
        num_draws=200,
        num_burnin_steps=0,
        seed=0,
    )
    assert any("not levelled off" in w for w in result.warnings)


class Stream(IterableDataset):
    def __init__(self, base):
        self.base = base

    def __iter__(self):
        return iter(self.base)


def test_iterable_and_uncached_data_give_the_cached_result(monkeypatch):
    data = regression_data(n=200)
    kwargs = dict(batch_size=16, seed=4, **FAST)
    cached = estimate_llc(mlp(), data, gaussian_nll, **kwargs)
    streamed = estimate_llc(mlp(), DataLoader(Stream(data), batch_size=50), gaussian_nll, **kwargs)
    monkeypatch.setattr(data_module, "MAX_CACHED_BYTES", 0)
    per_item = estimate_llc(mlp(), DataLoader(data, batch_size=16), gaussian_nll, **{**kwargs, "batch_size": None})
    assert streamed.num_samples == per_item.num_samples == 200
    torch.testing.assert_close(streamed.loss_trace, cached.loss_trace)
    torch.testing.assert_close(per_item.loss_trace, cached.loss_trace)


# ---- bad input ----------------------------------------------------------------------------------------------


def _call(**overrides):
    kwargs = dict(batch_size=8, **FAST)
    kwargs.update(overrides)
    return estimate_llc(mlp(), regression_data(n=32), gaussian_nll, **kwargs)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["epsilon", "nbeta"]),
    value=st.one_of(st.floats(max_value=0.0), st.just(float("nan")), st.just(float("inf"))),
)
def test_non_positive_epsilon_or_nbeta_is_rejected(name, value):
    with pytest.raises(ValueError, match=name):
        _call(**{name: value})


@settings(max_examples=25, deadline=None)
@given(value=st.floats(max_value=0.0, exclude_max=True))
def test_negative_gamma_is_rejected(value):
    with pytest.raises(ValueError, match="gamma"):
        _call(gamma=value)


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["num_chains", "num_draws", "num_steps_bw_draws", "batch_size"]),
    value=st.integers(max_value=0),
)
def test_counts_below_one_are_rejected(name, value):
    with pytest.raises(ValueError, match=name):
        _call(**{name: value})


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"num_burnin_steps": -1}, ValueError, "num_burnin_steps"),
        ({"num_chains": 2.5}, ValueError, "num_chains"),
        ({"sampler": "hmc"}, ValueError, "sampler"),
        ({"vectorize": "yes"}, ValueError, "vectorize"),
        ({"params": "nonexistent"}, ValueError, "matches no parameter"),
        ({"params": []}, ValueError, "params is empty"),
    ],
)
def test_bad_arguments_raise_clear_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_empty_dataset_is_rejected():
    empty = TensorDataset(torch.zeros(0, 5), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="empty"):
        estimate_llc(mlp(), empty, gaussian_nll, batch_size=8)


def test_non_scalar_loss_is_rejected():
    with pytest.raises(ValueError, match="scalar"):
        estimate_llc(mlp(), regression_data(n=32), lambda m, b: (m(b[0]) - b[1]) ** 2, batch_size=8)


def test_plain_module_without_loss_fn_is_a_type_error():
    with pytest.raises(TypeError, match="loss_fn"):
        estimate_llc(mlp(), regression_data(n=32), batch_size=8)


def test_dataset_without_batch_size_is_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        estimate_llc(mlp(), regression_data(n=32), gaussian_nll)


def test_model_without_trainable_parameters_is_rejected():
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        estimate_llc(frozen, regression_data(n=32), gaussian_nll, batch_size=8)
