"""The work behind ``LLCMonitor``, free of Trainer hooks: sampling split across processes, epsilon calibration,
the history of estimates and transition detection. The callback decides when and reports where; this decides what.

Like Lightning's ``SpikeDetection`` over its Fabric-level helper, the tracker needs only a strategy's collectives
(``all_gather``, ``broadcast``), so it runs under a Trainer or under Fabric.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import Any

from torch import nn

from lightning_devinterp._rng import preserved_rng_states
from lightning_devinterp.callbacks.distributed import Collective, chains_per_rank, derive_seed, gather_run
from lightning_devinterp.detection.detector import Transition, TransitionDetector
from lightning_devinterp.sampling.calibration import CalibrationResult, calibrate_on_source
from lightning_devinterp.sampling.chains import ChainRun, run_chains
from lightning_devinterp.sampling.config import SamplingConfig
from lightning_devinterp.sampling.data import MinibatchSource
from lightning_devinterp.sampling.model_view import LossFn
from lightning_devinterp.sampling.result import LLCEstimationError, LLCResult, summarize_chains


@dataclasses.dataclass(frozen=True)
class LLCRecord:
    """One estimate taken during training, at optimizer step ``step``; ``seconds`` is its wall time."""

    step: int
    llc_mean: float
    llc_std: float
    result: LLCResult
    seconds: float

    @property
    def healthy(self) -> bool:
        return self.result.healthy


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place among those that share the chains, and the collectives that join them."""

    world_size: int = 1
    rank: int = 0
    collective: Collective | None = None


@dataclasses.dataclass(frozen=True)
class EstimateInputs:
    """What an estimate at one step is taken of (the module and its loss), on what data, and under which processes;
    ``forward_context`` wraps every loss evaluation (the Trainer's autocast, for instance)."""

    module: nn.Module
    loss_fn: LossFn
    source: MinibatchSource
    processes: Processes = Processes()
    forward_context: Callable[[], ContextManager[Any]] = nullcontext


class LLCTracker:
    """Estimates at the steps it is asked to, keeps their history and feeds them to a transition detector.

    ``config`` holds the sampling settings with the chain shape filled in; nbeta is resolved in :meth:`start`.
    With ``epsilon="auto"`` the first estimate calibrates epsilon and keeps it for the run (calibration is retried
    at later estimates while nothing qualifies).
    """

    def __init__(self, config: SamplingConfig, seed: int, detector: TransitionDetector | None) -> None:
        self.config = config
        self.seed = seed
        self.detector = detector
        self.history: list[LLCRecord] = []
        self.transitions: list[Transition] = []
        self.last_step = -1
        self.nbeta: float | None = None
        self.epsilon: float | None = None if config.epsilon == "auto" else float(config.epsilon)
        self.calibration: CalibrationResult | None = None

    def start(self, num_samples: int | None) -> None:
        """Resolve nbeta for the training set's ``num_samples`` (ValueError when it cannot be derived)."""
        self.nbeta = self.config.resolve_nbeta(num_samples)

    def calibrate(self, step: int, inputs: EstimateInputs) -> CalibrationResult:
        """Resolve ``epsilon="auto"``: calibrate on every rank alike, then take rank zero's choice everywhere."""
        config = dataclasses.replace(self.config, nbeta=self.nbeta)
        calibration, _ = calibrate_on_source(
            inputs.module, inputs.loss_fn, inputs.source, config, seed=derive_seed(self.seed, step, 0), forward_context=inputs.forward_context
        )
        chosen = calibration.best.epsilon if calibration.best is not None else 0.0
        collective = inputs.processes.collective
        if collective is not None:
            chosen = float(collective.broadcast(chosen, src=0))
        if not chosen:
            raise LLCEstimationError(f"epsilon='auto' at step {step}: {calibration.message} Calibration is retried at the next estimate.")
        self.epsilon, self.calibration = chosen, calibration
        return calibration

    def sample(self, step: int, inputs: EstimateInputs) -> LLCResult:
        """This process's share of the chains, gathered with every other process's; the same result on every rank."""
        assert self.epsilon is not None and self.nbeta is not None
        config = dataclasses.replace(self.config, nbeta=self.nbeta, epsilon=self.epsilon)
        processes = inputs.processes
        counts = chains_per_rank(config.num_chains, processes.world_size)
        local: ChainRun | None = None
        error: Exception | None = None
        try:
            with preserved_rng_states():
                local = run_chains(
                    inputs.module,
                    inputs.loss_fn,
                    inputs.source,
                    config,
                    num_chains=counts[processes.rank],
                    seed=derive_seed(self.seed, step, processes.rank),
                    forward_context=inputs.forward_context,
                )
        except Exception as caught:
            if processes.collective is None:
                raise
            error = caught
        if processes.collective is None:
            assert local is not None
            return summarize_chains(local, config)
        gathered = gather_run(processes.collective, local, counts)
        if gathered is None:
            if error is not None:
                raise error
            raise LLCEstimationError("the estimate failed on another rank.")
        return summarize_chains(gathered, config)

    def record(self, step: int, result: LLCResult, seconds: float) -> LLCRecord:
        """Add a finished estimate to the history."""
        record = LLCRecord(step, result.llc_mean, result.llc_std, result, seconds)
        self.history.append(record)
        return record

    def detect(self, record: LLCRecord) -> Transition | None:
        """Feed an estimate to the detector (with its standard error over chains); the transition it reports, if any."""
        if self.detector is None:
            return None
        alive = record.result.num_chains_used
        standard_error = record.llc_std / math.sqrt(alive) if alive > 1 else None
        transition = self.detector.update(record.step, record.llc_mean, standard_error, healthy=record.healthy)
        if transition is not None:
            self.transitions.append(transition)
        return transition

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [
                {**{f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != "result"}, "result": dataclasses.asdict(record.result)}
                for record in self.history
            ],
            "transitions": [dataclasses.asdict(transition) for transition in self.transitions],
            "last_step": self.last_step,
            "detector": self.detector.state_dict() if self.detector is not None else None,
            "epsilon": self.epsilon,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [LLCRecord(**{**record, "result": LLCResult(**record["result"])}) for record in state["history"]]
        self.transitions = [Transition(**transition) for transition in state["transitions"]]
        self.last_step = state["last_step"]
        if self.detector is not None and state["detector"] is not None:
            self.detector.load_state_dict(state["detector"])
        if self.config.epsilon == "auto" and state.get("epsilon") is not None:
            self.epsilon = state["epsilon"]

