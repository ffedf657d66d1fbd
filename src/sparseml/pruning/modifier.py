"""The one base of every pruner: selected parameters, sparsity schedule, masks, state, and the
one step skeleton that runs every method.

A method (`sparseml.pruning.methods`) is a composition, declared in its own class:

- its fields (``FIELDS``, from the shared groups of `sparseml.pruning.fields`) and their
  relations (``CHECKS``);
- ``estimator()``: the `sparseml.pruning.estimators` estimator it uses (None: the weights
  alone, as magnitude pruning);
- ``SELECTORS``: the selector kinds it supports (`sparseml.pruning.selectors`); the recipe's
  ``mask_type``, ``global_sparsity`` and ``flops_target`` pick one, and an unsupported pick is
  one recipe error;
- either ``score(estimate)`` -> selector -> ``update_weights(estimate, scored, masks)``, or, when
  ``joint`` is true, ``select_and_update(estimate, targets)`` (CAP's N:M greedy, FastCAP's
  sweep), which returns the masks itself.

A pruning step (`update`) turns the schedule into per-parameter targets and runs
``num_recomputations`` rounds of: build the estimate (timed, reused across a sweep), then the
method; pruned weights stay exactly zero (`sparseml.masks.MaskEnforcer`) and masks never reopen.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sparseml.fields import Check
from sparseml.grad_sampler import GradSampler
from sparseml.kernels import native
from sparseml.kernels.precision import work_dtype
from sparseml.masks import MaskEnforcer, MaskSpec, parse_mask_type
from sparseml.modifiers.base import Modifier
from sparseml.params import ParamRef
from sparseml.pruning import sampling
from sparseml.pruning.fields import SCHEDULE, SCHEDULE_CHECKS, recompute_num_spelling
from sparseml.pruning.flops_plan import FlopsPlan
from sparseml.pruning.selectors import (
    KINDS,
    FlopsTarget,
    Reweighted,
    Threshold,
    allowed,
    kind_of,
    unsupported,
    unsupported_field,
)
from sparseml.pruning.state import check_saved_masks, pruner_state, restore_pruner_state
from sparseml.pruning.targets import resolve_targets, round_plans, run_length_problem
from sparseml.pruning.updates import Scored
from sparseml.schedules import interpolate


class PruningModifier(Modifier):
    """Base of every pruning modifier (not usable in a recipe by itself)."""

    FIELDS = SCHEDULE
    CHECKS = (
        *SCHEDULE_CHECKS,
        Check(
            "global_sparsity",
            lambda m: (
                m._values["global_sparsity"]
                and isinstance(m._values.get("final_sparsity"), dict)
                and len(m._values["final_sparsity"]) > 1
                and kind_of(m) == "global"
            ),
            "must be false when final_sparsity maps several targets to parameters",
        ),
    )
    # The last check: a selector the method cannot use (its own fields are checked first).
    SELECTOR_CHECK = Check("mask_type", unsupported, allowed)
    SPARSIFICATION_TYPES = ("pruning",)
    END_RULE = "ge"
    UPDATES_BETWEEN = True
    SELECTORS: ClassVar[frozenset[str]] = frozenset(KINDS)
    GRAD_CHUNK = 64  # gradient samples per chunk (one GEMM accumulation)

    def reset_state(self) -> None:
        super().reset_state()
        self.refs: list[ParamRef] = []
        self.enforcer: MaskEnforcer | None = None
        self.init_targets: list[float] = []
        self.final_targets: list[float] = []
        self.applied_sparsity: list[float] | None = None
        self.grad_sampler: GradSampler | None = None
        self.sweep_cache: dict | None = None
        self.flops: FlopsPlan | None = None
        self.step_layout: Any = None  # the estimator's layout in the current pruning step
        self.timings: dict[str, float] = dict.fromkeys(sampling.PHASES, 0.0)

    @classmethod
    def _canonical_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        return super()._canonical_kwargs(recompute_num_spelling(cls, kwargs))

    def validate(self) -> None:
        super().validate()
        check = self.SELECTOR_CHECK
        if check.broken(self):
            raise self.field_error(unsupported_field(self), check.message(self))

    # ----- what the method is made of (overridden by methods) ------------------------------------
    def estimator(self) -> Any:
        """The estimator this method scores with; None: the weights alone."""
        return None

    @property
    def joint(self) -> bool:
        """True when the method selects and updates in one go (`select_and_update`)."""
        return False

    def score(self, estimate: Any) -> Scored:
        """Scores (higher = keep), one tensor per parameter; magnitude by default."""
        return Scored([r.param.detach().abs() for r in self.refs])

    def update_weights(
        self, estimate: Any, scored: Scored, masks: list[Tensor]
    ) -> list[Tensor] | None:
        """Write the weights for the chosen keep-``masks``; may return the masks kept in the
        end (None: ``masks``). By default nothing moves."""
        return None

    def select_and_update(self, estimate: Any, targets: list[float]) -> list[Tensor]:
        raise TypeError(f"{type(self).__name__} is joint but defines no select_and_update")

    def setup(self, module: nn.Module) -> None:
        """Checks and measurements on the model at initialize (after the grad sampler)."""

    # ----- questions the scripts and the manager ask ---------------------------------------------
    @property
    def gradient_source(self) -> str | None:
        """Where the gradients come from: ``"sampler"`` (a grad sampler), ``"training"``
        (the training steps' own), ``"sampler_or_training"`` or None (no gradients)."""
        return None if type(self).estimator is PruningModifier.estimator else "sampler"

    @property
    def needs_gradients(self) -> bool:
        return self.gradient_source is not None

    @property
    def mask_spec(self) -> MaskSpec:
        values = self._values
        return parse_mask_type(
            values.get("mask_type", "unstructured"), values.get("n"), values.get("m")
        )

    @property
    def selector_kind(self) -> str:
        return kind_of(self)

    def selector(self):
        """The selector the fields pick (FLOPs: reweighted by MACs, or a MACs target)."""
        if self.flops is not None and self.flops.target is not None:
            inner = FlopsTarget(self.flops.costs)
        else:
            inner = Threshold(self.mask_spec, self._values.get("global_sparsity", False))
        if self.flops is not None and self.flops.power > 0:
            return Reweighted(inner, self.flops.costs, self.flops.power)
        return inner

    def sparsity_at(self, epoch: float) -> float | None:
        """The scheduled sparsity at ``epoch`` (the largest target of a mapping; None when the
        recipe does not say, e.g. a FLOPs target or frozen masks)."""
        target = self.final_target()
        if target is None:
            return None
        init = self.init_sparsity if isinstance(self.init_sparsity, float) else 0.0
        return interpolate(epoch, self.start_epoch, self.end_epoch, init, target, self.inter_func)

    def final_target(self) -> float | None:
        """The sparsity it ends at (the largest of a mapping; None: not a sparsity target)."""
        final = self._values.get("final_sparsity")
        if final is None:
            return None
        return max(final) if isinstance(final, dict) else final

    def is_active(self, epoch: float) -> bool:
        """``start_epoch <= epoch < end_epoch`` (no end: from the start on)."""
        end = self.end_epoch if self.end_epoch >= 0 else math.inf
        return self.start_epoch <= epoch < end

    def holds_masks_after(self, epoch: float) -> bool:
        """Ended by ``epoch`` and still enforcing the masks of a pruning step."""
        return (
            0 <= self.end_epoch <= epoch
            and self._values.get("leave_enabled", False)
            and self.applied_sparsity is not None
        )

    def reported_sparsity(self) -> float | None:
        """The mean sparsity its last pruning step aimed at (None before the first)."""
        value = self.applied_sparsity
        if value is None:
            return None
        return float(sum(value) / len(value)) if value else 0.0

    def changes_sparsity_at(self, epoch: float) -> bool:
        """A pruning step falls on ``epoch``: the start, every ``update_frequency`` epochs
        after it, and the end."""
        start, end, freq = self.start_epoch, self.end_epoch, self.update_frequency
        if freq <= 0 or epoch < start or (0 <= end < epoch):
            return False
        return (epoch - start) % freq == 0 or epoch == end

    def run_length_problem(self, num_epochs: int, steps_per_epoch: int | None) -> str | None:
        """Why a run of ``num_epochs`` epochs would stop this schedule short of its target."""
        return run_length_problem(self, num_epochs, steps_per_epoch)

    def named_masks(self) -> dict[str, Tensor]:
        """Parameter name -> boolean keep-mask."""
        return {r.name: m.detach().to(torch.bool) for r, m in zip(self.refs, self.masks)}

    # ----- schedule ---------------------------------------------------------------------------------
    def targets_for_epoch(self, epoch: float) -> list[float]:
        """Per-parameter sparsities, or with ``flops_target`` the fraction of MACs removed."""
        if self.flops is not None and self.flops.target is not None:
            return [self.flops.removed_at(epoch, self.masks, self)] * len(self.refs)
        return [
            interpolate(epoch, self.start_epoch, self.end_epoch, s0, s1, self.inter_func)
            for s0, s1 in zip(self.init_targets, self.final_targets)
        ]

    def schedule_levels(self) -> list[float]:
        """Where the targets stand now; recomputations are spaced from here to the targets."""
        if self.flops is not None and self.flops.target is not None:
            return [1.0 - self.flops.kept_fraction(self.masks)] * len(self.refs)
        return self.current_sparsities()

    # ----- lifecycle ----------------------------------------------------------------------------
    def initialize(
        self, module: nn.Module, epoch: float = 0.0, loggers: Any = None, **kwargs: Any
    ) -> None:
        self.validate()
        self.refs, self.final_targets, self.init_targets = resolve_targets(self, module)
        masks = [torch.ones_like(r.param, dtype=torch.bool) for r in self.refs]
        self.enforcer = MaskEnforcer(self.refs, masks)
        self.on_initialize(module, **kwargs)
        super().initialize(module, epoch, loggers, **kwargs)
        prune_now = self.gradient_source is None or math.isinf(epoch)
        if prune_now and not self.resuming and self.start_pending(epoch):
            self.scheduled_update(module, None, epoch, 1)

    def on_initialize(self, module: nn.Module, **kwargs: Any) -> None:
        source, given = self.gradient_source, kwargs.get("grad_sampler")
        if source == "sampler" or (source == "sampler_or_training" and given is not None):
            self.grad_sampler = GradSampler.from_kwargs(
                given, self.grad_sampler_kwargs, type(self).__name__
            )
        self.sweep_cache = kwargs.get("sweep_cache")
        if self.estimator() is not None:
            sampling.preflight(self)
        self.setup(module)
        fields = self._values
        if fields.get("flops_target") is not None or fields.get("flops_power", 0) > 0:
            self.flops = FlopsPlan(module, self)

    def update(self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int) -> None:
        Modifier.update(self, module, optimizer, epoch, steps_per_epoch)
        self.enforcer.enable()
        targets = self.targets_for_epoch(epoch)
        self.prune(module, targets)
        self.applied_sparsity = targets
        self.enforcer.apply()
        if self.flops is not None:
            self.flops.after_step(self.masks)
            if self.flops.target is not None:
                self.applied_sparsity = self.current_sparsities()

    def on_end(self, module: nn.Module) -> None:
        if not self._values.get("leave_enabled", False) and self.enforcer is not None:
            self.enforcer.disable()

    def optimizer_post_step(
        self, module: nn.Module, optimizer: Any, epoch: float, steps_per_epoch: int
    ) -> None:
        if self.enforcer is not None and self.enforcer.enabled:
            self.enforcer.apply()

    def finalize(self, module: nn.Module | None = None, **kwargs: Any) -> None:
        if self.enforcer is not None:
            if self.enforcer.enabled:
                self.enforcer.apply()
            self.enforcer.disable()
        super().finalize(module, **kwargs)

    # ----- the step skeleton ----------------------------------------------------------------------
    def prune(self, module: nn.Module, targets: list[float]) -> None:
        """Reach ``targets`` in ``num_recomputations`` rounds of estimate -> method."""
        plans = round_plans(self, self.schedule_levels(), targets)
        if self.needs_gradients:
            native.warm_up()  # loading the compiled kernels is not part of any phase
        timings = sampling.Timings(self.grad_sampler)
        for step in range(self._values.get("num_recomputations", 1)):
            self.prune_once(module, [plan[step] for plan in plans], timings)
            self.enforcer.apply()
        self.timings = timings.seconds
        if self.needs_gradients:
            timings.log(type(self).__name__)

    @torch.no_grad()
    def _method(self, estimate: Any, targets: list[float]) -> list[Tensor]:
        if self.joint:
            return self.select_and_update(estimate, targets)
        scored = self.score(estimate)
        masks = self.selector().select(self.masked_scores(scored.scores), targets)
        return self.update_weights(estimate, scored, masks) or masks

    def prune_once(self, module: nn.Module, targets: list[float], timings: Any) -> None:
        if not self.refs:
            return
        estimator = self.estimator()
        estimate = None
        if estimator is not None:
            layout = self.step_layout = estimator.layout(self)
            if getattr(layout, "total", 1) == 0:
                return
            with timings.phase("curvature"):
                estimate = self.build_estimate(estimator, module, layout)
        with timings.phase("pruning"):
            self.set_masks(self._method(estimate, targets))

    def build_estimate(self, estimator: Any, module: nn.Module, layout: Any) -> Any:
        """The estimate, reused across a one-shot sweep (`sampling.cached`)."""
        build = lambda: estimator.build(self, module, layout)  # noqa: E731
        return sampling.cached(self, self.sweep_cache, "curvature", build)

    # ----- masks and weights ------------------------------------------------------------------------
    @property
    def masks(self) -> list[Tensor]:
        return [] if self.enforcer is None else self.enforcer.masks

    def set_masks(self, masks: list[Tensor]) -> None:
        """Install new keep-masks; entries already pruned stay pruned."""
        old = self.enforcer.masks
        self.enforcer.set_masks([m.to(o.device) & o for m, o in zip(masks, old)])

    def masked_scores(self, scores: list[Tensor]) -> list[Tensor]:
        """Scores with ``-inf`` on already pruned entries (so they are selected first)."""
        return [s.masked_fill(~m.to(s.device), -math.inf) for s, m in zip(scores, self.masks)]

    def current_sparsities(self) -> list[float]:
        return [1.0 - float(m.float().mean()) for m in self.masks]

    @property
    def work_dtype(self) -> torch.dtype:
        """Precision of gradients, scores and updates: float32, or float64 for float64 params."""
        return work_dtype(r.param.dtype for r in self.refs)

    def fisher_device(self, param: Tensor) -> torch.device:
        device = self._values.get("fisher_inv_device")
        return torch.device(device) if device else param.device

    def gradient_chunks(self, module: nn.Module, num_grads: int | None = None, reuse=False):
        """Chunks of masked gradient samples: per chunk one ``(c, numel)`` tensor per param
        (``reuse``: the consumer keeps nothing of a chunk, see `GradSampler.iter_chunks`)."""
        params, m = [r.param for r in self.refs], self.num_grads if num_grads is None else num_grads
        desc, dtype = f"{type(self).__name__} gradients", self.work_dtype
        return self.grad_sampler.iter_chunks(
            module, params, m, chunk_size=self.GRAD_CHUNK, masks=self.masks, desc=desc,
            dtype=dtype, reuse=reuse,
        )  # fmt: skip

    def flat_weights(self) -> list[Tensor]:
        """Flattened weights in ``work_dtype`` (a view for float32 params, else an exact copy)."""
        return [r.param.detach().reshape(-1).to(self.work_dtype) for r in self.refs]

    @torch.no_grad()
    def write_weights(self, index: int, flat: Tensor) -> None:
        """The only place where pruning math is cast back to the parameter's dtype."""
        param = self.refs[index].param
        param.data.copy_(flat.reshape(param.shape).to(param.device, param.dtype))

    # ----- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return pruner_state(self, super().state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_saved_masks(self, state)
        super().load_state_dict(state)
        restore_pruner_state(self, state)

    @property
    def flops_reached(self) -> float | None:
        return None if self.flops is None else self.flops.reached
