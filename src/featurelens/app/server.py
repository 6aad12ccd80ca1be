"""The explorer's server: a thin JSON/PNG API over featurelens, and the page that drives it.

Every endpoint validates its parameters against the atlas (layers, channels, dataset size), calls
one library function and returns JSON or a PNG. Results that cost a forward or backward pass
(activations, projections, Zeiler-Fergus grids) are kept in a bounded LRU cache per input and
unit. :func:`featurelens.graph.capture` and the projection rules install hooks on the *shared*
model, so every use of the model holds one lock: concurrent requests are served one model call
at a time, and the model never sees two sets of hooks.

Security: binds to 127.0.0.1 unless told otherwise; serves only the files found in its static
folder when it started (no path is ever joined from a request); never writes to the atlas;
uploads are limited in bytes and pixels and must decode as PNG or JPEG; bad requests get a 4xx
with a JSON ``{"error": ...}`` body, unexpected failures a JSON 500 without traceback.

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

import hashlib
import io
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from torch import nn

from featurelens.data import split_example
from featurelens.errors import DataError
from featurelens.figures import layer_field, model_dtype
from featurelens.graph import LayerError, TraceError, capture, model_device, preserved
from featurelens.receptive_field import NotAlignedError, ReceptiveField, UnsupportedOpError
from featurelens.unit import argmax_location, first_argmax

__all__ = ["ApiError", "Explorer", "ExplorerServer", "create_app", "serve"]

log = logging.getLogger("featurelens.app")

STATIC_DIR = Path(__file__).parent / "static"
# Defaults: an upload is a photo or a drawing, not a satellite tile.
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
MAX_UPLOADS = 64
CACHE_BYTES = 256 * 1024 * 1024
SCALES = ("layer", "channel")
_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".png": "image/png"}  # fmt: skip


class ApiError(Exception):
    """A request the explorer refuses: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------
# A byte-bounded LRU cache, safe across threads


class _LRU:
    """Least-recently-used cache bounded by the total size of its values (bytes)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.element_size() * value.nelement()
        if isinstance(value, (bytes, bytearray)):
            return len(value)
        if isinstance(value, tuple):
            return sum(_LRU._size(v) for v in value) + 64
        return 256

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
            self.misses += 1
        # Computed outside the cache lock: the model lock serialises model use, and two
        # requests racing for the same key compute the same value.
        value = compute()
        size = self._size(value)
        with self._lock:
            if key in self._items:
                return self._items[key][0]
            if size <= self.max_bytes:
                self._items[key] = (value, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, old) = self._items.popitem(last=False)
                    self._bytes -= old
        return value

    def __len__(self) -> int:
        return len(self._items)


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class _InputRef:
    kind: str  # "dataset" | "upload"
    key: int | str

    def __str__(self) -> str:
        return f"{self.kind}:{self.key}"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# The explorer: library calls behind validation, caches and the model lock


class Explorer:
    """The state behind the API: atlas, model, data, caches and the model lock.

    Parameters
    ----------
    atlas
        A loaded :class:`featurelens.Atlas`.
    model, data
        The atlas's model and dataset; rebuilt from the manifest when None.
    cache_bytes
        Budget of the result cache (activations, sprites, projections, grids).
    max_upload_bytes, max_upload_pixels, max_uploads
        Upload limits: bytes of one upload, width x height of one image, images kept.
    device
        Where the model runs; the model is moved there. Default: where it already is.
    """

    def __init__(
        self,
        atlas: Any,
        model: nn.Module | None = None,
        data: Any = None,
        *,
        cache_bytes: int = CACHE_BYTES,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        max_upload_pixels: int = MAX_UPLOAD_PIXELS,
        max_uploads: int = MAX_UPLOADS,
        device: str | torch.device | None = None,
    ) -> None:
        from featurelens.render import STYLES
        from featurelens.rules import METHODS

        self.atlas = atlas
        self.model = model if model is not None else atlas.build_model()
        self.data = data if data is not None else atlas.build_data()
        if device is not None:
            self.model.to(device)
        self.device = model_device(self.model)
        self.dtype = model_dtype(self.model)  # inputs follow the model: float64 models work
        self.methods = list(METHODS)
        self.styles = list(STYLES)
        self.method_help = {name: rule.summary for name, rule in METHODS.items()}
        self.style_help = {name: style.help for name, style in STYLES.items()}
        self.input_shape = tuple(int(v) for v in atlas.input_shape)  # (C, *spatial)
        self.layers = list(atlas.layers)
        self.max_upload_bytes = int(max_upload_bytes)
        self.max_upload_pixels = int(max_upload_pixels)
        self.model_lock = threading.RLock()
        self._cache = _LRU(cache_bytes)
        self._uploads: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._uploads_lock = threading.Lock()
        self._max_uploads = int(max_uploads)
        self.fields: dict[str, ReceptiveField | None] = {}
        self.field_errors: dict[str, str] = {}
        self.refused: dict[str, str] = {}  # layer -> why no request may use it
        for layer in self.layers:
            try:
                # The page still works without geometry: it just draws no boxes.
                field, error = layer_field(self.model, self.input_shape, layer)
            except LayerError as exc:  # the model given lacks the layer: no geometry
                field, error = None, str(exc)
            except ValueError as exc:  # a channels-last layer: every channel would be misread
                field, error = None, str(exc)
                self.refused[layer] = str(exc)
            self.fields[layer] = field
            if error is not None:
                self.field_errors[layer] = error

    # ---- validation ------------------------------------------------------------------------
    def layer(self, name: str | None) -> str:
        if not name:
            raise ApiError(400, "missing parameter 'layer'; layers: " + ", ".join(self.layers))
        if name not in self.layers:
            raise ApiError(404, f"unknown layer {name!r}; the atlas has: " + ", ".join(self.layers))
        if name in self.refused:
            raise ApiError(422, self.refused[name])
        return name

    def channel(self, layer: str, value: str | None) -> int:
        n = int(self.atlas.channels(layer))
        k = _int(value, "channel")
        if not 0 <= k < n:
            raise ApiError(
                404, f"channel {k} out of range: layer {layer!r} has channels 0..{n - 1}"
            )
        return k

    def method(self, value: str | None) -> str:
        value = value or self.methods[0]
        if value not in self.methods:
            raise ApiError(400, f"unknown method {value!r}; valid: " + ", ".join(self.methods))
        return value

    def style(self, value: str | None) -> str:
        value = value or self.styles[0]
        if value not in self.styles:
            raise ApiError(400, f"unknown style {value!r}; valid: " + ", ".join(self.styles))
        return value

    def input_ref(self, value: str | None) -> _InputRef:
        if not value:
            raise ApiError(400, "missing parameter 'input' (dataset:INDEX or upload:ID)")
        kind, sep, key = value.partition(":")
        if not sep or kind not in ("dataset", "upload"):
            raise ApiError(400, f"input {value!r} is not 'dataset:INDEX' or 'upload:ID'")
        if kind == "dataset":
            index = _int(key, "dataset index")
            n = len(self.data)
            if not 0 <= index < n:
                raise ApiError(404, f"dataset index {index} out of range: valid 0..{n - 1}")
            return _InputRef("dataset", index)
        with self._uploads_lock:
            if key not in self._uploads:
                raise ApiError(
                    404, f"unknown upload {key!r} (uploads are kept in memory; upload it again)"
                )
        return _InputRef("upload", key)

    # ---- inputs ----------------------------------------------------------------------------
    def input_tensor(self, ref: _InputRef) -> torch.Tensor:
        """The normalised input, shaped (C, *spatial)."""
        if ref.kind == "upload":
            with self._uploads_lock:
                tensor = self._uploads.get(str(ref.key))
                if tensor is None:
                    raise ApiError(404, f"upload {ref.key!r} expired; upload it again")
                self._uploads.move_to_end(str(ref.key))
                return tensor
        try:
            item = self.data[int(ref.key)]
        except Exception as exc:  # a broken file in the user's data: the scan skipped it too
            raise ApiError(
                422, f"dataset example {ref.key} cannot be loaded ({type(exc).__name__}: {exc})"
            ) from None
        try:
            x = split_example(item, int(ref.key))[0]
        except DataError as exc:
            raise ApiError(422, str(exc)) from None
        if tuple(x.shape) != self.input_shape:
            what = tuple(x.shape)
            raise ApiError(
                422, f"dataset example {ref.key} is {what}, not a tensor of the atlas's input "
                f"shape {self.input_shape}"
            )  # fmt: skip
        return x.to(self.dtype)

    def input_png(self, ref: _InputRef) -> bytes:
        return self._cache.get_or_compute(
            ("input", str(ref)), lambda: _png(self._display(self.input_tensor(ref)))
        )

    def _display(self, x: torch.Tensor) -> Image.Image:
        """The normalised input (C, H, W) as the image a person would see."""
        from featurelens.render import render_patch

        spec = self.atlas.data_spec
        mean, std = (spec.mean, spec.std) if spec is not None else (None, None)
        if x.dim() == 4:  # a volume: its central slice, as in the figures
            x = x[:, x.shape[1] // 2]
        rgb = render_patch(x, mean, std)  # (H, W, 3) in [0, 1], or (L, 3) for signals
        if rgb.ndim == 2:  # a signal: one row of pixels
            rgb = rgb[None]
        return Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB")

    def add_upload(self, raw: bytes, invert: bool = False) -> dict[str, Any]:
        """Decode, check and preprocess an uploaded PNG/JPEG; returns its input name.

        ``invert`` turns dark-on-light drawings into the light-on-dark of data like MNIST.
        """
        if len(raw) > self.max_upload_bytes:
            raise ApiError(
                413, f"upload of {len(raw)} bytes exceeds the limit of {self.max_upload_bytes}"
            )
        if not raw:
            raise ApiError(400, "empty upload: send a PNG or JPEG image")
        image = _decode_image(raw, self.max_upload_pixels)
        x = self._preprocess(image, invert)
        key = hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]
        with self._uploads_lock:
            self._uploads[key] = x
            self._uploads.move_to_end(key)
            while len(self._uploads) > self._max_uploads:
                self._uploads.popitem(last=False)
        return {"input": f"upload:{key}", "width": image.width, "height": image.height}

    def _preprocess(self, image: Image.Image, invert: bool = False) -> torch.Tensor:
        """Resize and normalise an image like the atlas's data: (C, H, W)."""
        from torchvision.transforms import functional as F

        channels, *spatial = self.input_shape
        if len(spatial) != 2:
            raise ApiError(
                422, f"uploads need a 2-D image model; this one takes {self.input_shape}"
            )
        if channels not in (1, 3):
            raise ApiError(422, f"uploads need a 1- or 3-channel model, this one has {channels}")
        image = image.convert("L" if channels == 1 else "RGB")
        if invert:
            image = ImageOps.invert(image)
        height, width = spatial
        spec = self.atlas.data_spec
        if spec is not None and spec.kind == "folder":
            # What featurelens.specs.ImageFolder does to every example of the data.
            image = F.resize(image, spec.input_size)
            image = F.center_crop(image, [height, width])
        else:
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        x = F.pil_to_tensor(image).float() / 255.0  # (C, H, W) in [0, 1]
        if spec is not None and spec.mean is not None and spec.std is not None:
            mean = torch.tensor(spec.mean, dtype=torch.float32).reshape(-1, 1, 1)
            std = torch.tensor(spec.std, dtype=torch.float32).reshape(-1, 1, 1)
            x = (x - mean) / std
        return x.to(self.dtype).contiguous()

    # ---- activations -----------------------------------------------------------------------
    def activations(self, ref: _InputRef, layer: str) -> torch.Tensor:
        """The layer's output for the input, shaped (C, *spatial) (spatial may be empty)."""

        def compute() -> torch.Tensor:
            x = self.input_tensor(ref).to(self.device)[None]
            with self.model_lock, torch.no_grad(), preserved(self.model):
                with capture(self.model, [layer]) as run:
                    out = run(x)[layer]
                # the model's dtype: arg-max locations must agree with the scan's
                return out[0].detach().to("cpu").clone()

        return self._cache.get_or_compute(("act", str(ref), layer), compute)

    def _maps(self, ref: _InputRef, layer: str) -> torch.Tensor:
        """Per-channel maps as (C, h, w): 1-D maps become one row, scalars one pixel."""
        act = self.activations(ref, layer)
        if act.dim() == 1:
            return act.reshape(-1, 1, 1)
        if act.dim() == 2:
            return act[:, None, :]
        if act.dim() == 3:
            return act
        raise ApiError(422, f"layer {layer!r} has {act.dim() - 1} spatial axes; the explorer "
                            "draws 1-D and 2-D maps")  # fmt: skip

    def activation_layout(self, ref: _InputRef, layer: str, scale: str) -> dict[str, Any]:
        maps = self._maps(ref, layer)
        channels, h, w = maps.shape
        cols = max(1, math.ceil(math.sqrt(channels * h / w))) if w else 1
        cols = min(cols, channels)
        rows = math.ceil(channels / cols)
        flat = maps.reshape(channels, -1)
        act = self.activations(ref, layer)  # (C, *spatial)
        spatial = act.dim() - 1
        return {
            "input": str(ref),
            "layer": layer,
            "scale": scale,
            "channels": channels,
            "map_shape": [h, w],
            "spatial_dims": spatial,
            "cols": cols,
            "rows": rows,
            "gap": 1,
            "min": float(flat.nan_to_num(nan=math.inf).min()),
            "max": float(flat.nan_to_num(nan=-math.inf).max()),
            "channel_max": [round(float(v), 6) for v in flat.max(1).values],  # NaN: null
            "channel_argmax": _argmax_locations(act),
            "signed": bool((flat < 0).any()),
        }

    def activation_png(self, ref: _InputRef, layer: str, scale: str) -> bytes:
        def compute() -> bytes:
            maps = self._maps(ref, layer)
            layout = self.activation_layout(ref, layer, scale)
            return _png(_sprite(maps, layout["cols"], layout["rows"], layout["gap"], scale))

        return self._cache.get_or_compute(("sprite", str(ref), layer, scale), compute)

    # ---- units -----------------------------------------------------------------------------
    def location(self, ref: _InputRef, layer: str, channel: int, text: str | None) -> tuple:
        """The unit's location: parsed and range-checked, or the channel's arg-max."""
        act = self.activations(ref, layer)
        if text is None or text == "":
            return argmax_location(act[channel])  # the scan's rule: NaN never peaks, first wins
        return _parse_location(text, tuple(act.shape[1:]), layer)

    def rf_box(self, layer: str, loc: tuple) -> dict[str, Any] | None:
        """The receptive field of ``loc`` on the input, clipped and unclipped (inclusive)."""
        field = self.fields.get(layer)
        if field is None:
            return None
        rf_loc = loc if len(loc) == field.ndim else (0,) * field.ndim
        try:
            interval = field.interval(rf_loc)
            region = field.region(rf_loc)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return {
            "location": list(rf_loc),
            "interval": [list(v) for v in interval],
            "region": [[s.start, s.stop - 1] for s in region],
            "is_global": field.is_global,
        }

    def unit(self, ref: _InputRef, layer: str, channel: int, text: str | None) -> dict[str, Any]:
        loc = self.location(ref, layer, channel, text)
        act = self.activations(ref, layer)
        value = float(act[(channel, *loc)])
        return {
            "input": str(ref),
            "layer": layer,
            "channel": channel,
            "location": list(loc),
            "value": value,
            "rf": self.rf_box(layer, loc),
        }

    def projection_png(
        self, ref: _InputRef, layer: str, channel: int, loc: tuple, method: str, style: str
    ) -> bytes:
        from featurelens.projection import project
        from featurelens.render import render_projection

        def compute() -> bytes:
            x = self.input_tensor(ref).to(self.device)[None]
            with self.model_lock:
                maps = project(self.model, x, layer, channel, location=loc, method=method)
            rgb = render_projection(maps[0].detach().cpu(), style)  # (H, W, 3) in [0, 1]
            return _png(Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB"))

        key = ("proj", str(ref), layer, channel, loc, method, style)
        return self._cache.get_or_compute(key, compute)

    def zf_png(self, layer: str, channel: int, method: str, style: str, k: int) -> bytes:
        from featurelens.figures import zf_grid

        def compute() -> bytes:
            with self.model_lock:
                image = zf_grid(
                    self.model, self.data, self.atlas, layer, channel, method=method, k=k,
                    style=style,
                )  # fmt: skip
            return _png(image)

        return self._cache.get_or_compute(("zf", layer, channel, method, style, k), compute)

    def top(self, layer: str, channel: int) -> list[dict[str, Any]]:
        return [
            {"index": int(h.index), "score": float(h.score), "location": list(h.location)}
            for h in self.atlas.top(layer, channel)
        ]

    def info(self) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            field = self.fields[layer]
            layers.append({
                "name": layer,
                "channels": int(self.atlas.channels(layer)),
                "rf": None if field is None else {
                    "size": list(field.size), "stride": list(field.stride),
                    "padding": list(field.padding), "output_shape": list(field.output_shape),
                    "is_global": field.is_global,
                },
                "rf_error": self.field_errors.get(layer),
            })  # fmt: skip
        spec = self.atlas.data_spec
        return {
            "model": _describe(getattr(self.atlas, "model_spec", None)),
            "data": _describe(spec),
            "data_size": len(self.data),
            "input_shape": list(self.input_shape),
            "top_k": int(getattr(self.atlas, "top_k", 9)),
            "layers": layers,
            "methods": self.methods,
            "method_help": self.method_help,
            "styles": self.styles,
            "style_help": self.style_help,
            "scales": list(SCALES),
            "max_upload_bytes": self.max_upload_bytes,
            "max_upload_pixels": self.max_upload_pixels,
        }


def _describe(spec: Any) -> Any:
    if spec is None:
        return None
    if hasattr(spec, "to_dict"):
        return spec.to_dict()
    return str(spec)


def _int(value: str | None, what: str) -> int:
    if value is None or value == "":
        raise ApiError(400, f"missing parameter {what!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{what} {value!r} is not an integer") from None


def _argmax_locations(act: torch.Tensor) -> list[list[int]]:
    """Per channel of ``act`` (C, *spatial): where its map peaks, by the scan's rule."""
    if act.dim() == 1:
        return [[] for _ in range(act.shape[0])]
    flat = first_argmax(act.reshape(act.shape[0], -1))  # (C,) first maximum, NaN ignored
    return torch.stack(torch.unravel_index(flat, tuple(act.shape[1:])), dim=-1).tolist()


def _parse_location(text: str, shape: tuple[int, ...], layer: str) -> tuple[int, ...]:
    """``"i,j"`` as a location of a map of spatial ``shape``: 400 if malformed, 404 if outside."""
    try:
        loc = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ApiError(400, f"location {text!r} is not comma-separated integers") from None
    if len(loc) != len(shape):
        raise ApiError(
            400, f"location {text!r} has {len(loc)} coordinate(s); layer {layer!r} has "
            f"{len(shape)} spatial axes, output shape {list(shape)}"
        )  # fmt: skip
    for axis, (u, n) in enumerate(zip(loc, shape)):
        if not 0 <= u < n:
            raise ApiError(404, f"location {loc} out of range on axis {axis}: valid 0..{n - 1}")
    return loc


def _decode_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Open ``raw`` as a PNG or JPEG within ``max_pixels``; ApiError 413/415 otherwise."""
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            fmt = probe.format
            width, height = probe.size
            if fmt not in ("PNG", "JPEG"):
                raise ApiError(415, f"upload is {fmt or 'not an image'}; send a PNG or JPEG")
            if width * height > max_pixels:
                raise ApiError(
                    413, f"image of {width}x{height} pixels exceeds the limit of {max_pixels}"
                )
            probe.verify()
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except ApiError:
        raise
    except Exception as exc:  # Pillow reports corrupt data with many exception types
        raise ApiError(415, f"upload is not a readable PNG or JPEG image ({exc})") from None


def _sprite(maps: torch.Tensor, cols: int, rows: int, gap: int, scale: str) -> Image.Image:
    """Tile per-channel maps (C, h, w) into one colour image, ``cols`` x ``rows`` cells."""
    from featurelens.render import STYLES

    channels, h, w = maps.shape
    maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)  # NaN drawn as zero
    flat = maps.reshape(channels, -1)
    if scale == "channel":
        peak = flat.abs().max(1).values.reshape(-1, 1, 1)
    else:
        peak = flat.abs().max().reshape(1, 1, 1)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    # Rectified layers are drawn in the sequential map of the "magnitude" style; layers with
    # negative values in the diverging map of "signed", centred at zero so colour means sign.
    signed = bool((flat < 0).any())
    values = (maps / peak).clamp(-1 if signed else 0, 1).double().numpy()
    rgb = STYLES["signed" if signed else "magnitude"].colorize(values)  # (C, h, w, 3)
    rgb = np.round(rgb * 255).astype(np.uint8)
    sheet = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 40, np.uint8)
    for c in range(channels):
        r, q = divmod(c, cols)
        sheet[r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = rgb[c]
    return Image.fromarray(sheet, "RGB")


# --------------------------------------------------------------------------------------------
# HTTP layer

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


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


async def _read_limited(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it exceeds ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ApiError(400, f"bad Content-Length {length!r}") from None
        if declared > limit:
            raise ApiError(413, f"upload of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"upload exceeds the limit of {limit} bytes")
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
        raise ApiError(400, f"malformed multipart upload: {exc.detail}") from None
    except Exception as exc:  # the multipart parser raises several types on garbage
        raise ApiError(400, f"malformed multipart upload ({type(exc).__name__})") from None
    try:
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not files:
            raise ApiError(400, "multipart upload without a file field")
        return await files[0].read()
    finally:
        await form.close()


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
        Passed to :class:`Explorer`: ``cache_bytes``, ``max_upload_bytes``,
        ``max_upload_pixels``, ``max_uploads``, ``device``.

    Returns
    -------
    starlette.applications.Starlette
        Serve it with any ASGI server, or use :func:`serve`.
    """
    from featurelens.atlas import Atlas
    from featurelens.rules import ActivationError

    atlas = atlas_dir if isinstance(atlas_dir, Atlas) else Atlas.load(atlas_dir)
    ex = Explorer(atlas, model, data, **options)
    # Only the files present now are served: no request path is ever joined to a directory.
    static = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in _STATIC_TYPES}

    def q(request: Request, name: str) -> str | None:
        return request.query_params.get(name)

    async def index(request: Request) -> Response:
        return Response(static["index.html"].read_bytes(), media_type=_STATIC_TYPES[".html"])

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        path = static.get(name)
        if path is None:
            raise ApiError(404, f"no static file {name!r}")
        return Response(path.read_bytes(), media_type=_STATIC_TYPES[path.suffix])

    async def info(request: Request) -> Response:
        return _json(ex.info())

    async def top(request: Request) -> Response:
        layer = ex.layer(q(request, "layer"))
        channel = ex.channel(layer, q(request, "channel"))
        return _json({"layer": layer, "channel": channel, "hits": ex.top(layer, channel)})

    async def input_png(request: Request) -> Response:
        ref = ex.input_ref(q(request, "input"))
        return _png_response(await run_in_threadpool(ex.input_png, ref))

    async def upload(request: Request) -> Response:
        invert = q(request, "invert") or "0"
        if invert not in ("0", "1"):
            raise ApiError(400, f"invert={invert!r}: use 0 or 1")
        raw = await _upload_bytes(request, ex.max_upload_bytes)
        return _json(await run_in_threadpool(ex.add_upload, raw, invert == "1"), status=201)

    def scale_of(request: Request) -> str:
        scale = q(request, "scale") or SCALES[0]
        if scale not in SCALES:
            raise ApiError(400, f"unknown scale {scale!r}; valid: " + ", ".join(SCALES))
        return scale

    async def activations(request: Request) -> Response:
        ref, layer = ex.input_ref(q(request, "input")), ex.layer(q(request, "layer"))
        scale = scale_of(request)
        return _json(await run_in_threadpool(ex.activation_layout, ref, layer, scale))

    async def activations_png(request: Request) -> Response:
        ref, layer = ex.input_ref(q(request, "input")), ex.layer(q(request, "layer"))
        scale = scale_of(request)
        return _png_response(await run_in_threadpool(ex.activation_png, ref, layer, scale))

    async def unit(request: Request) -> Response:
        ref, layer = ex.input_ref(q(request, "input")), ex.layer(q(request, "layer"))
        channel = ex.channel(layer, q(request, "channel"))
        result = await run_in_threadpool(ex.unit, ref, layer, channel, q(request, "location"))
        return _json(result)

    async def rf(request: Request) -> Response:
        layer = ex.layer(q(request, "layer"))
        field = ex.fields[layer]
        if field is None:
            raise ApiError(422, f"no receptive field for {layer!r}: {ex.field_errors[layer]}")
        text = q(request, "location")
        if not text:
            raise ApiError(400, "missing parameter 'location' (comma-separated integers)")
        loc = _parse_location(text, field.output_shape, layer)
        return _json({"layer": layer, **ex.rf_box(layer, loc)})

    async def projection(request: Request) -> Response:
        ref, layer = ex.input_ref(q(request, "input")), ex.layer(q(request, "layer"))
        channel = ex.channel(layer, q(request, "channel"))
        method, style = ex.method(q(request, "method")), ex.style(q(request, "style"))
        text = q(request, "location")

        def work() -> bytes:
            loc = ex.location(ref, layer, channel, text)
            return ex.projection_png(ref, layer, channel, loc, method, style)

        return _png_response(await run_in_threadpool(work))

    async def zf(request: Request) -> Response:
        layer = ex.layer(q(request, "layer"))
        channel = ex.channel(layer, q(request, "channel"))
        method, style = ex.method(q(request, "method")), ex.style(q(request, "style"))
        top_k = len(ex.atlas.top(layer, channel))
        k = _int(q(request, "k") or str(top_k), "k")
        if not 1 <= k <= top_k:
            raise ApiError(400, f"k={k} out of range: the atlas holds 1..{top_k} hits")
        return _png_response(await run_in_threadpool(ex.zf_png, layer, channel, method, style, k))

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return _json({"error": exc.message}, status=exc.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _json({"error": str(exc.detail)}, status=exc.status_code)

    async def library_error(request: Request, exc: Exception) -> Response:
        # What the library refuses for this model (an activation a rule cannot handle, ...).
        return _json({"error": str(exc)}, status=422)

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
        ApiError: api_error,
        HTTPException: http_error,
        LayerError: library_error,
        UnsupportedOpError: library_error,
        NotAlignedError: library_error,
        TraceError: library_error,
        ActivationError: library_error,
        Exception: unexpected,
    }
    middleware = [] if allowed_hosts is None else [Middleware(_HostCheck, allowed=allowed_hosts)]
    app = Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)
    app.state.explorer = ex
    return app


# --------------------------------------------------------------------------------------------
# Running it


class ExplorerServer:
    """A running explorer (uvicorn in a background thread).

    Attributes
    ----------
    url
        Where the page is, e.g. ``http://127.0.0.1:8000/``.
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
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait for the server thread (idempotent)."""
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
