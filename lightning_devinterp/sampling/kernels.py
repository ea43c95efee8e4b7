"""SGLD transition kernels: small elementwise functions, applied one parameter tensor at a time.

A position holds, per sampled parameter, a tensor with a leading chain dimension ``[num_chains, ...]``; the anchor
``w*`` has a leading dimension of one and broadcasts against it (it is shared, not copied per chain). A kernel keeps
no hidden state: whatever it carries between steps (RMSProp's running average) lives in a per-parameter ``state``
tensor that the runner owns, in the manner of BlackJAX's SG-MCMC kernels; the noise is passed in, so the
vectorized and sequential paths draw the same randomness. The update works in place on the position, one
parameter at a time, so that sampling holds the chains' parameters and gradients and only one parameter's
worth of temporaries (:mod:`~lightning_devinterp.sampling.chains`).

Convention (Lau et al. 2023, arXiv 2308.12108; derived in docs/mathematics.md)::

    w <- w - (epsilon/2) * (nbeta * grad L_B(w) + gamma * (w - w*)) + N(0, epsilon I)

where ``L_B`` is the mean loss over the chain's minibatch. A ``mask`` (0 or 1, broadcasting against the position)
freezes the entries where it is 0 at w*: the weight-restricted LLC of a group of parameters.
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

    epsilon: float
    nbeta: float
    gamma: float

    def init_state(self, w: Tensor) -> Tensor | None:
        """The carried state of one parameter at the start of a chain (None if the sampler carries none)."""

    def update_(
        self, w: Tensor, grad: Tensor, anchor: Tensor, noise: Tensor, state: Tensor | None, mask: Tensor | None
    ) -> None:
        """One transition of one parameter, in place on ``w`` (and ``state``), given its minibatch gradient and
        standard-normal noise; entries where ``mask`` is 0 do not move.
        """

    def preconditioner(self, state: Tensor | None) -> Tensor | None:
        """The elementwise preconditioner G of one parameter after the last step (None for the identity)."""

    def update_many_(
        self,
        ws: list[Tensor],
        grads: list[Tensor],
        anchors: list[Tensor],
        noises: list[Tensor],
        states: list[Tensor | None],
        masks: list[Tensor] | None,
    ) -> None:
        """:meth:`update_` for several parameters at once (fused where the sampler can)."""


def _update_each_(
    kernel: Kernel,
    ws: list[Tensor],
    grads: list[Tensor],
    anchors: list[Tensor],
    noises: list[Tensor],
    states: list[Tensor | None],
    masks: list[Tensor] | None,
) -> None:
    for index, w in enumerate(ws):
        kernel.update_(
            w, grads[index], anchors[index], noises[index], states[index], None if masks is None else masks[index]
        )


def _move_(w: Tensor, delta: Tensor, mask: Tensor | None) -> None:
    if mask is not None:
        delta.mul_(mask)
    w.add_(delta)


@dataclass(frozen=True)
class SGLD:
    """Plain localized SGLD with drift ``epsilon/2`` and noise variance ``epsilon``."""

    epsilon: float
    nbeta: float
    gamma: float

    def init_state(self, w: Tensor) -> Tensor | None:
        return None

    def update_(
        self, w: Tensor, grad: Tensor, anchor: Tensor, noise: Tensor, state: Tensor | None, mask: Tensor | None
    ) -> None:
        if mask is None:
            self.update_many_([w], [grad], [anchor], [noise], [state], None)
            return
        delta = grad.mul(-0.5 * self.epsilon * self.nbeta)
        delta.add_(w - anchor, alpha=-0.5 * self.epsilon * self.gamma)
        delta.add_(noise, alpha=math.sqrt(self.epsilon))
        _move_(w, delta, mask)

    def update_many_(
        self,
        ws: list[Tensor],
        grads: list[Tensor],
        anchors: list[Tensor],
        noises: list[Tensor],
        states: list[Tensor | None],
        masks: list[Tensor] | None,
    ) -> None:
        """The same update with fused multi-tensor ops: a handful of kernel launches per step, whatever the layers.
        Without masks it needs no temporaries: the pull toward w* is w <- (1 - c) w + c w*, c = epsilon gamma / 2.
        """
        if masks is not None:
            delta = torch._foreach_mul(grads, -0.5 * self.epsilon * self.nbeta)
            torch._foreach_add_(
                delta,
                torch._foreach_sub(ws, [a.expand_as(w) for a, w in zip(anchors, ws)]),
                alpha=-0.5 * self.epsilon * self.gamma,
            )
            torch._foreach_add_(delta, noises, alpha=math.sqrt(self.epsilon))
            torch._foreach_mul_(delta, [m.expand_as(w) for m, w in zip(masks, ws)])
            torch._foreach_add_(ws, delta)
            return
        pull = 0.5 * self.epsilon * self.gamma
        torch._foreach_mul_(ws, 1.0 - pull)
        torch._foreach_add_(ws, [a.expand_as(w) for a, w in zip(anchors, ws)], alpha=pull)
        torch._foreach_add_(ws, grads, alpha=-0.5 * self.epsilon * self.nbeta)
        torch._foreach_add_(ws, noises, alpha=math.sqrt(self.epsilon))

    def preconditioner(self, state: Tensor | None) -> Tensor | None:
        return None


@dataclass(frozen=True)
class RMSPropSGLD:
    """RMSProp-preconditioned localized SGLD (Hitchcock & Hoogland 2025, arXiv 2507.21449).

    Keeps ``V <- alpha V + (1 - alpha) g*g`` of the raw minibatch gradient ``g = grad L_B(w)`` and uses
    ``G = 1 / (sqrt(V) + delta)`` elementwise: the drift is multiplied by ``G`` and the noise standard deviation
    by ``sqrt(G)``. ``alpha=0.99`` and ``delta=0.1`` follow devinterp's defaults. ``V`` costs one more copy of the
    chains' parameters.
    """

    epsilon: float
    nbeta: float
    gamma: float
    alpha: float = 0.99
    delta: float = 0.1

    def init_state(self, w: Tensor) -> Tensor | None:
        return torch.zeros_like(w)

    def update_(
        self, w: Tensor, grad: Tensor, anchor: Tensor, noise: Tensor, state: Tensor | None, mask: Tensor | None
    ) -> None:
        assert state is not None
        state.mul_(self.alpha).addcmul_(grad, grad, value=1.0 - self.alpha)
        precondition = self.preconditioner(state)
        assert precondition is not None
        delta = grad.mul(self.nbeta).add_(w - anchor, alpha=self.gamma).mul_(precondition).mul_(-0.5 * self.epsilon)
        delta.addcmul_(precondition.mul_(self.epsilon).sqrt_(), noise)
        _move_(w, delta, mask)

    def preconditioner(self, state: Tensor | None) -> Tensor | None:
        assert state is not None
        return 1.0 / (state.sqrt() + self.delta)

    update_many_ = _update_each_


SAMPLERS = {"sgld": SGLD, "rmsprop_sgld": RMSPropSGLD}


def _per_chain_sum(tensor: Tensor, weight: Tensor | None = None) -> Tensor:
    """The sum over each chain's entries (those where ``weight`` is 1, with a mask)."""
    if weight is not None:
        tensor = tensor * weight
    return tensor.reshape(tensor.shape[0], -1).sum(dim=1)


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
    mask: Params | None = None,
) -> Tensor:
    """Metropolis-adjusted log acceptance ratio of an SGLD proposal, per chain (docs/mathematics.md).

    With the potential ``U = nbeta L + gamma/2 |w - w*|^2`` and the Gaussian proposal
    ``q(y | x) = N(y; x - (epsilon/2) G grad U(x), epsilon G)``::

        log alpha = U(w) - U(w') + log q(w | w') - log q(w' | w)

    ``losses``/``grads`` are the minibatch loss and gradient at ``position`` and the ``proposal_*`` ones at the
    proposal, on the same minibatch. A preconditioned proposal uses the same ``G`` in both directions (an
    approximation: RMSProp's ``G`` would change slightly at ``w'``). With a ``mask``, only the entries that move
    count (frozen ones have ``w = w' = w*``). Sums run one parameter at a time. Healthy chains accept around 0.9.

    Args:
        kernel: the sampler (its epsilon, nbeta and gamma).
        position: the chains' positions before the step, ``[chains, ...]`` per parameter.
        proposal: their positions after it.
        losses: the minibatch losses at ``position``, ``[chains]``.
        proposal_losses: the same minibatch's losses at ``proposal``.
        grads: the minibatch gradients at ``position``.
        proposal_grads: the same minibatch's gradients at ``proposal``.
        anchor: w*, ``[1, ...]`` per parameter.
        preconditioner: the elementwise preconditioner G per parameter (None: the identity).
        mask: per parameter, the entries that move (None: all).

    Returns:
        log alpha per chain.
    """
    epsilon, nbeta, gamma = kernel.epsilon, kernel.nbeta, kernel.gamma
    log_ratio = nbeta * (losses - proposal_losses)
    for name, x in position.items():
        y, a = proposal[name], anchor[name]
        scale = preconditioner[name] if preconditioner is not None else None
        weight = mask[name] if mask is not None else None
        log_ratio = log_ratio + 0.5 * gamma * (
            _per_chain_sum((x - a) ** 2, weight) - _per_chain_sum((y - a) ** 2, weight)
        )
        for to, start, start_grad, sign in ((x, y, proposal_grads[name], 1.0), (y, x, grads[name], -1.0)):
            mean = start - 0.5 * epsilon * (1.0 if scale is None else scale) * (
                nbeta * start_grad + gamma * (start - a)
            )
            squared = (to - mean) ** 2 / (2.0 * epsilon * (1.0 if scale is None else scale))
            log_ratio = log_ratio - sign * _per_chain_sum(squared, weight)
    return log_ratio


def sampler_options(sampler: str) -> set[str]:
    """The settings of a sampler beyond epsilon, nbeta and gamma (what ``sampler_kwargs`` may set).

    Args:
        sampler: a key of :data:`SAMPLERS`.
    """
    return {field.name for field in dataclasses.fields(SAMPLERS[sampler])} - {"epsilon", "nbeta", "gamma"}


def make_kernel(sampler: str, *, epsilon: float, nbeta: float, gamma: float, **options: float) -> Kernel:
    """The kernel registered under ``sampler``, with its settings.

    Args:
        sampler: a key of :data:`SAMPLERS`.
        epsilon: the step size.
        nbeta: n times the inverse temperature.
        gamma: the localization strength.
        **options: the sampler's own settings (:func:`sampler_options`).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}.")
    kernel: Kernel = SAMPLERS[sampler](epsilon=epsilon, nbeta=nbeta, gamma=gamma, **options)
    return kernel
