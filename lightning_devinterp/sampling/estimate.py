"""The front door for one estimate: ``estimate_llc``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_devinterp.sampling.calibration import calibrate_on_source
from lightning_devinterp.sampling.chains import run_chains
from lightning_devinterp.sampling.config import ESTIMATE_DEFAULTS, SamplingConfig, check_setting_names
from lightning_devinterp.sampling.inputs import prepare_estimate
from lightning_devinterp.sampling.model_view import LossFn
from lightning_devinterp.sampling.observables import Observable
from lightning_devinterp.sampling.result import LLCEstimationError, LLCResult, summarize_chains
from lightning_devinterp.sampling.susceptibility import PerSampleLossFn, ProbeSpec


def estimate_llc(
    model: nn.Module,
    data: DataLoader | Dataset,
    loss_fn: LossFn | None = None,
    *,
    seed: int | None = None,
    device: str | torch.device | None = None,
    observables: Sequence[Observable] = (),
    probe: DataLoader | Dataset | None = None,
    per_sample_loss_fn: PerSampleLossFn | None = None,
    probe_labels: Sequence[Any] | torch.Tensor | None = None,
    probe_every: int = 1,
    **settings: Any,
) -> LLCResult:
    """Estimate the local learning coefficient of ``model`` at its current parameters w* (Lau et al. 2023).

    ``llc = nbeta * (E[L_B(w)] - L(w*))``, where the expectation runs over SGLD chains that start at w* and
    sample the localized tempered posterior ``exp(-nbeta L(w) - gamma/2 |w - w*|^2)``; the update convention is
    that of :mod:`lightning_devinterp.sampling.kernels`. Draws are the minibatch losses after ``num_burnin_steps``
    steps, every ``num_steps_bw_draws`` steps. L(w*) is the mean loss over the whole dataset (see
    :class:`~lightning_devinterp.sampling.data.MinibatchSource` for very large data). Both are computed in eval mode.

    Args:
        model: the model at w*; a LightningModule or any ``nn.Module``. It is never modified: parameters, buffers,
            ``.grad``, ``requires_grad``, train/eval mode and hooks are as before, and so are the global RNG states.
        data: a DataLoader (its dataset, batch size and collate_fn are used, its iterator is not) or a map-style
            Dataset (then ``batch_size`` is required).
        loss_fn: ``loss_fn(model, batch) -> scalar mean loss``. For a LightningModule the default is the loss its
            ``training_step(batch, 0)`` returns, with ``self.log`` silenced. The loss must be a mean negative
            log-likelihood: for Gaussian regression with unit noise use ``0.5 * ((y - f) ** 2).sum(-1).mean()``,
            not ``mse_loss`` (which also averages over output dimensions and so rescales nbeta).
        seed: seeds the estimator's private generators; the same seed gives the same result bit for bit on CPU.
            ``None`` draws a fresh seed (recorded in ``result.seed``).
        device: where chains run; defaults to the device of the model's first parameter.
        observables: extra draw-time quantities (:class:`~lightning_devinterp.sampling.observables.Observable`);
            their traces are in ``result.observations``.
        probe: samples to attribute to; with ``per_sample_loss_fn``, ``result.susceptibility`` holds each sample's
            susceptibility χ (and each group's, in ``result.groups``), read from the same draws
            (:mod:`~lightning_devinterp.sampling.susceptibility`). A Dataset or DataLoader, read whole, in order.
        per_sample_loss_fn: ``per_sample_loss_fn(model, batch) -> Tensor[batch]`` (or ``[batch, tokens]`` for a χ per
            token): the loss of each probe sample, on the same scale as ``loss_fn``.
        probe_labels: a label per probe sample (or per token); ``result.susceptibility_by_label`` then gives the mean
            χ per label.
        probe_every: read the probe at every ``probe_every``-th draw (a probe pass is one forward pass per probe
            batch for all chains).
        **settings: the sampling settings of :class:`~lightning_devinterp.SamplingConfig` (``num_chains=4``,
            ``num_draws=200``, ``num_burnin_steps=100``, ``epsilon=1e-4``, ``gamma=100``, ``nbeta``,
            ``batch_size``, ``params``, ``sampler``, ``sampler_kwargs``, ``vectorize``, ...). ``epsilon="auto"`` lets
            :func:`~lightning_devinterp.calibrate` pick the step size (the result is the estimate at the chosen
            epsilon, with the calibration in ``result.calibration``).

    Raises:
        LLCEstimationError: every chain diverged, or ``epsilon="auto"`` found no epsilon to trust.
        ValueError, TypeError: bad arguments, empty data, a non-scalar loss, a ``params`` entry that matches nothing,
            a model without trainable parameters, an unknown setting.
    """
    check_setting_names(settings)
    config = SamplingConfig(**settings).with_defaults(**ESTIMATE_DEFAULTS)
    spec = ProbeSpec.from_arguments(probe, per_sample_loss_fn, probe_labels, probe_every)
    loss_fn, source, seed = prepare_estimate(model, data, loss_fn, config, seed=seed, device=device)
    if spec is not None:
        observables = [*observables, spec.observable(model, source.device)]
    if config.epsilon == "auto":
        calibration, results = calibrate_on_source(model, loss_fn, source, config, seed=seed, observables=observables)
        if calibration.best is None:
            raise LLCEstimationError(calibration.message)
        chosen = results[(calibration.best.epsilon, calibration.best.nbeta)]
        chosen = chosen if spec is None else chosen.with_probe_labels(spec.labels)
        return dataclasses.replace(chosen, calibration=calibration)
    resolved = config.resolved(num_samples=source.dataset_size)
    assert resolved.num_chains is not None
    run = run_chains(
        model, loss_fn, source, resolved, num_chains=resolved.num_chains, seed=seed, observables=observables
    )
    result = summarize_chains(run, resolved)
    return result if spec is None else result.with_probe_labels(spec.labels)
