"""Checkpoints that hold only tensors and plain containers, written atomically.

A checkpoint is a dict with ``model`` (state dict of the unwrapped model), ``optimizer``,
``scaler`` (AMP loss scaler or None), ``ema`` (EMA model state dict or None), ``manager``
(recipe manager state: masks and schedule position, or None), ``epoch`` (last finished epoch),
``arch``, ``rng`` (per rank: torch/numpy/python random states, for an exact continuation),
``metric`` and ``best`` (:class:`BestMetric` state, so a resumed run keeps the best metric of
the whole run). Everything loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparseml.serialization import atomic_save

from .errors import CheckpointError


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    epoch: int,
    arch: str,
    scaler: Any = None,
    ema: Any = None,
    manager: Any = None,
    metric: float | None = None,
    rng: list[dict[str, Any]] | None = None,
    best: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint to ``path`` atomically (a failed write keeps the previous file and
    raises :class:`sparseml.serialization.FileWriteError` naming the path and the reason).

    ``rng`` holds one :func:`rng_state` per rank (default: this process only); ``best`` is a
    :meth:`BestMetric.state_dict`.
    """
    path = Path(path)
    state = {
        "arch": arch,
        "epoch": int(epoch),
        "model": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": _unwrap(ema).state_dict() if ema is not None else None,
        "manager": manager.state_dict() if manager is not None else None,
        "metric": None if metric is None else float(metric),
        "rng": rng if rng is not None else [rng_state()],
        "best": best if best is not None else {},
    }
    atomic_save(state, path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU with ``weights_only=True``; clear error when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated, corrupt or not written by "
            f"sparse_training.py): {str(err).splitlines()[0]}"
        ) from err
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} has no 'model' entry; not a training checkpoint")
    return state


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Load ``state["model"]`` strictly into the unwrapped ``model``; name mismatches clearly."""
    weights = {k.removeprefix("module."): v for k, v in state["model"].items()}
    try:
        _unwrap(model).load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path} (arch {state.get('arch')!r}) does not fit this model: "
            f"{str(err).splitlines()[0]} ..."
        ) from err


def restore_training_state(
    state: dict[str, Any] | None, args: Any, model: torch.nn.Module, optimizer: Any, scaler: Any
) -> None:
    """Load weights (and, unless ``--no-resume-opt``, optimizer and AMP scaler) from ``state``."""
    if state is None:
        return
    load_model_weights(model, state, args.resume)
    if not args.no_resume_opt:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])


class BestMetric:
    """Best evaluation metric (and its epoch) per sparsity level, over the whole run.

    The state goes into every checkpoint, so after ``--resume`` a ``*_best.pth`` is replaced
    only by a better epoch than any before the restart, not just the best since it. Levels are
    the formatted sparsity in the best checkpoint's name; non-finite metrics never win.
    """

    def __init__(self, decreasing: bool = False) -> None:
        self.decreasing = decreasing
        self.best: dict[str, dict[str, float | int]] = {}

    def update(self, level: str, metric: float, epoch: int) -> bool:
        """Record ``metric``; True when it is the best of ``level`` so far."""
        if not math.isfinite(metric):
            return False
        old = self.best.get(level)
        if old is not None:
            better = metric < old["metric"] if self.decreasing else metric > old["metric"]
            if not better:
                return False
        self.best[level] = {"metric": float(metric), "epoch": int(epoch)}
        return True

    def state_dict(self) -> dict[str, dict[str, float | int]]:
        return {level: dict(entry) for level, entry in self.best.items()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore from a checkpoint's ``best`` (absent in checkpoints of older versions)."""
        self.best = {
            str(level): {"metric": float(e["metric"]), "epoch": int(e["epoch"])}
            for level, e in (state or {}).items()
        }
