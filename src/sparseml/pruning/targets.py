"""Where a pruner's targets come from: the parameters and per-parameter sparsities its recipe
selects, the targets of each recomputation round of a step, and why a run would end its
schedule short. Plain functions over the pruner (`sparseml.pruning.modifier`), which keeps the
lifecycle; the schedule math itself is `sparseml.schedules`.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from sparseml.errors import RecipeError
from sparseml.masks import check_groupable
from sparseml.params import ParamRef, assign_targets, select_params
from sparseml.pruning.fields import FROM_PARAM
from sparseml.schedules import recomputation_targets, shortfall

LOG = logging.getLogger(__name__)
# A final sparsity that whole mask groups miss by more than this is reported (a parameter of
# fewer than 1 / (2 x this) groups can miss it).
COARSE_TOLERANCE = 0.02


def resolve_targets(pruner: Any, module: nn.Module) -> tuple[list[ParamRef], list, list[float]]:
    """(refs, final targets, initial sparsities), one per selected parameter: ``params`` with
    one ``final_sparsity``, or a mapping of targets to parameter patterns; every parameter
    must split into the mask's groups; ``init_sparsity: from_param`` reads each parameter's
    zeros."""
    owner = type(pruner).__name__
    values = pruner._values
    final = values.get("final_sparsity", 0.0)
    if isinstance(final, dict):
        refs, finals = assign_targets(
            final, lambda patterns: select_params(module, patterns, owner), owner
        )
    else:
        refs = select_params(module, pruner.params, owner)
        finals = [final] * len(refs)
    spec = pruner.mask_spec
    for ref in refs:
        try:
            check_groupable(ref.name, ref.param.shape, spec)
        except RecipeError as err:
            raise pruner.field_error("mask_type", str(err)) from None
    init = values.get("init_sparsity", 0.0)
    if init == FROM_PARAM:
        inits = [float((r.param == 0).float().mean()) for r in refs]
    else:
        inits = [init] * len(refs)
    warn_coarse_targets(pruner, refs, finals)
    return refs, finals, inits


def warn_coarse_targets(pruner: Any, refs: list[ParamRef], finals: list) -> None:
    """Warn where whole mask groups cannot come near a final sparsity: a selector prunes
    round(s x groups) groups (over all parameters with ``global_sparsity``), so ``block4`` at
    0.5 on a parameter of 4 entries prunes nothing."""
    spec = pruner.mask_spec
    if spec.kind == "nm" or not all(isinstance(f, float) for f in finals):
        return  # N:M prunes n of every m exactly; a FLOPs target is not a sparsity
    groups = [r.param.numel() // spec.group for r in refs]
    if pruner._values.get("global_sparsity", False) and len(refs) > 1:
        named = [(f"the {len(refs)} parameters together", sum(groups), finals[0])]
    else:
        named = [(r.name, g, f) for r, g, f in zip(refs, groups, finals)]
    for name, count, target in named:
        reached = min(round(count * target), count) / max(count, 1)
        if abs(reached - target) > COARSE_TOLERANCE:
            noun = "entr" + ("y" if count == 1 else "ies")
            if spec.group > 1:
                noun = f"{spec} group{'' if count == 1 else 's'} of {spec.group} entries"
            LOG.warning(
                "%s: final_sparsity %.2f rounds to %.2f on %s (%d %s)",
                type(pruner).__name__, target, reached, name, count, noun,
            )  # fmt: skip


def round_plans(pruner: Any, levels: list[float], targets: list[float]) -> list[list[float]]:
    """Per parameter, the target of each of the step's ``num_recomputations`` rounds, from
    where it stands (``levels``) to ``targets``."""
    values = pruner._values
    rounds = values.get("num_recomputations", 1)
    return [
        recomputation_targets(
            level, target, rounds, values.get("recomputation_inter_func", "linear"),
            values.get("recompute_degree"),
        )
        for level, target in zip(levels, targets)
    ]  # fmt: skip


def run_length_problem(pruner: Any, num_epochs: int, steps_per_epoch: int | None) -> str | None:
    """Why a run of ``num_epochs`` epochs would stop the pruner's schedule short of its target
    (None when it reaches it; `sparseml.schedules.shortfall`)."""
    target = pruner.final_target()
    if target is None:
        return None
    init = pruner.init_sparsity if isinstance(pruner.init_sparsity, float) else 0.0
    reached, need = shortfall(
        pruner.start_epoch, pruner.end_epoch, pruner.update_frequency, init, target,
        pruner.inter_func, num_epochs, steps_per_epoch,
    )  # fmt: skip
    if need is None:
        return None
    return (
        f"{type(pruner).__name__} ends at epoch {pruner.end_epoch:g} but the run has "
        f"{num_epochs} epochs: it would reach about {reached:.2%} sparsity instead of "
        f"{target:.2%}; run at least {need} epochs or end the modifier earlier"
    )
