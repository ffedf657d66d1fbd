"""Draws gradient samples for second-order pruners.

One sample is the gradient of one mini-batch loss with respect to the pruned parameters,
with pruned entries zeroed. Pass it the way CAP's scripts do::

    manager.apply(model, grad_sampler={"data_loader_builder": build, "loss_fn": loss})

where ``build(**grad_sampler_kwargs)`` returns an iterable of ``(args, kwargs, target)``
triples (the recipe's ``grad_sampler_kwargs``, e.g. ``batch_size``, are passed to it). A loader
that runs dry before ``num_grads`` samples is restarted (iterated again); one that yields
nothing raises ``GradSamplerError``. Under ``torch.distributed`` every rank draws samples from
its own data and the gradients are averaged, unless the model is DDP-wrapped (DDP's backward
already averages them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from sparseml import dist
from sparseml.errors import GradSamplerError, NumericalError

LOG = logging.getLogger(__name__)
HOW_TO = (
    "pass grad_sampler={'data_loader_builder': f, 'loss_fn': loss} to manager.apply(...) or "
    "manager.modify(...), where f(**grad_sampler_kwargs) yields (args, kwargs, target) batches "
    "(scripts: add --gs-loader / --gs_loader)"
)


class GradSampler:
    def __init__(
        self,
        data_loader_builder: Callable[..., Iterable],
        loss_fn: Callable[[Any, Any], Tensor],
        builder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not callable(data_loader_builder) or not callable(loss_fn):
            raise GradSamplerError(f"data_loader_builder and loss_fn must be callables; {HOW_TO}")
        self.builder = data_loader_builder
        self.loss_fn = loss_fn
        self.builder_kwargs = dict(builder_kwargs or {})
        self._loader: Iterable | None = None
        self._iter: Iterator | None = None

    @classmethod
    def from_kwargs(
        cls, grad_sampler: Any, builder_kwargs: dict[str, Any] | None, owner: str
    ) -> GradSampler:
        """Build from the ``grad_sampler`` kwarg; a clear error when it is missing or malformed."""
        if isinstance(grad_sampler, GradSampler):
            return grad_sampler
        if not isinstance(grad_sampler, dict) or not {"data_loader_builder", "loss_fn"} <= set(
            grad_sampler
        ):
            raise GradSamplerError(
                f"{owner} needs gradient samples but got no grad sampler: {HOW_TO}"
            )
        return cls(grad_sampler["data_loader_builder"], grad_sampler["loss_fn"], builder_kwargs)

    def _ensure_loader(self) -> None:
        if self._loader is None:
            self._loader = self.builder(**self.builder_kwargs)
            self._iter = iter(self._loader)

    def batches_per_pass(self) -> int | None:
        """Batches the loader yields before it repeats (None when it has no length)."""
        self._ensure_loader()
        try:
            return len(self._loader)  # type: ignore[arg-type]
        except TypeError:
            return None

    def _next_batch(self) -> tuple:
        self._ensure_loader()
        assert self._iter is not None
        try:
            return next(self._iter)
        except StopIteration:
            self._iter = iter(self._loader)  # restart a finite loader
            try:
                return next(self._iter)
            except StopIteration:
                raise GradSamplerError("the grad sampler's data loader yields no batches") from None

    def _one_gradient(
        self, module: nn.Module, params: list[nn.Parameter], dtype: torch.dtype
    ) -> list[Tensor]:
        batch = self._next_batch()
        if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
            raise GradSamplerError("grad sampler batches must be (args, kwargs, target) triples")
        args, kwargs, target = batch
        module.zero_grad(set_to_none=True)
        loss = self.loss_fn(module(*args, **kwargs), target)
        if not torch.isfinite(loss):
            raise NumericalError(f"grad sampler loss is {loss.item()}; nothing was pruned")
        loss.backward()
        return [
            p.grad.detach().reshape(-1).to(dtype)
            if p.grad is not None
            else p.new_zeros(p.numel(), dtype=dtype)
            for p in params
        ]

    def iter_chunks(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        num_grads: int,
        chunk_size: int = 64,
        masks: list[Tensor] | None = None,
        desc: str = "gradients",
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[list[Tensor]]:
        """Yield chunks of samples: per chunk a list with one ``(c, numel)`` tensor per param.

        Samples are returned in ``dtype`` (float32, or float64 for float64 models), whatever
        the parameters' dtype. The module is put in eval mode while sampling (BN running
        stats, no dropout) and restored afterwards. The ``.grad`` of every parameter is set
        aside before the first sample and put back afterwards, so a prune fired from inside
        a training step leaves that step's (possibly accumulated) gradient untouched. Progress
        (count, rate, ETA) is logged at INFO level about every 10 seconds and at the end.
        """
        if num_grads < 1:
            raise GradSamplerError(f"num_grads must be >= 1, got {num_grads}")
        averaging = dist.is_distributed() and not isinstance(
            module, nn.parallel.DistributedDataParallel
        )
        was_training = module.training
        training_grads = [(p, p.grad) for p in module.parameters()]
        for p, _ in training_grads:
            p.grad = None
        module.eval()
        start = last_log = time.monotonic()
        flat_masks = [m.reshape(-1) for m in masks] if masks is not None else None
        per_pass = self.batches_per_pass()
        if per_pass is not None and num_grads > per_pass:
            LOG.warning(
                "%s: num_grads %d exceeds the %d batches the grad sampler's loader holds; "
                "samples repeat (about %.1f passes)",
                desc,
                num_grads,
                per_pass,
                num_grads / max(per_pass, 1),
            )
        try:
            done = 0
            while done < num_grads:
                count = min(chunk_size, num_grads - done)
                chunk = [
                    torch.empty(count, p.numel(), device=p.device, dtype=dtype) for p in params
                ]
                for row in range(count):
                    grads = self._one_gradient(module, params, dtype)
                    if averaging:
                        dist.all_reduce_mean_(grads)
                    for buf, g, i in zip(chunk, grads, range(len(grads))):
                        if flat_masks is not None:
                            g = g.masked_fill(~flat_masks[i].to(g.device), 0)
                        buf[row] = g
                    done += 1
                    now = time.monotonic()
                    if now - last_log > 10 or done in (1, num_grads):  # 1: the first ETA
                        rate = done / max(now - start, 1e-9)
                        LOG.info(
                            "%s: %d/%d samples (%.1f/s, ETA %.0f s)",
                            desc,
                            done,
                            num_grads,
                            rate,
                            (num_grads - done) / rate,
                        )
                        last_log = now
                if not all(torch.isfinite(c).all() for c in chunk):
                    raise NumericalError(
                        "NaN/Inf in sampled gradients; nothing was written to the model "
                        "(check the loss, learning rate or data)"
                    )
                yield chunk
        finally:
            for p, grad in training_grads:
                p.grad = grad
            module.train(was_training)
