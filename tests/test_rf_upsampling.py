"""Receptive fields past upsampling: transposed convolutions, interpolation, pixel shuffle,
reflect/replicate/circular padding, adaptive pooling with windows of unequal size.

Every op is checked against the independent gradient-support verifier at every location of
its output and of a convolution after it (1-D, 2-D, 3-D where PyTorch has the op), with
literal hand-worked values for the awkward cases, in random stacks that mix the new ops with
the old (hypothesis), and on a U-Net, torchvision's segmentation heads and VGG16 at 112x112.

Models run in float64, as the verifier does: float32 rounds a scale like 1/3 so that an
interpolation can read one more pixel with a weight of 1e-8, which the engine then includes
(never a region too small; see ``test_float32_rounding_reads_one_more_pixel``).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import featurelens as fl
from featurelens.projection import CropWarning
from featurelens.receptive_field import receptive_field_table
from test_rf_property import Residual, Shifted

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


# --- helpers ---------------------------------------------------------------------------------


def assert_exact(model: nn.Module, shape: tuple[int, ...], layer: str) -> fl.ReceptiveField:
    """At every location: region == the verifier's bounding box; regions() are tight boxes
    whose union holds the gradient support; a regular interval holds the region."""
    rf = fl.receptive_field(model, shape, layer)
    for loc in itertools.product(*(range(n) for n in rf.output_shape)):
        emp = fl.empirical_receptive_field(model, shape, layer, loc)
        assert rf.region(loc) == emp.region, (layer, loc, rf)
        boxes = rf.regions(loc)
        covered = torch.zeros_like(emp.mask)
        for box in boxes:
            covered[box] = True
            inside = emp.mask[box]  # tight: the support reaches every face of the box
            for axis in range(inside.dim()):
                other = tuple(a for a in range(inside.dim()) if a != axis)
                hit = inside.any(dim=other) if other else inside
                assert hit[0] and hit[-1], (layer, loc, box)
        assert not (emp.mask & ~covered).any(), (layer, loc, boxes)
        assert (len(boxes) > 1) <= rf.wraps
        if rf.regular and boxes and not rf.wraps:
            for (first, last), sl in zip(rf.interval(loc), emp.region):
                assert first <= sl.start and sl.stop - 1 <= last, (layer, loc, rf)
    return rf


class Fn(nn.Module):
    """A function of the input as a module (so that it has a layer name)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def around(d: int, op: nn.Module, channels: int = 4, out_channels: int | None = None) -> nn.Module:
    """``conv (k=2) -> op -> conv (k=3, padding 1)``: layers '0', '1' (the op), '2'."""
    out_channels = channels if out_channels is None else out_channels
    model = nn.Sequential(
        CONV[d](1, channels, 2), op, CONV[d](out_channels, 2, 3, padding=1)
    )  # fmt: skip
    return model.double().eval()


def check_op(d: int, op: nn.Module, size: tuple[int, ...], out_channels: int | None = None):
    model = around(d, op, out_channels=out_channels)
    shape = (1, *size)
    rf = assert_exact(model, shape, "1")
    assert_exact(model, shape, "2")
    return rf


# --- each op against the verifier, every location -------------------------------------------

SIZES = {1: (9,), 2: (6, 5), 3: (3, 4, 3)}


def transposed(d: int) -> dict[str, nn.Module]:
    t = CONV_T[d]
    return {
        "k3 s2 p1 output_padding 1": t(4, 4, 3, stride=2, padding=1, output_padding=1),
        "k2 s3 output_padding 2 dilation 2": t(4, 4, 2, stride=3, output_padding=2, dilation=2),
        "k4 s2 p1 groups 2": t(4, 4, 4, stride=2, padding=1, groups=2),
        "k3 s1 p1 (a convolution)": t(4, 4, 3, padding=1),
        "k1 s2 p0": t(4, 4, 1, stride=2),
    }


@pytest.mark.parametrize("d", [1, 2, 3])
def test_transposed_convolutions(d):
    for name, op in transposed(d).items():
        rf = check_op(d, op, SIZES[d])
        assert rf.regular == (op.stride[0] == 1), name


@pytest.mark.parametrize("d", [1, 2, 3])
def test_transposed_convolution_functions(d):
    w = torch.rand(4, 2, *(3,) * d, dtype=torch.float64)
    fn = getattr(F, f"conv_transpose{d}d")
    forms = {
        "positional": Fn(lambda x: fn(x, w, None, 2, 1, 1, 2, 1)),
        "keywords": Fn(lambda x: fn(x, w, stride=2, padding=1, output_padding=1, groups=2)),
        "torch.*": Fn(lambda x: getattr(torch, f"conv_transpose{d}d")(x, w, None, 2, 1, 1, 2)),
    }
    fields = [check_op(d, op, SIZES[d]) for op in forms.values()]
    assert len({f.bounds for f in fields}) == 1


def interpolations(d: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    lin = LINEAR[d]
    out = {
        "nearest x1.5": lambda x: F.interpolate(x, scale_factor=1.5),
        "nearest-exact x1.5": lambda x: F.interpolate(x, scale_factor=1.5, mode="nearest-exact"),
        "nearest to a size": lambda x: F.interpolate(x, size=(7, 4, 9)[-d:]),
        "nearest x2": lambda x: F.interpolate(x, scale_factor=2),
        "nearest x0.5": lambda x: F.interpolate(x, scale_factor=0.5),
        f"{lin} x2": lambda x: F.interpolate(x, scale_factor=2, mode=lin),
        f"{lin} x2 align_corners": lambda x: F.interpolate(
            x, scale_factor=2, mode=lin, align_corners=True
        ),
        f"{lin} x1.75 recompute": lambda x: F.interpolate(
            x, scale_factor=1.75, mode=lin, recompute_scale_factor=True
        ),
        f"{lin} to a size, align_corners": lambda x: F.interpolate(
            x, size=(9, 2, 8)[-d:], mode=lin, align_corners=True
        ),
        f"{lin} x0.5": lambda x: F.interpolate(x, scale_factor=0.5, mode=lin),
        "area to a size": lambda x: F.interpolate(x, size=(3, 2, 4)[-d:], mode="area"),
        "F.upsample": lambda x: F.upsample(x, scale_factor=2, mode=lin, align_corners=False),
    }
    if d == 2:
        out["bicubic x1.5"] = lambda x: F.interpolate(x, scale_factor=1.5, mode="bicubic")
        out["bicubic align_corners"] = lambda x: F.interpolate(
            x, size=(9, 7), mode="bicubic", align_corners=True
        )
        out["bilinear antialias x0.5"] = lambda x: F.interpolate(
            x, scale_factor=0.5, mode="bilinear", antialias=True
        )
        out["bicubic antialias to a size"] = lambda x: F.interpolate(
            x, size=(3, 2), mode="bicubic", antialias=True
        )
    return out


@pytest.mark.parametrize("d", [1, 2, 3])
def test_interpolation(d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # F.upsample is deprecated
        for name, fn in interpolations(d).items():
            rf = check_op(d, Fn(fn), SIZES[d])
            if "x0.5" in name and "antialias" not in name:
                assert rf.regular, name  # an integer factor down: a window
            if "x2" in name or "x1.5" in name or "x1.75" in name:
                assert not rf.regular, name


def test_upsampling_modules():
    for op in [
        nn.Upsample(scale_factor=1.5),
        nn.Upsample(size=(9, 8), mode="bilinear", align_corners=True),
        nn.Upsample(scale_factor=(2, 3), mode="bicubic"),
        nn.UpsamplingNearest2d(scale_factor=2),
        nn.UpsamplingBilinear2d(scale_factor=2),  # align_corners=True
    ]:
        check_op(2, op, SIZES[2])
    check_op(1, nn.Upsample(scale_factor=2.5, mode="linear"), SIZES[1])
    check_op(3, nn.Upsample(scale_factor=(1, 2, 0.5), mode="trilinear"), SIZES[3])


def test_pixel_shuffle():
    for op in [nn.PixelShuffle(2), Fn(lambda x: F.pixel_shuffle(x, 2))]:
        rf = check_op(2, op, SIZES[2], out_channels=1)
        assert not rf.regular and rf.output_shape == (10, 8)
    for op in [nn.PixelUnshuffle(2), Fn(lambda x: F.pixel_unshuffle(x, downscale_factor=2))]:
        rf = check_op(2, op, (7, 5), out_channels=16)
        assert rf.regular and rf.stride == (2, 2)
    # with a convolution over all channels between, there and back is exact
    rf = check_op(2, nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(16, 16, 1),
                                   nn.PixelShuffle(2)), (7, 5))  # fmt: skip
    assert not rf.regular and rf.output_shape == (6, 4)


class Concatenated(nn.Module):
    """Channels of one location that see different fields, then a pixel shuffle."""

    def __init__(self, mix: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 3, padding=1)
        self.mix = nn.Conv2d(4, 4, 1) if mix else nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.mix(torch.cat([self.a(x), self.b(x)], 1)))


def test_pixel_shuffle_of_channels_that_see_different_fields_is_refused():
    """Each output location of the shuffle reads its own channels; one field per location
    cannot say which after an unshuffle or a concatenation (until a convolution mixes all
    channels): refused, never too small nor silently too large."""
    there_and_back = around(2, nn.Sequential(nn.PixelUnshuffle(2), nn.PixelShuffle(2)))
    for model in [there_and_back, Concatenated(mix=False)]:
        with pytest.raises(fl.UnsupportedOpError, match="channels of a location see different"):
            fl.receptive_fields(model, (1, 7, 5))
    assert_exact(Concatenated(mix=True).double().eval(), (1, 4, 5), "shuffle")


PAD_MODULES = {
    "reflect": {1: nn.ReflectionPad1d, 2: nn.ReflectionPad2d, 3: nn.ReflectionPad3d},
    "replicate": {1: nn.ReplicationPad1d, 2: nn.ReplicationPad2d, 3: nn.ReplicationPad3d},
    "circular": {1: nn.CircularPad1d, 2: nn.CircularPad2d, 3: nn.CircularPad3d},
}


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("mode", list(PAD_MODULES))
def test_padding_modes(d, mode):
    pad = (2, 1, 1, 0, 1, 1)[: 2 * d]
    size = {1: (9,), 2: (6, 5), 3: (5, 4, 5)}[d]
    check_op(d, PAD_MODULES[mode][d](pad), size)
    check_op(d, Fn(lambda x: F.pad(x, pad, mode=mode)), size)
    for conv in [
        CONV[d](4, 4, 3, padding=1, padding_mode=mode),
        CONV[d](4, 4, 3, stride=2, padding=2, padding_mode=mode),
        CONV[d](4, 4, 2, padding="same", padding_mode=mode, dilation=2),
    ]:
        rf = check_op(d, conv, size)
        if mode == "circular":
            assert rf.wraps


@pytest.mark.parametrize("d", [1, 2, 3])
def test_adaptive_pooling_with_unequal_windows(d):
    avg = getattr(nn, f"AdaptiveAvgPool{d}d")
    mx = getattr(nn, f"AdaptiveMaxPool{d}d")
    sizes = {1: (10,), 2: (7, 5), 3: (6, 5, 8)}[d]
    for out in [(4, 3, 3)[:d], (7, 4, 2)[:d]]:  # down and up, unequal windows
        check_op(d, avg(out), sizes)
        check_op(d, mx(out), sizes)
    fn = getattr(F, f"adaptive_max_pool{d}d")
    check_op(d, Fn(lambda x: fn(x, (3, 3, 3)[:d], return_indices=True)[0]), sizes)


def test_roll_is_a_circular_shift():
    for fn in [
        lambda x: torch.roll(x, (1, -2), (2, 3)),
        lambda x: x.roll(3, 2),
        lambda x: torch.roll(x, shifts=2, dims=-1),
    ]:
        rf = check_op(2, Fn(fn), SIZES[2])
        assert rf.wraps


# --- literal, hand-worked values --------------------------------------------------------------


def field_1d(op: nn.Module, n: int) -> fl.ReceptiveField:
    """The field of ``op`` applied to a 1-D input of length ``n``: bounds are the op's reads."""
    return fl.receptive_field(nn.Sequential(op).double(), (1, n), "0")


def test_transposed_conv_with_output_padding_literal():
    # k3 s2 p1 output_padding 1 on 4 inputs: 8 outputs; o = 2i - 1 + t reads i = (o + 1 - t)/2
    rf = field_1d(nn.ConvTranspose1d(1, 1, 3, stride=2, padding=1, output_padding=1), 4)
    assert rf.output_shape == (8,)
    assert rf.bounds == (((0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 3), (3, 3), (3, 3)),)
    # k2 s2 output_padding 1 on 3 inputs: the extra last output reads nothing (bias only)
    rf = field_1d(nn.ConvTranspose1d(1, 1, 2, stride=2, output_padding=1), 3)
    assert rf.bounds == (((0, 0), (0, 0), (1, 1), (1, 1), (2, 2), (2, 2), (0, -1)),)
    assert rf.region(6) == (slice(0, 0),) and rf.regions(6) == []
    assert rf.size == (None,) and not rf.regular
    # stride 1 is a convolution: k3 p0 reads o-2..o, Distill size 3 padding 2
    rf = field_1d(nn.ConvTranspose1d(1, 1, 3), 4)
    assert (rf.size, rf.stride, rf.padding) == ((3,), (1,), (2,))
    assert rf.interval(0) == ((-2, 0),) and rf.region(5) == (slice(3, 4),)


def test_nearest_upsampling_by_one_and_a_half_literal():
    # u reads floor(u / 1.5): 0, 0, 1, 2, 2, 3
    rf = field_1d(nn.Upsample(scale_factor=1.5), 4)
    assert rf.bounds == (((0, 0), (0, 0), (1, 1), (2, 2), (2, 2), (3, 3)),)
    assert rf.stride == (None,)
    # then a 3-wide convolution (padding 1): u reads the union over u-1..u+1
    m = nn.Sequential(nn.Upsample(scale_factor=1.5), nn.Conv1d(1, 1, 3, padding=1)).double()
    rf = fl.receptive_field(m, (1, 4), "1")
    assert rf.bounds == (((0, 0), (0, 1), (0, 2), (1, 2), (2, 3), (2, 3)),)
    assert not rf.regular
    with pytest.raises(fl.ReceptiveFieldError, match="irregular on axis 0"):
        rf.interval(2)
    with pytest.raises(fl.ReceptiveFieldError, match="irregular"):
        rf.region(2, clip=False)


def test_linear_interpolation_with_align_corners_both_ways_literal():
    def up(n, **kw):
        return field_1d(Fn(lambda x: F.interpolate(x, mode="linear", **kw)), n).bounds[0]

    # down 4 -> 2. align_corners: source 3u, exactly on a pixel. Not: source 2u + 0.5, two.
    assert up(4, size=2, align_corners=True) == ((0, 0), (3, 3))
    assert up(4, size=2, align_corners=False) == ((0, 1), (2, 3))
    # up 3 -> 5 with align_corners: source u/2, one pixel at even u
    assert up(3, size=5, align_corners=True) == ((0, 0), (0, 1), (1, 1), (1, 2), (2, 2))
    # up x2 without: source u/2 - 1/4, clamped at 0 and at the last pixel
    assert up(3, scale_factor=2, align_corners=False) == (
        (0, 0), (0, 1), (0, 1), (1, 2), (1, 2), (2, 2))  # fmt: skip
    # down 4 -> 2 without align_corners is one window: kernel 2, stride 2
    rf = field_1d(Fn(lambda x: F.interpolate(x, scale_factor=0.5, mode="linear")), 4)
    assert (rf.size, rf.stride, rf.padding) == ((2,), (2,), (0,))


def test_bilinear_with_align_corners_both_ways_against_the_verifier():
    for align in (True, False):
        m = around(2, Fn(lambda x, align=align: F.interpolate(
            x, size=(4, 2), mode="bilinear", align_corners=align)))  # fmt: skip
        rf = assert_exact(m, (1, 5, 3), "1")  # after the k=2 conv: 4 x 2 -> 4 x 2
        assert rf.regular  # the same size: each output reads its own location
        assert rf.bounds[0] == ((0, 1), (1, 2), (2, 3), (3, 4))


def test_circular_padding_at_a_border_literal():
    m = nn.Sequential(nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular")).double()
    rf = fl.receptive_field(m, (1, 5), "0")
    assert (rf.size, rf.stride, rf.padding) == ((3,), (1,), (1,)) and rf.wraps
    assert rf.arcs[0][0] == (-1, 1)  # position -1 is position 4, read modulo 5
    assert rf.bounds[0][0] == (0, 4)  # the bounding box: both ends
    assert rf.arcs[0][2] == rf.bounds[0][2] == (1, 3)
    assert rf.regions(0) == [(slice(4, 5),), (slice(0, 2),)]
    assert rf.region(0) == (slice(0, 5),)  # the bounding box of both ends
    assert rf.regions(4) == [(slice(3, 5),), (slice(0, 1),)]
    assert rf.regions(2) == [(slice(1, 4),)] and rf.region(2) == (slice(1, 4),)
    # 2-D: the corner sees all four corners of the input
    m2 = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular")).double()
    rf2 = fl.receptive_field(m2, (1, 5, 6), "0")
    assert rf2.regions((0, 5)) == [
        (slice(4, 5), slice(4, 6)), (slice(4, 5), slice(0, 1)),
        (slice(0, 2), slice(4, 6)), (slice(0, 2), slice(0, 1)),
    ]  # fmt: skip
    assert rf2.region((0, 5)) == (slice(0, 5), slice(0, 6))
    assert "wraps" in repr(rf2) and "wraps" in receptive_field_table({"0": rf2})
    assert_exact(m2, (1, 5, 6), "0")


def test_adaptive_pooling_7_to_3_literal():
    # windows floor(7u/3) .. ceil(7(u+1)/3) - 1: [0, 2], [2, 4], [4, 6]: one window, k3 s2
    rf = field_1d(nn.AdaptiveAvgPool1d(3), 7)
    assert rf.bounds == (((0, 2), (2, 4), (4, 6)),)
    assert (rf.size, rf.stride, rf.padding) == ((3,), (2,), (0,))
    # 10 -> 4: [0, 2], [2, 4], [5, 7], [7, 9]: windows of 3 at starts 0, 2, 5, 7: irregular
    rf = field_1d(nn.AdaptiveMaxPool1d(4), 10)
    assert rf.bounds == (((0, 2), (2, 4), (5, 7), (7, 9)),)
    assert rf.size == (None,) and "irregular" in repr(rf)
    table = receptive_field_table({"pool": rf})
    assert "irregular" in table and " -  " in table


def test_float32_rounding_reads_one_more_pixel():
    """Linear x3 on a float32 model: 1/3 rounds up in float32, so output 1 (source
    1.5/3 - 0.5, exactly 0) also reads pixel 1 with weight 1.5e-8. The engine follows the
    kernel in float32 and float64: never a region too small for either."""
    op = Fn(lambda x: F.interpolate(x, scale_factor=3, mode="linear"))
    rf32 = fl.receptive_field(nn.Sequential(nn.Conv1d(1, 1, 1), op), (1, 7), "1")
    rf64 = fl.receptive_field(nn.Sequential(nn.Conv1d(1, 1, 1), op).double(), (1, 7), "1")
    assert rf64.bounds[0][1] == (0, 0) and rf32.bounds[0][1] == (0, 1)
    x = torch.zeros(1, 1, 7, requires_grad=True)
    (grad,) = torch.autograd.grad(F.interpolate(x, scale_factor=3, mode="linear")[0, 0, 1], x)
    assert grad[0, 0].nonzero().flatten().tolist() == [0, 1]  # float32 reads pixel 1 too


# --- random stacks mixing the new ops with the old -------------------------------------------


class Merge(nn.Module):
    """U-Net skip: ``cat(x, up(down(x)))`` with the upsampling back to x's size."""

    def __init__(self, d: int, how: str) -> None:
        super().__init__()
        self.down = CONV[d](2, 2, 3, stride=2, padding=1)
        self.up = CONV_T[d](2, 2, 2, stride=2) if how == "transposed" else None
        self.how, self.d = how, d
        self.out = CONV[d](4, 2, 1)

    def forward(self, x):
        y = self.down(x)
        if self.up is not None:  # 2 * ceil(n / 2) positions, padded and cut back to n
            y = F.pad(self.up(y), [0, 1] * self.d)
            for i in range(self.d):
                y = y[(slice(None),) * (2 + i) + (slice(0, x.shape[2 + i]),)]
        else:
            y = F.interpolate(y, size=x.shape[2:], mode=self.how)
        return self.out(torch.cat([x, y], 1))


@st.composite
def mixed_stacks(draw, d: int):
    """A random stack on 2 channels of old ops (conv, pooling, residual, misaligned merge) and
    new ones (transposed conv, interpolation, padding modes, adaptive pooling, pixel
    shuffle, U-Net merges)."""
    ops: list[nn.Module] = [CONV[d](1, 2, 1)]
    kinds = ["conv", "max", "residual", "shifted", "transposed", "interpolate", "pad",
             "adaptive", "merge"] + (["shuffle"] if d == 2 else [])  # fmt: skip
    for _ in range(draw(st.integers(2, 4))):
        kind = draw(st.sampled_from(kinds))
        k = tuple(draw(st.integers(1, 3)) for _ in range(d))
        s = tuple(draw(st.integers(1, 3)) for _ in range(d))
        if kind == "conv":
            pad = tuple(draw(st.integers(0, ki)) for ki in k)
            mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
            ops.append(CONV[d](2, 2, k, stride=s, padding=pad, padding_mode=mode,
                               dilation=draw(st.integers(1, 2))))  # fmt: skip
        elif kind == "max":
            pad = tuple(draw(st.integers(0, ki // 2)) for ki in k)
            ops.append(getattr(nn, f"MaxPool{d}d")(k, s, pad, ceil_mode=draw(st.booleans())))
        elif kind == "residual":
            ops.append(Residual(d, tuple(draw(st.sampled_from([1, 3])) for _ in range(d)), 1))
        elif kind == "shifted":
            ops.append(Shifted(d, draw(st.integers(0, 2))))
        elif kind == "transposed":
            pad = tuple(draw(st.integers(0, ki - 1)) for ki in k)
            dil = draw(st.integers(1, 2))
            out_pad = tuple(draw(st.integers(0, max(si, dil) - 1)) for si in s)
            ops.append(CONV_T[d](2, 2, k, stride=s, padding=pad, output_padding=out_pad,
                                 dilation=dil))  # fmt: skip
        elif kind == "interpolate":
            mode = draw(st.sampled_from(["nearest", "nearest-exact", LINEAR[d], "area"]))
            align = draw(st.booleans()) if mode == LINEAR[d] else None
            scale = tuple(draw(st.sampled_from([0.5, 1.5, 2.0, 2.5])) for _ in range(d))
            ops.append(Fn(lambda x, mode=mode, align=align, scale=scale: F.interpolate(
                x, scale_factor=scale, mode=mode, align_corners=align)))  # fmt: skip
        elif kind == "pad":
            mode = draw(st.sampled_from(["reflect", "replicate", "circular"]))
            pad = [draw(st.integers(0, 2)) for _ in range(2 * d)]
            ops.append(Fn(lambda x, pad=pad, mode=mode: F.pad(x, pad, mode=mode)))
        elif kind == "adaptive":
            pool = draw(st.sampled_from(["AdaptiveAvgPool", "AdaptiveMaxPool"]))
            ops.append(getattr(nn, f"{pool}{d}d")(tuple(draw(st.integers(2, 7)) for _ in k)))
        elif kind == "merge":
            ops.append(Merge(d, draw(st.sampled_from(["transposed", "nearest", LINEAR[d]]))))
        else:
            ops.append(nn.Sequential(nn.Conv2d(2, 8, 1), nn.PixelShuffle(2)))
    return ops


_MIXED_SIZES = {1: (6, 14), 2: (4, 8), 3: (3, 5)}


@pytest.mark.parametrize("d", [1, 2, 3])
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=True,
)
@given(data=st.data())
def test_mixed_stacks_against_the_verifier(d, data):
    model = nn.Sequential(*data.draw(mixed_stacks(d))).double().eval()
    lo, hi = _MIXED_SIZES[d]
    shape = (1, *(data.draw(st.integers(lo, hi)) for _ in range(d)))
    try:
        rfs = fl.receptive_fields(model, shape)
    except ValueError:
        assume(False)  # the stack shrinks the input below a kernel or a reflection
    except fl.UnsupportedOpError as exc:  # a merge with a branch that sees only padding at
        assert "not one box per axis" in str(exc)  # some border locations: refused, as before
        assume(False)
    last = list(rfs)[-1]
    assume(0 < torch.Size(rfs[last].output_shape).numel() <= 400)
    assert_exact(model, shape, last)


# --- models ------------------------------------------------------------------------------------


def block(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(d_in, d_out, 3, padding=1), nn.BatchNorm2d(d_out), nn.ReLU(inplace=True)
    )


class UNet(nn.Module):
    """Two levels down (conv, max pool), up by a transposed conv and by bilinear upsampling,
    with skip concatenations."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2, self.mid = block(1, 4), block(4, 8), block(8, 8)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.dec2 = block(16, 4)
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.dec1 = block(8, 4)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([e2, self.up2(m)], 1))
        d1 = self.dec1(torch.cat([e1, self.up1(d2)], 1))
        return self.head(d1)


def test_unet_every_location():
    model = UNet().double().eval()
    for layer in ["mid", "up2", "dec2", "up1", "dec1", "head"]:
        rf = assert_exact(model, (1, 12, 16), layer)
        assert rf.regular == (layer == "mid"), layer
    assert fl.receptive_field(model, (1, 12, 16), "head").output_shape == (12, 16)


class Segmentation(nn.Module):
    """A torchvision segmentation model with its output (after the final upsampling) as a
    layer, ``out``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out = nn.Identity()

    def forward(self, x):
        return self.out(self.model(x)["out"])


def corners_and_centre(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Two opposite corners, one more, and the centre."""
    return list(dict.fromkeys([
        tuple(0 for _ in shape), tuple(n - 1 for n in shape), (0, *(n - 1 for n in shape[1:])),
        tuple(n // 2 for n in shape),
    ]))  # fmt: skip


SEGMENTATION = {  # name: (input size, layers before the final upsampling)
    "fcn_resnet50": (32, ["model.classifier.4"]),
    "deeplabv3_mobilenet_v3_large": (48, ["model.backbone.4", "model.classifier.0"]),
    "lraspp_mobilenet_v3_large": (48, ["model.backbone.4", "model.classifier.low_classifier"]),
}


@pytest.mark.parametrize("name", list(SEGMENTATION))
def test_torchvision_segmentation_heads(name):
    torchvision = pytest.importorskip("torchvision")
    size, layers = SEGMENTATION[name]
    model = getattr(torchvision.models.segmentation, name)(
        weights=None, weights_backbone=None, num_classes=3
    )
    model = Segmentation(model).eval()
    shape = (3, size, size)
    for layer in [*layers, "out"]:
        rf = fl.receptive_field(model, shape, layer)
        for loc in corners_and_centre(rf.output_shape)[: 2 if name == "fcn_resnet50" else 4]:
            emp = fl.empirical_receptive_field(model, shape, layer, loc)
            assert rf.region(loc) == emp.region, (name, layer, loc, rf)
    out = fl.receptive_field(model, shape, "out")
    assert out.output_shape == (size, size) and not out.regular


class PooledBranch(nn.Module):
    """ASPP's image pooling: a branch pooled to one location and upsampled back (stride 0),
    concatenated with a strided branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        self.pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(2, 2, 1))
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        up = F.interpolate(self.pooled(y), size=y.shape[-2:], mode="bilinear")
        return self.out(torch.cat([y, up], 1))


def test_a_pooled_branch_upsampled_back_merges_like_a_broadcast():
    model = PooledBranch().double().eval()
    up = fl.receptive_field(model, (1, 9, 8), "pooled")
    assert up.is_global and up.output_shape == (1, 1)
    rf = assert_exact(model, (1, 9, 8), "out")
    assert rf.is_global and rf.regular and rf.stride == (2, 2)
    # the smallest interval holding both the 3x3 window and the whole input at every location
    # (conv: size 3, stride 2, padding 1 on a 5 x 4 map; pooled: size 11 x 9, padding 1)
    assert rf.interval((0, 0)) == ((-9, 9), (-7, 7))  # padding (5 - 1) * 2 + 1, 3 * 2 + 1
    assert rf.interval((4, 3)) == ((-1, 17), (-1, 13))


def test_figures_show_the_whole_input_for_irregular_fields():
    pytest.importorskip("PIL")
    from featurelens.figures import zf_title
    from featurelens.render import box_of

    rf = fl.receptive_field(UNet().eval(), (1, 12, 16), "dec1")
    assert box_of(rf, (3, 4)) == ((0, 11), (0, 15))  # one box size for every unit
    assert zf_title("dec1", 0, "gradient", "rgb", rf).endswith("receptive field 12x16 (irregular)")


def test_the_explorer_gives_no_interval_for_irregular_fields():
    pytest.importorskip("PIL")
    from featurelens.explorer import _box

    rf = fl.receptive_field(UNet().eval(), (1, 12, 16), "dec1")
    box = _box(rf, (3, 4), rf.output_shape, "dec1")
    assert box["interval"] is None
    assert box["region"] == [[s.start, s.stop - 1] for s in rf.region((3, 4))]


def test_vgg16_at_112_adaptive_pooling_3_to_7():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.vgg16(weights=None).eval()
    rf = fl.receptive_field(model, (3, 112, 112), "avgpool")
    assert rf.output_shape == (7, 7) and not rf.regular
    # windows of 3 -> 7: [0,0], [0,0], [0,1], [1,1], [1,2], [2,2], [2,2] of the 3x3 map
    assert fl.receptive_field(model, (3, 112, 112), "features.30").output_shape == (3, 3)
    for loc in [(0, 0), (3, 6)]:
        emp = fl.empirical_receptive_field(model, (3, 112, 112), "avgpool", loc)
        assert rf.region(loc) == emp.region, (loc, rf)
    logits = fl.receptive_field(model, (3, 112, 112), "classifier.6")
    assert logits.is_global and logits.regular  # one location: regular again


# --- what stays unsupported --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "message"),
    [
        (
            Fn(
                lambda x: F.grid_sample(
                    x, torch.zeros(1, 3, 3, 2, dtype=x.dtype), align_corners=False
                )
            ),  # fmt: skip
            "grid_sample.*sampling grid",
        ),
        (nn.Sequential(nn.Unfold(2), nn.Flatten()), "Unfold module.*sliding windows"),
        (nn.FractionalMaxPool2d(2, output_size=3), "FractionalMaxPool2d module.*random"),
        (Fn(lambda x: torch.roll(x, 1)), "rolls the flattened tensor"),
    ],
)
def test_ops_without_an_exact_field_keep_a_clear_error(op, message):
    with pytest.raises(fl.UnsupportedOpError, match=message):
        fl.receptive_fields(nn.Sequential(nn.Conv2d(1, 2, 1), op), (1, 6, 6))


# --- projections on irregular layers --------------------------------------------------------


def autograd_projection(model, x, layer, channel, location):
    from featurelens.graph import capture

    xr = x.clone().requires_grad_(True)
    with capture(model, [layer]) as run:
        y = run(xr)[layer]
    (grad,) = torch.autograd.grad(y[(slice(None), channel, *location)].sum(), xr)
    return grad


@pytest.mark.parametrize(
    ("layer", "reason"), [("up2", "irregular"), ("dec1", "irregular"), ("enc2", "")]
)
def test_projection_of_irregular_layers_runs_on_the_whole_input(layer, reason):
    model = UNet().double().eval()
    x = torch.randn(2, 1, 12, 16, dtype=torch.float64)
    location = (2, 3)
    if reason:
        with pytest.warns(CropWarning, match=reason):
            out = fl.project(model, x, layer, 1, location, "gradient")
    else:  # a regular layer before any upsampling still crops
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = fl.project(model, x, layer, 1, location, "gradient")
    ref = autograd_projection(model, x, layer, 1, location)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)


def test_projection_after_interpolating_down_does_not_crop():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), Fn(lambda x: F.interpolate(x, size=(5, 4), mode="bilinear")),
        nn.Conv2d(2, 2, 3, padding=1),
    ).double().eval()  # fmt: skip
    assert fl.receptive_field(model, (1, 12, 10), "2").regular
    x = torch.randn(1, 1, 12, 10, dtype=torch.float64)
    with pytest.warns(CropWarning, match="resamples"):
        out = fl.project(model, x, "2", 0, (4, 3), "gradient")
    torch.testing.assert_close(out, autograd_projection(model, x, "2", 0, (4, 3)))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_crops_with_padding_modes_equal_the_whole_input(mode):
    """Reflected and replicated borders are regular: crops start on the stride grid, so a
    crop flush with the border reflects as the whole image does. Circular borders wrap:
    those layers run on the whole input."""
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=2, padding=1, padding_mode=mode), nn.ReLU(),
        nn.Conv2d(3, 3, 3, padding=2, dilation=2, padding_mode=mode), nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2, padding=1, padding_mode=mode),
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-4, 5, p.shape) / 8)
    model = model.double().eval()
    x = torch.randint(-8, 9, (2, 1, 19, 17)).double() / 4
    rf = fl.receptive_field(model, (1, 19, 17), "4")
    units = [fl.Unit("4", c, loc) for c in range(2)
             for loc in itertools.product(range(rf.output_shape[0]), range(rf.output_shape[1]))]  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for method in ["gradient", "guided"]:
            cropped = fl.project_units(model, x, units, method, rows=[0, 1] * (len(units) // 2))
            full = fl.project_units(model, x, units, method, rows=[0, 1] * (len(units) // 2),
                                    crop=False)  # fmt: skip
            assert torch.equal(cropped, full), (mode, method)
    crop_warnings = [w for w in caught if issubclass(w.category, CropWarning)]
    assert bool(crop_warnings) == (mode == "circular"), [str(w.message) for w in caught]
