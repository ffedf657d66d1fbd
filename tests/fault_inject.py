"""Run a research script with a fault injected into one rank (used by tests/test_faults.py).

    python tests/fault_inject.py research/one_shot_pruning.py ARGS...   (also under torchrun)

``FAULT=enospc`` makes every ``os.fsync`` of the process whose ``RANK`` equals ``FAULT_RANK``
(default 0) fail with ENOSPC, as a full disk reports a buffered write. Nothing else changes: the
script runs as ``__main__`` with its own folder first on ``sys.path``.
"""

from __future__ import annotations

import errno
import os
import runpy
import sys


def _enospc(fd: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def main() -> None:
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(script))
    if os.environ.get("RANK", "0") == os.environ.get("FAULT_RANK", "0"):
        fault = os.environ.get("FAULT", "")
        if fault == "enospc":
            os.fsync = _enospc
        elif fault:
            raise SystemExit(f"fault_inject: unknown FAULT={fault!r}")
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
