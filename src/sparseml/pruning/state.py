"""What a pruner saves for an exact resume, and how it is restored: its masks, the sparsity
its last step applied, the gradient sampler's position in its sample stream and the FLOPs
plan's state. Plain functions over the pruner (`sparseml.pruning.modifier`)."""

from __future__ import annotations

from typing import Any

import torch

from sparseml.errors import RecipeError


def pruner_state(pruner: Any, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (the modifier base's) with the pruner's own entries added."""
    state["applied_sparsity"] = pruner.applied_sparsity
    state["masks"] = {r.name: m.detach().cpu().clone() for r, m in zip(pruner.refs, pruner.masks)}
    if pruner.grad_sampler is not None:  # the sample stream's position, for exact resume
        state["grad_sampler"] = pruner.grad_sampler.state_dict()
    if pruner.flops is not None:
        state.update(pruner.flops.state_dict())
    return state


def check_saved_masks(pruner: Any, state: dict[str, Any]) -> None:
    """The saved masks are for the parameters the recipe selects (checked before loading)."""
    if pruner.enforcer is None:
        raise RuntimeError(f"{type(pruner).__name__}: initialize before load_state_dict")
    masks, names = state.get("masks", {}), [r.name for r in pruner.refs]
    if sorted(masks) != sorted(names):
        raise RecipeError(
            f"{type(pruner).__name__}: saved masks are for {sorted(masks)}, "
            f"but the recipe selects {sorted(names)}"
        )


def restore_pruner_state(pruner: Any, state: dict[str, Any]) -> None:
    """The pruner's own entries of ``state`` (after the modifier base restored its own)."""
    masks = state.get("masks", {})
    pruner.applied_sparsity = state.get("applied_sparsity")
    pruner.enforcer.set_masks([masks[r.name].to(torch.bool) for r in pruner.refs])
    if pruner.started and (pruner._values.get("leave_enabled", False) or not pruner.ended):
        pruner.enforcer.enable()
    else:
        pruner.enforcer.disable()
    if pruner.grad_sampler is not None and state.get("grad_sampler"):
        pruner.grad_sampler.load_state_dict(state["grad_sampler"])
    if pruner.flops is not None:
        pruner.flops.load_state_dict(state)
