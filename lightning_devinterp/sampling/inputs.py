"""Check and prepare what every entry point receives: the model, its data, the loss and the seed."""

from __future__ import annotations

import secrets

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_devinterp._checks import is_integer
from lightning_devinterp._rng import preserved_rng_states
from lightning_devinterp.sampling.config import SamplingConfig
from lightning_devinterp.sampling.data import MinibatchSource
from lightning_devinterp.sampling.model_view import LossFn, resolve_loss_fn
from lightning_devinterp.sampling.params import select_parameter_names


def prepare_estimate(
    model: nn.Module,
    data: DataLoader | Dataset,
    loss_fn: LossFn | None,
    config: SamplingConfig,
    *,
    seed: int | None,
    device: str | torch.device | None,
) -> tuple[LossFn, MinibatchSource, int]:
    """Check the model, resolve the loss and the seed, and read the data: what every public entry point needs first.

    Args:
        model: the model at w*.
        data: a DataLoader or a map-style Dataset.
        loss_fn: the user's loss, or None for a LightningModule's ``training_step`` loss.
        config: the sampling settings (``params``, ``batch_size`` and ``max_samples`` are read here).
        seed: an integer, or None to draw one.
        device: where chains run; default the device of the model's first parameter.

    Returns:
        The loss function, the minibatch source and the seed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if seed is not None and not is_integer(seed):
        raise ValueError(f"seed must be an integer or None, got {seed!r}.")
    loss_fn = resolve_loss_fn(model, loss_fn)
    select_parameter_names(model, config.params)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with preserved_rng_states():
        source = MinibatchSource(data, config.batch_size, device, config.max_samples)
    return loss_fn, source, secrets.randbits(63) if seed is None else int(seed)
