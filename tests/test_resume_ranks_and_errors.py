"""Review findings on issues 10 and 11, kept as regression tests: 2-rank resume from rank 0's
state plus each rank's own part (grad-sampler seed, M-FAC buffer), disk-full exit code, unusable
fisher_inv_device."""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path
from unittest import mock

import pytest

from conftest import RESEARCH
from proc_tree import run_bounded
from sparseml.errors import RecipeError
from sparseml.pytorch.optim import ScheduledModifierManager
from sparseml.serialization import atomic_save
from toy import mlp, sampler

HERE = Path(__file__).resolve().parent


def test_disk_full_checkpoint_write_exits_1_not_usage_error(tmp_path):
    """faults.py documents exit 1 for a failed write, 2 for bad input; FileWriteError gets 2."""
    from utils import faults

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with mock.patch("torch.save", side_effect=full), pytest.raises(OSError) as err:
        atomic_save({}, tmp_path / "x.pth")
    code, message = faults.describe(err.value)
    assert "no space left" in message
    assert code == faults.EXIT_FAILED


@pytest.mark.parametrize("device", ["cuda:99", "tpu"])
def test_unusable_fisher_inv_device_is_a_recipe_error(device):
    recipe = f"""
modifiers:
  - !OBSPruningModifier
    params: ["re:.*weight"]
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 0
    num_grads: 8
    fisher_inv_device: '{device}'
"""
    with pytest.raises(RecipeError, match="fisher_inv_device"):
        ScheduledModifierManager.from_yaml(recipe).apply(mlp(), grad_sampler=sampler())


@pytest.mark.dist
@pytest.mark.parametrize("name", ["CAPruningModifier", "MFAC-buffered"])
def test_two_rank_resume_from_rank0_state_equals_uninterrupted(name):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(RESEARCH.parent / "src")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", str(HERE / "review_resume_ranks.py"), name]  # fmt: skip
    done = run_bounded(cmd, cwd=os.getcwd(), env=env, timeout=300)
    results = re.findall(r"RESULT rank \d differing=\[[^\]]*\]", done.stdout)
    assert len(results) == 2, done.stderr[-6000:]
    assert all(r.endswith("differing=[]") for r in results), results
