"""The chain runner: SGLD chains from w*, vectorized over chains with ``torch.func``, observables read at each draw.

Chains are *virtual*: with ``param_groups``, each named group gets ``num_chains`` chains of its own that move only
the group's parameters (the rest frozen at w*), beside the ``num_chains`` chains of the full model, and all of them
advance in one vectorized step. They are laid out group-major: chain ``g * num_chains + c`` is chain ``c`` of
group ``g`` (group 0 is the full model). Per-chain outputs are shaped ``[groups, chains, ...]``.

Memory: the chains' parameters and their gradients (2x chains x parameters, beyond activations); w* is shared;
noise and update temporaries exist for one parameter at a time (below :data:`FUSED_ELEMENTS` entries, for all at
once: a few MiB at most). An acceptance check every :data:`ACCEPTANCE_EVERY` draws looks at
:data:`ACCEPTANCE_CHAINS` chains per group, so it adds little. Adapting the step size checks every chain at every
step (its Metropolis correction applies to each), which needs more during that half of the burn-in. RMSProp's
running average adds one copy. ``chain_batch`` runs the chains in groups of that many, one group after another, to
bound all of it. docs/scale.md gives measured peaks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from lightning_devinterp._rng import preserved_rng_states
from lightning_devinterp.sampling.adaptation import (
    INITIAL_EPSILON,
    MAX_SEARCH,
    SEARCH_FACTOR,
    DualAveraging,
    gradient_noise_ceiling,
)
from lightning_devinterp.sampling.config import Epsilon, SamplingConfig
from lightning_devinterp.sampling.data import MinibatchSource, batch_length
from lightning_devinterp.sampling.kernels import SGLD, Kernel, Params, make_kernel, mala_log_acceptance
from lightning_devinterp.sampling.model_view import FunctionalLoss, LossFn, quiet_evaluation
from lightning_devinterp.sampling.observables import AnchorLoss, Draw, MinibatchLoss, Observable
from lightning_devinterp.sampling.params import resolve_groups, select_parameter_names

log = logging.getLogger(__name__)

ALL_DEAD_CHECK_EVERY = 32
"""Steps between checks (a device sync) for whether every chain has diverged, to stop early."""

MIN_ADAPTATION_STEPS = 5
"""Fewest adaptation steps (the first half of the burn-in) that ``epsilon="adaptive"`` accepts."""

FUSED_ELEMENTS = 1 << 22
"""Up to this many sampled entries (over all chains), a step draws its noise in one call and updates every parameter
with fused ops (fast for small models, 16 MiB of temporaries at most); beyond it, one parameter at a time (lean)."""

ACCEPTANCE_EVERY = 20
"""Draw steps between MALA acceptance checks; each costs one extra forward and backward pass."""

ACCEPTANCE_CHAINS = 4
"""A draw-time acceptance check looks at this many chains of each group (the first ones): acceptance is a mean, and
checking every chain would hold two more copies of all of them for the check."""

FULL_MODEL = "all"
"""The name of the full model's chains among the groups of a :class:`ChainRun`."""

_fallback_reasons_logged: set[str] = set()


class LossError(ValueError):
    """The user's loss cannot drive the chains, whatever the batching (so it is not a reason to fall back to a loop)."""


def gathered(how: Literal["cat", "first", "all", "local"], default: Any = dataclasses.MISSING) -> Any:
    """Declare a :class:`ChainRun` field and how it combines across processes.

    Args:
        how: ``"cat"`` concatenates per-chain values in rank order along the chain axis (axis 1, after the group
            axis), ``"first"`` takes rank zero's (the same everywhere), ``"all"`` is true only if true on every
            rank, ``"local"`` stays with the process that made it (the gathered run holds the default).
        default: the field's default value.
    """
    return field(default=default, metadata={"gather": how})


@dataclass(frozen=True)
class ChainRun:
    """Raw output of :func:`run_chains`, per chain, before any summary; the unit that processes exchange.

    Per-chain fields are shaped ``[groups, chains, ...]``, group 0 being the full model and the others
    ``groups[1:]`` in order. ``observations[name]`` is ``[groups, chains, num_draws, ...]`` for each observable
    (``"loss"`` always present); ``failed_at`` is the first SGLD step at which a chain's loss was NaN/Inf, or -1;
    ``acceptance`` each chain's mean MALA acceptance probability; ``epsilon`` the step size of the draws (adapted,
    with ``epsilon="adaptive"``). ``final_offsets`` are the chains' last positions relative to w* (zero for diverged
    chains), ``[virtual chains, ...]`` on the sampling device, for warm-starting the next run; they are not
    exchanged between processes, nor is ``sampling_seconds`` (the wall time of the SGLD steps alone).
    """

    observations: dict[str, Tensor] = gathered("cat")
    failed_at: Tensor = gathered("cat")
    acceptance: Tensor = gathered("cat")
    init_loss: float = gathered("first")
    nbeta: float = gathered("first")
    epsilon: float = gathered("first")
    num_samples: int = gathered("first")
    seed: int = gathered("first")
    groups: tuple[str, ...] = gathered("first", default=(FULL_MODEL,))
    vectorized: bool = gathered("all", default=True)
    final_offsets: dict[str, Tensor] | None = gathered("local", default=None)
    sampling_seconds: float = gathered("local", default=0.0)


def mean_init_loss(loss: FunctionalLoss, source: MinibatchSource, chunk_size: int) -> float:
    """L(w*): the sample-weighted mean of the minibatch mean losses over the data (no grad).

    Args:
        loss: the loss at any parameters; evaluated at its anchor, w*.
        source: the data (all of it, or a fixed subset for data too large to cache).
        chunk_size: samples per forward pass.

    Raises:
        ValueError: the loss is not a scalar, or is not finite (the message says whether the weights or the data are
            to blame).
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for batch, size in source.init_loss_batches(chunk_size):
            value = loss(loss.anchor, batch)
            if not isinstance(value, Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"loss_fn must return a scalar mean loss, got {shape}; reduce it with .mean().")
            total += float(value) * size
            count += size
    if not math.isfinite(total):
        broken = [name for name, w in {**loss.anchor, **loss.constants}.items() if not bool(torch.isfinite(w).all())]
        if broken:
            raise ValueError(
                f"the loss at w* is {total / count}: the model's weights hold NaN/Inf ({', '.join(broken[:5])}); "
                "training has diverged, so there is no minimum to measure."
            )
        raise ValueError(
            f"the loss at w* is {total / count} although the model's weights are finite: the data (or the loss function) "
            "produces NaN/Inf; check the dataset for NaN/Inf values."
        )
    return total / count


def loss_at_w_star(
    model: nn.Module,
    loss_fn: LossFn,
    source: MinibatchSource,
    chunk_size: int,
    forward_context: Callable[[], ContextManager[Any]] = nullcontext,
) -> float:
    """L(w*) alone, as an estimate computes it (:func:`mean_init_loss`) but without chains: forward passes over the
    data at the model's current weights, the model quiet (eval mode, hooks and logging off) and the global RNG states
    untouched, so that training goes on as if nothing had happened.

    Args:
        model: the model at w*.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss.
        source: the data (all of it, or a fixed subset for data too large to cache).
        chunk_size: samples per forward pass.
        forward_context: wraps the forward passes (a Trainer's autocast, for instance).

    Raises:
        ValueError: as :func:`mean_init_loss`.
    """
    with preserved_rng_states(), quiet_evaluation(model), forward_context():
        return mean_init_loss(FunctionalLoss(model, loss_fn, [], source.device), source, chunk_size)


def mean_init_gradient(loss: FunctionalLoss, source: MinibatchSource, chunk_size: int) -> Params:
    """∇L(w*): the gradient of the loss over the same data as :func:`mean_init_loss`, at w*.

    Args:
        loss: the loss at any parameters; differentiated at its anchor, w*.
        source: the data.
        chunk_size: samples per forward and backward pass.
    """
    leaves = {name: w.detach().requires_grad_(True) for name, w in loss.anchor.items()}
    total = {name: torch.zeros_like(w) for name, w in loss.anchor.items()}
    count = 0
    with torch.enable_grad():
        for batch, size in source.init_loss_batches(chunk_size):
            grads = torch.autograd.grad(loss(leaves, batch) * size, list(leaves.values()), allow_unused=True)
            for name, g in zip(leaves, grads):
                if g is not None:
                    total[name] += g.detach()
            count += size
    return {name: g / count for name, g in total.items()}


ChainLosses = Callable[[Params, Any], Tensor]
"""Maps stacked parameters ``[num_chains, ...]`` and stacked batches to the chains' losses ``[num_chains]``."""


def _vectorized(loss: FunctionalLoss, compile: bool) -> ChainLosses:
    """All chains in one ``vmap``-ed forward pass (compiled with ``torch.compile`` if asked)."""
    batched = vmap(loss)
    return torch.compile(batched, dynamic=False) if compile else batched


def _anchor_losses(loss: FunctionalLoss, vectorized: bool) -> Callable[[Any], Tensor]:
    """The loss at w* on each chain's batch, ``[num_chains]``, without gradients: one vmapped forward pass whose
    parameters are shared by the chains (so a linear layer is one matrix product over all their batches), or a loop.
    """
    shared = vmap(loss, in_dims=(None, 0))

    def anchor_losses(batch: Any) -> Tensor:
        with torch.no_grad():
            if vectorized:
                return shared(loss.anchor, batch)
            chains = batch_length(batch)
            return torch.stack([loss(loss.anchor, tree_map(operator.itemgetter(c), batch)) for c in range(chains)])

    return anchor_losses


def _sequential(loss: FunctionalLoss, num_chains: int) -> ChainLosses:
    """Chain after chain; the fallback for models that ``vmap`` cannot batch."""

    def chain_losses(position: Params, batch: Any) -> Tensor:
        return torch.stack(
            [
                loss({name: w[chain] for name, w in position.items()}, tree_map(operator.itemgetter(chain), batch))
                for chain in range(num_chains)
            ]
        )

    return chain_losses


@contextmanager
def attention_backends(vectorized: bool) -> Iterator[None]:
    """Attention that vmap can differentiate. Under vmap, ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
    in eval mode would take their fused fast path (vmap's batched tensors hide ``requires_grad`` from its check), which
    has no derivative, so the fast path is turned off; and ``scaled_dot_product_attention`` runs through its math
    backend, which is exact and batches: on CUDA the fused kernels it would otherwise pick have no batching rule for
    their backward (``LSE is not correctly aligned``), and on CPU its flash kernel has none at all, so vmap would
    fall back to a loop over the chains. Without vmap, nothing changes.

    Args:
        vectorized: whether the chains run under vmap.
    """
    if not vectorized:
        yield
        return
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _grads_and_losses(chain_losses: ChainLosses, position: Params, batch: Any) -> tuple[Params, Tensor]:
    """Each chain's minibatch gradient and loss, from one backward pass through the sum of the chains' losses.

    Chains share no parameters, so the gradient of the sum with respect to chain c's parameters is exactly the
    gradient of chain c's loss. A forward ``vmap`` plus one ordinary backward is cheaper than ``vmap(grad)``.
    """
    leaves = {name: w.detach().requires_grad_(True) for name, w in position.items()}
    with torch.enable_grad():
        values = chain_losses(leaves, batch)
        if not values.requires_grad:
            raise LossError(
                "loss_fn returned a loss that does not depend on the sampled parameters: it was detached, computed under "
                "torch.no_grad() or torch.inference_mode(), or built from .item() values. Return the loss as a tensor "
                "computed from model(batch)."
            )
        grads = torch.autograd.grad(values.sum(), list(leaves.values()), allow_unused=True)
    return {
        name: torch.zeros_like(w) if g is None else g for (name, w), g in zip(leaves.items(), grads)
    }, values.detach()


def _group_masks(
    members: dict[str, dict[str, Tensor | None]], anchor: Params, num_chains: int, device: torch.device
) -> Params | None:
    """Per sampled parameter, which entries each virtual chain moves, broadcastable against ``[virtual chains, ...]``:
    ``[V, 1, ..]`` where groups take whole parameters, ``[V, *shape]`` where one takes parts (None without groups).
    """
    if not members:
        return None
    masks = {}
    for name, w in anchor.items():
        whole = all(member.get(name, "absent") is None or name not in member for member in members.values())
        rows = [torch.ones((1,) * w.dim() if whole else w.shape, device=device)]
        for member in members.values():
            mask = member.get(name, "absent")
            if mask is None:
                rows.append(torch.ones_like(rows[0]))
            elif isinstance(mask, Tensor):
                rows.append(mask.to(device=device, dtype=rows[0].dtype).reshape(rows[0].shape))
            else:
                rows.append(torch.zeros_like(rows[0]))
        masks[name] = torch.stack(rows).repeat_interleave(num_chains, dim=0).to(w.dtype)
    return masks


class _Chains:
    """One set of virtual chains while they run: positions, the kernel and its per-parameter state, generators."""

    def __init__(
        self,
        loss: FunctionalLoss,
        source: MinibatchSource,
        config: SamplingConfig,
        *,
        num_chains: int,
        masks: Params | None,
        seed: int,
        device: torch.device,
        epsilon: float,
        offsets: Params | None,
    ) -> None:
        self.loss, self.source, self.config, self.device = loss, source, config, device
        self.num_chains = num_chains
        self.masks = masks
        self.index_generator = torch.Generator().manual_seed(seed)
        self.noise_generator = torch.Generator(device=device).manual_seed(seed)
        self.may_fall_back = config.vectorize == "auto"
        self.vectorized = config.vectorize in (True, "auto")
        self.chain_losses = _vectorized(loss, config.compile) if self.vectorized else _sequential(loss, num_chains)
        self.anchor_losses = _anchor_losses(loss, self.vectorized)
        self.anchor = {name: w.unsqueeze(0) for name, w in loss.anchor.items()}
        self.position = {name: a.repeat(num_chains, *([1] * (a.dim() - 1))) for name, a in self.anchor.items()}
        self.started_at_anchor = offsets is None
        if offsets is not None:
            for name, w in self.position.items():
                w.add_(offsets[name])
        assert config.nbeta is not None
        self.kernel: Kernel = make_kernel(
            config.sampler, epsilon=epsilon, nbeta=config.nbeta, gamma=config.gamma, **(config.sampler_kwargs or {})
        )
        self.state = {name: self.kernel.init_state(w) for name, w in self.position.items()}

    def batch(self) -> Any:
        """This step's minibatches, from the private index generator."""
        return self.source.sample(self.index_generator, self.num_chains)

    def gradients(self, batch: Any, first: bool = False) -> tuple[Params, Tensor]:
        """Minibatch gradients and losses at the current position; on the first call with ``vectorize="auto"``,
        fall back to a loop over chains if vmap fails (and the loop works).
        """
        try:
            grads, values = _grads_and_losses(self.chain_losses, self.position, batch)
        except LossError:
            raise
        except Exception as error:
            if not (first and self.may_fall_back and self.vectorized):
                raise
            self.chain_losses, self.vectorized = _sequential(self.loss, self.num_chains), False
            self.anchor_losses = _anchor_losses(self.loss, vectorized=False)
            grads, values = _grads_and_losses(self.chain_losses, self.position, batch)
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if reason not in _fallback_reasons_logged:
                _fallback_reasons_logged.add(reason)
                log.warning("vmap cannot batch this model's loss, chains run one after another (slower): %s", reason)
        if values.dim() != 1:
            raise ValueError(f"loss_fn must return a scalar mean loss, got shape {tuple(values.shape[1:])}.")
        return grads, values

    def step(self, grads: Params, noise_generator: torch.Generator | None = None) -> None:
        """Move every chain one step, in place. Small models: noise for all parameters in one draw (split in order),
        one fused update. Large ones: one parameter at a time, noise drawn per parameter in order.
        """
        generator = noise_generator or self.noise_generator
        names = list(self.position)
        masks = None if self.masks is None else [self.masks[n] for n in names]
        sizes = [self.position[n][0].numel() for n in names]
        if sum(sizes) * self.num_chains <= FUSED_ELEMENTS:
            flat = torch.randn(self.num_chains, sum(sizes), generator=generator, device=self.device)
            noises = [
                chunk.reshape(self.position[n].shape).to(self.position[n].dtype)
                for n, chunk in zip(names, flat.split(sizes, dim=1))
            ]
            self.kernel.update_many_(
                [self.position[n] for n in names],
                [grads[n] for n in names],
                [self.anchor[n] for n in names],
                noises,
                [self.state[n] for n in names],
                masks,
            )
            return
        for index, name in enumerate(names):
            w = self.position[name]
            noise = torch.randn(w.shape, generator=generator, device=self.device, dtype=w.dtype)
            self.kernel.update_(
                w, grads[name], self.anchor[name], noise, self.state[name], None if masks is None else masks[index]
            )

    def acceptance(
        self, before: Params, grads: Params, values: Tensor, batch: Any, rows: Tensor | None = None
    ) -> Tensor:
        """The MALA acceptance probability of each chain's move from ``before`` to its current position; with
        ``rows``, of those chains only (``before`` holding just their old positions), NaN for the others.
        """

        def pick(tensors: Params) -> Params:
            return tensors if rows is None else {name: t[rows] for name, t in tensors.items()}

        proposal = pick(self.position)
        chain_losses = self.chain_losses if rows is None or self.vectorized else _sequential(self.loss, len(rows))
        proposal_grads, proposal_values = _grads_and_losses(
            chain_losses, proposal, batch if rows is None else tree_map(lambda t: t[rows], batch)
        )
        preconditioner: Params = {}
        for name, state in pick({n: s for n, s in self.state.items() if s is not None}).items():
            scale = self.kernel.preconditioner(state)
            if scale is not None:
                preconditioner[name] = scale
        log_ratio = mala_log_acceptance(
            self.kernel,
            before,
            proposal,
            values if rows is None else values[rows],
            proposal_values,
            pick(grads),
            proposal_grads,
            self.anchor,
            preconditioner=preconditioner or None,
            mask=None
            if self.masks is None
            else {n: m if m.shape[0] == 1 else pick({n: m})[n] for n, m in self.masks.items()},
        )
        accepted = log_ratio.clamp(max=0.0).exp()
        if rows is None:
            return accepted
        return torch.full((self.num_chains,), float("nan"), device=self.device, dtype=accepted.dtype).index_copy_(
            0, rows, accepted
        )

    def snapshot(self, rows: Tensor | None = None) -> tuple[Params, Params]:
        """A copy of the position and carried state (of ``rows`` only, if given)."""

        def copy(t: Tensor) -> Tensor:
            return t.clone() if rows is None else t[rows]

        return {n: copy(w) for n, w in self.position.items()}, {
            n: copy(s) for n, s in self.state.items() if s is not None
        }

    def revert(self, keep: Tensor, before: Params, state_before: Params) -> None:
        """Put the chains where ``keep`` is False back where they were (a Metropolis rejection)."""
        for name, w in self.position.items():
            w.copy_(torch.where(_expand(keep, w), w, before[name]))
            state = self.state[name]
            if state is not None and name in state_before:
                state.copy_(torch.where(_expand(keep, w), state, state_before[name]))

    def with_epsilon(self, epsilon: float) -> None:
        self.kernel = dataclasses.replace(self.kernel, epsilon=epsilon)  # type: ignore[type-var]

    def restart_non_finite(self) -> None:
        """Put chains whose position is no longer finite back at w* (allowed only while adapting, in burn-in)."""
        bad = ~torch.stack([torch.isfinite(w.reshape(w.shape[0], -1)).all(dim=1) for w in self.position.values()]).all(
            dim=0
        )
        if bool(bad.any()):
            for name, w in self.position.items():
                w.copy_(torch.where(_expand(bad, w), self.anchor[name].expand_as(w), w))
                state = self.state[name]
                if state is not None:
                    state.masked_fill_(_expand(bad, state), 0.0)

    def offsets(self) -> Params:
        """Each chain's position relative to w*, zero where it is not finite."""
        return {
            name: torch.nan_to_num(w - self.anchor[name], nan=0.0, posinf=0.0, neginf=0.0)
            for name, w in self.position.items()
        }

    def gradient_noise_ceiling(self, grads: Params, rows: slice, average: Callable[[float], float]) -> float:
        """The step above which minibatch gradient noise heats plain SGLD's chains (see
        :func:`~lightning_devinterp.sampling.adaptation.gradient_noise_ceiling`), from the spread of the gradients of
        the chains in ``rows``, taken at w* on minibatches of their own, pooled over processes (every process takes
        part in ``average``, even with a single chain); unbounded for other kernels, for fewer than two chains in
        all, or when the chains did not start at w*.
        """
        if not isinstance(self.kernel, SGLD) or not self.started_at_anchor:
            return math.inf
        freedom = rows.stop - rows.start - 1
        spread = sum(float(g[rows].double().var(dim=0).sum()) for g in grads.values()) * freedom if freedom > 0 else 0.0
        pooled_freedom = average(float(max(freedom, 0)))
        if pooled_freedom <= 0:
            return math.inf
        variance = average(spread) / pooled_freedom
        dimension = sum(w[0].numel() for w in self.position.values())
        return gradient_noise_ceiling(variance, dimension, self.kernel.nbeta)

    def initial_epsilon(self, batch: Any, grads: Params, values: Tensor, adapting: slice) -> float:
        """A starting step for adaptation: scale by 4 until one step's mean acceptance (of the chains in
        ``adapting``) from w* crosses one half. Each trial draws its noise from a copy of the generator, so the
        chains' own stream is not disturbed.
        """

        def mean_acceptance() -> float:
            before, state_before = self.snapshot()
            trial = torch.Generator(device=self.device).set_state(self.noise_generator.get_state())
            self.step(grads, trial)
            accepted = self.acceptance(before, grads, values, batch)
            self.revert(torch.zeros_like(accepted, dtype=torch.bool), before, state_before)
            return float(accepted[adapting].nan_to_num(0.0).mean())

        epsilon = self.kernel.epsilon
        direction = 1.0 if mean_acceptance() > 0.5 else -1.0
        for _ in range(MAX_SEARCH):
            candidate = epsilon * SEARCH_FACTOR**direction
            self.with_epsilon(candidate)
            accepted = mean_acceptance() > 0.5
            if (direction > 0) != accepted:
                epsilon = candidate if direction < 0 else epsilon
                break
            epsilon = candidate
        self.with_epsilon(epsilon)
        return epsilon


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass
class _Traces:
    """What one set of chains produced."""

    observations: dict[str, Tensor]
    failed_at: Tensor
    acceptance: Tensor
    vectorized: bool
    epsilon: float
    offsets: Params


def _sample(
    chains: _Chains,
    observables: Sequence[Observable],
    *,
    config: SamplingConfig,
    average: Callable[[float], float],
    full_chains: int,
) -> _Traces:
    """Run one set of chains from their start; with ``epsilon="adaptive"`` the first half of the burn-in adapts the
    step size on the full model's chains (the first ``full_chains``), Metropolis-corrected, averaged over
    processes through ``average``; chains that diverge then restart at w*. The draws are plain SGLD.

    Each step draws, in this order, the minibatch indices ``[chains, batch_size]`` from a CPU generator and then the
    standard-normal noise from a generator on the device (all parameters in one draw below
    :data:`FUSED_ELEMENTS`, else parameter by parameter), both seeded from the chains' seed; so the vectorized and
    sequential paths see identical randomness, and so does a smaller model with the same sampled parameters.
    """
    burnin, every, num_steps, num_draws = (
        config.num_burnin_steps,
        config.num_steps_bw_draws,
        config.num_steps,
        config.num_draws,
    )
    assert burnin is not None and num_draws is not None
    adapting_steps = burnin // 2 if config.epsilon == "adaptive" else 0
    if config.epsilon == "adaptive" and adapting_steps < MIN_ADAPTATION_STEPS:
        raise ValueError(
            f"epsilon='adaptive' adapts the step during the first half of the burn-in, which needs num_burnin_steps >= "
            f"{2 * MIN_ADAPTATION_STEPS}, got {burnin}; pass more burn-in steps or a numeric epsilon."
        )
    full = slice(0, full_chains)
    device = chains.device
    groups = chains.num_chains // full_chains
    check_rows = (
        torch.tensor(
            [g * full_chains + c for g in range(groups) for c in range(min(full_chains, ACCEPTANCE_CHAINS))],
            device=device,
        )
        if full_chains > ACCEPTANCE_CHAINS
        else None
    )
    dual_averaging: DualAveraging | None = None
    failed_at = torch.full((chains.num_chains,), -1, dtype=torch.long, device=device)
    traces: dict[str, list[Tensor]] = {observable.name: [] for observable in observables}
    acceptances = []
    with torch.no_grad():
        for step in range(num_steps):
            batch = chains.batch()
            grads, values = chains.gradients(batch, first=step == 0)
            adapting = step < adapting_steps
            if adapting and dual_averaging is None:
                ceiling = chains.gradient_noise_ceiling(grads, full, average)
                initial = min(average(chains.initial_epsilon(batch, grads, values, full)), ceiling)
                dual_averaging = DualAveraging(initial, config.target_acceptance, ceiling=ceiling)
                chains.with_epsilon(initial)
            if not adapting:
                failed_at = torch.where((failed_at < 0) & ~torch.isfinite(values), step, failed_at)
            if step >= burnin and (step - burnin) % every == 0:
                draw = Draw(
                    (step - burnin) // every,
                    step,
                    chains.position,
                    values,
                    batch,
                    chains.chain_losses,
                    chains.anchor_losses,
                )
                for observable in observables:
                    traces[observable.name].append(observable.observe(draw))
            check = adapting or (step >= burnin and (step - burnin) % ACCEPTANCE_EVERY == 0)
            rows = None if adapting else check_rows
            before, state_before = chains.snapshot(rows) if check else ({}, {})
            chains.step(grads)
            if check:
                accepted = chains.acceptance(before, grads, values, batch, rows)
                if adapting:
                    assert dual_averaging is not None
                    dual_averaging.update(average(float(accepted[full].nan_to_num(0.0).mean())))
                    chains.with_epsilon(dual_averaging.current if step + 1 < adapting_steps else dual_averaging.final)
                    keep = torch.rand(
                        accepted.shape, generator=chains.noise_generator, device=device
                    ) < accepted.nan_to_num(0.0)
                    chains.revert(keep, before, state_before)
                    chains.restart_non_finite()
                else:
                    acceptances.append(accepted)
                del before, state_before
            if (step + 1) % ALL_DEAD_CHECK_EVERY == 0 and bool((failed_at >= 0).all()):
                break
    stacked = {}
    for name, values_per_draw in traces.items():
        trace = (
            torch.stack(values_per_draw, dim=1) if values_per_draw else torch.empty(chains.num_chains, 0, device=device)
        )
        missing = num_draws - trace.shape[1]
        if missing:
            trace = torch.cat(
                [
                    trace,
                    torch.full(
                        (chains.num_chains, missing, *trace.shape[2:]), float("nan"), device=device, dtype=trace.dtype
                    ),
                ],
                dim=1,
            )
        stacked[name] = trace
    acceptance = (
        torch.stack(acceptances).nanmean(dim=0)
        if acceptances
        else torch.full((chains.num_chains,), float("nan"), device=device)
    )
    return _Traces(stacked, failed_at, acceptance, chains.vectorized, chains.kernel.epsilon, chains.offsets())


def draw_losses(config: SamplingConfig) -> list[Observable]:
    """What every draw records for λ̂: its minibatch loss and, with ``config.paired``, the same batch's loss at w*.

    Args:
        config: the sampling settings.
    """
    return [MinibatchLoss(), AnchorLoss()] if config.paired else [MinibatchLoss()]


def run_chains(
    model: nn.Module,
    loss_fn: LossFn,
    source: MinibatchSource,
    config: SamplingConfig,
    *,
    num_chains: int,
    seed: int,
    observables: Sequence[Observable] = (),
    forward_context: Callable[[], ContextManager[Any]] = nullcontext,
    average: Callable[[float], float] = float,
    start_offsets: Params | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> ChainRun:
    """Sample chains from the model's current parameters w*, leaving the model and the global RNGs as they were.

    The minibatch loss is always observed (as ``"loss"``) and, with ``config.paired``, the loss at w* on the same
    batch (as ``"anchor_loss"``), before ``observables``. With ``config.chain_batch``, the
    chains run ``chain_batch`` (per group) at a time; each batch draws from generators seeded from ``seed`` and its
    index (the first batch from ``seed`` itself), and with ``epsilon="adaptive"`` only the first batch adapts: the
    others use its step.

    Args:
        model: the model at w*.
        loss_fn: ``loss_fn(model, batch) -> scalar`` mean loss.
        source: the minibatches.
        config: resolved settings (numeric nbeta, a numeric or ``"adaptive"`` epsilon, the chain shape filled in).
        num_chains: chains of this process, per group; may differ from ``config.num_chains`` when chains are split
            across processes.
        seed: seeds the chains' private generators.
        observables: extra draw-time observables.
        forward_context: wraps every loss evaluation (a Trainer's autocast, for instance).
        average: the mean of a number over the processes (step-size adaptation uses it so that every process
            adapts alike); the identity for one process.
        start_offsets: per sampled parameter, ``[virtual chains, ...]`` offsets from w* to start the chains at (a
            previous run's ``final_offsets``, say).
        clock: the wall clock for ``sampling_seconds``.

    Raises:
        ValueError: an unresolved config, or offsets of the wrong shape.
    """
    if config.epsilon == "auto" or config.nbeta is None:
        raise ValueError(
            "run_chains needs a resolved config (numeric nbeta, no epsilon='auto'); see SamplingConfig.resolved."
        )
    sampled_names = select_parameter_names(model, config.params)
    members = resolve_groups(model, sampled_names, config.param_groups) if config.param_groups else {}
    groups = (FULL_MODEL, *members)
    started = clock()
    with preserved_rng_states(), quiet_evaluation(model), forward_context():
        loss = FunctionalLoss(model, loss_fn, sampled_names, source.device)
        init_loss = mean_init_loss(loss, source, chunk_size=source.batch_size * num_chains)
        if config.tilted:
            loss.tilt = mean_init_gradient(loss, source, chunk_size=source.batch_size * num_chains)
        total = len(groups) * num_chains
        if start_offsets is not None and (
            set(start_offsets) != set(loss.anchor)
            or any(start_offsets[name].shape != (total, *w.shape) for name, w in loss.anchor.items())
        ):
            raise ValueError(f"start_offsets must hold [{total}, ...] offsets for exactly the sampled parameters.")
        sampling_started = clock()
        size = min(config.chain_batch or num_chains, num_chains)
        pieces: list[_Traces] = []
        epsilon: Epsilon = config.epsilon
        for index, first in enumerate(range(0, num_chains, size)):
            count = min(size, num_chains - first)
            chosen = torch.tensor([g * num_chains + c for g in range(len(groups)) for c in range(first, first + count)])
            offsets = (
                None if start_offsets is None else {name: o[chosen.to(o.device)] for name, o in start_offsets.items()}
            )
            piece_config = dataclasses.replace(config, epsilon=epsilon)
            chains = _Chains(
                loss,
                source,
                piece_config,
                num_chains=len(groups) * count,
                masks=_group_masks(members, loss.anchor, count, source.device),
                seed=seed if index == 0 else (seed + 1_000_003 * index) % (2**63 - 1),
                device=source.device,
                epsilon=INITIAL_EPSILON if epsilon == "adaptive" else float(epsilon),
                offsets=offsets,
            )
            with attention_backends(chains.vectorized):
                pieces.append(
                    _sample(
                        chains,
                        [*draw_losses(config), *observables],
                        config=piece_config,
                        average=average,
                        full_chains=count,
                    )
                )
            epsilon = pieces[0].epsilon
            del chains
        if source.device.type == "cuda":
            torch.cuda.synchronize(source.device)
        sampling_seconds = clock() - sampling_started
    vectorized = all(piece.vectorized for piece in pieces)
    log.debug(
        "%d x %d chains x %d steps (%s) in %.2fs",
        len(groups),
        num_chains,
        config.num_steps,
        "vmap" if vectorized else "sequential",
        clock() - started,
    )

    def grouped(tensors: list[Tensor]) -> Tensor:
        """Pieces' ``[groups * count, ...]`` rows as ``[groups, chains, ...]``."""
        return torch.cat([t.reshape(len(groups), -1, *t.shape[1:]) for t in tensors], dim=1)

    return ChainRun(
        observations={
            name: grouped([p.observations[name] for p in pieces]).detach().double().cpu()
            for name in pieces[0].observations
        },
        failed_at=grouped([p.failed_at for p in pieces]).cpu(),
        acceptance=grouped([p.acceptance for p in pieces]).detach().double().cpu(),
        init_loss=init_loss,
        nbeta=float(config.nbeta),
        epsilon=float(pieces[0].epsilon),
        num_samples=source.num_samples,
        seed=seed,
        groups=groups,
        vectorized=vectorized,
        final_offsets={
            name: grouped([p.offsets[name] for p in pieces]).reshape(-1, *pieces[0].offsets[name].shape[1:])
            for name in pieces[0].offsets
        },
        sampling_seconds=sampling_seconds,
    )
