"""Which parameters are prunable: layer selection by type, name pattern and position.

By default the weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d`` are prunable; biases,
normalisation layers and embeddings are not. Names are canonical (no DDP ``module.`` prefix).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from .errors import SparseforgeError
from .masks import canonical_name, check_module

__all__ = ["DEFAULT_PRUNABLE_TYPES", "select_prunable"]

DEFAULT_PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

ExcludeItem = str | type


def _matches(pattern: str, module_name: str, param_name: str) -> bool:
    return any(
        fnmatch.fnmatchcase(candidate, pattern) or candidate == pattern for candidate in (module_name, param_name)
    )


def select_prunable(
    model: nn.Module,
    *,
    exclude: Sequence[ExcludeItem] = (),
    include_types: Sequence[type[nn.Module]] = DEFAULT_PRUNABLE_TYPES,
    first_last_dense: bool = False,
) -> dict[str, nn.Parameter]:
    """Return the prunable weight parameters of ``model`` keyed by canonical name.

    Args:
        exclude: module-name glob patterns (``"classifier"``, ``"blocks.*.attn.*"``; matched against
            the module name and the parameter name) and/or module types to keep dense. A pattern
            or type that matches nothing is an error, so typos do not pass silently.
        include_types: module types whose ``weight`` is prunable.
        first_last_dense: keep the first and the last prunable layer (in registration order) dense.

    Tied weights (one parameter reachable from several modules) are returned once, under the
    first name.
    """
    check_module(model)
    if isinstance(exclude, (str, type)):
        raise SparseforgeError(
            f"exclude={exclude!r} is a single item; allowed: a list of name patterns or module types, e.g. [{exclude!r}]"
        )
    types_ok = not isinstance(include_types, (type, str))
    if types_ok:
        include_types = tuple(include_types)
        types_ok = all(isinstance(t, type) and issubclass(t, nn.Module) for t in include_types)
    if not types_ok:
        raise SparseforgeError(
            f"include_types={include_types!r} is not allowed; allowed: a list of nn.Module subclasses, e.g. [nn.Linear]"
        )
    exclude = list(exclude)
    patterns = [e for e in exclude if isinstance(e, str)]
    types = [e for e in exclude if isinstance(e, type)]
    bad = [e for e in exclude if not isinstance(e, (str, type))]
    if bad:
        raise SparseforgeError(f"exclude item {bad[0]!r} is not allowed; allowed: name patterns (str) or module types")
    used_patterns: set[str] = set()
    used_types: set[type] = set()
    seen: set[int] = set()
    chosen: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, tuple(include_types)):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        cname = canonical_name(module_name)
        pname = f"{cname}.weight" if cname else "weight"
        hit_types = [t for t in types if isinstance(module, t)]
        hit_patterns = [p for p in patterns if _matches(p, cname, pname)]
        used_types.update(hit_types)
        used_patterns.update(hit_patterns)
        if hit_types or hit_patterns or id(weight) in seen:
            seen.add(id(weight))
            continue
        seen.add(id(weight))
        chosen[pname] = weight
    unused = [p for p in patterns if p not in used_patterns] + [t.__name__ for t in types if t not in used_types]
    if unused:
        raise SparseforgeError(f"exclude pattern {unused[0]!r} matches no prunable layer of the model")
    if first_last_dense and chosen:
        names = list(chosen)
        for name in {names[0], names[-1]}:
            del chosen[name]
    if not chosen:
        raise SparseforgeError(
            f"the model has no prunable layer left (prunable types: {[t.__name__ for t in include_types]}, "
            f"exclude={list(exclude)!r}, first_last_dense={first_last_dense})"
        )
    return chosen
