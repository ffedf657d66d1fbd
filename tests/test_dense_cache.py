"""The one dense-model cache (``research/utils/dense_cache.py``) that the one-shot launcher and
the quality benchmark share: trained once, resumed after an interrupt, never cached unfinished,
stale settings removed, and the command line the launcher calls."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RESEARCH
from utils import dense_cache


class FakeTraining:
    """Stands in for sparse_training.py: leaves checkpoints and ends as ``mode`` says."""

    def __init__(self, train_dir: Path) -> None:
        self.train_dir, self.mode, self.calls = train_dir, "complete", []

    def __call__(self, cmd: list[str]) -> None:
        self.calls.append(cmd)
        self.train_dir.mkdir(parents=True, exist_ok=True)
        (self.train_dir / "m_last.pth").write_text("last\n")
        (self.train_dir / "m_best.pth").write_text(f"best {len(self.calls)}\n")
        if self.mode == "interrupted":
            raise SystemExit(130)
        if self.mode == "complete":
            (self.train_dir / dense_cache.COMPLETE).write_text("{}\n")


def test_interrupted_then_unfinished_then_complete(tmp_path):
    ckpt, train_dir = tmp_path / "dense.pth", tmp_path / "dense_training"
    fake = FakeTraining(train_dir)
    fake.mode = "interrupted"
    with pytest.raises(SystemExit) as err:
        dense_cache.ensure_dense(ckpt, train_dir, ["train"], run=fake)
    assert err.value.code == 130 and not ckpt.exists()
    fake.mode = "exit0"  # exits 0 without the completion marker
    with pytest.raises(dense_cache.DenseCacheError, match="not caching"):
        dense_cache.ensure_dense(ckpt, train_dir, ["train"], run=fake)
    assert fake.calls[-1] == ["train", "--resume", str(train_dir / "m_last.pth")]
    assert not ckpt.exists()
    fake.mode = "complete"
    assert dense_cache.ensure_dense(ckpt, train_dir, ["train"], run=fake) == ckpt
    assert ckpt.read_text() == "best 3\n"
    calls = len(fake.calls)
    dense_cache.ensure_dense(ckpt, train_dir, ["train"], run=fake)  # cached: no training
    assert len(fake.calls) == calls


def test_a_cache_without_its_completed_training_is_retrained(tmp_path):
    ckpt, train_dir = tmp_path / "dense.pth", tmp_path / "dense_training"
    ckpt.write_text("from an older, unfinished run\n")
    fake = FakeTraining(train_dir)
    dense_cache.ensure_dense(ckpt, train_dir, ["train"], run=fake)
    assert len(fake.calls) == 1 and ckpt.read_text() == "best 1\n"


def test_changed_settings_remove_the_stale_model_and_its_results(tmp_path):
    folder = tmp_path / "model"
    ckpt, train_dir, record = folder / "dense.pth", folder / "dense_training", folder / "d.json"
    results = folder / "one_shot"
    fake = FakeTraining(train_dir)
    kwargs = dict(run=fake, record=record, stale=[folder])
    dense_cache.ensure_dense(ckpt, train_dir, ["t"], settings={"epochs": 2}, **kwargs)
    results.mkdir()
    dense_cache.ensure_dense(ckpt, train_dir, ["t"], settings={"epochs": 2}, **kwargs)
    assert len(fake.calls) == 1 and results.exists()
    dense_cache.ensure_dense(ckpt, train_dir, ["t"], settings={"epochs": 3}, **kwargs)
    assert len(fake.calls) == 2 and not results.exists() and ckpt.read_text() == "best 2\n"


def test_command_line_runs_the_training_command_and_keeps_its_exit_status(tmp_path):
    ckpt, train_dir = tmp_path / "dense.pth", tmp_path / "run"
    script = RESEARCH / "utils" / "dense_cache.py"
    train = (
        "import pathlib, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(exist_ok=True); "
        "(d / 'x_best.pth').write_text('w'); (d / 'x_last.pth').write_text('w'); "
        "sys.exit(int(sys.argv[2]))"
    )
    base = [sys.executable, str(script), "--checkpoint", str(ckpt), "--train-dir", str(train_dir)]
    failed = subprocess.run([*base, "--", sys.executable, "-c", train, str(train_dir), "3"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert failed.returncode == 3 and not ckpt.exists()
    unfinished = subprocess.run([*base, "--", sys.executable, "-c", train, str(train_dir), "0"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    assert unfinished.returncode == 1 and "not caching" in unfinished.stderr
    assert "Resuming the interrupted training" in unfinished.stdout  # continued the first
