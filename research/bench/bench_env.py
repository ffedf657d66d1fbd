"""The machine a benchmark ran on, written to ``<results>/env.json`` (imports no torch).

python research/bench/bench_env.py RESULTS THREADS KERNEL_THREADS
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else lscpu, else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def environment(threads: int) -> dict[str, Any]:
    """What the numbers depend on: versions, threads, CPU, cores, memory, load at the start.

    Versions come from the installed packages' metadata: importing torch only to read its
    version would cost seconds per run.
    """
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    try:
        mem = next(
            int(line.split()[1]) * 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
    except (OSError, StopIteration):
        mem = None
    return {
        "torch": installed("torch"),
        "timm": installed("timm"),
        "python": platform.python_version(),
        "threads": threads,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": mem,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main(argv: list[str]) -> None:
    out, threads, kernel_threads = Path(argv[0]), int(argv[1]), int(argv[2])
    env = {**environment(threads), "kernel_threads": kernel_threads}
    out.mkdir(parents=True, exist_ok=True)
    # A plain temporary file and rename: sparseml.serialization's writer would import torch.
    tmp = out / f".env.json.{os.getpid()}"
    tmp.write_text(json.dumps(env, indent=2) + "\n")
    os.replace(tmp, out / "env.json")


if __name__ == "__main__":
    main(sys.argv[1:])
