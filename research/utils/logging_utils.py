"""Run logging: sparsity of the scheduled pruning modifier, sparsity JSON files and W&B."""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparseml.params import PRUNABLE_TYPES
from sparseml.serialization import atomic_write_text
from sparseml.sparsity import ModuleSparsificationInfo

from .errors import SetupError

_logger = logging.getLogger("sparse_training")


def scheduled_sparsity(manager: Any, epoch: int) -> float:
    """The schedule's sparsity at ``epoch`` (``manager.sparsity_status``); 0.0 without a recipe."""
    return 0.0 if manager is None else manager.sparsity_status(epoch)["sparsity"]


def is_update_epoch(manager: Any, epoch: int) -> bool:
    """True at the epochs where a pruning modifier changes the sparsity (the manager says)."""
    return manager is not None and manager.sparsity_status(epoch)["update_epoch"]


def write_sparsity_distribution(out_dir: Path, epoch: int, model: torch.nn.Module) -> Path:
    """Write ``sparsity_distribution_epoch=<epoch>.json`` (summary and per-layer sparsity)."""
    path = Path(out_dir) / f"sparsity_distribution_epoch={epoch}.json"
    atomic_write_text(path, str(ModuleSparsificationInfo(model)))
    return path


def zero_pattern_digest(model: torch.nn.Module) -> str:
    """SHA-1 of which Linear/Conv weights are exactly zero (equal digests = equal masks)."""
    digest = hashlib.sha1()
    for name, layer in model.named_modules():
        if isinstance(layer, PRUNABLE_TYPES):
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
    """Start a W&B run (online with credentials, as timm; see compat.set_wandb_mode)."""
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
