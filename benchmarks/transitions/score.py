"""Replay recorded runs through the monitor's detection and score it against the ground truth.

The replay is what ``LLCMonitor()`` does online: the minibatch loss at every step goes to
:class:`~lightning_devinterp.detection.combined.TransitionEvidence`, and λ̂ estimates arrive every ``baseline``
steps (from step ``baseline`` on), plus every 25 steps while the evidence asks for dense estimates (densify).
A run recorded with an explicit schedule (``every_n_steps``, the staircases) is replayed with it: estimates every
that many steps and no denser ones. Each estimate comes with L(w*), the loss on the monitor's data, which for these
runs (whose data fits the monitor's cache) is the loss over the whole training set: the replay takes the full-set
loss recorded at or before the estimate's step (every 10 steps, so up to 5 steps stale at the dense steps: never
earlier than the monitor's). Between estimates the monitor also reads L(w*) alone, every ``fixed_loss_every`` steps
after the last estimate or reading (it spaces them by their cost; the replay takes a fixed spacing, as if the budget
always had room; the value is again the recorded one at or before the step, up to 9 steps stale). ``fixed_loss=False``
replays without L(w*).

Metrics per family, for reports (onsets) only:
- recall: an episode counts as found when a report of its own (each report serves one episode) lies between its
  start minus one estimation interval (``baseline``) and its end plus 150 steps; an optional one (a stage that starts
  before step 250 or too soon after the previous, see ``ground_truth``) takes a report if there is one, and counts
  neither way;
- false reports per run: reports that found no episode (on control runs, every report);
- median latency: from an episode's start to its report, over found episodes;
- median end latency: from an episode's end to the first end report after its onset, over found episodes;
- impossible: the share of reports whose ``before`` lies outside the range of values the series showed so far.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from benchmarks.transitions.families import CONTROLS
from benchmarks.transitions.ground_truth import Episode, episodes, stages
from benchmarks.transitions.record import GRID
from lightning_devinterp.detection.combined import TransitionEvidence, detect_transitions
from lightning_devinterp.detection.level_shifts import LevelShiftDetector
from lightning_devinterp.detection.loss_drops import FIXED_DATA_METRIC, LossDropDetector
from lightning_devinterp.detection.transition import Transition
from lightning_devinterp.tracking.schedule import FixedLossReadings

RECALL_BEFORE = 100
RECALL_AFTER = 150


def replay(
    series: dict[str, Any],
    baseline: int = 100,
    densify: bool = True,
    loss_settings: dict[str, Any] | None = None,
    llc_settings: dict[str, Any] | None = None,
    fixed_loss: bool = True,
    fixed_loss_every: int | None = None,
) -> tuple[list[Transition], list[tuple[int, float]]]:
    """The reports the monitor would make on this run, and the (step, λ̂) points it would have seen. Settings
    (``None`` for a detector turns it off) default to the detectors' defaults.
    """
    evidence = TransitionEvidence(
        LossDropDetector(**loss_settings) if loss_settings is not None else None,
        LevelShiftDetector(**llc_settings) if llc_settings is not None else None,
    )
    estimates = {entry["step"]: entry for entry in series["llc"]}
    full_loss = sorted(series["full_loss"])
    reports: list[Transition] = []
    seen: list[tuple[int, float]] = []
    last = -1
    readings = FixedLossReadings()  # the monitor's rule, at the fixed spacing
    readings.every = fixed_loss_every or 0
    epsilon_changed = False  # at a recorded estimate the replay skipped: the next one it takes uses the new step
    for step, loss in series["minibatch_loss"]:
        found = evidence.observe_loss(step, loss)
        if found is not None:
            reports.append(found)
        due = step > 0 and (
            step % baseline == 0 or (densify and evidence.wants_dense_estimates and step - last >= GRID)
        )
        epsilon_changed = epsilon_changed or (step in estimates and estimates[step]["epsilon_changed"])
        if due and step in estimates:
            last = step
            entry = estimates[step]
            if epsilon_changed:
                evidence.reset_llc()
                epsilon_changed = False
            seen.append((step, entry["mean"]))
            standard_error = (
                entry["std"] / math.sqrt(entry["chains"])
                if entry["chains"] > 1 and math.isfinite(entry["std"])
                else None
            )
            at_w_star = _loss_at(full_loss, step) if fixed_loss else None
            found = evidence.observe_llc(step, entry["mean"], standard_error, entry["healthy"], fixed_loss=at_w_star)
            if found is not None:
                reports.append(found)
        elif fixed_loss and fixed_loss_every and readings.due(step, last):
            readings.last_step = step
            at_w_star = _loss_at(full_loss, step)
            found = evidence.observe_fixed_loss(step, at_w_star) if at_w_star is not None else None
            if found is not None:
                reports.append(found)
    return reports, seen


def _loss_at(full_loss: list[tuple[int, float]], step: int) -> float | None:
    """The full-set loss recorded at or before ``step`` (L(w*) at an estimate there)."""
    return next((value for at, value in reversed(full_loss) if at <= step), None)


def offline(series: dict[str, Any], baseline: int = 100) -> tuple[list[Transition], list[tuple[int, float]]]:
    """What ``lightning-devinterp analyze`` reports from checkpoints every ``baseline`` steps: λ̂, its health and
    L(w*) at each, no training loss and no denser estimates; and the (step, λ̂) points it saw.
    """
    full_loss = sorted(series["full_loss"])
    chosen = [entry for entry in series["llc"] if entry["step"] > 0 and entry["step"] % baseline == 0]
    reports = detect_transitions(
        [entry["step"] for entry in chosen],
        [entry["mean"] for entry in chosen],
        metric="llc/mean",
        healthy=[entry["healthy"] for entry in chosen],
        fixed_losses=[_loss_at(full_loss, entry["step"]) for entry in chosen],
    )
    return reports, [(entry["step"], entry["mean"]) for entry in chosen]


def agreement(series: dict[str, Any], baseline: int = 100) -> tuple[int, int]:
    """How many of the online onsets have an offline one (:func:`offline`) within ``baseline`` steps, of how many."""
    online = [
        report.step
        for report in replay(series, baseline=baseline, loss_settings={}, llc_settings={})[0]
        if report.is_onset
    ]
    later = [report.step for report in offline(series, baseline)[0] if report.is_onset]
    return sum(any(abs(step - other) <= baseline for other in later) for step in online), len(online)


@dataclass
class Score:
    runs: int = 0
    episodes: int = 0
    found: int = 0
    false: int = 0
    reports: int = 0
    impossible: int = 0
    latencies: list[int] = field(default_factory=list)
    end_latencies: list[int] = field(default_factory=list)

    def add(self, other: Score) -> None:
        for name in ("runs", "episodes", "found", "false", "reports", "impossible"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latencies += other.latencies
        self.end_latencies += other.end_latencies

    def row(self) -> str:
        recall = f"{self.found / self.episodes:.0%}" if self.episodes else "-"
        latency, end_latency = (
            f"{statistics.median(values):.0f}" if values else "-" for values in (self.latencies, self.end_latencies)
        )
        impossible = f"{self.impossible / self.reports:.0%}" if self.reports else "-"
        return (
            f"{self.runs:>4} {self.episodes:>8} {recall:>7} {self.false / max(self.runs, 1):>9.2f} {latency:>8} "
            f"{end_latency:>8} {impossible:>10}"
        )


def ground_truth(series: dict[str, Any]) -> list[Episode]:
    """The run's episodes: none on a control, each stage's own where they were recorded, else the full-set loss's."""
    if series["family"] in CONTROLS:
        return []
    if "stage_losses" in series:
        return stages(series["stage_losses"], series["full_loss"])
    return episodes(series["full_loss"])


def score_run(series: dict[str, Any], post_hoc: bool = False, **replay_kwargs: Any) -> Score:
    """Score the monitor's reports (or, ``post_hoc``, those of :func:`offline`) on one run. A control run has no
    episode by definition: every report there is a false alarm.
    """
    truth = ground_truth(series)
    if series.get("every_n_steps"):
        replay_kwargs = {**replay_kwargs, "baseline": series["every_n_steps"], "densify": False}
    if post_hoc:
        reports, seen = offline(series, replay_kwargs.get("baseline", 100))
    else:
        reports, seen = replay(series, **{"loss_settings": {}, "llc_settings": {}, **replay_kwargs})
    onsets = [report for report in reports if report.is_onset]
    ends = [report for report in reports if not report.is_onset]
    result = Score(runs=1, episodes=sum(not episode.optional for episode in truth), reports=len(onsets))
    unused = list(onsets)
    for episode in sorted(truth, key=lambda episode: episode.optional):
        match = next((r for r in unused if episode.start - RECALL_BEFORE <= r.step <= episode.end + RECALL_AFTER), None)
        if match is not None:
            unused.remove(match)
            if episode.optional:
                continue
            result.found += 1
            result.latencies.append(match.step - episode.start)
            end = next((report for report in ends if report.step > match.step), None)
            if end is not None:
                result.end_latencies.append(end.step - episode.end)
    result.false = len(unused)
    losses = series["minibatch_loss"]
    for report in onsets:
        shown = [
            v
            for s, v in {"train_loss": losses, FIXED_DATA_METRIC: series["full_loss"]}.get(report.metric, seen)
            if s <= report.step
        ]
        if shown and not (min(shown) - 1e-9 <= report.before <= max(shown) + 1e-9):
            result.impossible += 1
    return result
