"""The chain runner: SGLD chains from w*, vectorized over chains with ``torch.func``, observables read at each draw."""

from __future__ import annotations

import dataclasses
import logging
import math
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
from lightning_devinterp.sampling.adaptation import INITIAL_EPSILON, MAX_SEARCH, SEARCH_FACTOR, DualAveraging
from lightning_devinterp.sampling.kernels import Params, make_kernel, mala_log_acceptance
from lightning_devinterp.sampling.model_view import FunctionalLoss, LossFn, quiet_evaluation
from lightning_devinterp.sampling.observables import Draw, MinibatchLoss, Observable
from lightning_devinterp.sampling.params import select_parameter_names

log = logging.getLogger(__name__)

ALL_DEAD_CHECK_EVERY = 32
"""Steps between checks (a device sync) for whether every chain has diverged, to stop early."""

MIN_ADAPTATION_STEPS = 5
"""Fewest adaptation steps (the first half of the burn-in) that ``epsilon="adaptive"`` accepts."""

ACCEPTANCE_EVERY = 20
"""Draw steps between MALA acceptance checks; each costs one extra forward and backward pass (about 5% in all)."""

_fallback_reasons_logged: set[str] = set()


class LossError(ValueError):
    """The user's loss cannot drive the chains, whatever the batching (so it is not a reason to fall back to a loop)."""


def gathered(how: Literal["cat", "first", "all", "local"], default: Any = dataclasses.MISSING) -> Any:
    """Declare how a :class:`ChainRun` field combines across processes: ``"cat"`` concatenates per-chain values in
    rank order, ``"first"`` takes rank zero's (the same everywhere), ``"all"`` is true only if true on every rank,
    ``"local"`` stays with the process that made it (the gathered run holds the default)."""
    return field(default=default, metadata={"gather": how})


@dataclass(frozen=True)
class ChainRun:
    """Raw output of :func:`run_chains`, per chain, before any summary; the unit that processes exchange.

    ``observations[name]`` is ``[num_chains, num_draws, ...]`` for each observable (``"loss"`` always present);
    ``failed_at`` is the first SGLD step at which a chain's loss was NaN/Inf, or -1; ``acceptance`` each chain's
    mean MALA acceptance probability; ``epsilon`` the step size of the draws (adapted, with ``epsilon="adaptive"``).
    ``final_offsets`` are the chains' last positions relative to w* (zero for diverged chains), on the sampling
    device, for warm-starting the next run; they are not exchanged between processes, nor is ``sampling_seconds``
    (the wall time of the SGLD steps alone, without L(w*)).
    """

    observations: dict[str, Tensor] = gathered("cat")
    failed_at: Tensor = gathered("cat")
    acceptance: Tensor = gathered("cat")
    init_loss: float = gathered("first")
    nbeta: float = gathered("first")
    epsilon: float = gathered("first")
    num_samples: int = gathered("first")
    seed: int = gathered("first")
    vectorized: bool = gathered("all")
    final_offsets: dict[str, Tensor] | None = gathered("local", default=None)
    sampling_seconds: float = gathered("local", default=0.0)


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
        if not values.requires_grad:
            raise LossError(
                "loss_fn returned a loss that does not depend on the sampled parameters: it was detached, computed under "
                "torch.no_grad() or torch.inference_mode(), or built from .item() values. Return the loss as a tensor "
                "computed from model(batch)."
            )
        grads = torch.autograd.grad(values.sum(), list(leaves.values()), allow_unused=True)
    return {name: torch.zeros_like(w) if g is None else g for (name, w), g in zip(leaves.items(), grads)}, values.detach()


class _Sampler:
    """The state of one set of chains while they run: positions, the kernel's carried state, generators, step size."""

    def __init__(
        self,
        loss: FunctionalLoss,
        source: MinibatchSource,
        config: SamplingConfig,
        *,
        num_chains: int,
        seed: int,
        device: torch.device,
        offsets: Params | None,
    ) -> None:
        self.loss, self.source, self.config, self.num_chains, self.device = loss, source, config, num_chains, device
        self.index_generator = torch.Generator().manual_seed(seed)
        self.noise_generator = torch.Generator(device=device).manual_seed(seed)
        self.may_fall_back = config.vectorize == "auto"
        self.vectorized = config.vectorize in (True, "auto")
        self.chain_losses = _vectorized(loss) if self.vectorized else _sequential(loss, num_chains)
        self.anchor = self._start()
        self.position = self.anchor if offsets is None else {name: w + offsets[name] for name, w in self.anchor.items()}
        epsilon = INITIAL_EPSILON if config.epsilon == "adaptive" else float(config.epsilon)
        assert config.nbeta is not None
        self.kernel = make_kernel(config.sampler, epsilon=epsilon, nbeta=config.nbeta, gamma=config.gamma, **(config.sampler_kwargs or {}))
        self.state = self.kernel.init(self.position)
        self.sizes = [w[0].numel() for w in self.position.values()]

    def _start(self) -> Params:
        return {name: w.unsqueeze(0).repeat(self.num_chains, *([1] * w.dim())) for name, w in self.loss.anchor.items()}

    def draw_inputs(self) -> tuple[Any, Params]:
        """This step's minibatches and standard-normal noise, in a fixed order from the private generators."""
        batch = self.source.sample(self.index_generator, self.num_chains)
        flat_noise = torch.randn(self.num_chains, sum(self.sizes), generator=self.noise_generator, device=self.device)
        noise = {name: chunk.reshape(w.shape).to(w.dtype) for (name, w), chunk in zip(self.position.items(), flat_noise.split(self.sizes, dim=1))}
        return batch, noise

    def gradients(self, position: Params, batch: Any, first: bool = False) -> tuple[Params, Tensor]:
        """Minibatch gradients and losses; on the first call with ``vectorize="auto"``, fall back to a loop if vmap fails."""
        try:
            grads, values = _grads_and_losses(self.chain_losses, position, batch)
        except LossError:
            raise
        except Exception as error:
            if not (first and self.may_fall_back and self.vectorized):
                raise
            self.chain_losses, self.vectorized = _sequential(self.loss, self.num_chains), False
            grads, values = _grads_and_losses(self.chain_losses, position, batch)
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if reason not in _fallback_reasons_logged:
                _fallback_reasons_logged.add(reason)
                log.warning("vmap cannot batch this model's loss, chains run one after another (slower): %s", reason)
        if values.dim() != 1:
            raise ValueError(f"loss_fn must return a scalar mean loss, got shape {tuple(values.shape[1:])}.")
        return grads, values

    def acceptance(self, proposal: Params, batch: Any, grads: Params, values: Tensor, state: Params) -> Tensor:
        """Each chain's MALA acceptance probability of the move from the current position to ``proposal``."""
        proposal_grads, proposal_values = self.gradients(proposal, batch)
        log_ratio = mala_log_acceptance(
            self.kernel, self.position, proposal, values, proposal_grads=proposal_grads, proposal_losses=proposal_values, grads=grads,
            anchor=self.anchor, preconditioner=self.kernel.preconditioner(state),
        )
        return log_ratio.clamp(max=0.0).exp()

    def with_epsilon(self, epsilon: float) -> None:
        self.kernel = dataclasses.replace(self.kernel, epsilon=epsilon)

    def initial_epsilon(self, batch: Any, noise: Params, grads: Params, values: Tensor) -> float:
        """A starting step for adaptation: scale by 4 until one step's mean acceptance from w* crosses one half."""

        def mean_acceptance() -> float:
            proposal, state = self.kernel.step(self.position, self.state, grads, self.anchor, noise)
            return float(self.acceptance(proposal, batch, grads, values, state).nan_to_num(0.0).mean())

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

    def metropolis(self, proposal: Params, state: Params, accepted: Tensor) -> tuple[Params, Params]:
        """Keep each chain's proposal with its acceptance probability, else stay (used only while adapting, so that
        the wild steps dual averaging tries early on cannot throw chains far from w*)."""
        keep = torch.rand(self.num_chains, generator=self.noise_generator, device=self.device) < accepted.nan_to_num(0.0)
        moved = {name: torch.where(_expand(keep, w), w, self.position[name]) for name, w in proposal.items()}
        return moved, {name: torch.where(_expand(keep, v), v, self.state[name]) for name, v in state.items()}

    def offsets(self) -> Params:
        """Each chain's position relative to w*, zero where it is not finite."""
        return {name: torch.nan_to_num(w - self.anchor[name], nan=0.0, posinf=0.0, neginf=0.0) for name, w in self.position.items()}

    def restart_non_finite(self) -> None:
        """Put chains whose position is no longer finite back at w* (allowed only while adapting, in burn-in)."""
        bad = ~torch.stack([torch.isfinite(w.reshape(self.num_chains, -1)).all(dim=1) for w in self.position.values()]).all(dim=0)
        if bool(bad.any()):
            fresh, fresh_state = self._start(), self.kernel.init(self.position)
            self.position = {name: torch.where(_expand(bad, w), fresh[name], w) for name, w in self.position.items()}
            self.state = {name: torch.where(_expand(bad, v), fresh_state[name], v) for name, v in self.state.items()}


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


def _sample(
    loss: FunctionalLoss,
    source: MinibatchSource,
    observables: Sequence[Observable],
    *,
    num_chains: int,
    config: SamplingConfig,
    seed: int,
    device: torch.device,
    average: Callable[[float], float],
    offsets: Params | None,
) -> tuple[dict[str, Tensor], Tensor, Tensor, bool, float, Params]:
    """Run all chains from w*; return each observable's trace ``[num_chains, num_draws, ...]``, the first failing
    step of each chain (-1 if none), each chain's mean MALA acceptance probability ``[num_chains]`` (checked every
    :data:`ACCEPTANCE_EVERY` draw steps on the same minibatch), whether vmap ran, the step size of the draws, and
    the chains' final offsets from w*. Chains start at w* plus ``offsets`` when given (a warm start).

    With ``epsilon="adaptive"`` the first half of the burn-in adapts the step size (acceptance checked every step,
    averaged over chains and, through ``average``, over processes). While adapting, proposals are Metropolis-
    corrected and chains that diverge restart at w*; the draws are plain SGLD at the adapted step.

    Each step draws, in this order, the minibatch indices ``[num_chains, batch_size]`` from a CPU generator and one
    standard-normal tensor ``[num_chains, number of sampled weights]``, split across the sampled parameters, from a
    generator on ``device``, both seeded from ``seed``; so the vectorized and sequential paths see identical
    randomness, and so does a smaller model with the same sampled parameters.
    """
    sampler = _Sampler(loss, source, config, num_chains=num_chains, seed=seed, device=device, offsets=offsets)
    burnin, every, num_steps, num_draws = config.num_burnin_steps, config.num_steps_bw_draws, config.num_steps, config.num_draws
    assert burnin is not None and num_draws is not None
    adapting_steps = burnin // 2 if config.epsilon == "adaptive" else 0
    if config.epsilon == "adaptive" and adapting_steps < MIN_ADAPTATION_STEPS:
        raise ValueError(
            f"epsilon='adaptive' adapts the step during the first half of the burn-in, which needs num_burnin_steps >= "
            f"{2 * MIN_ADAPTATION_STEPS}, got {burnin}; pass more burn-in steps or a numeric epsilon."
        )
    dual_averaging: DualAveraging | None = None
    failed_at = torch.full((num_chains,), -1, dtype=torch.long, device=device)
    traces: dict[str, list[Tensor]] = {observable.name: [] for observable in observables}
    acceptances = []
    with torch.no_grad():
        for step in range(num_steps):
            batch, noise = sampler.draw_inputs()
            grads, values = sampler.gradients(sampler.position, batch, first=step == 0)
            adapting = step < adapting_steps
            if adapting and dual_averaging is None:
                initial = average(sampler.initial_epsilon(batch, noise, grads, values))
                dual_averaging = DualAveraging(initial, config.target_acceptance)
                sampler.with_epsilon(initial)
            if not adapting:
                failed_at = torch.where((failed_at < 0) & ~torch.isfinite(values), step, failed_at)
            if step >= burnin and (step - burnin) % every == 0:
                draw = Draw((step - burnin) // every, step, sampler.position, values, batch, sampler.chain_losses)
                for observable in observables:
                    traces[observable.name].append(observable.observe(draw))
            proposal, state = sampler.kernel.step(sampler.position, sampler.state, grads, sampler.anchor, noise)
            if adapting or (step >= burnin and (step - burnin) % ACCEPTANCE_EVERY == 0):
                accepted = sampler.acceptance(proposal, batch, grads, values, state)
                if adapting:
                    assert dual_averaging is not None
                    dual_averaging.update(average(float(accepted.nan_to_num(0.0).mean())))
                    sampler.with_epsilon(dual_averaging.current if step + 1 < adapting_steps else dual_averaging.final)
                    proposal, state = sampler.metropolis(proposal, state, accepted)
                else:
                    acceptances.append(accepted)
            sampler.position, sampler.state = proposal, state
            if adapting:
                sampler.restart_non_finite()
            if (step + 1) % ALL_DEAD_CHECK_EVERY == 0 and bool((failed_at >= 0).all()):
                break
    stacked = {}
    for name, values_per_draw in traces.items():
        trace = torch.stack(values_per_draw, dim=1) if values_per_draw else torch.empty(num_chains, 0, device=device)
        missing = num_draws - trace.shape[1]
        if missing:
            trace = torch.cat([trace, torch.full((num_chains, missing, *trace.shape[2:]), float("nan"), device=device, dtype=trace.dtype)], dim=1)
        stacked[name] = trace
    acceptance = torch.stack(acceptances).nanmean(dim=0) if acceptances else torch.full((num_chains,), float("nan"), device=device)
    return stacked, failed_at, acceptance, sampler.vectorized, sampler.kernel.epsilon, sampler.offsets()


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
) -> ChainRun:
    """Sample ``num_chains`` chains from the model's current parameters, leaving model and global RNGs as they were.

    ``config`` must be resolved (numeric nbeta, a numeric or ``"adaptive"`` epsilon, chain shape filled in).
    ``forward_context`` wraps every loss evaluation (a Trainer's autocast, for instance). ``num_chains`` may differ
    from ``config.num_chains`` when chains are split across processes; ``average`` then takes the mean of a number
    over the processes (step-size adaptation uses it so that every process adapts alike). The minibatch loss is
    always observed (as ``"loss"``), before ``observables``. ``start_offsets`` (``[num_chains, ...]`` per sampled
    parameter, e.g. a previous run's ``final_offsets``) start the chains at w* plus these offsets instead of at w*.
    """
    if config.epsilon == "auto" or config.nbeta is None:
        raise ValueError("run_chains needs a resolved config (numeric nbeta, no epsilon='auto'); see SamplingConfig.resolved.")
    sampled_names = select_parameter_names(model, config.params)
    started = time.perf_counter()
    with preserved_rng_states(), quiet_evaluation(model), forward_context():
        loss = FunctionalLoss(model, loss_fn, sampled_names, source.device)
        init_loss = mean_init_loss(loss, source, chunk_size=source.batch_size * num_chains)
        if start_offsets is not None and (
            set(start_offsets) != set(loss.anchor)
            or any(start_offsets[name].shape != (num_chains, *w.shape) for name, w in loss.anchor.items())
        ):
            raise ValueError("start_offsets must hold [num_chains, ...] offsets for exactly the sampled parameters.")
        sampling_started = time.perf_counter()
        traces, failed_at, acceptance, vectorized, epsilon, offsets = _sample(
            loss, source, [MinibatchLoss(), *observables], num_chains=num_chains, config=config, seed=seed, device=source.device,
            average=average, offsets=start_offsets,
        )
        if source.device.type == "cuda":
            torch.cuda.synchronize(source.device)
        sampling_seconds = time.perf_counter() - sampling_started
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
        epsilon=epsilon,
        num_samples=source.num_samples,
        seed=seed,
        vectorized=vectorized,
        final_offsets=offsets,
        sampling_seconds=sampling_seconds,
    )
