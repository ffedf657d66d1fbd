"""FastCAP, the fast variant of CAP: Correlation-Aware Pruning for Highly-Accurate Sparse
Vision Models.

Paper: Kuznedelev, Kurtic, Frantar, Alistarh, https://arxiv.org/abs/2210.09223
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseml.fields import Check, Field, as_bool, as_int, one_of, optional
from sparseml.kernels.fast_cap import (
    fast_cap_losses,
    fast_cap_prune,
    fast_cap_scores,
    row_scales,
)
from sparseml.kernels.fisher import from_blocks, to_blocks
from sparseml.pruning.estimators import SharedFisher
from sparseml.pruning.estimators.shared import LAYOUTS
from sparseml.pruning.fields import BLOCKS, SAMPLING, SAMPLING_CHECKS, mask_spec_of
from sparseml.pruning.modifier import PruningModifier
from sparseml.pruning.selectors import Threshold, layer_targets, loss_curve_targets
from sparseml.registry import register_modifier

# The densities, as multiples of the target's, at which ``global_allocation: losses`` sweeps
# every layer to measure its loss curve (sparsities 0.6 ... 0.98 around a target of 0.9).
CURVE_DENSITIES = (6.0, 4.0, 3.0, 2.0, 1.5, 1.25, 1.0, 0.8, 0.6, 0.4, 0.2)

# Rows a layer's loss curve is measured on at most (a fixed random subset, scaled up).
CURVE_ROWS = 128


def curve_levels(target: float) -> list[float]:
    """The sparsities at which a layer's loss curve is measured for a budget of ``target``."""
    return sorted({min(max(1.0 - (1.0 - target) * f, 0.0), 1.0) for f in CURVE_DENSITIES})


def score_targets(mod, fishers, count, scales, targets: list[float]) -> list[float]:
    """Per-layer targets of one threshold over every layer's first-pass scores."""
    scores = []
    for i, (ref, F) in enumerate(zip(mod.refs, fishers)):
        s = fast_cap_scores(mod._rows(i, F.device)[0], F, count, mod.damp, scales[i])
        scores.append(from_blocks(s, ref.param.numel()).view(ref.param.shape))
    return layer_targets(Threshold(mod.mask_spec, True), mod.masked_scores(scores), targets)


def loss_targets(mod, fishers, count, scales, targets: list[float]) -> list[float]:
    """Per-layer targets from every layer's loss curve (`loss_curve_targets`): each layer is
    swept, without write-back, to the `curve_levels` of its target."""
    curves, sizes = [], []
    for i, (ref, F, target) in enumerate(zip(mod.refs, fishers, targets)):
        W, pruned, valid = mod._rows(i, F.device)
        removed, loss = fast_cap_losses(
            W, F, count, curve_levels(target), damp=mod.damp,
            block_size=mod.block_size or F.shape[0], valid=valid, pruned=pruned,
            row_scale=scales[i], max_rows=CURVE_ROWS, zero_dead=mod.zero_dead,
        )  # fmt: skip
        # already pruned entries are zero: keeping them removed costs nothing (a row subset's
        # scaled-up count may fall a little short of them: the sweep never reopens one)
        base = float(pruned.sum())
        curves.append(([base, *removed.clamp(min=base).tolist()], [0.0, *loss.tolist()]))
        sizes.append(ref.param.numel())
    return loss_curve_targets(curves, sizes, sum(t * n for t, n in zip(targets, sizes)))


def _losses_not_global(mod) -> bool:
    values, spec = mod._values, mask_spec_of(mod._values)
    if spec is None:  # an invalid mask_type is reported on its own
        return False
    losses = values["global_allocation"] == "losses"
    return losses and not (values["global_sparsity"] and spec.kind == "unstructured")


def _columns_not_grouped(mod) -> bool:
    spec, values = mask_spec_of(mod._values), mod._values
    width = values["block_size"] or values["fisher_block_size"]
    return (
        spec is not None
        and spec.kind == "nm"
        and min(width, values["fisher_block_size"]) % spec.group != 0
    )


@register_modifier
class FastCAPruningModifier(PruningModifier):
    """FastCAP: one shared B x B Fisher per layer and a SparseGPT-style sweep.

    Each parameter's zero-padded flattening is cut into rows of B weights that share one
    empirical Fisher F = sum_n G_n^T G_n (G_n: gradient sample n viewed as rows of B). With U the
    upper Cholesky factor of (F/m + damp * mean(diag F/m) I)^-1, columns are swept left to right:
    weights scored w^2 / U_jj^2 are removed per column block (exactly round(s * count) per block
    of ``block_size`` columns; N:M picks n per group of m) and each removal's error is pushed
    onto the columns not yet swept. Unlike the reference, the swept weights are written back,
    the sweep starts at column 0, layers whose size is not a multiple of B are padded, and each
    layer gets its own target (a dict ``final_sparsity``).

    ``fisher_layout: rows`` (not in the reference) aligns the shared Fisher with the layer's
    rows: B is the weight's row length (``in_features``, or ``in_channels * kh * kw`` of a
    conv) or its largest divisor <= ``fisher_block_size``, so every Fisher coordinate is one
    input position; ``fixed`` (the default, the reference's) cuts the flattening into runs of
    ``fisher_block_size`` wherever the rows start.

    ``row_scaling: true`` (not in the reference) weights each row's scores by its own
    curvature: row r's Fisher is taken as s_r times the mean row Fisher, s_r = the trace of
    its own gradient Gram over the mean row's (a diagonal output factor, as in K-FAC). The
    updates are unchanged; which weights go changes, within a layer and across layers.
    ``false`` (the default) scores every row with the shared Fisher alone, as the reference.

    ``global_sparsity: true`` shares one sparsity budget among the layers: the per-layer targets
    are those of one threshold over the scores s_r w^2 / U_jj^2 / rows of all layers (in one
    row's units, as F sums the rows; `layer_targets`), then every layer is swept to its own
    target. ``false`` (the reference's behaviour, the default) gives every layer the same
    sparsity. ``global_allocation: losses`` shares the budget by the sweep's own losses
    instead of the first-pass scores: each layer's loss curve (`loss_targets`, swept without
    write-back to `curve_levels`) and the least summed loss over all curves
    (`loss_curve_targets`); docs/pruners.md has the details.

    Sample recipe::

        !FastCAPruningModifier
          params: ["re:.*(qkv|proj|fc1|fc2).weight"]
          init_sparsity: 0.0
          final_sparsity: 0.5
          start_epoch: 0.0
          end_epoch: 0.0
          update_frequency: 1.0
          num_grads: 256
          fisher_block_size: 192
          damp: 1.0e-2
          block_size: 128

    | field | paper | meaning |
    |---|---|---|
    | num_grads | m | gradient samples in the shared Fisher |
    | damp | alpha | RELATIVE dampening: alpha * mean(diag F) is added to F's diagonal |
    | fisher_block_size | B | row length sharing one Fisher (B = d_in gives SparseGPT's layout) |
    | fisher_layout | - | fixed: runs of B weights (reference); rows: B = each layer's row length |
    | block_size | - | columns per lazy-update block and per mask selection (None: B) |
    | mask_type | - | unstructured, or "N:M" (N pruned per M consecutive weights, B % M == 0) |
    | zero_dead | - | zero weights whose Fisher diagonal is 0, as the reference does |
    | row_scaling | - | weight each row's scores by its own Fisher trace (s_r) |
    | global_sparsity | - | one budget over all layers (per-layer targets from one threshold) |
    | global_allocation | - | scores: that threshold; losses: from each layer's sweep losses |

    Estimator: `SharedFisher` (B x B per layer, so every rank computes every layer, and the
    results agree without communication); the sweep selects and updates jointly.
    """

    FIELDS = {
        **SAMPLING,
        **BLOCKS,
        "block_size": Field(None, optional(as_int(1)), "columns per lazy block (None: B)"),
        "zero_dead": Field(False, as_bool, "zero weights with a zero Fisher diagonal"),
        "global_sparsity": Field(False, as_bool, "one sparsity budget over all layers"),
        "row_scaling": Field(False, as_bool, "weight each row's scores by its Fisher trace"),
        "global_allocation": Field(
            "scores",
            one_of("scores", "losses"),
            "scores: one threshold over first-pass scores; losses: the sweeps' loss curves",
        ),
        "fisher_layout": Field(
            "fixed", one_of(*LAYOUTS), "fixed: runs of B weights; rows: B = each row's length"
        ),
    }
    CHECKS = (
        *SAMPLING_CHECKS,
        Check(
            "block_size",
            _columns_not_grouped,
            lambda m: f"must be a multiple of M = {mask_spec_of(m._values).group}",
        ),
        Check(
            "global_allocation",
            _losses_not_global,
            "losses shares one budget among layers: it needs global_sparsity: true and an "
            "unstructured mask_type",
        ),
    )
    SELECTORS = frozenset({"layer", "global", "nm"})

    def estimator(self) -> SharedFisher:
        return SharedFisher(self.fisher_block_size, self.fisher_layout)

    def blocks(self) -> list[int]:
        """B of every selected parameter (a recipe error when the rows layout has none)."""
        return self.estimator().blocks(self)

    def sweep_bytes(self, blocks: list[int]) -> int:
        """Bytes a sweep holds at once: a layer's padded rows three times in float64 (weights,
        block copy, errors); the loss curves' copies of up to CURVE_ROWS rows six times (also
        each copy's scores, sort order and masks)."""
        rows = [-(-r.param.numel() // b) for r, b in zip(self.refs, blocks)]
        sweep = max((3 * 8 * n * b for n, b in zip(rows, blocks)), default=0)
        if self.selector_kind != "global" or self.global_allocation != "losses":
            return sweep
        levels = len(CURVE_DENSITIES)  # curve_levels gives at most one per density
        curves = (6 * 8 * levels * min(n, CURVE_ROWS) * b for n, b in zip(rows, blocks))
        return max(sweep, *curves)

    @property
    def joint(self) -> bool:
        return True

    def _rows(self, i: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Parameter i's weights, pruned and valid flags as rows of its B."""
        bsz, d = self.blocks()[i], self.refs[i].param.numel()
        W = to_blocks(self.flat_weights()[i].to(device), bsz)
        pruned = to_blocks((~self.masks[i].reshape(-1)).to(device, torch.float), bsz) > 0
        valid = to_blocks(torch.ones(d, device=device), bsz) > 0
        return W, pruned, valid

    def select_and_update(self, estimate, targets: list[float]) -> list[Tensor]:
        fishers, count, energies = estimate
        scales = [row_scales(e) if self.row_scaling else None for e in energies]
        if self.selector_kind == "global":
            share = loss_targets if self.global_allocation == "losses" else score_targets
            targets = share(self, fishers, count, scales, targets)
        spec = self.mask_spec
        nm = (spec.n, spec.group) if spec.kind == "nm" else (None, None)
        masks = []
        for i, (ref, F, target) in enumerate(zip(self.refs, fishers, targets)):
            W, pruned, valid = self._rows(i, F.device)
            W_new, keep = fast_cap_prune(
                W, F, count, target, damp=self.damp,
                block_size=self.block_size or F.shape[0], n=nm[0], m=nm[1],
                valid=valid, pruned=pruned, zero_dead=self.zero_dead, row_scale=scales[i],
            )  # fmt: skip
            d = ref.param.numel()
            self.write_weights(i, from_blocks(W_new, d))
            masks.append(from_blocks(keep, d).view(ref.param.shape))
        return masks
