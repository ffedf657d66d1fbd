"""Batches of small float64 factorizations: how many blocks per batch, and how batches run.

Shared by the block-Fisher, OBS and CAP kernels, whose work is many independent B x B problems.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

# Float64 numbers per temporary buffer of the chunked small factorizations (4 MiB on CPU, where
# one chunk per thread is in flight; 128 MiB on accelerators, where bigger batches pay off), so
# the peak extra memory stays far below the size of the blocks themselves.
_CHUNK_NUMEL = {"cpu": 2**19}
_CHUNK_NUMEL_DEFAULT = 2**24


def chunk_blocks(block_numel: int, device: torch.device) -> int:
    """Default number of blocks of ``block_numel`` entries per float64 batch on ``device``."""
    return max(1, _CHUNK_NUMEL.get(device.type, _CHUNK_NUMEL_DEFAULT) // block_numel)


def _libc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or a no-op where there is none."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


# The working batches (MiBs each, allocated and freed in every batch) land in glibc's
# per-thread arenas, which keep freed pages resident; trimming after a batch loop returns them,
# so the next phase's peak is its own (measured at 196,608 weights, B = 192: CAP's whole prune
# peaked 253 MiB above the start without, 241 MiB with, against 145 MiB of packed blocks).
release_free_memory = _libc_trim()


def for_each_chunk(fn: Callable[[int], None], n: int, step: int, device: torch.device) -> None:
    """Call ``fn(start)`` for start in range(0, n, step), the chunks being independent.

    On CPU, MKL's multi-threaded potrf/potri on B ~ 200 matrices is slower than one thread, and
    catastrophically so (20x measured) when the cores are shared; torch loops over the batch
    itself. So LAPACK runs single-threaded and the chunks are spread over a pool of
    torch.get_num_threads() Python threads instead (torch releases the GIL). The previous
    thread setting is restored afterwards, and the freed working memory is returned to the
    system (`release_free_memory`). Results do not depend on the schedule; the first failing
    chunk in order raises.
    """
    starts = range(0, n, step)
    if device.type != "cpu":
        for s in starts:
            fn(s)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threads == 1 or len(starts) <= 1:
            for s in starts:
                fn(s)
        else:
            with ThreadPoolExecutor(min(threads, len(starts))) as pool:
                for _ in pool.map(fn, starts):
                    pass
    finally:
        torch.set_num_threads(threads)
        release_free_memory()
