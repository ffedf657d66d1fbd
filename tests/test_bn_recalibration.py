"""BatchNorm recalibration after one-shot pruning (``--bn-recalibration-batches``).

The function against statistics computed by hand, then end to end on ``resnet_digits``: the
row records the recalibration, the saved model's statistics are the recalibrated ones (not
the dense model's), a row without it is unchanged, and bad values are one-line errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import copy_digits_subset, ensure_research

ensure_research()
import one_shot_pruning as osp_script  # noqa: E402
from utils import evaluation as ev  # noqa: E402
from utils.errors import SetupError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = r"""pruning_modifiers:
  - !GlobalMagnitudePruningModifier
    params: ['re:.*layer\d\.\d+\.conv\d\.weight']
    init_sparsity: 0.8
    final_sparsity: 0.8
    start_epoch: 0
    end_epoch: 1
    update_frequency: 1
    global_sparsity: true
"""


def test_statistics_are_the_cumulative_average_of_the_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model[1].running_mean.fill_(7.0)
    batches = [(torch.randn(5, 3) * (i + 1), torch.zeros(5)) for i in range(3)]
    assert ev.recalibrate_batchnorm(model, batches, 2, torch.device("cpu")) == 1
    with torch.no_grad():
        h = [model[0](x) for x, _ in batches[:2]]  # the third batch is not read
    want_mean = sum(x.mean(0) for x in h) / 2
    want_var = sum(x.var(0, unbiased=True) for x in h) / 2
    torch.testing.assert_close(model[1].running_mean, want_mean)
    torch.testing.assert_close(model[1].running_var, want_var)
    assert model[1].momentum == 0.1 and not model.training
    assert ev.recalibrate_batchnorm(nn.Linear(2, 2), batches, 2, torch.device("cpu")) == 0


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, digits_dir) -> Path:
    return copy_digits_subset(digits_dir, tmp_path_factory.mktemp("bn_digits"), 6, 4)


def args(small_digits: Path, out: Path, recipe: Path, *extra: str) -> list[str]:
    return [
        "--model", "resnet_digits", "--dataset", "digits", "--data-dir", str(small_digits),
        "--sparseml-recipe", str(recipe), "--output", str(out), "--experiment", "run",
        "--workers", "0", "-vb", "16", "-b", "8", "--device", "cpu", "--sparsities", "0.8",
        "--save-model", "--no-report", *extra,
    ]  # fmt: skip


def running_means(path: Path) -> list[torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return [v for k, v in sorted(state.items()) if k.endswith("running_mean")]


def test_one_shot_row_with_recalibration(tmp_path, small_digits):
    recipe = tmp_path / "gm.yaml"
    recipe.write_text(RECIPE)
    plain = osp_script.main(args(small_digits, tmp_path, recipe, "--method", "gm"))
    recal = osp_script.main(
        args(small_digits, tmp_path, recipe, "--method", "gm+bn", "--bn-recalibration-batches", "2")
    )
    by_method = {r["method"]: r for r in recal}
    assert set(by_method) == {"dense", "gm", "gm+bn"}
    row = by_method["gm+bn"]
    model = osp_script.create_model("resnet_digits")
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert row["bn_recalibrated"] == norms > 4
    assert row["settings"]["bn_recalibration_batches"] == 2
    assert "bn_recalibrated" not in by_method["gm"]
    assert "bn_recalibration_batches" not in by_method["gm"]["settings"]
    assert plain[-1]["accuracy"] == by_method["gm"]["accuracy"]
    folder = tmp_path / "run"
    before = running_means(folder / "resnet_digits_gm_sparsity=0.8.pth")
    after = running_means(folder / "resnet_digits_gm+bn_sparsity=0.8.pth")
    assert len(after) == norms
    assert all(not torch.allclose(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("value", ["-1", "two"])
def test_bad_batch_count_is_one_line(value, tmp_path, small_digits):
    recipe = tmp_path / "gm.yaml"
    recipe.write_text(RECIPE)
    argv = args(small_digits, tmp_path, recipe, "--bn-recalibration-batches", value)
    if value == "-1":
        with pytest.raises(SetupError, match="--bn-recalibration-batches -1 is not allowed"):
            osp_script.main(argv)
    else:
        with pytest.raises(SystemExit):
            osp_script.main(argv)


def test_more_batches_than_the_split_holds_is_one_line(tmp_path, small_digits):
    """The rows would record batches that were never read."""
    recipe = tmp_path / "gm.yaml"
    recipe.write_text(RECIPE)
    argv = args(small_digits, tmp_path, recipe, "--bn-recalibration-batches", "1000")
    with pytest.raises(SetupError, match=r"--bn-recalibration-batches 1000 exceeds the \d+ batch"):
        osp_script.main(argv)
