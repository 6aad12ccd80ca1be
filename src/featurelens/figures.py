"""Zeiler-Fergus figures and layer sheets from a model, its data and an atlas.

This module computes (examples, projections, receptive-field boxes) and hands them to the pure
renderers of :mod:`featurelens.render`:

* :func:`zf_grid` / :func:`zf_figure`: for one channel's top-k hits, the projection of each
  hit's unit on its example next to the input patch, both cut to the unit's receptive-field
  box (Zeiler & Fergus 2014, Fig. 2);
* :func:`layer_sheet`: every channel of a layer, top-1 hit only.

Projections go through :func:`featurelens.project` in batches: all k hits of a channel in one
call, and for sheets and reports many channels per call (:func:`project_hits`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from featurelens.atlas import Atlas, Hit
from featurelens.data import example_tensor
from featurelens.receptive_field import ReceptiveField, try_receptive_field
from featurelens.render import (
    Box,
    Figure,
    box_of,
    get_style,
    render_layer_sheet,
    render_zf,
)

if TYPE_CHECKING:
    from featurelens.visualize import Visualization

__all__ = [
    "HitBatch",
    "check_method",
    "layer_field",
    "model_dtype",
    "figure_from_batch",
    "join",
    "normalisation",
    "top_hits",
    "zf_title",
    "layer_sheet",
    "load_examples",
    "project_hits",
    "synthetic_images",
    "synthetic_sheet",
    "synthetic_title",
    "zf_figure",
    "zf_grid",
]


def check_method(method: str) -> str:
    """``method`` if it is a key of :data:`featurelens.rules.METHODS`, else a ValueError."""
    from featurelens.rules import get_rule

    return get_rule(method).name


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype inputs must have for ``model``: its first floating parameter's
    (else buffer's) dtype, else torch's default dtype.
    """
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def layer_field(
    model: nn.Module, input_shape: Sequence[int], layer: str
) -> tuple[ReceptiveField | None, str | None]:
    """``(receptive field, None)`` of ``layer``, or ``(None, why)`` when it is not computable.

    Figures, reports and the explorer fall back to the whole input for a layer whose field
    cannot be computed (an untraceable model, an op the engine does not support such as
    ``F.interpolate``): the projection of a unit is still exact, only its box is unknown.

    Raises
    ------
    ValueError
        A channels-last layer (:meth:`ReceptiveField.check_channels_first`): its dim 1 is not
        channels, so every channel would be misread.
    """
    rf, why = try_receptive_field(model, tuple(input_shape), layer)
    if rf is None:
        return None, why
    rf.check_channels_first(layer)
    return rf, None


def whole_input_box(input_shape: Sequence[int]) -> Box:
    """The box of the whole input, spatial shape ``input_shape``: a unit without a field."""
    return tuple((0, int(n) - 1) for n in input_shape)


def load_examples(data: Any, indices: Sequence[int]) -> torch.Tensor:
    """Stack ``data[i]`` (tensor or ``(tensor, label)``) for ``indices``: (N, C, *spatial).

    ``data`` may also be a tensor (N, C, *spatial).
    """
    if isinstance(data, torch.Tensor):
        return data[torch.as_tensor(list(indices), dtype=torch.long)]
    return torch.stack([example_tensor(data, int(i)) for i in indices])


@dataclass(frozen=True)
class HitBatch:
    """Examples and projections of many (channel, hit) units of one layer.

    Attributes
    ----------
    examples, projections
        (N, C, *spatial) tensors on the CPU, in the model's dtype; row ``i`` is unit
        ``units[i]``.
    units
        ``(channel, Hit)`` per row.
    boxes
        The unclipped receptive-field box of each row's unit (the whole input when the layer
        has no computable receptive field).
    """

    examples: torch.Tensor
    projections: torch.Tensor
    units: tuple[tuple[int, Hit], ...]
    boxes: tuple[Box, ...]


def project_hits(
    model: nn.Module,
    data: Any,
    layer: str,
    units: Sequence[tuple[int, Hit]],
    rf: ReceptiveField | None,
    method: str = "deconvnet",
    device: str | torch.device | None = None,
) -> HitBatch:
    """Project every ``(channel, hit)`` unit of ``layer`` on its example, in one call.

    The unit of a hit is ``(layer, channel, hit.location)`` on example ``hit.index``. ``rf``
    is the layer's receptive field for the examples' shape (:func:`layer_field`): it gives the
    boxes and the projections' crops (passed to :func:`featurelens.project` as ``field``).
    With ``rf`` None (no computable receptive field) every box is the whole input. Examples
    are cast to the model's parameter dtype (:func:`model_dtype`).

    Parameters
    ----------
    model, data
        The scanned model and dataset (a tensor ``(N, C, *spatial)`` or indexable examples).
    layer
        Dotted layer name.
    units
        ``(channel, hit)`` per unit.
    rf
        The layer's receptive field for the examples' shape, or None.
    method
        A key of :data:`featurelens.rules.METHODS`.
    device
        Where the projections run (default: the model's device).

    Returns
    -------
    HitBatch
        Examples, projections and boxes, one row per unit, on the CPU.

    Raises
    ------
    ValueError
        ``rf`` computed for inputs of another spatial shape than the examples', or whose
        output grid is not the layer's; the errors of :func:`featurelens.project`.
    """
    from featurelens.projection import project

    indices = [hit.index for _, hit in units]
    examples = load_examples(data, indices).to(model_dtype(model))
    channels = torch.tensor([c for c, _ in units], dtype=torch.long)
    dims = len(units[0][1].location)
    if dims == 0:  # a layer without spatial axes: the unit is the channel itself
        locations = None
    else:
        locations = torch.tensor([list(hit.location) for _, hit in units], dtype=torch.long)
    projections = project(
        model, examples, layer, channels, locations, method=method, device=device, field=rf
    ).detach()  # the field the boxes use: project() does not trace the model again
    projections = projections.to("cpu")
    if rf is None:
        boxes = (whole_input_box(examples.shape[2:]),) * len(units)
    else:
        boxes = tuple(
            box_of(rf, hit.location) if dims else box_of(rf, (0,) * rf.ndim) for _, hit in units
        )
    return HitBatch(examples, projections, tuple(units), boxes)


def normalisation(atlas: Atlas, mean: Any = None, std: Any = None) -> tuple[Any, Any]:
    """``(mean, std)`` to un-normalise patches: the given ones, else the atlas' data spec's."""
    if mean is not None and std is not None:
        return mean, std
    spec = atlas.data_spec
    if spec is not None and spec.mean is not None:
        return spec.mean, spec.std
    return None, None


def top_hits(atlas: Atlas, layer: str, channel: int, k: int) -> list[Hit]:
    """The first ``k`` hits of a channel; clear errors for a bad k, layer or channel."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    hits = atlas.top(layer, channel)[:k]
    if not hits:
        raise ValueError(f"channel {channel} of layer {layer!r} has no hits in this atlas")
    return hits


def zf_title(layer: str, channel: int, method: str, style: str, rf: ReceptiveField | None) -> str:
    """The title of a channel's figure: layer, channel, method, style and what its patches show."""
    if rf is None:
        field = "receptive field not computable: whole input shown"
    else:
        size = rf.input_shape if rf.is_global or not rf.regular else rf.size
        field = (
            "receptive field " + "x".join(map(str, size)) + ("" if rf.regular else " (irregular)")
        )
    return f"{layer} · channel {channel} · {method} · {style} · {field}"


def figure_from_batch(
    batch: HitBatch,
    rows: slice | Sequence[int],
    title: str,
    style: str,
    mean: Any = None,
    std: Any = None,
) -> Figure:
    """The ZF figure of some rows of a :class:`HitBatch` (one channel's hits)."""
    if isinstance(rows, slice):
        rows = range(*rows.indices(len(batch.units)))
    rows = list(rows)
    idx = torch.tensor(rows, dtype=torch.long)
    return render_zf(
        batch.examples[idx],
        batch.projections[idx],
        [batch.boxes[i] for i in rows],
        style,
        mean,
        std,
        title=title,
    )


def zf_figure(
    model: nn.Module,
    data: Any,
    atlas: Atlas,
    layer: str,
    channel: int,
    method: str = "deconvnet",
    k: int = 9,
    style: str = "rgb",
    *,
    device: str | torch.device | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Figure:
    """:func:`zf_grid` with its layout: ``.image`` and ``.layout`` (cell rectangles).

    Displays itself in Jupyter.
    """
    check_method(method)
    style = get_style(style).name
    hits = top_hits(atlas, layer, channel, k)
    rf, rf_error = layer_field(model, atlas.input_shape, layer)
    batch = project_hits(model, data, layer, [(channel, h) for h in hits], rf, method, device)
    mean, std = normalisation(atlas, mean, std)
    title = zf_title(layer, channel, method, style, rf)
    fig = figure_from_batch(batch, slice(None), title, style, mean, std)
    fig.meta.update(
        layer=layer,
        channel=channel,
        method=method,
        hits=hits,
        title=title,
        receptive_field=rf,
        receptive_field_error=rf_error,
    )
    return fig


def zf_grid(
    model: nn.Module,
    data: Any,
    atlas: Atlas,
    layer: str,
    channel: int,
    method: str = "deconvnet",
    k: int = 9,
    style: str = "rgb",
    *,
    device: str | torch.device | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Image.Image:
    """The Zeiler & Fergus (2014, Fig. 2) picture of one channel.

    For each of the channel's top-``k`` hits (from ``atlas``), the projection of unit
    ``(layer, channel, hit.location)`` on example ``hit.index`` of ``data``, cut to the unit's
    receptive-field box, in one block; the input patches cut from the same boxes in a second
    block, hit ``i`` at the same place in both (rank order, row by row). Boxes that run past
    the input border keep their full size; the part outside is a light checkerboard. A layer
    whose receptive field cannot be computed shows the whole input (said in the title).

    Parameters
    ----------
    model, data
        The scanned model and dataset (``atlas.build_model()``, ``atlas.build_data()``).
    atlas
        From :func:`featurelens.scan` or :meth:`featurelens.Atlas.load`.
    layer, channel
        The feature map.
    method
        A key of :data:`featurelens.rules.METHODS`: ``gradient``, ``deconvnet``, ``guided``.
    k
        Hits shown (at most the atlas' top_k).
    style
        A key of :data:`featurelens.render.STYLES`: ``rgb``, ``magnitude``, ``signed``.
    mean, std
        The data's normalisation, to show patches as the original pixels; default the atlas'
        data spec's (patches are scaled per example when neither is known).

    Returns
    -------
    PIL.Image.Image
        RGB; displays itself in Jupyter. 1-D data gives aligned line plots, 3-D data the
        central slice of every box (said in the caption).
    """
    return zf_figure(
        model, data, atlas, layer, channel, method, k, style, device=device, mean=mean, std=std
    ).image


def layer_sheet(
    model: nn.Module,
    data: Any,
    atlas: Atlas,
    layer: str,
    method: str = "deconvnet",
    style: str = "rgb",
    channels: Sequence[int] | None = None,
    *,
    device: str | torch.device | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    columns: int = 8,
) -> Image.Image:
    """Every channel of ``layer`` at a glance: top-1 projection and patch per channel.

    ``channels`` selects some (default all). Projections are computed in one batched call.
    """
    check_method(method)
    style = get_style(style).name
    chosen = list(range(atlas.channels(layer))) if channels is None else list(channels)
    units = [(c, top_hits(atlas, layer, c, 1)[0]) for c in chosen]
    rf, _ = layer_field(model, atlas.input_shape, layer)
    batch = project_hits(model, data, layer, units, rf, method, device)
    mean, std = normalisation(atlas, mean, std)
    whole = " · whole input (no receptive field)" if rf is None else ""
    return render_layer_sheet(
        batch.examples,
        batch.projections,
        batch.boxes,
        [str(c) for c in chosen],
        style,
        mean,
        std,
        title=f"{layer} · top-1 of every channel · {method} · {style}{whole}",
        columns=columns,
    ).image


# --------------------------------------------------------------------------------------------
# Synthetic images (featurelens.visualize): the fourth view of the Deep Visualization Toolbox


def synthetic_images(
    model: nn.Module,
    atlas: Atlas,
    layer: str,
    channels: Sequence[int] | None = None,
    *,
    device: str | torch.device | None = None,
    options: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Visualization:
    """The inputs that maximise the centre unit of each channel, in one batched optimisation.

    :func:`featurelens.visualize` with the atlas's input shape and value range (its data
    spec's normalisation of pixels 0..1; else ``(0, 1)``, noted in the result).

    Parameters
    ----------
    model, atlas
        The scanned model and its atlas.
    layer
        A layer of the atlas.
    channels
        Which channels (default all of the layer).
    device
        Where to optimise (the model must live there).
    options
        Other keyword arguments of :func:`featurelens.visualize` (``steps``, ``lr``, ``seed``,
        ``regularizers``, ``objective``, ``value_range``, ...).
    progress
        A tqdm bar over the steps.

    Returns
    -------
    Visualization
        One row per channel.

    Raises
    ------
    LayerError, ChannelError, UsageError
        As :func:`featurelens.visualize`.
    """
    from featurelens.visualize import visualize

    atlas.layer(layer)  # a LayerError listing the atlas's layers
    chosen = list(range(atlas.channels(layer))) if channels is None else list(channels)
    kwargs = {"device": device, "progress": progress, **(options or {})}
    return visualize(model, layer, chosen, atlas=atlas, **kwargs)


def synthetic_title(v: Visualization) -> str:
    """One line: the layer, the unit's location and the canvas (crop or whole input, and why)."""
    what = "channel mean" if v.location is None else f"unit at {tuple(v.location)}"
    if v.cropped:
        box = ", ".join(f"{s.start}:{s.stop}" for s in v.box)
        canvas = f"receptive-field crop [{box}] of {tuple(v.input_shape[1:])}"
    else:
        canvas = f"whole input ({v.fallback})" if v.fallback else "whole input"
    return f"{v.layer} · synthetic input maximising the {what} · {canvas}"


def synthetic_sheet(v: Visualization, title: str | None = None, columns: int = 8) -> Image.Image:
    """The images of a :class:`~featurelens.Visualization` in a labelled grid.

    Each tile is labelled ``channel: final activation``; dead channels (never moved) are
    labelled so.

    Parameters
    ----------
    v
        From :func:`featurelens.visualize` or :func:`synthetic_images`.
    title
        Default :func:`synthetic_title`.
    columns
        Tiles per row.

    Returns
    -------
    PIL.Image.Image
        RGB.
    """
    from PIL import ImageDraw

    import featurelens.render as r

    tiles = v.tiles()
    labels = [
        f"{c}: dead" if c in v.dead else f"{c}: {float(a):.3g}"
        for c, a in zip(v.channels, v.activations)
    ]
    title = synthetic_title(v) if title is None else title
    th, tw = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    cols = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // cols)
    cell_w = max(tw, 64) + 3 * r.GAP
    cell_h = th + r.LABEL_SIZE + 3 * r.GAP
    top = r.MARGIN + (r.TITLE_SIZE + 2 * r.GAP if title else 0)
    width = max(2 * r.MARGIN + cols * cell_w, 2 * r.MARGIN + r._text_width(title, r.TITLE_SIZE))
    canvas = np.full((top + rows * cell_h + r.MARGIN, width, 3), r.BACKGROUND, dtype=np.uint8)
    places = []
    for i, t in enumerate(tiles):
        x, y = r.MARGIN + (i % cols) * cell_w, top + (i // cols) * cell_h
        canvas[y : y + t.shape[0], x : x + t.shape[1]] = t
        places.append((x, y + th + r.GAP))
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((r.MARGIN, r.MARGIN), title, fill=r.TEXT, font=r._font(r.TITLE_SIZE))
    for text, xy in zip(labels, places):
        draw.text(xy, text, fill=r.TEXT, font=r._font(r.LABEL_SIZE))
    return image


def join(images: Sequence[Image.Image], *, vertical: bool = False, gap: int = 16) -> Image.Image:
    """``images`` side by side (tops aligned) or one above the other (left-aligned), on white."""
    from featurelens.render import BACKGROUND

    sizes = [im.size for im in images]
    along = sum(wh[1 if vertical else 0] for wh in sizes) + gap * (len(images) - 1)
    across = max(wh[0 if vertical else 1] for wh in sizes)
    out = Image.new("RGB", (across, along) if vertical else (along, across), BACKGROUND)
    at = 0
    for im in images:
        out.paste(im.convert("RGB"), (0, at) if vertical else (at, 0))
        at += (im.height if vertical else im.width) + gap
    return out
