"""The contenders of ``bench_inference.py`` and the clock that times them.

* Contenders: PyTorch dense (the model as is), ``torch.sparse`` CSR (:class:`CSRLinear`,
  :func:`csr_model`) and ONNX Runtime (:func:`ort_runner`), all on the same weights pruned by
  :func:`prune_`.
* Clock: :func:`compare` (medians of calls timed in turns) and :class:`BusyGuard` (no speedup
  from a timing taken while the machine was busier than its cores).

No printing here; ``inference_cases`` decides what is timed and ``bench_inference`` prints it.
``ort_runner`` needs research/ on ``sys.path`` (for ``utils.onnx_io``), as the script sets it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def load_1min() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


class BusyGuard:
    """Whether speedups may be printed: not while the load exceeded the cores.

    ``check()`` is called before and after each timed row; a row whose timing saw the machine
    busier than its cores gets no speedup (its times are kept: they say how slow it was).
    """

    def __init__(self) -> None:
        self.cores = usable_cores()
        self.worst: float | None = None
        self.refused = 0

    def busy(self) -> bool:
        load = load_1min()
        if load is None:
            return False
        self.worst = load if self.worst is None else max(self.worst, load)
        return load > self.cores

    def speedup(self, busy: bool, base: float, other: float) -> str:
        if busy:
            self.refused += 1
            return "busy"
        return f"{base / other:.2f}x"

    def summary(self) -> str:
        if not self.refused:
            return ""
        return (
            f"No speedup printed for {self.refused} cell(s) marked 'busy': the machine was busier "
            f"than its {self.cores} cores (1-minute load average up to {self.worst:.2f}) while "
            "they were timed, which makes ratios meaningless. Rerun on an idle machine."
        )


def compare(fns: dict[str, Callable[[], object]], budget: float,
            sync: Callable[[], None] = lambda: None) -> dict[str, float]:  # fmt: skip
    """Median seconds per call of each function, timed in turns (one call each per round) so
    that a change in the machine's load hits all of them alike: one warm-up round, then rounds
    until each had ``budget`` seconds and at least 2 calls."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    sync()
    while min(sum(t) for t in times.values()) < budget or len(times[next(iter(fns))]) < 2:
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(t) for k, t in times.items()}


def prune_(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``sparsity`` share of smallest-magnitude entries (in place)."""
    k = round(sparsity * weight.numel())
    if k:
        threshold = weight.abs().reshape(-1).kthvalue(k).values
        weight[weight.abs() <= threshold] = 0.0
    return weight


class CSRLinear(nn.Module):
    """A Linear layer whose weight is a CSR sparse matrix: y = (W_csr @ x^T)^T + b."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        self.weight = layer.weight.detach().to_sparse_csr()
        self.bias = None if layer.bias is None else layer.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


def csr_model(model: nn.Module, min_sparsity: float | None = None) -> nn.Module:
    """A copy of ``model`` with Linear layers as :class:`CSRLinear`: every block Linear layer
    (``min_sparsity`` None, the built-in ViT case), else every Linear layer with at least that
    share of zero weights."""
    import copy

    out = copy.deepcopy(model)
    for name, layer in list(out.named_modules()):
        if not isinstance(layer, nn.Linear):
            continue
        if min_sparsity is None:
            chosen = name.startswith("blocks.")
        else:
            zeros = float((layer.weight == 0).float().mean())
            chosen = zeros > 0 and zeros >= min_sparsity
        if chosen:
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, CSRLinear(layer))
    return out


def ort_runner(module: nn.Module, x: torch.Tensor, folder: Path, threads: int):  # noqa: ANN201
    """A function running ``module`` exported to ONNX on ``x`` with ONNX Runtime."""
    from utils import onnx_io

    path = onnx_io.export_onnx(module, x, folder / "m.onnx")
    sess = onnx_io.session(path, threads)
    return lambda: onnx_io.run(sess, x)
