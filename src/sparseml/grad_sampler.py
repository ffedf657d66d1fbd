"""Draws gradient samples for second-order pruners.

One sample is the gradient of one mini-batch loss with respect to the pruned parameters,
with pruned entries zeroed. Pass it the way CAP's scripts do::

    manager.apply(model, grad_sampler={"data_loader_builder": build, "loss_fn": loss})

where ``build(**grad_sampler_kwargs)`` returns an iterable of ``(args, kwargs, target)``
triples (the recipe's ``grad_sampler_kwargs``, e.g. ``batch_size``, are passed to it). A loader
that runs dry before ``num_grads`` samples is restarted (iterated again; a one-pass iterator
such as a generator is built anew by calling ``build`` again); one that yields nothing raises
``GradSamplerError``. Under ``torch.distributed`` every rank draws samples from
its own data and the gradients are averaged, unless the model is DDP-wrapped (DDP's backward
already averages them).

Pruners that need more than gradients draw from the same stream: ``iter_layer_stats`` gives
each batch's layer inputs and output gradients (K-FAC) and ``iter_hessian_products`` the
products H v of each batch's loss Hessian (the Hessian diagonal). Both follow the rules of
``iter_chunks`` (eval mode, training gradients set aside, NaN check, progress log); the rank
average is taken by the estimator in `sparseml.curvature`, once per estimate.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparseml import dist
from sparseml.autograd_stats import hessian_products, layer_stats
from sparseml.errors import GradSamplerError, NumericalError
from sparseml.params import unwrap
from sparseml.progress import Progress

LOG = logging.getLogger(__name__)
HOW_TO = (
    "pass grad_sampler={'data_loader_builder': f, 'loss_fn': loss} to manager.apply(...) or "
    "manager.modify(...), where f(**grad_sampler_kwargs) yields (args, kwargs, target) batches "
    "(scripts: add --gs-loader / --gs_loader)"
)


_END = object()
_GOLDEN = 0x9E3779B97F4A7C15  # spreads pass indices over the seed space


@contextmanager
def preserved_rng(seed: int | None = None) -> Iterator[None]:
    """Run a block without touching the global torch / random / numpy RNG states.

    With ``seed``, the block runs seeded with it (CPU torch generator, ``random``, numpy).
    """
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


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
        self._head: Any = None
        # A one-pass iterator (a generator) cannot be iterated twice: each pass builds it anew.
        self._loader_used = False
        # Each pass's shuffle and each batch are seeded from this run-wide seed (rank 0's
        # initial seed, shared by every rank) mixed with the rank: with the stream position
        # it is all a resumed run needs to draw the same samples, on every rank.
        self.seed = int(dist.broadcast_(torch.tensor([torch.initial_seed() % 2**62]))[0])
        self.passes, self.position = 0, 0
        self._resume_at: tuple[int, int] | None = None
        # Wall seconds spent drawing samples (forward, backward, rank averaging): pruners
        # subtract it from their phases to report gradient collection on its own.
        self.seconds = 0.0

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

    def batches_per_pass(self) -> int | None:
        """Batches the loader yields before it repeats (None when it has no length)."""
        self._ensure_loader()
        try:
            return len(self._loader)  # type: ignore[arg-type]
        except TypeError:
            return None

    # ----- the sample stream: passes over the loader, exactly resumable -----------------------
    def _seed_at(self, passes: int, position: int) -> int:
        mixed = self.seed + passes * _GOLDEN + (position + 1) * _GOLDEN**2
        return (mixed + dist.rank() * _GOLDEN**3) % 2**63

    def _start_pass(self) -> None:
        """A new pass over the loader; its shuffle (and first batch) seeded by (seed, pass).

        The first batch is drawn here: samplers draw their shuffle seed lazily at the first
        ``next``. Every draw runs in its own seeded scope and restores the global RNG states
        afterwards, so the stream is a function of (seed, pass, position) alone: it neither
        depends on nor disturbs the training run's randomness, whatever the loader prefetches.
        """
        with preserved_rng(seed=self._seed_at(self.passes, -1)):
            if self._loader_used and isinstance(self._loader, Iterator):
                self._loader = self.builder(**self.builder_kwargs)
            self._loader_used = True
            self._iter = iter(self._loader)  # type: ignore[arg-type]
            self._head = next(self._iter, _END)
        self.passes += 1
        self.position = 0

    def _take(self) -> Any:
        if self._head is not None:
            batch, self._head = self._head, None
            return batch
        with preserved_rng(seed=self._seed_at(self.passes, self.position)):
            return next(self._iter, _END)  # type: ignore[arg-type]

    def _next_batch(self) -> tuple:
        self._ensure_loader()
        if self._resume_at is not None:
            self._fast_forward(*self._resume_at)
        for fresh in (False, True):
            if self._iter is None or fresh:
                self._start_pass()
            batch = self._take()
            if batch is not _END:
                self.position += 1
                return batch
            if self.position == 0:
                break
        raise GradSamplerError("the grad sampler's data loader yields no batches")

    def _fast_forward(self, passes: int, position: int) -> None:
        """Re-create the saved stream position (after ``load_state_dict``)."""
        self._resume_at = None
        if passes == 0:
            return
        self.passes = passes - 1
        self._start_pass()
        for _ in range(position):  # replay: the same seeds as the first time
            if self._take() is _END:
                raise GradSamplerError(
                    f"cannot resume the grad sampler at batch {position} of pass {passes}: "
                    "its data loader now yields fewer batches (different data or batch size)"
                )
            self.position += 1

    def state_dict(self) -> dict[str, int]:
        """Stream position: seed, passes started, batches drawn in the current pass."""
        if self._resume_at is not None:
            return {"seed": self.seed, "passes": self._resume_at[0], "position": self._resume_at[1]}
        return {"seed": self.seed, "passes": self.passes, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the stream where ``state`` left it (lazily, at the next sample)."""
        self.seed = int(state["seed"])
        self._iter, self._head = None, None
        self.passes, self.position = 0, 0
        self._resume_at = (int(state["passes"]), int(state["position"]))

    def example_batch(self) -> tuple:
        """The first ``(args, kwargs, target)`` batch of a fresh pass over the loader, drawn
        without moving the sample stream (for shape probes such as counting FLOPs)."""
        loader = self.builder(**self.builder_kwargs)
        with preserved_rng(seed=self._seed_at(0, -1)):
            batch = next(iter(loader), _END)
        if batch is _END:
            raise GradSamplerError("the grad sampler's data loader yields no batches")
        if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
            raise GradSamplerError("grad sampler batches must be (args, kwargs, target) triples")
        return tuple(batch)

    def _batch_loss(self, module: nn.Module) -> Tensor:
        """The loss of the stream's next batch, with its graph (checked finite)."""
        batch = self._next_batch()
        if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
            raise GradSamplerError("grad sampler batches must be (args, kwargs, target) triples")
        args, kwargs, target = batch
        loss = self.loss_fn(module(*args, **kwargs), target)
        if not torch.isfinite(loss):
            raise NumericalError(f"grad sampler loss is {loss.item()}; nothing was pruned")
        return loss

    def _one_gradient(
        self, module: nn.Module, params: list[nn.Parameter], dtype: torch.dtype
    ) -> list[Tensor]:
        module.zero_grad(set_to_none=True)
        self._batch_loss(module).backward()
        return [
            p.grad.detach().reshape(-1).to(dtype)
            if p.grad is not None
            else p.new_zeros(p.numel(), dtype=dtype)
            for p in params
        ]

    @contextmanager
    def _sampling(self, module: nn.Module, num: int, desc: str) -> Iterator[Progress]:
        """Eval mode and the training ``.grad`` set aside while sampling; both restored after.

        The module is put in eval mode (BN running stats, no dropout). The ``.grad`` of every
        parameter is set aside before the first sample and put back afterwards, so a prune
        fired from inside a training step leaves that step's (possibly accumulated) gradient
        untouched. Yields the progress (rank 0: bar or log lines with ETA) of ``num`` samples.
        """
        if num < 1:
            raise GradSamplerError(f"num_grads must be >= 1, got {num}")
        per_pass = self.batches_per_pass()
        if per_pass is not None and num > per_pass and dist.rank() == 0:  # once, not per rank
            LOG.warning(
                "%s: num_grads %d exceeds the %d batches the grad sampler's loader holds; "
                "samples repeat (about %.1f passes)",
                desc,
                num,
                per_pass,
                num / max(per_pass, 1),
            )
        was_training = module.training
        training_grads = [(p, p.grad) for p in module.parameters()]
        for p, _ in training_grads:
            p.grad = None
        module.eval()
        try:
            with Progress(desc, num, "samples", logger=LOG) as progress:
                yield progress
        finally:
            for p, grad in training_grads:
                p.grad = grad
            module.train(was_training)

    def iter_chunks(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        num_grads: int,
        chunk_size: int = 64,
        masks: list[Tensor] | None = None,
        desc: str = "gradients",
        dtype: torch.dtype = torch.float32,
        reuse: bool = False,
    ) -> Iterator[list[Tensor]]:
        """Yield chunks of samples: per chunk a list with one ``(c, numel)`` tensor per param.

        ``reuse``: the consumer keeps nothing of a chunk once it asks for the next, so every
        chunk goes into the same buffers (fresh ones fault in every page of every chunk).

        Samples are returned in ``dtype`` (float32, or float64 for float64 models), whatever
        the parameters' dtype. Sampling runs under `_sampling` (eval mode, training gradients
        set aside and restored). Progress (count, rate, ETA) shows on rank 0: a bar on a
        terminal, else an INFO line about every 10 seconds, and the total at the end.
        """
        averaging = dist.is_distributed() and not isinstance(
            module, nn.parallel.DistributedDataParallel
        )
        # pruned positions (True) per parameter, on its device, made once per pass (None:
        # nothing of it is pruned, so nothing to zero)
        pruned = [None] * len(params)
        for i, (m, p) in enumerate(zip(masks or [], params)):
            off = ~m.reshape(-1).to(p.device)
            pruned[i] = off if bool(off.any()) else None
        with self._sampling(module, num_grads, desc) as progress:
            done, kept = 0, None
            while done < num_grads:
                count = min(chunk_size, num_grads - done)
                chunk = [buf[:count] for buf in kept] if kept else [
                    torch.empty(count, p.numel(), device=p.device, dtype=dtype) for p in params
                ]  # fmt: skip
                kept = chunk if reuse and not kept else kept
                for row in range(count):
                    t0 = time.perf_counter()
                    grads = self._one_gradient(module, params, dtype)
                    if averaging:
                        dist.all_reduce_mean_(grads)
                    self.seconds += time.perf_counter() - t0
                    for i, (buf, g) in enumerate(zip(chunk, grads)):
                        buf[row] = g
                        if pruned[i] is not None:
                            buf[row].masked_fill_(pruned[i], 0)
                    done += 1
                    progress.set(done)
                _check_finite(chunk, "sampled gradients")
                yield chunk
                # Dropped before the next chunk exists: one chunk alive at a time (each can be
                # GBs); consumers drop theirs too (`sparseml.curvature`). ``reuse`` keeps one.
                chunk = buf = None

    # ----- more than gradients: layer statistics (K-FAC) and Hessian-vector products -----------
    # Both run on the unwrapped model and never touch ``.grad`` (torch.autograd.grad with
    # explicit inputs), so DDP's reducer is not involved; each rank uses its own batches and the
    # estimator averages its per-rank result over the ranks once (sparseml.curvature).
    def _layer_stats(
        self, module: nn.Module, layers: list[nn.Module], dtype: torch.dtype
    ) -> list[tuple[Tensor, Tensor]]:
        """One batch: per layer, (its input, dL/d its output), detached, in ``dtype``."""
        return layer_stats(layers, lambda: self._batch_loss(module), dtype)

    def iter_layer_stats(
        self,
        module: nn.Module,
        layers: list[nn.Module],
        num_batches: int,
        desc: str = "layer statistics",
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[list[tuple[Tensor, Tensor]]]:
        """Per batch of the stream, per layer: (input, gradient of the batch-mean loss with
        respect to the layer's output), in ``dtype`` — what K-FAC's factors are built from."""
        model = unwrap(module)
        with self._sampling(model, num_batches, desc) as progress:
            for done in range(1, num_batches + 1):
                t0 = time.perf_counter()
                stats = self._layer_stats(model, layers, dtype)
                self.seconds += time.perf_counter() - t0
                _check_finite([t for pair in stats for t in pair], "layer statistics")
                progress.set(done)
                yield stats

    def _hessian_products(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        vectors: Iterable[list[Tensor]],
        dtype: torch.dtype,
    ) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
        """One batch: (v, H v) for each v of ``vectors`` (flat per-parameter pieces), with H the
        Hessian of the batch loss in ``params``; one double-backward pass per vector."""
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            loss = self._batch_loss(module)
        return hessian_products(loss, params, vectors, dtype)

    def iter_hessian_products(
        self,
        module: nn.Module,
        params: list[nn.Parameter],
        num_batches: int,
        vectors: Callable[[], Iterable[list[Tensor]]],
        desc: str = "Hessian-vector products",
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
        """(v, H v) pairs: for each of ``num_batches`` batches, every v of ``vectors()``
        (per-parameter flat pieces in ``dtype``), H the Hessian of that batch's loss."""
        model = unwrap(module)
        with self._sampling(model, num_batches, desc) as progress:
            for done in range(1, num_batches + 1):
                t0 = time.perf_counter()
                for v, hv in self._hessian_products(model, params, vectors(), dtype):
                    self.seconds += time.perf_counter() - t0
                    _check_finite(hv, "Hessian-vector products")
                    yield v, hv
                    t0 = time.perf_counter()
                progress.set(done)


def _check_finite(tensors: list[Tensor], what: str) -> None:
    # min and max of each tensor in one pass (NaN propagates into both, an Inf into one): no
    # temporary of the chunk's size, and one reduction per tensor instead of one per row
    ranges = (torch.aminmax(t) for t in tensors if t.numel())
    if not all(bool(torch.isfinite(lo) & torch.isfinite(hi)) for lo, hi in ranges):
        raise NumericalError(
            f"NaN/Inf in {what}; nothing was written to the model "
            "(check the loss, learning rate or data)"
        )
