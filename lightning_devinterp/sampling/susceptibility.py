"""Susceptibilities: how each probe sample's loss responds, over the posterior draws, to the loss the LLC measures.

For a group C sampled with the other parameters frozen at w* (the full model when C is all of them) and a probe
sample (x, y) with per-sample loss ℓ_xy, the susceptibility is (Baker et al. 2025, arXiv 2504.18274)

    χ^C_xy = −Cov_C[ L(w) − L(w*), ℓ_xy(w) − L(w) ]

over all draws of all chains of the group's run (divided by their number), with L(w) − L(w*) the increase each draw
is scored on for λ̂ (the paired difference L_B(w_t) − L_B(w*) by default). It needs no extra sampling: the probe's
per-sample losses are read at the draws (:class:`ProbeLosses`), for all chains and groups in one vectorized forward
pass without gradients. The Bayesian influence between two probe samples, −Cov[ℓ_i, ℓ_j] (Kreer et al. 2025,
arXiv 2509.26544), comes from the same traces (:func:`probe_covariance`). docs/mathematics.md derives the exact value
the tests check.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import DataLoader, Dataset

from lightning_devinterp._checks import check_count
from lightning_devinterp.sampling.data import MinibatchSource, batch_length
from lightning_devinterp.sampling.model_view import FunctionalLoss
from lightning_devinterp.sampling.observables import Draw

PerSampleLossFn = Callable[[nn.Module, Any], Tensor]
"""``per_sample_loss_fn(model, batch) -> Tensor[batch]`` (or ``[batch, tokens]``): one loss per probe sample (token)."""

PROBE_LOSS = "probe_loss"
"""The name of the probe's per-sample loss trace in ``observations``."""

DEFAULT_PROBE_BATCH = 256
"""Probe samples per forward pass, unless the probe is a DataLoader with a batch size of its own."""

MAX_BLOCKS_PER_CHAIN = 4
"""Each chain's draws are cut into up to this many consecutive blocks for the standard error (batch means)."""


class ProbeLosses:
    """The per-sample losses of a fixed probe set at every ``every``-th draw, for every chain: ``[chains, samples]``
    (or ``[chains, samples, tokens]``), NaN at the draws in between.

    Args:
        model: the model at w* (the chains' parameters are swapped in; the rest, and buffers, are read at w*).
        per_sample_loss_fn: ``per_sample_loss_fn(model, batch) -> Tensor[batch]`` or ``[batch, tokens]``.
        batches: the probe, as batches in order (see :func:`probe_batches`).
        every: read the probe at every ``every``-th draw (the first draw always).
    """

    name = PROBE_LOSS

    def __init__(
        self, model: nn.Module, per_sample_loss_fn: PerSampleLossFn, batches: list[Any], every: int = 1
    ) -> None:
        self.model, self.per_sample_loss_fn, self.batches, self.every = model, per_sample_loss_fn, batches, every
        self.device = _batch_device(batches[0])
        self._loss: FunctionalLoss | None = None
        self._batched: Callable[[dict[str, Tensor], Any], Tensor] | None = None
        self._shape: tuple[int, ...] | None = None
        self._vectorized = True

    def bound_to(self, model: nn.Module) -> ProbeLosses:
        """A fresh observable for ``model`` at its current w*, reusing this one's probe batches.

        Args:
            model: the model at w* of the next run of chains.
        """
        return ProbeLosses(model, self.per_sample_loss_fn, self.batches, self.every)

    def _evaluate(self, position: dict[str, Tensor], batch: Any) -> Tensor:
        assert self._loss is not None and self._batched is not None
        if self._vectorized:
            try:
                return self._batched(position, batch)
            except Exception:
                if self._shape is not None:
                    raise
                self._vectorized = False
        chains = next(iter(position.values())).shape[0]
        return torch.stack([self._loss(tree_map(operator.itemgetter(c), position), batch) for c in range(chains)])

    def observe(self, draw: Draw) -> Tensor:
        """The probe's per-sample losses for each chain at this draw (NaN when this draw is skipped).

        Args:
            draw: the runner's state at this draw.
        """
        chains = draw.losses.shape[0]
        if draw.index % self.every and self._shape is not None:
            return torch.full((chains, *self._shape), math.nan, device=draw.losses.device)
        if self._loss is None:
            device = next(iter(draw.position.values())).device
            self._loss = FunctionalLoss(self.model, self.per_sample_loss_fn, list(draw.position), device)
            self._batched = vmap(self._loss, in_dims=(0, None))
        with torch.no_grad():
            pieces = [self._evaluate(draw.position, batch) for batch in self.batches]
        for piece, batch in zip(pieces, self.batches):
            if piece.dim() not in (2, 3) or piece.shape[1] != batch_length(batch):
                raise ValueError(
                    "per_sample_loss_fn must return one loss per sample, Tensor[batch] or Tensor[batch, tokens]; "
                    f"got shape {tuple(piece.shape[1:])} for a batch of {batch_length(batch)}."
                )
        values = torch.cat(pieces, dim=1)
        self._shape = tuple(values.shape[1:])
        return values.float()


@dataclass(frozen=True)
class ProbeSpec:
    """What to attribute to: a probe set, its per-sample loss, optional labels, and how often to read it.

    Args:
        probe: a Dataset or DataLoader of probe samples (every sample is read, in order).
        per_sample_loss_fn: ``per_sample_loss_fn(model, batch) -> Tensor[batch]`` or ``[batch, tokens]``.
        labels: one label per sample (or per token), for per-label means; None for none.
        every: read the probe at every ``every``-th draw.

    Raises:
        ValueError: a probe without a per-sample loss or the other way round, or ``every`` below 1.
    """

    probe: DataLoader | Dataset
    per_sample_loss_fn: PerSampleLossFn
    labels: Sequence[Any] | Tensor | None = None
    every: int = 1

    @staticmethod
    def from_arguments(
        probe: DataLoader | Dataset | None,
        per_sample_loss_fn: PerSampleLossFn | None,
        labels: Sequence[Any] | Tensor | None,
        every: int,
    ) -> ProbeSpec | None:
        """The spec, or None when no probe was asked for.

        Args:
            probe: the probe set, or None.
            per_sample_loss_fn: its per-sample loss, or None.
            labels: per-sample (or per-token) labels, or None.
            every: read the probe at every ``every``-th draw.
        """
        if probe is None and per_sample_loss_fn is None:
            if labels is not None:
                raise ValueError("probe_labels needs a probe (probe=..., per_sample_loss_fn=...).")
            return None
        if probe is None or per_sample_loss_fn is None:
            missing = "probe" if probe is None else "per_sample_loss_fn"
            raise ValueError(f"susceptibilities need both probe and per_sample_loss_fn; {missing} is missing.")
        if not callable(per_sample_loss_fn):
            raise TypeError(f"per_sample_loss_fn must be callable, got {type(per_sample_loss_fn).__name__}.")
        check_count("probe_every", every, 1)
        return ProbeSpec(probe, per_sample_loss_fn, labels, every)

    def observable(self, model: nn.Module, device: torch.device) -> ProbeLosses:
        """The draw-time observable that reads this probe for ``model``'s chains on ``device``.

        Args:
            model: the model at w*.
            device: where the chains run.
        """
        return ProbeLosses(model, self.per_sample_loss_fn, probe_batches(self.probe, device), self.every)


def _batch_device(batch: Any) -> torch.device:
    return torch.device(tree_flatten(batch)[0][0].device)


def probe_batches(probe: DataLoader | Dataset, device: torch.device) -> list[Any]:
    """The probe set as consecutive batches on ``device``, every sample once, in order.

    Args:
        probe: a DataLoader (its dataset, batch size and collate_fn) or a map-style Dataset.
        device: where the batches go.

    Raises:
        ValueError: the probe is empty or too large to hold in memory (then pass a subset).
    """
    batch_size = probe.batch_size if isinstance(probe, DataLoader) and probe.batch_size else DEFAULT_PROBE_BATCH
    source = MinibatchSource(probe, batch_size, device)
    if source.dataset_size is None or not source.cached:
        raise ValueError("the probe must be a finite set small enough to hold in memory; pass a subset.")
    return [batch for batch, _ in source.init_loss_batches(batch_size)]


@dataclass(frozen=True)
class Susceptibility:
    """χ per probe sample (``[samples]`` or ``[samples, tokens]``) and its standard error."""

    value: Tensor
    stderr: Tensor


def susceptibility(increases: Tensor, probe_losses: Tensor) -> Susceptibility:
    """χ_xy = −Cov[X, ℓ_xy − X] over all draws of all chains, with X the draws' scored increases.

    ``ℓ_xy(w) − L(w)`` and ``ℓ_xy(w) − (L(w) − L(w*))`` differ by a constant, which no covariance sees, so the
    second form uses exactly the increase λ̂ is computed from. The standard error is by batch means: each chain's
    draws cut into consecutive blocks, whose means of the centred products vary as the estimate does.

    Args:
        increases: ``[chains, draws]`` (finite chains only; NaN rows are left out).
        probe_losses: ``[chains, draws, samples, ...]``, NaN at draws where the probe was not read.
    """
    draws_read = torch.isfinite(probe_losses.flatten(2)).any(dim=2).any(dim=0)
    x = increases[:, draws_read].double()
    losses = probe_losses[:, draws_read].double()
    chains_alive = torch.isfinite(x).all(dim=1) & torch.isfinite(losses.flatten(1)).all(dim=1)
    x, losses = x[chains_alive], losses[chains_alive]
    if x.numel() < 2:
        nan = torch.full(probe_losses.shape[2:], math.nan, dtype=torch.float64)
        return Susceptibility(nan, nan.clone())
    extra = (1,) * (losses.dim() - 2)
    x = x.reshape(*x.shape, *extra)
    y = losses - x
    products = -(x - x.mean(dim=(0, 1))) * (y - y.mean(dim=(0, 1)))
    value = products.mean(dim=(0, 1))
    chains, draws = x.shape[:2]
    blocks = max(1, min(MAX_BLOCKS_PER_CHAIN, draws // 2))
    edges = torch.linspace(0, draws, blocks + 1).round().long().tolist()
    block_means = torch.stack([products[:, a:b].mean(dim=1) for a, b in zip(edges, edges[1:]) if b > a], dim=1)
    count = block_means.shape[0] * block_means.shape[1]
    spread = block_means.flatten(0, 1).std(dim=0) if count > 1 else torch.full_like(value, math.nan)
    return Susceptibility(value, spread / math.sqrt(count))


def probe_covariance(probe_losses: Tensor) -> Tensor:
    """The Bayesian influence between probe samples, −Cov[ℓ_i, ℓ_j] over all draws of all chains, ``[samples,
    samples]`` (per-token losses are averaged over tokens first).

    Args:
        probe_losses: ``[chains, draws, samples, ...]``, NaN at draws where the probe was not read.
    """
    losses = probe_losses.flatten(3).mean(dim=3) if probe_losses.dim() > 3 else probe_losses
    flat = losses.flatten(0, 1).double()
    flat = flat[torch.isfinite(flat).all(dim=1)]
    centred = flat - flat.mean(dim=0)
    return -(centred.T @ centred) / max(flat.shape[0], 1)


def flat_labels(labels: Sequence[Any] | Tensor) -> list[Hashable]:
    """Labels per sample, or per token (a tensor or nested lists ``[samples][tokens]``), as one flat list.

    Args:
        labels: the probe's labels.
    """
    if isinstance(labels, Tensor):
        return list(labels.flatten().tolist())
    items = list(labels)
    if items and isinstance(items[0], (list, tuple)):
        return [label for row in items for label in row]
    return items


def _flat_labels(values: Tensor, labels: Sequence[Any] | Tensor) -> tuple[Tensor, list[Hashable]]:
    """``values`` flattened to match ``labels`` (per-token values averaged over tokens for per-sample labels)."""
    flat_labels_ = flat_labels(labels)
    if len(flat_labels_) == values.shape[0] and values.dim() > 1:
        values = values.flatten(1).nanmean(dim=1)
    if len(flat_labels_) != values.numel():
        raise ValueError(
            f"probe_labels must hold one label per probe sample ({values.shape[0]}) or per token "
            f"({values.numel()}), got {len(flat_labels_)}."
        )
    return values.flatten(), flat_labels_


def check_labels(values: Tensor, labels: Sequence[Any] | Tensor) -> None:
    """Raise ValueError unless ``labels`` has one label per sample or per token of ``values``.

    Args:
        values: ``[samples]`` or ``[samples, tokens]``.
        labels: the labels to check.
    """
    _flat_labels(values, labels)


def label_means(values: Tensor, labels: Sequence[Any] | Tensor) -> dict[str, float]:
    """The mean of ``values`` per label, in the order labels first appear.

    Args:
        values: ``[samples]`` or ``[samples, tokens]``.
        labels: one label per sample, or per token (shaped like ``values``); per-token values with per-sample labels
            are averaged over tokens first.
    """
    flat, flat_labels = _flat_labels(values, labels)
    groups: dict[str, list[int]] = {}
    for index, label in enumerate(flat_labels):
        groups.setdefault(str(label), []).append(index)
    return {label: float(flat[indices].nanmean()) for label, indices in groups.items()}
