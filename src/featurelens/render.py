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
``scale x scale`` display pixels, unless a box is longer than :data:`MAX_CELL` display pixels
(a very elongated or very large field): then the cell is resampled to fit (nearest neighbour).

Signals (one spatial axis, or two where one has size 1, such as ``(L, 1)``) are drawn as rows
(:func:`render_signal_zf`): per hit the input patch over the unit's receptive-field window
with the projection under it, on that row's own x-axis, in one of :data:`SIGNAL_VIEWS`
(``waveform`` or ``spectrogram``). Every picture is drawn straight into numpy arrays (no
per-sample drawing calls), so a grid takes milliseconds whatever the window's length.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from featurelens.errors import StyleError

__all__ = [
    "PAD_COLORS",
    "SIGNAL_VIEWS",
    "STYLES",
    "Figure",
    "GridLayout",
    "SignalAxis",
    "SignalLayout",
    "SignalRow",
    "SheetTiles",
    "SignalView",
    "Style",
    "StyleError",
    "as_signal",
    "box_of",
    "crop_box",
    "get_signal_view",
    "get_style",
    "is_signal_shape",
    "render_cells",
    "render_layer_sheet",
    "render_patch",
    "render_sheet_cells",
    "render_projection",
    "render_signal_sheet",
    "render_signal_tiles",
    "render_signal_zf",
    "render_zf",
    "save_png",
    "signal_ticks",
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
MAX_CELL = 512
"""Longest side of a ZF cell in display pixels; longer boxes are resampled to fit."""
MAX_SHEET_CELL = 256
"""Longest side of a layer sheet's cell in display pixels."""
MIN_CELL_SIDE = 8
"""Shortest side of a resampled cell (a 1-pixel-wide box stays visible)."""


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
    out = np.full(proj.shape, 0.5) if peak == 0 else 0.5 + 0.5 * (proj / peak)  # subnormals
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


@lru_cache(maxsize=64)
def _checker(h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8 checkerboard of :data:`PAD_COLORS`; cached, read-only."""
    yy, xx = np.mgrid[0:h, 0:w]
    parity = ((yy // PAD_SQUARE) + (xx // PAD_SQUARE)) % 2
    board = np.asarray(PAD_COLORS, dtype=np.uint8)[parity]  # (h, w, 3)
    board.flags.writeable = False
    return board


def enlarge(rgb: np.ndarray, valid: np.ndarray, scale: int) -> np.ndarray:
    """(h, w, 3) float RGB -> (h*scale, w*scale, 3) uint8, padding drawn as the checkerboard.

    Nearest-neighbour only: each input pixel becomes a ``scale x scale`` square.
    """
    img = _to_uint8(rgb).repeat(scale, 0).repeat(scale, 1)
    mask = valid.repeat(scale, 0).repeat(scale, 1)
    if not mask.all():
        img[~mask] = _checker(*img.shape[:2])[~mask]
    return img


def resample(rgb: np.ndarray, valid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) float RGB -> ``size`` (H, W) display pixels, uint8, nearest neighbour.

    For cells longer than :data:`MAX_CELL`: display pixel ``(r, c)`` shows input pixel
    ``(floor((r + 0.5) h / H), floor((c + 0.5) w / W))``. Padding is the checkerboard.
    """
    h, w = valid.shape
    rows = ((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64)
    cols = ((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64)
    img = _to_uint8(rgb)[rows][:, cols]
    mask = valid[rows][:, cols]
    if not mask.all():
        img[~mask] = _checker(*img.shape[:2])[~mask]
    return img


def display_shape(
    cell_shape: Sequence[int], target: int = TARGET_CELL, max_side: int = MAX_CELL
) -> tuple[int, int, int]:
    """``(H, W, scale)``: the display size of a cell of ``cell_shape`` (h, w) input pixels.

    The integer :func:`cell_scale` (``H = h * scale``) unless the longer side would exceed
    ``max_side``; then the cell is resampled so that its longer side is ``max_side`` (the
    shorter one at least :data:`MIN_CELL_SIDE`) and ``scale`` is 0.
    """
    h, w = (int(v) for v in cell_shape)
    scale = cell_scale((h, w), target)
    if max(h, w) * scale <= max_side:
        return h * scale, w * scale, scale
    f = max_side / max(h, w)
    return max(MIN_CELL_SIDE, round(h * f)), max(MIN_CELL_SIDE, round(w * f)), 0


def _draw_cell(rgb: np.ndarray, valid: np.ndarray, size: tuple[int, int], scale: int) -> np.ndarray:
    return enlarge(rgb, valid, scale) if scale else resample(rgb, valid, size)


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


def _fit_text(text: str, size: int, width: int) -> str:
    """``text``, cut and ended with an ellipsis where it is wider than ``width`` pixels."""
    if _text_width(text, size) <= width:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # the longest prefix that fits with the ellipsis
        mid = (lo + hi + 1) // 2
        if _text_width(text[:mid] + "…", size) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…" if lo else ""


# --------------------------------------------------------------------------------------------
# The Zeiler-Fergus grid


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a ZF grid lies, in display pixels.

    ``projection_boxes[i]`` and ``patch_boxes[i]`` are the ``(left, top, right, bottom)``
    rectangles (half-open) of hit ``i`` (rank order, row by row) in the two blocks; each is
    ``cell_shape`` input pixels times ``scale``, or ``cell_size`` display pixels when the cell
    was resampled (``scale`` 0, see :func:`display_shape`). ``hit_caption_xy[i]`` is where
    hit ``i``'s caption (its label) is written, under its patch; empty without captions.
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
    cell_size: tuple[int, int] = (0, 0)  # (h, w) in display pixels
    hit_caption_xy: tuple[tuple[int, int], ...] = ()


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
    cell_size: tuple[int, int] | None = None,
    hit_captions: bool = False,
) -> GridLayout:
    """Layout of a ZF grid: a block of ``k`` projections, then a block of ``k`` patches.

    ``columns`` defaults to ``ceil(sqrt(k))`` (a 3 x 3 block for the paper's top 9).
    ``cell_size`` (display pixels) overrides ``cell_shape * scale`` for resampled cells;
    ``hit_captions`` leaves a line of text under every cell (the hits' labels).
    """
    if k < 1:
        raise ValueError(f"a ZF grid needs at least one hit, got k={k}")
    h, w = (int(v) for v in cell_shape)
    cols = columns or math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    ch, cw = cell_size if cell_size is not None else (h * scale, w * scale)
    cap_h = LABEL_SIZE + 4 if hit_captions else 0
    pitch_y = ch + cap_h + GAP
    block_w = cols * cw + (cols - 1) * GAP
    block_h = rows * pitch_y - GAP
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
            x0, y0 = left + c * (cw + GAP), top + r * pitch_y
            out.append((x0, y0, x0 + cw, y0 + ch))
        return tuple(out)

    patch_boxes = boxes(left1)
    return GridLayout(
        size=(width, height),
        scale=scale,
        cell_shape=(h, w),
        columns=cols,
        projection_boxes=boxes(left0),
        patch_boxes=patch_boxes,
        title_xy=(MARGIN, MARGIN),
        label_xy=((left0, MARGIN + title_h), (left1, MARGIN + title_h)),
        caption_xy=(MARGIN, top + block_h + 4) if caption else None,
        cell_size=(ch, cw),
        hit_caption_xy=tuple((x0, y1 + 1) for x0, _, _, y1 in patch_boxes) if hit_captions else (),
    )


@dataclass(frozen=True, eq=False)
class Figure:
    """A rendered figure: the image plus where its cells are (for tests and the explorer).

    Displays itself in Jupyter (``_repr_png_``); ``save(path)`` writes a PNG.
    """

    image: Image.Image
    layout: GridLayout | SignalLayout | None = None
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
    *,
    captions: Sequence[str] | None = None,
    notes: Sequence[str] = (),
    signal_view: str | SignalView = "waveform",
    sample_rate: float | None = None,
) -> Figure:
    """The Zeiler & Fergus (2014) Fig. 2 picture of one channel's top hits.

    Parameters
    ----------
    examples, projections
        ``(k, C, *spatial)``: the top-k examples (as fed to the model) and the projection of
        the unit of each hit on its example. Signals (1 spatial axis, or 2 where one has size
        1) are drawn as rows by :func:`render_signal_zf`; 3-D gives the central slice of
        every box.
    boxes
        Per hit, the unclipped receptive-field box of its unit (:func:`box_of`); all boxes
        of a figure have the same size.
    mean, std
        The data's normalisation, to show patches in their original pixel values; without
        them each patch is scaled by its example's min and max.
    title
        First line of the figure.
    labels
        The names of the projection block and the patch block (of the two panels of a
        signal row).
    scale
        Display pixels per input pixel; default :func:`display_shape`'s.
    columns
        Cells per block row (default ``ceil(sqrt(k))``).
    captions
        One short text per hit (its label): under its patch for images, in its row's header
        for signals. None or all empty: no caption line (the figure is as without labels).
    notes
        Lines for the caption at the bottom (for example that other activations were passed
        as plain gradients), after the renderer's own note (3-D slices, ``(L, 1)`` signals).
    signal_view
        A key of :data:`SIGNAL_VIEWS` (signals only): ``waveform`` (default) or
        ``spectrogram``.
    sample_rate
        Samples per second of a signal: its axes in milliseconds and hertz, else in samples.

    Returns
    -------
    Figure
        ``.image`` (PIL, RGB) and ``.layout``: a :class:`GridLayout` (cell rectangles) for
        images and volumes, a :class:`SignalLayout` (row rectangles and axes) for signals.

    Raises
    ------
    ValueError
        Examples and projections of different shapes; a ``signal_view`` other than
        ``waveform`` for inputs that are not signals.
    StyleError
        An unknown style or signal view.
    """
    style = get_style(style)
    view = get_signal_view(signal_view)
    examples, projections = _to_float(examples), _to_float(projections)
    if examples.shape != projections.shape:
        raise ValueError(
            f"examples {examples.shape} and projections {projections.shape} differ in shape"
        )
    signal = as_signal(examples, projections, boxes)
    if signal is not None:
        x, p, b, note = signal
        return render_signal_zf(
            x, p, b, style, mean, std, title=title, labels=labels, captions=captions,
            notes=[n for n in (note, *notes) if n], signal_view=view, sample_rate=sample_rate,
        )  # fmt: skip
    _check_view_for_images(view, examples.shape)
    proj_cells, patch_cells, note = render_cells(examples, projections, boxes, style, mean, std)
    cell_shape = proj_cells[0][0].shape[:2]
    if scale:
        size = (cell_shape[0] * scale, cell_shape[1] * scale)
    else:
        h_disp, w_disp, scale = display_shape(cell_shape)
        size = (h_disp, w_disp)
    caption = " · ".join(n for n in (note, *notes) if n) or None
    with_captions = captions is not None and any(captions)
    layout = zf_layout(
        len(boxes), cell_shape, scale, title, labels, caption, columns,
        cell_size=tuple(size), hit_captions=with_captions,
    )  # fmt: skip
    canvas = np.empty((layout.size[1], layout.size[0], 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for (rgb, valid), rect in zip(proj_cells, layout.projection_boxes):
        _paste(canvas, rect, _draw_cell(rgb, valid, layout.cell_size, scale))
    for (rgb, valid), rect in zip(patch_cells, layout.patch_boxes):
        _paste(canvas, rect, _draw_cell(rgb, valid, layout.cell_size, scale))
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text(layout.title_xy, title, fill=TEXT, font=_font(TITLE_SIZE))
    for xy, text in zip(layout.label_xy, labels):
        if text:
            draw.text(xy, text, fill=TEXT, font=_font(LABEL_SIZE))
    if with_captions:
        width = layout.cell_size[1]
        for xy, text in zip(layout.hit_caption_xy, captions or ()):
            draw.text(xy, _fit_text(text, LABEL_SIZE, width), fill=TEXT, font=_font(LABEL_SIZE))
    if caption and layout.caption_xy:
        draw.text(layout.caption_xy, caption, fill=TEXT, font=_font(LABEL_SIZE))
    return Figure(image, layout, {"style": style.name, "note": caption})


def _check_view_for_images(view: SignalView, shape: Sequence[int]) -> None:
    if view.name != "waveform":
        raise ValueError(
            f"signal_view={view.name!r} draws signals (inputs with one axis of samples); these "
            f"inputs have the spatial shape {tuple(shape[2:])}: leave signal_view at 'waveform'"
        )


# --------------------------------------------------------------------------------------------
# Signals: one row per hit, the input patch over its window and the projection under it


SIGNAL_WIDTH = 480
"""Display columns of a ZF row's panels: windows of up to this many samples get an integer
number of columns per sample, longer ones are resampled to exactly this many columns."""
SHEET_SIGNAL_WIDTH = 160
"""The same for a layer sheet's tiles."""
SHEET_SIGNAL_HEIGHT = 30
"""Display rows of one panel of a layer sheet's tile."""
PANEL_GAP = 3  # between the patch panel and the projection panel
ROW_GAP = 12  # between the rows of a signal figure
TICKS = 5  # tick labels per row
CURVE = (34, 34, 34)
AXIS = (190, 190, 190)
CHANNEL_COLORS = (
    (31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
"""Curve colours of a signal's channels (matplotlib's tab10), in channel order."""


def is_signal_shape(spatial: Sequence[int]) -> bool:
    """Whether inputs of spatial shape ``spatial`` are drawn as signals: one axis, or two
    where one has size 1 (``(L, 1)``, ``(1, L)``).
    """
    return len(spatial) == 1 or (len(spatial) == 2 and 1 in tuple(spatial))


def as_signal(
    examples: np.ndarray, projections: np.ndarray, boxes: Sequence[Box]
) -> tuple[np.ndarray, np.ndarray, list[Box], str | None] | None:
    """Examples, projections and boxes as signals ``(k, C, L)``, or None for images/volumes.

    One spatial axis is a signal as it is. Two spatial axes where one has size 1 (an
    ``(L, 1)`` or ``(1, L)`` input, as audio models that convolve in 2-D take) are a signal
    too: that axis is dropped (its box holds at most padding around the one sample) and the
    returned note says so. Drawing such inputs as images would give cells one pixel wide
    and thousands tall.
    """
    if not is_signal_shape(examples.shape[2:]):
        return None
    if examples.ndim == 3:
        return examples, projections, list(boxes), None
    if examples.ndim == 4:
        axis = 0 if examples.shape[3] == 1 else 1  # the signal's axis among the spatial ones
        drop = 3 - axis
        shape = "x".join(map(str, examples.shape[2:]))
        note = f"input {shape} drawn as a signal"
        squeezed: list[Box] = [(box[axis],) for box in boxes]
        return examples.squeeze(drop), projections.squeeze(drop), squeezed, note
    return None  # pragma: no cover - is_signal_shape admits nothing else


@dataclass(frozen=True)
class SignalAxis:
    """How a window of samples ``first..last`` (inclusive) maps to ``width`` display columns.

    Column ``c`` covers the sample coordinates ``[first - 0.5 + c * n / width,
    first - 0.5 + (c + 1) * n / width)`` with ``n = last - first + 1`` (sample ``t`` spans
    ``[t - 0.5, t + 0.5)``): with ``width`` a multiple of ``n`` every sample gets
    ``width / n`` whole columns; longer windows put several samples in a column.
    """

    first: int
    last: int
    width: int

    @property
    def samples(self) -> int:
        """Samples in the window."""
        return self.last - self.first + 1

    def edges(self) -> np.ndarray:
        """(width + 1,) sample coordinates of the column edges, relative to ``first``."""
        return -0.5 + np.arange(self.width + 1) * (self.samples / self.width)

    def centres(self) -> np.ndarray:
        """(width,) sample coordinates of the column centres, relative to ``first``."""
        return -0.5 + (np.arange(self.width) + 0.5) * (self.samples / self.width)

    def column(self, sample: float) -> int:
        """The column whose span holds the sample coordinate ``sample`` (clipped to the
        window).
        """
        c = math.floor((sample - self.first + 0.5) * self.width / self.samples)
        return min(self.width - 1, max(0, c))


def signal_width(samples: int, target: int = SIGNAL_WIDTH) -> int:
    """Display columns for a window of ``samples``: a multiple of it up to ``target``, else
    ``target``.
    """
    return target if samples >= target else samples * (target // samples)


@dataclass(frozen=True)
class SignalRow:
    """One hit (ZF figure) or one channel (layer sheet) of a signal figure.

    ``patch_rect`` and ``projection_rect`` are half-open ``(left, top, right, bottom)``
    rectangles of the two panels; both show the window ``axis.first..axis.last``.
    """

    axis: SignalAxis
    patch_rect: Rect
    projection_rect: Rect
    header_xy: tuple[int, int]


@dataclass(frozen=True)
class SignalLayout:
    """Where everything of a signal figure lies (display pixels): one :class:`SignalRow` per
    hit (ZF figure) or per channel (layer sheet).
    """

    size: tuple[int, int]  # (width, height)
    rows: tuple[SignalRow, ...]
    title_xy: tuple[int, int]
    caption_xy: tuple[int, int] | None


# ---- drawing into arrays


def _y(u: np.ndarray, height: int) -> np.ndarray:
    """Values in [0, 1] (0 at the bottom) -> pixel rows of a panel ``height`` tall."""
    return (height - 1) - np.round(np.clip(u, 0.0, 1.0) * (height - 1)).astype(np.int64)


def _span(valid: np.ndarray) -> tuple[int, int] | None:
    """``(i0, i1)``: the first and last valid sample of a window (valid samples are one run)."""
    idx = np.flatnonzero(valid)
    return (int(idx[0]), int(idx[-1])) if idx.size else None


def _drawn_columns(axis: SignalAxis, span: tuple[int, int] | None) -> np.ndarray:
    """(width,) bool: the columns whose centre lies on a sample of the input."""
    if span is None:
        return np.zeros(axis.width, dtype=bool)
    c = axis.centres()
    return (c >= span[0] - 0.5) & (c < span[1] + 0.5)


def _envelope(
    v: np.ndarray, axis: SignalAxis, span: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(width,) lowest and highest value of the polyline through ``(t, v[t])``, ``t`` in
    ``span``, over each column: a column's vertical stroke, so that consecutive strokes join
    into the curve whatever the number of samples per column.
    """
    i0, i1 = span
    e = np.clip(axis.edges(), i0, i1)
    left, right = e[:-1], e[1:]
    xs = np.arange(i0, i1 + 1, dtype=np.float64)
    vv = v[i0 : i1 + 1]
    vl, vr = np.interp(left, xs, vv), np.interp(right, xs, vv)
    lo, hi = np.minimum(vl, vr), np.maximum(vl, vr)
    a = np.ceil(left).astype(np.int64) - i0  # samples strictly inside each column
    b = np.floor(right).astype(np.int64) - i0 + 1
    inner = b > a
    if inner.any():
        ext = np.append(vv, 0.0)  # reduceat reads [start, end) with end up to len(vv)
        idx = np.stack([a[inner], b[inner]], axis=1).ravel()
        lo[inner] = np.minimum(lo[inner], np.minimum.reduceat(ext, idx)[::2])
        hi[inner] = np.maximum(hi[inner], np.maximum.reduceat(ext, idx)[::2])
    return lo, hi


def _paint(
    canvas: np.ndarray, top: np.ndarray, bottom: np.ndarray, cols: np.ndarray, color: Any
) -> None:
    """Fill rows ``top[c]..bottom[c]`` of every column ``c`` where ``cols``; ``color`` one
    RGB or one per column ``(width, 3)``.
    """
    rows = np.arange(canvas.shape[0])[:, None]
    mask = (rows >= top[None, :]) & (rows <= bottom[None, :]) & cols[None, :]
    color = np.asarray(color, dtype=np.uint8)
    if color.ndim == 1:
        canvas[mask] = color
    else:
        canvas[mask] = np.broadcast_to(color[None], canvas.shape)[mask]


def _panel(axis: SignalAxis, height: int, drawn: np.ndarray) -> np.ndarray:
    """A blank panel: white where the window lies on the input, the checkerboard elsewhere."""
    canvas = np.empty((height, axis.width, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    if not drawn.all():
        canvas[:, ~drawn] = _checker(height, axis.width)[:, ~drawn]
    return canvas


def _curves(
    canvas: np.ndarray,
    values: np.ndarray,  # (C, W) in [0, 1]
    axis: SignalAxis,
    span: tuple[int, int],
    drawn: np.ndarray,
    colors: Sequence[tuple[int, int, int]],
) -> None:
    height = canvas.shape[0]
    for c in range(values.shape[0]):
        lo, hi = _envelope(values[c], axis, span)
        top, bottom = _y(hi, height), _y(lo, height)
        _paint(canvas, top, bottom + 1, drawn, colors[c % len(colors)])  # 2 px strokes


def _axis_line(canvas: np.ndarray, u: float, drawn: np.ndarray) -> None:
    y = int(_y(np.asarray(u), canvas.shape[0]))
    canvas[y, drawn] = AXIS


def _draw_waveform_patch(
    x: np.ndarray,
    valid: np.ndarray,
    axis: SignalAxis,
    height: int,
    value_range: tuple[float, float],
) -> np.ndarray:
    """The input patch ``x`` (C, W) as curves, ``value_range`` (the example's) bottom to top."""
    span = _span(valid)
    drawn = _drawn_columns(axis, span)
    canvas = _panel(axis, height, drawn)
    if span is None:
        return canvas
    lo, hi = value_range
    u = (x - lo) / (hi - lo) if hi > lo else np.full(x.shape, 0.5)
    if lo < 0 < hi:
        _axis_line(canvas, -lo / (hi - lo), drawn)
    colors = (CURVE,) if x.shape[0] == 1 else CHANNEL_COLORS
    _curves(canvas, u, axis, span, drawn, colors)
    return canvas


def _draw_waveform_projection(
    p: np.ndarray, valid: np.ndarray, axis: SignalAxis, height: int, style: Style
) -> np.ndarray:
    """The projection ``p`` (C, W) in ``style``: per-channel curves for a style without a
    colour map (``rgb``), else the normalised values filled from their zero and coloured by
    the style's colour map.
    """
    span = _span(valid)
    drawn = _drawn_columns(axis, span)
    canvas = _panel(axis, height, drawn)
    if span is None:
        return canvas
    lo, hi = style.value_range
    values = style.normalize(p, valid)  # (W, C) or (W,)
    base = (0.0 - lo) / (hi - lo) if lo <= 0 <= hi else 0.0  # where the value 0 lies
    if values.ndim == 2:
        if 0 < base < 1:
            _axis_line(canvas, base, drawn)
        _curves(canvas, (values.T - lo) / (hi - lo), axis, span, drawn, CHANNEL_COLORS)
        return canvas
    u = (values - lo) / (hi - lo)
    vlo, vhi = _envelope(u, axis, span)
    top = _y(np.maximum(vhi, base), height)
    bottom = _y(np.minimum(vlo, base), height)
    extreme = np.where(np.abs(vhi - base) >= np.abs(vlo - base), vhi, vlo)
    colors = _to_uint8(_apply_cmap(style.cmap, extreme)) if style.cmap else CURVE
    if 0 < base < 1:
        _axis_line(canvas, base, drawn)
    _paint(canvas, top, bottom, drawn, colors)
    return canvas


SPECTROGRAM_CMAP = "magma"
SPECTROGRAM_DB = 80.0
"""A spectrogram shows its top this many decibels (darkest: this far below its peak)."""


def stft_size(samples: int) -> int:
    """The FFT length of a spectrogram of ``samples`` samples: the power of 2 nearest to a
    quarter of them, between 16 and 2048 (hop: a quarter of it).
    """
    return 2 ** int(np.clip(round(math.log2(max(samples, 1) / 4)), 4, 11))


def log_spectrogram(values: np.ndarray) -> tuple[np.ndarray, int]:
    """``(C, n)`` samples -> ``((T, F) power in dB, hop)``: the Hann-windowed short-time
    Fourier transform (FFT length :func:`stft_size`, frames centred every ``hop`` samples from
    sample 0, zeros beyond the ends), power averaged over channels.
    """
    n = values.shape[1]
    n_fft = stft_size(n)
    hop = max(1, n_fft // 4)
    half = n_fft // 2
    padded = np.pad(values, ((0, 0), (half, half)))  # frame t is centred on sample t * hop
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=1)[:, ::hop]
    frames = frames[:, : (n - 1) // hop + 1]  # (C, T, n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    power = (np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2).mean(axis=0)  # (T, F)
    return 10.0 * np.log10(power + 1e-30), hop


def _draw_spectrogram(
    v: np.ndarray, valid: np.ndarray, axis: SignalAxis, height: int
) -> np.ndarray:
    """The log-magnitude spectrogram of ``v`` (C, W) over its valid samples: time along x
    (aligned with the window's columns), frequency up from 0 to half the sample rate.
    """
    span = _span(valid)
    drawn = _drawn_columns(axis, span)
    canvas = _panel(axis, height, drawn)
    if span is None:
        return canvas
    i0, i1 = span
    db, hop = log_spectrogram(v[:, i0 : i1 + 1])
    peak = db.max()
    if not np.isfinite(peak) or peak <= -290:  # silence: nothing to show
        u = np.zeros(db.shape)
    else:
        u = np.clip((db - (peak - SPECTROGRAM_DB)) / SPECTROGRAM_DB, 0.0, 1.0)
    frames = np.clip(np.round((axis.centres() - i0) / hop), 0, db.shape[0] - 1).astype(int)
    bins = np.round((height - 1 - np.arange(height)) / max(1, height - 1) * (db.shape[1] - 1))
    image = u[frames][:, bins.astype(int)].T  # (height, width)
    rgb = _to_uint8(_apply_cmap(SPECTROGRAM_CMAP, image))
    canvas[:, drawn] = rgb[:, drawn]
    return canvas


@dataclass(frozen=True)
class SignalView:
    """How a signal's patch and projection are drawn (:data:`SIGNAL_VIEWS`).

    Attributes
    ----------
    name, help
        Registry key and one line for ``--help``.
    height
        Display rows of one panel of a ZF row.
    patch
        ``(x (C, W), valid (W,), axis, height, value_range) -> (height, width, 3) uint8``.
    projection
        ``(p (C, W), valid (W,), axis, height, style) -> (height, width, 3) uint8``.
    frequency
        True when the panels' vertical axis is frequency (0 to half the sample rate).
    """

    name: str
    help: str
    height: int
    patch: Callable[..., np.ndarray] = field(repr=False)
    projection: Callable[..., np.ndarray] = field(repr=False)
    frequency: bool = False


SIGNAL_VIEWS: dict[str, SignalView] = {
    "waveform": SignalView(
        "waveform",
        "the input patch as a waveform over the unit's receptive-field window, the projection "
        "under it in the style's colours",
        64,
        _draw_waveform_patch,
        _draw_waveform_projection,
    ),
    "spectrogram": SignalView(
        "spectrogram",
        f"log-magnitude spectrograms (Hann STFT, top {SPECTROGRAM_DB:g} dB, "
        f"{SPECTROGRAM_CMAP}) of the input patch and of the projection: which frequencies the "
        "unit responds to; the style does not apply",
        96,
        lambda x, valid, axis, height, value_range: _draw_spectrogram(x, valid, axis, height),
        lambda p, valid, axis, height, style: _draw_spectrogram(p, valid, axis, height),
        frequency=True,
    ),
}
"""How signals are drawn: the CLI's ``--signal-view`` choices."""


def get_signal_view(view: str | SignalView) -> SignalView:
    """The :class:`SignalView` named ``view``; :class:`StyleError` lists the valid names."""
    if isinstance(view, SignalView):
        return view
    if view not in SIGNAL_VIEWS:
        raise StyleError(
            f"unknown signal view {view!r}; valid signal views: {', '.join(SIGNAL_VIEWS)}"
        )
    return SIGNAL_VIEWS[view]


def _unnormalise(x: np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None):
    if mean is None or std is None:
        return x
    c = x.shape[0]
    m = np.broadcast_to(np.asarray(mean, dtype=np.float64), (c,))[:, None]
    s = np.broadcast_to(np.asarray(std, dtype=np.float64), (c,))[:, None]
    return x * s + m


def render_signal_tiles(
    examples: np.ndarray | torch.Tensor,
    projections: np.ndarray | torch.Tensor,
    boxes: Sequence[Box],
    style: str | Style = "rgb",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    signal_view: str | SignalView = "waveform",
    width: int = SIGNAL_WIDTH,
    height: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray, SignalAxis]]:
    """The two panels of every hit of signals: ``(patch, projection, axis)`` per hit.

    Parameters
    ----------
    examples, projections
        ``(k, C, L)``.
    boxes
        Per hit, its unclipped window ``((first, last),)``.
    style, mean, std
        As for :func:`render_zf`. Patches are drawn between their example's minimum and
        maximum (after undoing ``mean``/``std``).
    signal_view
        A key of :data:`SIGNAL_VIEWS`.
    width
        Target columns (:func:`signal_width`).
    height
        Rows of a panel; default the view's.

    Returns
    -------
    list of (numpy.ndarray, numpy.ndarray, SignalAxis)
        ``(height, columns, 3)`` uint8 patch and projection panels, and how samples map to
        columns. Samples of the window outside the input are the checkerboard.
    """
    style, view = get_style(style), get_signal_view(signal_view)
    examples, projections = _to_float(examples), _to_float(projections)
    height = height or view.height
    out = []
    for x, p, box in zip(examples, projections, boxes):
        (first, last) = box[0]
        axis = SignalAxis(int(first), int(last), signal_width(last - first + 1, width))
        whole = _unnormalise(x, mean, std)
        finite = whole[np.isfinite(whole)]
        value_range = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        xc, valid = crop_box(whole, box)
        pc, _ = crop_box(p, box)
        out.append(
            (
                view.patch(xc, valid, axis, height, value_range),
                view.projection(pc, valid, axis, height, style),
                axis,
            )
        )
    return out


def _format_number(v: float) -> str:
    return f"{v:.4g}"


def _tick_text(sample: int, sample_rate: float | None) -> str:
    if sample_rate:
        return f"{_format_number(1000.0 * sample / sample_rate)} ms"
    return str(sample)


def _frequency_text(sample_rate: float | None) -> str:
    if sample_rate:
        return f"0-{_format_number(sample_rate / 2)} Hz"
    return "0-0.5 cycles/sample"


def render_signal_zf(
    examples: np.ndarray | torch.Tensor,
    projections: np.ndarray | torch.Tensor,
    boxes: Sequence[Box],
    style: str | Style = "rgb",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    *,
    title: str = "",
    labels: tuple[str, str] = ("projections", "input patches"),
    captions: Sequence[str] | None = None,
    notes: Sequence[str] = (),
    signal_view: str | SignalView = "waveform",
    sample_rate: float | None = None,
) -> Figure:
    """The ZF figure of signals: one row per hit, on that row's own x-axis.

    Each row: a header (``captions[i]``, else the rank), the input patch over the unit's
    receptive-field window (the hit's box) and the projection under it, both drawn over
    exactly the window's samples (the part outside the input as the checkerboard), then the
    window's tick labels (samples, or milliseconds with ``sample_rate``).

    Parameters
    ----------
    examples, projections
        ``(k, C, L)``.
    boxes
        Per hit, the unclipped window ``((first, last),)``.
    style, mean, std, title, captions, notes, signal_view, sample_rate
        As for :func:`render_zf`.
    labels
        ``(projection, patch)``: the names written left of the two panels.

    Returns
    -------
    Figure
        ``.layout`` is a :class:`SignalLayout`.
    """
    style, view = get_style(style), get_signal_view(signal_view)
    tiles = render_signal_tiles(examples, projections, boxes, style, mean, std, signal_view=view)
    k = len(tiles)
    height = view.height
    names = [labels[1], labels[0]]
    if view.frequency:
        names = [f"{n} ({_frequency_text(sample_rate)})" if n else n for n in names]
    label_w = max([_text_width(n, LABEL_SIZE) for n in names if n] + [0])
    label_w = label_w + 10 if label_w else 0
    width = max(axis.width for _, _, axis in tiles)
    header_h = LABEL_SIZE + 6
    tick_h = 4 + LABEL_SIZE + 4
    row_h = header_h + 2 * height + PANEL_GAP + tick_h
    title_h = TITLE_SIZE + 8 if title else 0
    caption = " · ".join(n for n in notes if n) or None
    caption_h = LABEL_SIZE + 8 if caption else 0
    left = MARGIN + label_w
    text_w = max(
        _text_width(title, TITLE_SIZE) if title else 0,
        _text_width(caption, LABEL_SIZE) if caption else 0,
    )
    size = (max(left + width + MARGIN, 2 * MARGIN + text_w),
            MARGIN + title_h + k * row_h + (k - 1) * ROW_GAP + caption_h + MARGIN)  # fmt: skip
    canvas = np.empty((size[1], size[0], 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    rows = []
    for i, (patch, proj, axis) in enumerate(tiles):
        y0 = MARGIN + title_h + i * (row_h + ROW_GAP)
        top = y0 + header_h
        patch_rect = (left, top, left + axis.width, top + height)
        proj_top = top + height + PANEL_GAP
        proj_rect = (left, proj_top, left + axis.width, proj_top + height)
        _paste(canvas, patch_rect, patch)
        _paste(canvas, proj_rect, proj)
        rows.append(SignalRow(axis, patch_rect, proj_rect, (left, y0)))
        # tick marks under the projection panel
        for s, _ in signal_ticks(axis, sample_rate):
            canvas[proj_rect[3] : proj_rect[3] + 3, left + axis.column(s)] = TEXT
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    font = _font(LABEL_SIZE)
    if title:
        draw.text((MARGIN, MARGIN), title, fill=TEXT, font=_font(TITLE_SIZE))
    for i, row in enumerate(rows):
        text = captions[i] if captions is not None and i < len(captions) and captions[i] else ""
        header = text or f"{i + 1}"
        draw.text(row.header_xy, _fit_text(header, LABEL_SIZE, width), fill=TEXT, font=font)
        for name, rect in zip(names, (row.patch_rect, row.projection_rect)):
            if name:
                mid = (rect[1] + rect[3]) // 2
                draw.text((MARGIN, mid), _fit_text(name, LABEL_SIZE, label_w - 8) if label_w
                          else name, fill=TEXT, font=font, anchor="lm")  # fmt: skip
        _draw_ticks(draw, row, sample_rate, font)
    caption_xy = None
    if caption:
        caption_xy = (MARGIN, size[1] - MARGIN - caption_h + 4)
        draw.text(caption_xy, caption, fill=TEXT, font=font)
    layout = SignalLayout(size, tuple(rows), (MARGIN, MARGIN), caption_xy)
    return Figure(
        image,
        layout,
        {"style": style.name, "note": caption, "signal_view": view.name},
    )


def _nice_step(extent: float, count: int = TICKS - 1) -> float:
    """A step of 1, 2, 2.5 or 5 times a power of ten giving about ``count`` intervals."""
    raw = max(extent, 1e-12) / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * 0.999)


def signal_ticks(axis: SignalAxis, sample_rate: float | None = None) -> list[tuple[float, str]]:
    """``(sample coordinate, text)`` of a window's tick labels: round numbers of samples, or
    of milliseconds when ``sample_rate`` is known, inside ``first..last``.
    """
    scale = 1000.0 / sample_rate if sample_rate else 1.0  # display units per sample
    lo, hi = axis.first * scale, axis.last * scale
    step = _nice_step(hi - lo) if hi > lo else 1.0
    if not sample_rate:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    for j in range(first, math.floor(hi / step + 1e-9) + 1):
        value = j * step
        text = f"{value:.10g}" + (" ms" if sample_rate else "")
        ticks.append((value / scale, text))
    return ticks


def _draw_ticks(
    draw: ImageDraw.ImageDraw, row: SignalRow, sample_rate: float | None, font: Any
) -> None:
    left, _, right, bottom = row.projection_rect
    y = bottom + 4
    for s, text in signal_ticks(row.axis, sample_rate):
        w = _text_width(text, LABEL_SIZE)
        x = left + row.axis.column(s)
        x = min(max(x - w // 2, left), right - w)
        draw.text((x, y), text, fill=TEXT, font=font)


def render_signal_sheet(
    tiles: Sequence[tuple[np.ndarray, np.ndarray, SignalAxis]],
    labels: Sequence[str],
    title: str = "",
    columns: int = 8,
    note: str | None = None,
    style: str = "",
    sample_rate: float | None = None,
) -> Figure:
    """A layer sheet of signals from :func:`render_signal_tiles` (at sheet size): per channel
    a tile with its label and window, the patch panel over the projection panel.

    Returns
    -------
    Figure
        ``.layout`` is a :class:`SignalLayout`, one row per tile.
    """
    n = len(tiles)
    height = tiles[0][0].shape[0]
    tile_w = max(axis.width for _, _, axis in tiles)
    cols = max(1, min(columns, n))
    header_h = LABEL_SIZE + 4
    tile_h = header_h + 2 * height + PANEL_GAP
    pitch_x, pitch_y = tile_w + 12, tile_h + 10
    title_h = TITLE_SIZE + 8 if title else 0
    caption_h = LABEL_SIZE + 8 if note else 0
    rows_n = math.ceil(n / cols)
    text_w = max(
        _text_width(title, TITLE_SIZE) if title else 0,
        _text_width(note, LABEL_SIZE) if note else 0,
    )
    width = max(2 * MARGIN + cols * pitch_x - 12, 2 * MARGIN + text_w)
    total_h = 2 * MARGIN + title_h + rows_n * pitch_y - 10 + caption_h
    canvas = np.empty((total_h, width, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    rows = []
    for i, (patch, proj, axis) in enumerate(tiles):
        r, c = divmod(i, cols)
        x0, y0 = MARGIN + c * pitch_x, MARGIN + title_h + r * pitch_y
        top = y0 + header_h
        patch_rect = (x0, top, x0 + axis.width, top + height)
        proj_top = top + height + PANEL_GAP
        proj_rect = (x0, proj_top, x0 + axis.width, proj_top + height)
        _paste(canvas, patch_rect, patch)
        _paste(canvas, proj_rect, proj)
        rows.append(SignalRow(axis, patch_rect, proj_rect, (x0, y0)))
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    font = _font(LABEL_SIZE)
    if title:
        draw.text((MARGIN, MARGIN), title, fill=TEXT, font=_font(TITLE_SIZE))
    for text, row in zip(labels, rows):
        a = row.axis
        window = f"{_tick_text(a.first, sample_rate)}…{_tick_text(a.last, sample_rate)}"
        header = f"{text} · {window}" if text else window
        draw.text(row.header_xy, _fit_text(header, LABEL_SIZE, tile_w), fill=TEXT, font=font)
    caption_xy = None
    if note:
        caption_xy = (MARGIN, total_h - MARGIN - caption_h + 4)
        draw.text(caption_xy, note, fill=TEXT, font=font)
    layout = SignalLayout((width, total_h), tuple(rows), (MARGIN, MARGIN), caption_xy)
    return Figure(image, layout, {"style": style, "note": note, "sheet": layout})


# --------------------------------------------------------------------------------------------
# Layer sheet


@dataclass(frozen=True)
class SheetLayout:
    """Where the tiles of a layer sheet lie: per tile the projection and patch rectangles
    (half-open, display pixels) and the label's position; ``cell_size`` (h, w) in display
    pixels (``scale`` 0 when the cells were resampled).
    """

    size: tuple[int, int]
    scale: int
    tiles: tuple[tuple[Rect, Rect, tuple[int, int]], ...]  # projection, patch, label xy
    cell_size: tuple[int, int] = (0, 0)


def sheet_layout(
    n: int,
    cell_shape: Sequence[int],
    scale: int,
    columns: int = 8,
    title: str = "",
    cell_size: tuple[int, int] | None = None,
) -> SheetLayout:
    """Layout of a layer sheet: ``n`` tiles (projection | patch), ``columns`` tiles a row.

    ``cell_size`` (display pixels) overrides ``cell_shape * scale`` for resampled cells.
    """
    h, w = (int(v) for v in cell_shape)
    ch, cw = cell_size if cell_size is not None else (h * scale, w * scale)
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
    return SheetLayout((width, height), scale, tuple(tiles), (ch, cw))


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
    *,
    notes: Sequence[str] = (),
    signal_view: str | SignalView = "waveform",
    sample_rate: float | None = None,
) -> Figure:
    """Every channel of a layer at a glance: one tile (projection | patch) per channel.

    ``examples``/``projections`` are ``(n_channels, C, *spatial)`` (each channel's top-1 hit),
    ``labels`` one short text per tile (the channel number). Signals get tiles of a patch
    panel over a projection panel (:func:`render_signal_sheet`), any number of them.
    ``notes``, ``signal_view`` and ``sample_rate`` are as for :func:`render_zf`.
    """
    tiles = SheetTiles(get_style(style), get_signal_view(signal_view), mean, std)
    tiles.add(examples, projections, boxes, labels)
    return tiles.render(title, columns, notes, sample_rate)


@dataclass
class SheetTiles:
    """The tiles of a layer sheet, added in chunks (the report projects a big layer in several
    calls) and kept as uint8, then drawn at once by :meth:`render`.

    Attributes
    ----------
    style, view, mean, std
        How every tile is drawn (as for :func:`render_layer_sheet`).
    """

    style: Style
    view: SignalView
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    labels: list[str] = field(default_factory=list)
    cells: list[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = field(
        default_factory=list
    )
    signal_tiles: list[tuple[np.ndarray, np.ndarray, SignalAxis]] = field(default_factory=list)
    note: str | None = None

    def add(
        self,
        examples: np.ndarray | torch.Tensor,
        projections: np.ndarray | torch.Tensor,
        boxes: Sequence[Box],
        labels: Sequence[str],
    ) -> None:
        """Draw the tiles of ``(n, C, *spatial)`` top-1 hits, one label each."""
        examples, projections = _to_float(examples), _to_float(projections)
        signal = as_signal(examples, projections, boxes)
        if signal is not None:
            x, p, b, self.note = signal
            self.signal_tiles += render_signal_tiles(
                x, p, b, self.style, self.mean, self.std, signal_view=self.view,
                width=SHEET_SIGNAL_WIDTH, height=SHEET_SIGNAL_HEIGHT,
            )  # fmt: skip
        else:
            _check_view_for_images(self.view, examples.shape)
            p_cells, x_cells, self.note = render_cells(
                examples, projections, boxes, self.style, self.mean, self.std
            )
            # uint8 keeps a big layer's sheet small in memory
            self.cells += [
                ((_to_uint8(p), pv), (_to_uint8(x), xv))
                for (p, pv), (x, xv) in zip(p_cells, x_cells)
            ]
        self.labels += list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def render(
        self,
        title: str = "",
        columns: int = 8,
        notes: Sequence[str] = (),
        sample_rate: float | None = None,
    ) -> Figure:
        """The sheet of every tile added, ``notes`` in its caption after the renderer's own."""
        caption = " · ".join(n for n in (self.note, *notes) if n) or None
        if self.signal_tiles:
            return render_signal_sheet(
                self.signal_tiles, self.labels, title, columns, caption, self.style.name,
                sample_rate,
            )  # fmt: skip
        return render_sheet_cells(
            [c[0] for c in self.cells],
            [c[1] for c in self.cells],
            self.labels,
            title,
            columns,
            caption,
            self.style.name,
        )


def render_sheet_cells(
    proj_cells: Sequence[tuple[np.ndarray, np.ndarray]],
    patch_cells: Sequence[tuple[np.ndarray, np.ndarray]],
    labels: Sequence[str],
    title: str = "",
    columns: int = 8,
    note: str | None = None,
    style: str = "",
) -> Figure:
    """A layer sheet from cells made by :func:`render_cells` (float or uint8 RGB, valid mask).

    Cells longer than :data:`MAX_SHEET_CELL` display pixels are resampled to fit.
    """
    cell_shape = proj_cells[0][0].shape[:2]
    h_disp, w_disp, scale = display_shape(cell_shape, target=56, max_side=MAX_SHEET_CELL)
    layout = sheet_layout(len(proj_cells), cell_shape, scale, columns, title, (h_disp, w_disp))
    canvas = np.empty((layout.size[1], layout.size[0], 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for (p, v), (x, xv), (p_rect, x_rect, _) in zip(proj_cells, patch_cells, layout.tiles):
        _paste(canvas, p_rect, _draw_cell(p, v, layout.cell_size, scale))
        _paste(canvas, x_rect, _draw_cell(x, xv, layout.cell_size, scale))
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((MARGIN, MARGIN), title, fill=TEXT, font=_font(TITLE_SIZE))
    for text, (_, _, xy) in zip(labels, layout.tiles):
        draw.text(xy, text, fill=TEXT, font=_font(LABEL_SIZE))
    return Figure(image, None, {"style": style, "note": note, "sheet": layout})
