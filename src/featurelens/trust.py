"""Which atlases this user made on this machine: a per-user secret and a store of signatures.

An atlas can name code that featurelens runs to rebuild its model and data (a
``file.py:factory`` spec, a module). :mod:`featurelens.atlas` decides whether that may run; an
atlas made by this user on this machine may, and this module is how it is told: when an atlas
is saved by a scan of this user, the HMAC-SHA256 of its code-bearing parts under a per-user
secret is recorded in the user's store, as Jupyter records the signatures of trusted notebooks.
Opening it later recomputes the HMAC and looks it up. An atlas from elsewhere (or one whose
code-bearing parts changed) is not in the store, and needs consent.

Where (:func:`home`)::

    $FEATURELENS_HOME, else $XDG_CONFIG_HOME/featurelens, else ~/.config/featurelens
        secret            64 hex digits (32 random bytes), mode 0600, made on first signature
        trusted/<hmac>    one small file per signed atlas (its path and when), for auditing

The atlas itself is not modified: its bytes stay reproducible and shareable, and copying it
elsewhere carries no trust. Deleting ``trusted/`` (or the secret) withdraws every signature.

Imports nothing of featurelens but :mod:`featurelens.files`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
from datetime import datetime
from pathlib import Path

from featurelens.files import atomic_write

__all__ = ["home", "is_signed", "sign"]

SECRET = "secret"
TRUSTED = "trusted"


def home() -> Path:
    """Featurelens' per-user configuration directory (see the module docstring)."""
    explicit = os.environ.get("FEATURELENS_HOME")
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME")
    base = Path(config).expanduser() if config else Path.home() / ".config"
    return base / "featurelens"


def _read_secret(path: Path) -> bytes:
    """The secret in ``path``; refused when others may read or write it."""
    info = os.stat(path)
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077 or (hasattr(os, "getuid") and info.st_uid != os.getuid()):
        raise PermissionError(
            f"the featurelens secret {str(path)!r} has mode {mode:o} or another owner; it must "
            "be the user's own and readable by nobody else (chmod 600), or signatures made "
            "with it prove nothing"
        )
    text = path.read_text(encoding="ascii").strip()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise PermissionError(f"the featurelens secret {str(path)!r} is not 64 hex digits")
    return bytes.fromhex(text)


def _secret(create: bool) -> bytes | None:
    """The per-user secret; made (mode 0600) when ``create`` and there is none."""
    path = home() / SECRET
    if path.exists():
        return _read_secret(path)
    if not create:
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{SECRET}-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)  # never replaces a secret another process made meanwhile
    finally:
        tmp.unlink(missing_ok=True)
    return _read_secret(path)


def _digest(secret: bytes, payload: bytes) -> str:
    return hmac.new(secret, payload, hashlib.sha256).hexdigest()


def is_signed(payload: bytes) -> bool:
    """Whether this user signed ``payload`` on this machine (:func:`sign`).

    Parameters
    ----------
    payload
        The code-bearing parts of an atlas, as :mod:`featurelens.atlas` serialises them.

    Returns
    -------
    bool
        False also when there is no secret yet.

    Raises
    ------
    PermissionError
        The secret is readable by others (the message says how to fix it).
    """
    secret = _secret(create=False)
    if secret is None:
        return False
    return (home() / TRUSTED / _digest(secret, payload)).is_file()


def sign(payload: bytes, note: dict[str, str]) -> Path:
    """Record that this user made the atlas whose code-bearing parts are ``payload``.

    Parameters
    ----------
    payload
        As for :func:`is_signed`.
    note
        What to write into the record for a human reading the store (the atlas's path).

    Returns
    -------
    Path
        The record, ``trusted/<hmac>``.

    Raises
    ------
    OSError
        The store cannot be written (the caller warns: the atlas is then not trusted later).
    """
    secret = _secret(create=True)
    assert secret is not None  # made above
    path = home() / TRUSTED / _digest(secret, payload)
    if not path.is_file():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = {**note, "signed": datetime.now().astimezone().isoformat(timespec="seconds")}
        atomic_write(path, (json.dumps(record, indent=2) + "\n").encode())
    return path
