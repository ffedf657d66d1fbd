"""The launchers answer --help with their usage, once, exit 0 and start nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def launch(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(PYTHON=sys.executable, OUTPUT=str(tmp_path / "output"), OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        ["bash", str(ROOT / "research" / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_one_shot_help_prints_usage_and_starts_nothing(flag: str, tmp_path: Path) -> None:
    done = launch("run_one_shot_pruning.sh", [flag], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("One-shot pruning sweep with working defaults") == 1
    assert "METHODS" in done.stdout and "SPARSITIES" in done.stdout
    assert "==" not in done.stdout  # no training or sweep step started
    assert not (tmp_path / "output").exists()


def test_one_shot_rejects_unknown_arguments(tmp_path: Path) -> None:
    done = launch("run_one_shot_pruning.sh", ["--methods", "cap"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unknown argument '--methods': settings are environment variables "
        "(--help lists them)"
    ]
    assert not (tmp_path / "output").exists()


def test_gradual_help_prints_usage_once_without_torchrun(tmp_path: Path) -> None:
    done = launch("run_gradual_pruning.sh", ["--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("Gradual pruning with sparse_training.py") == 1
    assert out.count("usage: sparse_training.py") == 1
    assert "RECIPE=" in out and "NUM_PROC=2" in out  # the launcher's settings, with defaults
    assert "torch.distributed" not in done.stderr and "OMP_NUM_THREADS" not in done.stderr
    assert not (tmp_path / "output").exists()
