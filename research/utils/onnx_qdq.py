"""Fake-quantized (QAT / calibrated) models: rebuilt from a checkpoint, exported as QDQ ONNX.

A model under a ``QuantizationModifier`` computes with ``torch.fake_quantize_*`` ops; the
TorchScript-based exporter (`utils.onnx_io`) writes each as a ``QuantizeLinear`` ->
``DequantizeLinear`` pair (per-channel weights need opset >= 13), the form int8 runtimes (ONNX
Runtime, TensorRT) fuse into integer kernels. Export the model after its observers are frozen
(``manager.finalize``, ``manager.apply(..., calib_loader=...)`` or `restore_quantization`): the
scales are then constants of the graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparseml.modifiers.quantization import QuantizationModifier
from sparseml.pytorch.optim import ScheduledModifierManager

from . import onnx_io
from .errors import SetupError


def restore_quantization(
    model: torch.nn.Module,
    recipe: str,
    manager_state: dict[str, Any] | None,
    recipe_variables: Any = None,
) -> ScheduledModifierManager:
    """Put back on ``model`` the fake quantization a training run ended with.

    The recipe's ``QuantizationModifier``s are initialized on ``model`` with their saved state
    (layers, bits, scales and activation ranges from the checkpoint's ``manager`` entry), then
    frozen; the other modifiers of the recipe are not needed (the weights already hold their
    zeros). Raises ``SetupError`` when the recipe quantizes nothing or the checkpoint holds no
    state for its quantization modifiers.
    """
    full = ScheduledModifierManager.from_yaml(recipe, recipe_variables=recipe_variables)
    quant = [m for m in full.modifiers if isinstance(m, QuantizationModifier)]
    if not quant:
        raise SetupError(f"--sparseml-recipe {recipe} holds no QuantizationModifier")
    manager = ScheduledModifierManager(quant)
    saved = {k: v for k, v in (manager_state or {}).items() if k in manager._keys()}
    if len(saved) != len(quant):
        raise SetupError(
            "the checkpoint holds no saved state for the recipe's QuantizationModifier "
            "(export a sparse_training.py checkpoint of a run with this recipe)"
        )
    manager.load_state_dict(saved, strict=False)
    manager.initialize(model, epoch=float("inf"))
    manager.finalize(model)
    return manager


def export_onnx(
    model: torch.nn.Module, example_input: torch.Tensor, path: str | Path
) -> dict[str, Any]:
    """Export ``model`` (eval mode) to ``path`` and run the file with ONNX Runtime.

    Returns ``{"path", "opset", "quantize_linear", "dequantize_linear", "max_abs_diff"}``:
    the QDQ node counts of the graph and the largest absolute difference between ONNX
    Runtime's output and the PyTorch model's on ``example_input`` (the batch dimension is
    dynamic). The model's train/eval mode is restored.
    """
    import onnx

    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            expected = model(example_input).float().cpu().numpy()
        path = onnx_io.export_onnx(model, example_input, path)
    finally:
        model.train(was_training)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    got = onnx_io.run(onnx_io.session(path), example_input)
    return {
        "path": str(path),
        "opset": onnx_io.OPSET,
        "quantize_linear": ops.count("QuantizeLinear"),
        "dequantize_linear": ops.count("DequantizeLinear"),
        "max_abs_diff": float(abs(got - expected).max()),
    }
