"""Sparse + int8 end to end: QAT of a GM-pruned digits model with research/sparse_training.py
(masks kept, accuracy near the float sparse model, exact resume, AMP + EMA),
one-shot calibration in research/one_shot_pruning.py, and the ONNX QDQ export checked with
ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import RESEARCH, copy_digits_subset, ensure_research

ensure_research()
import timm  # noqa: E402

import export  # noqa: E402
import inspect_sparsity  # noqa: E402
import one_shot_pruning  # noqa: E402
import sparse_training  # noqa: E402
from sparseml.compressed import SUFFIX, file_notes, load_compressed, save_compressed  # noqa: E402
from sparseml.modifiers import quantization as quant_mod  # noqa: E402
from sparseml.modifiers.quantization import quant_bits_by_layer  # noqa: E402
from sparseml.pytorch.optim import ScheduledModifierManager  # noqa: E402
from utils import models  # noqa: E402, F401  (registers the digits models)
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.errors import SetupError  # noqa: E402
from utils.onnx_qdq import export_onnx  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CONVS = r"re:layer\d\.\d\.conv\d\.weight"
GM = f"""
modifiers:
  - !EpochRangeModifier
    start_epoch: 0
    end_epoch: 4
  - !GlobalMagnitudePruningModifier
    params: ['{CONVS}']
    init_sparsity: 0.25
    final_sparsity: 0.75
    start_epoch: 1
    end_epoch: 3
    update_frequency: 1
    inter_func: linear
"""
CONSTANT = """
modifiers:
  - !EpochRangeModifier
    start_epoch: 0
    end_epoch: 2
  - !ConstantPruningModifier
    params: __ALL_PRUNABLE__
    start_epoch: 0
"""
QAT = (
    CONSTANT
    + """
  - !QuantizationModifier
    start_epoch: 0
    disable_quantization_observer_epoch: 1
    freeze_bn_stats_epoch: 1
"""
)


def args(data: Path, out: Path, name: str, recipe: Path, lr: str = "0.003") -> list[str]:
    return [
        str(data), "--dataset", "", "--model", "resnet_digits",
        "-b", "32", "-vb", "200", "--workers", "0",
        "--opt", "adamw", "--lr", lr, "--weight-decay", "0.01",
        "--sched", "step", "--decay-epochs", "100", "--warmup-epochs", "0",
        "--smoothing", "0", "--hflip", "0", "--color-jitter", "0", "--scale", "0.8", "1.0",
        "--output", str(out), "--experiment", name, "--log-interval", "100",
        "--sparseml-recipe", str(recipe), "--save-last",
    ]  # fmt: skip


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, digits_dir) -> dict:
    """A resnet_digits GM-pruned to 75% of its block convs (40 train images per class, the
    whole validation split): its data, checkpoint and float accuracy."""
    root = tmp_path_factory.mktemp("qat")
    data = copy_digits_subset(digits_dir, root / "data", 40, 1000)
    recipe = write(root / "gm.yaml", GM)
    result = sparse_training.main(args(data, root, "gm", recipe))
    return {"data": data, "root": root, "ckpt": result["out_dir"] / "resnet_digits_last.pth"}


def zeros(state: dict) -> dict[str, torch.Tensor]:
    return {k: v == 0 for k, v in state["state_dict"].items() if k.endswith("conv2.weight")}


@pytest.mark.slow
def test_qat_after_gm_keeps_masks_matches_float_and_resumes_exactly(pruned) -> None:
    root, data = pruned["root"], pruned["data"]
    start = ["--initial-checkpoint", str(pruned["ckpt"])]
    float_run = sparse_training.main(
        [*args(data, root, "float", write(root / "c.yaml", CONSTANT), "0.0005"), *start]
    )
    qat_recipe = write(root / "q.yaml", QAT)
    qat_args = [*args(data, root, "qat", qat_recipe, "0.0005"), *start, "--checkpoint-freq", "1"]
    qat = sparse_training.main(qat_args)
    # The quantization costs (almost) nothing against the same fine-tuning in float: the
    # validation loss within 5%, top-1 within two standard errors of 360 images at ~92% (one
    # image is 0.28 points; the machines differ by a few images in either direction).
    assert qat["eval"]["loss"] <= 1.05 * float_run["eval"]["loss"], (qat, float_run)
    assert qat["eval"]["top1"] >= float_run["eval"]["top1"] - 3.0, (qat, float_run)
    final = load_checkpoint(qat["out_dir"] / "resnet_digits_last.pth")
    masks = zeros(load_checkpoint(pruned["ckpt"]))
    assert sum(int(m.sum()) for m in masks.values()) > 0.5 * sum(m.numel() for m in masks.values())
    for key, mask in masks.items():
        assert torch.equal(final["state_dict"][key] == 0, mask), key
    bits = quant_bits_by_layer(final["manager"])
    assert bits["layer1.0.conv1"] == {"weight_bits": 8, "activation_bits": 8} and "fc" in bits
    plain = timm.create_model("resnet_digits")
    plain.load_state_dict(final["state_dict"])  # no renamed or extra keys

    # Resume after the first QAT epoch (observers running, stopped at an epoch end) in the
    # same folder: the second epoch (observers and BatchNorm frozen) ends bit for bit equal.
    epoch0 = qat["out_dir"] / "resnet_digits_epoch=0.pth"
    resumed = sparse_training.main([*qat_args, "--resume", str(epoch0)])
    assert resumed["eval"] == qat["eval"]
    again = load_checkpoint(qat["out_dir"] / "resnet_digits_last.pth")
    for key, value in final["state_dict"].items():
        assert torch.equal(again["state_dict"][key], value), key
    key = next(k for k in final["manager"] if k.startswith("QuantizationModifier"))
    for part in ("act_stats", "weight_scales"):
        for name, value in final["manager"][key][part].items():
            assert torch.equal(again["manager"][key][part][name], value), (part, name)

    # Deploy: export.py rebuilds the int8 model from the checkpoint and its recipe (QDQ ONNX
    # checked against the fake-quantized model by ONNX Runtime); inspect reports the bits.
    last = qat["out_dir"] / "resnet_digits_last.pth"
    common = ["--model", "resnet_digits", "--initial-checkpoint", str(last)]
    out = root / "export"
    report = export.main([*common, "--output", str(out), "--sparseml-recipe", str(qat_recipe)])
    onnx_row = report["exports"]["onnx"]
    assert onnx_row["ok"] and onnx_row["quantize_linear"] >= 2 * len(bits), onnx_row
    assert report["quantization"] == bits
    with pytest.raises(SetupError, match="--sparseml-recipe"):
        export.main([*common, "--output", str(out)])
    table = inspect_sparsity.main([str(last)])
    assert {r["name"]: r["bits"] for r in table["layers"]}["layer1.0.conv1.weight"] == "w8a8"


@pytest.mark.slow
def test_qat_with_amp_and_ema(pruned, tmp_path) -> None:
    # Two ranks: tests/test_readme_commands.py runs gm_qat_digits.yaml under torchrun, and
    # tests/test_quantization.py::test_two_ranks_share_activation_ranges checks the ranges.
    small = copy_digits_subset(pruned["data"], tmp_path / "small", 16, 4)
    recipe = write(tmp_path / "q.yaml", QAT.replace("end_epoch: 2", "end_epoch: 1"))
    argv = [*args(small, tmp_path, "amp", recipe, "0.0005"), "-b", "16"]
    argv += ["--initial-checkpoint", str(pruned["ckpt"]), "--amp", "--model-ema"]
    sparse_training.main(argv)
    state = load_checkpoint(tmp_path / "amp" / "resnet_digits_last.pth")
    for key, mask in zeros(load_checkpoint(pruned["ckpt"])).items():
        assert torch.equal(state["state_dict"][key] == 0, mask), key
        assert torch.all(state["state_dict_ema"][key][mask] == 0), key
    assert quant_bits_by_layer(state["manager"])["fc"]["weight_bits"] == 8


def test_one_shot_sweep_calibrates_a_quantization_modifier(
    digits_dir, tmp_path, monkeypatch, capsys
) -> None:
    seen = []
    real = quant_mod.calibrate
    monkeypatch.setattr(quant_mod, "calibrate", lambda *a: seen.append(real(*a)) or seen[-1])
    data = copy_digits_subset(digits_dir, tmp_path / "data", 6, 3)
    model = timm.create_model("vit_digits", depth=1)
    ckpt = tmp_path / "dense.pth"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    recipe = write(tmp_path / "gm_int8.yaml", (RESEARCH / "recipes" / "quantization" /
                   "gm_int8_one_shot_digits.yaml").read_text())  # fmt: skip
    rows = one_shot_pruning.main([
        "--model", "vit_digits", "--model-kwargs", "depth=1", "--dataset", "",
        "--data-dir", str(data),
        "--initial-checkpoint", str(ckpt), "--sparseml-recipe", str(recipe),
        "--sparsities", "0.5", "--output-dir", str(tmp_path / "out"), "-vb", "20",
        "--workers", "0", "--save-model", "--save-compressed", "--no-report",
    ])  # fmt: skip
    row = next(r for r in rows if r["method"] != "dense")
    assert row["settings"]["quantization"]["weight_bits"] == 8
    assert row["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert seen == [2]  # num_calibration_steps of the 3 batches of 20 training images
    # the compressed weights say they come from a quantization-aware recipe, and exporting
    # them (which holds no ranges) says that its ONNX is float
    (compressed,) = (tmp_path / "out").rglob(f"*{SUFFIX}")
    layers = int(file_notes(compressed)["quantized_layers"])
    assert layers > 0
    capsys.readouterr()
    export.main(["--model", "vit_digits", "--model-kwargs", "depth=1", "--initial-checkpoint",
                 str(compressed), "--output", str(tmp_path / "export")])  # fmt: skip
    said = capsys.readouterr().err
    assert f"quantization-aware run ({layers} quantized layers)" in said and "float" in said
    for hostile in ("\u00b2", "9" * 5000):  # a crafted note is no number of layers
        save_compressed(load_compressed(compressed), compressed, {"quantized_layers": hostile})
        assert export.quantized_note(str(compressed)) == 0


@pytest.mark.parametrize("name", ["vit_digits", "resnet_digits"])
def test_onnx_export_has_qdq_nodes_and_matches_onnxruntime(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, **({"depth": 1} if name == "vit_digits" else {}))
    with torch.no_grad():  # some exact zeros, as in a pruned model
        for module in model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                module.weight.mul_(torch.rand_like(module.weight) > 0.5)
    manager = ScheduledModifierManager.from_yaml(
        "!QuantizationModifier\n  start_epoch: 0.0\n  num_calibration_steps: 2\n"
    )
    x = torch.randn(12, 3, 32, 32)
    manager.apply(model, calib_loader=[(x[:6], None), (x[6:], None)])
    layers = len(quant_bits_by_layer(manager.state_dict()))
    out = export_onnx(model, x[:3], tmp_path / f"{name}.onnx")
    assert out["quantize_linear"] == out["dequantize_linear"] == 2 * layers  # weight + input
    # same rounding of the same inputs, same outputs given the same integers (utils.onnx_qdq)
    assert out["rounding_mismatches"] == 0 and out["max_abs_diff_same_integers"] < 1e-4, out
    manager.modifiers[0].remove_quantization()
    float_out = export_onnx(model, x[:3], tmp_path / "float.onnx")
    assert float_out["quantize_linear"] == 0
