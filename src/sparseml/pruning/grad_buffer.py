"""The last m training gradients, kept for a pruner that estimates from them (M-FAC's
``use_gradient_buffering``) instead of drawing samples from a grad sampler."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from sparseml import dist
from sparseml.errors import GradSamplerError
from sparseml.layouts import UnprunedLayout

LOG = logging.getLogger(__name__)


class TrainingGradients:
    """A ring buffer of (m, local width) gradients at this rank's columns of an
    `UnprunedLayout`, filled before every optimizer step (``push``)."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.layout: UnprunedLayout | None = None
        self.grads: Tensor | None = None
        self.count = self.next = 0

    def reset(self, layout: UnprunedLayout, rows: int, dtype: torch.dtype) -> None:
        lo, hi = layout.local
        self.layout = layout
        self.grads = torch.zeros(rows, hi - lo, device=self.device, dtype=dtype)
        self.count = self.next = 0

    def push(self, params: list[Tensor]) -> None:
        """Add the parameters' current ``.grad`` (skipped while any is missing)."""
        if self.grads is None or any(p.grad is None for p in params):
            return
        row = self.grads[self.next : self.next + 1]
        self.layout.fill(row, [p.grad.detach().reshape(1, -1) for p in params])
        self.next = (self.next + 1) % self.grads.shape[0]
        self.count = min(self.count + 1, self.grads.shape[0])

    def take(self, pruner: Any, wanted: int) -> Tensor:
        """The buffered gradients, the current step's included; an empty buffer is an error
        (one-shot pruning needs a grad sampler), a short one a warning."""
        self.push([r.param for r in pruner.refs])
        owner = type(pruner).__name__
        if self.count == 0:
            raise GradSamplerError(
                f"{owner}: gradient buffering has no training gradients yet; "
                "pass grad_sampler=... for one-shot pruning"
            )
        if self.count < wanted:
            LOG.warning(
                "%s: only %d buffered training gradients (num_grads %d) at this pruning "
                "step; raise update_frequency or lower num_grads for a fuller estimate",
                owner,
                self.count,
                wanted,
            )
        return self.grads[: self.count]

    def state_dict(self) -> dict[str, Any]:
        """This rank's buffered gradients (its columns of the layout)."""
        if self.grads is None:
            return {}
        return {
            "grads": self.grads[: self.count].detach().cpu().clone(),
            "count": self.count,
            "next": self.next,
            "local": list(self.layout.local),
            "world": dist.world_size(),
        }

    def load_state_dict(self, state: dict[str, Any], owner: str) -> None:
        if self.grads is None or not state:
            return
        grads = self.grads
        here = {"local": list(self.layout.local), "world": dist.world_size()}
        fits = state["grads"].shape[1:] == grads.shape[1:] and state["count"] <= grads.shape[0]
        if not fits or state.get("local") != here["local"] or state.get("world") != here["world"]:
            LOG.warning(
                "%s: the saved gradient buffer (columns %s of %s ranks) is not this rank's "
                "(columns %s of %s); starting with an empty buffer",
                owner,
                state.get("local"),
                state.get("world"),
                here["local"],
                here["world"],
            )
            return
        grads[: state["count"]] = state["grads"].to(grads.device, grads.dtype)
        self.count, self.next = state["count"], state["next"] % grads.shape[0]
