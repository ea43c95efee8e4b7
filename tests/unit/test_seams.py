"""The seams the package is built around: one SamplingConfig, observables at draw time, per-field gathering."""

import threading

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_devinterp import LLCMonitor, calibrate, estimate_llc
from lightning_devinterp.sampling.chains import ChainRun
from lightning_devinterp.tracking.distributed import gather_run
from tests.helpers.models import Potential, gaussian_nll

FAST = dict(num_chains=3, num_draws=30, num_burnin_steps=5, gamma=100.0)


def regression(n=128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, x @ torch.randn(4, 2, generator=g))


def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


@pytest.mark.parametrize("entry", ["estimate_llc", "calibrate", "LLCMonitor"])
def test_a_misspelled_setting_names_the_closest_one(entry):
    with pytest.raises(TypeError, match="Did you mean 'num_chains'"):
        if entry == "LLCMonitor":
            LLCMonitor(num_chain=3)
        else:
            {"estimate_llc": estimate_llc, "calibrate": calibrate}[entry](
                linear(), regression(), gaussian_nll, batch_size=16, num_chain=3
            )


def test_sampler_kwargs_reach_the_kernel():
    """RMSProp-SGLD with a huge delta has G = 1/(sqrt(V) + delta) ~ 1/delta: it is plain SGLD with step epsilon/delta."""
    common = dict(batch_size=16, seed=1, **FAST)
    plain = estimate_llc(linear(), regression(), gaussian_nll, epsilon=1e-4, **common)
    preconditioned = estimate_llc(
        linear(),
        regression(),
        gaussian_nll,
        epsilon=1e-4 * 1e8,
        sampler="rmsprop_sgld",
        sampler_kwargs={"delta": 1e8},
        **common,
    )
    default_delta = estimate_llc(
        linear(), regression(), gaussian_nll, epsilon=1e-4 * 1e8, sampler="rmsprop_sgld", **common
    )
    torch.testing.assert_close(preconditioned.loss_trace, plain.loss_trace, rtol=1e-4, atol=1e-5)
    assert default_delta.llc_mean > 1e3 * abs(plain.llc_mean)  # without the setting, that step is far too large
    with pytest.raises(ValueError, match="has no setting 'beta'"):
        estimate_llc(
            linear(), regression(), gaussian_nll, sampler="rmsprop_sgld", sampler_kwargs={"beta": 1.0}, **common
        )


class SquaredDistance:
    """|w - w*|² of each chain: how far the chains have wandered."""

    name = "distance"

    def __init__(self, anchor):
        self.anchor = anchor

    def observe(self, draw):
        return (draw.position["w"] - self.anchor).pow(2).sum(dim=1)


def test_extra_observables_are_recorded_at_every_draw():
    """On L = ½ h |w|² the chains' spread settles at d / (nβ h + γ) per chain (the discretization adds little here)."""
    model = Potential(3)
    data = TensorDataset(torch.zeros(8, 1))
    result = estimate_llc(
        model,
        data,
        lambda m, b: 0.5 * (m.w**2).sum(),
        batch_size=2,
        nbeta=100.0,
        gamma=10.0,
        epsilon=1e-3,
        seed=0,
        num_chains=16,
        num_draws=2000,
        num_burnin_steps=500,
        observables=[SquaredDistance(torch.zeros(3))],
    )
    distance = result.observations["distance"]
    assert distance.shape == (16, 2000)
    assert float(distance.mean()) == pytest.approx(3 / (100.0 + 10.0), rel=0.05)
    assert "loss" not in result.observations  # the LLC's own observable is the loss_trace


class ThreadCollective:
    """Collectives between threads, one per simulated rank, for testing the gather without processes."""

    root_device = torch.device("cpu")

    def __init__(self, world_size):
        self.barrier = threading.Barrier(world_size)
        self.slots = [None] * world_size
        self.rank = threading.local()

    def _exchange(self, value):
        self.barrier.wait()
        self.slots[self.rank.value] = value
        self.barrier.wait()
        everything = list(self.slots)
        self.barrier.wait()
        return everything

    def all_gather(self, tensor):
        return torch.stack(self._exchange(tensor))

    def broadcast(self, obj, src=0):
        return self._exchange(obj)[src]


def chain_run(rank, count, groups=2):
    """A run of ``count`` chains per group on ``rank``; per-chain values are [groups, chains, ...]."""
    return ChainRun(
        observations={
            "loss": torch.full((groups, count, 4), float(rank)) + torch.arange(groups).reshape(-1, 1, 1) * 100,
            "extra": torch.full((groups, count, 4, 2), 10.0 + rank),
        },
        failed_at=torch.full((groups, count), -1, dtype=torch.long),
        acceptance=torch.full((groups, count), 0.5 + rank / 10, dtype=torch.float64),
        groups=("all", "head")[:groups],
        init_loss=1.0 + rank,
        nbeta=50.0,
        epsilon=1e-4,
        num_samples=100,
        seed=7 + rank,
        vectorized=rank == 0,
    )


def run_ranks(runs, counts):
    collective = ThreadCollective(len(runs))
    results = [None] * len(runs)

    def work(rank):
        collective.rank.value = rank
        results[rank] = gather_run(collective, runs[rank], counts)

    threads = [threading.Thread(target=work, args=(rank,)) for rank in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_gather_combines_each_field_by_its_declared_rule():
    counts = [2, 1]
    results = run_ranks([chain_run(0, 2), chain_run(1, 1)], counts)
    for gathered in results:
        assert gathered.observations["loss"][:, :, 0].tolist() == [
            [0.0, 0.0, 1.0],
            [100.0, 100.0, 101.0],
        ]  # "cat", in rank order, per group
        assert gathered.observations["extra"].shape == (2, 3, 4, 2)
        assert gathered.acceptance[0].tolist() == pytest.approx([0.5, 0.5, 0.6])
        assert gathered.failed_at.dtype == torch.long
        assert (gathered.init_loss, gathered.seed) == (1.0, 7)  # "first": rank zero's, exactly
        assert gathered.vectorized is False  # "all": false if any rank fell back


def test_a_failed_rank_makes_every_rank_return_none_without_hanging():
    assert run_ranks([chain_run(0, 2), None], [2, 1]) == [None, None]
