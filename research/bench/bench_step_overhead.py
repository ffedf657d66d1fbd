"""Per-step overhead of the recipe manager during sparse training.

Trains the same tiny ViT for the same batches twice, interleaved in rounds: once dense with
the plain optimizer, once 90% sparse with a ConstantPruningModifier recipe driving the
optimizer through the manager's step wrapper (forward pre-hooks, gradient hooks, mask
re-application after every step). Prints the median time per step of each and their ratio.

    python research/bench/bench_step_overhead.py [--steps 40] [--rounds 5] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.compat import ensure_torchvision  # noqa: E402

ensure_torchvision()

import timm  # noqa: E402
import torch  # noqa: E402

import utils.models  # noqa: E402,F401  (registers vit_digits)
from sparseml.pytorch.optim import ScheduledModifierManager  # noqa: E402

SPARSE = """
pruning_modifiers:
  - !GlobalMagnitudePruningModifier
    params: ["re:.*blocks.*.(attn.qkv|attn.proj|mlp.fc1|mlp.fc2).weight"]
    init_sparsity: 0.9
    final_sparsity: 0.9
    start_epoch: 0
    end_epoch: 1
"""
CONSTANT = """
pruning_modifiers:
  - !ConstantPruningModifier
    params: ["re:.*blocks.*.(attn.qkv|attn.proj|mlp.fc1|mlp.fc2).weight"]
    start_epoch: 0
    end_epoch: 100
"""


def time_steps(model, optimizer, batches) -> float:
    loss_fn = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    for x, y in batches:
        loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="vit_digits")
    args = parser.parse_args()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(args.batch_size, 3, 32, 32, generator=gen),
            torch.randint(0, 10, (args.batch_size,), generator=gen),
        )
        for _ in range(args.steps)
    ]
    dense = timm.create_model(args.model, num_classes=10)
    sparse = timm.create_model(args.model, num_classes=10)
    sparse.load_state_dict(dense.state_dict())
    ScheduledModifierManager.from_yaml(SPARSE).apply(sparse)
    opt_dense = torch.optim.AdamW(dense.parameters(), lr=1e-4, weight_decay=0.05)
    manager = ScheduledModifierManager.from_yaml(CONSTANT)
    opt_sparse = manager.modify(
        sparse,
        torch.optim.AdamW(sparse.parameters(), lr=1e-4, weight_decay=0.05),
        steps_per_epoch=args.steps,
    )
    time_steps(dense, opt_dense, batches[:3])  # warm-up both paths
    time_steps(sparse, opt_sparse, batches[:3])
    dense_t, sparse_t = [], []
    for _ in range(args.rounds):
        dense_t.append(time_steps(dense, opt_dense, batches))
        sparse_t.append(time_steps(sparse, opt_sparse, batches))
    d, s = statistics.median(dense_t), statistics.median(sparse_t)
    pruned = [
        p
        for n, p in sparse.named_parameters()
        if "blocks" in n and n.endswith("weight") and p.dim() == 2
    ]
    zeros = sum(int((p == 0).sum()) for p in pruned) / sum(p.numel() for p in pruned)
    print(
        f"model {args.model}, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, threads {torch.get_num_threads()}"
    )
    print(f"{'run':<34}{'ms/step (median)':>18}")
    print(f"{'dense, plain AdamW':<34}{d * 1e3:>18.2f}")
    print(f"{'90% sparse, ConstantPruning wrapper':<34}{s * 1e3:>18.2f}")
    print(f"overhead ratio sparse/dense: {s / d:.3f}  (target <= 1.05); sparsity kept: {zeros:.3f}")


if __name__ == "__main__":
    main()
