"""Shared test set-up: ``research/`` importable, timm importable, offline digits data.

Two tiers share it: ``tests/unit/`` holds the pure tests (kernels, recipes, fields, schedules,
masks, layouts, serialization: no subprocess, no training loop, no second process; ``pytest
tests/unit`` runs them in seconds) and ``tests/`` itself the integration and end-to-end tests
(scripts, training runs, torchrun, gloo). ``pytest`` runs both. Helper modules here (``toy``,
``fault_inject``) are importable from either tier because pytest puts this folder on
``sys.path`` when it loads this conftest.

Importing this conftest puts ``research/`` on ``sys.path`` (so ``import utils...`` and
``import sparse_training`` work). A test module that imports timm at the top does::

    from utils.compat import ensure_torchvision

    ensure_torchvision()
    import timm

or asks for the ``research`` fixture, which runs the same shim. ``digits_dir`` is the offline
digits ImageFolder tree (written once into ``$CAP_DATA_DIR`` or ``~/.cache/cap_sparse/digits``),
and ``run_script`` runs a research script in a fresh process, optionally under torchrun or the
legacy ``torch.distributed.launch``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from proc_tree import run_bounded

# Tests never download: the product leaves HF_HUB_OFFLINE alone (--pretrained may download),
# so the tests set it for themselves and, through run_script, for the scripts they start.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests' phases take milliseconds; progress lines are checked, so none is held back.
os.environ.setdefault("SPARSEML_PROGRESS_QUIET", "0")
# Online W&B would log to the account of whoever runs the tests (or hang without network).
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
RESEARCH = ROOT / "research"
if str(RESEARCH) not in sys.path:
    sys.path.insert(0, str(RESEARCH))


def ensure_research() -> Path:
    """Run the torchvision shim (and offline env defaults); return the ``research/`` folder."""
    from utils.compat import ensure_torchvision

    ensure_torchvision()
    return RESEARCH


@pytest.fixture(scope="session")
def research() -> Path:
    return ensure_research()


@pytest.fixture(scope="session")
def digits_dir(research: Path) -> Path:
    from utils.data import default_digits_dir, prepare_digits

    return prepare_digits(default_digits_dir())


def copy_digits_subset(digits_dir: Path, root: Path, train: int, val: int) -> Path:
    """Copy the first ``train`` / ``val`` images of every class of the digits tree to ``root``."""
    for split, count in (("train", train), ("val", val)):
        for folder in sorted((digits_dir / split).iterdir()):
            dest = root / split / folder.name
            dest.mkdir(parents=True)
            for image in sorted(folder.iterdir())[:count]:
                shutil.copyfile(image, dest / image.name)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: the test models are tiny and the test machine's cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_prefix(launcher: str, nproc: int) -> list[str]:
    if launcher == "python":
        return [sys.executable]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    if launcher == "legacy":  # no --standalone here: ask the OS for a free port
        return [sys.executable, "-m", "torch.distributed.launch", f"--master_port={_free_port()}"]
    raise ValueError(f"launcher must be python, torchrun or legacy, got {launcher!r}")


@pytest.fixture
def run_script(research: Path, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """``run_script("sparse_training.py", [args], nproc=1, launcher="python")`` -> result.

    Runs in ``tmp_path`` with offline W&B / HF hub, one thread per process, and a timeout
    (`proc_tree.run_bounded`: past it, returncode 124, the processes' stacks and no survivors).
    """

    def run(
        script: str,
        args: Sequence[str],
        *,
        nproc: int = 1,
        launcher: str = "python",
        env: dict[str, str] | None = None,
        timeout: float = 180,
    ) -> subprocess.CompletedProcess:
        cmd = _launch_prefix(launcher, nproc)
        if launcher != "python":
            cmd.append(f"--nproc_per_node={nproc}")
        cmd += [str(research / script), *map(str, args)]
        # WANDB_SERVICE points at the service of an in-process W&B run; children start their own.
        full_env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
        full_env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
        full_env.update({"HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", **(env or {})})
        return run_bounded(cmd, cwd=tmp_path, env=full_env, timeout=timeout)

    return run
