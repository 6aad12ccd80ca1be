"""Maximally activating examples: one streaming, truncated pass over a dataset for many layers.

For feature map ``k`` of layer ``l`` every example ``i`` gets a score, by default
``max over s of y[l, s, k]`` (Zeiler & Fergus, arXiv 1311.2901), and the ``top_k`` best
examples are kept with the location of their maximum: ``MaxAct(l, k) = [i_1, ..., i_m]``.

How the pass is organised:

* one forward per batch serves every requested layer, and stops after the deepest one
  (:func:`featurelens.graph.capture`);
* each layer's output is reduced to per-channel scores and locations inside the forward hook,
  right when it is produced (a later in-place ReLU would overwrite it), so memory stays
  O(layers x channels x top_k) whatever the dataset size;
* batches are sequential index ranges, so a scan checkpointed with ``checkpoint=DIR`` resumes
  exactly where it stopped, and under ``torch.distributed`` rank ``r`` takes batches
  ``r, r + W, r + 2W, ...``: the very batches of a single-process scan, whose top-k states
  merge into the same atlas;
* an example that fails to load is skipped, counted, listed in the manifest, and warned about.

Order of hits: higher score first; ties go to the lower dataset index; within one example the
first location in row-major order wins. NaN values are ignored when scoring a map; an example
whose whole map is NaN scores NaN and ranks below every number. Examples whose map holds at
least one NaN are counted per layer and channel.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featurelens.atlas import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    Atlas,
    AtlasError,
    LayerTop,
    _library_version,
    hash_tensor,
    model_fingerprint,
)
from featurelens.data import split_example
from featurelens.errors import DataError
from featurelens.graph import capture, model_device, preserved, resolve_layers
from featurelens.receptive_field import try_receptive_field
from featurelens.specs import DataSpec, ModelSpec, remembered_spec
from featurelens.unit import first_argmax

__all__ = ["SCORES", "DataError", "Score", "ScanInterrupted", "check_new_output", "scan"]


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


@dataclass
class _State:
    """Everything a scan accumulates; small, picklable, mergeable."""

    tops: dict[str, LayerTop] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    scanned: int = 0
    input_shape: tuple[int, ...] | None = None

    def add_batch(
        self,
        layer: str,
        indices: np.ndarray,
        scores: np.ndarray,
        locations: np.ndarray,
        nan_counts: np.ndarray,
        output_shape: tuple[int, ...],
        k: int,
    ) -> None:
        """Merge one batch's candidates: indices, scores, flat locations (M, C); nan_counts (C,)."""
        m, channels = scores.shape
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
            unravelled = np.stack(np.unravel_index(locations.T, output_shape), axis=-1)
        else:  # no spatial axes: the location is ()
            unravelled = np.zeros((channels, m, 0), dtype=np.int64)
        batch = LayerTop(
            indices=indices.T,
            scores=scores.T,
            locations=unravelled.reshape(channels, m, len(output_shape)),
            nan_counts=nan_counts.astype(np.int64),
            output_shape=output_shape,
        )
        self.tops[layer] = _merge(current, batch, k)

    def merge(self, other: _State, k: int) -> _State:
        tops = dict(self.tops)
        for name, top in other.tops.items():
            tops[name] = _merge(tops[name], top, k) if name in tops else top
        return _State(
            tops=tops,
            skipped={**self.skipped, **other.skipped},
            scanned=self.scanned + other.scanned,
            input_shape=self.input_shape or other.input_shape,
        )


# --------------------------------------------------------------------------------------------
# Data sources: batches of sequential indices, broken items skipped


class _Guarded(torch.utils.data.Dataset):
    """Wraps a dataset so that an item that raises comes back as an error, not an exception."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, bool, Any]:
        try:
            return index, True, self.dataset[index]
        except Exception as exc:  # any failure to load/transform one example skips it
            return index, False, f"{type(exc).__name__}: {exc}"


def _collate(items: list[tuple[int, bool, Any]]) -> tuple[Any, ...]:
    # In DataLoader workers an exception would come back wrapped in a worker traceback, so
    # the error travels as a value and is raised in the scanning process.
    try:
        return (*_stack(items), None)
    except DataError as exc:
        return np.zeros(0, dtype=np.int64), None, {}, str(exc)


def _stack(items: list[tuple[int, bool, Any]]) -> tuple[np.ndarray, torch.Tensor | None, dict]:
    good: list[int] = []
    tensors: list[torch.Tensor] = []
    skipped: dict[int, str] = {}
    for index, ok, item in items:
        if not ok:
            skipped[index] = item
            continue
        x = split_example(item, index)[0]
        good.append(index)
        tensors.append(x)
    if not tensors:
        return np.zeros(0, dtype=np.int64), None, skipped
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise DataError(
            f"dataset items {good[0]}..{good[-1]} have different shapes {sorted(shapes)}; "
            "resize or crop them to one size"
        )
    return np.asarray(good, dtype=np.int64), torch.stack(tensors), skipped


def _batches(
    data: Any, spans: list[tuple[int, int]], num_workers: int, pin_memory: bool = False
) -> Iterator[tuple[np.ndarray, torch.Tensor | None, dict, str | None]]:
    if isinstance(data, torch.Tensor):
        for start, stop in spans:
            yield np.arange(start, stop, dtype=np.int64), data[start:stop], {}, None
        return
    loader = torch.utils.data.DataLoader(
        _Guarded(data),
        batch_sampler=[list(range(start, stop)) for start, stop in spans],
        collate_fn=_collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    yield from loader


def _check_data(data: Any) -> int:
    if isinstance(data, torch.Tensor):
        if data.dim() < 2:
            raise DataError(
                f"a data tensor must be (N, C, *spatial), got shape {tuple(data.shape)}"
            )
        return int(data.shape[0])
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise DataError(
            f"data must be a torch Dataset (items: tensor or (tensor, label)) or a tensor "
            f"(N, C, *spatial), got {type(data).__name__}"
        )
    return len(data)


def _data_fingerprint(data: Any, size: int) -> tuple[str, tuple[int, ...] | None]:
    """``sha256:<hex>`` identifying the data, and the shape of one example (None if unknown).

    A tensor is hashed whole. A dataset is hashed by its length and the items at a few fixed
    indices (first, middle, last), loaded through the same guarded path as the scan: an item
    that fails to load is hashed as skipped. Cheap, and enough to tell a resumed scan that it
    was handed other data of the same size.
    """
    h = hashlib.sha256()
    if isinstance(data, torch.Tensor):
        h.update(b"tensor")
        hash_tensor(h, data)
        return "sha256:" + h.hexdigest(), tuple(int(v) for v in data.shape[1:])
    h.update(f"dataset of {size}".encode())
    guarded = _Guarded(data)
    shape = None
    for index in sorted({0, size // 2, size - 1}):
        _, ok, item = guarded[index]
        h.update(f"|{index}:".encode())
        x = item[0] if ok and isinstance(item, tuple | list) and item else item
        if not ok:
            h.update(b"skipped")
        elif isinstance(x, torch.Tensor):
            hash_tensor(h, x)
            shape = shape or tuple(int(v) for v in x.shape)
        else:  # the scan reports non-tensor items with a clear DataError
            h.update(type(x).__name__.encode())
    return "sha256:" + h.hexdigest(), shape


def _check_channels_first(model: nn.Module, input_shape: tuple[int, ...], names: list[str]) -> None:
    """Refuse channels-last layers, whose dim 1 is not channels (when the model traces).

    The check needs the receptive-field analysis; a model it cannot analyse is scanned as
    is (scans do not need receptive fields).
    """
    for name in names:
        rf, _ = try_receptive_field(model, input_shape, name)
        if rf is not None:  # untraceable model, unsupported op, ...: no check possible
            rf.check_channels_first(name)


# --------------------------------------------------------------------------------------------
# torch.distributed


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather_merge(state: _State, world: int, k: int) -> _State:
    if world == 1:
        return state
    states: list[Any] = [None] * world
    torch.distributed.all_gather_object(states, state)
    merged = _State()
    for s in states:  # rank order: deterministic, and _merge is order-free anyway
        merged = merged.merge(s, k)
    return merged


# --------------------------------------------------------------------------------------------
# Checkpoints and manifests


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
        stacklevel=3,
    )
    return None


def _config(
    model: nn.Module,
    model_fp: str,
    model_spec: ModelSpec | None,
    data: Any,
    data_spec: DataSpec | None,
    size: int,
    data_fingerprint: str,
    layers: list[str],
    score: str,
    top_k: int,
) -> dict[str, Any]:
    return {
        "model": {
            "spec": None if model_spec is None else model_spec.to_dict(),
            "class": type(model).__name__,
            "fingerprint": model_fp,
        },
        "data": {
            "spec": None if data_spec is None else data_spec.to_dict(),
            "class": type(data).__name__,
            "size": size,
            "fingerprint": data_fingerprint,
        },
        "layers": layers,
        "score": score,
        "top_k": top_k,
    }


def _differences(manifest: dict[str, Any], config: dict[str, Any]) -> list[str]:
    out = []
    old_fp, new_fp = manifest["model"]["fingerprint"], config["model"]["fingerprint"]
    if old_fp != new_fp:
        out.append(
            f"the model differs (parameter fingerprint {new_fp[:19]}... vs {old_fp[:19]}...)"
        )
    if manifest["model"]["spec"] != config["model"]["spec"]:
        out.append(
            f"the model spec differs ({config['model']['spec']} vs {manifest['model']['spec']})"
        )
    if manifest["data"]["spec"] != config["data"]["spec"]:
        out.append(
            f"the data spec differs ({config['data']['spec']} vs {manifest['data']['spec']})"
        )
    if manifest["data"]["size"] != config["data"]["size"]:
        out.append(
            f"the data size differs ({config['data']['size']} vs {manifest['data']['size']} examples)"
        )
    old_data = manifest["data"].get("fingerprint")  # absent in checkpoints of older versions
    new_data = config["data"]["fingerprint"]
    if old_data is not None and old_data != new_data:
        out.append(
            f"the data differs (fingerprint {new_data[:19]}... vs {old_data[:19]}...: other "
            "examples at the same indices)"
        )
    old_layers = [entry["name"] for entry in manifest["layers"]]
    if old_layers != config["layers"]:
        out.append(f"the layers differ ({config['layers']} vs {old_layers})")
    for key in ("score", "top_k"):
        if manifest[key] != config[key]:
            out.append(f"{key} differs ({config[key]!r} vs {manifest[key]!r})")
    return out


def _load_checkpoint(directory: Path, config: dict[str, Any]) -> tuple[_State, int, Atlas] | None:
    """The saved state of a scan in ``directory`` (None when there is none)."""
    if not (directory / MANIFEST).is_file():
        return None
    atlas = Atlas.load(directory, allow_incomplete=True)
    manifest = atlas.manifest
    diffs = _differences(manifest, config)
    if diffs:
        raise AtlasError(
            f"cannot resume the scan in {str(directory)!r}: "
            + "; ".join(diffs)
            + " (new vs saved). Use another checkpoint directory, or delete this one to start over"
        )
    state = _State(
        tops={name: atlas.layer(name) for name in atlas.layers},
        skipped={int(s["index"]): s["error"] for s in manifest["skipped"]},
        scanned=int(manifest["examples_scanned"]),
        input_shape=tuple(manifest["input_shape"]) if manifest["input_shape"] else None,
    )
    return state, int(manifest["progress"]["next_index"]), atlas


def _atlas(
    config: dict[str, Any],
    state: _State,
    data_spec: DataSpec | None,
    batch_size: int,
    next_index: int,
) -> Atlas:
    complete = next_index >= config["data"]["size"]
    layer_entries = []
    for name in config["layers"]:
        top = state.tops[name]
        layer_entries.append(
            {
                "name": name,
                "channels": top.channels,
                "output_shape": list(top.output_shape),
                # sparse: {channel: examples whose map held a NaN}, channels without NaN left out
                "nan_counts": {str(c): int(v) for c, v in enumerate(top.nan_counts) if v},
            }
        )
    preprocessing = None
    if data_spec is not None:
        preprocessing = {
            "input_size": data_spec.input_size,
            "mean": None if data_spec.mean is None else list(data_spec.mean),
            "std": None if data_spec.std is None else list(data_spec.std),
        }
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "model": config["model"],
        "data": config["data"],
        "preprocessing": preprocessing,
        "input_shape": None if state.input_shape is None else list(state.input_shape),
        "layers": layer_entries,
        "score": config["score"],
        "top_k": config["top_k"],
        "examples_scanned": state.scanned,
        "skipped": [{"index": i, "error": state.skipped[i]} for i in sorted(state.skipped)],
        "complete": complete,
        "progress": {"next_index": next_index, "batch_size": batch_size},
    }
    return Atlas(manifest, dict(state.tops))


# --------------------------------------------------------------------------------------------
# Device


class _on_device:  # noqa: N801 - used as a context manager
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


def check_new_output(directory: str | os.PathLike) -> None:
    """Refuse ``directory`` as the output of a new scan when it already holds one.

    Raises
    ------
    AtlasError
        Saying whether it holds a complete atlas (choose another output or delete it) or an
        interrupted scan (resume it), with its size and layers.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return
    where = str(directory)
    try:
        manifest = json.loads(path.read_text())
        size = int(manifest["data"]["size"])
        layers = [entry["name"] for entry in manifest["layers"]]
        complete = bool(manifest["complete"])
        next_index = int(manifest["progress"]["next_index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AtlasError(
            f"{where!r} already holds an unreadable atlas manifest ({type(exc).__name__}: {exc}); "
            "choose another --out or delete it"
        ) from exc
    if complete:
        raise AtlasError(
            f"{where!r} already holds a complete atlas ({size} examples, layers "
            f"{', '.join(layers)}); choose another --out or delete it"
        )
    raise AtlasError(
        f"{where!r} holds an interrupted scan at {next_index} of {size} examples (layers "
        f"{', '.join(layers)}); pass --resume to continue it, or choose another --out"
    )


# --------------------------------------------------------------------------------------------
# Interrupts


class _Stop:
    """While a checkpointed scan runs: SIGINT and SIGTERM raise ``KeyboardInterrupt``, deferred
    to :meth:`check` while ``recording[0]`` (a batch half recorded); a second signal raises at
    once. The previous handlers come back on exit. Only in the main thread (where Python runs
    signal handlers), and only when ``enabled``."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, recording: list[bool], enabled: bool) -> None:
        self.recording = recording
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.pending: list[int] = []
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.pending.append(signum)
        if not self.recording[0] or len(self.pending) > 1:
            raise KeyboardInterrupt

    def check(self) -> None:
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


def _interrupted(
    config: dict[str, Any],
    state: _State,
    data_spec: DataSpec | None,
    batch_size: int,
    completed: int,
    ckpt: Path,
    consistent: bool,
) -> ScanInterrupted:
    """Save the state of the batches done to ``ckpt`` (when it is whole) and say so."""
    size = config["data"]["size"]
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
    if set(state.tops) != set(config["layers"]):  # no example loaded yet
        return ScanInterrupted(f"{head}; nothing to save yet", completed, size, None)
    _atlas(config, state, data_spec, batch_size, completed).save(ckpt)
    return ScanInterrupted(f"{head}; state saved in {str(ckpt)!r}: {again}", completed, size, ckpt)


# --------------------------------------------------------------------------------------------
# The scan


def scan(
    model: nn.Module,
    data: torch.utils.data.Dataset | torch.Tensor,
    layers: str | Sequence[str],
    top_k: int = 9,
    score: str = "max",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    *,
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
        a tensor (N, C, *spatial). Dataset indices identify examples.
    layers
        Dotted layer names (see :func:`featurelens.layer_names`), scanned in one pass.
    top_k
        Hits kept per channel, 1 <= top_k <= len(data).
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
        far there and raises :class:`ScanInterrupted`, which says how to continue.
    progress
        Show a tqdm bar (images/s).
    model_spec, data_spec
        Recorded in the manifest so that the atlas can rebuild model and data
        (:meth:`Atlas.build_model`, :meth:`Atlas.build_data`, and the ``figure``, ``report``
        and ``serve`` commands). When not given, the spec that ``ModelSpec.build()`` /
        ``DataSpec.build()`` left on the model / dataset (``featurelens_spec``) is used; the
        model's only when its parameters are still those it was built with (a fingerprint
        taken at build time), else a warning says it was not recorded.
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
    ValueError
        Bad ``top_k``, ``score`` or ``batch_size``; a channels-last layer (output
        ``(N, *spatial, C)``, found when the model traces); :class:`DataError` for data that is not
        tensors; :class:`~featurelens.atlas.AtlasError` when ``checkpoint`` holds a different
        scan.
    ScanInterrupted
        Ctrl-C or SIGTERM during a checkpointed scan, after saving what was done.
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; valid scores: {', '.join(SCORES)}")
    names = list(dict.fromkeys(resolve_layers(model, layers)))
    size = _check_data(data)
    if size == 0:
        raise DataError("the dataset is empty")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= size:
        raise ValueError(
            f"top_k must be an int between 1 and the dataset size {size}, got {top_k!r} "
            "(use --top-k N with N <= the dataset size)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    rank, world = _dist()
    data_fp, example_shape = _data_fingerprint(data, size)
    if example_shape is not None:
        _check_channels_first(model, example_shape, names)
    model_fp = model_fingerprint(model)
    if model_spec is None:
        model_spec = _remembered_model_spec(model, model_fp)
    if data_spec is None:
        data_spec = remembered_spec(data, DataSpec)[0]
    config = _config(
        model, model_fp, model_spec, data, data_spec, size, data_fp, names, score, top_k
    )
    ckpt = None if checkpoint is None else Path(checkpoint)

    # Rank 0 reads the checkpoint and tells the others (they may not share a filesystem).
    state, start = _State(), 0
    payload: tuple[str, Any] = ("start", None)
    if rank == 0 and ckpt is not None:
        try:
            found = _load_checkpoint(ckpt, config)
        except (AtlasError, FileNotFoundError) as exc:
            payload = ("error", exc)
        else:
            if found is None and resume:
                warnings.warn(
                    f"nothing to resume in {str(ckpt)!r} (no scan saved there): starting afresh",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if found is not None:
                saved_state, saved_start, saved_atlas = found
                if saved_atlas.complete:
                    payload = ("done", saved_atlas)
                else:
                    payload = ("resume", saved_start)
                    state, start = saved_state, saved_start
    kind, value = _broadcast(payload, world)
    if kind == "error":
        raise value
    if kind == "done":
        return value
    if kind == "resume":
        start = value

    spans = [(s, min(s + batch_size, size)) for s in range(start, size, batch_size)]
    rounds = math.ceil(len(spans) / world)
    mine = spans[rank::world]
    score_of = SCORES[score]
    # per layer, this batch's candidates: rows in the batch, scores, flat locations (M, C),
    # NaN counts (C,), spatial output shape
    reduced: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]]
    reduced = {}
    batch_n = [0]

    def on_output(name: str, y: torch.Tensor) -> None:
        if y.dim() < 2 or y.shape[0] != batch_n[0]:
            raise DataError(
                f"layer {name!r} returned shape {tuple(y.shape)} for a batch of {batch_n[0]}: "
                "scan needs outputs (N, C, *spatial)"
            )
        flat = y.detach().reshape(y.shape[0], y.shape[1], -1)  # (N, C, S)
        values, has_nan = score_of.values(flat)  # (N, C) each
        n, channels = values.shape
        if n > top_k:
            # Only the batch's own top_k per channel can enter the running top_k: select them
            # where the activations live, so that little crosses to the CPU and the merge
            # stays small. Ascending stable sort of -score: NaN last, ties keep batch order.
            rows = torch.sort(-values, dim=0, stable=True).indices[:top_k]  # (K, C)
            values = values.gather(0, rows)
        else:
            rows = torch.arange(n, device=values.device)[:, None].expand(n, channels)
        columns = torch.arange(channels, device=values.device).expand_as(rows)
        locations = first_argmax(score_of.peak(flat[rows, columns]))  # (K, C)
        reduced[name] = (
            rows.cpu().numpy(),
            values.cpu().double().numpy(),
            locations.cpu().numpy().astype(np.int64),
            has_nan.sum(dim=0).cpu().numpy(),
            tuple(y.shape[2:]),
        )

    from tqdm.auto import tqdm

    bar = tqdm(
        total=size - start,
        unit="img",
        desc="scan",
        disable=not progress or rank != 0,
        dynamic_ncols=True,
    )
    warned = 0
    # Interrupt handling (one process with a checkpoint): the state is consistent except while
    # a batch is being recorded; a Ctrl-C / SIGTERM arriving then is deferred to the batch's
    # end, so that what is saved is exactly the batches done ("completed" examples).
    recording = [False]
    completed = start
    stop = _Stop(recording, enabled=ckpt is not None and world == 1)
    try:
        with (
            stop,
            preserved(model),
            _on_device(model, device) as dev,
            torch.inference_mode(),
            capture(model, names, on_output=on_output) as run,
        ):
            batches = _batches(data, mine, num_workers, pin_memory=dev.type == "cuda")
            for t in range(rounds):
                if t < len(mine):
                    indices, x, skipped, error = next(batches)
                    if error is not None:
                        raise DataError(error)
                    if x is not None:
                        if state.input_shape is None:
                            state.input_shape = tuple(x.shape[1:])
                        reduced.clear()
                        batch_n[0] = x.shape[0]
                        run(x.to(dev, non_blocking=True))
                    recording[0] = True
                    for index, error in skipped.items():
                        if warned < 10:
                            warnings.warn(
                                f"skipping example {index} ({error}); it is listed in the "
                                "atlas manifest",
                                RuntimeWarning,
                                stacklevel=2,
                            )
                        warned += 1
                    state.skipped.update(skipped)
                    if x is not None:
                        for name in names:
                            rows, values, locations, nan_counts, shape = reduced[name]
                            state.add_batch(
                                name, indices[rows], values, locations, nan_counts, shape, top_k
                            )
                        state.scanned += len(indices)
                done = spans[min((t + 1) * world, len(spans)) - 1][1]
                completed = done
                recording[0] = False
                bar.update(done - bar.n - start)
                stop.check()
                if ckpt is not None and (t + 1) % checkpoint_every == 0 and t + 1 < rounds:
                    merged = _gather_merge(state, world, top_k)
                    if rank == 0 and set(merged.tops) == set(names):
                        _atlas(config, merged, data_spec, batch_size, done).save(ckpt)
    except KeyboardInterrupt:
        if ckpt is None or world > 1:
            raise
        bar.close()
        raise _interrupted(
            config, state, data_spec, batch_size, completed, ckpt, consistent=not recording[0]
        ) from None
    finally:
        bar.close()
    merged = _gather_merge(state, world, top_k)
    if warned > 10:
        warnings.warn(
            f"{warned} examples skipped in all (listed in the atlas manifest)",
            RuntimeWarning,
            stacklevel=2,
        )
    if set(merged.tops) != set(names):
        first = list(merged.skipped.items())[:3]
        raise DataError(
            f"no example of the {size} could be loaded; first errors: "
            + "; ".join(f"{i}: {e}" for i, e in first)
        )
    atlas = _atlas(config, merged, data_spec, batch_size, size)
    if ckpt is not None and rank == 0:
        atlas.save(ckpt)
    if world > 1:
        torch.distributed.barrier()
    return atlas
