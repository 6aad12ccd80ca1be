"""Arrays to pictures: styles, receptive-field cells, Zeiler-Fergus grids and layer sheets.

Everything here is pure: numpy arrays (or tensors) in, PIL images out, no model and no files.
:mod:`featurelens.figures` computes the projections and calls these functions; the report,
the explorer and the CLI read :data:`STYLES`.

A *cell* is the picture of one unit's receptive-field box (Zeiler & Fergus 2014, Fig. 2):
the box is the unclipped interval ``ReceptiveField.interval(location)`` on every axis, so a
box that runs past the image border keeps its full size, and the part outside the image is
drawn with :data:`PAD_COLORS` (a light checkerboard, the usual "nothing here" pattern) both in
the projection and in the input patch. All cells of a figure share one integer scale and are
enlarged with nearest-neighbour sampling, so one input pixel is always a square of
``scale x scale`` display pixels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import overload

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from featurelens.errors import StyleError

__all__ = [
    "PAD_COLORS",
    "STYLES",
    "Figure",
    "GridLayout",
    "Style",
    "StyleError",
    "box_of",
    "crop_box",
    "get_style",
    "render_cells",
    "render_layer_sheet",
    "render_patch",
    "render_sheet_cells",
    "render_projection",
    "render_zf",
    "save_png",
    "zf_layout",
]

Box = tuple[tuple[int, int], ...]  # unclipped inclusive (first, last) per spatial axis
Rect = tuple[int, int, int, int]  # (left, top, right, bottom), half-open, display pixels

PAD_COLORS = ((196, 196, 196), (222, 222, 222))
"""The two greys of the checkerboard that marks box pixels outside the input."""
PAD_SQUARE = 4
"""Side of one checkerboard square in display pixels."""
BACKGROUND = (255, 255, 255)
TEXT = (34, 34, 34)
GAP = 4  # display pixels between cells of a block
BLOCK_GAP = 18  # between the projection block and the patch block
MARGIN = 8
TARGET_CELL = 80  # cells are enlarged to at least about this many display pixels
MAX_SCALE = 32
MAX_1D_ROWS = 64  # line plots per matplotlib figure


# --------------------------------------------------------------------------------------------
# Styles


def _to_float(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _peak(values: np.ndarray, valid: np.ndarray | None) -> float:
    """Largest absolute value over the valid (inside-the-input) pixels."""
    v = np.abs(values if valid is None else values[..., valid])
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size else 0.0


def _normalize_rgb(proj: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    # Zero maps to mid-grey and the largest |value| of this projection to 0 or 1, keeping the
    # input channels: the grey-background look of the deconvnet figures in the paper.
    peak = _peak(proj, valid)
    out = np.full(proj.shape, 0.5) if peak == 0 else 0.5 + 0.5 * proj / peak
    return np.moveaxis(np.clip(np.nan_to_num(out, nan=0.5), 0.0, 1.0), 0, -1)  # (*sp, C)


def _normalize_magnitude(proj: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    mag = np.abs(proj).max(axis=0)
    peak = _peak(mag, valid)
    out = np.zeros(mag.shape) if peak == 0 else mag / peak
    return np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)  # (*sp,)


def _normalize_signed(proj: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    # Summing over input channels keeps the sign of the total sensitivity of a pixel.
    total = proj.sum(axis=0)
    peak = _peak(total, valid)
    out = np.zeros(total.shape) if peak == 0 else total / peak
    return np.clip(np.nan_to_num(out, nan=0.0), -1.0, 1.0)  # (*sp,)


def _gray_or_rgb(values: np.ndarray) -> np.ndarray:
    """(*sp, C) in [0, 1] -> (*sp, 3): 3 channels as RGB, anything else as the grey mean."""
    if values.shape[-1] == 3:
        return values
    return np.repeat(values.mean(axis=-1, keepdims=True), 3, axis=-1)


@lru_cache(maxsize=8)
def _lut(cmap: str) -> np.ndarray:
    import matplotlib

    return matplotlib.colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3]  # (256, 3)


def _apply_cmap(cmap: str, unit: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (*, 3) colours of the matplotlib colour map ``cmap``."""
    idx = np.clip(np.round(unit * 255), 0, 255).astype(np.int64)
    return _lut(cmap)[idx]


@dataclass(frozen=True)
class Style:
    """How a projection becomes colours.

    Attributes
    ----------
    name, help
        Registry key and one line for menus and ``--help``.
    cmap
        matplotlib colour map name (None: the projection's own channels are the colours).
    value_range
        Range of :meth:`normalize`'s output.
    normalize
        ``(C, *spatial)`` projection and an optional ``(*spatial)`` bool mask of the pixels
        inside the input -> normalised values: ``(*spatial, C)`` for ``rgb``, ``(*spatial)``
        otherwise. Each projection is normalised on its own, over its valid pixels.
    """

    name: str
    help: str
    cmap: str | None
    value_range: tuple[float, float]
    normalize: Callable[[np.ndarray, np.ndarray | None], np.ndarray] = field(repr=False)

    def colorize(self, values: np.ndarray) -> np.ndarray:
        """Normalised values -> ``(*spatial, 3)`` float RGB in [0, 1]."""
        if self.cmap is None:
            return _gray_or_rgb(values)
        lo, hi = self.value_range
        return _apply_cmap(self.cmap, (values - lo) / (hi - lo))

    def __call__(self, proj: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """Normalise then colour ``proj``: an RGB image in ``[0, 1]``."""
        return self.colorize(self.normalize(proj, valid))


STYLES: dict[str, Style] = {
    "rgb": Style(
        "rgb",
        "the projection in the input's own channels, 0 at mid-grey, scaled to its largest |value| "
        "(Zeiler & Fergus 2014)",
        None,
        (0.0, 1.0),
        _normalize_rgb,
    ),
    "magnitude": Style(
        "magnitude",
        "absolute value, max over input channels, sequential colour map (inferno)",
        "inferno",
        (0.0, 1.0),
        _normalize_magnitude,
    ),
    "signed": Style(
        "signed",
        "sum over input channels, diverging colour map (RdBu_r) centred at 0",
        "RdBu_r",
        (-1.0, 1.0),
        _normalize_signed,
    ),
}
"""Projection styles by name: the CLI's ``--style`` choices and the explorer's menu."""


def get_style(style: str | Style) -> Style:
    """The :class:`Style` named ``style``; :class:`StyleError` lists the valid names."""
    if isinstance(style, Style):
        return style
    if style not in STYLES:
        raise StyleError(f"unknown style {style!r}; valid styles: {', '.join(STYLES)}")
    return STYLES[style]


# --------------------------------------------------------------------------------------------
# Cells


def box_of(rf, location: Sequence[int]) -> Box:
    """The unclipped box of ``location`` (the whole input when the field is global or irregular)."""
    if rf.is_global or not rf.regular:  # an irregular field has no box of one size
        return tuple((0, n - 1) for n in rf.input_shape)
    return rf.interval(tuple(int(v) for v in location))


def crop_box(x: np.ndarray, box: Box) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``box`` out of ``x`` (..., *spatial), padding with zeros where it leaves the input.

    Returns
    -------
    cell
        ``(..., *box_size)``: the box at its full size, never stretched.
    valid
        ``(*box_size)`` bool: True where the box lies inside the input.
    """
    spatial = x.shape[-len(box) :]
    size = tuple(last - first + 1 for first, last in box)
    cell = np.zeros(x.shape[: -len(box)] + size, dtype=x.dtype)
    valid = np.zeros(size, dtype=bool)
    src, dst = [], []
    for (first, last), n in zip(box, spatial):
        lo, hi = max(first, 0), min(last, n - 1)
        if hi < lo:  # the box lies wholly outside this axis: nothing valid
            return cell, valid
        src.append(slice(lo, hi + 1))
        dst.append(slice(lo - first, hi - first + 1))
    cell[(Ellipsis, *dst)] = x[(Ellipsis, *src)]  # type: ignore[index, arg-type]  # numpy's stubs
    valid[tuple(dst)] = True
    return cell, valid


def render_patch(
    x: np.ndarray | torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """An input (C, *spatial) as float RGB (*spatial, 3) in [0, 1].

    With ``mean``/``std`` (the data spec's normalisation) the input is un-normalised to its
    [0, 1] pixel values; otherwise it is scaled by ``value_range`` (default: its own min and
    max; pass the whole example's range so that a patch keeps the example's contrast).
    """
    x = _to_float(x)
    c = x.shape[0]
    shape = (c,) + (1,) * (x.ndim - 1)
    if mean is not None and std is not None:
        m = np.broadcast_to(np.asarray(mean, dtype=np.float64), (c,)).reshape(shape)
        s = np.broadcast_to(np.asarray(std, dtype=np.float64), (c,)).reshape(shape)
        v = x * s + m
    else:
        lo, hi = value_range if value_range is not None else (float(x.min()), float(x.max()))
        v = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return _gray_or_rgb(np.moveaxis(np.clip(v, 0.0, 1.0), 0, -1))


def render_projection(
    proj: np.ndarray | torch.Tensor, style: str | Style = "rgb", valid: np.ndarray | None = None
) -> np.ndarray:
    """A projection (C, *spatial) as float RGB (*spatial, 3) in [0, 1] in ``style``."""
    return get_style(style)(_to_float(proj), valid)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype == np.uint8:
        return rgb
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def _checker(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    parity = ((yy // PAD_SQUARE) + (xx // PAD_SQUARE)) % 2
    return np.asarray(PAD_COLORS, dtype=np.uint8)[parity]  # (h, w, 3)


def enlarge(rgb: np.ndarray, valid: np.ndarray, scale: int) -> np.ndarray:
    """(h, w, 3) float RGB -> (h*scale, w*scale, 3) uint8, padding drawn as the checkerboard.

    Nearest-neighbour only: each input pixel becomes a ``scale x scale`` square.
    """
    img = _to_uint8(rgb).repeat(scale, 0).repeat(scale, 1)
    mask = valid.repeat(scale, 0).repeat(scale, 1)
    if not mask.all():
        img[~mask] = _checker(*img.shape[:2])[~mask]
    return img


def _paste(canvas: np.ndarray, rect: Rect, pixels: np.ndarray) -> None:
    left, top, right, bottom = rect
    canvas[top:bottom, left:right] = pixels


def cell_scale(cell_shape: Sequence[int], target: int = TARGET_CELL) -> int:
    """Integer enlargement so that the longer side of a cell is about ``target`` pixels."""
    return int(min(MAX_SCALE, max(1, math.ceil(target / max(cell_shape)))))


# --------------------------------------------------------------------------------------------
# Text


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # matplotlib ships DejaVu Sans, so the same font (and the same pixels) everywhere.
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(path), size)
    except OSError:  # pragma: no cover - a matplotlib without its fonts
        return ImageFont.load_default()


def _text_width(text: str, size: int) -> int:
    left, _, right, _ = _font(size).getbbox(text)
    return int(math.ceil(right - left))


# --------------------------------------------------------------------------------------------
# The Zeiler-Fergus grid


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a ZF grid lies, in display pixels.

    ``projection_boxes[i]`` and ``patch_boxes[i]`` are the ``(left, top, right, bottom)``
    rectangles (half-open) of hit ``i`` (rank order, row by row) in the two blocks; each is
    ``cell_shape`` input pixels times ``scale``.
    """

    size: tuple[int, int]  # (width, height)
    scale: int
    cell_shape: tuple[int, int]  # (h, w) in input pixels
    columns: int
    projection_boxes: tuple[Rect, ...]
    patch_boxes: tuple[Rect, ...]
    title_xy: tuple[int, int]
    label_xy: tuple[tuple[int, int], tuple[int, int]]
    caption_xy: tuple[int, int] | None


TITLE_SIZE = 13
LABEL_SIZE = 11


def zf_layout(
    k: int,
    cell_shape: Sequence[int],
    scale: int,
    title: str = "",
    labels: tuple[str, str] = ("", ""),
    caption: str | None = None,
    columns: int | None = None,
) -> GridLayout:
    """Layout of a ZF grid: a block of ``k`` projections, then a block of ``k`` patches.

    ``columns`` defaults to ``ceil(sqrt(k))`` (a 3 x 3 block for the paper's top 9).
    """
    if k < 1:
        raise ValueError(f"a ZF grid needs at least one hit, got k={k}")
    h, w = (int(v) for v in cell_shape)
    cols = columns or math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    ch, cw = h * scale, w * scale
    block_w = cols * cw + (cols - 1) * GAP
    block_h = rows * ch + (rows - 1) * GAP
    title_h = TITLE_SIZE + 8 if title else 0
    label_h = LABEL_SIZE + 6 if any(labels) else 0
    caption_h = LABEL_SIZE + 8 if caption else 0
    content_w = 2 * block_w + BLOCK_GAP
    text_w = max(
        _text_width(title, TITLE_SIZE) if title else 0,
        _text_width(caption, LABEL_SIZE) if caption else 0,
    )
    width = 2 * MARGIN + max(content_w, text_w)
    top = MARGIN + title_h + label_h
    height = top + block_h + caption_h + MARGIN
    left0 = MARGIN
    left1 = MARGIN + block_w + BLOCK_GAP

    def boxes(left: int) -> tuple[Rect, ...]:
        out = []
        for i in range(k):
            r, c = divmod(i, cols)
            x0, y0 = left + c * (cw + GAP), top + r * (ch + GAP)
            out.append((x0, y0, x0 + cw, y0 + ch))
        return tuple(out)

    return GridLayout(
        size=(width, height),
        scale=scale,
        cell_shape=(h, w),
        columns=cols,
        projection_boxes=boxes(left0),
        patch_boxes=boxes(left1),
        title_xy=(MARGIN, MARGIN),
        label_xy=((left0, MARGIN + title_h), (left1, MARGIN + title_h)),
        caption_xy=(MARGIN, top + block_h + 4) if caption else None,
    )


@dataclass(frozen=True, eq=False)
class Figure:
    """A rendered figure: the image plus where its cells are (for tests and the explorer).

    Displays itself in Jupyter (``_repr_png_``); ``save(path)`` writes a PNG.
    """

    image: Image.Image
    layout: GridLayout | None = None
    meta: dict = field(default_factory=dict)

    def to_png(self) -> bytes:
        """The picture as PNG bytes."""
        return save_png(self.image)

    def _repr_png_(self) -> bytes:
        return self.to_png()

    def save(self, path: str | Path) -> Path:
        """Write the picture as a PNG file at ``path``; returns the path."""
        return save_png(self.image, path)


@overload
def save_png(image: Image.Image, path: None = None) -> bytes: ...
@overload
def save_png(image: Image.Image, path: str | Path) -> Path: ...
def save_png(image: Image.Image, path: str | Path | None = None) -> bytes | Path:
    """Encode ``image`` as PNG (no timestamps: the same image gives the same bytes).

    Returns the bytes, or writes them to ``path`` and returns the path.
    """
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    data = buf.getvalue()
    if path is None:
        return data
    path = Path(path)
    path.write_bytes(data)
    return path


def render_cells(
    examples: np.ndarray | torch.Tensor,
    projections: np.ndarray | torch.Tensor,
    boxes: Sequence[Box],
    style: str | Style = "rgb",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[np.ndarray, np.ndarray]], str | None]:
    """Float RGB cells of 2-D (or central slices of 3-D) hits.

    Parameters
    ----------
    examples, projections
        ``(k, C, *spatial)`` inputs and their projections, spatial rank 2 or 3.
    boxes
        One unclipped box per hit (:func:`box_of`).

    Returns
    -------
    projection cells, patch cells
        Lists of ``(rgb (h, w, 3), valid (h, w))``.
    note
        For 3-D data, the caption saying which slice is shown; else None.
    """
    style = get_style(style)
    examples, projections = _to_float(examples), _to_float(projections)
    ndim = examples.ndim - 2
    if ndim not in (2, 3):
        raise ValueError(f"render_cells draws 2-D and 3-D inputs; got {ndim} spatial axes")
    proj_cells, patch_cells = [], []
    note = None
    for x, p, box in zip(examples, projections, boxes):
        xc, valid = crop_box(x, box)
        pc, _ = crop_box(p, box)
        if ndim == 3:
            # The central slice of the box along the first spatial axis.
            mid = (box[0][1] - box[0][0]) // 2
            xc, pc, valid = xc[:, mid], pc[:, mid], valid[mid]
            note = "3-D input: the central slice (first spatial axis) of each receptive-field box"
        lo_hi = None
        if mean is None or std is None:
            lo_hi = (float(x.min()), float(x.max()))
        patch_cells.append((render_patch(xc, mean, std, lo_hi), valid))
        proj_cells.append((style(pc, valid), valid))
    return proj_cells, patch_cells, note


def render_zf(
    examples: np.ndarray | torch.Tensor,
    projections: np.ndarray | torch.Tensor,
    boxes: Sequence[Box],
    style: str | Style = "rgb",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    title: str = "",
    labels: tuple[str, str] = ("projections", "input patches"),
    scale: int | None = None,
    columns: int | None = None,
) -> Figure:
    """The Zeiler & Fergus (2014) Fig. 2 picture of one channel's top hits.

    Parameters
    ----------
    examples, projections
        ``(k, C, *spatial)``: the top-k examples (as fed to the model) and the projection of
        the unit of each hit on its example. 1-D (``spatial`` of rank 1) gives aligned line
        plots, 3-D the central slice of every box.
    boxes
        Per hit, the unclipped receptive-field box of its unit (:func:`box_of`); all boxes
        of a figure have the same size.
    mean, std
        The data's normalisation, to show patches in their original pixel values; without
        them each patch is scaled by its example's min and max.
    scale
        Display pixels per input pixel; default :func:`cell_scale`.

    Returns
    -------
    Figure
        ``.image`` (PIL, RGB) and ``.layout`` (cell rectangles) for 2-D/3-D data.
    """
    style = get_style(style)
    examples, projections = _to_float(examples), _to_float(projections)
    if examples.shape != projections.shape:
        raise ValueError(
            f"examples {examples.shape} and projections {projections.shape} differ in shape"
        )
    if examples.ndim == 3:
        return _render_zf_1d(examples, projections, boxes, style, mean, std, title)
    proj_cells, patch_cells, note = render_cells(examples, projections, boxes, style, mean, std)
    cell_shape = proj_cells[0][0].shape[:2]
    scale = scale or cell_scale(cell_shape)
    layout = zf_layout(len(boxes), cell_shape, scale, title, labels, note, columns)
    canvas = np.empty((layout.size[1], layout.size[0], 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for (rgb, valid), rect in zip(proj_cells, layout.projection_boxes):
        _paste(canvas, rect, enlarge(rgb, valid, scale))
    for (rgb, valid), rect in zip(patch_cells, layout.patch_boxes):
        _paste(canvas, rect, enlarge(rgb, valid, scale))
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text(layout.title_xy, title, fill=TEXT, font=_font(TITLE_SIZE))
    for xy, text in zip(layout.label_xy, labels):
        if text:
            draw.text(xy, text, fill=TEXT, font=_font(LABEL_SIZE))
    if note and layout.caption_xy:
        draw.text(layout.caption_xy, note, fill=TEXT, font=_font(LABEL_SIZE))
    return Figure(image, layout, {"style": style.name, "note": note})


# --------------------------------------------------------------------------------------------
# 1-D: aligned line plots


def _matplotlib_png(fig) -> Image.Image:
    buf = io.BytesIO()
    # No "Software"/date metadata, so the bytes depend only on the drawing.
    fig.savefig(buf, format="png", metadata={"Software": None})
    buf.seek(0)
    img = Image.open(buf)
    img.load()
    return img.convert("RGB")


def _render_zf_1d(
    examples: np.ndarray,
    projections: np.ndarray,
    boxes: Sequence[Box],
    style: Style,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    title: str,
) -> Figure:
    from matplotlib.figure import Figure as MplFigure

    k = len(boxes)
    fig = MplFigure(figsize=(7.0, 0.9 * k + 0.8), dpi=100)
    axes = fig.subplots(k, 2, sharex=True, squeeze=False)
    pad_rgb = np.asarray(PAD_COLORS[0]) / 255
    for i, (x, p, box) in enumerate(zip(examples, projections, boxes)):
        (first, last) = box[0]
        pos = np.arange(first, last + 1)
        xc, valid = crop_box(x, box)
        pc, _ = crop_box(p, box)
        ax_p, ax_x = axes[i]
        if mean is not None and std is not None:
            m = np.broadcast_to(np.asarray(mean, dtype=np.float64), (x.shape[0],))[:, None]
            s = np.broadcast_to(np.asarray(std, dtype=np.float64), (x.shape[0],))[:, None]
            xc = xc * s + m
        values = style.normalize(pc, valid)
        if style.name == "rgb":  # (L, C) in [0, 1] with 0 at 0.5: back to [-1, 1] per channel
            for c in range(values.shape[1]):
                ax_p.plot(pos[valid], 2 * values[valid, c] - 1, lw=1.2)
            ax_p.set_ylim(-1.05, 1.05)
        elif style.name == "magnitude":
            color = _lut(style.cmap)[180]
            ax_p.fill_between(pos[valid], 0, values[valid], color=color, lw=0)
            ax_p.set_ylim(0, 1.05)
        else:
            v = values[valid]
            lut = _lut(style.cmap)
            ax_p.fill_between(pos[valid], 0, np.clip(v, 0, None), color=lut[230], lw=0)
            ax_p.fill_between(pos[valid], 0, np.clip(v, None, 0), color=lut[25], lw=0)
            ax_p.set_ylim(-1.05, 1.05)
        for c in range(xc.shape[0]):
            ax_x.plot(pos[valid], xc[c][valid], lw=1.2, color="0.15" if xc.shape[0] == 1 else None)
        for ax in (ax_p, ax_x):
            ax.axhline(0, color="0.6", lw=0.5)
            outside = ~valid
            if outside.any():
                # Shade the part of the box outside the input, the 1-D padding fill.
                for j in np.flatnonzero(outside):
                    ax.axvspan(pos[j] - 0.5, pos[j] + 0.5, color=pad_rgb, lw=0, hatch="//")
            ax.set_xlim(first - 0.5, last + 0.5)
            ax.tick_params(labelsize=7)
        if i == 0:
            ax_p.set_title("projections", fontsize=9)
            ax_x.set_title("input patches", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return Figure(_matplotlib_png(fig), None, {"style": style.name, "note": "1-D line plots"})


# --------------------------------------------------------------------------------------------
# Layer sheet


@dataclass(frozen=True)
class SheetLayout:
    size: tuple[int, int]
    scale: int
    tiles: tuple[tuple[Rect, Rect, tuple[int, int]], ...]  # projection, patch, label xy


def sheet_layout(
    n: int, cell_shape: Sequence[int], scale: int, columns: int = 8, title: str = ""
) -> SheetLayout:
    """Layout of a layer sheet: ``n`` tiles (projection | patch), ``columns`` tiles a row."""
    h, w = (int(v) for v in cell_shape)
    ch, cw = h * scale, w * scale
    cols = max(1, min(columns, n))
    tile_w = 2 * cw + GAP
    label_h = LABEL_SIZE + 4
    tile_h = label_h + ch
    pitch_x, pitch_y = tile_w + 12, tile_h + 10
    title_h = TITLE_SIZE + 8 if title else 0
    rows = math.ceil(n / cols)
    width = 2 * MARGIN + cols * pitch_x - 12
    width = max(width, 2 * MARGIN + (_text_width(title, TITLE_SIZE) if title else 0))
    height = 2 * MARGIN + title_h + rows * pitch_y - 10
    tiles = []
    for i in range(n):
        r, c = divmod(i, cols)
        x0, y0 = MARGIN + c * pitch_x, MARGIN + title_h + r * pitch_y
        top = y0 + label_h
        tiles.append(
            (
                (x0, top, x0 + cw, top + ch),
                (x0 + cw + GAP, top, x0 + 2 * cw + GAP, top + ch),
                (x0, y0),
            )
        )
    return SheetLayout((width, height), scale, tuple(tiles))


def render_layer_sheet(
    examples: np.ndarray | torch.Tensor,
    projections: np.ndarray | torch.Tensor,
    boxes: Sequence[Box],
    labels: Sequence[str],
    style: str | Style = "rgb",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    title: str = "",
    columns: int = 8,
) -> Figure:
    """Every channel of a layer at a glance: one tile (projection | patch) per channel.

    ``examples``/``projections`` are ``(n_channels, C, *spatial)`` (each channel's top-1 hit),
    ``labels`` one short text per tile (the channel number).
    """
    style = get_style(style)
    examples, projections = _to_float(examples), _to_float(projections)
    if examples.ndim == 3:  # 1-D: a sheet of line plots is the ZF grid with one row per channel
        if len(boxes) > MAX_1D_ROWS:
            raise ValueError(
                f"a 1-D layer sheet draws at most {MAX_1D_ROWS} channels as line plots, got "
                f"{len(boxes)}: pass channels=[...] to choose some"
            )
        return _render_zf_1d(examples, projections, boxes, style, mean, std, title)
    proj_cells, patch_cells, note = render_cells(examples, projections, boxes, style, mean, std)
    return render_sheet_cells(proj_cells, patch_cells, labels, title, columns, note, style.name)


def render_sheet_cells(
    proj_cells: Sequence[tuple[np.ndarray, np.ndarray]],
    patch_cells: Sequence[tuple[np.ndarray, np.ndarray]],
    labels: Sequence[str],
    title: str = "",
    columns: int = 8,
    note: str | None = None,
    style: str = "",
) -> Figure:
    """A layer sheet from cells made by :func:`render_cells` (float or uint8 RGB, valid mask)."""
    cell_shape = proj_cells[0][0].shape[:2]
    scale = cell_scale(cell_shape, target=56)
    layout = sheet_layout(len(proj_cells), cell_shape, scale, columns, title)
    canvas = np.empty((layout.size[1], layout.size[0], 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for (p, v), (x, xv), (p_rect, x_rect, _) in zip(proj_cells, patch_cells, layout.tiles):
        _paste(canvas, p_rect, enlarge(p, v, scale))
        _paste(canvas, x_rect, enlarge(x, xv, scale))
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((MARGIN, MARGIN), title, fill=TEXT, font=_font(TITLE_SIZE))
    for text, (_, _, xy) in zip(labels, layout.tiles):
        draw.text(xy, text, fill=TEXT, font=_font(LABEL_SIZE))
    return Figure(image, None, {"style": style, "note": note, "sheet": layout})
