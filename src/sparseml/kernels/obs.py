"""Optimal Brain Surgeon scores and weight updates with a block-diagonal inverse Fisher.

Papers:
- "WoodFisher: Efficient Second-Order Approximation for Neural Network Compression",
  Singh & Alistarh, NeurIPS 2020, https://arxiv.org/abs/2004.14340
- "The Optimal BERT Surgeon: Scalable and Accurate Second-Order Pruning for Large Language
  Models" (oBERT), Kurtic et al., EMNLP 2022, https://arxiv.org/abs/2203.07259

With the local quadratic model L(v) = 1/2 (v - w)^T F (v - w) and H = F^{-1} block-diagonal
(n_b, B, B) in the layout of `sparseml.kernels.fisher`:
- removing coordinate q alone costs rho_q = w_q^2 / (2 [H]_qq)                (`obs_scores`);
- removing a group Q alone costs rho_Q = 1/2 w_Q^T ([H]_QQ)^{-1} w_Q           (`obs_group_scores`);
- the best weights with v_Q = 0 are v = w - H[:, Q] ([H]_QQ)^{-1} w_Q, with loss
  1/2 w_Q^T ([H]_QQ)^{-1} w_Q; the blocks are independent, so this joint update is solved per
  block for the set Q_b of coordinates removed there                       (`obs_prune_update`).
oBERT/WoodFisher instead add the single-weight corrections independently
(`obs_independent_update`), which is exact only when the removed weights of a block are
uncorrelated under H.

Coordinates pruned earlier have zero weight and zero (masked) gradient, hence decoupled rows of
H (e_p / damp): they never move, and including them in a new prune set changes nothing.
All small solves run in float64; results come back in w's dtype and device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseml.errors import NumericalError
from sparseml.kernels import native, native_solve
from sparseml.kernels.chunking import chunk_blocks, for_each_chunk
from sparseml.kernels.fisher import block_diag, block_matvec, from_blocks, to_blocks
from sparseml.kernels.packed import SymBlocks
from sparseml.kernels.precision import work_dtype


def _check(w: Tensor, H: Tensor, mask: Tensor, name: str) -> None:
    if H.dim() != 3 or H.shape[1] != H.shape[2]:
        raise ValueError(f"H must have shape (n_b, B, B), got {tuple(H.shape)}")
    d, bsz = w.numel(), H.shape[1]
    if w.dim() != 1 or H.shape[0] != -(-d // bsz):
        raise ValueError(f"w must be (d,) with ceil(d/B) = {H.shape[0]} blocks, got {w.shape}")
    if mask.shape != w.shape or mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor of shape {tuple(w.shape)}")


def obs_scores(w: Tensor, H: Tensor, pruned: Tensor, *, eps: float = 0.0) -> Tensor:
    """Single-weight OBS saliencies rho_q = w_q^2 / (2 [H]_qq + eps), -inf where ``pruned``.

    Args:
        w: (d,) flattened weights. H: (n_b, B, B). pruned: (d,) bool, already pruned.
        eps: added to the denominator only to reproduce the reference (which uses float32 eps);
            [H]_qq > 0 holds for any H from `invert_block_fisher`, so the default is exact OBS.
    Returns:
        (d,) scores on w's device, float32 (float64 for float64 ``w``): never in half
        precision, where scores ~1e-10 underflow to ties (higher = keep).
    """
    _check(w, H, pruned, "pruned")
    diag = block_diag(H, w.numel()).to(device=w.device, dtype=torch.float64)
    scores = w.double().square() / (2 * diag + eps)
    return scores.masked_fill_(pruned, float("-inf")).to(work_dtype([w.dtype]))


def _group_diag_blocks(H: Tensor, group: int) -> Tensor:
    """(n_b, B, B) -> (n_b, B/g, g, g): the g x g diagonal sub-blocks of consecutive groups."""
    n_b, bsz = H.shape[0], H.shape[1]
    k = bsz // group
    return H.reshape(n_b, k, group, k, group).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)


def _check_group(group: int, bsz: int) -> None:
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or bsz % group:
        raise ValueError(
            f"group size must be an integer >= 1 dividing the block size {bsz}, got {group!r}"
        )


def _group_solve(w: Tensor, H: Tensor, group: int) -> Tensor:
    """y_Q = ([H]_QQ)^{-1} w_Q for every group Q: (n_b, B/g, g) float64 on H's device."""
    n_b, bsz = H.shape[0], H.shape[1]
    k = bsz // group
    wq = to_blocks(w.to(device=H.device, dtype=torch.float64), bsz).view(n_b, k, group)
    y = torch.empty_like(wq)
    step = chunk_blocks(bsz * group, H.device)

    def solve_chunk(s: int) -> None:
        sub = _group_diag_blocks(H[s : s + step], group).double()
        ys, info = torch.linalg.solve_ex(sub, wq[s : s + step].unsqueeze(-1))
        if info.any():
            b = s + int(info.flatten().nonzero()[0]) // k
            raise NumericalError(f"a group sub-block of Fisher block {b} is singular")
        y[s : s + step] = ys.squeeze(-1)

    for_each_chunk(solve_chunk, n_b, step, H.device)
    return y


def obs_group_scores(w: Tensor, H: Tensor, pruned: Tensor, group: int) -> Tensor:
    """Group OBS saliencies 1/2 w_Q^T ([H]_QQ)^{-1} w_Q for groups of ``group`` coordinates.

    Groups are ``group`` consecutive coordinates of the flattening (B % group == 0). Each
    group's score is written to all its members; groups whose members are all in ``pruned``
    score -inf. Coordinates of a partly pruned group are zero and decoupled, so they add 0.
    Returns (d,) on w's device, float32 (float64 for float64 ``w``).
    """
    _check(w, H, pruned, "pruned")
    bsz = H.shape[1]
    _check_group(group, bsz)
    n_b, k, d = H.shape[0], bsz // group, w.numel()
    wq = to_blocks(w.to(device=H.device, dtype=torch.float64), bsz).view(n_b, k, group)
    scores = 0.5 * (wq * _group_solve(w, H, group)).sum(-1)
    # Padding counts as pruned, so a group of pruned and padded coordinates is fully pruned.
    dead = to_blocks(pruned.to(device=H.device, dtype=torch.float32), bsz)
    dead.view(-1)[d:] = 1.0
    scores.masked_fill_(dead.view(n_b, k, group).bool().all(-1), float("-inf"))
    full = scores.unsqueeze(-1).expand(n_b, k, group).reshape(n_b, bsz)
    return from_blocks(full, d).to(device=w.device, dtype=work_dtype([w.dtype]))


def _masked_solve(H: Tensor, w: Tensor, prune: Tensor) -> tuple[Tensor, Tensor]:
    """Per block, y_Q = ([H]_QQ)^{-1} w_Q and 0 elsewhere, then H y (both float64, (n_b, B)).

    Blocks with an empty Q are skipped. The varying |Q| are handled in one batch by solving with
    A = diag(q) H diag(q) + diag(1 - q), which is H_QQ on Q and the identity elsewhere.
    """
    n_b, bsz = H.shape[0], H.shape[1]
    q = to_blocks(prune.to(H.device), bsz)
    wb = to_blocks(w.to(device=H.device, dtype=torch.float64), bsz)
    y = torch.zeros(n_b, bsz, dtype=torch.float64, device=H.device)
    hy = torch.zeros_like(y)
    active = q.any(-1).nonzero().squeeze(-1)
    if native.ENABLED and isinstance(H, SymBlocks) and H.device.type == "cpu":
        sel = torch.argsort((~q).to(torch.int8), dim=1, stable=True)  # Q first, by index
        y, hy, info = native_solve.solve_subsets_packed(wb, H, sel, q.sum(1), active)
        _check_solved(info[active], active)
        return y, hy
    step = chunk_blocks(bsz * bsz, H.device)

    def solve_chunk(s: int) -> None:
        idx = active[s : s + step]
        hc = H[idx].double()
        qc = q[idx].double()
        a = hc * (qc.unsqueeze(-1) * qc.unsqueeze(-2))
        a.diagonal(dim1=-2, dim2=-1).add_(1 - qc)
        chol, info = torch.linalg.cholesky_ex(a)
        _check_solved(info, idx)
        yc = torch.cholesky_solve((wb[idx] * qc).unsqueeze(-1), chol)
        y[idx] = yc.squeeze(-1)
        hy[idx] = torch.bmm(hc, yc).squeeze(-1)

    for_each_chunk(solve_chunk, active.numel(), step, H.device)
    return y, hy


def _check_solved(info: Tensor, blocks: Tensor) -> None:
    failed = info.nonzero()
    if failed.numel():
        raise NumericalError(
            f"[H]_QQ of Fisher block {int(blocks[int(failed[0])])} is not positive definite; "
            "the inverse Fisher is ill-conditioned: use a larger damp"
        )


def obs_prune_update(w: Tensor, H: Tensor, prune: Tensor) -> Tensor:
    """Joint OBS update removing the coordinates ``prune`` (d,) bool, block by block.

    w_new = w - H[:, Q] ([H]_QQ)^{-1} w_Q per block, then w_new[prune] = 0 exactly. This is the
    minimiser of (v - w)^T F (v - w) subject to v_Q = 0. Returns (d,) in w's dtype and device.
    """
    _check(w, H, prune, "prune")
    _, hy = _masked_solve(H, w, prune)
    delta = from_blocks(hy, w.numel()).to(w.device)
    return (w.double() - delta).masked_fill_(prune, 0.0).to(w.dtype)


def obs_loss(w: Tensor, H: Tensor, prune: Tensor) -> float:
    """Loss increase 1/2 sum_b w_Q^T ([H]_QQ)^{-1} w_Q of the joint OBS removal of ``prune``."""
    _check(w, H, prune, "prune")
    y, _ = _masked_solve(H, w, prune)
    wb = to_blocks(w.to(device=H.device, dtype=torch.float64), H.shape[1])
    return 0.5 * float((wb * y).sum())


def obs_independent_update(
    w: Tensor, H: Tensor, prune: Tensor, *, eps: float = 0.0, group: int = 1
) -> Tensor:
    """oBERT/WoodFisher update: the sum of independent OBS corrections of ``prune``.

    w_new = w - H v, then w_new[prune] = 0, where v is zero outside ``prune`` and on it
    v_q = w_q / ([H]_qq + eps) (group == 1), or v_Q = ([H]_QQ)^{-1} w_Q per group of ``group``
    consecutive coordinates (the reference's block4 update; ``prune`` must hold whole groups).
    Kept to reproduce the reference; for the same ``prune`` `obs_prune_update` is never worse.
    """
    _check(w, H, prune, "prune")
    d = w.numel()
    if group == 1:
        diag = block_diag(H, d).to(device=w.device, dtype=torch.float64)
        v = w.double() / (diag + eps)
    else:
        _check_group(group, H.shape[1])
        v = from_blocks(_group_solve(w, H, group).flatten(1), d).to(w.device)
    v = v.masked_fill_(~prune, 0.0)
    delta = block_matvec(H, v).to(device=w.device, dtype=torch.float64)
    return (w.double() - delta).masked_fill_(prune, 0.0).to(w.dtype)
