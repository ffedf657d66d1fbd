"""Benchmark: one M-FAC optimizer step with exact (float64) vs float32 Gram products.

    python research/bench/bench_mfac_optimizer.py --d 1000000 --ngrads 256 --threads 1

Both optimizers see the same gradients; the window is filled first, then the median step time
over ``--steps`` steps is printed for each, with their ratio and the largest relative
difference of the resulting parameters.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparseml.optim.mfac import MFAC


def median_step(exact: bool, args: argparse.Namespace) -> tuple[float, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    p = torch.nn.Parameter(torch.zeros(args.d))
    opt = MFAC([p], lr=1e-3, ngrads=args.ngrads, damp=args.damp, exact=exact)
    times = []
    for i in range(args.ngrads + args.steps):
        p.grad = torch.randn(args.d, generator=gen)
        start = time.perf_counter()
        opt.step()
        if i >= args.ngrads:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], p.detach().clone()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=1_000_000)
    parser.add_argument("--ngrads", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the window fills")
    parser.add_argument("--damp", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_exact, p_exact = median_step(True, args)
    t_fast, p_fast = median_step(False, args)
    diff = float((p_exact - p_fast).abs().max() / p_exact.abs().max())
    print(f"d={args.d} ngrads={args.ngrads} damp={args.damp:g} threads={args.threads}")
    print("| Gram products | median step (ms) |")
    print("|---|---:|")
    print(f"| float64 (exact=True, default) | {t_exact * 1e3:.0f} |")
    print(f"| float32 (exact=False) | {t_fast * 1e3:.0f} |")
    print(
        f"ratio exact / float32: {t_exact / t_fast:.2f}x; max rel. parameter difference {diff:.1e}"
    )


if __name__ == "__main__":
    main()
