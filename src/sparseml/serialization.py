"""The one atomic file writer every file of this project goes through (the SparseML-style
checkpoint helpers built on it are in :mod:`sparseml.checkpoints`).

:func:`atomic_open` writes to a uniquely named temporary file next to the target, fsyncs it and
renames it over the target, so a crash or a full disk never leaves a half written file in place
of the previous one, and never leaves the temporary file behind (unless the process is killed,
see :func:`remove_orphan_temps`). Files get the permissions of a normal ``open`` (0o666 less the
umask, so 0o644 under umask 022), not the 0o600 of ``tempfile.mkstemp``. Checkpoints hold only
tensors and plain containers, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import stat
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from sparseml.errors import SparsificationError

# Temporary names: .<target name>.<pid>.<random>.tmp (hidden; pid and random keep concurrent
# writers of one target apart).
_TEMP = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Below this many free bytes a write failure without an errno is reported as a full disk:
# torch.save turns the OSError of its file object into a RuntimeError.
_NEARLY_FULL = 1 << 20


class FileWriteError(SparsificationError, OSError):
    """A file could not be written (disk full, no permission...); the previous file is intact.

    ``errno`` holds the operating system's error number when there is one, ``filename`` the
    path; the message is the one line given (not ``OSError``'s ``[Errno N] ...`` form).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _errno_of(err: BaseException) -> int | None:
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno:
            return cause.errno
        cause = cause.__cause__ or cause.__context__
    return None


def write_error(path: Path, err: BaseException) -> FileWriteError:
    """One clear error for a failed write of ``path`` (call it before removing the temporary
    file: the free space it would give back says whether the disk was full)."""
    code = _errno_of(err)
    if code is None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(path.parent).free < _NEARLY_FULL:
                code = errno.ENOSPC
    if code in _DISK_FULL:
        reason = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
    elif code is not None:
        reason = os.strerror(code)
    else:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    wrapped = FileWriteError(
        f"cannot write {path}: {reason} (on {socket.gethostname()}); the previous file, "
        "if any, is unchanged"
    )
    wrapped.errno = code
    wrapped.filename = str(path)
    return wrapped


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder entry is on disk; not every OS allows it.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _file_kind(path: Path) -> str:
    """'missing', 'regular', 'folder' or 'other' (device, FIFO, socket), following symlinks."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing, a dangling link, no permission: the write reports it
        return "missing"
    if stat.S_ISREG(mode):
        return "regular"
    return "folder" if stat.S_ISDIR(mode) else "other"


def _names_open_file(path: str) -> bool:
    """Whether ``path`` names an open file of a process (``/dev/stdout``, ``/dev/fd/N``,
    ``/proc/<pid>/fd/N``...) rather than a file of its own (``/dev/shm/x`` stays atomic)."""
    return path.startswith(("/proc/", "/dev/fd/")) or path in (
        "/dev/stdout",
        "/dev/stderr",
        "/dev/stdin",
    )


def _link_chain(path: Path) -> list[str]:
    """``path`` and every path its symlinks lead through, absolute (at most 40 hops)."""
    chain = [os.path.abspath(path)]
    for _ in range(40):
        try:
            nxt = os.readlink(chain[-1])
        except OSError:  # not a link (or gone): the chain ends here
            break
        chain.append(os.path.normpath(os.path.join(os.path.dirname(chain[-1]), nxt)))
    return chain


def _own_stream(path: Path, mode: str, text: dict) -> IO[Any] | None:
    """A handle on this process's stdout/stderr when ``path`` is that file (``/dev/stdout``
    while a shell redirects it into a file): it continues at the stream's position, where a
    new ``open`` would truncate the file or write over what was printed before."""
    try:
        target = os.stat(path)
    except OSError:
        return None
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        try:
            same = os.path.samestat(os.fstat(fd), target)
        except OSError:
            continue
        if same:
            with contextlib.suppress(Exception):
                stream.flush()
            return os.fdopen(os.dup(fd), mode, **text)
    return None


@contextlib.contextmanager
def _stream_into(path: Path, mode: str) -> Iterator[IO[Any]]:
    """Write straight into an existing non-regular file (``/dev/stdout``, a FIFO, a terminal):
    such a file cannot be replaced by a rename, and replacing a device node as root would
    break the system; there is no previous content to keep either."""
    text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
    try:
        with _own_stream(path, mode, text) or open(path, mode, **text) as handle:  # noqa: PTH123
            yield handle
    except (OSError, RuntimeError) as err:
        raise write_error(path, err) from err


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """``with atomic_open(path, "w") as f: ...`` replaces ``path`` only if the block succeeds.

    Any failure removes the temporary file. I/O errors (a full disk, no permission) become one
    :class:`FileWriteError` naming ``path`` and the reason; other errors (``KeyboardInterrupt``,
    a value ``torch.save`` cannot store) are re-raised as they are. Only regular files are
    replaced: a symlink's target is replaced (the link stays), a device node, FIFO or socket is
    written into as it is, and a folder is refused.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    kind = _file_kind(path)
    if kind == "folder":
        raise FileWriteError(f"cannot write {path}: it is a folder, not a file")
    # /dev/stdout and /proc/self/fd/N name an open file of this process (a terminal, a pipe,
    # or the file a shell redirected into): replacing the path would not reach that file.
    if kind == "other" or any(_names_open_file(p) for p in _link_chain(path)):
        with _stream_into(path, mode) as handle:
            yield handle
        return
    if path.is_symlink():  # replace the link's target; a rename over the link would drop it
        path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 applies the umask like a plain open() would.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports I/O errors as RuntimeError
        if isinstance(err, FileWriteError):
            tmp.unlink(missing_ok=True)
            raise
        wrapped = write_error(path, err)
        tmp.unlink(missing_ok=True)
        raise wrapped from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _link_tree(src: Path, dst: Path) -> None:
    """``src`` into ``dst`` by hard links (copies where links fail): cheap, and the originals
    stay untouched until the swap."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(str(src), str(dst))


@contextlib.contextmanager
def replaced_folder(path: str | Path, owned: Callable[[str], bool]) -> Iterator[Path]:
    """``with replaced_folder(out, owned) as stage: ...write into stage...``: ``out`` changes
    in one step when the block succeeds, never file by file.

    Files that belong together (weights, their ONNX form, the report describing both) must not
    end up from two runs in one folder when the second is interrupted. The block writes into a
    fresh sibling folder; on success the entries of ``out`` that are not ``owned`` (a user's
    own files) are hard-linked into it, and the two folders are exchanged (one
    ``renameat2`` where available, else two renames), then the old one is deleted. On any
    failure, ``KeyboardInterrupt`` included, the sibling is deleted and ``out`` is unchanged.
    """
    path = Path(path)
    if path.is_symlink():  # swap the folder the link names; the link stays
        path = Path(os.path.realpath(path))
    parent = path.resolve().parent
    for stale in parent.glob(f".{path.name}.*.tmp"):  # from killed runs (their pid is gone)
        pid = stale.name.split(".")[-3]
        if stale.is_dir() and _TEMP.match(stale.name) and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    stage = parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        stage.mkdir(parents=True)
        yield stage
        if path.is_dir():
            for entry in path.iterdir():
                if not owned(entry.name) and not (stage / entry.name).exists():
                    _link_tree(entry, stage / entry.name)
            cwd = Path.cwd().resolve()
            holds_cwd = cwd == path.resolve() or path.resolve() in cwd.parents
            if not holds_cwd and _exchange(stage, path):
                shutil.rmtree(stage, ignore_errors=True)  # the old folder, now under stage
            else:
                _swap_by_renames(stage, path, owned)
        else:
            os.rename(stage, path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _fsync_dir(parent)


def _swap_by_renames(stage: Path, path: Path, owned: Callable[[str], bool]) -> None:
    """Two renames, or where ``path`` cannot be renamed (a mount point, the current folder)
    its owned entries replaced one by one: the best that is left there."""
    cwd = Path.cwd().resolve()
    old = stage.with_name(stage.name + ".old")
    try:
        if cwd == path.resolve() or path.resolve() in cwd.parents:
            raise IsADirectoryError("the current folder")  # renaming it would strand the process
        os.rename(path, old)
    except OSError:
        for entry in path.iterdir():
            if owned(entry.name) and not (stage / entry.name).exists():
                entry.unlink(missing_ok=True)
        for entry in stage.iterdir():
            if owned(entry.name):
                os.replace(entry, path / entry.name)
        shutil.rmtree(stage, ignore_errors=True)
        return
    os.rename(stage, path)
    shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    with Path(src).open("rb") as source, atomic_open(dst, "wb") as handle:
        shutil.copyfileobj(source, handle)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_open` (a file object, so a full disk surfaces as
    an ``OSError`` with its errno instead of torch's ``basic_ios::clear`` message)."""
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def remove_orphan_temps(folder: str | Path) -> list[Path]:
    """Delete temporary files of :func:`atomic_open` left in ``folder`` by killed processes.

    Only call it while no other process writes into ``folder`` (e.g. holding its run lock).
    """
    removed = []
    for entry in Path(folder).iterdir() if Path(folder).is_dir() else []:
        if _TEMP.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
