"""ONNX export of fake-quantized (QAT / calibrated) models as QDQ graphs, checked with ONNX Runtime.

A model under a ``QuantizationModifier`` computes with ``torch.fake_quantize_*`` ops; the
TorchScript-based exporter writes each as a ``QuantizeLinear`` -> ``DequantizeLinear`` pair
(per-channel weights need opset >= 13), the form int8 runtimes (ONNX Runtime, TensorRT) fuse
into integer kernels. The dynamo exporter needs ``onnxscript`` and is not used here.
Export the model after the modifier froze its observers (``manager.finalize`` or
``manager.apply(..., calib_loader=...)``): the scales are then constants of the graph.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

OPSET = 17  # >= 13 for per-channel QuantizeLinear; 14+ for timm's attention


def export_onnx(
    model: torch.nn.Module, example_input: torch.Tensor, path: str | Path, opset: int = OPSET
) -> dict[str, Any]:
    """Export ``model`` (eval mode) to ``path`` and run the file with ONNX Runtime.

    Returns ``{"path", "opset", "quantize_linear", "dequantize_linear", "max_abs_diff"}``:
    the QDQ node counts of the graph and the largest absolute difference between ONNX
    Runtime's output and the PyTorch model's on ``example_input`` (the batch dimension is
    dynamic). The model's train/eval mode is restored.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(example_input).float().cpu().numpy()
            with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (example_input,),
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                )
    finally:
        model.train(was_training)
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": example_input.detach().cpu().numpy()})[0]
    return {
        "path": str(path),
        "opset": opset,
        "quantize_linear": ops.count("QuantizeLinear"),
        "dequantize_linear": ops.count("DequantizeLinear"),
        "max_abs_diff": float(abs(got - expected).max()),
    }
