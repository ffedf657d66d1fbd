"""Integer-grid math of fake quantization (pure tensor functions).

Weights: symmetric, per output channel (dim 0), integers in ``[-2^(b-1), 2^(b-1) - 1]``,
``scale_c = max|W_c| / (2^(b-1) - 1)``, zero point 0. Activations: per tensor, asymmetric
unsigned integers ``[0, 2^b - 1]`` (``reduce_range``: one bit fewer) from a running min/max,
or symmetric signed ones with zero point 0 (TensorRT style).

The rounding is ``q = clamp(round(x / s) + z, qmin, qmax)`` (half to even), returning
``(q - z) * s``, with the straight-through gradient (zero outside the clamping range), and
``torch.onnx.export`` writes it as a ``QuantizeLinear``/``DequantizeLinear`` pair (the
symbolic of PyTorch's own fake-quantize ops). Why not those ops themselves: they compute
``round(x * (1 / s))``, while ONNX's ``QuantizeLinear`` (ONNX Runtime, TensorRT) divides,
``round(x / s)``. The two differ in the last bit for some x, and where ``x / s`` lies next to a
half-integer the integer differs by one: one quantization step, which a trained ViT carries
to its logits (0.06 max abs difference between the exported graph and the model). Dividing
here makes the PyTorch model compute what the exported graph computes.

Zeros stay exact. For a symmetric weight grid ``z = 0``; a pruned entry ``x = 0`` gives
``round(0 * (1/s)) = 0``, ``clamp(0 + 0) = 0`` (``qmin <= 0 <= qmax``), and ``(0 - 0) * s = 0``.
That needs ``1/s`` finite (``0 * inf`` is NaN), hence every scale is at least ``SCALE_MIN``
(an all-zero channel, fully pruned, gets ``s = SCALE_MIN`` and stays all zero). For the
asymmetric activation grid the range is widened to contain 0 and ``z = qmin - round(lo / s)``
is an integer in ``[qmin, qmax]``, so ``x = 0`` also maps to ``(z - z) * s = 0``.

Shapes: ``w`` is ``(C_out, ...)``; per-channel scales are ``(C_out,)`` float32; per-tensor
scale and zero point are 0-d tensors (float32 and int32), so no value leaves the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCALE_MIN = float(torch.finfo(torch.float32).eps)  # keeps 1/scale finite


def weight_range(bits: int) -> tuple[int, int]:
    """``(qmin, qmax)`` of a signed ``bits``-bit integer."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def activation_range(bits: int, symmetric: bool, reduce_range: bool) -> tuple[int, int]:
    """``(qmin, qmax)`` of activations: unsigned for the asymmetric grid, signed otherwise."""
    if reduce_range:
        bits -= 1
    return weight_range(bits) if symmetric else (0, 2**bits - 1)


def channel_absmax(w: Tensor) -> Tensor:
    """``(C_out,)`` float32 ``max |w|`` over every dim but the first."""
    flat = w.detach().reshape(w.shape[0], -1)
    return flat.abs().amax(dim=1).float()


def symmetric_scale(absmax: Tensor, qmax: int) -> Tensor:
    """Per-channel scale putting ``absmax`` on ``qmax`` (at least ``SCALE_MIN``)."""
    return (absmax.float() / qmax).clamp_min(SCALE_MIN)


class _FakeQuant(torch.autograd.Function):
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s``; per tensor (``axis`` None, 0-d scale
    and zero point) or per channel along ``axis`` (1-D ones). Exported as QDQ."""

    @staticmethod
    def forward(ctx, x, scale, zero, qmin, qmax, axis):  # noqa: ANN001, ANN205
        if axis is not None:  # (C,) -> broadcastable along axis
            shape = [1] * x.dim()
            shape[axis] = -1
            scale, zero = scale.view(shape), zero.view(shape)
        q = torch.round(x / scale).add_(zero)
        inside = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(inside)
        return q.clamp_(qmin, qmax).sub_(zero).mul_(scale)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None, None

    @staticmethod
    def symbolic(g, x, scale, zero, qmin, qmax, axis):  # noqa: ANN001, ANN205
        from torch.onnx._internal.torchscript_exporter import symbolic_opset13 as ops

        if axis is None:
            return ops.fake_quantize_per_tensor_affine(g, x, scale, zero, qmin, qmax)
        return ops.fake_quantize_per_channel_affine(g, x, scale, zero, axis, qmin, qmax)


def fake_quant_weight(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    """``w`` rounded to its symmetric per-channel grid (same dtype and shape as ``w``)."""
    qmin, qmax = weight_range(bits)
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
    out = _FakeQuant.apply(w.float(), scale.to(w.device, torch.float32), zero, qmin, qmax, 0)
    return out.to(w.dtype)


def affine_qparams(
    lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """0-d ``(scale, zero_point)`` of a range ``[lo, hi]`` widened to contain 0."""
    lo = lo.float().clamp_max(0.0)
    hi = hi.float().clamp_min(0.0)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp_min(SCALE_MIN)
        return scale, torch.zeros((), dtype=torch.int32, device=scale.device)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_MIN)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero


def fake_quant_activation(x: Tensor, scale: Tensor, zero: Tensor, qmin: int, qmax: int) -> Tensor:
    """``x`` rounded to the per-tensor grid ``(scale, zero)`` (same dtype as ``x``)."""
    out = _FakeQuant.apply(x.float(), scale.to(x.device), zero.to(x.device), qmin, qmax, None)
    return out.to(x.dtype)


def running_minmax(stats: Tensor | None, x: Tensor, momentum: float | None) -> Tensor:
    """``(2,)`` float32 running ``[min, max]`` of ``x``.

    The first batch sets it. Later batches move it by ``momentum`` (a moving average, as
    PyTorch's ``MovingAverageMinMaxObserver``: training), or widen it to the overall minimum
    and maximum when ``momentum`` is None (calibration, as ``MinMaxObserver``).
    """
    detached = x.detach()
    now = torch.stack([detached.min(), detached.max()]).float()
    if stats is None:
        return now
    if momentum is None:
        return torch.stack([torch.minimum(stats[0], now[0]), torch.maximum(stats[1], now[1])])
    return stats + momentum * (now - stats)
