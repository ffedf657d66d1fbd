"""M-FAC pruning: OBS scores and updates from a matrix-free inverse empirical Fisher.

Paper: "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information",
E. Frantar, E. Kurtic, D. Alistarh, arXiv 2107.03356, https://arxiv.org/abs/2107.03356
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from sparseml import dist
from sparseml.fields import (
    Check,
    Field,
    FieldValueError,
    as_bool,
    as_float,
    as_int,
    as_str,
    as_str_list,
    optional,
)
from sparseml.layouts import UnprunedLayout
from sparseml.pruning.estimators import MFACFisher
from sparseml.pruning.fields import (
    DEVICE,
    SAMPLING,
    SAMPLING_CHECKS,
    as_damp,
    block_size_or_full,
    mask_spec_of,
)
from sparseml.pruning.grad_buffer import TrainingGradients
from sparseml.pruning.modifier import PruningModifier
from sparseml.pruning.sampling import first_present_device
from sparseml.pruning.updates import Scored, matrix_free_scores, matrix_free_update
from sparseml.registry import register_modifier

LOG = logging.getLogger(__name__)


def _num_grads(value: Any) -> int | dict[float, int]:
    if not isinstance(value, dict):
        return as_int(1)(value)
    out = {as_float(0.0, 1.0)(k): as_int(1)(v) for k, v in value.items()}
    if 0.0 not in out:
        raise FieldValueError("as a mapping {sparsity: count} must include the key 0.0")
    return dict(sorted(out.items()))


MFAC_FIELDS = {
    **SAMPLING,
    **DEVICE,
    "num_grads": Field(64, _num_grads, "m, or {sparsity: m} (key 0.0 required)"),
    "damp": Field(1e-5, as_damp, "lambda: Fisher dampening (> 0)"),
    "fisher_block_size": Field(2000, block_size_or_full, "B; null or -1 for the full Fisher"),
    "num_pages": Field(1, as_int(1), "column pages for the full Fisher"),
    "global_sparsity": Field(False, as_bool, "one threshold over all params"),
    "use_gradient_buffering": Field(None, optional(as_bool), "buffer training gradients"),
    "grads_device": Field("cpu", as_str, "device of the training-gradient buffer"),
    "available_devices": Field(
        None, optional(as_str_list), "compute devices", aliases=("available_gpus",)
    ),
    "block_implementation": Field("auto", as_str, "accepted for compatibility, ignored"),
    "blocks_cross_layers": Field(False, as_bool, "reference blocking across parameters"),
}
# blocks hold unpruned weights only and the update is not joint per mask group: no
# block-size / group relation
MFAC_CHECKS = (
    SAMPLING_CHECKS[0],
    Check(
        "num_recomputations",
        lambda m: (
            m._values["num_recomputations"] != 1
            and (
                getattr(mask_spec_of(m._values), "kind", "") == "nm"
                or m._values["use_gradient_buffering"]
            )
        ),
        "must be 1 with an N:M mask or gradient buffering",
    ),
)


@register_modifier
class MFACPruningModifier(PruningModifier):
    """Gradual or one-shot pruning with M-FAC inverse-Fisher OBS scores and updates.

    Per pruning step: m gradient samples g_i (rows of G, restricted to the still unpruned
    weights) give F = damp*I + (1/m) G^T G, blockwise or full; scores are w^2 / (2 [F^-1]_qq)
    and the kept weights move by F^-1 (-w * 1[newly pruned] / diag(F^-1)), the sum of the
    single-weight OBS corrections, as in the reference.

    Sample recipe::

        !MFACPruningModifier
          params: __ALL_PRUNABLE__
          init_sparsity: 0.05
          final_sparsity: 0.9
          start_epoch: 0.0
          end_epoch: 10.0
          update_frequency: 1.0
          num_grads: {0.0: 64, 0.5: 128, 0.75: 256}
          fisher_block_size: 2000
          damp: 1.0e-5

    | field | paper | meaning |
    |---|---|---|
    | num_grads | m | gradients per estimate, or {sparsity: m} (the reference's schedule) |
    | damp | lambda | dampening of F |
    | fisher_block_size | B | unpruned weights per block; null or -1: one full Fisher |
    | num_pages | - | column pages of the full variant |
    | use_gradient_buffering | - | take the last m training gradients instead of samples |

    Blocks hold consecutive *unpruned* weights of one parameter and never cross parameters
    unless ``blocks_cross_layers: true`` (the reference's chunks of the concatenation of all
    parameters). Gradients come from the ``grad_sampler`` kwarg, or, with
    ``use_gradient_buffering: true`` (or no sampler and ``null``), from the training steps
    (`TrainingGradients` on ``grads_device``). ``block_implementation`` is accepted and
    ignored. Computation runs on ``fisher_inv_device``, else on the first usable of
    ``available_devices`` (alias ``available_gpus``), else on the parameters' device.
    """

    FIELDS = MFAC_FIELDS
    CHECKS = MFAC_CHECKS

    def reset_state(self) -> None:
        super().reset_state()
        self.buffer: TrainingGradients | None = None

    @property
    def gradient_source(self) -> str:
        return {True: "training", None: "sampler_or_training"}.get(
            self.use_gradient_buffering, "sampler"
        )

    def estimator(self) -> MFACFisher:
        return MFACFisher(
            self.damp, self.fisher_block_size, self.num_pages, self.blocks_cross_layers,
            self.num_grads_now(), self.compute_device(), buffered=self.grad_sampler is None,
            buffer=self.buffer, buffer_device=torch.device(self.grads_device),
        )  # fmt: skip

    def setup(self, module: nn.Module) -> None:
        if self.grad_sampler is None:
            self.buffer = TrainingGradients(self.grads_device)
            self._reset_buffer()

    def build_estimate(self, estimator: MFACFisher, module: nn.Module, layout) -> Any:
        if self.buffer is not None:  # training gradients change every step: never reused
            return estimator.build(self, module, layout)
        return super().build_estimate(estimator, module, layout)

    def prune_once(self, module: nn.Module, targets: list[float], timings: Any) -> None:
        super().prune_once(module, targets, timings)
        if self.buffer is not None:
            self._reset_buffer()

    def score(self, estimate) -> Scored:
        return matrix_free_scores(self, estimate)

    def update_weights(self, estimate, scored: Scored, masks: list[Tensor]) -> None:
        matrix_free_update(self, estimate, scored, masks, 1.0)

    def optimizer_pre_step(
        self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> None:
        if self.buffer is None:
            return
        if self.ended:
            self.buffer = None  # no pruning ahead: free the memory
            return
        self.buffer.push([r.param for r in self.refs])

    # ----- helpers ----------------------------------------------------------------------------
    def num_grads_now(self) -> int:
        """m at the current sparsity (the ``{sparsity: m}`` schedule's last key below it)."""
        if isinstance(self.num_grads, int):
            return self.num_grads
        current = self.current_sparsities()
        sparsity = sum(current) / max(len(current), 1)
        return [v for k, v in self.num_grads.items() if k <= sparsity + 1e-12][-1]

    def compute_device(self) -> torch.device:
        """``fisher_inv_device``, else the first present of ``available_devices``, else the
        parameters' device (missing devices are named once in a warning)."""
        if self.fisher_inv_device:
            return torch.device(self.fisher_inv_device)
        fallback = self.refs[0].param.device
        if not self.available_devices:
            return fallback
        if getattr(self, "_device", None) is None:
            owner = type(self).__name__
            self._device = first_present_device(self.available_devices, fallback, owner)
        return self._device

    def _reset_buffer(self) -> None:
        layout = UnprunedLayout(self.masks, self.fisher_block_size, self.blocks_cross_layers)
        self.buffer.reset(layout, self.num_grads_now(), self.work_dtype)

    # ----- state ------------------------------------------------------------------------------
    def rank_state_dict(self) -> dict[str, Any]:
        """This rank's buffered training gradients (its columns of the layout)."""
        return {} if self.buffer is None else self.buffer.state_dict()

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        if self.buffer is not None:
            self.buffer.load_state_dict(state, type(self).__name__)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if not dist.is_distributed() and self.buffer is not None:  # one process: all of it
            state["gradient_buffer"] = self.rank_state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.buffer is not None:
            self._reset_buffer()  # the layout of the saved masks
            if state.get("gradient_buffer"):
                self.load_rank_state_dict(state["gradient_buffer"])
