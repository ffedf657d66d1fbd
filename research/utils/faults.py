"""How the research scripts end: exit codes, signals, and never hanging a ``torchrun`` job.

Exit codes: 0 done; 1 a failure (a lost peer rank, a write that failed, NaN/Inf, a bug);
2 a bad command line, data set, recipe or checkpoint (one line, no traceback); 128 + N stopped by
signal N (130 for Ctrl-C / SIGINT, 143 for SIGTERM).

Why nothing hangs: a failing rank never enters another collective (no barrier, no orderly
``destroy_process_group``: both wait for peers that may sit in a different collective). It
flushes its output and leaves with ``os._exit``, so threads of the gloo/NCCL backend cannot keep
it alive. Its TCP connections close, the peers fail in their next collective within a step and
leave the same way, and ``torchrun`` stops whatever is left of the job when one worker exits
non-zero. SIGINT and SIGTERM raise :class:`KeyboardInterrupt` in the main thread (the clean path);
a watchdog thread ends the process after :data:`GRACE_S` seconds in case the main thread is
blocked in C++ code, where Python signal handlers cannot run (one backward pass of the gradient
sampler on a loaded machine took seconds). A stopped process leaves with ``os._exit`` once its
message is out: interpreter finalisation (module teardown, thread pools) took ~10 s under load.
Every result file is written atomically, so nothing finished is lost by either.

A run that seems stuck can be asked where it is: ``kill -USR2 <pid>`` (each rank's pid under
``torchrun``) prints the stack of every thread of that process to its stderr, and the run goes
on. SIGUSR1 is left alone: schedulers such as SLURM send it as a warning before a time limit.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist

from .errors import SetupError

EXIT_FAILED = 1
EXIT_USAGE = 2
GRACE_S = 1.0  # SIGINT/SIGTERM -> exit within ~1 s plus the scheduler's latency, at any load
STACKS_SIGNAL = signal.SIGUSR2  # prints every thread's stack to stderr; the process goes on
# errno values that mean "the disk or folder refused the write": reported in one line.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO}
# Text of the errors a collective raises when a peer process is gone.
_PEER_LOST = (
    "closed by peer",
    "reset by peer",
    "broken pipe",
    "socket closed",
    "remote worker crashing",
    "caused pair closure",
)
_HERE = str(Path(__file__).resolve().parents[1])  # research/
_installed = False


class Interrupted(KeyboardInterrupt):
    """A SIGTERM (or other stop signal) turned into the same exception as Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class NonFiniteError(RuntimeError):
    """A loss, metric or weight became NaN or infinite; the run stops instead of going on."""


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def _watchdog(fd: int, grace: float) -> None:
    while True:
        try:
            data = os.read(fd, 64)  # blocks without the GIL
        except OSError:
            return
        stops = [s for s in data if s in (signal.SIGINT, signal.SIGTERM)]
        if stops:
            time.sleep(grace)  # the main thread normally exits well before this
            flush_output()
            os._exit(128 + stops[0])


def install_signal_handlers(grace: float = GRACE_S) -> None:
    """SIGTERM raises :class:`Interrupted`; SIGINT/SIGTERM end the process within ``grace`` s;
    :data:`STACKS_SIGNAL` prints every thread's stack to stderr (from C, so also while the main
    thread is blocked in a collective) and changes nothing else.

    ``signal.set_wakeup_fd`` writes the signal number from the C-level handler, so the watchdog
    sees it even while the main thread waits in a collective or a store and holds no GIL.
    Only in the main thread of a script (signals cannot be set up elsewhere).
    """
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, _raise_interrupted)  # SIGINT already raises KeyboardInterrupt
    faulthandler.register(STACKS_SIGNAL, all_threads=True)
    threading.Thread(
        target=_watchdog, args=(read_fd, grace), name="stop-watchdog", daemon=True
    ).start()
    _installed = True


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends (end-of-epoch bookkeeping stays consistent).

    A summary row without its checkpoint would be repeated by the resumed run. The watchdog
    still ends a block that takes longer than its grace period.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        if previous[signum] not in (signal.SIG_IGN, None):
            signal.signal(signum, lambda n, _f: caught.append(n))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if caught:  # only when the block succeeded; its own error would say more
        raise KeyboardInterrupt() if caught[0] == signal.SIGINT else Interrupted(caught[0])


def flush_output() -> None:
    # A broken handler or closed stream must not keep the process from leaving.
    for target in (*logging.getLogger().handlers, sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            target.flush()


def _rank_prefix() -> str:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return f"[rank {dist.get_rank()}] "
    return ""


def describe(err: BaseException) -> tuple[int, str | None]:
    """The exit code for ``err`` and its one-line message (None: print the traceback)."""
    from sparseml.errors import NumericalError, SparsificationError
    from sparseml.serialization import FileWriteError

    if isinstance(err, KeyboardInterrupt):
        signum = getattr(err, "signum", signal.SIGINT)
        return 128 + signum, f"stopped by {signal.Signals(signum).name}"
    # Runtime failures first: a failed write or bad numbers are not usage errors, even where
    # their classes also derive from SparsificationError.
    if isinstance(err, FileWriteError | NonFiniteError | NumericalError):
        return EXIT_FAILED, f"error: {err}"
    if isinstance(err, SetupError | SparsificationError):
        return EXIT_USAGE, f"error: {err}"
    if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
        if err.filename:
            return EXIT_FAILED, f"error: cannot write {err.filename}: {err.strerror or err}"
        # Name the deepest line of our own code: it says what was being written.
        ours = [f for f in traceback.extract_tb(err.__traceback__) if f.filename.startswith(_HERE)]
        at = f" (in {Path(ours[-1].filename).name}:{ours[-1].lineno})" if ours else ""
        return EXIT_FAILED, f"error: a write failed: {err.strerror or err}{at}"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    dist_error = getattr(dist, "DistError", ())
    text = str(err).lower()
    if (dist_error and isinstance(err, dist_error)) or any(t in text for t in _PEER_LOST):
        return EXIT_FAILED, (
            "error: lost contact with another rank (it failed or was stopped; its own message "
            f"says why): {first}"
        )
    return EXIT_FAILED, None


def in_script() -> bool:
    """Whether this process runs a script through :func:`run_main` (not a test calling a
    script's ``main`` in-process)."""
    return _installed


def run_main(main: Callable[[], object]) -> None:
    """Run a script's ``main`` with signal handling; on failure report and exit (never hang)."""
    install_signal_handlers()
    try:
        main()
    except SystemExit:  # argparse usage errors and explicit exits keep their code
        raise
    except BaseException as err:
        code, message = describe(err)
        if message is None:
            traceback.print_exc()
        elif not _said_by_rank0(code):
            print(_rank_prefix() + message, file=sys.stderr)
        leave(code)


def _said_by_rank0(code: int) -> bool:
    """A usage error raised before the process group exists comes from the same options and
    files on every rank: rank 0 alone prints it, so the user reads it once."""
    initialized = dist.is_available() and dist.is_initialized()
    return code == EXIT_USAGE and not initialized and os.environ.get("RANK", "0") != "0"


def leave(code: int) -> NoReturn:
    """Exit with ``code`` without touching the process group when one is initialised, and
    without interpreter finalisation when stopped by a signal (the user is waiting)."""
    flush_output()
    if code > 128 or (dist.is_available() and dist.is_initialized()):
        os._exit(code)  # no collective, no destructor that could wait for a peer
    sys.exit(code)


# ----- resume hints -------------------------------------------------------------------------------
def latest_checkpoint(out_dir: Path | None, fallback: str = "", last_every_epoch: bool = False):
    """The newest full checkpoint in ``out_dir`` (else ``fallback``, if it exists), or None.

    Every checkpoint the training script writes (``_last``, ``epoch=N``, ``_best``) holds the
    whole training state and is written at the end of an epoch, so the newest one is the latest
    resumable point. With ``last_every_epoch`` (``--save-last``) ``_last`` is that point even
    when a ``_best`` of the same epoch was written a moment later.
    """
    found = []
    if out_dir is not None and out_dir.is_dir():
        found = [p for p in out_dir.glob("*.pth") if not p.name.startswith(".")]
    last = [p for p in found if p.name.endswith("_last.pth")]
    if last_every_epoch and last:
        return last[0]
    if found:
        return max(found, key=lambda p: p.stat().st_mtime_ns)
    return Path(fallback) if fallback and Path(fallback).is_file() else None


def _strip_options(argv: Sequence[str], names: set[str]) -> list[str]:
    """``argv`` without the options ``names`` (``--x V`` and ``--x=V`` forms) and their values."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in names:
            skip = "=" not in item
            continue
        out.append(item)
    return out


def resume_command(
    argv: Sequence[str], checkpoint: Path, out_dir: Path | None, env: dict | None = None
) -> str:
    """The command line that continues this run from ``checkpoint`` in the same folder."""
    import shlex

    env = os.environ if env is None else env
    spellings = {"--resume", "--local-rank", "--local_rank"}
    if out_dir is not None:
        spellings |= {"--output", "--experiment", "--output_dir", "--output-dir"}  # CAP alias
    args = _strip_options(list(argv[1:]), spellings)
    if out_dir is not None:
        args += ["--output", str(out_dir.parent), "--experiment", out_dir.name]
    args += ["--resume", str(checkpoint)]
    launcher = [sys.executable]
    if int(env.get("WORLD_SIZE", "1")) > 1:
        nproc = env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE"))
        nodes = int(env.get("GROUP_WORLD_SIZE", "1"))
        rdzv = ["--standalone"] if nodes == 1 else [f"--nnodes={nodes}", "<rendezvous options>"]
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *rdzv,
            f"--nproc_per_node={nproc}",
        ]
    return shlex.join([*launcher, argv[0], *args]).replace("'<rendezvous options>'", "...")
