"""Selection of the parameters a modifier acts on, from recipe ``params`` patterns.

Names are the usual ``named_parameters`` names of the *unwrapped* model: a DDP/DataParallel
wrapper is looked through, and a leading ``module.`` in a pattern is ignored, so recipes and
checkpoints work the same with and without DDP. Entries are exact names or ``re:<regex>``
matched with ``re.match`` (anchored at the start only, so ``re:.*weight`` also matches
``fc.weight_orig``). ``__ALL__`` selects every parameter, ``__ALL_PRUNABLE__`` the weights of
Linear and Conv layers. Every entry must match at least one parameter.

The patterns are recipe input, so `select_params` raises `sparseml.errors.RecipeError`.
Rules for what a recipe may say (each refused with a one-line :class:`RecipeError` naming the
entry or parameter, never a raw error deep in a hook):

* ``params: []`` selects nothing, so it is refused (it used to mean "every layer", the opposite
  of what it says); ``__ALL_PRUNABLE__`` says "every Linear/Conv weight".
* Python's ``re`` has no timeout, so a regex must match in bounded time: no repetition inside a
  repeated group (``(a+)+``, ``(a?){20}``), no alternatives inside a repeated group
  (``(a|aa)*``; a class ``[ab]*`` is fine), no backreferences, at most
  :data:`MAX_VARIABLE_REPEATS` repetitions of variable length (``*``, ``+``, ``?``, ``{m,n}``).
  These bound the work of one match by ``L ** k`` for names of length ``L`` and ``k`` such
  repetitions, and that bound must stay under :data:`MATCH_BUDGET` for the model's longest
  parameter name (4 repetitions: names up to 100 characters; 3: up to 464).
* Frozen parameters (``requires_grad=False``) are never pruned: ``__ALL__`` and
  ``__ALL_PRUNABLE__`` skip them (they mean "every trainable ..."), an exact name or regex that
  selects one is refused naming it. Pruners enforce masks through gradient hooks and
  second-order ones need gradients, neither of which a frozen tensor has.
* Parameters on the meta device hold no values: selecting one is refused naming it.
* In a ``{sparsity: params}`` mapping a parameter may appear under one target only
  (:func:`assign_targets`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

try:  # Python 3.11+
    import re._constants as _sre
    import re._parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

from torch import nn

from sparseml.errors import RecipeError

ALL = "__ALL__"
ALL_PRUNABLE = "__ALL_PRUNABLE__"
PRUNABLE_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
# Bounds that keep one ``re.match`` short whatever the pattern (see the module docstring):
# L ** k <= 1e8 steps is ~0.05 s per name in the worst case measured (``\w*`` repeated k times).
MAX_VARIABLE_REPEATS = 4
MATCH_BUDGET = 10**8
_REGEX_RULE = (
    "allowed: no repetition or alternatives inside a repeated group, no backreferences, "
    f"at most {MAX_VARIABLE_REPEATS} variable repetitions (*, +, ?, {{m,n}}); "
    "use a character class like [ab]* for repeated choices"
)


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


_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}


def _regex_problem(parsed: object, inside_repeat: bool = False) -> tuple[str, int]:
    """(why the parsed regex may backtrack without bound or '', its variable repetitions)."""
    count = 0
    for op, arg in parsed:  # type: ignore[attr-defined]
        bodies: list = []
        repeated = inside_repeat
        if op in _REPEATS:
            low, high, body = arg
            if low != high:
                if inside_repeat:
                    return "a repetition inside a repeated group", count
                count += 1
            bodies, repeated = [body], inside_repeat or high > 1
        elif op is _sre.BRANCH:
            if inside_repeat:
                return "alternatives inside a repeated group", count
            bodies = list(arg[1])
        elif op is _sre.SUBPATTERN:
            bodies = [arg[-1]]
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            bodies = [arg[1]]
        elif op is getattr(_sre, "ATOMIC_GROUP", None):
            bodies = [arg]
        elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
            return "a backreference", count
        for body in bodies:
            problem, inner = _regex_problem(body, repeated)
            count += inner
            if problem:
                return problem, count
    return "", count


def compile_pattern(entry: str, owner: str, longest_name: int = 0) -> re.Pattern:
    """The compiled regex of a ``re:`` entry, refused when it could backtrack without bound
    (on names of up to ``longest_name`` characters)."""
    try:
        compiled = re.compile(entry[3:])
        problem, count = _regex_problem(_sre_parse.parse(entry[3:]))
    except re.error as err:
        raise RecipeError(f"{owner}: params entry {entry!r} is not a valid regex: {err}") from None
    if not problem and count > MAX_VARIABLE_REPEATS:
        problem = f"{count} variable repetitions"
    if problem:
        raise RecipeError(
            f"{owner}: params entry {entry!r} could take exponential time to match ({problem}); "
            + _REGEX_RULE
        )
    if count > 1 and longest_name**count > MATCH_BUDGET:
        fits = int(MATCH_BUDGET ** (1 / count))
        raise RecipeError(
            f"{owner}: params entry {entry!r} has {count} variable repetitions, too many for "
            f"parameter names of {longest_name} characters (allowed: names up to {fits} "
            "characters with that many; use fewer repetitions or exact names)"
        )
    return compiled


def _matches(entry: str, name: str, compiled: re.Pattern | None) -> bool:
    if compiled is not None:
        return compiled.match(name) is not None or compiled.match("module." + name) is not None
    return entry == name or entry == "module." + name


def _check_selected(refs: list[ParamRef], entry: str, owner: str) -> None:
    """Refuse parameters no pruner can act on, naming the first one and the entry."""
    for ref in refs:
        param = ref.param
        if param.is_meta:
            raise RecipeError(
                f"{owner}: params entry {entry!r} selects {ref.name}, which is on the meta "
                "device (no values to prune); load or materialize the weights first"
            )
        if not param.requires_grad:
            raise RecipeError(
                f"{owner}: params entry {entry!r} selects frozen parameter {ref.name} "
                "(requires_grad=False); pruning needs trainable parameters: unfreeze it or "
                "leave it out (__ALL__ and __ALL_PRUNABLE__ skip frozen parameters)"
            )


def select_params(model: nn.Module, patterns: list[str], owner: str = "modifier") -> list[ParamRef]:
    """Parameters of ``model`` selected by ``patterns`` in module registration order.

    Raises ``RecipeError`` naming every pattern entry that matches nothing, and for the
    entries and parameters the module docstring's rules refuse.
    """
    if not patterns:
        raise RecipeError(
            f"{owner}: params is empty, which selects no parameter; list names or "
            f"'re:<regex>' entries, or {ALL_PRUNABLE} for every Linear/Conv weight"
        )
    refs = all_param_refs(model)
    token_refs = [r for r in refs if r.param.requires_grad]  # the tokens mean "trainable"
    if any(_is_token(p, ALL) for p in patterns):
        patterns = [ALL]  # every trainable parameter: the other entries add nothing
    longest = max((len("module." + r.name) for r in refs), default=0)
    compiled = {e: compile_pattern(e, owner, longest) for e in patterns if e.startswith("re:")}
    chosen: dict[str, ParamRef] = {}
    unmatched = []
    for entry in patterns:
        if _is_token(entry, ALL):
            hits = token_refs
        elif _is_token(entry, ALL_PRUNABLE):
            hits = [r for r in token_refs if is_prunable(r)]
        else:
            hits = [r for r in refs if _matches(entry, r.name, compiled.get(entry))]
        if not hits:
            unmatched.append(entry)
        _check_selected(hits, entry, owner)
        for ref in hits:
            chosen.setdefault(ref.name, ref)
    if unmatched:
        sample = ", ".join(r.name for r in refs[:8])
        frozen = len(refs) - len(token_refs)
        skipped = f"; {frozen} frozen parameters are skipped by {ALL} and {ALL_PRUNABLE}"
        raise RecipeError(
            f"{owner}: params {unmatched} match no parameter of the model "
            f"(exact names or 're:<regex>' prefix matches; e.g. {sample}, ...)"
            + (skipped if frozen else "")
        )
    order = {r.name: i for i, r in enumerate(refs)}
    return sorted(chosen.values(), key=lambda r: order[r.name])


def assign_targets(
    targets: Mapping[float, Iterable[str]],
    select: Callable[[list[str]], list[ParamRef]],
    owner: str = "modifier",
) -> tuple[list[ParamRef], list[float]]:
    """The parameters of a ``{sparsity: params}`` mapping with one target each, in map order.

    ``select(patterns)`` returns the parameters one entry's patterns select (usually
    :func:`select_params` bound to a model). A parameter under two targets would silently take
    the first; it is refused naming the parameter and both targets.
    """
    chosen: dict[str, tuple[ParamRef, float]] = {}
    for target, patterns in targets.items():
        for ref in select(list(patterns)):
            if ref.name in chosen and chosen[ref.name][1] != target:
                raise RecipeError(
                    f"{owner}: final_sparsity maps parameter {ref.name} to two targets "
                    f"({chosen[ref.name][1]} and {target}); each parameter may appear under "
                    "one target only: narrow the patterns"
                )
            chosen.setdefault(ref.name, (ref, target))
    return [ref for ref, _ in chosen.values()], [t for _, t in chosen.values()]
