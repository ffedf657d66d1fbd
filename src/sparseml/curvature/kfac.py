"""K-FAC: a Kronecker-factored Fisher per Linear / Conv2d layer, kept as its two factors.

Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature",
ICML 2015, https://arxiv.org/abs/1503.05671 (convolutions: Grosse & Martens, "A
Kronecker-factored approximate Fisher matrix for convolution layers", ICML 2016,
https://arxiv.org/abs/1602.01407).

For a layer with weight W (out, in) (a Conv2d's (out, c, kh, kw) viewed as (out, c*kh*kw), the
row-major order of its flattening) the Fisher of vec(W) is approximated by F = G (x) A, with,
per batch of b examples and S positions per example (Conv2d: output pixels; Linear: 1, or the
tokens of a (b, ..., in) input), rows a_{n,s} (inputs; Conv2d: ``torch.nn.functional.unfold``
patches) and d_{n,s} = dL/d out_{n,s} of the batch-MEAN loss L:

    A = (1/b) sum_{n,s} (a_{n,s} / S)(a_{n,s} / S)^T
    G = (1/b) sum_{n,s} (b S d_{n,s})(b S d_{n,s})^T

each averaged over the batches: the WoodFisher reference's scaling (its
``kfac`` pruner uses the ``_proper`` factors: sums over all b*S rows, both divided by the number
of examples). For a Conv2d, G is therefore S times the per-position average of the outer
products; an earlier version divided G by b*S, S times smaller than the reference, which moved
the Conv2d layers against the Linear ones in a global mask (86-88% agreement). b*d is a
per-example output gradient, so A (x) G estimates the Fisher of per-example gradients (b^2
times the mini-batch-gradient Fisher that OBS's ``damp`` is relative to). A has no bias
column: biases are never pruned nor updated, so the weight-only Fisher is the consistent one
(a documented difference: the reference appends a ones column for layers with a bias, so the
weight block of its A^-1 is a Schur complement of the larger A, not the inverse of this A).

pi-damping: pi = (tr A / dim A) / (tr G / dim G), A += sqrt(damp * pi) I, G += sqrt(damp / pi) I.
Only the factors are stored (out^2 + in^2 per layer), never the (out*in)^2 matrix:
diag(F^-1) = diag(G^-1) (x) diag(A^-1) and F^-1 vec(V) = vec(G^-1 V A^-1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparseml import dist


@dataclass
class KFACFactors:
    """The damped inverse factors of one layer: F^-1 = G_inv (x) A_inv (float64)."""

    A_inv: Tensor  # (in, in)
    G_inv: Tensor  # (out, out)


def layer_rows(layer: nn.Module, inputs: Tensor, out_grads: Tensor) -> tuple[Tensor, Tensor, int]:
    """(b * S, in) input rows, (b * S, out) output-gradient rows and S, for one batch."""
    if isinstance(layer, nn.Conv2d):
        patches = F.unfold(
            inputs,
            layer.kernel_size,
            dilation=layer.dilation,
            padding=layer.padding,
            stride=layer.stride,
        )  # (b, in, S)
        positions = patches.shape[-1]
        a = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        d = out_grads.flatten(2).transpose(1, 2).reshape(-1, out_grads.shape[1])
        return a, d, positions
    positions = inputs[0].numel() // inputs.shape[-1] if inputs.dim() > 2 else 1
    return (
        inputs.reshape(-1, inputs.shape[-1]),
        out_grads.reshape(-1, out_grads.shape[-1]),
        positions,
    )


def batch_factors(layer: nn.Module, inputs: Tensor, out_grads: Tensor) -> tuple[Tensor, Tensor]:
    """One batch's (A, G) in float64 (see the module docstring)."""
    b = inputs.shape[0]
    a, d, positions = layer_rows(layer, inputs.double(), out_grads.double())
    a = a / positions
    d = d * (b * positions)
    return a.T @ a / b, d.T @ d / b


def kfac_factors(
    stats: Iterable[list[tuple[Tensor, Tensor]]], layers: list[nn.Module]
) -> list[tuple[Tensor, Tensor]]:
    """Per layer (A, G), averaged over the batches of ``stats`` and then over the ranks.

    ``stats`` yields, per batch, one (input, output-gradient) pair per layer (what
    `sparseml.grad_sampler.GradSampler.iter_layer_stats` yields)."""
    sums: list[list[Tensor]] | None = None
    count = 0
    for batch in stats:
        pairs = [batch_factors(layer, x, g) for layer, (x, g) in zip(layers, batch)]
        if sums is None:
            sums = [list(p) for p in pairs]
        else:
            for s, p in zip(sums, pairs):
                s[0] += p[0]
                s[1] += p[1]
        count += 1
    if sums is None:
        raise ValueError("no batches of layer statistics were given")
    flat = [t / count for pair in sums for t in pair]
    # each rank used its own batches: average the estimates (float64: exact for equal ones)
    dist.all_reduce_mean_(flat, torch.float64)
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(sums))]


def _spd_inverse(M: Tensor) -> Tensor:
    L = torch.linalg.cholesky(M)
    return torch.cholesky_inverse(L)


def damped_inverses(A: Tensor, G: Tensor, damp: float) -> KFACFactors:
    """pi-damped inverse factors (float64): (A + sqrt(damp*pi) I)^-1, (G + sqrt(damp/pi) I)^-1.

    pi balances the two factors' mean eigenvalues; a factor with zero trace (a dead layer)
    gets pi = 1."""
    mean_a = float(torch.diagonal(A).mean())
    mean_g = float(torch.diagonal(G).mean())
    pi = mean_a / mean_g if mean_a > 0 and mean_g > 0 else 1.0
    eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return KFACFactors(
        _spd_inverse(A + math.sqrt(damp * pi) * eye_a),
        _spd_inverse(G + math.sqrt(damp / pi) * eye_g),
    )


def kfac_inverse_diag(f: KFACFactors) -> Tensor:
    """diag(F^-1) of the row-major flattened (out, in) weight: (out * in,) float64."""
    return torch.outer(torch.diagonal(f.G_inv), torch.diagonal(f.A_inv)).reshape(-1)


def kfac_matvec(f: KFACFactors, v: Tensor) -> Tensor:
    """F^-1 v for a row-major flattened (out, in) vector: vec(G^-1 V A^-1), float64."""
    V = v.to(torch.float64).reshape(f.G_inv.shape[0], f.A_inv.shape[0])
    return (f.G_inv @ V @ f.A_inv).reshape(-1)
