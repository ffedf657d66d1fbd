"""How the two heavy kernels scale, and how far they are from this machine's GEMM rate.

* Fisher build: ``sparseml.kernels.fisher_build.block_fisher_inverse`` (``BlockFisherBuilder``, the
  entry production uses), Gram path (m >= B): accumulation 2 m d B flops + inversion ~d B^2.
* CAP elimination: ``sparseml.kernels.cap.cap_eliminate``: per block, B greedy steps over a
  B x B inverse, nominally 2 d B^2 flops (the count used for its GFLOP/s).

Each is timed over 3 values of d, of B and (Fisher only) of m, the others at their middle
value; an exponent k of t ~ x^k is fitted by least squares on log t against log x (expected:
Fisher 1 in d, ~1 in m (less where the d B^2 inversion weighs), between 1 and 2 in B; CAP 1 in
d, ~2 in B). The achieved GFLOP/s is divided by the measured rate of a large float32 and
float64 ``torch.mm`` (the Gram runs in float64, CAP in float64): that ratio is the share of
the machine's matrix-multiply limit each kernel reaches. Rows: ``<out>/scaling/scaling.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from bench_common import guarded, record, records

from sparseml.serialization import atomic_write_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--d", nargs=3, type=int, default=[250_000, 500_000, 1_000_000])
    p.add_argument("--B", nargs=3, type=int, default=[64, 128, 256])
    p.add_argument("--m", nargs=3, type=int, default=[256, 512, 1024], help="each >= max B")
    p.add_argument("--gemm-n", type=int, default=2048, help="size of the reference torch.mm")
    p.add_argument("--repeats", type=int, default=2, help="best of N timings")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if min(args.m) < max(args.B):
        p.error(f"--m values {args.m} must be >= the largest --B {max(args.B)} (Gram path)")
    return args


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_rate(n: int, dtype, repeats: int) -> float:
    """GFLOP/s of a large square matrix product in ``dtype`` (best of ``repeats``)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    return 2 * n**3 / best_time(lambda: torch.mm(a, b), repeats) / 1e9


def grid(args: argparse.Namespace) -> list[tuple[str, int, int, int]]:
    """(axis, d, B, m) points: each axis swept with the others at their middle value."""
    d0, b0, m0 = args.d[1], args.B[1], args.m[1]
    points = [("d", d, b0, m0) for d in args.d] + [("B", d0, b, m0) for b in args.B]
    points += [("m", d0, b0, m) for m in args.m]
    return list(dict.fromkeys(points))


def measure(d: int, B: int, m: int, repeats: int, with_cap: bool) -> dict[str, float]:
    import torch

    from sparseml.kernels.cap import cap_eliminate
    from sparseml.kernels.fisher import to_blocks
    from sparseml.kernels.fisher_build import block_fisher_inverse

    g = torch.Generator().manual_seed(0)
    grads = torch.randn(m, d, generator=g)
    out = {}
    H = None

    def build():
        nonlocal H
        H = None  # the previous H is freed before the next is built
        H = block_fisher_inverse(grads, B, 1e-4)

    out["fisher_s"] = best_time(build, repeats)
    out["fisher_gflop"] = (2 * m * d * B + d * B * B) / 1e9
    grads = None  # freed before CAP runs
    if with_cap:
        W = to_blocks(torch.randn(d, generator=g), B)
        valid = to_blocks(torch.ones(d), B) > 0
        pruned = torch.zeros_like(valid)
        # the packed float64 inverses, as production hands them to CAP
        out["cap_s"] = best_time(lambda: cap_eliminate(W, H, pruned, valid=valid), repeats)
        out["cap_gflop"] = 2 * d * B * B / 1e9
    return out


def fit_exponent(xs: list[float], ts: list[float]) -> float:
    """Least-squares slope of log t against log x."""
    lx, lt = [math.log(x) for x in xs], [math.log(t) for t in ts]
    mx, mt = sum(lx) / len(lx), sum(lt) / len(lt)
    return sum((a - mx) * (b - mt) for a, b in zip(lx, lt)) / sum((a - mx) ** 2 for a in lx)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    path = Path(args.out) / "scaling" / "scaling.jsonl"
    done = records(path)
    key = f"gemm|n={args.gemm_n}|threads={args.threads}"
    if key not in done:
        print(f"== scaling: reference GEMM n={args.gemm_n}", flush=True)
        rates = {f"gemm_{n}_gflops": gemm_rate(args.gemm_n, dt, args.repeats)
                 for n, dt in (("fp32", torch.float32), ("fp64", torch.float64))}  # fmt: skip
        done[key] = record(path, key, {"kind": "gemm", "n": args.gemm_n, **rates})
    for axis, d, B, m in grid(args):
        key = f"point|d={d}|B={B}|m={m}|threads={args.threads}"
        if key in done:
            continue
        print(f"== scaling: d={d} B={B} m={m}", flush=True)
        row = measure(d, B, m, args.repeats, with_cap=axis != "m" or m == args.m[1])
        done[key] = record(path, key, {"kind": "point", "d": d, "B": B, "m": m, **row})
    result = {"grid": {"d": args.d, "B": args.B, "m": args.m}, "exponents": fits(done, args)}
    atomic_write_text(path.with_name("fits.json"), json.dumps(result, indent=2) + "\n")
    print("fitted exponents: " + ", ".join(f"{k} {v:.2f}" for k, v in result["exponents"].items()))


def fits(done: dict, args: argparse.Namespace) -> dict[str, float]:
    """Fitted exponents ``{"fisher_d": k, ...}`` from the rows of this grid."""
    rows = {(r["d"], r["B"], r["m"]): r for r in done.values() if r.get("kind") == "point"}
    d0, b0, m0 = args.d[1], args.B[1], args.m[1]
    axes = {
        "d": [(d, (d, b0, m0)) for d in args.d],
        "B": [(b, (d0, b, m0)) for b in args.B],
        "m": [(m, (d0, b0, m)) for m in args.m],
    }
    out = {}
    for kernel in ("fisher", "cap"):
        for axis, pts in axes.items():
            got = [(x, rows[p][f"{kernel}_s"]) for x, p in pts if f"{kernel}_s" in rows.get(p, {})]
            if len(got) == len(pts):
                out[f"{kernel}_{axis}"] = fit_exponent(*zip(*got))
    return out


if __name__ == "__main__":
    guarded(main)
