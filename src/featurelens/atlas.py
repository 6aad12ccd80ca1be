"""The atlas: maximally activating examples of many layers, and its on-disk format.

This module owns the format: :class:`Manifest` is ``manifest.json`` as typed, frozen records
(read, validated, written and compared here and nowhere else), :class:`Atlas` pairs it with
the top-k arrays. An atlas directory holds ``manifest.json`` (what was scanned, how, and how
far) and one ``arrays-<sha256>.npz`` with the top-k hits of every layer (and the labels of the
hits). The format is documented in ``docs/atlas-format.md``; :data:`FORMAT_VERSION` changes
whenever a reader of the previous version would misread a new atlas.

Reading is safe with atlases from anyone: :meth:`Atlas.load` checks the manifest against the
format (types, ranges, bounds of :data:`LIMITS`), reads only the atlas's own regular files
(no paths, no links), checks the arrays' names, shapes and dtypes from their ``.npy`` headers
before reading any data and refuses compressed ones, and raises one :class:`AtlasError` naming
the file, the key and what is wrong. It imports and runs nothing.

Rebuilding the model and data (:meth:`Atlas.build_model`, :meth:`Atlas.build_data`) may run
code that the manifest names (a ``file.py:factory`` spec). That needs the atlas to be trusted:
made by this user on this machine (signed into the user's store, :mod:`featurelens.trust`, when
a scan saves it), or opened with ``trust_code=True``. Otherwise an
:class:`~featurelens.errors.UntrustedAtlasError` shows what would run, before anything is
imported. The model rebuilt is still checked against the scanned parameters' fingerprint.

Writes are atomic: the arrays go to a new content-named file, then the manifest that names it
replaces the old one with ``os.replace`` (the commit point), then stale array files are
removed. A process killed at any moment leaves either the old atlas or the new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import io
import json
import math
import os
import re
import stat
import warnings
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from featurelens._version import __version__
from featurelens.data import LABEL_KINDS, MAX_LABEL_CHARS, Label, SizedDataset
from featurelens.errors import AtlasError, ChannelError, LayerError, SpecError, UntrustedAtlasError
from featurelens.files import atomic_write
from featurelens.fingerprint import model_fingerprint, sha256_hex
from featurelens.graph import unknown_name_message
from featurelens.specs import (
    CodeReference,
    DataSpec,
    ModelSpec,
    absolute_spec,
    code_reference,
    near_spec,
)
from featurelens.trust import TRUSTED, is_signed, sign
from featurelens.trust import home as trust_home

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LAYOUTS",
    "LIMITS",
    "MANIFEST",
    "READABLE_VERSIONS",
    "SCORE_NAMES",
    "ArraysRecord",
    "Atlas",
    "AtlasError",
    "ChannelError",
    "DataRecord",
    "DataSpecRecord",
    "Hit",
    "LabelHistogram",
    "LayerRecord",
    "LayerTop",
    "Limits",
    "Manifest",
    "ModelRecord",
    "Preprocessing",
    "Progress",
    "ScanIdentity",
    "SkippedExample",
    "UntrustedAtlasError",
]

FORMAT_NAME = "featurelens-atlas"
#: The version this featurelens writes. 2 added labels, the sample rate, layer layouts and
#: paths relative to the atlas directory (see ``docs/atlas-format.md``, version history).
FORMAT_VERSION = 2
#: The versions this featurelens reads (and writes back as they were).
READABLE_VERSIONS = (1, 2)
#: The manifest's file name inside an atlas directory.
MANIFEST = "manifest.json"
#: The keys of :data:`featurelens.scan.SCORES` (here so that reading needs no scan import).
SCORE_NAMES = ("max", "absmax", "mean")
#: Where a layer's channels are: ``(N, C, *spatial)``, ``(N, *spatial, C)``, ``(N, T, C)``.
LAYOUTS = ("channels_first", "channels_last", "tokens")
_ARRAYS_FILE = re.compile(r"arrays-[0-9a-f]{16}\.npz")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
#: Array names of an optional per-layer section a later version of this format may add
#: (``{i}.<section>`` or ``{i}.<section>.<name>``): checked to be uncompressed, never read.
_OPTIONAL_ARRAY = re.compile(r"(\d+)\.[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")
_LAYER_ARRAYS = ("indices", "scores", "locations", "nan_counts")


@dataclass(frozen=True)
class Limits:
    """Bounds on what an atlas may declare, checked before anything is allocated for it.

    Attributes
    ----------
    manifest_bytes
        Size of ``manifest.json`` (64 MiB).
    input_elements
        Elements of one example, the product of ``input_shape`` (2**23: 3 x 1,672 x 1,672, or
        three minutes of audio at 44.1 kHz); larger inputs make figures and the explorer need
        GBs.
    axis
        Any one axis of ``input_shape`` or of a layer's ``output_shape`` (2**22).
    output_elements
        Elements of one channel's map, the product of ``output_shape`` (2**24).
    rank
        Axes of ``input_shape`` (1 to ``rank``) and of ``output_shape`` (0 to ``rank``): 5.
    channels
        Channels of a layer (2**20).
    top_k
        Hits per channel (2**16).
    layers
        Layers of an atlas (4,096).
    integer
        Any other integer (2**53, exact in every JSON reader).
    text
        Characters of a name or spec (4,096).
    """

    manifest_bytes: int = 64 * 2**20
    input_elements: int = 2**23
    axis: int = 2**22
    output_elements: int = 2**24
    rank: int = 5
    channels: int = 2**20
    top_k: int = 2**16
    layers: int = 4096
    integer: int = 2**53
    text: int = 4096


#: The bounds :meth:`Manifest.from_json` checks (documented in ``docs/atlas-format.md``).
LIMITS = Limits()


@dataclass(frozen=True)
class Hit:
    """One maximally activating example of a channel.

    Attributes
    ----------
    index
        Dataset index of the example.
    score
        Its score for the channel (see :data:`featurelens.scan.SCORES`); NaN when the whole map
        was NaN.
    location
        Where the channel's map peaks (the arg-max of the score's per-location values): one
        int per spatial axis of the layer's output, ``()`` for layers without spatial axes.
    label
        The example's label (an int, float or str) when the dataset yields ``(x, label)`` and
        the atlas records labels, else None. Not compared: two hits are equal when they are
        the same example, score and location.
    """

    index: int
    score: float
    location: tuple[int, ...]
    label: Label | None = field(default=None, compare=False)


@dataclass
class LayerTop:
    """The top-k state of one layer; empty slots have index -1 and score NaN.

    Attributes
    ----------
    indices
        (C, K) int64 dataset indices, best first.
    scores
        (C, K) float64 scores.
    locations
        (C, K, D) int64 arg-max locations, D = number of spatial axes.
    nan_counts
        (C,) int64: examples whose map for the channel held at least one NaN.
    output_shape
        Spatial shape of the layer's output (length D).
    """

    indices: np.ndarray
    scores: np.ndarray
    locations: np.ndarray
    nan_counts: np.ndarray
    output_shape: tuple[int, ...]

    @property
    def channels(self) -> int:
        """C, the number of channels."""
        return int(self.indices.shape[0])


@dataclass(frozen=True)
class LabelHistogram:
    """How a channel's top hits are spread over labels (:meth:`Atlas.label_histogram`).

    Attributes
    ----------
    kind
        ``"int"``, ``"float"`` or ``"str"``: the atlas's label kind.
    bins
        ``int`` and ``str`` labels: each distinct label. ``float`` labels: ``(low, high)``
        intervals of equal width from the smallest to the largest label (each includes its
        low end; the last also its high end).
    counts
        Hits per bin; ints and strings most frequent first (ties: smaller label first), float
        intervals in ascending order.
    missing
        Hits whose float label is NaN (in no bin).
    """

    kind: str
    bins: tuple[Any, ...]
    counts: tuple[int, ...]
    missing: int = 0

    def items(self) -> list[tuple[Any, int]]:
        """``[(bin, count), ...]`` in the order of :attr:`bins`."""
        return list(zip(self.bins, self.counts, strict=True))


# --------------------------------------------------------------------------------------------
# Reading JSON with a path for every message


_JSON_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "the boolean"),  # before int: a bool is an int in Python, not in JSON
    (int, "the number"),
    (float, "the number"),
    (str, "the string"),
    (list, "the array"),
    (dict, "the object"),
)


def _shown(value: object) -> str:
    """``the string "false"``: a JSON value as a message shows it (its type, then its text)."""
    if value is None:
        return "null"
    kind = next((name for t, name in _JSON_TYPES if isinstance(value, t)), type(value).__name__)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return f"{kind} {text[:60] + '...' if len(text) > 60 else text}"


@dataclass(frozen=True)
class _Node:
    """A JSON value of a manifest being read, with the file and the key path it came from.

    Every accessor checks the JSON type and raises :class:`AtlasError` naming the file, the
    key (``data.spec.mean[0]``) and what was found; readers of the records below go through
    it, so that a malformed manifest never surfaces as ``KeyError`` or ``TypeError``.
    """

    value: object
    source: str
    key: str = ""

    def error(self, problem: str) -> AtlasError:
        """An :class:`AtlasError` for this value: ``atlas manifest FILE: KEY PROBLEM``."""
        where = repr(self.key) if self.key else "the top level"
        return AtlasError(f"atlas manifest {self.source!r}: {where} {problem}")

    def expected(self, what: str) -> AtlasError:
        """``... KEY must be WHAT, got the string "x"``."""
        return self.error(f"must be {what}, got {_shown(self.value)}")

    def _join(self, key: str) -> str:
        return f"{self.key}.{key}" if self.key else key

    def fields(self) -> dict[str, object]:
        """The value as a JSON object."""
        if not isinstance(self.value, dict):
            raise self.expected("an object")
        return self.value

    def get(self, key: str) -> _Node:
        """The value of a required key of this object."""
        fields = self.fields()
        if key not in fields:
            raise AtlasError(f"atlas manifest {self.source!r}: key {self._join(key)!r} is missing")
        return _Node(fields[key], self.source, self._join(key))

    def get_optional(self, key: str) -> _Node | None:
        """The value of an optional key of this object (None when absent)."""
        fields = self.fields()
        return _Node(fields[key], self.source, self._join(key)) if key in fields else None

    def is_null(self) -> bool:
        return self.value is None

    def elements(self, most: int | None = None) -> list[_Node]:
        """The elements of a JSON array (at most ``most``), keyed ``key[i]``."""
        if not isinstance(self.value, list):
            raise self.expected("an array")
        if most is not None and len(self.value) > most:
            raise self.error(f"has {len(self.value)} elements; at most {most} are allowed")
        return [_Node(v, self.source, f"{self.key}[{i}]") for i, v in enumerate(self.value)]

    def as_int(self, minimum: int = 0, maximum: int = LIMITS.integer) -> int:
        """An integer (not a boolean) ``>= minimum`` (and ``<= maximum``)."""
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.expected(f"an integer >= {minimum}")
        if v > maximum:
            raise self.expected(f"an integer <= {maximum}")
        return v

    def as_number(self) -> float:
        """A finite number (int or float, kept as written so that it is written back the same)."""
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.expected("a number")
        if not math.isfinite(v) or abs(v) > 1e300:
            raise self.expected("a finite number")
        return v

    def as_positive_number(self) -> float:
        """A finite number > 0."""
        v = self.as_number()
        if v <= 0:
            raise self.expected("a positive number")
        return v

    def as_str(self, most: int | None = None) -> str:
        """A string (of at most ``most`` characters)."""
        if not isinstance(self.value, str):
            raise self.expected("a string")
        if most is not None and len(self.value) > most:
            raise self.error(f"is a string of {len(self.value)} characters; at most {most}")
        return self.value

    def as_choice(self, choices: tuple[str, ...]) -> str:
        """A string, one of ``choices``."""
        if self.as_str() not in choices:
            raise self.expected("one of " + ", ".join(repr(c) for c in choices))
        return self.as_str()

    def as_pattern(self, pattern: re.Pattern[str], what: str) -> str:
        """A string matching ``pattern`` whole (``what`` says what it should look like)."""
        if not pattern.fullmatch(self.as_str()):
            raise self.expected(what)
        return self.as_str()

    def as_bool(self) -> bool:
        """``true`` or ``false``: the string ``"false"`` or the number 0 is refused."""
        if not isinstance(self.value, bool):
            raise self.expected("true or false")
        return self.value

    def as_optional_str(self, most: int | None = None) -> str | None:
        return None if self.is_null() else self.as_str(most)

    def as_optional_int(self, minimum: int = 0, maximum: int = LIMITS.integer) -> int | None:
        return None if self.is_null() else self.as_int(minimum, maximum)

    def as_shape(self, most_axes: int, axis: int) -> tuple[int, ...]:
        """An array of at most ``most_axes`` integers in ``0..axis``."""
        return tuple(e.as_int(0, axis) for e in self.elements(most_axes))

    def as_numbers(self) -> tuple[float, ...] | None:
        """Null or an array of finite numbers."""
        if self.is_null():
            return None
        return tuple(e.as_number() for e in self.elements(LIMITS.channels))


def _normalisation(node: _Node) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``mean`` and ``std`` of ``node``: both or neither, as long as each other, std > 0."""
    mean, std = node.get("mean").as_numbers(), node.get("std").as_numbers()
    if (mean is None) != (std is None):
        raise node.error("has one of mean and std without the other")
    if mean is not None and std is not None:
        if len(mean) != len(std):
            raise node.error(f"has {len(mean)} means and {len(std)} stds; they go per channel")
        if any(s <= 0 for s in std):
            raise node.get("std").expected("positive numbers")
    return mean, std


# --------------------------------------------------------------------------------------------
# The manifest's records: one frozen dataclass per JSON object, read and written here only

JsonObject = dict[str, Any]


def _model_spec_json(spec: ModelSpec | None) -> JsonObject | None:
    if spec is None:
        return None
    return {"spec": spec.spec, "weights": spec.weights, "checkpoint": spec.checkpoint}


@dataclass(frozen=True)
class ModelRecord:
    """``manifest["model"]``: the scanned model.

    Attributes
    ----------
    spec
        How to rebuild it (``{"spec", "weights", "checkpoint"}``), None when it was scanned from
        a Python object without a spec. Paths are stored as written; see
        :attr:`Atlas.model_spec` for how they are resolved.
    class_name
        The model's class name (``"class"``, informative).
    fingerprint
        ``sha256:<hex>`` over every parameter and buffer
        (:func:`featurelens.fingerprint.model_fingerprint`).
    """

    spec: ModelSpec | None
    class_name: str
    fingerprint: str

    def to_json_value(self) -> JsonObject:
        """The JSON object, keys in the order of the format."""
        return {
            "spec": _model_spec_json(self.spec),
            "class": self.class_name,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_node(cls, node: _Node) -> ModelRecord:
        """Read and check ``node``; an :class:`AtlasError` names the key that is wrong."""
        spec_node = node.get("spec")
        spec = None
        if not spec_node.is_null():
            text = spec_node.get("spec").as_str(LIMITS.text)
            if not text:
                raise spec_node.get("spec").expected("a non-empty string")
            try:
                spec = ModelSpec(
                    spec=text,
                    weights=spec_node.get("weights").as_optional_str(LIMITS.text),
                    checkpoint=spec_node.get("checkpoint").as_optional_str(LIMITS.text),
                )
            except SpecError as exc:
                raise spec_node.error(f"is not a valid model spec: {exc}") from exc
        fingerprint = node.get("fingerprint").as_pattern(
            _FINGERPRINT, '"sha256:" and 64 hex digits'
        )
        return cls(spec, node.get("class").as_str(LIMITS.text), fingerprint)


@dataclass(frozen=True)
class DataSpecRecord:
    """``manifest["data"]["spec"]``: how to rebuild the dataset, as recorded.

    Kept apart from :class:`~featurelens.specs.DataSpec`, which checks its spec against the
    file system when made (an image folder must exist): reading a manifest touches nothing
    but the manifest. :meth:`to_spec` makes the ``DataSpec`` when it is needed.

    Attributes
    ----------
    spec
        ``"mnist"``, an image folder, or ``file.py:factory`` / ``package.module:factory``.
    input_size
        Image folders: the side of the centre crop; None otherwise.
    mean, std
        Per-channel normalisation, or None.
    sample_rate
        The spec's sample rate (version 2), or None.
    """

    spec: str
    input_size: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    sample_rate: float | None = None

    @classmethod
    def from_spec(cls, spec: DataSpec) -> DataSpecRecord:
        """The record of a ``DataSpec``."""
        return cls(spec.spec, spec.input_size, spec.mean, spec.std, spec.sample_rate)

    def to_spec(self, spec: str | None = None) -> DataSpec:
        """The ``DataSpec`` (which checks it), of ``spec`` instead of :attr:`spec` if given.

        Raises
        ------
        SpecError
            The spec does not resolve here (for example an image folder that does not exist
            on this machine).
        """
        return DataSpec(
            self.spec if spec is None else spec,
            input_size=self.input_size,
            mean=self.mean,
            std=self.std,
            sample_rate=self.sample_rate,
        )

    def to_json_value(self, version: int = FORMAT_VERSION) -> JsonObject:
        """The JSON object of format ``version``, keys in the order of the format."""
        out: JsonObject = {
            "spec": self.spec,
            "input_size": self.input_size,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }
        if version >= 2:
            out["sample_rate"] = self.sample_rate
        return out

    @classmethod
    def from_node(cls, node: _Node, version: int = FORMAT_VERSION) -> DataSpecRecord:
        """Read and check ``node``; an :class:`AtlasError` names the key that is wrong."""
        spec = node.get("spec").as_str(LIMITS.text)
        if not spec:
            raise node.get("spec").expected("a non-empty string")
        mean, std = _normalisation(node)
        rate = None
        if version >= 2:
            rate_node = node.get("sample_rate")
            rate = None if rate_node.is_null() else rate_node.as_positive_number()
        return cls(
            spec=spec,
            input_size=node.get("input_size").as_optional_int(minimum=1, maximum=LIMITS.axis),
            mean=mean,
            std=std,
            sample_rate=rate,
        )


@dataclass(frozen=True)
class DataRecord:
    """``manifest["data"]``: the scanned dataset.

    Attributes
    ----------
    spec
        How to rebuild it, None when scanned from Python data without a spec.
    class_name
        The dataset's class name (``"class"``, informative).
    size
        ``len(dataset)``: indices run over ``0 .. size-1``.
    fingerprint
        ``sha256:<hex>`` identifying the data (:func:`featurelens.fingerprint.data_fingerprint`);
        None (the key absent) in atlases written before featurelens recorded it.
    sample_rate
        Samples per second of 1-D data (version 2), or None.
    labels
        The kind of the recorded labels (``"int"``, ``"float"``, ``"str"``; version 2), None
        when the atlas records none.
    """

    spec: DataSpecRecord | None
    class_name: str
    size: int
    fingerprint: str | None = None
    sample_rate: float | None = None
    labels: str | None = None

    def to_json_value(self, version: int = FORMAT_VERSION) -> JsonObject:
        """The JSON object of format ``version``, keys in the order of the format."""
        out: JsonObject = {
            "spec": None if self.spec is None else self.spec.to_json_value(version),
            "class": self.class_name,
            "size": self.size,
        }
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        if version >= 2:
            out["sample_rate"] = self.sample_rate
            out["labels"] = self.labels
        return out

    @classmethod
    def from_node(cls, node: _Node, version: int = FORMAT_VERSION) -> DataRecord:
        """Read and check ``node``; an :class:`AtlasError` names the key that is wrong."""
        spec = node.get("spec")
        fingerprint = node.get_optional("fingerprint")
        rate, labels = None, None
        if version >= 2:
            rate_node, labels_node = node.get("sample_rate"), node.get("labels")
            rate = None if rate_node.is_null() else rate_node.as_positive_number()
            labels = None if labels_node.is_null() else labels_node.as_choice(LABEL_KINDS)
        return cls(
            spec=None if spec.is_null() else DataSpecRecord.from_node(spec, version),
            class_name=node.get("class").as_str(LIMITS.text),
            size=node.get("size").as_int(),
            fingerprint=None
            if fingerprint is None
            else fingerprint.as_pattern(_FINGERPRINT, '"sha256:" and 64 hex digits'),
            sample_rate=rate,
            labels=labels,
        )


@dataclass(frozen=True)
class Preprocessing:
    """``manifest["preprocessing"]``: how examples were made from pixels, for display.

    Items are ``(pixel / 255 - mean) / std``; figures and the explorer un-normalise with it.

    Attributes
    ----------
    input_size
        Image folders: the side of the centre crop; None otherwise.
    mean, std
        Per-channel normalisation, or None.
    """

    input_size: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    def to_json_value(self) -> JsonObject:
        """The JSON object, keys in the order of the format."""
        return {
            "input_size": self.input_size,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }

    @classmethod
    def from_node(cls, node: _Node) -> Preprocessing:
        """Read and check ``node``; an :class:`AtlasError` names the key that is wrong."""
        mean, std = _normalisation(node)
        return cls(
            input_size=node.get("input_size").as_optional_int(minimum=1, maximum=LIMITS.axis),
            mean=mean,
            std=std,
        )


@dataclass(frozen=True)
class LayerRecord:
    """One entry of ``manifest["layers"]``: a scanned layer.

    Attributes
    ----------
    name
        Dotted layer name.
    channels
        C, channels of its output.
    output_shape
        The shape of its output without the batch and channel axes (the spatial axes, or the
        tokens; ``()`` for outputs ``(N, C)``).
    nan_counts
        ``(channel, examples)`` pairs, ascending by channel, for the channels where at least
        one example's map held a NaN (the others left out, as in the JSON).
    channel_dim
        The axis of the layer's output ``(N, ...)`` that holds the channels (version 2;
        1 in version 1).
    layout
        ``"channels_first"`` ``(N, C, *spatial)``, ``"channels_last"`` ``(N, *spatial, C)`` or
        ``"tokens"`` ``(N, T, C)`` (version 2; channels first in version 1).
    """

    name: str
    channels: int
    output_shape: tuple[int, ...]
    nan_counts: tuple[tuple[int, int], ...] = ()
    channel_dim: int = 1
    layout: str = "channels_first"

    @classmethod
    def of(
        cls, name: str, top: LayerTop, *, layout: str = "channels_first", channel_dim: int = 1
    ) -> LayerRecord:
        """The record of a layer's top-k state (and its layout)."""
        sparse = tuple((c, int(v)) for c, v in enumerate(top.nan_counts) if v)
        shape = tuple(int(v) for v in top.output_shape)
        return cls(name, top.channels, shape, sparse, channel_dim, layout)

    def to_json_value(self, version: int = FORMAT_VERSION) -> JsonObject:
        """The JSON object of format ``version``, keys in the order of the format."""
        out: JsonObject = {
            "name": self.name,
            "channels": self.channels,
            "output_shape": list(self.output_shape),
        }
        if version >= 2:
            out["channel_dim"] = self.channel_dim
            out["layout"] = self.layout
        # sparse: {channel: examples whose map held a NaN}, channels without NaN left out
        out["nan_counts"] = {str(c): v for c, v in self.nan_counts}
        return out

    @classmethod
    def from_node(cls, node: _Node, version: int = FORMAT_VERSION) -> LayerRecord:
        """Read and check ``node``; an :class:`AtlasError` names the key that is wrong."""
        channels = node.get("channels").as_int(maximum=LIMITS.channels)
        counts = node.get("nan_counts")
        pairs = []
        for key, value in counts.fields().items():
            canonical = key.isascii() and key.isdigit() and str(int(key)) == key
            if not (canonical and int(key) < channels):
                raise counts.error(
                    f"has key {key!r}; keys must be channel numbers 0..{channels - 1}"
                )
            pairs.append((int(key), _Node(value, node.source, f"{counts.key}.{key}").as_int()))
        shape_node = node.get("output_shape")
        shape = shape_node.as_shape(LIMITS.rank, LIMITS.axis)
        if math.prod(shape) > LIMITS.output_elements:
            raise shape_node.error(
                f"has {math.prod(shape)} elements; at most {LIMITS.output_elements}"
            )
        channel_dim, layout = 1, "channels_first"
        if version >= 2:
            dim_node, layout_node = node.get("channel_dim"), node.get("layout")
            channel_dim = dim_node.as_int(minimum=1, maximum=len(shape) + 1)
            layout = layout_node.as_choice(LAYOUTS)
            fits = {
                "channels_first": channel_dim == 1,
                "channels_last": channel_dim == len(shape) + 1,
                "tokens": channel_dim == 2 and len(shape) == 1,
            }[layout]
            if not fits:
                raise layout_node.error(
                    f"is {layout!r} with channel_dim {channel_dim} and output_shape "
                    f"{list(shape)}; channels_first has channel_dim 1, channels_last the last "
                    "axis, tokens (N, T, C) channel_dim 2"
                )
        return cls(
            name=node.get("name").as_str(LIMITS.text),
            channels=channels,
            output_shape=shape,
            nan_counts=tuple(sorted(pairs)),
            channel_dim=channel_dim,
            layout=layout,
        )


@dataclass(frozen=True)
class SkippedExample:
    """One entry of ``manifest["skipped"]``: an example that failed to load or transform.

    Attributes
    ----------
    index
        Its dataset index.
    error
        ``"ExceptionType: message"``.
    """

    index: int
    error: str

    def to_json_value(self) -> JsonObject:
        """The JSON object, keys in the order of the format."""
        return {"index": self.index, "error": self.error}

    @classmethod
    def from_node(cls, node: _Node) -> SkippedExample:
        """Read and check ``node``; an :class:`AtlasError` names the key that is wrong."""
        return cls(node.get("index").as_int(), node.get("error").as_str())


@dataclass(frozen=True)
class Progress:
    """``manifest["progress"]``: how far the scan got.

    Attributes
    ----------
    next_index
        Every index below it is in the state.
    batch_size
        The batch size of the last run.
    """

    next_index: int
    batch_size: int

    def to_json_value(self) -> JsonObject:
        """The JSON object, keys in the order of the format."""
        return {"next_index": self.next_index, "batch_size": self.batch_size}

    @classmethod
    def from_node(cls, node: _Node) -> Progress:
        """Read and check ``node``; an :class:`AtlasError` names the key that is wrong."""
        return cls(node.get("next_index").as_int(), node.get("batch_size").as_int(minimum=1))


@dataclass(frozen=True)
class ArraysRecord:
    """``manifest["arrays"]``: the array file of a saved atlas.

    Attributes
    ----------
    file
        Its name, ``arrays-<first 16 hex of sha256>.npz`` (a name in the atlas directory,
        never a path).
    sha256
        The sha256 of its bytes (64 hex digits), checked on load.
    """

    file: str
    sha256: str

    def to_json_value(self) -> JsonObject:
        """The JSON object, keys in the order of the format."""
        return {"file": self.file, "sha256": self.sha256}

    @classmethod
    def from_node(cls, node: _Node) -> ArraysRecord:
        """Read and check ``node``; an :class:`AtlasError` names the key that is wrong."""
        file_node = node.get("file")
        if not _ARRAYS_FILE.fullmatch(file_node.as_str()):
            raise file_node.error(
                f"is {file_node.value!r}; it must be a file name in the atlas directory, "
                "arrays-<16 hex digits>.npz (no path, no '..')"
            )
        digest = node.get("sha256").as_pattern(_SHA256, "64 lowercase hex digits")
        if file_node.value != f"arrays-{digest[:16]}.npz":
            raise file_node.error(f"is {file_node.value!r}, not named after its sha256 {digest}")
        return cls(file_node.value, digest)


@dataclass(frozen=True)
class ScanIdentity:
    """What a scan is of: a checkpoint resumes only a scan with the same identity.

    Attributes
    ----------
    model, data
        The model and the data (with their fingerprints and specs).
    layers
        Scanned layer names, in order.
    score
        A key of :data:`featurelens.scan.SCORES`.
    top_k
        Hits kept per channel.
    """

    model: ModelRecord
    data: DataRecord
    layers: tuple[str, ...]
    score: str
    top_k: int

    def differences(self, saved: ScanIdentity) -> list[str]:
        """What differs between this scan and ``saved``, one phrase each ("new vs saved").

        The data fingerprint is compared only when ``saved`` has one (older checkpoints have
        none), the sample rate only when ``saved`` has one. Class names and labels are
        informative and not compared.

        Parameters
        ----------
        saved
            The identity of a saved scan (``manifest.identity``).

        Returns
        -------
        list[str]
            Empty when the scans are the same.
        """
        out = []
        new_fp, old_fp = self.model.fingerprint, saved.model.fingerprint
        if old_fp != new_fp:
            out.append(
                f"the model differs (parameter fingerprint {new_fp[:19]}... vs {old_fp[:19]}...)"
            )
        if self.model.spec != saved.model.spec:
            new, old = _model_spec_json(self.model.spec), _model_spec_json(saved.model.spec)
            out.append(f"the model spec differs ({new} vs {old})")
        if self.data.spec != saved.data.spec:
            new_d = None if self.data.spec is None else self.data.spec.to_json_value(1)
            old_d = None if saved.data.spec is None else saved.data.spec.to_json_value(1)
            if new_d == old_d:  # they differ in the sample rate only
                new_d = None if self.data.spec is None else self.data.spec.to_json_value()
                old_d = None if saved.data.spec is None else saved.data.spec.to_json_value()
            out.append(f"the data spec differs ({new_d} vs {old_d})")
        if self.data.size != saved.data.size:
            out.append(f"the data size differs ({self.data.size} vs {saved.data.size} examples)")
        old_data, new_data = saved.data.fingerprint, self.data.fingerprint
        if old_data is not None and old_data != new_data:
            out.append(
                f"the data differs (fingerprint {str(new_data)[:19]}... vs {old_data[:19]}...: "
                "other examples at the same indices)"
            )
        old_rate, new_rate = saved.data.sample_rate, self.data.sample_rate
        if old_rate is not None and old_rate != new_rate:
            out.append(f"the sample rate differs ({new_rate} vs {old_rate})")
        if self.layers != saved.layers:
            out.append(f"the layers differ ({list(self.layers)} vs {list(saved.layers)})")
        if self.score != saved.score:
            out.append(f"score differs ({self.score!r} vs {saved.score!r})")
        if self.top_k != saved.top_k:
            out.append(f"top_k differs ({self.top_k!r} vs {saved.top_k!r})")
        return out


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in one object")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: what an atlas holds, how it was made, and how far the scan got.

    The one reader and writer of the format (versions :data:`READABLE_VERSIONS`, described in
    ``docs/atlas-format.md``): :meth:`from_json` checks every key, type and bound and raises
    :class:`AtlasError` naming the file and the key; :meth:`to_json` writes the very bytes a
    featurelens of the manifest's format version writes (``from_json(text).to_json() == text``
    for every manifest featurelens wrote, of either version). Unknown keys are ignored when
    reading and not written back.

    Attributes
    ----------
    model, data
        The scanned model and data.
    preprocessing
        How examples were made from pixels (copied from the data spec), or None.
    input_shape
        ``(C, *spatial)`` of one example, None when no example was loaded.
    layers
        The scanned layers, in the order asked.
    score
        A key of :data:`featurelens.scan.SCORES`.
    top_k
        Hits kept per channel.
    examples_scanned
        Examples that loaded and went through the network.
    skipped
        Examples that failed to load, by index.
    complete
        False while a scan runs or after it was interrupted (a checkpoint).
    progress
        How far the scan got.
    arrays
        The array file; None until the atlas is saved.
    library_version
        The featurelens version that wrote it.
    format_version
        The format version it is written in (a version-1 atlas stays version 1 when it is
        saved again or its scan resumed).
    """

    model: ModelRecord
    data: DataRecord
    preprocessing: Preprocessing | None
    input_shape: tuple[int, ...] | None
    layers: tuple[LayerRecord, ...]
    score: str
    top_k: int
    examples_scanned: int
    skipped: tuple[SkippedExample, ...]
    complete: bool
    progress: Progress
    arrays: ArraysRecord | None = None
    library_version: str = __version__
    format_version: int = FORMAT_VERSION

    # ---- derived views -------------------------------------------------------------------
    @property
    def layer_names(self) -> tuple[str, ...]:
        """The scanned layer names, in order."""
        return tuple(layer.name for layer in self.layers)

    @property
    def identity(self) -> ScanIdentity:
        """What was scanned (model, data, layers, score, top_k): what a resume must match."""
        return ScanIdentity(self.model, self.data, self.layer_names, self.score, self.top_k)

    def differences(self, other: Manifest | ScanIdentity) -> list[str]:
        """What differs between the scan of this manifest and ``other`` ("this vs other").

        See :meth:`ScanIdentity.differences`; progress, skipped examples and versions are not
        compared.
        """
        theirs = other.identity if isinstance(other, Manifest) else other
        return self.identity.differences(theirs)

    # ---- building ------------------------------------------------------------------------
    @classmethod
    def of_scan(
        cls,
        identity: ScanIdentity,
        tops: Mapping[str, LayerTop],
        *,
        input_shape: tuple[int, ...] | None,
        examples_scanned: int,
        skipped: Mapping[int, str],
        progress: Progress,
        labels: str | None = None,
        layouts: Mapping[str, tuple[str, int]] | None = None,
        format_version: int = FORMAT_VERSION,
    ) -> Manifest:
        """The manifest of a scan's state after the examples below ``progress.next_index``.

        Parameters
        ----------
        identity
            What is scanned.
        tops
            The top-k state of every layer of ``identity.layers``.
        input_shape
            ``(C, *spatial)`` of one example (None when none loaded).
        examples_scanned
            Examples that went through the network.
        skipped
            ``{index: error}`` of the examples that failed to load.
        progress
            Where the scan is; the manifest is ``complete`` when it reached the data size.
        labels
            The kind of the labels recorded with the hits, or None.
        layouts
            ``{layer: (layout, channel_dim)}``; layers not in it are channels first.
        format_version
            The version to write (1 only to continue a version-1 checkpoint: no labels,
            layouts or sample rate).
        """
        spec = identity.data.spec
        layouts = layouts or {}
        return cls(
            model=identity.model,
            data=dataclasses.replace(identity.data, labels=labels),
            preprocessing=None
            if spec is None
            else Preprocessing(spec.input_size, spec.mean, spec.std),
            input_shape=input_shape,
            layers=tuple(
                LayerRecord.of(
                    name,
                    tops[name],
                    layout=layouts.get(name, ("channels_first", 1))[0],
                    channel_dim=layouts.get(name, ("channels_first", 1))[1],
                )
                for name in identity.layers
            ),
            score=identity.score,
            top_k=identity.top_k,
            examples_scanned=examples_scanned,
            skipped=tuple(SkippedExample(i, skipped[i]) for i in sorted(skipped)),
            complete=progress.next_index >= identity.data.size,
            progress=progress,
            format_version=format_version,
        )

    # ---- JSON ----------------------------------------------------------------------------
    def to_json_value(self) -> JsonObject:
        """The manifest as a JSON object of its format version, keys in the order of the format.

        Raises
        ------
        AtlasError
            A version-1 manifest holding what version 1 cannot say (labels, a sample rate, a
            layout other than channels first).
        """
        v = self.format_version
        if v == 1 and (
            self.data.labels is not None
            or self.data.sample_rate is not None
            or (self.data.spec is not None and self.data.spec.sample_rate is not None)
            or any((r.layout, r.channel_dim) != ("channels_first", 1) for r in self.layers)
        ):
            raise AtlasError(
                "a version-1 atlas cannot record labels, a sample rate or layer layouts; "
                f"save it as version {FORMAT_VERSION}"
            )
        out: JsonObject = {
            "format": FORMAT_NAME,
            "format_version": v,
            "library_version": self.library_version,
            "model": self.model.to_json_value(),
            "data": self.data.to_json_value(v),
            "preprocessing": None
            if self.preprocessing is None
            else self.preprocessing.to_json_value(),
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "layers": [layer.to_json_value(v) for layer in self.layers],
            "score": self.score,
            "top_k": self.top_k,
            "examples_scanned": self.examples_scanned,
            "skipped": [s.to_json_value() for s in self.skipped],
            "complete": self.complete,
            "progress": self.progress.to_json_value(),
        }
        if self.arrays is not None:
            out["arrays"] = self.arrays.to_json_value()
        return out

    def to_json(self) -> str:
        """The text of ``manifest.json`` (2-space indent, ASCII, a final newline)."""
        return json.dumps(self.to_json_value(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = MANIFEST) -> Manifest:
        """Read and check the text of a ``manifest.json``.

        Parameters
        ----------
        text
            The file's content (bytes are decoded as UTF-8).
        source
            Where it came from, for messages (the file's path).

        Returns
        -------
        Manifest

        Raises
        ------
        AtlasError
            Not UTF-8, not JSON (NaN, duplicate keys and nesting too deep included), not a
            featurelens atlas manifest, another format version, a missing key, a value of the
            wrong type (``"complete": "false"`` is refused, not taken as true), out of the
            bounds of :data:`LIMITS`, or inconsistent with another (a top_k above the data
            size, a complete scan that did not reach the end); the message names ``source``
            and the key.
        """
        if len(text) > LIMITS.manifest_bytes:
            raise AtlasError(
                f"atlas manifest {source!r} has {len(text)} bytes; at most "
                f"{LIMITS.manifest_bytes} are read"
            )
        try:
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            value = json.loads(
                text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constants
            )
        except UnicodeDecodeError as exc:
            raise AtlasError(f"atlas manifest {source!r} is not UTF-8 text: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise AtlasError(f"{source!r} is not valid JSON: {exc}") from exc
        except (ValueError, RecursionError) as exc:  # the hooks above, numbers, nesting
            detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise AtlasError(f"{source!r} is not valid JSON: {detail}") from exc
        root = _Node(value, source)
        if not isinstance(value, dict) or value.get("format") != FORMAT_NAME:
            raise AtlasError(f"{source!r} is not a {FORMAT_NAME} manifest")
        version = value.get("format_version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            readable = " and ".join(str(v) for v in READABLE_VERSIONS)
            raise AtlasError(
                f"atlas manifest {source!r} has format version {version!r}; this featurelens "
                f"({__version__}) reads versions {readable} only "
                f"(the atlas was written by featurelens {str(value.get('library_version'))[:40]!r})"
            )
        input_node = root.get("input_shape")
        preprocessing = root.get("preprocessing")
        arrays = root.get_optional("arrays")
        manifest = cls(
            model=ModelRecord.from_node(root.get("model")),
            data=DataRecord.from_node(root.get("data"), version),
            preprocessing=None
            if preprocessing.is_null()
            else Preprocessing.from_node(preprocessing),
            input_shape=None
            if input_node.is_null()
            else input_node.as_shape(LIMITS.rank, LIMITS.axis),
            layers=tuple(
                LayerRecord.from_node(e, version)
                for e in root.get("layers").elements(LIMITS.layers)
            ),
            score=root.get("score").as_choice(SCORE_NAMES),
            top_k=root.get("top_k").as_int(minimum=1, maximum=LIMITS.top_k),
            examples_scanned=root.get("examples_scanned").as_int(),
            skipped=tuple(SkippedExample.from_node(e) for e in root.get("skipped").elements()),
            complete=root.get("complete").as_bool(),
            progress=Progress.from_node(root.get("progress")),
            arrays=None if arrays is None else ArraysRecord.from_node(arrays),
            library_version=root.get("library_version").as_str(LIMITS.text),
            format_version=version,
        )
        manifest._check_consistent(root)
        return manifest

    def _check_consistent(self, root: _Node) -> None:
        """Refuse values that are each valid but contradict each other or :data:`LIMITS`."""
        size = self.data.size
        if self.input_shape is not None:
            node = root.get("input_shape")
            elements = math.prod(self.input_shape)
            if not self.input_shape:
                raise node.error("is empty; it is (C, *spatial), at least the channels")
            if elements > LIMITS.input_elements:
                raise node.error(
                    f"is {list(self.input_shape)}: {elements} elements per example, more than "
                    f"featurelens handles ({LIMITS.input_elements})"
                )
            if self.data.sample_rate is not None and len(self.input_shape) != 2:
                raise (
                    root.get("data")
                    .get("sample_rate")
                    .error(
                        f"is given for examples of shape {list(self.input_shape)}; a sample rate "
                        "is for 1-D data (C, L)"
                    )
                )
        if not self.layers:
            raise root.get("layers").error("is empty; an atlas has at least one layer")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise root.get("layers").error(f"names layers more than once: {twice}")
        if self.top_k > size:
            raise root.get("top_k").error(f"is {self.top_k}, more than the {size} examples")
        if self.examples_scanned > size:
            raise root.get("examples_scanned").error(
                f"is {self.examples_scanned}, more than the {size} examples of the data"
            )
        progress = root.get("progress").get("next_index")
        if self.progress.next_index > size:
            raise progress.error(f"is {self.progress.next_index}, past the {size} examples")
        if self.complete and self.progress.next_index != size:
            raise root.get("complete").error(
                f"is true, but the scan got to {self.progress.next_index} of {size} examples"
            )
        previous = -1
        for i, skipped in enumerate(self.skipped):
            if not previous < skipped.index < size:
                raise (
                    root.get("skipped")
                    .elements()[i]
                    .get("index")
                    .error(
                        f"is {skipped.index}; skipped indices are ascending, each once, below the "
                        f"data size {size}"
                    )
                )
            previous = skipped.index
        for i, layer in enumerate(self.layers):
            for channel, count in layer.nan_counts:
                if count > self.examples_scanned:
                    raise (
                        root.get("layers")
                        .elements()[i]
                        .get("nan_counts")
                        .error(
                            f"counts {count} examples for channel {channel}, more than the "
                            f"{self.examples_scanned} scanned"
                        )
                    )

    # ---- directories ---------------------------------------------------------------------
    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> Manifest:
        """The manifest of the atlas in ``directory``.

        Raises
        ------
        FileNotFoundError
            No such directory, or no manifest in it.
        AtlasError
            As :meth:`from_json`; or a manifest that is a symbolic link or not a regular file.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"atlas directory {str(directory)!r} does not exist")
        found = cls.peek(directory)
        if found is None:
            raise FileNotFoundError(
                f"{str(directory)!r} is not an atlas: it has no {MANIFEST} "
                "(make one with featurelens.scan or `featurelens scan`)"
            )
        return found

    @classmethod
    def peek(cls, directory: str | os.PathLike[str]) -> Manifest | None:
        """The manifest in ``directory``, or None when it has none (or does not exist).

        Raises
        ------
        AtlasError
            A manifest that cannot be read (as :meth:`from_json`), a symbolic link, or not a
            regular file.
        """
        path = Path(directory) / MANIFEST
        data = _read_own_file(path, LIMITS.manifest_bytes, "atlas manifest")
        if data is None:
            return None
        return cls.from_json(data, source=str(path))

    @classmethod
    def check_new_output(cls, directory: str | os.PathLike[str]) -> None:
        """Refuse ``directory`` as the output of a new scan when it already holds one.

        Parameters
        ----------
        directory
            The ``--out`` of a scan (it need not exist).

        Raises
        ------
        AtlasError
            Saying whether another scan is writing it now (:class:`LockedError`, naming it), it
            holds a complete atlas (choose another output or delete it), an interrupted scan
            (resume it), with its size and layers, or a manifest that cannot be read.
        """
        from featurelens.errors import LockedError
        from featurelens.files import LOCK_NAME, lock_holder

        where = str(directory)
        holder = lock_holder(directory)
        if holder is not None:
            raise LockedError(
                f"{where!r} is being written by {holder.describe()}; wait until it ends or "
                f"choose another --out (a scan holds its output's lock, {LOCK_NAME}, while it "
                "runs)"
            )
        try:
            found = cls.peek(directory)
        except AtlasError as exc:
            raise AtlasError(
                f"{where!r} already holds an unreadable atlas manifest ({exc}); "
                "choose another --out or delete it"
            ) from exc
        if found is None:
            return
        size, layers = found.data.size, ", ".join(found.layer_names)
        if found.complete:
            raise AtlasError(
                f"{where!r} already holds a complete atlas ({size} examples, layers "
                f"{layers}); choose another --out or delete it"
            )
        raise AtlasError(
            f"{where!r} holds an interrupted scan at {found.progress.next_index} of {size} "
            f"examples (layers {layers}); pass --resume to continue it, or choose another --out"
        )


def _read_own_file(path: Path, most: int, what: str) -> bytes | None:
    """The bytes of a regular file of an atlas (None when it does not exist).

    Raises
    ------
    AtlasError
        ``path`` is a symbolic link (refused before reading: an atlas holds its own files),
        not a regular file, or larger than ``most`` bytes.
    """
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(info.st_mode):
        raise AtlasError(
            f"{what} {str(path)!r} is a symbolic link (to {os.readlink(path)!r}); an atlas "
            "holds its own files: refused before reading it"
        )
    if not stat.S_ISREG(info.st_mode):
        raise AtlasError(f"{what} {str(path)!r} is not a regular file")
    if info.st_size > most:
        raise AtlasError(f"{what} {str(path)!r} has {info.st_size} bytes; at most {most}")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(most + 1)
    if len(data) > most:
        raise AtlasError(f"{what} {str(path)!r} has more than {most} bytes")
    return data


# --------------------------------------------------------------------------------------------
# The arrays: checked from their headers before any data is read


_DTYPES = {"int": ("i", 8), "float": ("f", 8)}


def _expected_arrays(manifest: Manifest) -> dict[str, tuple[tuple[str, int], tuple[int, ...]]]:
    """``{name: ((dtype kind, itemsize), shape)}`` of every array the manifest implies."""
    k = manifest.top_k
    out: dict[str, tuple[tuple[str, int], tuple[int, ...]]] = {}
    for i, layer in enumerate(manifest.layers):
        c, d = layer.channels, len(layer.output_shape)
        out[f"{i}.indices"] = (("i", 8), (c, k))
        out[f"{i}.scores"] = (("f", 8), (c, k))
        out[f"{i}.locations"] = (("i", 8), (c, k, d))
        out[f"{i}.nan_counts"] = (("i", 8), (c,))
    return out


class _ArrayFile:
    """Reads the members of an atlas's ``.npz`` after checking each against what is expected."""

    def __init__(self, zf: zipfile.ZipFile, where: str) -> None:
        self.zf = zf
        self.where = where
        self.members = {info.filename: info for info in zf.infolist()}

    def error(self, key: str, problem: str) -> AtlasError:
        return AtlasError(f"{self.where}: array {key!r} {problem}")

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype, int]:
        """``(shape, dtype, header length)`` from the member's ``.npy`` header (no data read)."""
        info = self.members[f"{key}.npy"]
        try:
            with self.zf.open(info) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    raise ValueError(f".npy format version {version} (featurelens writes 1.0)")
                header_len = fh.tell()
        except (ValueError, OSError, EOFError, RuntimeError, zipfile.BadZipFile) as exc:
            raise self.error(key, f"has no valid .npy header: {exc}") from exc
        if fortran:
            raise self.error(key, "is stored in Fortran order; featurelens writes C order")
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise self.error(key, f"has dtype {dtype}; atlases hold plain numbers and strings")
        return tuple(int(v) for v in shape), dtype, header_len

    def read(self, key: str, kind: tuple[str, int] | None, shape: tuple[int, ...]) -> np.ndarray:
        """The array ``key``, after checking its dtype (kind, itemsize), shape and size."""
        info = self.members[f"{key}.npy"]
        found, dtype, header_len = self.header(key)
        if kind is not None and (dtype.kind, dtype.itemsize) != kind:
            want = {("i", 8): "int64", ("f", 8): "float64"}.get(kind, str(kind))
            raise self.error(key, f"has dtype {dtype}; the format says {want}")
        if found != shape:
            raise self.error(
                key, f"has shape {found}; the manifest implies {shape} (channels, top_k, rank)"
            )
        nbytes = dtype.itemsize * math.prod(shape)
        if header_len + nbytes != info.file_size:
            raise self.error(
                key,
                f"holds {info.file_size - header_len} bytes of data; its header says {nbytes}",
            )
        if not nbytes:
            return np.zeros(shape, dtype=dtype.newbyteorder("="))
        try:
            with self.zf.open(info) as fh:
                fh.seek(header_len)
                raw = fh.read(nbytes)
        except (OSError, EOFError, RuntimeError, zipfile.BadZipFile) as exc:
            raise self.error(key, f"cannot be read: {exc}") from exc
        if len(raw) != nbytes:
            raise self.error(key, "is truncated")
        # a writable copy in native byte order
        return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _open_arrays(directory: Path, manifest: Manifest) -> tuple[Any, str]:
    """The array file, opened without following links, after its size and sha256 check."""
    entry = manifest.arrays
    where = f"atlas {str(directory)!r}"
    if entry is None:
        raise AtlasError(f"{where}: the manifest names no array file (key 'arrays' is missing)")
    path = directory / entry.file  # a bare name: ArraysRecord refuses paths
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise AtlasError(f"{where}: array file {entry.file!r} missing") from None
    if stat.S_ISLNK(info.st_mode):
        raise AtlasError(
            f"{where}: array file {entry.file!r} is a symbolic link (to {os.readlink(path)!r}); "
            "an atlas holds its own files: refused before reading it"
        )
    if not stat.S_ISREG(info.st_mode):
        raise AtlasError(f"{where}: array file {entry.file!r} is not a regular file")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    fh = os.fdopen(fd, "rb")
    try:
        digest = hashlib.sha256()
        while chunk := fh.read(1 << 20):  # streamed: the file is never held whole here
            digest.update(chunk)
        if digest.hexdigest() != entry.sha256:
            raise AtlasError(f"{where}: {entry.file} is corrupt (sha256)")
        fh.seek(0)
    except BaseException:
        fh.close()
        raise
    return fh, f"{where}: {entry.file}"


def _read_arrays(
    directory: Path, manifest: Manifest
) -> tuple[dict[str, LayerTop], dict[int, Label] | None]:
    """The top-k arrays (and labels) of the atlas in ``directory``, every one checked.

    Raises
    ------
    AtlasError
        A missing, linked, corrupt or malformed array file; a compressed member; a member that
        is missing, unknown, of another dtype or shape than the manifest implies, or whose
        header declares more data than it holds; values out of range (a dataset index past
        the data size, a location outside the layer's output, NaN counts that contradict the
        manifest, labels that are not those of the hits).
    """
    fh, where = _open_arrays(directory, manifest)
    with fh:
        try:
            zf = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
            raise AtlasError(f"{where} is not a valid .npz (zip) file: {exc}") from exc
        with zf:
            return _read_members(_ArrayFile(zf, where), manifest)


def _read_members(
    arrays: _ArrayFile, manifest: Manifest
) -> tuple[dict[str, LayerTop], dict[int, Label] | None]:
    expected = _expected_arrays(manifest)
    kind = manifest.data.labels
    label_keys = ("labels.index", "labels.value") if kind is not None else ()
    names = list(arrays.members)
    if len(names) != len(arrays.zf.infolist()):
        raise AtlasError(f"{arrays.where} holds a member name twice")
    known = {f"{key}.npy" for key in [*expected, *label_keys]}
    for name, info in arrays.members.items():
        optional = _OPTIONAL_ARRAY.fullmatch(name.removesuffix(".npy"))
        if name not in known and not (
            name.endswith(".npy") and optional and int(optional.group(1)) < len(manifest.layers)
        ):
            raise AtlasError(
                f"{arrays.where} holds {name!r}, which is not an array of this atlas "
                f"(layers 0..{len(manifest.layers) - 1}: indices, scores, locations, nan_counts"
                + ("; labels.index, labels.value" if kind else "")
                + ")"
            )
        if info.compress_type != zipfile.ZIP_STORED:
            raise AtlasError(
                f"{arrays.where}: array {name!r} is compressed; featurelens stores arrays "
                "uncompressed and refuses compressed ones (they can expand to any size)"
            )
    missing = sorted(known - set(names))
    if missing:
        raise AtlasError(f"{arrays.where} lacks the arrays {missing}")
    tops: dict[str, LayerTop] = {}
    hit_indices = []
    size = manifest.data.size
    for i, layer in enumerate(manifest.layers):
        read = {key: arrays.read(f"{i}.{key}", *expected[f"{i}.{key}"]) for key in _LAYER_ARRAYS}
        indices, locations = read["indices"], read["locations"]
        key = f"{i}.indices"
        if indices.size and (indices.min() < -1 or indices.max() >= size):
            bad = int(indices[(indices < -1) | (indices >= size)][0])
            raise arrays.error(key, f"holds the dataset index {bad}; the data has {size}")
        hit = indices >= 0
        if np.any(hit[:, 1:] & ~hit[:, :-1]):
            raise arrays.error(key, "has an empty slot (-1) before a hit; empty slots come last")
        if layer.output_shape and hit.any():
            at = locations[hit]  # (M, D)
            if np.any(at < 0) or np.any(at >= np.asarray(layer.output_shape)):
                raise arrays.error(
                    f"{i}.locations", f"holds a location outside the output {layer.output_shape}"
                )
        dense = np.zeros(layer.channels, dtype=np.int64)
        for channel, count in layer.nan_counts:
            dense[channel] = count
        if not np.array_equal(read["nan_counts"], dense):
            raise arrays.error(f"{i}.nan_counts", "differs from the manifest's nan_counts")
        tops[layer.name] = LayerTop(
            indices=indices,
            scores=read["scores"],
            locations=locations,
            nan_counts=read["nan_counts"],
            output_shape=layer.output_shape,
        )
        hit_indices.append(indices[hit])
    if kind is None:
        return tops, None
    hits = np.unique(np.concatenate(hit_indices)) if hit_indices else np.zeros(0, np.int64)
    shape, dtype, _ = arrays.header("labels.value")
    if kind == "str":
        if dtype.kind != "U" or not 1 <= dtype.itemsize // 4 <= MAX_LABEL_CHARS:
            raise arrays.error("labels.value", f"has dtype {dtype}; str labels are <U1..<U1024")
        value_kind: tuple[str, int] | None = None
    else:
        value_kind = _DTYPES[kind]
    index = arrays.read("labels.index", ("i", 8), (len(hits),))
    if not np.array_equal(index, hits):
        raise arrays.error("labels.index", "is not the sorted dataset indices of the hits")
    values = arrays.read("labels.value", value_kind, (len(hits),))
    return tops, dict(zip(index.tolist(), values.tolist(), strict=True))


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` whose bytes depend on the arrays only (np.savez stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(value), allow_pickle=False)
    return buf.getvalue()


def _file_digest(path: str) -> str:
    """sha256 of a regular file of at most 16 MiB (a Python file a spec names), else why not."""
    try:
        info = os.stat(path)
    except OSError:
        return "missing"
    if not stat.S_ISREG(info.st_mode) or info.st_size > 16 * 2**20:
        return "not a regular file of at most 16 MiB"
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


# --------------------------------------------------------------------------------------------
# The atlas


class Atlas:
    """Top-k maximally activating examples of every scanned layer and channel.

    Made by :func:`featurelens.scan`; saved with :meth:`save`, read with :meth:`load`.

    Parameters
    ----------
    manifest
        What the atlas holds (see :class:`Manifest`).
    tops
        The top-k state of every layer of ``manifest.layers``, by name.
    labels
        ``{dataset index: label}`` covering every hit, when ``manifest.data.labels`` names a
        label kind (entries for other indices are dropped). None: the atlas records no labels
        (``manifest.data.labels`` becomes None).

    Attributes
    ----------
    layers
        Scanned layer names, in the order given to the scan.

    Raises
    ------
    AtlasError
        ``tops`` does not hold exactly the manifest's layers, or ``labels`` does not fit the
        manifest (a hit without a label, a label of another kind, labels the manifest does not
        record).
    """

    def __init__(
        self,
        manifest: Manifest,
        tops: Mapping[str, LayerTop],
        labels: Mapping[int, Label] | None = None,
    ) -> None:
        self._manifest = manifest
        self._tops = dict(tops)
        self.layers: list[str] = list(manifest.layer_names)
        if set(self._tops) != set(self.layers) or len(set(self.layers)) != len(self.layers):
            raise AtlasError(
                f"an atlas needs the top-k arrays of exactly its layers {self.layers}, "
                f"got arrays of {sorted(self._tops)}"
            )
        self._labels = self._hit_labels(labels)
        self._directory: Path | None = None  # where it was loaded from or saved to
        # Trust: made in this process (by a scan, or by the caller's own code), consent given
        # at load, or this user's signature (checked once, when code would run).
        self._made_here = True
        self._consent = False
        self._signed: bool | None = None
        self._trust_problem = ""

    def _hit_labels(self, labels: Mapping[int, Label] | None) -> dict[int, Label] | None:
        kind = self._manifest.data.labels
        if kind is None:
            if labels:
                raise AtlasError("labels given for an atlas whose manifest records none")
            return None
        if labels is None:  # an atlas made without them records none
            self._manifest = dataclasses.replace(
                self._manifest, data=dataclasses.replace(self._manifest.data, labels=None)
            )
            return None
        hits = sorted(
            {int(i) for top in self._tops.values() for i in top.indices[top.indices >= 0]}
        )
        python_type = {"int": int, "float": float, "str": str}[kind]
        out: dict[int, Label] = {}
        for index in hits:
            if index not in labels:
                raise AtlasError(f"hit {index} has no label (the atlas records {kind} labels)")
            value = labels[index]
            if type(value) is not python_type:
                raise AtlasError(
                    f"the label of hit {index} is {type(value).__name__} {value!r}; the atlas "
                    f"records {kind} labels"
                )
            out[index] = value
        return out

    # ---- queries -------------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        """The manifest (frozen): what ``manifest.json`` holds; ``.to_json()`` gives its text."""
        return self._manifest

    @property
    def directory(self) -> Path | None:
        """Where the atlas was loaded from or last saved to (None for one only in memory)."""
        return self._directory

    @property
    def complete(self) -> bool:
        """False for a scan checkpoint (interrupted or still running)."""
        return self._manifest.complete

    @property
    def score(self) -> str:
        """How hits were scored: a key of :data:`featurelens.scan.SCORES`."""
        return self._manifest.score

    @property
    def top_k(self) -> int:
        """Hits kept per channel."""
        return self._manifest.top_k

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, *spatial)`` of one example, without batch."""
        shape = self._manifest.input_shape
        return shape if shape is not None else ()

    @property
    def sample_rate(self) -> float | None:
        """Samples per second of 1-D data (for playing examples), None when not recorded."""
        return self._manifest.data.sample_rate

    @property
    def label_kind(self) -> str | None:
        """``"int"``, ``"float"`` or ``"str"``: the kind of the hits' labels; None when the atlas
        records none (the dataset yields no labels, or labels that are not scalars).
        """
        return self._manifest.data.labels

    def _base(self) -> str:
        """What relative paths of a version-2 manifest are relative to: the atlas directory
        (the current directory for an atlas only in memory).
        """
        return os.path.abspath(self._directory if self._directory is not None else os.getcwd())

    @property
    def model_spec(self) -> ModelSpec | None:
        """How to rebuild the model, its paths resolved (None when scanned without a spec).

        Version 2: relative paths (the file of a ``file.py:factory`` spec, the checkpoint) are
        relative to the atlas directory, and come back absolute. Version 1: the spec's file is
        relative to the current directory, and a relative checkpoint is looked up beside the
        atlas first (the demo stores ``../model/...pt``, so that an output folder can be moved),
        else left relative to the current directory.
        """
        spec = self._manifest.model.spec
        if spec is None:
            return None
        if self._manifest.format_version >= 2:
            return spec.absolute(self._base())
        ckpt = spec.checkpoint
        if ckpt and self._directory is not None and not Path(ckpt).is_absolute():
            beside = self._directory / ckpt
            if beside.exists():
                spec = dataclasses.replace(spec, checkpoint=str(beside.resolve()))
        return spec

    def _data_spec_text(self) -> str | None:
        spec = self._manifest.data.spec
        if spec is None:
            return None
        if self._manifest.format_version >= 2:
            return absolute_spec(spec.spec, "data", self._base())
        return spec.spec

    @property
    def data_spec(self) -> DataSpec | None:
        """How to rebuild the dataset (None when scanned from Python data without a spec);
        paths resolved as for :attr:`model_spec`.

        Raises
        ------
        SpecError
            The recorded spec does not resolve here (an image folder missing on this machine).
        """
        spec = self._manifest.data.spec
        return None if spec is None else spec.to_spec(self._data_spec_text())

    @property
    def scan_identity(self) -> ScanIdentity:
        """What was scanned, with every path of the specs absolute: what a resumed scan (whose
        specs are absolute) is compared with.
        """
        m = self._manifest
        model, data = m.model, m.data
        spec = self.model_spec
        if spec is not None:
            model = dataclasses.replace(model, spec=spec.absolute())
        text = self._data_spec_text()
        if data.spec is not None and text is not None:
            data = dataclasses.replace(
                data, spec=dataclasses.replace(data.spec, spec=absolute_spec(text, "data"))
            )
        return ScanIdentity(model, data, m.layer_names, m.score, m.top_k)

    @property
    def data_size(self) -> int:
        """``len(dataset)`` of the scanned data."""
        return self._manifest.data.size

    @property
    def skipped(self) -> tuple[SkippedExample, ...]:
        """The examples that failed to load, by index (``.index``, ``.error``)."""
        return self._manifest.skipped

    def layer(self, layer: str) -> LayerTop:
        """The raw arrays of one layer (see :class:`LayerTop`).

        Raises
        ------
        LayerError
            ``layer`` is not in the atlas (the message lists those that are).
        """
        if layer not in self._tops:
            raise LayerError(unknown_name_message(layer, self.layers, "layer in this atlas"))
        return self._tops[layer]

    def _record(self, layer: str) -> LayerRecord:
        self.layer(layer)
        return self._manifest.layers[self.layers.index(layer)]

    def channels(self, layer: str) -> int:
        """C, the number of channels of ``layer``."""
        return self.layer(layer).channels

    def output_shape(self, layer: str) -> tuple[int, ...]:
        """Spatial shape of the layer's output."""
        return self.layer(layer).output_shape

    def layout(self, layer: str) -> str:
        """Where ``layer``'s channels are: ``"channels_first"``, ``"channels_last"`` or
        ``"tokens"`` (:data:`LAYOUTS`).
        """
        return self._record(layer).layout

    def channel_dim(self, layer: str) -> int:
        """The axis of ``layer``'s output ``(N, ...)`` that holds its channels."""
        return self._record(layer).channel_dim

    def nan_counts(self, layer: str) -> np.ndarray:
        """(C,) examples whose map held at least one NaN, per channel."""
        return self.layer(layer).nan_counts.copy()

    def label(self, index: int) -> Label | None:
        """The label of dataset example ``index`` when it is a hit of this atlas (the atlas
        records labels of its hits only), else None.
        """
        return None if self._labels is None else self._labels.get(int(index))

    def top(self, layer: str, channel: int) -> list[Hit]:
        """The best examples of ``layer``'s channel ``channel``, best first.

        Fewer than ``top_k`` only when fewer examples could be loaded.

        Raises
        ------
        LayerError
            Unknown layer.
        TypeError
            ``channel`` is not an int.
        ChannelError
            ``channel`` out of range (the message gives the valid range).
        """
        lt = self.layer(layer)
        if isinstance(channel, bool) or not isinstance(channel, int | np.integer):
            raise TypeError(f"channel must be an int, got {channel!r}")
        if not 0 <= channel < lt.channels:
            raise ChannelError(
                f"channel {channel} out of range for layer {layer!r}: it has {lt.channels} "
                f"channels (valid 0..{lt.channels - 1})"
            )
        labels = self._labels
        hits = []
        for k in range(lt.indices.shape[1]):
            index = int(lt.indices[channel, k])
            if index < 0:
                break
            hits.append(
                Hit(
                    index=index,
                    score=float(lt.scores[channel, k]),
                    location=tuple(int(v) for v in lt.locations[channel, k]),
                    label=None if labels is None else labels.get(index),
                )
            )
        return hits

    def label_histogram(
        self, layer: str, channel: int, k: int | None = None, bins: Any = None
    ) -> LabelHistogram:
        """How the channel's top ``k`` hits (default all) are spread over labels.

        ``int`` and ``str`` labels are counted per label. ``float`` labels (a pitch in Hz, an
        age) are counted in equal-width bins from the smallest to the largest label: by
        default as many as NumPy's ``"auto"`` rule gives for these few values (the larger of
        the Sturges and Freedman-Diaconis counts, so about ``log2(k) + 1``); NaN and infinite
        labels are counted as :attr:`LabelHistogram.missing`.

        Parameters
        ----------
        layer, channel
            The channel.
        k
            Count the first ``k`` hits only.
        bins
            Number labels only: a bin count, a sequence of edges or a NumPy rule name
            (``numpy.histogram_bin_edges``); given for ``int`` labels, they are binned too.

        Returns
        -------
        LabelHistogram

        Raises
        ------
        AtlasError
            The atlas records no labels.
        UsageError
            A bad ``k`` or ``bins`` (also ``bins`` for ``str`` labels).
        LayerError, ChannelError
            Unknown layer, channel out of range.
        """
        from featurelens.errors import UsageError

        kind = self.label_kind
        if kind is None:
            raise AtlasError(
                "this atlas records no labels: its dataset yields no (x, label) items, or labels "
                "that are not single numbers or strings"
            )
        hits = self.top(layer, channel)
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise UsageError(f"k must be a positive int, got {k!r}")
            hits = hits[:k]
        values = [h.label for h in hits]
        if kind == "str" and bins is not None:
            raise UsageError(f"bins={bins!r} is for number labels; this atlas has str labels")
        if kind == "float" or bins is not None:
            numbers = np.asarray(values, dtype=np.float64)
            finite = numbers[np.isfinite(numbers)]
            missing = int(len(numbers) - len(finite))
            if not len(finite):
                return LabelHistogram(kind, (), (), missing)
            try:
                edges = np.histogram_bin_edges(finite, bins="auto" if bins is None else bins)
                counts, edges = np.histogram(finite, bins=edges)
            except (ValueError, TypeError) as exc:
                raise UsageError(f"bins={bins!r} does not make bins: {exc}") from exc
            pairs = tuple((float(a), float(b)) for a, b in zip(edges[:-1], edges[1:], strict=True))
            return LabelHistogram(kind, pairs, tuple(int(c) for c in counts), missing)
        ordered = sorted(Counter(values).items(), key=lambda item: (-item[1], item[0]))
        return LabelHistogram(kind, tuple(v for v, _ in ordered), tuple(c for _, c in ordered))

    # ---- trust: code named by the manifest runs only with consent -------------------------
    def code_references(self) -> tuple[CodeReference, ...]:
        """What rebuilding the model and the data would run or read, found from the manifest
        alone (nothing is imported): one :class:`~featurelens.specs.CodeReference` per spec.

        Returns
        -------
        tuple of CodeReference
            ``needs_consent`` tells which ones an untrusted atlas may not run.
        """
        m, refs = self._manifest, []
        spec = self.model_spec  # version 2: absolute; version 1: relative to the current dir
        if m.model.spec is not None and spec is not None:
            resolved = absolute_spec(spec.spec, "model")
            refs.append(code_reference("model", m.model.spec.spec, resolved, self._directory))
        text = self._data_spec_text()
        if m.data.spec is not None and text is not None:
            resolved = absolute_spec(text, "data")
            refs.append(code_reference("data", m.data.spec.spec, resolved, self._directory))
        return tuple(refs)

    @property
    def trusted(self) -> bool:
        """Whether :meth:`build_model` and :meth:`build_data` may run what the manifest names
        without ``trust_code=True``: the atlas was made in this process (by a scan), was
        loaded with ``trust_code=True``, names nothing that needs consent, or was made by this
        user on this machine (its code-bearing parts carry the user's signature,
        :mod:`featurelens.trust`).
        """
        if self._made_here or self._consent:
            return True
        if not any(r.needs_consent for r in self.code_references()):
            return True
        return self._signature_valid()

    def _signature_valid(self) -> bool:
        if self._signed is None:
            try:
                self._signed = is_signed(self._trust_payload())
            except OSError as exc:  # an unreadable or insecure secret: trust nothing by it
                self._signed, self._trust_problem = False, f"; {exc}"
        return self._signed

    def _trust_payload(self) -> bytes:
        """The code-bearing parts of the manifest, as signed: the specs as recorded (relative
        paths stay relative, so that a moved atlas keeps its signature) and the sha256 of
        every Python file they name (so that a changed file does not).
        """
        m = self._manifest
        files = [_file_digest(r.target) for r in self.code_references() if r.kind == "file"]
        value = {
            "format": FORMAT_NAME,
            "format_version": m.format_version,
            "model": _model_spec_json(m.model.spec),
            "data": None if m.data.spec is None else m.data.spec.to_json_value(m.format_version),
            "files": files,
        }
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()

    def _sign(self) -> None:
        """Record in the user's store that this user made the atlas (see :mod:`featurelens.trust`)."""
        if not any(r.needs_consent for r in self.code_references()):
            return  # nothing to consent to: nothing to sign
        try:
            sign(self._trust_payload(), {"atlas": str(Path(self._base()))})
        except OSError as exc:
            warnings.warn(
                f"could not record in {str(trust_home())!r} that you made the atlas "
                f"{str(self._directory)!r} ({exc}); opening it later will need --trust-code "
                "(CLI) or trust_code=True (Python)",
                RuntimeWarning,
                stacklevel=3,
            )
        self._signed = None

    def _require_trust(self, role: str, trust_code: bool) -> None:
        """Refuse (before anything is imported) to rebuild ``role`` from an untrusted atlas."""
        if not isinstance(trust_code, bool):
            raise TypeError(f"trust_code must be True or False, got {trust_code!r}")
        if trust_code or self._made_here or self._consent:
            return
        refs = [r for r in self.code_references() if r.role == role and r.needs_consent]
        if not refs or self._signature_valid():
            return
        where = repr(str(self._directory)) if self._directory is not None else "(in memory)"
        raise UntrustedAtlasError(
            f"atlas {where} is not trusted, and rebuilding its {role} would run what it names: "
            + "; ".join(r.describe() for r in refs)
            + f". Only atlases you made on this machine open without asking (signed in "
            f"{str(trust_home() / TRUSTED)!r}{self._trust_problem}). If you trust where "
            "this atlas came from, pass --trust-code (featurelens figure, report, serve) or "
            "trust_code=True (Atlas.load, build_model, build_data, write_report)"
        )

    def _check_file_exists(self, role: str) -> None:
        """A named file that does not exist: a SpecError saying where it was looked for."""
        for ref in self.code_references():
            if ref.role == role and ref.kind == "file" and not Path(ref.target).is_file():
                rule = (
                    f"relative paths of an atlas are relative to its directory {self._base()}"
                    if self._manifest.format_version >= 2
                    else "a version-1 atlas's relative paths are relative to the current directory"
                )
                raise SpecError(
                    f"{role} spec {ref.spec!r} of atlas {str(self._directory)!r}: the file "
                    f"{ref.target} does not exist ({rule})"
                )

    def _vouch(self) -> None:
        """Mark as trusted: its specs are the caller's own (a resumed scan checked they are)."""
        self._made_here = True

    # ---- rebuilding the model and the data ----------------------------------------------
    def build_model(self, *, strict: bool = True, trust_code: bool = False) -> nn.Module:
        """Rebuild the scanned model from its recorded spec (in eval mode).

        Parameters
        ----------
        strict
            Refuse a rebuilt model whose parameters differ from the scanned ones (else warn).
        trust_code
            Run what the manifest names even when the atlas is not trusted (see
            :attr:`trusted`); only for atlases from a source you trust.

        Raises
        ------
        UntrustedAtlasError
            The spec names code (a Python file, a module) and the atlas is not trusted: the
            message shows what would run; nothing was imported.
        AtlasError
            When the atlas was made from a Python model without a spec, or (``strict``) when
            the rebuilt parameters differ from the scanned ones (fingerprint mismatch).
        SpecError
            The spec does not resolve (the message says where it looked).
        """
        spec = self.model_spec
        if spec is None:
            raise AtlasError(
                "this atlas was scanned from a Python model without a model spec, so the "
                "model cannot be rebuilt; scan with "
                "model_spec=featurelens.specs.ModelSpec(...) or a model built by "
                "ModelSpec(...).build(); or from Python call "
                "featurelens.zf_grid(model, data, atlas, ...) / "
                "featurelens.app.create_app(atlas_dir, model=..., data=...)"
            )
        self._check_file_exists("model")  # a stat, no code: before asking for consent
        self._require_trust("model", trust_code)
        model = spec.build()
        recorded = self._manifest.model.fingerprint
        actual = model_fingerprint(model)
        if actual != recorded:
            msg = (
                f"the model rebuilt from {spec.spec!r} has other parameters than the scanned "
                f"one (fingerprint {actual[:19]}... vs {recorded[:19]}...): its hits would not "
                "match; pass the scanned model explicitly, or strict=False to use it anyway"
            )
            if strict:
                raise AtlasError(msg)
            warnings.warn(msg, stacklevel=2)
        return model

    def build_data(self, *, trust_code: bool = False) -> SizedDataset:
        """Rebuild the scanned dataset from its recorded spec.

        Parameters
        ----------
        trust_code
            As for :meth:`build_model` (a data factory, or an image folder outside the atlas).

        Raises
        ------
        UntrustedAtlasError
            The spec names code or a folder outside the atlas and the atlas is not trusted.
        AtlasError
            When the atlas was made from Python data without a data spec, or the rebuilt
            dataset has another size than the scanned one.
        SpecError
            The spec does not resolve here.
        """
        if self._manifest.data.spec is None:
            raise AtlasError(
                "this atlas was scanned from Python data without a data spec, so the data "
                "cannot be rebuilt; scan with data_spec=featurelens.specs.DataSpec(...) or a "
                "dataset built by DataSpec(...).build(); or pass the dataset explicitly "
                "(featurelens.zf_grid(model, data, atlas, ...) / "
                "featurelens.app.create_app(atlas_dir, model=..., data=...))"
            )
        self._check_file_exists("data")  # a stat, no code: before asking for consent
        self._require_trust("data", trust_code)
        spec = self.data_spec
        assert spec is not None  # the manifest has a data spec
        data = spec.build()
        size = len(data)
        if size != self.data_size:
            raise AtlasError(
                f"the dataset rebuilt from {spec.spec!r} has {size} examples, the scanned "
                f"one had {self.data_size}: indices would not match"
            )
        return data

    # ---- storage -------------------------------------------------------------------------
    def _manifest_for(self, directory: Path) -> Manifest:
        """The manifest as saved in ``directory``: in version 2 the specs' paths relative to it
        where they are near it (:data:`featurelens.specs.NEAR_LEVELS`), else absolute.
        """
        m = self._manifest
        if m.format_version < 2:
            return m  # version 1 says nothing of where its paths are relative to
        model, data = m.model, m.data
        spec = self.model_spec
        if spec is not None:
            model = dataclasses.replace(model, spec=spec.near(directory))
        text = self._data_spec_text()
        if data.spec is not None and text is not None:
            stored = dataclasses.replace(data.spec, spec=near_spec(text, "data", directory))
            data = dataclasses.replace(data, spec=stored)
        return dataclasses.replace(m, model=model, data=data)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the atlas to ``directory`` (created if needed), atomically.

        The arrays go to a new content-named file, then ``manifest.json`` naming it replaces
        the old one (the commit point), then array files it no longer names are removed. In
        version 2, paths of the specs are stored relative to ``directory`` when near it. A
        trusted atlas (a scan's) is signed into the user's store (:mod:`featurelens.trust`),
        so that it opens later without ``trust_code``; an atlas loaded from elsewhere is not.

        Returns
        -------
        Path
            ``directory``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        trusted = self.trusted  # before the paths move
        manifest = self._manifest_for(directory)
        arrays: dict[str, np.ndarray] = {}
        for i, name in enumerate(self.layers):
            lt = self._tops[name]
            arrays[f"{i}.indices"] = lt.indices.astype(np.int64)
            arrays[f"{i}.scores"] = lt.scores.astype(np.float64)
            arrays[f"{i}.locations"] = lt.locations.astype(np.int64)
            arrays[f"{i}.nan_counts"] = lt.nan_counts.astype(np.int64)
        if self._labels is not None:
            keys = sorted(self._labels)
            values = [self._labels[k] for k in keys]
            arrays["labels.index"] = np.asarray(keys, dtype=np.int64)
            if manifest.data.labels == "str":
                width = max([1, *(len(v) for v in values)])  # type: ignore[arg-type]
                arrays["labels.value"] = np.asarray(values, dtype=f"<U{width}")
            else:
                dtype = np.int64 if manifest.data.labels == "int" else np.float64
                arrays["labels.value"] = np.asarray(values, dtype=dtype)
        data = _npz_bytes(arrays)
        digest = sha256_hex(data)
        array_file = f"arrays-{digest[:16]}.npz"
        manifest = dataclasses.replace(manifest, arrays=ArraysRecord(array_file, digest))
        text = manifest.to_json().encode()
        atomic_write(directory / array_file, data)
        atomic_write(directory / MANIFEST, text)
        self._manifest = manifest
        self._directory = directory
        self._signed = None
        if trusted:
            self._sign()
        for stale in directory.glob("arrays-*.npz"):
            if stale.name != array_file:
                stale.unlink(missing_ok=True)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        allow_incomplete: bool = False,
        trust_code: bool = False,
    ) -> Atlas:
        """Read an atlas directory written by :meth:`save`. Nothing is imported or run.

        Parameters
        ----------
        directory
            The atlas directory.
        allow_incomplete
            Load a scan checkpoint too.
        trust_code
            Let :meth:`build_model` / :meth:`build_data` run what the manifest names (a
            Python file, a module, an image folder outside the atlas) although the atlas was
            not made by this user on this machine. Give it only for atlases from a source you
            trust.

        Raises
        ------
        FileNotFoundError
            No such directory, or no manifest in it.
        AtlasError
            A manifest that is not valid (another format or version, a missing key, a value of
            the wrong type or out of bounds: the message names the file and the key), an array
            file that is missing, linked, corrupt, compressed or does not fit the manifest, or
            an incomplete scan (unless ``allow_incomplete``): resume it first.
        """
        if not isinstance(trust_code, bool):
            raise TypeError(f"trust_code must be True or False, got {trust_code!r}")
        directory = Path(directory)
        manifest = Manifest.read(directory)
        if not manifest.complete and not allow_incomplete:
            raise AtlasError(
                f"atlas {str(directory)!r} holds an incomplete scan "
                f"({manifest.progress.next_index} of {manifest.data.size} examples): "
                "resume it with `featurelens scan ... --out DIR --resume`, or call "
                "featurelens.scan(..., checkpoint=DIR) again with the same arguments"
            )
        tops, labels = _read_arrays(directory, manifest)
        try:
            atlas = cls(manifest, tops, labels)
        except AtlasError as exc:
            raise AtlasError(f"atlas {str(directory)!r}: {exc}") from exc
        atlas._directory = directory
        atlas._made_here = False
        atlas._consent = trust_code
        return atlas

    # ---- display -------------------------------------------------------------------------
    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (
            f"Atlas({len(self.layers)} layers, score={self.score!r}, top_k={self.top_k}, "
            f"{self._manifest.examples_scanned} examples, {state})"
        )

    def _repr_html_(self) -> str:
        def e(value: object) -> str:  # every value from a manifest is escaped
            return html.escape(str(value), quote=True)

        m = self._manifest
        model = m.model.spec.spec if m.model.spec else m.model.class_name
        data = m.data.spec.spec if m.data.spec else m.data.class_name
        head = (
            f"<p><b>Atlas</b> of {e(model)} over {e(data)} "
            f"({e(m.examples_scanned)} of {e(m.data.size)} examples, "
            f"{e(len(m.skipped))} skipped; score {e(self.score)}, top {e(self.top_k)}"
            f"{'' if self.complete else '; <b>incomplete</b>'})</p>"
        )
        rows = []
        for name in self.layers:
            lt = self._tops[name]
            first = lt.scores[:, 0]
            best = "-"
            if np.any(~np.isnan(first)):
                c = int(np.nanargmax(first))
                best = (
                    f"channel {c}: example {int(lt.indices[c, 0])} "
                    f"score {first[c]:.4g} at {tuple(int(v) for v in lt.locations[c, 0])}"
                )
            shape = "x".join(str(s) for s in lt.output_shape) or "-"
            rows.append(
                f"<tr><td><code>{e(name)}</code></td><td>{e(lt.channels)}</td>"
                f"<td>{e(shape)}</td><td>{e(int(lt.nan_counts.sum()))}</td><td>{e(best)}</td></tr>"
            )
        table = (
            "<table><thead><tr><th>layer</th><th>channels</th><th>output</th>"
            "<th>NaN examples</th><th>strongest hit</th></tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table>"
        )
        return head + table
