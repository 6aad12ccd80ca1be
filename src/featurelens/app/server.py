"""Running the explorer: uvicorn in a background thread, and :func:`serve`.

:func:`serve` builds the ASGI application (:func:`featurelens.app.http.create_app`) and runs it
from a thread, so a notebook or a script keeps going; the handle it returns has the URL and
stops the server.

Who can use it depends on the address it binds to:

- a loopback address (the default, ``127.0.0.1``): requests must name a loopback host in their
  ``Host`` header (the DNS-rebinding guard); no token unless asked for (``token=True``);
- anything else (``0.0.0.0``, a LAN address): requests must name this machine (its host name,
  fully qualified name or one of its addresses, :func:`machine_hosts`) or a name given in
  ``allow_hosts``, and present an access token, random unless given, which ``server.url``
  carries as Jupyter's does (``http://HOST:PORT/?token=...``).

In both cases the origin rule of :func:`featurelens.app.http.refusal` holds: only the
explorer's own page (or a program sending ``X-Featurelens: 1``) may use the API.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from torch import nn

from featurelens.app.http import LOOPBACK_NAMES, check_token, create_app
from featurelens.errors import UsageError

__all__ = ["LOOPBACK_NAMES", "ExplorerServer", "is_loopback", "machine_hosts", "serve"]

log = logging.getLogger("featurelens.app")


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
    token
        The app's access token, if it has one: :attr:`url` carries it.

    Attributes
    ----------
    host, port
        Where it listens.
    app
        The application served.
    token
        The access token, or None.

    Raises
    ------
    OSError
        The address cannot be bound (in use, not local, ...).
    RuntimeError
        The server did not start within 30 s.
    """

    def __init__(
        self,
        app: Starlette,
        host: str,
        port: int,
        log_level: str = "warning",
        token: str | None = None,
    ) -> None:
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
        self.token = token
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
    def base_url(self) -> str:
        """The server's root, e.g. ``http://127.0.0.1:8000/``; for ``0.0.0.0`` or ``::``, the
        machine's host name stands for the address.
        """
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    @property
    def url(self) -> str:
        """The page to open: :attr:`base_url`, with ``?token=...`` when a token is required."""
        return self.base_url + ("" if self.token is None else f"?token={self.token}")

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
    allow_hosts: Sequence[str] = (),
    token: str | bool | None = None,
    log_level: str = "warning",
    **options: Any,
) -> ExplorerServer:
    """Serve the explorer on ``host:port`` from a background thread.

    Returns at once with a handle: ``server.url``, ``server.stop()``, ``server.wait()``; usable
    as a context manager. ``port=0`` picks a free port.

    On a loopback address only requests for ``127.0.0.1``, ``localhost`` or ``[::1]`` are
    answered (which defeats DNS rebinding), without a token unless ``token`` asks for one.
    On any other address, requests must name this machine (:func:`machine_hosts`) or one of
    ``allow_hosts``, and carry the access token: ``server.url`` is the link to open
    (``http://HOST:PORT/?token=...``); the page keeps the token in a cookie.

    Parameters
    ----------
    atlas_dir
        An atlas directory (or a loaded ``Atlas``); only read.
    host, port
        Where to listen.
    model, data
        The atlas's model and dataset; rebuilt from the manifest when None.
    allow_hosts
        Host names (or addresses; IPv6 in brackets) that requests may carry in their ``Host``
        header besides the defaults: a name this machine is reached by that it does not know
        itself (a DNS alias, a proxy's name).
    token
        The access token: None, required (random) unless ``host`` is loopback; True, a random
        one in any case; a string (16 or more of ``A-Z a-z 0-9 - _ . ~``), that one; False,
        none, which only a loopback address allows.
    log_level
        uvicorn's log level.
    **options
        Passed to :class:`featurelens.explorer.Explorer`: ``cache_bytes``,
        ``max_upload_bytes``, ``max_upload_pixels``, ``max_uploads``, ``decode_slots``,
        ``device``.

    Returns
    -------
    ExplorerServer
        The running server (``server.token`` is the token, or None).

    Raises
    ------
    UsageError
        ``token=False`` on an address that is not loopback, or a token that is too weak.

    Examples
    --------
    >>> server = featurelens.serve("atlas/", port=0)   # doctest: +SKIP
    >>> server.url                                     # doctest: +SKIP
    'http://127.0.0.1:40123/'
    >>> server.stop()                                  # doctest: +SKIP
    """
    loopback = is_loopback(host)
    if token is False and not loopback:
        raise UsageError(
            f"an explorer on {host!r} (not a loopback address) needs an access token: leave "
            "token out to get a random one, or serve on 127.0.0.1"
        )
    if token is True or (token is None and not loopback):
        token = secrets.token_urlsafe(32)
    token = check_token(token) if isinstance(token, str) else None
    own = (*LOOPBACK_NAMES, _host_name(host)) if loopback else machine_hosts(host)
    hosts = tuple(dict.fromkeys([*own, *(h.lower() for h in allow_hosts)]))
    if not loopback:
        log.warning(
            "serving on %s: anyone who can reach it and has the token can use the explorer; "
            "Host names answered: %s",
            host,
            ", ".join(hosts),
        )
    app = create_app(atlas_dir, model=model, data=data, allowed_hosts=hosts, token=token, **options)
    return ExplorerServer(app, host, port, log_level=log_level, token=token)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address to bind) is ``localhost`` or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def machine_hosts(bind: str = "0.0.0.0") -> tuple[str, ...]:
    """The names a request to this machine may carry in its ``Host`` header, lower case.

    The loopback names, the host name and fully qualified name, every address they resolve to,
    the addresses of the network interfaces (Linux: from the kernel; elsewhere the one that
    routes outwards) and ``bind`` itself when it is a specific address. IPv6 addresses are in
    brackets, as in a URL. Only the standard library is used; a name this finds nothing for
    can be added with ``allow_hosts`` (``--allow-host``).

    Parameters
    ----------
    bind
        The address the server binds to.

    Returns
    -------
    tuple of str
        The names, loopback names first, without duplicates.
    """
    names: list[str] = [*LOOPBACK_NAMES]
    hostname = socket.gethostname()
    fqdn = socket.getfqdn()
    names += [hostname, fqdn]
    addresses: list[str] = []
    for name in (hostname, fqdn):
        with contextlib.suppress(OSError):  # a name that does not resolve
            addresses += [str(info[4][0]) for info in socket.getaddrinfo(name, None)]
    addresses += _interface_addresses()
    if bind not in ("0.0.0.0", "::", ""):
        addresses.append(bind)
    names += [_host_name(a.split("%")[0]) for a in addresses]  # no IPv6 zone: not in URLs
    return tuple(dict.fromkeys(n.lower() for n in names if n))


def _host_name(address: str) -> str:
    """``address`` as a ``Host`` header names it: IPv6 in brackets."""
    return f"[{address}]" if ":" in address else address


def _interface_addresses() -> list[str]:
    """Addresses of this machine's network interfaces, as far as the standard library tells."""
    found: list[str] = []
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:  # the address that routes outwards; connecting a UDP socket sends nothing
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                found.append(str(s.getsockname()[0]))
        except OSError:
            pass
    if sys.platform.startswith("linux"):
        found += _linux_interface_addresses()
    return found


def _linux_interface_addresses() -> list[str]:
    """IPv4 addresses by ``SIOCGIFADDR`` on each interface, IPv6 from /proc/net/if_inet6."""
    import fcntl

    found: list[str] = []
    try:
        interfaces = [name for _, name in socket.if_nameindex()]
    except OSError:
        interfaces = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in interfaces:
            try:
                request = struct.pack("256s", name[:15].encode())
                answer = fcntl.ioctl(s.fileno(), 0x8915, request)  # SIOCGIFADDR
                found.append(socket.inet_ntoa(answer[20:24]))
            except OSError:
                pass  # an interface without an IPv4 address
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as lines:
            for line in lines:
                raw = bytes.fromhex(line.split()[0])
                found.append(str(ipaddress.IPv6Address(raw)))
    except (OSError, ValueError):
        pass
    return found
