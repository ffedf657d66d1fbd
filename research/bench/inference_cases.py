"""What ``bench_inference.py`` times: the built-in cases and the user's ``--model``.

* Built-in shapes (:data:`GEMMS`, :data:`SPARSITIES`): the digits ViT as a whole model
  (:func:`bench_model`), single GEMMs of DeiT and ResNet-50 layers (:func:`bench_gemms`), and
  dense vs 2:4 semi-structured on CUDA (:func:`bench_cuda`).
* The user's model: :func:`build_user_model` (weights, optional ``--prune``),
  :func:`linear_sparsity`, and :func:`bench_user_batches` (one row per batch size).

Each ``bench_*`` appends its rows (lists of cell strings) to the table it is given; the
contenders and the clock come from ``inference_backends``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from inference_backends import BusyGuard, compare, csr_model, ort_runner, prune_
from torch import nn

SPARSITIES = (0.5, 0.7, 0.9, 0.95)
TOKENS = 197  # DeiT at 224 px: 196 patches + the class token
# name -> (rows per image, in features, out features); weight (out, in), input (rows, in)
GEMMS = {
    "DeiT-Tiny fc1 192->768": (TOKENS, 192, 768),
    "DeiT-Small qkv 384->1152": (TOKENS, 384, 1152),
    "DeiT-Small fc2 1536->384": (TOKENS, 1536, 384),
    "ResNet-50 l2 3x3 128 (28x28)": (28 * 28, 128 * 9, 128),
    "ResNet-50 l3 1x1 1024->256 (14x14)": (14 * 14, 1024, 256),
    "ResNet-50 l4 3x3 512 (7x7)": (7 * 7, 512 * 9, 512),
}


def bench_model(rows: list[list[str]], batches, sparsities, threads: int, budget: float,
                guard: BusyGuard) -> None:  # fmt: skip
    from utils.compat import ensure_torchvision

    ensure_torchvision()
    import timm

    from utils import models  # noqa: F401  (registers vit_digits)

    torch.manual_seed(0)
    dense = timm.create_model("vit_digits").eval()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, 3, 32, 32)
            for s in sparsities:
                pruned = timm.create_model("vit_digits").eval()
                pruned.load_state_dict(dense.state_dict())
                for name, layer in pruned.named_modules():
                    if isinstance(layer, nn.Linear) and name.startswith("blocks."):
                        prune_(layer.weight.data, s)
                sparse = csr_model(pruned)
                fns = {
                    "dense": lambda m=pruned, x=x: m(x),
                    "csr": lambda m=sparse, x=x: m(x),
                    "ort": ort_runner(pruned, x, Path(tmp), threads),
                }
                busy = guard.busy()
                times = compare(fns, budget)
                busy = guard.busy() or busy
                rows.append(cpu_row("vit_digits (whole model)", batch, s, times, guard, busy))


def bench_gemms(rows: list[list[str]], gemms, batches, sparsities, threads: int, budget: float,
                guard: BusyGuard) -> None:  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name, (per_image, k, n) in gemms.items():
            torch.manual_seed(0)
            layer = nn.Linear(k, n, bias=False)
            weight = layer.weight.detach().clone()
            for batch in batches:
                x = torch.randn(per_image * batch, k)
                for s in sparsities:
                    layer.weight.data = prune_(weight.clone(), s)
                    w = layer.weight.detach().to_sparse_csr()
                    fns = {
                        "dense": lambda lay=layer, x=x: lay(x),
                        "csr": lambda w=w, x=x: torch.sparse.mm(w, x.t()),
                        "ort": ort_runner(layer, x, Path(tmp), threads),
                    }
                    busy = guard.busy()
                    times = compare(fns, budget)
                    busy = guard.busy() or busy
                    rows.append(cpu_row(name, batch, s, times, guard, busy))


def cpu_row(name: str, batch: int, s: float, t: dict[str, float], guard: BusyGuard,
            busy: bool) -> list[str]:  # fmt: skip
    dense, csr, ort = t["dense"], t["csr"], t["ort"]
    return [name, str(batch), f"{100 * s:.0f}%", f"{1e3 * dense:.2f}", f"{1e3 * csr:.2f}",
            guard.speedup(busy, dense, csr), f"{1e3 * ort:.2f}",
            guard.speedup(busy, dense, ort)]  # fmt: skip


def build_user_model(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, ...]]:
    """The ``--model`` (timm name, or one registered in ``utils.models``) with its weights, in
    eval mode, and its input shape (C, H, W)."""
    from utils.compat import ensure_torchvision

    ensure_torchvision()
    import timm
    from timm.data import resolve_data_config

    from utils import models

    models.check_model_name(args.model)
    kwargs = models.model_kwargs(args)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    torch.manual_seed(0)
    model = timm.create_model(args.model, **kwargs).eval()
    if args.initial_checkpoint:
        models.load_weights(model, args.initial_checkpoint, "--initial-checkpoint")
    if args.prune:
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    prune_(layer.weight.data, args.prune)
    cfg = resolve_data_config({"img_size": args.img_size}, model=model)
    return model, tuple(cfg["input_size"])


def linear_sparsity(model: nn.Module) -> tuple[float, float]:
    """(zeros in Linear weights, zeros in Linear and Conv weights), as fractions."""
    lin = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    conv = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]

    def share(ws: list[torch.Tensor]) -> float:
        total = sum(w.numel() for w in ws)
        return sum(int((w == 0).sum()) for w in ws) / total if total else 0.0

    return share(lin), share(lin + conv)


def bench_user_batches(rows: list[list[str]], model: nn.Module, sparse: nn.Module,
                       shape: tuple[int, ...], batches, threads: int, budget: float,
                       guard: BusyGuard) -> None:  # fmt: skip
    """One row per batch size: ``model`` dense, ``sparse`` (its CSR copy) and ONNX Runtime."""
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, *shape)
            fns = {
                "dense": lambda x=x: model(x),
                "csr": lambda x=x: sparse(x),
                "ort": ort_runner(model, x, Path(tmp), threads),
            }
            busy = guard.busy()
            t = compare(fns, budget)
            busy = guard.busy() or busy
            rows.append([str(batch), f"{1e3 * t['dense']:.2f}", f"{1e3 * t['csr']:.2f}",
                         guard.speedup(busy, t["dense"], t["csr"]), f"{1e3 * t['ort']:.2f}",
                         guard.speedup(busy, t["dense"], t["ort"])])  # fmt: skip


def bench_cuda(rows: list[list[str]], gemms, batches, budget: float) -> None:
    from torch.sparse import to_sparse_semi_structured

    sync = torch.cuda.synchronize
    for name, (per_image, k, n) in gemms.items():
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16)
        w24 = w.view(-1, 4).scatter(1, w.abs().view(-1, 4).argsort(dim=1)[:, :2], 0).view(n, k)
        try:
            sparse = to_sparse_semi_structured(w24)
        except (RuntimeError, ValueError) as err:
            rows.append([name, "-", "2:4", "-", f"not convertible: {str(err)[:60]}", "-"])
            continue
        for batch in batches:
            x = torch.randn(per_image * batch, k, device="cuda", dtype=torch.float16)
            with torch.inference_mode():
                t = compare({"dense": lambda x=x, w=w24: torch.nn.functional.linear(x, w),
                             "2:4": lambda x=x, w=sparse: torch.nn.functional.linear(x, w)},
                            budget, sync)  # fmt: skip
                t_dense, t_24 = t["dense"], t["2:4"]
            rows.append([name, str(batch), "2:4", f"{1e3 * t_dense:.3f}", f"{1e3 * t_24:.3f}",
                         f"{t_dense / t_24:.2f}x"])  # fmt: skip
