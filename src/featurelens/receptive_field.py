"""Exact, analytic receptive fields of every layer of a traced model.

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

Beside the geometry, every location's exact bounds are tracked: each op says which locations
of its input every output location reads (:meth:`_Field.gather`; a sliding window is one case).
That is what makes upsampling exact: transposed convolutions, interpolation (read off
PyTorch's own kernel), pixel shuffle and adaptive pooling with unequal windows read lists of
locations that no single (size, stride, padding) describes. Those axes are *irregular*: their
geometry is None from there on (:attr:`ReceptiveField.regular`) while :meth:`ReceptiveField.region`
stays exact. Circular padding makes a border location read both ends of an axis: the bounds
are then kept as an arc of the axis seen as a circle too (:meth:`ReceptiveField.regions`).

An operation the engine does not know raises :class:`UnsupportedOpError` naming it; the engine
never guesses.

How it runs: the model is traced once with torch.fx, and :class:`_Propagator` (an
``fx.Interpreter``) runs the graph on a zero input, computing each node's field (:class:`_Field`)
beside its value. It only dispatches: three tables map an op to its :class:`_Rule`, module
classes in ``_MODULE_RULES`` (along the MRO), functions in ``_FUNCTION_RULES`` (by identity) and
tensor methods in ``_METHOD_RULES`` (by name). A rule holds a typed handler ``(call: _Call) ->
field``, the number of spatial dims the op works on, and the :class:`_Params` that bind the op's
arguments to names once per op kind, so that ``x.chunk(2, 1)``, ``x.chunk(2, dim=1)`` and
``torch.chunk(x, 2, 1)`` read the same ``dim``.
"""

from __future__ import annotations

import itertools
import operator
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias, TypeVar

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from featurelens.errors import (
    NotAlignedError,
    ReceptiveFieldError,
    UnsupportedOpError,
    UsageError,
)
from featurelens.graph import model_device, preserved, trace
from featurelens.unit import check_location

__all__ = [
    "NotAlignedError",
    "ReceptiveField",
    "UnsupportedOpError",
    "receptive_field",
    "receptive_fields",
    "try_receptive_field",
]


# --------------------------------------------------------------------------------------------
# The value


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one layer, per spatial axis (Distill 2019 definitions).

    Output location ``u`` sees the unclipped input interval
    ``[u*stride - padding, u*stride - padding + size - 1]`` on each *regular* axis.

    Attributes
    ----------
    size, stride, padding
        One entry per spatial axis of the input: an int where one Distill geometry describes
        the axis, ``None`` on an *irregular* axis (see :attr:`regular`). None is not a number
        on purpose: arithmetic on it fails loudly instead of computing a wrong crop.
    input_shape
        Spatial shape of the input the field was computed for.
    output_shape
        Spatial shape of the layer's output, one entry per input axis. An axis that the layer
        has pooled away or flattened counts as length 1, so a classifier's logits have
        ``output_shape == (1, 1)`` and location ``(0, 0)``.
    is_global
        Every unit of the layer depends on the whole input (global pooling, flatten + linear,
        squeeze-and-excitation gating, ...); :meth:`region` then returns the whole input.
    aligned
        False where merged regular branches have different centres (Distill's alignment
        check), or where one location is broadcast over a map without seeing the whole input;
        the region is then the union of the branches' regions. Only judged between regular
        branches.
    bounds
        Exact input bounds ``(first, last)`` (inclusive) of every output location, per axis;
        ``(0, -1)`` for a location that sees only padding. :meth:`region` reads them: away from
        the borders they equal the clipped Distill interval, at the borders they are exact
        where the formula is not (explicit pads, crops, dilated taps that skip pixels,
        reflected or replicated borders). They are bounding boxes: where a location sees both
        ends of an axis (circular padding, ``torch.roll``) they span the axis.
    channel_dim
        The output tensor's channel dim: 1 for ``(N, C, *spatial)``, the last dim for a
        channels-last layer (see :meth:`check_channels_first`).
    statistics
        The operations before the layer that normalise over positions (GroupNorm,
        InstanceNorm, LayerNorm over spatial dims, BatchNorm with batch statistics). Their
        statistics do not count as dependencies (the empirical verifier agrees), but a unit
        computed on a crop of the input sees other statistics: projections do not crop then.
    arcs
        Where some location sees both ends of an axis (:attr:`wraps`): per axis and location
        an arc of the axis, seen as a circle, that holds what the location reads, as
        ``(first, last)`` positions read modulo ``n`` (``(-1, 1)`` is positions ``n - 1``, 0
        and 1; the shortest such arc where the reads wrap as a circular border does).
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
    channel_dim: int = 1
    statistics: tuple[str, ...] = field(default=(), compare=False)
    arcs: tuple[tuple[tuple[int, int], ...], ...] = field(default=(), repr=False, compare=False)

    def check_channels_first(self, layer: str) -> None:
        """Refuse a layer whose output is not ``(N, C, *spatial)``.

        Scans and projections read channels at dim 1; a channels-last layer (``(N, H, W, C)``
        inside ConvNeXt blocks) would be misread silently.

        Raises
        ------
        UsageError
            The layer's channels are not at dim 1 (a ``ValueError``).
        """
        if self.channel_dim != 1:
            raise UsageError(
                f"layer {layer!r} outputs its channels at dim {self.channel_dim} (channels-last, "
                "e.g. after permute(0, 2, 3, 1)); featurelens reads channels at dim 1: address "
                "the layer after the permute back to (N, C, *spatial), such as the block's output"
            )

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
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

    def interval(self, location: Sequence[int] | int) -> tuple[tuple[int, int], ...]:
        """Unclipped, inclusive ``(first, last)`` input positions per axis for ``location``.

        Raises
        ------
        ReceptiveFieldError
            An axis is irregular (:attr:`regular`): no Distill interval describes it; use
            :meth:`region` or :meth:`regions`, which are exact.
        """
        loc = self._check_location(location)
        if not self.regular:
            axes = [a for a, v in enumerate(zip(self.size, self.stride, self.padding))
                    if None in v]  # fmt: skip
            raise ReceptiveFieldError(
                f"the receptive field is irregular on axis {', '.join(map(str, axes))} (past "
                "upsampling, unequal adaptive pooling or a wrapped border): no (size, stride, "
                "padding) interval describes it. Use region(location) or regions(location), "
                "which are exact at every location"
            )
        out = []
        for u, r, j, p in zip(loc, self.size, self.stride, self.padding):
            assert r is not None and j is not None and p is not None  # regular, checked above
            out.append((u * j - p, u * j - p + r - 1))
        return tuple(out)

    def _box(self, loc: tuple[int, ...]) -> list[tuple[int, int]] | None:
        """Per axis the inclusive bounding box of ``loc``'s field; None if it sees only
        padding.
        """
        if self.bounds:
            spans = [b[u] for b, u in zip(self.bounds, loc)]
        else:
            spans = [(max(a, 0), min(b, n - 1)) for (a, b), n in
                     zip(self.interval(loc), self.input_shape)]  # fmt: skip
        return None if any(last < first for first, last in spans) else spans

    def _pieces(self, loc: tuple[int, ...]) -> list[list[tuple[int, int]]] | None:
        """Per axis the disjoint inclusive pieces of ``loc``'s field: its box, or on an axis
        where it wraps the two ends of its arc (each cut to the box); None if it sees only
        padding.
        """
        box = self._box(loc)
        if box is None:
            return None
        if not self.arcs:
            return [[span] for span in box]
        out: list[list[tuple[int, int]]] = []
        for arc, (low, high), n in zip(self.arcs, box, self.input_shape):
            first, last = arc[loc[len(out)]]
            shift = (first // n) * n  # ``first`` into [0, n)
            first, last = first - shift, last - shift
            if last < n or last - first + 1 >= n:  # one piece: no wrap, or the whole axis
                out.append([(low, high)])
            else:  # the arc's two ends, cut to the box (which holds the first and last read)
                out.append([(first, high), (low, last - n)])
        return out

    def region(self, location: Sequence[int] | int, clip: bool = True) -> tuple[slice, ...]:
        """Half-open input slices seen by ``location``: use as ``x[..., *rf.region(loc)]``.

        Exact at every location: the bounding box of what the location reads (holes left by
        dilated taps are inside it). Where the field wraps around an axis (:attr:`wraps`) the
        box spans both ends; :meth:`regions` has the pieces. Empty slices for a location that
        sees only padding. With ``clip=False`` the slices are the unclipped Distill interval
        (they may start below 0 or end past the input: they describe the padded frame, not an
        index into ``x``), which needs a regular field. A global field returns the whole input.

        Raises
        ------
        ReceptiveFieldError
            ``clip=False`` on an irregular field (see :meth:`interval`).
        """
        loc = self._check_location(location)
        if not clip:
            return tuple(slice(first, last + 1) for first, last in self.interval(loc))
        box = self._box(loc)
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
        loc = self._check_location(location)
        pieces = self._pieces(loc)
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
            )
            if on
        ]

    def __repr__(self) -> str:
        """Geometry, output shape and flags (the bounds are left out)."""
        flags = self._flags()
        extra = f", flags={flags}" if flags else ""
        return (
            f"ReceptiveField(size={self.size}, stride={self.stride}, padding={self.padding}, "
            f"output_shape={self.output_shape}{extra})"
        )

    def _repr_html_(self) -> str:
        def cell(v: int | None) -> str:
            return "irregular" if v is None else str(v)

        rows = "".join(
            f"<tr><td>{a}</td><td>{cell(r)}</td><td>{cell(j)}</td><td>{cell(p)}</td><td>{n}</td>"
            f"<td>{i}</td></tr>"
            for a, (r, j, p, n, i) in enumerate(
                zip(self.size, self.stride, self.padding, self.output_shape, self.input_shape)
            )
        )
        flags = ", ".join(self._flags())
        return (
            "<table><thead><tr><th>axis</th><th>size</th><th>stride</th><th>padding</th>"
            f"<th>output</th><th>input</th></tr></thead><tbody>{rows}</tbody></table>"
            + (f"<p>{flags}</p>" if flags else "")
        )


# --------------------------------------------------------------------------------------------
# Propagation state of one tensor


_EMPTY = np.iinfo(np.int64).max  # "first" of a location that depends on no input at all
_NOTHING = np.iinfo(np.int64).min  # its "last" (bounds may be negative: see ``_Field``)

# How an op maps an axis: a sliding window (kernel, stride, left padding, dilation). Ops that
# are one give it so that a regular field stays regular; ops that are not give None.
_Window: TypeAlias = tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)
class _Field:
    """Receptive-field state of one tensor in the graph.

    ``dims[i]`` is the input spatial axis held by tensor dim ``i`` (None for batch, channel
    and other dims). Everything else is per input axis: the Distill geometry (``size``,
    ``stride``, ``padding``; None from an op that is no sliding window on, except on an axis
    left with one location), the number of locations (``lengths``; an axis that no tensor dim
    holds any more has length 1: it has been pooled or flattened away), the exact bounds of
    every location, twice, and the input's spatial shape (``extent``):

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
    """

    dims: tuple[int | None, ...]
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
        )

    def _put(self, axis: int, **values: Any) -> _Field:
        changes = {}
        for name, v in values.items():
            t = getattr(self, name)
            changes[name] = t[:axis] + (v,) + t[axis + 1 :]
        return replace(self, **changes)

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
        """Every location sees the whole input on every axis."""
        return all(bool(self.sees_whole(axis).all()) for axis in range(len(self.extent)))

    def noting(self, label: str) -> _Field:
        """The same field, recording an op that normalises over positions (``statistics``)."""
        return replace(self, statistics=tuple(dict.fromkeys((*self.statistics, label))))

    def union(self, other: _Field) -> _Field:
        """Union of two fields over the same locations; a length-1 axis is broadcast.

        The tensor layout (``dims``) is the caller's business: this combines the geometry and
        the bounds per input axis. An irregular branch makes the axis irregular.

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
        statistics = tuple(dict.fromkeys(self.statistics + other.statistics))
        uniform = self.uniform and other.uniform  # each channel: the union of its inputs
        return replace(out, aligned=aligned, statistics=statistics, uniform=uniform)

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
# One operation of the graph, as a rule sees it


_M = TypeVar("_M", bound=nn.Module)


@dataclass(frozen=True)
class _Call:
    """One call in the traced graph, handed to the rule of its op.

    Attributes
    ----------
    node
        The fx node (for messages).
    op
        The ``nn.Module`` instance, the function, or the tensor method's name.
    args
        The call's arguments by name (bound once per op kind by the rule's :class:`_Params`,
        so positional and keyword forms agree; fx nodes replaced by their values). Empty for
        modules: their rules read the module's attributes (:meth:`module`).
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
    """

    node: fx.Node
    op: Any
    args: Mapping[str, Any]
    inputs: tuple[tuple[_Field, torch.Tensor], ...]
    result: Any
    ndim: int | None
    input_shape: tuple[int, ...]

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
        out = self.result[0] if isinstance(self.result, tuple) else self.result
        if not isinstance(out, torch.Tensor):
            raise self.unsupported("returns a non-tensor")
        return out

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

    def where(self) -> str:
        """The op, its graph node and its source line, for messages."""
        return _describe(self.node, self.op)

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

    For a tensor method fx records the tensor as the first positional argument, so
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
        Spatial dims the op works on (``nn.Conv3d``: 3), for ops tied to one.
    params
        How a function's or method's arguments bind to names (None: the rule reads none, or
        reads a module's attributes).
    """

    handler: _Handler
    ndim: int | None = None
    params: _Params | None = None


def _describe(node: fx.Node, op: Any) -> str:
    """``"<op> (graph node 'name' at <file, line>: <code>)"``, for messages."""
    line = ""
    if node.stack_trace:
        last = [ln.strip() for ln in node.stack_trace.strip().splitlines() if ln.strip()]
        if len(last) >= 2:
            line = f" at {last[-2]}: {last[-1]}"
    return f"{_name_of(node, op)} (graph node {node.name!r}{line})"


def _name_of(node: fx.Node, op: Any) -> str:
    """``"Conv2d module 'features.0'"``, ``"Tensor.chunk()"``, ``"torch.nn.functional.pad()"``."""
    if node.op == "call_module":
        return f"{type(op).__name__} module {node.target!r}"
    if node.op == "call_method":
        return f"Tensor.{node.target}()"
    mod = getattr(op, "__module__", "") or ""
    return f"{mod + '.' if mod else ''}{getattr(op, '__name__', op)}()"


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
        if a is None:
            size = x.shape[x.dim() - d + i]
            if size != 1:
                raise call.unsupported(
                    f"slides a window over tensor dim {x.dim() - d + i} (size {size}), which is "
                    "not a spatial axis of the input (channels or a flattened dim)"
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


def _roll(call: _Call) -> _Out:
    """``torch.roll`` along spatial dims: a circular shift (see :func:`_circular_pad`)."""
    f, x = call.field, call.x
    shifts, dims = call.args["shifts"], call.args["dims"]
    shifts = list(shifts) if isinstance(shifts, (list, tuple)) else [shifts]
    if dims is None:  # rolls the flattened tensor: positions move across axes
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
        n = int(x.shape[dim])
        i = np.arange(n, dtype=np.int64) - int(shift)
        out = out.gather(
            axis, (i % n)[:, None], wrap=(i // n)[:, None], window=(1, 1, int(shift), 1)
        )
    return out


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


def _reshape(call: _Call) -> _Out:
    """view/reshape/flatten/squeeze/unsqueeze.

    Spatial dims that survive one-to-one keep their axis; the ones merged into other dims are
    collapsed.
    """
    f = call.field
    in_shape, out_shape = list(call.x.shape), list(call.output.shape)
    groups = _reshape_groups(in_shape, out_shape)
    if groups is None:
        raise call.unsupported(f"reshape {tuple(in_shape)} -> {tuple(out_shape)}")
    out = f
    dims: list[int | None] = [None] * len(out_shape)
    for in_dims, out_dims in groups:
        in_big = [i for i in in_dims if in_shape[i] != 1]
        out_big = [o for o in out_dims if out_shape[o] != 1]
        spatial = [a for a in (f.dims[i] for i in in_dims) if a is not None]
        if len(in_big) == 1 and len(out_big) == 1 and f.dims[in_big[0]] is not None:
            dims[out_big[0]] = f.dims[in_big[0]]
            continue
        if len(in_big) == 1 and len(out_big) == 1 and f.dims[in_big[0]] is None:
            # a non-spatial dim kept; spatial size-1 dims squeezed away stay length 1
            continue
        if not in_big and out_dims and spatial:
            # size-1 spatial dims: keep the label on a size-1 output dim when possible
            if len(out_dims) == len(in_dims):
                for i, o in zip(in_dims, out_dims):
                    dims[o] = f.dims[i]
            continue
        for axis in spatial:
            out = out.collapse(axis)
    if all(d is None for d in dims) and any(n > 1 for n in out.lengths):
        for axis, n in enumerate(out.lengths):
            if n > 1:
                out = out.collapse(axis)
    return replace(out, dims=tuple(dims))


def _reordered(call: _Call, order: Sequence[int]) -> _Out:
    """The main input's field with its tensor dims taken in ``order``."""
    return replace(call.field, dims=tuple(call.field.dims[i] for i in order))


def _permute(call: _Call) -> _Out:
    nd = call.x.dim()
    return _reordered(call, [int(p) % nd for p in call.args["dims"]])


def _transpose(call: _Call) -> _Out:
    nd = call.x.dim()
    a, b = int(call.args["dim0"]) % nd, int(call.args["dim1"]) % nd
    order = list(range(nd))
    order[a], order[b] = order[b], order[a]
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
    """mean/sum/amax/...: collapse the spatial axes of the reduced dims."""
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
    out = f
    for i in reduced:
        axis = f.dims[i]
        if axis is not None:
            out = out.collapse(axis)
    dims = [None if i in reduced else a for i, a in enumerate(f.dims)]
    if not keepdim:
        dims = [a for i, a in enumerate(dims) if i not in reduced]
    return replace(out, dims=tuple(dims))


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
    return tuple(replace(f, dims=dims) for _ in call.result)


def _along(call: _Call, dim: int) -> _Out:
    """An op that mixes one dim (linear: the last; softmax: ``dim``) and keeps the others."""
    for f, x in call.inputs:
        d = dim % x.dim()
        if f.dims[d] is not None and x.shape[d] > 1:
            raise call.unsupported(
                f"mixes spatial tensor dim {d} (size {x.shape[d]}): not supported yet"
            )
    result = call.result
    if not isinstance(result, torch.Tensor) or result.dim() != len(call.field.dims):
        raise call.unsupported("changes the number of dims")
    return call.field if len(call.inputs) == 1 else _elementwise(call)


def _last_dim(call: _Call) -> _Out:
    """Linear, Bilinear, F.linear: mix the last dim."""
    return _along(call, -1)


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


def _elementwise(call: _Call) -> _Field:
    """Elementwise op (with broadcasting) over one or more fields: union of dependencies."""
    result = call.result
    if not isinstance(result, torch.Tensor):
        raise call.unsupported("returns a non-tensor")
    nd = result.dim()
    dims: list[int | None] = [None] * nd
    merged = call.field
    for k, (f, x) in enumerate(call.inputs):
        offset = nd - x.dim()
        if offset < 0:
            raise call.unsupported("output has fewer dims than an input")
        for i, axis in enumerate(f.dims):
            if axis is None or (x.shape[i] == 1 and result.shape[offset + i] != 1):
                continue  # broadcast dims carry no location
            if dims[offset + i] is not None and dims[offset + i] != axis:
                raise call.unsupported("combines different spatial axes in one dim")
            dims[offset + i] = axis
        if k:
            try:
                merged = merged.union(f)
            except ReceptiveFieldError as exc:  # name the op that merges
                raise type(exc)(f"{call.where()}: {exc}") from None
    return replace(merged, dims=tuple(dims))


def _concatenate(call: _Call) -> _Out:
    dim = int(call.args["dim"])
    for f, x in call.inputs:
        if f.dims[dim % x.dim()] is not None:
            raise call.unsupported("concatenates along a spatial axis")
    return _side_by_side(call, _elementwise(call))


def _stack(call: _Call) -> _Out:
    dim = int(call.args["dim"]) % call.output.dim()
    shifted = tuple((replace(f, dims=f.dims[:dim] + (None,) + f.dims[dim:]), x.unsqueeze(dim))
                    for f, x in call.inputs)  # fmt: skip
    return _side_by_side(call, _elementwise(replace(call, inputs=shifted)))


def _side_by_side(call: _Call, merged: _Field) -> _Field:
    """``merged`` (a concatenation), no longer uniform where its parts see different fields."""
    first = call.field
    same = all(
        np.array_equal(getattr(f, b)[axis], getattr(first, b)[axis])
        for f, _ in call.inputs
        for b in ("first", "last", "low", "high")
        for axis in range(len(first.lengths))
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
    label = _name_of(call.node, call.op) + (" with batch statistics" if batch else "")
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


def _index(call: _Call) -> _Out:
    """``x[...]`` with ints, slices (crops, strides), None and Ellipsis."""
    f, x = call.field, call.x
    idx = call.args["index"]
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(isinstance(i, (torch.Tensor, list)) for i in idx):
        raise call.unsupported("advanced (tensor) indexing")
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (x.dim() - n_real) + idx[k + 1 :]
    idx = idx + (slice(None),) * (x.dim() - sum(1 for i in idx if i is not None))
    out, src_dim = f, 0
    dims: list[int | None] = []
    for i in idx:
        if i is None:
            dims.append(None)
            continue
        axis = f.dims[src_dim]
        n = x.shape[src_dim]
        if isinstance(i, int):
            if axis is not None:
                out = out.window(axis, 1, 1, -(i % n), 1, 1)
        elif isinstance(i, slice):
            start, stop, step = i.indices(n)
            if axis is not None:
                if step <= 0:
                    raise call.unsupported("negative step on a spatial axis")
                out = out.window(axis, 1, step, -start, 1, len(range(start, stop, step)))
            dims.append(axis)
        else:
            raise call.unsupported(f"index {i!r}")
        src_dim += 1
    return replace(out, dims=tuple(dims))


def _no_field(call: _Call) -> _Out:
    """Shape queries (``x.size()``, ``x.shape``): not a tensor of the input's positions."""
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
#    ``collapse`` / ``union`` / ``replace(..., dims=...)``, and raises ``call.unsupported(why)``
#    where no exact field exists (``_refusal(why)`` for an op that never has one).
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
_ROLL = _Params(("input", "shifts", "dims"), {"dims": None})

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
_NOT_YET_MODULES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)
_BY_DATA_MODULES: tuple[type[nn.Module], ...] = (
    nn.FractionalMaxPool2d, nn.FractionalMaxPool3d, nn.MaxUnpool1d, nn.MaxUnpool2d,
    nn.MaxUnpool3d,
)  # fmt: skip
_KEEP_FUNCTIONS: tuple[Any, ...] = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.neg, operator.pos, operator.abs, operator.iadd, operator.imul, operator.isub,
    operator.itruediv, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.exp, torch.sqrt,
    torch.pow, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clip,
    torch.clamp_min, torch.maximum, torch.minimum, torch.where, torch.square, torch.rsqrt,
    torch.channel_shuffle, torch.native_channel_shuffle,
    F.relu, F.relu_, F.relu6, F.hardtanh, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu,
    F.leaky_relu, F.prelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.softplus,
    F.logsigmoid, F.threshold, F.glu, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout, F.local_response_norm,
)  # fmt: skip
_NOT_YET_FUNCTIONS: tuple[Any, ...] = (F.scaled_dot_product_attention,)
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
    "__truediv__",
)  # fmt: skip
_SHAPE_METHODS = ("size", "dim", "numel", "stride", "ndimension", "element_size", "get_device")
_RESHAPE_METHODS = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as")

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


# Functions (``torch.*``, ``F.*``, ``operator.*``), looked up by identity.
_FUNCTION_RULES: dict[Any, _Rule] = {
    getattr: _NO_FIELD,  # x.shape, x.dtype, ...
    operator.getitem: _Rule(_index, params=_INDEX),
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
    torch.cat: _Rule(_concatenate, params=_CAT),
    torch.concat: _Rule(_concatenate, params=_CAT),
    torch.concatenate: _Rule(_concatenate, params=_CAT),
    torch.stack: _Rule(_stack, params=_CAT),
    torch.mean: _Rule(_reduce, params=_REDUCE),
    torch.sum: _Rule(_reduce, params=_REDUCE),
    torch.amax: _Rule(_reduce, params=_REDUCE),
    torch.amin: _Rule(_reduce, params=_REDUCE),
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
    torch.roll: _Rule(_roll, params=_ROLL),
    F.unfold: _WINDOWS_TO_CHANNELS,
    F.fold: _WINDOWS_TO_CHANNELS,
    **dict.fromkeys(_BY_DATA_FUNCTIONS, _BY_DATA),
    **dict.fromkeys(_NOT_YET_FUNCTIONS, _REFUSE),
}

# Functions of libraries the engine does not import, by ``module.qualname``.
_QUALIFIED_FUNCTION_RULES: dict[str, _Rule] = {
    "torchvision.ops.stochastic_depth.stochastic_depth": _KEEP,
}

# Tensor methods, by name.
_METHOD_RULES: dict[str, _Rule] = {
    **dict.fromkeys(_SHAPE_METHODS, _NO_FIELD),
    **dict.fromkeys(_RESHAPE_METHODS, _Rule(_reshape)),
    "permute": _Rule(_permute, params=_PERMUTE),
    "transpose": _Rule(_transpose, params=_TRANSPOSE),
    "swapaxes": _Rule(_transpose, params=_TRANSPOSE),
    "movedim": _Rule(_movedim, params=_MOVEDIM),
    "t": _Rule(_reverse_dims),
    "mean": _Rule(_reduce, params=_REDUCE),
    "sum": _Rule(_reduce, params=_REDUCE),
    "amax": _Rule(_reduce, params=_REDUCE),
    "amin": _Rule(_reduce, params=_REDUCE),
    "logsumexp": _Rule(_reduce, params=_REDUCE),
    "std": _Rule(_variance, params=_VARIANCE),
    "var": _Rule(_variance, params=_VARIANCE),
    "chunk": _Rule(_split, params=_CHUNK),
    "split": _Rule(_split, params=_SPLIT),
    "tensor_split": _Rule(_split, params=_TENSOR_SPLIT),
    "unbind": _Rule(_unbind, params=_UNBIND),
    "softmax": _Rule(_softmax_function, params=_SOFTMAX),
    "log_softmax": _Rule(_softmax_function, params=_SOFTMAX),
    "roll": _Rule(_roll, params=_ROLL),
    **dict.fromkeys(_KEEP_METHODS, _KEEP),
}

# What an op that is in no table gets told, per kind of fx node.
_UNKNOWN = {
    "call_module": (
        "unknown layer type for receptive fields. featurelens knows convolutions (also "
        "transposed), pooling, padding, upsampling, pixel shuffle, flatten, linear and an "
        "allow-list of layers that keep the field "
        "(activations, norms, dropout); use featurelens.empirical_receptive_field here."
    ),
    "call_function": (
        "unknown operation for receptive fields; use featurelens.empirical_receptive_field "
        "for this model."
    ),
    "call_method": "unknown tensor method for receptive fields; use empirical_receptive_field.",
}


def _rule_for(kind: str, op: Any) -> _Rule | None:
    """The table entry of ``op`` for an fx node of kind ``kind`` (None: not in a table)."""
    if kind == "call_module":
        for cls in type(op).__mro__:
            rule = _MODULE_RULES.get(cls)
            if rule is not None:
                return rule
        return None
    if kind == "call_method":
        return _METHOD_RULES.get(op)
    if kind == "call_function":
        try:
            rule = _FUNCTION_RULES.get(op)
        except TypeError:  # an unhashable callable
            rule = None
        if rule is None:
            qualified = f"{getattr(op, '__module__', '')}.{getattr(op, '__qualname__', '')}"
            rule = _QUALIFIED_FUNCTION_RULES.get(qualified)
        return rule
    return None


# --------------------------------------------------------------------------------------------
# The propagation


class _Done(Exception):
    """Stops the propagation once the requested layer's node has its field."""


class _Propagator(fx.Interpreter):
    """Runs the traced graph on a real (zero) input and propagates fields beside the values.

    Dispatch only: each node's op is looked up in the op tables and its rule computes the
    field of its output from a :class:`_Call`.
    """

    def __init__(
        self, gm: fx.GraphModule, input_shape: tuple[int, ...], stop_at: fx.Node | None = None
    ) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # our messages name the op and its line already
        self.stop_at = stop_at
        self.input_shape = input_shape
        self.fields: dict[fx.Node, Any] = {}
        self.modules = dict(gm.named_modules())
        self._placeholder_seen = False

    def run_node(self, n: fx.Node) -> Any:
        """Run the node, then compute its field; stops after ``stop_at``."""
        try:
            result = super().run_node(n)
        except (RuntimeError, ValueError) as exc:
            shape = ", ".join(map(str, self.input_shape))
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(
                f"the model rejects inputs of shape (N, {shape}): {first} (input_shape is "
                "(C, *spatial) without the batch dimension, e.g. (3, 224, 224) for RGB images)"
            ) from exc
        if n.op == "placeholder":
            first_input = not self._placeholder_seen
            self._placeholder_seen = True
            self.fields[n] = _Field.identity(self.input_shape[1:]) if first_input else None
            return result
        if n.op in ("get_attr", "output"):
            self.fields[n] = None
            return result
        self.fields[n] = self._field_of(n, result)
        if n is self.stop_at:
            raise _Done
        return result

    def _field_of(self, node: fx.Node, result: Any) -> Any:
        op = self.modules[str(node.target)] if node.op == "call_module" else node.target
        rule = _rule_for(node.op, op)
        if rule is _NO_FIELD:
            return None
        if op is operator.getitem:
            source = node.args[0]
            fields = self.fields.get(source) if isinstance(source, fx.Node) else None
            if fields is None:
                return None
            if isinstance(fields, (list, tuple)):  # one output of a multi-output op
                return fields[self._value(node.args[1])]
        inputs = self._arg_fields(node, op)
        if not inputs:
            return None  # constant w.r.t. the input
        if rule is None:
            raise UnsupportedOpError(
                f"{_describe(node, op)}: {_UNKNOWN.get(node.op, _UNSUPPORTED_HINT)}"
            )
        args = {} if rule.params is None else rule.params.bind(
            self._value(node.args), self._value(node.kwargs))  # fmt: skip
        call = _Call(node, op, args, tuple(inputs), result, rule.ndim, self.input_shape)
        return rule.handler(call)

    def _value(self, a: Any) -> Any:
        """``a`` with every fx node replaced by its value (also inside lists, dicts, slices)."""
        return fx.node.map_arg(a, lambda n: self.env[n])

    def _arg_fields(self, node: fx.Node, op: Any) -> list[tuple[_Field, torch.Tensor]]:
        found: list[tuple[_Field, torch.Tensor]] = []

        def visit(a: Any) -> None:
            if isinstance(a, fx.Node):
                f = self.fields.get(a)
                if isinstance(f, _Field):
                    found.append((f, self.env[a]))
                elif isinstance(f, (list, tuple)) and any(f):
                    raise UnsupportedOpError(
                        f"{_describe(node, op)}: takes a tuple of tensors it cannot follow"
                    )
            elif isinstance(a, (list, tuple)):
                for x in a:
                    visit(x)
            elif isinstance(a, dict):
                for x in a.values():
                    visit(x)

        visit(node.args)
        visit(node.kwargs)
        return found


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


# --------------------------------------------------------------------------------------------
# Public entry points


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"input_shape must be a sequence of ints (C, *spatial), got {input_shape!r}"
        ) from exc
    if not 2 <= len(shape) <= 4 or any(v < 1 for v in shape):
        raise UsageError(
            f"input_shape {shape} is not (C, *spatial) with 1 to 3 positive spatial sizes "
            "(no batch dimension): e.g. (3, 224, 224) for images, (1, 16000) for signals, "
            "(1, 32, 64, 64) for volumes"
        )
    return shape


def _propagate(
    model: nn.Module, input_shape: Sequence[int], stop_at: str | None = None, strict: bool = True
) -> tuple[dict[str, fx.Node], _Propagator]:
    """Trace ``model`` and propagate fields over it (up to ``stop_at``'s node when given).

    Returns the layers' nodes and the propagator holding every node's field.
    """
    shape = _check_input_shape(input_shape)
    traced = trace(model)
    target = traced.node(stop_at) if stop_at is not None else None
    prop = _Propagator(traced.graph_module, shape, stop_at=target)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = model_device(model)
    x = torch.zeros((1, *shape), dtype=dtype, device=device)
    with preserved(model, freeze=False), torch.no_grad():
        try:
            prop.run(x)
        except _Done:
            pass
        except ReceptiveFieldError as exc:
            if strict:
                raise
            warnings.warn(
                f"receptive fields stop at {exc}. Layers after it are left out.", stacklevel=3
            )
    return traced.outputs, prop


def receptive_fields(
    model: nn.Module, input_shape: Sequence[int], *, strict: bool = True
) -> dict[str, ReceptiveField]:
    """Receptive fields of every addressable layer, in execution order.

    Parameters
    ----------
    model
        Any traceable ``nn.Module`` (torch.fx); it is left exactly as given.
    input_shape
        ``(C, *spatial)`` without the batch dimension, e.g. ``(3, 224, 224)``.
    strict
        With False, an unsupported operation or unaligned merge ends the table with a warning
        naming it, instead of an error: the layers before it are returned.

    Returns
    -------
    dict
        ``{layer name: ReceptiveField}`` for :func:`featurelens.layer_names` ``(model)``;
        layers whose output carries no field (a tuple, or a value that does not depend on the
        input) are left out.

    Raises
    ------
    TraceError
        The model cannot be traced with torch.fx (the message names the line).
    UnsupportedOpError
        An operation whose effect on the receptive field is unknown (named, with its line).
    NotAlignedError
        Branches with different effective strides merge.
    UsageError
        ``input_shape`` is not ``(C, *spatial)`` or the model rejects it (a ``ValueError``).
    """
    outputs, prop = _propagate(model, input_shape, strict=strict)
    spatial = prop.input_shape[1:]
    return {
        name: _to_value(f, spatial)
        for name, node in outputs.items()
        if isinstance(f := prop.fields.get(node), _Field)
    }


def _to_value(f: _Field, spatial: tuple[int, ...]) -> ReceptiveField:
    size, stride, padding = zip(*(f.reported(axis) for axis in range(len(f.lengths))))
    wraps = any(
        ((lo < 0) | (hi >= n))[hi >= lo].any() for lo, hi, n in zip(f.first, f.last, spatial)
    )
    return ReceptiveField(
        size=size,
        stride=stride,
        padding=padding,
        input_shape=tuple(spatial),
        output_shape=f.lengths,
        is_global=f.covers(),
        aligned=f.aligned,
        channel_dim=next((i for i, d in enumerate(f.dims) if i >= 1 and d is None), 1),
        statistics=f.statistics,
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
    )


def receptive_field(model: nn.Module, input_shape: Sequence[int], layer: str) -> ReceptiveField:
    """Receptive field of one layer (see :func:`receptive_fields`).

    Only the graph up to ``layer`` is analysed, so operations after it do not matter.

    Raises
    ------
    LayerError
        The model has no addressable layer ``layer``.
    ReceptiveFieldError
        No analytic field: the model does not trace (:class:`TraceError`), an operation has
        no known field (:class:`UnsupportedOpError`), branches do not align
        (:class:`NotAlignedError`), or the layer's output is not one tensor that depends on
        the input.
    UsageError
        ``input_shape`` is not ``(C, *spatial)`` or the model rejects it.
    """
    outputs, prop = _propagate(model, input_shape, stop_at=layer)
    f = prop.fields.get(outputs[layer])
    if isinstance(f, _Field):
        return _to_value(f, prop.input_shape[1:])
    if isinstance(f, (list, tuple)):
        raise ReceptiveFieldError(
            f"layer {layer!r} outputs a {type(f).__name__} of tensors, not one tensor: address "
            "the layer that takes the element you want"
        )
    raise ReceptiveFieldError(
        f"layer {layer!r} does not output a tensor with a receptive field (its output does not "
        "depend on the input's positions)"
    )


def try_receptive_field(
    model: nn.Module, input_shape: Sequence[int], layer: str
) -> tuple[ReceptiveField | None, str]:
    """The layer's receptive field, or ``(None, reason)`` when it cannot be computed.

    The one place that decides what "no analytic receptive field here" means: the engine
    raises a :class:`ReceptiveFieldError` (the model does not trace, an operation has no known
    field, branches do not align, the layer outputs no single tensor of the input) or a
    :class:`UsageError` about the input shape (one the engine cannot analyse, such as inputs
    without spatial axes, or one the model rejects). Projections, figures and scans fall back
    on the whole input then and say ``reason``. An unknown layer name is not such a case:
    :class:`LayerError` propagates, and so does anything else.

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
        One header line, a rule, and one line per layer; ``-`` for the size, stride and
        padding of an irregular axis (flag ``irregular``), flag ``wraps`` where a location sees
        both ends of an axis.
    """
    rows = [("layer", "output", "size", "stride", "padding", "flags")]
    for name, rf in fields.items():
        flags = ",".join(rf._flags())

        def fmt(t: tuple[int | None, ...]) -> str:
            return "x".join("-" if v is None else str(v) for v in t)

        rows.append(
            (name, fmt(rf.output_shape), fmt(rf.size), fmt(rf.stride), fmt(rf.padding), flags)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
