"""kill -9 in the middle of a gradual CAP run, then --resume: the same masks, weights and
metrics as the uninterrupted run (1 process, and 2 ranks under torchrun)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import RESEARCH, copy_digits_subset
from proc_tree import alive, descendants, run_bounded
from test_sparse_training import PRUNED, base_args, pruned_weights, write
from utils.checkpoint import load_checkpoint
from utils.summary import read_summary

CAP_GRADUAL = f"""
modifiers:
  - !EpochRangeModifier
    start_epoch: 0
    end_epoch: 5
  - !CAPruningModifier
    params: ['{PRUNED}']
    init_sparsity: 0.3
    final_sparsity: 0.7
    start_epoch: 0
    end_epoch: 4
    update_frequency: 1
    num_grads: 12
    fisher_block_size: 32
    damp: 1.0e-4
"""


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, digits_dir) -> Path:
    return copy_digits_subset(digits_dir, tmp_path_factory.mktemp("digits"), 30, 10)


def command(nproc: int, argv: list[str]) -> list[str]:
    prefix = [sys.executable]
    if nproc > 1:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*prefix, str(RESEARCH / "sparse_training.py"), *argv]


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    out.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", WANDB_SILENT="true")
    return out


def run(nproc: int, argv: list[str], cwd: Path) -> None:
    done = run_bounded(command(nproc, argv), cwd=cwd, env=env(), timeout=400)
    assert done.returncode == 0, done.stderr[-6000:]


def run_and_kill(nproc: int, argv: list[str], cwd: Path, last: Path) -> None:
    """Start the run; SIGKILL the launcher and every worker once the epoch-1 checkpoint exists."""
    proc = subprocess.Popen(command(nproc, argv), cwd=cwd, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if last.exists() and load_checkpoint(last)["epoch"] >= 1:
            break
        time.sleep(0.05)
    victims = [proc.pid, *descendants(proc.pid)]
    assert len(victims) >= nproc, "the run ended before it could be killed"
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    time.sleep(1)
    survivors = alive(victims)
    assert not survivors, f"processes survived the kill: {survivors}"


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.dist)])
def test_kill_then_resume_equals_uninterrupted(nproc, small_digits, tmp_path, one_thread):
    recipe = write(tmp_path / "cap.yaml", CAP_GRADUAL)
    common = ["--sparseml-recipe", str(recipe), "--save-last", "--epochs", "5"]
    common += ["--gs-loader", "-gb", "8", "-b", "25"]
    full_args = [*base_args(small_digits, tmp_path, "full"), *common]
    run(nproc, full_args, tmp_path)
    part_args = [*base_args(small_digits, tmp_path, "part"), *common]
    last = tmp_path / "part" / "vit_digits_last.pth"
    run_and_kill(nproc, part_args, tmp_path, last)
    killed_at = load_checkpoint(last)["epoch"]
    time.sleep(2)
    assert load_checkpoint(last)["epoch"] == killed_at < 4  # nothing ran on after the kill
    run(nproc, [*part_args, "--resume", str(last)], tmp_path)

    full = load_checkpoint(tmp_path / "full" / "vit_digits_last.pth")
    resumed = load_checkpoint(last)
    assert resumed["epoch"] == full["epoch"] == 4
    zeros = sum(int((w == 0).sum()) for w in pruned_weights(resumed).values())
    assert zeros / sum(w.numel() for w in pruned_weights(resumed).values()) == pytest.approx(
        0.7, abs=1e-3
    )
    for key, weight in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], weight), key
    assert metrics(tmp_path / "part") == metrics(tmp_path / "full")


def metrics(run: Path) -> list[tuple]:
    return [(r["epoch"], r["eval_top1"], r["eval_loss"]) for r in read_summary(run / "summary.csv")]
