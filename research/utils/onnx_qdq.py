"""Fake-quantized (QAT / calibrated) models: rebuilt from a checkpoint, exported as QDQ ONNX.

A model under a ``QuantizationModifier`` computes with ``torch.fake_quantize_*`` ops; the
TorchScript-based exporter (`utils.onnx_io`) writes each as a ``QuantizeLinear`` ->
``DequantizeLinear`` pair (per-channel weights need opset >= 13), the form int8 runtimes (ONNX
Runtime, TensorRT) fuse into integer kernels. Export the model after its observers are frozen
(``manager.finalize``, ``manager.apply(..., calib_loader=...)`` or `restore_quantization`): the
scales are then constants of the graph.

How the export is checked. The PyTorch model rounds ``round(x / s)`` like ``QuantizeLinear``
(`sparseml.kernels.quant`), yet the two runtimes' float arithmetic between the quantizers
(matrix products, LayerNorm, GELU, softmax) differs in the last bits, ~1e-6. Of the 10^5-10^6
activations a ViT rounds per batch, those whose x / s lies that close to a half-integer round
to neighbouring integers: one quantization step, carried to the logits (a trained vit_digits:
~20 of 256 inputs differ by up to 7e-3). No tolerance on the free-running outputs separates
that from a wrong graph. So the check runs ONNX Runtime once with every activation quantizer's
input and integers exposed, and verifies (1) the rounding: PyTorch's quantizer applied to ONNX
Runtime's own inputs gives exactly its integers; (2) the rest of the graph: the PyTorch model
run with each activation quantizer's integers taken from ONNX Runtime matches the outputs
within the float tolerance. The free-running difference and the number of activations that
rounded differently are reported too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparseml.kernels import quant as qk
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
    """Export ``model`` (eval mode) to ``path`` and check the file with ONNX Runtime.

    Returns ``{"path", "opset", "quantize_linear", "dequantize_linear", "max_abs_diff",
    "activation_quantizers", "rounding_mismatches", "rounded_differently",
    "max_abs_diff_same_integers"}`` (see the module docstring): ``max_abs_diff`` is the
    free-running difference to PyTorch on ``example_input``, ``rounding_mismatches`` the
    integers where PyTorch's rounding of ONNX Runtime's inputs differs from its
    ``QuantizeLinear`` (0 for a correct export), ``max_abs_diff_same_integers`` the difference
    with PyTorch given ONNX Runtime's integers. The model's train/eval mode is restored.
    """
    import onnx

    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            expected = model(example_input).float().cpu().numpy()
        path = onnx_io.export_onnx(model, example_input, path)
        graph = onnx.load(str(path))
        ops = [node.op_type for node in graph.graph.node]
        got, taps = _run_with_taps(graph, example_input)
        with _forced_activations(taps) as seen, torch.no_grad():
            forced = model(example_input).float().cpu().numpy()
    finally:
        model.train(was_training)
    if len(seen) != len(taps):
        raise RuntimeError(
            f"the graph has {len(taps)} activation quantizers, the model ran {len(seen)}"
        )
    return {
        "path": str(path),
        "opset": onnx_io.OPSET,
        "quantize_linear": ops.count("QuantizeLinear"),
        "dequantize_linear": ops.count("DequantizeLinear"),
        "max_abs_diff": float(abs(got - expected).max()),
        "activation_quantizers": len(taps),
        "rounding_mismatches": sum(s["mismatches"] for s in seen),
        "rounded_differently": sum(s["differ"] for s in seen),
        "max_abs_diff_same_integers": float(abs(got - forced).max()),
    }


def _run_with_taps(graph: Any, x: torch.Tensor) -> tuple[np.ndarray, list[tuple]]:
    """ONNX Runtime's output and, per activation ``QuantizeLinear`` in graph order, its float
    input and integer output (weights, constants of the graph, are left out)."""
    import onnx
    import onnxruntime as ort

    constant = {i.name for i in graph.graph.initializer}
    constant |= {o for n in graph.graph.node if n.op_type == "Constant" for o in n.output}
    nodes = [
        n for n in graph.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constant
    ]
    names = []
    for node in nodes:
        names += [node.input[0], node.output[0]]
        graph.graph.output.extend(
            [onnx.ValueInfoProto(name=node.input[0]), onnx.ValueInfoProto(name=node.output[0])]
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    outputs = session.run([session.get_outputs()[0].name, *names], {"input": x.numpy()})
    pairs = zip(outputs[1::2], outputs[2::2])
    return outputs[0], [
        (torch.from_numpy(i), torch.from_numpy(q.astype(np.int64))) for i, q in pairs
    ]


@contextlib.contextmanager
def _forced_activations(taps: list[tuple]) -> Iterator[list[dict]]:
    """While active, the k-th activation fake-quantization of the model returns ONNX Runtime's
    integers ``taps[k]`` dequantized with the model's own scale and zero point, after counting
    how its own rounding of ONNX Runtime's input compares."""
    real = qk.fake_quant_activation
    seen: list[dict] = []

    def forced(x, scale, zero, qmin, qmax):  # noqa: ANN001, ANN202
        k = len(seen)
        if k >= len(taps) or tuple(taps[k][0].shape) != tuple(x.shape):
            seen.append({"mismatches": x.numel(), "differ": x.numel()})
            return real(x, scale, zero, qmin, qmax)
        ort_in, ort_q = (t.to(x.device) for t in taps[k])
        own = torch.round(real(ort_in, scale, zero, qmin, qmax) / scale) + zero
        mine = torch.round(real(x, scale, zero, qmin, qmax) / scale) + zero
        seen.append({"mismatches": int((own != ort_q).sum()), "differ": int((mine != ort_q).sum())})
        return ((ort_q - zero) * scale).to(x.dtype)

    qk.fake_quant_activation = forced
    try:
        yield seen
    finally:
        qk.fake_quant_activation = real
