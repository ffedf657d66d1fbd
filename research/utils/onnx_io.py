"""ONNX export of a timm model and its ONNX Runtime session (CPU).

``torch.onnx.export(..., dynamo=False)``: the TorchScript-based exporter needs only ``onnx``;
the dynamo exporter (torch's default since 2.9) also needs ``onnxscript``, which this project
does not install. The batch dimension is dynamic, so one file serves batch 1 and 64.
ONNX Runtime computes with the dense weights: zeros cost as much as other values there.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch

from sparseml.serialization import atomic_open

from .errors import SetupError

OPSET = 17


def require(module: str) -> None:
    """A clear error when an optional runtime package is missing."""
    try:
        __import__(module)
    except ImportError as err:
        raise SetupError(
            f"{module} is not installed: pip install -r requirements.txt (it lists {module})"
        ) from err


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Write ``model`` (eval mode, float32) as ONNX to ``path`` atomically."""
    require("onnx")
    buffer = io.BytesIO()
    # The tracer warns about Python control flow on shapes in timm's code; the dynamic batch
    # axis is all that varies here, and the ONNX Runtime check below would catch a bad trace.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (example,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


def session(path: str | Path, threads: int = 0):  # noqa: ANN201  (onnxruntime's type)
    """A CPU ONNX Runtime session (``threads`` intra-op threads; 0: its default)."""
    require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # Idle ORT threads spin for a while after each run; next to PyTorch's own thread pool (the
    # benchmark takes turns) that spinning steals the cores the other runtime needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, x: torch.Tensor) -> np.ndarray:  # noqa: ANN001
    return sess.run(None, {sess.get_inputs()[0].name: x.detach().cpu().numpy()})[0]
