"""The chain runner: SGLD chains from w*, vectorized over chains with ``torch.func``, observables read at each draw."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.utils._pytree import tree_map

from lightning_devinterp._rng import preserved_rng_states
from lightning_devinterp.sampling.config import SamplingConfig
from lightning_devinterp.sampling.data import MinibatchSource
from lightning_devinterp.sampling.kernels import Kernel, Params, make_kernel, mala_log_acceptance
from lightning_devinterp.sampling.model_view import FunctionalLoss, LossFn, quiet_evaluation
from lightning_devinterp.sampling.observables import Draw, MinibatchLoss, Observable
from lightning_devinterp.sampling.params import select_parameter_names

log = logging.getLogger(__name__)

ALL_DEAD_CHECK_EVERY = 32
"""Steps between checks (a device sync) for whether every chain has diverged, to stop early."""

ACCEPTANCE_EVERY = 20
"""Draw steps between MALA acceptance checks; each costs one extra forward and backward pass (about 5% in all)."""

_fallback_reasons_logged: set[str] = set()


def gathered(how: Literal["cat", "first", "all"]) -> Any:
    """Declare how a :class:`ChainRun` field combines across processes: ``"cat"`` concatenates per-chain values in
    rank order, ``"first"`` takes rank zero's (the same everywhere), ``"all"`` is true only if true on every rank."""
    return field(metadata={"gather": how})


@dataclass(frozen=True)
class ChainRun:
    """Raw output of :func:`run_chains`, per chain, before any summary; the unit that processes exchange.

    ``observations[name]`` is ``[num_chains, num_draws, ...]`` for each observable (``"loss"`` always present);
    ``failed_at`` is the first SGLD step at which a chain's loss was NaN/Inf, or -1; ``acceptance`` each chain's
    mean MALA acceptance probability.
    """

    observations: dict[str, Tensor] = gathered("cat")
    failed_at: Tensor = gathered("cat")
    acceptance: Tensor = gathered("cat")
    init_loss: float = gathered("first")
    nbeta: float = gathered("first")
    num_samples: int = gathered("first")
    seed: int = gathered("first")
    vectorized: bool = gathered("all")


def mean_init_loss(loss: FunctionalLoss, source: MinibatchSource, chunk_size: int) -> float:
    """L(w*): the sample-weighted mean of the minibatch mean losses over the data (no grad)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch, size in source.init_loss_batches(chunk_size):
            value = loss(loss.anchor, batch)
            if not isinstance(value, Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"loss_fn must return a scalar mean loss, got {shape}; reduce it with .mean().")
            total += float(value) * size
            count += size
    return total / count


ChainLosses = Callable[[Params, Any], Tensor]
"""Maps stacked parameters ``[num_chains, ...]`` and stacked batches to the chains' losses ``[num_chains]``."""


def _vectorized(loss: FunctionalLoss) -> ChainLosses:
    """All chains in one ``vmap``-ed forward pass."""
    return vmap(loss)


def _sequential(loss: FunctionalLoss, num_chains: int) -> ChainLosses:
    """Chain after chain; the fallback for models that ``vmap`` cannot batch."""

    def chain_losses(position: Params, batch: Any) -> Tensor:
        return torch.stack(
            [loss({name: w[chain] for name, w in position.items()}, tree_map(lambda t: t[chain], batch)) for chain in range(num_chains)]
        )

    return chain_losses


def _grads_and_losses(chain_losses: ChainLosses, position: Params, batch: Any) -> tuple[Params, Tensor]:
    """Each chain's minibatch gradient and loss, from one backward pass through the sum of the chains' losses.

    Chains share no parameters, so the gradient of the sum with respect to chain c's parameters is exactly the
    gradient of chain c's loss. A forward ``vmap`` plus one ordinary backward is ~25% cheaper than ``vmap(grad)``.
    """
    leaves = {name: w.detach().requires_grad_(True) for name, w in position.items()}
    with torch.enable_grad():
        values = chain_losses(leaves, batch)
        grads = torch.autograd.grad(values.sum(), list(leaves.values()), allow_unused=True)
    return {name: torch.zeros_like(w) if g is None else g for (name, w), g in zip(leaves.items(), grads)}, values.detach()


def _sample(
    loss: FunctionalLoss,
    kernel: Kernel,
    source: MinibatchSource,
    observables: Sequence[Observable],
    *,
    num_chains: int,
    config: SamplingConfig,
    seed: int,
    device: torch.device,
) -> tuple[dict[str, Tensor], Tensor, Tensor, bool]:
    """Run all chains from w*; return each observable's trace ``[num_chains, num_draws, ...]``, the first failing
    step of each chain (-1 if none), each chain's mean MALA acceptance probability ``[num_chains]`` (checked every
    :data:`ACCEPTANCE_EVERY` draw steps on the same minibatch), and whether vmap ran.

    Each step draws, in this order, the minibatch indices ``[num_chains, batch_size]`` from a CPU generator and one
    standard-normal tensor ``[num_chains, number of sampled weights]``, split across the sampled parameters, from a
    generator on ``device``, both seeded from ``seed``; so the vectorized and sequential paths see identical
    randomness, and so does a smaller model with the same sampled parameters.
    """
    index_generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator(device=device).manual_seed(seed)
    may_fall_back = config.vectorize == "auto"
    vectorized = config.vectorize in (True, "auto")
    chain_losses = _vectorized(loss) if vectorized else _sequential(loss, num_chains)
    anchor = loss.anchor
    position = {name: w.unsqueeze(0).repeat(num_chains, *([1] * w.dim())) for name, w in anchor.items()}
    stacked_anchor = {name: w.clone() for name, w in position.items()}
    state = kernel.init(position)
    sizes = [w[0].numel() for w in position.values()]
    burnin, every, num_steps = config.num_burnin_steps, config.num_steps_bw_draws, config.num_steps
    assert burnin is not None
    failed_at = torch.full((num_chains,), -1, dtype=torch.long, device=device)
    traces: dict[str, list[Tensor]] = {observable.name: [] for observable in observables}
    acceptances = []
    with torch.no_grad():
        for step in range(num_steps):
            batch = source.sample(index_generator, num_chains)
            flat_noise = torch.randn(num_chains, sum(sizes), generator=noise_generator, device=device)
            noise = {name: chunk.reshape(w.shape).to(w.dtype) for (name, w), chunk in zip(position.items(), flat_noise.split(sizes, dim=1))}
            try:
                grads, values = _grads_and_losses(chain_losses, position, batch)
            except Exception as error:
                if not (may_fall_back and vectorized and step == 0):
                    raise
                reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                if reason not in _fallback_reasons_logged:
                    _fallback_reasons_logged.add(reason)
                    log.warning("vmap cannot batch this model's loss, chains run one after another (slower): %s", reason)
                chain_losses, vectorized = _sequential(loss, num_chains), False
                grads, values = _grads_and_losses(chain_losses, position, batch)
            if values.dim() != 1:
                raise ValueError(f"loss_fn must return a scalar mean loss, got shape {tuple(values.shape[1:])}.")
            failed_at = torch.where((failed_at < 0) & ~torch.isfinite(values), step, failed_at)
            if step >= burnin and (step - burnin) % every == 0:
                draw = Draw((step - burnin) // every, step, position, values, batch, chain_losses)
                for observable in observables:
                    traces[observable.name].append(observable.observe(draw))
            proposal, state = kernel.step(position, state, grads, stacked_anchor, noise)
            if step >= burnin and (step - burnin) % ACCEPTANCE_EVERY == 0:
                proposal_grads, proposal_values = _grads_and_losses(chain_losses, proposal, batch)
                log_ratio = mala_log_acceptance(
                    kernel, position, proposal, values, proposal_values, grads, proposal_grads, stacked_anchor, kernel.preconditioner(state)
                )
                acceptances.append(log_ratio.clamp(max=0.0).exp())
            position = proposal
            if (step + 1) % ALL_DEAD_CHECK_EVERY == 0 and bool((failed_at >= 0).all()):
                break
    num_draws = config.num_draws
    assert num_draws is not None
    stacked = {}
    for name, values_per_draw in traces.items():
        trace = torch.stack(values_per_draw, dim=1) if values_per_draw else torch.empty(num_chains, 0, device=device)
        missing = num_draws - trace.shape[1]
        if missing:
            trace = torch.cat([trace, torch.full((num_chains, missing, *trace.shape[2:]), float("nan"), device=device, dtype=trace.dtype)], dim=1)
        stacked[name] = trace
    acceptance = torch.stack(acceptances).nanmean(dim=0) if acceptances else torch.full((num_chains,), float("nan"), device=device)
    return stacked, failed_at, acceptance, vectorized


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
) -> ChainRun:
    """Sample ``num_chains`` chains from the model's current parameters, leaving model and global RNGs as they were.

    ``config`` must be resolved (numeric epsilon and nbeta, chain shape filled in). ``forward_context`` wraps every
    loss evaluation (a Trainer's autocast, for instance). ``num_chains`` may differ from ``config.num_chains`` when
    chains are split across processes. The minibatch loss is always observed (as ``"loss"``), before ``observables``.
    """
    if not isinstance(config.epsilon, float) or config.nbeta is None:
        raise ValueError("run_chains needs a resolved config (numeric epsilon and nbeta); see SamplingConfig.resolved.")
    sampled_names = select_parameter_names(model, config.params)
    started = time.perf_counter()
    with preserved_rng_states(), quiet_evaluation(model), forward_context():
        loss = FunctionalLoss(model, loss_fn, sampled_names, source.device)
        init_loss = mean_init_loss(loss, source, chunk_size=source.batch_size * num_chains)
        kernel = make_kernel(config.sampler, epsilon=config.epsilon, nbeta=config.nbeta, gamma=config.gamma, **(config.sampler_kwargs or {}))
        traces, failed_at, acceptance, vectorized = _sample(
            loss, kernel, source, [MinibatchLoss(), *observables], num_chains=num_chains, config=config, seed=seed, device=source.device
        )
    log.debug(
        "%d chains x %d steps (%s) in %.2fs", num_chains, config.num_steps, "vmap" if vectorized else "sequential",
        time.perf_counter() - started,
    )
    return ChainRun(
        observations={name: trace.detach().double().cpu() for name, trace in traces.items()},
        failed_at=failed_at.cpu(),
        acceptance=acceptance.detach().double().cpu(),
        init_loss=init_loss,
        nbeta=float(config.nbeta),
        num_samples=source.num_samples,
        seed=seed,
        vectorized=vectorized,
    )
