"""Choose which parameters a chain samples (weight-restricted, or "refined", LLC)."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

ParamSelector = str | Sequence[str] | None


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatchcase(name, pattern)


def select_parameter_names(model: nn.Module, params: ParamSelector = None) -> list[str]:
    """Names of the parameters of ``model`` to sample, in ``named_parameters`` order.

    ``params=None`` selects every parameter with ``requires_grad=True``. Otherwise each entry is an exact name
    (``"fc.weight"``), a module prefix (``"fc"`` selects ``fc.weight`` and ``fc.bias``) or a glob pattern
    (``"layers.*.weight"``); a parameter is selected when any entry matches it, whatever its ``requires_grad``.
    Tied parameters appear once, under their first name.

    Raises:
        ValueError: the model has no trainable parameters, or an entry matches no parameter.
    """
    names = [name for name, _ in model.named_parameters()]
    if params is None:
        selected = [name for name, p in model.named_parameters() if p.requires_grad]
        if not selected:
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); "
                "pass params=... to choose which parameters to sample."
            )
        return selected
    patterns = [params] if isinstance(params, str) else list(params)
    if not patterns:
        raise ValueError("params is empty: pass None to sample every trainable parameter, or name some parameters.")
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"params entries must be strings (names, module prefixes or globs), got {pattern!r}.")
        if not any(_matches(name, pattern) for name in names):
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(f"params entry {pattern!r} matches no parameter of {type(model).__name__}. Its parameters: {shown}")
    return [name for name in names if any(_matches(name, pattern) for pattern in patterns)]
