"""The explorer over HTTP: Starlette routes that parse a request, ask the Explorer, answer.

Each route reads its query parameters (integers, ``i,j`` locations, ``0``/``1`` flags), passes
typed values to :class:`featurelens.explorer.Explorer` and returns JSON or a PNG. Errors:

- the library's (:mod:`featurelens.errors`) become ``{"error": message}`` with the status of
  :data:`ERROR_STATUS`, looked up along the exception's class hierarchy (most specific first);
- what only HTTP knows (a missing or malformed parameter, an unknown static file, a body over
  the limit, a broken multipart form) is raised here as ``HTTPException`` with its status;
- anything else is a JSON 500 without traceback; the traceback goes to the server log.

Security: serves only the files found in its static folder when it started (no path is ever
joined from a request); never writes to the atlas; refuses a request body as soon as it exceeds
the upload limit; with ``allowed_hosts`` refuses requests for any other ``Host``.

Endpoints (all ``GET`` unless said)::

    /                         the page
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

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from featurelens._extras import require_extra

require_extra("serve", "the explorer")

# ruff: noqa: E402 - the web stack is imported once the extra is known to be there
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
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

__all__ = ["ERROR_STATUS", "create_app", "status_of"]

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


def status_of(exc: FeaturelensError) -> int:
    """The HTTP status of a library error: :data:`ERROR_STATUS` of its nearest listed class."""
    return next(ERROR_STATUS[c] for c in type(exc).__mro__ if c in ERROR_STATUS)


class _HostCheck:
    """Refuse requests whose Host header is not one of ``allowed`` (DNS-rebinding guard).

    A page on another site can make a browser resolve its own name to 127.0.0.1 and then read
    a loopback server's answers; checking the Host header stops that, as Jupyter does.
    """

    def __init__(self, app: Any, allowed: Sequence[str]) -> None:
        self.app = app
        self.allowed = {h.lower() for h in allowed}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "").lower()
            name = host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
            if name not in self.allowed:
                response = _json({"error": f"host {host!r} not allowed"}, status=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    **options: Any,
) -> Starlette:
    """The explorer as an ASGI application.

    Parameters
    ----------
    atlas_dir
        An atlas directory written by :func:`featurelens.scan` (or a loaded ``Atlas``). It is
        only read.
    model, data
        The model and dataset the atlas was made from; rebuilt from the atlas manifest when
        None.
    allowed_hosts
        Host names (without port) that requests may carry in their ``Host`` header; None
        accepts any. :func:`serve` passes the loopback names when it binds to loopback.
    **options
        Passed to :class:`featurelens.explorer.Explorer`: ``cache_bytes``,
        ``max_upload_bytes``, ``max_upload_pixels``, ``max_uploads``, ``device``.

    Returns
    -------
    starlette.applications.Starlette
        Serve it with any ASGI server, or use :func:`serve`. ``app.state.explorer`` is the
        :class:`~featurelens.explorer.Explorer` behind it.
    """
    from featurelens.atlas import Atlas

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
        return Response(static["index.html"].read_bytes(), media_type=_STATIC_TYPES[".html"])

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        path = static.get(name)
        if path is None:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(path.read_bytes(), media_type=_STATIC_TYPES[path.suffix])

    async def info(request: Request) -> Response:
        return _json(ex.info())

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
        return _json({"error": str(exc)}, status=status_of(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _json({"error": str(exc.detail)}, status=exc.status_code)

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
    middleware = [] if allowed_hosts is None else [Middleware(_HostCheck, allowed=allowed_hosts)]
    app = Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)
    app.state.explorer = ex
    return app
