"""Block Fisher inverse: batched-GEMM + float64 Cholesky kernel vs the rank-1 Woodbury loop.

Baseline (as in the reference `EmpiricalBlockFisherInverse`): every block starts at I/damp and,
one gradient at a time, u = H_b g_b, H_b -= u u^T / (m + g_b^T u), batched over blocks, float32.
Kernels: `sparseml.kernels.fisher_build.block_fisher_inverse` (chunked `bmm` Gram + float64
Cholesky / cholesky_inverse, written back into the Gram storage), with the Gram accumulated in
float32 (the previous build) and in float64 (production: exact products, accurate at small
damp). A second table measures the error of both at damp down to 1e-10 ||G^T G / m||
against an exact rational oracle.

Each method runs in its own fresh subprocess so that its memory can be measured: peak extra
memory = ru_maxrss after the call minus the resident set size just before it, where the only
large allocation before the call is the (m, d) float32 gradient tensor (created without
temporaries). It therefore includes the (n_b, B, B) output itself (1.00x = the blocks).

    python research/bench/bench_fisher_inverse.py --d 200000 --block-size 192 --num-grads 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from exact_oracle import exact_fisher_inverse, rank_deficient_grads, rel_error, spectral_scale

from sparseml.errors import NumericalError
from sparseml.kernels.fisher import (
    accumulate_block_gram,
    invert_block_fisher,
    num_blocks,
    to_blocks,
)
from sparseml.kernels.fisher_build import block_fisher_inverse
from sparseml.kernels.packed import SymBlocks

# worker -> (table label, Gram dtype of the kernel; None = the reference loop)
WORKERS = {
    "baseline": ("rank-1 Woodbury loop (fp32)", None),
    "kernel32": ("kernel, fp32 Gram (previous build)", torch.float32),
    "kernel": ("kernel, fp64 packed Gram and H (production)", torch.float64),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d", type=int, default=200_000, help="flattened layer size")
    p.add_argument("--block-size", type=int, default=192)
    p.add_argument("--num-grads", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=128, help="gradients per GEMM (kernel)")
    p.add_argument("--damp", type=float, default=1e-6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--baseline-fraction",
        type=float,
        default=1.0,
        help="time the baseline on this fraction of the gradients and extrapolate linearly",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--out-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def woodbury_baseline(grads: torch.Tensor, block_size: int, damp: float, m: int) -> torch.Tensor:
    """Reference-style rank-1 loop over the rows of ``grads``; normalised by the full m."""
    n_b = num_blocks(grads.shape[1], block_size)
    H = torch.eye(block_size).div_(damp).repeat(n_b, 1, 1)
    for g in grads:
        gb = to_blocks(g, block_size).unsqueeze(-1)  # (n_b, B, 1)
        u = torch.bmm(H, gb)
        denom = (gb * u).sum(dim=(1, 2), keepdim=True).add_(m)
        u.div_(denom.sqrt_())
        H.baddbmm_(u, u.transpose(1, 2), alpha=-1.0)
    return H


def float64_oracle(args: argparse.Namespace, k: int) -> torch.Tensor:
    """Dense float64 inv(damp*I + G_b^T G_b / m) per block over the first k gradients."""
    grads = torch.randn(args.num_grads, args.d, generator=torch.Generator().manual_seed(args.seed))
    bsz = args.block_size
    pad = num_blocks(args.d, bsz) * bsz - args.d
    x = torch.nn.functional.pad(grads[:k].double(), (0, pad)).view(k, -1, bsz)
    del grads
    eye = torch.eye(bsz, dtype=torch.float64)
    out = torch.empty(x.shape[1], bsz, bsz)
    torch.set_num_threads(1)  # see sparseml.kernels.chunking.for_each_chunk
    for s in range(0, x.shape[1], 64):
        xs = x[:, s : s + 64].transpose(0, 1)  # (n, k, B)
        gram = xs.transpose(1, 2) @ xs
        out[s : s + 64] = torch.linalg.inv(args.damp * eye + gram / args.num_grads).float()
    return out


def small_damp_table() -> None:
    """Error of H at small damp on rank-deficient gradients, fp32 vs fp64 Gram, exact oracle."""
    grads, bsz = rank_deficient_grads(48, 32, seed=4), 16
    exact = [exact_fisher_inverse(grads[:, s : s + bsz], 1.0) for s in (0, bsz)]  # warm-up
    print()
    print("Small damp (m=48, B=16, rank-deficient fp32 gradients; exact rational oracle):")
    print("| damp / norm(G^T G / m) | fp32 Gram error | fp64 Gram error |")
    print("|---:|---:|---:|")
    for ratio in (1e-4, 1e-6, 1e-8, 1e-10):
        damp = ratio * max(spectral_scale(grads[:, s : s + bsz]) for s in (0, bsz))
        exact = [exact_fisher_inverse(grads[:, s : s + bsz], damp) for s in (0, bsz)]
        cells = []
        for dtype in (torch.float32, torch.float64):
            try:
                H = block_fisher_inverse(grads, bsz, damp, gram_dtype=dtype)
                cells.append(f"{max(rel_error(h, e) for h, e in zip(H, exact)):.1e}")
            except NumericalError:
                cells.append("not PD (error)")
        print(f"| {ratio:.0e} | {cells[0]} | {cells[1]} |")
    print("error = max over blocks of max|H - H_exact| / max|H_exact|")


def run_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    m, d, bsz = args.num_grads, args.d, args.block_size
    # Warm up the BLAS/LAPACK paths of both methods on a tiny problem (one-time init costs).
    small = torch.randn(4, 4 * bsz)
    woodbury_baseline(small, bsz, args.damp, 4)
    block_fisher_inverse(small, bsz, args.damp)
    grads = torch.randn(m, d, generator=torch.Generator().manual_seed(args.seed))
    k = max(1, math.ceil(args.baseline_fraction * m))
    rss0, maxrss0 = current_rss_bytes(), maxrss_bytes()
    t0 = time.perf_counter()
    if args.worker == "baseline":
        H = woodbury_baseline(grads[:k], bsz, args.damp, m)
    else:
        dtype = WORKERS[args.worker][1]
        H = block_fisher_inverse(
            grads, bsz, args.damp, chunk_size=args.chunk_size, gram_dtype=dtype
        )
    seconds = time.perf_counter() - t0
    peak = maxrss_bytes()
    if args.worker != "baseline" and k < m:
        # The baseline saw only k gradients (normalised by m): compare with the same matrix.
        gram = torch.zeros(num_blocks(d, bsz), bsz, bsz, dtype=WORKERS[args.worker][1])
        H = invert_block_fisher(accumulate_block_gram(grads[:k], bsz, out=gram), m, args.damp)
    H = H.full() if isinstance(H, SymBlocks) else H  # production: packed float64 triangles
    H.float().numpy().tofile(args.out_file)
    row = {"seconds": seconds, "grads_used": k if args.worker == "baseline" else m}
    row.update(extra_bytes=peak - rss0, rss_before=rss0, maxrss_before=maxrss0)
    print(json.dumps(row))


def spawn(args: argparse.Namespace, worker: str, out_file: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", worker, "--out-file", out_file]
    for name in ("d", "block_size", "num_grads", "chunk_size", "damp", "threads", "seed"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += ["--baseline-fraction", str(args.baseline_fraction)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{worker} worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    n_b = num_blocks(args.d, args.block_size)
    blocks_bytes = n_b * args.block_size**2 * 4
    with tempfile.TemporaryDirectory() as tmp:
        res = {w: spawn(args, w, os.path.join(tmp, f"{w}.f32")) for w in WORKERS}
        Hs = {
            w: torch.from_file(os.path.join(tmp, f"{w}.f32"), size=n_b * args.block_size**2)
            for w in res
        }
    scale = args.num_grads / res["baseline"]["grads_used"]
    t_base = res["baseline"]["seconds"] * scale
    t_kern = res["kernel"]["seconds"]
    rel = float((Hs["kernel"] - Hs["baseline"]).abs().max() / Hs["baseline"].abs().max())
    oracle = float64_oracle(args, res["baseline"]["grads_used"]).view(-1)
    err = {w: float((Hs[w] - oracle).abs().max() / oracle.abs().max()) for w in Hs}

    print(
        f"d={args.d} B={args.block_size} m={args.num_grads} n_b={n_b} damp={args.damp:g} "
        f"chunk={args.chunk_size} threads={args.threads} torch={torch.__version__}"
    )
    print(
        f"fp32 Fisher blocks: {blocks_bytes / 2**20:.1f} MiB; "
        f"gradients (input, not counted): {args.num_grads * args.d * 4 / 2**20:.1f} MiB"
    )
    if scale != 1.0:
        print(
            f"NOTE: baseline timed on {res['baseline']['grads_used']} of {args.num_grads} "
            f"gradients and extrapolated linearly (x{scale:.2f}); H compared on that prefix."
        )
    print()
    print(
        "| method | time (s) | speed-up | peak extra mem (MiB) | extra / blocks "
        "| max err vs fp64 oracle |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    if args.num_grads < args.block_size:
        print("(m < B: both kernels use the m-space Woodbury form in float64)")
    for w, (name, _) in WORKERS.items():
        t = t_base if w == "baseline" else res[w]["seconds"]
        extra = res[w]["extra_bytes"]
        print(
            f"| {name} | {t:.3f} | {t_base / t:.1f}x | {extra / 2**20:.1f} | "
            f"{extra / blocks_bytes:.2f}x | {err[w]:.1e} |"
        )
    print()
    print(
        f"fp64 Gram vs fp32 Gram (production vs previous build): time "
        f"{t_kern / res['kernel32']['seconds']:.2f}x"
    )
    print(
        f"max |H_kernel - H_baseline| / max |H_baseline| = {rel:.2e} "
        "(relative to the largest entry of H, not entrywise)"
    )
    print(
        "max err vs fp64 oracle: the same relative measure against a dense float64 "
        "torch.linalg.inv of each damped block, computed from float64 gradients."
    )
    print(
        "peak extra memory = ru_maxrss after the call - RSS just before it, in a fresh "
        "subprocess per method; it includes the output H (1.00x = the fp32 blocks)."
    )
    small_damp_table()
    for w in res:
        if res[w]["maxrss_before"] > res[w]["rss_before"] + blocks_bytes // 20:
            print(
                f"WARNING: {w}: the RSS high-water mark before the call exceeded the RSS, so "
                "its peak extra memory may be under-counted."
            )


if __name__ == "__main__":
    main()
