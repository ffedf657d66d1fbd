"""End-to-end runs of research/sparse_training.py on a small slice of the digits data.

In-process runs call ``sparse_training.main(argv)``; launcher tests run real processes
(python, torchrun, legacy torch.distributed.launch) with gloo on CPU.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import RESEARCH, copy_digits_subset, ensure_research

ensure_research()
import yaml  # noqa: E402

import sparse_training  # noqa: E402
from sparseml.errors import RecipeError  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.errors import CheckpointError, SetupError  # noqa: E402
from utils.summary import read_summary  # noqa: E402

PRUNED = r"re:blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight"
GM_RECIPE = f"""
version: 1.1.0
modifiers:
  - !EpochRangeModifier
    start_epoch: 0
    end_epoch: 4
  - !GlobalMagnitudePruningModifier
    params: ['{PRUNED}']
    init_sparsity: 0.25
    final_sparsity: 0.75
    start_epoch: 1
    end_epoch: 3
    update_frequency: 1
    inter_func: linear
"""
LR_LINES = """
  - !LearningRateFunctionModifier
    start_epoch: 0
    end_epoch: 4
    lr_func: linear
    init_lr: 0.002
    final_lr: 0.0005
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, digits_dir) -> Path:
    """30 train and 10 val images per class (fast epochs)."""
    return copy_digits_subset(digits_dir, tmp_path_factory.mktemp("small_digits"), 30, 10)


def base_args(data: Path, out: Path, name: str) -> list[str]:
    return [
        str(data),
        "--dataset", "",
        "--model", "vit_digits", "--model-kwargs", "depth=1",
        "-b", "50", "-vb", "100", "--workers", "0",
        "--opt", "adamw", "--lr", "0.002", "--weight-decay", "0.01",
        "--sched", "step", "--decay-epochs", "100", "--warmup-epochs", "0",
        "--smoothing", "0", "--hflip", "0", "--color-jitter", "0", "--scale", "0.8", "1.0",
        "--output", str(out), "--experiment", name, "--log-interval", "100",
    ]  # fmt: skip


def pruned_weights(state: dict) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in state["state_dict"].items()
        if "blocks." in k and k.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight"))
    }


def sparsity(weights: dict[str, torch.Tensor]) -> float:
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return zeros / sum(w.numel() for w in weights.values())


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----- dense path -----------------------------------------------------------------------------


def test_dense_run_with_config_precedence(small_digits, tmp_path):
    cfg = write(tmp_path / "cfg.yaml", "epochs: 2\nbatch_size: 25\nmy_unknown_key: 7\n")
    argv = base_args(small_digits, tmp_path, "dense")
    argv = argv[:1] + ["--config", str(cfg)] + argv[1:] + ["--checkpoint-freq", "1", "--save-last"]
    result = sparse_training.main(argv)  # base_args passes -b 50: the CLI beats the config
    out = result["out_dir"]
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert (args["batch_size"], args["epochs"], args["my_unknown_key"]) == (50, 2, 7)
    rows = read_summary(out / "summary.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert 0.0 <= float(rows[1]["eval_top1"]) <= 100.0
    assert float(rows[1]["prunable_sparsity_percent"]) == 0.0
    names = sorted(p.name for p in out.glob("*.pth"))
    assert names == [
        "vit_digits_best.pth", "vit_digits_best_sparsity=0.00_epoch=0.pth",
        "vit_digits_best_sparsity=0.00_epoch=1.pth", "vit_digits_epoch=0.pth",
        "vit_digits_epoch=1.pth", "vit_digits_last.pth",
    ]  # fmt: skip
    state = torch.load(out / "vit_digits_last.pth", weights_only=True)
    assert state["epoch"] == 1 and state["manager"] is None and state["arch"] == "vit_digits"
    assert not list(out.glob(".*.tmp"))


# ----- errors before training -----------------------------------------------------------------


def test_bad_recipe_fails_before_training(small_digits, tmp_path):
    bad = write(tmp_path / "bad.yaml", GM_RECIPE.replace("inter_func: linear", "inter_fun: linear"))
    argv = base_args(small_digits, tmp_path / "out", "bad")
    with pytest.raises(RecipeError, match="inter_fun"):
        sparse_training.main([*argv, "--sparseml-recipe", str(bad)])
    with pytest.raises(SetupError, match="does not exist"):
        sparse_training.main([*argv, "--sparseml-recipe", str(tmp_path / "none.yaml")])
    with pytest.raises(SetupError, match="data dir"):
        sparse_training.main([str(tmp_path / "no_data"), *argv[1:]])
    assert not (tmp_path / "out").exists()  # nothing was written


def test_corrupt_resume_checkpoint_is_a_clear_error(small_digits, tmp_path):
    broken = write(tmp_path / "broken.pth", "not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        sparse_training.main([*base_args(small_digits, tmp_path, "x"), "--resume", str(broken)])


def test_script_errors_exit_2_without_traceback(run_script, tmp_path):
    result = run_script("sparse_training.py", [str(tmp_path / "missing"), "--dataset", ""])
    assert result.returncode == 2
    assert "error: data dir" in result.stderr and "missing" in result.stderr
    assert "Traceback" not in result.stderr


# ----- recipe path ----------------------------------------------------------------------------


@pytest.mark.slow
def test_gradual_gm_resume_matches_uninterrupted_run(small_digits, tmp_path):
    recipe = write(tmp_path / "gm.yaml", GM_RECIPE)
    common = ["--sparseml-recipe", str(recipe), "--epochs", "4", "--save-last", "--log-sparsity"]
    full = sparse_training.main([*base_args(small_digits, tmp_path, "full"), *common])["out_dir"]
    final = load_checkpoint(full / "vit_digits_last.pth")
    assert final["epoch"] == 3
    assert sparsity(pruned_weights(final)) == pytest.approx(0.75, abs=1e-3)
    rows = read_summary(full / "summary.csv")
    assert [float(r["sparsity"]) for r in rows] == [0.0, 0.25, 0.5, 0.75]
    assert sorted(p.name for p in full.glob("sparsity_distribution_*.json")) == [
        "sparsity_distribution_epoch=1.json", "sparsity_distribution_epoch=2.json",
        "sparsity_distribution_epoch=3.json",
    ]  # fmt: skip
    assert (full / "gm.yaml").read_text() == GM_RECIPE  # recipe copy

    part_args = [*base_args(small_digits, tmp_path, "part"), *common]
    part = sparse_training.main([*part_args, "--stop-epoch", "2"])["out_dir"]
    stopped = load_checkpoint(part / "vit_digits_last.pth")
    assert stopped["epoch"] == 1 and stopped["manager"]
    assert sparsity(pruned_weights(stopped)) == pytest.approx(0.25, abs=1e-3)
    sparse_training.main([*part_args, "--resume", str(part / "vit_digits_last.pth")])
    resumed = load_checkpoint(part / "vit_digits_last.pth")
    assert resumed["epoch"] == 3
    assert [r["epoch"] for r in read_summary(part / "summary.csv")] == ["0", "1", "2", "3"]
    for key, weight in pruned_weights(final).items():
        assert torch.equal(resumed["state_dict"][key] == 0, weight == 0), key  # identical masks
    for key, weight in final["state_dict"].items():  # RNG, optimizer and schedule restored exactly
        assert torch.equal(resumed["state_dict"][key], weight), key

    # Sparse fine-tuning from the pruned model with the shipped constant-mask recipe.
    constant = RESEARCH / "recipes" / "finetuning" / "constant_digits.yaml"
    tune_args = [*base_args(small_digits, tmp_path, "tune"), "--sparseml-recipe", str(constant)]
    tune_args += ["--initial-checkpoint", str(full / "vit_digits_last.pth"), "--stop-epoch", "1"]
    tuned = load_checkpoint(
        sparse_training.main([*tune_args, "--save-last"])["out_dir"] / "vit_digits_last.pth"
    )
    for key, weight in pruned_weights(final).items():
        assert torch.equal(tuned["state_dict"][key] == 0, weight == 0), key
    assert not torch.equal(tuned["state_dict"]["head.weight"], final["state_dict"]["head.weight"])


@pytest.mark.slow
def test_grad_accum_counts_updates_and_ema_stays_sparse(small_digits, tmp_path):
    recipe = write(tmp_path / "gm.yaml", GM_RECIPE)
    argv = base_args(small_digits, tmp_path, "accum")
    argv += ["--sparseml-recipe", str(recipe), "--grad-accum-steps", "2", "--stop-epoch", "2"]
    argv += ["--model-ema", "--model-ema-decay", "0.9", "--save-last"]
    out = sparse_training.main(argv)["out_dir"]
    state = load_checkpoint(out / "vit_digits_last.pth")
    # Pruning scheduled for epoch 1 happened within epoch 1: steps_per_epoch counts updates.
    assert sparsity(pruned_weights(state)) == pytest.approx(0.25, abs=1e-3)
    ema = {k: v for k, v in state["state_dict_ema"].items() if k in pruned_weights(state)}
    for key, weight in pruned_weights(state).items():
        assert torch.all(ema[key][weight == 0] == 0), key


@pytest.mark.slow
def test_wandb_offline_run_writes_files(small_digits, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = write(tmp_path / "gm.yaml", GM_RECIPE)
    argv = base_args(small_digits, tmp_path, "wb")
    argv += ["--sparseml-recipe", str(recipe), "--stop-epoch", "2"]
    out = sparse_training.main([*argv, "--log-wandb", "--log-param-histogram"])["out_dir"]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    assert (runs[0] / "files" / "gm.yaml").is_file()


def test_missing_wandb_is_a_clear_error(monkeypatch, tmp_path):
    from utils.logging_utils import init_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)
    args = sparse_training.parse_args(["--log-wandb"])
    with pytest.raises(SetupError, match="pip install wandb"):
        init_wandb(args, tmp_path, None)


# ----- launchers ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_ranks_identical_masks(run_script, small_digits, tmp_path):
    recipe = write(tmp_path / "gm_lr.yaml", GM_RECIPE + LR_LINES)
    argv = base_args(small_digits, tmp_path, "ddp")
    argv += ["--sparseml-recipe", str(recipe), "--epochs", "50", "--save-last", "-b", "25"]
    result = run_script("sparse_training.py", argv, nproc=2, launcher="torchrun")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    for epoch in range(4):  # the recipe's 4 epochs, not --epochs 50
        assert f"Epoch {epoch}: zero patterns identical on 2 ranks" in log
    assert "Epoch 4" not in log and "DIFFER" not in log
    state = load_checkpoint(tmp_path / "ddp" / "vit_digits_last.pth")
    assert sparsity(pruned_weights(state)) == pytest.approx(0.75, abs=1e-3)
    assert len(state["rng"]) == 2
    rows = read_summary(tmp_path / "ddp" / "summary.csv")
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3] >= 0.0005  # the recipe's linear LR, not timm's


@pytest.mark.slow
@pytest.mark.dist
def test_legacy_launch_passes_local_rank(run_script, small_digits, tmp_path):
    argv = [*base_args(small_digits, tmp_path, "legacy"), "--epochs", "1"]
    result = run_script("sparse_training.py", argv, nproc=2, launcher="legacy")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_summary(tmp_path / "legacy" / "summary.csv")) == 1
    assert "Epoch 0: zero patterns identical on 2 ranks" in result.stdout + result.stderr


def test_mfac_optimizer_trains_from_the_cli(small_digits, tmp_path):
    argv = [*base_args(small_digits, tmp_path, "mfac"), "--epochs", "1"]
    argv[argv.index("adamw")] = "mfac"
    # A smoke test of the wiring; the optimizer's maths is tested in test_mfac_optimizer.py.
    result = sparse_training.main([*argv, "--opt-kwargs", "ngrads=8", "damp=0.001"])
    assert math.isfinite(result["train"]["loss"]) and math.isfinite(result["eval"]["loss"])
    with pytest.raises(SetupError, match="unknown --opt-kwargs"):
        sparse_training.main([*argv, "--opt-kwargs", "window=8"])


CAP_RECIPE = f"""
modifiers:
  - !EpochRangeModifier
    start_epoch: 0
    end_epoch: 1
  - !CAPruningModifier
    params: ['{PRUNED}']
    init_sparsity: 0.6
    final_sparsity: 0.6
    start_epoch: 0
    end_epoch: 0
    num_grads: 8
    fisher_block_size: 32
    damp: 1.0e-4
"""


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_two_ranks_cap_recipe(run_script, small_digits, tmp_path):
    recipe = write(tmp_path / "cap.yaml", CAP_RECIPE)
    argv = base_args(small_digits, tmp_path, "cap")
    argv += ["--sparseml-recipe", str(recipe), "--save-last", "-b", "25"]
    argv += ["--gs-loader", "-gb", "8", "--gs-no-aug", "--epochs", "1"]  # no LR modifier
    result = run_script("sparse_training.py", argv, nproc=2, launcher="torchrun")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Epoch 0: zero patterns identical on 2 ranks" in log
    assert "DIFFER" not in log
    # Progress and warnings from rank 0 only: one grad-sampler line, no DDP FutureWarning.
    assert log.count("8/8 samples") == 1 and "Warning" not in log, log[-3000:]
    state = load_checkpoint(tmp_path / "cap" / "vit_digits_last.pth")
    assert sparsity(pruned_weights(state)) == pytest.approx(0.6, abs=1e-3)


def test_learning_rate_modifier_drives_the_lr_and_timm_steps_aside(small_digits, tmp_path, caplog):
    """SparseML's !LearningRateModifier (a torch StepLR halving every epoch) sets the LR of a
    short run; timm's scheduler (--sched step, --lr 0.002) is off and the log says so."""
    recipe = write(
        tmp_path / "steplr.yaml",
        GM_RECIPE.replace("end_epoch: 4", "end_epoch: 3", 1).replace(
            "end_epoch: 3\n    update", "end_epoch: 2\n    update"
        )
        + """
  - !LearningRateModifier
    start_epoch: 0
    end_epoch: -1
    lr_class: StepLR
    lr_kwargs: {step_size: 1, gamma: 0.5}
    init_lr: 0.004
""",
    )
    argv = base_args(small_digits, tmp_path, "steplr") + ["--sparseml-recipe", str(recipe)]
    with caplog.at_level("INFO"):
        sparse_training.main(argv)
    rows = read_summary(tmp_path / "steplr" / "summary.csv")
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.004, 0.002, 0.001])
    assert "Recipe sets the learning rate (LearningRateModifier): timm scheduler off" in caplog.text
