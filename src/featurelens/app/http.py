"""The explorer over HTTP: Starlette routes that parse a request, ask the Explorer, answer.

Each route reads its query parameters (integers, ``i,j`` locations, ``0``/``1`` flags), passes
typed values to :class:`featurelens.explorer.Explorer` and returns JSON or a PNG. Errors:

- the library's (:mod:`featurelens.errors`) become ``{"error": message}`` with the status of
  :data:`ERROR_STATUS`, looked up along the exception's class hierarchy (most specific first);
- what only HTTP knows (a missing or malformed parameter, an unknown static file, a body over
  the limit, a broken multipart form) is raised here as ``HTTPException`` with its status;
- anything else is a JSON 500 without traceback; the traceback goes to the server log.

Error messages are scrubbed before they leave (:func:`scrub`): object reprs lose their
addresses, absolute filesystem paths that the request did not contain are cut to their last
component.

Security (docs/explorer.md, "Who can use it"), in the order the checks run:

1. **Host**: requests whose ``Host`` header is not in ``allowed_hosts`` get a 400 (the
   DNS-rebinding guard: a page whose name resolves to this machine cannot read the answers).
2. **Origin** (:func:`refusal`), for every request but the page ``/`` and its files
   ``/static/`` (so for all of ``/api/``): an ``Origin`` header must name this server; a
   ``Sec-Fetch-Site`` header must be ``same-origin`` (or ``none``, a person typing the address,
   for GET); a request without ``Sec-Fetch-Site`` (a program, or a browser that sends no fetch
   metadata, as browsers do over plain HTTP to another machine) must carry the header
   :data:`CLIENT_HEADER`, which a page of another origin cannot send without a CORS preflight
   that this server never grants. The page sends that header on every request.
3. **Token**, when the app has one: every request but ``/static/`` must present it (query
   ``token=``, the cookie the page gets on ``/?token=``, or ``Authorization: token ...``).
   ``/static/`` files are the package's own and need nothing.

Every answer carries :data:`SECURITY_HEADERS` (a CSP without inline script, ``nosniff``, no
referrer, no framing). Serves only the files found in its static folder when it started (no
path is ever joined from a request); never writes to the atlas; refuses a request body as soon
as it exceeds the upload limit.

Endpoints (all ``GET`` unless said)::

    /                         the page (with ?token=TOKEN: also sets the token cookie)
    /static/NAME              index.html, app.js, style.css
    /api/info                 model, data, layers (channels, receptive field), methods, styles
    /api/top                  ?layer&channel             the channel's top hits in the atlas
    /api/input.png            ?input                     the input, denormalised
    POST /api/inputs          [?invert=1] raw PNG/JPEG body or multipart form with one file
                              -> {"input": "upload:ID", "width", "height"}
    /api/activations          ?input&layer&scale         sprite layout and per-channel stats
    /api/activations.png      ?input&layer&scale         every channel's map in one sprite
    /api/unit                 ?input&layer&channel[&location]  location, value, receptive field
    /api/rf                   ?layer&location            receptive field of one location
    /api/projection.png       ?input&layer&channel&method&style[&location]
    /api/zf.png               ?layer&channel&method&style&k

Inputs are named ``dataset:INDEX`` or ``upload:ID`` (``ID`` as returned by ``POST /api/inputs``).
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from featurelens._extras import require_extra

require_extra("serve", "the explorer")

# ruff: noqa: E402 - the web stack is imported once the extra is known to be there
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, QueryParams
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request, cookie_parser
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import nn

from featurelens.errors import (
    ChannelError,
    FeaturelensError,
    FormatError,
    LayerError,
    LimitError,
    NotFoundError,
    UsageError,
)
from featurelens.explorer import Explorer, parse_int

__all__ = [
    "CLIENT_HEADER",
    "ERROR_STATUS",
    "LOOPBACK_NAMES",
    "SECURITY_HEADERS",
    "TOKEN_COOKIE",
    "check_token",
    "create_app",
    "refusal",
    "scrub",
    "status_of",
]

log = logging.getLogger("featurelens.app")

STATIC_DIR = Path(__file__).parent / "static"
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png"}  # fmt: skip

# Library error -> HTTP status. A class not listed takes the status of its nearest listed base.
ERROR_STATUS: dict[type[FeaturelensError], int] = {
    FeaturelensError: 422,  # what this model, data or atlas cannot do (AtlasError, DataError,
    # ActivationError, ReceptiveFieldError, ...): the request was well-formed
    UsageError: 400,  # a value that is not valid (unknown method, wrong number of coordinates)
    LayerError: 404,  # a layer the atlas does not have
    ChannelError: 404,  # a channel the layer does not have
    NotFoundError: 404,  # a dataset index, upload or location that is not there
    LimitError: 413,  # an upload over the byte or pixel limit
    FormatError: 415,  # an upload that is not a readable PNG or JPEG
}


#: Host names a loopback server answers to (the default of ``allowed_hosts``).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")

#: The header that programs (and the page) send on API requests: a page of another origin
#: cannot add it without a CORS preflight, and this server grants none. Any non-empty value.
CLIENT_HEADER = "X-Featurelens"

#: Name (and prefix: ``featurelens-token-PORT``) of the cookie that carries the access token.
TOKEN_COOKIE = "featurelens-token"

#: Headers on every answer. The page has no inline script or style; images it draws are
#: fetched and shown from ``blob:`` URLs; ``data:`` is the empty favicon.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; object-src 'none'; "
    "img-src 'self' blob: data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers without CSP level 2
    "Cross-Origin-Resource-Policy": "same-origin",  # no answer is handed to another origin
    "Cross-Origin-Opener-Policy": "same-origin",
}


def status_of(exc: FeaturelensError) -> int:
    """The HTTP status of a library error: :data:`ERROR_STATUS` of its nearest listed class."""
    return next(ERROR_STATUS[c] for c in type(exc).__mro__ if c in ERROR_STATUS)


# --------------------------------------------------------------------------------------------
# Who may ask: security headers, the Host check, the origin rule and the token


def refusal(
    method: str,
    path: str,
    headers: Mapping[str, str],
    token: str | None = None,
    presented: Collection[str] = (),
) -> str | None:
    """Why a request must be refused (403), or None: the origin rule and the token.

    Parameters
    ----------
    method, path
        The request's method and path: the origin rule covers every path but the page ``/``
        and its files ``/static/...``, the token every path but ``/static/...``.
    headers
        The request's headers, looked up by lower-case name (Starlette's ``Headers`` or a dict
        with lower-case keys).
    token
        The access token this server requires (on every path but ``/static/``); None: none.
    presented
        The tokens the request carries (query, cookie, ``Authorization``).

    Returns
    -------
    str or None
        The message of the 403, or None when the request may proceed.

    Notes
    -----
    An ``/api/`` request (any path but ``/`` and ``/static/...``) proceeds only if all of these
    hold:

    - its ``Origin`` header, when present, is this server (scheme aside, its host and port are
      those of the ``Host`` header; ``null`` never is);
    - its ``Sec-Fetch-Site`` header, when present, is ``same-origin``, or ``none`` for a GET or
      HEAD (an address typed or bookmarked). ``same-site`` is refused: a page on another port
      of the same machine is another origin;
    - without ``Sec-Fetch-Site``, it carries :data:`CLIENT_HEADER`. Programs add it. Browsers
      send ``Sec-Fetch-Site`` to loopback and HTTPS servers; over plain HTTP to another
      machine they send none, and there the header the page adds is what lets it through.
    """
    found = _refusal(method, path, headers, token, presented)
    return None if found is None else found[1]


def _refusal(
    method: str,
    path: str,
    headers: Mapping[str, str],
    token: str | None,
    presented: Collection[str],
) -> tuple[str, str] | None:
    """:func:`refusal`, with the reason it counts under: ``origin`` or ``token``."""
    static = path.startswith("/static/")
    if path != "/" and not static:  # the API, and any path that is neither page nor file
        origin = headers.get("origin")
        if origin is not None and not _same_origin(origin, headers.get("host", "")):
            return "origin", (
                f"cross-origin request refused: it comes from {origin!r}, not from this server's "
                "page; open the explorer itself"
            )
        site = headers.get("sec-fetch-site")
        if site is not None:
            if not (site == "same-origin" or (site == "none" and method in ("GET", "HEAD"))):
                return "origin", (
                    f"cross-site request refused (Sec-Fetch-Site: {site}): only the explorer's "
                    "own page may use the API"
                )
        elif not headers.get(CLIENT_HEADER.lower()):
            return "origin", (
                f"API requests must carry the header '{CLIENT_HEADER}: 1' (the explorer's page "
                "sends it; add it to requests from programs)"
            )
    needs_token = token is not None and not static
    if needs_token and not any(_equal(t, token) for t in presented):  # type: ignore[arg-type]
        return "token", (
            "this explorer needs its access token: open the URL that `featurelens serve` "
            "printed (http://HOST:PORT/?token=...), or send ?token=, the cookie it sets, or "
            "'Authorization: token TOKEN'"
        )
    return None


def _equal(a: str, b: str) -> bool:
    """``a == b`` in time independent of where they differ (tokens)."""
    return hmac.compare_digest(a.encode(), b.encode())


def _same_origin(origin: str, host: str) -> bool:
    """Whether ``origin`` (``scheme://host[:port]``) names the server addressed as ``host``."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower() != ""


def _presented_tokens(headers: Headers, query: str) -> list[str]:
    """The tokens a request carries: ``?token=``, token cookies, ``Authorization: token ...``."""
    found = QueryParams(query).getlist("token")
    cookies = cookie_parser(headers.get("cookie", ""))
    found += [
        v for k, v in cookies.items() if k == TOKEN_COOKIE or k.startswith(TOKEN_COOKIE + "-")
    ]
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() in ("token", "bearer"):
        found.append(value.strip())
    return [t for t in found if t]


class _SecurityHeaders:
    """Add :data:`SECURITY_HEADERS` to every answer, errors and refusals included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.headers if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _HostCheck:
    """Refuse requests whose Host header is not one of ``allowed`` (DNS-rebinding guard).

    A page on another site can make a browser resolve its own name to 127.0.0.1 and then read
    a loopback server's answers; checking the Host header stops that, as Jupyter does.
    """

    def __init__(self, app: ASGIApp, allowed: Sequence[str], refusals: Counter[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed}
        self.refusals = refusals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "").lower()
            name = host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
            if name not in self.allowed:
                self.refusals["host"] += 1
                response = _json({"error": f"host {scrub(host)!r} not allowed"}, status=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Guard:
    """Refuse (403) what :func:`refusal` refuses, before any body is read or work is done."""

    def __init__(self, app: ASGIApp, token: str | None, refusals: Counter[str]) -> None:
        self.app = app
        self.token = token
        self.refusals = refusals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            presented = _presented_tokens(headers, scope.get("query_string", b"").decode("latin-1"))
            found = _refusal(scope["method"], scope["path"], headers, self.token, presented)
            if found is not None:
                reason, why = found
                self.refusals[reason] += 1
                if scope["path"] == "/":  # a person opening the page reads this
                    response: Response = Response(
                        why + "\n", 403, media_type="text/plain; charset=utf-8"
                    )
                else:
                    response = _json({"error": why}, status=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _ExplorerApp(Starlette):
    """Starlette with :class:`_SecurityHeaders` outside everything, the 500 handler included."""

    def build_middleware_stack(self) -> ASGIApp:
        return _SecurityHeaders(super().build_middleware_stack())


# --------------------------------------------------------------------------------------------
# Scrubbing error messages

_REPR = re.compile(r"<([^<>]*?) at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
_DOTTED = re.compile(r"\b(?:\w+\.)+(\w+)")
# An absolute path: /a/b... (POSIX) or C:\a\b... (Windows), not inside a word or a relative
# path or a URL; it ends at white space, quotes, brackets, ',', ';' or ':' (a spec's
# ':factory').
_PATH = re.compile(r"(?<![\w.~/\\:-])(?:[A-Za-z]:)?[/\\][^\s'\"`<>|:;,()\[\]{}]*")


def scrub(message: str, sent: str = "") -> str:
    """``message`` without object reprs, addresses, or absolute paths that ``sent`` lacks.

    ``<featurelens.x.Thing object at 0x7f3a...>`` becomes ``<Thing object>``, a bare address
    ``0x...``, and an absolute path such as ``/home/me/nets/model.py`` becomes
    ``.../model.py``, unless it occurs in ``sent`` (what the client sent: its path and query,
    decoded). The explorer's own routes (``/api/...``, ``/static/...``) are kept.

    Parameters
    ----------
    message
        The text of an error answer.
    sent
        The request's path and query string, decoded.

    Returns
    -------
    str
        The text to send.
    """

    def repr_(match: re.Match[str]) -> str:
        return "<" + _DOTTED.sub(r"\1", match[1]) + ">"

    def path(match: re.Match[str]) -> str:
        text = match[0]
        if len(text) < 2 or text in sent or text.startswith(("/api/", "/static/")):
            return text
        last = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        return ".../" + last if last else "..."

    message = _REPR.sub(repr_, message)
    message = _ADDRESS.sub("0x...", message)
    return _PATH.sub(path, message)


# --------------------------------------------------------------------------------------------
# Answers and request parsing


def _finite(data: Any) -> Any:
    """``data`` with NaN and infinities as None: JSON has no such numbers."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(_finite(data), status_code=status, headers={"Cache-Control": "no-store"})


def _png_response(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


def _param(request: Request, name: str) -> str | None:
    """A query parameter; absent and empty are the same (None)."""
    return request.query_params.get(name) or None


def _int_param(request: Request, name: str) -> int:
    """A required integer parameter (400 when missing or malformed)."""
    try:
        return parse_int(_param(request, name), name)
    except UsageError as exc:
        raise HTTPException(400, str(exc)) from None


def _location_param(request: Request) -> tuple[int, ...] | None:
    """``location=i,j`` as integers; None when absent. The explorer checks it against the map."""
    text = _param(request, "location")
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise HTTPException(400, f"location {text!r} is not comma-separated integers") from None


async def _read_limited(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise HTTPException(400, f"bad Content-Length {length!r}") from None
        if declared > limit:
            raise HTTPException(413, f"upload of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"upload exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _upload_bytes(request: Request, limit: int) -> bytes:
    """The image bytes of a raw or multipart upload."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return await _read_limited(request, limit)
    body = await _read_limited(request, limit + 64 * 1024)  # room for the multipart framing
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    except HTTPException as exc:
        raise HTTPException(400, f"malformed multipart upload: {exc.detail}") from None
    except Exception as exc:  # the multipart parser raises several types on garbage
        raise HTTPException(400, f"malformed multipart upload ({type(exc).__name__})") from None
    try:
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise HTTPException(400, "multipart upload without a file field")
        return await files[0].read()
    finally:
        await form.close()


# --------------------------------------------------------------------------------------------
# The application


def create_app(
    atlas_dir: str | os.PathLike[str] | Any,
    model: nn.Module | None = None,
    data: Any = None,
    *,
    allowed_hosts: Sequence[str] | None = None,
    token: str | None = None,
    **options: Any,
) -> Starlette:
    """The explorer as an ASGI application.

    Requests are checked as the module docstring says: ``Host`` against ``allowed_hosts``,
    the origin rule on ``/api/`` (:func:`refusal`), the token when there is one. A client
    other than the page sends :data:`CLIENT_HEADER` (and the token), for example
    ``TestClient(app, base_url="http://127.0.0.1", headers={"X-Featurelens": "1"})``.

    Parameters
    ----------
    atlas_dir
        An atlas directory written by :func:`featurelens.scan` (or a loaded ``Atlas``). It is
        only read.
    model, data
        The model and dataset the atlas was made from; rebuilt from the atlas manifest when
        None.
    allowed_hosts
        Host names (without port; IPv6 addresses in brackets) that requests may carry in their
        ``Host`` header; None: :data:`LOOPBACK_NAMES`. There is no "any host": behind a proxy,
        list the names it forwards. :func:`serve` adds the machine's own names and addresses
        when it binds to anything but loopback.
    token
        The access token every request but ``/static/`` must present; None: none.
        At least 16 characters of ``A-Z a-z 0-9 - _ . ~`` (it goes in a URL and a cookie).
    **options
        Passed to :class:`featurelens.explorer.Explorer`: ``cache_bytes``,
        ``max_upload_bytes``, ``max_upload_pixels``, ``max_uploads``, ``decode_slots``,
        ``device``.

    Returns
    -------
    starlette.applications.Starlette
        Serve it with any ASGI server, or use :func:`serve`. ``app.state.explorer`` is the
        :class:`~featurelens.explorer.Explorer` behind it; ``app.state.refusals`` counts the
        requests refused, by reason (``host``, ``origin``, ``token``).

    Raises
    ------
    UsageError
        A token too short or with other characters.
    """
    from featurelens.atlas import Atlas

    if token is not None:
        check_token(token)
    hosts = LOOPBACK_NAMES if allowed_hosts is None else tuple(allowed_hosts)

    atlas = atlas_dir if isinstance(atlas_dir, Atlas) else Atlas.load(atlas_dir)
    ex = Explorer(atlas, model, data, **options)
    # Only the files present now are served: no request path is ever joined to a directory.
    static = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in _STATIC_TYPES}

    # Parameters are validated in the order they are listed in the module docstring, cheap
    # checks here on the event loop, model work in the thread pool.
    def layer_of(request: Request) -> str:
        name = _param(request, "layer")
        if name is None:
            raise HTTPException(400, "missing parameter 'layer'; layers: " + ", ".join(ex.layers))
        return ex.check_layer(name)

    def channel_of(request: Request, layer: str) -> int:
        return ex.check_channel(layer, _int_param(request, "channel"))

    def input_of(request: Request) -> Any:
        name = _param(request, "input")
        if name is None:
            raise HTTPException(400, "missing parameter 'input' (dataset:INDEX or upload:ID)")
        return ex.input_ref(name)

    async def index(request: Request) -> Response:
        # The guard let this through, so a token, if required, was presented; the page keeps
        # it in a cookie that only this origin's requests carry (JavaScript cannot read it).
        page = Response(
            static["index.html"].read_bytes(), media_type=_STATIC_TYPES[".html"],
            headers={"Cache-Control": "no-store"},
        )  # fmt: skip
        sent = request.query_params.get("token")
        if token is not None and sent is not None and _equal(sent, token):
            port = request.url.port or (443 if request.url.scheme == "https" else 80)
            page.set_cookie(
                f"{TOKEN_COOKIE}-{port}", token, httponly=True, samesite="strict", path="/"
            )
        return page

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        path = static.get(name)
        if path is None:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(path.read_bytes(), media_type=_STATIC_TYPES[path.suffix])

    async def info(request: Request) -> Response:
        answer = ex.info()
        for layer in answer["layers"]:  # messages of torch.fx may name source files
            if layer["rf_error"] is not None:
                layer["rf_error"] = scrub(layer["rf_error"])
        return _json(answer)

    async def top(request: Request) -> Response:
        layer = layer_of(request)
        channel = channel_of(request, layer)
        return _json({"layer": layer, "channel": channel, "hits": ex.top(layer, channel)})

    async def input_png(request: Request) -> Response:
        ref = input_of(request)
        return _png_response(await run_in_threadpool(ex.input_png, ref))

    async def upload(request: Request) -> Response:
        invert = _param(request, "invert") or "0"
        if invert not in ("0", "1"):
            raise HTTPException(400, f"invert={invert!r}: use 0 or 1")
        raw = await _upload_bytes(request, ex.max_upload_bytes)
        return _json(await run_in_threadpool(ex.add_upload, raw, invert == "1"), status=201)

    async def activations(request: Request) -> Response:
        ref, layer = input_of(request), layer_of(request)
        scale = ex.check_scale(_param(request, "scale"))
        return _json(await run_in_threadpool(ex.activation_layout, ref, layer, scale))

    async def activations_png(request: Request) -> Response:
        ref, layer = input_of(request), layer_of(request)
        scale = ex.check_scale(_param(request, "scale"))
        return _png_response(await run_in_threadpool(ex.activation_png, ref, layer, scale))

    async def unit(request: Request) -> Response:
        ref, layer = input_of(request), layer_of(request)
        channel = channel_of(request, layer)
        location = _location_param(request)
        return _json(await run_in_threadpool(ex.unit, ref, layer, channel, location))

    async def rf(request: Request) -> Response:
        layer = layer_of(request)
        ex.check_field(layer)
        location = _location_param(request)
        if location is None:
            raise HTTPException(400, "missing parameter 'location' (comma-separated integers)")
        return _json({"layer": layer, **ex.rf(layer, location)})

    async def projection(request: Request) -> Response:
        ref, layer = input_of(request), layer_of(request)
        channel = channel_of(request, layer)
        method = ex.check_method(_param(request, "method"))
        style = ex.check_style(_param(request, "style"))
        location = _location_param(request)
        png = await run_in_threadpool(
            ex.projection_png, ref, layer, channel, location, method, style
        )
        return _png_response(png)

    async def zf(request: Request) -> Response:
        layer = layer_of(request)
        channel = channel_of(request, layer)
        method = ex.check_method(_param(request, "method"))
        style = ex.check_style(_param(request, "style"))
        k = None if _param(request, "k") is None else _int_param(request, "k")
        k = ex.check_k(layer, channel, k)
        return _png_response(await run_in_threadpool(ex.zf_png, layer, channel, method, style, k))

    async def library_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, FeaturelensError)
        return _json({"error": scrub(str(exc), _sent(request))}, status=status_of(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = scrub(str(exc.detail), _sent(request))
        return _json({"error": message}, status=exc.status_code)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return _json({"error": f"internal error ({type(exc).__name__}); see the server log"}, 500)

    routes = [
        Route("/", index),
        Route("/static/{name}", static_file),
        Route("/api/info", info),
        Route("/api/top", top),
        Route("/api/input.png", input_png),
        Route("/api/inputs", upload, methods=["POST"]),
        Route("/api/activations", activations),
        Route("/api/activations.png", activations_png),
        Route("/api/unit", unit),
        Route("/api/rf", rf),
        Route("/api/projection.png", projection),
        Route("/api/zf.png", zf),
    ]
    handlers: dict[Any, Callable] = {
        FeaturelensError: library_error,
        HTTPException: http_error,
        Exception: unexpected,
    }
    refusals: Counter[str] = Counter()
    middleware = [
        Middleware(_HostCheck, allowed=hosts, refusals=refusals),  # first: reveal nothing
        Middleware(_Guard, token=token, refusals=refusals),
    ]
    app = _ExplorerApp(routes=routes, exception_handlers=handlers, middleware=middleware)
    app.state.explorer = ex
    app.state.refusals = refusals
    return app


_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,}")


def check_token(token: str) -> str:
    """``token`` if it can serve as an access token; :class:`UsageError` saying why if not.

    Raises
    ------
    UsageError
        Not a string of at least 16 characters of ``A-Z a-z 0-9 - _ . ~``.
    """
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        shown = f"{len(token)} characters" if isinstance(token, str) else repr(type(token))
        raise UsageError(
            f"an access token must be at least 16 characters of A-Z a-z 0-9 - _ . ~, got "
            f"{shown}; leave it out to get a random one"
        )
    return token


def _sent(request: Request) -> str:
    """What the client sent that a message may quote: its path and query, decoded."""
    return unquote_plus(request.url.path + "?" + request.url.query)
