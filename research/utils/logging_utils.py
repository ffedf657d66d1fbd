"""Run logging: sparsity of the scheduled pruning modifier, sparsity JSON files and W&B."""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparseml.serialization import atomic_write_text
from sparseml.sparsity import ModuleSparsificationInfo

from .errors import SetupError

_logger = logging.getLogger("sparse_training")


def current_pruning_modifier(manager: Any, epoch: int) -> Any:
    """The first pruning modifier (manager order) with ``start_epoch <= epoch < end_epoch``."""
    if manager is None:
        return None
    for modifier in manager.pruning_modifiers:
        end = modifier.end_epoch if modifier.end_epoch >= 0 else float("inf")
        if modifier.start_epoch <= epoch < end:
            return modifier
    return None


def last_enforced_pruning_modifier(manager: Any, epoch: int) -> Any:
    """The pruning modifier that ended last before ``epoch`` and still enforces its masks."""
    if manager is None:
        return None
    done = [
        m
        for m in manager.pruning_modifiers
        if 0 <= m.end_epoch <= epoch
        and getattr(m, "leave_enabled", False)
        and getattr(m, "applied_sparsity", None) is not None
    ]
    return max(done, key=lambda m: m.end_epoch, default=None)


def scheduled_sparsity(manager: Any, epoch: int) -> float:
    """Mean ``applied_sparsity`` of the active pruning modifier, else of the last one whose
    masks are still enforced (fine-tuning after pruning); 0.0 when there is none."""
    modifier = current_pruning_modifier(manager, epoch) or last_enforced_pruning_modifier(
        manager, epoch
    )
    value = getattr(modifier, "applied_sparsity", None)
    if value is None:
        return 0.0
    if isinstance(value, list | tuple):
        return float(sum(value) / len(value)) if value else 0.0
    return float(value)


def is_update_epoch(manager: Any, epoch: int) -> bool:
    """True at the epochs where a pruning modifier changes the sparsity (its start, every
    ``update_frequency`` epochs after it, and its end)."""
    if manager is None:
        return False
    for modifier in manager.pruning_modifiers:
        start, end = modifier.start_epoch, modifier.end_epoch
        freq = getattr(modifier, "update_frequency", 0) or 0
        if freq <= 0 or epoch < start or (0 <= end < epoch):
            continue
        if (epoch - start) % freq == 0 or epoch == end:
            return True
    return False


def write_sparsity_distribution(out_dir: Path, epoch: int, model: torch.nn.Module) -> Path:
    """Write ``sparsity_distribution_epoch=<epoch>.json`` (summary and per-layer sparsity)."""
    path = Path(out_dir) / f"sparsity_distribution_epoch={epoch}.json"
    atomic_write_text(path, str(ModuleSparsificationInfo(model)))
    return path


def zero_pattern_digest(model: torch.nn.Module) -> str:
    """SHA-1 of which Linear/Conv weights are exactly zero (equal digests = equal masks)."""
    digest = hashlib.sha1()
    prunable = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    for name, layer in model.named_modules():
        if isinstance(layer, prunable):
            zeros = (layer.weight.detach() == 0).flatten().cpu().numpy()
            digest.update(name.encode())
            digest.update(np.packbits(zeros).tobytes())
    return digest.hexdigest()


def report_rank_agreement(epoch: int, digests: list[str]) -> bool:
    """Log whether every rank has the same zero pattern (an error if they differ)."""
    same = len(set(digests)) == 1
    log = _logger.info if same else _logger.error
    verdict = "identical" if same else "DIFFER"
    log("Epoch %d: zero patterns %s on %d ranks", epoch, verdict, len(digests))
    return same


def init_wandb(args: argparse.Namespace, out_dir: Path, recipe_path: Path | None) -> Any:
    """Start a W&B run (offline unless WANDB_MODE says otherwise); return the module."""
    try:
        import wandb
    except ImportError as err:
        raise SetupError("--log-wandb needs the wandb package: pip install wandb") from err
    config = dict(vars(args))
    if recipe_path is not None:
        config["recipe"] = recipe_path.read_text()
    wandb.init(
        project=args.wandb_project or args.experiment or "cap_sparse",
        name=out_dir.name,
        config=config,
        dir=str(out_dir),
    )
    if recipe_path is not None:
        wandb.save(str(recipe_path), base_path=str(recipe_path.parent), policy="now")
    return wandb


def param_histograms(wandb: Any, model: torch.nn.Module) -> dict[str, Any]:
    """W&B histograms of the non-zero values of every parameter (``module.`` stripped)."""
    hists = {}
    for name, param in model.named_parameters():
        values = param.detach().float().flatten()
        values = values[values != 0].cpu().numpy()
        if values.size:
            hists[f"weights/{name.removeprefix('module.')}"] = wandb.Histogram(values)
    return hists
