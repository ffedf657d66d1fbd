"""The one reader of every weights or checkpoint file the project writes or reads (no timm).

:func:`read_payload` opens any file: our training checkpoints (timm's keys; checkpoints of
older versions with ``model``/``ema``/``scaler`` keys are returned under the new keys), timm's
and CAP's checkpoints, bare state dicts, safetensors files and compressed sparse checkpoints
(``sparseml.compressed``, recognised by their header). The views on top of it:
:func:`read_state_dict` (the weights, EMA first as timm loads them), :func:`read_manager_state`
(the recipe manager's state: masks, schedule, quantization ranges) and :func:`read_class_map`
(the class names the model was trained with, in label order).

Integrity: ``torch.load`` notices neither bytes flipped inside a tensor's storage nor most
flips inside the pickle (a flipped bit of ``epoch`` or of an RNG state loads as another
number), so training checkpoints carry a ``checksum`` entry (:func:`content_checksum`) that
is verified on every read: a sha256 per entry over its tensors' bytes, and under
:data:`VALUES_KEY` a sha256 per entry over everything else in it (a canonical encoding of its
plain values and of its tensors' dtypes and shapes) together with the list of entries, so no
value, key or entry can change unnoticed. A mismatch is a one-line :class:`CheckpointError`
naming the file and the entry. Files without the key (other tools' files) are read unverified;
checkpoints written before :data:`VALUES_KEY` existed get their tensors verified only. A tool
that edits a checkpoint on purpose stores ``content_checksum(state)`` again before saving.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .errors import CheckpointError

# Keys under which timm, CAP and our training script store the model's weights, in preference order.
_WEIGHT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# Keys of checkpoints written before the timm layout, and their timm names.
_OLD_KEYS = {"model": "state_dict", "ema": "state_dict_ema", "scaler": "amp_scaler"}
CHECKSUM_KEY = "checksum"
# Inside the checksum: {entry: sha256 of its non-tensor content}; no entry can have this name.
VALUES_KEY = "*values*"
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


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside ``obj`` (dicts in their saved order, then lists)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in _tensors(value)]
    if isinstance(obj, list | tuple):
        return [t for value in obj for t in _tensors(value)]
    return []


def _digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    """Hash a canonical encoding of ``obj``: every plain value with its type (floats by their
    bits, so -0.0 and NaN payloads count), containers in their saved order, and tensors by
    dtype, shape and ``requires_grad`` (their bytes are the other digest's)."""
    if obj is None or isinstance(obj, bool):
        h.update(b"N" if obj is None else b"T" if obj else b"F")
    elif isinstance(obj, int):
        h.update(b"i%d;" % obj)
    elif isinstance(obj, float):
        h.update(b"f" + struct.pack("<d", obj))
    elif isinstance(obj, str | bytes | bytearray):
        raw = obj.encode("utf-8", "surrogatepass") if isinstance(obj, str) else bytes(obj)
        h.update(b"%s%d:" % (b"s" if isinstance(obj, str) else b"b", len(raw)) + raw)
    elif isinstance(obj, torch.Tensor):
        h.update(f"t{obj.dtype}{tuple(obj.shape)}{obj.requires_grad};".encode())
    elif isinstance(obj, dict):
        h.update(b"d%d:" % len(obj))
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, list | tuple):
        tag = b"S" if isinstance(obj, torch.Size) else b"u" if isinstance(obj, tuple) else b"l"
        h.update(b"%s%d:" % (tag, len(obj)))
        for value in obj:
            _feed(h, value)
    elif isinstance(obj, set | frozenset):  # iteration order varies between processes
        parts = sorted(_values_digest(None, value) for value in obj)
        h.update(b"e%d:" % len(parts) + "".join(parts).encode())
    else:  # the few other types torch's safe loader builds (dtype, device)
        h.update(f"o{type(obj).__qualname__}:{obj!r};".encode())


def _values_digest(key: Any, value: Any) -> str:
    # The entry's name is hashed too: pickle stores one string for it and for its key in the
    # checksum, so a byte flipped there renames both.
    h = hashlib.sha256()
    _feed(h, key)
    _feed(h, value)
    return h.hexdigest()


def content_checksum(payload: dict[str, Any]) -> dict[str, Any]:
    """The ``checksum`` entry of ``payload``: a sha256 per entry that holds tensors, over their
    dtypes, shapes and bytes in the saved order, and under :data:`VALUES_KEY` a sha256 per
    entry over the rest of its content (:func:`_feed`)."""
    out: dict[str, Any] = {}
    for key, value in payload.items():
        tensors = _tensors(value) if key != CHECKSUM_KEY else []
        if tensors:
            out[str(key)] = _digest(tensors)
    out[VALUES_KEY] = {
        str(key): _values_digest(key, value)
        for key, value in payload.items()
        if key != CHECKSUM_KEY
    }
    return out


def _corrupt(path: Path, option: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{option} {path} is corrupt: {what} (bytes changed on disk or in a copy, or the file "
        "was edited); use another checkpoint of the run"
    )


def _only_digests(payload: dict[Any, Any]) -> bool:
    """Whether ``payload`` is the checksum entry or its table of digests, not a checkpoint."""
    if VALUES_KEY in payload:
        return True
    return bool(payload) and all(isinstance(v, str) and len(v) == 64 for v in payload.values())


def _verify(payload: Any, path: Path, option: str) -> None:
    """Compare every entry with its stored sha256s, and the list of entries with the stored
    one. A file converted to the old key layout (``model`` instead of ``state_dict``) only has
    the entries it kept verified: a changed byte cannot rename ``state_dict`` to ``model``."""
    if not isinstance(payload, dict):
        return
    if CHECKSUM_KEY not in payload:  # unverified, unless a changed byte renamed the entry
        if any(isinstance(v, dict) and VALUES_KEY in v for v in payload.values()):
            raise _corrupt(path, option, f"its {CHECKSUM_KEY!r} entry is misnamed")
        if _only_digests(payload):  # a changed byte of the pickle's end: the checksum's parts
            raise _corrupt(path, option, "it holds nothing but checksums")
        return
    stored = payload[CHECKSUM_KEY]
    if not isinstance(stored, dict):
        raise _corrupt(path, option, f"its {CHECKSUM_KEY!r} entry is not a table of digests")
    values = stored.get(VALUES_KEY, {})  # absent in checkpoints of older versions
    if not isinstance(values, dict):
        raise _corrupt(path, option, f"its {CHECKSUM_KEY!r} entry is damaged")
    converted = "state_dict" not in payload and isinstance(payload.get("model"), dict)
    if values and not converted:
        entries = {str(k) for k in payload if k != CHECKSUM_KEY}
        if entries != set(values):
            changed = sorted(map(repr, entries ^ set(values)))
            raise _corrupt(
                path,
                option,
                f"its entries {changed} do not match the list of entries stored in its checksum",
            )
    for key, value in payload.items():
        if key == CHECKSUM_KEY:
            continue
        if str(key) in values and _values_digest(key, value) != values[str(key)]:
            raise _corrupt(
                path, option, f"its {key!r} entry does not match the checksum stored in the file"
            )
    for key, expected in stored.items():
        if key != VALUES_KEY and key in payload and _digest(_tensors(payload[key])) != expected:
            raise _corrupt(
                path, option, f"its {key!r} entry does not match the checksum stored in the file"
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
    _verify(payload, path, option)
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
