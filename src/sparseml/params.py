"""Selection of the parameters a modifier acts on, from recipe ``params`` patterns.

Names are the usual ``named_parameters`` names of the *unwrapped* model: a DDP/DataParallel
wrapper is looked through, and a leading ``module.`` in a pattern is ignored, so recipes and
checkpoints work the same with and without DDP. Entries are exact names or ``re:<regex>``
matched with ``re.match`` (anchored at the start only, so ``re:.*weight`` also matches
``fc.weight_orig``). ``__ALL__`` selects every parameter, ``__ALL_PRUNABLE__`` the weights of
Linear and Conv layers. Every entry must match at least one parameter.

The patterns are recipe input, so `select_params` raises `sparseml.errors.RecipeError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from sparseml.errors import RecipeError

ALL = "__ALL__"
ALL_PRUNABLE = "__ALL_PRUNABLE__"
PRUNABLE_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


@dataclass
class ParamRef:
    """One selected parameter: its full name, owning module and attribute name."""

    name: str
    module: nn.Module
    attr: str

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.attr)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DataParallel / DistributedDataParallel wrapper (else the model)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def all_param_refs(model: nn.Module) -> list[ParamRef]:
    refs = []
    seen = set()
    for mod_name, module in unwrap(model).named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            refs.append(ParamRef(f"{mod_name}.{attr}" if mod_name else attr, module, attr))
    return refs


def is_prunable(ref: ParamRef) -> bool:
    return ref.attr == "weight" and isinstance(ref.module, PRUNABLE_TYPES)


def _is_token(entry: str, token: str) -> bool:
    return entry.upper() == token


def _matches(entry: str, name: str) -> bool:
    if entry.startswith("re:"):
        pattern = entry[3:]
        return (
            re.match(pattern, name) is not None or re.match(pattern, "module." + name) is not None
        )
    return entry == name or entry == "module." + name


def select_params(model: nn.Module, patterns: list[str], owner: str = "modifier") -> list[ParamRef]:
    """Parameters of ``model`` selected by ``patterns`` in module registration order.

    Raises ``RecipeError`` naming every pattern entry that matches nothing.
    """
    refs = all_param_refs(model)
    if not patterns:
        patterns = [ALL_PRUNABLE]
    if any(_is_token(p, ALL) for p in patterns):
        return refs
    chosen: dict[str, ParamRef] = {}
    unmatched = []
    for entry in patterns:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as err:
                raise RecipeError(
                    f"{owner}: params entry {entry!r} is not a valid regex: {err}"
                ) from None
        hits = [
            r
            for r in refs
            if (is_prunable(r) if _is_token(entry, ALL_PRUNABLE) else _matches(entry, r.name))
        ]
        if not hits:
            unmatched.append(entry)
        for ref in hits:
            chosen.setdefault(ref.name, ref)
    if unmatched:
        sample = ", ".join(r.name for r in refs[:8])
        raise RecipeError(
            f"{owner}: params {unmatched} match no parameter of the model "
            f"(exact names or 're:<regex>' prefix matches; e.g. {sample}, ...)"
        )
    order = {r.name: i for i, r in enumerate(refs)}
    return sorted(chosen.values(), key=lambda r: order[r.name])
