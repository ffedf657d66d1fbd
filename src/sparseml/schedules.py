"""Pure schedule functions: sparsity interpolation, recomputation targets and LR cycles.

Every function here maps numbers to numbers; the modifiers decide when to call them.
"""

from __future__ import annotations

import math

from sparseml.errors import RecipeError

INTER_FUNCS = ("linear", "cubic", "inverse_cubic")
_EPS = float.fromhex("0x1p-52")  # float64 machine epsilon


def progress_value(p: float, inter_func: str) -> float:
    """Shape a linear progress ``p`` in [0, 1] with ``inter_func``.

    linear: ``p``; cubic: ``1 - (1 - p)^3`` (fast start, slow end);
    inverse_cubic: ``1 - (1 - p)^(1/3)`` (slow start, fast end).
    """
    if inter_func not in INTER_FUNCS:
        raise RecipeError(f"inter_func {inter_func!r} is not one of {', '.join(INTER_FUNCS)}")
    p = min(max(p, 0.0), 1.0)
    if inter_func == "linear":
        return p
    if inter_func == "cubic":
        return 1.0 - (1.0 - p) ** 3
    return 1.0 - (1.0 - p) ** (1.0 / 3.0)


def interpolate(x: float, x0: float, x1: float, y0: float, y1: float, inter_func: str) -> float:
    """Value at ``x`` of a schedule going from ``y0`` at ``x0`` to ``y1`` at ``x1``.

    Clamped to ``y0`` before ``x0`` and to ``y1`` from ``x1`` on; ``x = inf`` gives ``y1``.
    ``x0 == x1`` is a step: ``y0`` before ``x0``, ``y1`` from ``x0`` on (no division by zero).
    """
    if x1 <= x0:
        return y1 if x >= x0 else y0
    if math.isinf(x):
        return y1 if x > 0 else y0
    q = progress_value((x - x0) / (x1 - x0), inter_func)
    if q <= _EPS:
        return y0
    if q >= 1.0 - _EPS:
        return y1
    return y0 + q * (y1 - y0)


RECOMPUTATION_FUNCS = ("linear", "cubic", "poly")


def recomputation_targets(
    current: float,
    target: float,
    num_recomputations: int,
    inter_func: str = "linear",
    degree: int | None = None,
) -> list[float]:
    """Intermediate sparsities for ``num_recomputations`` Fisher rebuilds in one pruning step.

    They are spaced from the model's *actual* current sparsity ``current`` to ``target``
    (the last one equals ``target`` exactly: no float comparison decides it, unlike the
    WoodFisher reference's assert), so an already sparse model never gets an
    intermediate target below its sparsity. Rebuild i of R aims at
    ``start + (1 - (1 - i/R)^degree) (target - start)``: ``linear`` is degree 1, ``cubic``
    degree 3 and ``poly`` takes ``degree`` (an integer >= 1), the WoodFisher repository's
    ``--recompute-schedule poly --recompute-degree``.
    """
    if num_recomputations < 1:
        raise RecipeError(f"num_recomputations must be >= 1, got {num_recomputations}")
    if inter_func not in RECOMPUTATION_FUNCS:
        raise RecipeError(
            f"recomputation_inter_func {inter_func!r} is not one of {', '.join(RECOMPUTATION_FUNCS)}"
        )
    if inter_func == "poly" and (isinstance(degree, bool) or not isinstance(degree, int)):
        raise RecipeError(f"recomputation_inter_func poly needs an integer degree, got {degree!r}")
    power = {"linear": 1, "cubic": 3}.get(inter_func, degree)
    if power < 1:
        raise RecipeError(f"recompute_degree must be an integer >= 1, got {power}")
    start = min(current, target)
    steps = []
    for i in range(1, num_recomputations + 1):
        q = 1.0 - (1.0 - i / num_recomputations) ** power
        steps.append(target if i == num_recomputations else start + q * (target - start))
    return steps


def _in_cycle_position(t: float, total: float, cycle: float) -> float:
    # A range that is not a whole number of cycles keeps the in-cycle position of its end for
    # the tail (CAP semantics), so the LR does not restart a cycle it cannot finish.
    if t > math.floor(total / cycle) * cycle:
        t = total % cycle
    return t % cycle


def lr_function_value(
    lr_func: str,
    epoch: float,
    steps_per_epoch: int,
    *,
    start_epoch: float,
    end_epoch: float,
    init_lr: float,
    final_lr: float,
    cycle_epochs: float,
    cycle_mul: float = 1.0,
    warmup: float = 0.0,
    decay_rate: float = 0.9,
    decay_epochs: float = 1.0,
) -> float:
    """Learning rate at fractional ``epoch`` for ``LearningRateFunctionModifier`` (CAP semantics).

    Positions are counted in optimizer steps: the range holds ``L = (end - start) * S`` steps and
    each cycle ``C = cycle_epochs * S``; ``a`` is the step's position inside its cycle.

    - linear: ``init - a / (C - 1) * (init - final)`` (reaches ``final`` on a cycle's last step);
    - cosine: ``final + (init - final) * (1 + cos(pi * a / C)) / 2``;
    - exponential: ``max(init * decay_rate ** (a / (decay_epochs * S)), final)``;
    - step: ``max(init * decay_rate ** floor(a / (decay_epochs * S)), final)``.

    The value is multiplied by ``cycle_mul ** cycle_index`` and by a warmup factor
    ``min((a + 1) / (warmup * S), 1)``. Unlike the CAP fork there is no zero-LR step at the start
    of each cycle: without warmup the factor is 1.
    """
    S = steps_per_epoch
    total = (end_epoch - start_epoch) * S
    cycle = cycle_epochs * S
    t = (epoch - start_epoch) * S
    if abs(t - round(t)) < 1e-6:
        t = float(round(t))
    cycle_index = math.floor(max(epoch - start_epoch, 0.0) / cycle_epochs + 1e-9)
    a = _in_cycle_position(max(t, 0.0), total, cycle)
    if lr_func == "linear":
        base = init_lr if cycle <= 1 else init_lr - a / (cycle - 1) * (init_lr - final_lr)
    elif lr_func == "cosine":
        base = final_lr + 0.5 * (init_lr - final_lr) * (1.0 + math.cos(math.pi * a / cycle))
    elif lr_func == "exponential":
        base = max(init_lr * decay_rate ** (a / (decay_epochs * S)), final_lr)
    elif lr_func == "step":
        base = max(init_lr * decay_rate ** math.floor(a / (decay_epochs * S)), final_lr)
    else:
        raise RecipeError(
            f"lr_func {lr_func!r} is not one of linear, cosine, exponential, step, cyclic_linear"
        )
    warm_steps = warmup * S
    factor = 1.0 if warm_steps <= 0 else min((a + 1.0) / warm_steps, 1.0)
    return base * factor * cycle_mul**cycle_index


def shortfall(
    start: float,
    end: float,
    frequency: float,
    init: float,
    target: float,
    inter_func: str,
    num_epochs: int,
    steps_per_epoch: int | None,
) -> tuple[float, int | None]:
    """(sparsity reached, epochs needed) of a schedule from ``init`` at ``start`` to ``target``
    at ``end`` in a run of ``num_epochs`` epochs; epochs needed is None when the run reaches
    the target. The run's last step is at ``num_epochs - 1 / steps_per_epoch``; a pruning step
    falls every ``frequency`` epochs from ``start`` (-1: every step)."""
    last = num_epochs - (1.0 / steps_per_epoch if steps_per_epoch else 1e-6)
    if end < 0 or end <= last + 1e-9:
        return target, None
    first = max(start, 0.0)
    epoch = (
        last
        if frequency <= 0
        else first + math.floor((last - first) / frequency + 1e-9) * frequency
    )
    reached = (
        0.0 if first > last + 1e-9 else interpolate(epoch, start, end, init, target, inter_func)
    )
    if reached >= target - 1e-6:  # e.g. holding a constant sparsity: nothing is lost
        return reached, None
    need = math.ceil(end + 1 / steps_per_epoch - 1e-9) if steps_per_epoch else int(end) + 1
    return reached, need
