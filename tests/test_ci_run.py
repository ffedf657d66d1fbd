""".ci/run uses the environment it finds (never deletes it), lints, then runs both tiers.

The environment here is a fake whose python/pip/ruff only record their arguments, so the
script's own logic is checked in a second (the real suite is what is running this test).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_venv(root: Path, fail: str = "") -> Path:
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for tool in ("python", "pip", "ruff"):
        code = 1 if tool == fail else 0
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{root}/calls"\nexit {code}\n')
        script.chmod(0o755)
    (root / "users_own_file").write_text("installed packages live here")
    return root


def run_ci(venv: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VENV": str(venv)}
    return subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def test_existing_environment_is_used_not_deleted(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path / "venv")
    done = run_ci(venv)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (venv / "users_own_file").exists()
    calls = (venv / "calls").read_text().splitlines()
    assert calls == [
        "pip install --quiet --disable-pip-version-check -r requirements-dev.txt -e .",
        "ruff check src research tests",
        "ruff format --check src research tests",
        "python -m pytest -q tests/unit",
        "python -m pytest -q tests --ignore=tests/unit",
    ]
    assert "using the environment at" in done.stdout and "all passed" in done.stdout


def test_a_failing_tier_fails_ci(tmp_path: Path) -> None:
    venv = fake_venv(tmp_path / "venv", fail="python")
    done = run_ci(venv)
    assert done.returncode == 1
    calls = (venv / "calls").read_text().splitlines()
    assert calls[-1] == "python -m pytest -q tests/unit"  # stops at the first failing step
    assert "all passed" not in done.stdout
