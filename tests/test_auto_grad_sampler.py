"""sparse_training.py sets up the grad sampler itself for second-order recipes."""

from __future__ import annotations

import logging

import pytest

import sparse_training
from conftest import copy_digits_subset
from test_sparse_training import CAP_RECIPE, base_args, pruned_weights, sparsity, write
from utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory, digits_dir):
    return copy_digits_subset(digits_dir, tmp_path_factory.mktemp("digits"), 12, 4)


@pytest.mark.parametrize(
    ("extra", "recipe_kwargs", "size"),
    [([], "", 25), (["-gb", "6"], "", 6), ([], "    grad_sampler_kwargs: {batch_size: 7}\n", 7)],
    ids=["from -b", "from -gb", "from the recipe"],
)
def test_cap_recipe_runs_without_gs_options(
    extra, recipe_kwargs, size, tiny_digits, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    recipe = write(tmp_path / "cap.yaml", CAP_RECIPE + recipe_kwargs)
    argv = [*base_args(tiny_digits, tmp_path, "cap"), "--sparseml-recipe", str(recipe)]
    argv += ["--save-last", "-b", "25", "--epochs", "1", *extra]
    out = sparse_training.main(argv)["out_dir"]
    assert f"grad-sampler loader over the training data, batch size {size}" in caplog.text
    state = load_checkpoint(out / "vit_digits_last.pth")
    assert sparsity(pruned_weights(state)) == pytest.approx(0.6, abs=1e-3)


def test_amp_training_with_a_second_order_recipe(tiny_digits, tmp_path):
    """--amp (bfloat16 autocast on CPU) with CAP pruning inside the training loop."""
    recipe = write(tmp_path / "cap.yaml", CAP_RECIPE)
    argv = [*base_args(tiny_digits, tmp_path, "amp"), "--sparseml-recipe", str(recipe)]
    argv += ["--save-last", "-b", "25", "--epochs", "1", "--amp"]
    state = load_checkpoint(sparse_training.main(argv)["out_dir"] / "vit_digits_last.pth")
    assert sparsity(pruned_weights(state)) == pytest.approx(0.6, abs=1e-3)
    assert all(
        v.dtype == state["state_dict"]["head.weight"].dtype for v in pruned_weights(state).values()
    )
