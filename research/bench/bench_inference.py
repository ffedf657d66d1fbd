#!/usr/bin/env python
"""Inference speed of pruned models: what sparsity buys at run time, slowdowns included.

    python research/bench/bench_inference.py [--threads 2] [--quick]
    python research/bench/bench_inference.py --model resnet50 --initial-checkpoint pruned.pth \
        [--img-size 224] [--batch-sizes 1 32] [--prune 0.9]

With ``--model`` it times that model (and ``--initial-checkpoint``: a training checkpoint,
one-shot ``--save-model`` file, plain or compressed state dict) instead of the built-in shapes:
PyTorch with dense kernels, the same weights with every Linear layer of at least
``--csr-min-sparsity`` zeros as CSR, and ONNX Runtime, at each batch size, in one run.
``--prune S`` first zeroes the smallest S of every Linear/Conv weight (per layer), to see what a
sparsity would buy before pruning for real.

Speedups are only printed when the machine is not busier than its cores: the 1-minute load
average (which counts this benchmark's own threads) is read before and after each row, and a
row timed while it exceeded the number of cores shows its times but no speedup (on an
oversubscribed machine one run printed 134x). The run ends with a line saying so.

CPU (float32): PyTorch dense vs ``torch.sparse`` CSR matmul (the pruned weight as
``to_sparse_csr()``, ``torch.sparse.mm``) vs ONNX Runtime, at 50/70/90/95% unstructured
sparsity (per-layer magnitude pruning of random weights: speed does not depend on which
weights are zero), batch 1 and 64, on

* the digits ViT of the README's main job (``vit_digits``: the whole model, its 16 block
  Linear layers pruned),
* single GEMMs of DeiT-Tiny/Small Linear layers (197 tokens per image, MLP 4x) and of
  ResNet-50 convolutions seen as GEMMs (im2col: output pixels x (in * kh * kw) x out).

All three run the same pruned weights; PyTorch dense and ONNX Runtime with dense kernels (the
zeros cost as much as other values). Speedup columns: PyTorch dense time / that time (< 1:
slower).
CUDA (when present): dense float16 vs 2:4 semi-structured (``to_sparse_semi_structured``) for
the same GEMM shapes; 2:4 is 50% sparsity by construction.

CPU runtimes that would skip the zeros, and why they are not here:

* OpenVINO's "sparse weights decompression" (CPU property
  ``CPU_SPARSE_WEIGHTS_DECOMPRESSION_RATE``) packs sparse weights of MatMul layers, but only
  for INT8-quantized weights, on CPUs with Intel AMX (4th-gen Xeon "Sapphire Rapids" and
  newer), with channel counts that are multiples of 64. This machine's CPU reports
  ``amx_int8`` (printed below), but our pruned models are float32: without an INT8 model
  (quantization is separate work) OpenVINO computes dense, like ONNX Runtime.
* DeepSparse (Neural Magic), the runtime built for unstructured sparsity on CPUs, reached its
  end of life on 2 June 2025 (neuralmagic/deepsparse#1676) and is unmaintained.
* ONNX Runtime's CPU provider has no sparse float GEMM for such weights: zeros cost as much as
  other values (the ORT columns show it).

Timings are medians of turns taken after a warm-up (each contender runs once per round, so a
change in the machine's load hits all alike). PyTorch's thread pool suffers most when the cores
are oversubscribed (its threads wait for each other at every op): on a busy machine small
PyTorch ops look many times slower than they are, ONNX Runtime less so. Defaults: ~2 min of CPU
time (user time 2 min 7 s here; 1-2 min wall on 2 free cores, 6 min at load average 7);
``--quick`` (batch-1 GEMMs and a batch-16 model, 50% and 90%) about a fifth of that.
"""

# This file: the command line, the printed tables and what they say about the machine. What is
# timed: inference_cases.py; the contenders (dense, CSR, ONNX Runtime) and the clock:
# inference_backends.py.

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # research/: utils
if str(HERE) not in sys.path:  # the inference_* modules, also when this file is loaded by path
    sys.path.append(str(HERE))

from inference_backends import (  # noqa: E402
    BusyGuard,
    CSRLinear,
    csr_model,
    prune_,  # noqa: F401  (tests/test_export.py reads bench_inference.prune_)
)
from inference_cases import (  # noqa: E402
    GEMMS,
    SPARSITIES,
    bench_cuda,
    bench_gemms,
    bench_model,
    bench_user_batches,
    build_user_model,
    linear_sparsity,
)

from utils.options import ParseKwargs  # noqa: E402  (no torch or timm import there)


class Table(list):
    """Rows of a markdown table, each printed as soon as it is added (long runs show progress)."""

    def __init__(self, head: list[str]) -> None:
        super().__init__()
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")

    def append(self, row: list[str]) -> None:
        super().append(row)
        print("| " + " | ".join(row) + " |", flush=True)


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    amx = [f for f in flags if f.startswith("amx")]
    return ", ".join(amx) if amx else "no AMX"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def bench_user_model(args: argparse.Namespace, guard: BusyGuard, budget: float) -> None:
    """Time the ``--model``: a line on its zeros and CSR layers, then one row per batch size."""
    model, shape = build_user_model(args)
    lin, both = linear_sparsity(model)
    sparse = csr_model(model, args.csr_min_sparsity)
    converted = sum(isinstance(m, CSRLinear) for m in sparse.modules())
    print(
        f"{args.model}{' from ' + args.initial_checkpoint if args.initial_checkpoint else ''}: "
        f"input {'x'.join(map(str, shape))}, zeros {100 * lin:.1f}% of Linear weights, "
        f"{100 * both:.1f}% of Linear+Conv weights; {converted} Linear layers with >= "
        f"{100 * args.csr_min_sparsity:.0f}% zeros run as CSR (convolutions stay dense)"
    )
    print("\nCPU, float32 (ms per call; speedup = dense PyTorch time / this time)")
    rows = Table(["batch", "dense", "CSR", "CSR speedup", "ORT", "ORT speedup"])
    bench_user_batches(rows, model, sparse, shape, args.batch_sizes, args.threads, budget, guard)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch and ONNX Runtime threads (default 2)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="batch-1 GEMMs at 50%% and 90%%, fewer shapes"
    )
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA table")
    mine = parser.add_argument_group("your model (replaces the built-in shapes)")
    mine.add_argument("--model", default="", help="timm model name (default: built-in shapes)")
    mine.add_argument("--initial-checkpoint", default="", help="its weights (any checkpoint)")
    mine.add_argument("--img-size", type=int, default=None, help="input size (default: model's)")
    mine.add_argument("--num-classes", type=int, default=None, help="classifier classes")
    mine.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                      help="k=v for create_model")  # fmt: skip
    mine.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32],
                      help="batch sizes to time (default: 1 32)")  # fmt: skip
    mine.add_argument(
        "--prune",
        type=float,
        default=0.0,
        help="first zero this share of every Linear/Conv weight (default: 0)",
    )
    mine.add_argument("--csr-min-sparsity", type=float, default=0.5,
                      help="Linear layers with at least this share of zeros run as CSR "
                      "(default: 0.5; below, CSR is slower everywhere)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be >= 1")
    if not 0.0 <= args.prune < 1.0:
        parser.error(f"--prune {args.prune}: must be in [0, 1)")
    if not 0.0 <= args.csr_min_sparsity <= 1.0:
        parser.error(f"--csr-min-sparsity {args.csr_min_sparsity}: must be in [0, 1]")
    if any(b < 1 for b in args.batch_sizes):
        parser.error(f"--batch-sizes {args.batch_sizes}: each must be >= 1")
    if args.initial_checkpoint and not Path(args.initial_checkpoint).is_file():
        parser.error(f"--initial-checkpoint {args.initial_checkpoint}: no such file")
    if not args.model and (args.initial_checkpoint or args.prune or args.img_size):
        parser.error("--initial-checkpoint, --prune and --img-size need --model")
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    sparsities = (0.5, 0.9) if args.quick else SPARSITIES
    gemms = dict(list(GEMMS.items())[1::2]) if args.quick else GEMMS
    budget = 0.1 if args.quick else 0.2
    guard = BusyGuard()
    print(f"torch {torch.__version__}, {args.threads} threads, CPU AMX flags: {cpu_flags()}")
    print(f"load average before: {load_average()} on {guard.cores} cores (speedups are only "
          "printed while it stays at most the number of cores)")  # fmt: skip
    if args.model:
        bench_user_model(args, guard, budget)
        print(f"\n{time.perf_counter() - start:.0f} s in all; load average after: {load_average()}")
        if guard.summary():
            print(guard.summary())
        return 0
    print("\nCPU, float32 (ms per call; speedup = dense PyTorch time / this time)")
    head = ["case", "batch", "sparsity", "dense", "CSR", "CSR speedup", "ORT", "ORT speedup"]
    rows = Table(head)
    model_batches = (1, 64) if not args.quick else (1, 16)
    bench_model(rows, model_batches, sparsities, args.threads, budget, guard)
    gemm_batches = (1,) if args.quick else (1, 64)
    bench_gemms(rows, gemms, gemm_batches, sparsities, args.threads, budget, guard)
    if torch.cuda.is_available() and not args.no_cuda:
        print(f"\nCUDA {torch.cuda.get_device_name()}, float16 (ms per call)")
        cuda_rows = Table(["case", "batch", "pattern", "dense", "2:4", "2:4 speedup"])
        bench_cuda(cuda_rows, gemms, (1, 64), budget)
    else:
        print("\nCUDA: not available here, no 2:4 semi-structured timings")
    print(f"\n{time.perf_counter() - start:.0f} s in all; load average after: {load_average()}")
    if guard.summary():
        print(guard.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
