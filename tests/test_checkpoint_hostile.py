"""Hostile checkpoints and result files: every changed byte of a checkpoint's pickle is refused
or harmless, ``--resume`` names what a file lacks instead of a traceback, damaged safetensors
files and wrongly typed ``results.jsonl`` rows are reported or recomputed.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import RESEARCH, copy_digits_subset, ensure_research

ensure_research()

from utils import checkpoint as ckpt_io  # noqa: E402
from utils import results as res  # noqa: E402
from utils import resume  # noqa: E402
from utils.errors import CheckpointError  # noqa: E402
from utils.weights import (  # noqa: E402
    CHECKSUM_KEY,
    VALUES_KEY,
    content_checksum,
    read_payload,
    read_state_dict,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def save_small(path: Path, epoch: int = 3) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)  # betas: a tuple in the state
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    ckpt_io.save_checkpoint(
        path, model=model, optimizer=opt, epoch=epoch, arch="mlp", class_map=["a", "b", "c"]
    )


def pickle_span(path: Path) -> tuple[int, int]:
    """(offset in the file, size) of the checkpoint's pickle (``data.pkl``, stored as is)."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
    with path.open("rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def same(a: Any, b: Any) -> bool:
    """Equal content: types, dict order, float bits, tensor dtype/shape/values/requires_grad."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        meta = (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad)
        return meta and torch.equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return a == b


def without_checksum(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k != CHECKSUM_KEY}


def flip_epoch_bit(path: Path) -> None:
    """The review's case: one bit of the pickled ``epoch`` (BININT1 after the key)."""
    start, size = pickle_span(path)
    raw = bytearray(path.read_bytes())
    pickled = bytes(raw[start : start + size])
    at = pickled.index(b"epoch") + 5
    while pickled[at : at + 1] != b"K":
        at += 1
    raw[start + at + 1] ^= 1
    path.write_bytes(bytes(raw))


# ----- integrity of the non-tensor content -----------------------------------------------------
def test_a_flipped_bit_of_the_epoch_is_refused(tmp_path):
    path = tmp_path / "c.pth"
    save_small(path)
    flip_epoch_bit(path)
    assert torch.load(path, weights_only=True)["epoch"] != 3  # torch alone loads it silently
    with pytest.raises(CheckpointError) as err:
        ckpt_io.load_checkpoint(path, "--resume")
    msg = str(err.value)
    assert str(path) in msg and "'epoch'" in msg and "checksum" in msg and "\n" not in msg


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_every_flipped_byte_of_the_pickle_is_refused_or_harmless(tmp_path):
    path, flipped = tmp_path / "c.pth", tmp_path / "f.pth"
    save_small(path)
    original = without_checksum(torch.load(path, weights_only=True))
    raw = path.read_bytes()
    start, size = pickle_span(path)
    outcomes = {"refused": 0, "same": 0}
    for at in range(start, start + size):
        changed = bytearray(raw)
        changed[at] ^= 1 << (at % 8)  # one bit, each position of the byte in turn
        flipped.write_bytes(bytes(changed))
        try:
            loaded = read_payload(flipped, "--resume")
        except CheckpointError:
            outcomes["refused"] += 1
            continue
        assert same(without_checksum(loaded), original), f"byte {at - start} of the pickle"
        outcomes["same"] += 1
    assert outcomes["refused"] > size // 2  # most bytes are content


def test_the_values_digest_is_the_same_in_every_process():
    """Set iteration order follows the process's string hash seed: the digest must not."""
    code = (
        f"import sys; sys.path.insert(0, {str(RESEARCH)!r}); from utils.weights import content_checksum; "
        "print(content_checksum({'a': {'x', 'yy', 'zzz', 'q' * 5}, 'b': [1.5, None]}))"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout  # fmt: skip
        for seed in ("1", "2", "3")
    }
    assert len(seen) == 1, seen


def test_checkpoints_without_the_values_digest_still_load(tmp_path):
    """Written before the non-tensor digest existed: tensors verified, values read as they are."""
    path = tmp_path / "c.pth"
    save_small(path)
    state = torch.load(path, weights_only=True)
    del state[CHECKSUM_KEY][VALUES_KEY]
    state["epoch"] = 7  # not covered by the old checksum
    torch.save(state, path)
    assert ckpt_io.load_checkpoint(path)["epoch"] == 7


def test_an_edit_with_a_new_checksum_loads_and_without_one_is_refused(tmp_path):
    path = tmp_path / "c.pth"
    save_small(path)
    state = torch.load(path, weights_only=True)
    state["checkpoint_hist"] = [{"file": "x.pth", "epoch": 1, "sparsity": 0.5, "metric": 9.0}]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="'checkpoint_hist' entry does not match"):
        ckpt_io.load_checkpoint(path)
    state[CHECKSUM_KEY] = content_checksum(state)
    torch.save(state, path)
    assert ckpt_io.load_checkpoint(path)["checkpoint_hist"][0]["metric"] == 9.0


# ----- --resume of files that are no full training checkpoint ----------------------------------
def resume_args(path: Path, **extra: Any) -> argparse.Namespace:
    return argparse.Namespace(resume=str(path), model="mlp", no_resume_opt=False, **extra)


def edited(path: Path, edit: Any) -> Path:
    state = torch.load(path, weights_only=True)
    edit(state)
    state[CHECKSUM_KEY] = content_checksum(state)  # a deliberate edit, not a damaged file
    torch.save(state, path)
    return path


def _set(key: str, value: Any) -> Any:
    return lambda s: s.__setitem__(key, value)


HOSTILE = {
    "weights only": (lambda s: [s.pop(k) for k in list(s) if k != "state_dict"], "no 'epoch'"),
    "no optimizer": (lambda s: s.pop("optimizer"), "no 'optimizer'"),
    "epoch text": (_set("epoch", "3"), "'epoch'"),
    "epoch float": (_set("epoch", 2.5), "'epoch'"),
    "epoch bool": (_set("epoch", True), "'epoch'"),
    "rng text": (_set("rng", "abc"), "'rng'"),
    "rng numbers": (_set("rng", [{"torch": 5, "numpy": 1, "python": 2}]), "'rng'"),
    "rng short": (lambda s: s["rng"][0]["python"].__setitem__(1, [1, 2]), "'rng'"),
    "rank_state": (_set("rank_state", [5]), "'rank_state'"),
    "no param groups": (lambda s: s["optimizer"].__setitem__("param_groups", []), "'optimizer'"),
    "optimizer list": (_set("optimizer", [1, 2]), "'optimizer'"),
    "manager": (_set("manager", "masks"), "'manager'"),
    "class_map": (_set("class_map", "abc"), "'class_map'"),
    "hist path": (
        _set("checkpoint_hist", [{"file": "../x.pth", "epoch": 1, "sparsity": 0.0, "metric": 1}]),
        "'checkpoint_hist'",
    ),
    "hist types": (
        _set("checkpoint_hist", [{"file": "x.pth", "epoch": "1", "sparsity": 0.0, "metric": 1}]),
        "'checkpoint_hist'",
    ),
    "ema": (_set("state_dict_ema", {"w": 1}), "'state_dict_ema'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_resume_names_the_missing_or_bad_entry(tmp_path, case):
    edit, expected = HOSTILE[case]
    save_small(tmp_path / "c.pth")
    path = edited(tmp_path / "c.pth", edit)
    with pytest.raises(CheckpointError) as err:
        resume.read_point(resume_args(path, no_resume_epoch=False, start_epoch=None), True)
    msg = str(err.value)
    assert expected in msg and str(path) in msg and "\n" not in msg
    assert "mlp_last.pth" in msg and "--initial-checkpoint" in msg


def test_an_intact_checkpoint_passes_and_no_resume_opt_needs_no_optimizer(tmp_path):
    path = tmp_path / "c.pth"
    save_small(path)
    point = resume.read_point(resume_args(path, no_resume_epoch=False, start_epoch=None), True)
    assert point.start_epoch == 4
    edited(path, lambda s: s.pop("optimizer"))
    args = resume_args(path, no_resume_epoch=False, start_epoch=None)
    args.no_resume_opt = True
    assert resume.read_point(args, True).start_epoch == 4


def test_resume_of_weights_only_files_the_suite_writes(tmp_path):
    from safetensors.torch import save_file

    from sparseml.checkpoints import save_model

    model = nn.Linear(3, 2)
    files = [tmp_path / "w.safetensors", tmp_path / "m.pth", tmp_path / "plain.pth"]
    save_file(model.state_dict(), str(files[0]))
    save_model(files[1], model, epoch=1)  # SparseML's helper: no optimizer given
    ckpt_io.save_state_dict(model, files[2])
    ckpt_io.save_compressed_weights(model, tmp_path / "c.sparse.safetensors")
    for path in [*files, tmp_path / "c.sparse.safetensors"]:
        with pytest.raises(CheckpointError, match=r"--resume needs a full training checkpoint"):
            resume.read_point(resume_args(path, no_resume_epoch=False, start_epoch=None), True)


# ----- damaged safetensors ---------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_safetensors_file_is_a_one_line_error(tmp_path, damage):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else raw[:8] + b"[" + raw[9:])
    with pytest.raises(CheckpointError) as err:
        read_state_dict(path, "--initial-checkpoint")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ----- results.jsonl rows of the wrong types ---------------------------------------------------
GOOD = {"method": "gm", "sparsity": 0.5, "accuracy": 90.0, "settings": {"seed": 0}}
BAD_ROWS = [
    {**GOOD, "sparsity": None},
    {**GOOD, "sparsity": "abc"},
    {**GOOD, "sparsity": True},
    {**GOOD, "sparsity": 7},
    {**GOOD, "method": 5},
    {**GOOD, "method": None},
    {**GOOD, "accuracy": "high"},
    {**GOOD, "loss": [1]},
    {**GOOD, "settings": "x"},
    {**GOOD, "settings": [1]},
    {"sparsity": 0.5},
    [1, 2],
    "text",
]


def test_wrongly_typed_rows_are_dropped_and_computed_again(tmp_path, caplog):
    dense = {"method": "dense", "sparsity": 0.0, "accuracy": 95.0, "settings": {"d": 1}}
    lines = [json.dumps(dense), *(json.dumps(r) for r in BAD_ROWS), "{cut"]
    (tmp_path / res.JSONL).write_text("\n".join(lines) + "\n")
    assert res.read_rows(tmp_path) == [dense]
    assert "line" in caplog.text and "'sparsity' is None" in caplog.text
    plan = res.plan_resume(tmp_path, "gm", [0.5], {"dense": {"d": 1}, "gm": {"seed": 0}})
    assert plan == {"dense": False, "sparsities": [0.5]}
    assert [json.loads(x) for x in (tmp_path / res.JSONL).read_text().splitlines()] == [dense]
    assert "95.00" in res.format_table(res.read_rows(tmp_path))
    # Benchmark records: a row whose key is not a scalar is skipped too.
    records = tmp_path / "bench.jsonl"
    records.write_text('{"key": [1]}\n{"key": "a", "v": 1}\n')
    assert list(res.read_records(records)) == ["a"]


# ----- end to end: the script's exit status and message ----------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_dir) -> Path:
    import sparse_training

    root = tmp_path_factory.mktemp("hostile")
    data = copy_digits_subset(digits_dir, root / "digits", 6, 2)
    argv = [str(data), "--dataset", "", "--model", "vit_digits", "--model-kwargs", "depth=1",
            "-b", "30", "--workers", "0", "--epochs", "1", "--save-last", "--save-compressed",
            "--output", str(root / "out"), "--experiment", "base"]  # fmt: skip
    out = sparse_training.main(argv)["out_dir"]
    return out


@pytest.mark.parametrize("case", ["flipped epoch", "compressed weights"])
def test_resume_of_a_hostile_file_exits_2_with_one_line(trained, tmp_path, run_script, case):
    if case == "flipped epoch":
        path = tmp_path / "flip.pth"
        path.write_bytes((trained / "vit_digits_last.pth").read_bytes())
        flip_epoch_bit(path)
    else:
        path = trained / "vit_digits_last.sparse.safetensors"
    data = trained.parent.parent / "digits"
    args = [str(data), "--dataset", "", "--model", "vit_digits", "--model-kwargs", "depth=1",
            "-b", "30", "--workers", "0", "--epochs", "1", "--output", str(tmp_path / "o"),
            "--experiment", "r", "--resume", str(path)]  # fmt: skip
    done = run_script("sparse_training.py", args)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(errors) == 1 and str(path) in errors[0]
