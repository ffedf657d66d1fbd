"""Recipe helpers of ``one_shot_pruning.py``: the sweep's manager, its settings and checks.

Data lives in :mod:`utils.one_shot_data`, weights in :mod:`utils.checkpoint`, evaluation and
memory measurement in :mod:`utils.evaluation`. Gradients and Fisher blocks are shared across a
sweep's sparsities by the second-order modifiers themselves (``manager.apply(sweep_cache=...)``).
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

import torch.nn.functional as F

from sparseml.pruning import PruningModifier
from sparseml.pytorch.optim import ScheduledModifierManager

from .errors import SetupError
from .results import DENSE

_logger = logging.getLogger("one_shot")


def load_one_shot_manager(
    recipe: str, sparsity: float | None, variables: Any = None
) -> ScheduledModifierManager:
    """A manager holding only the recipe's pruning modifier, set to prune to ``sparsity``.

    Training modifiers (epoch range, LR) of one-shot+finetune recipes are left out: one-shot
    pruning has no optimizer. ``sparsity=None`` keeps the recipe's own ``final_sparsity``;
    ``variables`` override the recipe's top-level variables (``recipe_variables``).
    """
    manager = ScheduledModifierManager.from_yaml(recipe, recipe_variables=variables or None)
    pruners = [m for m in manager.modifiers if isinstance(m, PruningModifier)]
    if len(pruners) != 1:
        found = ", ".join(type(m).__name__ for m in manager.modifiers)
        raise SetupError(
            f"recipe {recipe} must hold exactly one pruning modifier (GM, OBS, CAP, FastCAP, "
            f"M-FAC, ...) for one-shot pruning; it holds {len(pruners)} (modifiers: {found})"
        )
    pruner = pruners[0]
    if isinstance(pruner.final_sparsity, dict):
        raise SetupError(
            f"recipe {recipe}: final_sparsity is a per-layer mapping; one-shot sweeps need a "
            "single final_sparsity value"
        )
    if sparsity is not None:
        pruner.init_sparsity = sparsity
        pruner.final_sparsity = sparsity
    pruner.validate()  # relations between fields (e.g. N:M needs sparsity N/M)
    # A QuantizationModifier stays: apply() calibrates it on the pruned model (int8 one-shot).
    return ScheduledModifierManager([pruner, *manager.quantization_modifiers])


def pruning_modifier(manager: ScheduledModifierManager) -> PruningModifier:
    return next(m for m in manager.modifiers if isinstance(m, PruningModifier))


def quantization_settings(manager: ScheduledModifierManager) -> dict[str, Any] | None:
    """Field values of the recipe's QuantizationModifier (None without one)."""
    quant = manager.quantization_modifiers
    return quant[0].field_values() if quant else None


# Short names of the pruners, as the launcher's METHODS and the benchmark tables spell them.
METHOD_NAMES = {
    "GlobalMagnitudePruningModifier": "gm",
    "GMPruningModifier": "gm",
    "MagnitudePruningModifier": "gm_layer",
    "OBSPruningModifier": "obs",
    "CAPruningModifier": "cap",
    "FastCAPruningModifier": "fast_cap",
    "MFACPruningModifier": "mfac",
    "WoodFisherPruningModifier": "woodfisher",
    "WoodTaylorPruningModifier": "woodtaylor",
    "DiagFisherPruningModifier": "diag_fisher",
    "KFACPruningModifier": "kfac",
    "HessianDiagPruningModifier": "hessian_diag",
    "GWProdPruningModifier": "gwprod",
    "ConstantPruningModifier": "constant",
}


def method_name(modifier: Any) -> str:
    """The default ``--method``: what the pruner is (``cap``, ``obs``, ``cap_2:4``), not the
    recipe's file name (``resnet_one_shot``), so the table's columns name methods."""
    cls = type(modifier).__name__
    name = METHOD_NAMES.get(cls)
    if name is None:  # a user's own pruner: FooBarPruningModifier -> foo_bar
        stem = cls.removesuffix("Modifier").removesuffix("Pruning") or cls
        name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", stem).lower()
    spec = getattr(modifier, "mask_spec", None)
    if spec is not None and spec.kind == "nm":
        name += f"_{spec.n}:{spec.group}"
    return name


def needs_gradients(modifier: Any) -> bool:
    return bool(getattr(modifier, "needs_gradients", False))


def modifier_settings(modifier: Any) -> dict[str, Any]:
    """The modifier's field values except the sparsities a sweep sets (JSON-friendly)."""
    skip = {"init_sparsity", "final_sparsity"}
    values = {k: v for k, v in modifier.field_values().items() if k not in skip}
    return {"modifier": type(modifier).__name__, **values}


def grad_sampler_for(data: Any) -> dict[str, Any]:
    """The ``grad_sampler`` argument of ``manager.apply`` for a ``one_shot_data.GradSamplerData``."""
    return {"data_loader_builder": data, "loss_fn": F.cross_entropy}


def finite_or_none(metrics: dict[str, Any], what: str) -> dict[str, Any]:
    """``metrics`` with NaN/Inf floats as None: strict JSON readers reject NaN tokens."""
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        _logger.warning("%s: %s not finite (the pruned model diverged); stored as null", what, bad)
    return {k: (None if k in bad else v) for k, v in metrics.items()}


def check_sparsities(values: list[float]) -> list[float]:
    bad = [v for v in values if not (math.isfinite(v) and 0.0 <= v < 1.0)]
    if bad:
        raise SetupError(f"--sparsities {bad} outside [0, 1); give fractions such as 0.5 0.9")
    return list(dict.fromkeys(float(v) for v in values))


def make_row(
    args, method: str, modifier: str, sparsity: float, metrics: dict, **extra: Any
) -> dict:
    """The results row of one pruned (or the dense) model: metrics, run facts, ``extra``."""
    metrics = finite_or_none(metrics, f"{method} @ {sparsity:g}")
    return {
        "method": method,
        "modifier": modifier,
        "sparsity": sparsity,
        "accuracy": metrics["accuracy"],
        "top5": metrics["top5"],
        "loss": metrics["loss"],
        "samples": metrics["samples"],
        "model": args.model,
        "recipe": args.sparseml_recipe if method != DENSE else "",
        "device": args.device,
        "world_size": args.world_size,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }
