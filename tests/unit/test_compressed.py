"""Compressed sparse checkpoints (``sparseml.compressed``): exact round trips, the layout chosen
per tensor, file sizes, and one clear error for every kind of damaged file."""

from __future__ import annotations

import errno
import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from sparseml import compressed as sc
from sparseml.compressed import file_metadata, is_compressed, load_compressed, save_compressed
from sparseml.errors import CheckpointError, CompressedFileError
from sparseml.masks import nm_mask
from sparseml.serialization import FileWriteError

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: equality here is bitwise (-0.0 != 0.0, NaN == NaN)."""
    return t.reshape(-1).contiguous().view(torch.uint8) if t.dtype != torch.bool else t


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert b[k].dtype == v.dtype and b[k].shape == v.shape, k
        assert torch.equal(bits(b[k]), bits(v)), k


def pruned(shape, pattern: str, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    if pattern == "unstructured90":
        w[torch.rand(shape, generator=gen) < 0.9] = 0
    elif pattern == "block4":  # whole groups of 4 consecutive inputs zero, half of them
        groups = w.view(-1, 4)
        groups[torch.rand(groups.shape[0], generator=gen) < 0.5] = 0
    elif pattern in ("2:4", "4:8"):  # +0.0 like sparseml.masks (masked_fill)
        n, m = map(int, pattern.split(":"))
        w = w.masked_fill(~nm_mask(w.abs().reshape(-1), n, m).view(shape), 0.0)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["unstructured90", "block4", "2:4", "4:8", "dense"])
def test_round_trip_is_bitwise(tmp_path, pattern, dtype):
    state = {"w": pruned((64, 128), pattern, dtype), "conv": pruned((32, 16, 3, 3), pattern, dtype)}
    path = save_compressed(state, tmp_path / "m.sparse.safetensors")
    assert_identical(state, load_compressed(path))
    entries = file_metadata(path)
    # 4:8 as packed N:M would take 4 x 3 index bits per group against the bitmask's 8
    expected = {"unstructured90": "bitmask", "block4": "bitmask", "2:4": "nm", "4:8": "bitmask"}
    assert entries["w"]["layout"] == expected.get(pattern, "dense")
    if pattern == "2:4":
        assert (entries["w"]["n"], entries["w"]["m"]) == (2, 4)
    assert entries["w"]["sparsity"] == pytest.approx(float((state["w"] == 0).float().mean()))


def test_mixed_state_dict_round_trip(tmp_path):
    w = pruned((48, 96), "unstructured90")
    w[0, :4] = torch.tensor([-0.0, float("nan"), float("inf"), 0.0])
    signed = pruned((64, 64), "2:4") * (torch.rand(64, 64) > 0.1)  # -0.0 where x * False
    shared = torch.zeros(32, 64)
    shared[::3] = 1.5  # rows of zeros: bitmask
    state = {
        "a.weight": w,
        "b.weight": pruned((64, 64), "2:4", torch.bfloat16),
        "b.bias": torch.randn(64, dtype=torch.float16),
        "signed": signed,
        "signed.unstructured": -torch.zeros(50, 60).masked_fill(torch.rand(50, 60) > 0.9, 1.0),
        "tied.weight": shared,
        "tied.alias": shared,  # the same storage twice (tied weights)
        "view": shared[1],  # a view of it
        "steps": torch.tensor(7),
        "flags": torch.rand(100) > 0.95,
        "ids": torch.zeros(1000, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
        "double": torch.randn(5, 8, dtype=torch.float64),
    }
    path = save_compressed(state, tmp_path / "mixed.sparse.safetensors")
    out = load_compressed(path)
    assert_identical(state, out)
    assert torch.isnan(out["a.weight"][0, 1]) and torch.signbit(out["a.weight"][0, 0])
    layouts = {k: e["layout"] for k, e in file_metadata(path).items()}
    assert layouts["b.bias"] == "dense"  # nothing to gain
    assert torch.signbit(out["signed.unstructured"][out["signed.unstructured"] == 0]).all()
    entries = file_metadata(path)
    assert entries["signed"]["negzero"] and entries["signed.unstructured"]["negzero"]
    assert entries["a.weight"]["negzero"]  # its one -0.0
    assert "negzero" not in entries["b.weight"]
    assert layouts["steps"] == "dense" and layouts["ids"] == "bitmask"
    assert list(json.loads(_metadata(path)["tensors"])) == list(state)  # order kept


def test_dense_tensors_stay_dense_and_files_are_not_bigger(tmp_path):
    state = {f"l{i}.weight": torch.randn(64, 64) for i in range(3)}
    state["tiny"] = torch.tensor([0.0, 0.0, 1.0])  # sparse, but too small to gain anything
    save_file(state, tmp_path / "plain.safetensors")
    path = save_compressed(state, tmp_path / "c.sparse.safetensors")
    assert {e["layout"] for e in file_metadata(path).values()} == {"dense"}
    plain = (tmp_path / "plain.safetensors").stat().st_size
    assert path.stat().st_size <= plain * 1.05  # only the metadata added


def _model_state(pattern: str) -> dict[str, torch.Tensor]:
    """A DeiT-Tiny-like block stack (dim 192, MLP 4x) with every Linear weight pruned."""
    state = {"pos_embed": torch.randn(1, 197, 192), "patch.weight": torch.randn(192, 3, 4, 4)}
    for b in range(2):
        for name, shape in (("qkv", (576, 192)), ("proj", (192, 192)),
                            ("fc1", (768, 192)), ("fc2", (192, 768))):  # fmt: skip
            state[f"blocks.{b}.{name}.weight"] = pruned(shape, pattern, seed=b)
            state[f"blocks.{b}.{name}.bias"] = torch.randn(shape[0])
        state[f"blocks.{b}.norm.weight"] = torch.ones(192)
    return state


@pytest.mark.parametrize(("pattern", "limit"), [("unstructured90", 0.25), ("2:4", 0.65)])
def test_size_targets(tmp_path, pattern, limit):
    state = _model_state(pattern)
    save_file(state, tmp_path / "dense.safetensors")
    path = save_compressed(state, tmp_path / "m.sparse.safetensors")
    ratio = path.stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio <= limit, ratio
    assert_identical(state, load_compressed(path))


def test_numpy_reader_in_the_docs_decodes_the_file(tmp_path):
    """The decoder printed in docs/compressed-format.md (numpy only) gives the same tensors."""
    text = (ROOT / "docs" / "compressed-format.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    ns: dict = {}
    exec(code, ns)  # noqa: S102  (our own documentation)
    state = {
        "u": pruned((32, 64), "unstructured90"),
        "nm": pruned((16, 64), "2:4", torch.float16),
        "n48": pruned((16, 64), "4:8"),
        "bf": pruned((32, 32), "unstructured90", torch.bfloat16),
        "neg": pruned((32, 64), "unstructured90") * (torch.rand(32, 64) > 0.5),  # -0.0s
        "negnm": pruned((16, 64), "2:4", torch.bfloat16) * (torch.rand(16, 64) > 0.2),
        "d": torch.randn(300),
        "i": torch.zeros(400, dtype=torch.int64),
    }
    path = save_compressed(state, tmp_path / "m.sparse.safetensors")
    assert {e["layout"] for e in file_metadata(path).values()} == {"bitmask", "nm", "dense"}
    arrays = ns["read_compressed"](str(path))
    for key, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            got = torch.from_numpy(ns["bfloat16_to_float32"](arrays[key]).copy())
            assert torch.equal(bits(got), bits(tensor.float())), key
        else:
            assert torch.equal(bits(torch.from_numpy(arrays[key].copy())), bits(tensor)), key
    entries = file_metadata(path)
    assert entries["neg"]["negzero"] and entries["negnm"]["negzero"]


# ----- damaged files: one clear error naming the file ---------------------------------------------
@pytest.fixture
def good_file(tmp_path) -> Path:
    state = {"w": pruned((64, 64), "unstructured90"), "n": pruned((32, 64), "2:4")}
    state["b"] = torch.randn(64)
    return save_compressed(state, tmp_path / "good.sparse.safetensors")


def _metadata(path: Path) -> dict:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size])["__metadata__"]


def _expect_error(path: Path, words: str) -> CompressedFileError:
    with pytest.raises(CompressedFileError) as info:
        load_compressed(path)
    message = str(info.value)
    assert str(path) in message and re.search(words, message), message
    assert "\n" not in message
    assert isinstance(info.value, CheckpointError)
    return info.value


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1, -300])
def test_truncated_file(good_file, keep):
    data = good_file.read_bytes()
    good_file.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    _expect_error(good_file, r"shorter|exceeds|cannot be decoded|checksum|not valid JSON")


def test_flipped_header_byte(good_file):
    data = bytearray(good_file.read_bytes())
    data[9] ^= 0xFF  # inside the JSON header
    good_file.write_bytes(bytes(data))
    _expect_error(good_file, "not valid JSON|cannot be decoded")


def test_flipped_header_length(good_file):
    data = bytearray(good_file.read_bytes())
    data[3] ^= 0x40
    good_file.write_bytes(bytes(data))
    _expect_error(good_file, "exceeds the file size")


def test_flipped_data_byte_fails_the_checksum(good_file):
    data = bytearray(good_file.read_bytes())
    data[-10] ^= 0x01  # inside the last stored tensor
    good_file.write_bytes(bytes(data))
    _expect_error(good_file, "checksum")


def _rewrite(path: Path, edit) -> None:
    """Rewrite ``path`` with its stored tensors and edited metadata (a well-formed file)."""
    from safetensors.torch import load

    stored = load(path.read_bytes())
    meta = _metadata(path)
    entries = json.loads(meta["tensors"])
    edit(meta, entries, stored)
    meta["tensors"] = json.dumps(entries)
    path.write_bytes(save(stored, metadata=meta))


def test_wrong_format_version(good_file):
    _rewrite(good_file, lambda meta, e, s: meta.update(format_version="2"))
    _expect_error(good_file, "format version '2' is not supported")


def test_not_a_compressed_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.randn(4, 4)}, path)
    assert not is_compressed(path)
    _expect_error(path, "not a sparseml-compressed file")


def test_mismatched_shape(good_file):
    _rewrite(good_file, lambda m, entries, s: entries["w"].update(shape=[64, 65]))
    _expect_error(good_file, "tensor w: bitmask has")


def test_mismatched_dense_shape_and_nm_values(good_file):
    _rewrite(good_file, lambda m, entries, s: entries["b"].update(shape=[8, 8]))
    _expect_error(good_file, r"tensor b: stored torch.float32 \(64,\)")


def test_values_count_must_match_the_bitmask(good_file):
    def drop_one(meta, entries, stored):
        stored["w:values"] = stored["w:values"][:-1].clone()
        entries["w"]["crc32"]["values"] = sc._crc(stored["w:values"])

    _rewrite(good_file, drop_one)
    _expect_error(good_file, "nonzeros but")


def test_bad_nm_indices(good_file):
    def scramble(meta, entries, stored):
        stored["n:indices"] = torch.zeros_like(stored["n:indices"])  # every slot at position 0
        entries["n"]["crc32"]["indices"] = sc._crc(stored["n:indices"])

    _rewrite(good_file, scramble)
    _expect_error(good_file, "not increasing")


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_negzero_must_be_a_uint8_bit_stream(tmp_path, dtype):
    """An int64 stream of one element passed the size check and set the wrong entries' signs."""
    w = pruned((64, 64), "unstructured90")
    w[w == 0] = -0.0 * torch.randint(
        0, 2, (int((w == 0).sum()),), generator=torch.Generator().manual_seed(0)
    )
    path = save_compressed({"w": w}, tmp_path / "neg.sparse.safetensors")

    def widen(meta, entries, stored):
        assert entries["w"]["layout"] == "bitmask" and entries["w"]["negzero"]
        stored["w:negzero"] = stored["w:negzero"].to(dtype)
        entries["w"]["crc32"]["negzero"] = sc._crc(stored["w:negzero"])

    _rewrite(path, widen)
    _expect_error(path, f"negzero is {dtype}.*expected a uint8 bit stream")


@pytest.mark.parametrize("dtype", ["float8_e4m3fnuz", "complex64"])
def test_sparse_layout_of_a_dtype_that_has_none(good_file, dtype):
    _rewrite(good_file, lambda m, entries, s: entries["w"].update(dtype=dtype))
    _expect_error(good_file, f"dtype {dtype} has no bitmask layout")


def test_missing_and_extra_parts(good_file, tmp_path):
    _rewrite(good_file, lambda m, e, stored: stored.pop("w:values"))
    _expect_error(good_file, "'w:values' is missing")
    other = save_compressed({"x": torch.randn(3)}, tmp_path / "o.sparse.safetensors")
    _rewrite(other, lambda m, e, stored: stored.update(stray=torch.zeros(2)))
    _expect_error(other, "no tensor refers to")


def test_missing_file(tmp_path):
    with pytest.raises(CompressedFileError, match="does not exist"):
        load_compressed(tmp_path / "nope.sparse.safetensors")


def test_failed_write_keeps_the_previous_file(good_file, monkeypatch):
    before = good_file.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(FileWriteError, match="no space left on device"):
        save_compressed({"w": torch.zeros(10)}, good_file)
    assert good_file.read_bytes() == before
    assert [p.name for p in good_file.parent.iterdir()] == [good_file.name]  # no temp file


def test_name_clash_is_refused(tmp_path):
    state = {"w": pruned((16, 64), "unstructured90"), "w:values": torch.randn(3)}
    with pytest.raises(ValueError, match="taken twice"):
        save_compressed(state, tmp_path / "x.sparse.safetensors")


def _set_last_byte_bit(key: str, bit: int):
    def edit(meta, entries, stored):
        name, part = key.split(":")
        stream = stored[key].clone()
        stream[-1] |= 1 << bit
        stored[key] = stream
        entries[name]["crc32"][part] = sc._crc(stream)

    return edit


@pytest.mark.parametrize(
    ("key", "bit", "words"),
    [("w:bitmask", 7, "bitmask: bits past its 3969 entries are set"),
     ("w:negzero", 7, "negzero: bits past its 3563 entries are set"),
     ("n:indices", 6, "N:M indices: bits past its 252 entries are set")],
)  # fmt: skip
def test_set_padding_bits_are_refused(tmp_path, key, bit, words):
    """Streams end in whole bytes; the bits past their count are written 0. A file with one set
    (its checksums made to match) decodes to the same tensors, but no writer of this format
    made it: it is refused, naming the stream."""
    w = pruned((63, 63), "unstructured90")
    w[0, w[0] == 0] = -0.0
    w[-1, (w[-1] != 0).nonzero()[:3, 0]] = 0.0
    assert int((w == 0).sum()) == 3563  # 3563 % 8 = 3: bit 7 of the last byte is padding
    n = pruned((63, 4), "2:4")
    path = save_compressed({"w": w, "n": n}, tmp_path / "pad.sparse.safetensors")
    entries = file_metadata(path)
    assert entries["w"]["layout"] == "bitmask" and entries["w"]["negzero"]
    assert entries["n"]["layout"] == "nm"
    _rewrite(path, _set_last_byte_bit(key, bit))
    _expect_error(path, words)


@pytest.mark.parametrize("name", ["dense", "sparse"])
def test_bool_bytes_other_than_0_and_1_are_refused(tmp_path, name):
    """torch keeps a bool byte of 2 as it is: it prints True yet ``== True`` is False."""
    flags = torch.zeros(4001, dtype=torch.bool)
    flags[::9] = True
    state = {"dense": torch.ones(8, dtype=torch.bool), "sparse": flags}
    path = save_compressed(state, tmp_path / "bool.sparse.safetensors")
    key = "dense" if name == "dense" else "sparse:values"

    def two(meta, entries, stored):
        raw = stored[key].view(torch.uint8).clone()
        raw[0] = 2
        stored[key] = raw.view(torch.bool)
        entries[name]["crc32"]["" if name == "dense" else "values"] = sc._crc(stored[key])

    assert file_metadata(path)["sparse"]["layout"] == "bitmask"
    _rewrite(path, two)
    _expect_error(path, f"tensor {name}: .*bool bytes other than 0 and 1")
