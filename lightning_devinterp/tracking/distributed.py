"""Split chains across the processes of a Lightning (or Fabric) strategy and gather their raw runs back.

Nothing here is specific to the LLC: :func:`gather_run` combines any :class:`ChainRun` field by the rule its
declaration names (``"cat"``, ``"first"``, ``"all"``), so a new field needs no change here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_devinterp.sampling.chains import ChainRun


class Collective(Protocol):
    """The collectives of a Lightning or Fabric strategy that the monitor uses."""

    root_device: torch.device

    def all_gather(self, tensor: Tensor) -> Tensor: ...

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...

    def reduce(self, tensor: Tensor, reduce_op: str = "mean") -> Tensor: ...


def chains_per_rank(num_chains: int, world_size: int) -> list[int]:
    """As even a split of the chains over the ranks as possible, lower ranks taking the remainder.

    Args:
        num_chains: the chains of one estimate (per group).
        world_size: the number of processes.
    """
    return [num_chains // world_size + (rank < num_chains % world_size) for rank in range(world_size)]


def derive_seed(seed: int, step: int, rank: int) -> int:
    """A distinct, reproducible seed for each (monitor seed, training step, rank): stable across resume.

    Args:
        seed: the monitor's seed.
        step: the training step of the estimate.
        rank: the process's rank.
    """
    return (((seed * 1_000_003) ^ (step * 7_919)) * 1_009 + rank) % (2**63 - 1)


def _gather_rows(strategy: Collective, rows: Tensor, counts: list[int]) -> Tensor:
    """Per-chain values ``[groups, chains, ...]`` of every rank, concatenated along the chain axis in rank order
    (padded to the same shape for the collective).
    """
    padded = torch.zeros((rows.shape[0], max(counts), *rows.shape[2:]), dtype=rows.dtype)
    padded[:, : rows.shape[1]] = rows
    gathered = strategy.all_gather(padded.to(strategy.root_device)).cpu()
    return torch.cat([gathered[rank, :, :count] for rank, count in enumerate(counts)], dim=1)


def _gather_value(strategy: Collective, value: Any) -> Tensor:
    return strategy.all_gather(torch.tensor(float(value), dtype=torch.float64, device=strategy.root_device)).cpu()


def gather_run(strategy: Collective, run: ChainRun | None, counts: list[int]) -> ChainRun | None:
    """Every rank's chains on every rank, each field combined as its declaration says; None everywhere if any rank
    failed. A rank whose sampling raised passes ``run=None`` and still joins the first collective, so that the
    others do not wait forever.

    Args:
        strategy: the collectives of the processes.
        run: this process's chains, or None if its sampling raised.
        counts: the chains of each rank, in rank order (:func:`chains_per_rank`).
    """
    succeeded = _gather_value(strategy, run is not None)
    if not bool((succeeded == 1.0).all()):
        return None
    assert run is not None
    combined: dict[str, Any] = {}
    for field in dataclasses.fields(ChainRun):
        value, how = getattr(run, field.name), field.metadata["gather"]
        if how == "cat":
            combined[field.name] = (
                {key: _gather_rows(strategy, rows, counts) for key, rows in value.items()}
                if isinstance(value, dict)
                else _gather_rows(strategy, value, counts)
            )
        elif how == "all":
            combined[field.name] = bool((_gather_value(strategy, value) == 1.0).all())
        elif how == "local":
            combined[field.name] = field.default
        else:
            combined[field.name] = strategy.broadcast(value, src=0)
    return ChainRun(**combined)
