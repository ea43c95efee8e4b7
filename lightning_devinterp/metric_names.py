"""The names under which estimates and transitions are logged, shared by the monitor, the detectors and the plots.

Every logger receives these keys; ``trainer.callback_metrics`` holds :data:`LLC_MEAN`, :data:`LLC_STEP` and each
group's mean. Reading logs back (``lightning-devinterp plot``) uses the same names, so they are spelled only here.
"""

from __future__ import annotations

import re

PREFIX = "llc/"
"""Every λ̂ metric starts with this; a ``TransitionMonitor`` watching such a name treats it as a sparse λ̂ series."""

LLC_MEAN = "llc/mean"
LLC_STD = "llc/std"
"""The spread of the per-chain values (not the error of their mean: see :data:`LLC_STDERR`)."""

LLC_STDERR = "llc/stderr"
"""The standard error of λ̂, from all the draws and their autocorrelation."""

LLC_LOWER = "llc/lower"
LLC_UPPER = "llc/upper"
"""The ends of a 90% interval for λ̂."""

LLC_INIT_LOSS = "llc/init_loss"
LLC_NBETA = "llc/nbeta"
LLC_EPSILON = "llc/epsilon"
LLC_ACCEPTANCE = "llc/acceptance"
LLC_HEALTHY = "llc/healthy"
LLC_SECONDS = "llc/seconds"
LLC_STEP = "llc/step"
"""In ``callback_metrics`` only: the step the latest healthy estimate was taken at."""

FIGURE = "devinterp/llc_and_transitions"
"""The TensorBoard image of λ̂ beside the loss with the transitions marked, redrawn at each report and at the end."""

TRANSITIONS_PREFIX = "transitions/"
TRANSITION_ONSET = "transitions/onset"
TRANSITION_END = "transitions/end"

GROUP_MEAN = re.compile(r"^llc/([^/]+)/mean$")
"""Matches a group's mean λ̂ and captures the group's name."""


def group_metric(group: str, field: str) -> str:
    """The name of one field of a parameter group's λ̂, e.g. ``llc/attn/mean``.

    Args:
        group: the group's name (a key of ``param_groups``).
        field: ``"mean"``, ``"std"``, ``"stderr"``, ``"lower"`` or ``"upper"``.
    """
    return f"{PREFIX}{group}/{field}"


SUSCEPTIBILITY_PREFIX = "susceptibility/"
FULL_MODEL = "all"
"""The group name of the full model (all sampled parameters) in susceptibility metrics."""

SUSCEPTIBILITY = re.compile(r"^susceptibility/([^/]+)/(.+)$")
"""Matches a susceptibility scalar and captures its group and label."""


def susceptibility_metric(group: str, label: str) -> str:
    """The name of a group's mean susceptibility over the probe samples with one label, e.g. ``susceptibility/attn/repeat``.

    Args:
        group: the group's name, or :data:`FULL_MODEL`.
        label: a probe label, or ``"mean"`` (over the whole probe) when there are no labels.
    """
    return f"{SUSCEPTIBILITY_PREFIX}{group}/{label}"


def transition_metric(is_onset: bool) -> str:
    """The scalar logged at a transition report.

    Args:
        is_onset: True for an onset (:data:`TRANSITION_ONSET`), False for an end (:data:`TRANSITION_END`).
    """
    return TRANSITION_ONSET if is_onset else TRANSITION_END
