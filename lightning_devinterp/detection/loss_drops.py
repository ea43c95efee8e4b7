"""The earliest and cheapest sign of a transition: a training loss that, after a plateau, starts to fall fast.

The monitor sees the loss at every step. Its logarithm, smoothed by a running median over ``window`` steps, is
compared with its value ``lag`` steps earlier: the *rate* ``R(t) = s(t - lag) - s(t)`` (log units; with the
defaults, per 100 steps: 0.1 is a 10% fall). An onset needs three things at once:

- ``R`` above ``drop``, and above ``noise_z`` times its own noise (so minibatch noise cannot pass for a fall), and
  the smoothed log-loss now that far below the plateau's level too; and the fall as fast from the lowest smoothed
  value since the plateau ended (per ``lag`` steps, over the steps since that value): a loss that only comes back
  down from a spike, above its plateau or after it, has not fallen (Adam late in training makes such spikes in a
  loss that keeps decaying slowly);
- a *plateau* shortly before it: a stretch of ``plateau_steps`` over which the smoothed log-loss stayed within a
  band of ``plateau`` (or its noise), ending at most :data:`LOOKBACK` lags before the fall's window (a fall that
  accelerates gradually after a long plateau counts), and ``R`` now at least :data:`CONTRAST` times that band
  (a bump up and back down is not flat, and a steady decay whose rate wobbles does not pass for a plateau and a
  fall). A loss that falls smoothly from initialisation, as a regular model's does, never has one, so it is never
  reported;
- the smoothed series long enough to judge both (nothing is said in the first ``window + lag + plateau_steps``
  steps, but a plateau at the very start of training counts once it has lasted that long).

A slow fall under heavy minibatch noise is invisible at one scale and plain at a longer one, so the rule runs at
several ``scales`` k at once (window, lag and plateau times k, the same rate per ``lag`` steps: a threshold of
``drop`` x k over ``lag`` x k steps), each with its own noise; the first to fire reports. The noise of ``R``
shrinks as k^1.5 relative to the fall it measures, at the price of a later report.

The fall *ends* when ``R`` has stayed below half its threshold, or below :data:`SLOWED` of its fastest rate since
the onset (a fall that slowed that much has ended, even if a slower stage follows), for half a lag; or sooner, when
after such a dip ``R`` speeds up again past ``drop`` and :data:`CONTRAST` times the dip's slowest rate: the dip was
the pause between two stages, too short to stay calm for half a lag, and the end is dated from it. Whichever series
reported the onset, the end is judged by the one with the finest time resolution among those that saw the fall
clearly (a rate past :data:`CLEAR` times their onset threshold) or reported it: the every-step loss at its shortest
such scale, or the fixed-data loss below when its points are at least as close (its lag, or the gap between points
if longer). The next onset needs a new plateau, which may start a lag before ``R`` calmed (the loss had stopped
falling there); and for :data:`RESUME_WINDOW` lags after an end, a pause shorter than a plateau is enough: where the
loss fell slower than ``drop``, or than :data:`SLOWED` of the ended fall's fastest rate, for a while and then speeds
up again, at some scale, past that scale's threshold and :data:`CONTRAST` times the pause's slowest rate, to
``drop`` below the level at the end, the next stage has begun (a staircase). An onset's ``before`` is the plateau's
(or pause's) level (the median of its smoothed values), ``after`` the smoothed loss now.

The noise of ``R`` is the larger of two estimates: the robust spread of successive log-losses (1.4826 x median
absolute difference / √2) scaled to a ``window``-step running median (x 1.2533 / √window) and to a difference of
two of them (x √2), which is right for independent minibatch noise; and the robust spread of ``R`` itself over its
last :data:`RATE_HISTORY` lags outside transitions (the history starts over after each), which also sees the slow
wander of an optimizer such as Adam late in training (fluctuations that last tens of steps and do not average
out). A rate joins that history only once it shares no data with the rate being judged (``lag + window`` steps
later), so a fall that begins slowly does not raise the noise it is judged against.

A second, sparse series may come in through :meth:`LossDropDetector.update_fixed_data`: the loss on data that does
not change between calls (the monitor's L(w*), its loss over the whole training set at each estimate). It has no
minibatch noise, so a slow fall that the minibatch loss hides under its noise for hundreds of steps shows there
at the first estimate after it starts. The same rule applies to it point by point, without smoothing: a fall of
more than ``drop`` over at least ``lag`` steps, and as fast from the lowest point since the plateau, below the
level of a plateau whose band is at most ``plateau`` and ``CONTRAST`` times smaller than the fall. Its noise is
that of the weights, not of minibatches, and shows in the series' own calm rates: the fall must also exceed their
median plus :data:`FIXED_NOISE_Z` robust standard deviations, and a series whose calm rates have a median above
``plateau`` (a loss that keeps falling, as Adam's does late in training, in uneven steps whose pauses are no
plateaus) is not judged at all. Either series may report the onset; the other then waits for the transition's end.
Once the fixed-data loss has left its plateau by a quarter of ``drop``, :attr:`LossDropDetector.leaving_plateau`
asks for estimates sooner, so the next one confirms the fall.

The same rule, at scale 1 and without the noise guard, applied to the full-training-set loss, is how the
transitions benchmark (``benchmarks/transitions``) defines its ground truth.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Sequence
from statistics import median
from typing import Any, Literal

from lightning_devinterp._checks import check_count, check_number
from lightning_devinterp.detection.robust import robust_std
from lightning_devinterp.detection.transition import Transition
from lightning_devinterp.metric_names import LLC_INIT_LOSS

NOISE_SAMPLES = 200
"""Successive differences kept for the noise estimate."""

CONTRAST = 2.0
"""A fall must be at least this many times the band the plateau before it stayed in."""

LOOKBACK = 2
"""The plateau may end up to this many lags before the fall's window."""

RATE_HISTORY = 20
"""Lags of past rates whose robust spread is the second noise estimate."""

REFRESH = 10
"""Noise estimates (medians, so sorts) are refreshed every this many new values, not at every step."""

BAND_Z = 3.0
"""A plateau's band may be as wide as this many noise units of the smoothed log-loss (about the range that noise
alone gives a smoothed series over a plateau)."""

STRIDE_DIVISOR = 10
"""Each scale recomputes its running median and rate every window / this many steps (a few steps' delay, a tenth
of the cost at every step)."""

MEDIAN_EFFICIENCY = 1.2533
"""The standard error of a median of n Gaussian values is this many times that of their mean (√(π/2))."""

FIXED_NOISE_Z = 3.0
"""How many robust standard deviations of its own calm rates a fall of the fixed-data loss must exceed."""

FIXED_MIN_HISTORY = 4
"""Calm rates of the fixed-data loss needed before they set a noise floor."""

RESUME_WINDOW = 3
"""For this many lags after a transition's end, a fall that speeds up again is the next stage's onset."""

CLEAR = 2.0
"""A scale whose rate passed this many times its onset threshold saw the fall clearly enough to judge its end."""

SLOWED = 0.3
"""A fall whose rate has dropped below this share of its fastest rate (for half a lag) has ended."""

FIXED_DATA_METRIC = LLC_INIT_LOSS
"""The name reports give the fixed-data loss: what :class:`~lightning_devinterp.LLCMonitor` logs L(w*) as."""


class _CalmRates:
    """Rates seen while no transition was under way, for a noise estimate: each joins ``values`` only once it shares
    no data with the rate being judged, so a fall that begins slowly does not raise the noise it is judged against.
    """

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.pending: deque[tuple[int, float]] = deque()

    def keep(self, step: int, rate: float) -> None:
        self.pending.append((step, rate))

    def release(self, up_to: int) -> int:
        """Move the kept rates measured at or before step ``up_to`` into ``values``; how many moved."""
        moved = 0
        while self.pending and self.pending[0][0] <= up_to:
            self.values.append(self.pending.popleft()[1])
            moved += 1
        return moved

    def clear(self) -> None:
        self.values.clear()
        self.pending.clear()

    def state(self) -> dict[str, Any]:
        return {"history": list(self.values), "pending": [list(p) for p in self.pending]}

    def load(self, state: dict[str, Any]) -> None:
        self.values.extend(state.get("history", []))
        self.pending.extend((int(s), float(r)) for s, r in state.get("pending", []))


def _latest(points: deque[tuple[int, float]], step: int) -> tuple[int, float] | None:
    """The last of ``points`` (step-ordered ``(step, value)`` pairs) at or before ``step``; None if there is none."""
    return next((point for point in reversed(points) if point[0] <= step), None)


def _fall_per_lag(earlier: tuple[int, float], later: tuple[int, float], lag: int) -> float:
    """The fall from ``earlier`` to ``later`` (``(step, log value)`` points) per ``lag`` steps: over a longer gap,
    scaled down to ``lag`` steps.
    """
    return (earlier[1] - later[1]) * lag / max(later[0] - earlier[0], lag)


class _Scale:
    """The rule at one time scale: its smoothed series, its rates, and whether a fall it reported is under way."""

    def __init__(self, window: int, lag: int, plateau_steps: int, drop: float, plateau: float) -> None:
        self.window, self.lag, self.plateau_steps, self.drop, self.plateau = window, lag, plateau_steps, drop, plateau
        self.stride = max(1, window // STRIDE_DIVISOR)
        self.recent: deque[float] = deque(maxlen=window)
        self.smoothed: deque[tuple[int, float]] = deque()
        self.rates: deque[tuple[int, float]] = deque()
        self.calm = _CalmRates(RATE_HISTORY * lag // self.stride)
        self._wander = 0.0
        self._added = 0

    def noise(self, spread: float) -> float:
        """Standard deviation of R under noise alone: from the per-step log-noise ``spread`` (independent noise) or
        from R's own past spread (slow wander), whichever is larger.
        """
        independent = spread * MEDIAN_EFFICIENCY / math.sqrt(self.window) * math.sqrt(2)
        return max(independent, self._wander)

    def _remember(self, step: int, rate: float) -> None:
        """Keep a calm rate for the wander estimate, once it no longer shares data with the rate now measured (the
        ``lag + window`` steps behind it): a fall that begins slowly must not raise the noise it is judged against.
        """
        self.calm.keep(step, rate)
        before = self._added
        self._added += self.calm.release(step - self.lag - self.window)
        if self._added // REFRESH > before // REFRESH:
            self._wander = self._wander_of_history()

    def _wander_of_history(self) -> float:
        history = self.calm.values
        return robust_std(history) if len(history) >= 2 * self.lag // self.stride else 0.0

    def forget_rates(self) -> None:
        """Start the rates and their history over (after a transition has ended)."""
        self.rates.clear()
        self.calm.clear()
        self._wander = 0.0

    def add(self, step: int, log_value: float, calm: bool) -> float | None:
        """Add a log-loss; the current rate R, every ``stride`` steps once it can be computed. Only rates from
        ``calm`` stretches (no transition under way) go into the history behind the wander-noise estimate.
        """
        self.recent.append(log_value)
        if len(self.recent) < self.window or (self.smoothed and step - self.smoothed[-1][0] < self.stride):
            return None
        smoothed = median(self.recent)
        self.smoothed.append((step, smoothed))
        while self.smoothed and self.smoothed[0][0] < step - (LOOKBACK + 1) * self.lag - self.plateau_steps:
            self.smoothed.popleft()
        earlier = _latest(self.smoothed, step - self.lag)
        if earlier is None:
            return None
        rate = earlier[1] - smoothed
        if calm:
            self._remember(step, rate)
        self.rates.append((step, rate))
        while self.rates and self.rates[0][0] < step - self.lag:
            self.rates.popleft()
        return rate

    def level_at(self, step: int) -> float:
        """The smoothed log-loss at ``step`` (its last value at or before it; the oldest kept, if none is)."""
        return (_latest(self.smoothed, step) or self.smoothed[0])[1]

    def calmest_band(self, step: int, not_before: int) -> tuple[float, float, int] | None:
        """The narrowest band the smoothed log-loss stayed in over ``plateau_steps``, among stretches ending between
        ``LOOKBACK`` lags and zero before the fall's window (which starts ``lag`` before ``step``) and starting no
        earlier than ``not_before`` (the end of the last transition), with that stretch's median level and the step
        it ends at; None until the series reaches back far enough.
        """
        points = list(self.smoothed)
        if not points or points[0][0] > step - self.lag - self.plateau_steps:
            return None
        bands: list[tuple[float, float, int]] = []
        for end in range(step - self.lag, step - (LOOKBACK + 1) * self.lag - 1, -self.stride):
            if end - self.plateau_steps < not_before:
                break
            inside = [value for at, value in points if end - self.plateau_steps <= at <= end]
            if len(inside) >= 2 and points[0][0] <= end - self.plateau_steps + self.stride:
                bands.append((max(inside) - min(inside), median(inside), end))
        return min(bands) if bands else None

    def onset(
        self, step: int, rate: float, threshold: float, band_noise: float, signed: Any, not_before: int
    ) -> float | None:
        """If ``rate`` at ``step`` is a fall after a plateau (see the module docstring), the plateau's level, else
        None: ``threshold`` is what noise alone lets ``R`` reach, ``band_noise`` the band it lets a plateau span; the
        plateau must start no earlier than ``not_before``. The fall must also take the loss that far below the
        plateau's level, and be as fast from the lowest smoothed value since the plateau ended: not merely back down
        from a spike.
        """
        fast = max(self.drop, threshold)
        if signed(rate) <= fast:
            return None
        calmest = self.calmest_band(step, not_before)
        if calmest is None:
            return None
        band, plateau_level, plateau_end = calmest
        below = plateau_level - self.smoothed[-1][1]
        since = [point for point in self.smoothed if plateau_end <= point[0] <= step - self.lag]
        since.append(_latest(self.smoothed, step - self.lag) or self.smoothed[0])
        extreme = (min if rate > 0 else max)(since, key=lambda point: point[1])
        from_extreme = _fall_per_lag(extreme, self.smoothed[-1], self.lag)
        if (
            band <= max(self.plateau, band_noise)
            and signed(rate) > max(fast, CONTRAST * band)
            and signed(below) > fast
            and signed(from_extreme) > fast
            and below * rate > 0
        ):
            return plateau_level
        return None

    def state(self) -> dict[str, Any]:
        return {
            "recent": list(self.recent),
            "smoothed": [list(p) for p in self.smoothed],
            "rates": [list(p) for p in self.rates],
            **self.calm.state(),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.recent.clear()
        self.recent.extend(state["recent"])
        self.smoothed = deque((int(s), float(v)) for s, v in state["smoothed"])
        self.rates = deque((int(s), float(v)) for s, v in state["rates"])
        self.calm.clear()
        self.calm.load(state)
        self._wander = self._wander_of_history()


class _FixedData:
    """The fixed-data loss at sparse steps (log values), and the rule applied to it point by point."""

    def __init__(self, lag: int, plateau_steps: int, drop: float, plateau: float) -> None:
        self.lag, self.plateau_steps, self.drop, self.plateau = lag, plateau_steps, drop, plateau
        self.points: deque[tuple[int, float]] = deque()
        self.calm = _CalmRates(RATE_HISTORY)
        self._version = 0
        self._leaving: tuple[tuple[int, int], bool] | None = None

    def add(self, step: int, log_value: float) -> None:
        """Add a point; earlier rates that share no steps with the newest one join the history of calm rates."""
        self._version += 1
        self.points.append((step, log_value))
        horizon = step - (LOOKBACK + 2) * self.lag - self.plateau_steps
        while len(self.points) > 2 and self.points[1][0] <= horizon:
            self.points.popleft()
        self.calm.release(step - self.lag)

    def remember(self, rate: float | None) -> None:
        """Keep the newest point's rate, judged calm (no transition under way), for the history."""
        if rate is not None:
            self.calm.keep(self.points[-1][0], rate)

    def forget_rates(self) -> None:
        self._version += 1
        self.calm.clear()

    def noise_floor(self) -> float:
        """What the series' own calm rates let a fall reach: their median plus :data:`FIXED_NOISE_Z` robust
        standard deviations (zero until :data:`FIXED_MIN_HISTORY` are known); infinite when their median exceeds
        ``plateau``, since a loss that has kept falling that fast (Adam's, decaying in uneven steps) has no plateau
        for a pause in it to be one.
        """
        history = self.calm.values
        if len(history) < FIXED_MIN_HISTORY:
            return 0.0
        typical = median(history)
        return math.inf if typical > self.plateau else typical + FIXED_NOISE_Z * robust_std(history)

    def resolution(self) -> int:
        """The steps a fall's end may go unseen: the lag, or the gap between the last two points if longer."""
        gap = self.points[-1][0] - self.points[-2][0] if len(self.points) > 1 else self.lag
        return max(self.lag, gap)

    def rate(self) -> float | None:
        """The fall per ``lag`` steps from the latest point at least ``lag`` steps back to the newest one (over a
        longer gap, scaled down to ``lag`` steps); None without such a point.
        """
        earlier = _latest(self.points, self.points[-1][0] - self.lag)
        return None if earlier is None else _fall_per_lag(earlier, self.points[-1], self.lag)

    def calmest_plateau(self, not_before: int) -> tuple[float, float, float, int] | None:
        """The narrowest band (with its median level, lowest value and last step) that the points stayed in over at
        least ``plateau_steps``, among stretches ending at least ``lag`` before the newest point and at most
        ``LOOKBACK`` lags before that, and starting no earlier than ``not_before``; None if there is none.
        """
        step = self.points[-1][0]
        points = list(self.points)
        plateaus = []
        for index, (end, _) in enumerate(points):
            if not step - (LOOKBACK + 1) * self.lag <= end <= step - self.lag:
                continue
            first = max((i for i in range(index + 1) if points[i][0] <= end - self.plateau_steps), default=None)
            if first is None or points[first][0] < not_before:
                continue
            inside = [value for _, value in points[first : index + 1]]
            plateaus.append((max(inside) - min(inside), median(inside), min(inside), end))
        return min(plateaus) if plateaus else None

    def onset(self, not_before: int) -> tuple[float, float] | None:
        """The plateau's band and level if the newest point ends a fast fall after a plateau (see the module
        docstring), else None.
        """
        rate, plateau = self.rate(), self.calmest_plateau(not_before)
        if rate is None or plateau is None:
            return None
        band, level, _, end = plateau
        step, now = self.points[-1]
        lowest = min((point for point in self.points if end <= point[0] <= step - self.lag), key=lambda p: p[1])
        from_lowest = _fall_per_lag(lowest, self.points[-1], self.lag)
        fast = max(self.drop, CONTRAST * band, self.noise_floor())
        if band <= self.plateau and min(rate, from_lowest) > fast and level - now > self.drop:
            return band, level
        return None

    def leaving(self, not_before: int) -> bool:
        """True when the newest point lies a quarter of ``drop`` below the lowest value of a plateau before it (and
        the series is one that has plateaus: see :meth:`noise_floor`). The monitor asks at every training step, so
        the answer is kept until a point arrives or ``not_before`` moves.
        """
        key = (self._version, not_before)
        if self._leaving is None or self._leaving[0] != key:
            plateau = self.calmest_plateau(not_before) if self.points else None
            leaving = False
            if plateau is not None and plateau[0] <= self.plateau and self.noise_floor() != math.inf:
                leaving = self.points[-1][1] < plateau[2] - self.drop / 4
            self._leaving = (key, leaving)
        return self._leaving[1]


class LossDropDetector:
    """Reports when a positive, dense series (a training loss) starts to fall fast after a plateau, and when the fall
    ends (see the module docstring). ``direction="both"`` also reports fast rises after a plateau (a metric that
    climbs, or a loss that blows up).

    Args:
        metric: the name reported in each :class:`Transition`.
        window: steps of the running median of the log-loss (at scale 1).
        lag: steps over which the fall is measured (at scale 1).
        drop: the fall (log units per ``lag`` steps) that counts as fast; 0.1 is 10% per 100 steps.
        plateau: the largest ``|R|`` a plateau may show.
        plateau_steps: how long the plateau must last before the fall (at scale 1).
        noise_z: how many noise units ``R`` must exceed besides ``drop``.
        scales: the time scales k at which the rule runs.
        direction: ``"down"`` (falls only) or ``"both"``.
    """

    def __init__(
        self,
        metric: str = "train_loss",
        window: int = 50,
        lag: int = 100,
        drop: float = 0.1,
        plateau: float = 0.05,
        plateau_steps: int = 100,
        noise_z: float = 6.0,
        scales: Sequence[int] = (1, 2, 4),
        direction: Literal["down", "both"] = "down",
    ) -> None:
        for name, count in (("window", window), ("lag", lag), ("plateau_steps", plateau_steps)):
            check_count(name, count, 1)
        for name, number in (("drop", drop), ("plateau", plateau), ("noise_z", noise_z)):
            check_number(name, number)
        if plateau >= drop:
            raise ValueError(
                f"plateau ({plateau}) must be smaller than drop ({drop}): a plateau is where the loss is not falling fast."
            )
        if not scales or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in scales):
            raise ValueError(f"scales must be positive integers, got {scales!r}.")
        if direction not in ("down", "both"):
            raise ValueError(f"direction must be 'down' or 'both', got {direction!r}.")
        self.metric = metric
        self.window, self.lag, self.plateau_steps = window, lag, plateau_steps
        self.drop, self.plateau, self.noise_z = float(drop), float(plateau), float(noise_z)
        self.scales = tuple(sorted(set(scales)))
        self.direction = direction
        self.reset()

    def reset(self) -> None:
        """Forget the series."""
        self._last: tuple[int, float] | None = None
        self._differences: deque[float] = deque(maxlen=NOISE_SAMPLES)
        self._spread_cache: float | None = None
        self._since_spread = 0
        self._scales = [
            _Scale(self.window * k, self.lag * k, self.plateau_steps * k, self.drop * k, self.plateau * k)
            for k in self.scales
        ]
        self._fixed = _FixedData(self.lag, self.plateau_steps, self.drop, self.plateau)
        self._onset: dict[str, Any] | None = None
        self._calm_since: int | None = None
        self._not_before = -(2**62)
        self._resume: dict[str, Any] | None = None

    @property
    def in_transition(self) -> bool:
        """True between an onset and its end."""
        return self._onset is not None

    @property
    def leaving_plateau(self) -> bool:
        """True while, at the shortest scale, the loss falls at more than three quarters of the onset rate (and of its
        noise threshold), or the fixed-data loss has left its plateau: a transition may be starting, or is under way.
        """
        scale = self._scales[0]
        if bool(scale.rates) and self._signed(scale.rates[-1][1]) > 0.75 * max(scale.drop, self._threshold(scale)):
            return True
        return self.direction == "down" and self._fixed.leaving(self._not_before)

    @property
    def on_plateau(self) -> bool:
        """True when, at the shortest scale, the loss has stayed within a plateau's band over the last plateau:
        a change elsewhere (λ̂) is then not the loss still settling.
        """
        scale = self._scales[0]
        if self.in_transition or not scale.smoothed:
            return False
        latest = scale.smoothed[-1][0]
        inside = [value for at, value in scale.smoothed if at >= latest - scale.plateau_steps]
        covered = scale.smoothed[0][0] <= latest - scale.plateau_steps
        return covered and max(inside) - min(inside) <= max(scale.plateau, self._band_noise(scale))

    def _signed(self, rate: float) -> float:
        return abs(rate) if self.direction == "both" else rate

    def _spread(self) -> float:
        """The per-step log-noise: the robust spread of successive log-losses (refreshed every few values)."""
        if len(self._differences) < 10:
            return 0.0
        if self._spread_cache is None or self._since_spread >= REFRESH:
            self._spread_cache, self._since_spread = robust_std(self._differences) / math.sqrt(2), 0
        return self._spread_cache

    def _threshold(self, scale: _Scale) -> float:
        return self.noise_z * scale.noise(self._spread())

    def _band_noise(self, scale: _Scale) -> float:
        return BAND_Z * scale.noise(self._spread()) / math.sqrt(2)

    def update(self, step: int, value: float) -> Transition | None:
        """Add the loss at ``step``; return an onset or an end :class:`Transition`, or None. Non-positive or
        non-finite values are ignored; several values at one step (gradient accumulation) count once, the first.
        """
        value = float(value)
        if not math.isfinite(value) or value <= 0 or (self._last is not None and step <= self._last[0]):
            return None
        log_value = math.log(value)
        if self._last is not None:
            self._differences.append(log_value - self._last[1])
            self._since_spread += 1
        self._last = (int(step), log_value)
        rates = [scale.add(step, log_value, calm=self._onset is None) for scale in self._scales]
        if self._onset is not None:
            judge = self._judge(rates)
            if judge is None:
                return None
            rate = rates[judge]
            return None if rate is None else self._follow(step, judge, rate)
        resumed = self._resumed_fall(step, rates)
        if resumed is not None:
            return resumed
        for index, (scale, rate) in enumerate(zip(self._scales, rates)):
            if rate is None:
                continue
            level = scale.onset(
                step, rate, self._threshold(scale), self._band_noise(scale), self._signed, self._not_before
            )
            if level is not None:
                return self._begin(step, index, scale, rate, level)
        return None

    def update_fixed_data(self, step: int, value: float) -> Transition | None:
        """Add the loss on fixed data at ``step`` (sparse, free of minibatch noise: see the module docstring); return
        an onset or an end :class:`Transition` (its metric :data:`FIXED_DATA_METRIC`), or None. Only falls are
        judged on it; non-positive or non-finite values, and steps not after the last one, are ignored.
        """
        value = float(value)
        points = self._fixed.points
        if not math.isfinite(value) or value <= 0 or (points and step <= points[-1][0]):
            return None
        self._fixed.add(int(step), math.log(value))
        if self.direction != "down":
            return None
        if self._onset is None:
            plateau = self._fixed.onset(self._not_before)
            if plateau is None:
                self._fixed.remember(self._fixed.rate())
                return None
            return self._begin_fixed(int(step), *plateau)
        rate = self._fixed.rate()
        if rate is not None:
            self._onset["fixed_peak"] = max(self._onset.get("fixed_peak", 0.0), rate)
            if rate > max(self.drop, self._fixed.noise_floor()):
                self._onset["fixed_saw"] = True
        if self._onset.get("judge", self._onset["scale"]) is not None:
            return None
        now = self._fixed.points[-1][1]
        if not self._calmed(int(step), rate, self.drop, self.lag, self._onset.get("fixed_peak", 0.0), now):
            return None
        reporter = self._onset["scale"]
        noise = self._onset["band"] if reporter is None else self._scales[reporter].noise(self._spread())
        return self._end(int(step), now, self.lag, noise, FIXED_DATA_METRIC)

    def _begin_fixed(self, step: int, band: float, level: float) -> Transition:
        """An onset seen on the fixed-data loss; ``before`` is its plateau's level, ``after`` its value now."""
        now = self._fixed.points[-1][1]
        self._onset = {"step": step, "scale": None, "level": level, "sign": 1.0, "band": band}
        self._calm_since = None
        rate = self._fixed.rate() or 0.0
        return Transition(
            step=step,
            metric=FIXED_DATA_METRIC,
            before=math.exp(level),
            after=math.exp(now),
            score=rate / band if band > 0 else math.inf,
            direction="down",
            reason=(
                f"onset: the loss on the monitor's data at w* ({FIXED_DATA_METRIC}) fell by {1.0 - math.exp(now - level):.0%} "
                f"below its plateau of at least {self.plateau_steps} steps"
            ),
            evidence="loss drop",
        )

    def _resumed_fall(self, step: int, rates: list[float | None]) -> Transition | None:
        """The onset of the next stage of a staircase: within :data:`RESUME_WINDOW` lags of a transition's end, after
        a pause in which the loss fell slower than ``drop`` (or than :data:`SLOWED` of the ended fall's fastest rate)
        at some scale, it falls fast again at that scale (the finest first): at more than that scale's ``drop``, its
        noise threshold and :data:`CONTRAST` times the pause's slowest rate, and to that scale's ``drop`` below its
        level at the end. A pause shorter than a plateau is no plateau for the rule of the module docstring, but a
        fall that stopped and speeds up again is the next stage.
        """
        if self._resume is None or self.direction != "down":
            return None
        for index, (scale, rate, pause) in enumerate(zip(self._scales, rates, self._resume["scales"])):
            if rate is None or pause is None or step - self._resume["step"] > RESUME_WINDOW * scale.lag:
                continue
            pause["slowest"] = min(pause["slowest"], rate)
            fast = max(scale.drop, self._threshold(scale), CONTRAST * max(pause["slowest"], 0.0))
            paused = pause["slowest"] < max(scale.drop, SLOWED * pause["peak"])
            if paused and rate > fast and pause["level"] - scale.smoothed[-1][1] > scale.drop:
                return self._begin(step, index, scale, rate, pause["before"], after="after it had slowed to a pause")
        return None

    def _begin(
        self, step: int, index: int, scale: _Scale, rate: float, level: float, after: str | None = None
    ) -> Transition:
        """An onset; ``before`` is the plateau's (or pause's) level, ``after`` the smoothed loss now."""
        self._onset = {"step": step, "scale": index, "level": level, "sign": 1.0 if rate > 0 else -1.0}
        self._calm_since, self._resume = None, None
        noise = scale.noise(self._spread())
        return Transition(
            step=step,
            metric=self.metric,
            before=math.exp(level),
            after=math.exp(scale.smoothed[-1][1]),
            score=rate / noise if noise > 0 else math.inf,
            direction="down" if rate > 0 else "up",
            reason=(
                f"onset: {self.metric} {'fell' if rate > 0 else 'rose'} by {abs(1.0 - math.exp(-rate)):.0%} in {scale.lag} steps "
                + (after or f"after a plateau of at least {scale.plateau_steps} steps")
            ),
            evidence="loss drop",
        )

    def _judge(self, rates: list[float | None]) -> int | None:
        """The series that judges the end of the transition under way: of those whose rate has passed :data:`CLEAR`
        times its onset threshold since the onset (or that reported it), the one with the finest time resolution (a
        scale's lag; the fixed-data loss's lag or the gap between its points, if longer), the every-step loss on a
        tie. Its index among the scales, or None for the fixed-data loss. Remembers each scale's fastest rate since
        the onset.
        """
        assert self._onset is not None
        peaks, saw = self._onset.setdefault("peaks", [0.0] * len(rates)), self._onset.setdefault("saw", [])
        for index, (scale, rate) in enumerate(zip(self._scales, rates)):
            if rate is None:
                continue
            signed = self._onset["sign"] * rate
            peaks[index] = max(peaks[index], signed)
            if index not in saw and signed > CLEAR * max(scale.drop, self._threshold(scale)):
                saw.append(index)
        candidates: list[tuple[int, int, int | None]] = [(self._scales[index].lag, 0, index) for index in saw]
        if self._onset["scale"] is not None:
            candidates.append((self._scales[self._onset["scale"]].lag, 0, self._onset["scale"]))
        if self._onset.get("fixed_saw") or self._onset["scale"] is None:
            candidates.append((self._fixed.resolution(), 1, None))
        judge: int | None = min(candidates, key=lambda candidate: candidate[:2])[2]
        if judge != self._onset.get("judge", self._onset["scale"]):
            self._calm_since = None
            self._onset.pop("dip", None)
        self._onset["judge"] = judge
        return judge

    def _follow(self, step: int, index: int, rate: float) -> Transition | None:
        assert self._onset is not None
        scale = self._scales[index]
        now = scale.smoothed[-1][1]
        if not self._calmed(step, rate, scale.drop, scale.lag, self._onset["peaks"][index], now):
            return None
        return self._end(step, now, scale.lag, scale.noise(self._spread()), self.metric)

    def _calmed(self, step: int, rate: float | None, drop: float, lag: int, peak: float, now: float) -> bool:
        """Whether the judging series has fallen at less than half its threshold ``drop``, or less than
        :data:`SLOWED` of its fastest rate since the onset (``peak``: a fall that slowed that much has ended, even if
        a slower stage follows), for half a ``lag`` (a missing ``rate`` counts as calm), or sped up again after such a
        dip, past ``drop`` and :data:`CONTRAST` times the dip's slowest rate (a pause between stages); remembers since
        when (for a dip, the step of its slowest rate, and the series' value ``now`` there, where the stage ended).
        """
        assert self._onset is not None
        signed = None if rate is None else self._onset["sign"] * rate
        dip = self._onset.get("dip")
        if signed is not None and signed >= max(drop / 2, SLOWED * peak):
            if dip is not None and signed > max(drop, CONTRAST * dip[1]):
                self._calm_since, self._onset["pause"] = dip[0], dip
                return True
            self._calm_since = None
            return False
        if self._calm_since is None:
            self._calm_since = step
        if signed is not None and (dip is None or signed < dip[1]):
            self._onset["dip"] = (step, signed, now)
        return step - self._calm_since >= lag // 2

    def _end(self, step: int, now: float, lag: int, noise: float, metric: str) -> Transition:
        """The end of the transition under way: its series (``metric``, ``now`` its latest log value) has been calm
        since ``_calm_since``, so over the ``lag`` before that the loss had already stopped falling: the next plateau
        may start there, which lets a stage that follows soon after this one be seen. After a pause that a dip of the
        rate revealed, the stage ended at the dip: ``after``, and the next stage's ``before``, are the values there,
        not those of the next stage's fall under way (which still has to fall ``drop`` below the value now).
        """
        assert self._onset is not None and self._calm_since is not None
        self._not_before = self._calm_since - lag
        peaks = self._onset.get("peaks", [0.0] * len(self._scales))
        pause = self._onset.get("pause")
        if pause is not None:
            now = pause[2]
        self._resume = {
            "step": step,
            "scales": [
                {
                    "level": each.smoothed[-1][1],
                    "before": each.smoothed[-1][1] if pause is None else each.level_at(pause[0]),
                    "slowest": min((rate for _, rate in each.rates), default=math.inf),
                    "peak": peak,
                }
                if each.smoothed
                else None
                for each, peak in zip(self._scales, peaks)
            ],
        }
        onset, self._onset, self._calm_since = self._onset, None, None
        for each in self._scales:
            each.forget_rates()
        self._fixed.forget_rates()
        change = onset["level"] - now
        return Transition(
            step=step,
            metric=metric,
            before=math.exp(onset["level"]),
            after=math.exp(now),
            score=abs(change) / noise if noise > 0 else math.inf,
            direction="down" if change > 0 else "up",
            reason=f"end of the transition that began at step {onset['step']}",
            evidence="loss drop",
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "last": list(self._last) if self._last is not None else None,
            "differences": list(self._differences),
            "scales": [scale.state() for scale in self._scales],
            "fixed": [list(p) for p in self._fixed.points],
            "fixed_calm": self._fixed.calm.state(),
            "onset": copy.deepcopy(self._onset),
            "calm_since": self._calm_since,
            "not_before": self._not_before,
            "resume": copy.deepcopy(self._resume),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self._last = (int(state["last"][0]), float(state["last"][1])) if state["last"] is not None else None
        self._differences.extend(state["differences"])
        for scale, saved in zip(self._scales, state["scales"]):
            scale.load(saved)
        self._fixed.points.extend((int(s), float(v)) for s, v in state.get("fixed", []))
        self._fixed.calm.load(state.get("fixed_calm", {}))
        self._onset = copy.deepcopy(state["onset"])
        self._calm_since = state["calm_since"]
        self._not_before = state["not_before"]
        self._resume = copy.deepcopy(state.get("resume"))
