"""A configuration error under torchrun is printed once (by rank 0), with exit code 2."""

from __future__ import annotations

import pytest


@pytest.mark.dist
def test_bad_recipe_under_torchrun_is_reported_once(run_script, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        "modifiers:\n  - !CAPruningModifier\n    params: ['re:.*qkv.weight']\n"
        "    final_sparsity: 0.5\n    start_epoch: 0\n    end_epoch: 1\n    num_grads: 0\n"
    )
    argv = ["--dataset", "digits", "--sparseml-recipe", str(recipe), "--output", str(tmp_path)]
    result = run_script("sparse_training.py", argv, nproc=2, launcher="torchrun", timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "num_grads" in errors[0]
    assert "exitcode  : 2" in result.stderr  # the rank's own exit code, as torchrun reports it
