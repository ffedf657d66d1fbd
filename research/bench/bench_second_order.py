"""Side by side: the reference's block Fisher and CAP against ours, with the GEMM bound.

One random problem per size d (float32 gradients (m, d), weights, B, damp), solved twice, each
in a fresh process so that its peak is its own:

* reference: the block inverses by m rank-1 Woodbury updates in float32 (as CAP's code builds
  them), then CAP's loop with per-step weight traces and a global threshold per sparsity
  (`bench_fisher_inverse.woodbury_baseline`, `bench_cap.run_reference`);
* ours: `BlockFisherBuilder` fed chunks of 64 samples (packed float64 Grams and inverses), then
  `cap_eliminate_factored` and, per sparsity, the threshold and `cap_prefix_weights` (as the
  pruner runs them; an earlier commit without them runs `cap_eliminate` and
  `cap_reconstruct`).

Per run: seconds of the Fisher build and of CAP (elimination + every sparsity), and of the
elimination alone; the peak extra memory (VmHWM minus the resident set once the gradients and
weights exist) against the float32 inverse blocks (n_b B^2 x 4 bytes) and one chunk of 64
gradients; this process's float64 GEMM rate (a 2048^2 ``torch.mm``, best of 3) and what it
allows for the flop counts: Fisher 2 m d B (Gram) + d B^2 (Cholesky and inverse), CAP's
elimination 2 d B^2 (nominal, as `bench_scaling` counts it). Then the share of mask entries on
which both agree. Rows are printed as a table and appended to ``--out`` (JSONL) when given.

    python research/bench/bench_second_order.py --d 196608 786432
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CHUNK = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d", type=int, nargs="+", default=[196_608, 786_432])
    p.add_argument("--block-size", type=int, default=192)
    p.add_argument("--num-grads", type=int, default=256)
    p.add_argument("--damp", type=float, default=1e-4)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["reference", "ours"])
    p.add_argument("--out", default=None, help="append the rows to this JSONL file")
    p.add_argument("--label", default="", help="a note stored with the rows (e.g. the commit)")
    p.add_argument("--worker", nargs=2, metavar=("METHOD", "D"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rss() -> tuple[int, int]:
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024


def gemm_rate(dtype: torch.dtype, n: int = 2048) -> float:
    a = torch.randn(n, n, dtype=dtype)
    a @ a
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def warm_up() -> float:
    """Seconds to import our kernels and run them once on a tiny problem, which loads (or, on
    the first run after an install, compiles) the compiled CPU kernels: a per-process cost
    kept out of the timed phases and of the peak."""
    t = time.perf_counter()
    from sparseml.kernels.cap import cap_eliminate
    from sparseml.kernels.fisher_build import block_fisher_inverse

    H = block_fisher_inverse(torch.randn(16, 64), 8, 1e-2)
    cap_eliminate(torch.randn(8, 8), H, torch.zeros(8, 8, dtype=torch.bool))
    return time.perf_counter() - t


def problem(d: int, args: argparse.Namespace):
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(args.num_grads, d, generator=gen)
    B = args.block_size
    n_b = math.ceil(d / B)
    valid = (torch.arange(n_b * B) < d).view(n_b, B)
    W = torch.randn(n_b, B, generator=gen).masked_fill(~valid, 0.0)
    return grads, W, valid


def run_reference(grads, W, valid, args) -> tuple[dict, dict]:
    from bench_cap import reference_eliminate, select
    from bench_fisher_inverse import woodbury_baseline

    t0 = time.perf_counter()
    H = woodbury_baseline(grads, args.block_size, args.damp, args.num_grads)
    t1 = time.perf_counter()
    losses, traces = reference_eliminate(W, H, -1)
    t2 = time.perf_counter()
    masks = {}
    for s in args.sparsities:
        removed = select(losses, valid, s) | ~valid
        traces[removed.sum(1), torch.arange(W.shape[0])]
        masks[s] = removed
    t3 = time.perf_counter()
    return {"fisher_s": t1 - t0, "elimination_s": t2 - t1, "cap_s": t3 - t1}, masks


def run_ours(grads, W, valid, args) -> tuple[dict, dict]:
    from bench_cap import select

    from sparseml.kernels.cap import cap_eliminate, cap_reconstruct, prefix_counts, prefix_mask

    try:
        from sparseml.kernels.fisher_build import BlockFisherBuilder
    except ImportError:  # an earlier commit measured with this script (PYTHONPATH=<its src>)
        from sparseml.kernels.fisher import BlockFisherBuilder

    m, d = grads.shape
    t0 = time.perf_counter()
    builder = BlockFisherBuilder(d, args.block_size, m, args.damp)
    for s in range(0, m, CHUNK):
        builder.add(grads[s : s + CHUNK])
    H = builder.finish()
    t1 = time.perf_counter()
    none = torch.zeros_like(valid)
    try:  # what the pruner runs: the elimination keeps its factors, the weights are replayed
        from sparseml.kernels.cap import cap_eliminate_factored, cap_prefix_weights

        order, losses, replay = cap_eliminate_factored(W, H, none, valid=valid)
        rebuild = lambda counts: cap_prefix_weights(W, H, order, counts, replay, ~valid)  # noqa: E731
    except ImportError:  # an earlier commit: the weights are solved from H
        order, losses = cap_eliminate(W, H, none, valid=valid)
        rebuild = lambda counts: cap_reconstruct(W, H, order, counts)  # noqa: E731
    t2 = time.perf_counter()
    masks = {}
    for s in args.sparsities:
        counts = prefix_counts(order, select(losses, valid, s), valid)
        rebuild(counts)
        masks[s] = ~prefix_mask(order, counts)
    t3 = time.perf_counter()
    return {"fisher_s": t1 - t0, "elimination_s": t2 - t1, "cap_s": t3 - t1}, masks


def worker(method: str, d: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    rate64, rate32 = gemm_rate(torch.float64), gemm_rate(torch.float32)
    warm = warm_up() if method == "ours" else 0.0
    grads, W, valid = problem(d, args)
    before = rss()[0]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    times, masks = (run_reference if method == "reference" else run_ours)(grads, W, valid, args)
    peak = rss()[1] - before
    B, m = args.block_size, args.num_grads
    n_b = W.shape[0]
    row = {
        "method": method,
        "d": d,
        "B": B,
        "m": m,
        "damp": args.damp,
        "threads": args.threads,
        **times,
        "peak_mib": peak / 2**20,
        "blocks32_mib": n_b * B * B * 4 / 2**20,
        "chunk_mib": CHUNK * d * 4 / 2**20,
        "gemm64_gflops": rate64 / 1e9,
        "gemm32_gflops": rate32 / 1e9,
        "fisher_bound_s": (2 * m * d * B + d * B * B) / rate64,
        "elimination_bound_s": 2 * d * B * B / rate64,
        "label": args.label,
        "warm_up_s": warm,
    }
    torch.save({"row": row, "masks": masks}, args.result)


def spawn(method: str, d: int, args: argparse.Namespace, tmp: Path) -> tuple[dict, dict]:
    out = tmp / f"{method}-{d}.pt"
    argv = [sys.executable, __file__, "--worker", method, str(d), "--result", str(out)]
    argv += ["--block-size", str(args.block_size), "--num-grads", str(args.num_grads)]
    argv += ["--damp", repr(args.damp), "--threads", str(args.threads), "--label", args.label]
    argv += ["--sparsities", *map(str, args.sparsities)]
    subprocess.run(argv, check=True)
    saved = torch.load(out, weights_only=False)
    return saved["row"], saved["masks"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for d in args.d:
            runs = {m: spawn(m, d, args, Path(tmp)) for m in args.methods}
            if len(runs) == 2:
                (_, a), (_, b) = runs.values()
                agree = {s: float((a[s] == b[s]).float().mean()) for s in args.sparsities}
                for row, _ in runs.values():
                    row["mask_agreement"] = agree
            rows += [row for row, _ in runs.values()]
    head = (
        f"{'method':<10}{'d':>9}{'Fisher s':>10}{'x bound':>9}{'CAP s':>8}{'elim s':>8}"
        f"{'x bound':>9}{'peak MiB':>10}{'x fp32 blocks+chunk':>21}{'GEMM64 GF/s':>13}"
    )
    print(head)
    for r in rows:
        budget = r["blocks32_mib"] + r["chunk_mib"]
        print(
            f"{r['method']:<10}{r['d']:>9}{r['fisher_s']:>10.2f}"
            f"{r['fisher_s'] / r['fisher_bound_s']:>9.2f}{r['cap_s']:>8.2f}"
            f"{r['elimination_s']:>8.2f}{r['elimination_s'] / r['elimination_bound_s']:>9.2f}"
            f"{r['peak_mib']:>10.0f}{r['peak_mib'] / budget:>21.2f}{r['gemm64_gflops']:>13.1f}"
        )
    for d in args.d:
        got = {r["method"]: r for r in rows if r["d"] == d}
        if len(got) == 2:
            ref, ours = got["reference"], got["ours"]
            print(
                f"d={d}: ours vs reference: Fisher {ref['fisher_s'] / ours['fisher_s']:.1f}x, "
                f"CAP {ref['cap_s'] / ours['cap_s']:.1f}x faster; masks agree "
                + ", ".join(f"{100 * v:.3f}%" for v in ours["mask_agreement"].values())
            )
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
