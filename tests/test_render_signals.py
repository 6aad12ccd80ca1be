"""Signals drawn as rows: each row's own window, read back from the decoded PNG.

The references are geometric and independent of the renderer's code: a spike placed at a
known sample must show at the display column that sample's place in the hit's box implies
(``(t - first + 0.5) * columns / samples``), and the columns of window samples outside the
input must be the padding checkerboard and no others.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from featurelens.render import (
    PAD_COLORS,
    STYLES,
    SignalLayout,
    StyleError,
    render_layer_sheet,
    render_zf,
    save_png,
)


def decode(image: Image.Image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(save_png(image))).convert("RGB")).astype(int)


def panel(pixels: np.ndarray, rect) -> np.ndarray:
    left, top, right, bottom = rect
    return pixels[top:bottom, left:right]


def is_pad(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) -> (...): the pixel is one of the two checkerboard greys."""
    return np.any([np.all(rgb == np.asarray(c), axis=-1) for c in PAD_COLORS], axis=0)


def dark(rgb: np.ndarray) -> np.ndarray:
    """Curve pixels: neither the white background, the padding greys nor the grey zero line."""
    grey = np.all(rgb == rgb[..., :1], axis=-1) & (rgb[..., 0] >= 150)
    return ~grey


def peak_columns(block: np.ndarray) -> np.ndarray:
    """The columns whose curve reaches highest in a panel (smallest row with a dark pixel)."""
    d = dark(block)
    top = np.where(d.any(axis=0), d.argmax(axis=0), block.shape[0])
    return np.flatnonzero(top == top.min())


def expected_column(t: float, first: int, last: int, width: int) -> float:
    """Display column (fractional) of the centre of sample ``t`` in a window drawn on
    ``width`` columns."""
    return (t - first + 0.5) * width / (last - first + 1)


def spikes(length: int, where: list[int], channels: int = 1) -> np.ndarray:
    x = np.zeros((len(where), channels, length))
    for i, t in enumerate(where):
        x[i, :, t] = 1.0
    return x


# boxes inside the input, off the left end, off the right end, and a 1-sample field
BOXES = [((5, 24),), ((-7, 12),), ((30, 49),), ((17, 17),)]
PATCH_SPIKES = [10, 3, 37, 17]
PROJ_SPIKES = [20, -1, 33, 17]  # -1: no spike inside (a flat projection)
LENGTH = 40


@pytest.mark.parametrize("style", list(STYLES))
def test_each_row_shows_its_own_hit_window(style):
    x = spikes(LENGTH, PATCH_SPIKES)
    p = np.zeros_like(x)
    for i, t in enumerate(PROJ_SPIKES):
        if t >= 0:
            p[i, 0, t] = 2.5
    fig = render_zf(x, p, BOXES, style, title="t")
    assert isinstance(fig.layout, SignalLayout) and len(fig.layout.rows) == len(BOXES)
    pixels = decode(fig.image)
    for row, ((first, last),), s, q in zip(fig.layout.rows, BOXES, PATCH_SPIKES, PROJ_SPIKES):
        assert (row.axis.first, row.axis.last) == (first, last)
        patch, proj = panel(pixels, row.patch_rect), panel(pixels, row.projection_rect)
        width = patch.shape[1]
        assert width == row.axis.width == proj.shape[1]
        # padding: exactly the columns of samples outside 0..LENGTH-1
        sample_of_column = first + (np.arange(width) * (last - first + 1)) // width
        outside = (sample_of_column < 0) | (sample_of_column >= LENGTH)
        for block in (patch, proj):
            pad_columns = is_pad(block).all(axis=0)
            assert np.array_equal(pad_columns, outside)
            assert not is_pad(block[:, ~outside]).any()
        # the spike shows where its sample lies in this row's window
        if last > first:
            cols = peak_columns(patch)
            assert abs(cols.mean() - expected_column(s, first, last, width)) <= 1.0
            if q >= 0 and style == "rgb":  # rgb: a curve; the others fill from zero
                cols = peak_columns(proj)
                assert abs(cols.mean() - expected_column(q, first, last, width)) <= 1.0


def test_a_long_window_is_resampled_and_keeps_a_one_sample_spike():
    length, box = 5000, ((-1000, 3999),)
    x = spikes(length, [2345])
    fig = render_zf(x, x, [box], "rgb")
    row = fig.layout.rows[0]
    pixels = decode(fig.image)
    patch = panel(pixels, row.patch_rect)
    width = patch.shape[1]
    assert width < 1000  # resampled, not 5000 columns
    cols = peak_columns(patch)
    assert abs(cols.mean() - expected_column(2345, -1000, 3999, width)) <= 1.0
    assert cols.size <= 2  # one sample among ~10 per column: one narrow stroke
    pad = is_pad(patch).all(axis=0)
    assert abs(pad.sum() - 1000 * width / 5000) <= 1


@pytest.mark.parametrize("layout", ["L1", "1L"])
def test_an_l_by_1_input_is_drawn_as_a_signal(layout):
    x = spikes(LENGTH, PATCH_SPIKES[:3])
    boxes = BOXES[:3]
    if layout == "L1":
        x4, boxes4 = x[..., None], [(b[0], (0, 0)) for b in boxes]
    else:
        x4, boxes4 = x[:, :, None, :], [((0, 0), b[0]) for b in boxes]
    a = render_zf(x4, x4, boxes4, "rgb")
    b = render_zf(x, x, boxes, "rgb")
    assert isinstance(a.layout, SignalLayout)
    assert "drawn as a signal" in a.meta["note"]
    pa, pb = decode(a.image), decode(b.image)
    for ra, rb in zip(a.layout.rows, b.layout.rows):
        assert ra.axis == rb.axis
        assert np.array_equal(panel(pa, ra.patch_rect), panel(pb, rb.patch_rect))
        assert np.array_equal(panel(pa, ra.projection_rect), panel(pb, rb.projection_rect))


def test_spectrogram_puts_a_tone_at_its_frequency():
    n, f = 512, 0.125  # cycles per sample: a quarter of the way up to Nyquist (0.5)
    t = np.arange(n)
    x = np.sin(2 * np.pi * f * t)[None, None]
    fig = render_zf(x, x, [((0, n - 1),)], "rgb", signal_view="spectrogram", sample_rate=8000)
    assert fig.meta["signal_view"] == "spectrogram"
    row = fig.layout.rows[0]
    block = panel(decode(fig.image), row.patch_rect)
    h = block.shape[0]
    brightest = int(block.sum(axis=(1, 2)).argmax())  # magma: brighter is louder
    assert abs(brightest - (h - 1) * (1 - f / 0.5)) <= 2


def test_spectrogram_of_images_is_refused():
    x = np.zeros((1, 1, 6, 6))
    with pytest.raises(ValueError, match="signal_view='spectrogram'"):
        render_zf(x, x, [((0, 5), (0, 5))], "rgb", signal_view="spectrogram")
    with pytest.raises(StyleError, match="waveform, spectrogram"):
        render_zf(x, x, [((0, 5), (0, 5))], "rgb", signal_view="sonogram")


def test_a_sheet_of_many_channels_has_a_row_per_channel_with_its_window():
    n = 65
    where = [1 + i % (LENGTH - 2) for i in range(n)]  # spikes inside, not at the ends
    x = spikes(LENGTH, where)
    boxes = [((t - 4, t + 4),) for t in where]
    fig = render_layer_sheet(x, x, boxes, [str(i) for i in range(n)], "rgb")
    rows = fig.layout.rows
    assert len(rows) == n
    pixels = decode(fig.image)
    for row, t, ((first, last),) in zip(rows, where, boxes):
        assert (row.axis.first, row.axis.last) == (first, last)
        patch = panel(pixels, row.patch_rect)
        cols = peak_columns(patch)
        assert abs(cols.mean() - expected_column(t, first, last, patch.shape[1])) <= 1.0


def test_multichannel_signals_and_determinism():
    rng = np.random.default_rng(5)
    x, p = rng.normal(size=(3, 2, 30)), rng.normal(size=(3, 2, 30))
    boxes = [((-3, 6),), ((10, 19),), ((25, 34),)]
    for style in STYLES:
        a = render_zf(x, p, boxes, style, title="1-D", captions=["a", "b", "c"])
        b = render_zf(x, p, boxes, style, title="1-D", captions=["a", "b", "c"])
        assert a.to_png() == b.to_png()
