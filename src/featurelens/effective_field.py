"""Effective receptive fields: which input pixels *do* move a unit, not which ones can.

Luo, Li, Urtasun & Zemel 2016 ("Understanding the Effective Receptive Field in Deep
Convolutional Neural Networks", NeurIPS, arXiv 1701.04128) measure the impact of each input
pixel on a unit at the centre of a layer's map as the absolute value of the input gradient,
averaged over examples. The result is a roughly Gaussian blob that fills only a fraction of the
theoretical receptive field (:func:`featurelens.receptive_field`), which says which pixels *can*
reach the unit: users who read a receptive-field patch as if every pixel of it mattered read too
much into its border.

:func:`effective_receptive_field` computes

    ERF(p) = mean over units u of  sum_c |d y_u / d x_c(p)|,   normalised to sum 1,

for units ``y_u`` at the layer's central location (one channel per example by default), on
dataset examples or on random inputs (as Luo et al. do), and its *extents*: per axis, the width
of the smallest box centred on the unit's theoretical field that holds 50 %, 90 %, 95 % and
100 % of the map's mass. The projections go through :func:`featurelens.project_units` with the
plain gradient: the gradient of a unit is zero outside its theoretical field, so computing each
unit on the receptive-field crop of its example is exact, and many units go in one batched pass.

The result is an :class:`EffectiveReceptiveField`: the map, the centre, the boxes, the
theoretical field beside them, and an HTML table with a heat map in notebooks.
"""

from __future__ import annotations

import dataclasses
import html
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from featurelens.data import SizedDataset, data_size, example_tensor
from featurelens.errors import ChannelError, DataError, UsageError
from featurelens.graph import capture, preserved, resolve_layers
from featurelens.receptive_field import ReceptiveField, try_receptive_field
from featurelens.unit import Unit, as_integer, as_location, check_location

__all__ = ["LEVELS", "EffectiveReceptiveField", "effective_receptive_field"]

LEVELS: tuple[float, ...] = (0.5, 0.9, 0.95, 1.0)
"""The shares of the mass whose boxes every result carries (:attr:`EffectiveReceptiveField.boxes`)."""

BLOCK_VALUES = 2**24
"""Input-sized values of projections held at once (64 MiB in float32): units per block."""

Box = tuple[tuple[int, int], ...]  # inclusive (first, last) per spatial axis of the input


# --------------------------------------------------------------------------------------------
# The value


@dataclass(frozen=True, eq=False)
class EffectiveReceptiveField:
    """The effective receptive field of a layer's central unit (Luo et al. 2016).

    Attributes
    ----------
    layer
        Dotted layer name.
    location
        The unit's location on the layer's output grid (one int per axis of that grid).
    input_shape
        Spatial shape of the inputs, ``(*spatial)``.
    map
        ``(*spatial)`` float64, read-only: the mean absolute input gradient (summed over input
        channels), normalised to sum 1. Zero outside the theoretical field.
    centre
        Per input axis, the centre of the boxes: the centre of the unit's theoretical field
        ``u * stride - padding + (size - 1) / 2``; where there is no usable field, the map's
        centre of mass rounded to a half pixel (see ``note``).
    boxes
        ``{share: box}`` for every share of :data:`LEVELS`: the smallest box centred on
        ``centre`` holding that share of the mass on every axis (of the map summed over the
        other axes), as inclusive ``(first, last)`` input positions per axis, clipped to the
        input.
    field
        The layer's theoretical receptive field, or None when it cannot be computed.
    units
        ``(example, channel)`` of every unit averaged: the example's index in the data (or in
        the random inputs), the channel at ``location``.
    random_inputs
        True when the units saw standard normal noise instead of dataset examples.
    seed
        The seed of the example sample, the channels drawn and the random inputs.
    note
        Why the boxes are not centred on the theoretical field, ``""`` when they are.
    """

    layer: str
    location: tuple[int, ...]
    input_shape: tuple[int, ...]
    map: np.ndarray = dataclasses.field(repr=False)
    centre: tuple[float, ...]
    boxes: Mapping[float, Box] = dataclasses.field(repr=False)
    field: ReceptiveField | None = dataclasses.field(repr=False)
    units: tuple[tuple[int, int], ...] = dataclasses.field(repr=False)
    random_inputs: bool = False
    seed: int = 0
    note: str = ""

    @property
    def ndim(self) -> int:
        """Number of spatial axes of the input."""
        return len(self.input_shape)

    @property
    def examples(self) -> int:
        """How many different examples the units saw."""
        return len({e for e, _ in self.units})

    @property
    def theoretical_size(self) -> tuple[int, ...] | None:
        """The unit's theoretical field's width per axis, clipped to the input (None without one).

        The widths of :meth:`ReceptiveField.region` at :attr:`location`, exact on irregular
        axes too: a field larger than the input (deep layers at small inputs) cannot hold more
        than the whole input. None where the field is unknown or its grid is not the layer's.
        """
        if self.field is None:
            return None
        try:
            region = self.field.region(self.location)
        except ValueError:  # the field's grid is not the layer's: no width for this unit
            return None
        return tuple(max(0, sl.stop - sl.start) for sl in region)

    def extent(self, share: float) -> tuple[int, ...]:
        """Width per axis of the smallest centred box holding ``share`` of the mass.

        Parameters
        ----------
        share
            In ``(0, 1]``; 1 means every position with a nonzero gradient.

        Returns
        -------
        tuple of int
            Widths in input pixels, clipped to the input.

        Raises
        ------
        UsageError
            ``share`` outside ``(0, 1]``.
        """
        share = _share(share)  # first: True == 1.0 would find the 100 % box
        box = self.boxes.get(share) or _centred_box(self.map, self.centre, share)
        return tuple(last - first + 1 for first, last in box)

    @property
    def extents(self) -> dict[float, tuple[int, ...]]:
        """``{share: widths}`` for every share of :data:`LEVELS`."""
        return {q: self.extent(q) for q in LEVELS}

    def box(self, share: float = 0.95, location: Sequence[int] | None = None) -> Box:
        """The effective box of the unit at ``location`` (default: this one), unclipped.

        The box of ``share`` centred on that unit's field: this unit's box moved by the
        layer's stride, at the width it has here before clipping. For display crops
        (``--patch effective``), never for computation.

        Parameters
        ----------
        share
            One of the shares in :attr:`boxes`, or any share in ``(0, 1]``.
        location
            A location on the layer's output grid.

        Returns
        -------
        tuple
            Inclusive ``(first, last)`` input positions per axis; may run past the input.

        Raises
        ------
        UsageError
            ``location`` given for a layer whose field is unknown (no stride to move by), a
            bad ``share``; ``ValueError`` for a location outside the grid.
        """
        half = [(w - 1) / 2 for w in _unclipped_widths(self.map, self.centre, _share(share))]
        centre = list(self.centre)
        if location is not None and tuple(location) != self.location:
            if self.field is None or self.note:
                raise UsageError(
                    f"the effective box of another unit of layer {self.layer!r} needs its "
                    f"theoretical field's stride, and this one has none ({self.note or 'no field'})"
                )
            loc = check_location(location, self.field.output_shape)
            size, stride, padding = _geometry(self.field)
            centre = [c + (u - u0) * j for c, u, u0, j in zip(centre, loc, self.location, stride)]
        return tuple((int(round(c - h)), int(round(c + h))) for c, h in zip(centre, half))

    def table(self) -> str:
        """A plain-text table: per axis the theoretical size and the extents of :data:`LEVELS`."""
        head = ["axis", "theoretical", *(f"{q:.0%}" for q in LEVELS)]
        rows = [head]
        theo = self.theoretical_size
        for a in range(self.ndim):
            size = "-" if theo is None else str(theo[a])
            rows.append([str(a), size, *(str(self.extent(q)[a]) for q in LEVELS)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)

    def __repr__(self) -> str:
        """Layer, location and the extents of :data:`LEVELS` beside the theoretical size."""
        ext = ", ".join(f"{q:.0%}: {'x'.join(map(str, self.extent(q)))}" for q in LEVELS)
        theo = self.theoretical_size
        size = "x".join(map(str, theo)) if theo is not None else "unknown"
        return (
            f"EffectiveReceptiveField(layer={self.layer!r}, location={self.location}, "
            f"theoretical={size}, {ext}, units={len(self.units)})"
        )

    def _repr_html_(self) -> str:
        theo = self.theoretical_size
        head = "".join(f"<th>{q:.0%}</th>" for q in LEVELS)
        rows = "".join(
            f"<tr><td>{a}</td><td>{'-' if theo is None else theo[a]}</td>"
            + "".join(f"<td>{self.extent(q)[a]}</td>" for q in LEVELS)
            + "</tr>"
            for a in range(self.ndim)
        )
        source = "random inputs" if self.random_inputs else "dataset examples"
        text = (
            f"<p>Effective receptive field of <code>{html.escape(self.layer)}</code> at "
            f"{self.location}: {len(self.units)} units over {self.examples} {source}; widths "
            "of the centred boxes holding each share of the mass, beside the theoretical size"
            + (f" ({html.escape(self.note)})" if self.note else "")
            + "</p>"
        )
        table = (
            f"<table><thead><tr><th>axis</th><th>theoretical</th>{head}</tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
        return text + table + _heatmap_html(self)


def _heatmap_html(erf: EffectiveReceptiveField) -> str:
    """An inline PNG heat map when the figures extra is installed, else nothing."""
    try:
        from featurelens.instrument_pages import erf_heatmap, png_data_uri
    except ImportError:  # PIL or matplotlib missing: the table alone
        return ""
    return f'<img alt="effective receptive field" src="{png_data_uri(erf_heatmap(erf))}">'


# --------------------------------------------------------------------------------------------
# Boxes


def _share(share: Any) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise UsageError(f"share {share!r} is not a share of the mass: use a number in (0, 1]")
    return float(share)


def _marginals(mass: np.ndarray) -> list[np.ndarray]:
    axes = range(mass.ndim)
    return [mass.sum(axis=tuple(b for b in axes if b != a)) for a in axes]


def _half_widths(marginal: np.ndarray, centre: float, share: float) -> tuple[int, int]:
    """``(lo, hi)`` of the smallest box centred on ``centre`` holding ``share`` of ``marginal``.

    Boxes centred on a whole pixel have odd widths, on a half pixel even ones; ``lo`` and
    ``hi`` are unclipped (they may lie outside ``0 .. n - 1``).
    """
    n = len(marginal)
    c2 = int(round(2 * centre))
    first_w = 1 if c2 % 2 == 0 else 2
    # Widths up to one that holds the whole axis from this centre.
    reach = max(c2 - 0, 2 * (n - 1) - c2)  # twice the distance to the farther end
    widths = np.arange(first_w, reach + 3, 2)
    lo = (c2 - (widths - 1)) // 2
    hi = lo + widths - 1
    if share >= 1.0:  # every nonzero position: exact, no rounding of sums
        support = np.flatnonzero(marginal > 0)
        ok = (lo <= support[0]) & (hi >= support[-1])
    else:
        cum = np.concatenate([[0.0], np.cumsum(marginal)])
        inside = cum[np.clip(hi, -1, n - 1) + 1] - cum[np.clip(lo, 0, n)]
        ok = inside >= share * cum[-1] * (1 - 1e-12)
    k = int(np.argmax(ok))  # the first width that holds it (the last one always does)
    return int(lo[k]), int(hi[k])


def _unclipped_widths(mass: np.ndarray, centre: Sequence[float], share: float) -> list[int]:
    return [
        hi - lo + 1
        for lo, hi in (
            _half_widths(m, c, share) for m, c in zip(_marginals(mass), centre, strict=True)
        )
    ]


def _centred_box(mass: np.ndarray, centre: Sequence[float], share: float) -> Box:
    """Per axis the clipped inclusive bounds of the smallest centred box holding ``share``."""
    out = []
    for m, c in zip(_marginals(mass), centre, strict=True):
        lo, hi = _half_widths(m, c, share)
        out.append((max(lo, 0), min(hi, len(m) - 1)))
    return tuple(out)


def _mass_centre(mass: np.ndarray) -> tuple[float, ...]:
    """The centre of mass per axis, rounded to a half pixel."""
    return tuple(
        round(2 * float(np.dot(np.arange(len(m)), m) / m.sum())) / 2 for m in _marginals(mass)
    )


# --------------------------------------------------------------------------------------------
# The computation


def effective_receptive_field(
    model: nn.Module,
    data: SizedDataset | torch.Tensor,
    layer: str,
    *,
    examples: int | None = 256,
    channels: Sequence[int] | None = None,
    location: Sequence[int] | int | None = None,
    random_inputs: bool = False,
    seed: int = 0,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    field: ReceptiveField | None = None,
) -> EffectiveReceptiveField:
    """The effective receptive field of the unit at the centre of ``layer`` (Luo et al. 2016).

    Parameters
    ----------
    model
        Any ``nn.Module``; left exactly as given.
    data
        A dataset (items: a tensor ``(C, *spatial)`` or ``(tensor, label)``) or a tensor
        ``(N, C, *spatial)``. With ``random_inputs`` only its first example is read, for the
        shape.
    layer
        Dotted layer name; its output must have at least one spatial axis:
        ``(N, K, *spatial_l)``.
    examples
        How many examples to average over: a seeded random sample of the data (all of it when
        it has fewer, or with None), or this many random inputs.
    channels
        The channels whose units are averaged on every example. Default None: one channel per
        example, drawn at random (seeded), so the average estimates the mean over channels and
        examples at the cost of one unit per example.
    location
        The unit's location on the layer's grid. Default: the one whose theoretical field is
        centred nearest the input's centre (the middle of the grid when there is no field).
    random_inputs
        Average over standard normal inputs of the data's shape (Luo et al.'s setting) instead
        of dataset examples.
    seed
        Seeds the example sample, the channels drawn and the random inputs; the global random
        state is not touched.
    chunk_size, device
        As in :func:`featurelens.project_units`.
    field
        The layer's receptive field for these inputs, when the caller has it already.

    Returns
    -------
    EffectiveReceptiveField
        The normalised map, its centre and boxes, the theoretical field.

    Raises
    ------
    LayerError
        An unknown layer (the message lists valid names).
    DataError
        Data that holds no example, or items that are not tensors.
    UsageError
        A layer without a spatial axis, a channels-last layer, a bad ``examples``, a location
        outside the grid; every gradient zero (dead units: the map would be undefined).
    ChannelError
        A channel the layer does not have.

    Warns
    -----
    CropWarning
        When units were computed on the whole input (exact, slower), once per reason.
    """
    n = data_size(data)
    if n == 0:
        raise DataError("the data holds no example: an effective receptive field needs some")
    count = _count(examples, n, random_inputs)
    seed = as_integer(seed, "seed")
    gen = torch.Generator().manual_seed(seed)
    inputs, indices = _inputs(model, data, n, count, random_inputs, gen)
    resolve_layers(model, [layer])
    spatial_l, n_channels = _layer_output(model, inputs[:1], layer, device)
    spatial = tuple(inputs.shape[2:])
    rf, why = (
        (field, "")
        if field is not None
        else try_receptive_field(model, tuple(inputs.shape[1:]), layer)
    )
    if rf is not None:
        rf.check_channels_first(layer)
    usable = (
        rf is not None
        and rf.aligned
        and rf.regular
        and not rf.wraps
        and tuple(rf.output_shape) == spatial_l
    )
    loc = (
        _central_location(rf if usable else None, spatial_l, spatial)
        if location is None
        else check_location(
            as_location(location, "location"), spatial_l, "", f"layer {layer!r} outputs"
        )
    )
    chosen = _channels(channels, n_channels, len(inputs), layer, gen)
    units = [(row, c) for row, cs in enumerate(chosen) for c in cs]
    total = _accumulate(model, inputs, layer, loc, units, rf, chunk_size, device)
    mass_sum = float(total.sum())
    if not mass_sum > 0:
        raise UsageError(
            f"every input gradient of layer {layer!r} at {loc} is zero over these "
            f"{len(units)} units (dead units, e.g. rectifiers that are off everywhere): the "
            "effective receptive field is undefined; try random_inputs=True or other channels"
        )
    mass = total / mass_sum
    mass.setflags(write=False)
    if usable:
        assert rf is not None
        size, stride, padding = _geometry(rf)
        centre = tuple(u * j - p + (r - 1) / 2 for u, j, p, r in zip(loc, stride, padding, size))
        note = ""
    else:
        centre = _mass_centre(mass)
        note = _why_mass_centre(rf, why, spatial_l)
    boxes = {q: _centred_box(mass, centre, q) for q in LEVELS}
    return EffectiveReceptiveField(
        layer=layer,
        location=loc,
        input_shape=spatial,
        map=mass,
        centre=centre,
        boxes=MappingProxyType(boxes),
        field=rf,
        units=tuple((int(indices[row]), c) for row, c in units),
        random_inputs=bool(random_inputs),
        seed=seed,
        note=note,
    )


def _count(examples: Any, n: int, random_inputs: bool) -> int:
    if examples is None:
        return n
    count = as_integer(examples, "examples")
    if count < 1:
        raise UsageError(f"examples={count}: average over at least 1 example (or None: all)")
    return count if random_inputs else min(count, n)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _inputs(
    model: nn.Module,
    data: Any,
    n: int,
    count: int,
    random_inputs: bool,
    gen: torch.Generator,
) -> tuple[torch.Tensor, list[int]]:
    """``(count, C, *spatial)`` inputs in the model's dtype, and their data indices."""
    dtype = _model_dtype(model)
    if random_inputs:
        shape = tuple(example_tensor(data, 0).shape)
        noise = torch.randn((count, *shape), generator=gen, dtype=torch.float64)
        return noise.to(dtype), list(range(count))
    if count < n:
        indices = sorted(torch.randperm(n, generator=gen)[:count].tolist())
    else:
        indices = list(range(n))
    xs = [example_tensor(data, i).detach() for i in indices]
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise DataError(f"examples of different shapes {sorted(shapes)} cannot be averaged")
    return torch.stack(xs).to(dtype), indices


def _layer_output(
    model: nn.Module, x: torch.Tensor, layer: str, device: torch.device | str | None
) -> tuple[tuple[int, ...], int]:
    """The layer's spatial output shape and channels, from one example; refuses no spatial axis."""
    from featurelens.graph import model_device

    where = torch.device(device) if device is not None else model_device(model, x.device)
    with preserved(model), torch.no_grad(), capture(model, [layer]) as run:
        y = run(x.to(where))[layer]
    if y.dim() < 3:
        raise UsageError(
            f"layer {layer!r} outputs shape {tuple(y.shape)}: no spatial axis, so no unit has a "
            "place on a map and an effective receptive field means nothing there; choose a "
            "convolutional layer (a map (N, C, *spatial))"
        )
    return tuple(int(s) for s in y.shape[2:]), int(y.shape[1])


def _central_location(
    rf: ReceptiveField | None, grid: tuple[int, ...], spatial: tuple[int, ...]
) -> tuple[int, ...]:
    """Per axis, the location whose field's centre is nearest the input's (the lower on ties)."""
    if rf is None or len(grid) != len(spatial):
        return tuple((g - 1) // 2 for g in grid)
    loc = []
    size, stride, padding = _geometry(rf)
    for g, n, j, p, r in zip(grid, spatial, stride, padding, size):
        centres = np.arange(g) * j - p + (r - 1) / 2
        loc.append(int(np.argmin(np.abs(centres - (n - 1) / 2))))
    return tuple(loc)


def _channels(
    channels: Sequence[int] | None,
    n_channels: int,
    count: int,
    layer: str,
    gen: torch.Generator,
) -> list[list[int]]:
    """The channels of each example's units."""
    if channels is None:
        drawn = torch.randint(n_channels, (count,), generator=gen).tolist()
        return [[c] for c in drawn]
    if isinstance(channels, (str, bytes)) or not hasattr(channels, "__iter__"):
        raise TypeError(f"channels must be a sequence of ints or None, got {channels!r}")
    chosen = [as_integer(c, f"channels[{i}]") for i, c in enumerate(channels)]
    if not chosen:
        raise UsageError("channels=[] selects no unit: give at least one channel, or None")
    for c in chosen:
        if not 0 <= c < n_channels:
            raise ChannelError(
                f"channel {c} is out of range: layer {layer!r} has {n_channels} channels, "
                f"valid 0..{n_channels - 1}"
            )
    return [list(chosen)] * count


def _accumulate(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    loc: tuple[int, ...],
    units: list[tuple[int, int]],
    rf: ReceptiveField | None,
    chunk_size: int | None,
    device: torch.device | str | None,
) -> np.ndarray:
    """``sum over units of sum_c |d y_u / d x_c|``, ``(*spatial)`` float64, in blocks."""
    from featurelens.projection import project_units

    values = math.prod(inputs.shape[1:])
    step = max(1, BLOCK_VALUES // values)
    total = torch.zeros(inputs.shape[2:], dtype=torch.float64)
    caught: list[warnings.WarningMessage] = []
    for lo in range(0, len(units), step):
        block = units[lo : lo + step]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            maps = project_units(
                model,
                inputs,
                [Unit(layer, c, loc) for _, c in block],
                "gradient",
                rows=[row for row, _ in block],
                crop=True,
                chunk_size=chunk_size,
                device=device,
                fields=None if rf is None else {layer: rf},
            )
        caught += seen
        total += maps.detach().abs().sum(dim=(0, 1)).to("cpu", torch.float64)
    for message in dict.fromkeys(str(w.message) for w in caught):
        category = next(w.category for w in caught if str(w.message) == message)
        warnings.warn(message, category, stacklevel=3)  # effective_receptive_field's caller
    return total.numpy()


def _geometry(rf: ReceptiveField) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(size, stride, padding)`` of a regular field (callers check :attr:`regular` first)."""
    if not rf.regular:
        raise UsageError("an irregular receptive field has no Distill geometry")
    return tuple(
        tuple(int(v) for v in values if v is not None)
        for values in (rf.size, rf.stride, rf.padding)
    )  # type: ignore[return-value]


def _why_mass_centre(rf: ReceptiveField | None, why: str, grid: tuple[int, ...]) -> str:
    if rf is None:
        return f"boxes centred on the centre of mass: no theoretical field ({why})"
    if not rf.aligned:
        return "boxes centred on the centre of mass: the theoretical field is not aligned"
    if not rf.regular:
        return (
            "boxes centred on the centre of mass: the theoretical field is irregular (past "
            "upsampling), so no Distill centre describes it"
        )
    if rf.wraps:
        return "boxes centred on the centre of mass: the theoretical field wraps around an axis"
    return (
        f"boxes centred on the centre of mass: the theoretical field's grid {rf.output_shape} "
        f"is not the layer's {grid}"
    )
