"""Checkpoints under timm's keys, holding only tensors and plain containers, written atomically.

A checkpoint is a dict with timm's keys, so ``timm.models.load_checkpoint(model, path)`` loads it
(the EMA weights when present, as timm does): ``state_dict`` (the unwrapped model), ``optimizer``,
``epoch`` (last finished epoch), ``arch``, ``version`` (2, timm's), ``metric``, and when used
``state_dict_ema`` and ``amp_scaler``. Our additions: ``manager`` (recipe manager state: masks
and schedule position, or None), ``rng`` (per rank: torch/numpy/python random states, for an
exact continuation) and ``checkpoint_hist`` (the run's best checkpoints, see
:mod:`utils.checkpoint_hist`). Everything loads with ``torch.load(weights_only=True)``.

Checkpoints of older versions (``model``, ``ema``, ``scaler`` keys) still resume:
:func:`load_checkpoint` returns them under the new keys. Reading goes through the one reader,
``utils.weights`` (which also verifies the ``checksum`` entry every checkpoint carries), and
``class_map`` holds the class names the model was trained with.

One-shot sweeps write bare weights here too (:func:`save_state_dict`), read back by the one
reader like every other weights file (``models.build_model`` -> ``models.load_weights``).
``--save-compressed`` files (:func:`save_compressed_weights`, :func:`mirror_compressed`) hold
the weights of a model or checkpoint as ``sparseml.compressed`` writes them.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparseml.compressed import save_compressed
from sparseml.modifiers.quantization import quant_bits_by_layer
from sparseml.serialization import atomic_save

from . import models as _models
from .errors import CheckpointError
from .weights import (
    CHECKSUM_KEY,
    content_checksum,
    read_manager_state,
    read_payload,
    read_state_dict,
)


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


def _byte_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8


def rng_state_problem(state: Any) -> str | None:
    """Why ``state`` is no :func:`rng_state` (None when it is one): each part is tried on a
    scratch generator, so a hand-edited or damaged state is found before the run starts."""
    if not isinstance(state, dict):
        return f"is a {type(state).__name__}, not a table of random states"
    missing = [k for k in ("torch", "numpy", "python") if k not in state]
    if missing:
        return f"has no {missing[0]!r} state"
    try:
        torch.Generator().set_state(state["torch"])
        kind, keys, *rest = state["numpy"]
        np.random.RandomState().set_state((kind, keys.numpy().astype(np.uint32), *rest))
        version, internal, gauss = state["python"]
        random.Random().setstate((version, tuple(internal), gauss))
    except (TypeError, ValueError, RuntimeError, AttributeError, OverflowError) as err:
        return f"holds an invalid random state ({str(err).splitlines()[0][:120]})"
    cuda = state.get("cuda", [])
    if not (isinstance(cuda, list) and all(_byte_tensor(t) for t in cuda)):
        return "holds an invalid 'cuda' random state (not a list of byte tensors)"
    return None


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
    checkpoint_hist: list[dict[str, Any]] | None = None,
    rank_state: list[dict[str, Any]] | None = None,
    class_map: list[str] | None = None,
) -> Path:
    """Write a checkpoint to ``path`` atomically (a failed write keeps the previous file and
    raises :class:`sparseml.serialization.FileWriteError` naming the path and the reason).

    ``rng`` holds one :func:`rng_state` per rank (default: this process only), ``rank_state``
    one ``manager.rank_state_dict()`` per rank (state sharded over ranks);
    ``checkpoint_hist`` is a :meth:`CheckpointHistory.state_dict`; ``class_map`` the class
    names in label order (``data.class_names``), checked when the weights are used again. The
    file carries a content checksum (``weights.content_checksum``) verified on every read.
    """
    path = Path(path)
    state = {
        "arch": arch,
        "epoch": int(epoch),
        "state_dict": _unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "version": 2,
        "metric": None if metric is None else float(metric),
        "manager": manager.state_dict() if manager is not None else None,
        "rng": rng if rng is not None else [rng_state()],
        "checkpoint_hist": checkpoint_hist or [],
        "rank_state": rank_state or [],
    }
    if ema is not None:  # timm's loader prefers this key whenever it is present
        state["state_dict_ema"] = _unwrap(ema).state_dict()
    if scaler is not None:
        state[SCALER_KEY] = scaler.state_dict()
    if class_map is not None:
        state["class_map"] = list(class_map)
    state[CHECKSUM_KEY] = content_checksum(state)
    atomic_save(state, path)
    return path


SCALER_KEY = "amp_scaler"  # timm's NativeScaler.state_dict_key


def load_checkpoint(path: str | Path, option: str = "checkpoint") -> dict[str, Any]:
    """A training checkpoint under the timm keys (older checkpoints' ``model``/``ema``/``scaler``
    renamed), read by the one reader (``weights.read_payload``: checksum verified); one-line
    errors when it is missing, unreadable, corrupt or not a training checkpoint."""
    state = read_payload(path, option)
    if not isinstance(state.get("state_dict"), dict):
        raise CheckpointError(
            f"{option} {path} has no 'state_dict' entry; not a training checkpoint"
        )
    return state


def load_model_weights(model: torch.nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """Load ``state["state_dict"]`` strictly into the unwrapped ``model``; name mismatches."""
    weights = {k.removeprefix("module."): v for k, v in state["state_dict"].items()}
    try:
        _unwrap(model).load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path} (arch {state.get('arch')!r}) does not fit this model: "
            f"{str(err).splitlines()[0]} ..."
        ) from err


# ----- bare weights (one-shot sweeps) ------------------------------------------------------------
def file_digest(path: str | Path) -> str:
    """A short content hash: a sweep's results remember which dense weights they came from."""
    h = hashlib.sha1()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    bad = _models.nonfinite_tensors(model)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(
            f"{source}: {len(bad)} tensors hold NaN/Inf values ({shown}); refusing to prune a "
            "diverged model (use the checkpoint of an earlier, finite epoch)"
        )


def save_state_dict(model: torch.nn.Module, path: Path) -> None:
    """``torch.save`` of the CPU state dict, atomically (see ``sparseml.serialization``)."""
    atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


# The note of a compressed file whose weights come from a quantization-aware run: how many
# layers were fake-quantized (the ranges themselves are only in the run's .pth checkpoints).
QUANTIZED_NOTE = "quantized_layers"


def quantization_notes(quantized_layers: int) -> dict[str, str]:
    return {QUANTIZED_NOTE: str(quantized_layers)} if quantized_layers else {}


def save_compressed_weights(model: torch.nn.Module, path: Path, quantized_layers: int = 0) -> None:
    """The model's CPU state dict as a compressed sparse checkpoint, atomically (noting the
    layers a quantization-aware recipe fake-quantized, if any)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_compressed(state, path, quantization_notes(quantized_layers))


def mirror_compressed(checkpoint: Path, target: Path) -> None:
    """Write ``target``: the weights of ``checkpoint`` (EMA when it holds them, as timm loads
    it), compressed. Skipped when ``target`` already mirrors this version of the file: it takes
    the checkpoint's modification time, which the best-checkpoint copy keeps too."""
    stat = checkpoint.stat()
    if target.is_file() and target.stat().st_mtime_ns == stat.st_mtime_ns:
        return
    bits = quant_bits_by_layer(read_manager_state(checkpoint, "checkpoint"))
    save_compressed(
        read_state_dict(checkpoint, "checkpoint"), target, quantization_notes(len(bits))
    )
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
