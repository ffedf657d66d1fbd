"""End-to-end tests of research/one_shot_pruning.py on the offline digits data.

The model is an untrained ``vit_digits`` (fixed seed): accuracies are not asserted, the rows,
their measured sparsities, resume, the plot and the errors for bad input are. Second-order
behaviour (gradient samples, their reuse across a sweep, torchrun) is exercised with a small
diagonal-Fisher pruner registered here, so these tests do not depend on OBS/CAP being built.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import copy_digits_subset, ensure_research

ensure_research()
import one_shot_pruning as osp_script  # noqa: E402
from sparseml.compressed import SUFFIX  # noqa: E402
from sparseml.manager import ScheduledModifierManager  # noqa: E402
from sparseml.pruning import PruningModifier  # noqa: E402
from sparseml.pruning.estimators import Estimator  # noqa: E402
from sparseml.pruning.fields import BLOCKS, SAMPLING  # noqa: E402
from sparseml.pruning.updates import Scored  # noqa: E402
from sparseml.registry import modifier_names, register_modifier  # noqa: E402
from utils import one_shot_data as osd  # noqa: E402
from utils import results as res  # noqa: E402
from utils.errors import SetupError  # noqa: E402

RECIPES = Path(osp_script.__file__).parent / "recipes" / "one_shot"
PARAMS = '["re:.*blocks.*.(attn.qkv|attn.proj|mlp.fc1|mlp.fc2).weight"]'


class DiagSums(Estimator):
    """Per parameter the sum of g^2 over the samples (a test estimator of its own)."""

    def layout(self, pruner):
        return None

    def memory(self, pruner, block, m):
        return [], "nothing worth counting"

    def build(self, pruner, module, layout):
        diag = [torch.zeros(r.param.numel()) for r in pruner.refs]
        for chunk in pruner.gradient_chunks(module):
            for d, g in zip(diag, chunk):
                d += (g.cpu() ** 2).sum(0)
        return diag


@register_modifier
class DiagFisherTestPruningModifier(PruningModifier):
    """Test pruner: scores w^2 * (damp + mean g^2), i.e. a diagonal-Fisher OBS score."""

    FIELDS = {**SAMPLING, **BLOCKS}

    def estimator(self):
        return DiagSums()

    def score(self, estimate):
        return Scored(
            [
                (
                    r.param.detach().reshape(-1).cpu() ** 2 * (d / self.num_grads + self.damp)
                ).reshape(r.param.shape)
                for r, d in zip(self.refs, estimate)
            ]
        )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, digits_dir) -> Path:
    """6 train and 4 validation images per class (keeps the tests fast)."""
    return copy_digits_subset(digits_dir, tmp_path_factory.mktemp("small_digits"), 6, 4)


def _recipe(tmp: Path, body: str, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(body)
    return path


def diag_recipe(tmp: Path, name: str = "diag") -> Path:
    return _recipe(
        tmp,
        f"""pruning_modifiers:
  - !DiagFisherTestPruningModifier
    params: {PARAMS}
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 1
    update_frequency: 1
    num_grads: 6
    fisher_block_size: 32
    damp: 1.0e-6
""",
        name,
    )


def base_args(small_digits: Path, out: Path, recipe: Path, *extra: str) -> list[str]:
    return [
        "--dataset",
        "digits",
        "--data-dir",  # dashed and underscored spellings are both accepted
        str(small_digits),
        "--sparseml_recipe",
        str(recipe),
        "--output_dir",
        str(out),
        "--workers",
        "0",
        "-vb",
        "16",
        "--device",
        "cpu",
        *extra,
    ]


class ApplyCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = ScheduledModifierManager.apply

        def counting(manager, *args, **kwargs):
            self.calls += 1
            return original(manager, *args, **kwargs)

        monkeypatch.setattr(ScheduledModifierManager, "apply", counting)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, small_digits):
    """GM (global) and the diagonal-Fisher pruner at 0.5 and 0.8 into one output folder."""
    tmp = tmp_path_factory.mktemp("one_shot")
    out = tmp / "out"
    recipe = diag_recipe(tmp)
    common = ["--sparsities", "0.5", "0.8", "--save_model"]
    osp_script.main(base_args(small_digits, out, RECIPES / "gm_digits.yaml", *common))
    osp_script.main(
        base_args(small_digits, out, recipe, *common, "--gs_loader", "-gb", "16", "--gs-no-aug")
    )
    return {"out": out, "tmp": tmp, "recipe": recipe, "common": common}


def test_rows_and_measured_sparsity(sweep):
    rows = res.read_rows(sweep["out"])
    keys = [(r["method"], r["sparsity"]) for r in rows]
    assert keys == [
        ("dense", 0.0),
        ("gm", 0.5),  # named after the pruner, not the recipe file (gm_digits.yaml)
        ("gm", 0.8),
        ("diag_fisher_test", 0.5),
        ("diag_fisher_test", 0.8),
    ]
    for row in rows[1:]:
        assert row["modifier"] in (
            "GlobalMagnitudePruningModifier",
            "DiagFisherTestPruningModifier",
        )
        assert len(row["layer_sparsity"]) == 16  # 4 blocks x (qkv, proj, fc1, fc2)
        assert row["measured_sparsity"] == pytest.approx(row["sparsity"], abs=1e-4)
        assert 0.0 <= row["accuracy"] <= 100.0 and row["accuracy"] <= row["top5"]
        assert row["loss"] > 0 and row["seconds"] >= 0 and row["peak_mem_mb"] > 0
        # global thresholds: layers differ, but none is empty or untouched at 80 %
        if row["sparsity"] == 0.8:
            assert len({round(v, 3) for v in row["layer_sparsity"].values()}) > 1
    csv_lines = (sweep["out"] / res.CSV).read_text().splitlines()
    assert csv_lines[0].split(",")[:3] == ["method", "modifier", "sparsity"]
    assert len(csv_lines) == 1 + len(rows)
    assert (sweep["out"] / res.PLOT).stat().st_size > 1000


def test_saved_models_load_with_weights_only(sweep):
    path = sweep["out"] / "vit_digits_diag_fisher_test_sparsity=0.8.pth"
    state = torch.load(path, weights_only=True)
    w = state["blocks.1.mlp.fc1.weight"]
    assert isinstance(w, torch.Tensor) and 0.3 < float((w == 0).float().mean()) < 1.0
    assert not list(sweep["out"].glob(".*.tmp"))


def test_rerun_skips_rows_and_does_not_prune(sweep, small_digits, monkeypatch):
    counter = ApplyCounter(monkeypatch)
    before = (sweep["out"] / res.JSONL).read_text()
    args = base_args(small_digits, sweep["out"], sweep["recipe"], *sweep["common"], "--gs_loader")
    osp_script.main([*args, "-gb", "16", "--gs-no-aug"])
    osp_script.main(
        base_args(small_digits, sweep["out"], RECIPES / "gm_digits.yaml", *sweep["common"])
    )
    assert counter.calls == 0
    assert (sweep["out"] / res.JSONL).read_text() == before


def test_partial_sweep_resumes_and_layerwise_gm(tmp_path, small_digits, monkeypatch):
    out = tmp_path / "out"
    recipe = RECIPES / "gm_layer_digits.yaml"
    osp_script.main(base_args(small_digits, out, recipe, "--sparsities", "0.6"))
    counter = ApplyCounter(monkeypatch)
    rows = osp_script.main(base_args(small_digits, out, recipe, "--sparsities", "0.6", "0.7"))
    assert counter.calls == 1  # only 0.7 was left
    layer = {r["sparsity"]: r for r in rows if r["method"] == "gm_layer"}
    assert sorted(layer) == [0.6, 0.7]
    for s, row in layer.items():  # per-layer thresholds: every layer at the target
        assert all(v == pytest.approx(s, abs=1e-3) for v in row["layer_sparsity"].values())


def test_rerun_redoes_the_sparsities_whose_files_are_asked_for_and_missing(
    tmp_path, small_digits, monkeypatch, caplog
):
    """A row is done only with the files the run asks for: --save-compressed added on a rerun,
    or a saved model deleted since, prunes those sparsities again and writes them."""
    out, recipe = tmp_path / "out", RECIPES / "gm_layer_digits.yaml"
    osp_script.main(base_args(small_digits, out, recipe, "--sparsities", "0.6", "0.7"))
    counter = ApplyCounter(monkeypatch)
    extra = ("--sparsities", "0.6", "0.7", "--save-compressed")
    with caplog.at_level(logging.INFO):
        osp_script.main(base_args(small_digits, out, recipe, *extra))
    assert counter.calls == 2
    assert "have rows but not the files asked for" in caplog.text
    files = sorted(p.name for p in out.glob(f"*{SUFFIX}"))
    assert files == [f"vit_digits_gm_layer_sparsity={s}{SUFFIX}" for s in ("0.6", "0.7")]
    (out / files[0]).unlink()
    osp_script.main(base_args(small_digits, out, recipe, *extra))
    assert counter.calls == 3 and (out / files[0]).is_file()  # only 0.6 again
    osp_script.main(base_args(small_digits, out, recipe, *extra))
    assert counter.calls == 3  # all there: nothing to do
    kept = res.latest_rows(res.read_rows(out))
    assert sorted(s for m, s in kept if m == "gm_layer") == [0.6, 0.7]


def test_overwrite_drops_the_files_of_the_rows_it_drops(tmp_path, small_digits, monkeypatch):
    """Rows made with other settings and dropped by --overwrite take their saved models with
    them: a later --save-model rerun must not find the old model's file and skip."""
    out, recipe = tmp_path / "out", RECIPES / "gm_layer_digits.yaml"
    osp_script.main(base_args(small_digits, out, recipe, "--sparsities", "0.6", "--save-model"))
    saved = out / "vit_digits_gm_layer_sparsity=0.6.pth"
    assert saved.is_file()
    other = ("--sparsities", "0.6", "--seed", "7", "--overwrite")
    osp_script.main(base_args(small_digits, out, recipe, *other))
    assert not saved.exists()
    counter = ApplyCounter(monkeypatch)
    osp_script.main(base_args(small_digits, out, recipe, *other[:4], "--save-model"))
    assert counter.calls == 1 and saved.is_file()


@pytest.mark.parametrize("method", ["../up", "a/b", "a\\b", ".hidden", "x y"])
def test_method_names_that_are_no_plain_file_name_are_refused(method):
    with pytest.raises(SetupError, match="--method .* it names the saved files"):
        osp_script.parse_args(
            ["--sparseml_recipe", str(RECIPES / "gm_digits.yaml"), "--method", method]
        )


def test_gradients_are_reused_across_sparsities(sweep, small_digits, monkeypatch):
    calls = []
    original = osd.GradSamplerData.__call__

    def counting(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(osd.GradSamplerData, "__call__", counting)
    results = {}
    for flag in ((), ("--no-sweep-cache",)):
        out = sweep["tmp"] / f"cache_{len(flag)}"
        extra = ["--sparsities", "0.5", "0.8", "--gs_loader", "-gb", "16", "--gs-no-aug", *flag]
        rows = osp_script.main(base_args(small_digits, out, sweep["recipe"], *extra))
        results[flag] = {
            r["sparsity"]: r["loss"] for r in rows if r["method"] == "diag_fisher_test"
        }
    assert len(calls) == 1 + 2  # the sweep cache draws once; without it once per sparsity
    # The cached statistics are the ones a fresh draw gives (same seed per sparsity).
    assert results[()] == results[("--no-sweep-cache",)]


def test_cli_spellings_and_default_sparsity(sweep):
    for spelling in ("--sparseml_recipe", "--sparseml-recipe"):
        args = osp_script.parse_args([spelling, "r.yaml", "--val-batch-size", "7", "--gs-loader"])
        assert (
            args.sparseml_recipe == "r.yaml" and args.validation_batch_size == 7 and args.gs_loader
        )
        assert args.method == ""  # named after the recipe's pruner in check_recipe
    args = osp_script.parse_args(["--sparseml_recipe", str(RECIPES / "gm_digits.yaml")])
    osp_script.check_recipe(args)
    assert args.sparsities == [0.5] and args.method == "gm"
    starter = RECIPES.parent / "starter" / "resnet_one_shot.yaml"
    args = osp_script.parse_args(["--sparseml_recipe", str(starter)])
    osp_script.check_recipe(args)
    assert args.method == "cap"  # not "resnet_one_shot"
    args = osp_script.parse_args(["--sparseml_recipe", str(starter), "--method", "mine"])
    osp_script.check_recipe(args)
    assert args.method == "mine"


@pytest.mark.parametrize("value", ["1.0", "-0.1", "nan"])
def test_bad_sparsity(value, tmp_path, small_digits):
    args = base_args(
        small_digits, tmp_path, RECIPES / "gm_digits.yaml", "--sparsities", "0.5", value
    )
    with pytest.raises(SetupError, match=r"outside \[0, 1\)"):
        osp_script.main(args)


def test_bad_inputs(tmp_path, small_digits, monkeypatch):
    counter = ApplyCounter(monkeypatch)
    gm = RECIPES / "gm_digits.yaml"
    missing = base_args(tmp_path / "nope", tmp_path, gm)
    missing[1] = ""  # --dataset '' : an ImageFolder root that must exist
    with pytest.raises(SetupError, match="does not exist"):
        osp_script.main(missing)
    wrong = tmp_path / "wrong.pth"
    torch.save(osp_script.create_model("vit_digits", depth=2).state_dict(), wrong)
    with pytest.raises(SetupError, match="does not match the model"):
        osp_script.main(base_args(small_digits, tmp_path, gm, "--checkpoint_path", str(wrong)))
    no_pruner = _recipe(
        tmp_path,
        "training_modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 1\n",
        "nopr",
    )
    with pytest.raises(SetupError, match="exactly one pruning modifier"):
        osp_script.main(base_args(small_digits, tmp_path, no_pruner))
    with pytest.raises(SetupError, match="does not fit the recipe"):
        osp_script.main(
            base_args(
                small_digits, tmp_path, RECIPES / "gm_digits_2to4.yaml", "--sparsities", "0.7"
            )
        )
    assert counter.calls == 0 and not (tmp_path / res.JSONL).exists()


def test_changed_settings_need_overwrite(tmp_path, small_digits):
    out = tmp_path / "out"
    gm = RECIPES / "gm_digits.yaml"
    osp_script.main(base_args(small_digits, out, gm, "--sparsities", "0.5"))
    other = base_args(small_digits, out, gm, "--sparsities", "0.5", "--model-kwargs", "depth=2")
    with pytest.raises(SetupError, match="model_kwargs"):
        osp_script.main(other)
    rows = osp_script.main([*other, "--overwrite"])
    assert [r["settings"]["model_kwargs"] for r in rows] == [{"depth": 2}, {"depth": 2}]
    assert len(res.read_rows(out)) == 2


class FakeWandb(types.ModuleType):
    """Records what the script sends to W&B."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        self.Table = lambda columns, data: ("table", columns, data)
        self.Image = lambda path: ("image", path)

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))

    def log(self, values):
        self.calls.append(("log", values))

    def finish(self):
        self.calls.append(("finish", None))


def test_wandb_gets_a_row_per_sparsity_and_the_table(tmp_path, small_digits, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    gm = RECIPES / "gm_digits.yaml"
    osp_script.main(
        base_args(small_digits, tmp_path, gm, "--sparsities", "0.5", "0.7", "--log_wandb")
    )
    kinds = [c[0] for c in fake.calls]
    assert kinds == ["init", "log", "log", "log", "finish"]
    assert [c[1]["sparsity"] for c in fake.calls[1:3]] == [0.5, 0.7]
    table = fake.calls[3][1]["results"]
    assert [row[:2] for row in table[2]] == [["dense", 0.0], ["gm", 0.5], ["gm", 0.7]]
    assert "!GlobalMagnitudePruningModifier" in fake.calls[0][1]["config"]["recipe_text"]


def test_results_survive_a_torn_line(tmp_path):
    res.append_row(tmp_path, {"method": "a", "sparsity": 0.5, "accuracy": 1.0})
    with (tmp_path / res.JSONL).open("a") as f:
        f.write('{"method": "a", "spars')  # killed mid-write
    res.append_row(tmp_path, {"method": "a", "sparsity": 0.6, "accuracy": 2.0})
    assert [r["sparsity"] for r in res.read_rows(tmp_path)] == [0.5, 0.6]
    assert "0.600" in res.format_table(res.read_rows(tmp_path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    osp_script.main(argv)


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_sample_gradients_and_rank0_writes(tmp_path, small_digits):
    out = tmp_path / "out"
    extra = ["--sparsities", "0.5", "0.8", "--gs_loader", "-gb", "16", "--gs-no-aug"]
    argv = base_args(small_digits, out, diag_recipe(tmp_path), *extra)
    torch.multiprocessing.spawn(_rank_main, args=(2, _free_port(), argv), nprocs=2, join=True)
    rows = res.read_rows(out)
    assert [(r["method"], r["sparsity"], r["world_size"]) for r in rows] == [
        ("dense", 0.0, 2),
        ("diag_fisher_test", 0.5, 2),
        ("diag_fisher_test", 0.8, 2),
    ]
    assert rows[0]["samples"] == 40  # each rank evaluated its shard, counts summed
    for row in rows[1:]:
        assert row["measured_sparsity"] == pytest.approx(row["sparsity"], abs=1e-4)


@pytest.mark.parametrize("method", ["obs", "cap", "fast_cap", "woodfisher", "woodtaylor"])
def test_second_order_recipes_run(method, tmp_path, small_digits):
    recipe = RECIPES / f"{method}_digits.yaml"
    text = recipe.read_text()
    tag = re.search(r"!(\w+)", text).group(1)
    # full-Fisher recipes have no block size to override
    variables = "num_grads=16" + (",fisher_block_size=32" if "\nfisher_block_size:" in text else "")
    if tag not in modifier_names():
        pytest.skip(f"{tag} is not registered yet (sparseml/modifiers/{method}.py missing)")
    extra = ["--sparsities", "0.5", "0.9", "--gs_loader", "-gb", "16"]
    rows = osp_script.main(
        base_args(
            small_digits,
            tmp_path,
            recipe,
            *extra,
            "--recipe_variables",
            variables,
        )
    )
    pruned = [r for r in rows if r["method"] == method]
    assert [r["sparsity"] for r in pruned] == [0.5, 0.9]
    for row in pruned:
        assert row["measured_sparsity"] == pytest.approx(row["sparsity"], abs=2e-3)


def test_second_order_recipe_without_gs_loader_samples_by_itself(tmp_path, small_digits):
    """The script sets up the grad sampler (batch: -gb) when the recipe needs gradients."""
    rows = osp_script.main(
        base_args(small_digits, tmp_path, diag_recipe(tmp_path), "--sparsities", "0.5", "-gb", "8")
    )
    assert [r["sparsity"] for r in rows if r["method"] != "dense"] == [0.5]


def test_sweep_warns_when_num_grads_exceeds_the_loader_and_shows_progress(
    tmp_path, small_digits, caplog, monkeypatch
):
    """60 training images in batches of 16 hold 3 full batches (the training loader drops the
    last): 6 samples repeat them, and the one-shot path says so, as training does; the sweep
    logs its progress with an ETA."""
    extra = ["--sparsities", "0.5", "0.8", "--gs_loader", "-gb", "16", "--gs-no-aug"]
    monkeypatch.setenv("SPARSEML_PROGRESS_QUIET", "0")  # the tiny phases take milliseconds
    with caplog.at_level("INFO"):
        osp_script.main(base_args(small_digits, tmp_path, diag_recipe(tmp_path), *extra))
    assert "num_grads 6 exceeds the 3 batches the grad sampler's loader holds" in caplog.text
    assert "diag_fisher_test sweep: 1/2 sparsities (50%" in caplog.text and "ETA" in caplog.text
    assert "diag_fisher_test sweep: 2/2 sparsities in " in caplog.text
