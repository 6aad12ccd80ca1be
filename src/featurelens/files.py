"""File-system effects, each in one helper: atomic files, whole directories, exclusive locks.

* :func:`atomic_write`: a file that readers see whole or not at all (an atlas's manifest and
  arrays, every file of a report);
* :func:`replaced_directory`: a directory (a report, the demo's output) built in a temporary
  folder next to its place and moved there only when it is complete, so that an interrupted or
  failed writer leaves no partial directory;
* :func:`exclusive_lock` / :func:`lock_holder`: the lock a scan holds on its output directory,
  so that a second scan into it is refused, naming the first.

Imports nothing of featurelens (it sits at the bottom): a refused lock is a
:class:`LockBusy`, which :mod:`featurelens.scan` turns into a
:class:`~featurelens.errors.LockedError`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import socket
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

__all__ = [
    "LOCK_NAME",
    "LockBusy",
    "LockHolder",
    "atomic_write",
    "exclusive_lock",
    "lock_holder",
    "replaced_directory",
]


def atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in its folder and ``os.replace``.

    Readers see the old file or the new one, never a partial one. The temporary file,
    ``.tmp-<name>-<random>``, is created with mode 0o666 (less the umask, applied by the OS:
    no process-wide umask change) and removed if the write fails.

    Parameters
    ----------
    path
        The file to write; its folder must exist.
    data
        The whole content.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    OSError
        The folder does not exist or is not writable (nothing is left behind).
    """
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# Whole directories


@contextlib.contextmanager
def replaced_directory(
    target: str | os.PathLike[str],
    owned: Callable[[str], bool],
    *,
    last: Sequence[str] = (),
) -> Iterator[Path]:
    """Build the new content of directory ``target`` in a temporary folder; move it into place
    only when the ``with`` block ends normally.

    The block writes into the yielded folder, ``.tmp-<name>-<random>`` next to ``target`` (on
    the same file system, so that moving is a rename). When the block raises (or is
    interrupted), the folder is deleted and ``target`` is left as it was: nothing partial
    appears. When it ends normally, the content is put in place:

    * ``target`` does not exist (or is empty): one ``rename``, atomic;
    * ``target`` holds only entries that ``owned`` recognises (an earlier output of the same
      writer): the two directories are exchanged atomically (Linux ``renameat2`` with
      ``RENAME_EXCHANGE``; elsewhere ``target`` is renamed aside and the new one renamed in,
      leaving a moment without ``target``), then the old content is deleted;
    * ``target`` also holds entries that are not ``owned`` (for example the user's own files, or
      an atlas next to a report): those are left alone, and the new entries are moved in one by
      one (files by ``os.replace``, folders exchanged as above), those named in ``last`` last
      (``index.html``: the page that links to the others), then ``owned`` entries that the new
      content no longer has are deleted. Each entry is replaced atomically; the set is not.

    A process killed during the block leaves its ``.tmp-*`` folder behind; it is never read
    and may be deleted.

    Parameters
    ----------
    target
        The directory to write; a symbolic link to a directory is followed (the real directory
        is replaced). Its parent must be writable.
    owned
        Whether an entry name of ``target`` is something this writer writes (and so may
        replace or delete).
    last
        Entry names to move last, in this order.

    Yields
    ------
    Path
        The temporary folder to write into (empty).

    Raises
    ------
    NotADirectoryError
        ``target`` exists and is not a directory (checked before the block runs).
    OSError
        The temporary folder cannot be made next to ``target``, or a move fails.
    """
    target = Path(os.path.abspath(target))
    if target.is_symlink():
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{str(target)!r} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".tmp-{target.name}-{secrets.token_hex(8)}"
    staging.mkdir(0o777)  # the umask applies, as for any directory featurelens makes
    try:
        yield staging
        _place(staging, target, owned, tuple(last))
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _place(
    staging: Path, target: Path, owned: Callable[[str], bool], last: tuple[str, ...]
) -> None:
    """Put the content of ``staging`` at ``target`` (see :func:`replaced_directory`)."""
    try:
        os.rename(staging, target)  # no target, or an empty one (POSIX replaces empty folders)
        return
    except OSError as exc:
        if not target.is_dir():
            raise
        del exc
    entries = os.listdir(target)
    if all(owned(name) for name in entries):
        _swap_directories(staging, target)
        return
    new = sorted(
        os.listdir(staging), key=lambda n: (n in last, last.index(n) if n in last else 0, n)
    )
    for name in new:
        source, destination = staging / name, target / name
        if source.is_dir() and not source.is_symlink():
            if destination.is_dir() and not destination.is_symlink():
                _swap_directories(source, destination)
                continue
            if destination.exists() or destination.is_symlink():
                destination.unlink()
            os.rename(source, destination)
        else:
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(source, destination)
    for name in set(entries) - set(new):
        if owned(name):
            _remove(target / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swap_directories(new: Path, old: Path) -> None:
    """Make ``old``'s path hold ``new``'s content, then delete the old content."""
    if _exchange(new, old):
        shutil.rmtree(new, ignore_errors=True)  # ``new``'s path now holds the old content
        return
    aside = old.parent / f".tmp-{old.name}-old-{secrets.token_hex(8)}"
    os.rename(old, aside)
    try:
        os.rename(new, old)
    except BaseException:
        os.rename(aside, old)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or the file system cannot.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without the wrapper (glibc < 2.28, musl < 1.2)
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


# --------------------------------------------------------------------------------------------
# Exclusive locks

#: The lock file a scan keeps in its output directory while it runs (removed at the end).
LOCK_NAME = ".lock"


@dataclass(frozen=True)
class LockHolder:
    """Who holds a directory's lock, as the holder wrote it into the lock file.

    Attributes
    ----------
    pid
        Its process id (0 when the lock file could not be read).
    host
        The host name of its machine.
    started
        When it took the lock (ISO 8601, local time with offset).
    purpose
        What it is doing (``"scan"``).
    """

    pid: int
    host: str
    started: str
    purpose: str

    def describe(self) -> str:
        """``"a scan by process 123 on host, started 2024-05-01T10:00:00+02:00"``."""
        if not self.pid:
            return "a process that has not said who it is yet"
        return f"a {self.purpose} by process {self.pid} on {self.host}, started {self.started}"


class LockBusy(BlockingIOError):
    """Another process (or another holder in this one) holds the lock; ``holder`` says who.

    The message names the directory, the holder and what to do.
    """

    def __init__(self, message: str, holder: LockHolder | None = None) -> None:
        super().__init__(message)
        self.holder = holder

    def __str__(self) -> str:
        return str(self.args[0])


try:  # POSIX: flock, released by the kernel when the holder dies (no stale locks)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _try_lock(fd: int) -> bool:
    assert fcntl is not None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_holder(fd: int) -> LockHolder:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8"))
        return LockHolder(
            int(info["pid"]), str(info["host"]), str(info["started"]), str(info["purpose"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return LockHolder(0, "", "", "")


def lock_holder(directory: str | os.PathLike[str]) -> LockHolder | None:
    """Who holds the lock of ``directory`` now; None when nobody does.

    Parameters
    ----------
    directory
        A scan's output directory (it need not exist).

    Returns
    -------
    LockHolder or None
        The holder (a lock left by a process that died is released by the OS: nobody holds it).
    """
    if fcntl is None:  # pragma: no cover - Windows
        return None
    try:
        fd = os.open(Path(directory) / LOCK_NAME, os.O_RDWR)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        return _read_holder(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(directory: str | os.PathLike[str], purpose: str = "scan") -> Iterator[Path]:
    """Hold the exclusive lock of ``directory`` (created if needed) while the block runs.

    The lock is ``flock`` on ``directory/.lock``, which records the holder (process id, host,
    start time) for the message a refused writer shows. The OS releases it when the holder
    exits, however it exits, so a lock left by a process that died is simply taken over. The
    file is removed when the block ends, and ``directory`` too when this call made it and it is
    still empty (a scan that failed before saving anything leaves nothing behind).

    POSIX only (Linux, macOS; on NFS, where the server supports it): elsewhere a warning says
    that no lock is taken.

    Parameters
    ----------
    directory
        The directory to lock.
    purpose
        What the holder does, for the message (``"scan"``).

    Yields
    ------
    Path
        The lock file.

    Raises
    ------
    LockBusy
        Another process (or another scan in this one) holds the lock; the message names it.
    """
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    if fcntl is None:  # pragma: no cover - Windows
        warnings.warn(
            f"no lock taken on {str(directory)!r} (this platform has no flock): two scans "
            "writing into it at once would not be told apart",
            RuntimeWarning,
            stacklevel=3,
        )
        yield path
        return
    fd = _acquire(directory, path, purpose)
    try:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "purpose": purpose,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        path.unlink(missing_ok=True)  # while holding it: nobody else holds this file's lock
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when empty


def _acquire(directory: Path, path: Path, purpose: str) -> int:
    """Open and lock ``path``; a file unlinked by the previous holder between the open and the
    lock is opened again.
    """
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = _read_holder(fd)
            os.close(fd)
            raise LockBusy(
                f"{str(directory)!r} is being written by {holder.describe()}; wait until it "
                f"ends or choose another output directory (a {purpose} holds its output's "
                f"lock, {path.name}, while it runs)",
                holder,
            )
        try:
            current = os.stat(path)
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise LockBusy(f"could not lock {str(directory)!r}: its lock file kept being replaced")
