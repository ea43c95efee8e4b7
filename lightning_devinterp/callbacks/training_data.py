"""The data the monitor's chains see, taken from a Trainer without touching the training data stream."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, IterableDataset

from lightning_devinterp.sampling.data import MinibatchSource, batch_length
from lightning_devinterp.sampling.result import LLCEstimationError


class _Replay(IterableDataset):
    """Replays buffered training batches as they were, for data that only exists as a stream."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Any]:
        return iter(self.batches)


class TrainingData:
    """A private view of the training data for the chains.

    In order of preference: the user's ``dataloader``; a private DataLoader over the training dataset (its
    collate_fn, the training batch size, no workers, no sampler: minibatches come from the estimator's own
    generator); for an iterable training set, a ring buffer of the last ``buffer_size`` training batches.

    Args:
        dataloader: the user's data for the chains, or None for a view of the training data.
        batch_size: the chains' minibatch size; default the DataLoader's.
        buffer_size: training batches kept for iterable training data.
        max_samples: iterable data is read up to this many samples.
    """

    def __init__(
        self, dataloader: DataLoader | None, batch_size: int | None, buffer_size: int, max_samples: int
    ) -> None:
        self.dataloader = dataloader
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.buffer_size = buffer_size
        self._source: MinibatchSource | None = None
        self._buffer: deque[Any] | None = None
        self.num_samples: int | None = None

    @property
    def buffers_batches(self) -> bool:
        """True when estimates replay recent training batches (iterable training data)."""
        return self._buffer is not None

    def prepare(self, trainer: pl.Trainer, device: torch.device) -> None:
        """Choose the source; ``num_samples`` is then the number of training samples, or None when unknown."""
        if self.dataloader is not None:
            self._source = MinibatchSource(self.dataloader, self.batch_size, device, self.max_samples)
            self.num_samples = self._source.dataset_size
            return
        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise MisconfigurationException(
                "LLCMonitor: the training data is not a single DataLoader; pass dataloader=... to choose the data."
            )
        batch_size = self.batch_size or loader.batch_size
        if batch_size is None:
            raise MisconfigurationException(
                "LLCMonitor: the training DataLoader has no batch_size; pass batch_size=..."
            )
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset):
            self._buffer = deque(maxlen=self.buffer_size)
            self.num_samples = len(dataset) if callable(getattr(dataset, "__len__", None)) else None  # type: ignore[arg-type]
        else:
            private = DataLoader(dataset, batch_size=batch_size, collate_fn=loader.collate_fn)
            self._source = MinibatchSource(private, batch_size, device)
            self.num_samples = self._source.num_samples

    def remember(self, batch: Any) -> None:
        """Keep a training batch (buffer mode only)."""
        if self._buffer is not None:
            self._buffer.append(batch)

    def source(self, device: torch.device) -> MinibatchSource:
        """The minibatch source for the next estimate."""
        if self._source is not None:
            return self._source
        assert self._buffer is not None, "prepare() first"
        if not self._buffer:
            raise LLCEstimationError("no training batches buffered yet.")
        replay = DataLoader(_Replay(list(self._buffer)), batch_size=None)
        batch_size = self.batch_size or batch_length(self._buffer[0])
        return MinibatchSource(replay, batch_size, device)

    def release(self) -> None:
        """Drop cached data and buffered batches."""
        self._source = None
        self._buffer = None
