"""Shared base of the second-order pruners (OBS, CAP, FastCAP, M-FAC).

It adds the gradient-sampling fields, builds the grad sampler from the ``grad_sampler`` kwarg,
splits one pruning step into ``num_recomputations`` Fisher rebuilds spaced from the model's
actual sparsity, and offers helpers to stream gradient chunks and write weights back. A
subclass implements ``prune_step(module, targets)``: draw gradients, build its curvature
estimate, choose masks (``create_masks`` / ``set_masks``) and write the updated weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from sparseml import dist
from sparseml.dist import on_all_ranks
from sparseml.errors import RecipeError
from sparseml.fields import (
    Field,
    FieldValueError,
    as_bool,
    as_dict,
    as_float,
    as_int,
    as_str,
    brief,
    one_of,
    optional,
)
from sparseml.grad_sampler import GradSampler
from sparseml.kernels.precision import work_dtype
from sparseml.layouts import BlockLayout
from sparseml.masks import create_masks
from sparseml.memory import MemoryItem, check_fits
from sparseml.modifiers.pruning import PruningModifier
from sparseml.schedules import RECOMPUTATION_FUNCS, recomputation_targets

LOG = logging.getLogger(__name__)
T = TypeVar("T")
# Where a pruning step's time goes (``SecondOrderPruningModifier.timings``, logged per step):
# drawing gradient samples, turning them into the curvature estimate, scoring and updating.
PHASES = ("gradients", "curvature", "pruning")
# Fields that change only the target, not the curvature estimate or the pruning order.
_TARGET_FIELDS = ("init_sparsity", "final_sparsity", "flops_target", "start_epoch", "end_epoch")


def block_size_or_full(value: Any) -> int | None:
    """A Fisher block size, or None (also -1 or 0, the references' spelling) for one full
    Fisher over all weights."""
    if value is None or (not isinstance(value, bool) and value in (-1, 0)):
        return None
    return as_int(1)(value)


SECOND_ORDER_FIELDS = {
    "num_grads": Field(1024, as_int(1), "m: gradient samples per Fisher estimate"),
    "damp": Field(1e-7, as_float(0.0, lo_open=True), "lambda: Fisher dampening (> 0)"),
    "fisher_block_size": Field(50, as_int(1), "B: Fisher block size"),
    "num_recomputations": Field(1, as_int(1), "Fisher rebuilds per pruning step"),
    "recomputation_inter_func": Field(
        "linear", one_of(*RECOMPUTATION_FUNCS), "spacing of rebuilds (poly: recompute_degree)"
    ),
    "recompute_degree": Field(None, optional(as_int(1)), "degree of the poly spacing"),
    "grad_sampler_kwargs": Field({}, as_dict, "keyword arguments for data_loader_builder"),
    "fisher_inv_device": Field(
        None, optional(as_str), "device holding Fisher blocks (default: param's)"
    ),
    "global_sparsity": Field(True, as_bool, "one threshold over all params"),
    "inter_func": Field(
        "cubic", one_of("linear", "cubic", "inverse_cubic"), "sparsity schedule shape"
    ),
}


class SecondOrderPruningModifier(PruningModifier):
    """Base for pruners that need gradient samples (not usable in a recipe by itself)."""

    FIELDS = SECOND_ORDER_FIELDS
    PRUNES_AT_INITIALIZE = False
    GRAD_CHUNK = 64  # gradients buffered per GEMM accumulation

    def reset_state(self) -> None:
        super().reset_state()
        self.grad_sampler: GradSampler | None = None
        self.sweep_cache: dict | None = None
        self.timings: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    @classmethod
    def _canonical_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The WoodFisher repository's ``recompute_num: R`` (R recomputations after the first
        Fisher, so R + 1 builds per pruning step) is ``num_recomputations: R + 1``."""
        if "recompute_num" in kwargs:
            kwargs = dict(kwargs)
            value = kwargs.pop("recompute_num")
            if "num_recomputations" in kwargs:
                raise RecipeError(
                    f"{cls.__name__}: give num_recomputations or recompute_num, not both"
                )
            try:
                kwargs["num_recomputations"] = as_int(0)(value) + 1
            except FieldValueError as err:
                raise RecipeError(
                    f"{cls.__name__}: field 'recompute_num' = {brief(value)} {err}"
                ) from None
        return super()._canonical_kwargs(kwargs)

    def validate(self) -> None:
        super().validate()
        self.check_recomputation_fields()
        spec = self.mask_spec
        block = self._values.get("fisher_block_size")
        if spec.group > 1 and block is not None and block % spec.group:
            raise self.field_error(
                "fisher_block_size", f"must be a multiple of the mask group size {spec.group}"
            )
        if spec.kind == "nm" and self._values["num_recomputations"] != 1:
            raise self.field_error("num_recomputations", "must be 1 with an N:M mask_type")

    def check_recomputation_fields(self) -> None:
        poly = self._values["recomputation_inter_func"] == "poly"
        if poly != (self._values["recompute_degree"] is not None):
            raise self.field_error(
                "recompute_degree", "is required with, and only allowed with, "
                "recomputation_inter_func: poly"
            )  # fmt: skip

    def on_initialize(self, module: nn.Module, **kwargs: Any) -> None:
        self.grad_sampler = GradSampler.from_kwargs(
            kwargs.get("grad_sampler"), self.grad_sampler_kwargs, type(self).__name__
        )
        self.sweep_cache = kwargs.get("sweep_cache")
        self.prepare()

    # ----- size checks, before any gradient is drawn ----------------------------------------------
    def prepare(self) -> None:
        """Check the device, clamp the block size, then check the memory plan on every rank."""
        self._check_fisher_device()
        self._clamp_block_size()
        owner = type(self).__name__
        items, fields = self.memory_plan(self._values.get("fisher_block_size"), self.num_grads)
        smaller = ((self.memory_plan(**kw)[0], text) for kw, text in self.smaller_settings())
        on_all_ranks(lambda: check_fits(owner, items, fields, smaller), owner)

    def smaller_settings(self) -> Iterator[tuple[dict, str]]:
        """Settings that need less memory, largest first: halved block sizes."""
        block, group = self._values.get("fisher_block_size"), self.mask_spec.group
        while block is not None and block > group:
            block = max(group, block // 2 // group * group)
            yield {"block": block, "m": self.num_grads}, f"fisher_block_size: {block}"

    def _check_fisher_device(self) -> None:
        name = self._values.get("fisher_inv_device")
        if name is None:
            return
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise self.field_error(
                "fisher_inv_device", "is not a device name (e.g. cpu, cuda, cuda:1)"
            ) from None
        present = device.type == "cpu" or (
            device.type == "cuda"
            and torch.cuda.is_available()
            and (device.index or 0) < torch.cuda.device_count()
        )
        if not present:
            raise self.field_error("fisher_inv_device", "does not exist on this machine")

    def block_span(self) -> int:
        """Most weights one Fisher block can usefully cover: the largest selected parameter."""
        return max((r.param.numel() for r in self.refs), default=1)

    def _clamp_block_size(self) -> None:
        block, group = self._values.get("fisher_block_size"), self.mask_spec.group
        span = -(-self.block_span() // group) * group
        if block is not None and self.refs and block > span:
            LOG.warning(
                "%s: fisher_block_size %d exceeds the %d weights a block can cover here; "
                "using %d (a larger block would only hold padding)",
                type(self).__name__,
                block,
                self.block_span(),
                span,
            )
            self._values["fisher_block_size"] = span

    def memory_plan(self, block: int, m: int) -> tuple[list[MemoryItem], str]:
        """Per-rank allocations of a block-diagonal Fisher pruner (OBS, CAP) and their drivers."""
        sizes = self.block_sizes()
        layout = BlockLayout(sizes, block)
        n_local = sum(p.b1 - p.b0 for p in layout.parts)
        d_local = sum(p.c1 - p.c0 for p in layout.parts)
        width = torch.finfo(self.work_dtype).bits // 8
        device = self.fisher_device(self.refs[0].param) if self.refs else torch.device("cpu")
        # a chunk holds whole gradients (dynamic blocks compact them only afterwards)
        chunk = min(self.GRAD_CHUNK, m) * sum(r.param.numel() for r in self.refs) * width
        if m < block:  # sample-space form: the sampled chunks are kept, then H (work dtype)
            items = [
                MemoryItem("sampled gradients", m * d_local * width, device),
                MemoryItem("Fisher blocks", n_local * block * block * width, device),
            ]
            if dist.is_distributed():  # this rank's columns are copied out of each chunk
                items.append(MemoryItem("gradient chunk", chunk, self.refs[0].param.device))
        else:
            items = [MemoryItem("Fisher blocks (float64)", n_local * block * block * 8, device)]
            items.append(MemoryItem("gradient chunk", chunk, self.refs[0].param.device))
        return items, f"fisher_block_size={block}, num_grads={m} and {sum(sizes)} weights"

    def block_sizes(self) -> list[int]:
        """Weights the Fisher blocks cover per parameter (all of them; dynamic blocks: the
        unpruned ones)."""
        return [r.param.numel() for r in self.refs]

    def cached(self, name: str, build: Callable[[], T]) -> T:
        """``build()``, reused across a one-shot sweep when the caller passes ``sweep_cache``.

        A sparsity sweep prunes fresh copies of the same dense model, so with a single
        recomputation the gradients, Fisher blocks (and CAP's elimination order) do not depend
        on the target sparsity: ``manager.apply(copy, grad_sampler=..., sweep_cache=cache)``
        with one shared dict per dense model builds them once. Keys include every field except
        the targets, so a different recipe never hits another's entry.
        """
        if self.sweep_cache is None or self.num_recomputations != 1:
            return build()
        fields = tuple(
            sorted((k, repr(v)) for k, v in self.field_values().items() if k not in _TARGET_FIELDS)
        )
        key = (type(self).__name__, fields, name)
        if key not in self.sweep_cache:
            self.sweep_cache[key] = build()
        return self.sweep_cache[key]

    # ----- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.grad_sampler is not None:  # the sample stream's position, for exact resume
            state["grad_sampler"] = self.grad_sampler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.grad_sampler is not None and state.get("grad_sampler"):
            self.grad_sampler.load_state_dict(state["grad_sampler"])

    # ----- pruning step --------------------------------------------------------------------------
    def schedule_levels(self) -> list[float]:
        """Where the schedule's targets stand now: the sparsities (a FLOPs-target pruner: the
        MACs removed); the recomputations are spaced from here to the targets."""
        return self.current_sparsities()

    def select_masks(self, scores: list[Tensor], targets: list[float]) -> list[Tensor]:
        """Keep-masks from scores (higher = keep) at ``targets``; pruned entries go first."""
        return create_masks(
            self.masked_scores(scores), targets, self.mask_spec, self.global_sparsity
        )

    def prune(self, module: nn.Module, targets: list[float]) -> None:
        current = self.schedule_levels()
        plans = [
            recomputation_targets(
                c, t, self.num_recomputations, self.recomputation_inter_func, self.recompute_degree
            )
            for c, t in zip(current, targets)
        ]
        self.timings = dict.fromkeys(PHASES, 0.0)
        for step in range(self.num_recomputations):
            self.prune_step(module, [plan[step] for plan in plans])
            self.enforcer.apply()
        LOG.info(
            "%s: pruning step took %s",
            type(self).__name__,
            ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items()),
        )

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the block's wall time to ``self.timings[phase]``, except the time spent drawing
        gradient samples inside it, which goes to ``timings["gradients"]``."""
        sampler = self.grad_sampler
        drawn, start = (sampler.seconds if sampler else 0.0), time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            drew = (sampler.seconds if sampler else 0.0) - drawn
            self.timings["gradients"] += drew
            self.timings[phase] = self.timings.get(phase, 0.0) + spent - drew

    def prune_step(self, module: nn.Module, targets: list[float]) -> None:
        raise TypeError(f"{type(self).__name__} does not define prune_step")

    # ----- helpers for subclasses ----------------------------------------------------------------
    @property
    def work_dtype(self) -> torch.dtype:
        """Precision of gradients, scores and updates: float32, or float64 for float64 params."""
        return work_dtype(r.param.dtype for r in self.refs)

    def fisher_device(self, param: Tensor) -> torch.device:
        device = self._values.get("fisher_inv_device")
        return torch.device(device) if device else param.device

    def gradient_chunks(
        self, module: nn.Module, num_grads: int | None = None
    ) -> Iterator[list[Tensor]]:
        """Chunks of masked gradient samples: per chunk one ``(c, numel)`` tensor per param."""
        assert self.grad_sampler is not None
        return self.grad_sampler.iter_chunks(
            module,
            [r.param for r in self.refs],
            self.num_grads if num_grads is None else num_grads,
            chunk_size=self.GRAD_CHUNK,
            masks=self.masks,
            desc=f"{type(self).__name__} gradients",
            dtype=self.work_dtype,
        )

    def flat_weights(self) -> list[Tensor]:
        """Flattened weights in ``work_dtype`` (a view for float32 params, else an exact copy)."""
        dtype = self.work_dtype
        return [r.param.detach().reshape(-1).to(dtype) for r in self.refs]

    @torch.no_grad()
    def write_weights(self, index: int, flat: Tensor) -> None:
        """The only place where pruning math is cast back to the parameter's dtype."""
        param = self.refs[index].param
        param.data.copy_(flat.reshape(param.shape).to(param.device, param.dtype))
