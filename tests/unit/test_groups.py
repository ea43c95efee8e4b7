"""Per-component λ̂: groups of parameters, each measured on its own in the same vectorized pass as the full model."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_devinterp import estimate_llc
from lightning_devinterp.sampling.params import head_groups, layer_groups, multihead_attention_groups
from lightning_devinterp.theory import quadratic_sgld_llc


class TwoRegressions(nn.Module):
    """Two linear regressions on disjoint inputs: a block-diagonal Hessian, so the blocks' λ̂ add up exactly."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 2, bias=False)
        self.second = nn.Linear(4, 1, bias=False)

    def forward(self, x):
        return torch.cat([self.first(x[:, :3]), self.second(x[:, 3:])], dim=1)


def least_squares_problem(n=512):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 7, generator=generator)
    y = torch.randn(n, 3, generator=generator)
    model = TwoRegressions()
    with torch.no_grad():
        model.first.weight.copy_(torch.linalg.lstsq(x[:, :3], y[:, :2]).solution.T)
        model.second.weight.copy_(torch.linalg.lstsq(x[:, 3:], y[:, 2:]).solution.T)
    return model, TensorDataset(x, y)


def nll(model, batch):
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(-1).mean()


def test_each_group_matches_the_exact_formula_for_its_block_and_the_whole_for_both():
    """Full batch, at the least-squares minimum: L is exactly quadratic and batch-independent, with Hessian
    X_block^T X_block / n for each output of each block, so each λ̂ has the exact SGLD expectation of docs/mathematics.md."""
    model, data = least_squares_problem()
    x = data.tensors[0]
    curvatures = {}
    for name, columns, outputs in (("first", slice(0, 3), 2), ("second", slice(3, 7), 1)):
        block = x[:, columns]
        curvatures[name] = torch.linalg.eigvalsh(block.T @ block / len(x)).tolist() * outputs
    nbeta, gamma, epsilon = 100.0, 10.0, 2e-3
    result = estimate_llc(
        model,
        data,
        nll,
        batch_size=len(x),
        nbeta=nbeta,
        gamma=gamma,
        epsilon=epsilon,
        num_chains=16,
        num_draws=1500,
        num_burnin_steps=300,
        seed=0,
        param_groups={"first": "first", "second": "second"},
    )
    for name in ("first", "second"):
        assert result.groups[name].llc_mean == pytest.approx(
            quadratic_sgld_llc(curvatures[name], nbeta, gamma, epsilon), rel=0.10
        )
    both = curvatures["first"] + curvatures["second"]
    assert result.llc_mean == pytest.approx(quadratic_sgld_llc(both, nbeta, gamma, epsilon), rel=0.10)
    assert result.groups["first"].llc_per_chain.shape == (16,) and result.vectorized


def test_groups_are_validated():
    model, data = least_squares_problem()
    with pytest.raises(ValueError, match="matches no parameter"):
        estimate_llc(model, data, nll, batch_size=64, param_groups={"third": "third"})
    with pytest.raises(ValueError, match="not sampled"):
        estimate_llc(model, data, nll, batch_size=64, params="first", param_groups={"second": "second"})
    with pytest.raises(ValueError, match="shape"):
        estimate_llc(
            model, data, nll, batch_size=64, param_groups={"bad": {"first.weight": torch.ones(3, 3, dtype=torch.bool)}}
        )


def test_layer_and_head_helpers_cover_their_modules_once():
    encoder = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(8, 8))
    assert layer_groups(encoder) == {"0": ["0"], "2": ["2"]}
    heads = head_groups(encoder, qkv="0", num_heads=2, out="2")
    qkv_rows = torch.stack([group["0.weight"][:, 0] for group in heads.values()])
    assert qkv_rows.sum(0).tolist() == [1] * 24  # every row of q, k and v belongs to exactly one head
    out_columns = torch.stack([group["2.weight"][0] for group in heads.values()])
    assert out_columns.sum(0).tolist() == [1] * 8
    attention = nn.MultiheadAttention(8, 4)
    groups = multihead_attention_groups(nn.Sequential(attention))
    assert len(groups) == 4 and torch.stack([g["0.in_proj_weight"] for g in groups.values()]).sum(0).eq(1).all()


def test_head_groups_run_in_one_vectorized_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 2))
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(128, 8, generator=g), torch.randn(128, 2, generator=g))
    groups = {name: {"0.weight": mask["0.weight"]} for name, mask in head_groups(model, qkv="0", num_heads=2).items()}
    result = estimate_llc(
        model,
        data,
        nll,
        batch_size=32,
        num_chains=3,
        num_draws=20,
        num_burnin_steps=10,
        epsilon=1e-4,
        seed=0,
        param_groups=groups,
    )
    assert set(result.groups) == {"0.head0", "0.head1"} and result.vectorized
    assert all(group.llc_per_chain.shape == (3,) for group in result.groups.values())
