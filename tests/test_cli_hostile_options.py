"""Hostile command lines: each bad option or split is one ``error:`` line, exit status 2,
before any training; the allowed values come from timm and torch where they keep a list."""

from __future__ import annotations

import contextlib
import math
import re
import shutil
from pathlib import Path

import pytest

from conftest import copy_digits_subset, ensure_research

ensure_research()

import torch  # noqa: E402
from timm.data.dataset_factory import _search_split  # noqa: E402
from timm.scheduler import create_scheduler_v2, scheduler_kwargs  # noqa: E402

from utils.cli import SCHEDULERS, parse_args, parse_one_shot_args  # noqa: E402
from utils.data import check_splits, create_datasets  # noqa: E402
from utils.engine import validate  # noqa: E402
from utils.errors import SetupError  # noqa: E402
from utils.training import build_scheduler  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "research/recipes/one_shot/gm_digits.yaml"


@pytest.fixture(scope="module")
def small(digits_dir, tmp_path_factory) -> Path:
    return copy_digits_subset(digits_dir, tmp_path_factory.mktemp("hostile") / "digits", 4, 2)


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [str(data), "--dataset", "", "--model", "vit_digits", "--model-kwargs", "depth=1",
            "-b", "16", "--workers", "0", "--output", str(out), "--epochs", "1", *extra]  # fmt: skip


def one_shot_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--dataset", "", "--model", "vit_digits", "--model-kwargs",
            "depth=1", "-b", "16", "--workers", "0", "--device", "cpu", "--output", str(out),
            "--sparseml-recipe", str(RECIPE), "--sparsities", "0.5", *extra]  # fmt: skip


# (extra arguments, what the one-line error must name: option, value, allowed values)
TRAINING_CASES = [
    (["--val-split", "valdation"], r"--val-split 'valdation'.*train, val"),
    (["--train-split", "nope"], r"--train-split 'nope'.*train, val"),
    (["--opt", "nope"], r"--opt 'nope' is not a timm optimizer"),
    (["--opt", "adamw", "--opt-kwargs", "foo=1"], r"--opt-kwargs foo .*AdamW takes .*amsgrad"),
    (["--opt", "adamw", "--opt-kwargs", "amsgrad='x'"], r"amsgrad='x' .*takes bool"),
    (["--opt-kwargs", "lr=1"], r"--opt-kwargs lr is not allowed: --lr sets it"),
    (["--sched", "nope"], r"--sched 'nope' .*cosine"),
    (["--device", "bogus"], r"--device 'bogus' .*cpu, cuda"),
    (["--seed", "-1"], r"--seed -1 .*\[0, "),
    (["--seed", str(2**32)], r"--seed 4294967296 .*\[0, "),
    (["--img-size", "0"], r"--img-size 0 .*>= 1"),
    (["--input-size", "3", "0", "0"], r"--input-size 3 0 0 .*>= 1"),
    (["--crop-pct", "-1"], r"--crop-pct -1.0 .*> 0"),
    (["--in-chans", "0"], r"--in-chans 0 .*>= 1"),
    (["--model-kwargs", "depth=abc"], r"--model-kwargs depth='abc' .*int for depth"),
    (["--smoothing", "1.5"], r"--smoothing 1.5 .*\[0, 1\)"),
    (["--class-map", "/nonexistent.txt"], r"--class-map /nonexistent.txt does not exist"),
    (["--lr-base-size", "0"], r"--lr-base-size 0 .*>= 1"),
    (["--interpolation", "bogus"], r"--interpolation 'bogus' .*bicubic, bilinear"),
    (["--interpolation", "random"], r"--interpolation 'random' .*bicubic"),
    (["--train-interpolation", "bogus"], r"--train-interpolation 'bogus' .*random"),
    (["--aa", "bogus"], r"--aa 'bogus' .*rand-"),
    (["--gp", "bogus"], r"--gp 'bogus' .*'avg'.*global_pool"),
    (["--aug-repeats", "-1"], r"--aug-repeats -1.0 .*>= 0"),
    (["--cutmix-minmax", "0.9", "0.1"], r"--cutmix-minmax 0.9 0.1 .*MIN < MAX"),
    (["--cutmix-minmax", "0.5"], r"--cutmix-minmax 0.5 .*MIN MAX"),
    (["--eval-metric", "nope"], r"--eval-metric 'nope' .*top1, top5, loss"),
    (["--lr", "inf"], r"--lr inf .*finite"),
    (["--lr", "nan"], r"--lr nan .*finite"),
    (["--warmup-lr=-inf"], r"--warmup-lr -inf .*finite"),
    (["--scale", "0.08", "inf"], r"--scale inf .*finite"),
]


@pytest.mark.parametrize(
    ("extra", "message"), TRAINING_CASES, ids=[" ".join(e) for e, _ in TRAINING_CASES]
)
def test_bad_training_option_is_one_setup_error(small, tmp_path, extra, message):
    with pytest.raises(SetupError, match=message):
        parse_args(train_argv(small, tmp_path, *extra))


@pytest.mark.parametrize(
    "extra",
    [
        ["--opt", "adamw", "--opt-kwargs", "amsgrad=True", "eps=1e-6"],
        ["--opt", "lookahead_adam"],
        ["--opt", "mfac", "--opt-kwargs", "ngrads=8"],
        ["--gp", "avg", "--aa", "rand-m9-mstd0.5", "--train-interpolation", "random"],
        ["--interpolation", "bicubic", "--smoothing", "0", "--cutmix-minmax", "0.2", "0.8"],
        ["--val-split", "val", "--train-split", "training", "--sched", "step"],
        ["--model-kwargs", "depth=2", "img_size=[32, 32]", "--device", "cpu", "--seed", "0"],
    ],
    ids=lambda v: " ".join(v),
)
def test_good_training_options_still_parse(small, tmp_path, extra):
    parse_args(train_argv(small, tmp_path, *extra))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seed", "-1"], r"--seed -1 "),
        (["--val-split", "valdation"], r"--val-split 'valdation'.*train, val"),
        (["--device", "bogus"], r"--device 'bogus'"),
        (["--model-kwargs", "depth=abc"], r"depth='abc'"),
        (["--img-size", "0"], r"--img-size 0 "),
    ],
    ids=["seed", "val-split", "device", "model-kwargs", "img-size"],
)
def test_bad_one_shot_option_is_one_setup_error(small, tmp_path, extra, message):
    with pytest.raises(SetupError, match=message):
        parse_one_shot_args(one_shot_argv(small, tmp_path, *extra))


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("model_kwargs: 5\n", r"model_kwargs: 5 .*--model-kwargs: give a mapping"),
        ("epochs: [1]\n", r"epochs: \[1\] .*--epochs: give an int"),
        ("scale: 0.5\n", r"scale: 0.5 .*--scale: give a list of float"),
        ("amp: 'yes'\n", r"amp: 'yes' .*--amp: give true or false"),
        ("lr: .inf\n", r"--lr inf .*finite"),
    ],
)
def test_bad_config_values_name_key_and_option(small, tmp_path, yaml, message):
    config = tmp_path / "c.yaml"
    config.write_text(yaml)
    with pytest.raises(SetupError, match=message):
        parse_args(train_argv(small, tmp_path, "--config", str(config)))


def test_malformed_config_yaml_is_one_line_with_its_position(small, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 3\nscale: [0.5, 1\n")
    with pytest.raises(SetupError) as err:
        parse_args(train_argv(small, tmp_path, "--config", str(config)))
    assert "\n" not in str(err.value) and "line 3, column 1" in str(err.value)


def test_config_values_of_the_right_kind_still_load(small, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_kwargs: {depth: 2}\nepochs: '3'\nscale: [0.5, 1]\namp: false\n")
    args = parse_args(train_argv(small, tmp_path, "--config", str(config)))
    assert args.model_kwargs == {"depth": 1}  # the command line wins
    assert args.scale == [0.5, 1] and args.amp is False


# ----- the allowed lists are timm's and the evaluation's own --------------------------------


def test_every_listed_scheduler_is_one_timm_builds(small, tmp_path):
    """Each name builds as training.build_training builds it (the script's defaults)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    for name in SCHEDULERS:
        args = parse_args(train_argv(small, tmp_path, "--sched", name, "--epochs", "300"))
        create_scheduler_v2(opt, **scheduler_kwargs(args), updates_per_epoch=1)
        build_scheduler(args, opt, 1)


def test_decay_phase_defaults_follow_the_scheduler(small, tmp_path):
    """--decay-epochs left out: step decays every 90 epochs, wsd over the last 20% of the
    schedule after the warmup (a fixed 90 made wsd and rsqrt fail below 95 epochs)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    step, _ = build_scheduler(parse_args(train_argv(small, tmp_path, "--sched", "step")), opt, 1)
    assert step.decay_t == 90
    args = parse_args(train_argv(small, tmp_path, "--sched", "wsd", "--epochs", "30"))
    wsd, epochs = build_scheduler(args, opt, 1)
    assert (wsd.decay_t, epochs) == (5, 30)  # 20% of the 25 epochs after the 5 of warmup


@pytest.mark.parametrize("sched", ["wsd", "rsqrt"])
@pytest.mark.parametrize(
    ("extra", "shown"),
    [(["--epochs", "1"], "--decay-epochs 0.2 (the default)"),
     (["--epochs", "20", "--decay-epochs", "40"], "--decay-epochs 40")],
)  # fmt: skip
def test_decay_phase_that_does_not_fit_is_one_setup_error(small, tmp_path, sched, extra, shown):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    args = parse_args(train_argv(small, tmp_path, "--sched", sched, *extra))
    with pytest.raises(
        SetupError, match=rf"--sched {sched} with .*{re.escape(shown)} is not allowed"
    ):
        build_scheduler(args, opt, 1)


def test_eval_metrics_are_those_validate_reports(small, tmp_path):
    args = parse_args(train_argv(small, tmp_path))
    args.distributed = False
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    loader = [(torch.zeros(2, 3, 2, 2), torch.tensor([0, 1]))]
    metrics = validate(
        model, loader, args, device=torch.device("cpu"), amp_autocast=contextlib.nullcontext
    )
    from utils.cli import EVAL_METRICS

    assert sorted(metrics) == sorted(EVAL_METRICS)
    assert all(math.isfinite(v) for v in metrics.values())


# ----- split folders -------------------------------------------------------------------------


def test_flat_root_and_synonyms_stay_allowed(small, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(small / "train", flat)  # class folders at the root, no split folders
    check_splits("", str(flat), {"--train-split": "train", "--val-split": "validation"})
    check_splits("", str(small), {"--train-split": "training", "--val-split": "eval"})
    assert Path(_search_split(str(small), "eval")) == small / "val"


def test_split_typo_is_refused_when_datasets_are_opened(small, tmp_path):
    args = parse_args(train_argv(small, tmp_path))
    args.val_split = "valdation"  # e.g. a digits tree written after the options were checked
    with pytest.raises(SetupError, match=r"--val-split 'valdation'.*train, val"):
        create_datasets(args)


@pytest.mark.parametrize(
    ("script", "argv"),
    [
        ("one_shot_pruning.py", lambda d, o: one_shot_argv(d, o, "--val-split", "valdation")),
        ("sparse_training.py", lambda d, o: train_argv(d, o, "--train-split", "nope")),
        ("sparse_training.py", lambda d, o: train_argv(d, o, "--opt", "nope")),
    ],
    ids=["one-shot-val-split", "training-train-split", "training-opt"],
)
def test_end_to_end_one_error_line_exit_2(small, tmp_path, run_script, script, argv):
    out = tmp_path / "out"
    done = run_script(script, argv(small, out), timeout=120)
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: --"), lines
    assert not out.exists() or not any(out.rglob("*.pth"))  # nothing trained


@pytest.mark.parametrize(
    "config", sorted((Path(__file__).resolve().parents[1] / "research/configs").glob("*.yaml"))
)
def test_every_shipped_config_passes_the_checks(small, tmp_path, config):
    """The option checks refuse no shipped hyper-parameter file (their models included)."""
    args = parse_args([str(small), "--dataset", "", "--config", str(config), "--output",
                       str(tmp_path)])  # fmt: skip
    assert args.model


def test_keyword_timm_refuses_by_assert_is_one_setup_error(small, tmp_path):
    """timm checks ``global_pool`` and other keywords with ``assert``: a value the type hint
    allows (ResNet takes any ``str``) but the model family lacks is one error naming the
    options and timm's reason, not a traceback."""
    from utils.models import build_model

    args = parse_args(train_argv(small, tmp_path, "--model", "resnet_digits", "--gp", "bogus"))
    args.model_kwargs = {}
    with pytest.raises(SetupError, match=r"cannot build model .*global_pool='bogus'.*pool type"):
        build_model(args)


@pytest.mark.parametrize("sched", ["step", "wsd"])
@pytest.mark.parametrize("decay", ["0", "-1"])
def test_a_decay_period_that_is_not_positive_is_refused(small, tmp_path, sched, decay):
    """step with --decay-epochs 0 divided by zero, and with -1 grew the LR 10x an epoch."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    args = parse_args(train_argv(small, tmp_path, "--sched", sched, "--decay-epochs", decay))
    with pytest.raises(SetupError, match=rf"--decay-epochs {decay} is not allowed .* must be > 0"):
        build_scheduler(args, opt, 1)
