"""What a pruner needs around its estimate: the grad sampler, the preflight memory check,
phase timings and the sweep cache. Plain functions and small objects over the pruner, so no
pruner inherits them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

from sparseml.dist import on_all_ranks
from sparseml.memory import check_fits

LOG = logging.getLogger(__name__)
T = TypeVar("T")
# Where a pruning step's time goes (``pruner.timings``, logged per step): drawing gradient
# samples, turning them into the curvature estimate, scoring and updating.
PHASES = ("gradients", "curvature", "pruning")
# Fields that change only the target, not the estimate or the pruning order.
TARGET_FIELDS = ("init_sparsity", "final_sparsity", "flops_target", "start_epoch", "end_epoch")


def device_present(device: torch.device) -> bool:
    """The CPU, or a CUDA device this machine has."""
    return device.type == "cpu" or (
        device.type == "cuda"
        and torch.cuda.is_available()
        and (device.index or 0) < torch.cuda.device_count()
    )


def first_present_device(names: list[str], fallback: torch.device, owner: str) -> torch.device:
    """The first of ``names`` this machine has (else ``fallback``), warning about the others."""
    devices = [torch.device(n) for n in names]
    present = [d for d in devices if device_present(d)]
    chosen = present[0] if present else fallback
    missing = [str(d) for d in devices if not device_present(d)]
    if missing:
        LOG.warning(
            "%s: devices %s do not exist on this machine; computing on %s", owner, missing, chosen
        )
    return chosen


def check_fisher_device(pruner: Any) -> None:
    """The ``fisher_inv_device`` field names a device this machine has."""
    name = pruner._values.get("fisher_inv_device")
    if name is None:
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise pruner.field_error(
            "fisher_inv_device", "is not a device name (e.g. cpu, cuda, cuda:1)"
        ) from None
    if not device_present(device):
        raise pruner.field_error("fisher_inv_device", "does not exist on this machine")


def clamp_block_size(pruner: Any, span: int | None) -> None:
    """A ``fisher_block_size`` above what one block can cover (``span`` weights, rounded up
    to the mask group) only holds padding: use the span."""
    block, group = pruner._values.get("fisher_block_size"), pruner.mask_spec.group
    if block is None or span is None or not pruner.refs:
        return
    limit = -(-span // group) * group
    if block > limit:
        LOG.warning(
            "%s: fisher_block_size %d exceeds the %d weights a block can cover here; "
            "using %d (a larger block would only hold padding)",
            type(pruner).__name__,
            block,
            span,
            limit,
        )
        pruner._values["fisher_block_size"] = limit


def preflight(pruner: Any) -> None:
    """Check the device, clamp the block size, then check on every rank that the estimator's
    memory figure fits (naming a smaller setting that would)."""
    estimator = pruner.estimator()
    check_fisher_device(pruner)
    clamp_block_size(pruner, estimator.span(pruner))
    estimator = pruner.estimator()  # the clamped block size
    owner = type(pruner).__name__
    block = pruner._values.get("fisher_block_size")
    items, fields = estimator.memory(pruner, block, pruner.num_grads)
    smaller = ((estimator.memory(pruner, **kw)[0], text) for kw, text in estimator.smaller(pruner))
    on_all_ranks(lambda: check_fits(owner, items, fields, smaller), owner)


def cached(pruner: Any, cache: dict | None, name: str, build: Callable[[], T]) -> T:
    """``build()``, reused across a one-shot sweep when the caller passes ``sweep_cache``.

    A sparsity sweep prunes fresh copies of the same dense model, so with a single
    recomputation the gradients and the estimate (CAP's elimination order included) do not
    depend on the target sparsity: ``manager.apply(copy, grad_sampler=..., sweep_cache=cache)``
    with one shared dict per dense model builds them once. Keys include every field except
    the targets, so a different recipe never hits another's entry.
    """
    if cache is None or pruner._values.get("num_recomputations", 1) != 1:
        return build()
    fields = tuple(
        sorted((k, repr(v)) for k, v in pruner.field_values().items() if k not in TARGET_FIELDS)
    )
    key = (type(pruner).__name__, fields, name)
    if key not in cache:
        cache[key] = build()
    return cache[key]


class Timings:
    """Wall seconds per phase of one pruning step; time spent drawing gradient samples inside
    a phase goes to ``gradients`` (the sampler counts its own ``seconds``)."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def _drawn(self) -> float:
        return self.sampler.seconds if self.sampler is not None else 0.0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        drawn, start = self._drawn(), time.perf_counter()
        try:
            yield
        finally:
            spent, drew = time.perf_counter() - start, self._drawn() - drawn
            self.seconds["gradients"] += drew
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - drew

    def log(self, owner: str) -> None:
        LOG.info(
            "%s: pruning step took %s",
            owner,
            ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items()),
        )
