"""ZF grids and layer sheets from a real model, scan and projections, checked pixel by pixel."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import featurelens
from conftest import Permute, assert_unchanged, snapshot
from featurelens.atlas import ChannelError
from featurelens.figures import layer_sheet, project_hits, zf_figure, zf_grid
from featurelens.graph import LayerError
from featurelens.render import PAD_COLORS, SignalLayout, StyleError, render_layer_sheet, save_png
from test_render import reference_crop

MEAN, STD = (0.3,), (0.4,)
LAYER = "features.3"


def decode(image: Image.Image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(save_png(image))).convert("RGB")).astype(float)


def sample(pixels: np.ndarray, rect, scale: int) -> np.ndarray:
    left, top, right, bottom = rect
    half = scale // 2
    return pixels[top + half : bottom : scale, left + half : right : scale, 0]


@pytest.fixture(scope="module")
def setup():
    from conftest import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN()
    model(torch.zeros(1, 1, 28, 28))
    model.eval()
    gen = torch.Generator().manual_seed(1)
    pixels = torch.rand(40, 1, 28, 28, generator=gen)
    data = (pixels - MEAN[0]) / STD[0]  # (N, 1, 28, 28), normalised like a data spec would
    atlas = featurelens.scan(model, data, ["features.0", LAYER], top_k=9, progress=False)
    return model, data, pixels, atlas


def autograd_unit_gradient(model, x: torch.Tensor, channel: int, loc) -> np.ndarray:
    """d y[LAYER, channel, loc] / d x with plain autograd on the model's own modules."""
    x = x[None].clone().requires_grad_(True)
    y = model.features[:4](x)  # conv, relu, pool, conv = features.3
    y[0, channel][tuple(loc)].backward()
    return x.grad[0, 0].numpy().astype(np.float64)


def test_zf_grid_pixels_equal_crops_and_autograd_projections(setup):
    model, data, pixels, atlas = setup
    rf = featurelens.receptive_field(model, atlas.input_shape, LAYER)
    border_seen = False
    for channel in range(4):
        fig = zf_figure(
            model, data, atlas, LAYER, channel, "gradient", 9, "rgb", mean=MEAN, std=STD
        )
        lay, img = fig.layout, decode(fig.image)
        assert lay.cell_shape == rf.size
        for i, hit in enumerate(atlas.top(LAYER, channel)):
            interval = rf.interval(hit.location)
            # the patch: the original pixels under the unit's receptive-field box
            patch, inside = reference_crop(pixels[hit.index, 0].double().numpy(), interval)
            got = sample(img, lay.patch_boxes[i], lay.scale)
            assert np.abs(got[inside] - np.round(patch[inside] * 255)).max() <= 1
            # the projection: an independent autograd gradient, 0 at grey, peak at 0 or 255
            grad = autograd_unit_gradient(model, data[hit.index], channel, hit.location)
            box, _ = reference_crop(grad, interval)
            assert np.abs(grad).sum() == pytest.approx(np.abs(box).sum())  # support in the box
            expected = np.round((0.5 + 0.5 * box / np.abs(box[inside]).max()) * 255)
            got_p = sample(img, lay.projection_boxes[i], lay.scale)
            assert np.abs(got_p[inside] - expected[inside]).max() <= 1
            if not inside.all():
                border_seen = True
                pad = {float(c[0]) for c in PAD_COLORS}
                assert set(got[~inside].tolist()) <= pad
                assert set(got_p[~inside].tolist()) <= pad
    assert border_seen, "the data should give at least one hit whose box runs off the image"


@pytest.mark.parametrize("style", ["rgb", "magnitude", "signed"])
def test_same_figure_twice_is_byte_identical(setup, style):
    model, data, _, atlas = setup
    a = save_png(zf_grid(model, data, atlas, LAYER, 1, "deconvnet", 9, style, mean=MEAN, std=STD))
    b = save_png(zf_grid(model, data, atlas, LAYER, 1, "deconvnet", 9, style, mean=MEAN, std=STD))
    assert a == b


def test_figures_leave_the_model_unchanged(setup):
    model, data, _, atlas = setup
    model.train()
    before = snapshot(model)
    zf_grid(model, data, atlas, LAYER, 0, "guided")
    layer_sheet(model, data, atlas, "features.0", "deconvnet", "signed")
    assert_unchanged(model, before)
    model.eval()


def test_k_and_methods(setup):
    model, data, _, atlas = setup
    fig = zf_figure(model, data, atlas, LAYER, 2, "deconvnet", k=4)
    assert len(fig.layout.patch_boxes) == 4 and fig.layout.columns == 2
    images = {m: save_png(zf_grid(model, data, atlas, LAYER, 2, m)) for m in ("gradient", "guided")}
    assert images["gradient"] != images["guided"]


def test_layer_sheet_has_every_channel_top1(setup):
    model, data, pixels, atlas = setup
    img = layer_sheet(model, data, atlas, LAYER, "deconvnet", "rgb", mean=MEAN, std=STD)
    # the same sheet from the pure renderer gives its layout
    rf = featurelens.receptive_field(model, atlas.input_shape, LAYER)
    units = [(c, atlas.top(LAYER, c)[0]) for c in range(atlas.channels(LAYER))]
    batch = project_hits(model, data, LAYER, units, rf, "deconvnet")
    fig = render_layer_sheet(batch.examples, batch.projections, batch.boxes, [str(c) for c, _ in units],
              "rgb", MEAN, STD, title=f"{LAYER} · top-1 of every channel · deconvnet · rgb")  # fmt: skip
    assert save_png(img) == save_png(fig.image)
    lay = fig.meta["sheet"]
    assert len(lay.tiles) == 16
    pix = decode(img)
    for (_, hit), (_, patch_rect, _) in zip(units, lay.tiles):
        patch, inside = reference_crop(
            pixels[hit.index, 0].double().numpy(), rf.interval(hit.location)
        )
        got = sample(pix, patch_rect, lay.scale)
        assert np.abs(got[inside] - np.round(patch[inside] * 255)).max() <= 1


def test_bad_inputs_name_the_problem(setup):
    model, data, _, atlas = setup
    with pytest.raises(ValueError, match="unknown method 'deconv'.*gradient"):
        zf_grid(model, data, atlas, LAYER, 0, "deconv")
    with pytest.raises(StyleError, match="unknown style 'heat'.*rgb, magnitude, signed"):
        zf_grid(model, data, atlas, LAYER, 0, style="heat")
    with pytest.raises(ChannelError, match="valid 0..15"):
        zf_grid(model, data, atlas, LAYER, 16)
    with pytest.raises(LayerError, match="features.0"):
        zf_grid(model, data, atlas, "features.9", 0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        zf_grid(model, data, atlas, LAYER, 0, k=0)


def test_1d_and_3d_models():
    torch.manual_seed(0)
    net1 = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 5, padding=2), torch.nn.ReLU(),
                               torch.nn.MaxPool1d(2), torch.nn.Conv1d(4, 3, 3)).eval()  # fmt: skip
    x1 = torch.randn(12, 2, 40)
    atlas1 = featurelens.scan(net1, x1, ["3"], top_k=3, progress=False)
    a = zf_figure(net1, x1, atlas1, "3", 0, "guided", 3, "signed")
    b = zf_figure(net1, x1, atlas1, "3", 0, "guided", 3, "signed")
    assert isinstance(a.layout, SignalLayout) and a.to_png() == b.to_png()  # deterministic

    net3 = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(3, 2, 3)).eval()  # fmt: skip
    x3 = torch.randn(6, 1, 6, 7, 8)
    atlas3 = featurelens.scan(net3, x3, ["2"], top_k=2, progress=False)
    fig = zf_figure(net3, x3, atlas3, "2", 1, "gradient", 2, "magnitude")
    assert "central slice" in fig.meta["note"]
    rf = featurelens.receptive_field(net3, (1, 6, 7, 8), "2")
    assert fig.layout.cell_shape == rf.size[1:]


class _Net(torch.nn.Module):
    """conv -> (optionally permuted to channels-last) -> cumsum along the width -> conv."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv2d(1, 3, 3)
        self.permute = Permute(0, 2, 3, 1) if channels_last else torch.nn.Identity()
        self.back = Permute(0, 3, 1, 2) if channels_last else torch.nn.Identity()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.back(self.permute(self.conv0(x)))
        return self.conv(torch.cumsum(y, dim=-1))  # no receptive field of one box


def test_a_channels_last_layer_is_a_clear_error():
    torch.manual_seed(0)
    x = torch.randn(6, 1, 10, 12)
    atlas = featurelens.scan(_Net().eval(), x, ["permute"], top_k=2, progress=False)
    channels_last = _Net(channels_last=True).eval()  # same names, dim 1 is no longer channels
    with pytest.raises(ValueError, match="layer 'permute' outputs its channels at dim 3"):
        zf_grid(channels_last, x, atlas, "permute", 0)
    with pytest.raises(ValueError, match="layer 'permute' outputs its channels at dim 3"):
        layer_sheet(channels_last, x, atlas, "permute")


def test_a_layer_without_receptive_field_shows_the_whole_input():
    # cumsum is an operation the receptive-field engine does not know (F.interpolate was, until
    # it learnt upsampling): whole-input boxes, each projection the unit's plain gradient over
    # the whole input.
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(6, 1, 10, 12)
    with pytest.raises(featurelens.UnsupportedOpError):
        featurelens.receptive_field(model, (1, 10, 12), "conv")
    atlas = featurelens.scan(model, x, ["conv"], top_k=3, progress=False)
    with pytest.warns(featurelens.CropWarning):
        fig = zf_figure(model, x, atlas, "conv", 2, "gradient", 3, "signed")
    assert "receptive field not computable: whole input shown" in fig.meta["title"]
    assert fig.meta["receptive_field"] is None
    assert "cumsum" in fig.meta["receptive_field_error"]
    assert fig.layout.cell_shape == (10, 12)  # every box is the whole input
    hits = atlas.top("conv", 2)
    with pytest.warns(featurelens.CropWarning):
        batch = project_hits(model, x, "conv", [(2, h) for h in hits], None, "gradient")
    for row, hit in enumerate(hits):
        xi = x[hit.index : hit.index + 1].clone().requires_grad_(True)
        model(xi)[0, 2][hit.location].backward()
        torch.testing.assert_close(batch.projections[row], xi.grad[0])
        assert batch.boxes[row] == ((0, 9), (0, 11))
    with pytest.warns(featurelens.CropWarning):
        layer_sheet(model, x, atlas, "conv", "gradient")  # no error: whole-input cells


def test_a_float64_model_gives_the_float32_figure():
    from conftest import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN().eval()
    model(torch.zeros(1, 1, 28, 28))
    data = torch.rand(12, 1, 28, 28)
    atlas = featurelens.scan(model, data, [LAYER], top_k=3, progress=False)
    model64, data64 = model.double(), data.double()
    atlas64 = featurelens.scan(model64, data64, [LAYER], top_k=3, progress=False)
    assert [(h.index, h.location) for h in atlas64.top(LAYER, 1)] == [
        (h.index, h.location) for h in atlas.top(LAYER, 1)
    ]
    hits = atlas64.top(LAYER, 1)
    rf = featurelens.receptive_field(model64, (1, 28, 28), LAYER)
    batch = project_hits(model64, data64, LAYER, [(1, h) for h in hits], rf, "gradient")
    assert batch.examples.dtype == batch.projections.dtype == torch.float64
    fig64 = zf_grid(model64, data64, atlas64, LAYER, 1, "gradient", 3, "signed")
    model32 = model64.float()
    fig32 = zf_grid(model32, data, atlas64, LAYER, 1, "gradient", 3, "signed")
    diff = np.abs(decode(fig64) - decode(fig32))
    assert diff.max() <= 2  # rounding of the last colour level only
