"""Content checksums of checkpoints: what a file's bytes must hash to, entry by entry.

``torch.load`` notices neither bytes flipped inside a tensor's storage nor most flips inside
the pickle (a flipped bit of ``epoch`` or of an RNG state loads as another number), so the
checkpoints this project writes carry a ``checksum`` entry (:func:`content_checksum`): a
sha256 per entry over its tensors' bytes, and under :data:`VALUES_KEY` a sha256 per entry over
everything else in it (a canonical encoding of its plain values and of its tensors' dtypes and
shapes) together with the list of entries, so no value, key or entry can change unnoticed.
:func:`checksum_problem` says what does not match. Files without the key (other tools') are
not verified; checkpoints written before :data:`VALUES_KEY` existed get their tensors verified
only. A tool that edits a checkpoint on purpose stores ``content_checksum(state)`` again.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import torch

CHECKSUM_KEY = "checksum"
# Inside the checksum: {entry: sha256 of its non-tensor content}; no entry can have this name.
VALUES_KEY = "*values*"


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


def _only_digests(payload: dict[Any, Any]) -> bool:
    """Whether ``payload`` is the checksum entry or its table of digests, not a checkpoint."""
    if VALUES_KEY in payload:
        return True
    return bool(payload) and all(isinstance(v, str) and len(v) == 64 for v in payload.values())


def checksum_problem(payload: Any) -> str | None:
    """Compare every entry with its stored sha256s, and the list of entries with the stored
    one. A file converted to the old key layout (``model`` instead of ``state_dict``) only has
    the entries it kept verified: a changed byte cannot rename ``state_dict`` to ``model``."""
    if not isinstance(payload, dict):
        return None
    if CHECKSUM_KEY not in payload:  # unverified, unless a changed byte renamed the entry
        if any(isinstance(v, dict) and VALUES_KEY in v for v in payload.values()):
            return f"its {CHECKSUM_KEY!r} entry is misnamed"
        if _only_digests(payload):  # a changed byte of the pickle's end: the checksum's parts
            return "it holds nothing but checksums"
        return None
    stored = payload[CHECKSUM_KEY]
    if not isinstance(stored, dict):
        return f"its {CHECKSUM_KEY!r} entry is not a table of digests"
    values = stored.get(VALUES_KEY, {})  # absent in checkpoints of older versions
    if not isinstance(values, dict):
        return f"its {CHECKSUM_KEY!r} entry is damaged"
    converted = "state_dict" not in payload and isinstance(payload.get("model"), dict)
    if values and not converted:
        entries = {str(k) for k in payload if k != CHECKSUM_KEY}
        if entries != set(values):
            changed = sorted(map(repr, entries ^ set(values)))
            return f"its entries {changed} do not match the list of entries stored in its checksum"
    for key, value in payload.items():
        if key == CHECKSUM_KEY:
            continue
        if str(key) in values and _values_digest(key, value) != values[str(key)]:
            return f"its {key!r} entry does not match the checksum stored in the file"
    for key, expected in stored.items():
        if key != VALUES_KEY and key in payload and _digest(_tensors(payload[key])) != expected:
            return f"its {key!r} entry does not match the checksum stored in the file"
    return None
