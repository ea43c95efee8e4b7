"""Split chains across the processes of a Lightning strategy and gather their raw losses back."""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import Strategy

from lightning_devinterp.llc import ChainRun


def chains_per_rank(num_chains: int, world_size: int) -> list[int]:
    """As even a split of ``num_chains`` over ``world_size`` ranks as possible, lower ranks taking the remainder."""
    return [num_chains // world_size + (rank < num_chains % world_size) for rank in range(world_size)]


def derive_seed(seed: int, step: int, rank: int) -> int:
    """A distinct, reproducible seed for each (monitor seed, training step, rank): stable across resume."""
    return (((seed * 1_000_003) ^ (step * 7_919)) * 1_009 + rank) % (2**63 - 1)


def gather_runs(strategy: Strategy, run: ChainRun | None, counts: list[int], num_steps: int) -> ChainRun | None:
    """Every rank's chains, concatenated in rank order, on every rank; None everywhere if any rank failed.

    Each rank contributes a ``[max(counts), num_steps + 1]`` block (losses, then acceptance) padded with NaN, so that the collective has the
    same shape on all ranks; a rank whose sampling raised passes ``run=None`` and still joins the collective,
    which keeps the others from waiting forever.
    """
    width = max(counts)
    block = torch.full((width, num_steps + 1), float("nan"), dtype=torch.float64)
    header = torch.tensor([0.0 if run is None else 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    if run is not None:
        block[: run.step_losses.shape[0], :num_steps] = run.step_losses
        block[: run.step_losses.shape[0], num_steps] = run.acceptance
        header[1:] = torch.tensor([run.init_loss, run.nbeta, float(run.vectorized)], dtype=torch.float64)
    device = strategy.root_device
    blocks = strategy.all_gather(block.to(device)).cpu()
    headers = strategy.all_gather(header.to(device)).cpu()
    if not bool((headers[:, 0] == 1.0).all()):
        return None
    assert run is not None
    rows = torch.cat([blocks[rank, :count] for rank, count in enumerate(counts)])
    return ChainRun(
        step_losses=rows[:, :num_steps],
        acceptance=rows[:, num_steps],
        init_loss=float(headers[0, 1]),
        nbeta=float(headers[0, 2]),
        num_samples=run.num_samples,
        seed=run.seed,
        vectorized=bool((headers[:, 3] == 1.0).all()),
    )
