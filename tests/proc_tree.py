"""Running a script (or a torchrun job) with a timeout that explains itself and leaves nothing.

`subprocess.run(..., timeout=...)` kills only the process it started: under ``torchrun`` the
ranks live on (in sessions of their own) and load the machine for every later test, and the
failure says nothing about where the job stood. `run_bounded` asks every script process of the
tree for its threads' stacks first (``research/utils/faults.STACKS_SIGNAL``: the scripts print
them to stderr and go on), then kills the whole tree, and returns exit code 124 with everything
the job printed, stacks included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

TIMED_OUT = 124
STACKS_SIGNAL = signal.SIGUSR2  # as research/utils/faults.py
STACKS_WAIT_S = 3.0  # for the stacks to be written before the kill


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc (no ``ps`` needed)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def is_script(pid: int) -> bool:
    """A Python process running a script file (a rank, or a single-process run), not a launcher
    (``python -m torch.distributed.run ...``): the processes that print stacks on request."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    args = [a for a in argv[1:] if a and a not in ("-u", "-B")]
    return bool(args) and args[0].endswith(".py")


def alive(pids: Sequence[int]) -> list[int]:
    """Those of ``pids`` that still run (zombies count as gone)."""
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if "zombie" not in Path(f"/proc/{pid}/status").read_text().lower():
                out.append(pid)
    return out


def kill_tree(root: int, pids: Sequence[int]) -> None:
    """SIGKILL ``root`` and ``pids`` (collected while the tree was whole)."""
    for pid in (root, *pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def run_bounded(
    cmd: Sequence[str], *, cwd: Path | str, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)`; past ``timeout`` seconds the
    script processes print their stacks, every process of the tree is killed, and the result
    has returncode `TIMED_OUT` and a last stderr line that says so."""
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    except subprocess.TimeoutExpired:
        pass
    tree = descendants(proc.pid)
    asked = [pid for pid in (proc.pid, *tree) if is_script(pid)]
    for pid in asked:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, STACKS_SIGNAL)
    time.sleep(STACKS_WAIT_S if asked else 0.0)
    kill_tree(proc.pid, tree)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # a process that left the tree still holds the pipes
        out, err = "", "[the output was lost: a process outside the tree kept its pipes open]"
    note = f"[timed out after {timeout:g} s; stacks of pids {asked} above; all killed]"
    return subprocess.CompletedProcess(proc.args, TIMED_OUT, out, f"{err}\n{note}")
