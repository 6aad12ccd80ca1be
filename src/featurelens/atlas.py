"""The atlas: maximally activating examples of many layers, and its on-disk format.

An atlas directory holds ``manifest.json`` (what was scanned, how, and how far) and one
``arrays-<sha256>.npz`` with the top-k hits of every layer. The format is documented in
``docs/atlas-format.md``; :data:`FORMAT_VERSION` changes whenever a reader of the previous
version would misread a new atlas.

Writes are atomic: the arrays go to a new content-named file, then the manifest that names it
replaces the old one with ``os.replace`` (the commit point), then stale array files are
removed. A process killed at any moment leaves either the old atlas or the new one.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import html
import json
import os
import secrets
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featurelens.errors import AtlasError, ChannelError
from featurelens.graph import LayerError, unknown_name_message
from featurelens.specs import DataSpec, ModelSpec

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Atlas",
    "AtlasError",
    "ChannelError",
    "Hit",
    "LayerTop",
    "model_fingerprint",
]

FORMAT_NAME = "featurelens-atlas"
FORMAT_VERSION = 1
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
        return int(self.indices.shape[0])


def model_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` of every parameter and buffer (names, dtypes, shapes and values).

    Hashing reads every weight (about 0.5 s per 100M parameters on a CPU core). It is not
    cached: writes through ``.data`` do not bump tensor version counters, so no cheap key
    tells a modified model from the one hashed before. A scan hashes its model once.
    """
    state = model.state_dict(keep_vars=True)
    uninitialized = nn.parameter.UninitializedParameter | nn.parameter.UninitializedBuffer
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        if isinstance(t, uninitialized):
            h.update(b"uninitialized")
            continue
        hash_tensor(h, t)
    return "sha256:" + h.hexdigest()


def hash_tensor(h: Any, t: torch.Tensor) -> None:
    """Feed ``t``'s dtype, shape and bytes to the hashlib object ``h``."""
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _library_version() -> str:
    import featurelens

    return featurelens.__version__


class Atlas:
    """Top-k maximally activating examples of every scanned layer and channel.

    Made by :func:`featurelens.scan`; saved with :meth:`save`, read with :meth:`load`.

    Attributes
    ----------
    layers
        Scanned layer names, in the order given to the scan.
    """

    def __init__(self, manifest: dict[str, Any], tops: dict[str, LayerTop]) -> None:
        self._manifest = manifest
        self._tops = tops
        self.layers: list[str] = [entry["name"] for entry in manifest["layers"]]
        self._directory: Path | None = None  # where it was loaded from or saved to

    # ---- queries -------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest (a copy): the JSON written to ``manifest.json``."""
        return copy.deepcopy(self._manifest)

    @property
    def complete(self) -> bool:
        return bool(self._manifest["complete"])

    @property
    def score(self) -> str:
        return self._manifest["score"]

    @property
    def top_k(self) -> int:
        return int(self._manifest["top_k"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(C, *spatial)`` of one example, without batch."""
        shape = self._manifest["input_shape"]
        return tuple(shape) if shape is not None else ()

    @property
    def model_spec(self) -> ModelSpec | None:
        """How to rebuild the model; a relative checkpoint path is resolved against the atlas
        directory when the file is there (the demo stores ``../model/...pt``, so that an output
        folder can be moved), else left relative to the current directory."""
        d = self._manifest["model"]["spec"]
        if d is None:
            return None
        spec = ModelSpec.from_dict(d)
        ckpt = spec.checkpoint
        if ckpt and self._directory is not None and not Path(ckpt).is_absolute():
            beside = self._directory / ckpt
            if beside.exists():
                spec = dataclasses.replace(spec, checkpoint=str(beside.resolve()))
        return spec

    @property
    def data_spec(self) -> DataSpec | None:
        d = self._manifest["data"]["spec"]
        return None if d is None else DataSpec.from_dict(d)

    @property
    def data_size(self) -> int:
        return int(self._manifest["data"]["size"])

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """``[{"index": i, "error": "..."}]`` for examples that failed to load."""
        return copy.deepcopy(self._manifest["skipped"])

    def layer(self, layer: str) -> LayerTop:
        """The raw arrays of one layer (see :class:`LayerTop`)."""
        if layer not in self._tops:
            raise LayerError(unknown_name_message(layer, self.layers, "layer in this atlas"))
        return self._tops[layer]

    def channels(self, layer: str) -> int:
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
        recorded = self._manifest["model"]["fingerprint"]
        actual = model_fingerprint(model)
        if actual != recorded:
            msg = (
                f"the model rebuilt from {spec.spec!r} has other parameters than the scanned "
                f"one (fingerprint {actual[:19]}... vs {recorded[:19]}...): its hits would not "
                "match; pass the scanned model explicitly, or strict=False to use it anyway"
            )
            if strict:
                raise AtlasError(msg)
            import warnings

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
        if len(data) != self.data_size:
            raise AtlasError(
                f"the dataset rebuilt from {spec.spec!r} has {len(data)} examples, the scanned "
                f"one had {self.data_size}: indices would not match"
            )
        return data

    # ---- storage -------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the atlas to ``directory`` (created if needed), atomically. Returns the path."""
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
        digest = hashlib.sha256(data).hexdigest()
        array_file = f"arrays-{digest[:16]}.npz"
        manifest = dict(self._manifest)
        manifest["arrays"] = {"file": array_file, "sha256": digest}
        atomic_write(directory / array_file, data)
        text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
        atomic_write(directory / MANIFEST, text.encode())
        self._manifest = manifest
        self._directory = directory
        for stale in directory.glob("arrays-*.npz"):
            if stale.name != array_file:
                stale.unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, allow_incomplete: bool = False) -> Atlas:
        """Read an atlas directory written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            No such directory, or no manifest in it.
        AtlasError
            Another format or version, missing or corrupt arrays, or an incomplete scan
            (unless ``allow_incomplete``): resume it first.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"atlas directory {str(directory)!r} does not exist")
        path = directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} is not an atlas: it has no {MANIFEST} "
                "(make one with featurelens.scan or `featurelens scan`)"
            )
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise AtlasError(f"{str(path)!r} is not valid JSON: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise AtlasError(f"{str(path)!r} is not a {FORMAT_NAME} manifest")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise AtlasError(
                f"atlas {str(directory)!r} has format version {version!r}; this featurelens "
                f"({_library_version()}) reads version {FORMAT_VERSION} only "
                f"(the atlas was written by featurelens {manifest.get('library_version')!r})"
            )
        if not manifest["complete"] and not allow_incomplete:
            progress = manifest.get("progress", {})
            raise AtlasError(
                f"atlas {str(directory)!r} holds an incomplete scan "
                f"({progress.get('next_index', 0)} of {manifest['data']['size']} examples): "
                "resume it with `featurelens scan ... --out DIR --resume`, or call "
                "featurelens.scan(..., checkpoint=DIR) again with the same arguments"
            )
        arrays_entry = manifest.get("arrays") or {}
        array_path = directory / str(arrays_entry.get("file", ""))
        if not arrays_entry or not array_path.is_file():
            raise AtlasError(f"atlas {str(directory)!r}: array file {array_path.name!r} missing")
        data = array_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != arrays_entry.get("sha256"):
            raise AtlasError(f"atlas {str(directory)!r}: {array_path.name} is corrupt (sha256)")
        tops: dict[str, LayerTop] = {}
        with np.load(array_path, allow_pickle=False) as npz:
            for i, entry in enumerate(manifest["layers"]):
                tops[entry["name"]] = LayerTop(
                    indices=npz[f"{i}.indices"],
                    scores=npz[f"{i}.scores"],
                    locations=npz[f"{i}.locations"],
                    nan_counts=npz[f"{i}.nan_counts"],
                    output_shape=tuple(entry["output_shape"]),
                )
        atlas = cls(manifest, tops)
        atlas._directory = directory
        return atlas

    # ---- display -------------------------------------------------------------------------
    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (
            f"Atlas({len(self.layers)} layers, score={self.score!r}, top_k={self.top_k}, "
            f"{self._manifest['examples_scanned']} examples, {state})"
        )

    def _repr_html_(self) -> str:
        m = self._manifest
        model = m["model"]["spec"]["spec"] if m["model"]["spec"] else m["model"]["class"]
        data = m["data"]["spec"]["spec"] if m["data"]["spec"] else m["data"]["class"]
        head = (
            f"<p><b>Atlas</b> of {html.escape(str(model))} over {html.escape(str(data))} "
            f"({m['examples_scanned']} of {m['data']['size']} examples, "
            f"{len(m['skipped'])} skipped; score {html.escape(self.score)}, top {self.top_k}"
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


# ---- atomic, reproducible files ----------------------------------------------------------


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` whose bytes depend on the arrays only (np.savez stamps the current time)."""
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(value), allow_pickle=False)
    return buf.getvalue()


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in its folder and ``os.replace``.

    Readers see the old file or the new one, never a partial one. The temporary file is
    created with mode 0o666 (less the umask, applied by the OS: no process-wide umask change)
    and removed if the write fails. Returns the path.
    """
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
