"""What every estimator provides, and the sizes the memory figures share.

An estimator turns gradient samples (or layer statistics) into the curvature estimate a
method scores and updates with. It owns three things:

- ``layout(pruner)``: how the selected weights map to parts (blocks, rows, layers) and which
  of them this rank handles (`sparseml.layouts`);
- ``memory(pruner, block, m)``: what it allocates per rank, as `sparseml.memory.MemoryItem`s,
  with the fields that drive the size; the preflight adds these up before any gradient is
  drawn, and ``smaller(pruner)`` lists cheaper settings to suggest when they do not fit;
- ``build(pruner, module, layout)``: the estimate itself.

A memory figure is the peak the prune adds: what lives through the whole step (the estimate)
plus the largest of the phases that never overlap (drawing samples, building, pruning), each
phase with its temporaries; `peak` assembles it. `tests/test_memory_figures.py` measures the
peak of a fresh process at two sizes per estimator and holds every figure within 1.3x of it.

``pruner`` is the pruning modifier the estimator serves: its ``refs`` (selected parameters),
``masks``, ``work_dtype``, ``fisher_device(param)``, ``num_grads``, ``damp`` and
``gradient_chunks(module)``. ``span(pruner)`` is the most weights one block can usefully
cover (None: the estimator has no block size to clamp).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch

from sparseml.memory import MemoryItem

GRAD_CHUNK = 64  # gradient samples per chunk: one GEMM accumulation, the unit of streaming


class Estimator(ABC):
    """Base of the estimators (see the module docstring)."""

    @abstractmethod
    def layout(self, pruner: Any) -> Any: ...

    @abstractmethod
    def memory(self, pruner: Any, block: int | None, m: int) -> tuple[list[MemoryItem], str]: ...

    @abstractmethod
    def build(self, pruner: Any, module: Any, layout: Any) -> Any: ...

    def span(self, pruner: Any) -> int | None:
        return None

    def smaller(self, pruner: Any) -> Iterator[tuple[dict, str]]:
        return iter(())


def width(pruner: Any) -> int:
    """Bytes per number of the work dtype."""
    return torch.finfo(pruner.work_dtype).bits // 8


def home(pruner: Any) -> torch.device:
    """Where the estimate lives: the ``fisher_inv_device`` or the first parameter's device."""
    return pruner.fisher_device(pruner.refs[0].param) if pruner.refs else torch.device("cpu")


def chunk_item(pruner: Any, m: int, label: str = "gradient chunk") -> MemoryItem:
    """One chunk of whole gradient samples, on the parameters' device."""
    d = sum(r.param.numel() for r in pruner.refs)
    device = pruner.refs[0].param.device if pruner.refs else torch.device("cpu")
    return MemoryItem(label, min(GRAD_CHUNK, m) * d * width(pruner), device)


# Scores, masks, sort indices and gathered updates of one pruning step, per selected weight,
# in units of the work dtype's width (+ 2 bytes of masks): measured 37-40 bytes per float32
# weight for global and per-layer selections with part-wise updates.
PRUNING_WIDTHS = 9


def weights_of(pruner: Any) -> int:
    return sum(r.param.numel() for r in pruner.refs)


def pruning_item(pruner: Any, extra: int = 0) -> MemoryItem:
    """The pruning phase: scores, selection and gathered updates (+ ``extra`` bytes)."""
    nbytes = weights_of(pruner) * (PRUNING_WIDTHS * width(pruner) + 2) + extra
    return MemoryItem("scores, masks and updates", nbytes, home(pruner))


def peak(persistent: list[MemoryItem], *phases: list[MemoryItem]) -> list[MemoryItem]:
    """``persistent`` items plus those of the largest phase (phases never overlap)."""
    return persistent + max(phases, key=lambda items: sum(i.nbytes for i in items))
