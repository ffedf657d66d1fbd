"""2:4 semi-structured sparse Linear layers on CUDA (``torch.sparse.to_sparse_semi_structured``).

Sparse tensor cores multiply a weight holding at least 2 zeros in every 4 consecutive inputs
at up to twice the dense rate (Ampere and newer, float16/bfloat16/int8). Only Linear weights
whose groups of 4 all hold 2+ zeros are converted; the others stay dense and their reason is
reported (pattern not 2:4, or a shape the kernels refuse: CUTLASS wants rows a multiple of 32
and columns of 64 in half precision, cuSPARSELt 16 and 16).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparseml import compressed_format as cf

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Relative to the largest output: both models round every layer's output to half precision,
# but the sparse kernels sum in another order, so results differ by a few units in the last
# place per layer (bfloat16 has 8 significant bits, float16 11).
TOLERANCE = {"float16": 1e-2, "bfloat16": 5e-2}


def cuda_problem() -> str:
    """Why 2:4 kernels cannot run here ('' when they can)."""
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"2:4 sparse kernels need compute capability 8.0+, this GPU has {major}.{minor}"
    return ""


def is_2of4(weight: torch.Tensor) -> bool:
    nonzero = cf.nonzero_mask(weight)
    return (cf.min_zeros_per_group(nonzero, tuple(weight.shape), 4) or 0) >= 2


def convert_linears(model: nn.Module) -> list[dict[str, Any]]:
    """Swap 2:4 Linear weights of ``model`` (already on CUDA, half precision) for semi-structured
    tensors in place; one row per Linear: name, shape, converted, reason."""
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        row: dict[str, Any] = {"name": name, "shape": list(layer.weight.shape)}
        if not is_2of4(layer.weight):
            row.update(converted=False, reason="not 2:4")
        else:
            try:
                sparse = to_sparse_semi_structured(layer.weight.detach())
            except (RuntimeError, ValueError, NotImplementedError) as err:
                row.update(converted=False, reason=str(err).splitlines()[0][:160])
            else:
                layer.weight = nn.Parameter(sparse, requires_grad=False)
                row.update(converted=True, reason="")
        rows.append(row)
    return rows


def check_model(model: nn.Module, x: torch.Tensor, dtype_name: str) -> dict[str, Any]:
    """Outputs of the 2:4 model against the same model dense, both in ``dtype_name`` on CUDA."""
    import copy

    dtype = DTYPES[dtype_name]
    dense = copy.deepcopy(model).to("cuda", dtype).eval()
    sparse = copy.deepcopy(model).to("cuda", dtype).eval()
    layers = convert_linears(sparse)
    x = x.to("cuda", dtype)
    with torch.inference_mode():
        ref, out = dense(x).float(), sparse(x).float()
    diff = float((ref - out).abs().max())
    scale = float(ref.abs().max())
    return {
        "dtype": dtype_name,
        "device": torch.cuda.get_device_name(),
        "converted": sum(r["converted"] for r in layers),
        "linear_layers": len(layers),
        "layers": layers,
        "max_abs_diff": diff,
        "max_abs_output": scale,
        "tolerance": TOLERANCE[dtype_name] * max(scale, 1.0),
        "ok": diff <= TOLERANCE[dtype_name] * max(scale, 1.0),
    }
