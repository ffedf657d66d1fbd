"""Shared parts of the benchmark scripts (``run_benchmarks.sh``): paths, subprocess steps and
the JSONL records (the machine's description: ``bench_env``).

Records are JSON lines appended durably (``utils.results.append_record``: flush + fsync, a cut
line dropped on the next read), keyed by a ``key`` string; a rerun skips every key already
there, so a killed benchmark continues where it stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESEARCH = ROOT / "research"
if str(RESEARCH) not in sys.path:  # utils.* (the research scripts' package)
    sys.path.insert(0, str(RESEARCH))

from utils import results as res  # noqa: E402
from utils.errors import SetupError  # noqa: E402

__all__ = ["ROOT", "RESEARCH", "SetupError", "guarded", "in_parallel", "record", "records", "run"]

Job = Callable[[], "list[Job] | None"]


def guarded(main: Any) -> None:
    """Run ``main()``; a :class:`SetupError` (missing data, bad option) is one ``error:`` line
    and exit status 2, as in the research scripts."""
    try:
        main()
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def records(path: str | Path) -> dict[str, dict[str, Any]]:
    return res.read_records(path)


def record(path: str | Path, key: str, row: dict[str, Any]) -> dict[str, Any]:
    row = {"key": key, **row, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    res.append_record(path, row)
    return row


def run(cmd: list[str], threads: int, what: str, env: dict[str, str] | None = None) -> None:
    """Run a research script; its output goes to ours. A failure stops the benchmark with the
    script's own exit code (2 = a usage or data error it explained)."""
    full = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    full.setdefault("WANDB_MODE", "offline")
    full["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), full.get("PYTHONPATH", "")) if p
    )
    full.update(env or {})
    print(f"== {what}", flush=True)
    done = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=full)
    if done.returncode:
        print(f"error: {what} failed (exit {done.returncode})", file=sys.stderr)
        sys.exit(done.returncode)


def in_parallel(jobs: list[Job], workers: int) -> None:
    """Run ``jobs`` on ``workers`` threads (a job runs its research scripts one at a time, so
    this is the number of processes at once). A job may return further jobs (those that needed
    its result), queued behind the waiting ones; with one worker they run depth first, in
    order. The first failure cancels the queued jobs, lets the running ones end and is raised
    (a failed script's ``SystemExit`` keeps its exit code)."""
    if workers <= 1:
        queue = deque(jobs)
        while queue:
            queue.extendleft(reversed(queue.popleft()() or []))
        return
    with ThreadPoolExecutor(workers) as pool:
        pending = {pool.submit(job) for job in jobs}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    pending |= {pool.submit(job) for job in future.result() or []}
        except BaseException:
            for future in pending:
                future.cancel()
            raise
