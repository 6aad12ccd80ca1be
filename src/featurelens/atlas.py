"""The atlas: maximally activating examples of many layers, and its on-disk format.

This module owns the format: :class:`Manifest` is ``manifest.json`` as typed, frozen records
(read, validated, written and compared here and nowhere else), :class:`Atlas` pairs it with
the top-k arrays. An atlas directory holds ``manifest.json`` (what was scanned, how, and how
far) and one ``arrays-<sha256>.npz`` with the top-k hits of every layer. The format is
documented in ``docs/atlas-format.md``; :data:`FORMAT_VERSION` changes whenever a reader of the
previous version would misread a new atlas.

Writes are atomic: the arrays go to a new content-named file, then the manifest that names it
replaces the old one with ``os.replace`` (the commit point), then stale array files are
removed. A process killed at any moment leaves either the old atlas or the new one.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import os
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featurelens._version import __version__
from featurelens.errors import AtlasError, ChannelError, LayerError
from featurelens.files import atomic_write
from featurelens.fingerprint import model_fingerprint, sha256_hex
from featurelens.graph import unknown_name_message
from featurelens.specs import DataSpec, ModelSpec

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "ArraysRecord",
    "Atlas",
    "AtlasError",
    "ChannelError",
    "DataRecord",
    "DataSpecRecord",
    "Hit",
    "LayerRecord",
    "LayerTop",
    "Manifest",
    "ModelRecord",
    "Preprocessing",
    "Progress",
    "ScanIdentity",
    "SkippedExample",
]

FORMAT_NAME = "featurelens-atlas"
FORMAT_VERSION = 1
#: The manifest's file name inside an atlas directory.
MANIFEST = "manifest.json"


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
    """

    index: int
    score: float
    location: tuple[int, ...]


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
    except (TypeError, ValueError):
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

    def elements(self) -> list[_Node]:
        """The elements of a JSON array, keyed ``key[i]``."""
        if not isinstance(self.value, list):
            raise self.expected("an array")
        return [_Node(v, self.source, f"{self.key}[{i}]") for i, v in enumerate(self.value)]

    def as_int(self, minimum: int = 0) -> int:
        """An integer (not a boolean) ``>= minimum``."""
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise self.expected(f"an integer >= {minimum}")
        return v

    def as_number(self) -> float:
        """A number (int or float, kept as written so that it is written back the same)."""
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.expected("a number")
        return v

    def as_str(self) -> str:
        if not isinstance(self.value, str):
            raise self.expected("a string")
        return self.value

    def as_bool(self) -> bool:
        """``true`` or ``false``: the string ``"false"`` or the number 0 is refused."""
        if not isinstance(self.value, bool):
            raise self.expected("true or false")
        return self.value

    def as_optional_str(self) -> str | None:
        return None if self.is_null() else self.as_str()

    def as_optional_int(self, minimum: int = 0) -> int | None:
        return None if self.is_null() else self.as_int(minimum)

    def as_shape(self) -> tuple[int, ...]:
        """An array of integers >= 0."""
        return tuple(e.as_int() for e in self.elements())

    def as_numbers(self) -> tuple[float, ...] | None:
        """null or an array of numbers."""
        return None if self.is_null() else tuple(e.as_number() for e in self.elements())


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
        a Python object without a spec. A relative checkpoint path is stored as written; see
        :attr:`Atlas.model_spec` for how it is resolved.
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
            spec = ModelSpec(
                spec=spec_node.get("spec").as_str(),
                weights=spec_node.get("weights").as_optional_str(),
                checkpoint=spec_node.get("checkpoint").as_optional_str(),
            )
        return cls(spec, node.get("class").as_str(), node.get("fingerprint").as_str())


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
    """

    spec: str
    input_size: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_spec(cls, spec: DataSpec) -> DataSpecRecord:
        """The record of a ``DataSpec``."""
        return cls(spec.spec, spec.input_size, spec.mean, spec.std)

    def to_spec(self) -> DataSpec:
        """The ``DataSpec`` (which checks it).

        Raises
        ------
        SpecError
            The spec does not resolve here (for example an image folder that does not exist
            on this machine).
        """
        return DataSpec(self.spec, input_size=self.input_size, mean=self.mean, std=self.std)

    def to_json_value(self) -> JsonObject:
        """The JSON object, keys in the order of the format."""
        return {
            "spec": self.spec,
            "input_size": self.input_size,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }

    @classmethod
    def from_node(cls, node: _Node) -> DataSpecRecord:
        """Read and check ``node``; an :class:`AtlasError` names the key that is wrong."""
        return cls(
            spec=node.get("spec").as_str(),
            input_size=node.get("input_size").as_optional_int(minimum=1),
            mean=node.get("mean").as_numbers(),
            std=node.get("std").as_numbers(),
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
    """

    spec: DataSpecRecord | None
    class_name: str
    size: int
    fingerprint: str | None = None

    def to_json_value(self) -> JsonObject:
        """The JSON object, keys in the order of the format."""
        out: JsonObject = {
            "spec": None if self.spec is None else self.spec.to_json_value(),
            "class": self.class_name,
            "size": self.size,
        }
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        return out

    @classmethod
    def from_node(cls, node: _Node) -> DataRecord:
        """Read and check ``node``; an :class:`AtlasError` names the key that is wrong."""
        spec = node.get("spec")
        fingerprint = node.get_optional("fingerprint")
        return cls(
            spec=None if spec.is_null() else DataSpecRecord.from_node(spec),
            class_name=node.get("class").as_str(),
            size=node.get("size").as_int(),
            fingerprint=None if fingerprint is None else fingerprint.as_str(),
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
        return cls(
            input_size=node.get("input_size").as_optional_int(minimum=1),
            mean=node.get("mean").as_numbers(),
            std=node.get("std").as_numbers(),
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
        Spatial shape of its output (``()`` for outputs ``(N, C)``).
    nan_counts
        ``(channel, examples)`` pairs, ascending by channel, for the channels where at least
        one example's map held a NaN (the others left out, as in the JSON).
    """

    name: str
    channels: int
    output_shape: tuple[int, ...]
    nan_counts: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, name: str, top: LayerTop) -> LayerRecord:
        """The record of a layer's top-k state."""
        sparse = tuple((c, int(v)) for c, v in enumerate(top.nan_counts) if v)
        return cls(name, top.channels, tuple(int(v) for v in top.output_shape), sparse)

    def to_json_value(self) -> JsonObject:
        """The JSON object, keys in the order of the format."""
        return {
            "name": self.name,
            "channels": self.channels,
            "output_shape": list(self.output_shape),
            # sparse: {channel: examples whose map held a NaN}, channels without NaN left out
            "nan_counts": {str(c): v for c, v in self.nan_counts},
        }

    @classmethod
    def from_node(cls, node: _Node) -> LayerRecord:
        """Read and check ``node``; an :class:`AtlasError` names the key that is wrong."""
        channels = node.get("channels").as_int()
        counts = node.get("nan_counts")
        pairs = []
        for key, value in counts.fields().items():
            canonical = key.isascii() and key.isdigit() and str(int(key)) == key
            if not (canonical and int(key) < channels):
                raise counts.error(
                    f"has key {key!r}; keys must be channel numbers 0..{channels - 1}"
                )
            pairs.append((int(key), _Node(value, node.source, f"{counts.key}.{key}").as_int()))
        return cls(
            name=node.get("name").as_str(),
            channels=channels,
            output_shape=node.get("output_shape").as_shape(),
            nan_counts=tuple(pairs),
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
        Its name, ``arrays-<first 16 hex of sha256>.npz``.
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
        return cls(node.get("file").as_str(), node.get("sha256").as_str())


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
        none). Class names are informative and not compared.

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
        if self.layers != saved.layers:
            out.append(f"the layers differ ({list(self.layers)} vs {list(saved.layers)})")
        if self.score != saved.score:
            out.append(f"score differs ({self.score!r} vs {saved.score!r})")
        if self.top_k != saved.top_k:
            out.append(f"top_k differs ({self.top_k!r} vs {saved.top_k!r})")
        return out


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: what an atlas holds, how it was made, and how far the scan got.

    The one reader and writer of the format (version :data:`FORMAT_VERSION`, described in
    ``docs/atlas-format.md``): :meth:`from_json` checks every key and type and raises
    :class:`AtlasError` naming the file and the key; :meth:`to_json` writes the very bytes a
    featurelens of this format version writes (``from_json(text).to_json() == text`` for every
    manifest featurelens wrote). Unknown keys are ignored when reading and not written back.

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
        """
        spec = identity.data.spec
        return cls(
            model=identity.model,
            data=identity.data,
            preprocessing=None
            if spec is None
            else Preprocessing(spec.input_size, spec.mean, spec.std),
            input_shape=input_shape,
            layers=tuple(LayerRecord.of(name, tops[name]) for name in identity.layers),
            score=identity.score,
            top_k=identity.top_k,
            examples_scanned=examples_scanned,
            skipped=tuple(SkippedExample(i, skipped[i]) for i in sorted(skipped)),
            complete=progress.next_index >= identity.data.size,
            progress=progress,
        )

    # ---- JSON ----------------------------------------------------------------------------
    def to_json_value(self) -> JsonObject:
        """The manifest as a JSON object, keys in the order of the format."""
        out: JsonObject = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "library_version": self.library_version,
            "model": self.model.to_json_value(),
            "data": self.data.to_json_value(),
            "preprocessing": None
            if self.preprocessing is None
            else self.preprocessing.to_json_value(),
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "layers": [layer.to_json_value() for layer in self.layers],
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
            Not UTF-8, not JSON, not a featurelens atlas manifest, another format version, a
            missing key or a value of the wrong type (``"complete": "false"`` is refused, not
            taken as true); the message names ``source`` and the key.
        """
        try:
            if isinstance(text, bytes):
                text = text.decode("utf-8")
            value = json.loads(text)
        except UnicodeDecodeError as exc:
            raise AtlasError(f"atlas manifest {source!r} is not UTF-8 text: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise AtlasError(f"{source!r} is not valid JSON: {exc}") from exc
        root = _Node(value, source)
        if not isinstance(value, dict) or value.get("format") != FORMAT_NAME:
            raise AtlasError(f"{source!r} is not a {FORMAT_NAME} manifest")
        version = value.get("format_version")
        if isinstance(version, bool) or version != FORMAT_VERSION:
            raise AtlasError(
                f"atlas manifest {source!r} has format version {version!r}; this featurelens "
                f"({__version__}) reads version {FORMAT_VERSION} only "
                f"(the atlas was written by featurelens {value.get('library_version')!r})"
            )
        input_shape = root.get("input_shape")
        preprocessing = root.get("preprocessing")
        arrays = root.get_optional("arrays")
        return cls(
            model=ModelRecord.from_node(root.get("model")),
            data=DataRecord.from_node(root.get("data")),
            preprocessing=None
            if preprocessing.is_null()
            else Preprocessing.from_node(preprocessing),
            input_shape=None if input_shape.is_null() else input_shape.as_shape(),
            layers=tuple(LayerRecord.from_node(e) for e in root.get("layers").elements()),
            score=root.get("score").as_str(),
            top_k=root.get("top_k").as_int(minimum=1),
            examples_scanned=root.get("examples_scanned").as_int(),
            skipped=tuple(SkippedExample.from_node(e) for e in root.get("skipped").elements()),
            complete=root.get("complete").as_bool(),
            progress=Progress.from_node(root.get("progress")),
            arrays=None if arrays is None else ArraysRecord.from_node(arrays),
            library_version=root.get("library_version").as_str(),
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
            As :meth:`from_json`.
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
            A manifest that cannot be read (as :meth:`from_json`).
        """
        path = Path(directory) / MANIFEST
        if not path.is_file():
            return None
        return cls.from_json(path.read_bytes(), source=str(path))

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
            Saying whether it holds a complete atlas (choose another output or delete it), an
            interrupted scan (resume it), with its size and layers, or a manifest that cannot
            be read.
        """
        where = str(directory)
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

    Attributes
    ----------
    layers
        Scanned layer names, in the order given to the scan.

    Raises
    ------
    AtlasError
        ``tops`` does not hold exactly the manifest's layers.
    """

    def __init__(self, manifest: Manifest, tops: Mapping[str, LayerTop]) -> None:
        self._manifest = manifest
        self._tops = dict(tops)
        self.layers: list[str] = list(manifest.layer_names)
        if set(self._tops) != set(self.layers) or len(set(self.layers)) != len(self.layers):
            raise AtlasError(
                f"an atlas needs the top-k arrays of exactly its layers {self.layers}, "
                f"got arrays of {sorted(self._tops)}"
            )
        self._directory: Path | None = None  # where it was loaded from or saved to

    # ---- queries -------------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        """The manifest (frozen): what ``manifest.json`` holds; ``.to_json()`` gives its text."""
        return self._manifest

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
    def model_spec(self) -> ModelSpec | None:
        """How to rebuild the model; a relative checkpoint path is resolved against the atlas
        directory when the file is there (the demo stores ``../model/...pt``, so that an output
        folder can be moved), else left relative to the current directory."""
        spec = self._manifest.model.spec
        if spec is None:
            return None
        ckpt = spec.checkpoint
        if ckpt and self._directory is not None and not Path(ckpt).is_absolute():
            beside = self._directory / ckpt
            if beside.exists():
                spec = dataclasses.replace(spec, checkpoint=str(beside.resolve()))
        return spec

    @property
    def data_spec(self) -> DataSpec | None:
        """How to rebuild the dataset (None when scanned from Python data without a spec).

        Raises
        ------
        SpecError
            The recorded spec does not resolve here (an image folder missing on this machine).
        """
        spec = self._manifest.data.spec
        return None if spec is None else spec.to_spec()

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

    def channels(self, layer: str) -> int:
        """C, the number of channels of ``layer``."""
        return self.layer(layer).channels

    def output_shape(self, layer: str) -> tuple[int, ...]:
        """Spatial shape of the layer's output."""
        return self.layer(layer).output_shape

    def nan_counts(self, layer: str) -> np.ndarray:
        """(C,) examples whose map held at least one NaN, per channel."""
        return self.layer(layer).nan_counts.copy()

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
                )
            )
        return hits

    # ---- rebuilding the model and the data ----------------------------------------------
    def build_model(self, *, strict: bool = True) -> nn.Module:
        """Rebuild the scanned model from its recorded spec (in eval mode).

        Raises
        ------
        AtlasError
            When the atlas was made from a Python model without a spec, or (``strict``) when
            the rebuilt parameters differ from the scanned ones (fingerprint mismatch).
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

    def build_data(self) -> torch.utils.data.Dataset:
        """Rebuild the scanned dataset from its recorded spec.

        Raises
        ------
        AtlasError
            When the atlas was made from Python data without a data spec, or the rebuilt
            dataset has another size than the scanned one.
        """
        spec = self.data_spec
        if spec is None:
            raise AtlasError(
                "this atlas was scanned from Python data without a data spec, so the data "
                "cannot be rebuilt; scan with data_spec=featurelens.specs.DataSpec(...) or a "
                "dataset built by DataSpec(...).build(); or pass the dataset explicitly "
                "(featurelens.zf_grid(model, data, atlas, ...) / "
                "featurelens.app.create_app(atlas_dir, model=..., data=...))"
            )
        data = spec.build()
        size = len(data)
        if size != self.data_size:
            raise AtlasError(
                f"the dataset rebuilt from {spec.spec!r} has {size} examples, the scanned "
                f"one had {self.data_size}: indices would not match"
            )
        return data

    # ---- storage -------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the atlas to ``directory`` (created if needed), atomically.

        The arrays go to a new content-named file, then ``manifest.json`` naming it replaces
        the old one (the commit point), then array files it no longer names are removed.

        Returns
        -------
        Path
            ``directory``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for i, name in enumerate(self.layers):
            lt = self._tops[name]
            arrays[f"{i}.indices"] = lt.indices.astype(np.int64)
            arrays[f"{i}.scores"] = lt.scores.astype(np.float64)
            arrays[f"{i}.locations"] = lt.locations.astype(np.int64)
            arrays[f"{i}.nan_counts"] = lt.nan_counts.astype(np.int64)
        data = _npz_bytes(arrays)
        digest = sha256_hex(data)
        array_file = f"arrays-{digest[:16]}.npz"
        manifest = dataclasses.replace(self._manifest, arrays=ArraysRecord(array_file, digest))
        atomic_write(directory / array_file, data)
        atomic_write(directory / MANIFEST, manifest.to_json().encode())
        self._manifest = manifest
        self._directory = directory
        for stale in directory.glob("arrays-*.npz"):
            if stale.name != array_file:
                stale.unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, allow_incomplete: bool = False) -> Atlas:
        """Read an atlas directory written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            No such directory, or no manifest in it.
        AtlasError
            A manifest that is not valid (another format or version, a missing key, a value of
            the wrong type: the message names the key), missing or corrupt arrays, or an
            incomplete scan (unless ``allow_incomplete``): resume it first.
        """
        directory = Path(directory)
        manifest = Manifest.read(directory)
        if not manifest.complete and not allow_incomplete:
            raise AtlasError(
                f"atlas {str(directory)!r} holds an incomplete scan "
                f"({manifest.progress.next_index} of {manifest.data.size} examples): "
                "resume it with `featurelens scan ... --out DIR --resume`, or call "
                "featurelens.scan(..., checkpoint=DIR) again with the same arguments"
            )
        entry = manifest.arrays
        array_path = directory / (entry.file if entry is not None else "")
        if entry is None or not array_path.is_file():
            raise AtlasError(f"atlas {str(directory)!r}: array file {array_path.name!r} missing")
        data = array_path.read_bytes()
        if sha256_hex(data) != entry.sha256:
            raise AtlasError(f"atlas {str(directory)!r}: {array_path.name} is corrupt (sha256)")
        tops: dict[str, LayerTop] = {}
        with np.load(array_path, allow_pickle=False) as npz:
            for i, layer in enumerate(manifest.layers):
                tops[layer.name] = LayerTop(
                    indices=npz[f"{i}.indices"],
                    scores=npz[f"{i}.scores"],
                    locations=npz[f"{i}.locations"],
                    nan_counts=npz[f"{i}.nan_counts"],
                    output_shape=layer.output_shape,
                )
        atlas = cls(manifest, tops)
        atlas._directory = directory
        return atlas

    # ---- display -------------------------------------------------------------------------
    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (
            f"Atlas({len(self.layers)} layers, score={self.score!r}, top_k={self.top_k}, "
            f"{self._manifest.examples_scanned} examples, {state})"
        )

    def _repr_html_(self) -> str:
        m = self._manifest
        model = m.model.spec.spec if m.model.spec else m.model.class_name
        data = m.data.spec.spec if m.data.spec else m.data.class_name
        head = (
            f"<p><b>Atlas</b> of {html.escape(model)} over {html.escape(data)} "
            f"({m.examples_scanned} of {m.data.size} examples, "
            f"{len(m.skipped)} skipped; score {html.escape(self.score)}, top {self.top_k}"
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
            rows.append(
                f"<tr><td><code>{html.escape(name)}</code></td><td>{lt.channels}</td>"
                f"<td>{'x'.join(str(s) for s in lt.output_shape) or '-'}</td>"
                f"<td>{int(lt.nan_counts.sum())}</td><td>{html.escape(best)}</td></tr>"
            )
        table = (
            "<table><thead><tr><th>layer</th><th>channels</th><th>output</th>"
            "<th>NaN examples</th><th>strongest hit</th></tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table>"
        )
        return head + table


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` whose bytes depend on the arrays only (np.savez stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(value), allow_pickle=False)
    return buf.getvalue()
