"""Every command the README shows in a shell block runs, with shortened settings.

The quick-start commands are found in README.md itself, so a command added there without a
run here fails ``test_every_readme_command_is_covered``. The installs are skipped (the test
environment is the installed one) and the runs are shortened through the launchers'
environment variables and ``--recipe-variables``; each must exit 0 and write its results.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHORT_GRADUAL = ["--recipe-variables", "num_epochs=2,pruning_start=0,pruning_end=1"]
# README command (after its install step) -> (extra environment, extra arguments)
COVERED = {
    "bash research/run_one_shot_pruning.sh": (
        {"TRAIN_EPOCHS": "1", "METHODS": "gm cap", "SPARSITIES": "0.5", "NUM_GRADS": "8"},
        [],
    ),
    "bash research/run_gradual_pruning.sh": ({}, SHORT_GRADUAL),
    "RECIPE=research/recipes/gradual_pruning/cap_digits.yaml bash research/run_gradual_pruning.sh": (
        {"RECIPE": "research/recipes/gradual_pruning/cap_digits.yaml"},
        SHORT_GRADUAL,
    ),
    "RECIPE=research/recipes/quantization/gm_qat_digits.yaml bash research/run_gradual_pruning.sh": (
        {"RECIPE": "research/recipes/quantization/gm_qat_digits.yaml", "BATCH_SIZE": "32"},
        [
            "--recipe-variables",
            "num_epochs=1,pruning_start=0,pruning_end=0,qat_start=0,observer_freeze=1",
        ],
    ),
    "bash .ci/run": None,  # this very suite
    # tests/test_benchmarks.py runs --quick on synthetic idx files; the full run takes an hour
    "bash research/bench/run_benchmarks.sh --quick": None,
    "bash research/bench/run_benchmarks.sh": None,
}


def shell_lines(*docs: str) -> list[str]:
    """The lines of the ```bash blocks of ``docs`` (paths relative to the repository)."""
    out = []
    for doc in docs:
        for block in re.findall(r"^```bash\n(.*?)^```", (ROOT / doc).read_text(), re.S | re.M):
            out += block.splitlines()
    return out


def readme_commands() -> list[str]:
    """Shell lines of the README's (and its benchmark report's) code blocks that run a launcher,
    without install/PATH parts."""
    out = []
    for line in shell_lines("README.md", "docs/benchmarks.md"):
        pattern = r"\bbash (research/run_\w+\.sh|research/bench/run_benchmarks\.sh|\.ci/run)\b"
        if re.search(pattern, line):
            command = line.split("&&")[-1].strip()
            command = re.sub(r'^PATH="[^"]*"\s+', "", command)
            out.append(command)
    return out


def test_every_readme_command_is_covered() -> None:
    commands = readme_commands()
    assert commands, "no commands found in README.md"
    assert sorted(set(commands)) == sorted(COVERED)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("command", [c for c, v in COVERED.items() if v is not None])
def test_readme_command_runs(command: str, tmp_path: Path) -> None:
    extra_env, extra_args = COVERED[command]
    script = command.split("bash ")[-1].split()[0]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(extra_env, OUTPUT=str(tmp_path / "output"), PYTHON=sys.executable)
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", WANDB_SILENT="true")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(["bash", script, *extra_args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    if "one_shot" in script:
        rows = list(csv.DictReader((next((tmp_path / "output").rglob("results.csv"))).open()))
        assert {r["method"] for r in rows} >= {"gm", "cap"}
    else:
        assert list((tmp_path / "output").rglob("training_complete.json"))


def readme_python_blocks() -> list[str]:
    """The README's ```python blocks, as a user would copy them."""
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_blocks() -> None:
    assert readme_python_blocks(), "no ```python block found in README.md"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(readme_python_blocks())))
def test_readme_python_block_runs_as_written(index: int, tmp_path: Path) -> None:
    """Each block runs unchanged in a fresh interpreter from the repository root, with only the
    package importable (no research/ on the path, no shim), as in a user's own script."""
    code = readme_python_blocks()[index]
    script = tmp_path / "readme_block.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SERVICE", "PYTHONPATH")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, f"README python block {index}:\n{code}\n{done.stderr[-3000:]}"


def test_readme_dense_training_command_runs(tmp_path: Path) -> None:
    """The README's command that trains the dense model runs as shown (1 epoch instead of 12,
    into a temporary folder) and leaves the best checkpoint where the README says."""
    [line] = [ln for ln in shell_lines("README.md") if "research/sparse_training.py --config" in ln]
    argv = line.split()
    assert argv[0] == ".venv/bin/python" and argv[1] == "research/sparse_training.py"
    argv[argv.index("--epochs") + 1] = "1"
    argv[argv.index("--output") + 1] = str(tmp_path / "train")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    experiment = argv[argv.index("--experiment") + 1]
    assert (tmp_path / "train" / experiment / "vit_digits_best.pth").is_file()
    assert f"output/train/{experiment}/vit_digits_best.pth" in (ROOT / "README.md").read_text()
