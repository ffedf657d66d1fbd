"""The machinery behind ``QuantizationModifier``: layer selection, hooks, observers, state.

Hooks, not module swaps: a forward pre-hook on each quantized Linear/Conv fake-quantizes its
input and puts the fake-quantized weight into ``module._parameters["weight"]`` for the call;
a forward hook (``always_call``: also when the forward raises) puts the parameter back. The
parameter keeps its name, so masks, optimizers and checkpoints are untouched, and autograd
reaches it through the fake-quantize op (straight-through gradient).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sparseml import dist
from sparseml.errors import RecipeError, close_matches
from sparseml.kernels import quant as qk
from sparseml.params import unwrap

_CONV = nn.modules.conv._ConvNd
_BN = nn.modules.batchnorm._BatchNorm
MOMENTUM = 0.01  # moving average of activation ranges during training (PyTorch's default)


@dataclass
class QuantLayer:
    name: str
    module: nn.Module
    quant_input: bool


def _submodule_roots(root: nn.Module, names: list[str] | None, owner: str) -> list[str]:
    modules = dict(root.named_modules())
    out = []
    for name in names if names is not None else [""]:
        key = name.removeprefix("module.")
        if key not in modules:
            top = ", ".join(n for n, _ in root.named_children())
            raise RecipeError(
                f"{owner}: field 'submodules' entry {name!r} is no submodule of the model "
                f"(its top-level submodules: {top}; null quantizes the whole model)"
            )
        out.append(key)
    return out


def select_layers(model: nn.Module, mod: Any) -> tuple[list[QuantLayer], list[nn.Module], list]:
    """The Linear/Conv layers (and BatchNorm layers) under ``mod.submodules`` of ``model``,
    minus ``exclude_module_types``; also the warnings about fields that change nothing."""
    owner = type(mod).__name__
    root = unwrap(model)
    excluded = set(mod.exclude_module_types or [])
    layers: dict[str, QuantLayer] = {}
    norms: dict[str, nn.Module] = {}
    embeddings = False
    types: set[str] = set()
    for start in _submodule_roots(root, mod.submodules, owner):
        prefix = f"{start}." if start else ""
        for sub, module in root.get_submodule(start).named_modules():
            name = f"{prefix}{sub}" if sub else start
            types.add(type(module).__name__)
            if isinstance(module, _BN):
                norms.setdefault(name, module)
            embeddings |= isinstance(module, nn.Embedding)
            if not isinstance(module, nn.Linear | _CONV) or type(module).__name__ in excluded:
                continue
            if not isinstance(module._parameters.get("weight"), nn.Parameter):
                raise RecipeError(
                    f"{owner}: layer {name!r} has no plain weight parameter (parametrized or "
                    "lazy?); exclude it with exclude_module_types or submodules"
                )
            linear = isinstance(module, nn.Linear)
            quant_input = (
                mod.quantize_linear_activations if linear else mod.quantize_conv_activations
            )
            layers.setdefault(name, QuantLayer(name, module, quant_input))
    if not layers:
        raise RecipeError(f"{owner}: submodules {mod.submodules} hold no Linear or Conv layer")
    notes = []
    unmatched = sorted(excluded - types)
    if unmatched:  # a misspelt class name (Conv2D, linear) would quantize what it meant to keep
        named = ", ".join(f"{n!r}{close_matches(n, sorted(types))}" for n in unmatched)
        notes.append(
            f"exclude_module_types {named} match no layer of the model (class names, "
            "case-sensitive): nothing is excluded for them"
        )
    if norms and (mod.model_fuse_fn_name or "").lower() != "no_fuse":
        notes.append(
            f"BatchNorm layers are not fused into the convolutions (model_fuse_fn_name="
            f"{mod.model_fuse_fn_name}): Conv weights are quantized before BatchNorm"
        )
    if embeddings and mod.quantize_embeddings:
        notes.append("nn.Embedding layers stay float (quantize_embeddings is not implemented)")
    if not mod.exclude_batchnorm:
        notes.append("exclude_batchnorm: false has no effect: BatchNorm is never quantized")
    return list(layers.values()), list(norms.values()), notes


class QuantState:
    """Hooks and observer state of one ``QuantizationModifier``."""

    def __init__(self, layers: list[QuantLayer], norms: list[nn.Module], grids: dict) -> None:
        self.layers, self.norms = layers, norms
        self.weight_bits = grids["weight_bits"]
        self.activation_bits = grids["activation_bits"]
        self.symmetric_activations = grids["symmetric_activations"]
        self.qmin, self.qmax = qk.activation_range(
            self.activation_bits, self.symmetric_activations, grids["reduce_range"]
        )
        self.observing = True
        self.bn_frozen = False
        self.calibrating = False
        self.weight_scales: dict[str, Tensor] = {}  # frozen scales (none while observing)
        self.act_stats: dict[str, Tensor] = {}  # running [min, max] of each layer's input
        self._handles: list = []
        self._bn_handles: list = []
        self._saved: dict[int, Any] = {}

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def quantizes_activations(self) -> bool:
        return any(layer.quant_input for layer in self.layers)

    # ----- hooks ------------------------------------------------------------------------------
    def attach(self) -> None:
        if not self.attached:
            for i, layer in enumerate(self.layers):
                self._handles.append(layer.module.register_forward_pre_hook(self._pre(i)))
                self._handles.append(
                    layer.module.register_forward_hook(self._post(i), always_call=True)
                )
        if self.bn_frozen and not self._bn_handles:
            self._bn_handles = [
                bn.register_forward_pre_hook(_use_running_stats) for bn in self.norms
            ]

    def detach(self) -> None:
        for handle in self._handles + self._bn_handles:
            handle.remove()
        self._handles, self._bn_handles = [], []

    def _pre(self, index: int):
        def hook(module: nn.Module, args: tuple) -> tuple:
            layer = self.layers[index]
            if layer.quant_input and args and isinstance(args[0], Tensor):
                args = (self._quant_input(layer.name, args[0], module.training), *args[1:])
            weight = module._parameters["weight"]
            self._saved[index] = weight
            module._parameters["weight"] = self.fake_weight(layer.name, weight)
            return args

        return hook

    def _post(self, index: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            saved = self._saved.pop(index, None)
            if saved is not None:
                module._parameters["weight"] = saved

        return hook

    # ----- observers and fake quantization ----------------------------------------------------
    def weight_scale(self, name: str, weight: Tensor) -> Tensor:
        scale = self.weight_scales.get(name)
        if scale is None:
            scale = qk.symmetric_scale(
                qk.channel_absmax(weight), qk.weight_range(self.weight_bits)[1]
            )
        if torch.onnx.is_in_onnx_export():  # a constant of the graph, not a traced computation
            scale = torch.tensor(scale.tolist(), dtype=torch.float32, device=weight.device)
        return scale.to(weight.device)

    def fake_weight(self, name: str, weight: Tensor) -> Tensor:
        return qk.fake_quant_weight(weight, self.weight_scale(name, weight), self.weight_bits)

    def _quant_input(self, name: str, x: Tensor, training: bool) -> Tensor:
        stats = self.act_stats.get(name)
        if stats is not None:
            stats = stats.to(x.device)
        # A layer first seen after the observers were frozen takes its range from that batch.
        if stats is None or (self.observing and (training or self.calibrating)):
            stats = qk.running_minmax(stats, x, None if self.calibrating else MOMENTUM)
            self.act_stats[name] = stats
        scale, zero = qk.affine_qparams(
            stats[0], stats[1], self.qmin, self.qmax, self.symmetric_activations
        )
        return qk.fake_quant_activation(x, scale, zero, self.qmin, self.qmax)

    def input_qparams(self, name: str) -> tuple[Tensor, Tensor] | None:
        """``(scale, zero_point)`` of a layer's input grid (None before any observation)."""
        stats = self.act_stats.get(name)
        if stats is None:
            return None
        return qk.affine_qparams(
            stats[0], stats[1], self.qmin, self.qmax, self.symmetric_activations
        )

    def sync_ranks(self) -> None:
        """Average the activation ranges over ranks (collective: every rank calls it)."""
        if self.observing and self.act_stats:
            dist.all_reduce_mean_([self.act_stats[n] for n in sorted(self.act_stats)])

    @torch.no_grad()
    def freeze_observers(self) -> None:
        self.sync_ranks()
        qmax = qk.weight_range(self.weight_bits)[1]
        for layer in self.layers:
            if layer.name not in self.weight_scales:
                weight = layer.module._parameters["weight"]
                self.weight_scales[layer.name] = qk.symmetric_scale(qk.channel_absmax(weight), qmax)
        self.observing = False

    def freeze_bn(self) -> None:
        self.bn_frozen = True
        if self.attached:
            self.attach()

    # ----- state ------------------------------------------------------------------------------
    def bits(self) -> dict[str, list]:
        abits = self.activation_bits
        return {q.name: [self.weight_bits, abits if q.quant_input else None] for q in self.layers}

    def state_dict(self) -> dict[str, Any]:
        return {
            "observing": self.observing,
            "bn_frozen": self.bn_frozen,
            "bits": self.bits(),
            "weight_scales": {k: v.detach().cpu().clone() for k, v in self.weight_scales.items()},
            "act_stats": {k: v.detach().cpu().clone() for k, v in self.act_stats.items()},
        }

    def load_state_dict(self, state: dict[str, Any], owner: str) -> None:
        saved = {k: list(v) for k, v in state.get("bits", {}).items()}
        if saved != self.bits():
            raise RecipeError(
                f"{owner}: saved quantization state is for layers/bits {sorted(saved.items())[:4]}"
                f"..., the recipe selects {sorted(self.bits().items())[:4]}...; resume with the "
                "same recipe and model"
            )
        self.observing = bool(state.get("observing", True))
        self.bn_frozen = bool(state.get("bn_frozen", False))
        device = self.layers[0].module._parameters["weight"].device
        self.weight_scales = {k: v.to(device) for k, v in state.get("weight_scales", {}).items()}
        self.act_stats = {k: v.to(device) for k, v in state.get("act_stats", {}).items()}
        if not self.bn_frozen:
            for handle in self._bn_handles:
                handle.remove()
            self._bn_handles = []


def _use_running_stats(module: nn.Module, args: tuple) -> None:
    # model.train() switches BatchNorm back to batch statistics every epoch; this undoes it.
    module.train(False)


def _batch_args(batch: Any) -> tuple[list, dict]:
    if isinstance(batch, Tensor):
        return [batch], {}
    if isinstance(batch, list | tuple):
        if len(batch) == 3 and isinstance(batch[0], list | tuple) and isinstance(batch[1], dict):
            return list(batch[0]), dict(batch[1])  # the grad sampler's (args, kwargs, target)
        if len(batch) == 2:
            return [batch[0]], {}  # (inputs, target)
    raise ValueError(
        "calib_loader batches must be a tensor, (inputs, target) or (args, kwargs, target); "
        f"got {type(batch).__name__}"
    )


@torch.no_grad()
def calibrate(module: nn.Module, state: QuantState, loader: Iterable, steps: int | None) -> int:
    """Run ``module`` in eval mode over ``loader`` (at most ``steps`` batches) with the
    observers recording absolute input ranges; returns the number of batches seen."""
    if steps is None and not hasattr(loader, "__len__"):
        raise ValueError(
            "calib_loader has no length (an endless stream?): set the QuantizationModifier's "
            "num_calibration_steps"
        )
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    state.calibrating, state.observing = True, True
    seen = 0
    try:
        for batch in loader:
            if steps is not None and seen >= steps:
                break
            args, kwargs = _batch_args(batch)
            args = [a.to(device) if isinstance(a, Tensor) else a for a in args]
            module(*args, **kwargs)
            seen += 1
    finally:
        state.calibrating = False
        module.train(was_training)
    if seen == 0:
        raise ValueError("calib_loader yielded no batch")
    return seen
