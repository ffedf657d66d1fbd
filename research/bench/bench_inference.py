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

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # research/: utils

from utils.options import ParseKwargs  # noqa: E402  (no torch or timm import there)

SPARSITIES = (0.5, 0.7, 0.9, 0.95)
TOKENS = 197  # DeiT at 224 px: 196 patches + the class token
# name -> (rows per image, in features, out features); weight (out, in), input (rows, in)
GEMMS = {
    "DeiT-Tiny fc1 192->768": (TOKENS, 192, 768),
    "DeiT-Small qkv 384->1152": (TOKENS, 384, 1152),
    "DeiT-Small fc2 1536->384": (TOKENS, 1536, 384),
    "ResNet-50 l2 3x3 128 (28x28)": (28 * 28, 128 * 9, 128),
    "ResNet-50 l3 1x1 1024->256 (14x14)": (14 * 14, 1024, 256),
    "ResNet-50 l4 3x3 512 (7x7)": (7 * 7, 512 * 9, 512),
}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_1min() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


class BusyGuard:
    """Whether speedups may be printed: not while the load exceeded the cores.

    ``check()`` is called before and after each timed row; a row whose timing saw the machine
    busier than its cores gets no speedup (its times are kept: they say how slow it was).
    """

    def __init__(self) -> None:
        self.cores = usable_cores()
        self.worst: float | None = None
        self.refused = 0

    def busy(self) -> bool:
        load = load_1min()
        if load is None:
            return False
        self.worst = load if self.worst is None else max(self.worst, load)
        return load > self.cores

    def speedup(self, busy: bool, base: float, other: float) -> str:
        if busy:
            self.refused += 1
            return "busy"
        return f"{base / other:.2f}x"

    def summary(self) -> str:
        if not self.refused:
            return ""
        return (
            f"No speedup printed for {self.refused} cell(s) marked 'busy': the machine was busier "
            f"than its {self.cores} cores (1-minute load average up to {self.worst:.2f}) while "
            "they were timed, which makes ratios meaningless. Rerun on an idle machine."
        )


def compare(fns: dict[str, Callable[[], object]], budget: float,
            sync: Callable[[], None] = lambda: None) -> dict[str, float]:  # fmt: skip
    """Median seconds per call of each function, timed in turns (one call each per round) so
    that a change in the machine's load hits all of them alike: one warm-up round, then rounds
    until each had ``budget`` seconds and at least 2 calls."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    sync()
    while min(sum(t) for t in times.values()) < budget or len(times[next(iter(fns))]) < 2:
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(t) for k, t in times.items()}


def prune_(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``sparsity`` share of smallest-magnitude entries (in place)."""
    k = round(sparsity * weight.numel())
    if k:
        threshold = weight.abs().reshape(-1).kthvalue(k).values
        weight[weight.abs() <= threshold] = 0.0
    return weight


class CSRLinear(nn.Module):
    """A Linear layer whose weight is a CSR sparse matrix: y = (W_csr @ x^T)^T + b."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.weight = layer.weight.detach().to_sparse_csr()
        self.bias = None if layer.bias is None else layer.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def csr_model(model: nn.Module, min_sparsity: float | None = None) -> nn.Module:
    """A copy of ``model`` with Linear layers as :class:`CSRLinear`: every block Linear layer
    (``min_sparsity`` None, the built-in ViT case), else every Linear layer with at least that
    share of zero weights."""
    import copy

    out = copy.deepcopy(model)
    for name, layer in list(out.named_modules()):
        if not isinstance(layer, nn.Linear):
            continue
        if min_sparsity is None:
            chosen = name.startswith("blocks.")
        else:
            zeros = float((layer.weight == 0).float().mean())
            chosen = zeros > 0 and zeros >= min_sparsity
        if chosen:
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, CSRLinear(layer))
    return out


def ort_runner(module: nn.Module, x: torch.Tensor, folder: Path, threads: int):  # noqa: ANN201
    """A function running ``module`` exported to ONNX on ``x`` with ONNX Runtime."""
    from utils import onnx_io

    path = onnx_io.export_onnx(module, x, folder / "m.onnx")
    sess = onnx_io.session(path, threads)
    return lambda: onnx_io.run(sess, x)


def bench_model(rows: list[list[str]], batches, sparsities, threads: int, budget: float,
                guard: BusyGuard) -> None:  # fmt: skip
    from utils.compat import ensure_torchvision

    ensure_torchvision()
    import timm

    from utils import models  # noqa: F401  (registers vit_digits)

    torch.manual_seed(0)
    dense = timm.create_model("vit_digits").eval()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, 3, 32, 32)
            for s in sparsities:
                pruned = timm.create_model("vit_digits").eval()
                pruned.load_state_dict(dense.state_dict())
                for name, layer in pruned.named_modules():
                    if isinstance(layer, nn.Linear) and name.startswith("blocks."):
                        prune_(layer.weight.data, s)
                sparse = csr_model(pruned)
                fns = {
                    "dense": lambda m=pruned, x=x: m(x),
                    "csr": lambda m=sparse, x=x: m(x),
                    "ort": ort_runner(pruned, x, Path(tmp), threads),
                }
                busy = guard.busy()
                times = compare(fns, budget)
                busy = guard.busy() or busy
                rows.append(cpu_row("vit_digits (whole model)", batch, s, times, guard, busy))


def bench_gemms(rows: list[list[str]], gemms, batches, sparsities, threads: int, budget: float,
                guard: BusyGuard) -> None:  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name, (per_image, k, n) in gemms.items():
            torch.manual_seed(0)
            layer = nn.Linear(k, n, bias=False)
            weight = layer.weight.detach().clone()
            for batch in batches:
                x = torch.randn(per_image * batch, k)
                for s in sparsities:
                    layer.weight.data = prune_(weight.clone(), s)
                    w = layer.weight.detach().to_sparse_csr()
                    fns = {
                        "dense": lambda lay=layer, x=x: lay(x),
                        "csr": lambda w=w, x=x: torch.sparse.mm(w, x.t()),
                        "ort": ort_runner(layer, x, Path(tmp), threads),
                    }
                    busy = guard.busy()
                    times = compare(fns, budget)
                    busy = guard.busy() or busy
                    rows.append(cpu_row(name, batch, s, times, guard, busy))


def cpu_row(name: str, batch: int, s: float, t: dict[str, float], guard: BusyGuard,
            busy: bool) -> list[str]:  # fmt: skip
    dense, csr, ort = t["dense"], t["csr"], t["ort"]
    return [name, str(batch), f"{100 * s:.0f}%", f"{1e3 * dense:.2f}", f"{1e3 * csr:.2f}",
            guard.speedup(busy, dense, csr), f"{1e3 * ort:.2f}",
            guard.speedup(busy, dense, ort)]  # fmt: skip


def build_user_model(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, ...]]:
    """The ``--model`` (timm name, or one registered in ``utils.models``) with its weights, in
    eval mode, and its input shape (C, H, W)."""
    from utils.compat import ensure_torchvision

    ensure_torchvision()
    import timm
    from timm.data import resolve_data_config

    from utils import models

    models.check_model_name(args.model)
    kwargs = models.model_kwargs(args)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    torch.manual_seed(0)
    model = timm.create_model(args.model, **kwargs).eval()
    if args.initial_checkpoint:
        models.load_weights(model, args.initial_checkpoint, "--initial-checkpoint")
    if args.prune:
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    prune_(layer.weight.data, args.prune)
    cfg = resolve_data_config({"img_size": args.img_size}, model=model)
    return model, tuple(cfg["input_size"])


def linear_sparsity(model: nn.Module) -> tuple[float, float]:
    """(zeros in Linear weights, zeros in Linear and Conv weights), as fractions."""
    lin = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    conv = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]

    def share(ws: list[torch.Tensor]) -> float:
        total = sum(w.numel() for w in ws)
        return sum(int((w == 0).sum()) for w in ws) / total if total else 0.0

    return share(lin), share(lin + conv)


def bench_user_model(args: argparse.Namespace, guard: BusyGuard, budget: float) -> None:
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
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for batch in args.batch_sizes:
            x = torch.randn(batch, *shape)
            fns = {
                "dense": lambda x=x: model(x),
                "csr": lambda x=x: sparse(x),
                "ort": ort_runner(model, x, Path(tmp), args.threads),
            }
            busy = guard.busy()
            t = compare(fns, budget)
            busy = guard.busy() or busy
            rows.append([str(batch), f"{1e3 * t['dense']:.2f}", f"{1e3 * t['csr']:.2f}",
                         guard.speedup(busy, t["dense"], t["csr"]), f"{1e3 * t['ort']:.2f}",
                         guard.speedup(busy, t["dense"], t["ort"])])  # fmt: skip


def bench_cuda(rows: list[list[str]], gemms, batches, budget: float) -> None:
    from torch.sparse import to_sparse_semi_structured

    sync = torch.cuda.synchronize
    for name, (per_image, k, n) in gemms.items():
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        w24 = w.view(-1, 4).scatter(1, w.abs().view(-1, 4).argsort(dim=1)[:, :2], 0).view(n, k)
        try:
            sparse = to_sparse_semi_structured(w24)
        except (RuntimeError, ValueError) as err:
            rows.append([name, "-", "2:4", "-", f"not convertible: {str(err)[:60]}", "-"])
            continue
        for batch in batches:
            x = torch.randn(per_image * batch, k, device="cuda", dtype=torch.float16)
            with torch.inference_mode():
                t = compare({"dense": lambda x=x, w=w24: torch.nn.functional.linear(x, w),
                             "2:4": lambda x=x, w=sparse: torch.nn.functional.linear(x, w)},
                            budget, sync)  # fmt: skip
                t_dense, t_24 = t["dense"], t["2:4"]
            rows.append([name, str(batch), "2:4", f"{1e3 * t_dense:.3f}", f"{1e3 * t_24:.3f}",
                         f"{t_dense / t_24:.2f}x"])  # fmt: skip


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
