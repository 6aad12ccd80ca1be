"""Maximally activating examples: one streaming, truncated pass over a dataset for many layers.

For feature map ``k`` of layer ``l`` every example ``i`` gets a score, by default
``max over s of y[l, s, k]`` (Zeiler & Fergus, arXiv 1311.2901), and the ``top_k`` best
examples are kept with the location of their maximum: ``MaxAct(l, k) = [i_1, ..., i_m]``.

How the pass is organised:

* the arguments are checked and frozen into one :class:`_ScanConfig` (with the
  :class:`~featurelens.atlas.ScanIdentity` a checkpoint must match to be resumed);
* one forward per batch serves every requested layer, and stops after the deepest one
  (:func:`featurelens.graph.capture`);
* each layer's output is reduced to per-channel candidates (:class:`LayerCandidates`) by a
  :class:`_BatchReducer` inside the forward hook, right when it is produced (a later in-place
  ReLU would overwrite it), so memory stays O(layers x channels x top_k) whatever the dataset
  size;
* batches are sequential index ranges (:func:`featurelens.data.iter_batches`), so a scan
  checkpointed with ``checkpoint=DIR`` resumes exactly where it stopped, and under
  ``torch.distributed`` rank ``r`` takes batches ``r, r + W, r + 2W, ...``: the very batches of
  a single-process scan, whose top-k states merge into the same atlas;
* an example that fails to load, or whose shape differs from the first example's, is skipped,
  counted, listed in the manifest, and warned about;
* labels of ``(x, label)`` items are recorded for the hits (one kind for the whole dataset:
  int, float or str), and a dataset's ``sample_rate`` with the data;
* a scan with a checkpoint directory holds that directory's lock
  (:func:`featurelens.files.exclusive_lock`): a second scan into it is refused.

Order of hits: higher score first; ties go to the lower dataset index; within one example the
first location in row-major order wins. NaN values are ignored when scoring a map; an example
whose whole map is NaN scores NaN and ranks below every number. Examples whose map holds at
least one NaN are counted per layer and channel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from featurelens.atlas import (
    FORMAT_VERSION,
    MANIFEST,
    Atlas,
    AtlasError,
    DataRecord,
    DataSpecRecord,
    LayerTop,
    Manifest,
    ModelRecord,
    Progress,
    ScanIdentity,
)
from featurelens.data import (
    LABEL_KINDS,
    Batch,
    Label,
    SizedDataset,
    Unrecordable,
    check_sample_rate,
    data_size,
    iter_batches,
    shape_mismatch,
)
from featurelens.errors import DataError, LockedError, UsageError
from featurelens.files import LockBusy, exclusive_lock
from featurelens.fingerprint import data_fingerprint, model_fingerprint
from featurelens.graph import capture, model_device, preserved, resolve_layers
from featurelens.receptive_field import try_receptive_field
from featurelens.specs import DataSpec, ModelSpec, remembered_spec
from featurelens.unit import first_argmax

__all__ = ["SCORES", "DataError", "LayerCandidates", "Score", "ScanInterrupted", "scan"]

#: ``stacklevel`` of a warning issued in :func:`scan` itself, so that it points at the user's
#: call; a helper ``n`` calls below ``scan`` warns with ``_USER_FRAME + n``.
_USER_FRAME = 2


class ScanInterrupted(KeyboardInterrupt):
    """A checkpointed scan stopped by Ctrl-C or SIGTERM; the message says what was saved.

    A ``KeyboardInterrupt``, so code that stops on Ctrl-C still does. ``scanned`` and ``size``
    are the examples done and in all, ``directory`` the checkpoint (None when nothing could
    be saved).
    """

    def __init__(self, message: str, scanned: int, size: int, directory: Path | None) -> None:
        super().__init__(message)
        self.scanned = scanned
        self.size = size
        self.directory = directory


# --------------------------------------------------------------------------------------------
# Scores: (N, C, S) layer output, spatial axes flattened -> per-example, per-channel values.


@dataclass(frozen=True)
class Score:
    """How one channel's map is scored for one example, and which location is stored.

    ``values(y)`` takes ``y`` (N, C, S), the layer output with its spatial axes flattened, and
    returns ``(scores, has_nan)``, each (N, C), NaN values ignored (an all-NaN map scores
    NaN). ``peak(maps)`` maps (..., S) to the per-location values whose first arg-max (NaN
    ignored) is the stored location. Locations are found only for the few maps that can
    enter the top-k, which keeps the in-pass work to one cheap reduction per layer.
    """

    name: str
    description: str
    values: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    peak: Callable[[torch.Tensor], torch.Tensor]


def _nan_ignoring_amax(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # amax propagates NaN (and the max of numbers is never NaN), so one pass gives both the
    # maxima and the maps holding a NaN; only those (rare) maps are reduced again, masked.
    values = y.amax(dim=2)  # (N, C)
    has_nan = torch.isnan(values)
    if bool(has_nan.any()):
        maps = y[has_nan]  # (M, S)
        nan = torch.isnan(maps)
        v = maps.masked_fill(nan, -math.inf).amax(dim=1)
        values = values.clone()
        values[has_nan] = v.masked_fill(nan.all(dim=1), math.nan)
    return values, has_nan


def _mean_values(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values = y.mean(dim=2)  # NaN when the map holds a NaN (or both +inf and -inf)
    suspects = torch.isnan(values)
    has_nan = torch.zeros_like(suspects)
    if bool(suspects.any()):
        maps = y[suspects]  # (M, S)
        has_nan[suspects] = torch.isnan(maps).any(dim=1)
        values = values.clone()
        values[suspects] = torch.nanmean(maps, dim=1)
    return values, has_nan


#: The scores a scan can rank by; CLI choices and tests read this registry.
SCORES: dict[str, Score] = {
    s.name: s
    for s in (
        Score(
            "max",
            "maximum over spatial locations; stored location: the arg-max",
            _nan_ignoring_amax,
            lambda maps: maps,
        ),
        Score(
            "absmax",
            "largest absolute value over spatial locations (the score is |y|); "
            "stored location: where it is",
            lambda y: _nan_ignoring_amax(y.abs()),
            torch.abs,
        ),
        Score(
            "mean",
            "mean over spatial locations; stored location: the arg-max of the map",
            _mean_values,
            lambda maps: maps,
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Top-k state


def _order(indices: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per row, the permutation that sorts hits best first. indices, scores: (C, M).

    Numbers first (descending), then NaN scores, then empty slots (index -1); ties by index.
    """
    empty = indices < 0
    nan = np.isnan(scores)
    rank_class = np.where(empty, 2, np.where(nan, 1, 0))
    neg = np.where(rank_class == 0, -scores, 0.0)
    idx = np.where(empty, np.iinfo(np.int64).max, indices)
    return np.lexsort((idx, neg, rank_class), axis=-1)


def _merge(a: LayerTop, b: LayerTop, k: int) -> LayerTop:
    """The best ``k`` hits of ``a`` and ``b`` per channel (associative and commutative)."""
    indices = np.concatenate([a.indices, b.indices], axis=1)  # (C, Ma + Mb)
    scores = np.concatenate([a.scores, b.scores], axis=1)
    locations = np.concatenate([a.locations, b.locations], axis=1)  # (C, M, D)
    order = _order(indices, scores)[:, :k]
    return LayerTop(
        indices=np.take_along_axis(indices, order, axis=1),
        scores=np.take_along_axis(scores, order, axis=1),
        locations=np.take_along_axis(locations, order[:, :, None], axis=1),
        nan_counts=a.nan_counts + b.nan_counts,
        output_shape=a.output_shape,
    )


def _empty_top(channels: int, k: int, output_shape: tuple[int, ...]) -> LayerTop:
    return LayerTop(
        indices=np.full((channels, k), -1, dtype=np.int64),
        scores=np.full((channels, k), np.nan, dtype=np.float64),
        locations=np.zeros((channels, k, len(output_shape)), dtype=np.int64),
        nan_counts=np.zeros(channels, dtype=np.int64),
        output_shape=output_shape,
    )


@dataclass(frozen=True)
class LayerCandidates:
    """One layer's candidates for the top-k from one batch: the batch's own best per channel.

    Attributes
    ----------
    rows
        (M, C) int64: rows of the batch, M = min(top_k, batch size); per channel, the rows
        whose score can enter the running top-k, best first.
    scores
        (M, C) float64: their scores (exact copies of the network's values).
    locations
        (M, C) int64: where each map peaks, flat index into the spatial output (row-major).
    nan_counts
        (C,) int64: examples of the batch whose map for the channel held a NaN.
    output_shape
        Spatial shape of the layer's output.
    """

    rows: np.ndarray
    scores: np.ndarray
    locations: np.ndarray
    nan_counts: np.ndarray
    output_shape: tuple[int, ...]


def _label_kind(value: Label | Unrecordable | None) -> tuple[str, str]:
    """``(kind, description)`` of one item's label, for deciding and for messages."""
    if value is None:
        return "none", "no label"
    if isinstance(value, Unrecordable):
        return "unrecordable", f"a {value.what} label"
    kind = "str" if isinstance(value, str) else "float" if isinstance(value, float) else "int"
    return kind, f"the {kind} label {value!r}"


@dataclass
class _Labels:
    """The labels a scan records with its hits.

    The first item decides the kind: ``"int"``, ``"float"``, ``"str"`` (recorded), ``"none"``
    (items without labels) or ``"unrecordable"`` (labels that are no scalar: not recorded);
    ``"off"`` records nothing (a resumed checkpoint that recorded none). Every later item must
    agree (ints and floats mix as floats), else a :class:`DataError` names both. ``values``
    keeps the labels of the examples that may be hits, pruned to the current hits now and
    then, so that memory stays O(hits).
    """

    kind: str | None = None
    first: int = -1
    first_what: str = ""
    values: dict[int, Label] = field(default_factory=dict)

    @property
    def recorded(self) -> str | None:
        """The kind the atlas records, or None."""
        return self.kind if self.kind in LABEL_KINDS else None

    def _agree(self, kind: str, what: str, index: int) -> None:
        if self.kind is None:
            self.kind, self.first, self.first_what = kind, index, what
        elif kind != self.kind:
            if {kind, self.kind} == {"int", "float"}:
                if self.kind == "int":
                    self.values = {i: float(v) for i, v in self.values.items()}
                    self.kind = "float"
                return
            raise DataError(
                f"dataset labels mix types: item {index} has {what}, item {self.first} has "
                f"{self.first_what}; an atlas records labels of one type (int, float or str; "
                "ints and floats mix as floats)"
            )

    def add(self, indices: np.ndarray, labels: Sequence[Label | Unrecordable | None]) -> None:
        """Check and keep the labels of a batch's rows (``indices`` (B,), one label each)."""
        if self.kind == "off" or not len(labels):
            return
        for index, value in zip(indices.tolist(), labels, strict=True):
            kind, what = _label_kind(value)
            self._agree(kind, what, index)
            if self.kind in LABEL_KINDS:
                self.values[index] = float(value) if self.kind == "float" else value  # type: ignore[arg-type, assignment]

    def prune(self, tops: Mapping[str, LayerTop]) -> None:
        """Forget the labels of examples that are no hit any more (when there are many)."""
        slots = sum(t.indices.size for t in tops.values())
        if len(self.values) > 2 * slots + 1024:
            self.values = self.of_hits(tops)

    def of_hits(self, tops: Mapping[str, LayerTop]) -> dict[int, Label]:
        """The labels of the current hits."""
        if self.recorded is None:
            return {}
        hits = {int(i) for t in tops.values() for i in t.indices[t.indices >= 0].tolist()}
        return {i: self.values[i] for i in sorted(hits) if i in self.values}

    def merge(self, other: _Labels) -> _Labels:
        """The labels of both scans (their examples are disjoint)."""
        if self.kind == "off" or other.kind == "off":
            return _Labels(kind="off")
        out = _Labels(self.kind, self.first, self.first_what, dict(self.values))
        if other.kind is not None:
            out._agree(other.kind, other.first_what, other.first)
            cast = float if out.kind == "float" else (lambda v: v)
            out.values = {i: cast(v) for i, v in {**out.values, **other.values}.items()}
        return out

    @classmethod
    def of_atlas(cls, atlas: Atlas) -> _Labels:
        """The labels of a checkpoint: its kind and its hits' labels (or "off")."""
        kind = atlas.label_kind
        if kind is None:
            return cls(kind="off" if atlas.manifest.examples_scanned else None)
        tops = [atlas.layer(name).indices for name in atlas.layers]
        hits = np.unique(np.concatenate([t[t >= 0] for t in tops]))
        values = {i: atlas.label(i) for i in hits.tolist()}
        first = min(values) if values else -1
        return cls(kind, first, f"the {kind} label {values.get(first)!r}", values)  # type: ignore[arg-type]


@dataclass
class _State:
    """Everything a scan accumulates; small, picklable, mergeable."""

    tops: dict[str, LayerTop] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    scanned: int = 0
    input_shape: tuple[int, ...] | None = None
    labels: _Labels = field(default_factory=_Labels)

    @classmethod
    def of_atlas(cls, atlas: Atlas) -> _State:
        """The state saved in a checkpoint."""
        m = atlas.manifest
        return cls(
            tops={name: atlas.layer(name) for name in atlas.layers},
            skipped={s.index: s.error for s in m.skipped},
            scanned=m.examples_scanned,
            input_shape=m.input_shape or None,
            labels=_Labels(kind="off") if m.format_version < 2 else _Labels.of_atlas(atlas),
        )

    def add_batch(
        self, layer: str, indices: np.ndarray, candidates: LayerCandidates, k: int
    ) -> None:
        """Merge one batch's candidates of ``layer``; ``indices`` (B,): the batch's dataset
        indices, which ``candidates.rows`` index.
        """
        m, channels = candidates.scores.shape
        output_shape = candidates.output_shape
        current = self.tops.get(layer)
        if current is None:
            current = _empty_top(channels, k, output_shape)
        elif current.channels != channels or current.output_shape != output_shape:
            raise DataError(
                f"layer {layer!r} produced {channels} channels of shape {output_shape}, "
                f"earlier batches gave {current.channels} of shape {current.output_shape}: "
                "every example must have the same shape"
            )
        if output_shape:
            flat = candidates.locations.T  # (C, M)
            unravelled = np.stack(np.unravel_index(flat, output_shape), axis=-1)
        else:  # no spatial axes: the location is ()
            unravelled = np.zeros((channels, m, 0), dtype=np.int64)
        batch = LayerTop(
            indices=indices[candidates.rows].T,
            scores=candidates.scores.T,
            locations=unravelled.reshape(channels, m, len(output_shape)),
            nan_counts=candidates.nan_counts.astype(np.int64),
            output_shape=output_shape,
        )
        self.tops[layer] = _merge(current, batch, k)

    def merge(self, other: _State, k: int) -> _State:
        """The state of both (``other``'s examples are disjoint from this one's)."""
        tops = dict(self.tops)
        for name, top in other.tops.items():
            tops[name] = _merge(tops[name], top, k) if name in tops else top
        return _State(
            tops=tops,
            skipped={**self.skipped, **other.skipped},
            scanned=self.scanned + other.scanned,
            input_shape=self.input_shape or other.input_shape,
            labels=self.labels.merge(other.labels),
        )


# --------------------------------------------------------------------------------------------
# One batch: layer outputs -> candidates, inside the forward hooks


class _BatchReducer:
    """Reduces each layer's output to :class:`LayerCandidates` right when it is produced.

    :meth:`on_output` is the ``capture`` hook; :meth:`run` runs one batch and returns every
    layer's candidates. Only the batch's own ``top_k`` per channel can enter the running
    top-k, so they are selected where the activations live (little crosses to the CPU, and
    the merge stays small), and locations are found only for them.
    """

    def __init__(self, score: Score, top_k: int) -> None:
        self.score = score
        self.top_k = top_k
        self._batch_size = 0
        self._candidates: dict[str, LayerCandidates] = {}

    def reduce(self, name: str, y: torch.Tensor) -> LayerCandidates:
        """The candidates of one layer's output ``y`` (N, C, *spatial).

        Raises
        ------
        DataError
            ``y`` is not ``(N, C, *spatial)`` for the batch being run.
        """
        if y.dim() < 2 or y.shape[0] != self._batch_size:
            raise DataError(
                f"layer {name!r} returned shape {tuple(y.shape)} for a batch of "
                f"{self._batch_size}: scan needs outputs (N, C, *spatial)"
            )
        flat = y.detach().reshape(y.shape[0], y.shape[1], -1)  # (N, C, S)
        values, has_nan = self.score.values(flat)  # (N, C) each
        n, channels = values.shape
        if n > self.top_k:
            # Ascending stable sort of -score: NaN last, ties keep batch order.
            rows = torch.sort(-values, dim=0, stable=True).indices[: self.top_k]  # (K, C)
            values = values.gather(0, rows)
        else:
            rows = torch.arange(n, device=values.device)[:, None].expand(n, channels)
        columns = torch.arange(channels, device=values.device).expand_as(rows)
        locations = first_argmax(self.score.peak(flat[rows, columns]))  # (K, C)
        return LayerCandidates(
            rows=rows.cpu().numpy(),
            scores=values.cpu().double().numpy(),
            locations=locations.cpu().numpy().astype(np.int64),
            nan_counts=has_nan.sum(dim=0).cpu().numpy(),
            output_shape=tuple(y.shape[2:]),
        )

    def on_output(self, name: str, y: torch.Tensor) -> None:
        """The forward hook: reduce ``y`` now, before a later in-place op overwrites it."""
        self._candidates[name] = self.reduce(name, y)

    def run(
        self, forward: Callable[[torch.Tensor], object], x: torch.Tensor
    ) -> dict[str, LayerCandidates]:
        """Run ``forward(x)`` (the truncated pass of ``capture``) on a batch ``x`` (B, C, ...)
        and return every captured layer's candidates.
        """
        self._batch_size = int(x.shape[0])
        self._candidates = {}
        forward(x)
        return self._candidates


# --------------------------------------------------------------------------------------------
# Arguments and configuration


@dataclass(frozen=True)
class _ScanConfig:
    """Everything a scan was asked, checked; fixed for the whole scan."""

    identity: ScanIdentity
    score: Score
    batch_size: int
    device: str | torch.device | None
    checkpoint: Path | None
    checkpoint_every: int
    num_workers: int
    progress: bool
    resume: bool
    rank: int  # torch.distributed rank and world size (0, 1 without it)
    world: int
    example_shape: tuple[int, ...] | None = None  # (C, *spatial) of the fingerprint's first item
    format_version: int = FORMAT_VERSION  # 1 only to continue a version-1 checkpoint

    @property
    def names(self) -> tuple[str, ...]:
        return self.identity.layers

    @property
    def top_k(self) -> int:
        return self.identity.top_k

    @property
    def size(self) -> int:
        return self.identity.data.size


def _check_arguments(
    model: nn.Module,
    data: SizedDataset | torch.Tensor,
    layers: str | Sequence[str],
    *,
    score: str,
    top_k: int,
    batch_size: int,
    checkpoint_every: int,
) -> tuple[tuple[str, ...], int]:
    """The layer names (duplicates dropped) and the data size, once every argument is valid."""
    if score not in SCORES:
        raise UsageError(f"unknown score {score!r}; valid scores: {', '.join(SCORES)}")
    names = tuple(dict.fromkeys(resolve_layers(model, layers)))
    size = data_size(data)
    if size == 0:
        raise DataError("the dataset is empty")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= size:
        raise UsageError(
            f"top_k must be an int between 1 and the dataset size {size}, got {top_k!r} "
            "(use --top-k N with N <= the dataset size)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise UsageError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    return names, size


def _check_channels_first(
    model: nn.Module, input_shape: tuple[int, ...], names: Sequence[str]
) -> None:
    """Refuse channels-last layers, whose dim 1 is not channels (when the model traces).

    The check needs the receptive-field analysis; a model it cannot analyse is scanned as
    is (scans do not need receptive fields).
    """
    for name in names:
        rf, _ = try_receptive_field(model, input_shape, name)
        if rf is not None:  # untraceable model, unsupported op, ...: no check possible
            rf.check_channels_first(name)


def _remembered_model_spec(model: nn.Module, fingerprint: str) -> ModelSpec | None:
    """The spec ``ModelSpec.build()`` left on ``model``, if its parameters are still the same."""
    spec, built = remembered_spec(model, ModelSpec)
    if spec is None or built == fingerprint:
        return spec
    warnings.warn(
        f"the model was built from {spec.spec!r} but its parameters changed since (training, "
        "load_state_dict): that spec would rebuild another model, so the atlas records none; "
        "pass model_spec= (e.g. with checkpoint= a saved state_dict) to record one",
        RuntimeWarning,
        stacklevel=_USER_FRAME + 2,
    )
    return None


def _sample_rate(data: SizedDataset | torch.Tensor, data_spec: DataSpec | None) -> float | None:
    """The data's sample rate: the spec's, or the dataset's ``sample_rate`` attribute (checked)."""
    stated = None if data_spec is None else data_spec.sample_rate
    attribute = None
    rate = None if isinstance(data, torch.Tensor) else getattr(data, "sample_rate", None)
    if rate is not None:
        attribute = check_sample_rate(
            rate, f"the dataset's attribute {type(data).__name__}.sample_rate"
        )
    if stated is not None and attribute is not None and stated != attribute:
        raise DataError(
            f"the data spec says sample_rate={stated!r}, the dataset's sample_rate attribute "
            f"says {attribute!r}: give one, or make them agree"
        )
    return stated if stated is not None else attribute


def _identity(
    model: nn.Module,
    data: SizedDataset | torch.Tensor,
    names: tuple[str, ...],
    size: int,
    *,
    score: str,
    top_k: int,
    model_spec: ModelSpec | None,
    data_spec: DataSpec | None,
) -> tuple[ScanIdentity, tuple[int, ...] | None]:
    """Fingerprint model and data (refusing channels-last layers), fill in the specs that
    ``ModelSpec.build()`` / ``DataSpec.build()`` left on them (their paths made absolute, so
    that the atlas can store them relative to where it is saved), and find the sample rate.
    Returns the identity and the shape of the first example the fingerprint read.
    """
    data_fp, example_shape = data_fingerprint(data, size)
    if example_shape is not None:
        _check_channels_first(model, example_shape, names)
    model_fp = model_fingerprint(model)
    if model_spec is None:
        model_spec = _remembered_model_spec(model, model_fp)
    if data_spec is None:
        data_spec = remembered_spec(data, DataSpec)[0]
    rate = _sample_rate(data, data_spec)
    if rate is not None and example_shape is not None and len(example_shape) != 2:
        raise UsageError(
            f"a sample rate ({rate}) is for 1-D data (C, L); the examples are "
            f"{example_shape}: drop sample_rate (DataSpec or the dataset's attribute)"
        )
    identity = ScanIdentity(
        model=ModelRecord(
            None if model_spec is None else model_spec.absolute(),
            type(model).__name__,
            model_fp,
        ),
        data=DataRecord(
            None if data_spec is None else DataSpecRecord.from_spec(data_spec.absolute()),
            type(data).__name__,
            size,
            data_fp,
            sample_rate=rate,
        ),
        layers=names,
        score=score,
        top_k=top_k,
    )
    return identity, example_shape


# --------------------------------------------------------------------------------------------
# torch.distributed

_T = TypeVar("_T")


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _broadcast(obj: _T, world: int) -> _T:
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather_merge(state: _State, world: int, k: int) -> _State:
    if world == 1:
        return state
    states: list[_State | None] = [None] * world
    torch.distributed.all_gather_object(states, state)
    merged = _State()
    for s in states:  # rank order: deterministic, and _merge is order-free anyway
        assert s is not None  # all_gather_object filled every slot
        merged = merged.merge(s, k)
    return merged


# --------------------------------------------------------------------------------------------
# Checkpoints: the scan writes and resumes through atlas.Manifest


def _atlas(config: _ScanConfig, state: _State, next_index: int) -> Atlas:
    """The atlas of ``state`` after the examples below ``next_index``. Its specs are relative to
    the checkpoint directory where they came from a checkpoint (a resumed scan keeps the
    saved ones), so the atlas knows that directory before it is saved there.
    """
    manifest = Manifest.of_scan(
        config.identity,
        state.tops,
        input_shape=state.input_shape,
        examples_scanned=state.scanned,
        skipped=state.skipped,
        progress=Progress(next_index, config.batch_size),
        labels=state.labels.recorded,
        format_version=config.format_version,
    )
    labels = state.labels.of_hits(state.tops) if state.labels.recorded else None
    atlas = Atlas(manifest, state.tops, labels)
    atlas._directory = config.checkpoint
    return atlas


def _load_checkpoint(directory: Path, identity: ScanIdentity) -> Atlas | None:
    """The scan saved in ``directory`` (None when there is none); refused when it is of
    another scan.
    """
    if not os.path.lexists(directory / MANIFEST):
        return None
    atlas = Atlas.load(directory, allow_incomplete=True)
    diffs = identity.differences(atlas.scan_identity)
    if diffs:
        raise AtlasError(
            f"cannot resume the scan in {str(directory)!r}: "
            + "; ".join(diffs)
            + " (new vs saved). Use another checkpoint directory, or delete this one to start over"
        )
    atlas._vouch()  # its specs are the caller's own: the same scan
    return atlas


@dataclass(frozen=True)
class _Resumption:
    """What rank 0 found in the checkpoint, told to every rank (they may not share a disk)."""

    next_index: int = 0
    done: Atlas | None = None
    error: Exception | None = None
    saved: Manifest | None = None  # the checkpoint's manifest: its stored specs and version

    def config(self, config: _ScanConfig) -> _ScanConfig:
        """The configuration that continues the saved scan: its format version and its specs
        as stored (equal to the caller's, relative to the checkpoint directory).
        """
        if self.saved is None:
            return config
        data = dataclasses.replace(config.identity.data, spec=self.saved.data.spec)
        if self.saved.format_version < 2:  # version 1 records no sample rate
            data = dataclasses.replace(data, sample_rate=None)
        identity = dataclasses.replace(
            config.identity,
            model=dataclasses.replace(config.identity.model, spec=self.saved.model.spec),
            data=data,
        )
        return dataclasses.replace(
            config, identity=identity, format_version=self.saved.format_version
        )


def _resume(config: _ScanConfig, lock_error: LockedError | None) -> tuple[_State, _Resumption]:
    """Where this rank starts: its state and the first index; ``done`` when the checkpoint
    holds the complete atlas. Only rank 0 carries the saved state (merged at the end).
    """
    state, found = _State(), _Resumption()
    ckpt = config.checkpoint
    if lock_error is not None:
        found = _Resumption(error=lock_error)
    elif config.rank == 0 and ckpt is not None:
        try:
            saved = _load_checkpoint(ckpt, config.identity)
        except (AtlasError, FileNotFoundError) as exc:
            found = _Resumption(error=exc)
        else:
            if saved is None and config.resume:
                warnings.warn(
                    f"nothing to resume in {str(ckpt)!r} (no scan saved there): starting afresh",
                    RuntimeWarning,
                    stacklevel=_USER_FRAME + 1,
                )
            elif saved is not None and saved.complete:
                found = _Resumption(done=saved)
            elif saved is not None:
                found = _Resumption(
                    next_index=saved.manifest.progress.next_index, saved=saved.manifest
                )
                state = _State.of_atlas(saved)
    found = _broadcast(found, config.world)
    if found.error is not None:
        raise found.error
    return state, found


# --------------------------------------------------------------------------------------------
# Device


class _on_device:
    """Move the model to ``device`` for the scan and back afterwards (nothing when it is there)."""

    def __init__(self, model: nn.Module, device: str | torch.device | None) -> None:
        self.model = model
        self.original = model_device(model)
        self.device = self.original if device is None else torch.device(device)

    def __enter__(self) -> torch.device:
        if self.device != self.original:
            self.model.to(self.device)
        return self.device

    def __exit__(self, *exc: object) -> None:
        if self.device != self.original:
            self.model.to(self.original)


# --------------------------------------------------------------------------------------------
# Interrupts and skipped examples


class _Stop:
    """While a checkpointed scan runs: SIGINT and SIGTERM raise ``KeyboardInterrupt``, deferred
    to :meth:`check` while a batch is being recorded (:meth:`recording`); a second signal
    raises at once. The previous handlers come back on exit. Only in the main thread (where
    Python runs signal handlers), and only when ``enabled``.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.busy = False  # a batch is half recorded: the state is not consistent
        self.pending: list[int] = []
        self.previous: dict[int, Any] = {}  # signal.getsignal's handlers (callables, ints, None)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)
        if not self.busy or len(self.pending) > 1:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Defer signals while the block runs; the state is consistent again only when the
        block ends normally (an exception leaves it marked as half recorded).
        """
        self.busy = True
        yield
        self.busy = False

    def check(self) -> None:
        """Raise the ``KeyboardInterrupt`` of a signal deferred while recording."""
        if self.pending:
            raise KeyboardInterrupt

    def __enter__(self) -> _Stop:
        if self.enabled:
            for sig in self.SIGNALS:
                self.previous[sig] = signal.getsignal(sig)
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            # None: a handler not installed from Python; the default is the closest we can do
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self.previous.clear()


class _SkipWarnings:
    """Warns about the first :attr:`LIMIT` skipped examples, then only counts them."""

    LIMIT = 10

    def __init__(self) -> None:
        self.count = 0

    def warn(self, skipped: Mapping[int, str]) -> None:
        for index, error in skipped.items():
            if self.count < self.LIMIT:
                warnings.warn(
                    f"skipping example {index} ({error}); it is listed in the atlas manifest",
                    RuntimeWarning,
                    stacklevel=_USER_FRAME + 2,
                )
            self.count += 1

    def summarize(self) -> None:
        if self.count > self.LIMIT:
            warnings.warn(
                f"{self.count} examples skipped in all (listed in the atlas manifest)",
                RuntimeWarning,
                stacklevel=_USER_FRAME + 1,
            )


def _interrupted(
    config: _ScanConfig, state: _State, completed: int, consistent: bool
) -> ScanInterrupted:
    """Save the state of the batches done to the checkpoint (when it is whole) and say so."""
    assert config.checkpoint is not None  # only checkpointed scans catch interrupts
    ckpt, size = config.checkpoint, config.size
    head = f"scan interrupted after {completed} of {size} examples"
    again = "run the same scan again (CLI: --resume) to continue"
    if not consistent:
        saved = ckpt if (ckpt / MANIFEST).is_file() else None
        where = f"{str(ckpt)!r} keeps the last periodic checkpoint" if saved else "nothing saved"
        return ScanInterrupted(
            f"scan interrupted while recording a batch; {where}" + (f": {again}" if saved else ""),
            completed,
            size,
            saved,
        )
    if set(state.tops) != set(config.names):  # no example loaded yet
        return ScanInterrupted(f"{head}; nothing to save yet", completed, size, None)
    _atlas(config, state, completed).save(ckpt)
    return ScanInterrupted(f"{head}; state saved in {str(ckpt)!r}: {again}", completed, size, ckpt)


# --------------------------------------------------------------------------------------------
# The pass


def _forward(
    batch: Batch,
    reducer: _BatchReducer,
    run: Callable[[torch.Tensor], object],
    device: torch.device,
    state: _State,
) -> dict[str, LayerCandidates] | None:
    """Run one batch through the truncated forward ``run``; None when no item of it loaded.

    Raises
    ------
    DataError
        The batch could not be stacked (items that are not tensors).
    """
    if batch.error is not None:
        raise DataError(batch.error)
    if batch.x is None:
        return None
    if state.input_shape is None:
        state.input_shape = tuple(batch.x.shape[1:])
    return reducer.run(run, batch.x.to(device, non_blocking=True))


def _conform(batch: Batch, expected: tuple[int, ...] | None) -> Batch:
    """``batch``, or, when its examples have another shape than the scan's first example (a
    batch whose items were checked against another reference), its items listed as skipped.
    """
    if batch.x is None or expected is None or tuple(batch.x.shape[1:]) == expected:
        return batch
    reason = shape_mismatch(tuple(batch.x.shape[1:]), expected)
    skipped = {**batch.skipped, **{int(i): reason for i in batch.indices}}
    return Batch(np.zeros(0, dtype=np.int64), None, skipped)


def _record(
    state: _State,
    batch: Batch,
    candidates: Mapping[str, LayerCandidates] | None,
    names: Sequence[str],
    k: int,
) -> None:
    """Add one batch to ``state``: its skipped items, its labels and every layer's candidates.

    Raises
    ------
    DataError
        A label of another type than the earlier items' (see :class:`_Labels`).
    """
    state.skipped.update(batch.skipped)
    if candidates is not None:
        state.labels.add(batch.indices, batch.labels)
        for name in names:
            state.add_batch(name, batch.indices, candidates[name], k)
        state.scanned += len(batch.indices)
        state.labels.prune(state.tops)


def _scan_pass(
    model: nn.Module,
    data: SizedDataset | torch.Tensor,
    config: _ScanConfig,
    state: _State,
    start: int,
    skips: _SkipWarnings,
) -> _State:
    """Scan the examples from ``start`` on (this rank's batches) into ``state``; checkpoint
    every ``checkpoint_every`` rounds. Returns the merged state of every rank.

    Raises
    ------
    ScanInterrupted
        Ctrl-C / SIGTERM in a checkpointed single-process scan, after saving what was done.
    """
    from tqdm.auto import tqdm

    rank, world = config.rank, config.world
    size, step, ckpt = config.size, config.batch_size, config.checkpoint
    spans = [(s, min(s + step, size)) for s in range(start, size, step)]
    rounds = math.ceil(len(spans) / world)
    mine = spans[rank::world]
    reducer = _BatchReducer(config.score, config.top_k)
    bar = tqdm(
        total=size - start,
        unit="img",
        desc="scan",
        disable=not config.progress or rank != 0,
        dynamic_ncols=True,
    )
    # Interrupts (one process with a checkpoint): the state is consistent except while a batch
    # is being recorded; a Ctrl-C / SIGTERM arriving then is deferred to the batch's end, so
    # that what is saved is exactly the batches done ("completed" examples).
    stop = _Stop(enabled=ckpt is not None and world == 1)
    completed = start
    try:
        with (
            stop,
            preserved(model),
            _on_device(model, config.device) as dev,
            torch.inference_mode(),
            capture(model, config.names, on_output=reducer.on_output) as run,
        ):
            expected = state.input_shape or config.example_shape
            batches = iter_batches(
                data, mine, config.num_workers, pin_memory=dev.type == "cuda", expected=expected
            )
            for t in range(rounds):
                batch = next(batches) if t < len(mine) else None  # None: others' last round
                if batch is not None:
                    batch = _conform(batch, state.input_shape or expected)
                candidates = None if batch is None else _forward(batch, reducer, run, dev, state)
                with stop.recording():
                    if batch is not None:
                        skips.warn(batch.skipped)
                        _record(state, batch, candidates, config.names, config.top_k)
                    completed = spans[min((t + 1) * world, len(spans)) - 1][1]
                bar.update(completed - bar.n - start)
                stop.check()
                if ckpt is not None and (t + 1) % config.checkpoint_every == 0 and t + 1 < rounds:
                    merged = _gather_merge(state, world, config.top_k)
                    if rank == 0 and set(merged.tops) == set(config.names):
                        _atlas(config, merged, completed).save(ckpt)
    except KeyboardInterrupt:
        if ckpt is None or world > 1:
            raise
        bar.close()
        raise _interrupted(config, state, completed, consistent=not stop.busy) from None
    finally:
        bar.close()
    return _gather_merge(state, world, config.top_k)


# --------------------------------------------------------------------------------------------
# The scan


def scan(
    model: nn.Module,
    data: SizedDataset | torch.Tensor,
    layers: str | Sequence[str],
    *,
    top_k: int = 9,
    score: str = "max",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool = True,
    model_spec: ModelSpec | None = None,
    data_spec: DataSpec | None = None,
    num_workers: int = 0,
    checkpoint_every: int = 10,
    resume: bool = False,
) -> Atlas:
    """The ``top_k`` maximally activating examples of every channel of ``layers``.

    Parameters
    ----------
    model
        Any ``nn.Module``; it comes back unchanged (mode, ``requires_grad``, device, no hooks).
    data
        A ``Dataset`` whose items are tensors (C, *spatial) or ``(tensor, label)`` tuples, or
        a tensor (N, C, *spatial). Dataset indices identify examples. Labels that are single
        numbers or strings are recorded with the hits (:attr:`Hit.label`); a ``sample_rate``
        attribute of 1-D data is recorded too (:attr:`Atlas.sample_rate`).
    layers
        Dotted layer names (see :func:`featurelens.layer_names`), scanned in one pass.
    top_k
        Hits kept per channel, 1 <= top_k <= len(data). This and every later option are
        keyword-only.
    score
        A key of :data:`SCORES`: ``"max"``, ``"absmax"`` or ``"mean"``.
    batch_size
        Examples per forward pass.
    device
        Where to run; default: where the model's parameters are. The model is moved there for
        the scan and moved back.
    checkpoint
        A directory: the scan's state is saved there atomically every ``checkpoint_every``
        batches (per process) and at the end, as an atlas with ``complete: false``; calling
        the same scan again resumes it (a complete one is returned as is). Resuming with
        another model, data (told by a fingerprint: a tensor's bytes, or a dataset's length
        and its first, middle and last items), layers, score or top_k is refused.
        Ctrl-C (and SIGTERM, while a scan runs in the main thread) saves the batches done so
        far there and raises :class:`ScanInterrupted`, which says how to continue. The scan
        holds the directory's lock while it runs (:func:`featurelens.files.exclusive_lock`).
    progress
        Show a tqdm bar (images/s).
    model_spec, data_spec
        Recorded in the manifest so that the atlas can rebuild model and data
        (:meth:`Atlas.build_model`, :meth:`Atlas.build_data`, and the ``figure``, ``report``
        and ``serve`` commands). When not given, the spec that ``ModelSpec.build()`` /
        ``DataSpec.build()`` left on the model / dataset (``featurelens_spec``) is used; the
        model's only when its parameters are still those it was built with (a fingerprint
        taken at build time), else a warning says it was not recorded. Their paths are
        recorded absolute, and relative to the atlas directory when it is saved near them.
    num_workers
        DataLoader worker processes loading the data.
    checkpoint_every
        Batches per process between checkpoints.
    resume
        Only for the message: a warning says so when ``checkpoint`` holds nothing to resume
        (the scan then starts afresh). Resuming happens whenever there is something to resume.

    Returns
    -------
    Atlas
        Under ``torch.distributed`` every rank returns the same merged atlas; rank 0 writes
        the checkpoint.

    Raises
    ------
    LayerError
        Unknown layer (listing valid names).
    UsageError
        Bad ``top_k``, ``score``, ``batch_size`` or ``checkpoint_every`` (a ``ValueError``); a
        channels-last layer (output ``(N, *spatial, C)``, found when the model traces); a
        sample rate for data that is not 1-D.
    DataError
        Data that is not tensors (a dataset item, named by index), an empty dataset, no
        example that loads, labels of mixed types (naming two items), or a bad ``sample_rate``
        attribute. (Items of another shape than the first are skipped and listed, not raised.)
    AtlasError
        ``checkpoint`` holds a different scan (the message says what differs).
    LockedError
        Another scan is writing ``checkpoint`` (the message names it).
    ScanInterrupted
        Ctrl-C or SIGTERM during a checkpointed scan, after saving what was done.
    """
    names, size = _check_arguments(
        model,
        data,
        layers,
        score=score,
        top_k=top_k,
        batch_size=batch_size,
        checkpoint_every=checkpoint_every,
    )
    identity, example_shape = _identity(
        model,
        data,
        names,
        size,
        score=score,
        top_k=top_k,
        model_spec=model_spec,
        data_spec=data_spec,
    )
    rank, world = _dist()
    config = _ScanConfig(
        identity=identity,
        score=SCORES[score],
        batch_size=batch_size,
        device=device,
        checkpoint=None if checkpoint is None else Path(checkpoint),
        checkpoint_every=checkpoint_every,
        num_workers=num_workers,
        progress=progress,
        resume=resume,
        rank=rank,
        world=world,
        example_shape=example_shape,
    )
    with contextlib.ExitStack() as held:
        lock_error = None
        if config.checkpoint is not None and config.rank == 0:
            try:  # held until the atlas is saved: a second scan into it is refused
                held.enter_context(exclusive_lock(config.checkpoint, "scan"))
            except LockBusy as exc:
                lock_error = LockedError(str(exc))
        state, found = _resume(config, lock_error)
        if found.done is not None:
            return found.done
        config = found.config(config)
        skips = _SkipWarnings()
        merged = _scan_pass(model, data, config, state, found.next_index, skips)
        skips.summarize()
        if set(merged.tops) != set(names):
            first = list(merged.skipped.items())[:3]
            raise DataError(
                f"no example of the {size} could be loaded; first errors: "
                + "; ".join(f"{i}: {e}" for i, e in first)
            )
        if merged.labels.kind == "unrecordable" and config.rank == 0:
            warnings.warn(
                f"the dataset's labels are not recorded in the atlas (item "
                f"{merged.labels.first} has {merged.labels.first_what}; an atlas records "
                "int, float or str labels)",
                RuntimeWarning,
                stacklevel=_USER_FRAME,
            )
        atlas = _atlas(config, merged, size)
        if config.checkpoint is not None and config.rank == 0:
            atlas.save(config.checkpoint)
        if config.world > 1:
            torch.distributed.barrier()
        return atlas
