"""Compressed files: whatever the writer stores, the reader loads bit for bit, and hostile files
get one :class:`CompressedFileError` line (never a RecursionError, TypeError, OverflowError or
ValueError traceback) with bounded memory.

The round trip is a seeded property test: every dtype x every layout x value patterns that
stress the layouts (random bits including NaN payloads and subnormals, all zero, all NaN,
signed zeros, exact N:M, ragged shapes whose rows do not split into groups).
"""

from __future__ import annotations

import json
import logging
import math
import random
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from sparseml import compressed as sc
from sparseml import compressed_format as cf
from sparseml.compressed import load_compressed, save_compressed
from sparseml.errors import CompressedFileError

ROOT = Path(__file__).resolve().parents[1]
LAYOUT_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
]
DENSE_ONLY = [torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.complex64]
SHAPES = [(8, 16), (64, 64), (4, 32), (2, 3, 4, 4), (6, 10), (5, 7), (48,), (0, 16), ()]
PATTERNS = ["random", "zero", "nan", "signed_zero", "2:4", "1:4", "4:8", "15:16", "sparse90"]


def raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``: equality is bitwise (NaN payloads, -0.0, subnormals)."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def random_bits(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Uniformly random bit patterns: NaNs with any payload, infinities, subnormals."""
    numel = math.prod(shape)
    size = torch.empty((), dtype=dtype).element_size()
    data = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        return (data % 2).bool().view(shape)
    return data.view(dtype).view(shape)


def make(shape, dtype, pattern: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = random_bits(shape, dtype, gen)
    numel = t.numel()
    if not numel:
        return t
    bits = t.reshape(-1).view(torch.uint8) if dtype == torch.bool else None
    ints = bits if bits is not None else cf.bits_view(t) if cf.has_layout(dtype) else None
    floating = dtype.is_floating_point and cf.has_layout(dtype)
    sign = cf._sign_bit(dtype) if floating else 0
    if ints is None:  # dense-only dtypes: zero a part through ordinary assignment
        flat = t.reshape(-1)
        if pattern != "random":
            flat[: numel // 2] = 0
        return t
    flat = ints.clone()
    if pattern == "zero":
        flat[:] = 0
    elif pattern == "nan":
        if floating:  # every NaN payload the exponent allows, both signs
            nan = {1: 0x7F, 2: 0x7E01 if dtype == torch.float16 else 0x7F81}.get(t.element_size())
            if dtype in (torch.float32, torch.float64):
                nan = 0x7FC00001 if dtype == torch.float32 else 0x7FF0000000000123
            flat[:] = nan
            flat[1::3] = nan ^ 0x3 if t.element_size() > 1 else nan
        else:
            flat[:] = -1 if flat.dtype.is_signed else 1
    elif pattern == "signed_zero":
        flat[::2] = sign  # -0.0 for floats (plain zero for integers)
        flat[1::4] = 0
    elif pattern == "sparse90":
        keep = torch.rand(numel, generator=gen) < 0.1
        coin = torch.rand(int((~keep).sum()), generator=gen) < 0.5
        flat[~keep] = torch.where(coin, 0, sign).to(flat.dtype)
    elif ":" in pattern:
        n, m = map(int, pattern.split(":"))
        usable = numel - numel % m
        groups = flat[:usable].view(-1, m)
        order = torch.rand(groups.shape, generator=gen).argsort(dim=1)[:, :n]
        zero = torch.zeros(groups.shape, dtype=torch.bool).scatter_(1, order, True)
        groups[zero] = 0
        groups[zero & (torch.rand(groups.shape, generator=gen) < 0.3)] = sign
    return flat.view(dtype if dtype != torch.bool else torch.bool).view(t.shape)


def cases():
    seed = 0
    for dtype in LAYOUT_DTYPES + DENSE_ONLY:
        for shape in SHAPES:
            for pattern in PATTERNS:
                seed += 1
                yield dtype, shape, pattern, seed


def test_every_dtype_shape_and_pattern_round_trips_bit_for_bit(tmp_path, caplog):
    state, expected = {}, {}
    for dtype, shape, pattern, seed in cases():
        name = f"{str(dtype)[6:]}.{'x'.join(map(str, shape)) or 'scalar'}.{pattern}"
        state[name] = make(shape, dtype, pattern, seed)
        expected[name] = (dtype, shape, pattern)
    with caplog.at_level(logging.WARNING, logger="sparseml.compressed"):
        path = save_compressed(state, tmp_path / "all.sparse.safetensors")
    assert not caplog.records, "the writer fell back to dense: a layout did not round-trip"
    loaded = load_compressed(path)
    assert loaded.keys() == state.keys()
    for name, t in state.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(raw(loaded[name]), raw(t)), name
    layouts = {name: e["layout"] for name, e in sc.file_metadata(path).items()}
    used = {(expected[k][0], v) for k, v in layouts.items()}
    for dtype in LAYOUT_DTYPES:  # every layout is exercised for every dtype that has them
        assert {(dtype, "dense"), (dtype, "bitmask"), (dtype, "nm")} <= used, dtype
    for name, (dtype, shape, pattern) in expected.items():
        big = math.prod(shape) * torch.empty((), dtype=dtype).element_size() >= 2048
        if pattern == "zero" and len(shape) == 2 and big and cf.has_layout(dtype):
            assert layouts[name] != "dense", (name, "an all-zero layer must compress")


@pytest.mark.parametrize("dtype", LAYOUT_DTYPES)
def test_each_layout_forced_round_trips(dtype):
    """Every layout and N:M pattern the reader accepts, forced, on every pattern."""
    for pattern in PATTERNS:
        t = make((8, 16), dtype, pattern, seed=hash((str(dtype), pattern)) % 1000)
        nonzero = cf.nonzero_mask(t)
        parts = cf.encode_bitmask(t, nonzero)
        assert torch.equal(raw(cf.decode_bitmask(parts, (8, 16), dtype)), raw(t)), pattern
        for m in (4, 8, 16):
            zeros = cf.min_zeros_per_group(nonzero, (8, 16), m)
            for n in range(1, min(zeros, m - 1) + 1):
                parts = cf.encode_nm(t, nonzero, n, m)
                out = cf.decode_nm(parts, (8, 16), dtype, n, m)
                assert torch.equal(raw(out), raw(t)), (pattern, n, m)


def test_all_zero_layer_is_written_loadable_and_small(tmp_path):
    """The reported failure: a zeroed head was written as n = m, which the reader refused."""
    state = {"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)}
    state["neg"] = -torch.zeros(64, 64)
    path = save_compressed(state, tmp_path / "z.sparse.safetensors")
    for name, t in load_compressed(path).items():
        assert torch.equal(raw(t), raw(state[name])), name
    entry = sc.file_metadata(path)["head.weight"]
    assert entry["layout"] != "dense" and entry.get("n", 0) < entry.get("m", 1)


def test_files_written_with_n_equal_m_still_load(tmp_path):
    """Files written before the fix (an all-zero tensor as N:M with n = m) are readable."""
    values = torch.zeros(40, 0)
    indices = torch.zeros(0, dtype=torch.uint8)
    entry = {"dtype": "float32", "shape": [10, 16], "layout": "nm", "n": 4, "m": 4}
    entry["crc32"] = {"values": sc._crc(values), "indices": sc._crc(indices)}
    stored = {"w:values": values, "w:indices": indices, "pad": torch.zeros(200)}
    pad = {
        "dtype": "float32",
        "shape": [200],
        "layout": "dense",
        "crc32": {"": sc._crc(stored["pad"])},
    }
    path = write_raw(tmp_path / "old.sparse.safetensors", stored, {"w": entry, "pad": pad})
    assert torch.equal(load_compressed(path)["w"], torch.zeros(10, 16))


# ---------------------------------------------------------------- hostile files


def write_raw(path: Path, stored: dict, entries, version: str = "1") -> Path:
    """A safetensors file with any tensor table (the writer would never produce it)."""
    meta = {"format": sc.FORMAT, "format_version": version}
    meta["tensors"] = entries if isinstance(entries, str) else json.dumps(entries)
    path.write_bytes(save(stored, metadata=meta))
    return path


def with_header(data: bytes, header: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header replaced by ``header``."""
    (size,) = struct.unpack("<Q", data[:8])
    return struct.pack("<Q", len(header)) + header + data[8 + size :]


def valid_file(tmp_path: Path) -> tuple[Path, dict]:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=gen)
    w[torch.rand(32, 64, generator=gen) < 0.9] = 0
    nm = torch.randn(16, 32, generator=gen)
    nm.view(-1, 4)[:, :2] = 0
    state = {"w": w, "nm": nm, "b": torch.randn(8, generator=gen)}
    return save_compressed(state, tmp_path / "ok.sparse.safetensors"), state


def assert_one_line_error(path: Path) -> str:
    with pytest.raises(CompressedFileError) as info:
        load_compressed(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def entry_of(tmp_path, **change) -> tuple[dict, dict]:
    path, _ = valid_file(tmp_path)
    entries = sc.file_metadata(path)
    from safetensors.torch import load

    stored = load(path.read_bytes())
    for key, value in change.items():
        if value is KeyError:
            del entries["nm"][key]
        else:
            entries["nm"][key] = value
    return stored, entries


HOSTILE_FIELDS = [
    {"shape": "16x32"},
    {"shape": [16.0, 32]},
    {"shape": [-16, -32]},
    {"shape": [True, 512]},
    {"shape": [2**70, 2**70]},
    {"shape": [1] * 40},
    {"shape": [[16], [32]]},
    {"shape": KeyError},
    {"dtype": 7},
    {"dtype": "nn"},
    {"dtype": ["float32"]},
    {"layout": None},
    {"layout": {"nm": 1}},
    {"n": "2"},
    {"n": 2.0},
    {"n": -2},
    {"n": 2**80},
    {"m": 0},
    {"m": 2**64},
    {"n": 5},
    {"m": KeyError},
    {"crc32": [1, 2]},
    {"crc32": {"values": "x", "indices": 1}},
    {"crc32": {"values": 2**80, "indices": -1}},
    {"crc32": None},
    {"negzero": "yes"},
    {"sparsity": "0.5"},
    {"sparsity": 1e400},
    {"extra": 1},
]


@pytest.mark.parametrize("change", HOSTILE_FIELDS, ids=lambda c: json.dumps(c, default=str)[:40])
def test_hostile_entry_fields_give_one_line(tmp_path, change):
    stored, entries = entry_of(tmp_path, **change)
    text = json.dumps(entries).replace("Infinity", "1e400")
    assert_one_line_error(write_raw(tmp_path / "bad.sparse.safetensors", stored, text))


@pytest.mark.parametrize(
    "table",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"w": ' + "{" * 50_000 + "}" * 50_000 + "}",
        '{"w": {"shape": [' + "9" * 5000 + "]}}",
        "[]",
        "7",
        '{"w": null}',
        '{"w": []}',
        "",
    ],
    ids=lambda t: t[:12],
)
def test_hostile_tensor_tables_give_one_line(tmp_path, table):
    assert_one_line_error(write_raw(tmp_path / "bad.sparse.safetensors", {}, table))


@pytest.mark.parametrize(
    "header",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"__metadata__": {"format": "sparseml-compressed", "format_version": "1", '
        b'"tensors": {"w": 1}}}',
        b'{"__metadata__": {"format": ["sparseml-compressed"]}}',
        b'{"__metadata__": {"format": "sparseml-compressed", "format_version": 1}}',
        b'{"__metadata__": 5}',
        b'{"a": 1' + b"9" * 6000 + b"}",
        b"\xff\xfe",
        b"null",
    ],
    ids=lambda h: h[:16].decode("latin-1"),
)
def test_hostile_headers_give_one_line(tmp_path, header):
    path, _ = valid_file(tmp_path)
    bad = tmp_path / "bad.sparse.safetensors"
    bad.write_bytes(with_header(path.read_bytes(), header))
    assert_one_line_error(bad)


def test_sizes_inconsistent_with_the_payload(tmp_path):
    stored, entries = entry_of(tmp_path, shape=[32, 32])  # values shaped for (16, 32)
    assert_one_line_error(write_raw(tmp_path / "a.sparse.safetensors", stored, entries))
    stored, entries = entry_of(tmp_path, n=3)  # 3:4 claims one kept per group, two stored
    assert_one_line_error(write_raw(tmp_path / "b.sparse.safetensors", stored, entries))
    path, _ = valid_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**63)  # a header longer than the file
    path.write_bytes(bytes(data))
    assert_one_line_error(path)


def test_every_truncation_and_many_byte_flips_load_exactly_or_fail_in_one_line(tmp_path):
    path, state = valid_file(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "bad.sparse.safetensors"
    rng = random.Random(0)
    cuts = sorted(set(range(0, len(data), max(1, len(data) // 300))) | {len(data) - 1})
    flips = [(rng.randrange(len(data)), 1 << rng.randrange(8)) for _ in range(400)]
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    flips += [(rng.randrange(8, header_end), 1 << rng.randrange(8)) for _ in range(400)]
    variants = [data[:cut] for cut in cuts]
    for pos, bit in flips:
        flipped = bytearray(data)
        flipped[pos] ^= bit
        variants.append(bytes(flipped))
    for variant in variants:
        bad.write_bytes(variant)
        try:
            loaded = load_compressed(bad)
        except CompressedFileError as err:
            assert "\n" not in str(err)
            continue
        for name, t in state.items():  # a flip the format tolerates (a digit of "sparsity")
            assert torch.equal(raw(loaded[name]), raw(t)), name


MEMORY_PROBE = textwrap.dedent(
    """
    import sys
    import torch
    from sparseml.compressed import load_compressed
    from sparseml.errors import CompressedFileError

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key))

    torch.zeros(1)
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the RSS
            f.write("5")
    except OSError:
        print(-1, "cannot reset the peak RSS here")
        sys.exit(0)
    before = status("VmRSS:")
    try:
        load_compressed(sys.argv[1])
        outcome = "loaded"
    except CompressedFileError as err:
        outcome = "refused: " + str(err)
    print((status("VmHWM:") - before) // 1024, outcome)
    """
)


def peak_mb(path: Path) -> tuple[int, str]:
    env = {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    ).stdout.split(" ", 1)
    if int(out[0]) < 0:
        pytest.skip(out[1])
    return int(out[0]), out[1]


def hostile_nm(path: Path, groups: int, m: int, n: int, bad_tail: bool) -> Path:
    """A uint8 N:M tensor of ``groups`` groups whose checksums are right; with ``bad_tail``
    the last group's positions decrease, so the whole tensor is decoded before it fails."""
    keep, width = m - n, cf.bits_for(m)
    values = torch.ones(groups, keep, dtype=torch.uint8)
    positions = torch.arange(keep).repeat(groups, 1)
    if bad_tail:
        positions[-1] = positions[-1].flip(0)
    bits = (positions.reshape(-1, 1) >> torch.arange(width)) & 1
    indices = cf.pack_bits(bits.reshape(-1).bool())
    entry = {"dtype": "uint8", "shape": [groups, m], "layout": "nm", "n": n, "m": m}
    entry["crc32"] = {"values": sc._crc(values), "indices": sc._crc(indices)}
    return write_raw(path, {"w:values": values, "w:indices": indices}, {"w": entry})


def test_hostile_nm_file_memory_stays_bounded(tmp_path):
    """The review's case: a 30 MB N:M file took 2.1 GB. Now a file whose expansion exceeds
    what the writer ever produces is refused up front, and one within it decodes in chunks:
    peak <= 2x the file + the tensors it declares + 100 MB scratch."""
    expanding = hostile_nm(tmp_path / "wide.sparse.safetensors", 10_000_000, 256, 255, False)
    size = expanding.stat().st_size
    peak, outcome = peak_mb(expanding)
    assert outcome.startswith("refused") and "more than 64x" in outcome, outcome
    assert peak < 2 * size / 2**20 + 100, (peak, size)
    legal = hostile_nm(tmp_path / "legal.sparse.safetensors", 2_000_000, 16, 12, True)
    size = legal.stat().st_size
    declared = 2_000_000 * 16
    peak, outcome = peak_mb(legal)
    assert outcome.startswith("refused") and "not increasing" in outcome, outcome
    assert peak < (2 * size + declared) / 2**20 + 64, (peak, size, declared)


def test_hostile_names_keep_the_message_one_short_line(tmp_path):
    stored, entries = entry_of(tmp_path)
    entries["bad\nname" * 1000] = entries.pop("nm")  # its parts are stored under "nm:..."
    path = write_raw(tmp_path / "names.sparse.safetensors", stored, entries)
    message = assert_one_line_error(path)
    assert len(message) < 400 + len(str(path)), len(message)
