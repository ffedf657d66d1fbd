"""Nothing written is overwritten or lost: faults injected into the writers and the run folders.

Unit tests drive the helpers (``sparseml.serialization``, ``utils.{checkpoint,results,summary,
run_dir}``) with a full disk, torn lines, a held lock and a killed holder; the script tests
check the same mechanisms are wired into ``sparse_training.py`` and ``one_shot_pruning.py``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from conftest import RESEARCH, copy_digits_subset, ensure_research

ensure_research()
import one_shot_pruning as osp_script  # noqa: E402
import sparse_training  # noqa: E402
from sparseml import serialization  # noqa: E402
from sparseml.manager import ScheduledModifierManager  # noqa: E402
from sparseml.serialization import FileWriteError, atomic_open, atomic_save  # noqa: E402
from utils import results as res  # noqa: E402
from utils import run_dir  # noqa: E402
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils.errors import SetupError  # noqa: E402
from utils.plots import plot_accuracy  # noqa: E402
from utils.summary import read_summary, write_summary_row  # noqa: E402
from utils.weights import content_checksum  # noqa: E402

GM = RESEARCH / "recipes" / "one_shot" / "gm_digits.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def tiny_checkpoint(path: Path, epoch: int) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(path, model=model, optimizer=opt, epoch=epoch, arch="lin")


class FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written (some land)."""

    def __init__(self, real, room: int) -> None:
        self.real, self.room = real, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.real.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.real.write(data)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()


def fill_disk(monkeypatch) -> None:
    """From now on every atomic write fails with ENOSPC after 100 bytes."""
    real_fdopen = os.fdopen
    monkeypatch.setattr(
        serialization.os, "fdopen", lambda fd, *a, **k: FullDisk(real_fdopen(fd, *a, **k), 100)
    )


# ----- atomic writes: disk full, interrupts, permissions ----------------------------------------


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    tiny_checkpoint(path, epoch=1)
    fill_disk(monkeypatch)
    with pytest.raises(FileWriteError, match="no space left on device") as err:
        tiny_checkpoint(path, epoch=2)
    assert str(path) in str(err.value) and err.value.errno == errno.ENOSPC
    assert load_checkpoint(path)["epoch"] == 1
    assert temps(tmp_path) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux /dev/full")
def test_real_enospc_from_torch_save_is_named(tmp_path, monkeypatch):
    """torch.save turns the OSError into a RuntimeError; the errno is found in its context."""
    real_fdopen = os.fdopen

    def dev_full(fd, *args, **kwargs):
        os.close(fd)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), *args, **kwargs)

    monkeypatch.setattr(serialization.os, "fdopen", dev_full)
    with pytest.raises(FileWriteError, match=r"cannot write .*x\.pth: no space left on device"):
        atomic_save({"w": torch.zeros(100_000)}, tmp_path / "x.pth")
    assert temps(tmp_path) == [] and not (tmp_path / "x.pth").exists()


def test_errno_less_error_on_a_nearly_full_disk(tmp_path, monkeypatch):
    def failing_save(obj, f):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(serialization.torch, "save", failing_save)
    monkeypatch.setattr(serialization.shutil, "disk_usage", lambda p: Namespace(free=4096))
    with pytest.raises(FileWriteError, match="no space left on device"):
        atomic_save({}, tmp_path / "x.pth")
    monkeypatch.setattr(serialization.shutil, "disk_usage", lambda p: Namespace(free=1 << 40))
    with pytest.raises(FileWriteError, match="iostream error"):
        atomic_save({}, tmp_path / "x.pth")
    assert temps(tmp_path) == []


def test_interrupt_and_unpicklable_values_leave_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_open(target, "w") as f:
        f.write("new")
        raise KeyboardInterrupt
    with pytest.raises(AttributeError):  # a local lambda cannot be pickled: not an I/O error
        atomic_save({"f": lambda: 0}, target)
    assert target.read_text() == "old" and temps(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        tiny_checkpoint(tmp_path / "c.pth", 0)
        res.append_row(tmp_path, {"method": "m", "sparsity": 0.5, "accuracy": 1.0})
        write_summary_row(tmp_path / "summary.csv", {"epoch": 0, "x": 1})
        plot_accuracy(res.read_rows(tmp_path), tmp_path / res.PLOT)
        lock = run_dir.lock_folder(tmp_path, "--output_dir")
        lock.release()
    finally:
        os.umask(old)
    names = ["c.pth", res.JSONL, res.CSV, "summary.csv", res.PLOT, run_dir.LOCK_NAME]
    assert {n: oct(os.stat(tmp_path / n).st_mode & 0o777) for n in names} == dict.fromkeys(
        names, oct(mode)
    )


# ----- results.jsonl is the truth; summary.csv keyed by epoch ----------------------------------


def test_torn_jsonl_line_is_dropped_and_its_row_recomputed(tmp_path, caplog):
    for s in (0.5, 0.6):
        res.append_row(tmp_path, {"method": "m", "sparsity": s, "accuracy": s})
    jsonl = tmp_path / res.JSONL
    jsonl.write_bytes(jsonl.read_bytes()[:-15])  # killed while appending the 0.6 row
    (tmp_path / res.CSV).write_text("method,sparsity\nm,0.5\nm,0.")  # and a torn CSV
    with caplog.at_level(logging.WARNING):
        plan = res.plan_resume(tmp_path, "m", [0.5, 0.6], {"dense": {}, "m": {}})
    assert plan["sparsities"] == [0.6] and "line" in caplog.text and "[2]" in caplog.text
    assert [json.loads(x)["sparsity"] for x in jsonl.read_text().splitlines()] == [0.5]
    csv_rows = (tmp_path / res.CSV).read_text().splitlines()[1:]
    assert len(csv_rows) == 1 and csv_rows[0].startswith("m,,0.5,0.5,")


def test_csv_is_regenerated_from_jsonl(tmp_path):
    res.append_row(tmp_path, {"method": "m", "sparsity": 0.5, "accuracy": 1.0})
    (tmp_path / res.CSV).unlink()  # e.g. killed between the two writes
    res.plan_resume(tmp_path, "m", [0.5], {"dense": {}, "m": {}})
    assert (tmp_path / res.CSV).read_text().count("\n") == 2


def test_failed_append_cuts_the_jsonl_back(tmp_path, monkeypatch):
    res.append_row(tmp_path, {"method": "m", "sparsity": 0.5, "accuracy": 1.0})
    before = (tmp_path / res.JSONL).read_bytes()
    real_open = Path.open

    def full(self, mode="r", *args, **kwargs):
        handle = real_open(self, mode, *args, **kwargs)
        return FullDisk(handle, 10) if mode == "a+b" else handle

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(FileWriteError, match=r"results\.jsonl: no space left on device"):
        res.append_row(tmp_path, {"method": "m", "sparsity": 0.6, "accuracy": 2.0})
    assert (tmp_path / res.JSONL).read_bytes() == before


def test_summary_has_one_row_per_epoch_after_resume(tmp_path):
    path = tmp_path / "summary.csv"
    for epoch in range(3):
        write_summary_row(path, {"epoch": epoch, "loss": epoch})
    write_summary_row(path, {"epoch": 1, "loss": 10, "lr": 0.1})  # resumed from epoch 0
    rows = read_summary(path)
    assert [(r["epoch"], r["loss"], r["lr"]) for r in rows] == [("0", "0", ""), ("1", "10", "0.1")]
    # Files of older versions: a second header line where columns changed, a torn last line.
    path.write_text("epoch,loss\n0,1.0\nepoch,loss,lr\n1,0.5,0.1\n2,0.")
    assert [r.get("lr") for r in read_summary(path)] == [None, "0.1"]


# ----- run folders: locks, kill -9, no overwrite ------------------------------------------------

HOLDER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from utils.run_dir import lock_folder
lock = lock_folder(sys.argv[2], "--output_dir")
child = os.fork() if len(sys.argv) > 3 else 1  # like a data loader worker
if child == 0:
    time.sleep(300)
    os._exit(0)
print("locked", child, flush=True)
time.sleep(300)
"""


def start_holder(folder: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(RESEARCH), str(folder), *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    word, child = proc.stdout.readline().split()
    assert word == "locked"
    return proc, int(child)


@pytest.fixture
def lock_holder(tmp_path):
    folder = tmp_path / "busy"
    proc, _ = start_holder(folder)
    try:
        yield folder, proc
    finally:
        proc.kill()
        proc.wait()


def test_held_lock_refuses_and_a_killed_holder_frees_it(lock_holder):
    folder, proc = lock_holder
    orphan = folder / ".c.pth.4242.0123abcd.tmp"
    orphan.write_bytes(b"half")
    with pytest.raises(SetupError, match=f"in use by another run \\(pid {proc.pid} on host"):
        run_dir.lock_folder(folder, "--output_dir")
    assert orphan.exists()  # the holder may still be writing it
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with run_dir.lock_folder(folder, "--output_dir"):
        assert not orphan.exists()  # nobody else writes here: left by a killed writer
        assert json.loads((folder / run_dir.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_forked_child_of_a_killed_holder_does_not_keep_the_lock(tmp_path):
    proc, child = start_holder(tmp_path, "fork")
    try:
        with pytest.raises(SetupError, match=f"pid {proc.pid}"):
            run_dir.lock_folder(tmp_path, "--output_dir")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the child still runs (it would raise if it were gone) ...
        run_dir.lock_folder(tmp_path, "--output_dir").release()  # ... yet the folder is free
    finally:
        proc.kill()
        proc.wait()
        os.kill(child, signal.SIGKILL)


def test_one_shot_into_a_busy_folder_exits_2(lock_holder, run_script, digits_dir):
    folder, proc = lock_holder
    argv = ["--dataset", "digits", "--data-dir", digits_dir, "--sparseml_recipe", GM]
    result = run_script("one_shot_pruning.py", [*argv, "--output_dir", folder, "--device", "cpu"])
    assert result.returncode == 2, result.stderr
    assert f"pid {proc.pid}" in result.stderr and "--output_dir" in result.stderr
    assert "Traceback" not in result.stderr and not (folder / res.JSONL).exists()


def test_auto_named_run_folders_never_collide(tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir.time, "strftime", lambda fmt: "20260101-000000")
    args = Namespace(output=str(tmp_path), experiment="", model="vit_digits", resume="")
    first, lock1 = run_dir.claim_training_dir(args, 32)
    second, lock2 = run_dir.claim_training_dir(args, 32)
    assert (first.name, second.name) == ("20260101-000000-vit_digits-32", f"{first.name}-1")
    lock1.release()
    lock2.release()


# ----- the scripts ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, digits_dir) -> Path:
    return copy_digits_subset(digits_dir, tmp_path_factory.mktemp("small_digits"), 20, 6)


def train_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        str(data), "--dataset", "", "--model", "vit_digits", "--model-kwargs", "depth=1",
        "-b", "50", "--workers", "0", "--opt", "adamw", "--lr", "0.002", "--sched", "step",
        "--warmup-epochs", "0", "--epochs", "3", "--save-last", "--output", str(out),
        "--experiment", name, "--log-interval", "100", *extra,
    ]  # fmt: skip


def test_training_resume_keeps_best_and_summary_and_refuses_fresh_runs(small_digits, tmp_path):
    argv = train_args(small_digits, tmp_path, "run", "--checkpoint-hist", "1")
    out = sparse_training.main([*argv, "--stop-epoch", "2"])["out_dir"]
    last, best = out / "vit_digits_last.pth", out / "vit_digits_best.pth"
    files = lambda: {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".run.lock"}  # noqa: E731
    before = files()
    with pytest.raises(SetupError, match=r"already holds a run .* --resume .*vit_digits_last"):
        sparse_training.main(argv)  # a fresh run must not overwrite the earlier one
    assert files() == before

    # Injected: a best metric no epoch can beat, and a summary row of an epoch whose checkpoint
    # was never written (killed in between).
    state = torch.load(last, weights_only=True)
    [entry] = state["checkpoint_hist"]
    state["checkpoint_hist"] = [{**entry, "metric": 101.0}]
    state["checksum"] = content_checksum(state)  # an edit made on purpose, not damage
    atomic_save(state, last)
    write_summary_row(out / "summary.csv", {**read_summary(out / "summary.csv")[-1], "epoch": 2})
    best_before = best.read_bytes()
    # A kept checkpoint of an abandoned continuation: the resumed history does not list it.
    orphan = out / "vit_digits_best_sparsity=0.00_epoch=7.pth"
    orphan.write_bytes(best_before)
    sparse_training.main([*argv, "--resume", str(last)])
    assert load_checkpoint(last)["epoch"] == 2
    assert best.read_bytes() == best_before  # epoch 2 is not the best of the whole run
    assert load_checkpoint(last)["checkpoint_hist"] == [{**entry, "metric": 101.0}]
    assert sorted(p.name for p in out.glob("vit_digits_best*.pth")) == [best.name, entry["file"]]
    assert [r["epoch"] for r in read_summary(out / "summary.csv")] == ["0", "1", "2"]


def test_one_shot_rerun_repairs_a_torn_results_line(small_digits, tmp_path, monkeypatch):
    out = tmp_path / "out"
    argv = ["--dataset", "digits", "--data-dir", str(small_digits), "--sparseml_recipe", str(GM)]
    argv += ["--output_dir", str(out), "--workers", "0", "--device", "cpu", "--no_report"]
    osp_script.main([*argv, "--sparsities", "0.5", "0.7"])
    jsonl = out / res.JSONL
    jsonl.write_bytes(jsonl.read_bytes()[:-40])  # killed while writing the 0.7 row
    calls = []
    original = ScheduledModifierManager.apply
    monkeypatch.setattr(
        ScheduledModifierManager,
        "apply",
        lambda m, *a, **k: calls.append(1) or original(m, *a, **k),
    )
    rows = osp_script.main([*argv, "--sparsities", "0.5", "0.7"])
    assert len(calls) == 1 and sorted(r["sparsity"] for r in rows) == [0.0, 0.5, 0.7]
    assert len(res.read_rows(out)) == 3 and len(jsonl.read_text().splitlines()) == 3
    assert (out / res.CSV).read_text().count("\n") == 4 and temps(out) == []


def test_table_and_plot_accept_null_accuracy(tmp_path):
    """A non-finite result is stored as null; the table and plot still render (n/a = nan)."""
    rows = [
        {"method": "dense", "sparsity": 0.0, "accuracy": 90.0},
        {"method": "cap", "sparsity": 0.5, "accuracy": None},
        {"method": "cap", "sparsity": 0.7, "accuracy": 80.0},
    ]
    table = res.format_table(rows)
    assert "nan" in table and "80.00" in table
    assert plot_accuracy(rows, tmp_path / "plot.png").stat().st_size > 0
    with pytest.raises(ValueError):
        res.append_row(tmp_path, {"method": "gm", "sparsity": 0.5, "accuracy": float("nan")})
