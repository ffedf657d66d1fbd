"""Measuring a pruned model in a one-shot sweep: accuracy, sparsity, peak memory.

:func:`evaluate` sums hits, loss and sample counts over all ranks before dividing, so a sweep's
numbers are exact for any sharding. ``engine.validate`` (training) keeps timm's per-batch
averaging instead: switching it would change the training logs and checkpoints' metrics.
"""

from __future__ import annotations

import resource
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseml import dist


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


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Any, batches: int, device: torch.device) -> int:
    """Re-estimate every BatchNorm's running statistics of a pruned model.

    The statistics are reset and re-accumulated as a cumulative average (``momentum=None``)
    over the first ``batches`` batches of ``loader`` (training images, no augmentation), with
    only the BatchNorm layers in train mode and no gradient; other layers (dropout...) stay in
    eval mode. Across ranks the statistics are averaged. Returns the number of BatchNorm
    layers (0: nothing to do, the loader is not read); the model is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches < 1:
        return 0
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for i, (inputs, _) in enumerate(loader):
            if i >= batches:
                break
            model(inputs.to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    stats = [t for m in norms for t in (m.running_mean, m.running_var) if t is not None]
    dist.all_reduce_mean_(stats)
    return len(norms)
