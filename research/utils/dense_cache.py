#!/usr/bin/env python
"""The cached dense model: trained once by ``sparse_training.py``, reused, never half-made.

One mechanism for the one-shot launcher (``run_one_shot_pruning.sh``, through the command line
below) and the quality benchmark (``bench/bench_quality.py``, through :func:`ensure_dense`):

* the cached checkpoint counts only when its training run wrote ``training_complete.json``
  (the last thing ``sparse_training.py`` writes); a cache without it is removed and retrained;
* an interrupted training continues from its ``*_last.pth`` (``--resume``), else the training
  folder is cleared and the run starts over;
* a training that fails or is interrupted ends the caller with its exit status; one that exits
  0 without the marker is an error; nothing is cached in either case;
* the cache is a copy of the run's ``*_best.pth``, written under a temporary name and renamed,
  so a kill never leaves a partial file under the cache's name;
* optional ``settings`` (a JSON-able dict) are recorded in ``record``; when they differ from
  the recorded ones, ``stale`` (the cache, its training and whatever the caller derived from
  them) is removed first, so no result ever mixes two dense models.

Standard library only: the launcher runs it with a plain ``python3`` (``$HELPER_PYTHON``).

    python3 research/utils/dense_cache.py --checkpoint out/dense.pth --train-dir out/dense_training \
        -- python research/sparse_training.py --output out --experiment dense_training ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

COMPLETE = "training_complete.json"


class DenseCacheError(RuntimeError):
    """The dense training did not produce a model to cache (one line, for the user)."""


def _say(text: str) -> None:
    print(f"== {text}", flush=True)


def run_command(cmd: Sequence[str]) -> None:
    """Run the training command; a failure leaves with its exit status (130 for Ctrl-C...)."""
    proc = subprocess.Popen(list(cmd))
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached the training too: let it save and stop
        code = proc.wait() or 130
    if code:
        raise SystemExit(128 - code if code < 0 else code)  # killed by signal N: 128 + N


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _copy_atomically(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with source.open("rb") as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def is_cached(checkpoint: str | Path, train_dir: str | Path) -> bool:
    """Whether ``checkpoint`` exists with a completed training behind it."""
    return Path(checkpoint).is_file() and (Path(train_dir) / COMPLETE).is_file()


def complete_training(
    train_dir: str | Path, train_cmd: Sequence[Any], run: Callable[[list[str]], None]
) -> None:
    """Run ``train_cmd`` into ``train_dir`` unless it completed; an interrupted run resumes
    from its ``*_last.pth``. Raises :class:`DenseCacheError` when it ends without the marker."""
    train_dir = Path(train_dir)
    if (train_dir / COMPLETE).is_file():
        return
    cmd = [str(c) for c in train_cmd]
    last = sorted(train_dir.glob("*_last.pth")) if train_dir.is_dir() else []
    if last:
        _say(f"Resuming the interrupted training from {last[0]}")
        cmd += ["--resume", str(last[0])]
    elif train_dir.exists():
        shutil.rmtree(train_dir)
    run(cmd)
    if not (train_dir / COMPLETE).is_file():
        raise DenseCacheError(
            f"training exited without finishing ({train_dir / COMPLETE} missing); not caching it"
        )


def ensure_dense(
    checkpoint: str | Path,
    train_dir: str | Path,
    train_cmd: Sequence[Any],
    *,
    run: Callable[[list[str]], None] = run_command,
    settings: dict[str, Any] | None = None,
    record: str | Path | None = None,
    stale: Sequence[str | Path] = (),
) -> Path:
    """The cached dense checkpoint, trained first by ``train_cmd`` when needed (see the module
    docstring). ``run(cmd)`` runs the training command (``--resume LAST`` appended when an
    interrupted run is continued) and raises or exits when it fails."""
    checkpoint, train_dir = Path(checkpoint), Path(train_dir)
    if settings is not None and record is not None:
        record = Path(record)
        paths = [Path(p) for p in (*stale, checkpoint, train_dir, record)]
        if _read_json(record) != settings and any(p.exists() for p in paths):
            _say(f"dense settings changed ({record}); removing the stale dense model")
            for path in paths:
                _remove(path)
    if is_cached(checkpoint, train_dir):
        return checkpoint
    if checkpoint.exists():
        _say(f"{checkpoint} has no completed training behind it ({train_dir / COMPLETE} "
             "missing): retraining")  # fmt: skip
        checkpoint.unlink()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    if settings is not None and record is not None:
        Path(record).write_text(json.dumps(settings))  # before training: a rerun resumes it
    if not (train_dir / COMPLETE).is_file():
        _say(f"No dense checkpoint at {checkpoint}: training it")
    complete_training(train_dir, train_cmd, run)
    best = sorted(train_dir.glob("*_best.pth"))
    if not best:
        raise DenseCacheError(f"no *_best.pth in {train_dir}; not caching it")
    _copy_atomically(best[0], checkpoint)
    _say(f"Dense checkpoint: {checkpoint}")
    return checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        argv.append("--")
    split = argv.index("--")
    p = argparse.ArgumentParser(
        prog="dense_cache.py",
        description="Train the dense model once and cache its best checkpoint",
        usage="%(prog)s --checkpoint FILE --train-dir DIR -- TRAINING COMMAND...",
    )
    p.add_argument("--checkpoint", required=True, help="the cached dense weights")
    p.add_argument("--train-dir", required=True, help="the training run's folder")
    args = p.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        p.error("the training command after -- is missing")
    try:
        ensure_dense(args.checkpoint, args.train_dir, command)
    except DenseCacheError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
