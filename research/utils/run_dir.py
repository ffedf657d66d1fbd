"""Output folders: one run at a time per folder, and a fresh run never overwrites an old one.

* Every run locks its folder for its whole life with ``fcntl.flock`` on ``<folder>/.run.lock``,
  which also records the holder (pid, host, start time, command). A second run into the folder
  is refused (exit 2) with a message naming the holder. The kernel drops the lock when the
  holder dies, even by ``kill -9``, so a stale lock file never blocks a later run.
* ``sparse_training.py``: an ``--experiment`` folder that already holds a run is refused unless
  the run resumes from a checkpoint inside it (``--resume <folder>/<model>_last.pth``). A folder
  whose run stopped before finishing an epoch holds only that run's setup (``args.yaml``, its
  recipe copy, W&B's folder): nothing to lose, so a fresh run reuses it, as the stopped run's
  message ("rerun the same command to start over") promises. A folder
  named automatically (time-model-size) gets a ``-1``, ``-2``... suffix when the name is taken,
  as timm's ``get_outdir(inc=True)`` does.
* ``one_shot_pruning.py``: the folder is the store of a sweep; running a sweep into it again
  continues that sweep (rows made with other settings are refused by ``results.plan_resume``).

Holding the lock, a run also deletes the temporary files killed writers left in the folder.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from sparseml.serialization import remove_orphan_temps

from .distributed import gather_objects, is_primary
from .errors import SetupError

_logger = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()


class RunLock:
    """An exclusive ``flock`` on a folder's lock file; released by :meth:`release` or death."""

    def __init__(self, folder: Path, fd: int | None) -> None:
        self.folder, self.fd = folder, fd
        _HELD.add(self)

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing the last descriptor drops the flock

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _close_in_child() -> None:
    # A forked child (a data loader worker) shares the lock; if it outlived a killed parent the
    # folder would stay locked. Closing (not unlocking) its copy leaves the parent's lock held.
    for lock in list(_HELD):
        if lock.fd is not None:
            os.close(lock.fd)
            lock.fd = None


os.register_at_fork(after_in_child=_close_in_child)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"holder unknown, see {path}"


def lock_folder(folder: str | Path, option: str) -> RunLock:
    """Create ``folder`` and lock it; :class:`SetupError` naming the holder when it is taken."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise SetupError(f"{option}: cannot open the lock file {path}: {err.strerror}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            # Some network file systems have no locks: run unprotected rather than not at all.
            _logger.warning("Cannot lock %s (%s); concurrent runs are not detected", path, err)
            return RunLock(folder, None)
        raise SetupError(
            f"{option}: output folder {folder} is in use by another run ({_holder(path)}); "
            f"wait for it to end or choose another {option}"
        ) from None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
    }
    try:  # who holds the lock, for the message of a refused run; the lock works without it
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError as err:
        _logger.warning("Cannot record the run in %s: %s", path, err.strerror)
    for orphan in remove_orphan_temps(folder):
        _logger.info("Removed %s, left by an interrupted write", orphan)
    return RunLock(folder, fd)


def _run_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)


def continues_in(args: argparse.Namespace, folder: Path | None) -> bool:
    """True when the run resumes (epoch and all) from a checkpoint inside ``folder``."""
    if not args.resume or folder is None or getattr(args, "no_resume_epoch", False):
        return False
    return Path(args.resume).resolve().parent == Path(folder).resolve()


def _setup_files(folder: Path) -> set[str]:
    """Files a run writes before its first epoch ends: args.yaml, its recipe copy, W&B's."""
    names = {"args.yaml", "wandb"}
    try:  # an unreadable args.yaml names no recipe copy: the folder then counts as a run
        recipe = (yaml.safe_load((folder / "args.yaml").read_text()) or {}).get("sparseml_recipe")
    except (OSError, yaml.YAMLError, AttributeError):
        recipe = None
    if isinstance(recipe, str) and recipe:
        names.add(Path(recipe).name)
    return names


def _fresh_or_resumed(args: argparse.Namespace, folder: Path, lock: RunLock) -> None:
    """Refuse a fresh run into a folder that holds an earlier run (a resume of it is fine, and
    so is a folder whose run stopped before its first epoch ended)."""
    files = _run_files(folder)
    if not files or continues_in(args, folder):
        return
    if set(files) <= _setup_files(folder):
        _logger.info("Reusing %s: its earlier run stopped before finishing an epoch", folder)
        return
    lock.release()
    last = sorted(folder.glob("*_last.pth"))
    hint = str(last[-1]) if last else f"{folder}/<checkpoint>.pth"
    shown = ", ".join(files[:4]) + (", ..." if len(files) > 4 else "")
    raise SetupError(
        f"--experiment: output folder {folder} already holds a run ({shown}); continue it "
        f"with --resume {hint}, or choose a new --experiment (or --output) so nothing of it "
        "is overwritten"
    )


def _claim_training_dir(args: argparse.Namespace, input_size: int) -> tuple[Path, RunLock]:
    from timm.models import safe_model_name

    base = Path(args.output or "./output/train")
    if args.experiment:
        folder = base / args.experiment
        lock = lock_folder(folder, "--experiment")
        _fresh_or_resumed(args, folder, lock)
        return folder, lock
    stem = "-".join([time.strftime("%Y%m%d-%H%M%S"), safe_model_name(args.model), str(input_size)])
    for suffix in ["", *(f"-{i}" for i in range(1, 1000))]:
        folder = base / f"{stem}{suffix}"
        try:
            folder.mkdir(parents=True)  # atomic: two runs never pick the same name
        except FileExistsError:
            continue
        except OSError as err:
            raise SetupError(f"--output: cannot create {folder}: {err.strerror}") from err
        return folder, lock_folder(folder, "--output")
    raise SetupError(f"--output: no free run folder name {stem}-N in {base}")


def claim_training_dir(
    args: argparse.Namespace, input_size: int
) -> tuple[Path | None, RunLock | None]:
    """Rank 0 picks, checks and locks the run folder; every rank stops if it is refused.

    Collective: every rank calls it. Returns ``(folder, lock)`` on rank 0, ``(None, None)``
    elsewhere; the caller keeps the lock until the run ends.
    """
    folder, lock, error = None, None, ""
    if is_primary(args):
        try:
            folder, lock = _claim_training_dir(args, input_size)
        except SetupError as err:
            error = str(err)
    error = gather_objects(args, error)[0]
    if error:
        raise SetupError(error)
    return folder, lock


@contextmanager
def hold_folder(args: argparse.Namespace, folder: str | Path, option: str) -> Iterator[None]:
    """Lock ``folder`` on rank 0 for the ``with`` block; every rank stops if it is taken."""
    lock, error = None, ""
    if is_primary(args):
        try:
            lock = lock_folder(folder, option)
        except SetupError as err:
            error = str(err)
    error = gather_objects(args, error)[0]
    if error:
        raise SetupError(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
