"""What a detector reports: a :class:`Transition`, and the warning category users can filter alerts by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class TransitionWarning(UserWarning):
    """Issued when a monitored quantity changes as a transition would: a possible phase transition."""


@dataclass(frozen=True)
class Transition:
    """A detected change at ``step``: the series sat at ``before`` and now shows ``after``.

    ``reason`` starts with ``"onset"`` for the start of a transition and with ``"end"`` for its end; ``evidence``
    says what fired: ``"loss drop"`` (the training loss fell fast after a plateau), ``"λ̂ change"`` (λ̂ moved between
    settled levels without a loss drop) or ``"both"`` (a loss drop across which λ̂ changed level too).
    ``where_to_look`` (end reports of a monitor with ``param_groups`` or a probe) names the groups whose λ̂ changed
    most and the probe labels whose susceptibility changed most between the estimates before and after.
    """

    step: int
    metric: str
    before: float
    after: float
    score: float
    direction: Literal["up", "down"]
    reason: str
    evidence: str = ""
    where_to_look: str = ""

    @property
    def is_onset(self) -> bool:
        return self.reason.startswith("onset")

    def describe(self) -> str:
        evidence = f"; evidence: {self.evidence}" if self.evidence else ""
        where = f"; where to look: {self.where_to_look}" if self.where_to_look else ""
        return (
            f"possible phase transition at step {self.step}: {self.metric} {self.before:.4g} -> {self.after:.4g} "
            f"({self.direction}, score {self.score:.1f}; {self.reason}{evidence}{where})"
        )
