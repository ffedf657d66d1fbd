"""Per-layer sparsity of a state dict: sparsity, N:M conformity, share of the parameters.

Used by ``inspect_sparsity.py`` and ``export.py`` (its report). Layers are the weights of at
least two dimensions (Linear and Conv weights, whose 2-D view ``(out, in * kh * kw)`` N:M
groups run along, as in ``sparseml.masks``); totals count every floating-point tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from sparseml import compressed_format as cf

# N:M patterns (N zeros in every M) from the strongest: 2:4 implies 4:8, both imply nothing
# about 1:4's wider coverage, so a layer reports the first one it satisfies.
NM_PATTERNS = ((2, 4), (4, 8), (1, 4))


def is_layer_weight(name: str, tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.dim() >= 2 and name.endswith("weight")


def layer_row(name: str, tensor: torch.Tensor, total: int) -> dict[str, Any]:
    nonzero = cf.nonzero_mask(tensor)
    shape = tuple(tensor.shape)
    best = next(
        (f"{n}:{m}" for n, m in NM_PATTERNS if (cf.nm_share(nonzero, shape, n, m) or 0) >= 1.0),
        None,
    )
    share_24 = cf.nm_share(nonzero, shape, 2, 4)
    return {
        "name": name,
        "shape": list(shape),
        "numel": tensor.numel(),
        "sparsity": 1.0 - float(nonzero.sum()) / max(tensor.numel(), 1),
        "nm": best,
        "groups_2of4": share_24,  # share of 4-groups with >= 2 zeros (None: rows not in 4s)
        "param_share": tensor.numel() / max(total, 1),
    }


def sparsity_report(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{"layers": [row...], "totals": {...}}`` for a state dict."""
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    total = sum(v.numel() for v in floats.values())
    zeros = sum(int((~cf.nonzero_mask(v)).sum()) for v in floats.values())
    rows = [layer_row(k, v, total) for k, v in state.items() if is_layer_weight(k, v)]
    layer_params = sum(r["numel"] for r in rows)
    layer_zeros = sum(round(r["sparsity"] * r["numel"]) for r in rows)
    totals = {
        "params": total,
        "zeros": zeros,
        "sparsity": zeros / max(total, 1),
        "layer_params": layer_params,
        "layer_sparsity": layer_zeros / max(layer_params, 1),
        "layers": len(rows),
        "layers_2of4": sum(r["nm"] == "2:4" for r in rows),
    }
    return {"layers": rows, "totals": totals}


def add_bits(report: dict[str, Any], bits: dict[str, dict[str, int | None]]) -> None:
    """Mark each layer's row with its quantization (``w8a8``, ``w8``; None: float), from
    ``quant_bits_by_layer`` (keys are module names, rows are ``<module>.weight``)."""
    for row in report["layers"]:
        b = bits.get(row["name"].removesuffix(".weight"))
        row["bits"] = None
        if b is not None:
            act = b["activation_bits"]
            row["bits"] = f"w{b['weight_bits']}" + (f"a{act}" if act else "")
    report["totals"]["quantized_layers"] = sum(r["bits"] is not None for r in report["layers"])


def format_table(report: dict[str, Any], layouts: dict[str, str] | None = None) -> str:
    """The report as a fixed-width text table (``layouts``: the stored layout per tensor)."""
    rows, totals = report["layers"], report["totals"]
    quantized = any(r.get("bits") for r in rows)
    width = max([len("layer"), *(len(r["name"]) for r in rows)])
    head = f"{'layer':<{width}}  {'shape':<18} {'sparsity':>8}  {'N:M':>4}  {'2:4 groups':>10}"
    head += (
        f"  {'params':>7}" + ("   bits" if quantized else "") + ("  stored as" if layouts else "")
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        groups = "-" if r["groups_2of4"] is None else f"{100 * r['groups_2of4']:.1f}%"
        line = (
            f"{r['name']:<{width}}  {'x'.join(map(str, r['shape'])):<18} "
            f"{100 * r['sparsity']:>7.2f}%  {r['nm'] or '-':>4}  {groups:>10}  "
            f"{100 * r['param_share']:>6.2f}%"
        )
        if quantized:
            line += f"  {r.get('bits') or 'float':>5}"
        if layouts:
            line += f"  {layouts.get(r['name'], '?')}"
        lines.append(line)
    lines.append("-" * len(head))
    lines.append(
        f"layers: {totals['layers']} with {totals['layer_params']:,} weights, "
        f"{100 * totals['layer_sparsity']:.2f}% zero ({totals['layers_2of4']} of them 2:4); "
        f"all {totals['params']:,} parameters: {100 * totals['sparsity']:.2f}% zero"
    )
    return "\n".join(lines)
