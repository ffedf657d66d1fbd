"""The benchmarks (research/bench/run_benchmarks.sh) and the Fashion-MNIST data layer.

No test needs the Debian package: the data are synthetic files in the original idx format,
passed through ``--data-dir`` or ``FMNIST_DIR`` (the benchmark's injectable data source).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, ensure_research

ensure_research()
from utils import fmnist  # noqa: E402
from utils.data import open_split, resolve_data_dir  # noqa: E402
from utils.errors import SetupError  # noqa: E402


def write_fmnist(root: Path, train: int = 200, test: int = 100, seed: int = 0) -> Path:
    """Four idx.gz files like the real ones: 28x28 uint8 images, labels 0-9 (class-dependent
    brightness, so a model can learn something)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 64, size=(n, 28, 28)) + labels[:, None, None] * 19
        fmnist.write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images.astype(np.uint8))
        fmnist.write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


# ----- idx reader and data layer -------------------------------------------------------------
def test_idx_reader_reads_the_original_format(tmp_path: Path) -> None:
    root = write_fmnist(tmp_path / "fm", train=30, test=20)
    raw = gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes())
    assert raw[:4] == bytes([0, 0, 8, 3])  # the format's magic number: ubyte, 3 dims
    assert int.from_bytes(raw[4:8], "big") == 30 and int.from_bytes(raw[8:12], "big") == 28
    images, labels = fmnist.load_split(root, "train")
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images.reshape(-1), np.frombuffer(raw[16:], dtype=np.uint8))
    assert labels.tolist() == [i % 10 for i in range(30)]
    # uncompressed files are read too
    plain = tmp_path / "plain-labels-idx1-ubyte"
    fmnist.write_idx(plain, np.arange(7, dtype=np.uint8))
    assert fmnist.read_idx(plain).tolist() == list(range(7))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: raw[:-5], "truncated or corrupt"),
        (lambda raw: bytes([0, 0, 9]) + raw[3:], "bad magic number"),
        (lambda raw: raw[:10], "header cut short"),
    ],
)
def test_idx_reader_refuses_damaged_files(tmp_path: Path, damage, message: str) -> None:
    root = write_fmnist(tmp_path / "fm", train=10, test=10)
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(damage(gzip.decompress(path.read_bytes()))))
    with pytest.raises(SetupError, match=message):
        fmnist.load_split(root, "train")


def test_missing_data_names_the_install_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FMNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(SetupError, match="apt-get install dataset-fashion-mnist") as err:
        resolve_data_dir("fashion_mnist", None)
    assert "train-images-idx3-ubyte.gz" in str(err.value)
    (tmp_path / "part").mkdir()
    write_fmnist(tmp_path / "part")
    (tmp_path / "part" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SetupError, match="lacks t10k-labels-idx1-ubyte.gz;"):
        resolve_data_dir("fashion_mnist", str(tmp_path / "part"))


def test_data_layer_splits(tmp_path: Path, monkeypatch) -> None:
    root = write_fmnist(tmp_path / "fm", train=40, test=20)
    monkeypatch.setenv("FMNIST_DIR", str(root))  # the default location when --data-dir is absent
    name, found = resolve_data_dir("fashion_mnist", None)
    assert (name, found) == ("fashion_mnist", str(root))
    train = open_split(name, found, "train")
    val = open_split(name, found, "validation")  # timm's default --val-split: the test set
    assert (len(train), len(val), len(open_split(name, found, "val"))) == (40, 20, 20)
    img, label = val[3]
    assert img.mode == "RGB" and img.size == (28, 28) and label == 3
    with pytest.raises(SetupError, match="split 'holdout' unknown"):
        open_split(name, found, "holdout")


# ----- recipes ---------------------------------------------------------------------------------
FMNIST_RECIPES = sorted((ROOT / "research" / "recipes").glob("*/*_fmnist*.yaml"))


@pytest.mark.parametrize("path", FMNIST_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fmnist_recipes_prune_the_blocks_of_both_models(path: Path) -> None:
    """One regex serves the ViT (qkv, proj, fc1, fc2 of every block) and the ResNet (the convs
    of every residual block; stem, downsample and head stay dense)."""
    import timm

    import utils.models  # noqa: F401  (registers vit_fmnist, resnet_fmnist)
    from sparseml.params import select_params
    from sparseml.pruning import PruningModifier
    from sparseml.pytorch.optim import ScheduledModifierManager

    modifiers = ScheduledModifierManager.from_yaml(str(path)).modifiers
    (pruner,) = [m for m in modifiers if isinstance(m, PruningModifier)]
    vit, resnet = timm.create_model("vit_fmnist"), timm.create_model("resnet_fmnist")
    vit_names = [r.name for r in select_params(vit, pruner.params, "test")]
    assert len(vit_names) == 4 * len(vit.blocks) and all("blocks." in n for n in vit_names)
    res_names = [r.name for r in select_params(resnet, pruner.params, "test")]
    assert sorted(res_names) == sorted(
        f"layer{i}.0.conv{j}.weight" for i in range(1, 5) for j in (1, 2)
    )


# ----- the benchmark script ----------------------------------------------------------------------
def bench(tmp_path: Path, fm: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    full.update(PYTHON=sys.executable, FMNIST_DIR=str(fm), RESULTS=str(tmp_path / "results"))
    full.update(THREADS="1", KERNEL_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", **env)
    cmd = ["bash", "research/bench/run_benchmarks.sh", *args]
    return subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)


def test_benchmark_without_data_exits_2_naming_the_package(tmp_path: Path) -> None:
    done = bench(tmp_path, tmp_path / "absent", "--quick", STEPS="quality")
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "apt-get install dataset-fashion-mnist" in errors[0]
    assert "Traceback" not in done.stderr
    assert bench(tmp_path, tmp_path, "--fast").returncode == 2  # unknown option


TINY = {
    "METHODS": "cap",
    "QUALITY_ARGS": "--train-limit 0 --val-limit 0 --epochs 1 --sparsities 0.5 0.9 --seeds 0 1 "
    "--num-grads 8 --gs-batch-size 8 --nm-methods --gradual-methods gm --gradual-epochs 1 "
    "--holdout 40 --sweep-sparsities 0.9",
    "COST_ARGS": "--models deit_tiny --methods cap --num-grads 8 --block-size 32 "
    "--deit-blocks 1 --eval-images 8",
    "SCALING_ARGS": "--d 2000 4000 8000 --B 8 16 32 --m 32 48 64 --gemm-n 256",
}


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.mark.slow
def test_quick_benchmark_writes_every_table_and_reruns_without_recomputing(tmp_path: Path):
    fm = write_fmnist(tmp_path / "fm")
    done = bench(tmp_path, fm, "--quick", **TINY)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    out = tmp_path / "results"
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] and env["threads"] == 1 and env["cpu_model"]
    quality = lines(out / "quality.csv")
    # cap over 2 seeds at 2 sparsities; no 2:4 (--nm-methods)
    assert any(line.startswith("vit_fmnist,cap,0.9,2,") for line in quality), quality
    assert any(line.startswith("vit_fmnist,cap,0.5,2,") for line in quality), quality
    # CAP's other loss ranking comes along (cap_per_step or cap_cumulative)
    assert sum(line.startswith("vit_fmnist,cap_") for line in quality) == 2, quality
    assert len(quality) == 5, quality
    chosen = json.loads((out / "quality" / "vit_fmnist" / "chosen.json").read_text())
    assert chosen["holdout"] == 40 and len(chosen["methods"]["cap"]["candidates"]) == 2
    assert "Settings chosen on held-out training images" in (out / "summary.md").read_text()
    assert len(lines(out / "gradual.csv")) == 2 and len(lines(out / "cost.csv")) == 2
    cost = {json.loads(x)["method"]: json.loads(x) for x in lines(out / "cost" / "cost.jsonl")}
    assert cost["cap"]["d"] == 442368 and cost["cap"]["peak_rss"] > cost["cap"]["runtime_rss"]
    assert set(cost["cap"]) >= {"gradients_s", "curvature_s", "pruning_s", "eval_s"}
    fits = json.loads((out / "scaling" / "fits.json").read_text())["exponents"]
    assert set(fits) == {"fisher_d", "fisher_B", "fisher_m", "cap_d", "cap_B"}
    for name in ("quality_vit_fmnist.png", "cost_phases.png", "scaling.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    summary = (out / "summary.md").read_text()
    assert "| 0.9 |" in summary and "Fitted exponents" in summary

    # Second run: every row is there, nothing is recomputed (no sweep, training or worker).
    records = {p: p.read_text() for p in out.rglob("*.jsonl")}
    again = bench(tmp_path, fm, "--quick", **TINY)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert {p: p.read_text() for p in out.rglob("*.jsonl")} == records
    assert ": one-shot " not in again.stdout and "== cost: deit_tiny" not in again.stdout
    assert "== scaling: d=" not in again.stdout and "training of" not in again.stdout
    assert ": gradual " not in again.stdout

    # A row cut short by a kill is dropped and computed again; the others stay.
    path = out / "cost" / "cost.jsonl"
    kept = lines(path)
    path.write_text(kept[0][: len(kept[0]) // 2])
    cmd = [sys.executable, "research/bench/bench_cost.py", "--out", str(out), "--threads", "1"]
    cmd += ["--deit-blocks", "1", *TINY["COST_ARGS"].split()]  # as run_benchmarks --quick
    third = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, (third.stdout + third.stderr)[-4000:]
    now = lines(path)
    assert len(now) == 2 and third.stdout.count("== cost: deit_tiny") == 1
    assert json.loads(now[1])["key"] == json.loads(kept[0])["key"]


def test_records_skip_a_line_cut_by_a_kill(tmp_path: Path) -> None:
    from utils import results as res

    path = tmp_path / "r.jsonl"
    res.append_record(path, {"key": "a", "v": 1})
    res.append_record(path, {"key": "b", "v": 2})
    text = path.read_text()
    path.write_text(text[: len(text) - 6])  # the kill cut row b
    assert list(res.read_records(path)) == ["a"]
    res.append_record(path, {"key": "b", "v": 3})  # on a line of its own
    assert {k: r["v"] for k, r in res.read_records(path).items()} == {"a": 1, "b": 3}
    with pytest.raises(ValueError):  # NaN is not JSON: never written as a token
        res.append_record(path, {"key": "c", "v": float("nan")})


def test_sweep_jobs_follow_the_recipes(tmp_path: Path, monkeypatch) -> None:
    """Every method is a recipe <name>_fmnist.yaml (+ _2to4 if present): a new pruner joins by
    its recipe alone; a method without one stops before any work."""
    sys.path.insert(0, str(ROOT / "research" / "bench"))
    import bench_quality as bq

    args = bq.parse_args(["--out", str(tmp_path)])
    jobs = {job[0]: job[2:4] for job in bq.sweep_jobs(args)}
    assert set(jobs) == {"gm", "obs", "mfac", "fast_cap_ref", "fast_cap", "cap"} | {
        f"{m}_2to4" for m in ("gm", "obs", "fast_cap", "cap")
    }
    everything = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    assert jobs["cap_2to4"] == ([0.5], True) and jobs["gm"] == (everything, False)
    # a ResNet adds a +bn row per method; CAP's chosen ranking brings the other one along
    chosen = {"cap": {"damp": 1e-8, "loss_ranking": "per_step"}}
    jobs = {job[0]: job[4:] for job in bq.sweep_jobs(args, chosen, "resnet_fmnist")}
    assert jobs["cap"] == (chosen["cap"], 0) and jobs["cap+bn"] == (chosen["cap"], 50)
    assert jobs["cap_cumulative"] == ({"damp": 1e-8, "loss_ranking": "cumulative"}, 0)
    assert "gm+bn" in jobs and "gm_2to4+bn" not in jobs
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "newpruner_fmnist.yaml").write_text("# a new pruner's recipe\n")
    monkeypatch.setattr(bq, "ONE_SHOT", recipes)
    args = bq.parse_args(["--out", str(tmp_path), "--methods", "newpruner", "--nm-methods"])
    assert [job[0] for job in bq.sweep_jobs(args)] == ["newpruner"]
    with pytest.raises(SetupError, match="--methods nosuch: no recipe"):
        bq.sweep_jobs(bq.parse_args(["--out", str(tmp_path), "--methods", "nosuch"]))


def test_a_changed_choice_reruns_only_that_methods_rows(tmp_path: Path, monkeypatch) -> None:
    """A method whose held-out choice changed loses its rows (and its derived jobs'), the
    others keep theirs; any other change of the sweeps' settings drops every row."""
    sys.path.insert(0, str(ROOT / "research" / "bench"))
    import bench_quality as bq
    import stale_rows

    from utils import results as res

    base = {"num_grads": 128, "gs_batch_size": 16, "bn_batches": 50}
    old = {**base, "chosen": {"cap": {"damp": 1e-8}, "fast_cap": {"damp": 0.1}, "gm": {}}}
    new = {**base, "chosen": {"cap": {"damp": 1e-8}, "fast_cap": {"damp": 0.01}, "gm": {}}}
    assert stale_rows.stale_methods(old, new) == {"fast_cap"}
    assert stale_rows.stale_methods(old, old) == set()
    # a rerun of some methods only: the others keep their rows
    assert stale_rows.stale_methods(old, {**base, "chosen": {"fast_cap": {"damp": 0.1}}}) == set()
    assert stale_rows.stale_methods({**old, "num_grads": 64}, new) is None
    assert stale_rows.stale_methods([], new) is None
    folder = tmp_path / "seed0"
    names = ["dense", "fast_cap", "fast_cap+bn", "fast_cap_2to4", "fast_cap_ref", "cap",
             "cap_cumulative", "cap_per_step"]  # fmt: skip
    for name in names:
        res.append_row(folder, {"method": name, "sparsity": 0.9, "accuracy": 1.0})
    stale_rows.drop_rows(folder, {"fast_cap"})
    assert [r["method"] for r in res.read_rows(folder)] == [
        "dense", "fast_cap_ref", "cap", "cap_cumulative", "cap_per_step"
    ]  # fmt: skip
    stale_rows.drop_rows(folder, {"cap"})
    assert [r["method"] for r in res.read_rows(folder)] == ["dense", "fast_cap_ref"]

    # through the sweep's setup: a rerun of fast_cap alone with a new choice keeps cap's rows
    # and its recorded choice, so a later run of both recomputes nothing
    out, model = tmp_path / "out", "vit_fmnist"
    seed = out / model / "seed0"
    for name in ("cap", "fast_cap"):
        res.append_row(seed, {"method": name, "sparsity": 0.9, "accuracy": 1.0})
    args = bq.parse_args(["--out", str(out), "--methods", "cap", "fast_cap"])
    (out / model / "sweep.json").write_text(json.dumps({
        "num_grads": args.num_grads, "gs_batch_size": args.gs_batch_size,
        "bn_batches": args.bn_batches, "chosen": old["chosen"],
    }))  # fmt: skip
    chosen = {"cap": {"damp": 1e-8}, "fast_cap": {"damp": 0.01}}
    monkeypatch.setattr(bq.held, "chosen_variables", lambda o, m, method: chosen[method])
    only = bq.parse_args(["--out", str(out), "--methods", "fast_cap"])
    assert len(bq.one_shot(only, model, tmp_path, tmp_path, out)) == len(only.seeds)
    assert [r["method"] for r in res.read_rows(seed)] == ["cap"]
    recorded = json.loads((out / model / "sweep.json").read_text())["chosen"]
    assert recorded == {**old["chosen"], "fast_cap": {"damp": 0.01}}
    res.append_row(seed, {"method": "fast_cap", "sparsity": 0.9, "accuracy": 1.0})
    bq.one_shot(args, model, tmp_path, tmp_path, out)
    assert [r["method"] for r in res.read_rows(seed)] == ["cap", "fast_cap"]
    (out / model / "sweep.json").write_text('{"num_grads": 12')  # cut short by a kill
    bq.one_shot(args, model, tmp_path, tmp_path, out)
    assert not seed.exists()  # unreadable: no row can be trusted
    assert json.loads((out / model / "sweep.json").read_text())["chosen"] == chosen


def test_jobs_run_in_order_or_side_by_side_and_stop_at_the_first_failure() -> None:
    import threading
    import time

    sys.path.insert(0, str(ROOT / "research" / "bench"))
    from bench_common import in_parallel

    ran: list[str] = []

    def job(name: str, then: tuple = ()):
        return lambda: ran.append(name) or list(then)

    in_parallel([job("a", (job("a1"), job("a2"))), job("b", (job("b1"),))], 1)
    assert ran == ["a", "a1", "a2", "b", "b1"]  # one worker: depth first, in order

    ran.clear()
    x_in, y_in = threading.Event(), threading.Event()

    def meet(mine, other, name, then=()):
        def body():  # returns only while the other job runs too
            mine.set()
            assert other.wait(10), f"{name} ran alone"
            return job(name, then)()

        return body

    in_parallel([meet(x_in, y_in, "x", (job("x1"),)), meet(y_in, x_in, "y")], 2)
    assert sorted(ran) == ["x", "x1", "y"]  # side by side; follow-up jobs run too

    ran.clear()
    started = threading.Event()

    def slow():
        started.set()
        time.sleep(0.5)
        ran.append("slow")

    def failing():
        assert started.wait(10)
        sys.exit(7)

    with pytest.raises(SystemExit) as err:
        in_parallel([slow, failing, *[job(f"q{i}") for i in range(5)]], 2)
    assert err.value.code == 7  # the failed script's exit code
    assert ran == ["slow"]  # the running job ended; the queued ones never started


def test_gradual_run_with_other_settings_never_reuses_a_finished_one(tmp_path: Path, monkeypatch):
    sys.path.insert(0, str(ROOT / "research" / "bench"))
    import bench_quality as bq

    trained = []

    def fake_train(cmd, folder, threads, what):  # what a finished training leaves behind
        trained.append(folder.name)
        folder.mkdir(parents=True)
        (folder / "summary.csv").write_text(f"epoch,eval_top1\n0,{len(trained)}\n")

    monkeypatch.setattr(bq, "train_once", fake_train)
    for epochs in (2, 3, 3):
        args = bq.parse_args(["--out", str(tmp_path), "--gradual-epochs", str(epochs)])
        bq.gradual_run(args, "vit_fmnist", "gm", tmp_path / "dense.pth", tmp_path / "d", tmp_path)
    assert trained == ["gradual_gm_2ep", "gradual_gm_3ep"]  # the rerun of 3 epochs skipped
    rows = bq.records(tmp_path / "vit_fmnist" / "gradual.jsonl")
    assert sorted((r["epochs"], r["accuracy"]) for r in rows.values()) == [(2, 1.0), (3, 2.0)]


def test_cost_runs_over_the_memory_cap_are_not_started(tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(ROOT / "research" / "bench"))
    import bench_cost
    import report

    args = ["--out", str(tmp_path), "--models", "deit_tiny", "--methods", "cap", "obs"]
    args += ["--num-grads", "256", "--deit-blocks", "12", "--mem-cap-gb", "8"]
    bench_cost.main(args)  # 7.6 GiB of float64 blocks for 5.3M weights: 1.3 x 8.9 + 1 > 8
    rows = report.cost_rows(tmp_path)
    assert [(r["method"], r["d"]) for r in rows] == [("cap", 5308416), ("obs", 5308416)]
    assert all("GiB + 1 GiB > cap" in r["skipped"] for r in rows)
    assert "skipped" in capsys.readouterr().out
    sizes = bench_cost.sizes(bench_cost.parse_args(args), "cap", 256, [5308416])
    assert sizes["fisher_bytes"] == 27648 * 192 * 192 * 8  # n_blocks * B * B * 8 bytes


def test_cost_repeats_record_the_run_of_median_ratio(tmp_path: Path, monkeypatch, capsys) -> None:
    sys.path.insert(0, str(ROOT / "research" / "bench"))
    import bench_cost

    curvature = iter([3.0, 1.0, 2.0])  # ratios 3, 1, 2 with m = 8 and 0.125 s per gradient
    run = {"gradients_s": 0.5, "pruning_s": 0.0, "grad_224_s": 0.125, "peak_rss": 2**30}
    monkeypatch.setattr(
        bench_cost, "spawn", lambda args, job: {**run, "curvature_s": next(curvature)}
    )
    args = ["--out", str(tmp_path), "--models", "deit_tiny", "--methods", "cap"]
    bench_cost.main([*args, "--num-grads", "8", "--deit-blocks", "1", "--repeats", "3"])
    (row,) = bench_cost.records(tmp_path / "cost" / "cost.jsonl").values()
    assert row["curvature_s"] == 2.0 and row["repeat_ratios"] == [1.0, 2.0, 3.0]
    assert "math / 8 gradients at 224: 2.00x (median of 3: 1.00, 2.00, 3.00)" in (
        capsys.readouterr().out
    )
    with pytest.raises(SystemExit):
        bench_cost.parse_args([*args, "--repeats", "0"])


def test_fisher_phases_prints_each_phase_and_refuses_the_sample_space_case(capsys) -> None:
    sys.path.insert(0, str(ROOT / "research" / "bench"))
    import bench_fisher_phases as phases

    phases.main(["--d", "3000", "--block-size", "16", "--num-grads", "80", "--threads", "1"])
    out = capsys.readouterr().out
    names = ["chunk 1 add", "chunk 2 add", "inversion", "CAP elimination", "total"]
    assert [line.split("  ")[0].strip() for line in out.splitlines()[2:]] == names, out
    with pytest.raises(SystemExit) as info:
        phases.parse_args(["--block-size", "192", "--num-grads", "64"])
    assert info.value.code == 2
