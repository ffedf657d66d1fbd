"""The one reader of every weights or checkpoint file the project writes or reads (no timm).

:func:`read_payload` opens any file: our training checkpoints (timm's keys; checkpoints of
older versions with ``model``/``ema``/``scaler`` keys are returned under the new keys), timm's
and CAP's checkpoints, bare state dicts, safetensors files and compressed sparse checkpoints
(``sparseml.compressed``, recognised by their header). The views on top of it:
:func:`read_state_dict` (the weights, EMA first as timm loads them), :func:`read_manager_state`
(the recipe manager's state: masks, schedule, quantization ranges) and :func:`read_class_map`
(the class names the model was trained with, in label order).

Integrity: training checkpoints carry a ``checksum`` entry (`sparseml.checksum`), verified
on every read; a mismatch is a one-line :class:`CheckpointError` naming the file and the entry.
Files without it (other tools' files) are read unverified.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from sparseml.checksum import CHECKSUM_KEY, VALUES_KEY, checksum_problem, content_checksum

from .errors import CheckpointError

__all__ = ["CHECKSUM_KEY", "VALUES_KEY", "content_checksum", "read_payload", "read_state_dict"]

# Keys under which timm, CAP and our training script store the model's weights, in preference order.
_WEIGHT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# Keys of checkpoints written before the timm layout, and their timm names.
_OLD_KEYS = {"model": "state_dict", "ema": "state_dict_ema", "scaler": "amp_scaler"}
# torch.load and safetensors raise several types for corrupt files.
_READ_ERRORS = (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError)
_READ_ERRORS += (zipfile.BadZipFile, KeyError, IndexError, TypeError, AttributeError)
# torch's safe unpickler asserts on some damaged pickles ("saved_id must be a tuple").
_READ_ERRORS += (SafetensorError, AssertionError)


def _load_problem(path: Path, err: Exception) -> str:
    """Why a file did not load, in words a user can act on. torch's weights-only refusal
    suggests ``weights_only=False`` (running the file's code): never pass that on."""
    if path.suffix.lower() == ".onnx":
        return (
            "it is an ONNX model, not a checkpoint; give the .pth, .safetensors or "
            ".sparse.safetensors file it was exported from"
        )
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
        return (
            "not a checkpoint of tensors (torch's safe loader refused it; files holding code "
            "or other objects are not loaded)"
        )
    text = str(err).strip()
    return f"truncated or corrupt: {text.splitlines()[0] if text else type(err).__name__}"


def _corrupt(path: Path, option: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{option} {path} is corrupt: {what} (bytes changed on disk or in a copy, or the file "
        "was edited); use another checkpoint of the run"
    )


def read_payload(path: str | Path, option: str) -> dict[str, Any]:
    """The content of ``path`` as a dict, checksum verified.

    Training checkpoints come back as saved (old keys renamed); safetensors and compressed
    files as ``{"state_dict": weights}``; a bare state dict as itself.
    """
    from sparseml.compressed import SUFFIX, is_compressed, load_compressed
    from sparseml.errors import CompressedFileError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{option} {path} does not exist")
    if path.name.endswith(SUFFIX) or is_compressed(path):  # a cut header: still its errors
        try:
            return {"state_dict": load_compressed(path)}
        except CompressedFileError as err:
            raise CheckpointError(f"{option}: {err}") from err
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return {"state_dict": load_file(str(path))}
        payload: Any = torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS as err:
        raise CheckpointError(f"{option} {path} is unreadable: {_load_problem(path, err)}") from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"{option} {path} holds no state dict of tensors")
    problem = checksum_problem(payload)
    if problem is not None:
        raise _corrupt(path, option, problem)
    if "state_dict" not in payload and isinstance(payload.get("model"), dict):
        payload = {_OLD_KEYS.get(k, k): v for k, v in payload.items()}
    return payload


def weights_of(payload: dict[str, Any], path: str | Path, option: str) -> dict[str, Any]:
    """The model weights in a payload (EMA first, as timm loads them), ``module.`` stripped."""
    state: Any = payload
    for key in _WEIGHT_KEYS:
        if isinstance(payload.get(key), dict):
            state = payload[key]
            break
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{option} {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_state_dict(path: str | Path, option: str) -> dict[str, torch.Tensor]:
    """The weights in ``path`` (any kind of file, see the module docstring)."""
    return weights_of(read_payload(path, option), path, option)


def read_manager_state(path: str | Path, option: str) -> dict[str, Any] | None:
    """The recipe manager's saved state in a training checkpoint (its ``manager`` entry: masks,
    schedule, quantization ranges), or None for files without one (state dicts, compressed)."""
    manager = read_payload(path, option).get("manager")
    return manager if isinstance(manager, dict) else None


def read_class_map(path: str | Path, option: str) -> list[str] | None:
    """The class names (label order) saved with a training checkpoint, or None without them."""
    classes = read_payload(path, option).get("class_map")
    return list(classes) if isinstance(classes, list | tuple) else None
