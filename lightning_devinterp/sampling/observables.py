"""What the chains measure at each draw: a small protocol, of which the LLC's minibatch loss is one instance.

The chain runner hands every observable a :class:`Draw` after each draw step and stacks what it returns into a
``[num_chains, num_draws, ...]`` trace (``ChainRun.observations[name]``, ``LLCResult.observations[name]``). A new
draw-time quantity (a loss on a probe set, a weight norm, a susceptibility) is one class with a ``name`` and an
``observe`` method, passed as ``estimate_llc(..., observables=[...])``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from lightning_devinterp.sampling.kernels import Params


@dataclass(frozen=True)
class Draw:
    """What the runner knows at one draw.

    ``position`` holds the chains' sampled parameters ``[num_chains, ...]``; ``losses`` their minibatch losses
    ``[num_chains]`` on ``batch`` (leaves ``[num_chains, batch_size, ...]``); ``chain_losses(position, batch)``
    evaluates the model for every chain at any parameters and batch (no grad unless enabled by the caller), and
    ``anchor_losses(batch)`` the loss at w* on each chain's batch (no grad).
    """

    index: int
    step: int
    position: Params
    losses: Tensor
    batch: Any
    chain_losses: Callable[[Params, Any], Tensor]
    anchor_losses: Callable[[Any], Tensor]


class Observable(Protocol):
    """A quantity recorded for every chain at every draw."""

    name: str

    def observe(self, draw: Draw) -> Tensor:
        """The value for each chain at this draw, shaped ``[num_chains, ...]``."""


class MinibatchLoss:
    """The chains' minibatch loss at each draw, L_B(w_t): the LLC's observable."""

    name = "loss"

    def observe(self, draw: Draw) -> Tensor:
        return draw.losses


class AnchorLoss:
    """The loss at w* on the same minibatch as each draw, L_B(w*): with it, each draw is scored as the paired
    difference L_B(w_t) − L_B(w*), whose expectation is that of L_B(w_t) − L(w*) but whose minibatch noise cancels
    (a control variate; docs/mathematics.md).
    """

    name = "anchor_loss"

    def observe(self, draw: Draw) -> Tensor:
        return draw.anchor_losses(draw.batch)
