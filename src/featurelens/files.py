"""Atomic file writes: readers see the old file or the new one, never a partial one.

Every file featurelens writes into a folder that someone may be reading (an atlas, a report)
goes through :func:`atomic_write`. Imports nothing of featurelens.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["atomic_write"]


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
