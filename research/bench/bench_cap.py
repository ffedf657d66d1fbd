"""Benchmark: CAP order-replay (cap_eliminate + threshold + cap_reconstruct) vs the reference
algorithm with per-step weight traces (CAP: Correlation-Aware Pruning, arXiv 2210.09223).

The baseline is the paper's loop written here: per Fisher block, B greedy steps that each
downdate the whole block inverse in float32 (rank-1, in place, with a temporary outer product)
and store the weights after every step in a (B+1, n_b, B) trace buffer on the device; then a
global threshold over the cumulative losses and a gather of traces[k_b, b]. Both methods get
the same random weights and the same SPD inverse Fisher blocks (built outside the timing).

Each method runs twice: a timing pass (wall and process CPU time), then a memory pass measuring
the "peak extra beyond the Fisher blocks": on CUDA, max_memory_allocated minus the memory
allocated before the call; on CPU, the peak resident set (VmHWM, reset through
/proc/self/clear_refs) minus the resident set before the call, with glibc told (mallopt) to mmap
every block >= 64 KiB so that freed tensors leave the resident set at once (and malloc_trim
releasing what the timing pass left in the heap). That setting slows
allocation down, hence the separate timing pass. The peaks include the returned weights and
masks (the same for both methods).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

from sparseml.kernels.cap import cap_eliminate, cap_reconstruct, prefix_counts, prefix_mask


def build_problem(d, B, m, damp, seed, device):
    """Random weights and inverse Fisher blocks (damp I + G^T G / m)^-1, the padded tail decoupled."""
    g = torch.Generator().manual_seed(seed)
    n_b = math.ceil(d / B)
    valid = (torch.arange(n_b * B) < d).view(n_b, B)
    W = torch.randn(n_b, B, generator=g).masked_fill(~valid, 0.0)
    H = torch.empty(n_b, B, B)
    eye = torch.eye(B, dtype=torch.float64)
    for i in range(0, n_b, 256):
        G = torch.randn(min(256, n_b - i), m, B, generator=g) * valid[i : i + 256, None, :]
        F = (G.mT @ G).double() / m + damp * eye
        H[i : i + 256] = torch.cholesky_inverse(torch.linalg.cholesky(F)).float()
    return W.to(device), H.to(device), valid.to(device)


def select(losses, valid, sparsity):
    """Global threshold: the round(s * d) smallest valid losses, ties by flattened index."""
    scores = losses.masked_fill(~valid, float("inf")).flatten()
    k = round(sparsity * int(valid.sum()))
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    chosen[torch.argsort(scores, stable=True)[:k]] = True
    return chosen.view_as(losses)


def reference_eliminate(W, H, blocks_per_batch):
    """The reference loop: consumes H, returns losses (n_b, B) and traces (B+1, n_b, B)."""
    n_b, B = W.shape
    bs = n_b if blocks_per_batch < 0 else blocks_per_batch
    losses = torch.zeros(n_b, B, device=W.device)
    traces = torch.zeros(B + 1, n_b, B, device=W.device)
    for i in range(0, n_b, bs):
        w, h = W[i : i + bs].clone(), H[i : i + bs]
        ar = torch.arange(w.shape[0], device=W.device)
        done = torch.zeros_like(w, dtype=torch.bool)
        cum = torch.zeros(w.shape[0], device=W.device)
        traces[0, i : i + bs] = w
        for t in range(1, B + 1):
            diag = torch.diagonal(h, dim1=1, dim2=2)
            s = w**2 / diag
            s[done] = float("inf")
            smin, p = s.min(1)
            cum += smin
            losses[i + ar, p] = cum
            row = h[ar, p, :]
            dp = diag[ar, p]
            w -= row * (w[ar, p] / dp).unsqueeze(1)
            done[ar, p] = True
            w[done] = 0
            traces[t, i : i + bs] = w
            if t == B:
                break
            row = row / torch.sqrt(dp).unsqueeze(1)
            h -= torch.bmm(row.unsqueeze(2), row.unsqueeze(1))
    return losses / 2, traces


class PeakMemory:
    """Peak extra bytes of a code region (see the module docstring for how)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _rss():
        with open("/proc/self/status") as f:
            status = dict(line.split(":", 1) for line in f)
        return int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = self._rss()[0]
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        else:
            self.peak = self._rss()[1] - self.start


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self.cpu = time.process_time() - self.c0


def run_reference(W, H, valid, sparsities, blocks_per_batch):
    """Per sparsity: (pruned mask, weights); and the trace buffer's size in bytes. Consumes H."""
    n_b = W.shape[0]
    losses, traces = reference_eliminate(W, H, blocks_per_batch)
    out = {}
    for s in sparsities:
        removed = select(losses, valid, s) | ~valid
        out[s] = (removed, traces[removed.sum(1), torch.arange(n_b, device=W.device)])
    return out, traces.numel() * traces.element_size()


def run_ours(W, H, valid, sparsities, blocks_per_batch):
    """Per sparsity: (pruned mask, weights); and the bytes of the order and the losses."""
    order, losses = cap_eliminate(
        W, H, torch.zeros_like(valid), valid=valid, blocks_per_batch=blocks_per_batch
    )
    out = {}
    for s in sparsities:
        counts = prefix_counts(order, select(losses, valid, s), valid)
        W_new = cap_reconstruct(W, H, order, counts, blocks_per_batch=blocks_per_batch)
        out[s] = (~prefix_mask(order, counts), W_new)
    return out, order.numel() * order.element_size() + losses.numel() * losses.element_size()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=200_000)
    ap.add_argument("--block-size", type=int, default=192)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    ap.add_argument("--num-grads", type=int, default=256)
    ap.add_argument("--damp", type=float, default=1e-4)
    ap.add_argument("--blocks-per-batch", type=int, default=None, help="ours; None = auto")
    ap.add_argument("--baseline-blocks-per-batch", type=int, default=-1, help="-1 = all")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    ap.add_argument("--memory-of", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    W, H, valid = build_problem(args.d, args.block_size, args.num_grads, args.damp, args.seed, dev)
    fisher = H.numel() * H.element_size()
    if args.memory_of is None:
        print(
            f"d={args.d} B={args.block_size} n_b={W.shape[0]} device={dev} "
            f"threads={torch.get_num_threads()} Fisher blocks {fisher / 2**20:.1f} MiB"
        )
    methods = {
        "reference (traces, fp32)": (run_reference, args.baseline_blocks_per_batch),
        "ours (order + closed form, fp64)": (run_ours, args.blocks_per_batch),
    }
    if args.memory_of is not None:  # child process: one memory pass, result as JSON
        fn, bpb = list(methods.values())[args.memory_of]
        H_work = H.clone() if fn is run_reference else H
        with PeakMemory(dev) as peak:
            fn(W, H_work, valid, args.sparsities, bpb)
        print(json.dumps({"peak": peak.peak}))
        return
    results, timers, peaks = {}, {}, {}
    for i, (name, (fn, bpb)) in enumerate(methods.items()):
        H_work = H.clone() if fn is run_reference else H
        with Timer(dev) as timers[name]:
            results[name] = fn(W, H_work, valid, args.sparsities, bpb)
        del H_work
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        child = subprocess.run(
            [sys.executable, *sys.argv, "--memory-of", str(i)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        peaks[name] = json.loads(child.stdout.strip().splitlines()[-1])["peak"]

    print(f"\n{'method':<34}{'wall s':>8}{'cpu s':>8}{'peak extra MiB':>16}{'% Fisher':>10}")
    for name in methods:
        t, m = timers[name], peaks[name]
        print(
            f"{name:<34}{t.seconds:>8.2f}{t.cpu:>8.2f}{m / 2**20:>16.1f}{100 * m / fisher:>9.1f}%"
        )
    (base, trace_bytes), (ours, persistent) = results.values()
    tb, to = timers.values()
    print(f"speed-up: {tb.seconds / to.seconds:.2f}x wall, {tb.cpu / to.cpu:.2f}x cpu")
    print(
        f"reference trace buffer: {trace_bytes / 2**20:.1f} MiB ({100 * trace_bytes / fisher:.1f}%"
        f" of Fisher); ours persistent order+losses: {persistent / 2**20:.2f} MiB "
        f"({100 * persistent / fisher:.2f}%)"
    )
    print(f"\n{'sparsity':>8}{'same mask':>11}{'mask diff':>11}{'max |dW|':>12}{'max |W|':>10}")
    for s in args.sparsities:
        (m_ref, w_ref), (m_our, w_our) = base[s], ours[s]
        diff = int((m_ref != m_our).sum())
        print(
            f"{s:>8.2f}{str(diff == 0):>11}{diff:>11}"
            f"{float((w_ref - w_our).abs().max()):>12.2e}{float(w_ref.abs().max()):>10.2f}"
        )


if __name__ == "__main__":
    main()
