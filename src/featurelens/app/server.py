"""Running the explorer: uvicorn in a background thread, and :func:`serve`.

:func:`serve` builds the ASGI application (:func:`featurelens.app.http.create_app`) and runs it
from a thread, so a notebook or a script keeps going; the handle it returns has the URL and
stops the server. Bound to a loopback address, it answers only requests whose ``Host`` header
names a loopback host (the DNS-rebinding guard of :mod:`featurelens.app.http`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from torch import nn

from featurelens.app.http import create_app

__all__ = ["LOOPBACK_NAMES", "ExplorerServer", "serve"]

log = logging.getLogger("featurelens.app")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


class ExplorerServer:
    """A running explorer (uvicorn in a background thread); :func:`serve` makes one.

    Parameters
    ----------
    app
        The ASGI application (:func:`featurelens.app.http.create_app`).
    host, port
        Where to listen; ``port=0`` picks a free port (:attr:`port` says which).
    log_level
        uvicorn's log level.

    Attributes
    ----------
    host, port
        Where it listens.
    app
        The application served.

    Raises
    ------
    OSError
        The address cannot be bound (in use, not local, ...).
    RuntimeError
        The server did not start within 30 s.
    """

    def __init__(self, app: Starlette, host: str, port: int, log_level: str = "warning") -> None:
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self.host = host
        self.port = int(sock.getsockname()[1])
        self.app = app
        config = uvicorn.Config(app, log_level=log_level, lifespan="off")
        self._server = uvicorn.Server(config)
        self._socket = sock
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="featurelens-serve",
            daemon=True,
        )  # fmt: skip
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the explorer did not start on {host}:{self.port}")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        """Where the page is, e.g. ``http://127.0.0.1:8000/``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait up to ``timeout`` seconds for the server thread (idempotent)."""
        self._server.should_exit = True
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._socket.close()

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        finally:
            self.stop()

    @property
    def running(self) -> bool:
        """Whether the server thread is alive."""
        return self._thread.is_alive()

    def __enter__(self) -> ExplorerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ExplorerServer(url={self.url!r}, running={self.running})"

    def _repr_html_(self) -> str:
        return f'<a href="{self.url}" target="_blank">featurelens explorer at {self.url}</a>'


def serve(
    atlas_dir: str | os.PathLike[str] | Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    model: nn.Module | None = None,
    data: Any = None,
    allowed_hosts: Sequence[str] | None = None,
    log_level: str = "warning",
    **options: Any,
) -> ExplorerServer:
    """Serve the explorer on ``host:port`` from a background thread.

    Returns at once with a handle: ``server.url``, ``server.stop()``, ``server.wait()``; usable
    as a context manager. ``port=0`` picks a free port. The explorer has no authentication:
    binding to anything but a loopback address exposes the model and data to the network.
    On a loopback address only requests for ``127.0.0.1``, ``localhost`` or ``[::1]`` are
    answered (``allowed_hosts`` overrides this), which defeats DNS rebinding.

    Parameters
    ----------
    atlas_dir
        An atlas directory (or a loaded ``Atlas``); only read.
    host, port
        Where to listen.
    model, data
        The atlas's model and dataset; rebuilt from the manifest when None.
    allowed_hosts
        Host names requests may carry in their ``Host`` header; default: the loopback names on
        a loopback address, any host otherwise.
    log_level
        uvicorn's log level.
    **options
        Passed to :class:`featurelens.explorer.Explorer`: ``cache_bytes``,
        ``max_upload_bytes``, ``max_upload_pixels``, ``max_uploads``, ``device``.

    Returns
    -------
    ExplorerServer
        The running server.

    Examples
    --------
    >>> server = featurelens.serve("atlas/", port=0)   # doctest: +SKIP
    >>> server.url                                     # doctest: +SKIP
    'http://127.0.0.1:40123/'
    >>> server.stop()                                  # doctest: +SKIP
    """
    if not _is_loopback(host):
        log.warning("serving on %s: anyone who can reach this address can use the explorer", host)
    elif allowed_hosts is None:
        allowed_hosts = (*LOOPBACK_NAMES, f"[{host}]" if ":" in host else host)
    app = create_app(atlas_dir, model=model, data=data, allowed_hosts=allowed_hosts, **options)
    return ExplorerServer(app, host, port, log_level=log_level)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
