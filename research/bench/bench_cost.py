"""Cost of one-shot second-order pruning at real layer sizes: time per phase and peak memory.

Models (random weights, no download): DeiT-Tiny (``deit_tiny_patch16_224``; the qkv, proj,
fc1 and fc2 weights of ``--deit-blocks`` blocks, 12 = all 5.3M) and ResNet-50 (``resnet50``;
the convolutions of the residual blocks of ``--resnet-stages``). Inputs are small random
images (``--img-size``) so that the gradients stay cheap; the gradient time of a real
224x224 sample is measured separately (``grad_224_s``: one forward+backward of a
``-gb`` batch at 224) for extrapolation.

Each (model, method, m) runs in a fresh subprocess, so ``ru_maxrss`` is that run's peak. Its
row (``<out>/cost/cost.jsonl``) holds the modifier's own phase timings (``modifier.timings``:
gradients / curvature = Fisher build / pruning = scores, CAP elimination and weight update),
the evaluation time (a forward over ``--eval-images`` random images), the 224x224 gradient
time (``grad_224_s``: the mean of a measure before the run and one after), the peak resident
set (``peak_rss``), the resident set of the bare process before the model exists
(``runtime_rss``), and the sizes the peak is compared with: Fisher blocks
(n_blocks * B * B * bytes: float64 Gram when m >= B, float32 sample-space H when m < B),
the model, one gradient chunk (64 samples), and the modifier's memory plan. With
``--repeats N`` each (model, method, m) runs N times and the row is the run whose pruning math
over drawing its m gradients at 224x224 is the median (``repeat_ratios``: all N ratios): on
shared cores one run's ratio moves by +-15%. A run whose
estimate (times ``SAFETY``, plus 1 GiB) exceeds ``--mem-cap-gb`` (18), or the memory
preflight's share of the free memory (``sparseml.memory``), is not started (its row says why;
a rerun retries it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_common import SetupError, guarded, record, records

from sparseml.layouts import BlockLayout
from sparseml.memory import HEADROOM, free_bytes

METHODS = {  # name -> (modifier, damp); B and m come from the options
    "cap": ("CAPruningModifier", 1e-4),
    "obs": ("OBSPruningModifier", 1e-4),
    "fast_cap": ("FastCAPruningModifier", 1e-2),
    "mfac": ("MFACPruningModifier", 1e-4),
}
BLOCK_METHODS = {"cap", "obs"}
GRAD_CHUNK = 64  # sparseml.pruning.estimators.GRAD_CHUNK
# Runs are started only if SAFETY x their estimate + 1 GiB (Python, torch, the model) fits the
# cap: working copies come on top of the plan (1.2x measured on DeiT-Tiny blocks), and the
# machine must never swap.
SAFETY = 1.3
DEIT_LINEARS = r"(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--models", nargs="+", default=["deit_tiny", "resnet50"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--num-grads", nargs="+", type=int, default=[64, 256])
    p.add_argument("--block-size", type=int, default=192)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--gs-batch-size", type=int, default=1, help="images per gradient sample")
    p.add_argument("--deit-blocks", type=int, default=12, help="first N of DeiT-Tiny's 12")
    p.add_argument("--resnet-stages", default="3", help="ResNet-50 stages pruned, e.g. 3 or 1,2")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--eval-images", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--repeats", type=int, default=1,
        help="runs per (model, method, m); the row is the run of median math / 224 gradients",
    )  # fmt: skip
    p.add_argument("--mem-cap-gb", type=float, default=18.0, help="skip runs estimated above")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if not 1 <= args.deit_blocks <= 12:
        p.error(f"--deit-blocks must be in 1..12, got {args.deit_blocks}")
    if not all(s in {"1", "2", "3", "4"} for s in args.resnet_stages.split(",")):
        p.error(f"--resnet-stages must list stages 1-4 (e.g. 3 or 1,2), got {args.resnet_stages}")
    return args


def model_spec(args: argparse.Namespace, name: str) -> tuple[str, dict[str, Any], str]:
    """(timm name, create_model kwargs, params regex of the pruned weights)."""
    if name == "deit_tiny":
        blocks = "|".join(str(i) for i in range(args.deit_blocks))
        kwargs = {"img_size": args.img_size, "num_classes": 10}
        return "deit_tiny_patch16_224", kwargs, rf"re:blocks\.({blocks})\.{DEIT_LINEARS}\.weight"
    if name == "resnet50":
        stages = "|".join(args.resnet_stages.split(","))
        return "resnet50", {"num_classes": 10}, rf"re:layer({stages})\.\d+\.conv\d\.weight"
    raise SetupError(f"--models {name!r} unknown; allowed: deit_tiny, resnet50")


def recipe(args: argparse.Namespace, method: str, m: int, params: str) -> str:
    modifier, damp = METHODS[method]
    extra = "" if method == "fast_cap" else "    global_sparsity: true\n"
    return (
        f"pruning_modifiers:\n  - !{modifier}\n    params: ['{params}']\n"
        f"    init_sparsity: {args.sparsity}\n    final_sparsity: {args.sparsity}\n"
        "    start_epoch: 0\n    end_epoch: 0\n    mask_type: unstructured\n"
        f"    num_grads: {m}\n    fisher_block_size: {args.block_size}\n    damp: {damp}\n{extra}"
    )


def sizes(args: argparse.Namespace, method: str, m: int, numels: list[int]) -> dict[str, int]:
    """Bytes of the Fisher blocks (from the block layout: every parameter padded to whole
    blocks), one gradient chunk and an estimate of the run's memory (for the cap)."""
    B, d, n_layers = args.block_size, sum(numels), len(numels)
    n_b = BlockLayout(numels, B).total
    chunk = min(GRAD_CHUNK, m) * d * 4
    if method in BLOCK_METHODS:
        width = 8 if m >= B else 4
        fisher = n_b * B * B * width
        held = fisher + (m * d * 4 if m < B else chunk)
    elif method == "fast_cap":
        fisher = n_layers * B * B * 8
        held = fisher + chunk
    else:  # M-FAC: m gradients, then blocks of its own or Z factors
        fisher = n_b * B * B * 4 if m > B else m * d * 4
        held = fisher + m * d * 4 + chunk
    return {"fisher_bytes": fisher, "chunk_bytes": chunk, "estimate_bytes": held}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_worker(args: argparse.Namespace) -> None:
    """One (model, method, m) run in this fresh process; prints its measurements as JSON."""
    job = json.loads(args.worker)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from utils.compat import ensure_torchvision

    ensure_torchvision()
    import timm
    import torch.nn.functional as F

    from sparseml.pytorch.optim import ScheduledModifierManager

    torch.set_num_threads(args.threads)
    runtime_rss = rss_bytes()
    timm_name, kwargs, params = model_spec(args, job["model"])
    torch.manual_seed(0)
    model = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    size = args.img_size

    def batches(batch_size: int | None = None, **_: Any):
        g = torch.Generator().manual_seed(1)
        bs = batch_size or args.gs_batch_size
        while True:
            x = torch.randn(bs, 3, size, size, generator=g)
            yield [x], {}, torch.randint(0, 10, (bs,), generator=g)

    manager = ScheduledModifierManager.from_yaml(recipe(args, job["method"], job["m"], params))
    # the reference is measured before and after the run and averaged: on shared cores one
    # process's speed drifts (the same measure moved by 30% between processes)
    grad_224_before = gradient_at_224(model, timm_name, kwargs, args)
    rss_before = rss_bytes()
    start = time.perf_counter()
    manager.apply(model, grad_sampler={"data_loader_builder": batches, "loss_fn": F.cross_entropy})
    apply_s = time.perf_counter() - start
    pruner = manager.modifiers[0]
    # the figure the preflight checked: what the estimator says it allocates
    plan, _ = pruner.estimator().memory(pruner, pruner.fisher_block_size, pruner.num_grads)
    start = time.perf_counter()
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for s in range(0, args.eval_images, 64):
            model(torch.randn(min(64, args.eval_images - s), 3, size, size, generator=g))
    eval_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the 224 pass
    # every run measures its own reference (~1 s each time), so each ratio compares like with
    # like on a machine whose speed drifts between runs
    grad_224_after = gradient_at_224(model, timm_name, kwargs, args)
    row = {
        **{f"{k}_s": v for k, v in pruner.timings.items()},
        "apply_s": apply_s,
        "eval_s": eval_s,
        "grad_224_s": (grad_224_before + grad_224_after) / 2,
        "grad_224_before_s": grad_224_before,
        "grad_224_after_s": grad_224_after,
        "peak_rss": peak,
        "runtime_rss": runtime_rss,
        "rss_before_apply": rss_before,
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "plan_bytes": sum(item.nbytes for item in plan),
        "plan": {item.what: item.nbytes for item in plan},
    }
    print(json.dumps(row))


def gradient_at_224(model, timm_name: str, kwargs: dict, args) -> float:
    """Seconds of one forward+backward of a -gb batch at 224x224 (one warm-up pass, then the
    median of 5), the cost of one real gradient sample (the benchmark's own inputs are
    smaller)."""
    import timm
    import torch

    big = model if "img_size" not in kwargs else timm.create_model(
        timm_name, pretrained=False, **{**kwargs, "img_size": 224}
    )  # fmt: skip
    x, y = torch.randn(args.gs_batch_size, 3, 224, 224), torch.zeros(args.gs_batch_size).long()
    times = []
    for _ in range(6):
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(big(x), y).backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return sorted(times[1:])[2]


def prunable(args: argparse.Namespace, name: str) -> list[int]:
    """Sizes of the weights selected by the model's regex (built here, on the meta device)."""
    import re

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from utils.compat import ensure_torchvision

    ensure_torchvision()
    import timm
    import torch

    timm_name, kwargs, params = model_spec(args, name)
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, **kwargs)
    pattern = re.compile(params.removeprefix("re:"))
    return [p.numel() for n, p in model.named_parameters() if pattern.match(n)]


def spawn(args: argparse.Namespace, job: dict[str, Any]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--out",
        args.out,
        "--worker",
        json.dumps(job),
    ]
    for name in ("block_size", "img_size", "gs_batch_size", "deit_blocks", "sparsity"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    cmd += ["--resnet-stages", args.resnet_stages, "--eval-images", str(args.eval_images)]
    cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"error: cost run {job} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def math_over_224(run: dict[str, Any], m: int) -> float:
    """The pruning math (curvature + pruning phases) over drawing m gradients at 224x224."""
    return (run["curvature_s"] + run["pruning_s"]) / (m * run["grad_224_s"])


def median_run(runs: list[dict[str, Any]], ratios: list[float]) -> dict[str, Any]:
    """The run of median ratio (the lower of the middle two for an even count): a real run,
    so its phases, peak and reference gradient belong together."""
    order = sorted(range(len(runs)), key=lambda i: ratios[i])
    return dict(runs[order[(len(runs) - 1) // 2]])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    path = Path(args.out) / "cost" / "cost.jsonl"
    done = records(path)
    # The cap, and never more than the memory preflight's share of what is free right now.
    free = free_bytes(torch.device("cpu"))
    cap = min(args.mem_cap_gb * 2**30, HEADROOM * free if free else float("inf"))
    for name in args.models:
        numels = prunable(args, name)
        d, n_layers = sum(numels), len(numels)
        for m in sorted(args.num_grads):
            for method in args.methods:
                key = f"{name}|{method}|m={m}|B={args.block_size}|d={d}|img={args.img_size}"
                if key in done and not done[key].get("skipped"):
                    continue
                size = sizes(args, method, m, numels)
                common = {"model": name, "method": method, "m": m, "B": args.block_size, "d": d}
                common.update(layers=n_layers, img_size=args.img_size, sparsity=args.sparsity)
                common.update(threads=args.threads, gs_batch_size=args.gs_batch_size, **size)
                if SAFETY * size["estimate_bytes"] + 2**30 > cap:
                    gib = size["estimate_bytes"] / 2**30
                    why = f"estimated {SAFETY:g} x {gib:.1f} GiB + 1 GiB > cap"
                    why += f" {cap / 2**30:.1f} GiB"
                    print(f"== {key}: skipped ({why})", flush=True)
                    record(path, key, {**common, "skipped": why})
                    continue
                print(f"== cost: {key}", flush=True)
                job = {"model": name, "method": method, "m": m}
                runs = [spawn(args, job) for _ in range(args.repeats)]
                ratios = [math_over_224(r, m) for r in runs]
                measured = median_run(runs, ratios)
                if len(runs) > 1:
                    measured["repeat_ratios"] = sorted(ratios)
                row = record(path, key, {**common, **measured})
                phases = ", ".join(
                    f"{k} {row[k + '_s']:.1f} s" for k in ("gradients", "curvature", "pruning")
                )
                print(f"   {phases}; peak RSS {row['peak_rss'] / 2**30:.2f} GiB", flush=True)
                each = ", ".join(f"{x:.2f}" for x in sorted(ratios))
                tail = f" (median of {len(runs)}: {each})" if len(runs) > 1 else ""
                print(f"   math / {m} gradients at 224: {math_over_224(row, m):.2f}x{tail}")


if __name__ == "__main__":
    guarded(main)
