"""FastCAP, the fast variant of CAP: Correlation-Aware Pruning for Highly-Accurate Sparse
Vision Models.

Paper: Kuznedelev, Kurtic, Frantar, Alistarh, https://arxiv.org/abs/2210.09223
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparseml.fields import Check, Field, as_bool, as_int, one_of, optional
from sparseml.kernels.fast_cap import (
    factors,
    fast_cap_losses,
    fast_cap_prune,
    fast_cap_scores,
    group_count,
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


def rows_of(mod, i: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Parameter i's weights, pruned and valid flags as rows of its B."""
    bsz, d = mod.blocks()[i], mod.refs[i].param.numel()
    W = to_blocks(mod.flat_weights()[i].to(device), bsz)
    pruned = to_blocks((~mod.masks[i].reshape(-1)).to(device, torch.float), bsz) > 0
    valid = to_blocks(torch.ones(d, device=device), bsz) > 0
    return W, pruned, valid


class _Layer:
    """One parameter's rows of B as the kernels take them: with ``fisher_rows`` its rows are
    padded (invalid rows) to whole groups, one per Fisher in F (G, B, B), and each group's
    row scales are relative to its own mean row."""

    def __init__(self, mod, i: int, F: Tensor, energy: Tensor | None, group_rows: int | None):
        W, pruned, valid = rows_of(mod, i, F.device)
        if F.dim() == 3 and F.shape[0] == 1:  # one group holds every row: the shared Fisher
            F, group_rows = F[0], None
        self.index, self.F, self.rows = i, F, W.shape[0]
        self.scale, self._U = None, None
        if group_rows is None:
            if mod.row_scaling:
                self.scale = row_scales(energy)
            self.W, self.pruned, self.valid = W, pruned, valid
            return
        pad = F.shape[0] * group_rows - self.rows
        self.W = torch.nn.functional.pad(W, (0, 0, 0, pad))
        self.pruned, self.valid = (
            torch.nn.functional.pad(t, (0, 0, 0, pad), value=False) for t in (pruned, valid)
        )
        if mod.row_scaling:  # each group's real rows against their mean; padding rows 1
            parts = [row_scales(e) for e in energy.to(F.device).split(group_rows)]
            ones = torch.ones(pad, dtype=torch.float64, device=F.device)
            self.scale = torch.cat([*parts, ones])

    def U(self, mod, count: int) -> Tensor:
        """The inverse factors of F (`factors`), computed once for all sweeps of the step."""
        if self._U is None:
            self._U = factors(self.F, count, mod.damp)
        return self._U

    @property
    def groups(self) -> int:
        return self.F.shape[0] if self.F.dim() == 3 else 1

    def group_sizes(self) -> list[int]:
        return self.valid.view(self.groups, -1).sum(dim=1).tolist()

    def group_pruned(self) -> list[float]:
        return self.pruned.view(self.groups, -1).sum(dim=1).double().tolist()


def layers_of(mod, fishers: list[Tensor], energies: list[Tensor]) -> list[_Layer]:
    groups = mod.estimator().group_rows(mod, mod.blocks())
    return [
        _Layer(mod, i, F, energies[i] if energies else None, k)
        for i, (F, k) in enumerate(zip(fishers, groups))
    ]


def score_targets(mod, layers: list[_Layer], count, targets: list[float]) -> list:
    """Per-layer targets of one threshold over every layer's first-pass scores."""
    scores = []
    for layer, ref in zip(layers, mod.refs):
        s = fast_cap_scores(
            layer.W, layer.F, count, mod.damp, layer.scale, valid=layer.valid,
            U=layer.U(mod, count),
        )  # fmt: skip
        scores.append(from_blocks(s[: layer.rows], ref.param.numel()).view(ref.param.shape))
    return layer_targets(Threshold(mod.mask_spec, True), mod.masked_scores(scores), targets)


def loss_targets(mod, layers: list[_Layer], count, targets: list[float]) -> list:
    """Per-layer (or, with ``fisher_rows``, per-group) targets from every layer's or group's
    loss curve (`loss_curve_targets`): each is swept, without write-back, to the
    `curve_levels` of its layer's target."""
    curves, sizes = [], []
    for layer, target in zip(layers, targets):
        removed, loss = fast_cap_losses(
            layer.W, layer.F, count, curve_levels(target), damp=mod.damp,
            block_size=mod.block_size or layer.F.shape[-1], valid=layer.valid,
            pruned=layer.pruned, row_scale=layer.scale, max_rows=CURVE_ROWS,
            zero_dead=mod.zero_dead, U=layer.U(mod, count),
        )  # fmt: skip
        removed, loss = removed.view(len(loss), -1), loss.view(len(loss), -1)
        for g, (base, size) in enumerate(zip(layer.group_pruned(), layer.group_sizes())):
            # already pruned entries are zero: keeping them removed costs nothing (a row
            # subset's scaled-up count may fall a little short of them: no sweep reopens one)
            got = removed[:, g].clamp(min=base).tolist()
            curves.append(([base, *got], [0.0, *loss[:, g].tolist()]))
            sizes.append(size)
    total = sum(t * ref.param.numel() for t, ref in zip(targets, mod.refs))
    flat = iter(loss_curve_targets(curves, sizes, total))
    return [
        next(flat) if layer.groups == 1 else [next(flat) for _ in range(layer.groups)]
        for layer in layers
    ]


def sweep_bytes(mod, blocks: list[int]) -> int:
    """Bytes a sweep holds at once: a layer's padded rows three times in float64 (weights,
    block copy, errors), one more with ``fisher_rows`` (the groups' lazy updates) and one more
    with ``sweeps`` above 1 (the previous sweep's weights, which the next copies); the loss
    curves' copies of up to CURVE_ROWS rows (one per group at least) six times (also each
    copy's scores, sort order and masks); plus the inverse factors, every layer's at once
    under a global allocation (each layer's are kept from the allocation to its prune), and
    the two B x B float64 working copies of factoring one Fisher (`inverse_factor`)."""
    rows = [-(-r.param.numel() // b) for r, b in zip(mod.refs, blocks)]
    groups = [group_count(n, k) for n, k in zip(rows, mod.estimator().group_rows(mod, blocks))]
    extra = mod.fisher_rows is not None
    again = mod.sweeps > 1  # a later sweep starts from the previous one's result
    U = [g * b * b * 8 for g, b in zip(groups, blocks)]
    held = sum(U) if mod.selector_kind == "global" else max(U, default=0)
    held += 2 * 8 * max(blocks, default=0) ** 2  # factoring: the scaled Fisher and its factor
    sweep = max(((3 + extra + again) * 8 * n * b for n, b in zip(rows, blocks)), default=0)
    if mod.selector_kind != "global" or mod.global_allocation != "losses":
        return sweep + held
    levels = len(CURVE_DENSITIES)  # curve_levels gives at most one per density
    curves = (
        (6 + extra) * 8 * levels * min(n, max(CURVE_ROWS, g)) * b
        for n, g, b in zip(rows, groups, blocks)
    )
    return max(sweep, *curves) + held


def _losses_not_global(mod) -> bool:
    values, spec = mod._values, mask_spec_of(mod._values)
    if spec is None:  # an invalid mask_type is reported on its own
        return False
    losses = values["global_allocation"] == "losses"
    return losses and not (values["global_sparsity"] and spec.kind == "unstructured")


def _rows_not_aligned(mod) -> bool:
    return mod._values["fisher_rows"] is not None and mod._values["fisher_layout"] != "rows"


def _sweeps_not_unstructured(mod) -> bool:
    spec = mask_spec_of(mod._values)
    return mod._values["sweeps"] > 1 and spec is not None and spec.kind != "unstructured"


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

    ``fisher_rows: k`` (rows layout; not in the reference) gives each run of k output rows
    (features, channels) its own Fisher, summed over its rows only, for its updates and
    scores; each group takes its share of a layer's target (``losses``: its own curve).

    ``sweeps: k`` (unstructured; not in the reference) reaches each layer's target in k sweeps
    with the same Fisher, the density falling geometrically (`sweep_levels`): each sweep
    chooses its removals from the weights the previous one updated and keeps those it
    removed, a cheap stand-in for CAP's greedy, weight-by-weight choice. The allocation
    (``global_sparsity``) is made once, before the first sweep.

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
    | fisher_rows | - | output rows sharing one Fisher (None: all of the layer's) |
    | sweeps | - | sweeps of rising sparsity that reach the target (1: one, as the reference) |

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
            "scores", one_of("scores", "losses"), "scores: one threshold; losses: loss curves"
        ),
        "fisher_layout": Field(
            "fixed", one_of(*LAYOUTS), "fixed: runs of B weights; rows: B = each row's length"
        ),
        "fisher_rows": Field(
            None, optional(as_int(1)), "output rows sharing one Fisher (None: all of a layer's)"
        ),
        "sweeps": Field(1, as_int(1), "sweeps of rising sparsity that reach the target"),
    }
    CHECKS = (
        *SAMPLING_CHECKS,
        Check(
            "block_size",
            _columns_not_grouped,
            lambda m: f"must be a multiple of M = {mask_spec_of(m._values).group}",
        ),
        Check("fisher_rows", _rows_not_aligned, "groups output rows: it needs fisher_layout: rows"),
        Check("sweeps", _sweeps_not_unstructured, "above 1 needs an unstructured mask_type"),
        Check(
            "global_allocation",
            _losses_not_global,
            "losses shares one budget among layers: it needs global_sparsity: true and an "
            "unstructured mask_type",
        ),
    )
    SELECTORS = frozenset({"layer", "global", "nm"})

    def estimator(self) -> SharedFisher:
        return SharedFisher(self.fisher_block_size, self.fisher_layout, self.fisher_rows)

    def blocks(self) -> list[int]:
        """B of every selected parameter (a recipe error when the rows layout has none)."""
        return self.estimator().blocks(self)

    def sweep_bytes(self, blocks: list[int]) -> int:
        return sweep_bytes(self, blocks)

    @property
    def joint(self) -> bool:
        return True

    def select_and_update(self, estimate, targets: list[float]) -> list[Tensor]:
        fishers, count, energies = estimate
        layers = layers_of(self, fishers, energies)
        if self.selector_kind == "global":
            share = loss_targets if self.global_allocation == "losses" else score_targets
            targets = share(self, layers, count, targets)
        spec = self.mask_spec
        nm = (spec.n, spec.group) if spec.kind == "nm" else (None, None)
        masks = []
        for layer, ref, target in zip(layers, self.refs, targets):
            W_new, keep = fast_cap_prune(
                layer.W, layer.F, count, target, damp=self.damp,
                block_size=self.block_size or layer.F.shape[-1], n=nm[0], m=nm[1],
                valid=layer.valid, pruned=layer.pruned, zero_dead=self.zero_dead,
                row_scale=layer.scale, U=layer.U(self, count), sweeps=self.sweeps,
            )  # fmt: skip
            layer._U = None  # this layer's factors are not needed again
            d = ref.param.numel()
            self.write_weights(layer.index, from_blocks(W_new[: layer.rows], d))
            masks.append(from_blocks(keep[: layer.rows], d).view(ref.param.shape))
        return masks
