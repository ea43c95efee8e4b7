"""The local learning coefficient estimator: SGLD chains around w*, vectorized over chains with ``torch.func``."""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset

from lightning_devinterp._rng import preserved_rng_states
from lightning_devinterp.data import MinibatchSource
from lightning_devinterp.functional import FunctionalLoss, LossFn, quiet_evaluation, resolve_loss_fn
from lightning_devinterp.health import diagnose, first_failures
from lightning_devinterp.kernels import SAMPLERS, Kernel, Params, make_kernel, mala_log_acceptance
from lightning_devinterp.params import ParamSelector, select_parameter_names

log = logging.getLogger(__name__)

_ALL_DEAD_CHECK_EVERY = 32
"""Steps between checks (a device sync) for whether every chain has diverged, to stop early."""

ACCEPTANCE_EVERY = 20
"""Draw steps between MALA acceptance checks; each costs one extra forward and backward pass (about 5% in all)."""

_fallback_reasons_logged: set[str] = set()


class LLCEstimationError(RuntimeError):
    """No estimate could be made: every chain diverged, or (in the monitor) there was no data or another rank failed."""


@dataclass(frozen=True)
class LLCResult:
    """One LLC estimate: ``llc = nbeta * (mean of the draws - L(w*))`` per chain, then mean and std over chains.

    Chains that diverged are excluded from ``llc_mean``/``llc_std`` and hold NaN in ``llc_per_chain`` and
    ``acceptance``; ``loss_trace`` holds NaN from the draw where they failed. ``llc_std`` is NaN with fewer than two
    chains left. ``acceptance`` is each chain's mean MALA acceptance probability of its SGLD proposals.
    ``calibration`` is the :class:`~lightning_devinterp.CalibrationResult` behind ``epsilon="auto"``, else None.
    """

    llc_mean: float
    llc_std: float
    llc_per_chain: Tensor
    loss_trace: Tensor
    acceptance: Tensor
    init_loss: float
    nbeta: float
    warnings: list[str] = field(default_factory=list)
    failed_chains: tuple[int, ...] = ()
    epsilon: float = 0.0
    gamma: float = 0.0
    sampler: str = "sgld"
    num_samples: int = 0
    seed: int = 0
    vectorized: bool = True
    calibration: Any = None

    @property
    def acceptance_mean(self) -> float:
        """Mean MALA acceptance probability of the surviving chains' proposals; healthy chains sit near 0.9."""
        return float(self.acceptance.nanmean())

    @property
    def num_chains_used(self) -> int:
        """Chains that did not diverge: those behind ``llc_mean`` and ``llc_std``."""
        return self.llc_per_chain.numel() - len(self.failed_chains)

    @property
    def healthy(self) -> bool:
        """True when no diagnostic found a reason to distrust the estimate (see ``warnings``)."""
        return not self.warnings


def default_nbeta(num_samples: int) -> float:
    """``n / log(n)``, i.e. ``n * beta`` at the theory default inverse temperature ``beta = 1 / log(n)``."""
    if num_samples < 2:
        raise ValueError(f"the default nbeta = n / log(n) needs at least 2 samples, got n = {num_samples}; pass nbeta.")
    return num_samples / math.log(num_samples)


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}.")


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample one estimate; validated on construction, shared by :func:`estimate_llc` and the callbacks."""

    num_chains: int = 4
    num_draws: int = 200
    num_burnin_steps: int = 100
    num_steps_bw_draws: int = 1
    epsilon: float | Literal["auto"] = 1e-4
    gamma: float = 100.0
    nbeta: float | None = None
    batch_size: int | None = None
    params: ParamSelector = None
    sampler: str = "sgld"
    vectorize: bool | Literal["auto"] = "auto"

    def __post_init__(self) -> None:
        _check_count("num_chains", self.num_chains, 1)
        _check_count("num_draws", self.num_draws, 1)
        _check_count("num_burnin_steps", self.num_burnin_steps, 0)
        _check_count("num_steps_bw_draws", self.num_steps_bw_draws, 1)
        if self.epsilon != "auto":
            _check_positive("epsilon", self.epsilon)
        _check_positive("gamma", self.gamma, allow_zero=True)
        if self.nbeta is not None:
            _check_positive("nbeta", self.nbeta)
        if self.batch_size is not None:
            _check_count("batch_size", self.batch_size, 1)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}.")
        if self.vectorize not in (True, False, "auto"):
            raise ValueError(f"vectorize must be True, False or 'auto', got {self.vectorize!r}.")

    @property
    def num_steps(self) -> int:
        """SGLD steps per chain: burn-in plus the steps that produce the draws."""
        return self.num_burnin_steps + self.num_draws * self.num_steps_bw_draws


def _mean_init_loss(loss: FunctionalLoss, source: MinibatchSource, chunk_size: int) -> float:
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


def _run_chains(
    loss: FunctionalLoss,
    kernel: Kernel,
    source: MinibatchSource,
    *,
    num_chains: int,
    num_steps: int,
    num_burnin_steps: int,
    seed: int,
    device: torch.device,
    vectorize: bool | Literal["auto"],
) -> tuple[Tensor, Tensor, bool]:
    """Run all chains from w*; return the minibatch loss at every step ``[num_chains, num_steps]``, each chain's mean
    MALA acceptance probability ``[num_chains]`` (checked every :data:`ACCEPTANCE_EVERY` draw steps on the same
    minibatch), and whether vmap ran.

    Each step draws, in this order, the minibatch indices ``[num_chains, batch_size]`` from a CPU generator and one
    standard-normal tensor ``[num_chains, number of sampled weights]``, split across the sampled parameters, from a
    generator on ``device``, both seeded from ``seed``; so the vectorized and sequential paths see identical
    randomness, and so does a smaller model with the same sampled parameters.
    """
    index_generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator(device=device).manual_seed(seed)
    may_fall_back = vectorize == "auto"
    vectorized = vectorize in (True, "auto")
    chain_losses = _vectorized(loss) if vectorized else _sequential(loss, num_chains)
    anchor = loss.anchor
    position = {name: w.unsqueeze(0).repeat(num_chains, *([1] * w.dim())) for name, w in anchor.items()}
    stacked_anchor = {name: w.clone() for name, w in position.items()}
    state = kernel.init(position)
    sizes = [w[0].numel() for w in position.values()]
    step_losses = torch.empty(num_chains, num_steps, device=device)
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
            step_losses[:, step] = values
            proposal, state = kernel.step(position, state, grads, stacked_anchor, noise)
            if step >= num_burnin_steps and (step - num_burnin_steps) % ACCEPTANCE_EVERY == 0:
                proposal_grads, proposal_values = _grads_and_losses(chain_losses, proposal, batch)
                log_ratio = mala_log_acceptance(
                    kernel, position, proposal, values, proposal_values, grads, proposal_grads, stacked_anchor, kernel.preconditioner(state)
                )
                acceptances.append(log_ratio.clamp(max=0.0).exp())
            position = proposal
            if (step + 1) % _ALL_DEAD_CHECK_EVERY == 0 and not bool(torch.isfinite(step_losses[:, : step + 1]).all(dim=1).any()):
                step_losses[:, step + 1 :] = float("nan")
                break
    acceptance = torch.stack(acceptances).nanmean(dim=0) if acceptances else torch.full((num_chains,), float("nan"), device=device)
    return step_losses, acceptance, vectorized


def prepare_estimate(
    model: nn.Module,
    data: DataLoader | Dataset,
    loss_fn: LossFn | None,
    config: SamplingConfig,
    *,
    seed: int | None,
    device: str | torch.device | None,
) -> tuple[LossFn, MinibatchSource, int]:
    """Check the model, resolve the loss and the seed, and read the data: what every public entry point needs first."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    loss_fn = resolve_loss_fn(model, loss_fn)
    select_parameter_names(model, config.params)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with preserved_rng_states():
        source = MinibatchSource(data, config.batch_size, device)
    return loss_fn, source, secrets.randbits(63) if seed is None else int(seed)


def estimate_llc(
    model: nn.Module,
    data: DataLoader | Dataset,
    loss_fn: LossFn | None = None,
    *,
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin_steps: int = 100,
    num_steps_bw_draws: int = 1,
    epsilon: float | Literal["auto"] = 1e-4,
    gamma: float = 100.0,
    nbeta: float | None = None,
    batch_size: int | None = None,
    params: ParamSelector = None,
    sampler: str = "sgld",
    seed: int | None = None,
    device: str | torch.device | None = None,
    vectorize: bool | Literal["auto"] = "auto",
) -> LLCResult:
    """Estimate the local learning coefficient of ``model`` at its current parameters w* (Lau et al. 2023).

    ``llc = nbeta * (E[L_B(w)] - L(w*))``, where the expectation runs over SGLD chains that start at w* and
    sample the localized tempered posterior ``exp(-nbeta L(w) - gamma/2 |w - w*|^2)``; the update convention is
    that of :mod:`lightning_devinterp.kernels`. Draws are the minibatch losses after ``num_burnin_steps`` steps,
    every ``num_steps_bw_draws`` steps. L(w*) is the mean loss over the whole dataset (see
    :class:`~lightning_devinterp.data.MinibatchSource` for very large data). Both are computed in eval mode.

    Args:
        model: the model at w*; a LightningModule or any ``nn.Module``. It is never modified: parameters, buffers,
            ``.grad``, ``requires_grad``, train/eval mode and hooks are as before, and so are the global RNG states.
        data: a DataLoader (its dataset, batch size and collate_fn are used, its iterator is not) or a map-style
            Dataset (then ``batch_size`` is required).
        loss_fn: ``loss_fn(model, batch) -> scalar mean loss``. For a LightningModule the default is the loss its
            ``training_step(batch, 0)`` returns, with ``self.log`` silenced. The loss must be a mean negative
            log-likelihood: for Gaussian regression with unit noise use ``0.5 * ((y - f) ** 2).sum(-1).mean()``,
            not ``mse_loss`` (which also averages over output dimensions and so rescales nbeta).
        num_chains, num_draws, num_burnin_steps, num_steps_bw_draws: chain shape.
        epsilon: SGLD step size, or ``"auto"``: :func:`~lightning_devinterp.calibrate` with these settings picks it
            (the result is the estimate at the chosen epsilon, with the calibration in ``result.calibration``).
        gamma: localization strength.
        nbeta: ``n * beta``; default ``n / log(n)`` with n the number of samples in the dataset.
        batch_size: SGLD minibatch size; defaults to the DataLoader's.
        params: sample only these parameters (names, module prefixes or glob patterns), freezing the rest at w*
            (the weight-restricted LLC). Default: every parameter with ``requires_grad=True``.
        sampler: ``"sgld"`` or ``"rmsprop_sgld"`` (RMSProp-preconditioned).
        seed: seeds the estimator's private generators; the same seed gives the same result bit for bit on CPU.
            ``None`` draws a fresh seed (recorded in ``result.seed``).
        device: where chains run; defaults to the device of the model's first parameter.
        vectorize: ``True`` advances all chains in one ``vmap``-ed step; ``False`` loops over chains; ``"auto"``
            tries vmap and falls back to the loop (logging why, once) when the model cannot be batched.

    Raises:
        LLCEstimationError: every chain diverged.
        ValueError, TypeError: bad arguments, empty data, a non-scalar loss, a ``params`` entry that matches nothing,
            a model without trainable parameters.
    """
    config = SamplingConfig(
        num_chains=num_chains,
        num_draws=num_draws,
        num_burnin_steps=num_burnin_steps,
        num_steps_bw_draws=num_steps_bw_draws,
        epsilon=epsilon,
        gamma=gamma,
        nbeta=nbeta,
        batch_size=batch_size,
        params=params,
        sampler=sampler,
        vectorize=vectorize,
    )
    loss_fn, source, seed = prepare_estimate(model, data, loss_fn, config, seed=seed, device=device)
    if epsilon == "auto":
        from lightning_devinterp.calibration import calibrate_on_source

        calibration, results = calibrate_on_source(model, loss_fn, source, config, seed=seed)
        if calibration.best is None:
            raise LLCEstimationError(calibration.message)
        return dataclasses.replace(results[(calibration.best.epsilon, calibration.best.nbeta)], calibration=calibration)
    run = run_chains(model, loss_fn, source, config, num_chains=num_chains, seed=seed)
    return summarize_chains(run, config)


@dataclass(frozen=True)
class ChainRun:
    """Raw output of :func:`run_chains`: the minibatch loss of every chain at every SGLD step, and what it depends on."""

    step_losses: Tensor
    acceptance: Tensor
    init_loss: float
    nbeta: float
    num_samples: int
    seed: int
    vectorized: bool


def run_chains(
    model: nn.Module,
    loss_fn: LossFn,
    source: MinibatchSource,
    config: SamplingConfig,
    *,
    num_chains: int,
    seed: int,
    forward_context: Callable[[], ContextManager[Any]] = nullcontext,
) -> ChainRun:
    """Sample ``num_chains`` chains from the model's current parameters, leaving model and global RNGs as they were.

    ``forward_context`` wraps every loss evaluation (a Trainer's autocast, for instance). ``num_chains`` may differ
    from ``config.num_chains`` when chains are split across processes.
    """
    if config.epsilon == "auto":
        raise ValueError("run_chains needs a numeric epsilon; resolve epsilon='auto' with calibrate() first.")
    sampled_names = select_parameter_names(model, config.params)
    started = time.perf_counter()
    with preserved_rng_states(), quiet_evaluation(model), forward_context():
        nbeta = default_nbeta(source.num_samples) if config.nbeta is None else float(config.nbeta)
        loss = FunctionalLoss(model, loss_fn, sampled_names, source.device)
        init_loss = _mean_init_loss(loss, source, chunk_size=source.batch_size * num_chains)
        kernel = make_kernel(config.sampler, epsilon=config.epsilon, nbeta=nbeta, gamma=config.gamma)
        step_losses, acceptance, vectorized = _run_chains(
            loss,
            kernel,
            source,
            num_chains=num_chains,
            num_steps=config.num_steps,
            num_burnin_steps=config.num_burnin_steps,
            seed=seed,
            device=source.device,
            vectorize=config.vectorize,
        )
    log.debug(
        "%d chains x %d steps (%s) in %.2fs", num_chains, config.num_steps, "vmap" if vectorized else "sequential",
        time.perf_counter() - started,
    )
    return ChainRun(
        step_losses.detach().double().cpu(), acceptance.detach().double().cpu(), init_loss, nbeta, source.num_samples, seed, vectorized
    )


def summarize_chains(run: ChainRun, config: SamplingConfig) -> LLCResult:
    """The LLC estimate and its health findings from raw chain losses (possibly gathered from several processes)."""
    step_losses = run.step_losses.clone()
    num_chains = step_losses.shape[0]
    failures = first_failures(step_losses)
    for chain, step in failures.items():
        step_losses[chain, step:] = float("nan")
    draws = step_losses[:, config.num_burnin_steps :: config.num_steps_bw_draws]
    llc_per_chain = run.nbeta * (draws.mean(dim=1) - run.init_loss)
    alive = [chain for chain in range(num_chains) if chain not in failures]
    if not alive:
        raise LLCEstimationError(
            f"all {num_chains} chains diverged (loss became NaN/Inf; first at step {min(failures.values())}); "
            f"try a smaller epsilon than {config.epsilon:g} or a larger gamma than {config.gamma:g}."
        )
    llc_mean = float(llc_per_chain[alive].mean())
    llc_std = float(llc_per_chain[alive].std()) if len(alive) > 1 else float("nan")
    acceptance = run.acceptance.clone()
    acceptance[list(failures)] = float("nan")
    findings = diagnose(
        draws,
        run.init_loss,
        llc_mean,
        failures,
        acceptance=acceptance,
        epsilon=config.epsilon,
        num_burnin_steps=config.num_burnin_steps,
        num_steps_bw_draws=config.num_steps_bw_draws,
    )
    return LLCResult(
        llc_mean=llc_mean,
        llc_std=llc_std,
        llc_per_chain=llc_per_chain.float(),
        loss_trace=draws.float(),
        acceptance=acceptance.float(),
        init_loss=run.init_loss,
        nbeta=run.nbeta,
        warnings=findings,
        failed_chains=tuple(sorted(failures)),
        epsilon=float(config.epsilon),
        gamma=float(config.gamma),
        sampler=config.sampler,
        num_samples=run.num_samples,
        seed=run.seed,
        vectorized=run.vectorized,
    )
