"""research/export.py (compressed, ONNX, 2:4 on CUDA) and ``--save-compressed`` of both scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import copy_digits_subset, ensure_research

ensure_research()
import timm  # noqa: E402

import export  # noqa: E402
import one_shot_pruning  # noqa: E402
import sparse_training  # noqa: E402
from sparseml.compressed import load_compressed  # noqa: E402
from sparseml.masks import nm_mask  # noqa: E402
from utils import models  # noqa: E402, F401  (registers the digits models)
from utils.errors import CheckpointError, SetupError  # noqa: E402
from utils.weights import read_state_dict  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPES = Path(export.__file__).parent / "recipes"
VIT_ARGS = ["--model", "vit_digits", "--model-kwargs", "depth=2"]


def prune_2of4(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks.") and p.dim() == 2:
                p.masked_fill_(~nm_mask(p.abs().reshape(-1), 2, 4).view(p.shape), 0.0)


def prune_unstructured(model: torch.nn.Module, sparsity: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 4 and name != "conv1.weight":
                threshold = p.abs().reshape(-1).kthvalue(round(sparsity * p.numel())).values
                p.masked_fill_(p.abs() <= threshold, 0.0)


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory) -> Path:
    """A training-style checkpoint (timm keys) of a 2:4-pruned two-block digits ViT."""
    torch.manual_seed(0)
    model = timm.create_model("vit_digits", depth=2)
    prune_2of4(model)
    path = tmp_path_factory.mktemp("ckpt") / "vit_last.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3, "arch": "vit_digits"}, path)
    return path


def test_export_vit_writes_all_cpu_formats(vit_checkpoint, tmp_path):
    out = tmp_path / "exp"
    report = export.main(
        [*VIT_ARGS, "--initial-checkpoint", str(vit_checkpoint), "--output", str(out)]
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "export_report.json", "vit_digits.onnx", "vit_digits.sparse.safetensors",
    ]  # fmt: skip
    saved = json.loads((out / "export_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    comp, onnx = saved["exports"]["compressed"], saved["exports"]["onnx"]
    assert comp["bitwise_equal"] and comp["max_abs_diff"] == 0.0 and comp["ok"]
    assert comp["bytes"] == (out / "vit_digits.sparse.safetensors").stat().st_size
    assert comp["ratio_to_dense_float32"] < 0.65  # 2:4 blocks
    assert onnx["ok"] and onnx["max_abs_diff"] <= 1e-4
    layers = {r["name"]: r for r in saved["sparsity"]["layers"]}
    assert layers["blocks.0.mlp.fc1.weight"]["nm"] == "2:4"
    assert layers["blocks.0.mlp.fc1.weight"]["sparsity"] == pytest.approx(0.5)
    assert layers["head.weight"]["nm"] is None and saved["sparsity"]["totals"]["layers_2of4"] == 8
    # the weights in the compressed file are the checkpoint's, bit for bit
    state = torch.load(vit_checkpoint, weights_only=True)["state_dict"]
    loaded = load_compressed(out / "vit_digits.sparse.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_export_resnet_from_plain_and_compressed_files(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet_digits")
    prune_unstructured(model, 0.9)
    plain = tmp_path / "resnet.pth"
    torch.save(model.state_dict(), plain)
    args = ["--model", "resnet_digits", "--batch-size", "3"]
    first = export.main(
        [*args, "--initial-checkpoint", str(plain), "--output", str(tmp_path / "a")]
    )
    comp = first["exports"]["compressed"]
    assert comp["ok"] and comp["ratio_to_dense_float32"] < 0.25  # 90% of the block convs
    assert first["exports"]["onnx"]["ok"] and first["input_shape"] == [3, 3, 32, 32]
    # a compressed file as the input gives the same model and the same file again
    again = export.main(
        [*args, "--initial-checkpoint", comp["path"], "--output", str(tmp_path / "b")]
    )
    assert again["exports"]["onnx"]["max_abs_diff"] <= 1e-4
    a = load_compressed(tmp_path / "a" / "resnet_digits.sparse.safetensors")
    b = load_compressed(tmp_path / "b" / "resnet_digits.sparse.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_float64_checkpoint_is_said_to_be_rounded(tmp_path, caplog):
    """Loading a float64 checkpoint into the float32 model rounds it: said with the largest
    change (the export's checks compare against the rounded model and cannot show it)."""
    torch.manual_seed(0)
    state = {k: v.double() for k, v in timm.create_model("resnet_digits").state_dict().items()}
    state["fc.weight"] = state["fc.weight"] + 1e-9  # not exact in float32
    path = tmp_path / "f64.pth"
    torch.save(state, path)
    args = ["--model", "resnet_digits", "--batch-size", "2", "--formats", "compressed"]
    with caplog.at_level("WARNING"):
        export.main([*args, "--initial-checkpoint", str(path), "--output", str(tmp_path / "o")])
    said = [r.getMessage() for r in caplog.records if "loading rounds them" in r.getMessage()]
    assert len(said) == 1 and "torch.float64, the model holds torch.float32" in said[0], said
    change = float(said[0].rsplit("largest change ", 1)[1].rstrip(")"))
    assert 0 < change < 1e-6


def test_usage_errors_exit_2_in_one_line(run_script, tmp_path):
    broken = tmp_path / "cut.sparse.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    cases = [
        (["--formats", "pdf"], "invalid choice: 'pdf'"),  # answered before torch loads
        (["--initial-checkpoint", str(broken)], f"compressed checkpoint {broken}: header length"),
    ]
    for argv, words in cases:
        result = run_script("export.py", [*argv, "--output", str(tmp_path / "o")], timeout=120)
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_semi_structured_without_cuda_is_a_clear_error(vit_checkpoint, tmp_path):
    argv = [*VIT_ARGS, "--formats", "semi_structured", "--initial-checkpoint", str(vit_checkpoint)]
    with pytest.raises(
        SetupError, match="needs an NVIDIA GPU with 2:4 sparse kernels: CUDA is not"
    ):
        export.main([*argv, "--output", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing written


def test_mismatched_checkpoint_is_a_setup_error(vit_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="does not match the model"):
        export.main(["--model", "resnet_digits", "--initial-checkpoint", str(vit_checkpoint),
                     "--output", str(tmp_path)])  # fmt: skip
    with pytest.raises(SetupError, match="--batch-size 0"):
        export.main([*VIT_ARGS, "--batch-size", "0", "--output", str(tmp_path)])


def test_only_2of4_linears_are_converted():
    from utils.semi_structured import convert_linears, is_2of4

    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 64))
    prune_2of4_weight = nm_mask(net[0].weight.abs().reshape(-1), 1, 4).view(32, 64)
    with torch.no_grad():
        net[0].weight.masked_fill_(~prune_2of4_weight, 0.0)  # 1 zero in 4: not 2:4
    before = net[0].weight.clone()
    rows = convert_linears(net)
    assert [r["reason"] for r in rows] == ["not 2:4", "not 2:4"]
    assert torch.equal(net[0].weight, before) and not is_2of4(before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_semi_structured_matches_dense(tmp_path, dtype):
    """Width 128 (heads of 32): every block Linear meets the 2:4 kernels' shape rules."""
    torch.manual_seed(0)
    kwargs = ["depth=2", "embed_dim=128", "num_heads=4"]
    model = timm.create_model("vit_digits", **{"depth": 2, "embed_dim": 128, "num_heads": 4})
    prune_2of4(model)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    report = export.main(["--model", "vit_digits", "--model-kwargs", *kwargs, "--batch-size", "8",
                          "--initial-checkpoint", str(tmp_path / "m.pth"), "--output",
                          str(tmp_path / "o"), "--formats", "semi_structured",
                          "--half-dtype", dtype])  # fmt: skip
    semi = report["exports"]["semi_structured"]
    assert semi["converted"] == 8 and semi["linear_layers"] == 9  # the head is dense
    assert semi["ok"], semi


# ----- --save-compressed ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, digits_dir) -> Path:
    return copy_digits_subset(digits_dir, tmp_path_factory.mktemp("digits"), 6, 4)


def test_one_shot_save_compressed(small_digits, tmp_path):
    argv = ["--dataset", "digits", "--data-dir", str(small_digits), "--model", "vit_digits",
            "--model-kwargs", "depth=1", "--sparseml-recipe",
            str(RECIPES / "one_shot" / "gm_digits.yaml"), "--sparsities", "0.5", "0.8",
            "--output", str(tmp_path), "--experiment", "sweep", "--workers", "0", "-vb", "20",
            "--device", "cpu", "--no-report", "--save-model", "--save_compressed"]  # fmt: skip
    one_shot_pruning.main(argv)
    out = tmp_path / "sweep"
    for s in ("0.5", "0.8"):
        stem = out / f"vit_digits_gm_sparsity={s}"  # named after the pruner
        plain = torch.load(f"{stem}.pth", weights_only=True)
        packed = load_compressed(f"{stem}.sparse.safetensors")
        assert packed.keys() == plain.keys()
        assert all(torch.equal(packed[k], v) for k, v in plain.items())
    assert not list(out.glob(".*.tmp"))


def test_save_compressed_needs_a_checkpoint_to_sit_beside(small_digits, tmp_path):
    with pytest.raises(SetupError, match="--save-compressed writes next to the best and last"):
        sparse_training.main([str(small_digits), "--dataset", "", "--save-compressed",
                              "--checkpoint-hist", "0", "--output", str(tmp_path)])  # fmt: skip


@pytest.mark.slow
def test_training_save_compressed_mirrors_best_and_last(small_digits, tmp_path):
    recipe = tmp_path / "gm.yaml"
    recipe.write_text(
        "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 2\n"
        "  - !GlobalMagnitudePruningModifier\n    params: ['re:blocks.*weight']\n"
        "    init_sparsity: 0.5\n    final_sparsity: 0.8\n    start_epoch: 0\n"
        "    end_epoch: 1\n    update_frequency: 1\n"
    )
    argv = [str(small_digits), "--dataset", "", "--model", "vit_digits", "--model-kwargs",
            "depth=1", "-b", "20", "-vb", "40", "--workers", "0", "--opt", "adamw", "--lr",
            "0.001", "--warmup-epochs", "0", "--sparseml-recipe", str(recipe), "--output",
            str(tmp_path), "--experiment", "run", "--save-last", "--checkpoint-hist", "2",
            "--model-ema", "--save-compressed"]  # fmt: skip
    out = sparse_training.main(argv)["out_dir"]
    for kind in ("last", "best"):
        packed = load_compressed(out / f"vit_digits_{kind}.sparse.safetensors")
        expected = read_state_dict(out / f"vit_digits_{kind}.pth", "x")  # EMA, as timm loads
        assert all(torch.equal(packed[k], v) for k, v in expected.items()), kind
        fc1 = packed["blocks.0.mlp.fc1.weight"]
        assert float((fc1 == 0).float().mean()) > 0.5 and not torch.signbit(fc1[fc1 == 0]).any()


# ----- research/bench/bench_inference.py: what it times must compute the same thing ------------
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_bench_csr_paths_compute_the_dense_result():
    import importlib.util

    path = Path(export.__file__).parent / "bench" / "bench_inference.py"
    spec = importlib.util.spec_from_file_location("bench_inference", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    bench.prune_(layer.weight.data, 0.9)
    assert float((layer.weight == 0).float().mean()) == pytest.approx(0.9, abs=1e-3)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(bench.CSRLinear(layer)(x), layer(x))
    model = timm.create_model("vit_digits", depth=1).eval()
    sparse = bench.csr_model(model)
    assert sum(isinstance(m, bench.CSRLinear) for m in sparse.modules()) == 4  # qkv proj fc1 fc2
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sparse(images), model(images), rtol=1e-4, atol=1e-5)
