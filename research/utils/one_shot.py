"""Helpers of ``one_shot_pruning.py``: recipe checks, data, evaluation, gradient-sample reuse.

Call ``compat.ensure_torchvision()`` before importing (timm is imported here).

Sweep reuse: with one Fisher computation per pruning step, every sparsity of a sweep samples
its gradients from the same dense model, so :class:`CachingGradSampler` draws them once per
method and replays them for the other sparsities (identical results, one sampling pass). It
is used only while the model handed to the sampler still equals the dense model and the samples
fit the memory budget; anything else (a second recomputation, a different ``num_grads``) samples
afresh. The Fisher blocks themselves are rebuilt for every sparsity: the modifier API has no
hook to share them between ``manager.apply`` calls.
"""

from __future__ import annotations

import hashlib
import logging
import math
import resource
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import create_loader
from torch import nn

from sparseml import dist
from sparseml.modifiers.pruning import PruningModifier
from sparseml.modifiers.second_order import SecondOrderPruningModifier
from sparseml.pytorch.optim import ScheduledModifierManager
from sparseml.serialization import atomic_save

from . import models as _models
from .data import check_batch_fits, open_split
from .errors import CheckpointError, SetupError

_logger = logging.getLogger("one_shot")


# ----- recipe -------------------------------------------------------------------------------------
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
    return ScheduledModifierManager([pruner])


def pruning_modifier(manager: ScheduledModifierManager) -> PruningModifier:
    return manager.modifiers[0]


def needs_gradients(modifier: Any) -> bool:
    return isinstance(modifier, SecondOrderPruningModifier)


def modifier_settings(modifier: Any) -> dict[str, Any]:
    """The modifier's field values except the sparsities a sweep sets (JSON-friendly)."""
    skip = {"init_sparsity", "final_sparsity"}
    values = {k: v for k, v in modifier.field_values().items() if k not in skip}
    return {"modifier": type(modifier).__name__, **values}


# ----- model --------------------------------------------------------------------------------------
def file_digest(path: str | Path) -> str:
    h = hashlib.sha1()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load dense weights strictly and refuse NaN/Inf values: pruning scores would be garbage."""
    _models.load_weights(model, path, "--initial-checkpoint")
    check_finite_weights(model, f"--initial-checkpoint {path}")


def check_finite_weights(model: nn.Module, source: str) -> None:
    bad = _models.nonfinite_tensors(model)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(
            f"{source}: {len(bad)} tensors hold NaN/Inf values ({shown}); refusing to prune a "
            "diverged model (use the checkpoint of an earlier, finite epoch)"
        )


@torch.no_grad()
def broadcast_model(model: nn.Module) -> None:
    """Make every rank hold rank 0's weights and buffers."""
    for tensor in model.state_dict().values():
        dist.broadcast_(tensor)


def save_state_dict(model: nn.Module, path: Path) -> None:
    """``torch.save`` of the CPU state dict, atomically (see ``sparseml.serialization``)."""
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


# ----- data ---------------------------------------------------------------------------------------
class ShardedDataset(torch.utils.data.Dataset):
    """Every ``parts``-th sample of ``base`` starting at ``index`` (one rank's share).

    ``transform`` is forwarded to the base data set, where timm's ``create_loader`` sets it.
    """

    def __init__(self, base: Any, index: int, parts: int) -> None:
        self.base, self.index, self.parts = base, index, parts

    @property
    def transform(self) -> Any:
        return self.base.transform

    @transform.setter
    def transform(self, value: Any) -> None:
        self.base.transform = value

    def __len__(self) -> int:
        return len(range(self.index, len(self.base), self.parts))

    def __getitem__(self, i: int) -> Any:
        return self.base[self.index + i * self.parts]


def open_dataset(name: str, root: str | None, split: str, training: bool, rank: int, world: int):
    ds = open_split(name, root, split, is_training=training)
    return ShardedDataset(ds, rank, world) if world > 1 else ds


def loader_options(args: Any, cfg: dict, device: torch.device) -> dict[str, Any]:
    return dict(
        input_size=cfg["input_size"],
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg["crop_pct"],
        num_workers=args.workers,
        persistent_workers=False,
        pin_memory=args.pin_mem,
        device=device,
        use_prefetcher=not args.no_prefetcher,
    )


class GradSamplerData:
    """``data_loader_builder`` for the grad sampler: an endless stream of training batches.

    Yields ``([inputs], {}, target)`` on ``device``. A recipe's ``grad_sampler_kwargs`` may set
    ``batch_size``; other keys are ignored (as in CAP).
    """

    def __init__(self, dataset: Any, options: dict, batch_size: int, augment: bool) -> None:
        self.dataset, self.options, self.batch_size, self.augment = (
            dataset,
            options,
            batch_size,
            augment,
        )
        self._loaders: dict[int, Any] = {}

    def loader(self, batch_size: int) -> Any:
        check_batch_fits("-gb/--grad_sampler_batch_size", batch_size, len(self.dataset))
        if batch_size not in self._loaders:
            self._loaders[batch_size] = create_loader(
                self.dataset,
                batch_size=batch_size,
                is_training=True,
                no_aug=not self.augment,
                **self.options,
            )
        return self._loaders[batch_size]

    def __call__(self, device: Any = None, batch_size: int | None = None, **_ignored: Any):
        loader = self.loader(batch_size or self.batch_size)
        device = torch.device(device) if device is not None else self.options["device"]
        while True:
            empty = True
            for inputs, target in loader:
                empty = False
                yield [inputs.to(device)], {}, target.to(device)
            if empty:  # an endless loop over nothing would hang the run
                raise SetupError("the grad sampler loader yields no batch; lower -gb")


# ----- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over every sample of all ranks' shards."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss, count
    for inputs, target in loader:
        inputs, target = inputs.to(device), target.to(device)
        output = model(inputs).float()
        k = min(5, output.size(1))
        top = output.topk(k, dim=1).indices
        hits = top.eq(target[:, None])
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(dim=1).sum()
        sums[2] += F.cross_entropy(output, target, reduction="sum").double()
        sums[3] += target.numel()
    dist.all_reduce_sum_(sums)
    count = max(float(sums[3]), 1.0)
    return {
        "accuracy": 100.0 * float(sums[0]) / count,
        "top5": 100.0 * float(sums[1]) / count,
        "loss": float(sums[2]) / count,
        "samples": int(sums[3]),
    }


def layer_sparsity(model: nn.Module, names: list[str]) -> tuple[dict[str, float], float]:
    """Fraction of exact zeros of each named parameter, and over all of them together."""
    params = dict(model.named_parameters())
    zeros = total = 0
    per_layer = {}
    for name in names:
        p = params[name].detach()
        z = int((p == 0).sum())
        per_layer[name] = z / max(p.numel(), 1)
        zeros, total = zeros + z, total + p.numel()
    return per_layer, zeros / max(total, 1)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak CUDA memory allocated since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_process_max_rss"


def grad_sampler_for(data: GradSamplerData) -> dict[str, Any]:
    """The ``grad_sampler`` argument of ``manager.apply``."""
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
