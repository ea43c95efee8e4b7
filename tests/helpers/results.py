"""Hand-made estimates, for tests of what reads an LLCResult (the schedule, the tracker, the reports)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_devinterp import LLCResult


def an_estimate(llc_mean: float = 1.0, chains: int = 4, draws: int = 10, **fields: Any) -> LLCResult:
    """An estimate whose ``chains`` chains all read ``llc_mean``, with ``draws`` zero-loss draws each and a healthy
    acceptance; ``fields`` set any other field (or override these)."""
    return LLCResult(
        **{
            "llc_mean": llc_mean,
            "llc_std": 0.1,
            "llc_per_chain": torch.full((chains,), llc_mean),
            "loss_trace": torch.zeros(chains, draws),
            "acceptance": torch.full((chains,), 0.95),
            "init_loss": 0.0,
            "nbeta": 10.0,
            **fields,
        }
    )
