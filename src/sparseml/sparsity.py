"""Sparsity measurements of tensors and modules (SparseML's ``ModuleSparsificationInfo``).

A weight counts as pruned when it is exactly zero. Prunable layers are ``nn.Linear`` and
``nn.Conv*d`` (QAT variants subclass them); only their ``weight`` is prunable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sparseml.params import PRUNABLE_TYPES  # one definition: what __ALL_PRUNABLE__ selects

__all__ = ["PRUNABLE_TYPES", "QUANTIZABLE_TYPES", "ModuleSparsificationInfo", "tensor_sparsity"]
QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Conv3d)


def tensor_sparsity(tensor: torch.Tensor, dim: int | Sequence[int] | None = None) -> torch.Tensor:
    """Fraction of exact zeros in ``tensor``.

    With ``dim`` (one or several dimensions) the result has the sizes of those dimensions and
    holds the sparsity of each slice taken over the remaining dimensions, e.g. for a weight of
    shape (out, in), ``dim=0`` gives one value per output row. Returns a float32 tensor.
    """
    zeros = (tensor == 0).to(torch.float32)
    if dim is None:
        return zeros.mean() if zeros.numel() else torch.tensor(0.0)
    dims = [dim] if isinstance(dim, int) else list(dim)
    dims = [d % tensor.dim() for d in dims]
    rest = [d for d in range(tensor.dim()) if d not in dims]
    if not rest:
        return zeros
    moved = zeros.permute(*dims, *rest)
    sizes = [tensor.shape[d] for d in dims]
    return moved.reshape(math.prod(sizes), -1).mean(dim=1).reshape(sizes)


def _is_quantized(layer: nn.Module) -> bool:
    return getattr(layer, "weight_fake_quant", None) is not None


def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


class ModuleSparsificationInfo:
    """Counts of trainable, prunable, pruned and quantized parameters of a module.

    ``str(info)`` is a JSON object with ``params_summary`` and ``params_info`` (see the two
    properties). A DDP-wrapped module works; its layer names keep the ``module.`` prefix.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.trainable_params = [p for p in module.parameters() if p.requires_grad]
        self.prunable_layers = [
            (name, layer)
            for name, layer in module.named_modules()
            if isinstance(layer, PRUNABLE_TYPES) and getattr(layer, "weight", None) is not None
        ]

    @staticmethod
    def _zeros(param: torch.Tensor) -> int:
        return int((param.detach() == 0).sum().item())

    @staticmethod
    def _weights_and_bias(layer: nn.Module) -> int:
        bias = getattr(layer, "bias", None)
        return layer.weight.numel() + (bias.numel() if bias is not None else 0)

    @property
    def params_summary(self) -> dict[str, Any]:
        """Totals over trainable parameters, prunable weights and quantizable layers."""
        total = sum(p.numel() for p in self.trainable_params)
        sparse = sum(self._zeros(p) for p in self.trainable_params)
        weights = [layer.weight for _, layer in self.prunable_layers if layer.weight.requires_grad]
        prunable = sum(w.numel() for w in weights)
        prunable_sparse = sum(self._zeros(w) for w in weights)
        quant_layers = [
            layer
            for _, layer in self.module.named_modules()
            if isinstance(layer, QUANTIZABLE_TYPES)
        ]
        quantizable = sum(self._weights_and_bias(layer) for layer in quant_layers)
        quantized = sum(self._weights_and_bias(lay) for lay in quant_layers if _is_quantized(lay))
        return {
            "total": total,
            "sparse": sparse,
            "sparsity_percent": _percent(sparse, total),
            "prunable": prunable,
            "prunable_sparse": prunable_sparse,
            "prunable_sparsity_percent": _percent(prunable_sparse, prunable),
            "quantizable": quantizable,
            "quantized": quantized,
            "quantized_percent": _percent(quantized, quantizable),
        }

    @property
    def params_info(self) -> dict[str, dict[str, Any]]:
        """``{"<layer>.weight": {"numel", "sparsity", "quantized"}}`` for every prunable layer."""
        return {
            f"{name}.weight": {
                "numel": layer.weight.numel(),
                "sparsity": self._zeros(layer.weight) / max(layer.weight.numel(), 1),
                "quantized": _is_quantized(layer),
            }
            for name, layer in self.prunable_layers
        }

    def to_dict(self) -> dict[str, Any]:
        return {"params_summary": self.params_summary, "params_info": self.params_info}

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
