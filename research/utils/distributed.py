"""Process setup for plain python, ``torchrun`` and ``python -m torch.distributed.launch``.

Distributed iff ``WORLD_SIZE`` > 1 in the environment (both launchers set it). The local rank
comes from ``LOCAL_RANK`` when set, else from ``--local-rank``/``--local_rank``. gloo on CPU,
nccl on CUDA. Only the global rank 0 writes files and logs.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import logging
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from sparseml import dist as sparseml_dist

from . import faults
from .errors import SetupError


def _device(args: argparse.Namespace, distributed: bool) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError(f"--device {name} asked for CUDA but no CUDA device is available")
        if distributed or device.index is None:
            device = torch.device("cuda", args.local_rank if distributed else 0)
        torch.cuda.set_device(device)
    return device


def init_distributed(args: argparse.Namespace) -> torch.device:
    """Pick the device and join the process group; sets ``args.{distributed,rank,world_size}``."""
    args.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = _device(args, args.distributed)
    args.rank, args.world_size = 0, 1
    if args.distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            timeout=datetime.timedelta(seconds=args.timeout),
        )
        args.rank, args.world_size = dist.get_rank(), dist.get_world_size()
    args.device = str(device)
    return device


def is_primary(args: argparse.Namespace) -> bool:
    return getattr(args, "rank", 0) == 0


def barrier(args: argparse.Namespace) -> None:
    if getattr(args, "distributed", False):
        dist.barrier()


def cleanup(args: argparse.Namespace) -> None:
    """Leave the process group at the end of a successful run (never after a failure).

    After an exception a peer may sit in another collective, so a barrier would hang: the
    scripts then leave through ``faults.run_main`` without touching the group. Here, after a
    barrier (every rank is done), a script's rank exits at once (``faults.leave(0)``: output
    flushed, no destructor): gloo's worker threads free finished work (and the Python tensors
    it holds) after the caller has moved on, so tearing the group down (or DDP's reducer, which
    holds it) while the main thread holds the GIL and a worker waits for it hung the rank at
    exit now and then (seen in CI: ``~ProcessGroupGloo`` joining a worker stuck in
    ``decref_pyobject``). Callers of a script's ``main`` in-process destroy the group.
    """
    if getattr(args, "distributed", False) and dist.is_initialized():
        dist.barrier()
        if faults.in_script():
            faults.leave(0)
        dist.destroy_process_group()


def gather_objects(args: argparse.Namespace, obj: object) -> list[object]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` when not distributed)."""
    if not getattr(args, "distributed", False):
        return [obj]
    out: list[object] = [None] * args.world_size
    dist.all_gather_object(out, obj)
    return out


# Loggers of the scripts and the libraries whose progress lines would repeat on every rank.
_QUIET_LOGGERS = ("", "sparse_training", "one_shot", "sparseml", "timm", "utils")


def quiet_other_ranks(args: argparse.Namespace) -> None:
    """Ranks other than 0 log warnings and errors only, and show no Python warnings.

    Progress (grad-sampler batches, epochs) would otherwise print once per rank, and library
    deprecation warnings repeat rank 0's word for word. Errors still reach stderr from every
    rank (with a rank prefix, see ``faults``).
    """
    if is_primary(args):
        return
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET or logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def wrap_ddp(
    model: torch.nn.Module, device: torch.device, sync_buffers: bool = True
) -> torch.nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel`` without deprecated arguments.

    Buffers are synced by default; ``sync_buffers=False`` (``--no-ddp-bb``) asks for no sync in
    the forward pass through ``forward_sync_buffers`` where this torch has it (passing the
    deprecated ``broadcast_buffers`` makes torch print a FutureWarning on every rank).
    """
    kwargs: dict[str, Any] = {}
    if not sync_buffers:
        params = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
        key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        kwargs[key] = False
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, **kwargs
    )


@torch.no_grad()
def broadcast_model(model: torch.nn.Module) -> None:
    """Make every rank hold rank 0's weights and buffers."""
    for tensor in model.state_dict().values():
        sparseml_dist.broadcast_(tensor)
