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
import logging
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
# The reader's limits (a hostile header can declare anything; these keep it to one error):
MAX_EXPANSION = 64  # loaded bytes per file byte: an all-zero float64 bitmask is 64 (8 B / bit)
MAX_DIMS = 16
MAX_NUMEL = 1 << 48
_ENTRY_KEYS = {"layout", "dtype", "shape", "sparsity", "crc32", "negzero", "n", "m"}
# dtypes safetensors stores, by the names the writer records (torch's, without "torch.")
_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                "float8_e4m3fnuz", "float8_e5m2fnuz", "int64", "int32", "int16", "int8", "uint64",
                "uint32", "uint16", "uint8", "bool", "complex64")  # fmt: skip
_DTYPES = {
    name: getattr(torch, name)
    for name in _DTYPE_NAMES
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_logger = logging.getLogger(__name__)
__all__ = [
    "FORMAT",
    "MAX_EXPANSION",
    "SUFFIX",
    "VERSION",
    "is_compressed",
    "load_compressed",
    "save_compressed",
]


def _key(name: str, part: str) -> str:
    return f"{name}:{part}" if part else name


def _crc(tensor: Tensor) -> int:
    return zlib.crc32(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compress_tensor(tensor: Tensor) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata entry, stored parts by key suffix) of one tensor.

    A sparse layout is kept only after decoding it gives the tensor back bit for bit, through
    the reader's own decoder: whatever the writer stores, the reader can load (dense otherwise).
    """
    tensor = tensor.detach().cpu()
    entry: dict[str, Any] = {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
    choice = cf.Choice("dense", tensor.numel() * tensor.element_size())
    if cf.has_layout(tensor.dtype):
        nonzero = cf.nonzero_mask(tensor)
        choice = cf.choose_layout(tensor, nonzero)
        entry["sparsity"] = 1.0 - float(nonzero.sum()) / tensor.numel() if tensor.numel() else 0.0
    if choice.layout == "bitmask":
        parts = cf.encode_bitmask(tensor, nonzero)
    elif choice.layout == "nm":
        parts = cf.encode_nm(tensor, nonzero, choice.n, choice.m)
    if choice.layout != "dense":
        nm = {"n": choice.n, "m": choice.m} if choice.layout == "nm" else {}
        try:
            same = torch.equal(cf.bits_view(_decode_parts(choice.layout, nm, parts, tensor)),
                               cf.bits_view(tensor))  # fmt: skip
        except cf.LayoutError:
            same = False
        if not same:  # a bug of this module; the file stays loadable and exact
            _logger.warning("%s layout of a %s tensor did not round-trip; stored dense",
                            choice.layout, tuple(tensor.shape))  # fmt: skip
            choice = cf.Choice("dense", 0)
        else:
            entry.update(nm)
    entry["layout"] = choice.layout
    if choice.layout == "dense":  # a copy: safetensors refuses tensors sharing memory (views)
        parts = {"": tensor.contiguous().clone()}
    if "negzero" in parts:
        entry["negzero"] = True
    entry["crc32"] = {part: _crc(t) for part, t in parts.items()}
    return entry, parts


def _decode_parts(layout: str, entry: dict, parts: dict[str, Tensor], like: Tensor) -> Tensor:
    shape = tuple(like.shape)
    if layout == "bitmask":
        return cf.decode_bitmask(parts, shape, like.dtype)
    return cf.decode_nm(parts, shape, like.dtype, entry["n"], entry["m"])


# The metadata keys of the format itself; a writer's notes take other names.
_FORMAT_KEYS = ("format", "format_version", "tensors")


def save_compressed(
    state_dict: Mapping[str, Tensor], path: str | Path, notes: Mapping[str, str] | None = None
) -> Path:
    """Write ``state_dict`` compressed to ``path`` atomically; returns the path. ``notes``:
    string metadata stored beside the format's own (:func:`file_notes` reads them back)."""
    from safetensors.torch import save

    notes = dict(notes or {})
    if any(k in _FORMAT_KEYS or not isinstance(v, str) for k, v in notes.items()):
        raise ValueError(f"save_compressed: notes are strings not named {_FORMAT_KEYS}: {notes}")

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
        **notes,
        "format": FORMAT,
        "format_version": str(VERSION),
        "tensors": json.dumps(entries, separators=(",", ":")),
    }
    data = save(stored, metadata=metadata)
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return path


def _parse_json(path: Path, text: bytes | str, what: str) -> Any:
    """``json.loads`` with every way it fails on hostile input (deep nesting: RecursionError;
    integers of 4,300+ digits: ValueError) as one line naming the file."""
    try:
        return json.loads(text)
    except RecursionError:
        raise _error(path, f"{what} is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise _error(path, f"{what} is not valid JSON ({str(err)[:120]})") from None


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
    header = _parse_json(path, data[8 : 8 + size], "header")
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
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def file_metadata(path: str | Path, data: bytes | None = None) -> dict[str, dict[str, Any]]:
    """Per-tensor metadata entries of a compressed file, after checking format, version and
    every entry's schema (types, sizes), so nothing downstream meets an unexpected type."""
    path = Path(path)
    meta = read_header(path, data).get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise _error(path, f"not a {FORMAT} file (format {str(found)[:40]!r})")
    version = meta.get("format_version")
    if version != str(VERSION):
        raise _error(
            path,
            f"format version {str(version)[:40]!r} is not supported (this reader knows {VERSION})",
        )
    table = meta.get("tensors")
    if not isinstance(table, str):
        raise _error(path, "metadata 'tensors' is not a JSON string")
    entries = _parse_json(path, table, "tensor table")
    if not isinstance(entries, dict):
        raise _error(path, "tensor table is not a JSON object")
    for name, entry in entries.items():
        problem = _entry_problem(entry)
        if problem:
            raise _error(path, f"tensor {_short(name)}: {problem}")
    return entries


def file_notes(path: str | Path) -> dict[str, str]:
    """The notes ``save_compressed`` stored in a compressed file (format checked first)."""
    path = Path(path)
    data = _read_bytes(path)
    file_metadata(path, data)
    meta = read_header(path, data)["__metadata__"]
    return {k: v for k, v in meta.items() if k not in _FORMAT_KEYS and isinstance(v, str)}


def decoded_bytes(entries: dict[str, dict[str, Any]]) -> int:
    """Bytes the tensors of a (schema-checked) table take once loaded."""
    return sum(math.prod(e["shape"]) * _DTYPES[e["dtype"]].itemsize for e in entries.values())


def load_compressed(path: str | Path) -> dict[str, Tensor]:
    """The state dict saved by :func:`save_compressed` (CPU tensors, same dtypes and bits).

    Memory: the file twice (its bytes and the stored parts), the loaded tensors, and a bounded
    decoding scratch (``compressed_format.CHUNK``). The loaded tensors may take at most
    :data:`MAX_EXPANSION` times the file's size, the most this writer produces (an all-zero
    float64 tensor as a bitmask); a file declaring more is refused before anything is built.
    """
    from safetensors.torch import load

    path = Path(path)
    data = _read_bytes(path)
    entries = file_metadata(path, data)
    total = decoded_bytes(entries)
    if total > MAX_EXPANSION * len(data):
        raise _error(
            path,
            f"declares {total:,} bytes of tensors in a {len(data):,}-byte file; more than "
            f"{MAX_EXPANSION}x its size, which no file of this format holds (corrupt or hostile)",
        )
    try:
        stored = load(data)
    except Exception as err:  # safetensors raises its own error type for bad bodies
        raise _error(path, f"cannot be decoded ({str(err).splitlines()[0][:200]})") from None
    del data
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for name, entry in entries.items():
        out[name] = _decode(path, name, entry, stored, used)
    extra = sorted(set(stored) - used)
    if extra:
        raise _error(
            path, f"holds {len(extra)} entries no tensor refers to ({_short(extra[0])}, ...)"
        )
    return out


def _entry_problem(entry: Any) -> str:
    """What is wrong with one entry's schema ('' when nothing): keys, types and ranges."""
    if not isinstance(entry, dict):
        return "entry is not a JSON object"
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        return f"unknown entry keys {unknown[:3]} (known: {sorted(_ENTRY_KEYS)})"
    layout, dtype, shape = entry.get("layout"), entry.get("dtype"), entry.get("shape")
    if not isinstance(layout, str) or layout not in _PARTS:
        return f"unknown layout {str(layout)[:40]!r} (known: {list(_PARTS)})"
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        return f"unknown dtype {str(dtype)[:40]!r} (known: {sorted(_DTYPES)})"
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(s) is int and 0 <= s <= MAX_NUMEL for s in shape)
        or math.prod(shape) > MAX_NUMEL
    ):
        return (
            f"shape {str(shape)[:60]} is not a list of at most {MAX_DIMS} sizes with at most "
            f"{MAX_NUMEL} entries in all"
        )
    if layout != "dense" and not cf.has_layout(_DTYPES[dtype]):
        return f"dtype {dtype} has no {layout} layout (it is stored dense)"
    crcs = entry.get("crc32")
    parts = _PARTS[layout] + (("negzero",) if entry.get("negzero") and layout != "dense" else ())
    if (
        not isinstance(crcs, dict)
        or set(crcs) != set(parts)
        or not all(type(c) is int and 0 <= c < 1 << 32 for c in crcs.values())
    ):
        return f"crc32 {str(crcs)[:60]} is not one 32-bit checksum per stored part {list(parts)}"
    if "negzero" in entry and entry["negzero"] is not True:
        return f"negzero {str(entry['negzero'])[:20]} is not true"
    sparsity = entry.get("sparsity", 0.0)
    if type(sparsity) not in (int, float) or not 0.0 <= sparsity <= 1.0:
        return f"sparsity {str(sparsity)[:20]} is not a share in [0, 1]"
    if layout == "nm":
        return cf.nm_pattern_problem(entry.get("n"), entry.get("m"), tuple(shape))
    if "n" in entry or "m" in entry:
        return f"n and m belong to the nm layout, not {layout}"
    return ""


def _decode(
    path: Path, name: str, entry: dict, stored: dict[str, Tensor], used: set[str]
) -> Tensor:
    layout, dtype, shape = entry["layout"], _DTYPES[entry["dtype"]], tuple(entry["shape"])
    parts = {}
    for part in entry["crc32"]:
        key = _key(name, part)
        if key not in stored:
            raise _error(path, f"tensor {_short(name)}: stored part {key[:80]!r} is missing")
        if key in used:
            raise _error(
                path, f"tensor {_short(name)}: stored part {key[:80]!r} belongs to two tensors"
            )
        parts[part] = stored[key]
        used.add(key)
        if entry["crc32"][part] != _crc(stored[key]):
            raise _error(
                path, f"tensor {_short(name)}: checksum of {key[:80]!r} does not match (corrupt)"
            )
    if layout == "dense":
        t = parts[""]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise _error(
                path, f"tensor {_short(name)}: stored {t.dtype} {tuple(t.shape)} but the header says "
                f"{dtype} {shape}"
            )  # fmt: skip
    try:
        if layout == "dense":
            cf.check_bools(t, "the dense tensor")
            return t
        if layout == "bitmask":
            return cf.decode_bitmask(parts, shape, dtype)
        return cf.decode_nm(parts, shape, dtype, entry["n"], entry["m"])
    except cf.LayoutError as err:
        raise _error(path, f"tensor {_short(name)}: {err}") from None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CompressedFileError(f"compressed checkpoint {path} does not exist") from None
    except OSError as err:
        raise _error(path, f"cannot be read ({err.strerror or err})") from None


def _short(name: str) -> str:
    """A stored name as it goes into a one-line message: as it is when short and printable,
    else quoted (no raw newlines) and cut to 80 characters."""
    if len(name) <= 80 and name.isprintable():
        return name
    return repr(name[:80] + ("..." if len(name) > 80 else ""))


def _error(path: Path, what: str) -> CompressedFileError:
    return CompressedFileError(f"compressed checkpoint {path}: {what}")
