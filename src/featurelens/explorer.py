"""The explorer's logic: what the page shows, computed from an atlas, its model and its data.

:class:`Explorer` holds an atlas, the model and dataset it was made from, the images a person
uploaded, a byte-bounded cache of results and the lock that serialises use of the model. It
answers in Python values (tensors, PNG bytes, JSON-ready dicts) and refuses bad input with the
library's errors (:mod:`featurelens.errors`); it imports nothing of the web stack. The HTTP
side (:mod:`featurelens.app.http`) parses requests, calls it and maps its errors to status
codes.

Inputs are named ``dataset:INDEX`` or ``upload:ID`` (:class:`InputRef`). Results that cost a
forward or backward pass (activations, sprites, projections, Zeiler-Fergus grids) are cached per
input and unit. :func:`featurelens.graph.capture` and the projection rules install hooks on the
*shared* model, so every use of the model holds :attr:`Explorer.model_lock`: concurrent callers
run one model call at a time, and the model never sees two sets of hooks.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from featurelens.data import split_example
from featurelens.errors import (
    AtlasError,
    ChannelError,
    DataError,
    FormatError,
    LayerError,
    LimitError,
    NotFoundError,
    ReceptiveFieldError,
    UsageError,
)
from featurelens.figures import layer_field, model_dtype, zf_grid
from featurelens.graph import capture, model_device, preserved
from featurelens.projection import project
from featurelens.receptive_field import ReceptiveField
from featurelens.render import STYLES, render_patch, render_projection
from featurelens.rules import METHODS
from featurelens.unit import argmax_location, first_argmax

__all__ = [
    "CACHE_BYTES",
    "MAX_UPLOADS",
    "MAX_UPLOAD_BYTES",
    "MAX_UPLOAD_PIXELS",
    "SCALES",
    "Explorer",
    "InputRef",
    "LRUCache",
    "decode_image",
    "parse_int",
]

# Defaults: an upload is a photo or a drawing, not a satellite tile.
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
MAX_UPLOADS = 64
CACHE_BYTES = 256 * 1024 * 1024
SCALES = ("layer", "channel")  # activation sprites: one peak per layer, or one per channel


# --------------------------------------------------------------------------------------------
# A byte-bounded LRU cache, safe across threads


class LRUCache:
    """Least-recently-used cache bounded by the total size of its values.

    Parameters
    ----------
    max_bytes
        Budget: the least recently used values are dropped while the sizes of the kept ones add
        up to more. A value larger than the whole budget is returned but not kept.

    Attributes
    ----------
    hits, misses
        Lookups answered from the cache, and those that computed.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def size_of(value: Any) -> int:
        """Bytes charged for ``value``: tensor storage, ``bytes`` length, 256 for anything else."""
        if isinstance(value, torch.Tensor):
            return value.element_size() * value.nelement()
        if isinstance(value, (bytes, bytearray)):
            return len(value)
        if isinstance(value, tuple):
            return sum(LRUCache.size_of(v) for v in value) + 64
        return 256

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value cached under ``key``, or ``compute()``'s, kept if it fits the budget.

        Parameters
        ----------
        key
            Any hashable; the explorer uses tuples naming the result, input and unit.
        compute
            Called without the cache lock held (it may take seconds); two callers racing for
            one key both compute, and the first value stored wins.

        Returns
        -------
        Any
            The cached or computed value.
        """
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
            self.misses += 1
        value = compute()
        size = self.size_of(value)
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

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)


# --------------------------------------------------------------------------------------------
# Inputs and answers


@dataclass(frozen=True)
class InputRef:
    """A validated input name: ``dataset:INDEX`` or ``upload:ID``.

    Make one with :meth:`Explorer.input_ref`; ``str(ref)`` gives the name back.
    """

    kind: Literal["dataset", "upload"]
    key: int | str  # the dataset index (int) or the upload ID (str)

    def __str__(self) -> str:
        return f"{self.kind}:{self.key}"


class Upload(TypedDict):
    """What :meth:`Explorer.add_upload` returns: the input's name and the image's size."""

    input: str
    width: int
    height: int


class RFBox(TypedDict):
    """The receptive field of one location: unclipped ``interval``, clipped ``region``.

    Both are inclusive ``[first, last]`` input positions per spatial axis.
    """

    location: list[int]
    interval: list[list[int]] | None  # None: an irregular field has no Distill interval
    region: list[list[int]]
    is_global: bool


class UnitAnswer(TypedDict):
    """What :meth:`Explorer.unit` returns: where the unit is, its value, its field."""

    input: str
    layer: str
    channel: int
    location: list[int]
    value: float
    rf: RFBox | None


class TopHit(TypedDict):
    """One of a channel's top hits in the atlas."""

    index: int
    score: float
    location: list[int]


def parse_int(text: str | None, what: str) -> int:
    """``text`` as an integer, or a :class:`UsageError` naming ``what``.

    Parameters
    ----------
    text
        What a person typed (a query parameter, the INDEX of ``dataset:INDEX``); None or ``""``
        count as missing.
    what
        The name used in the message, e.g. ``"channel"``.

    Raises
    ------
    UsageError
        Missing, or not an integer.
    """
    if text is None or text == "":
        raise UsageError(f"missing parameter {what!r}")
    try:
        return int(text)
    except (TypeError, ValueError):
        raise UsageError(f"{what} {text!r} is not an integer") from None


def decode_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Open ``raw`` as a PNG or JPEG of at most ``max_pixels`` pixels, EXIF orientation applied.

    The size is read from the header before any pixel is decoded, and Pillow verifies the file.

    Parameters
    ----------
    raw
        The file's bytes.
    max_pixels
        Most width x height accepted.

    Returns
    -------
    PIL.Image.Image
        The decoded image, loaded.

    Raises
    ------
    FormatError
        Not a PNG or JPEG, or not readable as one.
    LimitError
        More than ``max_pixels`` pixels.
    """
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            fmt = probe.format
            width, height = probe.size
            if fmt not in ("PNG", "JPEG"):
                raise FormatError(f"upload is {fmt or 'not an image'}; send a PNG or JPEG")
            if width * height > max_pixels:
                raise LimitError(
                    f"image of {width}x{height} pixels exceeds the limit of {max_pixels}"
                )
            probe.verify()
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (FormatError, LimitError):
        raise
    except Exception as exc:  # Pillow reports corrupt data with many exception types
        raise FormatError(f"upload is not a readable PNG or JPEG image ({exc})") from None


def encode_png(image: Image.Image) -> bytes:
    """``image`` as PNG bytes (no optimisation pass: the explorer answers while you wait)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# The explorer


class Explorer:
    """What the explorer shows, for one atlas: validation, inputs, results, caches, model lock.

    Methods take Python values (``int`` channels, ``tuple`` locations, ``None`` for a default)
    and raise :mod:`featurelens.errors` classes on bad input: :class:`UsageError` for a value
    that is not valid, :class:`LayerError`, :class:`ChannelError` and :class:`NotFoundError` for
    a name or index with nothing behind it, :class:`LimitError` and :class:`FormatError` for
    uploads, and :class:`AtlasError`, :class:`DataError`, :class:`ReceptiveFieldError` or
    :class:`ActivationError` for what this model, data or atlas cannot do. Safe to call from
    several threads.

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

    Attributes
    ----------
    layers
        The atlas's layers, in its order.
    fields
        Layer -> its receptive field on the atlas's input shape, or None when it cannot be
        computed (:attr:`field_errors` says why); the page then draws no boxes.
    refused
        Layer -> why no request may use it (a channels-last layer of the model given).
    model_lock
        Held by every use of the model.
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
        self.max_uploads = int(max_uploads)
        self.model_lock = threading.RLock()
        self.cache = LRUCache(cache_bytes)
        self._uploads: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._uploads_lock = threading.Lock()
        self.fields: dict[str, ReceptiveField | None] = {}
        self.field_errors: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        for layer in self.layers:
            try:
                field, error = layer_field(self.model, self.input_shape, layer)
            except LayerError as exc:  # the model given lacks the layer: no geometry
                field, error = None, str(exc)
            except ValueError as exc:  # a channels-last layer: every channel would be misread
                field, error = None, str(exc)
                self.refused[layer] = str(exc)
            self.fields[layer] = field
            if error is not None:
                self.field_errors[layer] = error

    # ---- validation: each returns the value to use, or raises -------------------------------
    def check_layer(self, name: str) -> str:
        """``name`` if it is one of the atlas's layers and usable with the model given.

        Raises
        ------
        LayerError
            Not a layer of the atlas (the message lists them).
        AtlasError
            A layer of the atlas that the model given outputs channels-last.
        """
        if name not in self.layers:
            raise LayerError(f"unknown layer {name!r}; the atlas has: " + ", ".join(self.layers))
        if name in self.refused:
            raise AtlasError(self.refused[name])
        return name

    def check_channel(self, layer: str, channel: int) -> int:
        """``channel`` if ``layer`` (checked) has it; :class:`ChannelError` with the range if not."""
        if isinstance(channel, bool) or not isinstance(channel, int | np.integer):
            raise UsageError(f"channel must be an int, got {channel!r}")
        n = int(self.atlas.channels(layer))
        if not 0 <= channel < n:
            raise ChannelError(
                f"channel {channel} out of range: layer {layer!r} has channels 0..{n - 1}"
            )
        return int(channel)

    def check_method(self, name: str | None = None) -> str:
        """A projection method of :data:`featurelens.rules.METHODS`; None: the first."""
        name = name or self.methods[0]
        if name not in self.methods:
            raise UsageError(f"unknown method {name!r}; valid: " + ", ".join(self.methods))
        return name

    def check_style(self, name: str | None = None) -> str:
        """A picture style of :data:`featurelens.render.STYLES`; None: the first."""
        name = name or self.styles[0]
        if name not in self.styles:
            raise UsageError(f"unknown style {name!r}; valid: " + ", ".join(self.styles))
        return name

    def check_scale(self, name: str | None = None) -> str:
        """A sprite scale of :data:`SCALES` (``layer`` or ``channel``); None: ``layer``."""
        name = name or SCALES[0]
        if name not in SCALES:
            raise UsageError(f"unknown scale {name!r}; valid: " + ", ".join(SCALES))
        return name

    def check_k(self, layer: str, channel: int, k: int | None = None) -> int:
        """How many hits a Zeiler-Fergus grid shows: 1..(hits in the atlas); None: all."""
        top_k = len(self.atlas.top(layer, channel))
        k = top_k if k is None else k
        if not 1 <= k <= top_k:
            raise UsageError(f"k={k} out of range: the atlas holds 1..{top_k} hits")
        return k

    def check_field(self, layer: str) -> ReceptiveField:
        """The layer's receptive field; :class:`ReceptiveFieldError` saying why when it has none."""
        field = self.fields[layer]
        if field is None:
            raise ReceptiveFieldError(
                f"no receptive field for {layer!r}: {self.field_errors[layer]}"
            )
        return field

    def input_ref(self, name: str) -> InputRef:
        """The input called ``name`` (``dataset:INDEX`` or ``upload:ID``), checked to exist.

        Raises
        ------
        UsageError
            ``name`` is not of either form.
        NotFoundError
            An index past the dataset, or an upload not kept.
        """
        kind, sep, key = name.partition(":")
        if not sep or kind not in ("dataset", "upload"):
            raise UsageError(f"input {name!r} is not 'dataset:INDEX' or 'upload:ID'")
        if kind == "dataset":
            index = parse_int(key, "dataset index")
            n = len(self.data)
            if not 0 <= index < n:
                raise NotFoundError(f"dataset index {index} out of range: valid 0..{n - 1}")
            return InputRef("dataset", index)
        with self._uploads_lock:
            if key not in self._uploads:
                raise NotFoundError(
                    f"unknown upload {key!r} (uploads are kept in memory; upload it again)"
                )
        return InputRef("upload", key)

    def location(
        self, ref: InputRef, layer: str, channel: int, location: Sequence[int] | None = None
    ) -> tuple[int, ...]:
        """The unit's location: ``location`` checked against the layer's map, or the arg-max.

        Parameters
        ----------
        ref, layer, channel
            The input and the feature map (layer and channel are checked here).
        location
            One index per spatial axis of the layer's output; None: where the channel peaks on
            this input, by the scan's rule (first maximum in row-major order, NaN never wins).

        Raises
        ------
        UsageError
            The wrong number of coordinates.
        NotFoundError
            A coordinate outside the map.
        """
        channel = self.check_channel(self.check_layer(layer), channel)
        act = self.activations(ref, layer)  # (C, *spatial)
        if location is None:
            return argmax_location(act[channel])
        return _check_location(location, tuple(act.shape[1:]), layer)

    # ---- inputs ----------------------------------------------------------------------------
    def input_tensor(self, ref: InputRef) -> torch.Tensor:
        """The normalised input in the model's dtype, shaped (C, *spatial).

        Raises
        ------
        NotFoundError
            An upload that has been dropped since (only the most recent are kept).
        DataError
            A dataset example that fails to load or is not of the atlas's input shape.
        """
        if ref.kind == "upload":
            with self._uploads_lock:
                tensor = self._uploads.get(str(ref.key))
                if tensor is None:
                    raise NotFoundError(f"upload {ref.key!r} expired; upload it again")
                self._uploads.move_to_end(str(ref.key))
                return tensor
        try:
            item = self.data[int(ref.key)]
        except Exception as exc:  # a broken file in the user's data: the scan skipped it too
            raise DataError(
                f"dataset example {ref.key} cannot be loaded ({type(exc).__name__}: {exc})"
            ) from None
        x = split_example(item, int(ref.key))[0]
        if tuple(x.shape) != self.input_shape:
            raise DataError(
                f"dataset example {ref.key} is {tuple(x.shape)}, not a tensor of the atlas's "
                f"input shape {self.input_shape}"
            )
        return x.to(self.dtype)

    def input_png(self, ref: InputRef) -> bytes:
        """The input as a person sees it (denormalised; a volume's central slice, a signal's
        row), as PNG bytes."""
        return self.cache.get_or_compute(
            ("input", str(ref)), lambda: encode_png(self._display(self.input_tensor(ref)))
        )

    def _display(self, x: torch.Tensor) -> Image.Image:
        """The normalised input (C, *spatial) as the image a person would see."""
        spec = self.atlas.data_spec
        mean, std = (spec.mean, spec.std) if spec is not None else (None, None)
        if x.dim() == 4:  # a volume: its central slice, as in the figures
            x = x[:, x.shape[1] // 2]
        rgb = render_patch(x, mean, std)  # (H, W, 3) in [0, 1], or (L, 3) for signals
        if rgb.ndim == 2:  # a signal: one row of pixels
            rgb = rgb[None]
        return Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB")

    def add_upload(self, raw: bytes, invert: bool = False) -> Upload:
        """Decode, check and preprocess an uploaded PNG/JPEG and keep it as an input.

        The image is converted to the model's channels, resized like the atlas's data and
        normalised with the data spec's mean/std. The most recent ``max_uploads`` are kept.

        Parameters
        ----------
        raw
            The file's bytes.
        invert
            Turn a dark-on-light drawing into the light-on-dark of data like MNIST.

        Returns
        -------
        Upload
            ``{"input": "upload:ID", "width", "height"}``: the ID is a hash of the
            preprocessed tensor, so the same picture gets the same name.

        Raises
        ------
        LimitError
            More than ``max_upload_bytes`` bytes or ``max_upload_pixels`` pixels.
        UsageError
            Empty.
        FormatError
            Not a readable PNG or JPEG.
        AtlasError
            The atlas's model does not take 2-D images of 1 or 3 channels.
        """
        if len(raw) > self.max_upload_bytes:
            raise LimitError(
                f"upload of {len(raw)} bytes exceeds the limit of {self.max_upload_bytes}"
            )
        if not raw:
            raise UsageError("empty upload: send a PNG or JPEG image")
        image = decode_image(raw, self.max_upload_pixels)
        x = self.preprocess(image, invert)
        key = hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]
        with self._uploads_lock:
            self._uploads[key] = x
            self._uploads.move_to_end(key)
            while len(self._uploads) > self.max_uploads:
                self._uploads.popitem(last=False)
        return {"input": f"upload:{key}", "width": image.width, "height": image.height}

    def preprocess(self, image: Image.Image, invert: bool = False) -> torch.Tensor:
        """Resize and normalise ``image`` like the atlas's data: (C, H, W) in the model's dtype.

        Raises
        ------
        AtlasError
            The atlas's model does not take 2-D images of 1 or 3 channels.
        """
        from torchvision.transforms import functional as F

        channels, *spatial = self.input_shape
        if len(spatial) != 2:
            raise AtlasError(f"uploads need a 2-D image model; this one takes {self.input_shape}")
        if channels not in (1, 3):
            raise AtlasError(f"uploads need a 1- or 3-channel model, this one has {channels}")
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

    # ---- the model -------------------------------------------------------------------------
    @contextmanager
    def _using_model(self) -> Iterator[None]:
        """Hold the model lock; a layer of the atlas missing from the model is an AtlasError.

        Every layer name reaching the model was checked against the atlas, so a
        :class:`LayerError` here means the model given does not match the atlas.
        """
        with self.model_lock:
            try:
                yield
            except LayerError as exc:
                raise AtlasError(str(exc)) from exc

    def layer_output(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """The layer's output for one input ``x`` (C, *spatial): (C', *spatial'), on the CPU.

        Uncached: :meth:`activations` caches it per named input. In the model's dtype, so that
        arg-max locations agree with the scan's.
        """
        with self._using_model(), torch.no_grad(), preserved(self.model):
            with capture(self.model, [layer]) as run:
                out = run(x.to(self.device)[None])[layer]
            return out[0].detach().to("cpu").clone()

    def activations(self, ref: InputRef, layer: str) -> torch.Tensor:
        """The layer's output for the input, shaped (C, *spatial) (spatial may be empty)."""
        layer = self.check_layer(layer)
        return self.cache.get_or_compute(
            ("act", str(ref), layer), lambda: self.layer_output(self.input_tensor(ref), layer)
        )

    def _maps(self, ref: InputRef, layer: str) -> torch.Tensor:
        """Per-channel maps as (C, h, w): 1-D maps become one row, scalars one pixel."""
        act = self.activations(ref, layer)
        if act.dim() == 1:
            return act.reshape(-1, 1, 1)
        if act.dim() == 2:
            return act[:, None, :]
        if act.dim() == 3:
            return act
        raise AtlasError(
            f"layer {layer!r} has {act.dim() - 1} spatial axes; the explorer draws 1-D and 2-D maps"
        )

    def activation_layout(self, ref: InputRef, layer: str, scale: str = "layer") -> dict[str, Any]:
        """Where each channel's map is in the sprite, and per-channel peak values and places.

        Returns
        -------
        dict
            ``input``, ``layer``, ``scale``, ``channels``, ``map_shape`` [h, w] of one cell,
            ``spatial_dims``, ``cols``, ``rows``, ``gap`` (pixels between cells), ``min``,
            ``max``, ``channel_max`` (NaN where a map is all NaN), ``channel_argmax`` (one
            location per channel, by the scan's rule), ``signed`` (any negative value).

        Raises
        ------
        AtlasError
            A layer with more than 2 spatial axes.
        """
        scale = self.check_scale(scale)
        maps = self._maps(ref, layer)
        channels, h, w = maps.shape
        cols = max(1, math.ceil(math.sqrt(channels * h / w))) if w else 1
        cols = min(cols, channels)
        rows = math.ceil(channels / cols)
        flat = maps.reshape(channels, -1)
        act = self.activations(ref, layer)  # (C, *spatial)
        return {
            "input": str(ref),
            "layer": layer,
            "scale": scale,
            "channels": channels,
            "map_shape": [h, w],
            "spatial_dims": act.dim() - 1,
            "cols": cols,
            "rows": rows,
            "gap": 1,
            "min": float(flat.nan_to_num(nan=math.inf).min()),
            "max": float(flat.nan_to_num(nan=-math.inf).max()),
            "channel_max": [round(float(v), 6) for v in flat.max(1).values],
            "channel_argmax": _argmax_locations(act),
            "signed": bool((flat < 0).any()),
        }

    def activation_png(self, ref: InputRef, layer: str, scale: str = "layer") -> bytes:
        """Every channel's map in one sprite (PNG), laid out as :meth:`activation_layout` says."""
        scale = self.check_scale(scale)

        def compute() -> bytes:
            maps = self._maps(ref, layer)
            layout = self.activation_layout(ref, layer, scale)
            return encode_png(_sprite(maps, layout["cols"], layout["rows"], layout["gap"], scale))

        return self.cache.get_or_compute(("sprite", str(ref), layer, scale), compute)

    # ---- units -----------------------------------------------------------------------------
    def rf_box(self, layer: str, location: tuple[int, ...]) -> RFBox | None:
        """The receptive field of ``location`` on the input; None when the layer has none.

        A layer without spatial axes (logits) has a global field, reported at its one location.

        Raises
        ------
        UsageError
            A location the field does not have.
        """
        field = self.fields.get(layer)
        return None if field is None else _box(field, location)

    def rf(self, layer: str, location: Sequence[int]) -> RFBox:
        """The receptive field of one location of ``layer`` (no input needed).

        Raises
        ------
        ReceptiveFieldError
            The layer has no computable field.
        UsageError, NotFoundError
            The wrong number of coordinates, or one outside the layer's output.
        """
        field = self.check_field(self.check_layer(layer))
        return _box(field, _check_location(location, field.output_shape, layer))

    def unit(
        self, ref: InputRef, layer: str, channel: int, location: Sequence[int] | None = None
    ) -> UnitAnswer:
        """A unit on an input: its location (default: the arg-max), value and receptive field."""
        channel = self.check_channel(self.check_layer(layer), channel)
        loc = self.location(ref, layer, channel, location)
        act = self.activations(ref, layer)
        return {
            "input": str(ref),
            "layer": layer,
            "channel": channel,
            "location": list(loc),
            "value": float(act[(channel, *loc)]),
            "rf": self.rf_box(layer, loc),
        }

    def projection_png(
        self,
        ref: InputRef,
        layer: str,
        channel: int,
        location: Sequence[int] | None = None,
        method: str | None = None,
        style: str | None = None,
    ) -> bytes:
        """The unit's projection on the input (:func:`featurelens.project`), rendered, as PNG.

        Parameters
        ----------
        ref, layer, channel
            The input and the feature map (layer and channel are checked here).
        location
            As for :meth:`location`; None: the channel's arg-max on this input.
        method, style
            Names in ``METHODS`` and ``STYLES``; None: the first of each.

        Raises
        ------
        ActivationError
            A rectifier without a rule for ``method``.
        """
        channel = self.check_channel(self.check_layer(layer), channel)
        method, style = self.check_method(method), self.check_style(style)
        loc = self.location(ref, layer, channel, location)

        def compute() -> bytes:
            x = self.input_tensor(ref).to(self.device)[None]
            with self._using_model():
                maps = project(self.model, x, layer, channel, location=loc, method=method)
            rgb = render_projection(maps[0].detach().cpu(), style)  # (H, W, 3) in [0, 1]
            return encode_png(Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB"))

        key = ("proj", str(ref), layer, channel, loc, method, style)
        return self.cache.get_or_compute(key, compute)

    def zf_png(
        self,
        layer: str,
        channel: int,
        method: str | None = None,
        style: str | None = None,
        k: int | None = None,
    ) -> bytes:
        """The channel's Zeiler-Fergus grid (:func:`featurelens.zf_grid`) as PNG.

        ``method``/``style`` None: the first of each registry; ``k`` None: every hit of the
        atlas.
        """
        channel = self.check_channel(self.check_layer(layer), channel)
        method, style = self.check_method(method), self.check_style(style)
        k = self.check_k(layer, channel, k)

        def compute() -> bytes:
            with self._using_model():
                image = zf_grid(
                    self.model, self.data, self.atlas, layer, channel, method=method, k=k,
                    style=style,
                )  # fmt: skip
            return encode_png(image)

        return self.cache.get_or_compute(("zf", layer, channel, method, style, k), compute)

    def top(self, layer: str, channel: int) -> list[TopHit]:
        """The channel's top hits in the atlas, best first."""
        channel = self.check_channel(self.check_layer(layer), channel)
        return [
            {"index": int(h.index), "score": float(h.score), "location": list(h.location)}
            for h in self.atlas.top(layer, channel)
        ]

    def info(self) -> dict[str, Any]:
        """What the page needs to start: specs, sizes, layers with their fields, menus, limits."""
        layers = []
        for layer in self.layers:
            field = self.fields[layer]
            layers.append({
                "name": layer,
                "channels": int(self.atlas.channels(layer)),
                "rf": None if field is None or not field.regular else {
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


def _check_location(location: Sequence[int], shape: Sequence[int], layer: str) -> tuple[int, ...]:
    """``location`` on a map of spatial ``shape``: UsageError if the rank differs, NotFoundError
    if outside."""
    loc = tuple(int(v) for v in location)
    shape = tuple(int(n) for n in shape)
    if len(loc) != len(shape):
        text = ",".join(map(str, loc))  # as it is typed in a query
        raise UsageError(
            f"location {text!r} has {len(loc)} coordinate(s); layer {layer!r} has "
            f"{len(shape)} spatial axes, output shape {list(shape)}"
        )
    for axis, (u, n) in enumerate(zip(loc, shape)):
        if not 0 <= u < n:
            raise NotFoundError(f"location {loc} out of range on axis {axis}: valid 0..{n - 1}")
    return loc


def _box(field: ReceptiveField, location: tuple[int, ...]) -> RFBox:
    """The field of ``location``; a global field (no spatial axes at the layer) at its origin."""
    rf_loc = location if len(location) == field.ndim else (0,) * field.ndim
    try:
        interval = field.interval(rf_loc) if field.regular else None
        region = field.region(rf_loc)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return {
        "location": list(rf_loc),
        "interval": None if interval is None else [list(v) for v in interval],
        "region": [[s.start, s.stop - 1] for s in region],
        "is_global": field.is_global,
    }


def _argmax_locations(act: torch.Tensor) -> list[list[int]]:
    """Per channel of ``act`` (C, *spatial): where its map peaks, by the scan's rule."""
    if act.dim() == 1:
        return [[] for _ in range(act.shape[0])]
    flat = first_argmax(act.reshape(act.shape[0], -1))  # (C,) first maximum, NaN ignored
    return torch.stack(torch.unravel_index(flat, tuple(act.shape[1:])), dim=-1).tolist()


def _sprite(maps: torch.Tensor, cols: int, rows: int, gap: int, scale: str) -> Image.Image:
    """Tile per-channel maps (C, h, w) into one colour image, ``cols`` x ``rows`` cells."""
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
