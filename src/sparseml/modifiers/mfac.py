"""M-FAC pruning: OBS scores and updates from a matrix-free inverse empirical Fisher.

Paper: "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information",
E. Frantar, E. Kurtic, D. Alistarh, arXiv 2107.03356, https://arxiv.org/abs/2107.03356
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from sparseml import dist
from sparseml.curvature import matrix_free_inverse, unpruned_gradients
from sparseml.errors import GradSamplerError
from sparseml.fields import (
    Field,
    FieldValueError,
    as_bool,
    as_float,
    as_int,
    as_str,
    as_str_list,
    optional,
)
from sparseml.layouts import UnprunedLayout
from sparseml.masks import create_masks
from sparseml.memory import MemoryItem
from sparseml.modifiers.pruning import PruningModifier
from sparseml.modifiers.second_order import SecondOrderPruningModifier
from sparseml.registry import register_modifier

LOG = logging.getLogger(__name__)


def _num_grads(value: Any) -> int | dict[float, int]:
    if not isinstance(value, dict):
        return as_int(1)(value)
    out = {as_float(0.0, 1.0)(k): as_int(1)(v) for k, v in value.items()}
    if 0.0 not in out:
        raise FieldValueError("as a mapping {sparsity: count} must include the key 0.0")
    return dict(sorted(out.items()))


def _block_size(value: Any) -> int | None:
    if value is None or (not isinstance(value, bool) and value in (-1, 0)):
        return None  # the full Fisher, as the reference's -1
    return as_int(1)(value)


@register_modifier
class MFACPruningModifier(SecondOrderPruningModifier):
    """Gradual or one-shot pruning with M-FAC inverse-Fisher OBS scores and updates.

    Per pruning step: m gradient samples g_i (rows of G, restricted to the still unpruned
    weights) give F = damp*I + (1/m) G^T G, blockwise or full; scores are w^2 / (2 [F^-1]_qq)
    and the kept weights move by F^-1 (-w * 1[newly pruned] / diag(F^-1)), the sum of the
    single-weight OBS corrections, as in the reference.

    Sample recipe::

        !MFACPruningModifier
          params: __ALL_PRUNABLE__
          init_sparsity: 0.05
          final_sparsity: 0.9
          start_epoch: 0.0
          end_epoch: 10.0
          update_frequency: 1.0
          num_grads: {0.0: 64, 0.5: 128, 0.75: 256}
          fisher_block_size: 2000
          damp: 1.0e-5

    | field | paper | meaning |
    |---|---|---|
    | num_grads | m | gradients per Fisher; {sparsity: m} uses the largest key <= sparsity |
    | damp | lambda | absolute dampening of F |
    | fisher_block_size | B | consecutive unpruned weights per block; null or -1: full F |
    | num_pages | - | full F: columns processed in pages (bounds temporaries) |

    Blocks hold consecutive *unpruned* weights of one parameter and never cross parameters
    (spec M7) unless ``blocks_cross_layers: true`` (the reference's chunks of the concatenation
    of all parameters). Gradients come from the ``grad_sampler`` kwarg, or, with
    ``use_gradient_buffering: true`` (or no sampler and ``null``), from the training steps:
    the last ``num_grads`` gradients seen before each optimizer step, kept on ``grads_device``.
    ``block_implementation`` is accepted and ignored: the kernel takes the exact B x B inverse
    when B < m and the m x B factor otherwise. Computation runs on ``fisher_inv_device``, else
    on the first usable of ``available_devices`` (alias ``available_gpus``), else on the
    parameters' device. Under torch.distributed the blocks are split over the ranks.
    """

    FIELDS = {
        "num_grads": Field(64, _num_grads, "m, or {sparsity: m} (key 0.0 required)"),
        "damp": Field(1e-5, as_float(0.0, lo_open=True), "lambda: Fisher dampening (> 0)"),
        "fisher_block_size": Field(2000, _block_size, "B; null or -1 for the full Fisher"),
        "num_pages": Field(1, as_int(1), "column pages for the full Fisher"),
        "global_sparsity": Field(False, as_bool, "one threshold over all params"),
        "use_gradient_buffering": Field(None, optional(as_bool), "buffer training gradients"),
        "grads_device": Field("cpu", as_str, "device of the training-gradient buffer"),
        "available_devices": Field(
            None, optional(as_str_list), "compute devices", aliases=("available_gpus",)
        ),
        "block_implementation": Field("auto", as_str, "accepted for compatibility, ignored"),
        "blocks_cross_layers": Field(False, as_bool, "reference blocking across parameters"),
    }

    def reset_state(self) -> None:
        super().reset_state()
        self._buffer: dict[str, Any] | None = None

    def validate(self) -> None:
        # the base's block-size / mask-group check does not apply: M-FAC blocks hold unpruned
        # weights only and its update is not joint per mask group
        PruningModifier.validate(self)
        if self._values["num_recomputations"] != 1 and (
            self.mask_spec.kind == "nm" or self._values["use_gradient_buffering"]
        ):
            raise self.field_error(
                "num_recomputations", "must be 1 with an N:M mask or gradient buffering"
            )

    # ----- lifecycle ------------------------------------------------------------------------------
    def on_initialize(self, module: nn.Module, **kwargs: Any) -> None:
        sampler = kwargs.get("grad_sampler")
        if self.use_gradient_buffering or (sampler is None and self.use_gradient_buffering is None):
            self.grad_sampler = None
            self.prepare()
            self._reset_buffer()
        else:
            super().on_initialize(module, **kwargs)

    def block_span(self) -> int:
        sizes = [r.param.numel() for r in self.refs]
        return sum(sizes) if self.blocks_cross_layers else max(sizes, default=1)

    def memory_plan(self, block: int | None, m: int | dict):
        """Gradients (m x unpruned weights per rank), the buffer, and the inverse's factors."""
        m = m if isinstance(m, int) else max(m.values())
        lo, hi = self._layout().local
        d = hi - lo
        width = torch.finfo(self.work_dtype).bits // 8
        device = self._compute_device()
        buffered = self.grad_sampler is None
        items = []
        if buffered:
            items.append(
                MemoryItem("gradient buffer", m * d * width, torch.device(self.grads_device))
            )
        if not buffered or torch.device(self.grads_device) != device:
            items.append(MemoryItem("gradients", m * d * width, device))
        if block is None:  # Z overwrites the gradients; A and its factors are m x m float64
            items.append(MemoryItem("m x m factors", 3 * m * m * 8, device))
        elif block < m:
            items.append(
                MemoryItem("Fisher blocks", -(-d // block) * block * block * width, device)
            )
        else:
            items.append(MemoryItem("Z factors", m * d * width, device))
        return items, f"num_grads={m}, fisher_block_size={block} and {d} unpruned weights"

    def smaller_settings(self):
        """Halved num_grads (the memory grows with it; the block size matters less); a
        ``{sparsity: m}`` schedule is scaled as a whole, so the suggestion keeps its shape."""
        schedule = self.num_grads if isinstance(self.num_grads, dict) else {0.0: self.num_grads}
        scale = 1
        while max(schedule.values()) // (2 * scale) >= 1:
            scale *= 2
            smaller = {k: max(1, v // scale) for k, v in schedule.items()}
            text = smaller[0.0] if len(smaller) == 1 else smaller
            yield {"block": self.fisher_block_size, "m": smaller}, f"num_grads: {text}"

    def optimizer_pre_step(
        self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> None:
        if self._buffer is None:
            return
        if self.ended:
            self._buffer = None  # no pruning ahead: free the memory
            return
        self._push_training_grads()

    # ----- pruning step ---------------------------------------------------------------------------
    def prune_step(self, module: nn.Module, targets: list[float]) -> None:
        # buffered gradients were laid out with the masks of their time (a superset of the
        # current ones: entries pruned since then have zero gradient and zero weight)
        layout = self._buffer["layout"] if self._buffer is not None else self._layout()
        if layout.total == 0:
            return
        device = self._compute_device()
        build = lambda: self._build_inverse(module, layout, device)  # noqa: E731  (needs autograd)
        with self.timed("curvature"):
            inv = build() if self._buffer is not None else self.cached("curvature", build)
        with torch.no_grad(), self.timed("pruning"):
            self._obs_update(inv, layout, targets, device)
        if self._buffer is not None:
            self._reset_buffer()

    def _obs_update(self, inv, layout: UnprunedLayout, targets: list[float], device) -> None:
        """Scores, masks and the summed single-weight OBS update from the inverse ``inv``."""
        dtype = self.work_dtype  # never half precision: w^2 would round and near-ties flip
        weights = [w.to(device) for w in self.flat_weights()]
        index = [i.to(device) for i in layout.index]
        diag = self._gather(inv.diag().to(dtype), layout).clamp_min(torch.finfo(dtype).tiny)
        kept = [w[i] for w, i in zip(weights, index)]
        scores = []  # w^2 / (2 [F^-1]_qq) on kept weights; masked_scores puts -inf on the rest
        for ref, i, kept_w, seg in zip(self.refs, index, kept, layout.segments(diag)):
            score = torch.zeros(ref.param.numel(), device=device, dtype=dtype)
            score[i] = kept_w.square() / (2 * seg)
            scores.append(score.view(ref.param.shape))
        masks = create_masks(
            self.masked_scores(scores), targets, self.mask_spec, self.global_sparsity
        )
        # x = -w / diag on the weights pruned now, 0 elsewhere (and on padding)
        x = torch.zeros(layout.total, device=device, dtype=dtype)
        for kept_w, i, mask, seg, x_seg in zip(
            kept, index, masks, layout.segments(diag), layout.segments(x)
        ):
            drop = ~mask.reshape(-1).to(device)[i]
            x_seg.copy_(torch.where(drop, -kept_w / seg, 0.0))
        lo, hi = layout.local
        delta = self._gather(inv.mul(x[lo:hi]).to(dtype), layout)
        for n, (w, i, seg) in enumerate(zip(weights, index, layout.segments(delta))):
            w[i] += seg
            self.write_weights(n, w)
        self.set_masks(masks)

    def _build_inverse(self, module: nn.Module, layout: UnprunedLayout, device: torch.device):
        lo, hi = layout.local
        if self._buffer is not None:
            self._push_training_grads()  # the current step's gradients, if any
            count = self._buffer["count"]
            if count == 0:
                raise GradSamplerError(
                    f"{type(self).__name__}: gradient buffering has no training gradients yet; "
                    "pass grad_sampler=... for one-shot pruning"
                )
            wanted = self._num_grads_now()
            if count < wanted:
                LOG.warning(
                    "%s: only %d buffered training gradients (num_grads %d) at this pruning "
                    "step; raise update_frequency or lower num_grads for a fuller estimate",
                    type(self).__name__,
                    count,
                    wanted,
                )
            grads = self._buffer["grads"][:count].to(device)
        else:
            num = self._num_grads_now()
            chunks = self.gradient_chunks(module, num)
            grads = unpruned_gradients(chunks, layout, num, device, self.work_dtype)
        return matrix_free_inverse(grads, self.damp, self.fisher_block_size, self.num_pages)

    def _gather(self, local: Tensor, layout: UnprunedLayout) -> Tensor:
        """Full-layout vector from this rank's part (blocks) or rank 0's copy (full F)."""
        if not dist.is_distributed():
            return local
        if self.fisher_block_size is None:
            return dist.broadcast_(local.contiguous())
        size = self.fisher_block_size
        rows = dist.all_gather_shards(local.reshape(-1, size), layout.total // size)
        return rows.reshape(-1)

    # ----- helpers --------------------------------------------------------------------------------
    def _num_grads_now(self) -> int:
        if isinstance(self.num_grads, int):
            return self.num_grads
        current = self.current_sparsities()
        sparsity = sum(current) / max(len(current), 1)
        return [v for k, v in self.num_grads.items() if k <= sparsity + 1e-12][-1]

    def _compute_device(self) -> torch.device:
        if self.fisher_inv_device:
            return torch.device(self.fisher_inv_device)
        usable, missing = [], []
        for name in self.available_devices or []:
            device = torch.device(name)
            present = device.type == "cpu" or (
                device.type == "cuda"
                and torch.cuda.is_available()
                and (device.index or 0) < torch.cuda.device_count()
            )
            (usable if present else missing).append(device)
        fallback = usable[0] if usable else self.refs[0].param.device
        if missing and not getattr(self, "_warned_devices", False):
            LOG.warning(
                "%s: available_devices %s do not exist on this machine; computing on %s",
                type(self).__name__,
                [str(d) for d in missing],
                fallback,
            )
            self._warned_devices = True
        return fallback

    def _layout(self) -> UnprunedLayout:
        return UnprunedLayout(self.masks, self.fisher_block_size, self.blocks_cross_layers)

    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's buffered training gradients (its columns of the layout)."""
        if self._buffer is None:
            return {}
        buf = self._buffer
        return {
            "grads": buf["grads"][: buf["count"]].detach().cpu().clone(),
            "count": buf["count"],
            "next": buf["next"],
            "local": list(buf["layout"].local),
            "world": dist.world_size(),
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if not dist.is_distributed() and self._buffer is not None:  # one process: all of it
            state["gradient_buffer"] = self.rank_state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self._buffer is not None:
            self._reset_buffer()  # the layout of the saved masks
            if state.get("gradient_buffer"):
                self.load_rank_state_dict(state["gradient_buffer"])

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        if self._buffer is None or not state:
            return
        grads = self._buffer["grads"]
        here = {"local": list(self._buffer["layout"].local), "world": dist.world_size()}
        fits = state["grads"].shape[1:] == grads.shape[1:] and state["count"] <= grads.shape[0]
        if not fits or state.get("local") != here["local"] or state.get("world") != here["world"]:
            LOG.warning(
                "%s: the saved gradient buffer (columns %s of %s ranks) is not this rank's "
                "(columns %s of %s); starting with an empty buffer",
                type(self).__name__,
                state.get("local"),
                state.get("world"),
                here["local"],
                here["world"],
            )
            return
        grads[: state["count"]] = state["grads"].to(grads.device, grads.dtype)
        self._buffer.update(count=state["count"], next=state["next"] % grads.shape[0])

    def _reset_buffer(self) -> None:
        layout = self._layout()
        lo, hi = layout.local
        grads = torch.zeros(
            self._num_grads_now(),
            hi - lo,
            device=torch.device(self.grads_device),
            dtype=self.work_dtype,
        )
        self._buffer = {"layout": layout, "grads": grads, "count": 0, "next": 0}

    def _push_training_grads(self) -> None:
        buf = self._buffer
        params = [r.param for r in self.refs]
        if buf is None or any(p.grad is None for p in params):
            return
        row = buf["grads"][buf["next"] : buf["next"] + 1]
        buf["layout"].fill(row, [p.grad.detach().reshape(1, -1) for p in params])
        buf["next"] = (buf["next"] + 1) % buf["grads"].shape[0]
        buf["count"] = min(buf["count"] + 1, buf["grads"].shape[0])
