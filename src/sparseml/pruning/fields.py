"""The fields pruners share, declared once, and the checks that relate them.

A method lists the groups it has (``**SCHEDULE``, ``**SAMPLING``, ``**BLOCKS``...) in its own
``FIELDS``; what a value may be is said by its converter, relations between fields by a
`sparseml.fields.Check`.
"""

from __future__ import annotations

from typing import Any

from sparseml.errors import RecipeError
from sparseml.fields import (
    REQUIRED,
    Check,
    Field,
    FieldValueError,
    as_bool,
    as_dict,
    as_float,
    as_int,
    as_str,
    as_str_list,
    brief,
    one_of,
    optional,
)
from sparseml.masks import MaskSpec, parse_mask_type
from sparseml.schedules import INTER_FUNCS, RECOMPUTATION_FUNCS

FROM_PARAM = "__FROM_PARAM__"
# Damping above this leaves H = F^-1 ~ I / damp with 1 / damp below float32's normal range (the
# scores then underflow to 0 and the masks are wrong); no curvature method has a use for it.
MAX_DAMP = 1e20
as_damp = as_float(0.0, MAX_DAMP, lo_open=True)
_sparsity = as_float(0.0, 1.0, hi_open=True)


def _init_sparsity(value: Any) -> float | str:
    if isinstance(value, str) and value.upper() == FROM_PARAM:
        return FROM_PARAM
    return _sparsity(value)


def final_sparsity(value: Any) -> float | dict[float, list[str]]:
    if isinstance(value, dict):
        out = {}
        for key, names in value.items():
            out[_sparsity(key)] = as_str_list(names)
        if not out:
            raise FieldValueError("must not be an empty mapping")
        return out
    return _sparsity(value)


def _frequency(value: Any) -> float:
    x = as_float(allow_inf=False)(value)
    if x != -1 and x <= 0:
        raise FieldValueError("must be > 0 (epochs between updates) or -1 (every step)")
    return x


def _mask_type(value: Any) -> str:
    if isinstance(value, (list, tuple)) or not isinstance(value, str):
        raise FieldValueError("must be unstructured, block4, 'N:M' digits such as \"2:4\", or N:M")
    return value.strip()


def block_size_or_full(value: Any) -> int | None:
    """A Fisher block size, or None (also -1 or 0, the references' spelling) for one full
    Fisher over all weights."""
    if value is None or (not isinstance(value, bool) and value in (-1, 0)):
        return None
    return as_int(1)(value)


def mask_spec_of(values: dict[str, Any]) -> MaskSpec | None:
    """The mask spec the fields describe, None when they describe none (reported elsewhere)."""
    try:
        return parse_mask_type(
            values.get("mask_type", "unstructured"), values.get("n"), values.get("m")
        )
    except RecipeError:
        return None


# ----- the schedule, the parameters and the masks: every pruner ----------------------------------
SCHEDULE = {
    "params": Field(["__ALL_PRUNABLE__"], as_str_list, "names or re:<regex>; __ALL_PRUNABLE__"),
    "init_sparsity": Field(0.0, _init_sparsity, "sparsity at start_epoch, in [0, 1)"),
    "final_sparsity": Field(
        REQUIRED, final_sparsity, "sparsity at end_epoch, or {sparsity: params}"
    ),
    "update_frequency": Field(-1.0, _frequency, "epochs between pruning steps (-1: every step)"),
    "inter_func": Field("cubic", one_of(*INTER_FUNCS), "shape of the sparsity schedule"),
    "leave_enabled": Field(True, as_bool, "keep masks enforced after end_epoch"),
    "global_sparsity": Field(False, as_bool, "one threshold over all params"),
    "mask_type": Field("unstructured", _mask_type, 'unstructured, block4, "N:M"'),
    "n": Field(None, optional(as_int(1)), "N of an N:M mask (with mask_type: N:M)"),
    "m": Field(None, optional(as_int(2)), "M of an N:M mask (with mask_type: N:M)"),
}


def _mask_type_error(mod) -> str | None:
    try:
        parse_mask_type(mod._values["mask_type"], mod._values["n"], mod._values["m"])
    except RecipeError as err:
        return str(err)
    return None


def _finals(values: dict[str, Any]) -> list[float]:
    final = values["final_sparsity"]
    return [] if final is None else list(final) if isinstance(final, dict) else [final]


def _nm_mismatch(values: dict[str, Any], name: str) -> bool:
    """Field ``name`` (final_sparsity or init_sparsity) differs from an N:M mask's N/M."""
    spec = mask_spec_of(values)
    if spec is None or spec.kind != "nm":
        return False
    value = values[name]
    levels = _finals(values) if name == "final_sparsity" else [value]
    return any(isinstance(v, float) and abs(v - spec.sparsity) > 1e-6 for v in levels)


def _nm_target(values: dict[str, Any]) -> str:
    spec = mask_spec_of(values)
    return (
        f"must equal N/M = {spec.sparsity} for mask_type {spec}: an N:M mask prunes to N/M at "
        "once (init_sparsity and final_sparsity both)"
    )


SCHEDULE_CHECKS = (
    Check("mask_type", lambda m: _mask_type_error(m) is not None, _mask_type_error),
    Check(
        "params",
        lambda m: (
            isinstance(m._values.get("final_sparsity"), dict)
            and any(p != "__ALL_PRUNABLE__" for p in m._values["params"])
        ),
        "must be empty when final_sparsity is a mapping",
    ),
    Check(
        "init_sparsity",
        lambda m: (
            isinstance(m._values["init_sparsity"], float)
            and any(m._values["init_sparsity"] > f + 1e-12 for f in _finals(m._values))
        ),
        lambda m: f"must be <= final_sparsity ({m._values['final_sparsity']})",
    ),
    Check(
        "n",
        lambda m: (
            getattr(mask_spec_of(m._values), "kind", "nm") != "nm"
            and (m._values["n"] is not None or m._values["m"] is not None)
        ),
        "n and m are only allowed with an N:M mask_type",
    ),
    Check(
        "final_sparsity",
        lambda m: _nm_mismatch(m._values, "final_sparsity"),
        lambda m: _nm_target(m._values),
    ),
    Check(
        "init_sparsity",
        lambda m: _nm_mismatch(m._values, "init_sparsity"),
        lambda m: _nm_target(m._values),
    ),
)

# ----- gradient samples and their schedule: pruners that estimate curvature ------------------
SAMPLING = {
    "num_grads": Field(1024, as_int(1), "m: gradient samples per Fisher estimate"),
    "damp": Field(1e-7, as_damp, "lambda: Fisher dampening (> 0)"),
    "num_recomputations": Field(1, as_int(1), "Fisher rebuilds per pruning step"),
    "recomputation_inter_func": Field(
        "linear", one_of(*RECOMPUTATION_FUNCS), "spacing of rebuilds (poly: recompute_degree)"
    ),
    "recompute_degree": Field(None, optional(as_int(1)), "degree of the poly spacing"),
    "grad_sampler_kwargs": Field({}, as_dict, "keyword arguments for data_loader_builder"),
    "global_sparsity": Field(True, as_bool, "one threshold over all params"),
    "inter_func": Field(
        "cubic", one_of("linear", "cubic", "inverse_cubic"), "sparsity schedule shape"
    ),
}
# where the estimate lives
DEVICE = {
    "fisher_inv_device": Field(
        None, optional(as_str), "device holding Fisher blocks (default: param's)"
    ),
}
BLOCKS = {"fisher_block_size": Field(50, as_int(1), "B: Fisher block size"), **DEVICE}


def _poly_degree_mismatch(mod) -> bool:
    poly = mod._values["recomputation_inter_func"] == "poly"
    return poly != (mod._values["recompute_degree"] is not None)


def _block_not_grouped(mod) -> bool:
    spec, block = mask_spec_of(mod._values), mod._values.get("fisher_block_size")
    return spec is not None and spec.group > 1 and block is not None and block % spec.group != 0


SAMPLING_CHECKS = (
    Check(
        "recompute_degree",
        _poly_degree_mismatch,
        "is required with, and only allowed with, recomputation_inter_func: poly",
    ),
    Check(
        "fisher_block_size",
        _block_not_grouped,
        lambda m: f"must be a multiple of the mask group size {mask_spec_of(m._values).group}",
    ),
    Check(
        "num_recomputations",
        lambda m: (
            getattr(mask_spec_of(m._values), "kind", "") == "nm"
            and m._values["num_recomputations"] != 1
        ),
        "must be 1 with an N:M mask_type",
    ),
)


def recompute_num_spelling(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The WoodFisher repository's ``recompute_num: R`` (R recomputations after the first
    Fisher, so R + 1 builds per pruning step) as ``num_recomputations: R + 1``."""
    if "recompute_num" not in kwargs or "num_recomputations" not in cls.fields:
        return kwargs
    kwargs = dict(kwargs)
    value = kwargs.pop("recompute_num")
    if "num_recomputations" in kwargs:
        raise RecipeError(f"{cls.__name__}: give num_recomputations or recompute_num, not both")
    try:
        kwargs["num_recomputations"] = as_int(0)(value) + 1
    except FieldValueError as err:
        raise RecipeError(f"{cls.__name__}: field 'recompute_num' = {brief(value)} {err}") from None
    return kwargs
