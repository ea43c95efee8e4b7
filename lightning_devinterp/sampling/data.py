"""Minibatches for the chains, drawn with a private generator and never from the caller's DataLoader iterator."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

log = logging.getLogger(__name__)

MAX_CACHED_BYTES = 1 << 30
"""Data up to this size is collated once and kept on the sampling device; larger map-style data is read per step."""

MAX_ITERABLE_SAMPLES = 65536
"""Default cap on the samples read from iterable data (which may never end): beyond it, n is unknown."""

LARGE_DATA_INIT_LOSS_SAMPLES = 16384
"""For data too large to cache, L(w*) is the mean over this many evenly spaced samples (a fixed subset)."""


def _check_tensor_leaves(batch: Any) -> None:
    leaves, _ = tree_flatten(batch)
    bad = [type(leaf).__name__ for leaf in leaves if not isinstance(leaf, Tensor)]
    if bad:
        raise TypeError(
            "batches must be tensors or tuples/lists/dicts of tensors so that chains can be stacked; "
            f"found {', '.join(sorted(set(bad)))}. Convert them in the dataset or collate_fn."
        )


def batch_length(batch: Any) -> int:
    """The number of samples in a batch: the leading size of its first tensor (batches are tensors or trees of them).

    Args:
        batch: a tensor, or a tuple, list or dict of tensors.
    """
    return int(tree_flatten(batch)[0][0].shape[0])


def _nbytes(batch: Any) -> int:
    return sum(leaf.element_size() * leaf.numel() for leaf in tree_flatten(batch)[0])


class MinibatchSource:
    """Random minibatches for ``num_chains`` chains at once, each leaf shaped ``[num_chains, batch_size, ...]``.

    Accepts a :class:`~torch.utils.data.DataLoader` (its dataset and ``collate_fn`` are used; its sampler and
    iterator are not touched for map-style data) or a map-style :class:`~torch.utils.data.Dataset`. Samples are
    drawn uniformly with replacement using the caller's generator.

    Map-style data that fits in :data:`MAX_CACHED_BYTES` is collated once and indexed on the device. Larger
    map-style data is read item by item each step, and its L(w*) uses a fixed evenly spaced subset of
    :data:`LARGE_DATA_INIT_LOSS_SAMPLES` samples. An iterable-style DataLoader is read once, up to ``max_samples``
    samples or :data:`MAX_CACHED_BYTES`: if it ends first, n is the number of samples read; if not (a stream that
    may never end), the chains use what was read and ``dataset_size`` is None (n unknown: pass nbeta).

    Args:
        data: a DataLoader or a map-style Dataset.
        batch_size: samples per chain per step; default the DataLoader's (required for a Dataset).
        device: where the minibatches go.
        max_samples: iterable data is read up to this many samples.

    Raises:
        ValueError: no batch size, or empty data.
        TypeError: data of another kind, or batches that are not (nested) tensors.
    """

    def __init__(
        self,
        data: DataLoader | Dataset,
        batch_size: int | None,
        device: torch.device,
        max_samples: int = MAX_ITERABLE_SAMPLES,
    ) -> None:
        self.device = device
        self.max_samples = max_samples
        if isinstance(data, DataLoader):
            dataset, collate_fn = data.dataset, data.collate_fn
            if batch_size is None and data.batch_size is None:
                how = (
                    "its dataset yields ready-made batches"
                    if isinstance(data.dataset, IterableDataset)
                    else "it uses a batch_sampler"
                )
                raise ValueError(
                    f"the DataLoader has batch_size=None ({how}), so the size of a chain's minibatch is unknown; pass batch_size=..."
                )
            batch_size = batch_size or data.batch_size
            assert batch_size is not None
        elif isinstance(data, Dataset):
            if batch_size is None:
                raise ValueError("batch_size is required when data is a Dataset rather than a DataLoader.")
            dataset, collate_fn = data, default_collate
        else:
            raise TypeError(f"data must be a torch DataLoader or a map-style Dataset, got {type(data).__name__}.")
        self.batch_size = int(batch_size)
        self._collate: Callable[[list], Any] = collate_fn
        self._dataset = dataset
        self._cache: Any = None
        self.dataset_size: int | None
        if isinstance(dataset, IterableDataset):
            self._cache = self._read_iterable(data)
        else:
            self.num_samples = self.dataset_size = len(dataset)  # type: ignore[arg-type]
            if self.num_samples == 0:
                raise ValueError("the dataset is empty.")
            if isinstance(dataset, TensorDataset) and collate_fn is default_collate:
                self._cache = tuple(dataset.tensors)
            else:
                first = collate_fn([dataset[0]])
                _check_tensor_leaves(first)
                if _nbytes(first) * self.num_samples <= MAX_CACHED_BYTES:
                    self._cache = collate_fn([dataset[i] for i in range(self.num_samples)])
        if self._cache is not None:
            _check_tensor_leaves(self._cache)
            self._cache = tree_map(lambda t: t.to(device), self._cache)

    @property
    def cached(self) -> bool:
        """Whether all the data is held in memory (collated once), rather than read item by item."""
        return self._cache is not None

    def _read_iterable(self, loader: Any) -> Any:
        if not isinstance(loader, DataLoader):
            raise TypeError("an IterableDataset must be passed inside a DataLoader.")
        batches, total_bytes, total_samples, ended = [], 0, 0, True
        for batch in loader:
            if total_samples >= self.max_samples or total_bytes >= MAX_CACHED_BYTES:
                ended = False
                break
            _check_tensor_leaves(batch)
            batches.append(batch)
            total_bytes += _nbytes(batch)
            total_samples += batch_length(batch)
        if not batches:
            raise ValueError("the dataset is empty.")
        flat = [tree_flatten(b) for b in batches]
        spec = flat[0][1]
        columns = zip(*(leaves for leaves, _ in flat))
        merged = [torch.cat(column)[: self.max_samples] for column in columns]
        self.num_samples = merged[0].shape[0]
        self.dataset_size = self.num_samples if ended else None
        if not ended:
            log.warning(
                "the iterable dataset did not end within max_samples=%d samples (or %d MiB); the chains use those, and "
                "n, the dataset's size, is unknown (nbeta must be given).",
                self.max_samples,
                MAX_CACHED_BYTES >> 20,
            )
        return tree_unflatten(merged, spec)

    def _gather(self, indices: Tensor) -> Any:
        """The samples at ``indices`` (any shape), each leaf shaped ``[*indices.shape, ...]``."""
        if self._cache is not None:
            device_indices = indices.to(self.device)
            return tree_map(lambda t: t[device_indices], self._cache)
        rows = indices.reshape(-1, indices.shape[-1])
        batches = [self._collate([self._dataset[int(i)] for i in row]) for row in rows]
        stacked = tree_map(lambda *leaves: torch.stack(leaves), *batches)
        return tree_map(lambda t: t.reshape(*indices.shape, *t.shape[2:]).to(self.device), stacked)

    def sample(self, generator: torch.Generator, num_chains: int) -> Any:
        """One minibatch per chain, leaves shaped ``[num_chains, batch_size, ...]``."""
        indices = torch.randint(self.num_samples, (num_chains, self.batch_size), generator=generator)
        return self._gather(indices)

    def init_loss_batches(self, chunk_size: int) -> Iterator[tuple[Any, int]]:
        """Consecutive chunks of the data used for L(w*), with their sizes."""
        if self._cache is not None:
            indices = torch.arange(self.num_samples)
        else:
            count = min(self.num_samples, LARGE_DATA_INIT_LOSS_SAMPLES)
            indices = torch.linspace(0, self.num_samples - 1, count).round().long()
        for chunk in indices.split(chunk_size):
            yield self._gather(chunk), len(chunk)
