"""Leave the process-wide random number generators exactly as they were found."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def preserved_rng_states() -> Iterator[None]:
    """Snapshot the torch (CPU and every initialised CUDA device), numpy and `random` states; restore them on exit.

    Restoring happens in a ``finally`` block, so the states come back even when the body raises. Anything the
    body draws from these generators (a dataset's augmentation, a collate function) is thereby invisible to the
    caller's training run.
    """
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
