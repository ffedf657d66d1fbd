"""Quantization-aware training (QAT) and post-training calibration: ``!QuantizationModifier``.

From its ``start_epoch`` the Linear and Conv layers of the model (or of ``submodules``) compute
with fake-quantized weights (int8, symmetric, per output channel) and fake-quantized inputs
(uint8, asymmetric, per tensor): the forward pass sees the int8 model, gradients pass straight
through (``sparseml.kernels.quant``). Pruned weights stay exactly zero (zero point 0).

Nothing in the model changes: no parameter is renamed or added, no module is swapped. A forward
pre-hook puts the fake-quantized weight in the module's parameter slot for the duration of the
call (the way ``torch.func.functional_call`` substitutes parameters) and a forward hook puts the
parameter back, so masks, optimizers, EMA, DDP and checkpoints see the usual parameters and a
checkpoint loads into a plain model. Observer state (activation ranges, frozen weight scales)
lives on the modifier and in the manager's ``state_dict``, hence in checkpoints, for exact
resume; under ``torch.distributed`` the activation ranges are averaged over ranks every step.

Why PyTorch's functional ``torch.fake_quantize_*`` ops rather than ``torch.ao.quantization``
``FakeQuantize`` modules: those are modules with buffers; attached to the model they add
state-dict keys (a checkpoint would no longer load into a plain model) and DDP would overwrite
their ranges with rank 0's; kept aside they would still need their own save and restore. The
ops are the same maintained kernels (straight-through gradient, QDQ in ONNX export) with the
state kept as plain tensors here, so resume, rank averaging and export stay in one place.

Sample (SparseML's fields)::

    - !ConstantPruningModifier
      params: __ALL_PRUNABLE__
      start_epoch: 0.0
    - !QuantizationModifier
      start_epoch: 0.0
      weight_bits: 8
      activation_bits: 8
      disable_quantization_observer_epoch: 3.0
      freeze_bn_stats_epoch: 3.0
      exclude_module_types: ["LayerNorm"]

Schedule: observers (per-channel ``max |W|``, running input min/max) follow training until
``disable_quantization_observer_epoch``, then the scales are frozen; BatchNorm layers use their
running statistics from ``freeze_bn_stats_epoch``. ``end_epoch`` -1 keeps the model quantized
to the end (and after ``finalize``, which freezes the observers: evaluation and ONNX export see
the int8 model); a set ``end_epoch`` returns to float there. One-shot:
``manager.apply(model, calib_loader=batches)`` calibrates the activation ranges on ``batches``
(``num_calibration_steps`` of them, default all) in eval mode, then freezes them.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from sparseml.fields import (
    Field,
    FieldValueError,
    as_bool,
    as_dict,
    as_float,
    as_int,
    as_str,
    as_str_list,
    optional,
)
from sparseml.modifiers.base import Modifier, epoch_field
from sparseml.modifiers.quant_hooks import QuantLayer, QuantState, calibrate, select_layers
from sparseml.registry import register_modifier

_logger = logging.getLogger(__name__)
_TOL = 1e-9


def _bits(value: Any) -> int:
    bits = as_int()(value)
    if not 2 <= bits <= 8:
        raise FieldValueError("must be an integer in [2, 8] (int8 and narrower grids)")
    return bits


def _epoch_or_never(value: Any) -> float | None:
    # SparseML writes null for "never"; -1 is this package's "never" for epochs.
    if value is None or (not isinstance(value, bool) and value == -1):
        return None
    return as_float(0.0)(value)


def _no_kwargs(value: Any) -> dict:
    # SparseML forwards these to torch FakeQuantize constructors; the grids here are fixed by
    # the other fields, so a non-empty dict would be silently ignored: refuse it instead.
    out = as_dict(value)
    if out:
        raise FieldValueError(
            "is not supported (observers and ranges are set by weight_bits, activation_bits, "
            "reduce_range and tensorrt); leave it empty"
        )
    return out


def _no_custom_types(value: Any) -> list[str]:
    out = as_str_list(value)
    if out:
        raise FieldValueError(
            "is not supported: Linear and Conv layers (and their subclasses) are quantized"
        )
    return out


@register_modifier
class QuantizationModifier(Modifier):
    """Fake quantization of Linear/Conv weights and inputs (QAT or one-shot calibration).

    Fields (SparseML's legacy ``QuantizationModifier``) and what they do here:

    =====================================  ===================================================
    ``weight_bits`` / ``activation_bits``  grid widths (2-8); weights signed symmetric per
                                           channel, activations unsigned asymmetric per tensor
    ``submodules``                         names of the submodules to quantize (null: all)
    ``exclude_module_types``               class names of layers left in float
    ``quantize_linear_activations``        fake-quantize the inputs of Linear layers
    ``quantize_conv_activations``          fake-quantize the inputs of Conv layers
    ``disable_quantization_observer_epoch`` freeze scales and zero points from this epoch
    ``freeze_bn_stats_epoch``              BatchNorm uses running statistics from this epoch
    ``reduce_range``                       activations one bit narrower
    ``tensorrt``                           symmetric signed activations (zero point 0)
    ``num_calibration_steps``              batches of ``apply(calib_loader=...)`` (null: all)
    ``model_fuse_fn_name``                 no Conv-BN fusion is done: a warning says so when
                                           the model has BatchNorm and it is not ``no_fuse``
    ``quantize_embeddings``                Embedding layers stay float (warned when present)
    =====================================  ===================================================

    ``*_qconfig_kwargs`` and ``custom_quantizable_module_types`` are accepted only empty.
    Unlike SparseML, activations are quantized where an int8 kernel reads them (the inputs
    of Linear/Conv), not at layer outputs; ``end_epoch`` may be set (float again from then).
    """

    FIELDS = {
        "start_epoch": epoch_field(doc="epoch at which fake quantization starts"),
        "end_epoch": epoch_field(doc="epoch at which the model returns to float (-1: never)"),
        "submodules": Field(None, optional(as_str_list), "submodule names (null: whole model)"),
        "weight_bits": Field(8, _bits, "bits of the weight grid"),
        "activation_bits": Field(8, _bits, "bits of the activation grid"),
        "disable_quantization_observer_epoch": Field(None, _epoch_or_never, "null: never"),
        "freeze_bn_stats_epoch": Field(None, _epoch_or_never, "null: never"),
        "exclude_module_types": Field(None, optional(as_str_list), "class names left float"),
        "exclude_batchnorm": Field(True, as_bool, "BatchNorm is never quantized here"),
        "quantize_linear_activations": Field(True, as_bool, "quantize Linear inputs"),
        "quantize_conv_activations": Field(True, as_bool, "quantize Conv inputs"),
        "quantize_embeddings": Field(True, as_bool, "accepted; Embedding stays float"),
        "quantize_embedding_activations": Field(True, as_bool, "accepted; see above"),
        "reduce_range": Field(False, as_bool, "activations one bit narrower"),
        "tensorrt": Field(False, as_bool, "symmetric activations"),
        "num_calibration_steps": Field(None, optional(as_int(1)), "calibration batches"),
        "model_fuse_fn_name": Field(None, optional(as_str), "no fusion is done here"),
        "model_fuse_fn_kwargs": Field(None, optional(as_dict), "accepted with the above"),
        "activation_qconfig_kwargs": Field(None, _no_kwargs, "only empty"),
        "weight_qconfig_kwargs": Field(None, _no_kwargs, "only empty"),
        "custom_quantizable_module_types": Field(None, _no_custom_types, "only empty"),
    }
    SPARSIFICATION_TYPES = ("quantization",)
    END_RULE = "gt"

    def validate(self) -> None:
        super().validate()
        start = max(self._values["start_epoch"], 0.0)
        for name in ("disable_quantization_observer_epoch", "freeze_bn_stats_epoch"):
            when = self._values[name]
            if when is not None and when < start:  # it would freeze before anything was seen
                raise self.field_error(name, f"must be >= start_epoch ({start:g}) or null")
        if self._values["reduce_range"] and self._values["activation_bits"] < 3:
            raise self.field_error("reduce_range", "needs activation_bits >= 3")

    def reset_state(self) -> None:
        super().reset_state()
        self.layers: list[QuantLayer] = []
        self.qstate: QuantState | None = None

    # ----- schedule ---------------------------------------------------------------------------
    def _due(self, field: str, epoch: float) -> bool:
        when = self._values[field]
        return when is not None and epoch >= when - _TOL

    def update_ready(self, epoch: float, steps_per_epoch: int) -> bool:
        if super().update_ready(epoch, steps_per_epoch):
            return True
        if not self.enabled or not self.started or self.ended or self.qstate is None:
            return False
        observer_due = self.qstate.observing and self._due(
            "disable_quantization_observer_epoch", epoch
        )
        bn_due = not self.qstate.bn_frozen and self._due("freeze_bn_stats_epoch", epoch)
        return observer_due or bn_due

    # ----- lifecycle --------------------------------------------------------------------------
    def initialize(
        self, module: nn.Module, epoch: float = 0.0, loggers: Any = None, **kwargs: Any
    ) -> None:
        self.validate()
        self.layers, norms, notes = select_layers(module, self)
        for note in notes:
            _logger.warning("%s: %s", type(self).__name__, note)
        self.qstate = QuantState(self.layers, norms, self._grids())
        super().initialize(module, epoch, loggers, **kwargs)
        if not self.resuming and self.start_pending(epoch):
            self.scheduled_update(module, None, epoch, 1)

    def _grids(self) -> dict[str, Any]:
        return {
            "weight_bits": self.weight_bits,
            "activation_bits": self.activation_bits,
            "symmetric_activations": self.tensorrt,
            "reduce_range": self.reduce_range,
        }

    def update(self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int) -> None:
        super().update(module, optimizer, epoch, steps_per_epoch)
        assert self.qstate is not None
        if self.start_pending(epoch):
            self.qstate.attach()
        if self.qstate.observing and self._due("disable_quantization_observer_epoch", epoch):
            self.qstate.freeze_observers()
        if not self.qstate.bn_frozen and self._due("freeze_bn_stats_epoch", epoch):
            self.qstate.freeze_bn()

    def on_end(self, module: nn.Module) -> None:
        if self.qstate is not None:
            self.qstate.detach()

    def optimizer_post_step(
        self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> None:
        if self.qstate is not None and self.qstate.attached:
            self.qstate.sync_ranks()

    def calibrate(self, module: nn.Module, calib_loader: Any) -> None:
        """Post-training calibration: observe ``calib_loader``'s batches in eval mode, then
        freeze every scale and zero point. ``calib_loader`` may be None only when no input is
        quantized (the weight scales need no data)."""
        assert self.qstate is not None
        if not self.qstate.attached:
            return
        if calib_loader is None and self.qstate.quantizes_activations:
            raise ValueError(
                "QuantizationModifier quantizes layer inputs: one-shot use needs calibration "
                "data, manager.apply(model, calib_loader=<batches>)"
            )
        if calib_loader is not None:
            calibrate(module, self.qstate, calib_loader, self.num_calibration_steps)
        self.qstate.freeze_observers()

    def finalize(self, module: nn.Module | None = None, **kwargs: Any) -> None:
        # The fake quantization stays: a finalized QAT model is the int8-simulated model.
        if self.qstate is not None and self.qstate.attached:
            self.qstate.freeze_observers()
        super().finalize(module, **kwargs)

    def remove_quantization(self) -> None:
        """Remove every hook: the model computes in float again."""
        if self.qstate is not None:
            self.qstate.detach()

    # ----- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.qstate is not None:
            state.update(self.qstate.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.qstate is None:
            raise RuntimeError(f"{type(self).__name__}: initialize before load_state_dict")
        super().load_state_dict(state)
        self.qstate.load_state_dict(state, type(self).__name__)
        if self.started and not self.ended:
            self.qstate.attach()
        else:
            self.qstate.detach()


def quant_bits_by_layer(state_or_manager: Any) -> dict[str, dict[str, int | None]]:
    """``{layer name: {"weight_bits": b, "activation_bits": b or None}}`` of every quantized
    layer, from a manager (``ScheduledModifierManager``) or from its ``state_dict()`` (e.g. the
    ``manager`` entry of a training checkpoint). Layers that are not quantized are absent;
    ``activation_bits`` is None where only the weights are quantized."""
    if hasattr(state_or_manager, "modifiers"):
        states = [m.state_dict() for m in state_or_manager.quantization_modifiers if m.initialized]
    else:
        states = [
            s
            for key, s in dict(state_or_manager or {}).items()
            if str(key).startswith(f"{QuantizationModifier.__name__}-") and isinstance(s, dict)
        ]
    # Layers are quantized between the modifier's start and its end (if it has one).
    states = [s for s in states if s.get("started") and not s.get("ended")]
    out: dict[str, dict[str, int | None]] = {}
    for state in states:
        for name, (wbits, abits) in state.get("bits", {}).items():
            out[name] = {"weight_bits": wbits, "activation_bits": abits}
    return out
