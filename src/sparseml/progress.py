"""Progress with an ETA for the long phases: gradient sampling, Fisher inversion, a one-shot
sweep; CAP's elimination kernels take the same ``on_blocks`` callback for their modifier to pass.

A phase of minutes that prints nothing looks hung. `Progress` shows count, rate and ETA on
rank 0 only: a redrawn bar when stderr is a terminal, otherwise (logs, CI, ``nohup``) an INFO
log line about every ``interval`` seconds, the first one (the first ETA) and at the end. A phase
that ends within ``quiet`` seconds (default 2; tiny models, tests, a loop of small prunes) prints
nothing: only work long enough to look hung is reported.
Where logging is not set up at all (a user's own script, a benchmark: no handler anywhere), the
lines go to stderr instead of being lost.
``SPARSEML_PROGRESS=bar|log|off`` forces a mode, ``SPARSEML_PROGRESS_INTERVAL`` sets the
seconds between log lines (default 10) and ``SPARSEML_PROGRESS_QUIET`` the quiet start (2). Kernels stay pure: they take an optional callback
(``on_blocks=progress.update``) and never log.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from typing import Any, TextIO

from sparseml import dist

LOG = logging.getLogger(__name__)
MODES = ("bar", "log", "off")
_BAR_REDRAW_S = 0.2  # a terminal redraw at most this often: a redraw per item would cost


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``: what a person reads at a glance."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _mode(stream: TextIO) -> str:
    chosen = os.environ.get("SPARSEML_PROGRESS", "").strip().lower()
    if chosen in MODES:
        return chosen
    try:
        return "bar" if stream.isatty() else "log"
    except (AttributeError, ValueError):  # a closed or unusual stream
        return "log"


class Progress:
    """Count of ``total`` items of one phase; ``update(n)`` after each batch of work.

    Thread-safe (CAP's batches finish on worker threads). Use as a context manager, or call
    `close` at the end: it prints the final line (the phase's total time).
    """

    def __init__(
        self,
        desc: str,
        total: int,
        unit: str = "",
        *,
        logger: logging.Logger | None = None,
        interval: float | None = None,
        stream: TextIO | None = None,
        mode: str | None = None,
        quiet: float | None = None,
    ) -> None:
        self.desc, self.total, self.unit = desc, max(int(total), 0), unit
        self.logger = logger or LOG
        self.stream = stream or sys.stderr
        self.interval = (
            float(os.environ.get("SPARSEML_PROGRESS_INTERVAL", 10.0))
            if interval is None
            else interval
        )
        self.quiet = (
            float(os.environ.get("SPARSEML_PROGRESS_QUIET", 2.0)) if quiet is None else quiet
        )
        self.mode = mode or _mode(self.stream)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if dist.rank() != 0:
            self.mode = "off"
        self.done = 0
        self.start = self.last = time.monotonic()
        self.closed = False
        self._lock = threading.Lock()
        self._logged_first = False

    # ----- numbers ------------------------------------------------------------------------------
    def rate(self, now: float | None = None) -> float:
        elapsed = (now or time.monotonic()) - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float | None = None) -> float | None:
        rate = self.rate(now)
        return (self.total - self.done) / rate if rate > 0 else None

    def line(self, now: float | None = None) -> str:
        now = now or time.monotonic()
        unit = f" {self.unit}" if self.unit else ""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = self.eta(now)
        eta_text = "ETA ?" if eta is None else f"ETA {format_seconds(eta)}"
        return (
            f"{self.desc}: {self.done}/{self.total}{unit} ({pct:.0f}%, "
            f"{self.rate(now):.3g}{unit}/s, {eta_text})"
        )

    # ----- updates -------------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        """``n`` more items done."""
        with self._lock:
            self.done = min(self.done + int(n), self.total) if self.total else self.done + int(n)
            if self.mode == "off":
                return
            now = time.monotonic()
            if now - self.start < self.quiet:
                return
            if self.mode == "bar":
                if now - self.last >= _BAR_REDRAW_S or self.done >= self.total:
                    self._draw(now)
                    self.last = now
            elif not self._logged_first or now - self.last >= self.interval:
                self._logged_first = True
                self._emit(self.line(now))
                self.last = now

    def set(self, done: int) -> None:
        """Absolute count (for callers that count themselves)."""
        self.update(done - self.done)

    def _emit(self, text: str) -> None:
        if self.logger.hasHandlers():
            self.logger.info("%s", text)
        else:  # logging never configured: Python would drop an INFO line
            self.stream.write(text + "\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        text = self.line(now)
        bar_width = max(10, min(30, width - len(text) - 4))
        filled = int(bar_width * self.done / self.total) if self.total else bar_width
        bar = "#" * filled + "-" * (bar_width - filled)
        self.stream.write(f"\r|{bar}| {text}"[: width - 1].ljust(width - 1))
        self.stream.flush()

    def close(self) -> None:
        """The final line: items and the phase's wall time."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            elapsed = time.monotonic() - self.start
            if self.mode == "off" or elapsed < self.quiet:
                return
            unit = f" {self.unit}" if self.unit else ""
            final = f"{self.desc}: {self.done}/{self.total}{unit} in {format_seconds(elapsed)}"
            if self.mode == "bar":
                self._draw(time.monotonic())
                self.stream.write("\n")
                self.stream.flush()
            self._emit(final)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
