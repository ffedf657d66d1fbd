"""FastCAP's shared Fisher: one B x B Gram per parameter, shared by its rows of B weights.

Two layouts of a parameter's row-major flattening:

- ``fixed`` (the reference's): consecutive runs of B weights, the same B for every parameter;
  a run need not start where a row of the weight starts (a conv's rows are
  in_channels * kh * kw long), so one Fisher coordinate can mix different inputs;
- ``rows``: B is the parameter's row length (``in_features`` of a Linear, ``in_channels * kh
  * kw`` of a conv), or its largest divisor not above ``fisher_block_size`` (and a multiple of
  the N:M group), so coordinate j of every block is the same input position of the layer.

With ``fisher_rows`` (rows layout only) each run of that many output rows (features or
channels) of a parameter gets its own Fisher, summed over its rows only: (G, B, B).
"""

from __future__ import annotations

import math
from typing import Any

from sparseml.curvature import shared_block_fishers
from sparseml.kernels.fast_cap import group_count
from sparseml.memory import MemoryItem
from sparseml.pruning.estimators.base import Estimator, chunk_item, peak, pruning_item

LAYOUTS = ("fixed", "rows")


def row_block(shape: tuple[int, ...], cap: int, group: int = 1) -> int:
    """The ``rows`` layout's B for a parameter of ``shape``: its row length (the product of
    all dimensions but the first) or the largest divisor of it <= ``cap`` that is a multiple
    of ``group``. Raises ValueError when no divisor qualifies."""
    row = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
    for b in range(min(cap, row), 0, -1):
        if row % b == 0 and b % group == 0:
            return b
    raise ValueError(f"no divisor of the row length {row} is <= {cap} and a multiple of {group}")


class SharedFisher(Estimator):
    """(fishers, count, energies): per parameter the float64 (B, B) sum of G_n^T G_n over the
    samples (G_n: sample n viewed as rows of B, zero-padded), or (G, B, B) with one per group
    of ``fisher_rows`` output rows; the number of samples; each row's gradient energy. Every
    rank computes every parameter's (the averaged samples are equal on all ranks). ``layout``
    ``fixed`` uses B = ``block`` for every parameter, ``rows`` a B per parameter
    (:func:`row_block` with ``block`` as the cap)."""

    def __init__(self, block: int, layout: str = "fixed", fisher_rows: int | None = None) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if fisher_rows is not None and (layout != "rows" or fisher_rows < 1):
            raise ValueError(f"fisher_rows needs the rows layout and >= 1, got {fisher_rows}")
        self.block, self.kind, self.fisher_rows = block, layout, fisher_rows

    def group_rows(self, pruner: Any, blocks: list[int]) -> list[int | None]:
        """Per parameter: the rows of B sharing one Fisher (None: all of them)."""
        if self.fisher_rows is None:
            return [None] * len(blocks)
        out = []
        for ref, b in zip(pruner.refs, blocks):
            shape = tuple(ref.param.shape)
            row = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
            out.append(self.fisher_rows * max(row // b, 1))
        return out

    def blocks(self, pruner: Any, block: int | None = None) -> list[int]:
        """B of every selected parameter."""
        block = self.block if block is None else block
        if self.kind == "fixed":
            return [block] * len(pruner.refs)
        group, out = pruner.mask_spec.group, []
        for ref in pruner.refs:
            try:
                out.append(row_block(tuple(ref.param.shape), block, group))
            except ValueError as err:  # e.g. a row length that N:M groups do not divide
                raise pruner.field_error(
                    "fisher_layout", f"does not fit {ref.name}: {err}"
                ) from err
        return out

    def layout(self, pruner: Any) -> None:
        return None  # rows of B consecutive weights of each whole parameter, on every rank

    def span(self, pruner: Any) -> int:
        return max((r.param.numel() for r in pruner.refs), default=1)

    def memory(self, pruner: Any, block: int, m: int) -> tuple[list[MemoryItem], str]:
        blocks = self.blocks(pruner, block)
        groups = self.group_rows(pruner, blocks)
        fishers = [
            MemoryItem(
                "Fisher (float64)",
                group_count(-(-r.param.numel() // b), k) * b * b * 8,
                pruner.fisher_device(r.param),
            )
            for r, b, k in zip(pruner.refs, blocks, groups)
        ]
        sweep = pruning_item(pruner, extra=pruner.sweep_bytes(blocks))
        plan = peak(fishers, [chunk_item(pruner, m)], [sweep])
        layout = "" if self.kind == "fixed" else " (fisher_layout: rows)"
        return plan, f"fisher_block_size={block}{layout} and {len(pruner.refs)} parameters"

    def smaller(self, pruner: Any):
        block, group = self.block, pruner.mask_spec.group
        while block > group:
            block = max(group, block // 2 // group * group)
            yield {"block": block, "m": pruner.num_grads}, f"fisher_block_size: {block}"

    def build(self, pruner: Any, module: Any, layout: None):
        devices = [pruner.fisher_device(r.param) for r in pruner.refs]
        blocks = self.blocks(pruner)
        return shared_block_fishers(
            pruner.gradient_chunks(module), blocks, devices, self.group_rows(pruner, blocks)
        )
