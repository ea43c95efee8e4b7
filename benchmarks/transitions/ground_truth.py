"""Ground truth from the full-training-set loss, never from λ̂: plateau-then-drop episodes.

The rule (the same as :class:`~lightning_devinterp.detection.loss_drops.LossDropDetector`'s, without its noise
guard, on the loss over the whole training set recorded every 10 steps):

- s(t): the mean of log L(t') over t' in (t - 50, t];  R(t) = s(t - 100) - s(t), the fall over 100 steps;
- an episode is triggered at the first t with R(t) > 0.1 (a 10% fall in 100 steps) such that |R| stayed at most
  0.05 (half the threshold) over the 100 steps that precede the fall's window (a plateau); t must leave room
  for both, so nothing
  counts in the first 250 steps;
- it *starts* at the first step after t - 100 where s has fallen 0.025 below s(t - 100) (a quarter of the
  threshold: where the fall became visible) and *ends* at the last step of the stretch with R > 0.05;
- the next episode needs a new plateau. A loss that decays smoothly from initialisation has no plateau before its
  fall and so no episode: every report on such a run is a false alarm.

Where a family knows each stage's own part of the loss (a linear network's teacher modes, a superposition model's
features), :func:`stages` takes each stage from it instead, so that stages a short plateau apart stay two. A stage
runs from 10% to 90% learnt, in the part's residual amplitude (the square root of its excess over its final value:
for a linear mode, how much of the mode is still missing). It counts only if the full-set loss falls by at least the
threshold (0.1 in log) over it and the part's own fall alone is that much of the full-set loss (a part that barely
moves, such as a feature that stays unrepresented, spans the other stages between its 10% and 90% and would
otherwise borrow their fall), only inside an episode of the rule above (which says where the loss falls after a
plateau; the stages split an episode that holds several). Overlapping stages merge. An episode that holds no stage
stays an episode of its own (a fall shared by many parts, none of which falls enough alone: a superposition model's
features adjusting together before the first is learnt).

A stage that starts before step 250 (before any plateau can have been seen), or less than :data:`MIN_PAUSE` steps
after the previous stage ends (no series shows a plateau between them), is *optional*: a report of its own is not
false, and no report is no miss.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

WINDOW, LAG, DROP, PLATEAU, PLATEAU_STEPS = 50, 100, 0.1, 0.05, 100


@dataclass(frozen=True)
class Episode:
    trigger: int
    start: int
    end: int
    optional: bool = False


def episodes(full_loss: list[tuple[int, float]]) -> list[Episode]:
    steps = [step for step, _ in full_loss]
    logs = [math.log(max(value, 1e-30)) for _, value in full_loss]
    smoothed: dict[int, float] = {}
    for index, step in enumerate(steps):
        inside = [logs[j] for j in range(index, -1, -1) if steps[j] > step - WINDOW]
        if steps[0] <= step - WINDOW + (steps[1] - steps[0] if len(steps) > 1 else 0):
            smoothed[step] = sum(inside) / len(inside)

    def s_at(step: int) -> float | None:
        known = [at for at in smoothed if at <= step]
        return smoothed[max(known)] if known else None

    rates = {}
    for step in smoothed:
        earlier = s_at(step - LAG)
        if earlier is not None and min(smoothed) <= step - LAG:
            rates[step] = earlier - smoothed[step]

    def calmest_band(step: int) -> float | None:
        bands = []
        for end in range(step - LAG, step - 3 * LAG - 1, -10):
            if end - PLATEAU_STEPS < min(smoothed):
                continue
            inside = [value for at, value in smoothed.items() if end - PLATEAU_STEPS <= at <= end]
            bands.append(max(inside) - min(inside))
        return min(bands) if bands else None

    found: list[Episode] = []
    ordered = sorted(rates)
    index = 0
    while index < len(ordered):
        step = ordered[index]
        band = calmest_band(step) if rates[step] > DROP else None
        if band is not None and band <= PLATEAU and rates[step] > 2 * band and (not found or step > found[-1].end):
            level = s_at(step - LAG)
            start = next(at for at in sorted(smoothed) if at > step - LAG and smoothed[at] < level - DROP / 4)
            end_index = index
            while end_index + 1 < len(ordered) and rates[ordered[end_index + 1]] > DROP / 2:
                end_index += 1
            found.append(Episode(trigger=step, start=start, end=ordered[end_index]))
            index = end_index + 1
            continue
        index += 1
    return found


EARLIEST = WINDOW + LAG + PLATEAU_STEPS
"""A stage that starts before this step is optional, as no episode is found before it."""

STAGE_START, STAGE_END = 0.1, 0.9
"""A stage runs from this share learnt to this one (in residual amplitude)."""

MIN_PAUSE = 80
"""A stage that starts less than this many steps after the previous one ends is optional: a report of its own is
not false, and missing it is no miss. The detector is asked to close a stage at a plateau of at least its smallest
time scale (100 steps), and the staged families draw their pauses from 80 steps; where the stages' own parts
interact, a realised pause can come out shorter than drawn."""


def stages(stage_losses: list[tuple[int, list[float]]], full_loss: list[tuple[int, float]]) -> list[Episode]:
    """One episode per stage that the full-set loss shows, and each episode of the full-set loss that holds no stage
    (see the module docstring), in order; overlapping stages are merged.
    """
    full = dict(full_loss)
    visible: list[Episode] = []
    for part in range(len(stage_losses[0][1])):
        series = [(step, values[part]) for step, values in stage_losses]
        own = dict(series)
        first, last = series[0][1], series[-1][1]
        start, end = (
            next((step for step, value in series if value - last < (1 - share) ** 2 * (first - last)), None)
            for share in (STAGE_START, STAGE_END)
        )
        if (
            start is not None
            and end is not None
            and math.log(full[start] / full[end]) >= DROP
            and own[start] - own[end] >= (1 - math.exp(-DROP)) * full[start]
        ):
            visible.append(Episode(trigger=start, start=start, end=end))
    merged: list[Episode] = []
    for episode in sorted(visible, key=lambda e: e.start):
        if merged and episode.start <= merged[-1].end:
            merged[-1] = dataclasses.replace(merged[-1], end=max(merged[-1].end, episode.end))
        elif merged and episode.start - merged[-1].end < MIN_PAUSE:
            merged.append(dataclasses.replace(episode, optional=True))
        else:
            merged.append(episode)
    falls = episodes(full_loss)
    shown = [stage for stage in merged if stage.start >= EARLIEST and any(_overlap(stage, fall) for fall in falls)]
    unexplained = [fall for fall in falls if not any(_overlap(stage, fall) for stage in shown)]
    early = [dataclasses.replace(stage, optional=True) for stage in merged if stage.start < EARLIEST]
    return sorted(shown + unexplained + early, key=lambda episode: episode.start)


def _overlap(first: Episode, second: Episode) -> bool:
    """Whether two episodes share a step."""
    return first.start <= second.end and second.start <= first.end
