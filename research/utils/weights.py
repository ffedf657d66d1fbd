"""Reading weights from any file the project writes or reads, without importing timm.

:func:`read_state_dict` takes a bare state dict, a training checkpoint (timm keys, CAP's keys),
a safetensors file or a compressed sparse checkpoint (``sparseml.compressed``);
:func:`read_manager_state` the recipe manager's state a training checkpoint carries.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

# Keys under which timm, CAP and our training script store the model's weights, in preference order.
_WEIGHT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


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
    return text.splitlines()[0] if text else type(err).__name__


def read_state_dict(path: str | Path, option: str) -> dict[str, torch.Tensor]:
    """The weights in ``path``: a bare state dict, a training checkpoint, a safetensors file or
    a compressed sparse checkpoint (``sparseml.compressed``, recognised by its header)."""
    from sparseml.compressed import SUFFIX, is_compressed, load_compressed
    from sparseml.errors import CompressedFileError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{option} {path} does not exist")
    if path.name.endswith(SUFFIX) or is_compressed(path):  # a cut header: still its errors
        try:
            return load_compressed(path)
        except CompressedFileError as err:
            raise CheckpointError(f"{option}: {err}") from err
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise several types for corrupt files
        raise CheckpointError(f"{option} {path} is unreadable: {_load_problem(path, err)}") from err
    for key in _WEIGHT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{option} {path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_manager_state(path: str | Path, option: str) -> dict[str, Any] | None:
    """The recipe manager's saved state in a training checkpoint (its ``manager`` entry: masks,
    schedule, quantization ranges), or None for files without one (state dicts, compressed)."""
    from sparseml.compressed import SUFFIX, is_compressed

    path = Path(path)
    if path.name.endswith(SUFFIX) or path.suffix == ".safetensors" or is_compressed(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the same file was readable for its weights; say what failed
        raise CheckpointError(f"{option} {path} is unreadable: {err}") from err
    manager = state.get("manager") if isinstance(state, dict) else None
    return manager if isinstance(manager, dict) else None
