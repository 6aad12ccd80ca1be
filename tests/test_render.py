"""Pure rendering: styles, receptive-field cells, ZF grid layout and pixels, determinism."""

from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from featurelens.render import (
    PAD_COLORS,
    STYLES,
    StyleError,
    crop_box,
    get_style,
    render_layer_sheet,
    render_patch,
    render_projection,
    render_zf,
    save_png,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, width=64)


def decode(image: Image.Image) -> np.ndarray:
    """Round trip through PNG bytes, as a user would read the file."""
    return np.asarray(Image.open(io.BytesIO(save_png(image))).convert("RGB"))


def sample(pixels: np.ndarray, rect: tuple[int, int, int, int], scale: int) -> np.ndarray:
    """One display pixel per input pixel of a cell (the centre of each scale x scale square)."""
    left, top, right, bottom = rect
    half = scale // 2
    return pixels[top + half : bottom : scale, left + half : right : scale]


# ---- crop_box ------------------------------------------------------------------------------


def test_crop_box_inside_equals_slice():
    x = np.arange(2 * 10 * 12, dtype=float).reshape(2, 10, 12)
    cell, valid = crop_box(x, ((2, 6), (3, 9)))
    assert np.array_equal(cell, x[:, 2:7, 3:10])
    assert valid.all()


def test_crop_box_pads_at_the_border_and_keeps_full_size():
    x = np.arange(10 * 12, dtype=float).reshape(1, 10, 12) + 1
    cell, valid = crop_box(x, ((-3, 4), (8, 15)))  # runs off the top and the right
    assert cell.shape == (1, 8, 8)
    assert valid.shape == (8, 8)
    # rows -3..-1 and columns 12..15 lie outside the input
    assert not valid[:3].any() and not valid[:, 4:].any()
    assert valid[3:, :4].all()
    assert np.array_equal(cell[0, 3:, :4], x[0, 0:5, 8:12])
    assert (cell[0][~valid] == 0).all()


def test_crop_box_1d_and_3d():
    x1 = np.arange(20, dtype=float)[None]
    c1, v1 = crop_box(x1, ((-2, 3),))
    assert np.array_equal(c1[0, 2:], x1[0, :4]) and v1.tolist() == [False] * 2 + [True] * 4
    x3 = np.random.default_rng(0).normal(size=(1, 4, 5, 6))
    c3, v3 = crop_box(x3, ((1, 2), (-1, 1), (4, 7)))
    assert c3.shape == (1, 2, 3, 4)
    assert np.array_equal(c3[0, :, 1:, :2], x3[0, 1:3, 0:2, 4:6])
    assert v3.sum() == 2 * 2 * 2


# ---- styles --------------------------------------------------------------------------------


def test_unknown_style_lists_valid():
    with pytest.raises(StyleError, match="rgb, magnitude, signed"):
        get_style("viridis")


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (3, 4, 5), elements=finite))
def test_rgb_style_range_and_zero_at_grey(proj):
    out = STYLES["rgb"].normalize(proj, None)
    assert out.shape == (4, 5, 3)  # the input channels are kept
    assert out.min() >= 0 and out.max() <= 1
    peak = np.abs(proj).max()
    if peak > 0:
        # 0.5 + 0.5 * (p / peak), computed independently (divided first: 0.5 * 5e-324 is 0)
        assert np.allclose(out, np.moveaxis(0.5 + 0.5 * (proj / peak), 0, -1))  # subnormals
        assert np.isclose(out.min(), 0) or np.isclose(out.max(), 1)
    else:
        assert (out == 0.5).all()


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (2, 4, 5), elements=finite))
def test_magnitude_style_range(proj):
    out = STYLES["magnitude"].normalize(proj, None)
    assert out.shape == (4, 5)
    assert out.min() >= 0 and out.max() <= 1
    mag = np.abs(proj).max(axis=0)
    if mag.max() > 0:
        assert np.isclose(out.max(), 1)
        assert np.allclose(out, mag / mag.max())


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (3, 4, 5), elements=finite))
def test_signed_style_range_and_sign(proj):
    out = STYLES["signed"].normalize(proj, None)
    total = proj.sum(axis=0)
    assert out.min() >= -1 and out.max() <= 1
    assert np.array_equal(np.sign(out[np.abs(out) > 1e-12]), np.sign(total[np.abs(out) > 1e-12]))
    if np.abs(total).max() > 0:
        assert np.isclose(np.abs(out).max(), 1)


def test_style_normalises_over_valid_pixels_only():
    proj = np.ones((1, 2, 2))
    proj[0, 0, 0] = 100.0  # an outlier outside the input must not set the scale
    valid = np.array([[False, True], [True, True]])
    out = STYLES["magnitude"].normalize(proj, valid)
    assert np.allclose(out[valid], 1.0)


def test_colour_maps_are_matplotlibs():
    grid = np.linspace(0, 1, 256)[None]  # (1, 256)
    mag = STYLES["magnitude"].colorize(grid)
    ref = matplotlib.colormaps["inferno"](grid)[..., :3]
    assert np.abs(mag - ref).max() < 1 / 255
    signed = STYLES["signed"].colorize(np.array([[-1.0, 0.0, 1.0]]))
    ref = matplotlib.colormaps["RdBu_r"](np.array([[0.0, 0.5, 1.0]]))[..., :3]
    assert np.abs(signed - ref).max() < 1 / 100  # 0 sits at the centre of the diverging map


def test_grayscale_stays_gray_and_rgb_keeps_channels():
    gray = render_projection(np.random.default_rng(0).normal(size=(1, 3, 3)), "rgb")
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    p = np.zeros((3, 1, 1))
    p[0] = 1.0  # only red
    rgb = render_projection(p, "rgb")
    assert np.allclose(rgb[0, 0], [1.0, 0.5, 0.5])


def test_patch_unnormalised_with_mean_std():
    pixels = np.random.default_rng(1).uniform(size=(3, 4, 4))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = (pixels - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert np.allclose(render_patch(x, mean, std), np.moveaxis(pixels, 0, -1))


# ---- the grid ------------------------------------------------------------------------------


def reference_crop(image: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-by-pixel crop of a (H, W) image at an unclipped box (independent of crop_box)."""
    (r0, r1), (c0, c1) = box
    out = np.zeros((r1 - r0 + 1, c1 - c0 + 1))
    inside = np.zeros(out.shape, dtype=bool)
    for r in range(r0, r1 + 1):
        for c in range(c0, c1 + 1):
            if 0 <= r < image.shape[0] and 0 <= c < image.shape[1]:
                out[r - r0, c - c0] = image[r, c]
                inside[r - r0, c - c0] = True
    return out, inside


def _synthetic(k=9, size=6, n=16, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(size=(k, 1, n, n))
    mean, std = (0.25,), (0.5,)
    x = (pixels - 0.25) / 0.5
    proj = rng.normal(size=(k, 1, n, n))
    # interior boxes, and boxes that run off each border
    starts = [(5, 5), (-2, 4), (4, -3), (n - 4, 3), (3, n - 2), (-2, -2), (n - 3, n - 3), (0, 0),
              (2, 7)][:k]  # fmt: skip
    boxes = [((a, a + size - 1), (b, b + size - 1)) for a, b in starts]
    return x, pixels, proj, boxes, mean, std


def test_zf_grid_cells_are_the_crops_at_the_box():
    x, pixels, proj, boxes, mean, std = _synthetic()
    fig = render_zf(x, proj, boxes, "rgb", mean, std, title="t")
    lay = fig.layout
    assert fig.image.size == lay.size
    assert len(lay.patch_boxes) == len(lay.projection_boxes) == 9
    img = decode(fig.image)
    for i, box in enumerate(boxes):
        cell, valid = reference_crop(pixels[i, 0], box)
        expected = np.round(cell * 255)
        got = sample(img, lay.patch_boxes[i], lay.scale).astype(float)
        assert got.shape == (6, 6, 3)
        assert np.abs(got[valid][:, 0] - expected[valid]).max() <= 1
        # the projection cell: 0.5 + 0.5 * p / max|p| over the valid pixels
        pc, _ = reference_crop(proj[i, 0], box)
        peak = np.abs(pc[valid]).max()
        expected_p = np.round((0.5 + 0.5 * pc / peak) * 255)
        got_p = sample(img, lay.projection_boxes[i], lay.scale).astype(float)
        assert np.abs(got_p[valid][:, 0] - expected_p[valid]).max() <= 1


def test_border_boxes_are_padded_not_stretched():
    x, pixels, proj, boxes, mean, std = _synthetic()
    fig = render_zf(x, proj, boxes, "magnitude", mean, std)
    lay = fig.layout
    img = decode(fig.image)
    pad = {tuple(c) for c in PAD_COLORS}
    for i, box in enumerate(boxes):
        _, valid = reference_crop(pixels[i, 0], box)
        for rect in (lay.patch_boxes[i], lay.projection_boxes[i]):
            left, top, right, bottom = rect
            # every cell has the full box size at the common scale
            assert (right - left, bottom - top) == (6 * lay.scale, 6 * lay.scale)
            block = img[top:bottom, left:right]
            mask = valid.repeat(lay.scale, 0).repeat(lay.scale, 1)
            outside = {tuple(c) for c in block[~mask].reshape(-1, 3)}
            assert outside <= pad  # the neutral checkerboard, nothing else
            if (~mask).sum() >= 2 * 4 * 4 * 2:
                assert outside == pad  # both greys show: a checkerboard, not a flat fill
            # the image content is not stretched into the padded area: it stays at its size
            if valid.any() and not valid.all():
                inside = {tuple(c) for c in block[mask].reshape(-1, 3)}
                assert not inside <= pad


def test_projection_and_patch_blocks_side_by_side():
    x, _, proj, boxes, mean, std = _synthetic()
    lay = render_zf(x, proj, boxes, "rgb", mean, std).layout
    right_of_projections = max(r for _, _, r, _ in lay.projection_boxes)
    left_of_patches = min(left for left, _, _, _ in lay.patch_boxes)
    assert right_of_projections < left_of_patches  # two blocks, projections first
    assert len({t for _, t, _, _ in lay.patch_boxes}) == 3  # 3 x 3 like the paper


def test_render_is_deterministic():
    x, _, proj, boxes, mean, std = _synthetic()
    a = save_png(render_zf(x, proj, boxes, "signed", mean, std, title="same").image)
    b = save_png(render_zf(x, proj, boxes, "signed", mean, std, title="same").image)
    assert a == b


def test_patch_without_normalisation_uses_example_range():
    rng = np.random.default_rng(3)
    x = rng.uniform(-2, 5, size=(1, 1, 8, 8))
    box = ((2, 4), (2, 4))
    fig = render_zf(x, x, [box], "rgb")
    got = sample(decode(fig.image), fig.layout.patch_boxes[0], fig.layout.scale)[..., 0]
    expected = np.round((x[0, 0, 2:5, 2:5] - x.min()) / (x.max() - x.min()) * 255)
    assert np.abs(got - expected).max() <= 1


def test_3d_shows_central_slice_and_says_so():
    rng = np.random.default_rng(4)
    pixels = rng.uniform(size=(2, 1, 6, 8, 8))
    box = ((1, 5), (0, 3), (2, 5))  # depth 1..5: centre slice is depth 3
    fig = render_zf(pixels, pixels, [box, box], "rgb", (0.0,), (1.0,))
    assert "central slice" in fig.meta["note"]
    got = sample(decode(fig.image), fig.layout.patch_boxes[1], fig.layout.scale)[..., 0]
    assert np.abs(got - np.round(pixels[1, 0, 3, 0:4, 2:6] * 255)).max() <= 1


def test_1d_line_plots_are_deterministic():
    rng = np.random.default_rng(5)
    x, p = rng.normal(size=(3, 2, 30)), rng.normal(size=(3, 2, 30))
    boxes = [((-3, 6),), ((10, 19),), ((25, 34),)]
    for style in STYLES:
        a = render_zf(x, p, boxes, style, title="1-D")
        b = render_zf(x, p, boxes, style, title="1-D")
        assert a.to_png() == b.to_png()
        assert a.image.size[1] > 3 * 50


def test_layer_sheet_tiles_hold_top1_crops():
    x, pixels, proj, boxes, mean, std = _synthetic()
    fig = render_layer_sheet(x, proj, boxes, [str(i) for i in range(9)], "rgb", mean, std, "s", 4)
    lay = fig.meta["sheet"]
    img = decode(fig.image)
    assert len(lay.tiles) == 9
    for i, (_, patch_rect, _) in enumerate(lay.tiles):
        cell, valid = reference_crop(pixels[i, 0], boxes[i])
        got = sample(img, patch_rect, lay.scale)[..., 0].astype(float)
        assert np.abs(got[valid] - np.round(cell * 255)[valid]).max() <= 1


def test_figure_displays_in_notebooks():
    x, _, proj, boxes, mean, std = _synthetic(k=1)
    fig = render_zf(x, proj, boxes, "rgb", mean, std)
    png = fig._repr_png_()
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == fig.image.size
