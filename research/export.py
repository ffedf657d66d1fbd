#!/usr/bin/env python
"""Export a pruned timm model: compressed checkpoint, ONNX, 2:4 semi-structured check (CUDA).

    python research/export.py --model vit_digits --initial-checkpoint pruned.pth \
        --output export/ --formats compressed onnx [semi_structured]

Writes into ``--output``:

* ``<model>.sparse.safetensors`` (``compressed``): the weights as bitmask / packed N:M / dense
  tensors (``docs/compressed-format.md``), reloaded and checked bit for bit;
* ``<model>.onnx`` (``onnx``): float32, dynamic batch, checked with ONNX Runtime (max abs
  difference to PyTorch <= 1e-4);
* ``export_report.json``: file sizes, per-layer sparsity and N:M conformity, and for every
  form the max abs difference of its outputs to the PyTorch model on a seeded input.

A checkpoint of a quantization-aware training run (its recipe has a ``QuantizationModifier``)
needs ``--sparseml-recipe`` (the training recipe): its fake quantization is rebuilt from the
checkpoint's saved ranges, the ONNX file holds QuantizeLinear/DequantizeLinear pairs and is
checked against the fake-quantized PyTorch model, and the report lists the bits per layer.

``semi_structured`` (CUDA, compute capability 8.0+) converts 2:4 Linear weights with
``torch.sparse.to_sparse_semi_structured`` and compares the outputs with the dense model in
float16 or bfloat16; it writes no file (load the compressed file on the GPU and convert there).
``--initial-checkpoint`` takes our training checkpoints, one-shot ``--save-model`` files, plain
state dicts and compressed files. Exit status: 0 done, 1 a check failed, 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils import options as opt

FORMATS = ("compressed", "onnx", "semi_structured")
DEFAULT_MODEL = "vit_digits"
REPORT = "export_report.json"
ONNX_TOLERANCE = 1e-4


def build_parser() -> argparse.ArgumentParser:
    p = opt.new_parser("Export a pruned timm model (compressed, ONNX, 2:4 on CUDA)")
    opt.add_model_options(p)
    p.set_defaults(model=None)  # default: the checkpoint's own arch, else DEFAULT_MODEL
    a = opt.Adder(p.add_argument_group("export"))
    a("--output", default="", help="folder of the exported files (default: output/export/<model>)")
    a("--formats", nargs="+", choices=FORMATS, default=["compressed", "onnx"], help="what to write")
    a("--batch-size", type=int, default=2, help="batch of the seeded check input")
    a("--seed", type=int, default=0, help="seed of the check input")
    a("--half-dtype", default="float16", choices=["float16", "bfloat16"], help="semi_structured")
    a(
        "--sparseml-recipe",
        default="",
        help="the recipe a quantized (QAT) checkpoint was trained with: the ONNX file is then "
        "its QDQ int8 form",
    )
    return p


if __name__ == "__main__":  # --help and usage errors before torch and timm load
    opt.answer_usage_early(build_parser)

from utils.compat import ensure_torchvision  # noqa: E402

ensure_torchvision()

import torch  # noqa: E402
from timm.models import safe_model_name  # noqa: E402

from sparseml.compressed import (  # noqa: E402
    SUFFIX,
    file_notes,
    is_compressed,
    load_compressed,
    save_compressed,
)
from sparseml.modifiers.quantization import quant_bits_by_layer  # noqa: E402
from sparseml.serialization import atomic_write_text, replaced_folder  # noqa: E402
from utils import faults, onnx_io, onnx_qdq  # noqa: E402
from utils import models as _models  # noqa: E402  (registers vit_digits, resnet_digits)
from utils import semi_structured as semi  # noqa: E402
from utils.checkpoint import QUANTIZED_NOTE  # noqa: E402
from utils.errors import CheckpointError, SetupError  # noqa: E402
from utils.sparsity_table import sparsity_report  # noqa: E402
from utils.weights import read_class_map, read_manager_state, read_payload  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    opt.check_file("--initial-checkpoint", args.initial_checkpoint)
    if args.model is None:  # the checkpoint names its architecture: no need to repeat it
        args.model = checkpoint_arch(args.initial_checkpoint) or DEFAULT_MODEL
    args.formats = list(dict.fromkeys(args.formats))
    opt.check_at_least("--batch-size", args.batch_size, 1, "the batch size")
    opt.check_at_least("--num-classes", args.num_classes, 1, "the number of classes")
    opt.check_file("--sparseml-recipe", args.sparseml_recipe)
    if "semi_structured" in args.formats and semi.cuda_problem():
        raise SetupError(
            f"--formats semi_structured needs an NVIDIA GPU with 2:4 sparse kernels: "
            f"{semi.cuda_problem()}; drop semi_structured here (compressed and onnx run on CPU)"
        )
    args.output = Path(args.output or Path("output") / "export" / args.model.replace("/", "_"))
    opt.check_writable_dir("--output", args.output)
    return args


def checkpoint_arch(path: str) -> str | None:
    """The model name a checkpoint records (``arch`` of ``sparse_training.py`` checkpoints,
    ``arch_key`` of SparseML-style ones); None for state dicts and (compressed) safetensors."""
    try:
        payload = read_payload(path, "--initial-checkpoint")
    except CheckpointError:  # loading the weights reports it with its own message
        return None
    arch = payload.get("arch") or payload.get("arch_key")
    return arch if isinstance(arch, str) and arch else None


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    model = _models.build_model(args)  # the shared builder and reader
    bad = _models.nonfinite_tensors(model)
    if bad:
        raise SetupError(
            f"--initial-checkpoint {args.initial_checkpoint}: {len(bad)} tensors hold NaN "
            f"or Inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the training "
            "run diverged or the file is damaged: export a checkpoint with finite weights"
        )
    return model.float().eval()


def quantize_like_training(model: torch.nn.Module, args: argparse.Namespace) -> dict:
    """Bits per quantized layer (empty for a float model), after rebuilding the checkpoint's
    fake quantization from ``--sparseml-recipe``."""
    saved = None
    if args.initial_checkpoint:
        saved = read_manager_state(args.initial_checkpoint, "--initial-checkpoint")
    if not args.sparseml_recipe:
        bits = quant_bits_by_layer(saved)
        noted = quantized_note(args.initial_checkpoint)
        if noted:
            print(
                f"warning: --initial-checkpoint {args.initial_checkpoint} holds the weights of a "
                f"quantization-aware run ({noted} quantized layers) but not its quantization "
                "ranges: this export is float; for the int8 (QDQ) form export the run's .pth "
                "checkpoint with --sparseml-recipe <its training recipe>",
                file=sys.stderr,
            )
        if bits:
            raise SetupError(
                f"--initial-checkpoint {args.initial_checkpoint} is quantization-aware trained "
                f"({len(bits)} quantized layers): add --sparseml-recipe <its training recipe> "
                "to export its int8 (QDQ) form"
            )
        return {}
    manager = onnx_qdq.restore_quantization(model, args.sparseml_recipe, saved)
    return quant_bits_by_layer(manager)


def quantized_note(path: str) -> int:
    """Quantized layers a compressed file notes (`utils.checkpoint.QUANTIZED_NOTE`), else 0."""
    if not path or not is_compressed(Path(path)):
        return 0
    note = file_notes(path).get(QUANTIZED_NOTE, "0")
    return int(note) if note.isascii() and note.isdigit() and len(note) < 10 else 0


def input_size(model: torch.nn.Module, args: argparse.Namespace) -> tuple[int, int, int]:
    """(channels, height, width) the model takes as built, not as its pretrained config says:
    ``--model-kwargs img_size=32`` or ``in_chans=1`` change the model, not ``pretrained_cfg``
    (a ViT's patch embedding asserts its own size)."""
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    if args.img_size:
        size = (size[0], args.img_size, args.img_size)
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed is not None:
        size = (size[0], *fixed)
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return (conv.in_channels if conv is not None else size[0], size[1], size[2])


def check_input(model: torch.nn.Module, args: argparse.Namespace) -> torch.Tensor:
    size = input_size(model, args)
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randn((args.batch_size, *size), generator=gen)


def dense_float32_bytes(state: dict[str, torch.Tensor]) -> int:
    """Size of the plain safetensors file of ``state`` in float32: the reference size."""
    from safetensors.torch import save

    plain = {k: (v.float() if v.is_floating_point() else v).clone() for k, v in state.items()}
    return len(save(plain))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: NaN payloads and -0.0 count, unlike ``torch.equal``."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8),
                       b.reshape(-1).contiguous().view(torch.uint8))  # fmt: skip


def export_compressed(model, state, x, ref, path: Path) -> dict:
    save_compressed(state, path)
    loaded = load_compressed(path)
    same = loaded.keys() == state.keys() and all(same_bits(loaded[k], v) for k, v in state.items())
    model.load_state_dict(loaded)  # the reloaded weights drive the model from here on
    with torch.inference_mode():
        diff = float((model(x) - ref).abs().max())
    return {"path": str(path), "bytes": path.stat().st_size, "bitwise_equal": same,
            "max_abs_diff": diff, "ok": same and diff == 0.0}  # fmt: skip


def export_onnx(model, x, ref, path: Path, quantized: bool) -> dict:
    if quantized:  # QDQ graph, compared with the fake-quantized model (utils.onnx_qdq)
        out = onnx_qdq.export_onnx(model, x, path)
        # Activations next to a rounding boundary may round one step apart in the two
        # runtimes (float arithmetic differs in its last bits): the rounding must agree
        # exactly on the same inputs, and the outputs given the same integers.
        ok = out["rounding_mismatches"] == 0 and out["max_abs_diff_same_integers"] <= ONNX_TOLERANCE
        return {**out, "bytes": path.stat().st_size, "tolerance": ONNX_TOLERANCE, "ok": ok}
    onnx_io.export_onnx(model, x, path)
    got = torch.from_numpy(onnx_io.run(onnx_io.session(path), x))
    out = {"path": str(path), "max_abs_diff": float((got - ref).abs().max())}
    ok = out["max_abs_diff"] <= ONNX_TOLERANCE
    return {**out, "bytes": path.stat().st_size, "tolerance": ONNX_TOLERANCE, "ok": ok}


def class_map_of(model: torch.nn.Module, args: argparse.Namespace) -> list[str] | None:
    """The class names the checkpoint was trained with (None when it holds none); refused when
    they do not fit the model's classifier, whose outputs they name."""
    if not args.initial_checkpoint:
        return None
    classes = read_class_map(args.initial_checkpoint, "--initial-checkpoint")
    outputs = getattr(model, "num_classes", None)
    if classes is not None and outputs and len(classes) != outputs:
        raise SetupError(
            f"--initial-checkpoint {args.initial_checkpoint} names {len(classes)} classes but "
            f"the model has {outputs} outputs; set --num-classes {len(classes)}"
        )
    return classes


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model = build_model(args)
    classes = class_map_of(model, args)
    bits = quantize_like_training(model, args)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    x = check_input(model, args)
    with torch.inference_mode():
        ref = model(x)
    name = safe_model_name(args.model)
    report = {
        "model": args.model,
        "checkpoint": args.initial_checkpoint or None,
        "input_shape": list(x.shape),
        "seed": args.seed,
        "dense_float32_bytes": dense_float32_bytes(state),
        "sparsity": sparsity_report(state),
        "quantization": bits,
        "class_map": classes,
        "exports": {},
    }
    owned = {name + SUFFIX, f"{name}.onnx", REPORT}  # what an export of this model may write
    # All files of one export appear together: a re-export that fails or is interrupted leaves
    # the previous export's files as they were, never its report beside new weights.
    with replaced_folder(args.output, owned.__contains__) as stage:
        exports = report["exports"]
        if "compressed" in args.formats:
            exports["compressed"] = export_compressed(model, state, x, ref, stage / (name + SUFFIX))
            exports["compressed"]["ratio_to_dense_float32"] = (
                exports["compressed"]["bytes"] / report["dense_float32_bytes"]
            )
        if "onnx" in args.formats:
            exports["onnx"] = export_onnx(model, x, ref, stage / f"{name}.onnx", bool(bits))
        if "semi_structured" in args.formats:
            exports["semi_structured"] = semi.check_model(model, x, args.half_dtype)
        for entry in exports.values():  # the paths the files will have
            if "path" in entry:
                entry["path"] = str(args.output / Path(entry["path"]).name)
        report_path = args.output / REPORT
        atomic_write_text(stage / REPORT, json.dumps(report, indent=1) + "\n")
    summarize(report, report_path)
    failed = [k for k, v in exports.items() if not v["ok"]]
    if failed:
        print(f"error: check failed for {', '.join(failed)} (see {report_path})", file=sys.stderr)
        sys.exit(faults.EXIT_FAILED)
    return report


def summarize(report: dict, report_path: Path) -> None:
    totals = report["sparsity"]["totals"]
    print(
        f"{report['model']}: {totals['layers']} layers, {100 * totals['layer_sparsity']:.2f}% of "
        f"their weights zero ({totals['layers_2of4']} layers 2:4)"
    )
    for kind, e in report["exports"].items():
        size = f"{e['bytes']:,} bytes, " if "bytes" in e else ""
        if kind == "compressed":
            size += f"{100 * e['ratio_to_dense_float32']:.1f}% of dense float32, "
        if kind == "semi_structured":
            size += f"{e['converted']}/{e['linear_layers']} Linear layers 2:4 in {e['dtype']}, "
        if "quantize_linear" in e:
            size += (
                f"{e['quantize_linear']} QuantizeLinear nodes (int8), same rounding of the same "
                f"inputs: {e['rounding_mismatches'] == 0}, max abs diff with the same integers "
                f"{e['max_abs_diff_same_integers']:.3g} ({e['rounded_differently']} activations "
                "rounded one step apart after float differences), "
            )
        where = f" -> {e['path']}" if "path" in e else ""
        print(
            f"  {kind}: {size}max abs diff {e['max_abs_diff']:.3g} ({'ok' if e['ok'] else 'FAILED'}){where}"
        )
    print(f"report: {report_path}")


if __name__ == "__main__":
    faults.run_main(main)
