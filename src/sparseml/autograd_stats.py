"""Per-batch autograd quantities beyond parameter gradients, for the grad sampler.

- `layer_stats`: each layer's input and the gradient of the loss with respect to its output
  (what K-FAC's Kronecker factors are built from);
- `hessian_products`: Hessian-vector products of the loss by double backprop.

Both use ``torch.autograd.grad`` with explicit inputs, so no ``.grad`` is written and a DDP
wrapper's reducer is never involved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from sparseml.errors import GradSamplerError


def layer_stats(
    layers: list[nn.Module], loss_of_batch: Callable[[], Tensor], dtype: torch.dtype
) -> list[tuple[Tensor, Tensor]]:
    """Per layer, (its input, dL/d its output), detached, in ``dtype``, for the loss that
    ``loss_of_batch()`` computes (one forward pass calling every layer exactly once)."""
    inputs: dict[int, Tensor] = {}
    outputs: dict[int, Tensor] = {}

    def capture(i: int):
        def hook(_mod: nn.Module, args: tuple, out: Tensor) -> None:
            if i in outputs:
                raise GradSamplerError(
                    f"layer {i} of the K-FAC statistics ran twice in one forward pass "
                    "(a shared layer); K-FAC needs one call per layer"
                )
            inputs[i], outputs[i] = args[0].detach(), out

        return hook

    handles = [m.register_forward_hook(capture(i)) for i, m in enumerate(layers)]
    try:
        loss = loss_of_batch()
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(layers)) if i not in outputs]
    if missing:
        raise GradSamplerError(
            f"layer {missing[0]} of the K-FAC statistics was not called by the model's "
            "forward (its weight is used elsewhere, e.g. inside nn.MultiheadAttention)"
        )
    order = sorted(outputs)
    grads = torch.autograd.grad(loss, [outputs[i] for i in order], allow_unused=True)
    return [
        (
            inputs[i].to(dtype),
            (torch.zeros_like(outputs[i]) if g is None else g).detach().to(dtype),
        )
        for i, g in zip(order, grads)
    ]


def hessian_products(
    loss: Tensor, params: list[nn.Parameter], vectors: Iterable[list[Tensor]], dtype: torch.dtype
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """(v, H v) for each v of ``vectors`` (one flat piece per parameter), H the Hessian of
    ``loss`` in ``params``, the products flat in ``dtype``; one double-backward pass per v."""
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    for v in vectors:
        out = [p.new_zeros(p.numel(), dtype=dtype) for p in params]
        if live:
            hv = torch.autograd.grad(
                [grads[i] for i in live],
                [params[i] for i in live],
                grad_outputs=[v[i].view_as(grads[i]).to(grads[i].dtype) for i in live],
                retain_graph=True,
                allow_unused=True,
            )
            for i, h in zip(live, hv):
                if h is not None:
                    out[i] = h.detach().reshape(-1).to(dtype)
        yield v, out
