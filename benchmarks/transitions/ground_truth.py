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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW, LAG, DROP, PLATEAU, PLATEAU_STEPS = 50, 100, 0.1, 0.05, 100


@dataclass(frozen=True)
class Episode:
    trigger: int
    start: int
    end: int


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
