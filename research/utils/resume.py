"""``--resume``: everything ``sparse_training.py`` does with a checkpoint, in one module.

Two calls, both made once by the script:

* :func:`read_point` before any work: reads the checkpoint through the one reader (checksum
  verified), decides the epoch to start at, and refuses what would silently lose state: a
  checkpoint whose recipe state holds masks, resumed without ``--sparseml-recipe`` (the masks
  would be dropped and the pruned weights regrow at 0% sparsity);
* :func:`restore` once the model, optimizer, EMA, recipe manager, LR scheduler and run folder
  exist: weights, optimizer, AMP scaler, EMA, manager (masks and schedule position), the best-
  checkpoint history, the LR schedule position, every rank's RNG and its sharded manager state.

The class names a checkpoint was trained with are checked against the data by the caller
(``data.check_class_map``) as soon as the data is open. :func:`finished` says whether a run has
nothing left to do; the script then reports it and changes no file.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt_io
from .errors import CheckpointError, SetupError
from .models import check_fits
from .weights import read_payload

_logger = logging.getLogger("sparse_training")


@dataclass
class ResumePoint:
    """A checkpoint to continue from and the epoch the run starts at."""

    path: Path
    state: dict[str, Any]
    start_epoch: int

    @property
    def class_map(self) -> list[str] | None:
        return self.state.get("class_map")


def saved_masks(manager_state: Any) -> list[str]:
    """Names of the parameters the saved recipe state holds masks for (any modifier)."""
    if not isinstance(manager_state, dict):
        return []
    names: list[str] = []
    for key, value in manager_state.items():
        if key == "masks" and isinstance(value, dict):
            names += [str(n) for n in value]
        elif isinstance(value, dict):
            names += saved_masks(value)
    return names


def read_point(args: argparse.Namespace, has_recipe: bool) -> ResumePoint | None:
    """The checkpoint of ``--resume`` and the start epoch, or None without ``--resume``."""
    if not args.resume:
        return None
    state = read_payload(args.resume, "--resume")  # checksum verified
    check_resumable(state, args)
    resumes_epoch = not args.no_resume_epoch
    masks = saved_masks(state.get("manager"))
    if masks and resumes_epoch and not has_recipe:
        folder = Path(args.resume).parent
        copies = sorted(p.name for p in folder.glob("*.y*ml") if p.name != "args.yaml")
        where = f" ({folder} keeps a copy: {copies[0]})" if copies else ""
        raise SetupError(
            f"--resume {args.resume} holds the masks of a pruning recipe ({len(masks)} "
            f"parameters, e.g. {masks[0]}); without --sparseml-recipe they would be dropped and "
            f"the pruned weights regrow: pass --sparseml-recipe <the run's recipe>{where}, or "
            "--no-resume-epoch to fine-tune its weights densely as a new run"
        )
    start = int(state["epoch"]) + 1 if resumes_epoch else 0
    if args.start_epoch is not None:
        start = args.start_epoch
    return ResumePoint(Path(args.resume), state, start)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _tensor_table(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())


def _list_of(kind: type) -> Any:
    return lambda value: isinstance(value, list) and all(isinstance(v, kind) for v in value)


# Optional entries (None or absent is fine) and what ``restore`` needs them to be.
_ENTRY_KINDS: dict[str, tuple[Any, str]] = {
    "state_dict_ema": (_tensor_table, "a table of tensors"),
    ckpt_io.SCALER_KEY: (lambda v: isinstance(v, dict), "a table"),
    "manager": (lambda v: isinstance(v, dict), "a table (the recipe's state)"),
    "metric": (_is_number, "a number"),
    "class_map": (_list_of(str), "a list of class names"),
    "rng": (_list_of(dict), "a list of random states, one per rank"),
    "rank_state": (_list_of(dict), "a list of tables, one per rank"),
    "checkpoint_hist": (_list_of(dict), "a list of tables"),
}


def _optimizer_problem(value: Any) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("state"), dict):
        return "is not an optimizer state_dict (a table with 'state' and 'param_groups')"
    groups = value.get("param_groups")
    if not isinstance(groups, list) or not groups:
        return "has no parameter groups"
    for i, group in enumerate(groups):
        params = group.get("params") if isinstance(group, dict) else None
        if not (isinstance(params, list) and all(type(p) is int for p in params)):
            return f"has a parameter group ({i}) without its list of parameter indices"
    return None


def _hist_problem(entries: list[dict[str, Any]]) -> str | None:
    for entry in entries:
        name = entry.get("file")
        if not (isinstance(name, str) and name and Path(name).name == name):
            return f"names no plain file name ({name!r})"  # files of it are deleted later
        numbers = [entry.get(k) for k in ("sparsity", "metric")]
        if type(entry.get("epoch")) is not int or not all(_is_number(n) for n in numbers):
            return f"has an entry without an integer epoch and numeric sparsity/metric ({name})"
    return None


def resume_problem(state: dict[str, Any], needs_optimizer: bool) -> str | None:
    """What makes ``state`` (a checkpoint's content) unfit to continue its run, or None: the
    entries ``restore`` uses, with the types it needs."""
    if "state_dict" not in state:
        weights = _tensor_table(state) and state
        return "holds weights only (a bare state dict)" if weights else "has no 'state_dict' entry"
    if not _tensor_table(state["state_dict"]) or not state["state_dict"]:
        return "has a 'state_dict' entry that is not a table of tensors"
    if "epoch" not in state:
        return "has no 'epoch' entry (it holds weights only)"
    epoch = state["epoch"]
    if type(epoch) is not int or epoch < 0:
        return f"has an invalid 'epoch' entry ({epoch!r}; expected a whole number >= 0)"
    if needs_optimizer:
        if "optimizer" not in state:
            return "has no 'optimizer' entry (pass --no-resume-opt to start a fresh optimizer)"
        if problem := _optimizer_problem(state["optimizer"]):
            return f"has an invalid 'optimizer' entry: it {problem}"
    for key, (fits, expected) in _ENTRY_KINDS.items():
        if state.get(key) is not None and not fits(state[key]):
            return f"has an invalid {key!r} entry (expected {expected})"
    for rank, rng in enumerate(state.get("rng") or []):
        if problem := ckpt_io.rng_state_problem(rng):
            return f"has an invalid 'rng' entry: the state of rank {rank} {problem}"
    if problem := _hist_problem(state.get("checkpoint_hist") or []):
        return f"has an invalid 'checkpoint_hist' entry: it {problem}"
    return None


def check_resumable(state: dict[str, Any], args: argparse.Namespace) -> None:
    """Refuse, in one line, a ``--resume`` file that is no full training checkpoint."""
    problem = resume_problem(state, needs_optimizer=not args.no_resume_opt)
    if problem:
        model = getattr(args, "model", None) or "<model>"
        raise CheckpointError(
            f"--resume {args.resume} {problem}; --resume needs a full training checkpoint "
            f"written by sparse_training.py, such as {model}_last.pth (to start a new run from "
            "a file's weights, use --initial-checkpoint)"
        )


def _check_optimizer_fits(optimizer: Any, saved: dict[str, Any], path: Path) -> None:
    """The saved optimizer state has this run's parameter groups (count and sizes)."""
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        return
    ours = [len(g["params"]) for g in groups]
    theirs = [len(g["params"]) for g in saved["param_groups"]]
    if ours != theirs:
        raise CheckpointError(
            f"--resume {path}: its optimizer state has parameter groups of sizes {theirs}, this "
            f"run's optimizer {ours} (another --opt, --weight-decay or layer-decay setting?); "
            "resume with the run's settings, or pass --no-resume-opt"
        )


def finished(point: ResumePoint | None, model: Any, num_epochs: int) -> bool:
    """True when the checkpoint's run already trained every epoch this run would train.

    A checkpoint that does not fit ``model`` is refused first (keys, shapes, ``--num-classes``):
    it is no run of this model, finished or not.
    """
    if point is None:
        return False
    check_fits(model, point.state["state_dict"], "--resume", point.path)
    return point.start_epoch >= num_epochs


def restore(point: ResumePoint | None, args: argparse.Namespace, run: dict[str, Any]) -> None:
    """Put the run of ``point`` back into the freshly built ``run`` parts (all ranks).

    ``run`` holds ``model`` (unwrapped), ``optimizer`` (the manager's wrapper when there is a
    recipe), ``scaler``, ``ema``, ``manager``, ``lr_scheduler``, ``updates_per_epoch`` and, on
    rank 0, ``hist`` and ``out_dir``. The manager was wired at the start epoch, so it may have
    pruned ahead; the weights and masks loaded here are the exact point the run stopped at.
    """
    if point is None:
        return
    state, model = point.state, run["model"]
    check_fits(model, state["state_dict"], "--resume", point.path)  # names keys and shapes
    manager, resumes_epoch = run["manager"], not args.no_resume_epoch
    if manager is not None and state.get("manager") and resumes_epoch:
        manager.load_state_dict(state["manager"])  # masks first: the weights below win
    ckpt_io.load_model_weights(model, state, point.path)
    if not args.no_resume_opt:
        _check_optimizer_fits(run["optimizer"], state["optimizer"], point.path)
        run["optimizer"].load_state_dict(state["optimizer"])
        if run["scaler"] is not None and state.get(ckpt_io.SCALER_KEY):
            run["scaler"].load_state_dict(state[ckpt_io.SCALER_KEY])
    ema = run["ema"]
    if ema is not None:
        if state.get("state_dict_ema"):
            ema.module.load_state_dict(state["state_dict_ema"])
        else:  # a run without EMA resumed with --model-ema: the average starts here
            ema.set(model)
    _set_lr_position(run, point.start_epoch, args.sched_on_updates)
    if run.get("hist") is not None and continues_in_folder(args, run["out_dir"]):
        run["hist"].load_state_dict(state.get("checkpoint_hist"))  # the whole run's ranking
    rng = state.get("rng")
    if rng and len(rng) == args.world_size:
        ckpt_io.set_rng_state(rng[args.rank])
    ranks = state.get("rank_state")
    if manager is not None and ranks and len(ranks) == args.world_size:
        manager.load_rank_state_dict(ranks[args.rank])
    _logger.info("Resumed %s at epoch %d", point.path, point.start_epoch)


def _set_lr_position(run: dict[str, Any], start_epoch: int, on_updates: bool) -> None:
    scheduler = run["lr_scheduler"]
    if scheduler is None or start_epoch <= 0:
        return
    if on_updates:
        scheduler.step_update(start_epoch * run["updates_per_epoch"])
    else:
        scheduler.step(start_epoch)


def continues_in_folder(args: argparse.Namespace, out_dir: Path | None) -> bool:
    """The run goes on in ``out_dir`` (the folder of the checkpoint it resumes)."""
    from .run_dir import continues_in

    return continues_in(args, out_dir)


def last_metrics(out_dir: Path) -> dict[str, Any]:
    """The eval metrics of a finished run, from its completion marker ({} when unreadable)."""
    import json

    try:
        return dict(json.loads((out_dir / "training_complete.json").read_text())["eval"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
