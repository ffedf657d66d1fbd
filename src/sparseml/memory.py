"""Memory preflight: what a second-order pruner will hold, checked before it is spent.

Each second-order modifier lists what it will allocate per rank (Fisher blocks, gradient
buffers, working copies) as `MemoryItem`s before collecting a single gradient. `check_fits`
logs the plan and raises a `RecipeError` that states the estimate, the fields that drive it
and a setting that would fit when a device lacks the memory, instead of a multi-TB allocation
failing (or a machine swapping) hours into a run. The plan follows from the recipe's
settings, so this is a user error (one line, exit status 2 in the scripts), not a bug.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from sparseml import dist
from sparseml.errors import RecipeError

LOG = logging.getLogger(__name__)
GIB = 1024**3
# Share of the free memory a plan may take: the model, activations and allocator slack need
# the rest.
HEADROOM = 0.9


@dataclass(frozen=True)
class MemoryItem:
    what: str
    nbytes: int
    device: torch.device


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.3g} GiB"


def free_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on ``device`` (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def describe(items: list[MemoryItem]) -> str:
    """One short line: items of the same kind on the same device are summed with their count
    (FastCAP lists one Fisher per layer: a line per plan, not an entry per layer)."""
    ranks = dist.world_size()
    groups: dict[tuple[str, torch.device], list[int]] = {}
    for item in items:
        groups.setdefault((item.what, item.device), []).append(item.nbytes)
    parts = ", ".join(
        f"{what} {gib(sum(sizes))} on {device}" + (f" ({len(sizes)} x)" if len(sizes) > 1 else "")
        for (what, device), sizes in groups.items()
    )
    return f"{parts}; per rank, {ranks} rank{'s' * (ranks > 1)}"


# The last plan logged per owner: a one-shot sweep checks the same plan at every sparsity and
# logs it once (again only when it changes).
_LOGGED: dict[str, str] = {}


def shortfall(items: list[MemoryItem]) -> tuple[torch.device, int, int] | None:
    """(device, needed, free) for the first device whose total exceeds ``HEADROOM`` of its
    free memory; None when everything fits (or the free memory is unknown)."""
    by_device: dict[torch.device, int] = {}
    for item in items:
        by_device[item.device] = by_device.get(item.device, 0) + item.nbytes
    for device, total in by_device.items():
        free = free_bytes(device)
        if free is not None and total > HEADROOM * free:
            return device, total, free
    return None


def check_fits(
    owner: str, items: list[MemoryItem], fields: str, alternatives: Iterable[tuple[list, str]]
) -> None:
    """Log the plan; raise a `RecipeError` when it does not fit.

    ``alternatives``: (items, setting) pairs of smaller settings, tried in order; the message
    names the first that fits.
    """
    plan = describe(items)
    if _LOGGED.get(owner) != plan:
        LOG.info("%s memory plan: %s", owner, plan)
        _LOGGED[owner] = plan
    short = shortfall(items)
    if short is None:
        return
    device, total, free = short
    fits = next((text for plan, text in alternatives if shortfall(plan) is None), None)
    advice = f"{fits} would fit" if fits else "no smaller setting fits: use more ranks"
    raise RecipeError(
        f"{owner} needs about {gib(total)} on {device} ({describe(items)}) but only "
        f"{gib(free)} is free there. The size is driven by {fields}; {advice}"
    )
