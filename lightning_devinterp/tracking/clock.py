"""The monitor's working time: the wall clock less the interpreter's garbage-collection pauses.

In a process that has imported torch and Lightning, a full collection pauses everything for 0.1-0.3 s. It starts at
whichever allocation crosses the collector's threshold, so now and then inside one of the monitor's hooks; it would
have run during training otherwise, and it is no work of the monitor's. Timing the hooks with :func:`working_time`
keeps such a pause out of the monitor's budget and out of what it predicts its estimates cost.
"""

from __future__ import annotations

import gc
import time
from typing import Any


class _CollectionPauses:
    """Seconds the collector has paused the process since the first call of :meth:`seconds` (a ``gc`` callback,
    installed then, once per process).
    """

    def __init__(self) -> None:
        self.total = 0.0
        self._started: float | None = None
        self._installed = False

    def _observe(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.total += time.perf_counter() - self._started
            self._started = None

    def seconds(self) -> float:
        if not self._installed:
            gc.callbacks.append(self._observe)
            self._installed = True
        return self.total


_pauses = _CollectionPauses()


def working_time() -> float:
    """``time.perf_counter()`` less the garbage-collection pauses counted so far: a difference of two readings is the
    work done between them.
    """
    return time.perf_counter() - _pauses.seconds()
