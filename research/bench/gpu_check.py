"""One GPU check: the ``gpu``-marked tests and the CUDA benchmarks, printed as one table.

    bash research/bench/gpu_check.sh        # or: python research/bench/gpu_check.py

Runs the CUDA paths of the Fisher, OBS, CAP, FastCAP and M-FAC kernels, modifiers and the
M-FAC optimizer against their CPU results, AMP training steps and ``fisher_inv_device`` /
``available_devices`` (``pytest -m gpu``), then times the Fisher build (float32 Gram, and
production's packed float64) and CAP elimination with their ratio to the float64 GEMM bound
(as ``bench_second_order.py`` counts it), FastCAP and the M-FAC build at DeiT-Small layer
sizes on CUDA, and a
2:4 semi-structured DeiT-Small fc1 against dense (``research/export.py --formats
semi_structured`` runs the same conversion; its test is ``tests/test_export.py``).
Exits 0 with a message where CUDA is absent; non-zero when a test fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# DeiT-Small (embed 384, MLP 1536): qkv, proj, fc1, fc2 weights
LAYERS = {"qkv": 384 * 1152, "proj": 384 * 384, "fc1": 1536 * 384, "fc2": 384 * 1536}


def run_tests(rows: list[tuple]) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "gpu.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", f"--junitxml={xml}", "tests"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if not os.path.exists(xml):
            print(done.stdout[-4000:], done.stderr[-4000:])
            rows.append(("tests", "pytest -m gpu", "did not run", ""))
            return False
        ok = True
        for case in ET.parse(xml).getroot().iter("testcase"):
            status = "passed"
            if case.find("failure") is not None or case.find("error") is not None:
                status, ok = "FAILED", False
            elif case.find("skipped") is not None:
                status = "skipped"
            rows.append(("test", case.get("name"), status, f"{float(case.get('time', 0)):.2f} s"))
        if not ok:
            print(done.stdout[-6000:])
        return ok


def timed(fn) -> float:
    fn()  # warm-up (CUDA context, kernels, allocator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def gemm64_rate() -> float:
    """FLOP/s of a 4096^2 float64 ``torch.mm`` on this GPU (best of 3)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float64)
    return 2 * 4096**3 / min(timed(lambda: a @ a) for _ in range(3))


def bench_layer(rows: list[tuple], name: str, d: int, m: int, block: int, rate: float) -> None:
    from sparseml.kernels.cap import cap_eliminate
    from sparseml.kernels.fast_cap import accumulate_shared_fisher, fast_cap_prune
    from sparseml.kernels.fisher import to_blocks
    from sparseml.kernels.fisher_build import block_fisher_inverse
    from sparseml.kernels.mfac import MFACInverse

    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = torch.randn(m, d, device="cuda", generator=gen)
    W = to_blocks(torch.randn(d, device="cuda", generator=gen), block)
    case = f"{name} d={d} B={block} m={m}"
    # the ratios to what the float64 GEMM rate allows, counted as bench_second_order does
    fisher_bound = (2 * m * d * block + d * block * block) / rate
    for dtype in (torch.float32, torch.float64):
        t = timed(lambda dt=dtype: block_fisher_inverse(grads, block, 1e-6, gram_dtype=dt))
        label = "float64 packed (production)" if dtype == torch.float64 else "float32 Gram"
        result = f"{t:.3f} s ({t / fisher_bound:.1f}x GEMM bound)"
        rows.append(("bench", f"Fisher build, {label}", case, result))
    H = block_fisher_inverse(grads, block, 1e-6)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    t = timed(lambda: cap_eliminate(W, H, pruned))
    bound = 2 * d * block * block / rate
    rows.append(("bench", "CAP elimination", case, f"{t:.3f} s ({t / bound:.1f}x GEMM bound)"))
    Fs = accumulate_shared_fisher(grads, block)
    t = timed(lambda: fast_cap_prune(W, Fs, m, 0.5, damp=1e-2, block_size=block))
    rows.append(("bench", "FastCAP prune 50%", case, f"{t:.3f} s"))
    t = timed(lambda: MFACInverse.build(grads, 1e-6, block))
    rows.append(("bench", "M-FAC build (blocked)", case, f"{t:.3f} s"))


def run_benchmarks(rows: list[tuple], m: int, block: int) -> None:
    rate = gemm64_rate()
    rows.append(("bench", "float64 GEMM rate", "4096^2 torch.mm", f"{rate / 1e9:.0f} GFLOP/s"))
    for name, d in LAYERS.items():
        bench_layer(rows, name, d, m, block, rate)
        torch.cuda.empty_cache()
    bench_semi_structured(rows)


def bench_semi_structured(rows: list[tuple]) -> None:
    """2:4 semi-structured fc1 of DeiT-Small (batch 64 x 197 tokens) against dense, float16."""
    sys.path.insert(0, str(ROOT / "research"))
    from utils.semi_structured import convert_linears, cuda_problem

    problem = cuda_problem()
    if problem:
        rows.append(("bench", "2:4 semi-structured fc1", "DeiT-Small, float16", problem))
        return
    layer = torch.nn.Linear(384, 1536, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        w = layer.weight.view(-1, 4)
        w.scatter_(1, w.abs().argsort(dim=1)[:, :2], 0.0)
    x = torch.randn(64 * 197, 384, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        ref = layer(x)
        t_dense = timed(lambda: layer(x))
        converted = convert_linears(torch.nn.Sequential(layer))
        if not converted[0]["converted"]:
            rows.append(("bench", "2:4 semi-structured fc1", "DeiT-Small", converted[0]["reason"]))
            return
        diff = float((layer(x) - ref).abs().max())
        t_sparse = timed(lambda: layer(x))
    case = f"DeiT-Small fc1 384->1536, 12608 rows, float16, max abs diff {diff:.2g}"
    rows.append(("bench", "dense / 2:4 semi-structured", case,
                 f"{1e3 * t_dense:.3f} / {1e3 * t_sparse:.3f} ms ({t_dense / t_sparse:.2f}x)"))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--num-grads", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=192)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available here: GPU checks skipped (nothing to run).")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows: list[tuple] = []
    ok = True if args.skip_tests else run_tests(rows)
    run_benchmarks(rows, args.num_grads, args.block_size)
    print("| kind | check | case | result |")
    print("|---|---|---|---:|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
