"""Analytic receptive fields: hand-built awkward graphs with literal values, checked also
against the independent gradient-support verifier."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featurelens as fl
from featurelens.receptive_field import receptive_field_table, try_receptive_field


def assert_matches_empirical(model: nn.Module, shape: tuple[int, ...], layer: str) -> None:
    """Analytic region == bounding box of the gradient support, at every location."""
    rf = fl.receptive_field(model, shape, layer)
    for loc in itertools.product(*(range(n) for n in rf.output_shape)):
        emp = fl.empirical_receptive_field(model, shape, layer, loc)
        assert rf.region(loc) == emp.region, (layer, loc, rf)
        # the geometry (what crops and figure boxes use) holds the exact region; an irregular
        # field has none (interval() refuses it)
        for (first, last), sl in zip(rf.interval(loc) if rf.regular else (), emp.region):
            assert sl.start == sl.stop or first <= sl.start and sl.stop - 1 <= last, (loc, rf)


def geometry(rf: fl.ReceptiveField) -> tuple:
    return rf.size, rf.stride, rf.padding, rf.output_shape, rf.is_global, rf.aligned


# --- misaligned branches ---------------------------------------------------------------------


class Misaligned(nn.Module):
    """A centred 3x3 branch and a 5x5 branch looking up-left (F.pad of 4 before a valid conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(1, 2, 5)
        self.out = nn.Identity()

    def forward(self, x):
        return self.out(self.a(x) + self.b(F.pad(x, (4, 0, 4, 0))))


def test_misaligned_branches_literal():
    m = Misaligned()
    rfs = fl.receptive_fields(m, (1, 9, 9))
    assert geometry(rfs["a"]) == ((3, 3), (1, 1), (1, 1), (9, 9), False, True)
    assert geometry(rfs["b"]) == ((5, 5), (1, 1), (4, 4), (9, 9), False, True)
    # union: padding max(1, 4) = 4, size max(3-1, 5-4) + 4 = 6; centres 0 and -2 -> unaligned
    assert geometry(rfs["out"]) == ((6, 6), (1, 1), (4, 4), (9, 9), False, False)
    assert rfs["out"].interval((4, 4)) == ((0, 5), (0, 5))
    assert rfs["out"].region((0, 8)) == (slice(0, 2), slice(4, 9))
    assert_matches_empirical(m, (1, 9, 9), "out")


class PaddingOnlyBranch(nn.Module):
    """A branch whose first rows/columns are pure padding (explicit ZeroPad) merged with a
    branch that sees pixels there."""

    def __init__(self, d: int) -> None:
        super().__init__()
        conv, pad = (nn.Conv1d, nn.ConstantPad1d((2, 0), 0.0)) if d == 1 else (
            nn.Conv2d, nn.ZeroPad2d((2, 0, 2, 0)))  # fmt: skip
        self.a = conv(1, 2, 3, padding=1)
        self.b = conv(1, 2, 3)
        self.pad = pad
        self.out = nn.Identity()

    def forward(self, x):
        return self.out(self.a(x) + self.pad(self.b(x)))


def test_padding_only_locations():
    m1 = PaddingOnlyBranch(1)
    rfs = fl.receptive_fields(m1, (1, 9))
    assert rfs["pad"].region((1,)) == (slice(0, 0),)  # sees only padding: empty
    assert rfs["out"].region((1,)) == (slice(0, 3),)  # branch a alone
    assert_matches_empirical(m1, (1, 9), "pad")
    assert_matches_empirical(m1, (1, 9), "out")
    # in 2-D the union of such branches is not one box per axis: refused, never wrong
    m2 = PaddingOnlyBranch(2)
    assert fl.receptive_field(m2, (1, 9, 9), "pad").region((1, 4)) == (slice(0, 0), slice(0, 0))
    with pytest.raises(fl.UnsupportedOpError, match="see only padding"):
        fl.receptive_fields(m2, (1, 9, 9))


class StrideMismatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, stride=2)
        self.b = nn.Conv2d(1, 2, 3, stride=4, padding=3)

    def forward(self, x):
        return self.a(x) + self.b(x)  # both 4x4 on a 9x9 input, strides 2 and 4


def test_stride_mismatch_raises_naming_the_merge():
    with pytest.raises(fl.NotAlignedError, match=r"add.*strides.*\(2 and 4\)"):
        fl.receptive_fields(StrideMismatch(), (1, 9, 9))
    # the verifier still works on it
    emp = fl.empirical_receptive_field(StrideMismatch(), (1, 9, 9), "b", (1, 1))
    assert emp.region == (slice(1, 4), slice(1, 4))


class SqueezeExcitation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Conv2d(4, 4, 1)
        self.gate = nn.Identity()
        self.after = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        g = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        return self.after(self.gate(y * g))


def test_squeeze_excitation_is_global():
    m = SqueezeExcitation()
    rfs = fl.receptive_fields(m, (1, 8, 10))
    assert geometry(rfs["conv"]) == ((3, 3), (1, 1), (0, 0), (6, 8), False, True)
    # global average pooling = a window over the whole 6x8 map (one location: stride kept)
    assert geometry(rfs["fc"]) == ((8, 10), (1, 1), (0, 0), (1, 1), True, True)
    # the gate's one location reaches every location: the geometry grows to hold the 3x3 path
    # and the pooled hull everywhere (padding (6-1)*1 + 0 = 5, size 5 + max(3, 8) = 13; W alike)
    assert geometry(rfs["gate"]) == ((13, 17), (1, 1), (5, 7), (6, 8), True, True)
    assert rfs["after"].is_global
    assert rfs["gate"].region((5, 7)) == (slice(0, 8), slice(0, 10))
    assert_matches_empirical(m, (1, 8, 10), "gate")


class StripGate(nn.Module):
    """Strip pooling / coordinate attention: a gate pooled over W only, broadcast over W."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.pool = nn.AdaptiveAvgPool2d((None, 1))
        self.gated = nn.Identity()

    def forward(self, x):
        y = self.conv(x)
        return self.gated(y * torch.sigmoid(self.pool(y)))


def test_gate_over_one_axis():
    m = StripGate()
    rfs = fl.receptive_fields(m, (1, 7, 10))
    # H stays local (3 rows); every location sees all 10 columns: not global, and the
    # geometry on W grows to hold the whole axis (padding 7*1, size 7 + max(3, 10) = 17)
    assert geometry(rfs["gated"]) == ((3, 17), (1, 1), (0, 7), (5, 8), False, True)
    assert rfs["gated"].region((2, 0)) == (slice(2, 5), slice(0, 10))
    assert_matches_empirical(m, (1, 7, 10), "gated")


def test_normalize_over_a_spatial_dim_is_refused():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return F.normalize(F.normalize(self.conv(x)), dim=2)

    with pytest.raises(fl.UnsupportedOpError, match="normalize.*mixes spatial tensor dim 2"):
        fl.receptive_fields(Net(), (1, 8, 8))


def test_statistics_over_positions_are_recorded():
    """Norm statistics keep the field by convention, but are listed (crops would change them)."""
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3),
        nn.LayerNorm([4, 4, 4]), nn.Identity(),
    )  # fmt: skip
    rfs = fl.receptive_fields(m, (1, 8, 8))
    assert rfs["1"].statistics == ()  # BatchNorm in eval mode: running statistics
    assert rfs["3"].statistics == ("GroupNorm module '2'",)
    assert rfs["5"].statistics == ("GroupNorm module '2'", "LayerNorm module '4'")
    assert (rfs["5"].size, rfs["5"].stride) == ((5, 5), (1, 1))
    # LayerNorm over channels only (channels-last, as in ConvNeXt) normalises no positions
    assert fl.receptive_fields(ChannelsLast(), (4, 9, 8))["out"].statistics == ()


class DilatedCeil1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, 2, 3)
        self.c2 = nn.Conv1d(2, 2, 3, dilation=2, stride=2, padding=1)
        self.pool = nn.MaxPool1d(3, 2, padding=1, ceil_mode=True)

    def forward(self, x):
        return self.pool(self.c2(F.relu(self.c1(x))))


def test_dilation_and_ceil_mode_1d_literal():
    m = DilatedCeil1d()
    rfs = fl.receptive_fields(m, (1, 23))
    assert geometry(rfs["c1"]) == ((3,), (1,), (0,), (21,), False, True)
    # r = 3 + 2*(3-1)*1 = 7, j = 2, p = 0 + 1*1 = 1, n = (21 + 2 - 5)//2 + 1 = 10
    assert geometry(rfs["c2"]) == ((7,), (2,), (1,), (10,), False, True)
    # r = 7 + (3-1)*2 = 11, j = 4, p = 1 + 1*2 = 3, n = ceil((10 + 2 - 3)/2) + 1 = 6
    assert geometry(rfs["pool"]) == ((11,), (4,), (3,), (6,), False, True)
    for layer in rfs:
        assert_matches_empirical(m, (1, 23), layer)


def test_dilated_first_layer_skips_border_pixels():
    """A dilated first layer's border taps skip pixels: bounds are exact, the mask has holes."""
    m = nn.Sequential(nn.Conv1d(1, 1, 3, dilation=2, padding=2))
    rf = fl.receptive_field(m, (1, 10), "0")
    assert (rf.size, rf.stride, rf.padding) == ((5,), (1,), (2,))
    # location 1 taps positions -1 (padding), 1 and 3: the clipped formula would say [0, 3]
    assert rf.region((1,)) == (slice(1, 4),)
    emp = fl.empirical_receptive_field(m, (1, 10), "0", (1,))
    assert emp.region == (slice(1, 4),) and not emp.is_dense
    assert_matches_empirical(m, (1, 10), "0")


class StrideOverKernel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, (2, 1), stride=3)
        self.pool = nn.AvgPool2d((1, 2))

    def forward(self, x):
        return self.pool(self.conv(x))


def test_non_square_kernel_stride_larger_than_kernel():
    m = StrideOverKernel()
    rfs = fl.receptive_fields(m, (1, 10, 13))
    assert geometry(rfs["conv"]) == ((2, 1), (3, 3), (0, 0), (3, 5), False, True)
    assert rfs["conv"].region((1, 2)) == (slice(3, 5), slice(6, 7))
    # width: r = 1 + (2-1)*3 = 4, j = 6
    assert geometry(rfs["pool"]) == ((2, 4), (3, 6), (0, 0), (3, 2), False, True)
    assert_matches_empirical(m, (1, 10, 13), "conv")
    assert_matches_empirical(m, (1, 10, 13), "pool")


class FunctionalOps(nn.Module):
    """Asymmetric F.pad, functional pooling, 'same' padding with an even kernel, a crop."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.same = nn.Conv2d(2, 2, (4, 2), padding="same")
        self.out = nn.Identity()

    def forward(self, x):
        x = self.conv(F.pad(x, (1, 0, 2, 0)))  # left 1 (width), top 2 (height)
        x = F.max_pool2d(F.relu(x), 2, ceil_mode=True)
        x = self.same(x)
        return self.out(x[:, :, 1:, ::2])


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_functional_ops_literal():
    m = FunctionalOps()
    rfs = fl.receptive_fields(m, (1, 11, 12))
    assert geometry(rfs["conv"]) == ((3, 3), (1, 1), (2, 1), (11, 11), False, True)
    # max_pool 2: r = 3 + 1 = 4, j = 2; 'same' (4, 2): left pads 1 and 0 -> p = 2 + 2, 1 + 0
    assert geometry(rfs["same"]) == ((10, 6), (2, 2), (4, 1), (6, 6), False, True)
    # crop [1:] shifts padding by one stride; [::2] doubles the stride
    assert geometry(rfs["out"]) == ((10, 6), (2, 4), (2, 1), (5, 3), False, True)
    for layer in ("conv", "same", "out"):
        assert_matches_empirical(m, (1, 11, 12), layer)


class Volume(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv3d(1, 2, (1, 3, 3), stride=(1, 2, 2))
        self.d = nn.Conv3d(2, 2, 3, padding="same")
        self.p = nn.AdaptiveAvgPool3d((1, 3, 3))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(18, 3))

    def forward(self, x):
        return self.head(self.p(self.d(self.c(x))))


def test_volume_3d_adaptive_and_flatten_linear():
    m = Volume()
    rfs = fl.receptive_fields(m, (1, 4, 13, 13))
    assert geometry(rfs["c"]) == ((1, 3, 3), (1, 2, 2), (0, 0, 0), (4, 6, 6), False, True)
    assert geometry(rfs["d"]) == ((3, 7, 7), (1, 2, 2), (1, 2, 2), (4, 6, 6), False, True)
    # depth pooled to 1 (the whole map, stride kept), 6 -> 3 is a window of 2 with stride 2
    assert geometry(rfs["p"]) == ((6, 9, 9), (1, 4, 4), (1, 2, 2), (1, 3, 3), False, True)
    assert rfs["head"].is_global and rfs["head"].output_shape == (1, 1, 1)
    assert rfs["head"].region((0, 0, 0)) == (slice(0, 4), slice(0, 13), slice(0, 13))
    for layer in ("c", "d", "p", "head.1"):
        assert_matches_empirical(m, (1, 4, 13, 13), layer)


class ChannelsLast(nn.Module):
    """ConvNeXt-style: permute to channels-last, LayerNorm + Linear over channels, back."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 7, padding=3, groups=4)
        self.norm = nn.LayerNorm(4)
        self.mlp = nn.Linear(4, 4)
        self.out = nn.Identity()

    def forward(self, x):
        y = self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1)))
        return self.out(x + y.permute(0, 3, 1, 2))


def test_channels_last_block():
    m = ChannelsLast()
    rfs = fl.receptive_fields(m, (4, 9, 8))
    assert geometry(rfs["mlp"]) == ((7, 7), (1, 1), (3, 3), (9, 8), False, True)
    assert geometry(rfs["out"]) == ((7, 7), (1, 1), (3, 3), (9, 8), False, True)
    emp = fl.empirical_receptive_field(m, (4, 9, 8), "mlp", (2, 5), channel_dim=-1)
    assert emp.region == rfs["mlp"].region((2, 5)) == (slice(0, 6), slice(2, 8))
    assert_matches_empirical(m, (4, 9, 8), "out")


class DepthFirstTrap(nn.Module):
    """A node reached by a long and a short path (a naive depth-first walk sees it twice with
    different fields and keeps the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(1, 1, 3, padding=1)
        self.b = nn.Conv1d(1, 1, 3, padding=1)
        self.c = nn.Conv1d(1, 1, 3, padding=1)
        self.join = nn.Identity()
        self.last = nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x):
        short = self.a(x)
        long = self.c(self.b(short))
        return self.last(self.join(short + long))


def test_depth_first_trap_literal():
    m = DepthFirstTrap()
    rfs = fl.receptive_fields(m, (1, 20))
    assert geometry(rfs["join"]) == ((7,), (1,), (3,), (20,), False, True)
    assert geometry(rfs["last"]) == ((9,), (1,), (4,), (20,), False, True)
    assert_matches_empirical(m, (1, 20), "last")


# --- value object ---------------------------------------------------------------------------


def test_region_indexes_the_input_and_validates_locations(small_cnn):
    rf = fl.receptive_field(small_cnn, (1, 28, 28), "features.3")
    x = torch.arange(28 * 28.0).reshape(1, 1, 28, 28)
    # size 8, stride 2, padding 3: rows [-3, 4] clipped to [0, 4], columns [9, 16]
    assert (rf.size, rf.stride, rf.padding) == ((8, 8), (2, 2), (3, 3))
    patch = x[(..., *rf.region((0, 6)))]
    assert torch.equal(patch, x[..., 0:5, 9:17])
    with pytest.raises(
        ValueError, match=r"location \(14, 0\) is out of range on axis 0: valid 0..13"
    ):
        rf.region((14, 0))
    with pytest.raises(ValueError, match="has 1 coordinate"):
        rf.region((3,))
    assert "<table>" in rf._repr_html_()
    assert "features.3" in receptive_field_table({"features.3": rf})


def test_unknown_layer_lists_close_matches(small_cnn):
    with pytest.raises(
        fl.LayerError, match=r"unknown layer 'features.33'\. Did you mean 'features.3'"
    ):
        fl.receptive_field(small_cnn, (1, 28, 28), "features.33")


@pytest.mark.parametrize("shape", [(28, 28), (1, 1, 1, 28, 28), "abc", (1, 0, 28)])
def test_bad_input_shape_says_what_is_valid(small_cnn, shape):
    with pytest.raises(ValueError, match=r"\(C, \*spatial\)"):
        fl.receptive_fields(small_cnn, shape)


def test_model_rejecting_the_shape(small_cnn):
    with pytest.raises(ValueError, match=r"rejects inputs of shape \(N, 3, 28, 28\)"):
        fl.receptive_fields(small_cnn, (3, 28, 28))


class Upsampling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)
        self.up = nn.ConvTranspose2d(1, 1, 2, stride=2)

    def forward(self, x):
        return F.interpolate(self.up(self.conv(x)), scale_factor=2)


def test_transposed_conv_and_upsampling_are_exact_and_irregular():
    m = Upsampling()
    rf = fl.receptive_field(m, (1, 8, 8), "up")
    assert rf.size == rf.stride == rf.padding == (None, None) and not rf.regular
    with pytest.raises(fl.ReceptiveFieldError, match="irregular on axis 0, 1"):
        rf.interval((0, 0))
    assert_matches_empirical(m, (1, 8, 8), "up")


class Unpooling(nn.Module):
    """Max unpooling puts each value where the pooling indices (the data) say."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)

    def forward(self, x):
        values, indices = self.pool(self.conv(x))
        return self.unpool(values, indices)


def test_ops_whose_field_depends_on_the_data_say_so():
    with pytest.raises(fl.UnsupportedOpError, match="MaxUnpool2d module 'unpool'.*pooling indices"):
        fl.receptive_fields(Unpooling(), (1, 8, 8))


class UnknownOp(nn.Module):
    def forward(self, x):
        return torch.fft.fft2(x).real


def test_unknown_op_is_named():
    with pytest.raises(fl.UnsupportedOpError, match="fft2"):
        fl.receptive_fields(UnknownOp(), (1, 8, 8))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return self.conv(-x)


def test_untraceable_model_names_the_line_and_the_fallback():
    with pytest.raises(fl.TraceError, match=r"if x.sum\(\) > 0.*empirical_receptive_field"):
        fl.receptive_fields(Untraceable(), (1, 8, 8))
    emp = fl.empirical_receptive_field(Untraceable(), (1, 8, 8), "conv", (2, 3))
    assert emp.region == (slice(2, 5), slice(3, 6))


def test_reused_module_is_not_addressable():
    relu = nn.ReLU()
    m = nn.Sequential(nn.Conv2d(1, 1, 3), relu, nn.Conv2d(1, 1, 3), relu)
    assert "1" not in fl.layer_names(m)
    with pytest.raises(fl.LayerError, match="called 2 times"):
        fl.receptive_field(m, (1, 9, 9), "1")


def test_model_left_unchanged_also_after_errors(small_cnn):
    from conftest import assert_unchanged, snapshot

    small_cnn.train()
    small_cnn.features[0].weight.requires_grad_(False)
    before = snapshot(small_cnn)
    fl.receptive_fields(small_cnn, (1, 28, 28))
    fl.empirical_receptive_field(small_cnn, (1, 28, 28), "features.3", (3, 3))
    with pytest.raises(ValueError):
        fl.receptive_fields(small_cnn, (3, 28, 28))
    with pytest.raises(fl.LayerError):
        fl.empirical_receptive_field(small_cnn, (1, 28, 28), "nope", (0, 0))
    assert_unchanged(small_cnn, before)


# --- errors: what "no field here" is, and what is the caller's mistake -------------------------


class WithIndices(nn.Module):
    """A layer that returns a tuple (pooled values, indices) and one that ignores the input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.const = nn.Identity()
        self.out = nn.Identity()
        self.register_buffer("bias", torch.ones(1, 2, 1, 1))

    def forward(self, x):
        values, _ = self.pool(self.conv(x))
        return self.out(values + self.const(self.bias))


def test_layers_without_a_field_raise_a_receptive_field_error():
    m = WithIndices()
    with pytest.raises(fl.ReceptiveFieldError, match=r"layer 'pool' outputs a tuple of tensors"):
        fl.receptive_field(m, (1, 9, 9), "pool")
    with pytest.raises(fl.ReceptiveFieldError, match="'const' .* does not depend on the input"):
        fl.receptive_field(m, (1, 9, 9), "const")
    assert list(fl.receptive_fields(m, (1, 9, 9))) == ["conv", "out"]
    assert (fl.receptive_field(m, (1, 9, 9), "out").size) == (4, 4)
    assert_matches_empirical(m, (1, 9, 9), "out")


def test_input_shape_errors_are_usage_errors(small_cnn):
    with pytest.raises(fl.UsageError, match=r"not \(C, \*spatial\)"):
        fl.receptive_fields(small_cnn, (1, 1, 1, 28, 28))
    with pytest.raises(fl.UsageError, match=r"rejects inputs of shape \(N, 3, 28, 28\)") as info:
        fl.receptive_fields(small_cnn, (3, 28, 28))
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error, chained


class StrideMismatchNamed(StrideMismatch):
    """The unaligned merge as a layer of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.merged = nn.Identity()

    def forward(self, x):
        return self.merged(super().forward(x))


def test_try_receptive_field_decides_no_field_here(small_cnn):
    """``(field, "")``, or ``(None, "TypeName: message")`` for the engine's own errors and input
    shapes it or the model cannot take; an unknown layer is the caller's mistake."""
    rf, why = try_receptive_field(small_cnn, (1, 28, 28), "features.3")
    assert why == "" and rf == fl.receptive_field(small_cnn, (1, 28, 28), "features.3")
    cases = [
        (Unpooling(), (1, 8, 8), "unpool", "UnsupportedOpError: MaxUnpool2d module 'unpool'"),
        (StrideMismatchNamed(), (1, 9, 9), "merged", "NotAlignedError: "),
        (Untraceable(), (1, 8, 8), "conv", "TraceError: cannot trace Untraceable"),
        (WithIndices(), (1, 9, 9), "pool", "ReceptiveFieldError: layer 'pool' outputs a tuple"),
        (small_cnn, (3, 28, 28), "features.3", "UsageError: the model rejects inputs"),
        (nn.Sequential(nn.Linear(4, 2)), (4,), "0", "UsageError: input_shape (4,) is not"),
    ]
    for model, shape, layer, reason in cases:
        rf, why = try_receptive_field(model, shape, layer)
        assert rf is None and why.startswith(reason), (why, reason)
    with pytest.raises(fl.LayerError):
        try_receptive_field(small_cnn, (1, 28, 28), "nope")


def test_lenient_table_warns_at_the_callers_line():
    m = nn.Sequential(nn.Conv2d(1, 1, 3), nn.Unfold(2), nn.Conv1d(4, 1, 1))
    with pytest.warns(UserWarning, match=r"receptive fields stop at Unfold module '1'") as w:
        fields = fl.receptive_fields(m, (1, 8, 8), strict=False)
    assert list(fields) == ["0"] and w[0].filename == __file__
