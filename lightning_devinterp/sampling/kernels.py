"""SGLD transition kernels: small pure functions over dicts of stacked parameters.

A position is a ``dict[str, Tensor]`` whose tensors carry a leading chain dimension ``[num_chains, ...]``; the
anchor ``w*`` has the same keys without that dimension and broadcasts against it. A kernel never mutates its
inputs and keeps no hidden state: whatever it carries between steps (RMSProp's running average) is returned
explicitly, in the manner of BlackJAX's SG-MCMC kernels.

Convention (``GUIDE.md`` section 1, Lau et al. 2023, arXiv 2308.12108)::

    w <- w - (epsilon/2) * (nbeta * grad L_B(w) + gamma * (w - w*)) + N(0, epsilon I)

where ``L_B`` is the mean loss over the chain's minibatch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

Params = dict[str, Tensor]


class Kernel(Protocol):
    """What the chain runner needs from a sampler."""

    def init(self, position: Params) -> Params:
        """The sampler's carried state at the start of a chain."""

    epsilon: float
    nbeta: float
    gamma: float

    def step(self, position: Params, state: Params, grads: Params, anchor: Params, noise: Params) -> tuple[Params, Params]:
        """One transition: the new position and carried state, given the minibatch gradients and standard-normal noise."""

    def preconditioner(self, state: Params) -> Params | None:
        """The elementwise preconditioner G of the last step (None for the identity)."""


@dataclass(frozen=True)
class SGLD:
    """Plain localized SGLD with drift ``epsilon/2`` and noise variance ``epsilon``."""

    epsilon: float
    nbeta: float
    gamma: float

    def init(self, position: Params) -> Params:
        return {}

    def step(self, position: Params, state: Params, grads: Params, anchor: Params, noise: Params) -> tuple[Params, Params]:
        names = list(position)
        w = [position[name] for name in names]
        drift = torch._foreach_mul([grads[name] for name in names], self.nbeta)
        torch._foreach_add_(drift, torch._foreach_sub(w, [anchor[name] for name in names]), alpha=self.gamma)
        new_w = torch._foreach_add(w, drift, alpha=-0.5 * self.epsilon)
        torch._foreach_add_(new_w, [noise[name] for name in names], alpha=math.sqrt(self.epsilon))
        return dict(zip(names, new_w)), state

    def preconditioner(self, state: Params) -> Params | None:
        return None


@dataclass(frozen=True)
class RMSPropSGLD:
    """RMSProp-preconditioned localized SGLD (Hitchcock & Hoogland 2025, arXiv 2507.21449).

    Keeps ``V <- alpha V + (1 - alpha) g*g`` of the raw minibatch gradient ``g = grad L_B(w)`` and uses
    ``G = 1 / (sqrt(V) + delta)`` elementwise: the drift is multiplied by ``G`` and the noise standard deviation
    by ``sqrt(G)``. ``alpha=0.99`` and ``delta=0.1`` follow devinterp's defaults.
    """

    epsilon: float
    nbeta: float
    gamma: float
    alpha: float = 0.99
    delta: float = 0.1

    def init(self, position: Params) -> Params:
        return {name: torch.zeros_like(w) for name, w in position.items()}

    def step(self, position: Params, state: Params, grads: Params, anchor: Params, noise: Params) -> tuple[Params, Params]:
        new_position, new_state = {}, {}
        for name, w in position.items():
            g = grads[name]
            square_avg = self.alpha * state[name] + (1.0 - self.alpha) * g * g
            precondition = 1.0 / (square_avg.sqrt() + self.delta)
            drift = self.nbeta * g + self.gamma * (w - anchor[name])
            new_position[name] = w - (0.5 * self.epsilon) * precondition * drift + (self.epsilon * precondition).sqrt() * noise[name]
            new_state[name] = square_avg
        return new_position, new_state

    def preconditioner(self, state: Params) -> Params | None:
        return {name: 1.0 / (square_avg.sqrt() + self.delta) for name, square_avg in state.items()}


SAMPLERS = {"sgld": SGLD, "rmsprop_sgld": RMSPropSGLD}


def _per_chain_sum(tensors: Params) -> Tensor:
    return sum(t.reshape(t.shape[0], -1).sum(dim=1) for t in tensors.values())  # type: ignore[return-value]


def mala_log_acceptance(
    kernel: Kernel,
    position: Params,
    proposal: Params,
    losses: Tensor,
    proposal_losses: Tensor,
    grads: Params,
    proposal_grads: Params,
    anchor: Params,
    preconditioner: Params | None = None,
) -> Tensor:
    """Metropolis-adjusted log acceptance ratio of an SGLD proposal, per chain (``GUIDE.md`` section 2).

    With the potential ``U = nbeta L + gamma/2 |w - w*|^2`` and the Gaussian proposal
    ``q(y | x) = N(y; x - (epsilon/2) G grad U(x), epsilon G)``::

        log alpha = U(w) - U(w') + log q(w | w') - log q(w' | w)

    ``losses``/``grads`` are the minibatch loss and gradient at ``position`` and the ``proposal_*`` ones at the
    proposal, on the same minibatch. A preconditioned proposal uses the same ``G`` in both directions (an
    approximation: RMSProp's ``G`` would change slightly at ``w'``). Healthy chains accept around 0.9 on average.
    """
    ones = {name: torch.ones_like(w[:1]) for name, w in position.items()}
    scale = preconditioner if preconditioner is not None else ones

    def potential(w: Params, loss: Tensor) -> Tensor:
        return kernel.nbeta * loss + 0.5 * kernel.gamma * _per_chain_sum({n: (x - anchor[n]) ** 2 for n, x in w.items()})

    def log_q(to: Params, start: Params, start_grads: Params) -> Tensor:
        squared = {
            n: (to[n] - (x - 0.5 * kernel.epsilon * scale[n] * (kernel.nbeta * start_grads[n] + kernel.gamma * (x - anchor[n])))) ** 2
            / (2.0 * kernel.epsilon * scale[n])
            for n, x in start.items()
        }
        return -_per_chain_sum(squared)

    return (
        potential(position, losses)
        - potential(proposal, proposal_losses)
        + log_q(position, proposal, proposal_grads)
        - log_q(proposal, position, grads)
    )


def sampler_options(sampler: str) -> set[str]:
    """The settings of ``sampler`` beyond epsilon, nbeta and gamma (what ``sampler_kwargs`` may set)."""
    return {field.name for field in dataclasses.fields(SAMPLERS[sampler])} - {"epsilon", "nbeta", "gamma"}


def make_kernel(sampler: str, *, epsilon: float, nbeta: float, gamma: float, **options: float) -> Kernel:
    """The kernel registered under ``sampler`` (one of :data:`SAMPLERS`), with its extra ``options``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}.")
    return SAMPLERS[sampler](epsilon=epsilon, nbeta=nbeta, gamma=gamma, **options)
