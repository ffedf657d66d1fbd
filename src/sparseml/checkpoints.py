"""SparseML-style checkpoint helpers (``save_model``, ``load_model``, ``load_optimizer``,
``load_epoch``, re-exported by ``sparseml.pytorch.utils``) and ``read_checkpoint``, the safe
loader behind them: every file is written by :func:`sparseml.serialization.atomic_save` with a
content checksum (`sparseml.checksum`) and read with ``torch.load(weights_only=True)``, the
checksum verified where the file has one; a missing, corrupt or mismatched checkpoint is a
`CheckpointError` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseml.checksum import CHECKSUM_KEY, checksum_problem, content_checksum
from sparseml.errors import CheckpointError
from sparseml.params import unwrap
from sparseml.serialization import atomic_save


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``, its checksum verified where it has one
    (the training script's and `save_model`'s files); a clear error if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated / foreign files
        raise CheckpointError(
            f"checkpoint {path} cannot be read (corrupt or not a torch file): {err}"
        ) from None
    problem = checksum_problem(data)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: {problem} (bytes changed on disk or in a copy, or "
            "the file was edited)"
        )
    return data if isinstance(data, dict) else {"state_dict": data}


def save_model(
    path: str | Path,
    model: nn.Module,
    optimizer: Any = None,
    loss_scaler: Any = None,
    epoch: int | None = None,
    include_modifiers: bool = False,
    arch_key: str | None = None,
) -> None:
    """Write ``state_dict`` (DDP unwrapped), optimizer, scaler, epoch and manager state."""
    state: dict[str, Any] = {"state_dict": unwrap(model).state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
        manager = getattr(optimizer, "wrapped_manager", None) if include_modifiers else None
        if manager is not None:
            state["manager"] = manager.state_dict()
    if loss_scaler is not None:
        state["loss_scaler"] = loss_scaler.state_dict()
    if epoch is not None:
        state["epoch"] = epoch
    if arch_key is not None:
        state["arch_key"] = arch_key
    state[CHECKSUM_KEY] = content_checksum(state)
    atomic_save(state, path)


def _strip_module(state: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_model(
    path: str | Path, model: nn.Module, strict: bool = False, fix_data_parallel: bool = True
) -> None:
    data = read_checkpoint(path)
    state = data.get("state_dict", data)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    if fix_data_parallel:
        state = _strip_module(state)
    try:
        result = unwrap(model).load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not match the model: {err}") from None
    if state and len(result.unexpected_keys) == len(state):  # strict=False loaded nothing
        raise CheckpointError(
            f"checkpoint {path} shares no parameter name with the model (e.g. "
            f"{next(iter(state))!r}): nothing would be loaded"
        )


def load_optimizer(path: str | Path, optimizer: Any, map_location: Any = "cpu") -> None:
    data = read_checkpoint(path, map_location)
    if "optimizer" not in data:
        raise CheckpointError(f"checkpoint {path} holds no optimizer state")
    optimizer.load_state_dict(data["optimizer"])


def load_epoch(path: str | Path, map_location: Any = "cpu") -> int | None:
    return read_checkpoint(path, map_location).get("epoch")
