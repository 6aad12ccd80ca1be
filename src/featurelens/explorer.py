"""The explorer's logic: what the page shows, computed from an atlas, its model and its data.

:class:`Explorer` holds an atlas, the model and dataset it was made from, the images a person
uploaded, a byte-bounded cache of results and the lock that serialises use of the model. It
answers in Python values (tensors, PNG bytes, JSON-ready dicts) and refuses bad input with the
library's errors (:mod:`featurelens.errors`); it imports nothing of the web stack. The HTTP
side (:mod:`featurelens.app.http`) parses requests, calls it and maps its errors to status
codes.

Inputs are named ``dataset:INDEX`` or ``upload:ID`` (:class:`InputRef`). Results that cost a
forward or backward pass (activations, sprites, projections, Zeiler-Fergus grids) are cached per
input and unit, and concurrent requests for one of them compute it once. A click costs one
truncated forward for the input's activations (cached, shared by the sprite, the unit and its
arg-max) and one forward and backward of the unit's receptive-field crop: the layer's field is
the explorer's own, and its layout is kept across calls (:mod:`featurelens.analysis`).
:func:`featurelens.graph.capture` and the projection rules install hooks on the
*shared* model, so every use of the model holds :attr:`Explorer.model_lock`: concurrent callers
run one model call at a time, and the model never sees two sets of hooks.

Uploads are decoded at most :data:`DECODE_SLOTS` at a time and at reduced size (JPEG's DCT
scaling, an integer box reduction otherwise), so that many concurrent uploads of a small file
with huge dimensions keep memory flat. The result cache charges what its entries really occupy
(payloads, Python objects, tensor storages), so its budget is a real bound.
"""

from __future__ import annotations

import hashlib
import io
import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, TypedDict

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
from featurelens.rules import DEFAULT_METHOD, METHODS, check_other_activations, rule_mode
from featurelens.unit import argmax_location, first_argmax

__all__ = [
    "CACHE_BYTES",
    "DECODE_SLOTS",
    "MAX_UPLOADS",
    "MAX_UPLOAD_BYTES",
    "MAX_AUDIO_SAMPLES",
    "MAX_ROW_PIXELS",
    "MAX_UPLOAD_PIXELS",
    "SCALES",
    "WAVEFORM_HEIGHT",
    "Decoded",
    "Explorer",
    "InputRef",
    "LRUCache",
    "decode_image",
    "encode_wav",
    "parse_int",
]

# Defaults: an upload is a photo or a drawing, not a satellite tile.
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
MAX_UPLOADS = 64
CACHE_BYTES = 256 * 1024 * 1024
DECODE_SLOTS = 2  # uploads decoded at once: decoding a huge JPEG briefly needs tens of MB
SCALES = ("layer", "channel")  # activation sprites: one peak per layer, or one per channel
MAX_ROW_PIXELS = 4096  # a longer 1-D map (or waveform) is drawn reduced to this many pixels
MAX_AUDIO_SAMPLES = 1 << 23  # the most samples one WAV answer holds (16 MiB of 16-bit mono)
WAVEFORM_HEIGHT = 64  # pixels of one channel's waveform


# --------------------------------------------------------------------------------------------
# A byte-bounded LRU cache, safe across threads


class LRUCache:
    """Least-recently-used cache bounded by the memory its entries occupy.

    Each entry is charged :meth:`size_of` its key and its value plus :data:`ENTRY_OVERHEAD`:
    what the entry really costs in the process, Python objects and tensor storages included
    (``tests/test_explorer.py`` compares the charge with the growth of the resident memory of
    a process filling a cache).

    Parameters
    ----------
    max_bytes
        Budget: the least recently used entries are dropped while the charges of the kept ones
        add up to more. A value larger than the whole budget is returned but not kept.

    Attributes
    ----------
    hits, misses, waits
        Lookups answered from the cache, those that computed, and those that waited for
        another caller computing the same key.
    """

    #: Bytes a tensor costs beyond its storage: the Python object, TensorImpl, StorageImpl and
    #: allocator bookkeeping (measured: about 400-480 bytes on CPython 3.11 / torch 2.x).
    TENSOR_OVERHEAD = 480
    #: Bytes an entry costs beyond its key and value: the ``(value, size)`` pair, the size
    #: integer, the ordered dict's slot and link.
    ENTRY_OVERHEAD = 120

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # keys being computed now: None until a second caller waits (then its Future), so that
        # an uncontended miss allocates nothing more than the entry it keeps
        self._running: dict[Hashable, Future[Any] | None] = {}
        self.hits = 0
        self.misses = 0
        self.waits = 0

    @property
    def nbytes(self) -> int:
        """Bytes charged for the entries kept now (at most ``max_bytes``)."""
        return self._bytes

    @classmethod
    def size_of(cls, value: Any) -> int:
        """Bytes ``value`` occupies: tensors (storage + object), bytes, strings, numbers, arrays
        and tuples, lists, dicts and sets of them, recursively.

        A tensor is charged its whole storage (a view keeps all of it alive). Objects of other
        types are charged ``sys.getsizeof``, which does not see inside them: the explorer caches
        only tensors and bytes.
        """
        if isinstance(value, torch.Tensor):
            return value.untyped_storage().nbytes() + cls.TENSOR_OVERHEAD
        if isinstance(value, np.ndarray):
            base = value if value.base is None else value.base
            owned = base.nbytes if isinstance(base, np.ndarray) else value.nbytes
            return sys.getsizeof(value) + (0 if value.base is None else owned)
        if isinstance(value, (tuple, list, set, frozenset)):
            return sys.getsizeof(value) + sum(cls.size_of(v) for v in value)
        if isinstance(value, dict):
            items = value.items()
            return sys.getsizeof(value) + sum(cls.size_of(k) + cls.size_of(v) for k, v in items)
        return sys.getsizeof(value)

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value cached under ``key``, or ``compute()``'s, kept if it fits the budget.

        Concurrent requests for one key compute it once: the first caller computes (without
        the cache lock held: it may take seconds), the others wait for its value (or its
        exception, raised to each of them) instead of computing it again.

        Parameters
        ----------
        key
            Any hashable; the explorer uses tuples naming the result, input and unit.
        compute
            Called by one caller at a time per key.

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
            mine = key not in self._running
            if mine:
                self.misses += 1
                self._running[key] = None
            else:
                self.waits += 1
                waited = self._running[key]
                if waited is None:
                    waited = self._running[key] = Future()
        if not mine:
            assert waited is not None  # made above for this waiter
            return waited.result()  # the computing caller's value, or its exception
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                waiting = self._running.pop(key)
            if waiting is not None:
                waiting.set_exception(exc)
            raise
        size = self.size_of(key) + self.size_of(value) + self.ENTRY_OVERHEAD
        with self._lock:
            waiting = self._running.pop(key)
            if size <= self.max_bytes:
                self._items[key] = (value, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, old) = self._items.popitem(last=False)
                    self._bytes -= old
        if waiting is not None:
            waiting.set_result(value)
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
    rf: RFBox | None  # None: no box can be drawn, ``rf_error`` says why
    rf_error: str | None


class TopHit(TypedDict):
    """One of a channel's top hits in the atlas."""

    index: int
    score: float
    location: list[int]
    label: int | float | str | None  # the example's label when the atlas records labels


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


class Decoded(NamedTuple):
    """What :func:`decode_image` returns: the image, possibly reduced, and its full size."""

    image: Image.Image  # at least min_side pixels on its shorter side, when the file had them
    width: int  # of the file's full image, after the EXIF orientation
    height: int


def decode_image(raw: bytes, max_pixels: int, min_side: int | None = None) -> Decoded:
    """Open ``raw`` as a PNG or JPEG of at most ``max_pixels`` pixels, EXIF orientation applied.

    The size is read from the header before any pixel is decoded, and Pillow verifies the file.
    With ``min_side``, the image is decoded at reduced size: a JPEG by the decoder's DCT scaling
    (``Image.draft``: 1/2, 1/4 or 1/8 of each side), other formats by an integer box reduction
    after decoding; either way its shorter side stays at least ``min_side`` pixels, so that a
    resize to the model's input size that follows gives nearly the picture a full decode would.
    A progressive JPEG still needs its full-size coefficients while it decodes (a few bytes per
    pixel); :class:`Explorer` bounds how many decode at once.

    Parameters
    ----------
    raw
        The file's bytes.
    max_pixels
        Most width x height accepted.
    min_side
        Shorter side the decoded image keeps at least; None: full size.

    Returns
    -------
    Decoded
        The decoded image (loaded) and the full image's width and height.

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
            if min_side is not None and fmt == "JPEG":
                image.draft(image.mode, (min_side, min_side))  # both sides >= min_side
            image.load()
            factor = 1 if min_side is None else min(image.size) // max(1, min_side)
            reduced = image.reduce(factor) if factor > 1 else image
            upright = ImageOps.exif_transpose(reduced)
    except (FormatError, LimitError):
        raise
    except Exception as exc:  # Pillow reports corrupt data with many exception types
        raise FormatError(f"upload is not a readable PNG or JPEG image ({exc})") from None
    if upright.size != reduced.size and upright.size == reduced.size[::-1]:
        width, height = height, width  # the orientation turned the picture a quarter
    return Decoded(upright, width, height)


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
    decode_slots
        Uploads decoded at once, on threads of their own (more wait their turn): bounds the
        memory decoding takes.
    device
        Where the model runs; the model is moved there. Default: where it already is.
    other_activations
        Under ``deconvnet``/``guided``, what activations that are not rectifiers (GELU, SiLU,
        Hardswish, ...) do, for every projection and grid: ``"error"`` (default: the request
        is refused, naming them) or ``"gradient"`` (passed as the plain gradient; the grids'
        captions say so), as for :func:`featurelens.project`.

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
    uploads_added
        Uploads accepted so far (with ``cache.misses``, the computations started: what a test
        counts to show that a refused request caused none).

    Raises
    ------
    AtlasError
        The atlas's hits do not fit its own layers (arrays of the wrong rank, locations outside
        a layer's map) or index examples the data does not have.
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
        decode_slots: int = DECODE_SLOTS,
        device: str | torch.device | None = None,
        other_activations: str = "error",
    ) -> None:
        check_other_activations(other_activations)
        self.other_activations = other_activations
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
        if int(decode_slots) < 1:
            raise UsageError(f"decode_slots must be at least 1, got {decode_slots!r}")
        # Decoding runs on its own few threads: at most decode_slots images at once, and the
        # memory a decode frees stays with these threads for the next one (spread over the
        # web server's many threads, each would keep its own).
        self._decoder = ThreadPoolExecutor(int(decode_slots), "featurelens-decode")
        self.uploads_added = 0
        self.model_lock = threading.RLock()
        self.cache = LRUCache(cache_bytes)
        self._uploads: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._uploads_lock = threading.Lock()
        self.fields: dict[str, ReceptiveField | None] = {}
        self.field_errors: dict[str, str] = {}
        self.refused: dict[str, str] = {}
        _check_hits(atlas, len(self.data))
        for layer in self.layers:
            try:
                field, error = layer_field(self.model, self.input_shape, layer)
            except LayerError as exc:  # the model given lacks the layer: no geometry
                field, error = None, str(exc)
            except ValueError as exc:  # a channels-last layer: every channel would be misread
                field, error = None, str(exc)
                self.refused[layer] = str(exc)
            if field is not None and layer not in self.refused:
                misfit = _misfit(field, self.layer_shape(layer), layer)
                if misfit is not None:  # no box at all rather than boxes of other locations
                    field, error = None, misfit
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
        """A projection method of :data:`featurelens.rules.METHODS`; None:
        :data:`featurelens.rules.DEFAULT_METHOD`.
        """
        name = name or DEFAULT_METHOD
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
        row), as PNG bytes.
        """
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

    # ---- signals: waveforms and audio ------------------------------------------------------
    def _signal(self, ref: InputRef) -> np.ndarray:
        """The 1-D input as the data has it (denormalised with the spec's mean/std): (C, L).

        Raises
        ------
        AtlasError
            The model's inputs are not 1-D signals (C, L).
        """
        if len(self.input_shape) != 2:
            raise AtlasError(
                f"waveforms and audio are for 1-D inputs (channels, samples); this model's inputs "
                f"are {self.input_shape}"
            )
        x = self.input_tensor(ref).detach().double().cpu().numpy()
        spec = self.atlas.data_spec
        if spec is not None and spec.mean is not None and spec.std is not None:
            c = x.shape[0]
            mean = np.broadcast_to(np.asarray(spec.mean, np.float64), (c,))[:, None]
            std = np.broadcast_to(np.asarray(spec.std, np.float64), (c,))[:, None]
            x = x * std + mean
        return x

    def waveform_png(self, ref: InputRef) -> bytes:
        """The 1-D input drawn as waveforms, one row of :data:`WAVEFORM_HEIGHT` pixels per channel.

        Each of the ``min(L, MAX_ROW_PIXELS)`` columns spans the smallest to the largest sample
        it covers, on a scale symmetric about zero (the channel's largest magnitude fills the
        row), so that no peak is lost when a long signal is reduced.

        Raises
        ------
        AtlasError
            The model's inputs are not 1-D signals.
        """

        def compute() -> bytes:
            x = np.nan_to_num(self._signal(ref), nan=0.0, posinf=0.0, neginf=0.0)
            return encode_png(Image.fromarray(_waveform(x, WAVEFORM_HEIGHT), "RGB"))

        return self.cache.get_or_compute(("wave", str(ref)), compute)

    def audio_wav(
        self, ref: InputRef, layer: str | None = None, location: Sequence[int] | None = None
    ) -> bytes:
        """The input (or the receptive field of one location of ``layer``) as a WAV file.

        Mono 16-bit PCM at the atlas's sample rate; channels are averaged and the sound is
        scaled so that its largest magnitude is full scale (a silent window stays silent).

        Parameters
        ----------
        ref
            The input.
        layer, location
            Both or neither: the window of input samples that ``location`` of ``layer`` sees
            (:meth:`rf`), else the whole input.

        Raises
        ------
        AtlasError
            The atlas records no sample rate, or the inputs are not 1-D signals.
        ReceptiveFieldError
            The layer has no receptive field to cut the window from.
        LimitError
            More than :data:`MAX_AUDIO_SAMPLES` samples.
        UsageError
            A layer without a location or a location without a layer.
        """
        rate = getattr(self.atlas, "sample_rate", None)
        if rate is None:
            raise AtlasError(
                "the atlas records no sample rate, so its signals cannot be played: scan data "
                "whose spec or dataset says its sample_rate"
            )
        if (layer is None) != (location is None):
            raise UsageError("audio of a receptive field needs both a layer and a location")
        window = None
        if layer is not None and location is not None:
            window = self.rf(layer, location)["region"][0]
        signal = self._signal(ref)  # AtlasError for inputs that are not signals
        if window is not None:
            signal = signal[:, window[0] : window[1] + 1]
        if signal.shape[1] > MAX_AUDIO_SAMPLES:
            raise LimitError(
                f"{signal.shape[1]} samples exceed the {MAX_AUDIO_SAMPLES} one WAV answer holds"
            )
        key = ("wav", str(ref), None if window is None else tuple(window))
        return self.cache.get_or_compute(key, lambda: encode_wav(signal.mean(0), float(rate)))

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
        self._check_image_model()
        x, width, height = self._decoder.submit(self._decode, raw, invert).result()
        key = hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]
        with self._uploads_lock:
            self._uploads[key] = x
            self._uploads.move_to_end(key)
            while len(self._uploads) > self.max_uploads:
                self._uploads.popitem(last=False)
            self.uploads_added += 1
        return {"input": f"upload:{key}", "width": width, "height": height}

    def _decode(self, raw: bytes, invert: bool) -> tuple[torch.Tensor, int, int]:
        """Decode at reduced size and preprocess: the input tensor and the full image's size."""
        decoded = decode_image(raw, self.max_upload_pixels, self._decode_side())
        return self.preprocess(decoded.image, invert), decoded.width, decoded.height

    def _check_image_model(self) -> None:
        """AtlasError unless the model takes 2-D images of 1 or 3 channels (before decoding)."""
        channels, *spatial = self.input_shape
        if len(spatial) != 2:
            raise AtlasError(f"uploads need a 2-D image model; this one takes {self.input_shape}")
        if channels not in (1, 3):
            raise AtlasError(f"uploads need a 1- or 3-channel model, this one has {channels}")

    def _decode_side(self) -> int:
        """Shorter side an upload is decoded at, at least: twice what :meth:`preprocess` keeps.

        An image folder's data is resized on its shorter side to ``input_size`` and then
        centre-cropped; other data straight to the input size. Decoding at twice that, the
        resize still averages over the pixels as it would from the full-size image.
        """
        _, height, width = self.input_shape
        spec = self.atlas.data_spec
        size = spec.input_size if spec is not None and spec.kind == "folder" else 0
        return 2 * max(height, width, size or 0)

    def preprocess(self, image: Image.Image, invert: bool = False) -> torch.Tensor:
        """Resize and normalise ``image`` like the atlas's data: (C, H, W) in the model's dtype.

        Raises
        ------
        AtlasError
            The atlas's model does not take 2-D images of 1 or 3 channels.
        """
        from torchvision.transforms import functional as F

        self._check_image_model()
        channels, *spatial = self.input_shape
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

    def _maps(self, ref: InputRef, layer: str) -> tuple[torch.Tensor, bool]:
        """:func:`_drawn_maps` of the layer's output for the input."""
        return _drawn_maps(self.activations(ref, layer), layer)

    def activation_layout(self, ref: InputRef, layer: str, scale: str = "layer") -> dict[str, Any]:
        """Where each channel's map is in the sprite, and per-channel peak values and places.

        Returns
        -------
        dict
            ``input``, ``layer``, ``scale``, ``channels``, ``map_shape`` [h, w] of the layer's
            map (a 1-D map is [1, L]), ``cell`` [h, w] of one drawn cell in the sprite,
            ``transposed`` (an (L, 1) map drawn as a row), ``spatial_dims``, ``cols``,
            ``rows``, ``gap`` (pixels between cells), ``min``, ``max``, ``channel_max`` (NaN
            where a map is all NaN), ``channel_argmax`` (one location per channel, by the
            scan's rule), ``signed`` (any negative value).

        Raises
        ------
        AtlasError
            A layer with more than 2 spatial axes.
        """
        scale = self.check_scale(scale)
        return {"input": str(ref), **_layout(self.activations(ref, layer), layer, scale)}

    def activation_png(self, ref: InputRef, layer: str, scale: str = "layer") -> bytes:
        """Every channel's map in one sprite (PNG), laid out as :meth:`activation_layout` says."""
        scale = self.check_scale(scale)

        def compute() -> bytes:
            return _sprite_png(self.activations(ref, layer), layer, scale)

        return self.cache.get_or_compute(("sprite", str(ref), layer, scale), compute)

    # ---- units -----------------------------------------------------------------------------
    def rf_box(self, layer: str, location: tuple[int, ...]) -> RFBox | None:
        """The receptive field of ``location`` on the input; None when the layer has none.

        A layer without spatial axes (logits) has a global field, reported at its one location.

        Raises
        ------
        UsageError
            A location the field does not have.
        ReceptiveFieldError
            The field's locations are not the layer's (a model that changes the rank of its
            data): no box rather than the box of another location.
        """
        field = self.fields.get(layer)
        return None if field is None else _box(field, location, self.layer_shape(layer), layer)

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
        shape = self.layer_shape(layer)
        return _box(field, _check_location(location, shape, layer), shape, layer)

    def layer_shape(self, layer: str) -> tuple[int, ...]:
        """Spatial shape of ``layer``'s maps in its own rank, as the atlas recorded it."""
        return tuple(int(n) for n in self.atlas.layer(layer).output_shape)

    def unit(
        self, ref: InputRef, layer: str, channel: int, location: Sequence[int] | None = None
    ) -> UnitAnswer:
        """A unit on an input: its location (default: the arg-max), value and receptive field.

        The field is None, with ``rf_error`` saying why, when the layer has none or when its
        field's locations are not the layer's (never the box of another location).
        """
        channel = self.check_channel(self.check_layer(layer), channel)
        loc = self.location(ref, layer, channel, location)
        act = self.activations(ref, layer)
        try:
            box, why = self.rf_box(layer, loc), self.field_errors.get(layer)
        except ReceptiveFieldError as exc:
            box, why = None, str(exc)
        return {
            "input": str(ref),
            "layer": layer,
            "channel": channel,
            "location": list(loc),
            "value": float(act[(channel, *loc)]),
            "rf": box,
            "rf_error": why,
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
            Names in ``METHODS`` and ``STYLES``; None: ``DEFAULT_METHOD`` and the first style.

        Returns
        -------
        bytes
            A PNG of the input's size; a signal's projection is one row of pixels.

        Raises
        ------
        ActivationError
            A rectifier without a rule for ``method``.
        AtlasError
            A model of 3-D inputs (the picture would be a volume).
        """
        channel = self.check_channel(self.check_layer(layer), channel)
        method, style = self.check_method(method), self.check_style(style)
        if len(self.input_shape) > 3:
            raise AtlasError(
                f"projection images are drawn for 1-D and 2-D inputs; this model's inputs are "
                f"{self.input_shape} (3 spatial axes): call featurelens.project(...) from Python, "
                "or see the Zeiler-Fergus grid (/api/zf.png), which draws volumes slice by slice"
            )
        loc = self.location(ref, layer, channel, location)

        def compute() -> bytes:
            x = self.input_tensor(ref).to(self.device)[None]
            with self._using_model():
                maps = project(
                    self.model, x, layer, channel, location=loc, method=method,
                    other_activations=self.other_activations, field=self.fields[layer],
                )  # fmt: skip
            return _projection_png(maps[0], style)

        key = ("proj", str(ref), layer, channel, loc, method, style)
        return self.cache.get_or_compute(key, compute)

    # ---- live video --------------------------------------------------------------------------
    def frame(
        self,
        raw: bytes,
        layer: str,
        channel: int | None = None,
        location: Sequence[int] | None = None,
        method: str | None = None,
        style: str | None = None,
        scale: str | None = None,
        invert: bool = False,
    ) -> dict[str, Any]:
        """One video frame: the layer's activations and, for a channel, the unit's projection.

        The frame (a PNG or JPEG, as an upload; nothing is kept) is preprocessed like an upload
        and run through the model truncated at ``layer`` *once*, under the method's rule and
        with gradients on: the layer's output gives the activation sprite and the unit's value,
        and one backward pass from the unit gives its projection on the whole frame (what
        :func:`featurelens.project` with ``crop=False`` computes; equal to it).

        Parameters
        ----------
        raw
            The frame's bytes.
        layer
            The layer whose maps are drawn.
        channel, location
            The unit to project; None: no projection (``location`` None: the channel's arg-max
            on this frame).
        method, style, scale
            As for :meth:`projection_png` and :meth:`activation_png`.
        invert
            As for :meth:`add_upload`.

        Returns
        -------
        dict
            ``layout`` (as :meth:`activation_layout`, ``input`` ``"frame"``), ``sprite`` (PNG
            bytes), and with a channel: ``unit`` (as :meth:`unit`) and ``projection`` (PNG
            bytes of the input's size); ``seconds``: the time the model took.

        Raises
        ------
        LimitError, FormatError, UsageError
            As for :meth:`add_upload`: too large, not a PNG/JPEG, empty.
        AtlasError
            Not a model of 2-D images of 1 or 3 channels.
        ActivationError
            A rectifier without a rule for ``method`` (see ``other_activations``).
        """
        layer = self.check_layer(layer)
        if channel is not None:
            channel = self.check_channel(layer, channel)
        method, style = self.check_method(method), self.check_style(style)
        scale = self.check_scale(scale)
        if len(raw) > self.max_upload_bytes:
            raise LimitError(
                f"frame of {len(raw)} bytes exceeds the limit of {self.max_upload_bytes}"
            )
        if not raw:
            raise UsageError("empty frame: send a PNG or JPEG image")
        self._check_image_model()
        x, _, _ = self._decoder.submit(self._decode, raw, invert).result()
        start = time.perf_counter()
        act, grad, loc = self._frame_pass(x, layer, channel, location, method)
        seconds = time.perf_counter() - start
        answer: dict[str, Any] = {
            "layout": {"input": "frame", **_layout(act, layer, scale)},
            "sprite": _sprite_png(act, layer, scale),
            "seconds": seconds,
        }
        if channel is not None and loc is not None and grad is not None:
            try:
                box, why = self.rf_box(layer, loc), self.field_errors.get(layer)
            except ReceptiveFieldError as exc:
                box, why = None, str(exc)
            answer["unit"] = {
                "input": "frame",
                "layer": layer,
                "channel": channel,
                "location": list(loc),
                "value": float(act[(channel, *loc)]),
                "rf": box,
                "rf_error": why,
            }
            answer["projection"] = _projection_png(grad, style)
        return answer

    def _frame_pass(
        self,
        x: torch.Tensor,
        layer: str,
        channel: int | None,
        location: Sequence[int] | None,
        method: str,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...] | None]:
        """One truncated forward of ``x`` (C, *spatial) under ``method``'s rule, and the
        backward pass from the unit: (layer output (C', *spatial'), projection (C, *spatial)
        or None, the unit's location or None), on the CPU.
        """
        with (
            self._using_model(),
            preserved(self.model),
            torch.inference_mode(False),
            torch.enable_grad(),
            rule_mode(self.model, method, self.other_activations),
        ):
            xg = x.to(self.device)[None].clone().requires_grad_(channel is not None)
            with capture(self.model, [layer]) as run:
                out = run(xg)[layer]
            act = out[0].detach().to("cpu").clone()
            if channel is None:
                return act, None, None
            if location is None:
                loc = argmax_location(act[channel])
            else:
                loc = _check_location(location, tuple(act.shape[1:]), layer)
            (grad,) = torch.autograd.grad(out[(0, channel, *loc)], xg)
        return act, grad[0].detach().to("cpu"), loc

    def zf_png(
        self,
        layer: str,
        channel: int,
        method: str | None = None,
        style: str | None = None,
        k: int | None = None,
    ) -> bytes:
        """The channel's Zeiler-Fergus grid (:func:`featurelens.zf_grid`) as PNG.

        ``method``/``style`` None: ``DEFAULT_METHOD`` and the first style; ``k`` None: every
        hit of the atlas. The explorer's ``other_activations`` applies.

        Raises
        ------
        DataError
            One of the hits' examples fails to load or is not of the atlas's input shape (the
            data changed since the scan).
        """
        channel = self.check_channel(self.check_layer(layer), channel)
        method, style = self.check_method(method), self.check_style(style)
        k = self.check_k(layer, channel, k)

        def compute() -> bytes:
            for hit in self.atlas.top(layer, channel)[:k]:  # DataError for a broken example
                self.input_tensor(InputRef("dataset", hit.index))
            with self._using_model():
                image = zf_grid(
                    self.model, self.data, self.atlas, layer, channel, method=method, k=k,
                    style=style, other_activations=self.other_activations,
                )  # fmt: skip
            return encode_png(image)

        return self.cache.get_or_compute(("zf", layer, channel, method, style, k), compute)

    def top(self, layer: str, channel: int) -> list[TopHit]:
        """The channel's top hits in the atlas, best first."""
        channel = self.check_channel(self.check_layer(layer), channel)
        return [
            {
                "index": int(h.index),
                "score": float(h.score),
                "location": list(h.location),
                "label": _label(h.label),
            }
            for h in self.atlas.top(layer, channel)
        ]

    def label_histogram(self, layer: str, channel: int) -> dict[str, Any] | None:
        """How the channel's top hits spread over labels (:meth:`featurelens.Atlas.label_histogram`)
        as JSON values; None when the atlas records no labels.

        Returns
        -------
        dict or None
            ``kind`` (``int``, ``float``, ``str``), ``bins`` (labels; ``[low, high]`` intervals
            for ``float``), ``counts`` and ``missing`` (NaN labels).
        """
        channel = self.check_channel(self.check_layer(layer), channel)
        if getattr(self.atlas, "label_kind", None) is None:
            return None
        hist = self.atlas.label_histogram(layer, channel)
        bins = [list(map(float, b)) if isinstance(b, tuple) else _label(b) for b in hist.bins]
        return {
            "kind": hist.kind,
            "bins": bins,
            "counts": [int(n) for n in hist.counts],
            "missing": int(hist.missing),
        }

    def info(self) -> dict[str, Any]:
        """What the page needs to start: specs, sizes, layers with their fields, menus, limits.

        Model and data specs are shown with the file names they mention, never their
        absolute paths (``/home/me/nets/model.py:build`` is shown as ``model.py:build``): the
        page is for looking at features, not for learning where files are.
        """
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
            "model": _public_spec(getattr(self.atlas, "model_spec", None)),
            "data": _public_spec(spec),
            "data_size": len(self.data),
            "input_shape": list(self.input_shape),
            "sample_rate": getattr(self.atlas, "sample_rate", None),
            "labels": getattr(self.atlas, "label_kind", None),
            "top_k": int(getattr(self.atlas, "top_k", 9)),
            "layers": layers,
            "methods": self.methods,
            "method_help": self.method_help,
            "default_method": DEFAULT_METHOD,
            "other_activations": self.other_activations,
            "styles": self.styles,
            "style_help": self.style_help,
            "scales": list(SCALES),
            "max_upload_bytes": self.max_upload_bytes,
            "max_upload_pixels": self.max_upload_pixels,
        }


def _label(label: Any) -> int | float | str | None:
    """A label as a JSON value (numpy scalars as Python numbers)."""
    if label is None or isinstance(label, str):
        return label
    if isinstance(label, (bool, np.bool_)):
        return int(label)
    if isinstance(label, (int, np.integer)):
        return int(label)
    return float(label)


def _public_spec(spec: Any) -> Any:
    """A spec's fields as JSON values, every absolute path in them cut to its file name."""
    if spec is None:
        return None
    fields = spec.to_dict() if hasattr(spec, "to_dict") else {"spec": str(spec)}
    return {k: public_name(v) if isinstance(v, str) else v for k, v in fields.items()}


def public_name(text: str) -> str:
    r"""``text`` (a spec, a file or folder) with an absolute path cut to its last component.

    ``/home/me/nets/model.py:build`` -> ``model.py:build``, ``/data/photos`` -> ``photos``,
    ``C:\\nets\\m.py:f`` -> ``m.py:f``; names that are not absolute paths
    (``torchvision:resnet18``, ``mnist``, ``pkg.module:factory``, ``../model/net.pt``) are
    returned as they are.
    """
    where, sep, name = text.rpartition(":")
    if not sep or not name.isidentifier() or len(where) < 2:
        where, sep, name = text, "", ""  # no ':factory' part (a drive letter is not one)
    windows = len(where) > 2 and where[1] == ":" and where[2] in "/\\"
    if not (where.startswith(("/", "\\")) or windows):
        return text
    base = where.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "/"
    return base + sep + name


def _check_hits(atlas: Any, data_size: int) -> None:
    """AtlasError unless every layer's hits fit the layer and index examples of the data.

    What the explorer reads of an atlas (:meth:`featurelens.Atlas.top`) must hold together:
    (C, K) indices and scores, (C, K, D) locations inside the layer's (D-dimensional) map, and
    indices in ``0..data_size - 1`` (or -1 for an empty slot). Checked once, when the explorer
    starts, so that no request can fail on it later.
    """
    for layer in atlas.layers:
        top = atlas.layer(layer)
        indices, scores = np.asarray(top.indices), np.asarray(top.scores)
        locations, shape = np.asarray(top.locations), tuple(top.output_shape)
        where = f"atlas layer {layer!r}"
        if indices.ndim != 2 or scores.shape != indices.shape:
            raise AtlasError(
                f"{where}: hit indices must be (channels, k) with scores of the same shape, got "
                f"indices {indices.shape} and scores {scores.shape}"
            )
        if locations.shape != (*indices.shape, len(shape)):
            raise AtlasError(
                f"{where}: hit locations must be {(*indices.shape, len(shape))} for a map of "
                f"spatial shape {shape}, got {locations.shape}"
            )
        integers = [np.issubdtype(a.dtype, np.integer) for a in (indices, locations)]
        if not all(integers):
            raise AtlasError(f"{where}: hit indices and locations must be integers")
        used = indices >= 0
        bad = (indices < -1) | (indices >= data_size)
        if bad.any():
            channel, k = (int(v) for v in np.argwhere(bad)[0])
            raise AtlasError(
                f"{where}: hit {k} of channel {channel} is example {int(indices[channel, k])}, "
                f"but the data has examples 0..{data_size - 1}: is this the atlas of this data?"
            )
        outside = used[..., None] & ((locations < 0) | (locations >= np.asarray(shape, int)))
        if outside.any():
            channel, k, _ = (int(v) for v in np.argwhere(outside)[0])
            raise AtlasError(
                f"{where}: hit {k} of channel {channel} is at "
                f"{tuple(int(v) for v in locations[channel, k])}, outside the layer's map "
                f"{shape}"
            )


def _check_location(location: Sequence[int], shape: Sequence[int], layer: str) -> tuple[int, ...]:
    """``location`` on a map of spatial ``shape``: UsageError if the rank differs, NotFoundError
    if outside.
    """
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


def _box(
    field: ReceptiveField, location: tuple[int, ...], layer_shape: Sequence[int], layer: str
) -> RFBox:
    """The field of ``location`` (in the layer's own rank, on its map of ``layer_shape``).

    The box is read from the field only where the field's locations are the layer's: its
    ``output_shape`` is the layer's map (``region`` then maps a location to the input's axes),
    or the layer has no spatial axes and the field one location (a classifier's logits, a
    global field). Anything else (a model that unsqueezes its ``(N, 1, L)`` input to 2-D maps
    over ``(L, 1)``, when the field is on the input's axes) is refused: no box is ever drawn
    from another location.

    Raises
    ------
    ReceptiveFieldError
        The field's locations are not the layer's.
    UsageError
        A location the field does not have.
    """
    why = _misfit(field, layer_shape, layer)
    if why is not None:
        raise ReceptiveFieldError(why)
    rf_loc = tuple(location) if location else (0,) * len(field.output_shape)
    try:
        interval = field.interval(rf_loc) if getattr(field, "regular", True) else None
        region = field.region(rf_loc)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return {
        "location": list(rf_loc),
        "interval": None if interval is None else [list(v) for v in interval],
        "region": [[s.start, s.stop - 1] for s in region],
        "is_global": field.is_global,
    }


def _misfit(field: ReceptiveField, layer_shape: Sequence[int], layer: str) -> str | None:
    """Why ``field``'s locations are not those of ``layer``'s maps (``layer_shape``), or None.

    They are when the field's ``output_shape`` is the layer's map, or when the layer has no
    spatial axes and the field one location (a classifier's logits).
    """
    layer_shape = tuple(int(n) for n in layer_shape)
    field_shape = tuple(int(n) for n in field.output_shape)
    if field_shape == layer_shape or (not layer_shape and all(n == 1 for n in field_shape)):
        return None
    return (
        f"layer {layer!r} has maps of shape {list(layer_shape)} ({len(layer_shape)} axes) but "
        f"its receptive field was computed over locations of shape {list(field_shape)} (the "
        f"input has {field.ndim} spatial axes): the model changes the rank of its data (e.g. "
        "it unsqueezes a signal to 2-D maps) and the explorer cannot say which input positions "
        "a location sees, so it draws no box rather than a wrong one"
    )


def _argmax_locations(act: torch.Tensor) -> list[list[int]]:
    """Per channel of ``act`` (C, *spatial): where its map peaks, by the scan's rule."""
    if act.dim() == 1:
        return [[] for _ in range(act.shape[0])]
    flat = first_argmax(act.reshape(act.shape[0], -1))  # (C,) first maximum, NaN ignored
    return torch.stack(torch.unravel_index(flat, tuple(act.shape[1:])), dim=-1).tolist()


def encode_wav(samples: np.ndarray, rate: float) -> bytes:
    """Mono ``samples`` (L,) as a 16-bit PCM WAV file at ``rate`` (rounded to whole Hz),
    scaled so that the largest magnitude is full scale; NaN and infinities play as silence.

    Raises
    ------
    UsageError
        A rate that rounds to less than 1 Hz or more than WAV's 2**32 - 1.
    """
    import wave

    hz = round(rate)
    if not 1 <= hz <= 2**32 - 1:
        raise UsageError(
            f"sample rate {rate!r} cannot be written to a WAV file (1 .. 2**32 - 1 Hz)"
        )
    x = np.nan_to_num(np.asarray(samples, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(np.abs(x).max()) if x.size else 0.0
    pcm = np.round(x / peak * 32767).astype("<i2") if peak > 0 else np.zeros(x.shape, "<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(hz)
        out.writeframes(pcm.tobytes())
    return buf.getvalue()


def _waveform(x: np.ndarray, height: int) -> np.ndarray:
    """Signals (C, L) as RGB waveforms (C * height + C - 1, min(L, MAX_ROW_PIXELS), 3), uint8."""
    channels, length = x.shape
    width = min(length, MAX_ROW_PIXELS)
    edges = np.linspace(0, length, width + 1).round().astype(int)
    starts = edges[:-1]  # column q covers samples starts[q] .. edges[q + 1] - 1 (at least one)
    lo = np.minimum.reduceat(x, starts, axis=1)
    hi = np.maximum.reduceat(x, starts, axis=1)
    sheet = np.full((channels * (height + 1) - 1, width, 3), 24, np.uint8)
    rows = np.arange(height)[:, None]
    for c in range(channels):
        peak = float(np.abs(x[c]).max()) or 1.0
        top = np.floor((height - 1) * (1 - hi[c] / peak) / 2)  # larger values higher up
        bottom = np.ceil((height - 1) * (1 - lo[c] / peak) / 2)
        band = sheet[c * (height + 1) : c * (height + 1) + height]
        band[height // 2] = (70, 70, 70)  # the zero line
        band[(rows >= top) & (rows <= bottom)] = (120, 200, 255)
    return sheet


def _drawn_maps(act: torch.Tensor, layer: str) -> tuple[torch.Tensor, bool]:
    """Per-channel maps of ``act`` (C, *spatial) as drawn, (C, h, w), and whether transposed.

    1-D maps become one row, scalars one pixel; a 2-D map of one column ``(L, 1)`` (a signal a
    model unsqueezed to 2-D) is drawn as the row ``(1, L)`` (transposed), not as a tile ``L``
    pixels tall. Rows longer than :data:`MAX_ROW_PIXELS` are reduced: each drawn pixel shows
    the value of largest magnitude among the samples it covers.

    Raises
    ------
    AtlasError
        More than 2 spatial axes.
    """
    transposed = False
    if act.dim() == 1:
        maps = act.reshape(-1, 1, 1)
    elif act.dim() == 2:
        maps = act[:, None, :]
    elif act.dim() == 3:
        maps = act
        if act.shape[2] == 1 and act.shape[1] > 1:
            maps, transposed = act.transpose(1, 2), True
    else:
        raise AtlasError(
            f"layer {layer!r} has {act.dim() - 1} spatial axes; the explorer draws 1-D and 2-D maps"
        )
    if maps.shape[1] == 1 and maps.shape[2] > MAX_ROW_PIXELS:
        maps = _reduce_row(maps, MAX_ROW_PIXELS)
    return maps, transposed


def _layout(act: torch.Tensor, layer: str, scale: str) -> dict[str, Any]:
    """:meth:`Explorer.activation_layout` of a layer output ``act`` (C, *spatial), but the input."""
    maps, transposed = _drawn_maps(act, layer)
    channels, h, w = maps.shape
    spatial = [int(n) for n in act.shape[1:]]
    map_shape = [1, 1] if not spatial else [1, spatial[0]] if len(spatial) == 1 else spatial
    cols = max(1, math.ceil(math.sqrt(channels * h / w))) if w else 1
    cols = min(cols, channels)
    rows = math.ceil(channels / cols)
    flat = act.reshape(channels, -1)
    return {
        "layer": layer,
        "scale": scale,
        "channels": channels,
        "map_shape": map_shape,
        "cell": [h, w],
        "transposed": transposed,
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


def _sprite_png(act: torch.Tensor, layer: str, scale: str) -> bytes:
    """Every channel's map of ``act`` (C, *spatial) in one sprite, as :func:`_layout` says."""
    maps, _ = _drawn_maps(act, layer)
    layout = _layout(act, layer, scale)
    return encode_png(_sprite(maps, layout["cols"], layout["rows"], layout["gap"], scale))


def _projection_png(proj: torch.Tensor, style: str) -> bytes:
    """A projection (C, *spatial) rendered in ``style`` as PNG; a signal's is one row."""
    rgb = render_projection(proj.detach().cpu(), style)  # (*spatial, 3) in [0, 1]
    if rgb.ndim == 2:  # a signal: one row of pixels, as /api/input.png draws it
        rgb = rgb[None]
    return encode_png(Image.fromarray(np.round(rgb * 255).astype(np.uint8), "RGB"))


def _reduce_row(maps: torch.Tensor, width: int) -> torch.Tensor:
    """Rows (C, 1, L) reduced to ``width`` pixels: each the value of largest magnitude (NaN
    first) among the ``ceil(L / width)`` samples it covers (the last pixel may cover fewer).
    """
    channels, _, length = maps.shape
    group = math.ceil(length / width)
    pad = group * math.ceil(length / group) - length
    padded = torch.nn.functional.pad(maps[:, 0], (0, pad), value=0.0)
    blocks = padded.reshape(channels, -1, group)
    magnitude = blocks.abs().nan_to_num(nan=math.inf)
    pick = magnitude.argmax(-1, keepdim=True)
    return blocks.gather(-1, pick)[..., 0][:, None, :]


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
