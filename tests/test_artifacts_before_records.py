"""Artifacts before records, whole-folder exports and a writer that replaces regular files
only: each fault is injected and the outcome checked."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
import torch

from conftest import copy_digits_subset, ensure_research

ensure_research()
import timm  # noqa: E402

import export  # noqa: E402
import inspect_sparsity  # noqa: E402
import one_shot_pruning as osp_script  # noqa: E402
from sparseml.compressed import SUFFIX  # noqa: E402
from sparseml.serialization import FileWriteError, atomic_write_text  # noqa: E402
from utils import models  # noqa: E402, F401  (registers the digits models)
from utils import results as res  # noqa: E402
from utils.errors import CheckpointError, SetupError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPES = Path(export.__file__).parent / "recipes"
VIT_ARGS = ["--model", "vit_digits", "--model-kwargs", "depth=1"]


# ------------------------------------------------------------------ the atomic writer


def test_writer_keeps_symlinks_and_replaces_their_target(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and target.read_text() == "new"


def test_writer_never_replaces_a_fifo_or_a_device(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    atomic_write_text(fifo, '{"a": 1}\n')
    reader.join(timeout=10)
    if reader.is_alive():  # the FIFO was replaced, not written: release the blocked reader
        with open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "w"):  # noqa: PTH123
            pass
    assert got == ['{"a": 1}\n']
    assert fifo.exists() and not fifo.is_file()  # still the FIFO, not a regular file
    device = tmp_path / "null"
    device.symlink_to("/dev/null")  # a link to a device node: written into, never replaced
    atomic_write_text(device, "x")
    assert device.is_symlink() and Path("/dev/null").is_char_device()
    assert not list(tmp_path.glob(".*.tmp"))


def test_writer_refuses_a_folder_in_one_line(tmp_path):
    with pytest.raises(FileWriteError, match="it is a folder"):
        atomic_write_text(tmp_path, "x")


def test_inspect_json_to_stdout_link_prints_and_keeps_the_link(tmp_path, capfd):
    """``--json /dev/stdout``: a link to this process's fd 1, here one of our own (a buggy
    writer run as root would replace the system's /dev/stdout itself)."""
    stdout = tmp_path / "stdout"
    stdout.symlink_to("/proc/self/fd/1")
    model = timm.create_model("vit_digits", depth=1)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    print("table first")
    inspect_sparsity.main([str(tmp_path / "m.pth"), "--json", str(stdout)])
    out = capfd.readouterr().out
    assert out.startswith("table first") and '"totals"' in out and f"report: {stdout}" in out
    assert stdout.is_symlink() and os.readlink(stdout) == "/proc/self/fd/1"


# ------------------------------------------------------------------ one-shot: saves, then row


def test_failed_save_is_redone_on_rerun(tmp_path, digits_dir, monkeypatch):
    data = copy_digits_subset(digits_dir, tmp_path / "digits", 4, 2)
    out = tmp_path / "out"
    argv = ["--dataset", "digits", "--data-dir", str(data), "--sparseml_recipe",
            str(RECIPES / "one_shot" / "gm_digits.yaml"), "--output_dir", str(out), "--workers", "0", "-vb", "16", "--device", "cpu",
            "--model-kwargs", "depth=1", "--sparsities", "0.5", "--save-compressed", "--no-report"]  # fmt: skip
    calls = []

    def full_disk(model, path, *_):
        calls.append(path)
        raise FileWriteError(f"cannot write {path}: no space left on device")

    monkeypatch.setattr(osp_script, "save_compressed_weights", full_disk)
    with pytest.raises(FileWriteError):
        osp_script.main(argv)
    assert calls and not [r for r in res.read_rows(out) if r["method"] != "dense"]
    monkeypatch.undo()
    osp_script.main(argv)  # the rerun prunes that sparsity again and writes its file
    assert Path(calls[0]).is_file()
    assert [r["sparsity"] for r in res.read_rows(out) if r["method"] != "dense"] == [0.5]


# ------------------------------------------------------------------ export


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def checkpoint(path: Path, seed: int, **extra) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model("vit_digits", depth=1)
    torch.save({"state_dict": model.state_dict(), **extra}, path)
    return path


def test_interrupted_reexport_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a user's file in the output folder
    a = checkpoint(tmp_path / "a.pth", 0)
    b = checkpoint(tmp_path / "b.pth", 1)
    export.main([*VIT_ARGS, "--initial-checkpoint", str(a), "--output", str(out)])
    before = digest(out)
    assert set(before) == {"notes.txt", "export_report.json", "vit_digits.onnx",
                           "vit_digits" + SUFFIX}  # fmt: skip

    def interrupted(*args, **kwargs):  # Ctrl-C after B's compressed file is written
        raise KeyboardInterrupt

    monkeypatch.setattr(export.onnx_io, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.main([*VIT_ARGS, "--initial-checkpoint", str(b), "--output", str(out)])
    assert digest(out) == before  # all of A, nothing of B
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left
    monkeypatch.undo()
    report = export.main([*VIT_ARGS, "--initial-checkpoint", str(b), "--output", str(out),
                          "--formats", "compressed"])  # fmt: skip
    after = digest(out)
    assert after["notes.txt"] == before["notes.txt"]
    assert "vit_digits.onnx" not in after  # A's ONNX does not stay beside B's weights
    assert after["vit_digits" + SUFFIX] != before["vit_digits" + SUFFIX]
    assert report["exports"]["compressed"]["path"] == str(out / ("vit_digits" + SUFFIX))
    assert json.loads((out / "export_report.json").read_text())["checkpoint"] == str(b)


def test_export_uses_the_size_the_model_was_built_with(tmp_path):
    """--model-kwargs img_size=16 in_chans=1: the check input must follow the model, not its
    pretrained config (which says 3 x 32 x 32)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_digits", depth=1, img_size=16, in_chans=1)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    report = export.main(["--model", "vit_digits", "--model-kwargs", "depth=1", "img_size=16",
                          "in_chans=1", "--initial-checkpoint", str(tmp_path / "m.pth"),
                          "--output", str(tmp_path / "o")])  # fmt: skip
    assert report["input_shape"] == [2, 1, 16, 16]
    assert all(e["ok"] for e in report["exports"].values())


def test_export_takes_the_architecture_from_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet_digits")
    torch.save({"state_dict": model.state_dict(), "arch": "resnet_digits"}, tmp_path / "r.pth")
    report = export.main(["--initial-checkpoint", str(tmp_path / "r.pth"), "--output",
                          str(tmp_path / "o"), "--formats", "compressed"])  # fmt: skip
    assert report["model"] == "resnet_digits"
    assert (tmp_path / "o" / ("resnet_digits" + SUFFIX)).is_file()


def test_non_finite_weights_are_named(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_digits", depth=1)
    state = model.state_dict()
    state["blocks.0.mlp.fc1.weight"][3, 5] = float("nan")
    state["head.bias"][0] = float("inf")
    torch.save(state, tmp_path / "m.pth")
    with pytest.raises(SetupError) as info:
        export.main([*VIT_ARGS, "--initial-checkpoint", str(tmp_path / "m.pth"), "--output",
                     str(tmp_path / "o")])  # fmt: skip
    message = str(info.value)
    assert "blocks.0.mlp.fc1.weight" in message and "head.bias" in message and "\n" not in message
    assert not (tmp_path / "o").exists()


def test_inspect_on_onnx_names_the_problem_without_unsafe_advice(tmp_path):
    model = timm.create_model("vit_digits", depth=1)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    export.main([*VIT_ARGS, "--initial-checkpoint", str(tmp_path / "m.pth"), "--output",
                 str(tmp_path / "o"), "--formats", "onnx"])  # fmt: skip
    for name in ("vit_digits.onnx", "renamed.pth"):
        path = tmp_path / "o" / "vit_digits.onnx"
        if name != path.name:
            path = tmp_path / name
            path.write_bytes((tmp_path / "o" / "vit_digits.onnx").read_bytes())
        with pytest.raises(CheckpointError) as info:
            inspect_sparsity.main([str(path)])
        assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


def test_regular_files_under_dev_shm_stay_atomic(tmp_path, monkeypatch):
    """Only paths that name an open file are streamed; a tmpfs file is still replaced whole."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    target = shm / f"h2-atomic-{os.getpid()}.json"
    try:
        target.write_text("old")
        inode = target.stat().st_ino
        atomic_write_text(target, "new")
        assert target.read_text() == "new" and target.stat().st_ino != inode  # a new file
    finally:
        target.unlink(missing_ok=True)
