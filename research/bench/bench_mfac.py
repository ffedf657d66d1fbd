"""Benchmark: static M-FAC, sequential m-step recursion vs the BLAS-3 (Gram + Cholesky) kernel.

Paper: "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information",
arXiv 2107.03356. Baseline is the paper's recursion as m GEMV passes in
float32; the kernel is `sparseml.kernels.mfac.MFACInverse`.

Peak memory: a thread samples the resident set size (/proc/self/statm) every millisecond while
a build runs; "extra" is the peak minus the RSS just before the call (G is already resident),
so it counts the result (V or Z, m*d floats, unless overwrite=True) plus temporaries. On CUDA
it is torch.cuda.max_memory_allocated minus the memory allocated before the call.

Time: "build s" is wall time; "build cpu s" is the CPU time of the process (all threads), a
better measure of the work done when other jobs share the cores.

The row "fp32 Gram (previous)" times the build as it was before the Gram products moved to
float64; a last table gives the error at damp down to 1e-10 ||G^T G / m|| for both, against
an exact rational oracle.

Accuracy: both methods are compared with each other and with a float64 evaluation of the same
inverse on a random sample of coordinates (`--sample`).

    python research/bench/bench_mfac.py --m 256 --d 1000000 --num-pages 8
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import threading
import time

import torch
from exact_oracle import exact_fisher_inverse, rank_deficient_grads, spectral_scale

import sparseml.kernels.mfac as mfac_kernel
from sparseml.errors import NumericalError
from sparseml.kernels.mfac import (
    MFACInverse,
    mfac_recursion_reference,
    recursion_diag,
    recursion_mul,
)


class PeakMemory:
    """Peak extra memory (bytes) during a `with` block: sampled RSS on CPU, allocator on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self._base)
            time.sleep(0.001)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self._base)


CPU_TIMES: list[float] = []  # process CPU seconds (all threads) of each timed call


def timed(device: torch.device, fn, *args, **kwargs):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    CPU_TIMES.append(time.process_time() - cpu)
    return out, time.perf_counter() - start


def float64_truth(grads, damp, x, idx, num_pages):
    """diag(F^-1) and (F^-1 x) on coordinates idx, in float64, paged over the columns of G."""
    m, d = grads.shape
    gram = torch.zeros(m, m, dtype=torch.float64, device=grads.device)
    gx = torch.zeros(m, dtype=torch.float64, device=grads.device)
    for a in range(0, d, -(-d // num_pages)):
        page = grads[:, a : a + -(-d // num_pages)].double()
        gram += page @ page.T
        gx += page @ x[a : a + page.shape[1]].double()
    gram /= damp
    gram.diagonal().add_(m)
    lower = torch.linalg.cholesky(gram)
    z_s = torch.linalg.solve_triangular(lower, grads[:, idx].double(), upper=False)
    zx = torch.linalg.solve_triangular(lower, gx[:, None], upper=False).squeeze(1)
    diag = 1 / damp - z_s.square().sum(0) / damp**2
    mul = x[idx].double() / damp - z_s.T @ zx / damp**2
    return diag, mul


@contextlib.contextmanager
def fp32_gram():
    """The previous build: Gram products in float32 GEMMs, cast to float64 afterwards."""
    saved = mfac_kernel.gram64, mfac_kernel.bmm64
    mfac_kernel.gram64 = lambda x: (x @ x.T).double()
    mfac_kernel.bmm64 = lambda a, b: torch.bmm(a, b).double()
    try:
        yield
    finally:
        mfac_kernel.gram64, mfac_kernel.bmm64 = saved


def small_damp_table() -> None:
    """Error of diag(F^-1) at small damp, fp32 vs fp64 Gram products, exact rational oracle."""
    grads = rank_deficient_grads(8, 12, seed=1)
    print()
    print("Small damp (m=8, d=12, full F, rank-deficient fp32 gradients; exact oracle):")
    print("| damp / norm(G^T G / m) | fp32 Gram diag error | fp64 Gram diag error |")
    print("|---:|---:|---:|")
    for ratio in (1e-4, 1e-6, 1e-8, 1e-10):
        damp = ratio * spectral_scale(grads)
        exact = exact_fisher_inverse(grads, damp)
        want = torch.tensor([float(exact[i][i]) for i in range(12)], dtype=torch.float64)
        cells = []
        for scope in (fp32_gram, contextlib.nullcontext):
            try:
                with scope():
                    diag = MFACInverse.build(grads.clone(), damp).diag().double()
                cells.append(f"{float((diag - want).abs().max() / want.abs().max()):.1e}")
            except NumericalError:
                cells.append("not PD (error)")
        print(f"| {ratio:.0e} | {cells[0]} | {cells[1]} |")
    print("error = max |diag - diag_exact| / max |diag_exact|")


def run_variant(grads, x, damp, kwargs, device):
    """Build (timed, memory-sampled), then diag and mul; kwargs None = the recursion."""
    work = grads.clone() if kwargs and kwargs.get("overwrite") else grads
    kwargs = dict(kwargs) if kwargs is not None else None
    previous = kwargs.pop("fp32_gram", False) if kwargs else False
    with PeakMemory(device) as mem, fp32_gram() if previous else contextlib.nullcontext():
        if kwargs is None:
            (vecs, den), t_build = timed(device, mfac_recursion_reference, work, damp)
        else:
            inv, t_build = timed(device, MFACInverse.build, work, damp, **kwargs)
    cpu_build = CPU_TIMES[-1]
    if kwargs is None:
        diag, t_diag = timed(device, recursion_diag, vecs, den, damp)
        mul, t_mul = timed(device, recursion_mul, vecs, den, damp, x)
    else:
        diag, t_diag = timed(device, inv.diag)
        mul, t_mul = timed(device, inv.mul, x)
    return diag, mul, (t_build, cpu_build), t_diag, t_mul, mem.peak


def rel(a, b):
    """Max elementwise relative difference (diag) and normwise max difference (mul)."""
    a, b = a.double(), b.double()
    return (a - b).abs().div(b.abs()).max().item(), ((a - b).abs().max() / b.abs().max()).item()


def accuracy(diag, mul, ref, idx, true_diag, true_mul, kwargs):
    """Differences to the recursion and to float64; n/a for blocks (a different F)."""
    if kwargs and kwargs.get("block_size"):
        return None, None, None, None
    return (
        rel(diag, ref[0])[0],
        rel(mul, ref[1])[1],
        rel(diag[idx], true_diag)[0],
        rel(mul[idx], true_mul)[1],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, default=256, help="number of gradients")
    parser.add_argument("--d", type=int, default=1_000_000, help="dimension")
    parser.add_argument("--num-pages", type=int, default=8, help="pages for the paged variant")
    parser.add_argument("--block-size", type=int, default=0, help="also time this block size")
    parser.add_argument("--damp", type=float, default=1e-5)
    parser.add_argument("--gscale", type=float, default=1e-3, help="std of gradient entries")
    parser.add_argument("--sample", type=int, default=20000, help="coordinates for fp64 check")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    m, d = args.m, args.d
    # correlated gradients: a shared mean direction plus per-sample noise
    grads = torch.randn(m, d, generator=gen).add_(torch.randn(1, d, generator=gen))
    grads = grads.mul_(args.gscale).to(device)
    x = torch.randn(d, generator=gen).to(device)
    idx = torch.randperm(d, generator=gen)[: min(args.sample, d)].to(device)
    true_diag, true_mul = float64_truth(grads, args.damp, x, idx, args.num_pages)

    variants = [("recursion fp32 (sec. 6.1)", None)]
    variants.append(("BLAS-3 full, pages=1, fp32 Gram (previous)", {"fp32_gram": True}))
    variants += [(f"BLAS-3 full, pages={p}", {"num_pages": p}) for p in (1, args.num_pages)]
    variants += [
        (f"BLAS-3 full overwrite, pages={p}", {"num_pages": p, "overwrite": True})
        for p in (1, args.num_pages)
    ]
    if args.block_size:
        variants.append((f"BLAS-3 block {args.block_size}", {"block_size": args.block_size}))
    rows, ref = [], None
    for name, kwargs in variants:
        diag, mul, t_build, t_diag, t_mul, peak = run_variant(grads, x, args.damp, kwargs, device)
        ref = ref or (diag, mul, t_build)
        rows.append(
            (
                name,
                t_build[0],
                ref[2][0] / t_build[0],
                t_build[1],
                ref[2][1] / t_build[1],
                t_diag,
                t_mul,
                peak / 2**20,
                *accuracy(diag, mul, ref, idx, true_diag, true_mul, kwargs),
            )
        )
    print(
        f"m={m} d={d} damp={args.damp:g} gscale={args.gscale:g} threads={args.threads} "
        f"device={device} (m*d fp32 = {m * d * 4 / 2**20:.0f} MiB)"
    )
    head = (
        "variant", "build s", "speedup", "build cpu s", "cpu ratio", "diag s", "mul s", "peak extra MiB",
        "diag rel vs rec", "mul rel vs rec", "diag rel vs fp64", "mul rel vs fp64",
    )  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(
            f"| {r[0]} | {r[1]:.2f} | {r[2]:.1f}x | {r[3]:.2f} | {r[4]:.1f}x | {r[5]:.3f} | "
            f"{r[6]:.3f} | {r[7]:.0f} | "
            + " | ".join("n/a" if v is None else f"{v:.1e}" for v in r[8:])
            + " |"
        )
    small_damp_table()


if __name__ == "__main__":
    main()
