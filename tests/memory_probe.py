"""Measure the peak memory a one-shot prune adds, next to the estimator's memory figure.

Run as a script (one fresh process per measurement, so the peak is this prune's alone):

    python tests/memory_probe.py PRUNER WIDTH LAYERS FIELDS_JSON

Builds an MLP of ``LAYERS`` square ``WIDTH`` x ``WIDTH`` Linear layers (no bias), prunes all
of them one-shot to 50% (or the fields' ``sparsity``) with the pruner and fields given, and prints one JSON line:
``figure`` (bytes the preflight summed) and ``added`` (peak resident memory during the prune
minus the resident memory just before it, after autograd and the compiled kernels have run
once; Linux ``VmHWM`` / ``VmRSS``).
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")


def main() -> None:
    name, width, layers, fields = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one batch in flight: a deterministic peak (the figure counts T)
    from sparseml import memory
    from sparseml.grad_sampler import GradSampler
    from sparseml.pytorch.optim import ScheduledModifierManager

    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])

    def loader(**kw):
        while True:
            yield (torch.randn(2, width),), {}, None

    sampler = GradSampler(loader, lambda out, target: out.square().mean())
    fields = json.loads(fields)
    sparsity = fields.pop("sparsity", 0.5)
    lines = "".join(f"    {k}: {json.dumps(v)}\n" for k, v in fields.items())
    recipe = (
        f"pruning_modifiers:\n  - !{name}\n    params: ['re:.*weight']\n"
        f"    init_sparsity: {sparsity}\n    final_sparsity: {sparsity}\n"
        f"    start_epoch: 0\n    end_epoch: 0\n{lines}"
    )
    figures = []
    check = memory.check_fits
    memory.check_fits = lambda owner, items, *a: figures.append(sum(i.nbytes for i in items))
    import sparseml.pruning.sampling as sampling_module

    sampling_module.check_fits = memory.check_fits
    manager = ScheduledModifierManager.from_yaml(recipe)
    model(torch.randn(2, width)).square().mean().backward()  # warm up autograd and the pools
    model.zero_grad(set_to_none=True)
    from sparseml.kernels import native

    native.warm_up()  # the compiled kernels' code: ~60 MB once per process, not the prune's
    before = rss("VmRSS")
    reset_peak()
    manager.apply(model, grad_sampler=sampler)
    added = rss("VmHWM") - before
    memory.check_fits = check
    print(json.dumps({"figure": figures[0] if figures else 0, "added": added}))


if __name__ == "__main__":
    main()
