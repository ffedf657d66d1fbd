#!/usr/bin/env python
"""Per-layer sparsity of a checkpoint: sparsity, N:M conformity and share of the parameters.

    python research/inspect_sparsity.py CKPT [--plot layers.png] [--json report.json]

CKPT: a training checkpoint of ``sparse_training.py`` (its EMA weights when it holds them, as
timm loads it), a ``--save-model`` file of ``one_shot_pruning.py``, a plain state dict (torch or
safetensors) or a compressed sparse checkpoint (``*.sparse.safetensors``; the table then also
says how each layer is stored). For a quantization-aware trained checkpoint a "bits" column
gives each layer's quantization (``w8a8``: int8 weights and inputs; ``float``: not quantized). Layers are the weights of 2+ dimensions; "N:M" is the first of
2:4, 4:8, 1:4 (N zeros in every M consecutive inputs) that the layer satisfies, "2:4 groups"
the share of its groups of 4 holding at least two zeros. Exit status 2 for a bad file or option.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils.options import answer_usage_early, new_parser


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(
        "Per-layer sparsity and N:M conformity of a checkpoint", "%(prog)s CKPT [options]"
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint, state dict or compressed file")
    p.add_argument("--plot", default="", metavar="PATH", help="bar plot of the layers (PNG)")
    p.add_argument("--json", default="", metavar="PATH", help="the report as JSON ('-': stdout)")
    return p


if __name__ == "__main__":  # --help and usage errors before torch loads
    answer_usage_early(build_parser)

from sparseml.compressed import file_metadata, is_compressed  # noqa: E402
from sparseml.modifiers.quantization import quant_bits_by_layer  # noqa: E402
from sparseml.serialization import atomic_write_text  # noqa: E402
from utils import faults  # noqa: E402
from utils.options import check_file, check_writable_dir  # noqa: E402
from utils.sparsity_table import add_bits, format_table, sparsity_report  # noqa: E402
from utils.weights import read_manager_state, read_state_dict  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_file("CKPT", args.checkpoint)
    for option, target in (("--plot", args.plot), ("--json", args.json)):
        if target and target != "-":
            check_writable_dir(option, Path(target).parent)
    state = read_state_dict(args.checkpoint, "CKPT")
    report = sparsity_report(state)
    report["checkpoint"] = str(args.checkpoint)
    bits = quant_bits_by_layer(read_manager_state(args.checkpoint, "CKPT"))
    if bits:  # a quantization-aware trained checkpoint: bits per layer
        add_bits(report, bits)
    layouts = None
    if is_compressed(args.checkpoint):
        entries = file_metadata(args.checkpoint)
        layouts = {
            name: e["layout"] + (f" {e['n']}:{e['m']}" if e["layout"] == "nm" else "")
            for name, e in entries.items()
        }
        report["stored_as"] = layouts
    if args.json != "-":
        print(format_table(report, layouts))
    if args.plot:
        from utils.plots import plot_layer_sparsity

        title = f"{Path(args.checkpoint).name}: sparsity per layer"
        print(f"plot: {plot_layer_sparsity(report, args.plot, title)}")
    if args.json == "-":
        json.dump(report, sys.stdout, indent=1)
        print()
    elif args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
        print(f"report: {args.json}")
    return report


if __name__ == "__main__":
    faults.run_main(main)
