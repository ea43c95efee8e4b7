"""The sampling settings of an estimate, spelled once: validated on construction, resolved to numbers once."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal

from lightning_devinterp._checks import check_count, check_positive
from lightning_devinterp.sampling.data import MAX_ITERABLE_SAMPLES
from lightning_devinterp.sampling.kernels import SAMPLERS, sampler_options
from lightning_devinterp.sampling.params import ParamSelector

DEFAULT_TARGET_ACCEPTANCE = 0.95
"""Mean MALA acceptance that the adaptive step size aims for: higher than the usual 0.9, whose discretization bias
in λ̂ is still visible on the ground-truth models (docs/choosing-settings.md)."""

Epsilon = float | Literal["adaptive", "auto"]
"""A step size, or how to choose one: ``"adaptive"`` (dual averaging in the burn-in) or ``"auto"`` (calibration)."""

ESTIMATE_DEFAULTS = {"num_chains": 4, "num_draws": 200, "num_burnin_steps": 100}
"""Chain shape of a one-off estimate (:func:`~lightning_devinterp.estimate_llc`, :func:`~lightning_devinterp.calibrate`)."""


def default_nbeta(num_samples: int) -> float:
    """``n / log(n)``, i.e. ``n * beta`` at the theory default inverse temperature ``beta = 1 / log(n)``.

    Args:
        num_samples: n, the number of training samples (at least 2).
    """
    if num_samples < 2:
        raise ValueError(f"the default nbeta = n / log(n) needs at least 2 samples, got n = {num_samples}; pass nbeta.")
    return num_samples / math.log(num_samples)


def check_setting_names(settings: dict[str, Any]) -> None:
    """Reject unknown sampling settings with a TypeError that suggests the closest known name.

    Args:
        settings: keyword arguments meant for :class:`SamplingConfig`.
    """
    names = [field.name for field in dataclasses.fields(SamplingConfig)]
    for key in settings:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Sampling settings are: {', '.join(names)}."
            raise TypeError(f"unknown sampling setting {key!r}.{hint}")


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample one estimate. Shared by ``estimate_llc``, ``calibrate``, ``LLCMonitor`` and ``analyze``.

    Args:
        num_chains: independent SGLD chains, all started at w*. None: the caller's default.
        num_draws: draws per chain after burn-in. None: the caller's default.
        num_burnin_steps: SGLD steps before the first draw. None: the caller's default.
        num_steps_bw_draws: SGLD steps between draws.
        epsilon: SGLD step size; "adaptive" adapts it during the first half of the burn-in toward target_acceptance
            (dual averaging) and samples at the result; "auto" calibrates it on a grid (see ``calibrate``).
        gamma: localization strength: the pull (gamma/2)|w - w*|^2 that keeps chains near w*.
        nbeta: n times the inverse temperature; default n / log(n), n the number of training samples.
        batch_size: SGLD minibatch size; default the DataLoader's.
        params: sample only these parameters (names, module prefixes or globs), the rest frozen at w*.
        sampler: "sgld" or "rmsprop_sgld" (RMSProp-preconditioned).
        sampler_kwargs: extra settings of the sampler, e.g. {"alpha": 0.99, "delta": 0.1} for "rmsprop_sgld".
        vectorize: True runs all chains in one vmapped step, False one after another, "auto" tries vmap first.
        target_acceptance: the mean MALA acceptance that epsilon="adaptive" aims for.
        max_samples: iterable data is read up to this many samples; if it has not ended by then, n is unknown and
            nbeta must be given.
        param_groups: named groups of the sampled parameters, e.g. {"attn": "blocks.*.attn*", "mlp": "blocks.*.mlp*"},
            each measured on its own (the rest frozen at w*) by num_chains chains of its own, in the same vectorized
            pass as the full model; results in LLCResult.groups. Values are name patterns (as for params) or, from
            the helpers in lightning_devinterp.sampling.params, {parameter name: element mask}.
        chain_batch: run the chains this many at a time (per group), to bound memory; None runs them all at once.
        compile: compile the vectorized forward and backward with torch.compile (a slower first call).
        paired: score each draw against the same minibatch's loss at w*, L_B(w_t) − L_B(w*), which cancels the
            minibatch noise (one extra forward pass per draw, without gradients); False scores it against the loss
            over the whole data, L_B(w_t) − L(w*). Both estimate the same λ. ``LLCMonitor`` pairs only while pairing
            pays (``LLCResult.pairing_gain``).
        tilted: sample and score the loss tilted by its gradient at w*, L(w) − ∇L(w*)·(w − w*), of which w* is a
            critical point: λ̂ then leaves out the drift down the gradient that the localization holds back, which
            dominates at weights far from a minimum (docs/choosing-settings.md). One pass over the data per estimate.
    """

    num_chains: int | None = None
    num_draws: int | None = None
    num_burnin_steps: int | None = None
    num_steps_bw_draws: int = 1
    epsilon: Epsilon = "adaptive"
    gamma: float = 100.0
    nbeta: float | None = None
    batch_size: int | None = None
    params: ParamSelector = None
    sampler: str = "sgld"
    sampler_kwargs: dict[str, float] | None = None
    vectorize: bool | Literal["auto"] = "auto"
    target_acceptance: float = DEFAULT_TARGET_ACCEPTANCE
    max_samples: int = MAX_ITERABLE_SAMPLES
    param_groups: dict[str, str | list[str] | dict[str, Any]] | None = None
    chain_batch: int | None = None
    compile: bool = False
    paired: bool = True
    tilted: bool = False

    def __post_init__(self) -> None:
        for name in ("num_chains", "num_draws", "num_burnin_steps"):
            value = getattr(self, name)
            if value is not None:
                check_count(name, value, 0 if name == "num_burnin_steps" else 1)
        check_count("num_steps_bw_draws", self.num_steps_bw_draws, 1)
        check_count("max_samples", self.max_samples, 1)
        if self.chain_batch is not None:
            check_count("chain_batch", self.chain_batch, 1)
        for flag in ("compile", "paired", "tilted"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}.")
        if self.param_groups is not None and (not isinstance(self.param_groups, dict) or not self.param_groups):
            raise ValueError(
                f"param_groups must be a non-empty dict of group names to parameter patterns, got {self.param_groups!r}."
            )
        if self.epsilon not in ("adaptive", "auto"):
            check_positive("epsilon", self.epsilon)
        if not (isinstance(self.target_acceptance, (int, float)) and 0.0 < self.target_acceptance < 1.0):
            raise ValueError(f"target_acceptance must be a probability in (0, 1), got {self.target_acceptance!r}.")
        check_positive("gamma", self.gamma, allow_zero=True)
        if self.nbeta is not None:
            check_positive("nbeta", self.nbeta)
        if self.batch_size is not None:
            check_count("batch_size", self.batch_size, 1)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}.")
        allowed = sampler_options(self.sampler)
        for key, value in (self.sampler_kwargs or {}).items():
            if key not in allowed:
                raise ValueError(
                    f"sampler_kwargs: {self.sampler!r} has no setting {key!r}; it has {sorted(allowed) or 'none'}."
                )
            check_positive(f"sampler_kwargs[{key!r}]", value)
        if self.vectorize not in (True, False, "auto"):
            raise ValueError(f"vectorize must be True, False or 'auto', got {self.vectorize!r}.")

    def with_defaults(self, **defaults: Any) -> SamplingConfig:
        """This config with every setting that is None and named in ``defaults`` filled in."""
        return dataclasses.replace(
            self, **{key: value for key, value in defaults.items() if getattr(self, key) is None}
        )

    def resolve_nbeta(self, num_samples: int | None) -> float:
        """The nbeta to use: the configured one, else ``n / log n`` for ``num_samples``."""
        if self.nbeta is not None:
            return float(self.nbeta)
        if num_samples is None:
            raise ValueError(
                "the number of training samples n is unknown (iterable data without a length, or one that did not end "
                f"within max_samples={self.max_samples}), so nbeta = n / log n cannot be derived; pass nbeta."
            )
        return default_nbeta(num_samples)

    def resolved(self, *, num_samples: int | None, epsilon: float | None = None) -> SamplingConfig:
        """A copy with nbeta (and, if given, epsilon) as numbers and every chain-shape setting filled in; an
        ``"adaptive"`` epsilon stays so (the chains resolve it during burn-in).
        """
        config = self.with_defaults(**ESTIMATE_DEFAULTS)
        return dataclasses.replace(
            config, nbeta=self.resolve_nbeta(num_samples), epsilon=self.epsilon if epsilon is None else float(epsilon)
        )

    @property
    def num_steps(self) -> int:
        """SGLD steps per chain: burn-in plus the steps that produce the draws (chain shape must be filled in)."""
        assert self.num_draws is not None and self.num_burnin_steps is not None, "fill the chain shape in first"
        return self.num_burnin_steps + self.num_draws * self.num_steps_bw_draws
