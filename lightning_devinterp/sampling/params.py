"""Choose which parameters a chain samples (weight-restricted, or "refined", LLC), and groups of them whose LLC is
measured on its own (per-component LLC), with helpers that build groups per layer and per attention head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

ParamSelector = str | Sequence[str] | None


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.startswith(pattern + ".") or fnmatchcase(name, pattern)


def select_parameter_names(model: nn.Module, params: ParamSelector = None) -> list[str]:
    """Names of the parameters of ``model`` to sample, in ``named_parameters`` order.

    ``params=None`` selects every parameter with ``requires_grad=True``. Otherwise each entry is an exact name
    (``"fc.weight"``), a module prefix (``"fc"`` selects ``fc.weight`` and ``fc.bias``) or a glob pattern
    (``"layers.*.weight"``); a parameter is selected when any entry matches it, whatever its ``requires_grad``.
    Tied parameters appear once, under their first name.

    Args:
        model: the model.
        params: None, or names, module prefixes and globs.

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
            raise ValueError(
                f"params entry {pattern!r} matches no parameter of {type(model).__name__}. Its parameters: {shown}"
            )
    return [name for name in names if any(_matches(name, pattern) for pattern in patterns)]


GroupSpec = str | Sequence[str] | Mapping[str, Tensor]
"""One group: name patterns (as for ``params``: names, module prefixes, globs), or ``{parameter name: element mask}``
(a boolean tensor of the parameter's shape) for parts of parameters, as the head helpers build."""

ParamGroups = Mapping[str, GroupSpec]
"""Named groups of parameters whose LLC is measured on its own, the rest frozen at w*."""


def resolve_groups(model: nn.Module, sampled: list[str], groups: ParamGroups) -> dict[str, dict[str, Tensor | None]]:
    """Each group as ``{parameter name: element mask, or None for the whole parameter}``, over the sampled ones.

    Args:
        model: the model.
        sampled: the names of the sampled parameters (every group must lie within them).
        groups: group names to name patterns or ``{parameter name: element mask}``.

    Raises:
        ValueError: a group selects nothing, names a parameter that is not sampled, or has a mask of the wrong shape.
    """
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError("param_groups must be a non-empty mapping of group names to parameter patterns or masks.")
    shapes = {name: p.shape for name, p in model.named_parameters()}
    resolved: dict[str, dict[str, Tensor | None]] = {}
    for group, spec in groups.items():
        if not isinstance(group, str) or not group or "/" in group:
            raise ValueError(f"group names must be non-empty strings without '/', got {group!r}.")
        if isinstance(spec, Mapping):
            members: dict[str, Tensor | None] = {}
            for name, mask in spec.items():
                if name not in shapes:
                    raise ValueError(f"group {group!r}: {type(model).__name__} has no parameter {name!r}.")
                if not isinstance(mask, Tensor) or mask.shape != shapes[name]:
                    raise ValueError(
                        f"group {group!r}: the mask of {name!r} must be a tensor of shape {tuple(shapes[name])}."
                    )
                members[name] = mask.bool()
        else:
            members = {name: None for name in select_parameter_names(model, spec)}
        outside = [name for name in members if name not in sampled]
        if outside:
            raise ValueError(
                f"group {group!r} names parameters that are not sampled ({', '.join(outside)}); widen params or narrow the group."
            )
        if not members or all(mask is not None and not bool(mask.any()) for mask in members.values()):
            raise ValueError(f"group {group!r} selects no parameter entries.")
        resolved[group] = members
    return resolved


def layer_groups(
    model: nn.Module, types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
) -> dict[str, list[str]]:
    """One group per module of ``types`` that holds parameters of its own, named after the module (``"net.0"``).

    Args:
        model: the model.
        types: the module classes that make a group.
    """
    return {
        name: [name]
        for name, module in model.named_modules()
        if name and isinstance(module, types) and any(True for _ in module.parameters(recurse=False))
    }


def _head_masks(width: int, num_heads: int, head: int) -> tuple[Tensor, Tensor]:
    """Which of a fused ``[q | k | v]`` projection's ``3 * width`` outputs belong to ``head``, and which of the
    ``width`` attention outputs it writes.
    """
    size = width // num_heads
    rows = torch.zeros(3 * width, dtype=torch.bool)
    for part in range(3):
        rows[part * width + head * size : part * width + (head + 1) * size] = True
    columns = torch.zeros(width, dtype=torch.bool)
    columns[head * size : (head + 1) * size] = True
    return rows, columns


def head_groups(model: nn.Module, qkv: str, num_heads: int, out: str | None = None) -> dict[str, dict[str, Tensor]]:
    """One group per attention head of a fused query/key/value projection.

    Head h's group holds the rows of q, k and v that belong to it (and their biases) and, with ``out``, the columns of
    the output projection that read them; groups are named ``<qkv>.head<h>``.

    Args:
        model: the model.
        qkv: the name of an ``nn.Linear`` whose output is ``[q | k | v]``, each ``num_heads`` heads wide.
        num_heads: the number of heads.
        out: the name of the output projection (an ``nn.Linear`` reading the attention outputs), or None.

    Raises:
        ValueError: ``qkv`` or ``out`` is not such a projection.
    """
    modules = dict(model.named_modules())
    projection = modules.get(qkv)
    if not isinstance(projection, nn.Linear) or projection.out_features % (3 * num_heads):
        raise ValueError(f"{qkv!r} must be an nn.Linear whose outputs split into q, k and v of {num_heads} heads each.")
    width = projection.out_features // 3
    output = modules.get(out) if out is not None else None
    if out is not None and (not isinstance(output, nn.Linear) or output.in_features != width):
        raise ValueError(f"{out!r} must be an nn.Linear reading the {width} attention outputs.")
    groups = {}
    for h in range(num_heads):
        rows, columns = _head_masks(width, num_heads, h)
        members = {f"{qkv}.weight": rows[:, None].expand_as(projection.weight).clone()}
        if projection.bias is not None:
            members[f"{qkv}.bias"] = rows
        if output is not None:
            members[f"{out}.weight"] = columns[None, :].expand_as(output.weight).clone()
        groups[f"{qkv}.head{h}"] = members
    return groups


def multihead_attention_groups(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """One group per head of every ``nn.MultiheadAttention``, named ``<module>.head<h>``.

    Args:
        model: a model holding ``nn.MultiheadAttention`` modules with a packed in-projection.

    Raises:
        ValueError: no such module, or one with separate q, k and v projections.
    """
    groups: dict[str, dict[str, Tensor]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.MultiheadAttention):
            continue
        if not module._qkv_same_embed_dim:
            raise ValueError(
                f"{name}: only MultiheadAttention with a packed in_proj_weight (kdim == vdim == embed_dim) is supported."
            )
        width, heads = module.embed_dim, module.num_heads
        prefix = f"{name}." if name else ""
        for h in range(heads):
            rows, columns = _head_masks(width, heads, h)
            members = {f"{prefix}in_proj_weight": rows[:, None].expand(3 * width, width).clone()}
            if module.in_proj_bias is not None:
                members[f"{prefix}in_proj_bias"] = rows
            members[f"{prefix}out_proj.weight"] = columns[None, :].expand(width, width).clone()
            groups[f"{prefix}head{h}"] = members
    if not groups:
        raise ValueError(f"{type(model).__name__} has no nn.MultiheadAttention module.")
    return groups
