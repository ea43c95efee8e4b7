"""Evaluate a user's loss at arbitrary parameters without touching the user's model.

The model is called through :func:`torch.func.functional_call` with detached copies of its parameters and
buffers, so its own tensors, ``.grad`` and ``requires_grad`` flags are never written. The only temporary
changes are the train/eval flags, the user's hooks (set aside: sampling must not call them) and, for a
LightningModule, silenced ``self.log`` calls; all are undone on exit.
Lightning is not imported here: a LightningModule is recognised by its ``training_step`` and ``log`` methods.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

LossFn = Callable[[nn.Module, Any], Tensor]


def is_lightning_module(model: nn.Module) -> bool:
    """True for a LightningModule (or anything shaped like one: a ``training_step`` and a ``log`` method).

    Args:
        model: any module.
    """
    return callable(getattr(model, "training_step", None)) and callable(getattr(model, "log", None))


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss of ``module.training_step(batch, 0)``: the returned tensor, or the ``"loss"`` entry of a dict.

    Args:
        module: a LightningModule.
        batch: one batch, as its training loop would pass it.

    Raises:
        TypeError: ``training_step`` returned neither a tensor nor a dict with a ``"loss"`` tensor.
    """
    output = cast(Any, module).training_step(batch, 0)
    if isinstance(output, dict):
        if "loss" not in output:
            raise TypeError(
                f"{type(module).__name__}.training_step returned a dict without a 'loss' entry (keys: {', '.join(map(str, output)) or 'none'}); "
                "the default loss needs one. Pass loss_fn=lambda model, batch: ... instead."
            )
        output = output["loss"]
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{type(module).__name__}.training_step returned {type(output).__name__}; the default loss needs a Tensor or a "
            "dict with a 'loss' Tensor. Pass loss_fn=lambda model, batch: ... instead."
        )
    return output


def resolve_loss_fn(model: nn.Module, loss_fn: LossFn | None) -> LossFn:
    """``loss_fn`` itself, or the training_step loss for a LightningModule.

    Args:
        model: the model to be sampled.
        loss_fn: the user's loss, or None.

    Raises:
        TypeError: ``loss_fn`` is not callable, or is None for a plain ``nn.Module``.
    """
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}.")
        return loss_fn
    if is_lightning_module(model):
        return training_step_loss
    raise TypeError(
        f"{type(model).__name__} is a plain nn.Module: pass loss_fn(model, batch) -> scalar mean loss "
        "(the default, training_step's loss, exists only for a LightningModule)."
    )


def _ignore_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log``/``log_dict`` while chains run."""


@contextmanager
def _instance_attributes(obj: object, replacements: dict[str, Any]) -> Iterator[None]:
    """Set instance attributes for the duration of the block, then restore or remove them exactly."""
    saved = {name: obj.__dict__[name] for name in replacements if name in obj.__dict__}
    obj.__dict__.update(replacements)
    try:
        yield
    finally:
        for name in replacements:
            if name in saved:
                obj.__dict__[name] = saved[name]
            else:
                del obj.__dict__[name]


def _evaluation_replacements(model: nn.Module) -> dict[str, Any]:
    """No-op ``log``/``log_dict`` for a LightningModule, and its uncompiled methods if the Trainer compiled it.

    ``Trainer.fit(torch.compile(module))`` replaces ``forward``/``training_step`` with dynamo wrappers bound to the
    original parameters; swapping in sampled parameters needs the original Python methods.
    """
    if not is_lightning_module(model):
        return {}
    replacements: dict[str, Any] = {"log": _ignore_log, "log_dict": _ignore_log}
    compiled = getattr(model, "_compiler_ctx", None)
    if compiled:
        replacements.update(forward=compiled["original_forward"], training_step=compiled["original_training_step"])
    return replacements


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
"""The per-module hook registries that sampling sets aside."""

MODEL_HOOKS = (WeightNorm, SpectralNorm)
"""Hooks that are part of a module's arithmetic (old-style weight and spectral norm recompute the weight in a
forward pre-hook), so sampling keeps them."""


@contextmanager
def without_user_hooks(model: nn.Module) -> Iterator[None]:
    """Set aside the forward, forward-pre and backward hooks of every submodule (except :data:`MODEL_HOOKS`), and put
    the very same registries back on exit: sampling must not feed activation caches or statistics, nor trip on
    hooks that keep tensors (which vmap cannot let escape).

    Args:
        model: the model whose submodules' hooks are set aside.
    """
    saved = []
    for module in model.modules():
        for name in HOOK_DICTS:
            hooks = getattr(module, name, None)
            if hooks:
                saved.append((module, name, hooks))
                module.__dict__[name] = OrderedDict(
                    (key, hook) for key, hook in hooks.items() if isinstance(hook, MODEL_HOOKS)
                )
    try:
        yield
    finally:
        for module, name, hooks in saved:
            module.__dict__[name] = hooks


@contextmanager
def quiet_evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode for every submodule, the user's hooks set aside and, for a LightningModule, no-op ``log``/
    ``log_dict``; all restored on exit.

    Eval mode makes the loss deterministic (no dropout) and keeps BatchNorm on its running statistics, as L(w*)
    requires; silencing ``log`` keeps a training_step used as loss from writing into a live Trainer's metrics.

    Args:
        model: the model to evaluate quietly.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with _instance_attributes(model, _evaluation_replacements(model)), without_user_hooks(model):
            yield
    finally:
        for module, training in modes:
            module.training = training


class _LossModule(nn.Module):
    """Holds the user's model as ``self.model`` so that ``functional_call`` can swap in any parameters for ``loss_fn``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class FunctionalLoss:
    """``loss(sampled, batch)``: the mean minibatch loss with the sampled parameters swapped in.

    Parameters that are not sampled and all buffers are detached copies taken at construction (w*), passed as
    ``constants``, so in-place buffer updates inside the forward never reach the model. With a ``tilt`` (the loss's
    gradient at w*, set after construction), the loss is tilted by it: ``L(w) − tilt·(w − w*)``, of which w* is a
    critical point.

    Args:
        model: the model at w*.
        loss_fn: ``loss_fn(model, batch) -> scalar``.
        sampled_names: the parameters that are swapped in at each call; their values at w* are the ``anchor``.
        device: where the copies of w* go.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, sampled_names: list[str], device: torch.device) -> None:
        self._module = _LossModule(model, loss_fn)
        sampled = set(sampled_names)
        tensors = dict(model.named_parameters())
        self.anchor = {name: tensors[name].detach().to(device, copy=True) for name in sampled_names}
        self.constants = {name: t.detach().to(device, copy=True) for name, t in tensors.items() if name not in sampled}
        self.constants.update({name: b.detach().to(device, copy=True) for name, b in model.named_buffers()})
        self.tilt: dict[str, Tensor] | None = None

    def __call__(self, sampled: dict[str, Tensor], batch: Any) -> Tensor:
        tensors = {f"model.{name}": w for name, w in {**sampled, **self.constants}.items()}
        loss: Tensor = functional_call(self._module, tensors, (batch,))
        if self.tilt is not None:
            loss = loss - sum((g * (sampled[name] - self.anchor[name])).sum() for name, g in self.tilt.items())
        return loss
