"""Where each parameter's unpruned weights sit in the flat vector M-FAC's Fisher acts on."""

from __future__ import annotations

from torch import Tensor

from sparseml import dist


class UnprunedLayout:
    """Where each parameter's unpruned weights sit in the flat vector the Fisher acts on.

    Parameter i's unpruned entries (flat indices ``index[i]``) occupy ``[offsets[i],
    offsets[i] + len(index[i]))``. With blocks, each parameter's range is zero-padded to a
    multiple of B (unless blocks cross layers) and the total to a multiple of B; zero gradient
    columns are decoupled, so padding changes nothing. ``local`` is this rank's column range.
    """

    def __init__(self, masks: list[Tensor], block: int | None, cross_layers: bool) -> None:
        self.index = [m.reshape(-1).nonzero().squeeze(1) for m in masks]
        self.offsets, pos = [], 0
        for idx in self.index:
            self.offsets.append(pos)
            pos += (
                idx.numel() if block is None or cross_layers else -(-idx.numel() // block) * block
            )
        self.total = pos if block is None else -(-pos // block) * block
        if block is None or not dist.is_distributed():
            self.local = (0, self.total)
        else:
            b0, b1 = dist.shard_bounds(self.total // block)
            self.local = (b0 * block, b1 * block)

    def segments(self, flat: Tensor) -> list[Tensor]:
        return [flat[lo : lo + idx.numel()] for lo, idx in zip(self.offsets, self.index)]

    def fill(self, out: Tensor, rows: list[Tensor]) -> None:
        """Write (c, numel_i) per-parameter rows into ``out`` (c, local width), zeros elsewhere."""
        lo, hi = self.local
        out.zero_()
        for idx, off, src in zip(self.index, self.offsets, rows):
            a, b = max(lo, off), min(hi, off + idx.numel())
            if a < b:
                cols = idx[a - off : b - off].to(src.device)
                out[:, a - lo : b - lo] = src[:, cols].to(out.device, out.dtype)
