"""The work behind ``LLCMonitor``, free of Trainer hooks: how large each estimate is, which step size it uses,
sampling split across processes, the history of estimates and transition detection. The callback decides when
and reports where; this decides what.

Like Lightning's ``SpikeDetection`` over its Fabric-level helper, the tracker needs only a strategy's collectives
(``all_gather``, ``broadcast``, ``reduce``), so it runs under a Trainer or under Fabric.

Across a run the tracker keeps one step size (λ̂ depends on it, so a curve is comparable only at one epsilon):
with ``epsilon="adaptive"`` the first estimate adapts it during a longer burn-in, and later estimates reuse it;
only when health demands it (a chain diverges, or the MALA acceptance falls below the health floor as the
landscape sharpens) is the estimate retried at once with a freshly adapted step, and the change is marked. Chains
are warm-started: each estimate starts them at the new w* plus the previous estimate's final offsets, which are
near-stationary when w* has moved little, so that short estimates are not dominated by burn-in.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lightning_devinterp._rng import preserved_rng_states
from lightning_devinterp.detection.combined import TransitionEvidence
from lightning_devinterp.detection.transition import Transition
from lightning_devinterp.sampling.calibration import CalibrationResult, calibrate_on_source
from lightning_devinterp.sampling.chains import ChainRun, loss_at_w_star, run_chains
from lightning_devinterp.sampling.config import Epsilon, SamplingConfig
from lightning_devinterp.sampling.data import MinibatchSource
from lightning_devinterp.sampling.health import MIN_ACCEPTANCE
from lightning_devinterp.sampling.model_view import LossFn
from lightning_devinterp.sampling.result import LLCEstimationError, LLCResult, summarize_chains
from lightning_devinterp.sampling.susceptibility import ProbeLosses, ProbeSpec
from lightning_devinterp.tracking.distributed import Collective, chains_per_rank, derive_seed, gather_run

ADAPTATION_BURNIN = 60
"""Burn-in of an estimate that adapts the step size (its first half adapts): short, because its cost comes before
anything is known about the budget; later estimates keep the step and warm-start their chains."""


@dataclasses.dataclass(frozen=True)
class ChainShape:
    """How many chains, burn-in steps and draws one estimate takes."""

    num_chains: int
    num_burnin_steps: int
    num_draws: int

    @property
    def num_steps(self) -> int:
        return self.num_burnin_steps + self.num_draws


SMALLEST = ChainShape(num_chains=4, num_burnin_steps=10, num_draws=30)
"""The smallest estimate the budget sizes down to, unless recent estimates were precise enough for fewer draws
(warm-started chains need little burn-in; four chains, because the spread across chains is what the health checks
judge drift against and what the standard error is partly estimated from)."""

LARGEST = ChainShape(num_chains=4, num_burnin_steps=50, num_draws=200)
"""The largest estimate the budget sizes up to (also the chain shape of the explicit schedules)."""

TARGET_RELATIVE_ERROR = 0.05
"""The relative standard error of λ̂ the budgeted schedule sizes its estimates for: no more draws than recent
estimates say reach it, and, where they say fewer than :data:`SMALLEST`'s reach it, as few as :data:`FEWEST_DRAWS`,
so that the budget affords more estimates."""

FEWEST_DRAWS = 10
"""The fewest draws per chain of a budgeted estimate, however precise recent estimates were."""

PRECISION_HISTORY = 3
"""Recent healthy estimates whose standard errors, per draw, size the next one (their median, as each is rough)."""

PAIRING_PAYS = 1.25
"""Paired draws cost a forward pass at w* per step (25% more per estimate on a small MLP, 58% on a CNN, on a CPU):
the monitor keeps pairing while the last paired estimate's :attr:`~lightning_devinterp.LLCResult.pairing_gain` (how
much pairing cut the variance of λ̂ itself) exceeds this, and otherwise draws unpaired, which estimates the same λ̂
for less."""

PAIRING_RECHECK = 5
"""While it draws unpaired, the monitor pairs every this-many-th estimate again, to see whether pairing pays by then."""

RELAXED_ENOUGH = 0.9
"""Estimates are cut to their precision target only while the chains have relaxed this far (``relaxed_share``):
until then, steps spent sampling also move the chains towards their long-run spread."""


@dataclasses.dataclass(frozen=True)
class LLCRecord:
    """One estimate taken during training, at optimizer step ``step``; ``seconds`` is its wall time.
    ``epsilon_changed`` marks an estimate whose step size differs from the previous estimate's.
    """

    step: int
    llc_mean: float
    llc_std: float
    result: LLCResult
    seconds: float
    epsilon_changed: bool = False

    @property
    def healthy(self) -> bool:
        return self.result.healthy


WHERE_TO_LOOK_COUNT = 2
"""How many groups and probe labels an end report names."""


def where_to_look(before: LLCResult, after: LLCResult) -> str:
    """The groups whose λ̂ changed most, and the (group, probe label) pairs whose mean susceptibility changed most,
    from ``before`` to ``after``, in words ("" when there are no groups and no probe).

    Args:
        before: the estimate before the change.
        after: the estimate after it.
    """
    groups = [
        (after.groups[name].llc_mean - group.llc_mean, name)
        for name, group in before.groups.items()
        if name in after.groups
    ]
    old, new = before.susceptibility_summary(), after.susceptibility_summary()
    susceptibilities = [
        (new[group][label] - value, f"{label} in {group}")
        for group, row in old.items()
        for label, value in row.items()
        if label in new.get(group, {})
    ]
    parts = [
        f"{quantity} of " + _largest(changes)
        for quantity, changes in (("λ̂", groups), ("χ", susceptibilities))
        if changes
    ]
    return "; ".join(parts)


def _largest(changes: list[tuple[float, str]]) -> str:
    """The :data:`WHERE_TO_LOOK_COUNT` largest ``(change, where)`` pairs by size, as ``"where +change, ..."``."""
    largest = sorted(changes, key=lambda item: -abs(item[0]))[:WHERE_TO_LOOK_COUNT]
    return ", ".join(f"{where} {change:+.3g}" for change, where in largest)


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place among those that share the chains, and the collectives that join them."""

    world_size: int = 1
    rank: int = 0
    collective: Collective | None = None

    def average(self, value: float) -> float:
        """The mean of ``value`` over the processes."""
        if self.collective is None:
            return value
        return float(
            self.collective.reduce(
                torch.tensor(value, dtype=torch.float64, device=self.collective.root_device), reduce_op="mean"
            )
        )

    def agree(self, value: Any) -> Any:
        """Rank zero's ``value`` on every rank (for decisions made from wall-clock time)."""
        return value if self.collective is None else self.collective.broadcast(value, src=0)


@dataclasses.dataclass(frozen=True)
class EstimateInputs:
    """What an estimate at one step is taken of (the module and its loss), on what data, and under which processes;
    ``forward_context`` wraps every loss evaluation (the Trainer's autocast, for instance).
    """

    module: nn.Module
    loss_fn: LossFn
    source: MinibatchSource
    processes: Processes = Processes()
    forward_context: Callable[[], ContextManager[Any]] = nullcontext


class LLCTracker:
    """Estimates at the steps it is asked to, keeps their history and feeds them to a transition detector.

    ``config`` holds the sampling settings; a chain-shape setting left as None is sized to the time allowed
    (see :meth:`shape_for`). nbeta is resolved in :meth:`start`. With ``epsilon="auto"`` the first estimate
    calibrates epsilon and keeps it for the run (calibration is retried at later estimates while nothing qualifies).

    Args:
        config: the sampling settings.
        seed: seeds the chains (with the step and the rank).
        evidence: where estimates and losses go for transition detection.
        clock: the wall clock estimates are timed with, in seconds.
        probe: samples to attribute to; each estimate then carries their susceptibilities (None: no probe).
    """

    def __init__(
        self,
        config: SamplingConfig,
        seed: int,
        evidence: TransitionEvidence,
        clock: Callable[[], float] = time.perf_counter,
        probe: ProbeSpec | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.probe = probe
        self._probe_losses: ProbeLosses | None = None
        self.seed = seed
        self.evidence = evidence
        self.reset()

    def reset(self) -> None:
        """Forget everything learnt from a run: history, transitions, step size, chains and costs."""
        config = self.config
        self.evidence.reset()
        self.history: list[LLCRecord] = []
        self.transitions: list[Transition] = []
        self.last_step = -1
        self.nbeta: float | None = None
        self.epsilon: float | None = float(config.epsilon) if isinstance(config.epsilon, (int, float)) else None
        self.calibration: CalibrationResult | None = None
        self._offsets: dict[str, Tensor] | None = None
        self._offset_steps = 0
        self._costs: dict[tuple[int, bool], tuple[float, float]] = {}

    def start(self, num_samples: int | None) -> None:
        """Resolve nbeta for the training set's ``num_samples`` (ValueError when it cannot be derived)."""
        self.nbeta = self.config.resolve_nbeta(num_samples)

    # ---- how large --------------------------------------------------------------------------------------------

    def _cost(self, shape: ChainShape) -> float | None:
        """Predicted seconds of an estimate of ``shape`` (paired or not, as the next one will be), from measured ones
        of the same kind if any (None before the first).
        """
        if not self._costs:
            return None
        paired = self.pairs_next()
        measured = min(self._costs, key=lambda key: (key[1] != paired, abs(key[0] - shape.num_chains)))
        fixed, per_step = self._costs[measured]
        return fixed + shape.num_steps * per_step * math.sqrt(shape.num_chains / measured[0])

    def pairs_next(self) -> bool:
        """Whether the next estimate pairs its draws: as configured, unless the last healthy paired estimate in the
        history showed that pairing does not pay (:data:`PAIRING_PAYS`); then again every :data:`PAIRING_RECHECK`-th
        estimate. An unhealthy estimate (chains drifting below a w* that is no minimum, say) does not decide: its
        error is the drift's, not the noise pairing cancels.
        """
        if not self.config.paired:
            return False
        unpaired_since = 0
        for record in reversed(self.history):
            if record.result.paired and record.healthy:
                return not record.result.pairing_gain <= PAIRING_PAYS or unpaired_since + 1 >= PAIRING_RECHECK
            unpaired_since += not record.result.paired
        return True

    def draws_for_target(self) -> int | None:
        """Draws per chain that reach :data:`TARGET_RELATIVE_ERROR`: the median, over the healthy estimates with a
        positive λ̂ among the last :data:`PRECISION_HISTORY`, of the draws their standard errors say it takes (the
        squared error scaling as one over the draws); None while there are none, or while the latest of them had not
        relaxed (:data:`RELAXED_ENOUGH`).
        """
        recent = [
            record.result
            for record in self.history[-PRECISION_HISTORY:]
            if record.healthy and record.llc_mean > 0 and math.isfinite(record.result.llc_stderr)
        ]
        if not recent or not recent[-1].relaxed_share >= RELAXED_ENOUGH:
            return None
        per_draw = statistics.median(
            (result.llc_stderr / result.llc_mean) ** 2 * result.loss_trace.shape[1] for result in recent
        )
        return math.ceil(per_draw / TARGET_RELATIVE_ERROR**2)

    def smallest_shape(self) -> ChainShape:
        """The smallest estimate the budget sizes down to: :data:`SMALLEST`, with fewer draws (down to
        :data:`FEWEST_DRAWS`) where recent estimates say fewer reach :data:`TARGET_RELATIVE_ERROR`.
        """
        needed = self.draws_for_target()
        if needed is None or self.config.num_draws is not None:
            return SMALLEST
        return dataclasses.replace(SMALLEST, num_draws=min(max(needed, FEWEST_DRAWS), SMALLEST.num_draws))

    def shape_for(self, allowance: float | None, budgeted: bool = False) -> ChainShape | None:
        """The chain shape of the next estimate: the configured one where set, otherwise the largest that fits
        ``allowance`` seconds (None: no limit), between :meth:`smallest_shape` and :data:`LARGEST`; None if not even
        the smallest fits. Under a budget, until a cost has been measured: a small probe (the configured or largest
        chain count, :data:`SMALLEST`'s steps) whose cost then sizes the rest; once recent estimates say how many
        draws reach :data:`TARGET_RELATIVE_ERROR`, no more than that (the budget left goes to later estimates).
        """
        configured = {
            f: getattr(self.config, f)
            for f in ("num_chains", "num_burnin_steps", "num_draws")
            if getattr(self.config, f) is not None
        }
        largest = dataclasses.replace(LARGEST, **configured)
        cost = self._cost(largest)
        if cost is None and budgeted:
            return dataclasses.replace(
                SMALLEST, num_chains=largest.num_chains, **{k: v for k, v in configured.items() if k != "num_chains"}
            )
        needed = self.draws_for_target() if budgeted and "num_draws" not in configured else None
        if needed is not None and needed < largest.num_draws:
            largest = dataclasses.replace(
                largest,
                num_burnin_steps=configured.get("num_burnin_steps", SMALLEST.num_burnin_steps),
                num_draws=max(needed, FEWEST_DRAWS),
            )
            cost = self._cost(largest)
        if allowance is None or cost is None or cost <= allowance:
            return largest
        fixed = self._cost(dataclasses.replace(largest, num_burnin_steps=0, num_draws=0))
        per_step = (cost - fixed) / largest.num_steps  # type: ignore[operator]
        # When the schedule thins the plan it grants exactly the smallest estimate's predicted cost: keep that
        # affordable despite rounding.
        steps = math.floor((allowance - fixed) / per_step + 1e-6)  # type: ignore[operator]
        burnin = configured.get(
            "num_burnin_steps", min(max(SMALLEST.num_burnin_steps, steps // 5), LARGEST.num_burnin_steps)
        )
        draws = configured.get("num_draws", min(steps - burnin, largest.num_draws))
        if draws >= self.smallest_shape().num_draws and burnin + draws <= steps:
            return ChainShape(largest.num_chains, burnin, draws)
        return None

    def smallest_cost(self) -> float | None:
        """Predicted seconds of the smallest estimate (:meth:`smallest_shape`): what the budget plans with."""
        return self._cost(self.smallest_shape())

    # ---- which step size ----------------------------------------------------------------------------------------

    def calibrate(self, step: int, inputs: EstimateInputs) -> CalibrationResult:
        """Resolve ``epsilon="auto"``: calibrate on every rank alike, then take rank zero's choice everywhere."""
        config = dataclasses.replace(self.config, nbeta=self.nbeta).with_defaults(**dataclasses.asdict(LARGEST))
        calibration, _ = calibrate_on_source(
            inputs.module,
            inputs.loss_fn,
            inputs.source,
            config,
            seed=derive_seed(self.seed, step, 0),
            forward_context=inputs.forward_context,
        )
        chosen = inputs.processes.agree(calibration.best.epsilon if calibration.best is not None else 0.0)
        if not chosen:
            raise LLCEstimationError(
                f"epsilon='auto' at step {step}: {calibration.message} Calibration is retried at the next estimate."
            )
        self.epsilon, self.calibration = float(chosen), calibration
        return calibration

    # ---- sampling ------------------------------------------------------------------------------------------------

    def _run(
        self, step: int, inputs: EstimateInputs, shape: ChainShape, epsilon: Epsilon
    ) -> tuple[LLCResult, ChainRun | None]:
        """This process's share of the chains, gathered with every other process's; the same result on every rank.
        Warm-started chains count the steps they ran before (:attr:`LLCResult.steps_before_draws`).
        """
        assert self.nbeta is not None
        config = dataclasses.replace(
            self.config, nbeta=self.nbeta, epsilon=epsilon, paired=self.pairs_next(), **dataclasses.asdict(shape)
        )
        processes = inputs.processes
        counts = chains_per_rank(shape.num_chains, processes.world_size)
        start_offsets = self._warm_start(counts[processes.rank]) if epsilon != "adaptive" else None
        prior_steps = self._offset_steps if start_offsets is not None else 0
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
                    average=processes.average,
                    start_offsets=start_offsets,
                    clock=self.clock,
                    observables=self._observables(inputs),
                )
        except Exception as caught:
            if processes.collective is None:
                raise
            error = caught
        if processes.collective is None:
            assert local is not None
            return self._summarize(local, config, prior_steps), local
        gathered = gather_run(processes.collective, local, counts)
        if gathered is None:
            if error is not None:
                raise error
            raise LLCEstimationError("the estimate failed on another rank.")
        return self._summarize(gathered, config, prior_steps), local

    def _observables(self, inputs: EstimateInputs) -> list[ProbeLosses]:
        """The probe's observable for this estimate (its batches read once and kept, per device)."""
        if self.probe is None:
            return []
        device = inputs.source.device
        if self._probe_losses is None or self._probe_losses.device != device:
            self._probe_losses = self.probe.observable(inputs.module, device)
        return [self._probe_losses.bound_to(inputs.module)]

    def _summarize(self, run: ChainRun, config: SamplingConfig, prior_steps: int) -> LLCResult:
        result = summarize_chains(run, config, prior_steps)
        return result if self.probe is None else result.with_probe_labels(self.probe.labels)

    def _warm_start(self, num_chains: int) -> dict[str, Tensor] | None:
        """The previous estimate's final offsets, if it ran the same chains (per group) on this process."""
        if self._offsets is None:
            return None
        groups = 1 + len(self.config.param_groups or {})
        return self._offsets if next(iter(self._offsets.values())).shape[0] == groups * num_chains else None

    def sample(self, step: int, inputs: EstimateInputs, shape: ChainShape) -> tuple[LLCResult, bool]:
        """One estimate at ``step``: the result, and whether its step size differs from the previous estimate's.

        Adapts the step size when none is set yet; retries once with a freshly adapted step (cold chains) when a
        chain diverged or the acceptance fell below the health floor at the kept step size.
        """
        started = self.clock()
        adapting = self.epsilon is None
        previous_epsilon = next((record.result.epsilon for record in reversed(self.history) if record.step > 0), None)
        if adapting:
            shape = dataclasses.replace(shape, num_burnin_steps=max(shape.num_burnin_steps, ADAPTATION_BURNIN))
        may_readapt = not adapting and self.config.epsilon == "adaptive"
        try:
            result, local = self._run(step, inputs, shape, "adaptive" if adapting else self.epsilon)  # type: ignore[arg-type]
            step_fits = not (result.failed_chains or result.acceptance_mean < MIN_ACCEPTANCE)
        except LLCEstimationError:
            if not may_readapt:
                raise
            step_fits = False
        if may_readapt and not step_fits:
            self._offsets = None
            shape = dataclasses.replace(shape, num_burnin_steps=max(shape.num_burnin_steps, ADAPTATION_BURNIN))
            result, local = self._run(step, inputs, shape, "adaptive")
            adapting = True
        self._offsets = local.final_offsets if local is not None and not result.failed_chains else None
        self._offset_steps = (
            (result.steps_before_draws or 0) + shape.num_draws * self.config.num_steps_bw_draws
            if self._offsets is not None
            else 0
        )
        if adapting and step > 0:
            # At step 0 w* is a random initialisation, whose curvature says little about the trained model's: the
            # step adapted there serves that estimate only, and the first estimate after training began sets it.
            self.epsilon = result.epsilon
        if local is not None:
            total = self.clock() - started
            self._costs[(shape.num_chains, result.paired)] = (
                max(total - local.sampling_seconds, 0.0),
                local.sampling_seconds / max(shape.num_steps, 1),
            )
        return result, previous_epsilon is not None and result.epsilon != previous_epsilon

    # ---- history and detection ----------------------------------------------------------------------------------

    def record(self, step: int, result: LLCResult, seconds: float, epsilon_changed: bool = False) -> LLCRecord:
        """Add a finished estimate to the history."""
        record = LLCRecord(step, result.llc_mean, result.llc_std, result, seconds, epsilon_changed)
        self.history.append(record)
        return record

    def detect(self, record: LLCRecord, fixed_data: bool = True) -> Transition | None:
        """Feed an estimate to the evidence (with its standard error over chains, and L(w*) when the data it is
        computed on is the same at every estimate, ``fixed_data``); the transition reported, if any. A change of step
        size shifts λ̂ without any change in the model, so λ̂'s series starts over at it.
        """
        if record.epsilon_changed:
            self.evidence.reset_llc()
        alive = record.result.num_chains_used
        standard_error = record.llc_std / math.sqrt(alive) if alive > 1 else None
        fixed_loss = record.result.init_loss if fixed_data else None
        return self._keep(
            self.evidence.observe_llc(record.step, record.llc_mean, standard_error, record.healthy, fixed_loss)
        )

    def read_fixed_loss(self, step: int, inputs: EstimateInputs) -> tuple[float, Transition | None]:
        """L(w*) on the estimates' fixed data at ``step``, between estimates (a forward pass, no chains), fed to the
        loss-drop detector; the value, and the onset or end it reports, if any.
        """
        chunk_size = inputs.source.batch_size * SMALLEST.num_chains
        value = loss_at_w_star(inputs.module, inputs.loss_fn, inputs.source, chunk_size, inputs.forward_context)
        return value, self._keep(self.evidence.observe_fixed_loss(step, value))

    def observe_loss(self, step: int, loss: float) -> Transition | None:
        """Feed the training loss at ``step``; the onset or end of a loss drop, if one is reported."""
        return self._keep(self.evidence.observe_loss(step, loss))

    def _keep(self, transition: Transition | None) -> Transition | None:
        if transition is not None:
            if not transition.is_onset:
                transition = self._with_where_to_look(transition)
            self.transitions.append(transition)
        return transition

    def _with_where_to_look(self, end: Transition) -> Transition:
        """An end report with the groups and probe labels that changed most since the healthy estimate before its
        onset (unchanged when there are no groups or probe, or no such pair of estimates).
        """
        onset = next((t.step for t in reversed(self.transitions) if t.is_onset and t.step <= end.step), None)
        healthy = [record for record in self.history if record.healthy]
        before = next((r for r in reversed(healthy) if onset is not None and r.step <= onset), None)
        after = healthy[-1] if healthy else None
        if before is None or after is None or after.step <= before.step:
            return end
        words = where_to_look(before.result, after.result)
        return dataclasses.replace(end, where_to_look=words) if words else end

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [
                {
                    **{f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != "result"},
                    "result": dataclasses.asdict(record.result),
                }
                for record in self.history
            ],
            "transitions": [dataclasses.asdict(transition) for transition in self.transitions],
            "last_step": self.last_step,
            "evidence": self.evidence.state_dict(),
            "epsilon": self.epsilon,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [LLCRecord(**{**record, "result": LLCResult(**record["result"])}) for record in state["history"]]
        self.transitions = [Transition(**transition) for transition in state["transitions"]]
        self.last_step = state["last_step"]
        if state.get("evidence") is not None:
            self.evidence.load_state_dict(state["evidence"])
        if not isinstance(self.config.epsilon, (int, float)) and state.get("epsilon") is not None:
            self.epsilon = state["epsilon"]
