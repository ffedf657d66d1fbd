"""Where the block Fisher's and CAP's time goes, phase by phase, in one fresh process.

A random problem of d weights (default: DeiT-Tiny's 5,308,416 prunable block weights), m
float32 gradient samples fed in chunks of 64 (one chunk reused, as the pruners' sampler
reuses its buffers), B-sized blocks: each chunk's addition to the packed float64 Grams, the
inversion (which adds the last chunk: on the compiled path its own "add" row only holds it),
then CAP's elimination. Per phase: wall seconds, CPU
seconds in user and kernel mode, and minor page faults. The first chunk's pass writes the
packed Grams for the first time, so it pays the kernel's cost of mapping fresh memory (the
``sys`` column); the later passes show the arithmetic.

    python research/bench/bench_fisher_phases.py                 # DeiT-Tiny's d, m = 256
    python research/bench/bench_fisher_phases.py --d 786432 --num-grads 128
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from bench_common import guarded

from sparseml.kernels import native
from sparseml.kernels.cap import cap_eliminate_factored
from sparseml.kernels.fisher import to_blocks
from sparseml.kernels.fisher_build import BlockFisherBuilder

CHUNK = 64  # sparseml.pruning.estimators.GRAD_CHUNK


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d", type=int, default=5_308_416, help="weights (default: DeiT-Tiny's)")
    p.add_argument("--block-size", type=int, default=192)
    p.add_argument("--num-grads", type=int, default=256)
    p.add_argument("--damp", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.d < 1 or args.block_size < 1 or args.num_grads < args.block_size:
        p.error("needs d >= 1, B >= 1 and --num-grads >= --block-size (the Gram path)")
    if args.threads < 1 or not args.damp > 0:
        p.error("needs --threads >= 1 and --damp > 0")
    return args


def snapshot() -> tuple[float, float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_utime, r.ru_stime, r.ru_minflt


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    native.warm_up()
    d, B, m = args.d, args.block_size, args.num_grads
    g = torch.Generator().manual_seed(0)
    chunk = torch.randn(CHUNK, d, generator=g).mul_(1e-2)
    weights = to_blocks(torch.randn(d, generator=g), B).double()
    print(f"d={d:,} B={B} m={m} damp={args.damp:g} threads={args.threads} "
          f"compiled={native.ENABLED}")  # fmt: skip
    print(f"{'phase':<16}{'wall s':>8}{'user s':>8}{'sys s':>7}{'faults':>10}")
    total = [0.0] * 3

    def timed(name: str, work) -> object:
        before = snapshot()
        out = work()
        after = snapshot()
        spent = [b - a for a, b in zip(before, after)]
        total[:] = [t + s for t, s in zip(total, spent)]
        print(f"{name:<16}{spent[0]:>8.2f}{spent[1]:>8.2f}{spent[2]:>7.2f}{int(spent[3]):>10,}")
        return out

    builder = BlockFisherBuilder(d, B, m, args.damp)
    for i, start in enumerate(range(0, m, CHUNK)):
        rows = chunk[: min(CHUNK, m - start)]
        timed(f"chunk {i + 1} add", lambda rows=rows: builder.add(rows))
    H = timed("inversion", builder.finish)
    pruned = torch.zeros_like(weights, dtype=torch.bool)
    valid = torch.ones_like(pruned)
    timed("CAP elimination", lambda: cap_eliminate_factored(weights, H, pruned, valid=valid))
    print(f"{'total':<16}{total[0]:>8.2f}{total[1]:>8.2f}{total[2]:>7.2f}")


if __name__ == "__main__":
    guarded(main)
