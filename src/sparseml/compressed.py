"""Compressed sparse checkpoints: a safetensors file with each tensor in its smallest layout.

    from sparseml.compressed import save_compressed, load_compressed
    save_compressed(model.state_dict(), "model.sparse.safetensors")
    state = load_compressed("model.sparse.safetensors")   # bit-identical tensors

Each tensor is stored as a bitmask plus its nonzero values, in a packed N:M form, or dense,
whichever is smallest (``sparseml.compressed_format``); values keep their dtype. The header's
metadata records the format name and version and, per tensor, its layout, dtype, shape,
sparsity and a CRC-32 of every stored part, so a truncated or corrupted file fails with one
:class:`~sparseml.errors.CompressedFileError` naming the file and the problem instead of
loading wrong weights. The layout is readable with numpy and ``safetensors`` alone
(``docs/compressed-format.md``). Files are written atomically (``sparseml.serialization``).

Why our own layout: ``compressed-tensors`` 0.20.0 (llm-compressor's format) lists its
``sparse-bitmask`` formats as legacy, ships no compressor for them any more and pulls in
``transformers``.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sparseml import compressed_format as cf
from sparseml.errors import CompressedFileError
from sparseml.serialization import atomic_open

FORMAT = "sparseml-compressed"
VERSION = 1
SUFFIX = ".sparse.safetensors"
_PARTS = {"dense": ("",), "bitmask": ("bitmask", "values"), "nm": ("values", "indices")}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
__all__ = ["FORMAT", "SUFFIX", "VERSION", "is_compressed", "load_compressed", "save_compressed"]


def _key(name: str, part: str) -> str:
    return f"{name}:{part}" if part else name


def _crc(tensor: Tensor) -> int:
    return zlib.crc32(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compress_tensor(tensor: Tensor) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata entry, stored parts by key suffix) of one tensor."""
    tensor = tensor.detach().cpu()
    entry: dict[str, Any] = {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
    try:
        nonzero = cf.nonzero_mask(tensor)
    except TypeError:
        nonzero = None
    if nonzero is None:
        choice = cf.Choice("dense", tensor.numel() * tensor.element_size())
    else:
        choice = cf.choose_layout(tensor, nonzero)
        entry["sparsity"] = 1.0 - float(nonzero.sum()) / tensor.numel() if tensor.numel() else 0.0
    entry["layout"] = choice.layout
    if choice.layout == "bitmask":
        parts = cf.encode_bitmask(tensor, nonzero)
    elif choice.layout == "nm":
        entry.update(n=choice.n, m=choice.m)
        parts = cf.encode_nm(tensor, nonzero, choice.n, choice.m)
    else:  # a copy: safetensors refuses tensors that share memory (tied weights, views)
        parts = {"": tensor.contiguous().clone()}
    if "negzero" in parts:
        entry["negzero"] = True
    entry["crc32"] = {part: _crc(t) for part, t in parts.items()}
    return entry, parts


def save_compressed(state_dict: Mapping[str, Tensor], path: str | Path) -> Path:
    """Write ``state_dict`` compressed to ``path`` atomically; returns the path."""
    from safetensors.torch import save

    entries: dict[str, Any] = {}
    stored: dict[str, Tensor] = {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"save_compressed: {name} is a {type(tensor).__name__}, not a tensor")
        entry, parts = compress_tensor(tensor)
        for part, value in parts.items():
            key = _key(name, part)
            if key in stored or (part and key in state_dict):
                raise ValueError(f"save_compressed: the stored name {key!r} is taken twice")
            stored[key] = value
        entries[name] = entry
    metadata = {
        "format": FORMAT,
        "format_version": str(VERSION),
        "tensors": json.dumps(entries, separators=(",", ":")),
    }
    data = save(stored, metadata=metadata)
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return path


def read_header(path: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """The safetensors JSON header of ``path`` (with ``__metadata__``); clear errors if bad."""
    path = Path(path)
    if data is None:
        data = _read_bytes(path)
    if len(data) < 8:
        raise _error(path, f"{len(data)} bytes long, shorter than a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > _MAX_HEADER or 8 + size > len(data):
        raise _error(path, f"header length {size} exceeds the file size ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _error(path, f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _error(path, "header is not a JSON object")
    return header


def is_compressed(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`save_compressed`."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return False
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_HEADER:
                return False
            header = json.loads(handle.read(size).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def file_metadata(path: str | Path, data: bytes | None = None) -> dict[str, dict[str, Any]]:
    """Per-tensor metadata entries of a compressed file, after checking format and version."""
    path = Path(path)
    meta = read_header(path, data).get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise _error(path, f"not a {FORMAT} file (format {found!r})")
    version = meta.get("format_version")
    if version != str(VERSION):
        raise _error(
            path, f"format version {version!r} is not supported (this reader knows {VERSION})"
        )
    try:
        entries = json.loads(meta.get("tensors", ""))
    except json.JSONDecodeError as err:
        raise _error(path, f"tensor table is not valid JSON ({err})") from None
    if not isinstance(entries, dict):
        raise _error(path, "tensor table is not a JSON object")
    return entries


def load_compressed(path: str | Path) -> dict[str, Tensor]:
    """The state dict saved by :func:`save_compressed` (CPU tensors, same dtypes and bits)."""
    from safetensors.torch import load

    path = Path(path)
    data = _read_bytes(path)
    entries = file_metadata(path, data)
    try:
        stored = load(data)
    except Exception as err:  # safetensors raises its own error type for bad bodies
        raise _error(path, f"cannot be decoded ({str(err).splitlines()[0]})") from None
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for name, entry in entries.items():
        out[name] = _decode(path, name, entry, stored, used)
    extra = sorted(set(stored) - used)
    if extra:
        raise _error(path, f"holds {len(extra)} entries no tensor refers to ({extra[0]}, ...)")
    return out


def _decode(path: Path, name: str, entry: Any, stored: dict[str, Tensor], used: set[str]) -> Tensor:
    if not isinstance(entry, dict):
        raise _error(path, f"tensor {name}: entry is not a JSON object")
    layout, shape = entry.get("layout"), entry.get("shape")
    if layout not in _PARTS:
        raise _error(path, f"tensor {name}: unknown layout {layout!r} (known: {list(_PARTS)})")
    dtype = getattr(torch, str(entry.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise _error(path, f"tensor {name}: unknown dtype {entry.get('dtype')!r}")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise _error(path, f"tensor {name}: shape {shape!r} is not a list of sizes")
    shape_t, crcs = tuple(shape), entry.get("crc32") or {}
    parts = {}
    names = _PARTS[layout] + (("negzero",) if entry.get("negzero") and layout != "dense" else ())
    for part in names:
        key = _key(name, part)
        if key not in stored:
            raise _error(path, f"tensor {name}: stored part {key!r} is missing")
        parts[part] = stored[key]
        used.add(key)
        if crcs.get(part) != _crc(stored[key]):
            raise _error(path, f"tensor {name}: checksum of {key!r} does not match (corrupt)")
    problem = _check_parts(layout, entry, parts, shape_t, dtype)
    if problem:
        raise _error(path, f"tensor {name}: {problem}")
    if layout == "dense":
        return parts[""]
    if layout == "bitmask":
        return cf.decode_bitmask(parts, shape_t, dtype)
    return cf.decode_nm(parts, shape_t, dtype, entry["m"])


def _check_parts(
    layout: str, entry: dict, parts: dict[str, Tensor], shape: tuple, dtype: torch.dtype
) -> str:
    """What does not fit together ('' when all does): shapes, dtypes, counts, N:M positions."""
    problem = _check_layout(layout, entry, parts, shape, dtype)
    if problem or "negzero" not in parts:
        return problem
    unstored = math.prod(shape) - parts["values"].numel()
    if parts["negzero"].dtype != torch.uint8 or parts["negzero"].numel() != math.ceil(unstored / 8):
        return f"negzero has {parts['negzero'].numel()} bytes, {unstored} entries need {math.ceil(unstored / 8)}"
    return ""


def _check_layout(
    layout: str, entry: dict, parts: dict[str, Tensor], shape: tuple, dtype: torch.dtype
) -> str:
    numel = math.prod(shape)
    if layout == "dense":
        t = parts[""]
        if tuple(t.shape) != shape or t.dtype != dtype:
            return f"stored {t.dtype} {tuple(t.shape)} but the header says {dtype} {shape}"
        return ""
    values = parts["values"]
    if values.dtype != dtype:
        return f"values are {values.dtype} but the header says {dtype}"
    if layout == "bitmask":
        mask = parts["bitmask"]
        if mask.dtype != torch.uint8 or mask.numel() != math.ceil(numel / 8):
            return f"bitmask has {mask.numel()} bytes, shape {shape} needs {math.ceil(numel / 8)}"
        count = int(cf.unpack_bits(mask, numel).sum())
        if values.dim() != 1 or values.numel() != count:
            return f"bitmask marks {count} nonzeros but {values.numel()} values are stored"
        return ""
    n, m = entry.get("n"), entry.get("m")
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m <= 256):
        return f"N:M pattern n={n!r}, m={m!r} is not allowed (0 < n < m <= 256)"
    if len(shape) < 2 or cf.row_length(shape) % m:
        return f"shape {shape} has rows not divisible into groups of {m}"
    if tuple(values.shape) != (numel // m, m - n):
        return f"values have shape {tuple(values.shape)}, {n}:{m} of {shape} needs {(numel // m, m - n)}"
    need = math.ceil(values.numel() * cf.bits_for(m) / 8)
    indices = parts["indices"]
    if indices.dtype != torch.uint8 or indices.numel() != need:
        return f"N:M indices have {indices.numel()} bytes, {need} expected"
    if not cf.nm_indices_valid(parts, m):
        return "N:M indices are out of range or not increasing within a group"
    return ""


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CompressedFileError(f"compressed checkpoint {path} does not exist") from None
    except OSError as err:
        raise _error(path, f"cannot be read ({err.strerror or err})") from None


def _error(path: Path, what: str) -> CompressedFileError:
    return CompressedFileError(f"compressed checkpoint {path}: {what}")
