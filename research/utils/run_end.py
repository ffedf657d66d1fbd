"""How a training run's files end: after each epoch the checkpoints that left the best
history go and the copies are refreshed (:func:`settle_files`); after the last epoch the
completion marker (:func:`mark_complete`); on a stop, where the run stopped and the command
that resumes it (:func:`report_stop`); on resuming a run with no epoch left, its unsettled
files settled (:func:`report_finished`). Rank 0 writes; every step can be redone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from timm.models import safe_model_name

from sparseml.compressed import SUFFIX

from . import checkpoint as ckpt_io
from . import faults, resume
from .checkpoint_hist import CheckpointHistory
from .distributed import cleanup, is_primary
from .run_dir import lock_folder
from .summary import read_summary


def settle_files(args, out_dir: Path, hist: CheckpointHistory) -> None:
    """After an epoch's checkpoints (or on resuming a run that has them): drop the checkpoints
    that left the history, refresh the _best.pth copy and the compressed mirrors. Each step
    can be redone, so a kill in the middle leaves nothing a resume does not settle."""
    hist.commit()
    if not args.save_compressed:
        return
    name = safe_model_name(args.model)
    for kind, kept in (("last", args.save_last), ("best", args.checkpoint_hist > 0)):
        source = out_dir / f"{name}_{kind}.pth"  # each mirrors the .pth beside it
        if kept and source.is_file():
            ckpt_io.mirror_compressed(source, out_dir / f"{name}_{kind}{SUFFIX}")


COMPLETE = "training_complete.json"


def mark_complete(args, out_dir: Path | None, num_epochs: int, eval_metrics: dict) -> None:
    """Rank 0 writes the marker last: launchers use a run's weights only when it is there."""
    if not is_primary(args):
        return
    text = json.dumps({"epochs": num_epochs, "eval": eval_metrics}, allow_nan=False)
    tmp = out_dir / f".{COMPLETE}.tmp"
    tmp.write_text(text + "\n")
    tmp.replace(out_dir / COMPLETE)


def report_stop(args, out_dir: Path | None, epoch: int, argv: list[str]) -> None:
    """Rank 0: where the run stopped, its latest checkpoint and the command that resumes it.

    Checkpoints are written (atomically) at the end of an epoch; an interrupt never writes a
    mid-epoch one: it could not be resumed exactly, and under torchrun the other ranks may
    already be gone.
    """
    if not is_primary(args):
        return
    found = faults.latest_checkpoint(out_dir, args.resume, last_every_epoch=args.save_last)
    if found is None:
        print(
            f"Stopped in epoch {epoch} before any checkpoint was written (checkpoints are "
            "written at the end of an epoch); rerun the same command to start over (a run "
            f"folder without a finished epoch is reused: {out_dir})",
            file=sys.stderr,
        )
        return
    command = faults.resume_command(argv, found, out_dir)
    print(f"Stopped in epoch {epoch}. To resume from {found}:\n  {command}", file=sys.stderr)


def report_finished(args, point: resume.ResumePoint, num_epochs: int) -> dict[str, Any]:
    """A resumed run with no epoch left: say so (exit status 0). A kill after the last epoch's
    checkpoint but before the run's end left its files unsettled: they are settled now."""
    folder = point.path.parent
    if is_primary(args):
        settled = settles_in(args, folder, point, num_epochs) and finish_files(
            args, folder, point, num_epochs
        )
        print(
            f"--resume {point.path}: the run already finished its {num_epochs} epochs "
            f"(last epoch {point.start_epoch - 1}); nothing to do"
            + ("" if settled else f", {folder} is unchanged")
            + ". To train longer, start a new run from it with --initial-checkpoint or raise "
            "--epochs",
            file=sys.stderr,
        )
    cleanup(args)
    return {"out_dir": folder, "train": {}, "eval": resume.last_metrics(folder)}


def settles_in(args, folder: Path, point: resume.ResumePoint, num_epochs: int) -> bool:
    """Whether this resume is the run of ``folder`` going on (its --experiment names that
    folder, its epoch count resumed) and the checkpoint is of the run's final epoch (not an
    earlier one skipped past with --start-epoch)."""
    if not args.experiment or not resume.continues_in_folder(args, folder):
        return False
    own = Path(args.output or "./output/train") / args.experiment
    epoch = point.state.get("epoch")
    return own.resolve() == folder.resolve() and isinstance(epoch, int) and epoch + 1 >= num_epochs


def finish_files(args, folder: Path, point: resume.ResumePoint, num_epochs: int) -> bool:
    """The best-checkpoint history, mirrors and completion marker of a finished run whose end
    a kill cut off, written holding the folder's lock (refused while a run holds it); True
    when any was missing (and is written now)."""
    if (folder / COMPLETE).is_file():
        return False
    lock = lock_folder(folder, "--resume")
    try:
        saved = point.state.get("checkpoint_hist") or []
        hist = CheckpointHistory(folder, safe_model_name(args.model),
                                 max(args.checkpoint_hist, len(saved)),
                                 "loss" in args.eval_metric)  # fmt: skip
        hist.load_state_dict(saved)
        settle_files(args, folder, hist)
        mark_complete(args, folder, num_epochs, final_metrics(folder))
    finally:
        lock.release()
    return True


def final_metrics(folder: Path) -> dict[str, float]:
    """The eval metrics of the last row of the run's summary.csv ({} without one)."""
    rows = read_summary(folder / "summary.csv")
    out = {}
    for key, value in (rows[-1] if rows else {}).items():
        try:
            if key.startswith("eval_"):
                out[key.removeprefix("eval_")] = float(value)
        except ValueError:
            continue
    return out
