"""Synthetic series with known changes, for the detector tests: sparse λ̂-like points and dense losses."""

import math

import numpy as np


def sparse_series(rng, n=60, level=10.0, noise=1.0, trend=None, shift_at=None, shift=0.0):
    """Irregularly spaced steps; a level with noise, an optional smooth trend and an optional level shift."""
    steps = np.cumsum(rng.integers(50, 150, n))
    values = np.full(n, level)
    if trend == "exponential":
        values += 20 * (1 - np.exp(-3 * steps / steps[-1]))
    elif trend == "linear":
        values -= 5 * steps / steps[-1]
    if shift_at is not None:
        values[shift_at:] += shift
    return steps.tolist(), (values + rng.normal(0, noise, n)).tolist()


def loss_curve(rng, steps=2000, drops=(), noise=0.05, decay=None):
    """A minibatch loss: plateaus at 1 falling by 10x at each of ``drops`` (over 100 steps), or a smooth decay."""
    t = np.arange(steps)
    log_loss = np.zeros(steps)
    for start in drops:
        log_loss -= math.log(10) * np.clip((t - start) / 100, 0, 1)
    if decay is not None:
        log_loss -= t / decay
    return t.tolist(), np.exp(log_loss + rng.normal(0, noise, steps)).tolist()


def slow_fall(rng, start=1000, steps=2500, rate=0.12, noise=0.5):
    """A plateau, then a fall of ``rate`` (log units) per 100 steps from ``start``: the minibatch loss under heavy
    noise, and the noiseless loss on fixed data, as functions of the step."""

    def exact(step):
        return math.exp(-rate * max(step - start, 0) / 100)

    t = np.arange(steps)
    minibatch = np.exp(np.log([exact(step) for step in t]) + rng.normal(0, noise, steps))
    return t.tolist(), minibatch.tolist(), exact
