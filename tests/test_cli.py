"""One command line for both research scripts: timm's names, CAP's spellings as hidden aliases."""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RESEARCH, copy_digits_subset, ensure_research

ensure_research()
import torch  # noqa: E402

import one_shot_pruning as osp_script  # noqa: E402
import sparse_training  # noqa: E402
from utils import cli, options, training  # noqa: E402
from utils.errors import SetupError  # noqa: E402
from utils.summary import read_summary  # noqa: E402

PARSERS = {
    "sparse_training.py": (cli.build_parser, cli.parse_args),
    "one_shot_pruning.py": (cli.build_one_shot_parser, cli.parse_one_shot_args),
}
GM_RECIPE = """
sparsity: 0.5
modifiers:
  - !EpochRangeModifier
    start_epoch: 0
    end_epoch: 1
  - !GlobalMagnitudePruningModifier
    params: ['re:blocks\\.\\d+\\.mlp\\.fc\\d\\.weight']
    init_sparsity: eval(sparsity)
    final_sparsity: eval(sparsity)
    start_epoch: 0
    end_epoch: 0
    update_frequency: -1
"""


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, digits_dir) -> Path:
    return copy_digits_subset(digits_dir, tmp_path_factory.mktemp("cli_digits"), 10, 5)


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "gm.yaml"
    path.write_text(GM_RECIPE)
    return path


def alias_table(tmp_path: Path) -> list[tuple[list[str], dict]]:
    """(CAP spelling on the command line, the timm destinations it must set)."""
    weights = tmp_path / "dense.pth"
    weights.write_bytes(b"")
    run = tmp_path / "runs" / "sweep1"
    return [
        (["--checkpoint_path", str(weights)], {"initial_checkpoint": str(weights)}),
        (["--initial_checkpoint", str(weights)], {"initial_checkpoint": str(weights)}),
        (["--sparseml_recipe", "cap.yaml"], {"sparseml_recipe": "cap.yaml"}),
        (["--recipe_variables", "num_grads=64"], {"recipe_variables": "num_grads=64"}),
        (["-gb", "12"], {"gs_batch_size": 12}),
        (["--grad_sampler_batch_size", "12"], {"gs_batch_size": 12}),
        (["--gs_batch_size", "12"], {"gs_batch_size": 12}),
        (["--gs_loader", "-gb", "3"], {"gs_loader": True, "gs_batch_size": 3}),
        (["--gs_no_aug"], {"gs_no_aug": True}),
        (["--val_batch_size", "7"], {"validation_batch_size": 7}),
        (["--validation_batch_size", "7"], {"validation_batch_size": 7}),
        (["--batch_size", "9"], {"batch_size": 9}),
        (["--data_dir", "/data/x"], {"data_dir": "/data/x"}),
        (["--num_classes", "5"], {"num_classes": 5}),
        (["--img_size", "48"], {"img_size": 48}),
        (["--model_kwargs", "depth=1"], {"model_kwargs": {"depth": 1}}),
        (["--log_wandb"], {"log_wandb": True}),
        (["--wandb_project", "p"], {"wandb_project": "p"}),
        (["--output_dir", str(run)], {"output": str(run.parent), "experiment": "sweep1"}),
    ]


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_cap_spellings_map_to_timm_names(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parse = PARSERS[script][1]
    base = ["--sparseml-recipe", "r.yaml"] if script == "one_shot_pruning.py" else []
    for argv, expected in alias_table(tmp_path):
        args = parse([*base, *argv])
        got = {key: getattr(args, key) for key in expected}
        assert got == expected, (script, argv)
        assert not hasattr(args, "checkpoint_path") and not hasattr(args, "grad_sampler_batch_size")
    # --output_dir is the exact folder: the results land there, in both scripts.
    args = parse([*base, "--output_dir", str(tmp_path / "exact")])
    assert Path(args.output) / args.experiment == tmp_path / "exact"
    with pytest.raises(SetupError, match="--output_dir is the exact run folder"):
        parse([*base, "--output_dir", "a/b", "--experiment", "c"])


def test_config_keys_take_cap_spellings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("val_batch_size: 11\ngrad_sampler_batch_size: 5\nsparseml_recipe: r.yaml\n")
    for parse in (cli.parse_args, cli.parse_one_shot_args):
        args = parse(["--config", str(config)])
        assert (args.validation_batch_size, args.gs_batch_size) == (11, 5)
        assert args.sparseml_recipe == "r.yaml"


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_help_lists_each_option_once_with_default_fast(script):
    code = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(RESEARCH)!r})\n"
        f"sys.argv = [{str(RESEARCH / script)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(RESEARCH / script)!r}, run_name='__main__')\n"
        "except SystemExit as err:\n"
        "    assert err.code in (0, None), err.code\n"
        "print('HEAVY', 'torch' in sys.modules, 'timm' in sys.modules)\n"
    )
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    print(f"{script} --help: {seconds:.2f} s")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("HEAVY False False")  # parsed before torch and timm
    assert seconds < 5.0  # about 0.1 s here; the margin absorbs a loaded machine
    text = done.stdout
    parser = PARSERS[script][0]()
    shown = [s for a in parser._actions for s in a.option_strings if s not in hidden(a)]
    # The invocation part of each option line: "-gb GS_BATCH_SIZE, --gs-batch-size GS_BATCH_SIZE".
    invocations = [
        ln.strip().split("  ")[0].replace(",", " ").split()
        for ln in text.split("\noptions:", 1)[1].splitlines()
        if ln.lstrip().startswith("-")
    ]
    for name in shown:  # each listed once: in the options list, not also as an alias
        assert sum(name in words for words in invocations) == 1, name
    listed = [a for a in parser._actions if a.option_strings and a.help != "==SUPPRESS=="]
    assert len(invocations) == len(listed)  # one line per option, no alias line
    for alias in ("--checkpoint_path", "--output_dir", "--grad_sampler_batch_size", "--data_dir"):
        assert alias not in text
    formatter = options.HelpFormatter("x")
    for action in parser._actions:
        if action.help != "==SUPPRESS==" and action.dest != "help" and action.option_strings:
            assert "default" in formatter._get_help_string(action), action.option_strings


def hidden(action) -> tuple[str, ...]:
    if action.help == "==SUPPRESS==":
        return tuple(action.option_strings)
    return getattr(action, "hidden_aliases", ())


def test_recipe_variables_in_both_scripts(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value, expected in (("", 0.5), ("sparsity=0.75", 0.75)):
        argv = ["--sparseml-recipe", str(recipe), "--recipe-variables", value]
        manager = sparse_training.load_recipe(cli.parse_args(argv))
        assert manager.pruning_modifiers[0].final_sparsity == expected
        args = osp_script.parse_args(argv)
        osp_script.check_recipe(args)
        assert args.sparsities == [expected]


def test_img_size_sets_vit_img_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--model-kwargs", "depth=1", "--num-classes", "10"]
    args = cli.parse_args(["--model", "vit_digits", "--img-size", "48", *common])
    model = training.build_model(args)
    assert tuple(model.patch_embed.img_size) == (48, 48)
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 10)  # timm asserted here before
    # An img_size in --model-kwargs wins over --img-size.
    argv = ["--model", "vit_digits", "--img-size", "48", "--model-kwargs", "img_size=40"]
    model = training.build_model(cli.parse_args(argv))
    assert tuple(model.patch_embed.img_size) == (40, 40)
    # Models without an img_size argument are built as before (no unexpected keyword).
    argv = ["--model", "resnet_digits", "--img-size", "48", "--sparseml-recipe", "r.yaml"]
    model, _ = osp_script.build_model(cli.parse_one_shot_args(argv))
    assert model(torch.zeros(1, 3, 48, 48)).shape == (1, 10)
    argv = ["--model", "vit_digits", "--img-size", "48", "--sparseml-recipe", "r.yaml", *common]
    model, _ = osp_script.build_model(cli.parse_one_shot_args(argv))
    assert tuple(model.patch_embed.img_size) == (48, 48)


def test_unknown_model_suggests_close_names(run_script, small_digits, tmp_path):
    with pytest.raises(SetupError, match=r"--model 'vit_digit' is not a timm model: did you mean "):
        training.build_model(cli.parse_args(["--model", "vit_digit"]))
    argv = [small_digits, "--dataset", "", "--model", "resnet_digit", "--workers", "0"]
    result = run_script("sparse_training.py", [*argv, "--output", tmp_path / "out"])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "did you mean resnet_digits" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_recipe_epoch_range_overrides_epochs(recipe, small_digits, tmp_path, caplog):
    argv = [
        str(small_digits), "--dataset", "", "--model", "vit_digits", "--model-kwargs", "depth=1",
        "-b", "50", "--workers", "0", "--epochs", "300", "--warmup-epochs", "0",
        "--sparseml-recipe", str(recipe), "--output", str(tmp_path), "--experiment", "run",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="sparse_training"):
        sparse_training.main(argv)
    assert "sets the run length: 1 epochs (--epochs 300 ignored)" in caplog.text
    assert len(read_summary(tmp_path / "run" / "summary.csv")) == 1


PARSE_ONLY = """#!/usr/bin/env bash
# Stands in for python: parses the script's arguments with its parser and prints the result.
exec {python} - "$@" <<'PY'
import json, sys
sys.path.insert(0, {research!r})
from utils import cli
parse = cli.parse_one_shot_args if "one_shot" in sys.argv[1] else cli.parse_args
args = parse(sys.argv[2:])
keys = ("output", "experiment", "initial_checkpoint", "sparseml_recipe", "recipe_variables")
print("PARSED", json.dumps({{k: getattr(args, k) for k in keys}}))
PY
"""


def test_launchers_argument_lists_parse(tmp_path):
    """Both launchers call the scripts with options the parsers accept, under one root."""
    fake = tmp_path / "python"
    fake.write_text(PARSE_ONLY.format(python=sys.executable, research=str(RESEARCH)))
    fake.chmod(0o755)
    dense = tmp_path / "dense.pth"
    dense.write_bytes(b"")
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "HOME": str(tmp_path)}
    one_shot = {**env, "CHECKPOINT": str(dense), "METHODS": "gm cap", "NUM_GRADS": "8"}
    one_shot["OUTPUT"] = str(tmp_path / "out")
    done = subprocess.run(
        ["bash", str(RESEARCH / "run_one_shot_pruning.sh")], env=one_shot, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(ln.split(" ", 1)[1]) for ln in done.stdout.splitlines() if "PARSED" in ln]
    assert len(rows) == 2
    for row in rows:
        assert Path(row["output"]) == tmp_path / "out" / "one_shot"
        assert row["experiment"] == "vit_digits_digits"
        assert row["initial_checkpoint"] == str(dense)
    assert rows[1]["recipe_variables"] == "num_grads=8"  # cap declares num_grads, gm does not
    gradual = {**env, "LAUNCHER": "python", "OUTPUT": str(tmp_path / "out"), "EXPERIMENT": "g"}
    done = subprocess.run(
        ["bash", str(RESEARCH / "run_gradual_pruning.sh")], env=gradual, capture_output=True,
        text=True, timeout=60, cwd=RESEARCH.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout.split("PARSED ", 1)[1])
    assert (Path(row["output"]), row["experiment"]) == (tmp_path / "out" / "train", "g")


def test_resume_command_of_an_output_dir_run_parses(tmp_path, monkeypatch):
    """The printed resume command replaces CAP's --output_dir instead of contradicting it."""
    from utils import faults

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs" / "r1"
    folder.mkdir(parents=True)
    last = folder / "vit_digits_last.pth"
    last.write_bytes(b"")
    argv = ["sparse_training.py", "--output_dir", str(folder), "--model", "vit_digits"]
    command = shlex.split(faults.resume_command(argv, last, folder, env={}))
    args = cli.parse_args(command[2:])
    assert (Path(args.output) / args.experiment, args.resume) == (folder, str(last))


@pytest.mark.parametrize("option", ["--lr", "--momentum", "--weight-decay", "--clip-grad"])
def test_negative_optimizer_settings_are_refused(option):
    """A negative --clip-grad would flip every gradient's sign; a negative lr or momentum
    crashed inside timm."""
    from utils.cli import parse_args
    from utils.errors import SetupError

    with pytest.raises(SetupError, match=f"{option} -1.0: must be a number >= 0"):
        parse_args(["--dataset", "digits", option, "-1"])
