"""Zeiler-Fergus figures and layer sheets from a model, its data and an atlas.

This module computes (examples, projections, receptive-field boxes) and hands them to the pure
renderers of :mod:`featurelens.render`:

* :func:`zf_grid` / :func:`zf_figure`: for one channel's top-k hits, the projection of each
  hit's unit on its example next to the input patch, both cut to the unit's receptive-field
  box (Zeiler & Fergus 2014, Fig. 2);
* :func:`layer_sheet`: every channel of a layer, top-1 hit only.

Projections go through :func:`featurelens.project` in batches: all k hits of a channel in one
call, and for sheets and reports many channels per call (:func:`project_hits`). The method is
:data:`featurelens.rules.DEFAULT_METHOD` (``gradient``) unless named; ``other_activations``
is passed on to :func:`featurelens.project` and said in the figure's caption when it changed
anything (:func:`other_activations_note`). Signals (1-D inputs, or ``(L, 1)``) are drawn as
rows (:func:`featurelens.render.render_signal_zf`), with each hit's label and the atlas'
sample rate when it records them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from featurelens._public import public
from featurelens.atlas import Atlas, Hit
from featurelens.data import example_tensor
from featurelens.receptive_field import ReceptiveField, try_receptive_field
from featurelens.render import (
    Box,
    Figure,
    box_of,
    get_signal_view,
    get_style,
    is_signal_shape,
    render_layer_sheet,
    render_zf,
)
from featurelens.rules import DEFAULT_METHOD, check_other_activations, get_rule

if TYPE_CHECKING:
    from featurelens.visualize import Visualization

__all__ = [
    "DEFAULT_METHOD",
    "HitBatch",
    "atlas_sample_rate",
    "check_method",
    "check_render_options",
    "figure_from_batch",
    "format_label",
    "hit_captions",
    "layer_field",
    "join",
    "normalisation",
    "top_hits",
    "zf_title",
    "layer_sheet",
    "load_examples",
    "model_dtype",
    "normalisation",
    "other_activations_note",
    "project_hits",
    "sheet_title",
    "top_hits",
    "synthetic_images",
    "synthetic_sheet",
    "synthetic_title",
    "zf_figure",
    "zf_grid",
    "zf_title",
]


def check_method(method: str) -> str:
    """``method`` if it is a key of :data:`featurelens.rules.METHODS`, else a ValueError."""
    return get_rule(method).name


def check_render_options(
    method: str,
    style: str,
    other_activations: str = "error",
    signal_view: str = "waveform",
    input_shape: Sequence[int] | None = None,
) -> tuple[str, str]:
    """Check every rendering option before any work; returns ``(method, style)`` names.

    Parameters
    ----------
    method, style, other_activations, signal_view
        Keys of :data:`featurelens.rules.METHODS`, :data:`featurelens.render.STYLES`,
        :data:`featurelens.rules.OTHER_ACTIVATIONS`, :data:`featurelens.render.SIGNAL_VIEWS`.
    input_shape
        ``(C, *spatial)`` of the inputs, when known: a signal view other than ``waveform``
        is refused for inputs that are not signals.

    Raises
    ------
    ValueError
        An unknown method or ``other_activations``; a spectrogram of images.
    StyleError
        An unknown style or signal view (the valid names are listed).
    """
    method = check_method(method)
    style = get_style(style).name
    check_other_activations(other_activations)
    view = get_signal_view(signal_view)
    shape = None if input_shape is None else tuple(input_shape)
    if view.name != "waveform" and shape is not None and not is_signal_shape(shape[1:]):
        raise ValueError(
            f"signal_view={view.name!r} draws signals (inputs with one axis of samples); "
            f"this atlas' inputs are {shape}: leave the signal view at 'waveform'"
        )
    return method, style


def other_activations_note(method: str, other_activations: str) -> str | None:
    """The caption that says a figure passed other activations as plain gradients, or None
    when ``other_activations`` changed nothing (``"error"``, or a method that is the plain
    gradient everywhere).
    """
    if other_activations == "gradient" and not get_rule(method).autograd:
        return (
            f"{method} through rectifiers; other activations (GELU, SiLU, Hardswish, ...) "
            "passed as plain gradient"
        )
    return None


def format_label(label: Any) -> str:
    """A hit's label as text: floats to 4 significant digits, anything else as ``str``."""
    if isinstance(label, float):
        return f"{label:.4g}"
    return str(label)


def hit_captions(hits: Sequence[Hit], signal: bool) -> list[str] | None:
    """The captions of a ZF figure's hits.

    Signals: every row ``"rank · example i · score s"``, with ``· label l`` when the hit has
    a label. Images: the labels only (under the patches), None when no hit has one (the
    figure is then drawn as without labels).
    """
    labels = [getattr(h, "label", None) for h in hits]
    if signal:
        return [
            f"{r + 1} · example {h.index} · score {h.score:.4g}"
            + ("" if lab is None else f" · label {format_label(lab)}")
            for r, (h, lab) in enumerate(zip(hits, labels))
        ]
    if all(lab is None for lab in labels):
        return None
    return ["" if lab is None else format_label(lab) for lab in labels]


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
    method: str = DEFAULT_METHOD,
    device: str | torch.device | None = None,
    *,
    other_activations: str = "error",
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
    other_activations
        As for :func:`featurelens.project`: ``"error"`` or ``"gradient"``.

    Returns
    -------
    HitBatch
        Examples, projections and boxes, one row per unit, on the CPU.

    Raises
    ------
    ValueError
        ``rf`` computed for inputs of another spatial shape than the examples', or whose
        output grid is not the layer's; the errors of :func:`featurelens.project`.
    ActivationError
        An activation without a rule for ``method`` and ``other_activations="error"``.
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
        model,
        examples,
        layer,
        channels,
        locations,
        method=method,
        device=device,
        field=rf,
        other_activations=other_activations,
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
    *,
    captions: Sequence[str] | None = None,
    notes: Sequence[str] = (),
    signal_view: str = "waveform",
    sample_rate: float | None = None,
) -> Figure:
    """The ZF figure of some rows of a :class:`HitBatch` (one channel's hits).

    ``captions``, ``notes``, ``signal_view`` and ``sample_rate`` are passed to
    :func:`featurelens.render.render_zf`.
    """
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
        captions=captions,
        notes=notes,
        signal_view=signal_view,
        sample_rate=sample_rate,
    )


def atlas_sample_rate(atlas: Atlas) -> float | None:
    """The atlas' sample rate (samples per second of 1-D data), None when not recorded."""
    return getattr(atlas, "sample_rate", None)


@public
def zf_figure(
    model: nn.Module,
    data: Any,
    atlas: Atlas,
    layer: str,
    channel: int,
    method: str = DEFAULT_METHOD,
    k: int = 9,
    style: str = "rgb",
    *,
    device: str | torch.device | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    other_activations: str = "error",
    signal_view: str = "waveform",
) -> Figure:
    """:func:`zf_grid` with its layout: ``.image`` and ``.layout`` (cell or row rectangles).

    Displays itself in Jupyter. ``meta`` holds the layer, channel, method, hits, title,
    receptive field (or why there is none) and ``other_activations``.
    """
    method, style = check_render_options(
        method, style, other_activations, signal_view, atlas.input_shape
    )
    hits = top_hits(atlas, layer, channel, k)
    rf, rf_error = layer_field(model, atlas.input_shape, layer)
    batch = project_hits(
        model, data, layer, [(channel, h) for h in hits], rf, method, device,
        other_activations=other_activations,
    )  # fmt: skip
    mean, std = normalisation(atlas, mean, std)
    title = zf_title(layer, channel, method, style, rf)
    note = other_activations_note(method, other_activations)
    fig = figure_from_batch(
        batch, slice(None), title, style, mean, std,
        captions=hit_captions(hits, is_signal_shape(tuple(atlas.input_shape)[1:])),
        notes=[note] if note else (), signal_view=signal_view,
        sample_rate=atlas_sample_rate(atlas),
    )  # fmt: skip
    fig.meta.update(
        layer=layer,
        channel=channel,
        method=method,
        other_activations=other_activations,
        hits=hits,
        title=title,
        receptive_field=rf,
        receptive_field_error=rf_error,
    )
    return fig


@public
def zf_grid(
    model: nn.Module,
    data: Any,
    atlas: Atlas,
    layer: str,
    channel: int,
    method: str = DEFAULT_METHOD,
    k: int = 9,
    style: str = "rgb",
    *,
    device: str | torch.device | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    other_activations: str = "error",
    signal_view: str = "waveform",
) -> Image.Image:
    """The Zeiler & Fergus (2014, Fig. 2) picture of one channel.

    For each of the channel's top-``k`` hits (from ``atlas``), the projection of unit
    ``(layer, channel, hit.location)`` on example ``hit.index`` of ``data``, cut to the unit's
    receptive-field box, in one block; the input patches cut from the same boxes in a second
    block, hit ``i`` at the same place in both (rank order, row by row). Boxes that run past
    the input border keep their full size; the part outside is a light checkerboard. A layer
    whose receptive field cannot be computed shows the whole input (said in the title). When
    the atlas records labels, each patch has its hit's label under it.

    Signals (1-D inputs, or 2-D inputs with an axis of size 1 such as ``(L, 1)``) get one row
    per hit instead: a header (rank, example, score, label), the input patch over the unit's
    receptive-field window and the projection under it, on that row's own x-axis (samples,
    or milliseconds when the atlas records a sample rate).

    Parameters
    ----------
    model, data
        The scanned model and dataset (``atlas.build_model()``, ``atlas.build_data()``).
    atlas
        From :func:`featurelens.scan` or :meth:`featurelens.Atlas.load`.
    layer, channel
        The feature map.
    method
        A key of :data:`featurelens.rules.METHODS`: ``gradient`` (default,
        :data:`featurelens.rules.DEFAULT_METHOD`), ``deconvnet``, ``guided``.
    k
        Hits shown (at most the atlas' top_k).
    style
        A key of :data:`featurelens.render.STYLES`: ``rgb``, ``magnitude``, ``signed``.
    device
        Where the projections run (default: the model's device).
    mean, std
        The data's normalisation, to show patches as the original pixels; default the atlas'
        data spec's (patches are scaled per example when neither is known).
    other_activations
        Under ``deconvnet``/``guided``, what an activation that is not a rectifier (GELU,
        SiLU, Hardswish, ...) does: ``"error"`` (default: :class:`ActivationError` naming it)
        or ``"gradient"`` (passed as the plain gradient; the figure's caption says so), as
        for :func:`featurelens.project`.
    signal_view
        Signals only: a key of :data:`featurelens.render.SIGNAL_VIEWS`, ``waveform``
        (default) or ``spectrogram``.

    Returns
    -------
    PIL.Image.Image
        RGB; displays itself in Jupyter. 3-D data gives the central slice of every box (said
        in the caption).

    Raises
    ------
    ValueError
        An unknown method or ``other_activations``, a bad ``k``, a spectrogram of images.
    StyleError
        An unknown style or signal view.
    LayerError, ChannelError
        A layer the atlas lacks, a channel out of range.
    ActivationError
        An activation without a rule for ``method`` (pass ``other_activations="gradient"``).
    """
    return zf_figure(
        model, data, atlas, layer, channel, method, k, style, device=device, mean=mean, std=std,
        other_activations=other_activations, signal_view=signal_view,
    ).image  # fmt: skip


@public
def layer_sheet(
    model: nn.Module,
    data: Any,
    atlas: Atlas,
    layer: str,
    method: str = DEFAULT_METHOD,
    style: str = "rgb",
    channels: Sequence[int] | None = None,
    *,
    device: str | torch.device | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    columns: int = 8,
    other_activations: str = "error",
    signal_view: str = "waveform",
) -> Image.Image:
    """Every channel of ``layer`` at a glance: top-1 projection and patch per channel.

    ``channels`` selects some (default all). Projections are computed in one batched call.
    Signals get one tile per channel (patch panel over projection panel, with the window),
    any number of channels. ``method``, ``style``, ``device``, ``mean``, ``std``,
    ``other_activations`` and ``signal_view`` are as for :func:`zf_grid`.

    Raises
    ------
    ValueError, StyleError, LayerError, ChannelError, ActivationError
        As :func:`zf_grid`.
    """
    method, style = check_render_options(
        method, style, other_activations, signal_view, atlas.input_shape
    )
    chosen = list(range(atlas.channels(layer))) if channels is None else list(channels)
    units = [(c, top_hits(atlas, layer, c, 1)[0]) for c in chosen]
    rf, _ = layer_field(model, atlas.input_shape, layer)
    batch = project_hits(
        model, data, layer, units, rf, method, device, other_activations=other_activations
    )
    mean, std = normalisation(atlas, mean, std)
    note = other_activations_note(method, other_activations)
    return render_layer_sheet(
        batch.examples,
        batch.projections,
        batch.boxes,
        [str(c) for c in chosen],
        style,
        mean,
        std,
        title=sheet_title(layer, method, style, rf),
        columns=columns,
        notes=[note] if note else (),
        signal_view=signal_view,
        sample_rate=atlas_sample_rate(atlas),
    ).image


def sheet_title(layer: str, method: str, style: str, rf: ReceptiveField | None) -> str:
    """The title of a layer sheet."""
    whole = " · whole input (no receptive field)" if rf is None else ""
    return f"{layer} · top-1 of every channel · {method} · {style}{whole}"


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
