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
  independent in eval mode, so each row's gradient is its own unit's. (Units whose crops
  coincide each keep their own row: a shared row with vectorised backward slots,
  ``is_grads_batched``, measured 3-4x slower on CPU, where vmap loops over the slots.)

How a call runs: the public functions check their arguments and turn them into one
:class:`_Context` (what the whole call shares: model, inputs, rule, device, crop, chunking,
receptive fields given by the caller, the model's structure signature) and one
:class:`_Target` per unit (its example, its row of the result, channel, location, label, and
later its crop window). Each layer then gets one :func:`~featurelens.graph.capture`, under
which the layer's field and layout come from :data:`featurelens.analysis.ANALYSES` (computed
the first time, a probe forward of one example measuring the layout) and make its
:class:`_Layer` (channels, output grid, crop plan), arg-max forwards fill in missing
locations, and batched passes project the targets. Reasons to compute on the whole input are
collected and warned once, from the public call, as :class:`CropWarning`.

The model is used in eval mode with frozen parameters and comes back exactly as it was given,
also after an error (:func:`featurelens.graph.preserved`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from featurelens._public import public
from featurelens.analysis import ANALYSES, LayerLayout, structure_signature
from featurelens.errors import CropWarning, FeaturelensError, LayoutError, UsageError
from featurelens.graph import capture, model_device, preserved, resolve_layers
from featurelens.receptive_field import ReceptiveField, try_receptive_field
from featurelens.rules import Rule, check_other_activations, get_rule, rule_mode
from featurelens.unit import (
    Layout,
    Unit,
    argmax_location,
    as_integer,
    as_location,
    check_location,
)

__all__ = ["CropWarning", "project", "project_units"]

AUTO_CHUNK_VALUES = 2**19
"""With ``chunk_size=None``, units per pass = this many input values / values of one crop."""


# --------------------------------------------------------------------------------------------
# Public API


@public
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
    field: ReceptiveField | None = None,
    channel_dim: int | None = None,
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
    field
        The receptive field of ``layer`` for inputs of this spatial shape, as
        :func:`featurelens.receptive_field` ``(model, inputs.shape[1:], layer)`` returns it,
        when the caller has it already (figures and the explorer do): the call then does not
        trace the model for it. Default None: computed here when ``crop`` is on. It is
        checked against the inputs' spatial shape and the layer's output grid; that it
        belongs to ``layer`` is the caller's word.
    channel_dim
        The dim of the layer's output that holds its channels (negative counts from the end):
        1 for ``(N, C, *spatial)``, -1 for channels-last maps ``(N, *spatial, C)`` and tokens
        ``(N, T, C)``. Default None: the layout the receptive-field trace establishes
        (:func:`featurelens.layer_layout`); a stated dim is checked against it. Locations are
        one index per other dim after the batch, in the layer's own rank (a token index for
        ``(N, T, C)``). A layer the trace reaches but whose channel dim it cannot tell
        (per-head tensors ``(N, heads, T, d)``) needs it stated. Where the trace does not
        reach the layer (the model's path depends on values, an unknown operation comes
        first) channels are read at dim 1 unless stated.

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
        shape the model rejects; a ``channel_dim`` that is not the traced one or not a dim of
        the layer's output; a ``field`` computed for inputs of another spatial shape, or whose
        output grid is not the layer's. The message names the bad
        value and the valid range.
    TypeError
        A channel, location or row that is not an integer (``1.7``, ``True``), naming it; a
        ``field`` that is not a :class:`~featurelens.ReceptiveField`.
    LayoutError
        ``channel_dim`` is None and the trace reaches the layer but cannot tell which dim
        of its output holds its channels (the message says how to state it).
    ActivationError
        An activation without a rule for ``method`` (see ``other_activations``).
    RuntimeError
        Errors that are not about the input's shape (``torch.OutOfMemoryError``, a dtype or
        device mismatch between inputs and model) propagate unchanged, never retried.

    Warns
    -----
    CropWarning
        Once per reason the call computed some units on the whole input (see ``crop``),
        attributed to the line that called :func:`project`.

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
    targets = [
        _Target(
            out_row=i,
            row=i,
            layer=layer,
            channel=channels[i],
            location=locations[i],
            label=f"example {i}",
        )
        for i in range(n)
    ]
    context = _Context.create(
        model,
        x,
        method,
        crop=crop,
        chunk_size=chunk_size,
        device=device,
        other_activations=other_activations,
        fields=None if field is None else {layer: field},
        channel_dim=channel_dim,
    )
    maps, fallbacks = _project(context, targets)
    for message in fallbacks:
        warnings.warn(message, CropWarning, stacklevel=3)  # the caller's line (past @public)
    return maps


@public
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
    fields: Mapping[str, ReceptiveField] | None = None,
    channel_dim: int | Mapping[str, int] | None = None,
) -> torch.Tensor:
    """Project many units, of any layers, channels and examples, in few batched passes.

    Each result equals the one-unit call :func:`project` would give for it.

    Parameters
    ----------
    model
        As in :func:`project`.
    inputs
        ``(N, C, *spatial)``.
    units
        M :class:`featurelens.Unit` values; ``location=None`` means the arg-max of that
        channel on that unit's example (one truncated forward per example and layer, shared
        by all its units).
    method
        As in :func:`project`.
    rows
        The example of ``inputs`` each unit belongs to, ``(M,)`` integers. Default: unit ``i``
        belongs to example ``i`` (then M must equal N).
    crop, chunk_size, device, other_activations
        As in :func:`project`.
    fields
        Receptive fields the caller has already, by layer name: each as
        :func:`featurelens.receptive_field` ``(model, inputs.shape[1:], layer)`` returns it
        (``featurelens.receptive_fields(model, inputs.shape[1:])`` fits as it is: layers
        without units are ignored). Layers not in it get theirs computed when ``crop`` is on.
        Checked as ``field`` is in :func:`project`.
    channel_dim
        As in :func:`project`: one dim for every layer, or a mapping from layer names to
        dims (layers not in it take the traced layout).

    Returns
    -------
    torch.Tensor
        ``(M, C, *spatial)``: one map per unit, on ``inputs.device``.

    Raises
    ------
    LayerError, ValueError, TypeError, ActivationError, RuntimeError
        As in :func:`project`; also a unit that is not a :class:`featurelens.Unit`, and
        ``rows`` of the wrong length or out of range.

    Warns
    -----
    CropWarning
        As in :func:`project`, attributed to the line that called :func:`project_units`.

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
    targets = [
        _Target(
            out_row=i,
            row=r,
            layer=u.layer,
            channel=u.channel,
            location=u.location,
            label=f"units[{i}] (example {r})",
        )
        for i, (u, r) in enumerate(zip(units, row_list))
    ]
    context = _Context.create(
        model,
        x,
        method,
        crop=crop,
        chunk_size=chunk_size,
        device=device,
        other_activations=other_activations,
        fields=fields,
        channel_dim=channel_dim,
    )
    maps, fallbacks = _project(context, targets)
    for message in fallbacks:
        warnings.warn(message, CropWarning, stacklevel=3)  # the caller's line (past @public)
    return maps


# --------------------------------------------------------------------------------------------
# The call's context and its targets


@dataclass(frozen=True)
class _Context:
    """What every layer and every pass of one projection call shares.

    Built (and checked) once per public call by :meth:`create`; functions below take it as
    their first argument instead of a positional chain of its parts.

    Attributes
    ----------
    model
        The caller's model; in eval mode with frozen parameters while the call runs.
    inputs
        ``(N, C, *spatial)``, detached; never an inference tensor while the call runs.
    rule
        The rectifier rule of the method.
    device
        Where forwards and backwards run.
    crop
        Whether units are computed on receptive-field crops.
    chunk_size
        Units per pass; None: from :data:`AUTO_CHUNK_VALUES`.
    other_activations
        As in :func:`project`.
    fields
        Receptive fields given by the caller, by layer, checked against ``inputs``.
    channel_dims
        Channel dims stated by the caller (:meth:`stated_channel_dim`).
    signature
        The model's :func:`~featurelens.analysis.structure_signature`, read when the call
        starts (before any hook of ours): the key of its cached fields and layouts.
    """

    model: nn.Module
    inputs: torch.Tensor
    rule: Rule
    device: torch.device
    crop: bool
    chunk_size: int | None
    other_activations: str
    fields: Mapping[str, ReceptiveField]
    channel_dims: int | Mapping[str, int] | None = None
    signature: Hashable = ()

    @classmethod
    def create(
        cls,
        model: nn.Module,
        inputs: torch.Tensor,
        method: str | Rule,
        *,
        crop: bool,
        chunk_size: int | None,
        device: torch.device | str | None,
        other_activations: str,
        fields: Mapping[str, ReceptiveField] | None,
        channel_dim: int | Mapping[str, int] | None = None,
    ) -> _Context:
        """Check the call's options and bundle them; ``inputs`` checked by the caller."""
        rule = get_rule(method)
        check_other_activations(other_activations)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        where = torch.device(device) if device is not None else model_device(model, inputs.device)
        given = _check_fields(fields, tuple(inputs.shape[1:]))
        _check_channel_dims(channel_dim)
        signature = structure_signature(model)
        return cls(
            model, inputs, rule, where, bool(crop), chunk_size, other_activations, given,
            channel_dim, signature,
        )  # fmt: skip

    def stated_channel_dim(self, layer: str) -> int | None:
        """The channel dim the caller stated for ``layer``, or None (take the trace's)."""
        if isinstance(self.channel_dims, Mapping):
            return self.channel_dims.get(layer)
        return self.channel_dims

    @property
    def spatial(self) -> tuple[int, ...]:
        """The inputs' spatial shape."""
        return tuple(self.inputs.shape[2:])


def _check_channel_dims(channel_dim: object) -> None:
    """Refuse a ``channel_dim`` that is neither None, an integer, nor a mapping of layer names
    to integers (whether it fits a layer's output is checked per layer).
    """
    if channel_dim is None:
        return
    values = channel_dim.items() if isinstance(channel_dim, Mapping) else [("", channel_dim)]
    for layer, dim in values:
        if not isinstance(layer, str):
            raise TypeError(f"channel_dim maps layer names to dims, got the key {layer!r}")
        as_integer(dim, f"channel_dim{f' of layer {layer!r}' if layer else ''}")


def _check_fields(
    fields: Mapping[str, ReceptiveField] | None, input_shape: tuple[int, ...]
) -> dict[str, ReceptiveField]:
    """Receptive fields given by the caller; refused when not for inputs ``(C, *spatial)``."""
    if fields is None:
        return {}
    if not isinstance(fields, Mapping):
        raise TypeError(
            f"fields must map layer names to ReceptiveField values, got {type(fields).__name__}"
        )
    spatial = tuple(input_shape[1:])
    for layer, rf in fields.items():
        if not isinstance(rf, ReceptiveField):
            raise TypeError(
                f"the receptive field given for layer {layer!r} is a {type(rf).__name__}, not "
                "a featurelens.ReceptiveField"
            )
        if tuple(rf.input_shape) != spatial:
            raise UsageError(
                f"the receptive field given for layer {layer!r} was computed for inputs of "
                f"spatial shape {tuple(rf.input_shape)}, but these inputs are {spatial}: pass "
                f"receptive_field(model, {input_shape}, {layer!r}), or none"
            )
    return dict(fields)


@dataclass(frozen=True)
class _Target:
    """One unit to project, and where its map goes.

    Attributes
    ----------
    out_row
        Its row of the result.
    row
        Its example: a row of the inputs.
    layer, channel
        The unit's layer and channel.
    location
        Its location on the layer's output grid; None until the call finds the arg-max.
    label
        How messages name it: ``"example 3"``, ``"units[5] (example 2)"``.
    window
        The input crop it is computed on; None until its layer's crops are planned.
    """

    out_row: int
    row: int
    layer: str
    channel: int
    location: tuple[int, ...] | None
    label: str
    window: _Window | None = None

    @property
    def placed(self) -> tuple[tuple[int, ...], _Window]:
        """``(location, window)``, once both are known."""
        if self.location is None or self.window is None:
            raise AssertionError(f"{self.label} has no location or window yet")
        return self.location, self.window


class _Window(NamedTuple):
    """Where a crop lies in the input: ``start`` and ``size`` per spatial axis."""

    start: tuple[int, ...]
    size: tuple[int, ...]

    @classmethod
    def whole(cls, spatial: tuple[int, ...]) -> _Window:
        """The whole input of spatial shape ``spatial``."""
        return cls((0,) * len(spatial), tuple(spatial))

    @property
    def slices(self) -> tuple[slice, ...]:
        """Spatial slices of the input."""
        return _slices(self.start, self.size)


# --------------------------------------------------------------------------------------------
# Argument checks


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
    """Numpy arrays as tensors (ints stay ints, floats stay floats and are refused later)."""
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
        size, far, strides, pads = [], [], [], []
        for r, j, p, n in zip(rf.size, rf.stride, rf.padding, rf.input_shape):
            # a regular field (see _analyse): every axis has its (size, stride, padding)
            assert r is not None and j is not None and p is not None
            strides.append(j)
            pads.append(p)
            if j <= 0:
                size.append(n)
                far.append(n)
                continue
            # An interior unit's field starts at u*j - p, i.e. (-p) mod j past a multiple of j:
            # that much slack before it once the start is aligned down.
            need = min(r + (-p) % j, n)
            size.append(need)
            far.append(n - j * ((n - need) // j))  # n - far is a multiple of j
        return cls(tuple(size), tuple(far), tuple(strides), tuple(pads), rf.input_shape, rf)

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
        """The unit's location on the crop's grid (its own on the whole input, whatever the
        layer's rank).
        """
        if self.is_full:
            return location
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

    def layout(self, output: torch.Tensor) -> LayerLayout:
        """What the forward that produced ``output`` ``(1, K, *spatial_l)`` measured."""
        return LayerLayout(
            shape=tuple(output.shape[1:]),
            batch_statistics=self.batch_statistics,
            pools=tuple(self.pools),
            resampled=self.resampled,
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
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


def _hazards(layout: LayerLayout | _CropHazards, rf: ReceptiveField) -> list[str]:
    """Why crops would change a unit of a layer of ``layout`` and field ``rf`` (none: [])."""
    out = []
    if rf.statistics:
        out.append(f"the network normalises over positions before it ({', '.join(rf.statistics)})")
    if layout.resampled:
        out.append("the network resamples before it (F.interpolate), on a grid a crop changes")
    if layout.pools:
        out.append(
            "the network pools to a fixed size before it, which a crop would change "
            f"({', '.join(layout.pools)})"
        )
    return out


def _fallback(layer: str, why: str) -> str:
    """The text of a :class:`CropWarning`: ``layer`` was (partly) computed on the whole input."""
    return (
        f"projection of layer {layer!r} computed on the whole input (exact, slower): {why}. "
        "Pass crop=False to silence this warning."
    )


# --------------------------------------------------------------------------------------------
# One layer, as its cached analysis (or the probe forward) describes it


@dataclass(frozen=True)
class _Layer:
    """What projecting units of one layer needs to know of it.

    From the layer's :class:`~featurelens.analysis.LayerLayout` (what a probe forward of one
    example through the truncated model measured) and its receptive field, both kept across
    calls in :data:`featurelens.analysis.ANALYSES` per model structure, input shape and layer.

    Attributes
    ----------
    name
        Dotted layer name.
    channels
        Channels of its output (at its layout's channel dim).
    spatial
        Location shape of its output in its own rank (the dims but the batch and channel
        dims), ``()`` for ``(N, K)``.
    crops
        Where each unit's crop lies (:meth:`_Crop.full` when units are not cropped).
    chunk_size
        Units per pass: the call's, or 1 when the network uses batch statistics.
    fallback
        Why the layer is computed on the whole input although crops were asked for; ``""``
        when they are used or were not asked for.
    """

    name: str
    channels: int
    spatial: tuple[int, ...]
    crops: _Crop
    chunk_size: int | None
    fallback: str = ""


def _field(context: _Context, layer: str) -> tuple[ReceptiveField | None, str]:
    """The layer's receptive field (the caller's, else cached or computed), or None and why."""
    if layer in context.fields:
        return context.fields[layer], ""
    shape = tuple(context.inputs.shape[1:])

    def compute() -> tuple[ReceptiveField | None, str]:
        rf, why = try_receptive_field(context.model, shape, layer)
        return rf, "" if rf is not None else f"its receptive field cannot be computed ({why})"

    try:  # kept per model structure, input shape and layer; an error keeps nothing
        return ANALYSES.get(context.model, context.signature, ("field", shape, layer), compute)
    except LayoutError as exc:  # the layout is the caller's to state (see _layout)
        if context.stated_channel_dim(layer) is None:
            raise
        why = f"{type(exc).__name__}: {_first_line(exc)}"
        return None, f"its receptive field cannot be computed ({why})"


def _traced_layout(context: _Context, layer: str, rf: ReceptiveField | None) -> Layout | None:
    """The layout the trace gives the layer (a stated ``channel_dim`` checked against it), or
    None where the trace does not reach the layer (the model's path depends on values, an
    operation the engine does not know comes first): the probe's shape and the stated dim
    make it then (:func:`_stated_layout`).

    Raises
    ------
    LayoutError
        The trace reaches the layer but cannot tell its channel dim, and none is stated (the
        message says how to state it).
    UsageError
        The stated dim is not the traced one, or not a dim of the output.
    """
    stated = context.stated_channel_dim(layer)
    if rf is None and not context.crop:
        rf, _ = _field(context, layer)  # a LayoutError, unless stated, refuses the layer
    if rf is not None and rf.layout is not None:
        rf.layout.check_channel_dim(stated, layer)
        return rf.layout
    return None


def _stated_layout(context: _Context, layer: str, probe: torch.Tensor) -> Layout:
    """The layout of a layer the trace does not reach: the caller's ``channel_dim``, else dim
    1, as before layouts were traced (the documented gap: state ``channel_dim=``).
    """
    stated = context.stated_channel_dim(layer)
    return Layout.stated(tuple(probe.shape[1:]), 1 if stated is None else stated)


def _channels_first(run: Any, layer: str, layout: Layout) -> Any:
    """``run`` (of :func:`~featurelens.graph.capture`) with the layer's output moved to
    ``(N, C, *locations)`` (a view: gradients flow through it).
    """

    def channels_first(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {layer: layout.to_channels_first(run(x)[layer])}

    return channels_first


def _analyse(
    context: _Context,
    name: str,
    field: tuple[ReceptiveField | None, str],
    probe: torch.Tensor,
    hazards: _CropHazards,
    layout: Layout,
) -> _Layer:
    """The layer as measured by ``probe`` (its output for one example, channels first) and
    its ``field``.
    """
    shape = tuple(probe.shape[1:])
    if len(shape) < 1:
        raise ValueError(f"layer {name!r} outputs shape {(1, *shape)}: no channel axis")
    channels, spatial = shape[0], shape[1:]
    chunk_size = 1 if hazards.batch_statistics else context.chunk_size  # rows would mix
    if not context.crop or len(spatial) != len(context.spatial):
        return _Layer(name, channels, spatial, _Crop.full(context.spatial), chunk_size)
    input_shape = tuple(context.inputs.shape[1:])
    crops, why = plan_crop(
        name, spatial, input_shape, field, hazards, given=name in context.fields, layout=layout
    )
    return _Layer(name, channels, spatial, crops, chunk_size, fallback=why)


def plan_crop(
    layer: str,
    spatial: tuple[int, ...],
    input_shape: tuple[int, ...],
    field: tuple[ReceptiveField | None, str],
    hazards: _CropHazards,
    *,
    given: bool = False,
    layout: Layout | None = None,
) -> tuple[_Crop, str]:
    """The receptive-field crops of ``layer``, or the whole input and why.

    Shared by projections and :func:`featurelens.visualize` (both compute a unit on the crop
    that holds its field, with the network truncated at the layer).

    Parameters
    ----------
    layer
        The layer's name, for messages.
    spatial
        Its output's spatial shape, as a forward measured it (same rank as the input's).
    input_shape
        ``(C, *spatial)`` of the inputs.
    field
        ``(receptive field, "")``, or ``(None, why it cannot be computed)``.
    hazards
        What the forward to the layer ran (:class:`_CropHazards`, entered around it).
    given
        The field is the caller's: one whose output grid is not ``spatial`` is refused.
    layout
        The layer's layout (channels moved first by the caller); None: the field must be of a
        channels-first layer (checked).

    Returns
    -------
    tuple
        ``(crops, "")`` when units can be cropped, or their field is global (then ``crops``
        is :meth:`_Crop.full`); ``(_Crop.full(...), why)`` when they cannot be cropped.

    Raises
    ------
    UsageError
        A channels-last layer; a ``given`` field of another output grid.
    """
    whole = _Crop.full(tuple(input_shape[1:]))
    rf, why = field
    if rf is not None and layout is not None:
        if layout.axes != tuple((a,) for a in range(len(input_shape) - 1)):
            # crops go by input axis: a layer whose location dims are not the input's axes in
            # order (tokens over a grid, a transposed map) runs on the whole input
            return whole, ""
    elif rf is not None:  # without a layout (visualize): channels first, checked
        rf.check_channels_first(layer)
    if rf is not None:
        if tuple(rf.output_shape) != spatial and given:
            raise UsageError(
                f"the receptive field given for layer {layer!r} has the output grid "
                f"{tuple(rf.output_shape)}, but the layer outputs {spatial} on these inputs: "
                f"is it another layer's? Pass receptive_field(model, "
                f"{tuple(input_shape)}, {layer!r}), or none"
            )
        if rf.is_global:
            return whole, ""
        why = "; ".join(_hazards(hazards, rf))
        if rf.anchored:
            why = "; ".join(w for w in (why, "the network depends on absolute positions "
                                        f"before it ({', '.join(rf.anchored)})") if w)  # fmt: skip
        if not rf.exact:
            why = "; ".join(w for w in (why, f"its receptive field is over-approximated "
                                        f"({rf.note})") if w)  # fmt: skip
        if not rf.regular or rf.wraps:  # crops need one (size, stride, padding), unwrapped
            why = "its receptive field is irregular or wraps around the input (upsampling, "
            why += "circular padding): no crop is known to reproduce its units"
        if not why and tuple(rf.output_shape) != spatial:
            why = (
                f"its output's spatial shape {spatial} does not match the receptive-field "
                f"grid {rf.output_shape}"
            )
    if rf is None or why:  # without a field, why says why
        return whole, why
    return _Crop.for_field(rf), ""


def _check_target(target: _Target, layer: _Layer) -> None:
    if not 0 <= target.channel < layer.channels:
        raise ValueError(
            f"channel {target.channel} of {target.label} is out of range: layer "
            f"{layer.name!r} has {layer.channels} channels, valid 0..{layer.channels - 1}"
        )
    if target.location is not None:
        check_location(
            target.location, layer.spatial, f" of {target.label}", f"layer {layer.name!r} outputs"
        )


# --------------------------------------------------------------------------------------------
# Which errors mean "this shape is rejected"
#
# PyTorch types some errors, never the one we need most: a shape mismatch is a plain
# RuntimeError, like a dtype or device mismatch. So the types below pass through unchanged
# (an out-of-memory error retried on the whole input would only get worse), and for the rest
# the call's own forwards decide:
#
# * The probe is the first forward of inputs of this shape, dtype and device through this
#   model structure (one example, full size); a call that finds the layer's layout cached
#   (featurelens.analysis) runs none, the shape having been accepted before.
#   When it raises while nothing but the shape can be at fault -- the inputs have the dtype of
#   every floating parameter and buffer and go where all of them live -- the model rejects
#   the inputs' shape. Otherwise the error is the caller's to see as it is. (One blind spot:
#   PyTorch's CPU allocator reports running out of memory as a plain RuntimeError; on the
#   probe it reads as a rejected shape, with the allocator's message quoted and chained.)
# * Every later forward runs on inputs the probe accepted, so only a crop can be rejected: a
#   pass of crops that raises is retried on one crop alone, which is smaller than the probe
#   and differs from it in its spatial size only. When that crop is refused too, the model
#   rejects crops of that size and the layer falls back to the whole input; when it runs, the
#   failure was about the batch (memory, most likely) and the pass's error propagates as it is.

_NOT_ABOUT_SHAPE: tuple[type[BaseException], ...] = (
    torch.OutOfMemoryError,
    torch.AcceleratorError,  # a CUDA/MPS fault
    NotImplementedError,  # no kernel for this dtype or device
    FeaturelensError,
)


def _about_shape(exc: BaseException) -> bool:
    """Whether ``exc`` may mean a rejected shape: a RuntimeError of no more telling type."""
    return isinstance(exc, RuntimeError) and not isinstance(exc, _NOT_ABOUT_SHAPE)


def _only_the_shape_can_be_wrong(context: _Context) -> bool:
    """Whether the inputs match every floating parameter and buffer in dtype and device."""
    device = torch.empty(0, device=context.device).device  # "cuda" -> "cuda:0"
    dtype = context.inputs.dtype
    return all(
        t.dtype == dtype and t.device == device
        for t in (*context.model.parameters(), *context.model.buffers())
        if t.is_floating_point() or t.is_complex()
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _CropRejected(Exception):
    """The truncated model does not run on receptive-field crops."""


# --------------------------------------------------------------------------------------------
# The core


def _project(context: _Context, targets: list[_Target]) -> tuple[torch.Tensor, list[str]]:
    """The maps of ``targets`` (one row each) and the reasons some ran on the whole input."""
    fallbacks: list[str] = []
    with preserved(context.model), _grad_enabled():
        if context.inputs.is_inference():  # made under inference_mode: autograd cannot record it
            context = replace(context, inputs=context.inputs.clone())
        x = context.inputs
        # Created here, not under a caller's inference_mode, so that it can be written to.
        out = torch.zeros((len(targets), *x.shape[1:]), dtype=x.dtype, device=x.device)
        for layer in dict.fromkeys(t.layer for t in targets):
            resolve_layers(context.model, [layer])
            mine = [t for t in targets if t.layer == layer]
            fallbacks += _project_layer(context, layer, mine, out)
    return out, list(dict.fromkeys(fallbacks))


@contextlib.contextmanager
def _grad_enabled() -> Iterator[None]:
    # A caller inside torch.no_grad() or inference_mode() still gets gradients.
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _project_layer(
    context: _Context, name: str, targets: list[_Target], out: torch.Tensor
) -> list[str]:
    """Project the targets of one layer into their rows of ``out``; returns fallback texts."""
    # The field first: computing it runs the model, which must not meet capture's hooks.
    field = _field(context, name) if context.crop else (None, "")
    traced = _traced_layout(context, name, field[0])
    fallbacks = []
    with capture(context.model, [name]) as captured:
        # 1. One example through the truncated model: the layer's shape, errors for
        #    activations without a rule, operations a crop would change.
        probe_row = next((t.row for t in targets if t.location is None), targets[0].row)
        probe, hazards = _probe(context, captured, name, probe_row)
        layout = traced or _stated_layout(context, name, probe)
        run = _channels_first(captured, name, layout)
        probe = layout.to_channels_first(probe)
        layer = _analyse(context, name, field, probe, hazards, layout)
        measured = {probe_row: probe[0]}  # its example's arg-max needs no second forward
        if layer.fallback:
            why = layer.fallback
            if traced is None and context.stated_channel_dim(name) is None:
                # the trace did not reach the layer: its channel dim is assumed, and said so
                why += (
                    f"; its channels are read at dim 1 of its output {tuple(probe.shape)} (pass "
                    "channel_dim= if they are elsewhere)"
                )
            fallbacks.append(_fallback(name, why))
        for target in targets:
            _check_target(target, layer)

        # 2. Arg-max locations: one truncated forward per example, shared by all its units.
        targets = _find_locations(context, run, layer, targets, measured)

        # 3. Crops, then batched forward/backward passes.
        targets, missed = _place(context, layer, targets)
        if missed:
            fallbacks.append(_fallback(name, missed))
        try:
            _run_passes(context, run, layer, targets, out)
        except _CropRejected as exc:
            fallbacks.append(_fallback(name, str(exc)))
            whole = _Window.whole(context.spatial)
            _run_passes(context, run, layer, [replace(t, window=whole) for t in targets], out)
    return fallbacks


def _probe(context: _Context, run: Any, layer: str, row: int) -> tuple[torch.Tensor, _CropHazards]:
    """The layer's output ``(1, K, *spatial_l)`` for example ``row``, and what it ran."""
    hazards = _CropHazards()
    x = context.inputs[row : row + 1].to(context.device)
    try:
        with (
            torch.no_grad(),
            rule_mode(context.model, context.rule, context.other_activations),
            hazards,
        ):
            return run(x)[layer], hazards
    except RuntimeError as exc:
        if not (_about_shape(exc) and _only_the_shape_can_be_wrong(context)):
            raise
        raise UsageError(
            f"the model rejects inputs of shape {tuple(context.inputs.shape)}: {_first_line(exc)}"
        ) from exc


def _find_locations(
    context: _Context,
    run: Any,
    layer: _Layer,
    targets: list[_Target],
    measured: Mapping[int, torch.Tensor],
) -> list[_Target]:
    """``targets`` with every missing location set to its channel's first arg-max.

    One truncated forward per example, shared by all its targets; ``measured`` holds outputs
    ``(K, *spatial_l)`` already computed, by example (the probe's).
    """
    wanted: dict[int, list[int]] = {}  # example -> indices of its targets without a location
    for k, t in enumerate(targets):
        if t.location is None:
            wanted.setdefault(t.row, []).append(k)
    located = list(targets)

    def take(row: int, y: torch.Tensor) -> None:  # y: (K, *spatial_l) of one example
        for k in wanted[row]:
            t = targets[k]  # the first maximum, NaN ignored
            located[k] = replace(t, location=argmax_location(y[t.channel]))

    for row, y in measured.items():
        if row in wanted:
            take(row, y)
    rest = [r for r in wanted if r not in measured]
    step = layer.chunk_size or max(1, AUTO_CHUNK_VALUES // context.inputs[0].numel())
    with torch.no_grad():
        for lo in range(0, len(rest), step):
            part = rest[lo : lo + step]
            y = run(context.inputs[part].to(context.device))[layer.name]
            for i, row in enumerate(part):
                take(row, y[i])
    return located


def _place(context: _Context, layer: _Layer, targets: list[_Target]) -> tuple[list[_Target], str]:
    """``targets`` with their crop windows, and why some units' crops were not used."""
    crops = layer.crops
    whole = _Window.whole(context.spatial)
    placed, missed = [], []
    for t in targets:
        assert t.location is not None
        window = _Window(*crops.window(t.location))
        if not crops.holds(t.location, window):  # the crop arithmetic got it wrong: uncropped
            missed.append((t, window))
            window = whole
        placed.append(replace(t, window=window))
    if not missed:
        return placed, ""
    t, window = missed[0]
    assert t.location is not None and crops.field is not None
    return placed, (
        f"the crop {_show(window.slices)} of {t.label} at {t.location} does not hold its "
        f"receptive field {_show(crops.field.region(t.location))} (nor do the crops of "
        f"{len(missed) - 1} more units)"
    )


def _run_passes(
    context: _Context, run: Any, layer: _Layer, targets: list[_Target], out: torch.Tensor
) -> None:
    """Project ``targets`` in passes of crops of equal size, at most a chunk each."""
    groups: dict[tuple[int, ...], list[_Target]] = {}
    for t in targets:
        groups.setdefault(t.placed[1].size, []).append(t)
    channels = context.inputs.shape[1]
    for size, members in groups.items():
        step = layer.chunk_size or max(1, AUTO_CHUNK_VALUES // (channels * math.prod(size)))
        for lo in range(0, len(members), step):
            _run_pass(context, run, layer, members[lo : lo + step], out)


def _run_pass(
    context: _Context, run: Any, layer: _Layer, targets: list[_Target], out: torch.Tensor
) -> None:
    """One forward and one backward for ``targets`` (crops of equal size)."""
    x = context.inputs
    placed = [t.placed for t in targets]  # (location, window) per target
    slices = [window.slices for _, window in placed]
    crops = torch.stack([x[t.row][(slice(None), *sl)] for t, sl in zip(targets, slices)])
    crops = crops.to(context.device).requires_grad_(True)  # (m, C, *size)
    try:
        # The rule's mode around the forward only, as the probe: the bookkeeping and the
        # backward below have no rectifier to route.
        with rule_mode(context.model, context.rule, context.other_activations):
            y = run(crops)[layer.name]
    except RuntimeError as exc:
        if not _rejects_crops(context, run, layer.name, crops, exc):
            raise
        raise _CropRejected(
            f"the model rejects receptive-field crops of shape {tuple(crops.shape)} "
            f"({_first_line(exc)})"
        ) from exc
    local = [layer.crops.local(location, window.start) for location, window in placed]
    if any(not 0 <= u < n for loc in local for u, n in zip(loc, y.shape[2:])):
        raise _CropRejected(  # a geometry the receptive-field engine got wrong
            f"crops of shape {tuple(crops.shape)} give a {tuple(y.shape[2:])} grid that misses "
            "some units"
        )
    coords = torch.tensor(local, dtype=torch.long, device=y.device)
    index = (
        torch.arange(len(targets), device=y.device),
        torch.tensor([t.channel for t in targets], device=y.device),
        *coords.reshape(len(targets), len(layer.spatial)).T,
    )
    (grad,) = torch.autograd.grad(y[index].sum(), crops)
    grad = grad.to(out.device)
    for g, t, sl in zip(grad, targets, slices):
        out[t.out_row][(slice(None), *sl)] = g


def _rejects_crops(
    context: _Context, run: Any, layer: str, crops: torch.Tensor, exc: RuntimeError
) -> bool:
    """Whether a pass of ``crops`` failed with ``exc`` because of the crops' spatial size.

    The rule (see "Which errors mean ..." above): full-size inputs already ran in the probe,
    so they cannot be rejected; smaller crops are, when one of them alone fails too.
    """
    if not _about_shape(exc) or tuple(crops.shape[2:]) == context.spatial:
        return False
    try:
        with torch.no_grad():
            run(crops[:1].detach())
    except RuntimeError as again:
        if isinstance(again, _NOT_ABOUT_SHAPE):
            raise
        return True
    return False
