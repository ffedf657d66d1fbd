"""Run a research script with a fault injected into one rank (used by tests/test_faults.py).

    python tests/fault_inject.py research/one_shot_pruning.py ARGS...   (also under torchrun)

``FAULT=enospc`` makes every ``os.fsync`` of the process whose ``RANK`` equals ``FAULT_RANK``
(default 0) fail with ENOSPC, as a full disk reports a buffered write. ``FAULT=kill_after_save``
SIGKILLs that process right after its ``FAULT_COUNT``-th (default 1) training checkpoint whose
file name ends in ``FAULT_MATCH`` is written (``utils.checkpoint.save_checkpoint``): a kill -9
between two files of one epoch. Nothing else changes: the script runs as ``__main__`` with its
own folder first on ``sys.path``.
"""

from __future__ import annotations

import errno
import os
import runpy
import signal
import sys


def _enospc(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _kill_after_save() -> None:
    from utils import checkpoint

    save, match = checkpoint.save_checkpoint, os.environ["FAULT_MATCH"]
    left = [int(os.environ.get("FAULT_COUNT", "1"))]

    def save_then_die(path, *args, **kwargs):
        save(path, *args, **kwargs)
        if str(path).endswith(match):
            left[0] -= 1
            if left[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save_checkpoint = save_then_die


def main() -> None:
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(script))
    if os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", "0"):
        fault = os.environ.get("FAULT", "")
        if fault == "enospc":
            os.fsync = _enospc
        elif fault == "kill_after_save":
            _kill_after_save()
        elif fault:
            raise SystemExit(f"fault_inject: unknown FAULT={fault!r}")
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
