"""Projections of a unit back to the input: gradient, deconvnet, guided backprop.

For a unit ``y[layer, channel, location]`` and an input ``x`` the projection is the backward
pass from that one value to ``x``, with the rectifier rule of the chosen method
(:data:`featurelens.rules.METHODS`). Three things make it fast and keep it exact:

* **Truncation.** The forward pass stops at ``layer`` (:func:`featurelens.graph.capture`):
  nothing after it runs.
* **Receptive-field crop.** A unit depends only on its receptive field, so it is computed on
  a crop of the input holding that field and the result is put back into a zero map of the
  input's size. The crop starts on a multiple of the layer's effective stride, so every
  intermediate grid of the truncated network lines up with the full image's, and is clamped to
  the image (shifted inwards by whole strides near the far border), so real zero padding stays
  real padding. Every value the unit depends on is then computed from the same numbers: the
  geometry is tested bit for bit in float64 with dyadic weights (every sum exact in any order);
  with arbitrary float64 weights a crop can differ from the full image by about one ulp,
  because BLAS blocks a smaller matrix differently (docs/projections.md). Each window is
  checked to hold the unit's exact field; a unit whose window does not goes uncropped.
* **Batching.** Crops of many units (any examples, channels, locations) are stacked and go
  through one forward and one backward of the *sum* of the selected units: rows are
  independent in eval mode, so each row's gradient is its own unit's.

The model is used in eval mode with frozen parameters and comes back exactly as it was given,
also after an error (:func:`featurelens.graph.preserved`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from featurelens.errors import CropWarning
from featurelens.graph import capture, model_device, preserved, resolve_layers
from featurelens.receptive_field import ReceptiveField, try_receptive_field
from featurelens.rules import Rule, check_other_activations, get_rule, rule_mode
from featurelens.unit import Unit, argmax_location, as_integer, as_location, check_location

__all__ = ["CropWarning", "project", "project_units"]

AUTO_CHUNK_VALUES = 2**19
"""With ``chunk_size=None``, units per pass = this many input values / values of one crop."""


# --------------------------------------------------------------------------------------------
# Public API


def project(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    channel: int | torch.Tensor,
    location: Sequence[int] | torch.Tensor | None = None,
    method: str | Rule = "gradient",
    *,
    crop: bool = True,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    other_activations: str = "error",
) -> torch.Tensor:
    """Project one unit per example back to the input.

    Parameters
    ----------
    model
        Any ``nn.Module``; left exactly as given (mode, parameters, ``requires_grad``, hooks).
    inputs
        ``(N, C, *spatial)`` with 1 to 3 spatial axes (signals, images, volumes). Not modified;
        its ``requires_grad`` is untouched.
    layer
        Dotted ``named_modules()`` name of the layer (:func:`featurelens.layer_names`). Its
        output is ``(N, K, *spatial_l)`` (or ``(N, K)``, then locations are ``()``).
    channel
        An integer (int, numpy integer, 0-d integer tensor): the same channel for every
        example; or an integer tensor or numpy array ``(N,)``.
    location
        None: each example's arg-max of its channel's map (the first in row-major order on
        ties, NaN ignored, as in :func:`featurelens.scan`). A tuple of integers (the same
        location for every example; a single integer on a 1-D layer), or one location per
        example: an integer tensor or numpy array ``(N, d)`` or a list of N tuples, with one
        integer per spatial axis of the layer's output.
    method
        A name in :data:`featurelens.rules.METHODS`: ``"gradient"`` (Simonyan et al. 2013),
        ``"deconvnet"`` (Zeiler & Fergus 2014), ``"guided"`` (Springenberg et al. 2014).
    crop
        Compute each unit on the input crop holding its receptive field (exact, much faster).
        Falls back to the whole input when the field is global; also, with a
        :class:`CropWarning`, when the field cannot be computed (the model does not trace, an
        operation the receptive-field engine does not know), when the network normalises over
        positions (GroupNorm, InstanceNorm, LayerNorm on a map) or pools to a fixed size
        (adaptive pooling to more than 1) before the layer, or when a crop would not hold a
        unit's exact receptive field (that unit only).
    chunk_size
        Units per forward/backward pass: memory is about ``chunk_size`` times the activations
        of one crop. Default: as many crops as hold :data:`AUTO_CHUNK_VALUES` input values
        (90 crops of 3x44x44 for VGG16 conv3_3, 3 whole 3x224x224 images).
    device
        Where to compute (the model must already live there); default: the device of the
        model's parameters. Results come back on ``inputs.device``.
    other_activations
        Under ``deconvnet``/``guided``, what a non-rectifier activation (GELU, SiLU, sigmoid,
        LeakyReLU, ReLU6, ...) does: ``"error"`` (default, :class:`ActivationError` naming the
        activation and the module running it) or ``"gradient"`` (plain gradient through it).

    Returns
    -------
    torch.Tensor
        ``(N, C, *spatial)`` like ``inputs``: row ``i`` is ``d y[i, channel_i, location_i] /
        d inputs[i]`` under the method's rule; zero outside the unit's receptive field.

    Raises
    ------
    LayerError
        ``layer`` is not an addressable layer (the message lists valid names).
    ValueError
        Unknown method; channel or location out of range or of the wrong rank; inputs whose
        shape the model rejects; a channels-last layer (``(N, *spatial, C)``, found when the
        crop's receptive field is computed). The message names the bad value and the valid
        range.
    TypeError
        A channel, location or row that is not an integer (``1.7``, ``True``), naming it.
    ActivationError
        An activation without a rule for ``method`` (see ``other_activations``).
    RuntimeError
        Errors that are not about the input's shape (``torch.OutOfMemoryError``, a dtype or
        device mismatch between inputs and model) propagate unchanged, never retried.

    Examples
    --------
    >>> maps = featurelens.project(model, images, "features.15", channel=7, method="guided")
    >>> maps.shape == images.shape
    True
    """
    x = _check_inputs(inputs)
    n = x.shape[0]
    channels = _per_example_channel(channel, n)
    locations = _per_example_location(location, n)
    jobs = [_Job(i, layer, channels[i], locations[i], f"example {i}") for i in range(n)]
    return _project(model, x, jobs, method, crop, chunk_size, device, other_activations)


def project_units(
    model: nn.Module,
    inputs: torch.Tensor,
    units: Sequence[Unit],
    method: str | Rule = "gradient",
    *,
    rows: Sequence[int] | torch.Tensor | None = None,
    crop: bool = True,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    other_activations: str = "error",
) -> torch.Tensor:
    """Project many units, of any layers, channels and examples, in few batched passes.

    Each result equals the one-unit call :func:`project` would give for it.

    Parameters
    ----------
    inputs
        ``(N, C, *spatial)``.
    units
        M :class:`featurelens.Unit` values; ``location=None`` means the arg-max of that
        channel on that unit's example (one truncated forward per example and layer, shared
        by all its units).
    rows
        The example of ``inputs`` each unit belongs to, ``(M,)`` integers. Default: unit ``i``
        belongs to example ``i`` (then M must equal N).
    method, crop, chunk_size, device, other_activations
        As in :func:`project`.

    Returns
    -------
    torch.Tensor
        ``(M, C, *spatial)``: one map per unit, on ``inputs.device``.

    Examples
    --------
    All 256 channels of a layer on 9 images, each at its own arg-max (the Zeiler-Fergus job)::

        units = [Unit("features.15", k) for k in range(256) for _ in range(9)]
        rows = list(range(9)) * 256
        maps = project_units(model, images, units, "guided", rows=rows)  # (2304, 3, H, W)
    """
    x = _check_inputs(inputs)
    n = x.shape[0]
    units = list(units)
    for i, u in enumerate(units):
        if not isinstance(u, Unit):
            raise TypeError(f"units[{i}] is {u!r}, not a featurelens.Unit")
    if rows is None:
        if len(units) != n:
            raise ValueError(
                f"{len(units)} units for {n} examples: pass rows= (the example of each unit) "
                "or one unit per example"
            )
        row_list = list(range(n))
    else:
        row_list = _int_list(rows, "rows")
        if len(row_list) != len(units):
            raise ValueError(f"rows has {len(row_list)} entries for {len(units)} units")
        for i, r in enumerate(row_list):
            if not 0 <= r < n:
                raise ValueError(f"rows[{i}] = {r} is out of range: valid 0..{n - 1}")
    jobs = [
        _Job(r, u.layer, u.channel, u.location, f"units[{i}] (example {r})")
        for i, (u, r) in enumerate(zip(units, row_list))
    ]
    return _project(model, x, jobs, method, crop, chunk_size, device, other_activations)


# --------------------------------------------------------------------------------------------
# Argument checks


@dataclass(frozen=True)
class _Job:
    row: int
    layer: str
    channel: int
    location: tuple[int, ...] | None
    label: str


def _check_inputs(inputs: Any) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor (N, C, *spatial), got {type(inputs).__name__}")
    if not 3 <= inputs.dim() <= 5:
        raise ValueError(
            f"inputs of shape {tuple(inputs.shape)} are not (N, C, *spatial) with 1 to 3 "
            "spatial axes: e.g. (N, 3, 224, 224) images, (N, 1, 16000) signals, "
            "(N, 1, 32, 64, 64) volumes"
        )
    if not inputs.is_floating_point():
        raise ValueError(f"inputs must be floating point, got {inputs.dtype}")
    if inputs.shape[0] == 0:
        raise ValueError("inputs hold no example (N = 0)")
    return inputs.detach()


def _as_tensor(v: Any) -> Any:
    """numpy arrays as tensors (ints stay ints, floats stay floats and are refused later)."""
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v)) if v.dtype != object else v
    return v


def _integer_tensor(v: torch.Tensor, what: str, expected: str) -> None:
    if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
        raise TypeError(f"{what} must hold integers ({expected}), got {v.dtype} {tuple(v.shape)}")


def _int_list(v: Any, what: str) -> list[int]:
    v = _as_tensor(v)
    if isinstance(v, torch.Tensor):
        _integer_tensor(v, what, "a 1-D integer tensor")
        if v.dim() != 1:
            raise ValueError(f"{what} must be a 1-D integer tensor, got shape {tuple(v.shape)}")
        return [int(a) for a in v.tolist()]
    return [as_integer(a, f"{what}[{i}]") for i, a in enumerate(v)]


def _per_example_channel(channel: Any, n: int) -> list[int]:
    channel = _as_tensor(channel)
    if isinstance(channel, torch.Tensor) and channel.dim() > 0:
        _integer_tensor(channel, "channel", f"an int or an integer tensor ({n},)")
        if channel.dim() != 1 or channel.shape[0] != n:
            raise ValueError(
                f"channel must be an int or an integer tensor of shape ({n},), one per example; "
                f"got {channel.dtype} of shape {tuple(channel.shape)}"
            )
        return [int(c) for c in channel.tolist()]
    return [as_integer(channel, "channel (an int or an integer tensor (N,))")] * n


def _per_example_location(location: Any, n: int) -> list[tuple[int, ...] | None]:
    if location is None:
        return [None] * n
    location = _as_tensor(location)
    if isinstance(location, torch.Tensor):
        _integer_tensor(location, "location", f"a tuple of ints or an integer tensor ({n}, d)")
        if location.dim() == 2 and location.shape[0] == n:
            return [tuple(row) for row in location.tolist()]
        if location.dim() <= 1:
            return [as_location(location, "location")] * n
        raise ValueError(
            f"location must be a tuple of ints or an integer tensor (N, d) = ({n}, d), "
            f"got shape {tuple(location.shape)}"
        )
    rows = list(location) if isinstance(location, (list, tuple)) else None
    if rows and all(isinstance(r, (list, tuple, np.ndarray, torch.Tensor)) for r in rows):
        # one location per example, e.g. [[1, 2], [4, 0]]
        if len(rows) != n:
            raise ValueError(
                f"location {location!r} has {len(rows)} rows for {n} examples: pass one "
                "location per example, or one tuple of ints for all"
            )
        return [as_location(r, f"location[{i}]") for i, r in enumerate(rows)]
    return [as_location(location, "location")] * n


# --------------------------------------------------------------------------------------------
# Receptive-field crops


@dataclass(frozen=True)
class _Crop:
    """Receptive-field crops of one layer: a window (start, size) per unit.

    Per axis, crops start on a multiple of the layer's effective ``stride`` and have one of two
    sizes: ``size`` (holds any interior unit's field) or ``far_size`` (a crop flush with the
    far border, whose start ``n - far_size`` is then on the grid too). Units of equal size
    batch together. An axis with stride 0 (one input location repeated over the layer's
    axis) is cropped whole.
    """

    size: tuple[int, ...]
    far_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    input_shape: tuple[int, ...]
    field: ReceptiveField | None = None

    @classmethod
    def full(cls, input_shape: tuple[int, ...]) -> _Crop:
        d, shape = len(input_shape), tuple(input_shape)
        return cls(shape, shape, (1,) * d, (0,) * d, shape)

    @classmethod
    def for_field(cls, rf: ReceptiveField) -> _Crop:
        size, far = [], []
        for r, j, p, n in zip(rf.size, rf.stride, rf.padding, rf.input_shape):
            if j <= 0:
                size.append(n)
                far.append(n)
                continue
            # An interior unit's field starts at u*j - p, i.e. (-p) mod j past a multiple of j:
            # that much slack before it once the start is aligned down.
            need = min(r + (-p) % j, n)
            size.append(need)
            far.append(n - j * ((n - need) // j))  # n - far is a multiple of j
        return cls(tuple(size), tuple(far), rf.stride, rf.padding, rf.input_shape, rf)

    @property
    def is_full(self) -> bool:
        return self.size == self.input_shape

    def window(self, location: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(start, size)`` of the crop holding the field of the unit at ``location``."""
        start, size = [], []
        for u, j, p, n, s, far in zip(
            location, self.stride, self.padding, self.input_shape, self.size, self.far_size
        ):
            a = (max(u * j - p, 0) // j) * j if s < n else 0
            if a + s > n:
                s = far
                a = n - far
            start.append(a)
            size.append(s)
        return tuple(start), tuple(size)

    def local(self, location: tuple[int, ...], start: tuple[int, ...]) -> tuple[int, ...]:
        """The unit's location on the crop's grid."""
        return tuple(u - a // j if a else u for u, a, j in zip(location, start, self.stride))

    def holds(
        self, location: tuple[int, ...], window: tuple[tuple[int, ...], tuple[int, ...]]
    ) -> bool:
        """Whether ``window`` holds every input position the unit at ``location`` reads.

        A safety net under the arithmetic above: the receptive field's exact clipped bounds
        (:meth:`ReceptiveField.region`) must lie inside the crop.
        """
        if self.field is None:
            return all(a == 0 and s == n for a, s, n in zip(*window, self.input_shape))
        region = self.field.region(location)
        if any(sl.stop <= sl.start for sl in region):  # sees only padding
            return True
        return all(a <= sl.start and sl.stop <= a + s for sl, a, s in zip(region, *window))


def _slices(start: tuple[int, ...], size: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(a, a + s) for a, s in zip(start, size))


def _show(slices: tuple[slice, ...]) -> str:
    return "[" + ", ".join(f"{sl.start}:{sl.stop}" for sl in slices) + "]"


_ADAPTIVE_POOLS: dict[Any, str] = {}
for _d in (1, 2, 3):
    for _kind in ("avg", "max"):
        _name = f"adaptive_{_kind}_pool{_d}d"
        for _f in (_name, f"{_name}_with_indices", f"_{_name}"):
            if hasattr(F, _f):
                _ADAPTIVE_POOLS[getattr(F, _f)] = _name


class _CropHazards(TorchFunctionMode):
    """Records, on the way to the layer, what a crop would change and the trace cannot say.

    * BatchNorm with batch statistics (``track_running_stats=False``): rows of one pass would
      mix, so units go one per pass.
    * Adaptive pooling to a fixed size larger than 1: on a smaller crop it would still output
      that size, with other windows. (Size 1 is global pooling, None keeps the size: both crop
      exactly, and the receptive field then spans the whole axis.)
    * Interpolation: its grid follows the input's size (``size=``, ``align_corners``).

    Normalisations over positions (GroupNorm, InstanceNorm, LayerNorm over spatial dims) come
    from the receptive-field trace (:attr:`ReceptiveField.statistics`), which knows which dims
    are spatial: a LayerNorm over the channels of a channels-last map (ConvNeXt) still crops.
    """

    def __init__(self) -> None:
        super().__init__()
        self.batch_statistics = False
        self.pools: list[str] = []
        self.resampled = False

    def reasons(self, rf: ReceptiveField) -> list[str]:
        out = []
        if rf.statistics:
            out.append(
                f"the network normalises over positions before it ({', '.join(rf.statistics)})"
            )
        if self.resampled:
            out.append("the network resamples before it (F.interpolate), on a grid a crop changes")
        if self.pools:
            out.append(
                "the network pools to a fixed size before it, which a crop would change "
                f"({', '.join(self.pools)})"
            )
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.batch_norm:
            if args[5] if len(args) > 5 else kwargs.get("training", False):
                self.batch_statistics = True
        elif func is F.interpolate:
            self.resampled = True
        elif func in _ADAPTIVE_POOLS:
            size = args[1] if len(args) > 1 else kwargs.get("output_size")
            sizes = tuple(size) if isinstance(size, (list, tuple)) else (size,)
            if any(isinstance(n, int) and n > 1 for n in sizes):
                pool = f"{_ADAPTIVE_POOLS[func]} to {size}"
                if pool not in self.pools:
                    self.pools.append(pool)
        return func(*args, **kwargs)


def _field(model: nn.Module, x: torch.Tensor, layer: str) -> tuple[ReceptiveField | None, str]:
    """The layer's receptive field, or None and why it cannot be computed."""
    rf, why = try_receptive_field(model, tuple(x.shape[1:]), layer)
    return rf, "" if rf is not None else f"its receptive field cannot be computed ({why})"


def _plan_crop(
    layer: str,
    input_shape: tuple[int, ...],
    rf: ReceptiveField | None,
    why: str,
    out_spatial: tuple[int, ...],
    hazards: _CropHazards,
) -> _Crop:
    full = _Crop.full(input_shape)
    if rf is not None:
        if rf.is_global:
            return full
        why = "; ".join(hazards.reasons(rf))
        if not rf.regular or rf.wraps:  # crops need one (size, stride, padding), unwrapped
            why = "its receptive field is irregular or wraps around the input (upsampling, "
            why += "circular padding): no crop is known to reproduce its units"
        if not why and tuple(rf.output_shape) != out_spatial:
            why = (
                f"its output's spatial shape {out_spatial} does not match the receptive-field "
                f"grid {rf.output_shape}"
            )
    if why:
        _crop_warning(layer, why, stacklevel=6)
        return full
    return _Crop.for_field(rf)


def _crop_warning(layer: str, why: str, stacklevel: int) -> None:
    # stacklevel: the caller of project()/project_units()
    warnings.warn(
        f"projection of layer {layer!r} computed on the whole input (exact, slower): {why}. "
        "Pass crop=False to silence this warning.",
        CropWarning,
        stacklevel=stacklevel,
    )


# --------------------------------------------------------------------------------------------
# The core


def _project(
    model: nn.Module,
    x: torch.Tensor,
    jobs: list[_Job],
    method: str | Rule,
    crop: bool,
    chunk_size: int | None,
    device: torch.device | str | None,
    other_activations: str,
) -> torch.Tensor:
    rule = get_rule(method)
    check_other_activations(other_activations)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = torch.device(device) if device is not None else model_device(model, x.device)
    layers = list(dict.fromkeys(job.layer for job in jobs))
    with preserved(model), _grad_enabled():
        if x.is_inference():  # made under inference_mode: autograd cannot record it
            x = x.clone()
        # Created here, not under a caller's inference_mode, so that it can be written to.
        out = torch.zeros((len(jobs), *x.shape[1:]), dtype=x.dtype, device=x.device)
        for layer in layers:
            resolve_layers(model, [layer])
            idx = [i for i, job in enumerate(jobs) if job.layer == layer]
            _project_layer(
                model, x, [jobs[i] for i in idx], idx, out, rule, crop, chunk_size, device,
                other_activations,
            )  # fmt: skip
    return out


@contextlib.contextmanager
def _grad_enabled() -> Iterator[None]:
    # A caller inside torch.no_grad() or inference_mode() still gets gradients.
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Substrings (lower case) of PyTorch's messages. Out of memory, dtype and device errors are
# the caller's to see as they are (a retry on the whole input would only make an OOM worse);
# only an error about the input's size may become "rejects inputs of shape" or a crop retry.
_NOT_SHAPE = (
    "out of memory", "allocate", "dtype", "scalar type", "type (", "device", "cuda", "mps",
)  # fmt: skip
_SHAPE = (
    "size", "shape", "dimension", "channels", "must match", "cannot be multiplied",
    "expected input", "too small", "kernel", "padding",
)  # fmt: skip


def _is_shape_error(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    text = str(exc).lower()
    return not any(s in text for s in _NOT_SHAPE) and any(s in text for s in _SHAPE)


def _rejected(exc: BaseException, shape: tuple[int, ...]) -> ValueError:
    return ValueError(f"the model rejects inputs of shape {shape}: {_first_line(exc)}")


def _forward(run: Any, x: torch.Tensor, layer: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The layer's output for ``x``; ``shape`` is the caller's input shape, for the error."""
    try:
        return run(x)[layer]
    except RuntimeError as exc:
        if _is_shape_error(exc):
            raise _rejected(exc, shape) from exc
        raise


def _project_layer(
    model: nn.Module,
    x: torch.Tensor,
    jobs: list[_Job],
    out_index: list[int],
    out: torch.Tensor,
    rule: Rule,
    crop: bool,
    chunk_size: int | None,
    device: torch.device,
    other_activations: str,
) -> None:
    layer = jobs[0].layer
    # 1. One example through the truncated model: the layer's shape, errors for activations
    #    without a rule, operations a crop would change.
    probe_row = next((job.row for job in jobs if job.location is None), jobs[0].row)
    hazards = _CropHazards()
    with (
        torch.no_grad(),
        capture(model, [layer]) as run,
        rule_mode(model, rule, other_activations),
        hazards,
    ):
        y = _forward(run, x[probe_row : probe_row + 1].to(device), layer, tuple(x.shape))
    shape = tuple(y.shape[1:])
    if len(shape) < 1:
        raise ValueError(f"layer {layer!r} outputs shape {tuple(y.shape)}: no channel axis")
    n_channels, out_spatial = shape[0], shape[1:]
    cropping = crop and len(out_spatial) == x.dim() - 2
    rf, why = _field(model, x, layer) if cropping else (None, "")
    if rf is not None:  # an untraceable model keeps reading channels at dim 1, unchecked
        rf.check_channels_first(layer)
    for job in jobs:
        _check_unit(job, layer, n_channels, out_spatial)

    # 2. Arg-max locations: one truncated forward per example, shared by all its units.
    if hazards.batch_statistics:
        chunk_size = 1  # statistics over the batch would mix the units of one pass
    whole = chunk_size or max(1, AUTO_CHUNK_VALUES // x[0].numel())
    locations = _argmax_locations(model, x, jobs, layer, whole, device, probe_row, y)

    # 3. Crops.
    input_shape = tuple(x.shape[2:])
    if cropping:
        plan = _plan_crop(layer, input_shape, rf, why, out_spatial, hazards)
    else:
        plan = _Crop.full(input_shape)

    # 4. Batched forward/backward, chunk by chunk.
    args = (model, x, jobs, out_index, out, rule, locations, out_spatial, device, other_activations)
    try:
        _run_chunks(*args, plan, chunk_size)
    except _CropRejected as exc:
        _crop_warning(layer, str(exc), stacklevel=5)
        _run_chunks(*args, _Crop.full(input_shape), chunk_size)


class _CropRejected(Exception):
    """The truncated model does not run on receptive-field crops."""


def _run_chunks(
    model: nn.Module,
    x: torch.Tensor,
    jobs: list[_Job],
    out_index: list[int],
    out: torch.Tensor,
    rule: Rule,
    locations: list[tuple[int, ...]],
    out_spatial: tuple[int, ...],
    device: torch.device,
    other_activations: str,
    plan: _Crop,
    chunk_size: int | None,
) -> None:
    layer = jobs[0].layer
    windows = [plan.window(loc) for loc in locations]
    missed = [k for k, (loc, w) in enumerate(zip(locations, windows)) if not plan.holds(loc, w)]
    if missed:  # a geometry the crop arithmetic got wrong: those units go uncropped
        whole = ((0,) * len(plan.input_shape), plan.input_shape)
        k = missed[0]
        _crop_warning(
            layer,
            f"the crop {_show(_slices(*windows[k]))} of {jobs[k].label} at {locations[k]} does "
            f"not hold its receptive field {_show(plan.field.region(locations[k]))} (nor do the "
            f"crops of {len(missed) - 1} more units)",
            stacklevel=6,
        )
        for k in missed:
            windows[k] = whole
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, (_, size) in enumerate(windows):
        groups.setdefault(size, []).append(k)
    with capture(model, [layer]) as run:
        for size, members in groups.items():
            step = chunk_size or max(1, AUTO_CHUNK_VALUES // (x.shape[1] * math.prod(size)))
            for lo in range(0, len(members), step):
                part = members[lo : lo + step]
                _run_chunk(run, x, jobs, part, windows, plan, locations, out_index, out,
                           rule, model, layer, out_spatial, device, other_activations)  # fmt: skip


def _run_chunk(
    run: Any,
    x: torch.Tensor,
    jobs: list[_Job],
    part: list[int],
    windows: list[tuple[tuple[int, ...], tuple[int, ...]]],
    plan: _Crop,
    locations: list[tuple[int, ...]],
    out_index: list[int],
    out: torch.Tensor,
    rule: Rule,
    model: nn.Module,
    layer: str,
    out_spatial: tuple[int, ...],
    device: torch.device,
    other_activations: str,
) -> None:
    """One forward and one backward for the units ``part`` (crops of equal size)."""
    slices = [_slices(*windows[k]) for k in part]
    crops = torch.stack([x[jobs[k].row][(slice(None), *sl)] for k, sl in zip(part, slices)])
    crops = crops.to(device).requires_grad_(True)  # (m, C, *size)
    local = [plan.local(locations[k], windows[k][0]) for k in part]
    try:
        with rule_mode(model, rule, other_activations):
            y = run(crops)[layer]
    except RuntimeError as exc:
        if not _is_shape_error(exc):
            raise
        if crops.shape[2:] == x.shape[2:]:
            raise _rejected(exc, tuple(x.shape)) from exc
        raise _CropRejected(
            f"the model rejects receptive-field crops of shape {tuple(crops.shape)} "
            f"({_first_line(exc)})"
        ) from exc
    if any(not 0 <= u < n for loc in local for u, n in zip(loc, y.shape[2:])):
        raise _CropRejected(  # a geometry the receptive-field engine got wrong
            f"crops of shape {tuple(crops.shape)} give a {tuple(y.shape[2:])} grid that misses "
            "some units"
        )
    coords = torch.tensor(local, dtype=torch.long, device=y.device)
    index = (
        torch.arange(len(part), device=y.device),
        torch.tensor([jobs[k].channel for k in part], device=y.device),
        *coords.reshape(len(part), len(out_spatial)).T,
    )
    (grad,) = torch.autograd.grad(y[index].sum(), crops)
    grad = grad.to(out.device)
    for g, k, sl in zip(grad, part, slices):
        out[out_index[k]][(slice(None), *sl)] = g


def _check_unit(job: _Job, layer: str, n_channels: int, out_spatial: tuple[int, ...]) -> None:
    if not 0 <= job.channel < n_channels:
        raise ValueError(
            f"channel {job.channel} of {job.label} is out of range: layer {layer!r} has "
            f"{n_channels} channels, valid 0..{n_channels - 1}"
        )
    if job.location is None:
        return
    check_location(job.location, out_spatial, f" of {job.label}", f"layer {layer!r} outputs")


def _argmax_locations(
    model: nn.Module,
    x: torch.Tensor,
    jobs: list[_Job],
    layer: str,
    chunk_size: int,
    device: torch.device,
    probe_row: int,
    probe: torch.Tensor,
) -> list[tuple[int, ...]]:
    wanted: dict[int, list[int]] = {}
    for k, job in enumerate(jobs):
        if job.location is None:
            wanted.setdefault(job.row, []).append(k)
    found: dict[int, tuple[int, ...]] = {}

    def take(row: int, y: torch.Tensor) -> None:  # y: (K, *spatial_l) of one example
        for k in wanted[row]:
            found[k] = argmax_location(y[jobs[k].channel])  # the first maximum, NaN ignored

    if probe_row in wanted:
        take(probe_row, probe[0])
    rest = [r for r in wanted if r != probe_row]
    if rest:
        with torch.no_grad(), capture(model, [layer]) as run:
            for lo in range(0, len(rest), chunk_size):
                part = rest[lo : lo + chunk_size]
                y = _forward(run, x[part].to(device), layer, tuple(x.shape))
                for i, row in enumerate(part):
                    take(row, y[i])
    return [found[k] if job.location is None else job.location for k, job in enumerate(jobs)]
