"""Exact, analytic receptive fields of every layer of a model, and the layout of its output.

Definitions follow Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional Neural
Networks", Distill 2019. On one spatial axis, a layer with effective ``size`` r, ``stride`` j and
``padding`` p maps output location ``u`` to the unclipped input interval
``[u*j - p, u*j - p + r - 1]``. A convolution or pooling with kernel k, stride s, padding q and
dilation d updates them by::

    r' = r + d*(k - 1)*j        j' = j*s        p' = p + q*j

Everything here is integer arithmetic per spatial axis (tuples, never x/y twins). Where branches
merge (add, multiply, concatenate) the fields are combined as the union of their intervals; they
are *aligned* when their centres coincide (Distill's alignment check). Branches with different
strides raise :class:`NotAlignedError`. Normalisation statistics do not count as dependencies
(norms keep the field), the same convention as :func:`featurelens.empirical_receptive_field`.
The field of a location is the union over the channels at that location (what the verifier's
gradient of the sum over channels sees).

Self-attention mixes every location it attends over: global attention (ViT) makes every later
field global, window attention (Swin) unites each window (window partitions are reshapes and
permutes, shifted windows ``torch.roll``; attention masks are ignored, as a masked score still
weighs its value a little). Where the exact field cannot be derived the engine over-approximates
and says so (:attr:`ReceptiveField.exact`), and an operation it does not know raises
:class:`UnsupportedOpError` naming it: the engine never guesses.

Beside the geometry, every location's exact bounds are tracked: each op says which locations
of its input every output location reads (:meth:`_Field.gather`; a sliding window is one case).
That is what makes upsampling exact: transposed convolutions, interpolation (read off
PyTorch's own kernel), pixel shuffle, adaptive pooling with unequal windows and attention
within windows read lists of locations that no single (size, stride, padding) describes. Those
axes are *irregular*: their geometry is None from there on (:attr:`ReceptiveField.regular`)
while :meth:`ReceptiveField.region` stays exact. Circular padding and ``torch.roll`` make a
border location read both ends of an axis: the bounds are then kept as an arc of the axis seen
as a circle too (:meth:`ReceptiveField.regions`).

How it runs: the model runs eagerly on a zero input of the concrete shape, so Python control
flow on shapes is followed; a ``TorchFunctionMode`` (:class:`_Tracer`) sees every top-level torch
call (functions, tensor methods, operators, indexing) and forward hooks (:func:`graph.module_calls`)
see every module call, and both dispatch to op tables: module classes in ``_MODULE_RULES`` (along
the MRO; a module with a rule is handled as a whole, the calls inside it are not looked at),
functions in ``_FUNCTION_RULES`` (by identity) and tensor methods and properties in
``_METHOD_RULES`` (by name). A rule holds a typed handler ``(call: _Call) -> field``, the number
of spatial dims the op works on, and the :class:`_Params` that bind the op's arguments to names
once per op kind, so that ``x.chunk(2, 1)``, ``x.chunk(2, dim=1)`` and ``torch.chunk(x, 2, 1)``
read the same ``dim``. The forward stops after the requested layer. Control flow on the
*values* of a tensor computed from the input (``if x.sum() > 0``, ``.item()``, ``nonzero``) is
refused: the zero input may take another path than real data.
"""

from __future__ import annotations

import html
import itertools
import linecache
import os
import sys
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from featurelens._public import public
from featurelens.errors import (
    LayerError,
    LayoutError,
    NotAlignedError,
    ReceptiveFieldError,
    TraceError,
    UnsupportedOpError,
    UsageError,
)
from featurelens.graph import (
    StopForward,
    Traced,
    check_input_shape,
    element_maker,
    get_layer,
    is_tensor_sequence,
    module_calls,
    preserved,
    rejected_shape,
    reused_message,
    sequence_message,
    trace,
    unwrap,
    zero_input,
)
from featurelens.unit import Layout, check_location

__all__ = [
    "Layout",
    "LayoutError",
    "NotAlignedError",
    "ReceptiveField",
    "ReceptiveFieldTable",
    "UnsupportedOpError",
    "layer_layout",
    "receptive_field",
    "receptive_fields",
    "try_receptive_field",
]


# --------------------------------------------------------------------------------------------
# The value


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one layer: Distill geometry per input axis, exact regions per location.

    Locations are in the layer's own rank (:attr:`output_shape`, one index per location dim of
    :attr:`layout`); the boxes they map to are on the input's spatial axes. Output location
    ``u`` whose coordinate on input axis ``a`` is ``c`` sees the unclipped interval
    ``[c*stride[a] - padding[a], c*stride[a] - padding[a] + size[a] - 1]`` on each *regular*
    axis.

    Attributes
    ----------
    size, stride, padding
        One entry per spatial axis of the input: an int where one Distill geometry describes
        the axis, ``None`` on an *irregular* axis (see :attr:`regular`). None is not a number
        on purpose: arithmetic on it fails loudly instead of computing a wrong crop.
    input_shape
        Spatial shape of the input the field was computed for.
    output_shape
        The layer output's location shape, in its own rank: the sizes of
        ``layout.location_dims``. ``(H', W')`` for a map ``(N, C, H', W')`` or ``(N, H', W',
        C)``, ``(T,)`` for tokens ``(N, T, C)``, ``(L', 1)`` for a signal the model unsqueezed
        to 2-D maps, ``()`` for logits ``(N, K)`` (their one location is ``()``).
    layout
        Which output dim holds the channels and which the locations, and which input axes
        each location dim indexes (:class:`featurelens.Layout`).
    is_global
        Every unit of the layer depends on the whole input (global pooling, flatten + linear,
        squeeze-and-excitation gating, global self-attention, ...); :meth:`region` then returns
        the whole input.
    aligned
        False where merged regular branches have different centres (Distill's alignment
        check), or where one location is broadcast over a map without seeing the whole input;
        the region is then the union of the branches' regions. Only judged between regular
        branches.
    bounds
        Exact input bounds ``(first, last)`` (inclusive) of every coordinate, per input axis;
        ``(0, -1)`` for a location that sees only padding. :meth:`region` reads them: away from
        the borders they equal the clipped Distill interval, at the borders they are exact
        where the formula is not (explicit pads, crops, dilated taps that skip pixels,
        reflected or replicated borders). They are bounding boxes: where a location sees both
        ends of an axis (circular padding, ``torch.roll``) they span the axis.
    prefix_bounds
        Per input axis, the bounds of the extra tokens before a token grid (a ViT's class
        token); ``()`` when the layer has none.
    statistics
        The operations before the layer that normalise over positions (GroupNorm,
        InstanceNorm, LayerNorm over spatial dims, BatchNorm with batch statistics). Their
        statistics do not count as dependencies (the empirical verifier agrees), but a unit
        computed on a crop of the input sees other statistics: projections do not crop then.
    anchored
        The operations before the layer whose result depends on absolute positions (window
        attention, ``torch.roll``, adding a position-dependent constant such as a position
        embedding): a crop of the input would move them, so projections do not crop then.
    exact
        False when the engine had to over-approximate (a region may be larger than the true
        one, never smaller); :attr:`note` says where. Treat such a field like a global one.
    note
        Why the field is not exact, or ``""``.
    arcs
        Where some location sees both ends of an axis (:attr:`wraps`): per axis and
        coordinate an arc of the axis, seen as a circle, that holds what the location reads,
        as ``(first, last)`` positions read modulo ``n`` (``(-1, 1)`` is positions ``n - 1``,
        0 and 1; the shortest such arc where the reads wrap as a circular border does).
        :meth:`regions` cuts them into boxes. Empty when nothing wraps.
    """

    size: tuple[int | None, ...]
    stride: tuple[int | None, ...]
    padding: tuple[int | None, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    is_global: bool = False
    aligned: bool = True
    bounds: tuple[tuple[tuple[int, int], ...], ...] = field(default=(), repr=False, compare=False)
    layout: Layout | None = field(default=None, repr=False)
    statistics: tuple[str, ...] = field(default=(), compare=False)
    anchored: tuple[str, ...] = field(default=(), compare=False)
    exact: bool = True
    note: str = field(default="", compare=False)
    prefix_bounds: tuple[tuple[int, int], ...] = field(default=(), repr=False, compare=False)
    arcs: tuple[tuple[tuple[int, int], ...], ...] = field(default=(), repr=False, compare=False)

    @property
    def channel_dim(self) -> int:
        """The output tensor's channel dim: 1 for ``(N, C, *spatial)``, the last for a
        channels-last map or tokens (see :attr:`layout`).
        """
        return 1 if self.layout is None else self.layout.channel_dim

    def check_channels_first(self, layer: str) -> None:
        """Refuse a layer whose output is not ``(N, C, *spatial)``.

        Raises
        ------
        UsageError
            The layer's channels are not at dim 1 (a ``ValueError``).
        """
        if self.channel_dim != 1:
            kind = self.layout.kind if self.layout is not None else ""
            what = (
                "tokens (N, T, C), a flattened grid of locations"
                if kind == "tokens"
                else "channels-last, e.g. after permute(0, 2, 3, 1)"
            )
            raise UsageError(
                f"layer {layer!r} outputs its channels at dim {self.channel_dim} ({what}); "
                "featurelens reads channels at dim 1 here: address a layer whose output is "
                "(N, C, *spatial), such as the block's output after the permute back"
            )

    @property
    def ndim(self) -> int:
        """Number of spatial axes of the input (the layer's own rank is
        ``len(output_shape)``).
        """
        return len(self.size)

    @property
    def regular(self) -> bool:
        """One Distill geometry (integer size, stride, padding) describes every axis.

        Regular means every op on the way is a sliding window (convolution, pooling, padding
        of any mode, crop, transposed convolution with stride 1, downsampling by an integer
        factor, adaptive pooling whose windows are one window: 7 -> 3) and the Distill
        interval of every location holds its exact bounds. Irregular axes have ``None`` for
        their size, stride and padding: past upsampling (transposed convolutions with stride
        > 1, interpolation to a larger size or by a non-integer factor, pixel shuffle) and
        adaptive pooling with windows of unequal size, from there on; and at a layer whose
        border locations read past their interval (a reflected border before the convolution
        that covers it, circular padding of a strided map whose length times its stride is
        not the input's). :meth:`interval` refuses an irregular axis; :meth:`region` and
        :meth:`regions` are exact on every axis (they read the per-location :attr:`bounds`).

        Past upsampling the axis stays irregular even where a later downsampling makes the
        bounds fit some geometry again: a crop of the input is only known to reproduce a unit
        when every op on its path is a sliding window, and projections crop by this geometry
        (they run on the whole input for irregular layers). An axis pooled to one location is
        regular again (its interval is its bounds). Integer-factor upsampling would have a
        *fractional* geometry (nearest x2 then a 3-wide convolution: stride 1/2, size 5/2,
        padding 1, the integers of ``[u/2 - 1, u/2 + 1/2]``), which is not reported: sizes,
        strides and paddings are ints.
        """
        return all(v is not None for v in (*self.size, *self.stride, *self.padding))

    @property
    def wraps(self) -> bool:
        """Some location sees both ends of an axis (circular padding, ``torch.roll``).

        :meth:`region` is then the bounding box of :meth:`regions`, which has one box per
        end.
        """
        return bool(self.arcs)

    def _check_location(self, location: Sequence[int] | int) -> tuple[int, ...]:
        return check_location(location, self.output_shape)

    def coordinates(self, location: Sequence[int] | int) -> tuple[int | None, ...]:
        """The coordinate of ``location`` on each input axis's grid of locations.

        None on the axes of an extra token (a class token), whose bounds are
        :attr:`prefix_bounds`. An axis no location dim indexes has coordinate 0 (the layer
        has pooled or flattened it away).

        Raises
        ------
        ValueError
            The location does not fit :attr:`output_shape`.
        """
        loc = self._check_location(location)
        coords: list[int | None] = [0] * self.ndim
        layout = self.layout
        if layout is None or layout.axes is None:
            return tuple(loc[: self.ndim]) + (0,) * max(0, self.ndim - len(loc))
        for u, axes, grid, prefix in zip(loc, layout.axes, layout.grid or (), layout.prefix):
            if u < prefix:
                for a in axes:
                    coords[a] = None
                continue
            for a, c in zip(axes, np.unravel_index(u - prefix, grid) if grid else ()):
                coords[a] = int(c)
        return tuple(coords)

    def interval(self, location: Sequence[int] | int) -> tuple[tuple[int, int], ...]:
        """Unclipped, inclusive ``(first, last)`` input positions per input axis for
        ``location`` (given in the layer's rank).

        Raises
        ------
        ReceptiveFieldError
            An axis is irregular (:attr:`regular`): no Distill interval describes it; use
            :meth:`region` or :meth:`regions`, which are exact.
        """
        coords = self.coordinates(location)
        if not self.regular:
            axes = [a for a, v in enumerate(zip(self.size, self.stride, self.padding))
                    if None in v]  # fmt: skip
            raise ReceptiveFieldError(
                f"the receptive field is irregular on axis {', '.join(map(str, axes))} (past "
                "upsampling, unequal adaptive pooling, window attention or a wrapped border): "
                "no (size, stride, padding) interval describes it. Use region(location) or "
                "regions(location), which are exact at every location"
            )
        out = []
        for axis, c in enumerate(coords):
            if c is None:
                out.append(self.prefix_bounds[axis])
                continue
            r, j, p = self.size[axis], self.stride[axis], self.padding[axis]
            assert r is not None and j is not None and p is not None  # regular, checked above
            out.append((c * j - p, c * j - p + r - 1))
        return tuple(out)

    def _box(self, coords: tuple[int | None, ...]) -> list[tuple[int, int]] | None:
        """Per input axis the inclusive bounding box of the field at ``coords``.

        See :meth:`coordinates`; None if it sees only padding.
        """
        if self.bounds:
            spans = [
                self.prefix_bounds[a] if c is None else self.bounds[a][c]
                for a, c in enumerate(coords)
            ]
        else:
            spans = [
                (max(a, 0), min(b, n - 1))
                for (a, b), n in zip(self.interval(self._location_of(coords)), self.input_shape)
            ]
        return None if any(last < first for first, last in spans) else spans

    def _location_of(self, coords: tuple[int | None, ...]) -> tuple[int, ...]:
        """The location whose coordinates are ``coords``.

        For fields without bounds only: one location dim per input axis.
        """
        return tuple(0 if c is None else c for c in coords)[: len(self.output_shape)]

    def _pieces(self, coords: tuple[int | None, ...]) -> list[list[tuple[int, int]]] | None:
        """Per input axis the disjoint inclusive pieces of the field at ``coords``.

        Its box, or on an axis where it wraps the two ends of its arc (each cut to the box);
        None if it sees only padding.
        """
        box = self._box(coords)
        if box is None:
            return None
        if not self.arcs:
            return [[span] for span in box]
        out: list[list[tuple[int, int]]] = []
        for axis, (arc, (low, high), n) in enumerate(zip(self.arcs, box, self.input_shape)):
            c = coords[axis]
            if c is None:  # an extra token: its box
                out.append([(low, high)])
                continue
            first, last = arc[c]
            shift = (first // n) * n  # ``first`` into [0, n)
            first, last = first - shift, last - shift
            if last < n or last - first + 1 >= n:  # one piece: no wrap, or the whole axis
                out.append([(low, high)])
            else:  # the arc's two ends, cut to the box (which holds the first and last read)
                out.append([(first, high), (low, last - n)])
        return out

    def region(self, location: Sequence[int] | int, clip: bool = True) -> tuple[slice, ...]:
        """Half-open input slices seen by ``location``: use as ``x[..., *rf.region(loc)]``.

        ``location`` is in the layer's own rank; the slices are one per input axis. Exact at
        every location: the bounding box of what the location reads (holes left by dilated
        taps are inside it). Where the field wraps around an axis (:attr:`wraps`) the box
        spans both ends; :meth:`regions` has the pieces. Empty slices for a location that sees
        only padding. With ``clip=False`` the slices are the unclipped Distill interval (they
        may start below 0 or end past the input: they describe the padded frame, not an index
        into ``x``), which needs a regular field. A global field returns the whole input.

        Raises
        ------
        ReceptiveFieldError
            ``clip=False`` on an irregular field (see :meth:`interval`).
        """
        coords = self.coordinates(location)
        if not clip:
            return tuple(slice(first, last + 1) for first, last in self.interval(location))
        box = self._box(coords)
        if box is None:
            return tuple(slice(0, 0) for _ in self.input_shape)
        return tuple(slice(first, last + 1) for first, last in box)

    def regions(self, location: Sequence[int] | int) -> list[tuple[slice, ...]]:
        """The exact field of ``location`` as disjoint boxes of half-open input slices.

        One box (equal to :meth:`region`) unless the field wraps around an axis (circular
        padding, ``torch.roll``): then one box per combination of pieces, up to ``2**ndim``;
        their union is what the location reads (up to dilation holes, as for
        :meth:`region`). An empty list for a location that sees only padding.
        """
        pieces = self._pieces(self.coordinates(location))
        if pieces is None:
            return []
        return [tuple(slice(a, b + 1) for a, b in box) for box in itertools.product(*pieces)]

    def _flags(self) -> list[str]:
        return [
            name
            for name, on in (
                ("global", self.is_global),
                ("unaligned", not self.aligned),
                ("irregular", not self.regular),
                ("wraps", self.wraps),
                ("over-approximated", not self.exact),
            )
            if on
        ]

    def __repr__(self) -> str:
        """Geometry, output shape, layout kind and flags (the bounds are left out)."""
        flags = self._flags()
        extra = f", flags={flags}" if flags else ""
        kind = self.layout.kind if self.layout is not None else ""
        layout = f", layout={kind!r}" if kind and kind != "channels_first" else ""
        return (
            f"ReceptiveField(size={self.size}, stride={self.stride}, padding={self.padding}, "
            f"output_shape={self.output_shape}{layout}{extra})"
        )

    def _repr_html_(self) -> str:
        def cell(v: int | None) -> str:
            return "irregular" if v is None else str(v)

        rows = "".join(
            f"<tr><td>{a}</td><td>{cell(r)}</td><td>{cell(j)}</td><td>{cell(p)}</td><td>{i}</td>"
            "</tr>"
            for a, (r, j, p, i) in enumerate(
                zip(self.size, self.stride, self.padding, self.input_shape)
            )
        )
        flags = ", ".join(self._flags())
        return (
            f"<p>output {'x'.join(map(str, self.output_shape)) or '()'}</p>"
            "<table><thead><tr><th>input axis</th><th>size</th><th>stride</th><th>padding</th>"
            f"<th>input</th></tr></thead><tbody>{rows}</tbody></table>"
            + (f"<p>{flags}</p>" if flags else "")
            + (f"<p>{self.note}</p>" if self.note else "")
        )


# --------------------------------------------------------------------------------------------
# Propagation state of one tensor


_EMPTY = np.iinfo(np.int64).max  # "first" of a location that depends on no input at all
_NOTHING = np.iinfo(np.int64).min  # its "last" (bounds may be negative: see ``_Field``)

# How an op maps an axis: a sliding window (kernel, stride, left padding, dilation). Ops that
# are one give it so that a regular field stays regular; ops that are not give None.
_Window: TypeAlias = tuple[int, int, int, int]

# Roles of a tensor dim (_Field.roles): what the layout of a layer output is made of.
_BATCH, _CHANNEL, _LOCATION = "batch", "channel", "location"

# One digit of an input axis's locations, held by a tensor dim: (axis, step, count). A location
# coordinate on ``axis`` is the sum of digit * step over the axis's digits; a whole axis of n
# locations is the one digit (axis, 1, n).
_Digit: TypeAlias = tuple[int, int, int]


@dataclass(frozen=True)
class _Loc:
    """A tensor dim that indexes locations other than one whole input axis.

    ``parts`` are digits ``(axis, step, count)``, most significant first: a flattened grid of
    axes 0 and 1 (tokens) is ``((0, 1, H), (1, 1, W))``; the window rows of a Swin window
    partition ``((0, 1, ws),)`` (the window's own rows) with ``((0, ws, H // ws),)`` on another
    dim. ``prefix`` extra tokens (a class token) come before the grid; they all see
    ``prefix_first[i]..prefix_last[i]`` on ``axes[i]`` (empty before any attention).
    """

    parts: tuple[_Digit, ...]
    prefix: int = 0
    prefix_first: tuple[int, ...] = ()
    prefix_last: tuple[int, ...] = ()

    @property
    def axes(self) -> tuple[int, ...]:
        """The input axes this dim's digits belong to, in order of first appearance."""
        return tuple(dict.fromkeys(a for a, _, _ in self.parts))

    def grid(self) -> tuple[int, ...]:
        """The digit counts, row-major."""
        return tuple(c for _, _, c in self.parts)


@dataclass(frozen=True)
class _Folded:
    """A dim whose locations were folded into the field: the attention scores ``q @ k^T``
    give score ``(i, j)`` the field of ``(i, all j)``. An over-approximation until an op mixes
    over this dim (softmax, a sum, a matmul contracting it), which makes it exact again.
    """

    of: int | _Loc


# What a tensor dim holds: an input axis (all its locations), a _Loc, a _Folded, or None
# (batch, channels, anything else).
_Label: TypeAlias = "int | _Loc | _Folded | None"


def _is_location(label: Any) -> bool:
    return isinstance(label, (int, _Loc)) and not isinstance(label, bool)


def _label_axes(label: Any) -> tuple[int, ...]:
    if isinstance(label, _Folded):
        return _label_axes(label.of)
    if isinstance(label, _Loc):
        return label.axes
    return () if label is None else (label,)


def _label_digits(label: Any, lengths: Sequence[int]) -> tuple[_Digit, ...]:
    if isinstance(label, _Loc):
        return label.parts
    if isinstance(label, int):
        return ((label, 1, lengths[label]),)
    return ()


def _label_of(digits: Sequence[_Digit], lengths: Sequence[int]) -> int | _Loc | None:
    """The label of a dim holding ``digits`` (count-1 digits dropped): an int for one whole
    axis, or a _Loc; the digits of one axis in a row that make the whole axis become one.
    """
    merged: list[_Digit] = []
    for a, s, c in digits:
        if c == 1:
            continue
        if merged and merged[-1][0] == a and merged[-1][1] == s * c:
            merged[-1] = (a, s, merged[-1][2] * c)  # (a, s*c, c1) then (a, s, c): one digit
        else:
            merged.append((a, s, c))
    if not merged:
        return None
    if len(merged) == 1 and merged[0][1] == 1 and merged[0][2] == lengths[merged[0][0]]:
        return merged[0][0]
    return _Loc(tuple(merged))


@dataclass(frozen=True, eq=False)
class _Field:
    """Receptive-field state of one tensor.

    ``dims[i]`` says what tensor dim ``i`` holds (a label: an input spatial axis, a
    :class:`_Loc` grid or digits of axes, a :class:`_Folded` dim, or None for batch, channel
    and other dims) and ``roles[i]`` its role in a layout (``"batch"``, ``"channel"``,
    ``"location"`` or None). Everything else is per input axis: the Distill geometry
    (``size``, ``stride``, ``padding``; None from an op that is no sliding window on, except
    on an axis left with one location), the number of locations (``lengths``; an axis that no
    tensor dim holds any more has length 1: it has been pooled or flattened away), the exact
    bounds of every location, twice, and the input's spatial shape (``extent``):

    * ``low[axis][u]``, ``high[axis][u]``: the bounding box of the input positions location
      ``u`` reads (inclusive, in ``[0, n)``);
    * ``first[axis][u]``, ``last[axis][u]``: an arc of the axis seen as a circle that holds
      them, as positions read modulo ``n``: circular padding and ``torch.roll`` give a
      location the far end of an axis as ``position - n`` (or ``+ n``), so that min and max
      over neighbouring locations still give the tightest arc; ``[-1, 1]`` is positions
      ``n - 1``, 0 and 1. Without wrapping both pairs are equal.

    A location that sees only padding has ``_EMPTY`` as its first/low and ``_NOTHING`` as its
    last/high.

    The geometry is what the layer does away from the borders; the bounds are exact everywhere,
    including border locations whose windows reach into padding, explicit pads and crops, and
    dilated windows whose taps skip the first input positions. A geometry is only reported
    where the Distill interval of every location holds its bounds (:meth:`reported`).

    The field is the union over a location's channels, as the verifier's is. ``uniform``
    says every channel of a location sees that same field: true after a convolution over all
    channels, false after ``pixel_unshuffle`` or a concatenation of branches that see
    different fields (each channel then sees its own part), until the next such convolution.
    Pixel shuffle, which moves channels to locations, needs it.

    A rule that changes the number of dims without setting ``roles`` gets roles None (its
    layout is then unknown, unless its rule has an ``ndim``: see :class:`_Tracer`).
    """

    dims: tuple[Any, ...]
    size: tuple[int | None, ...]
    stride: tuple[int | None, ...]
    padding: tuple[int | None, ...]
    lengths: tuple[int, ...]
    first: tuple[np.ndarray, ...]
    last: tuple[np.ndarray, ...]
    extent: tuple[int, ...]
    low: tuple[np.ndarray, ...] = ()
    high: tuple[np.ndarray, ...] = ()
    aligned: bool = True
    statistics: tuple[str, ...] = ()  # ops before it that normalise over positions
    uniform: bool = True  # every channel of a location sees the same field (see pixel shuffle)
    roles: tuple[str | None, ...] = ()
    notes: tuple[str, ...] = ()  # over-approximations made on the way
    anchored: tuple[str, ...] = ()  # ops before it that depend on absolute positions

    def __post_init__(self) -> None:
        if len(self.roles) != len(self.dims):
            object.__setattr__(self, "roles", (None,) * len(self.dims))

    @classmethod
    def identity(cls, spatial: tuple[int, ...]) -> _Field:
        """The field of the input itself: every location sees exactly its own position."""
        d = len(spatial)
        return cls(
            dims=(None, None) + tuple(range(d)),
            size=(1,) * d,
            stride=(1,) * d,
            padding=(0,) * d,
            lengths=tuple(spatial),
            first=tuple(np.arange(n, dtype=np.int64) for n in spatial),
            last=tuple(np.arange(n, dtype=np.int64) for n in spatial),
            extent=tuple(spatial),
            low=tuple(np.arange(n, dtype=np.int64) for n in spatial),
            high=tuple(np.arange(n, dtype=np.int64) for n in spatial),
            roles=(_BATCH, _CHANNEL) + (_LOCATION,) * d,
        )

    def _put(self, axis: int, **values: Any) -> _Field:
        changes = {}
        for name, v in values.items():
            t = getattr(self, name)
            changes[name] = t[:axis] + (v,) + t[axis + 1 :]
        return replace(self, **changes)

    def with_dims(self, dims: Sequence[Any], roles: Sequence[str | None]) -> _Field:
        """The same geometry with new ``dims`` and ``roles`` (one per tensor dim)."""
        return replace(self, dims=tuple(dims), roles=tuple(roles))

    def with_role(self, dim: int, role: str | None) -> _Field:
        """``roles[dim]`` set to ``role``."""
        roles = list(self.roles)
        roles[dim] = role
        return replace(self, roles=tuple(roles))

    def gather(
        self,
        axis: int,
        taps: np.ndarray,
        valid: np.ndarray | None = None,
        wrap: np.ndarray | None = None,
        window: _Window | None = None,
    ) -> _Field:
        """Each output location reads a list of locations of ``axis``: the general primitive.

        Parameters
        ----------
        axis
            The input axis.
        taps
            ``(n_out, k)`` ints: the locations of ``axis`` that output location ``u`` reads
            (``k`` is the most any location reads; pad the rest with anything and mark them
            in ``valid``).
        valid
            ``(n_out, k)`` bools: which taps count (default: those in ``[0, lengths[axis])``;
            the others read padding).
        wrap
            ``(n_out, k)`` ints, for circular padding: tap ``t`` reads its location's field
            moved by ``wrap * n`` input positions (``n`` the input's length), so that the far
            end of the axis lands beside the near one (see the class docstring).
        window
            ``(k, s, q, d)`` where the op is a sliding window on this axis (its taps are
            ``u*s - q + i*d``, whatever the padding reads): the Distill geometry is then
            updated, ``r + d*(k - 1)*j``, ``j*s``, ``p + q*j``. None: the axis has no geometry
            from here on (irregular), unless the op leaves one location.

        Returns
        -------
        _Field
            The output's field: on ``axis`` ``n_out`` locations whose bounds are the min and
            max over their valid taps' bounds (exact), and the updated geometry.
        """
        n_in = self.lengths[axis]
        taps = np.asarray(taps, dtype=np.int64)
        if valid is None:
            valid = (taps >= 0) & (taps < n_in)
        safe = np.clip(taps, 0, max(n_in - 1, 0))
        lo, hi = self.first[axis][safe], self.last[axis][safe]
        valid = valid & (hi >= lo)  # a tap that itself sees only padding adds nothing
        low = np.where(valid, self.low[axis][safe], _EMPTY).min(axis=1)
        high = np.where(valid, self.high[axis][safe], _NOTHING).max(axis=1)
        if wrap is not None:
            move = np.asarray(wrap, dtype=np.int64) * self.extent[axis]
            lo, hi = lo + np.where(valid, move, 0), hi + np.where(valid, move, 0)
        first = np.where(valid, lo, _EMPTY).min(axis=1)
        last = np.where(valid, hi, _NOTHING).max(axis=1)
        n_out = taps.shape[0]
        r, j, p = self.size[axis], self.stride[axis], self.padding[axis]
        if window is None or r is None or j is None or p is None:
            geometry: tuple[int | None, ...] = (None, None, None)
        else:
            k, s, q, d = window
            geometry = (r + d * (k - 1) * j, j * s, p + q * j)
        if n_out == 1 and geometry[0] is None and last[0] >= first[0]:
            # one location is always regular: its interval is its bounds
            geometry = (int(last[0] - first[0] + 1), 1, int(-first[0]))
        return self._put(
            axis,
            size=geometry[0],
            stride=geometry[1],
            padding=geometry[2],
            lengths=n_out,
            first=first,
            last=last,
            low=low,
            high=high,
        )

    def window(self, axis: int, k: int, s: int, q: int, d: int, n_out: int) -> _Field:
        """A sliding window (kernel k, stride s, left padding q, dilation d) on ``axis``.

        Also expresses explicit padding (k=1, q=left), crops and strided slices (k=1, q=-start,
        s=step) and broadcasting one location (s=0).
        """
        taps = np.arange(n_out, dtype=np.int64)[:, None] * s - q + np.arange(k) * d  # (n_out, k)
        return self.gather(axis, taps, window=(k, s, q, d))

    def collapse(self, axis: int) -> _Field:
        """Union over all locations of ``axis`` (global pooling, flatten)."""
        n = self.lengths[axis]
        # one output location: its stride is never used; keep the map's, not a surprising n*j
        return self.window(axis, n, 1, 0, 1, 1)

    def block(self, axis: int, step: int, count: int) -> _Field:
        """Every location of ``axis`` sees the union of its block: the ``count`` locations
        that differ from it in the digit ``(step, count)`` only (an attention over that digit:
        the whole axis for ``(1, n)``, a window of ``ws`` for ``(1, ws)``).

        The regions stay exact; the axis has no Distill geometry from here on (irregular),
        unless it has one location.
        """
        n = self.lengths[axis]
        if count <= 1:
            return self
        u = np.arange(n, dtype=np.int64)
        base = u - ((u // step) % count) * step
        members = base[:, None] + np.arange(count, dtype=np.int64) * step  # (n, count)
        return self.gather(axis, members)

    def pin(self, axis: int, first: int, last: int) -> _Field:
        """One location on ``axis`` that sees ``first..last`` (a class token's bounds; empty
        when ``last < first``).
        """
        empty = last < first
        lo = np.array([_EMPTY if empty else first], dtype=np.int64)
        hi = np.array([_NOTHING if empty else last], dtype=np.int64)
        return self._put(
            axis,
            size=1 if empty else last - first + 1,
            stride=1,
            padding=0 if empty else -first,
            lengths=1,
            first=lo,
            last=hi,
            low=lo,
            high=hi,
        )

    def widened(self, axis: int, first: int, last: int) -> _Field:
        """Every location of ``axis`` also sees ``first..last`` (inclusive, in ``[0, n)``);
        a geometry grows to the smallest one (same stride) whose intervals hold the bounds.
        """
        lo = np.minimum(self.first[axis], first)
        hi = np.maximum(self.last[axis], last)
        out = self._put(
            axis,
            first=lo,
            last=hi,
            low=np.minimum(self.low[axis], first),
            high=np.maximum(self.high[axis], last),
        )
        r, j, p = self.size[axis], self.stride[axis], self.padding[axis]
        if r is None or j is None or p is None:
            return out
        seen = hi >= lo
        u = np.arange(len(lo), dtype=np.int64) * j
        if seen.any():
            p = max(p, int((u - lo)[seen].max()))
            r = max(r, int((hi - u + p)[seen].max()) + 1)
        return out._put(axis, size=r, padding=p)

    def reported(self, axis: int) -> tuple[int | None, int | None, int | None]:
        """``(size, stride, padding)`` of ``axis`` as a :class:`ReceptiveField` states it.

        The geometry where its Distill interval holds every location's bounds; None where the
        axis has none, or where a border location reads past its interval (a reflected or
        wrapped border before the convolution that covers it).
        """
        r, j, p = self.size[axis], self.stride[axis], self.padding[axis]
        if r is None or j is None or p is None:
            return None, None, None
        if not _holds((r, j, p), self.first[axis], self.last[axis]):
            return None, None, None
        return r, j, p

    def sees_whole(self, axis: int) -> np.ndarray:
        """Per location of ``axis``: whether it sees every input position of the axis."""
        first, last = self.first[axis], self.last[axis]
        return (last >= first) & (last - np.minimum(first, last) + 1 >= self.extent[axis])

    def covers(self) -> bool:
        """Every location sees the whole input on every axis (extra tokens included)."""
        if not all(bool(self.sees_whole(axis).all()) for axis in range(len(self.extent))):
            return False
        for label in self.dims:
            if isinstance(label, _Loc) and label.prefix:
                for a, f, lst in zip(label.axes, label.prefix_first, label.prefix_last):
                    if f != 0 or lst != self.extent[a] - 1:
                        return False
        return True

    def noting(self, label: str) -> _Field:
        """The same field, recording an op that normalises over positions (``statistics``)."""
        return replace(self, statistics=tuple(dict.fromkeys((*self.statistics, label))))

    def approximated(self, why: str) -> _Field:
        """The same field, recording an over-approximation (``notes``)."""
        return replace(self, notes=tuple(dict.fromkeys((*self.notes, why))))

    def anchoring(self, what: str) -> _Field:
        """The same field, recording an op that depends on absolute positions (``anchored``)."""
        return replace(self, anchored=tuple(dict.fromkeys((*self.anchored, what))))

    def union(self, other: _Field) -> _Field:
        """Union of two fields over the same locations; a length-1 axis is broadcast.

        The tensor layout (``dims``, ``roles``) is the caller's business: this combines the
        geometry and the bounds per input axis. An irregular branch makes the axis irregular.

        Raises
        ------
        NotAlignedError
            Two regular fields have different strides on an axis with several locations.
        UnsupportedOpError
            The maps have different lengths, or the union is not one box per axis (see
            :meth:`_check_separable`). Messages name no op: the caller prefixes it.
        """
        out = self
        aligned = self.aligned and other.aligned
        for axis in range(len(self.lengths)):
            # per axis, ``big`` has the locations and ``small`` is either alike or broadcast
            big, small = (other, self) if self.lengths[axis] == 1 < other.lengths[axis] else (
                self, other)  # fmt: skip
            n, n_small = big.lengths[axis], small.lengths[axis]
            if n_small not in (n, 1):
                raise UnsupportedOpError(f"merges maps of lengths {n} and {n_small}")
            r, j, p = big.size[axis], big.stride[axis], big.padding[axis]
            ro, jo, po = small.size[axis], small.stride[axis], small.padding[axis]
            first = np.minimum(big.first[axis], small.first[axis])
            last = np.maximum(big.last[axis], small.last[axis])
            box = {
                "low": np.minimum(big.low[axis], small.low[axis]),
                "high": np.maximum(big.high[axis], small.high[axis]),
            }
            if None in (r, j, p, ro, jo, po):
                out = out._put(
                    axis, size=None, stride=None, padding=None, lengths=n, first=first,
                    last=last, **box,
                )  # fmt: skip
                continue
            assert r is not None and j is not None and p is not None  # for the type checker
            assert ro is not None and jo is not None and po is not None
            if n > 1 and (n_small == 1 or (0 in (j, jo) and j != jo)):
                # One location reaches every location of the map (squeeze-and-excitation
                # gating, strip pooling; a pooled branch upsampled back, as in ASPP: stride 0):
                # the smallest geometry whose interval holds, at every location, both the
                # map's interval and that location's fixed one.
                if j == 0 and n_small == n:  # ``big`` is the repeated one
                    (r, j, p), (ro, jo, po), small = (ro, jo, po), (r, j, p), big
                pad = max(p, (n - 1) * j + po)
                size = pad + max(r - p, ro - po)
                if not small.sees_whole(axis).all():
                    aligned = False
                out = out._put(
                    axis, size=size, stride=j, padding=pad, lengths=n, first=first, last=last,
                    **box,
                )  # fmt: skip
                continue
            if j != jo and n > 1:
                raise NotAlignedError(
                    f"branches merge with different effective strides on axis {axis} ({j} and "
                    f"{jo}); no single receptive-field geometry. Use "
                    "featurelens.empirical_receptive_field for these layers."
                )
            pad = max(p, po)
            size = max(r - p, ro - po) + pad
            out = out._put(
                axis, size=size, stride=j, padding=pad, lengths=n, first=first, last=last, **box
            )
            if (r - 1) - 2 * p != (ro - 1) - 2 * po:
                aligned = False
        self._check_separable(other, out)
        return replace(
            out,
            aligned=aligned,
            statistics=tuple(dict.fromkeys(self.statistics + other.statistics)),
            notes=tuple(dict.fromkeys(self.notes + other.notes)),
            anchored=tuple(dict.fromkeys(self.anchored + other.anchored)),
            uniform=self.uniform and other.uniform,  # each channel: the union of its inputs
        )

    def _empty_axes(self) -> list[int]:
        """Axes with a location that sees only padding."""
        return [ax for ax in range(len(self.lengths)) if (self.last[ax] < self.first[ax]).any()]

    def _check_separable(self, other: _Field, out: _Field) -> None:
        """Refuse a union whose per-axis bounds would not be exact.

        Per-axis bounds stay exact through a union unless a branch sees only padding at some
        locations where the other branch reaches further on another axis: then the union's
        bounding box differs between locations in a way one table per axis cannot hold.
        """
        empty = {id(self): self._empty_axes(), id(other): other._empty_axes()}
        ok = True
        for x, y in ((self, other), (other, self)):
            for e in empty[id(x)]:
                n_e = out.lengths[e]
                x_empty = np.broadcast_to(x.last[e] < x.first[e], (n_e,))
                y_empty = np.broadcast_to(y.last[e] < y.first[e], (n_e,))
                if not (x_empty & ~y_empty).any():
                    continue  # wherever x sees nothing, y sees nothing either
                # there the union is y alone: fine if y alone equals the union on other axes
                if any(f != e for f in empty[id(y)]):
                    ok = False
                for ax in range(len(out.lengths)):
                    if ax != e:
                        n = out.lengths[ax]
                        ok = (
                            ok
                            and all(
                                np.array_equal(
                                    np.broadcast_to(getattr(y, b)[ax], (n,)), getattr(out, b)[ax]
                                )
                                for b in ("first", "last", "low", "high")
                            )  # fmt: skip
                        )
        if not ok:
            raise UnsupportedOpError(
                "merges a branch whose border locations see only padding with a branch that "
                "reaches further; the union is not one box per axis there (not supported yet). "
                "Use featurelens.empirical_receptive_field for this layer."
            )

    def same_as(self, other: _Field) -> bool:
        """Equal dims, roles, geometry and bounds (is an in-place update a no-op?)."""
        if self is other:
            return True
        return (
            self.dims == other.dims
            and self.roles == other.roles
            and (self.size, self.stride, self.padding, self.lengths)
            == (other.size, other.stride, other.padding, other.lengths)
            and all(
                np.array_equal(a, b)
                for name in ("first", "last", "low", "high")
                for a, b in zip(getattr(self, name), getattr(other, name))
            )
            and self.uniform == other.uniform
        )


def _holds(geometry: tuple[int, int, int], first: np.ndarray, last: np.ndarray) -> bool:
    """Whether the Distill interval of ``(size, stride, padding)`` holds every location's
    bounds (locations that see only padding hold trivially).
    """
    r, j, p = geometry
    start = np.arange(len(first), dtype=np.int64) * j - p
    seen = last >= first
    return bool(((first >= start) & (last <= start + r - 1) | ~seen).all())


# What a rule returns: the field of the op's output; a tuple of them for an op that returns
# several tensors (split, max pooling with indices: None for the indices); None when the
# output does not depend on the input's positions at all (shape queries).
_Out: TypeAlias = _Field | tuple[_Field | None, ...] | None


# --------------------------------------------------------------------------------------------
# Labels: what merges, folds and mixes do to the dims that hold locations


def _merge_labels(a: Any, b: Any, where: Callable[[], str]) -> Any:
    """The label of one output dim that two inputs both put a label on."""
    if a is None:
        return b
    if b is None or a == b:
        return a
    if isinstance(a, _Loc) and isinstance(b, _Loc) and (a.parts, a.prefix) == (b.parts, b.prefix):
        return replace(
            a,
            prefix_first=tuple(min(x, y) for x, y in zip(a.prefix_first, b.prefix_first)),
            prefix_last=tuple(max(x, y) for x, y in zip(a.prefix_last, b.prefix_last)),
        )
    raise UnsupportedOpError(f"{where()}: combines different spatial axes in one dim")


def _merge_roles(a: str | None, b: str | None) -> str | None:
    if a is None or a == b:
        return b
    return a if b is None else None


def _prefix_union(f: _Field, label: _Loc) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per axis of ``label``: the union of every location's bounds and the prefix bounds."""
    firsts, lasts = [], []
    for i, a in enumerate(label.axes):
        first = int(f.low[a].min()) if f.lengths[a] else _EMPTY
        last = int(f.high[a].max()) if f.lengths[a] else -1
        if label.prefix:
            first, last = min(first, label.prefix_first[i]), max(last, label.prefix_last[i])
        firsts.append(first)
        lasts.append(last)
    return tuple(firsts), tuple(lasts)


def _with_prefix_bounds(
    f: _Field, label: _Loc, first: Sequence[int], last: Sequence[int]
) -> _Field:
    """The grid locations of ``label``'s axes also see the box ``first..last``."""
    out = f
    for a, lo, hi in zip(label.axes, first, last):
        if hi < lo:
            continue
        out = out.widened(a, lo, hi)
    return out


def _mix(f: _Field, label: Any) -> tuple[_Field, Any]:
    """Every location of ``label``'s dim sees all the others (self-attention over it): the
    field and the dim's new label (its prefix tokens see everything too).
    """
    if isinstance(label, int) and not isinstance(label, bool):
        return f.block(label, 1, f.lengths[label]), label
    if not isinstance(label, _Loc):
        return f, label
    if label.prefix:
        first, last = _prefix_union(f, label)
    out = f
    for a, s, c in label.parts:
        out = out.block(a, s, c)
    if any(s * c != f.lengths[a] or s != 1 for a, s, c in label.parts):
        out = out.anchoring("attention within windows (a partition of the map into blocks)")
    if label.prefix:
        out = _with_prefix_bounds(out, label, first, last)
        label = replace(label, prefix_first=first, prefix_last=last)
    return out, label


def _fold(
    f: _Field, dims: Sequence[Any], dim: int, where: Callable[[], str]
) -> tuple[_Field, list[Any]]:
    """Pool away the locations of tensor dim ``dim`` (a sum, a mean, a contraction over it):
    the field and the new labels of every dim (the folded one becomes None).

    A whole axis is collapsed; a digit of an axis (a window's rows) is pooled like a strided
    window, and the other digits of that axis move down. Prefix tokens' bounds join the union.
    """
    label = dims[dim]
    labels = list(dims)
    labels[dim] = None
    if isinstance(label, _Folded):
        return f, labels  # already folded in: the op makes it exact
    if isinstance(label, int) and not isinstance(label, bool):
        return f.collapse(label), labels
    if not isinstance(label, _Loc):
        return f, labels
    out, labels = _fold_digits(f, labels, list(label.parts), where)
    if label.prefix:
        for a, lo, hi in zip(label.axes, label.prefix_first, label.prefix_last):
            if hi >= lo:
                out = out.widened(a, lo, hi)
    return out, labels


def _fold_digits(
    f: _Field, labels: list[Any], digits: list[_Digit], where: Callable[[], str]
) -> tuple[_Field, list[Any]]:
    """Pool away ``digits`` (no longer held by any dim in ``labels``) from the field, moving
    the other digits of their axes (held by ``labels``) down.

    An innermost digit (step 1) pools like a window of its count with that stride, an
    outermost one like a dilated window; a digit between others cannot be pooled exactly and
    the whole axis is taken (said in the field's notes).
    """
    out = f
    for axis in dict.fromkeys(a for a, _, _ in digits):
        gone = sorted(((s, c) for a, s, c in digits if a == axis), reverse=True)
        # (dim, position in its label, step, count) of the digits of ``axis`` that stay
        kept = [
            (i, k, s, c)
            for i, label in enumerate(labels)
            if _is_location(label)
            for k, (a, s, c) in enumerate(_label_digits(label, out.lengths))
            if a == axis
        ]
        old = {i: list(_label_digits(labels[i], out.lengths)) for i, _, _, _ in kept}
        n = out.lengths[axis]
        if not kept:  # every location of the axis pooled: the map's stride is kept
            out = out.collapse(axis)
            continue
        exact = True
        while gone:
            smallest = min([s for s, _ in gone] + [s for _, _, s, _ in kept])
            if gone[-1][0] == smallest == 1:  # innermost: a window of c with stride c
                s, c = gone.pop()
                out = out.window(axis, c, c, 0, 1, n // c)
                gone = [(st // c, ct) for st, ct in gone]
                kept = [(i, k, st // c, ct) for i, k, st, ct in kept]
            elif gone[0][0] * gone[0][1] == n:  # outermost: a dilated window over the others
                s, c = gone.pop(0)
                out = out.window(axis, c, 1, 0, s, n // c)
            else:
                exact = False
                break
            n //= c
        if not exact:
            out = out.collapse(axis)
            if not exact:
                out = out.approximated(
                    f"{where()} pools a middle digit of input axis {axis}'s locations; "
                    "over-approximated by the whole axis"
                )
            for i in old:
                labels[i] = _label_of([d for d in old[i] if d[0] != axis], out.lengths)
            continue
        for i, k, s, c in kept:
            old[i][k] = (axis, s, c)
        for i, digits_i in old.items():
            new = _label_of(digits_i, out.lengths)
            label = labels[i]
            if isinstance(label, _Loc) and label.prefix and isinstance(new, _Loc):
                new = replace(new, prefix=label.prefix, prefix_first=label.prefix_first,
                              prefix_last=label.prefix_last)  # fmt: skip
            labels[i] = new
    return out, labels


# --------------------------------------------------------------------------------------------
# One operation, as a rule sees it


_M = TypeVar("_M", bound=nn.Module)

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _source_line() -> str:
    """``" at <file>:<n>: <code>"`` of the innermost frame of the model's own code
    (outside torch and featurelens) on the current stack, or ``""``.
    """
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith((_TORCH_DIR, _OWN_DIR)) and not filename.startswith("<"):
            code = linecache.getline(filename, frame.f_lineno).strip()
            return f" at {filename}:{frame.f_lineno}: {code}"
        frame = frame.f_back
    return ""


@dataclass(frozen=True)
class _Call:
    """One call of the model's forward, handed to the rule of its op.

    Attributes
    ----------
    op
        The ``nn.Module`` instance, the function, or the tensor method's (or property's) name.
    args
        The call's arguments by name (bound once per op kind by the rule's :class:`_Params`,
        so positional and keyword forms agree). Empty for modules without params: their rules
        read the module's attributes (:meth:`module`).
    inputs
        ``(field, value)`` of every argument that carries a field, in argument order; the
        first is the op's main input (:attr:`field`, :attr:`x`).
    result
        What the op returned: a tensor, or a tuple (split, pooling with indices).
    ndim
        The number of trailing spatial dims the op works on, from its table entry (``conv2d``:
        2); None for ops that are not tied to one.
    input_shape
        The model's ``(C, *spatial)`` input shape (for messages).
    kind
        ``"module"``, ``"function"``, ``"method"`` (tensor methods and operators: ``x + y`` is
        ``Tensor.add``) or ``"property"`` (``x.mT``).
    name
        A module's dotted name in the model (``""`` otherwise).
    constants
        The tensor arguments that carry no field (constants of the model: parameters,
        buffers, tensors it creates).
    """

    op: Any
    args: Mapping[str, Any]
    inputs: tuple[tuple[_Field, torch.Tensor], ...]
    result: Any
    ndim: int | None
    input_shape: tuple[int, ...]
    kind: str = "function"
    name: str = ""
    constants: tuple[torch.Tensor, ...] = ()

    @property
    def field(self) -> _Field:
        """The field of the main input."""
        return self.inputs[0][0]

    @property
    def x(self) -> torch.Tensor:
        """The value of the main input."""
        return self.inputs[0][1]

    @property
    def output(self) -> torch.Tensor:
        """The output tensor (the first element when the op returns a tuple)."""
        out = self.result[0] if isinstance(self.result, (tuple, list)) else self.result
        if not isinstance(out, torch.Tensor):
            raise self.unsupported("returns a non-tensor")
        return out

    def field_of(self, value: Any) -> _Field | None:
        """The field of the argument ``value`` (by identity), None for a constant."""
        for f, x in self.inputs:
            if x is value:
                return f
        return None

    def module(self, kind: type[_M]) -> _M:
        """The called module, checked to be a ``kind`` (the rule's table entry says so)."""
        if not isinstance(self.op, kind):
            raise TypeError(f"{self.where()}: the rule for {kind.__name__} got another op")
        return self.op

    def kernel_dims(self) -> int:
        """The number of spatial dims the op slides over (from its table entry)."""
        if self.ndim is None:
            raise TypeError(f"{self.where()}: its rule has no ndim in the op table")
        return self.ndim

    def title(self) -> str:
        """``"Conv2d module 'features.0'"``, ``"Tensor.chunk()"``, ``"torch.roll()"``."""
        if self.kind == "module":
            return f"{type(self.op).__name__} module {self.name!r}"
        if self.kind == "method":
            return f"Tensor.{self.op}()"
        if self.kind == "property":
            return f"Tensor.{self.op}"
        mod = getattr(self.op, "__module__", "") or ""
        return f"{mod + '.' if mod else ''}{getattr(self.op, '__name__', self.op)}()"

    def where(self) -> str:
        """The op and its source line in the model's code, for messages."""
        line = _source_line()
        return f"{self.title()} ({line.strip()})" if line else self.title()

    def unsupported(self, why: str = "") -> UnsupportedOpError:
        """The error for this call: ``where: why`` (``why`` defaults to "not supported yet")."""
        return UnsupportedOpError(f"{self.where()}: {why or _UNSUPPORTED_HINT}")


# A rule's handler: the field of the call's output. It raises UnsupportedOpError (through
# ``call.unsupported``) or NotAlignedError where there is no exact field, and UsageError where the
# input shape does not fit the op.
_Handler: TypeAlias = Callable[[_Call], _Out]

# PyTorch accepts NumPy's keyword spellings on its builtins (x.sum(axis=1, keepdims=True)).
_KEYWORD_ALIASES = {"axis": "dim", "keepdims": "keepdim"}


@dataclass(frozen=True)
class _Params:
    """How the arguments of one op kind bind to names, shared by its function and method forms.

    A tensor method gets the tensor as its first positional argument, so
    ``torch.chunk(x, 2, 1)`` and ``x.chunk(2, 1)`` bind alike with ``("input", "chunks",
    "dim")``.

    Attributes
    ----------
    names
        Positional parameters in order, the tensor first.
    defaults
        Values of parameters the call may leave out.
    rest
        Name under which positional arguments after ``names`` are gathered, as a tuple
        (``x.permute(0, 2, 3, 1)``, also ``x.permute((0, 2, 3, 1))``).
    aliases
        Other keyword spellings of a parameter (``axis0`` for ``dim0``).
    """

    names: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    rest: str | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """``{name: value}`` for one call's positional ``args`` and keyword ``kwargs``."""
        bound = dict(self.defaults)
        bound.update(zip(self.names, args))
        extra = tuple(args[len(self.names) :])
        if self.rest is not None and extra:
            whole = len(extra) == 1 and isinstance(extra[0], (list, tuple))
            bound[self.rest] = tuple(extra[0]) if whole else extra
        for key, value in kwargs.items():
            key = self.aliases.get(key, key)
            bound[_KEYWORD_ALIASES.get(key, key)] = value
        return bound


@dataclass(frozen=True)
class _Rule:
    """The receptive-field rule of one op: a table entry.

    Attributes
    ----------
    handler
        Computes the output's field from a :class:`_Call`.
    ndim
        Spatial dims the op works on (``nn.Conv3d``: 3), for ops tied to one. Its output is
        then ``(N, C, *ndim locations)``, which sets the roles of its dims.
    params
        How a function's or method's arguments (or a module's forward arguments) bind to
        names (None: the rule reads none, or reads a module's attributes).
    """

    handler: _Handler
    ndim: int | None = None
    params: _Params | None = None


def _ntuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return tuple(int(v[0]) for _ in range(n))
        return tuple(int(x) for x in v)
    return tuple(int(v) for _ in range(n))


def _with_indices(call: _Call, out: _Field) -> _Out:
    """``out`` as the op's result: ``(out, None)`` where the op also returns indices."""
    return (out, None) if isinstance(call.result, tuple) else out


# --------------------------------------------------------------------------------------------
# Rules: sliding windows (convolution, pooling) and padding


def _kernel_axes(call: _Call) -> list[int | None]:
    """Input axes held by the last ``ndim`` tensor dims (the dims a kernel slides over)."""
    d, f, x = call.kernel_dims(), call.field, call.x
    if x.dim() != d + 2:
        raise UsageError(
            f"{call.where()} works on (N, C, {d} spatial dims) but gets a tensor of shape "
            f"{tuple(x.shape)}: input_shape {tuple(call.input_shape)} must be (C, *spatial) with "
            "the spatial dims this layer expects"
        )
    axes = list(f.dims[-d:])
    for i, a in enumerate(axes):
        dim = x.dim() - d + i
        if a is None:
            size = x.shape[dim]
            if size != 1:
                raise call.unsupported(
                    f"slides a window over tensor dim {dim} (size {size}), which is "
                    "not a spatial axis of the input (channels or a flattened dim)"
                )
        elif not _is_location(a) or isinstance(a, _Loc):
            raise call.unsupported(
                f"slides a window over tensor dim {dim}, which holds a flattened grid of "
                "locations (tokens) or part of one; reshape it back to (N, C, *spatial) first"
            )
    return axes


def _slide(
    call: _Call,
    kernel: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    field: _Field | None = None,
) -> _Out:
    """A window of ``kernel`` (stride, padding, dilation) over the last ``ndim`` dims.

    ``field`` is the main input's field, if not :attr:`_Call.field` (a convolution that pads
    with a mode of its own first).
    """
    d = call.kernel_dims()
    k = _ntuple(kernel, d)
    s = _ntuple(stride if stride is not None else kernel, d)
    dil = _ntuple(dilation, d)
    if isinstance(padding, str):
        if padding == "valid":
            q = (0,) * d
        elif padding == "same":
            q = tuple(di * (ki - 1) // 2 for ki, di in zip(k, dil))
        else:
            raise call.unsupported(f"padding {padding!r}")
    else:
        q = _ntuple(padding, d)
    axes = _kernel_axes(call)
    result = call.output
    out = call.field if field is None else field
    for i, axis in enumerate(axes):
        if axis is not None:
            out = out.window(axis, k[i], s[i], q[i], dil[i], result.shape[result.dim() - d + i])
    return _with_indices(call, out)


def _mixing(out: _Out, groups: Any) -> _Out:
    """A convolution's field: with one group every output channel reads every input channel,
    so all channels of a location see the same field again (``_Field.uniform``).
    """
    if isinstance(out, _Field) and int(groups) == 1:
        return replace(out, uniform=True)
    return out


def _conv_module(call: _Call) -> _Out:
    m = call.module(nn.modules.conv._ConvNd)
    if m.padding_mode == "zeros":
        return _mixing(_slide(call, m.kernel_size, m.stride, m.padding, m.dilation), m.groups)
    # PyTorch pads first, F.pad(x, _reversed_padding_repeated_twice, padding_mode), then
    # convolves without padding.
    padded = _padded(call, m._reversed_padding_repeated_twice, m.padding_mode)
    return _mixing(_slide(call, m.kernel_size, m.stride, 0, m.dilation, field=padded), m.groups)


def _conv_function(call: _Call) -> _Out:
    a = call.args
    out = _slide(call, tuple(a["weight"].shape[2:]), a["stride"], a["padding"], a["dilation"])
    return _mixing(out, a.get("groups") or 1)


def _max_pool_module(call: _Call) -> _Out:
    m = call.module(nn.modules.pooling._MaxPoolNd)
    return _slide(call, m.kernel_size, m.stride, m.padding, m.dilation)


def _avg_pool_module(call: _Call) -> _Out:
    m = call.module(nn.modules.pooling._AvgPoolNd)
    return _slide(call, m.kernel_size, m.stride, m.padding, 1)


def _lp_pool_module(call: _Call) -> _Out:
    m = call.module(nn.modules.pooling._LPPoolNd)
    return _slide(call, m.kernel_size, m.stride, 0, 1)


def _pool_function(call: _Call) -> _Out:
    a = call.args
    stride = a["stride"] or a["kernel_size"]  # None, or [] from torch.max_pool2d
    return _slide(call, a["kernel_size"], stride, a["padding"], a["dilation"])


def _adaptive_pool(call: _Call) -> _Out:
    """Adaptive pooling: output ``u`` of ``m`` pools input ``floor(u*n/m)`` to
    ``ceil((u+1)*n/m) - 1`` (PyTorch's windows; global when ``m`` is 1).
    """
    d = call.kernel_dims()
    axes = _kernel_axes(call)
    x, result = call.x, call.output
    out = call.field
    for i, axis in enumerate(axes):
        if axis is None:
            continue
        n_in = x.shape[x.dim() - d + i]
        n_out = result.shape[result.dim() - d + i]
        if n_out == 1:
            out = out.collapse(axis)
        elif n_in == 1:
            out = out.window(axis, 1, 0, 0, 1, n_out)  # one location, repeated
        elif n_in % n_out == 0:
            k = n_in // n_out
            out = out.window(axis, k, k, 0, 1, n_out)
        else:  # windows of unequal size (or overlapping ones): exact per location
            u = np.arange(n_out, dtype=np.int64)
            start = (u * n_in) // n_out
            end = -((-(u + 1) * n_in) // n_out)  # exclusive
            taps = start[:, None] + np.arange(int((end - start).max()))
            out = out.gather(
                axis, taps, taps < end[:, None], window=_fit_window(start, end - 1, n_in)
            )
    return _with_indices(call, out)


def _fit_window(lo: np.ndarray, hi: np.ndarray, n: int) -> _Window | None:
    """The sliding window ``(k, s, q, 1)`` whose windows, clipped to ``[0, n)``, are exactly
    ``[lo[u], hi[u]]`` at every output location ``u``; the smallest if several; None if none.

    An op whose per-location reads form such windows (downsampling by an integer factor,
    adaptive pooling 7 -> 3) keeps a regular field regular.
    """
    m = len(lo)
    u = np.arange(m, dtype=np.int64)
    free_lo, free_hi = np.flatnonzero(lo > 0), np.flatnonzero(hi < n - 1)  # unclipped ends
    strides = {0}
    for bound, free in ((lo, free_lo), (hi, free_hi)):
        if len(free) >= 2:
            step, rest = divmod(int(bound[free[-1]] - bound[free[0]]), int(free[-1] - free[0]))
            if not rest:
                strides.add(step)
    if m <= 3:  # too few locations to read the stride off: try them all
        strides.update(range(1, n + 1))
    fits = []
    for s in strides:
        q = int(free_lo[0] * s - lo[free_lo[0]]) if len(free_lo) else (m - 1) * s
        k = int(hi[free_hi[0]] - free_hi[0] * s + q + 1) if len(free_hi) else n + q
        start = u * s - q
        if (
            k >= 1
            and np.array_equal(np.maximum(start, 0), lo)
            and np.array_equal(np.minimum(start + k - 1, n - 1), hi)
        ):
            fits.append((k, s == 0, s, q))
    if not fits:
        return None
    k, _, s, q = min(fits)
    return k, s, q, 1


# --------------------------------------------------------------------------------------------
# Rules: padding (constant, reflect, replicate, circular)


def _zero_pad(f: _Field, axis: int, left: int, n: int, n_out: int) -> _Field:
    return f.window(axis, 1, 1, left, 1, n_out)


def _reflect_pad(f: _Field, axis: int, left: int, n: int, n_out: int) -> _Field:
    """Reflection without repeating the edge: position -1 reads 1, position n reads n - 2."""
    i = np.arange(n_out, dtype=np.int64) - left
    if n > 1:
        i = i % (2 * (n - 1))
        i = np.where(i < n, i, 2 * (n - 1) - i)
    else:
        i = np.zeros_like(i)
    return f.gather(axis, i[:, None], window=(1, 1, left, 1))


def _replicate_pad(f: _Field, axis: int, left: int, n: int, n_out: int) -> _Field:
    """The edge repeated: position -1 reads 0, position n reads n - 1."""
    i = np.clip(np.arange(n_out, dtype=np.int64) - left, 0, n - 1)
    return f.gather(axis, i[:, None], window=(1, 1, left, 1))


def _circular_pad(f: _Field, axis: int, left: int, n: int, n_out: int) -> _Field:
    """The axis wrapped around: position -1 reads n - 1, which the bounds hold as seen past
    the near end (see :class:`_Field`).
    """
    i = np.arange(n_out, dtype=np.int64) - left
    return f.gather(axis, (i % n)[:, None], wrap=(i // n)[:, None], window=(1, 1, left, 1))


# F.pad's modes: ``(field, axis, left pad, input length, output length) -> field``; padding
# modules and convolutions with a ``padding_mode`` use the same entries.
_PAD_MODES: dict[str, Callable[[_Field, int, int, int, int], _Field]] = {
    "constant": _zero_pad,
    "reflect": _reflect_pad,
    "replicate": _replicate_pad,
    "circular": _circular_pad,
}


def _padded(call: _Call, pad: Sequence[int], mode: str) -> _Field:
    """The main input's field after ``F.pad(x, pad, mode)``.

    ``pad`` is in ``F.pad`` order: last dim first, left then right; negative entries crop.
    """
    rule = _PAD_MODES.get(mode)
    if rule is None:
        raise call.unsupported(f"padding mode {mode!r} (known: {', '.join(map(repr, _PAD_MODES))})")
    pad = [int(v) for v in pad]
    if len(pad) % 2:
        raise call.unsupported(f"odd pad list {pad}")
    f, x = call.field, call.x
    out = f
    for i in range(len(pad) // 2):
        dim = x.dim() - 1 - i
        left, right = pad[2 * i], pad[2 * i + 1]
        axis = f.dims[dim]
        if axis is None:
            if left or right:
                raise call.unsupported(f"pads tensor dim {dim}, which is not spatial")
            continue
        if not _is_location(axis) or isinstance(axis, _Loc):
            if left or right:
                raise call.unsupported(f"pads tensor dim {dim}, a flattened grid of locations")
            continue
        n = int(x.shape[dim])
        out = rule(out, axis, left, n, n + left + right)
    return out


def _pad_function(call: _Call) -> _Out:
    return _padded(call, call.args["pad"], call.args["mode"] or "constant")


def _constant_pad_module(call: _Call) -> _Out:
    return _padded(call, call.module(nn.modules.padding._ConstantPadNd).padding, "constant")


def _reflection_pad_module(call: _Call) -> _Out:
    return _padded(call, call.module(nn.modules.padding._ReflectionPadNd).padding, "reflect")


def _replication_pad_module(call: _Call) -> _Out:
    return _padded(call, call.module(nn.modules.padding._ReplicationPadNd).padding, "replicate")


def _circular_pad_module(call: _Call) -> _Out:
    return _padded(call, call.module(nn.modules.padding._CircularPadNd).padding, "circular")


# --------------------------------------------------------------------------------------------
# Rules: upsampling (transposed convolution, interpolation, pixel shuffle)


def _transposed(call: _Call, kernel: Any, stride: Any, padding: Any, dilation: Any) -> _Out:
    """Transposed convolution: output ``o`` reads input ``i`` where ``o = i*s - q + t*d`` for a
    tap ``t`` (``output_padding`` only adds locations at the far end: the output's shape
    says how many). With stride 1 it is a convolution (a regular window); with a larger
    stride neighbouring outputs read different numbers of inputs: the axis becomes
    irregular.
    """
    d = call.kernel_dims()
    k, s = _ntuple(kernel, d), _ntuple(stride, d)
    q, dil = _ntuple(padding, d), _ntuple(dilation, d)
    axes = _kernel_axes(call)
    x, result = call.x, call.output
    out = call.field
    for i, axis in enumerate(axes):
        if axis is None:
            continue
        n_in = x.shape[x.dim() - d + i]
        n_out = result.shape[result.dim() - d + i]
        at = np.arange(n_out, dtype=np.int64)[:, None] + q[i] - np.arange(k[i]) * dil[i]
        taps = at // s[i]
        valid = (at % s[i] == 0) & (taps >= 0) & (taps < n_in)
        window = (k[i], 1, (k[i] - 1) * dil[i] - q[i], dil[i]) if s[i] == 1 else None
        out = out.gather(axis, taps, valid, window=window)
    return out


def _transposed_module(call: _Call) -> _Out:
    m = call.module(nn.modules.conv._ConvTransposeNd)
    return _mixing(_transposed(call, m.kernel_size, m.stride, m.padding, m.dilation), m.groups)


def _transposed_function(call: _Call) -> _Out:
    a = call.args
    out = _transposed(call, tuple(a["weight"].shape[2:]), a["stride"], a["padding"],
                      a["dilation"])  # fmt: skip
    return _mixing(out, a["groups"])


@dataclass(frozen=True)
class _Resampling:
    """The arguments of one ``F.interpolate`` call (``nn.Upsample`` and ``F.upsample`` too)."""

    size: Any
    scale_factor: Any
    mode: str
    align_corners: bool | None
    recompute_scale_factor: bool | None
    antialias: bool

    def probe_arguments(self, i: int, d: int) -> dict[str, Any]:
        """Keyword arguments that resample spatial dim ``i`` of ``d`` as this call does, and
        keep the others at length 2.

        (Length 2, not 1: PyTorch 2.x's antialiased forward kernels mis-weigh a map whose other
        axis has length 1.)
        """
        per_axis = self.size if self.size is not None else self.scale_factor
        values = list(per_axis) if isinstance(per_axis, (list, tuple, torch.Size)) else [per_axis]
        value = values[i] if len(values) == d else values[0]
        kwargs: dict[str, Any] = {"mode": self.mode, "align_corners": self.align_corners}
        if self.antialias:
            kwargs["antialias"] = True
        if self.size is not None:
            kwargs["size"] = [int(value) if a == i else 2 for a in range(d)]
        else:
            kwargs["scale_factor"] = [float(value) if a == i else 1.0 for a in range(d)]
            kwargs["recompute_scale_factor"] = self.recompute_scale_factor
        return kwargs


# Values per probe call: one-hot rows are resampled in chunks of about this many outputs.
_PROBE_VALUES = 1 << 22


def _resampled_taps(
    call: _Call, how: _Resampling, i: int, n_in: int, n_out: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(taps, valid)`` (``(n_out, k)``) of spatial dim ``i``: the input locations each output
    location reads with a non-zero weight.

    Read off PyTorch's own kernel, so that its index arithmetic (floors, clamps, the float
    scale, zero weights at exact source positions, antialiasing) is followed exactly: the
    one-hot inputs of the axis are resampled with the call's arguments (in float64 and in the
    model's dtype on its device; a location reads the union). Nearest modes copy one input
    each: one probe of input indices tells which.
    """
    d = call.x.dim() - 2
    kwargs = how.probe_arguments(i, d)
    shape = [2] * d
    shape[i] = n_in
    first = tuple(slice(None) if a == i else 0 for a in range(d))  # index 0 on the other axes

    def resample(rows: torch.Tensor) -> torch.Tensor:
        """``(B, n_in)`` -> ``(B, n_out)``: each row resampled along dim ``i``."""
        b = rows.shape[0]
        view = [b, 1] + [n_in if a == i else 1 for a in range(d)]
        y = F.interpolate(rows.reshape(view).expand(b, 1, *shape), **kwargs)[
            (slice(None), 0, *first)
        ]
        if y.shape[1:] != (n_out,):
            raise call.unsupported(f"resampling probe gave {y.shape[1:]} positions, not {n_out}")
        return y

    x = call.x
    settings = [(torch.float64, torch.device("cpu"))]
    if x.device.type != "meta" and (x.dtype, x.device) != settings[0]:
        settings.append((x.dtype, x.device))
    pairs: list[tuple[np.ndarray, np.ndarray]] = []  # (output location, input location)
    if how.mode in ("nearest", "nearest-exact"):  # index arithmetic in float32 whatever dtype
        settings = list({device: (dtype, device) for dtype, device in settings}.values())
    for dtype, device in settings:
        if how.mode in ("nearest", "nearest-exact"):
            y = resample(torch.arange(n_in, dtype=torch.float32, device=device)[None])[0]
            pairs.append((np.arange(n_out), y.round().long().cpu().numpy()))
            continue
        rows = max(1, _PROBE_VALUES // max(n_in, n_out))
        for start in range(0, n_in, rows):
            stop = min(start + rows, n_in)
            eye = torch.zeros(stop - start, n_in, dtype=dtype, device=device)
            eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
            rows_hit, units = torch.nonzero(resample(eye), as_tuple=True)
            pairs.append((units.cpu().numpy(), (rows_hit + start).cpu().numpy()))
    u = np.concatenate([p[0] for p in pairs]).astype(np.int64)
    t = np.concatenate([p[1] for p in pairs]).astype(np.int64)
    order = np.lexsort((t, u))
    u, t = u[order], t[order]
    keep = np.ones(len(u), dtype=bool)
    keep[1:] = (u[1:] != u[:-1]) | (t[1:] != t[:-1])  # the union of the probes
    u, t = u[keep], t[keep]
    count = np.bincount(u, minlength=n_out)
    offset = np.concatenate([[0], np.cumsum(count)[:-1]])
    slot = np.arange(len(u)) - offset[u]
    taps = np.zeros((n_out, max(int(count.max()), 1)), dtype=np.int64)
    valid = np.zeros_like(taps, dtype=bool)
    taps[u, slot] = t
    valid[u, slot] = True
    return taps, valid


def _resample(call: _Call, how: _Resampling) -> _Out:
    """Interpolation (nearest, nearest-exact, linear, bilinear, bicubic, trilinear, area), up
    or down, by scale factors or to sizes: exact per location (:func:`_resampled_taps`).

    An axis whose reads are one sliding window at every location (an integer downsampling
    factor, or the same size) keeps a regular field regular; the others become irregular.
    """
    f, x, result = call.field, call.x, call.output
    if x.dim() < 3:
        raise call.unsupported(f"resamples a tensor of shape {tuple(x.shape)}")
    out = f
    for i in range(x.dim() - 2):
        dim = 2 + i
        axis = f.dims[dim]
        n_in, n_out = int(x.shape[dim]), int(result.shape[dim])
        if axis is None:
            if n_in > 1:
                raise call.unsupported(
                    f"resamples tensor dim {dim} (size {n_in}), which is not a spatial axis of "
                    "the input (channels or a flattened dim)"
                )
            continue
        if not _is_location(axis) or isinstance(axis, _Loc):
            raise call.unsupported(f"resamples tensor dim {dim}, a flattened grid of locations")
        taps, valid = _resampled_taps(call, how, i, n_in, n_out)
        lo = np.where(valid, taps, n_in).min(axis=1)
        hi = np.where(valid, taps, -1).max(axis=1)
        dense = bool((valid.sum(axis=1) == hi - lo + 1).all())
        window = _fit_window(lo, hi, n_in) if dense else None
        out = out.gather(axis, taps, valid, window=window)
    return out


def _interpolate_function(call: _Call) -> _Out:
    a = call.args
    how = _Resampling(a["size"], a["scale_factor"], a["mode"], a["align_corners"],
                      a["recompute_scale_factor"], bool(a["antialias"]))  # fmt: skip
    return _resample(call, how)


def _upsample_module(call: _Call) -> _Out:
    m = call.module(nn.Upsample)
    how = _Resampling(m.size, m.scale_factor, m.mode, m.align_corners,
                      m.recompute_scale_factor, False)  # fmt: skip
    return _resample(call, how)


def _pixel_shuffle(call: _Call, factor: int, up: bool) -> _Out:
    """PixelShuffle (``up``) and PixelUnshuffle: channels move into space and back.

    ``(*, C*r*r, H, W) -> (*, C, H*r, W*r)``: output location ``o`` reads the channels
    ``o % r`` of input location ``o // r``, so the axis becomes irregular for ``r > 1``; exact
    where every channel of a location sees the same field (``_Field.uniform``), refused
    where not (a shuffle right after an unshuffle or a concatenation: each output location
    would see only its own channels' part, and one field per location cannot say which).
    Unshuffle pools ``r`` locations into channels: a window of ``r`` with stride ``r``, whose
    channels then see different parts of it.
    """
    f, x, result = call.field, call.x, call.output
    if x.dim() < 3:
        raise call.unsupported(f"shuffles a tensor of shape {tuple(x.shape)}")
    if up and factor > 1 and not f.uniform:
        raise call.unsupported(
            "moves channels to locations, but the channels of a location see different fields "
            "here (after pixel_unshuffle or a concatenation, with no convolution over all "
            "channels since): the field of each location cannot be told exactly. Use "
            "featurelens.empirical_receptive_field"
        )
    channels = x.dim() - 3
    if f.dims[channels] is not None and x.shape[channels] > 1:
        raise call.unsupported(
            f"folds tensor dim {channels} into space, but it is a spatial axis of the input"
        )
    out = f
    for dim in (x.dim() - 2, x.dim() - 1):
        axis = f.dims[dim]
        n_in, n_out = int(x.shape[dim]), int(result.shape[dim])
        if axis is None:
            if n_in > 1:
                raise call.unsupported(
                    f"shuffles tensor dim {dim} (size {n_in}), which is not a spatial axis"
                )
            continue
        if not _is_location(axis) or isinstance(axis, _Loc):
            raise call.unsupported(f"shuffles tensor dim {dim}, a flattened grid of locations")
        if not up:
            out = out.window(axis, factor, factor, 0, 1, n_out)
            out = replace(out, uniform=out.uniform and factor == 1)
        elif factor == 1:
            out = out.window(axis, 1, 1, 0, 1, n_out)
        else:
            out = out.gather(axis, (np.arange(n_out, dtype=np.int64) // factor)[:, None])
    return out


def _pixel_shuffle_module(call: _Call) -> _Out:
    return _pixel_shuffle(call, int(call.module(nn.PixelShuffle).upscale_factor), up=True)


def _pixel_unshuffle_module(call: _Call) -> _Out:
    return _pixel_shuffle(call, int(call.module(nn.PixelUnshuffle).downscale_factor), up=False)


def _pixel_shuffle_function(call: _Call) -> _Out:
    return _pixel_shuffle(call, int(call.args["upscale_factor"]), up=True)


def _pixel_unshuffle_function(call: _Call) -> _Out:
    return _pixel_shuffle(call, int(call.args["downscale_factor"]), up=False)


# --------------------------------------------------------------------------------------------
# Rules: layout (reshape, permute), reductions, splits, ops over one dim


def _reshape_groups(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up runs of dims of two shapes with equal products (numpy's reshape grouping)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        gi, gj = [], []
        pa = pb = 1
        if i < len(a):
            gi.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            gj.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        # absorb trailing size-1 dims on both sides into this group
        while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            gi.append(i)
            i += 1
        while j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            gj.append(j)
            j += 1
        groups.append((gi, gj))
    return groups


# A digit of a tensor dim in a reshape: (axis or None, step, count, role of its dim).
_RDigit: TypeAlias = tuple[int | None, int, int, str | None]


def _reshape(call: _Call) -> _Out:
    """view/reshape/flatten/squeeze/unsqueeze/unflatten.

    Each tensor dim is read as digits (of input axes, or of batch/channel/other dims); a
    reshape regroups digits row-major, splitting one where an output dim takes part of it.
    Dims that keep their digits keep their labels; a window partition splits an axis into
    digits on several dims (and into the batch dim); digits of an axis merged with channels
    are pooled away (a flatten before a linear layer collapses the map).
    """
    f = call.field
    in_shape, out_shape = list(call.x.shape), list(call.output.shape)
    groups = _reshape_groups(in_shape, out_shape)
    if groups is None:
        raise call.unsupported(f"reshape {tuple(in_shape)} -> {tuple(out_shape)}")
    labels: list[Any] = [None] * len(out_shape)
    roles: list[str | None] = [None] * len(out_shape)
    new: set[int] = set()  # output dims whose label is made here from digits
    gone: list[_Digit] = []  # location digits merged with channels: pooled away
    for in_dims, out_dims in groups:
        if [in_shape[i] for i in in_dims] == [out_shape[o] for o in out_dims]:
            for i, o in zip(in_dims, out_dims):  # the same dims: labels stay
                labels[o], roles[o] = f.dims[i], f.roles[i]
            continue
        digits: list[_RDigit] = []
        for i in in_dims:
            label = f.dims[i]
            if isinstance(label, _Folded) or (isinstance(label, _Loc) and label.prefix):
                what = "attention scores" if isinstance(label, _Folded) else "extra tokens"
                raise call.unsupported(f"reshapes tensor dim {i}, which holds {what}, with others")
            if _is_location(label):
                digits += [(a, s, c, _LOCATION) for a, s, c in _label_digits(label, f.lengths)]
            else:
                digits.append((None, 1, in_shape[i], f.roles[i]))
        split = _distribute(digits, [out_shape[o] for o in out_dims])
        if split is None:
            raise call.unsupported(
                f"reshape {tuple(in_shape)} -> {tuple(out_shape)} splits a spatial axis into "
                "sizes that do not divide it"
            )
        for o, mine in zip(out_dims, split):
            roles[o] = _digits_role(mine)
            locs = tuple((a, s, c) for a, s, c, _ in mine if a is not None and c > 1)
            mixed = any(a is None and c > 1 and r != _BATCH for a, _, c, r in mine)
            if mixed:
                gone += locs
            elif locs:
                labels[o] = _Loc(locs)
                new.add(o)
    out = f
    if gone:
        out, labels = _fold_digits(f, labels, gone, call.where)
    for o in new:
        if isinstance(labels[o], _Loc):
            labels[o] = _label_of(labels[o].parts, out.lengths)
    # an axis with several locations that no dim holds any more is pooled away
    held = {a for label in labels for a in _label_axes(label)}
    for axis, n in enumerate(out.lengths):
        if n > 1 and axis not in held:
            out = out.collapse(axis)
    return out.with_dims(labels, roles)


def _distribute(digits: list[_RDigit], sizes: list[int]) -> list[list[_RDigit]] | None:
    """Deal ``digits`` (most significant first) out to output dims of ``sizes``, row-major,
    splitting a digit where a dim takes its more significant part. None if impossible.
    """
    queue = list(digits)
    out: list[list[_RDigit]] = []
    for k, m in enumerate(sizes):
        mine: list[_RDigit] = []
        need = m
        while queue and (need > 1 or (queue[0][2] == 1 and (k == len(sizes) - 1 or need == m))):
            a, s, c, r = queue[0]
            if c <= need and need % c == 0:
                mine.append(queue.pop(0))
                need //= c
            elif c % need == 0:
                mine.append((a, s * (c // need), need, r))
                queue[0] = (a, s, c // need, r)
                need = 1
            else:
                return None
        if need != 1:
            return None
        out.append(mine)
    if any(c != 1 for _, _, c, _ in queue):
        return None
    if queue and out:
        out[-1] += queue
    return out


def _digits_role(digits: list[_RDigit]) -> str | None:
    roles = {r for _, _, _, r in digits}
    for role in (_BATCH, _CHANNEL):
        if role in roles:
            return role
    if any(a is not None for a, _, _, _ in digits) or _LOCATION in roles:
        return _LOCATION
    return None


def _reordered(call: _Call, order: Sequence[int]) -> _Out:
    """The main input's field with its tensor dims taken in ``order``."""
    f = call.field
    return f.with_dims([f.dims[i] for i in order], [f.roles[i] for i in order])


def _permute(call: _Call) -> _Out:
    nd = call.x.dim()
    return _reordered(call, [int(p) % nd for p in call.args["dims"]])


def _transpose(call: _Call) -> _Out:
    nd = call.x.dim()
    a, b = int(call.args["dim0"]) % nd, int(call.args["dim1"]) % nd
    order = list(range(nd))
    order[a], order[b] = order[b], order[a]
    return _reordered(call, order)


def _swap_last(call: _Call) -> _Out:
    """``x.mT``: the last two dims swapped."""
    nd = call.x.dim()
    order = list(range(nd))
    order[-1], order[-2] = order[-2], order[-1]
    return _reordered(call, order)


def _movedim(call: _Call) -> _Out:
    nd = call.x.dim()
    src, dst = call.args["source"], call.args["destination"]
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    moved = dict(zip([d % nd for d in dst], [s % nd for s in src]))
    rest = iter(i for i in range(nd) if i not in moved.values())
    return _reordered(call, [moved[i] if i in moved else next(rest) for i in range(nd)])


def _reverse_dims(call: _Call) -> _Out:
    return _reordered(call, list(range(call.x.dim()))[::-1])


def _reduce(call: _Call) -> _Out:
    """mean/sum/amax/...: pool away the locations of the reduced dims."""
    f, x = call.field, call.x
    nd = x.dim()
    dim = call.args["dim"]
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        reduced = list(range(nd))  # no dim, or dim=() (amax, sum): every dim
    else:
        reduced = sorted({int(d) % nd for d in (dim if isinstance(dim, (list, tuple)) else [dim])})
    keepdim = bool(call.args["keepdim"])
    result = call.result
    expected = nd if keepdim else nd - len(reduced)
    if not isinstance(result, torch.Tensor) or result.dim() != expected:
        raise call.unsupported(
            f"reduces dims {reduced} (keepdim={keepdim}) of a {nd}-dim tensor but returns "
            f"{type(result).__name__} {getattr(result, 'shape', '')}: cannot tell which dims "
            "it reduced"
        )
    out, labels = f, list(f.dims)
    for i in reduced:
        out, labels = _fold(out, labels, i, call.where)
    roles = list(f.roles)
    if not keepdim:
        labels = [a for i, a in enumerate(labels) if i not in reduced]
        roles = [r for i, r in enumerate(roles) if i not in reduced]
    return out.with_dims(labels, roles)


def _extreme(call: _Call) -> _Out:
    """max/min: of everything, along a dim (values and indices), or of two tensors."""
    dim = call.args["dim"]
    if isinstance(dim, torch.Tensor):  # torch.max(a, b): elementwise
        return _elementwise(call)
    out = _reduce(replace(call, result=call.output))
    if isinstance(call.result, tuple):
        assert not isinstance(out, tuple)  # a reduction's one field
        return (out, None)
    return out


def _variance(call: _Call) -> _Out:
    """std/var: like :func:`_reduce`; ``x.std(False)`` is the ``unbiased`` overload (all dims)."""
    if isinstance(call.args["dim"], bool):
        call = replace(call, args={**call.args, "dim": None, "unbiased": call.args["dim"]})
    return _reduce(call)


def _split(call: _Call) -> _Out:
    """chunk/split/tensor_split: each piece keeps the field (refused along a spatial axis)."""
    f = call.field
    if f.dims[int(call.args["dim"]) % call.x.dim()] is not None:
        raise call.unsupported("splits along a spatial axis")
    return tuple(f for _ in call.result)


def _unbind(call: _Call) -> _Out:
    f = call.field
    dim = int(call.args["dim"]) % call.x.dim()
    if f.dims[dim] is not None:
        raise call.unsupported("unbinds a spatial axis")
    dims = f.dims[:dim] + f.dims[dim + 1 :]
    roles = f.roles[:dim] + f.roles[dim + 1 :]
    return tuple(f.with_dims(dims, roles) for _ in call.result)


def _along(call: _Call, dim: int) -> _Out:
    """An op that mixes one dim (linear: the last; softmax: ``dim``) and keeps the others.

    Mixing the folded dim of attention scores is what attention does: the field is then
    exact again. Mixing a dim of locations is refused.
    """
    inputs = []
    for f, x in call.inputs:
        d = dim % x.dim()
        label = f.dims[d]
        if isinstance(label, _Folded):
            f = f.with_dims(f.dims[:d] + (None,) + f.dims[d + 1 :], f.roles)
        elif label is not None and x.shape[d] > 1:
            raise call.unsupported(
                f"mixes spatial tensor dim {d} (size {x.shape[d]}): not supported yet"
            )
        inputs.append((f, x))
    call = replace(call, inputs=tuple(inputs))
    result = call.result
    if not isinstance(result, torch.Tensor) or result.dim() != len(call.field.dims):
        raise call.unsupported("changes the number of dims")
    return call.field if len(call.inputs) == 1 else _elementwise(call)


def _last_dim(call: _Call) -> _Out:
    """Linear, Bilinear, F.linear: mix the last dim, which then holds channels."""
    out = _along(call, -1)
    assert isinstance(out, _Field)
    return out.with_role(len(out.dims) - 1, _CHANNEL)


def _softmax_dim(dim: int | None, ndim: int) -> int:
    """Softmax's dim; None is PyTorch's legacy choice (0 for 0-, 1- and 3-dim inputs, else 1)."""
    if dim is not None:
        return int(dim)
    return 0 if ndim in (0, 1, 3) else 1


def _softmax_module(call: _Call) -> _Out:
    dim = getattr(call.module(nn.Module), "dim", None)  # nn.Softmax, nn.LogSoftmax
    return _along(call, _softmax_dim(dim, call.x.dim()))


def _softmax_function(call: _Call) -> _Out:
    return _along(call, _softmax_dim(call.args["dim"], call.x.dim()))


def _normalize(call: _Call) -> _Out:
    """F.normalize divides by a norm over ``dim`` (default 1, the channels)."""
    return _along(call, int(call.args["dim"]))


# --------------------------------------------------------------------------------------------
# Rules: elementwise ops and merges, normalisation statistics, indexing

# One operand of a merge, aligned to the output: (field, labels, roles, shape) with one entry
# per output dim (None labels/roles and size 1 where the operand has no such dim).
_Operand: TypeAlias = tuple[_Field, list[Any], list["str | None"], tuple[int, ...]]


def _operand(f: _Field, x: torch.Tensor, nd: int) -> _Operand:
    """``(f, x)`` right-aligned to an ``nd``-dim output (broadcasting's rule)."""
    pad = nd - x.dim()
    return (f, [None] * pad + list(f.dims), [None] * pad + list(f.roles),
            (1,) * pad + tuple(x.shape))  # fmt: skip


def _combine(call: _Call, operands: Sequence[_Operand], out_shape: Sequence[int]) -> _Field:
    """The union of operands over the same (broadcast) output dims: the labels of the dims
    they hold, the roles, and the fields per input axis.
    """
    nd = len(out_shape)
    labels: list[Any] = [None] * nd
    roles: list[str | None] = [None] * nd
    merged: _Field | None = None
    for f, dims, rls, shape in operands:
        for o in range(nd):
            if shape[o] == 1 and out_shape[o] != 1:
                continue  # broadcast dims carry no location
            roles[o] = _merge_roles(roles[o], rls[o])
            if dims[o] is not None:
                labels[o] = _merge_labels(labels[o], dims[o], call.where)
        if merged is None:
            merged = f
        else:
            try:
                merged = merged.union(f)
            except ReceptiveFieldError as exc:  # name the op that merges
                raise type(exc)(f"{call.where()}: {exc}") from None
    assert merged is not None
    return merged.with_dims(labels, roles)


def _elementwise(call: _Call) -> _Field:
    """Elementwise op (with broadcasting) over one or more fields: union of dependencies.

    A constant operand that varies along a dim of locations (a position embedding, the
    coordinate channels of a CoordConv) makes the result depend on absolute positions: the
    field records it (``anchored``).
    """
    result = call.result
    if not isinstance(result, torch.Tensor):
        raise call.unsupported("returns a non-tensor")
    nd = result.dim()
    if any(x.dim() > nd for _, x in call.inputs):
        raise call.unsupported("output has fewer dims than an input")
    out = _combine(call, [_operand(f, x, nd) for f, x in call.inputs], tuple(result.shape))
    for c in call.constants:
        if _varies_along_locations(c, out.dims):
            out = out.anchoring(f"{call.title()} with a constant that varies over locations")
            break
    return out


def _varies_along_locations(c: torch.Tensor, labels: Sequence[Any]) -> bool:
    pad = len(labels) - c.dim()
    for i in range(c.dim()):
        if pad + i >= 0 and c.shape[i] > 1 and _is_location(labels[pad + i]):
            first = c.narrow(i, 0, 1)
            if not bool(torch.equal(c, first.expand_as(c))):
                return True
    return False


def _concatenate(call: _Call) -> _Out:
    """cat: along channels a union. Along a dim of locations, only constants around the one
    tensor with a field: on one axis they pad it (zeros, a learned border); before a
    flattened grid they are extra tokens (a ViT's class token), which see nothing yet.
    """
    nd = call.output.dim()
    dim = int(call.args["dim"]) % nd
    if not any(f.dims[dim % x.dim()] is not None for f, x in call.inputs):
        return _side_by_side(call, _elementwise(call))
    tensors = list(call.args["tensors"])
    if len(call.inputs) != 1:
        raise call.unsupported("concatenates along a spatial axis")
    f, x = call.inputs[0]
    at = next(i for i, t in enumerate(tensors) if t is x)
    label = f.dims[dim]
    before = sum(int(t.shape[dim]) for t in tensors[:at])
    if isinstance(label, int):  # constants around one axis: a padding
        return f.window(label, 1, 1, before, 1, int(call.output.shape[dim]))
    if at != len(tensors) - 1 or not isinstance(label, _Loc):
        raise call.unsupported("concatenates along a spatial axis")
    if label.prefix and any(lo <= hi for lo, hi in zip(label.prefix_first, label.prefix_last)):
        raise call.unsupported("prepends tokens to tokens that already see the input")
    n_axes = len(label.axes)
    new = replace(label, prefix=label.prefix + before, prefix_first=(_EMPTY,) * n_axes,
                  prefix_last=(-1,) * n_axes)  # fmt: skip
    return f.with_dims(f.dims[:dim] + (new,) + f.dims[dim + 1 :], f.roles)


def _stack(call: _Call) -> _Out:
    dim = int(call.args["dim"]) % call.output.dim()
    shifted = tuple(
        (f.with_dims(f.dims[:dim] + (None,) + f.dims[dim:],
                     f.roles[:dim] + (None,) + f.roles[dim:]),
         x.unsqueeze(dim))
        for f, x in call.inputs
    )  # fmt: skip
    return _side_by_side(call, _elementwise(replace(call, inputs=shifted)))


def _side_by_side(call: _Call, merged: _Field) -> _Field:
    """``merged`` (a concatenation), no longer uniform where its parts see different fields."""
    first = call.field
    same = all(
        len(f.lengths) == len(first.lengths)
        and all(
            np.array_equal(getattr(f, b)[axis], getattr(first, b)[axis])
            for b in ("first", "last", "low", "high")
            for axis in range(len(first.lengths))
        )
        for f, _ in call.inputs
    )
    return replace(merged, uniform=merged.uniform and same)


def _normalising(
    call: _Call, over_positions: Callable[[list[int]], bool], batch: bool = False
) -> _Out:
    """An elementwise norm that records itself when its statistics run over positions.

    ``over_positions(dims)`` says so given the output's tensor dims that hold a spatial axis
    of more than one location. By convention the statistics keep the field (as in the
    empirical verifier), but a unit computed on a crop of the input would see other
    statistics: projections read ``statistics`` to decide whether to crop.
    """
    out = _elementwise(call)
    x = call.x
    spatial = [i for i, a in enumerate(out.dims[: x.dim()]) if a is not None and x.shape[i] > 1]
    if not spatial or not over_positions(spatial):
        return out
    label = call.title() + (" with batch statistics" if batch else "")
    return out.noting(label)


def _group_norm(call: _Call) -> _Out:
    return _normalising(call, lambda spatial: True)


def _instance_norm_module(call: _Call) -> _Out:
    m = call.module(nn.modules.instancenorm._InstanceNorm)
    return _normalising(call, lambda spatial: not m.track_running_stats)


def _instance_norm_function(call: _Call) -> _Out:
    return _normalising(call, lambda spatial: bool(call.args["use_input_stats"]))


def _layer_norm(call: _Call, shape: Any) -> _Out:
    k = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
    nd = call.x.dim()
    return _normalising(call, lambda spatial: any(i >= nd - k for i in spatial))


def _layer_norm_module(call: _Call) -> _Out:
    return _layer_norm(call, call.module(nn.LayerNorm).normalized_shape)


def _layer_norm_function(call: _Call) -> _Out:
    return _layer_norm(call, call.args["normalized_shape"])


def _batch_norm_module(call: _Call) -> _Out:
    m = call.module(nn.modules.batchnorm._BatchNorm)
    batch = m.training or m.running_mean is None
    return _normalising(call, lambda spatial: batch, batch=batch)


def _batch_norm_function(call: _Call) -> _Out:
    batch = bool(call.args["training"])
    return _normalising(call, lambda spatial: batch, batch=batch)


def _index_entries(call: _Call, idx: Any, nd: int) -> tuple[Any, ...]:
    """An index as one entry per source dim plus None for new dims (Ellipsis expanded)."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, (torch.Tensor, list)) for i in idx):
        raise call.unsupported("advanced (tensor) indexing")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (nd - n_real) + idx[k + 1 :]
    return idx + (slice(None),) * (nd - sum(1 for i in idx if i is not None))


def _index(call: _Call) -> _Out:
    """``x[...]`` with ints, slices (crops, strides), None and Ellipsis."""
    f, x = call.field, call.x
    out, src_dim = f, 0
    dims: list[Any] = []
    roles: list[str | None] = []
    for i in _index_entries(call, call.args["index"], x.dim()):
        if i is None:
            dims.append(None)
            roles.append(None)
            continue
        label, role, n = f.dims[src_dim], f.roles[src_dim], x.shape[src_dim]
        if isinstance(i, bool) or not isinstance(i, (int, slice)):
            raise call.unsupported(f"index {i!r}")
        if isinstance(i, int):
            out = _take(call, out, label, i % n)
        else:
            out, label, role = _slice(call, out, label, role, i.indices(n), n)
            dims.append(label)
            roles.append(role)
        src_dim += 1
    return out.with_dims(dims, roles)


def _take(call: _Call, f: _Field, label: Any, i: int) -> _Field:
    """``x[..., i, ...]`` on a dim with ``label``: that one location."""
    if label is None:
        return f
    if isinstance(label, int):
        return f.window(label, 1, 1, -i, 1, 1)
    if isinstance(label, _Loc):
        if i < label.prefix:
            for a, lo, hi in zip(label.axes, label.prefix_first, label.prefix_last):
                f = f.pin(a, lo, hi)
            return f
        whole = all(
            sum(1 for a2, _, _ in label.parts if a2 == a) == 1
            and next(s * c for a2, s, c in label.parts if a2 == a) == f.lengths[a]
            for a in label.axes
        )
        if whole:
            digits = np.unravel_index(i - label.prefix, label.grid())
            for (a, s, _), d in zip(label.parts, digits):
                f = f.window(a, 1, 1, -int(d) * s, 1, 1)
            return f
    raise call.unsupported("indexes one position of a window or of attention scores")


def _slice(
    call: _Call, f: _Field, label: Any, role: str | None, span: tuple[int, int, int], n: int
) -> tuple[_Field, Any, str | None]:
    """``x[..., start:stop:step, ...]`` on a dim with ``label``."""
    start, stop, step = span
    if label is None or (start, stop, step) == (0, n, 1):
        return f, label, role
    if isinstance(label, int):
        if step <= 0:
            raise call.unsupported("negative step on a spatial axis")
        return f.window(label, 1, step, -start, 1, len(range(start, stop, step))), label, role
    if isinstance(label, _Loc) and label.prefix and step == 1:
        if start == label.prefix and stop == n:  # drop the extra tokens
            return f, _label_of(label.parts, f.lengths), role
        if start == 0 and stop <= label.prefix:  # keep only extra tokens
            for a, lo, hi in zip(label.axes, label.prefix_first, label.prefix_last):
                f = f.pin(a, lo, hi)
            return f, None, _LOCATION
    raise call.unsupported("slices a flattened grid of locations")


def _setitem(call: _Call) -> _Out:
    """``x[index] = value``: the new field of ``x`` (written along channels or other non-
    location dims only; a write into part of a spatial axis is refused).
    """
    target, value = call.args["input"], call.args["value"]
    ft = call.field_of(target)
    fv = call.field_of(value) if isinstance(value, torch.Tensor) else None
    entries = _index_entries(call, call.args["index"], target.dim())
    kept: list[int] = []  # target dims the written view keeps
    whole = True
    src = 0
    for e in entries:
        if e is None:
            continue
        n = target.shape[src]
        full = isinstance(e, slice) and e.indices(n) == (0, n, 1)
        label = ft.dims[src] if ft is not None else None
        if not full and (label is not None or n > 1):
            whole = False
        if not full and label is not None:
            raise call.unsupported("writes into part of a spatial axis")
        if isinstance(e, slice):
            kept.append(src)
        src += 1
    if fv is None:
        return None if whole else ft
    nd = target.dim()
    labels: list[Any] = [None] * nd
    roles: list[str | None] = [None] * nd
    pad = len(kept) - value.dim()
    for k, d in enumerate(kept):
        v = k - pad
        if v >= 0 and value.shape[v] == target.shape[d]:
            labels[d], roles[d] = fv.dims[v], fv.roles[v]
        elif v >= 0 and fv.dims[v] is not None and value.shape[v] > 1:
            raise call.unsupported("writes a map into part of a spatial axis")
    mapped = fv.with_dims(labels, roles)
    if ft is None or whole:
        return mapped
    ops = [(ft, list(ft.dims), list(ft.roles), tuple(target.shape)),
           (mapped, labels, roles, tuple(target.shape))]  # fmt: skip
    return _combine(call, ops, tuple(target.shape))


def _roll(call: _Call) -> _Out:
    """``torch.roll`` along spatial dims: a circular shift of locations (Swin's shifted
    windows), held like a circular border (see :func:`_circular_pad`).
    """
    f, x = call.field, call.x
    shifts, dims = call.args["shifts"], call.args["dims"]
    shifts = list(shifts) if isinstance(shifts, (list, tuple)) else [shifts]
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        # rolls the flattened tensor: positions move across axes
        if any(a is not None and x.shape[i] > 1 for i, a in enumerate(f.dims)):
            raise call.unsupported("rolls the flattened tensor (no dims) across spatial axes")
        return f
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    if len(shifts) != len(dims):
        raise call.unsupported(f"shifts {shifts} and dims {dims} differ in length")
    out = f
    for shift, dim in zip(shifts, dims):
        dim = int(dim) % x.dim()
        axis = f.dims[dim]
        if axis is None:
            continue
        if not _is_location(axis) or isinstance(axis, _Loc):
            raise call.unsupported("rolls a flattened grid of locations")
        n = int(x.shape[dim])
        i = np.arange(n, dtype=np.int64) - int(shift)
        out = out.gather(
            axis, (i % n)[:, None], wrap=(i // n)[:, None], window=(1, 1, int(shift), 1)
        )
    return out.anchoring(f"{call.title()} (a cyclic shift)")


def _contract(
    f: _Field, dims: list[Any], dim: int, keep: Any, where: Callable[[], str]
) -> tuple[_Field, list[Any]]:
    """A sum over tensor dim ``dim`` of ``f`` (a matmul's contraction, attention's sum over
    keys). Where the output keeps the same locations on another dim (``keep``: self-attention)
    each location sees all it sums over (a mix; the dim's label, with its extra tokens' new
    bounds, is returned in its place for the caller to merge); otherwise they are pooled away
    (the label becomes None).
    """
    label = dims[dim]
    same = isinstance(label, _Loc) and isinstance(keep, _Loc) and (label.parts, label.prefix) == (
        keep.parts, keep.prefix)  # fmt: skip
    if _is_location(label) and (label == keep or same):
        out, mixed = _mix(f, label)
        dims = list(dims)
        dims[dim] = mixed
        return out, dims
    return _fold(f, dims, dim, where)


def _matmul(call: _Call) -> _Out:
    """``a @ b`` (matmul, bmm): rows from ``a``, columns from ``b``, a sum over the rest.

    Attention scores ``q @ k^T`` have the same locations on rows and columns: score
    ``(i, j)`` is given the field of ``(i, all j)`` (the columns are folded in), which the
    softmax over them makes exact again.
    """
    a, b = call.args["input"], call.args["other"]
    fa = call.field_of(a) if isinstance(a, torch.Tensor) else None
    fb = call.field_of(b) if isinstance(b, torch.Tensor) else None
    result = call.output
    if a.dim() < 2 or b.dim() < 2:
        raise call.unsupported("multiplies by a vector (only matrices are supported)")
    nd = result.dim()
    row = fa.dims[-2] if fa is not None else None
    col = fb.dims[-1] if fb is not None else None
    same = _is_location(row) and _is_location(col) and bool(
        set(_label_axes(row)) & set(_label_axes(col)))  # fmt: skip
    operands: list[_Operand] = []
    if fa is not None:
        fa2, labels = _contract(fa, list(fa.dims), a.dim() - 1, col, call.where)
        pad = nd - a.dim()
        dims = [None] * pad + labels[:-1] + [None]
        roles = [None] * pad + list(fa.roles[:-1]) + [fa.roles[-1] if fb is None else None]
        shape = (1,) * pad + tuple(a.shape[:-1]) + (result.shape[-1],)
        operands.append((fa2, dims, roles, shape))
    if fb is not None:
        fb2, labels = _contract(fb, list(fb.dims), b.dim() - 2, row, call.where)
        pad = nd - b.dim()
        dims = [None] * pad + labels[:-2] + [labels[-2], labels[-1]]
        roles = [None] * pad + list(fb.roles[:-2]) + [fb.roles[-2] if fa is None else None,
                                                        fb.roles[-1]]  # fmt: skip
        shape = (1,) * pad + tuple(b.shape[:-2]) + (result.shape[-2], b.shape[-1])
        if same:
            if not (
                col == row
                or (
                    isinstance(col, _Loc)
                    and isinstance(row, _Loc)
                    and (col.parts, col.prefix) == (row.parts, row.prefix)
                )
            ):
                raise call.unsupported("multiplies two different grids of the same locations")
            fb2, mixed = _mix(fb2, col)
            dims[-2], dims[-1] = mixed, _Folded(mixed)
        operands.append((fb2, dims, roles, shape))
    return _combine(call, operands, tuple(result.shape))


def _attend(call: _Call, q: Any, k: Any, v: Any, token: int) -> _Field:
    """Attention of queries ``q`` over keys ``k`` and values ``v`` (tokens at dim ``token``,
    features last): each query location sees itself and every key/value location it attends
    (the same window, or the whole map). Masks are ignored: a masked score still weighs its
    value a little (timm's -100), so the field is the same.
    """
    result = call.output
    nd = result.dim()
    fq = call.field_of(q) if isinstance(q, torch.Tensor) else None
    qlabel = fq.dims[token % q.dim()] if fq is not None else None
    operands: list[_Operand] = []
    if fq is not None:
        if fq.dims[-1] is not None and q.shape[-1] > 1:
            raise call.unsupported("attends with features that hold locations")
        _, dims, roles, shape = _operand(fq, q, nd)
        roles[-1] = None
        operands.append((fq, dims, roles, shape[:-1] + (result.shape[-1],)))
    for t in (k, v):
        ft = call.field_of(t) if isinstance(t, torch.Tensor) else None
        if ft is None:
            continue
        if ft.dims[-1] is not None and t.shape[-1] > 1:
            raise call.unsupported("attends over features that hold locations")
        tok = token % t.dim()
        ft2, labels = _contract(ft, list(ft.dims), tok, qlabel, call.where)
        roles = list(ft.roles)
        roles[-1] = roles[tok] = None
        _, dims, rls, operand_shape = _operand(ft2.with_dims(labels, roles), t, nd)
        sizes = list(operand_shape)
        sizes[token % nd] = result.shape[token % nd]
        sizes[-1] = result.shape[-1]
        operands.append((ft2, dims, rls, tuple(sizes)))
    return _combine(call, operands, tuple(result.shape))


def _sdpa(call: _Call) -> _Out:
    """F.scaled_dot_product_attention: queries, keys and values ``(..., L, E)``."""
    a = call.args
    mask = a.get("attn_mask")
    if isinstance(mask, torch.Tensor) and call.field_of(mask) is not None:
        raise call.unsupported("takes an attention mask computed from the input")
    if a.get("is_causal"):
        q = a["query"]
        fq = call.field_of(q)
        if fq is not None and fq.dims[-2] is not None:
            raise call.unsupported("causal attention over locations (not supported yet)")
    return _attend(call, a["query"], a["key"], a["value"], -2)


def _multihead_attention(call: _Call) -> _Out:
    """nn.MultiheadAttention: ``(L, N, E)`` (``(N, L, E)`` with batch_first); returns the
    output and the attention weights (no field).
    """
    m = call.module(nn.MultiheadAttention)
    a = call.args
    for name in ("key_padding_mask", "attn_mask"):
        t = a.get(name)
        if isinstance(t, torch.Tensor) and call.field_of(t) is not None:
            raise call.unsupported(f"takes a {name} computed from the input")
    q = a["query"]
    token = 1 if m.batch_first and q.dim() == 3 else 0
    if a.get("is_causal") and call.field_of(q) is not None:
        raise call.unsupported("causal attention over locations (not supported yet)")
    out = _attend(call, q, a["key"], a["value"], token)
    roles = list(out.roles)
    roles[-1] = _CHANNEL  # the output projection's features
    out = out.with_dims(out.dims, roles)
    return (out, None) if isinstance(call.result, tuple) else out


def _no_field(call: _Call) -> _Out:
    """Shape queries (``x.size()``, ``x.shape``) and new constants (``x.new_zeros``): not a
    tensor of the input's positions.
    """
    return None


def _not_supported_yet(call: _Call) -> _Out:
    """Ops whose field the engine does not follow yet (attention)."""
    raise call.unsupported()


def _refusal(why: str) -> _Rule:
    """The rule of an op that has no exact field from positions alone: it raises ``why``."""

    def refuse(call: _Call) -> _Out:
        raise call.unsupported(f"{why}. Use featurelens.empirical_receptive_field for this model.")

    return _Rule(refuse)


# Ops whose field depends on the data, not only on positions, or that the engine cannot hold.
_BY_DATA = _refusal(
    "where each output reads depends on the data (a sampling grid, pooling indices or random "
    "pooling regions), not only on positions: no receptive field can be computed from the "
    "shapes"
)
_WINDOWS_TO_CHANNELS = _refusal(
    "moves sliding windows between channels and one flattened dim of locations (not supported)"
)


# --------------------------------------------------------------------------------------------
# Op tables: one rule per op. Anything not listed raises UnsupportedOpError naming the op.
#
# Adding an op:
# 1. Write a handler ``def _my_op(call: _Call) -> _Out`` above. It reads ``call.field`` and
#    ``call.x`` (the main input), ``call.inputs`` (every input with a field), ``call.output``,
#    ``call.args`` (arguments by name) or ``call.module(nn.MyModule)`` (a module's attributes),
#    ``call.kernel_dims()``; it builds the output's field with ``_Field.window`` (a sliding
#    window), ``_Field.gather`` (any list of locations read per output location: exact bounds;
#    pass ``window=`` where the op is a sliding window, so regular fields stay regular),
#    ``collapse`` / ``union`` / ``with_dims(dims, roles)``, and raises
#    ``call.unsupported(why)`` where no exact field exists (``_refusal(why)`` for an op that
#    never has one). A tensor dim's label (``field.dims[i]``) is an input axis (int), None,
#    or a token grid / window digits / attention scores (_Loc, _Folded): a handler that reads
#    labels as axes must refuse the others (``_kernel_axes`` does).
# 2. Add one entry per form: ``nn.MyModule: _Rule(_my_op, ndim)`` in _MODULE_RULES,
#    ``F.my_op: _Rule(_my_op, ndim, _MY_OP)`` in _FUNCTION_RULES and ``"my_op": _Rule(_my_op,
#    params=_MY_OP)`` in _METHOD_RULES, where ``_MY_OP = _Params((...names...), defaults)`` is
#    shared by the function and the method (an op refused so far: move it out of _NOT_YET_*).
# 3. Test every form, positional and keyword, against empirical_receptive_field at every
#    location (tests/test_rf_arguments.py).

_UNSUPPORTED_HINT = "not supported yet. Use featurelens.empirical_receptive_field for this model."

# Argument names, once per op kind: the function and the method forms share them.
_CONV = _Params(
    ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    {"stride": 1, "padding": 0, "dilation": 1},
)
_POOL_DEFAULTS = {"stride": None, "padding": 0, "dilation": 1}
_MAX_POOL = _Params(
    ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"), _POOL_DEFAULTS
)
_AVG_POOL = _Params(("input", "kernel_size", "stride", "padding", "ceil_mode"), _POOL_DEFAULTS)
_LP_POOL = _Params(("input", "norm_type", "kernel_size", "stride", "ceil_mode"), _POOL_DEFAULTS)
_PAD = _Params(("input", "pad", "mode", "value"), {"mode": "constant"})
_CONSTANT_PAD_ND = _Params(("input", "pad", "value"), {"mode": "constant"})
_PERMUTE = _Params(("input",), rest="dims")
_TRANSPOSE = _Params(("input", "dim0", "dim1"), aliases={"axis0": "dim0", "axis1": "dim1"})
_MOVEDIM = _Params(("input", "source", "destination"))
_CAT = _Params(("tensors", "dim"), {"dim": 0})
_REDUCE = _Params(("input", "dim", "keepdim"), {"dim": None, "keepdim": False})
_VARIANCE = _Params(("input", "dim", "unbiased", "keepdim"), {"dim": None, "keepdim": False})
_EXTREME = _Params(("input", "dim", "keepdim"), {"dim": None, "keepdim": False},
                   aliases={"other": "dim"})  # fmt: skip
_CHUNK = _Params(("input", "chunks", "dim"), {"dim": 0})
_SPLIT = _Params(("input", "split_size", "dim"), {"dim": 0})
_TENSOR_SPLIT = _Params(("input", "indices_or_sections", "dim"), {"dim": 0})
_UNBIND = _Params(("input", "dim"), {"dim": 0})
_SOFTMAX = _Params(("input", "dim"), {"dim": None})
_NORMALIZE = _Params(("input", "p", "dim"), {"dim": 1})
_LAYER_NORM = _Params(("input", "normalized_shape"))
_BATCH_NORM = _Params(
    ("input", "running_mean", "running_var", "weight", "bias", "training"), {"training": False}
)
_INSTANCE_NORM = _Params(
    ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats"),
    {"use_input_stats": True},
)
_INDEX = _Params(("input", "index"))
_SETITEM = _Params(("input", "index", "value"))
_MATMUL = _Params(("input", "other"))
_ROLL = _Params(("input", "shifts", "dims"), {"dims": None})
_SDPA = _Params(
    ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"),
    {"attn_mask": None, "is_causal": False},
)
_MULTIHEAD_ATTENTION = _Params(
    ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
     "average_attn_weights", "is_causal"),
    {"key_padding_mask": None, "attn_mask": None, "is_causal": False},
)  # fmt: skip
_CONV_TRANSPOSE = _Params(
    ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    {"stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1},
)
_RESAMPLE_DEFAULTS = {
    "size": None, "scale_factor": None, "mode": "nearest", "align_corners": None,
    "recompute_scale_factor": None, "antialias": False,
}  # fmt: skip
_INTERPOLATE = _Params(
    ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
     "antialias"),
    _RESAMPLE_DEFAULTS,
)  # fmt: skip
_UPSAMPLE = _Params(("input", "size", "scale_factor", "mode", "align_corners"), _RESAMPLE_DEFAULTS)
_PIXEL_SHUFFLE = _Params(("input", "upscale_factor"))
_PIXEL_UNSHUFFLE = _Params(("input", "downscale_factor"))

_KEEP = _Rule(_elementwise)
_REFUSE = _Rule(_not_supported_yet)
_NO_FIELD = _Rule(_no_field)

# Allow-lists of ops that keep the field (activations, dropout, channel-only norms and
# shuffles, arithmetic), and ops refused because their field is not one interval per location.
_KEEP_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.RReLU, nn.GLU,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.LocalResponseNorm, nn.ChannelShuffle,
)  # fmt: skip
_NOT_YET_MODULES: tuple[type[nn.Module], ...] = ()
_BY_DATA_MODULES: tuple[type[nn.Module], ...] = (
    nn.FractionalMaxPool2d, nn.FractionalMaxPool3d, nn.MaxUnpool1d, nn.MaxUnpool2d,
    nn.MaxUnpool3d,
)  # fmt: skip
_KEEP_FUNCTIONS: tuple[Any, ...] = (
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.exp, torch.sqrt,
    torch.pow, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clip,
    torch.clamp_min, torch.maximum, torch.minimum, torch.where, torch.square, torch.rsqrt,
    torch.channel_shuffle, torch.native_channel_shuffle, torch.gt, torch.lt, torch.ge, torch.le,
    torch.eq, torch.ne, torch.logical_and, torch.logical_or, torch.logical_not, torch.sign,
    torch.floor, torch.ceil, torch.round, torch.log, torch.log1p, torch.erf, torch.sin, torch.cos,
    torch.reciprocal, torch.rsub, torch.nan_to_num, torch.lerp, torch.addcmul, torch.addcdiv,
    torch.exp2, torch.expm1,
    F.relu, F.relu_, F.relu6, F.hardtanh, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu,
    F.leaky_relu, F.prelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.softplus,
    F.logsigmoid, F.threshold, F.glu, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout, F.local_response_norm,
)  # fmt: skip
_NOT_YET_FUNCTIONS: tuple[Any, ...] = ()
_BY_DATA_FUNCTIONS: tuple[Any, ...] = (
    F.grid_sample, F.max_unpool1d, F.max_unpool2d, F.max_unpool3d, F.fractional_max_pool2d,
    F.fractional_max_pool3d, F.fractional_max_pool2d_with_indices,
    F.fractional_max_pool3d_with_indices,
)  # fmt: skip
_KEEP_METHODS: tuple[str, ...] = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "abs", "exp", "sqrt",
    "pow", "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_",
    "clamp_min", "clamp_min_", "clip", "contiguous", "clone", "float", "double", "half",
    "bfloat16", "to", "type_as", "detach", "square", "rsqrt", "masked_fill", "expand_as",
    "expand", "requires_grad_", "__add__", "__mul__", "__radd__", "__rmul__", "__sub__",
    "__truediv__", "__rsub__", "__rdiv__", "__rtruediv__", "__pow__", "__rpow__", "__floordiv__",
    "__rfloordiv__", "__neg__", "__abs__", "__and__", "__or__", "__xor__", "__invert__",
    "__iadd__", "__isub__", "__imul__", "__itruediv__", "rsub", "gt", "lt", "ge", "le", "eq",
    "ne", "logical_and", "logical_or", "logical_not", "sign", "floor", "ceil", "round", "trunc",
    "log", "log2", "log1p", "exp2", "expm1", "erf", "sin", "cos", "reciprocal", "neg_", "abs_",
    "pow_", "exp_", "sqrt_", "rsqrt_", "square_", "masked_fill_", "nan_to_num", "lerp",
    "addcmul", "addcdiv", "where", "fmod", "remainder", "floor_divide", "cpu", "cuda", "type",
    "detach_", "data", "real", "relu6", "hardtanh", "hardtanh_", "erf_", "float_power",
    "maximum", "minimum", "clamp_max", "clamp_max_", "sigmoid", "log_sigmoid",
)  # fmt: skip
_SHAPE_METHODS = (
    "size", "dim", "numel", "stride", "ndimension", "element_size", "get_device", "__len__",
    "__repr__", "__format__", "__str__", "is_contiguous", "is_floating_point", "is_complex",
    "data_ptr", "storage_offset", "nelement", "new_zeros", "new_ones", "new_full", "new_empty",
    "new_tensor", "untyped_storage", "has_names", "dim_order",
)  # fmt: skip
# Functions that make a new constant shaped like their input.
_LIKE_FUNCTIONS = (
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.randint_like,
)  # fmt: skip
_RESHAPE_METHODS = (
    "view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "unflatten",
)  # fmt: skip

# Reading a tensor's values into Python (control flow on them) and ops whose output shape
# depends on the values: refused on tensors computed from the input (see _Tracer).
_VALUE_READERS = frozenset((
    "__bool__", "item", "tolist", "__int__", "__float__", "__index__", "__complex__", "numpy",
    "__array__", "__contains__", "is_nonzero", "equal", "allclose",
))  # fmt: skip
_VALUE_SHAPED = frozenset((
    "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount",
    "nonzero_static", "repeat_interleave",
))  # fmt: skip

# Modules, looked up along the module class's MRO (a subclass gets its base's rule).
_MODULE_RULES: dict[type[nn.Module], _Rule] = {
    nn.Conv1d: _Rule(_conv_module, 1),
    nn.Conv2d: _Rule(_conv_module, 2),
    nn.Conv3d: _Rule(_conv_module, 3),
    nn.MaxPool1d: _Rule(_max_pool_module, 1),
    nn.MaxPool2d: _Rule(_max_pool_module, 2),
    nn.MaxPool3d: _Rule(_max_pool_module, 3),
    nn.AvgPool1d: _Rule(_avg_pool_module, 1),
    nn.AvgPool2d: _Rule(_avg_pool_module, 2),
    nn.AvgPool3d: _Rule(_avg_pool_module, 3),
    nn.LPPool1d: _Rule(_lp_pool_module, 1),
    nn.LPPool2d: _Rule(_lp_pool_module, 2),
    nn.AdaptiveAvgPool1d: _Rule(_adaptive_pool, 1),
    nn.AdaptiveAvgPool2d: _Rule(_adaptive_pool, 2),
    nn.AdaptiveAvgPool3d: _Rule(_adaptive_pool, 3),
    nn.AdaptiveMaxPool1d: _Rule(_adaptive_pool, 1),
    nn.AdaptiveMaxPool2d: _Rule(_adaptive_pool, 2),
    nn.AdaptiveMaxPool3d: _Rule(_adaptive_pool, 3),
    nn.ZeroPad1d: _Rule(_constant_pad_module),
    nn.ZeroPad2d: _Rule(_constant_pad_module),
    nn.ZeroPad3d: _Rule(_constant_pad_module),
    nn.ConstantPad1d: _Rule(_constant_pad_module),
    nn.ConstantPad2d: _Rule(_constant_pad_module),
    nn.ConstantPad3d: _Rule(_constant_pad_module),
    nn.Flatten: _Rule(_reshape),
    nn.Linear: _Rule(_last_dim),
    nn.Bilinear: _Rule(_last_dim),
    nn.Softmax: _Rule(_softmax_module),
    nn.LogSoftmax: _Rule(_softmax_module),
    # norms keep the field; those whose statistics run over positions say so
    nn.BatchNorm1d: _Rule(_batch_norm_module),
    nn.BatchNorm2d: _Rule(_batch_norm_module),
    nn.BatchNorm3d: _Rule(_batch_norm_module),
    nn.SyncBatchNorm: _Rule(_batch_norm_module),
    nn.GroupNorm: _Rule(_group_norm),
    nn.InstanceNorm1d: _Rule(_instance_norm_module),
    nn.InstanceNorm2d: _Rule(_instance_norm_module),
    nn.InstanceNorm3d: _Rule(_instance_norm_module),
    nn.LayerNorm: _Rule(_layer_norm_module),
    nn.MultiheadAttention: _Rule(_multihead_attention, params=_MULTIHEAD_ATTENTION),
    **dict.fromkeys(_KEEP_MODULES, _KEEP),
    nn.ConvTranspose1d: _Rule(_transposed_module, 1),
    nn.ConvTranspose2d: _Rule(_transposed_module, 2),
    nn.ConvTranspose3d: _Rule(_transposed_module, 3),
    nn.Upsample: _Rule(_upsample_module),  # and UpsamplingNearest2d, UpsamplingBilinear2d
    nn.PixelShuffle: _Rule(_pixel_shuffle_module),
    nn.PixelUnshuffle: _Rule(_pixel_unshuffle_module),
    **dict.fromkeys((nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d),
                    _Rule(_reflection_pad_module)),
    **dict.fromkeys((nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
                    _Rule(_replication_pad_module)),
    **dict.fromkeys((nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d),
                    _Rule(_circular_pad_module)),
    nn.Unfold: _WINDOWS_TO_CHANNELS,
    nn.Fold: _WINDOWS_TO_CHANNELS,
    **dict.fromkeys(_BY_DATA_MODULES, _BY_DATA),
    **dict.fromkeys(_NOT_YET_MODULES, _REFUSE),
}  # fmt: skip


def _each_dim(
    name: str, rule: Callable[[int], _Rule], dims: Sequence[int] = (1, 2, 3), in_torch: bool = True
) -> dict[Any, _Rule]:
    """``{fn: rule(d)}`` for the function ``name.format(d)`` of every ``d`` in ``dims``.

    ``name`` is like ``"max_pool{}d"``; the functions come from ``torch.nn.functional`` and
    (``in_torch``) ``torch``, where this PyTorch has them.
    """
    modules = (F, torch) if in_torch else (F,)
    return {
        fn: rule(d)
        for d in dims
        for fn in (getattr(m, name.format(d), None) for m in modules)
        if fn is not None
    }


# Functions (``torch.*``, ``F.*``), looked up by identity.
_FUNCTION_RULES: dict[Any, _Rule] = {
    **dict.fromkeys(_LIKE_FUNCTIONS, _NO_FIELD),
    **_each_dim("conv{}d", lambda d: _Rule(_conv_function, d, _CONV)),
    **_each_dim("max_pool{}d", lambda d: _Rule(_pool_function, d, _MAX_POOL)),
    **_each_dim(
        "max_pool{}d_with_indices", lambda d: _Rule(_pool_function, d, _MAX_POOL), in_torch=False
    ),
    **_each_dim("avg_pool{}d", lambda d: _Rule(_pool_function, d, _AVG_POOL)),
    **_each_dim("lp_pool{}d", lambda d: _Rule(_pool_function, d, _LP_POOL), (1, 2), in_torch=False),
    **_each_dim("adaptive_avg_pool{}d", lambda d: _Rule(_adaptive_pool, d), in_torch=False),
    **_each_dim("adaptive_max_pool{}d", lambda d: _Rule(_adaptive_pool, d), in_torch=False),
    **_each_dim(
        "adaptive_max_pool{}d_with_indices", lambda d: _Rule(_adaptive_pool, d), in_torch=False
    ),
    F.pad: _Rule(_pad_function, params=_PAD),
    torch.constant_pad_nd: _Rule(_pad_function, params=_CONSTANT_PAD_ND),
    torch.flatten: _Rule(_reshape),
    torch.reshape: _Rule(_reshape),
    torch.squeeze: _Rule(_reshape),
    torch.unsqueeze: _Rule(_reshape),
    torch.permute: _Rule(_permute, params=_PERMUTE),
    torch.transpose: _Rule(_transpose, params=_TRANSPOSE),
    torch.swapaxes: _Rule(_transpose, params=_TRANSPOSE),
    torch.movedim: _Rule(_movedim, params=_MOVEDIM),
    torch.t: _Rule(_reverse_dims),
    torch.unflatten: _Rule(_reshape),
    torch.roll: _Rule(_roll, params=_ROLL),
    torch.matmul: _Rule(_matmul, params=_MATMUL),
    torch.bmm: _Rule(_matmul, params=_MATMUL),
    F.scaled_dot_product_attention: _Rule(_sdpa, params=_SDPA),
    torch.softmax: _Rule(_softmax_function, params=_SOFTMAX),
    torch.log_softmax: _Rule(_softmax_function, params=_SOFTMAX),
    torch.cat: _Rule(_concatenate, params=_CAT),
    torch.concat: _Rule(_concatenate, params=_CAT),
    torch.concatenate: _Rule(_concatenate, params=_CAT),
    torch.stack: _Rule(_stack, params=_CAT),
    torch.mean: _Rule(_reduce, params=_REDUCE),
    torch.sum: _Rule(_reduce, params=_REDUCE),
    torch.amax: _Rule(_reduce, params=_REDUCE),
    torch.amin: _Rule(_reduce, params=_REDUCE),
    torch.max: _Rule(_extreme, params=_EXTREME),
    torch.min: _Rule(_extreme, params=_EXTREME),
    torch.logsumexp: _Rule(_reduce, params=_REDUCE),
    torch.std: _Rule(_variance, params=_VARIANCE),
    torch.var: _Rule(_variance, params=_VARIANCE),
    torch.chunk: _Rule(_split, params=_CHUNK),
    torch.split: _Rule(_split, params=_SPLIT),
    torch.tensor_split: _Rule(_split, params=_TENSOR_SPLIT),
    torch.unbind: _Rule(_unbind, params=_UNBIND),
    F.linear: _Rule(_last_dim),
    F.softmax: _Rule(_softmax_function, params=_SOFTMAX),
    F.log_softmax: _Rule(_softmax_function, params=_SOFTMAX),
    F.normalize: _Rule(_normalize, params=_NORMALIZE),
    F.batch_norm: _Rule(_batch_norm_function, params=_BATCH_NORM),
    F.instance_norm: _Rule(_instance_norm_function, params=_INSTANCE_NORM),
    F.group_norm: _Rule(_group_norm),
    F.layer_norm: _Rule(_layer_norm_function, params=_LAYER_NORM),
    **dict.fromkeys(_KEEP_FUNCTIONS, _KEEP),
    **_each_dim("conv_transpose{}d", lambda d: _Rule(_transposed_function, d, _CONV_TRANSPOSE)),
    F.interpolate: _Rule(_interpolate_function, params=_INTERPOLATE),
    F.upsample: _Rule(_interpolate_function, params=_UPSAMPLE),
    F.pixel_shuffle: _Rule(_pixel_shuffle_function, params=_PIXEL_SHUFFLE),
    F.pixel_unshuffle: _Rule(_pixel_unshuffle_function, params=_PIXEL_UNSHUFFLE),
    F.unfold: _WINDOWS_TO_CHANNELS,
    F.fold: _WINDOWS_TO_CHANNELS,
    **dict.fromkeys(_BY_DATA_FUNCTIONS, _BY_DATA),
    **dict.fromkeys(_NOT_YET_FUNCTIONS, _REFUSE),
}

# Functions of libraries the engine does not import, by ``module.qualname``.
_QUALIFIED_FUNCTION_RULES: dict[str, _Rule] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": _KEEP,
}

# Tensor methods, operators (``x + y`` is ``Tensor.add``) and properties, by name.
_METHOD_RULES: dict[str, _Rule] = {
    **dict.fromkeys(_SHAPE_METHODS, _NO_FIELD),
    **dict.fromkeys(_RESHAPE_METHODS, _Rule(_reshape)),
    "__getitem__": _Rule(_index, params=_INDEX),
    "__setitem__": _Rule(_setitem, params=_SETITEM),
    "permute": _Rule(_permute, params=_PERMUTE),
    "transpose": _Rule(_transpose, params=_TRANSPOSE),
    "swapaxes": _Rule(_transpose, params=_TRANSPOSE),
    "movedim": _Rule(_movedim, params=_MOVEDIM),
    "t": _Rule(_reverse_dims),
    "T": _Rule(_reverse_dims),
    "mT": _Rule(_swap_last),
    "mH": _Rule(_swap_last),
    "roll": _Rule(_roll, params=_ROLL),
    "matmul": _Rule(_matmul, params=_MATMUL),
    "__matmul__": _Rule(_matmul, params=_MATMUL),
    "bmm": _Rule(_matmul, params=_MATMUL),
    "mean": _Rule(_reduce, params=_REDUCE),
    "sum": _Rule(_reduce, params=_REDUCE),
    "amax": _Rule(_reduce, params=_REDUCE),
    "amin": _Rule(_reduce, params=_REDUCE),
    "max": _Rule(_extreme, params=_EXTREME),
    "min": _Rule(_extreme, params=_EXTREME),
    "logsumexp": _Rule(_reduce, params=_REDUCE),
    "std": _Rule(_variance, params=_VARIANCE),
    "var": _Rule(_variance, params=_VARIANCE),
    "chunk": _Rule(_split, params=_CHUNK),
    "split": _Rule(_split, params=_SPLIT),
    "tensor_split": _Rule(_split, params=_TENSOR_SPLIT),
    "unbind": _Rule(_unbind, params=_UNBIND),
    "softmax": _Rule(_softmax_function, params=_SOFTMAX),
    "log_softmax": _Rule(_softmax_function, params=_SOFTMAX),
    **dict.fromkeys(_KEEP_METHODS, _KEEP),
}

# What an op that is in no table gets told, per kind of call.
_UNKNOWN = {
    "module": (
        "unknown layer type for receptive fields. featurelens knows convolutions (also "
        "transposed), pooling, padding, upsampling, pixel shuffle, flatten, linear and an "
        "allow-list of layers that keep the field "
        "(activations, norms, dropout); use featurelens.empirical_receptive_field here."
    ),
    "function": (
        "unknown operation for receptive fields; use featurelens.empirical_receptive_field "
        "for this model."
    ),
    "method": "unknown tensor method for receptive fields; use empirical_receptive_field.",
    "property": "unknown tensor property for receptive fields; use empirical_receptive_field.",
}


def _module_rule(module: nn.Module) -> _Rule | None:
    """The table entry of a module, along its class's MRO (None: look inside it)."""
    for cls in type(module).__mro__:
        rule = _MODULE_RULES.get(cls)
        if rule is not None:
            return rule
    return None


def _function_rule(op: Any) -> _Rule | None:
    try:
        rule = _FUNCTION_RULES.get(op)
    except TypeError:  # an unhashable callable
        rule = None
    if rule is None:
        qualified = f"{getattr(op, '__module__', '')}.{getattr(op, '__qualname__', '')}"
        rule = _QUALIFIED_FUNCTION_RULES.get(qualified)
    return rule


def _classify(func: Any) -> tuple[str, Any]:
    """What a ``__torch_function__`` call is: ``("property", name)`` for ``x.shape``,
    ``("method", name)`` for tensor methods and operators, ``("function", func)`` else.
    """
    if type(func).__name__ == "method-wrapper" and getattr(func, "__name__", "") == "__get__":
        return "property", getattr(getattr(func, "__self__", None), "__name__", "?")
    head, _, tail = (getattr(func, "__qualname__", "") or "").partition(".")
    if head in ("Tensor", "TensorBase", "_TensorBase") and tail and "." not in tail:
        return "method", func.__name__
    return "function", func


# --------------------------------------------------------------------------------------------
# The propagation: the model runs eagerly, every call dispatches to its rule


@dataclass
class _Output:
    """What a layer's first call returned: a tensor (its field, or None: a constant), a
    list/tuple of tensors (what makes each element) or something else.
    """

    kind: str  # "tensor", "list", "tuple", "inside" (of a module handled as a whole), "other"
    field: _Field | None = None
    shape: tuple[int, ...] = ()
    makers: tuple[str, ...] = ()
    owner: str = ""


class _Tracer(TorchFunctionMode):
    """Runs with the model on a zero input: propagates a field beside every tensor computed
    from the input, through the op tables, and records each layer's first output.

    Module hooks (:func:`graph.module_calls`, installed around the forward by
    :func:`_propagate`) give module boundaries: a module whose class has a rule is handled as
    a whole (the calls inside it are not looked at: a ``Conv2d`` is not also its
    ``F.conv2d``), any other module is looked into. The mode sees each top-level torch call
    once (the calls a function makes inside are not intercepted again). Tensors are keyed by
    identity without being kept alive (:class:`WeakIdKeyDictionary`), so an id is never
    confused with a dead tensor's.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], target: str | None,
                 stop: bool) -> None:  # fmt: skip
        super().__init__()
        self.model_name = type(model).__name__
        self.input_shape = input_shape
        self.target = target
        self.stop = stop  # at the target's output; else count its calls to the end (passive)
        self.fields: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.viewed: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensors that have views
        self.makers: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> module name
        self.running: list[tuple[str, bool]] = []  # (name, handled as a whole) of modules
        self.quiet = 0  # > 0 inside a module handled as a whole
        self.busy = False  # our own code runs: its torch calls are not the model's
        self.passive = False
        self.outputs: dict[str, _Output] = {}
        self.calls: dict[str, int] = {}
        self.order: list[str] = []
        self._kinds: dict[Any, tuple[str, Any]] = {}

    # ---- modules ---------------------------------------------------------------------------
    def before(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.passive:
            return
        whole = not self.quiet and _module_rule(module) is not None
        self.running.append((name, whole))
        if whole:
            self.quiet += 1

    def after(self, name: str, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if self.passive:
            self.calls[name] = self.calls.get(name, 0) + 1
            return
        _, whole = self.running.pop()
        self.busy = True
        try:
            if whole:
                self.quiet -= 1
                self._module_call(name, module, args, kwargs, out)
            self._record(name, out)
        finally:
            self.busy = False
        if name and name == self.target and self.calls.get(name) == 1:
            if self.stop:
                raise StopForward
            self.passive = True

    def _module_call(
        self, name: str, module: nn.Module, args: tuple, kwargs: dict, out: Any
    ) -> None:
        rule = _module_rule(module)
        assert rule is not None
        inputs, constants = self._arg_fields(args, kwargs)
        if not inputs:
            self._assign(out, None)
            return
        bound = {} if rule.params is None else rule.params.bind(args, kwargs)
        call = _Call(module, bound, inputs, out, rule.ndim, self.input_shape, "module", name,
                     constants)  # fmt: skip
        self._assign(out, _with_roles(rule, rule.handler(call), out))

    def _record(self, name: str, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            self.makers[out] = name
        if not name:
            return
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] > 1:
            return
        if self.quiet:
            owner = next((n for n, whole in reversed(self.running) if whole), "")
            self.outputs[name] = _Output("inside", owner=owner)
        elif isinstance(out, torch.Tensor):
            self.outputs[name] = _Output("tensor", self.fields.get(out), tuple(out.shape))
            self.order.append(name)
        elif is_tensor_sequence(out):
            makers = tuple(self.makers.get(e, "") for e in out)
            kind = "list" if isinstance(out, list) else "tuple"
            self.outputs[name] = _Output(kind, makers=makers)
        else:
            self.outputs[name] = _Output("other", owner=type(out).__name__)

    # ---- torch calls -----------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.quiet or self.busy or self.passive:
            return func(*args, **kwargs)
        result = func(*args, **kwargs)
        self.busy = True
        try:
            self._call(func, args, kwargs, result)
        finally:
            self.busy = False
        return result

    def _call(self, func: Any, args: tuple, kwargs: dict, result: Any) -> None:
        inputs, constants = self._arg_fields(args, kwargs)
        if not inputs:
            return  # a constant of the model: no field
        kind, op = self._kinds.get(func) or self._kinds.setdefault(func, _classify(func))
        name = op if kind != "function" else getattr(op, "__name__", "")
        call = _Call(op, {}, inputs, result, None, self.input_shape, kind)
        if kind != "function" and name in _VALUE_READERS or func in (
                torch.equal, torch.allclose, torch.is_nonzero):  # fmt: skip
            raise TraceError(self._value_dependent(call, "reads the values of a tensor"))
        if name in _VALUE_SHAPED or (func is torch.where and len(args) + len(kwargs) == 1):
            raise TraceError(self._value_dependent(call, "makes a tensor whose shape depends "
                                                         "on the values of a tensor"))  # fmt: skip
        rule = _function_rule(op) if kind == "function" else _METHOD_RULES.get(op)
        if rule is None:
            if kind == "property" and not isinstance(result, torch.Tensor):
                return  # metadata: x.dtype, x.device, ...
            raise UnsupportedOpError(f"{call.where()}: {_UNKNOWN[kind]}")
        bound = {} if rule.params is None else rule.params.bind(args, kwargs)
        call = replace(call, args=bound, ndim=rule.ndim, constants=constants)
        out = _with_roles(rule, rule.handler(call), result)
        inplace = name == "__setitem__" or (
            isinstance(result, torch.Tensor)
            and bool(args)
            and result is args[0]
            and ((name.endswith("_") and not name.startswith("__")) or name.startswith("__i"))
        )
        target = args[0] if name == "__setitem__" else result
        if inplace:
            self._check_alias(call, target, out)
        self._assign(target, out)
        if isinstance(result, torch.Tensor) and result._base is not None:
            self.viewed[result._base] = True

    def _value_dependent(self, call: _Call, what: str) -> str:
        return (
            f"cannot trace {self.model_name} on a concrete input: {call.where()} {what} "
            "computed from the input (value-dependent control flow), and the zero input used "
            "for tracing may take another path than real data. Analytic receptive fields need "
            "a forward() whose path does not depend on the input's values; "
            "featurelens.empirical_receptive_field still works on this model, and so do "
            "projections (without the receptive-field crop) and scans."
        )

    def _check_alias(self, call: _Call, target: torch.Tensor, out: _Out) -> None:
        """Refuse an in-place update that changes the field of memory another tensor shares
        (the other tensor's field would silently go stale).
        """
        new = out[0] if isinstance(out, tuple) else out
        old = self.fields.get(target)
        same = (old is None and new is None) or (
            old is not None and new is not None and old.same_as(new))  # fmt: skip
        if same:
            return
        if target._base is not None or target in self.viewed:
            raise call.unsupported(
                "updates in place a tensor that shares memory with another (a view), which "
                "changes what both depend on; not followed"
            )

    def _arg_fields(
        self, args: Any, kwargs: Mapping[str, Any]
    ) -> tuple[tuple[tuple[_Field, torch.Tensor], ...], tuple[torch.Tensor, ...]]:
        found: list[tuple[_Field, torch.Tensor]] = []
        constants: list[torch.Tensor] = []

        def visit(a: Any) -> None:
            if isinstance(a, torch.Tensor):
                f = self.fields.get(a)
                if f is None:
                    constants.append(a)
                else:
                    found.append((f, a))
            elif isinstance(a, (list, tuple)):
                for x in a:
                    visit(x)
            elif isinstance(a, dict):
                for x in a.values():
                    visit(x)

        visit(args)
        visit(kwargs)
        return tuple(found), tuple(constants)

    def _assign(self, result: Any, out: _Out) -> None:
        if isinstance(result, torch.Tensor):
            f = out[0] if isinstance(out, tuple) else out
            if f is None:
                self.fields.pop(result, None)
            else:
                self.fields[result] = f
        elif isinstance(result, (list, tuple)):
            outs = out if isinstance(out, tuple) else (out,) + (None,) * (len(result) - 1)
            for r, f in zip(result, outs):
                if isinstance(r, torch.Tensor):
                    self._assign(r, f)

    def layers(self) -> list[str]:
        """Addressable layers seen so far: called once, returning a tensor, in order."""
        return [n for n in self.order if self.calls.get(n) == 1]


def _with_roles(rule: _Rule, out: _Out, result: Any) -> _Out:
    """A kernel op's output ``(N, C, *ndim locations)`` has those roles, whatever its handler
    kept (a signal the model unsqueezed to ``(N, 1, L, 1)`` gets its channel dim here).
    """
    if rule.ndim is None:
        return out
    first = out[0] if isinstance(out, tuple) else out
    if not isinstance(first, _Field) or len(first.dims) != rule.ndim + 2:
        return out
    fixed = replace(first, roles=(_BATCH, _CHANNEL) + (_LOCATION,) * rule.ndim)
    return (fixed, *out[1:]) if isinstance(out, tuple) else fixed


def _propagate(
    model: nn.Module, input_shape: Sequence[int], stop_at: str | None = None, strict: bool = True
) -> _Tracer:
    """Run ``model`` (unwrapped) on a zero input of ``input_shape`` and propagate fields, up to
    ``stop_at``'s output when given.

    Where torch.fx says the layer is called once, the forward stops at its output; otherwise
    (a model torch.fx cannot trace) the rest runs without analysis, to count its calls.
    """
    model = unwrap(model)
    shape = check_input_shape(input_shape)
    stop = True
    if stop_at is not None:
        get_layer(model, stop_at)
        try:
            traced: Traced | None = trace(model)
        except (TraceError, UsageError):
            traced = None
        if traced is not None and stop_at in traced.reused:
            raise LayerError(reused_message(stop_at, traced.reused[stop_at], list(traced.outputs)))
        stop = traced is not None and stop_at in traced.outputs
    tracer = _Tracer(model, shape, stop_at, stop)
    x = zero_input(model, shape)
    tracer.fields[x] = _Field.identity(shape[1:])
    with (
        preserved(model, freeze=False),
        torch.no_grad(),
        module_calls(model, tracer.before, tracer.after),
    ):
        try:
            with tracer:
                model(x)
        except StopForward:
            pass
        except ReceptiveFieldError as exc:
            if strict:
                raise
            warnings.warn(
                f"receptive fields stop at {exc}. Layers after it are left out.", stacklevel=4
            )
        except (LayerError, UsageError):
            raise
        except Exception as exc:
            if tracer.passive:  # after the layer only its calls are counted: its field stands
                pass
            elif isinstance(exc, (RuntimeError, ValueError)):
                raise rejected_shape(shape, exc) from exc
            else:
                raise
    return tracer


# --------------------------------------------------------------------------------------------
# Layouts


def _layout_of(f: _Field, shape: tuple[int, ...]) -> Layout | str:
    """The layout of a layer output ``(1, *shape[1:])`` with field ``f``, or why there is none."""
    nd = len(shape)
    if nd < 2:
        return f"its output of shape {shape} has no dim after the batch dim"
    if f.roles[0] != _BATCH:
        return "its dim 0 is not the batch dim (the model moved the batch elsewhere)"
    if _is_location(f.dims[0]):
        return (
            "its batch dim also holds locations (the windows of a window partition): address "
            "the layer after the windows are merged back"
        )
    channels = [d for d in range(1, nd) if f.roles[d] == _CHANNEL]
    if not channels:  # no op said so, but one dim alone holds neither batch nor locations
        channels = [
            d for d in range(1, nd)
            if f.dims[d] is None and f.roles[d] not in (_BATCH, _LOCATION)
        ]  # fmt: skip
    if len(channels) != 1:
        which = "no dim" if not channels else f"dims {channels}"
        return f"{which} of its output {shape[1:]} hold channels, by the trace"
    c = channels[0]
    axes: list[tuple[int, ...]] = []
    grid: list[tuple[int, ...]] = []
    prefix: list[int] = []
    for d in range(1, nd):
        if d == c:
            continue
        label = f.dims[d]
        if label is None:
            if shape[d] != 1:
                return f"its dim {d} (size {shape[d]}) holds neither channels nor locations"
            axes.append(())
            grid.append(())
            prefix.append(0)
        elif isinstance(label, _Folded):
            return f"its dim {d} holds attention scores over locations, not locations"
        elif isinstance(label, int):
            axes.append((label,))
            grid.append((f.lengths[label],))
            prefix.append(0)
        else:
            whole = len(label.axes) == len(label.parts) and all(
                s == 1 and c_ == f.lengths[a] for a, s, c_ in label.parts
            )
            if not whole:
                return (
                    f"its dim {d} holds part of an axis's locations (a window partition): "
                    "address the layer after the windows are merged back"
                )
            axes.append(label.axes)
            grid.append(label.grid())
            prefix.append(label.prefix)
    if _is_location(f.dims[c]):
        return f"its channel dim {c} also holds locations"
    held = {a for group in axes for a in group}
    lost = [a for a, n in enumerate(f.lengths) if n > 1 and a not in held]
    if lost:
        return f"the locations of input axis {lost[0]} are in no dim of its output"
    locations = tuple(d for d in range(1, nd) if d != c)
    return Layout(tuple(shape[1:]), c, locations, tuple(axes), tuple(grid), tuple(prefix))


def _layout_error(layer: str, shape: tuple[int, ...], why: str) -> LayoutError:
    dims = ", ".join(map(str, shape[1:]))
    return LayoutError(
        f"cannot establish the layout of layer {layer!r} (output (N, {dims})): {why}. State "
        "which dim holds its channels with channel_dim= (every other dim after the batch is "
        "then a location), or address another layer"
    )


def _to_value(f: _Field, spatial: tuple[int, ...], layout: Layout) -> ReceptiveField:
    prefix_bounds: tuple[tuple[int, int], ...] = ()
    for label in f.dims:
        if isinstance(label, _Loc) and label.prefix:
            spans = {a: (lo, hi) for a, lo, hi in zip(label.axes, label.prefix_first,
                                                      label.prefix_last)}  # fmt: skip
            prefix_bounds = tuple(
                (int(s[0]), int(s[1])) if (s := spans.get(a)) and s[1] >= s[0] else (0, -1)
                for a in range(len(spatial))
            )
    size, stride, padding = zip(*(f.reported(axis) for axis in range(len(f.lengths))))
    wraps = any(
        ((lo < 0) | (hi >= n))[hi >= lo].any() for lo, hi, n in zip(f.first, f.last, spatial)
    )
    return ReceptiveField(
        size=size,
        stride=stride,
        padding=padding,
        input_shape=tuple(spatial),
        output_shape=layout.location_shape,
        is_global=f.covers(),
        aligned=f.aligned,
        layout=layout,
        statistics=f.statistics,
        anchored=f.anchored,
        exact=not f.notes,
        note="; ".join(f.notes),
        bounds=tuple(
            tuple((int(a), int(b)) if b >= a else (0, -1) for a, b in zip(fa, la))
            for fa, la in zip(f.low, f.high)
        ),
        arcs=tuple(
            tuple((int(a), int(b)) if b >= a else (0, -1) for a, b in zip(fa, la))
            for fa, la in zip(f.first, f.last)
        )
        if wraps
        else (),
        prefix_bounds=prefix_bounds,
    )


# --------------------------------------------------------------------------------------------
# Public entry points


@public
def receptive_fields(
    model: nn.Module, input_shape: Sequence[int], *, strict: bool = True
) -> ReceptiveFieldTable:
    """Receptive fields of every addressable layer, in execution order.

    Parameters
    ----------
    model
        Any ``nn.Module`` (a ``torch.compile``, ``DataParallel`` or
        ``DistributedDataParallel`` wrapper is unwrapped); it runs once on zeros and is left
        exactly as given.
    input_shape
        ``(C, *spatial)`` without the batch dimension, e.g. ``(3, 224, 224)``.
    strict
        With False, an unsupported operation, an unaligned merge or value-dependent control
        flow ends the table with a warning naming it, instead of an error: the layers before
        it are returned.

    Returns
    -------
    ReceptiveFieldTable
        A ``dict`` ``{layer name: ReceptiveField}`` for the layers the forward pass calls once,
        in the order they return; it shows as a table in a notebook. Left out: layers whose output carries no field (a tuple, or a value
        that does not depend on the input) or has no layout the trace can establish (attention
        scores, the windows of a window partition).

    Raises
    ------
    TraceError
        The forward's path depends on the input's values (the message names the line).
    UnsupportedOpError
        An operation whose effect on the receptive field is unknown (named, with its line).
    NotAlignedError
        Branches with different effective strides merge.
    UsageError
        ``input_shape`` is not ``(C, *spatial)`` or the model rejects it (a ``ValueError``).
    """
    tracer = _propagate(model, input_shape, strict=strict)
    spatial = tracer.input_shape[1:]
    out = ReceptiveFieldTable()
    for name in tracer.layers():
        entry = tracer.outputs[name]
        if entry.field is None:
            continue
        layout = _layout_of(entry.field, entry.shape)
        if isinstance(layout, Layout):
            out[name] = _to_value(entry.field, spatial, layout)
    return out


def _layer_output(
    model: nn.Module, input_shape: Sequence[int], layer: str
) -> tuple[_Tracer, _Output]:
    """The propagation up to ``layer`` and what the layer returned.

    Raises
    ------
    LayerError
        Unknown, never called, or called several times.
    ReceptiveFieldError
        The layer returns a list/tuple, runs inside a module handled as a whole, or returns
        something else than tensors; or the propagation fails before it.
    """
    tracer = _propagate(model, input_shape, stop_at=layer)
    calls = tracer.calls.get(layer, 0)
    if calls > 1:
        raise LayerError(reused_message(layer, calls, tracer.layers()))
    entry = tracer.outputs.get(layer)
    if entry is None:
        raise LayerError(
            f"layer {layer!r} is never called by forward() on inputs of shape "
            f"{tuple(input_shape)}; valid names: "
            + ", ".join(repr(v) for v in tracer.layers()[:40])
        )
    if entry.kind in ("list", "tuple"):
        raise ReceptiveFieldError(
            sequence_message(layer, entry.kind, [
                element_maker(m or None, tracer.calls.get(m, 1)) for m in entry.makers])
        )  # fmt: skip
    if entry.kind == "inside":
        raise ReceptiveFieldError(
            f"layer {layer!r} runs inside {entry.owner!r}, which featurelens handles as one "
            f"operation: address {entry.owner!r} or a layer after it"
        )
    if entry.kind != "tensor":
        raise ReceptiveFieldError(
            f"layer {layer!r} returns {entry.owner}, not a tensor: address the layer that "
            "makes the tensor you want"
        )
    return tracer, entry


@public
def receptive_field(
    model: nn.Module, input_shape: Sequence[int], layer: str, *, channel_dim: int | None = None
) -> ReceptiveField:
    """Receptive field of one layer (see :func:`receptive_fields`).

    Only the model up to ``layer`` is analysed (the forward stops there), so operations after
    it do not matter, nor does Python control flow on shapes before it.

    Parameters
    ----------
    model, input_shape
        As for :func:`receptive_fields`.
    layer
        Dotted ``named_modules()`` name (of the unwrapped model).
    channel_dim
        The dim of the layer's output that you expect to hold its channels; checked against
        the trace (None: not checked).

    Raises
    ------
    LayerError
        The model has no addressable layer ``layer``.
    ReceptiveFieldError
        No analytic field: the forward's path depends on the input's values
        (:class:`TraceError`), an operation has no known field (:class:`UnsupportedOpError`),
        branches do not align (:class:`NotAlignedError`), or the layer's output is not one
        tensor that depends on the input (the message says which layer makes each element of
        a list or tuple).
    LayoutError
        The trace cannot tell which dims of the output hold channels and locations.
    UsageError
        ``input_shape`` is not ``(C, *spatial)``, the model rejects it, or ``channel_dim``
        does not match the trace.
    """
    tracer, entry = _layer_output(model, input_shape, layer)
    f = entry.field
    if f is None:
        raise ReceptiveFieldError(
            f"layer {layer!r} does not output a tensor with a receptive field (its output does "
            "not depend on the input's positions)"
        )
    layout = _layout_of(f, entry.shape)
    if not isinstance(layout, Layout):
        raise _layout_error(layer, entry.shape, layout)
    layout.check_channel_dim(channel_dim, layer)
    return _to_value(f, tracer.input_shape[1:], layout)


def layer_layout(
    model: nn.Module, input_shape: Sequence[int], layer: str, channel_dim: int | None = None
) -> Layout:
    """The layout of ``layer``'s output: which dim holds channels, which locations.

    Taken from the trace (the same truncated propagation as :func:`receptive_field`, without
    building the field's value); a caller's ``channel_dim`` is checked against it. Where the
    trace cannot say (an operation it does not know before the layer, a dim it cannot place),
    a stated ``channel_dim`` gives :meth:`Layout.stated` (every other dim a location, not
    mapped to the input).

    Parameters
    ----------
    model, input_shape, layer
        As for :func:`receptive_field`.
    channel_dim
        The dim that holds the channels, or None to take the trace's.

    Returns
    -------
    Layout

    Raises
    ------
    LayoutError
        The trace cannot establish the layout and ``channel_dim`` is None.
    UsageError
        ``channel_dim`` does not match the trace or the output's rank.
    LayerError
        An unknown or ambiguous layer.
    """
    model = unwrap(model)
    why = ""
    shape: tuple[int, ...] | None = None
    try:
        _, entry = _layer_output(model, input_shape, layer)
        shape = entry.shape
        if entry.field is None:
            why = "its output does not depend on the input"
        else:
            layout = _layout_of(entry.field, entry.shape)
            if isinstance(layout, Layout):
                layout.check_channel_dim(channel_dim, layer)
                return layout
            why = layout
    except ReceptiveFieldError as exc:
        why = f"the trace stops before it ({type(exc).__name__}: {exc})"
    if shape is None:
        shape = _output_shape(model, check_input_shape(input_shape), layer)
    if channel_dim is not None:
        return Layout.stated(shape[1:], channel_dim)
    raise _layout_error(layer, shape, why)


def _output_shape(model: nn.Module, shape: tuple[int, ...], layer: str) -> tuple[int, ...]:
    """The layer's output shape on a zero batch of one (a plain truncated forward)."""
    from featurelens.graph import capture

    x = zero_input(model, shape)
    with preserved(model, freeze=False), torch.no_grad(), capture(model, [layer]) as run:
        try:
            return tuple(run(x)[layer].shape)
        except (RuntimeError, ValueError) as exc:
            if isinstance(exc, (UsageError, LayerError)):
                raise
            raise rejected_shape(shape, exc) from exc


def try_receptive_field(
    model: nn.Module, input_shape: Sequence[int], layer: str
) -> tuple[ReceptiveField | None, str]:
    """The layer's receptive field, or ``(None, reason)`` when it cannot be computed.

    The one place that decides what "no analytic receptive field here" means: the engine
    raises a :class:`ReceptiveFieldError` (the forward's path depends on values, an operation
    has no known field, branches do not align, the layer outputs no single tensor of the
    input) or a :class:`UsageError` about the input shape (one the engine cannot analyse, such
    as inputs without spatial axes, or one the model rejects). Projections, figures and scans
    fall back on the whole input then and say ``reason``. An unknown layer name is not such a
    case: :class:`LayerError` propagates, and so does :class:`LayoutError` (a caller must not
    read such a layer's channels at a guessed dim) and anything else.

    Returns
    -------
    tuple
        ``(field, "")`` or ``(None, "TypeName: message")``.
    """
    try:
        return receptive_field(model, input_shape, layer), ""
    except (ReceptiveFieldError, UsageError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def receptive_field_table(fields: dict[str, ReceptiveField]) -> str:
    """A plain-text table: layer, output shape, size, stride, padding, flags.

    Parameters
    ----------
    fields
        ``{layer name: ReceptiveField}``, as :func:`receptive_fields` returns.

    Returns
    -------
    str
        One header line, a rule, and one line per layer. The output column is the layer's own
        location shape (``-`` for logits), the others are per input axis: ``-`` for the size,
        stride and padding of an irregular axis (flag ``irregular``), flag ``wraps`` where a
        location sees both ends of an axis.
    """
    rows = [("layer", "output", "size", "stride", "padding", "flags")]
    for name, rf in fields.items():
        flags = ",".join(rf._flags())
        if rf.layout is not None and rf.layout.kind != "channels_first":
            flags = ",".join(f for f in (rf.layout.kind.replace("_", "-"), flags) if f)

        def fmt(t: tuple[int | None, ...]) -> str:
            return "x".join("-" if v is None else str(v) for v in t) or "-"

        rows.append(
            (name, fmt(rf.output_shape), fmt(rf.size), fmt(rf.stride), fmt(rf.padding), flags)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class ReceptiveFieldTable(dict[str, ReceptiveField]):
    """``{layer name: ReceptiveField}`` in execution order, as :func:`receptive_fields` returns.

    A plain ``dict`` in every way (it compares equal to one, copies, pickles and serialises as
    one); in a notebook it shows as a table, one row per layer (``_repr_html_``), and
    IPython's plain-text display prints :func:`receptive_field_table` instead of a long dict.
    """

    def table(self) -> str:
        """The plain-text table of :func:`receptive_field_table`."""
        return receptive_field_table(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text("ReceptiveFieldTable(...)" if cycle else self.table())

    def _repr_html_(self) -> str:
        def fmt(t: tuple[int | None, ...]) -> str:
            return " &times; ".join("&ndash;" if v is None else str(v) for v in t)

        head = "".join(
            f"<th>{h}</th>" for h in ("layer", "output", "size", "stride", "padding", "flags")
        )
        rows = "".join(
            f"<tr><td><code>{html.escape(name)}</code></td><td>{fmt(rf.output_shape)}</td>"
            f"<td>{fmt(rf.size)}</td><td>{fmt(rf.stride)}</td><td>{fmt(rf.padding)}</td>"
            f"<td>{html.escape(', '.join(rf._flags()))}</td></tr>"
            for name, rf in self.items()
        )
        return (
            f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
            f"<p>{len(self)} layers; &ndash;: irregular axis (no single size, stride, padding)</p>"
        )
