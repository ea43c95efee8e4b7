"""Scale: chains in batches, attention under vmap, a compiled step; same numbers as the plain path."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from lightning_devinterp import estimate_llc
from lightning_devinterp.sampling.chains import attention_backends
from lightning_devinterp.theory import quadratic_sgld_llc
from tests.helpers.models import Potential, gaussian_nll


def regression(n=256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return TensorDataset(x, torch.randn(n, 2, generator=g))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))


FAST = dict(batch_size=32, num_chains=4, num_draws=40, num_burnin_steps=20, seed=5)


def test_one_batch_of_all_chains_is_the_unbatched_run():
    plain = estimate_llc(mlp(), regression(), gaussian_nll, **FAST)
    batched = estimate_llc(mlp(), regression(), gaussian_nll, chain_batch=4, **FAST)
    assert torch.equal(plain.loss_trace, batched.loss_trace)


def test_chain_batches_share_the_adapted_step_and_the_first_batch_is_unchanged():
    plain = estimate_llc(mlp(), regression(), gaussian_nll, **{**FAST, "num_chains": 2})
    batched = estimate_llc(mlp(), regression(), gaussian_nll, chain_batch=2, **FAST)
    assert batched.loss_trace.shape == (4, 40) and batched.epsilon == plain.epsilon
    assert torch.equal(batched.loss_trace[:2], plain.loss_trace)  # batch 0 draws what 2 chains alone would


def test_chain_batches_still_match_the_exact_formula():
    h, nbeta, gamma, epsilon = [0.5, 1.0, 2.0, 4.0], 100.0, 10.0, 2e-3
    curvature = torch.tensor(h)
    result = estimate_llc(
        Potential(4),
        TensorDataset(torch.zeros(8, 1)),
        lambda m, b: 0.5 * (curvature * m.w**2).sum(),
        batch_size=4,
        nbeta=nbeta,
        gamma=gamma,
        epsilon=epsilon,
        num_chains=16,
        chain_batch=3,
        num_draws=2000,
        num_burnin_steps=300,
        seed=0,
    )
    assert result.llc_mean == pytest.approx(quadratic_sgld_llc(h, nbeta, gamma, epsilon), rel=0.03)


def test_attention_runs_through_the_math_backend_under_vmap():
    """The backend choice itself (the flags are what CUDA reads), and on CPU the effect: no per-chain fallback loop."""
    with attention_backends(vectorized=True):
        assert torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled() and torch.backends.cuda.flash_sdp_enabled()
    with attention_backends(vectorized=False):
        assert torch.backends.cuda.flash_sdp_enabled()
    q = torch.randn(3, 2, 2, 5, 4)
    attend = torch.func.vmap(lambda x: F.scaled_dot_product_attention(x, x, x, is_causal=True))
    with warnings.catch_warnings(record=True) as caught, attention_backends(vectorized=True):
        warnings.simplefilter("always")
        attend(q)
    assert not [w for w in caught if "batching rule" in str(w.message)]


class SelfAttention(nn.Module):
    def __init__(self, width=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


@pytest.mark.parametrize(
    "make",
    [SelfAttention, lambda: nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)],
)
def test_attention_models_vectorize_with_the_same_numbers_as_the_loop(make):
    torch.manual_seed(0)
    model = make()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, 16, generator=g)
    data = TensorDataset(x, torch.randn(64, 6, 16, generator=g))
    kwargs = dict(batch_size=8, num_chains=3, num_draws=15, num_burnin_steps=10, epsilon=1e-4, seed=1)
    vectorized = estimate_llc(model, data, gaussian_nll, vectorize=True, **kwargs)
    looped = estimate_llc(model, data, gaussian_nll, vectorize=False, **kwargs)
    assert vectorized.vectorized
    torch.testing.assert_close(vectorized.loss_trace, looped.loss_trace, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_the_compiled_step_gives_the_same_numbers():
    kwargs = dict(batch_size=32, num_chains=4, num_draws=30, num_burnin_steps=0, epsilon=1e-4, seed=3)
    plain = estimate_llc(mlp(), regression(), gaussian_nll, **kwargs)
    compiled = estimate_llc(mlp(), regression(), gaussian_nll, compile=True, **kwargs)
    torch.testing.assert_close(compiled.loss_trace, plain.loss_trace, rtol=1e-5, atol=1e-5)
