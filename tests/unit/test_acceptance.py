"""MALA acceptance of SGLD proposals: the formula against a hand computation, and its place in the estimate."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from lightning_devinterp import estimate_llc
from lightning_devinterp.sampling.kernels import SGLD, mala_log_acceptance
from tests.helpers.models import Potential


def test_log_acceptance_matches_a_hand_computation():
    """One weight, L(w) = 2 w² (so L' = 4w), nbeta = 10, gamma = 1, epsilon = 0.01, w* = 0, w = 0.3 -> w' = 0.25.

    U(w) = 10 * 2 * 0.09 + 0.5 * 0.09 = 1.845;  U(w') = 10 * 2 * 0.0625 + 0.5 * 0.0625 = 1.28125
    U'(w) = 10 * 1.2 + 0.3 = 12.3;  U'(w') = 10 * 1.0 + 0.25 = 10.25
    mean(w) = 0.3 - 0.005 * 12.3 = 0.2385;  mean(w') = 0.25 - 0.005 * 10.25 = 0.19875
    log q(w'|w) = -(0.25 - 0.2385)² / 0.02 = -0.0066125;  log q(w|w') = -(0.3 - 0.19875)² / 0.02 = -0.512578125
    log alpha = 1.845 - 1.28125 - 0.512578125 + 0.0066125 = 0.057784375
    """
    kernel = SGLD(epsilon=0.01, nbeta=10.0, gamma=1.0)
    w, w_new = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[0.25]], dtype=torch.float64)
    log_alpha = mala_log_acceptance(
        kernel,
        {"w": w},
        {"w": w_new},
        losses=2 * w[:, 0] ** 2,
        proposal_losses=2 * w_new[:, 0] ** 2,
        grads={"w": 4 * w},
        proposal_grads={"w": 4 * w_new},
        anchor={"w": torch.zeros(1, 1, dtype=torch.float64)},
    )
    assert log_alpha.shape == (1,)
    assert float(log_alpha[0]) == pytest.approx(0.057784375, rel=1e-12)


def test_acceptance_falls_as_the_step_grows_and_a_coarse_step_is_flagged():
    data = TensorDataset(torch.zeros(16, 1))
    kwargs = dict(batch_size=4, nbeta=100.0, gamma=1.0, num_chains=4, num_draws=400, num_burnin_steps=100, seed=0)
    loss = lambda model, batch: 0.5 * (model.w**2).sum()  # noqa: E731
    fine = estimate_llc(Potential(10), data, loss, epsilon=1e-3, **kwargs)
    coarse = estimate_llc(Potential(10), data, loss, epsilon=3.5e-2, **kwargs)
    assert fine.acceptance.shape == (4,)
    assert 0.9 < fine.acceptance_mean <= 1.0
    assert coarse.acceptance_mean < 0.8 < fine.acceptance_mean
    assert coarse.llc_mean > 5 * fine.llc_mean  # what the low acceptance warns about: a large discretization bias
    assert any("MALA acceptance" in w for w in coarse.warnings)
    assert not any("MALA acceptance" in w for w in fine.warnings)
    assert math.isfinite(coarse.llc_mean)


@settings(max_examples=40, deadline=None)
@given(
    epsilon=st.floats(1e-6, 1e-1),
    nbeta=st.floats(1.0, 1e4),
    gamma=st.floats(0.0, 1e3),
    chains=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    masked=st.booleans(),
)
def test_one_sgld_step_is_the_convention_whichever_path(epsilon, nbeta, gamma, chains, seed, masked):
    """w' = w - (epsilon/2)(nbeta g + gamma (w - w*)) + sqrt(epsilon) xi, masked entries unmoved: in place, one
    parameter at a time or fused over several."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), (5,)]
    ws = [torch.randn(chains, *shape, generator=generator, dtype=torch.float64) for shape in shapes]
    grads, noises = ([torch.randn_like(w) for w in ws] for _ in range(2))
    anchors = [torch.randn(1, *shape, generator=generator, dtype=torch.float64) for shape in shapes]
    masks = [(torch.rand(1, *shape, generator=generator) < 0.5).double() for shape in shapes] if masked else None
    kernel = SGLD(epsilon=epsilon, nbeta=nbeta, gamma=gamma)
    expected = []
    for index, (w, g, a, xi) in enumerate(zip(ws, grads, anchors, noises)):
        moved = w - 0.5 * epsilon * (nbeta * g + gamma * (w - a)) + math.sqrt(epsilon) * xi
        expected.append(moved if masks is None else torch.where(masks[index].bool(), moved, w))
    one_at_a_time = [w.clone() for w in ws]
    for index, w in enumerate(one_at_a_time):
        kernel.update_(w, grads[index], anchors[index], noises[index], None, None if masks is None else masks[index])
    fused = [w.clone() for w in ws]
    kernel.update_many_(fused, grads, anchors, noises, [None, None], masks)
    for result in (one_at_a_time, fused):
        for got, want in zip(result, expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
