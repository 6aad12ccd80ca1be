"""Projections on awkward models and inputs: degenerate geometry, inference mode, errors that
must surface unchanged, NaN maps, channels-last layers, and loosely typed arguments."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_unchanged, snapshot
from featurelens import Unit, project, project_units, receptive_field
from featurelens.projection import CropWarning, _Crop
from test_projection import Awkward2d, dyadic_, dyadic_input, every_unit

# --------------------------------------------------------------------------------------------
# Degenerate geometry


def stride_zero_net() -> nn.Module:
    """A row pooled to one position, then repeated: axis 0 of conv "2" has stride 0."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d((1, 8)), nn.AdaptiveAvgPool2d((8, 8)), nn.Conv2d(1, 1, 3)
    ).double()


def test_a_stride_zero_field_is_projected_exactly() -> None:
    model = stride_zero_net()
    assert receptive_field(model, (1, 8, 8), "2").stride[0] == 0  # guards the case
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with pytest.warns(CropWarning, match="adaptive_avg_pool2d"):  # fixed-size pooling
        out = project(model, x, "2", 0, (3, 2))
    full = project(model, x, "2", 0, (3, 2), crop=False)
    assert torch.equal(out, full) and out.abs().sum() > 0


def test_a_stride_zero_axis_is_cropped_whole() -> None:
    rf = receptive_field(stride_zero_net(), (1, 8, 8), "2")
    plan = _Crop.for_field(rf)
    assert plan.size[0] == 8  # the stride-0 axis: the whole axis
    for loc in np.ndindex(*rf.output_shape):
        start, size = plan.window(loc)
        assert (start[0], size[0]) == (0, 8)
        assert plan.holds(loc, (start, size))
        assert plan.local(loc, start)[0] == loc[0]


def test_every_crop_window_holds_the_field() -> None:
    model = dyadic_(Awkward2d())
    for layer in ["pool1", "conv2", "pool2", "conv3"]:
        rf = receptive_field(model, (2, 37, 29), layer)
        plan = _Crop.for_field(rf)
        for loc in np.ndindex(*rf.output_shape):
            window = plan.window(loc)
            assert plan.holds(loc, window)
            for sl, a, s in zip(rf.region(loc), *window):
                assert a <= sl.start and sl.stop <= a + s


def test_a_crop_that_misses_the_field_falls_back_to_the_whole_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Safety net: a crop window one pixel short at its far end is caught, not trusted."""
    model = dyadic_(Awkward2d())
    x = dyadic_input(2, 2, 37, 29)
    units, rows, _ = every_unit(model, (2, 37, 29), "conv2", 2)
    full = project_units(model, x, units, "guided", rows=rows, crop=False)
    window = _Crop.window

    def short(self, location):
        start, size = window(self, location)
        return start, tuple(max(s - 1, 1) for s in size)

    monkeypatch.setattr(_Crop, "window", short)
    with pytest.warns(CropWarning, match="does not hold"):
        cropped = project_units(model, x, units, "guided", rows=rows)
    assert torch.equal(cropped, full)


class StripGate(nn.Module):
    """Strip pooling / coordinate attention: a per-row gate broadcast over the columns."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((None, 1))
        self.c = nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.c(y * torch.sigmoid(self.pool(y)))


def test_a_gate_broadcast_over_one_axis_crops_exactly() -> None:
    model = StripGate().double().eval()
    shape = (1, 15, 11)
    x = torch.randn(2, *shape, dtype=torch.float64)
    units, rows, rf = every_unit(model, shape, "c", 2)
    units = [Unit(u.layer, u.channel % 2, u.location) for u in units]
    assert rf.size[1] >= shape[2]  # every unit sees its whole row
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the crop is used
        cropped = project_units(model, x, units, "gradient", rows=rows)
    full = project_units(model, x, units, "gradient", rows=rows, crop=False)
    # sigmoid values are not dyadic: BLAS blocking may differ by an ulp (see test_projection)
    torch.testing.assert_close(cropped, full, rtol=1e-12, atol=1e-14)
    assert cropped[:, :, :, -1].abs().sum() > 0  # the gate reaches the last column


def test_adaptive_pooling_to_a_fixed_size_turns_the_crop_off() -> None:
    # On a crop, AdaptiveAvgPool2d((4, 4)) would still output 4x4: another geometry.
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d((4, 4)), nn.Conv2d(2, 2, 1))
    model = model.double().eval()
    x = torch.randn(2, 1, 10, 10, dtype=torch.float64)
    with pytest.warns(CropWarning, match=r"adaptive_avg_pool2d to \(4, 4\)"):
        out = project(model, x, "2", 1, (1, 2))
    assert torch.equal(out, project(model, x, "2", 1, (1, 2), crop=False))


# --------------------------------------------------------------------------------------------
# Inference mode


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2)).eval()


@pytest.mark.parametrize("location", [None, (1, 2)])
def test_works_inside_inference_mode(location: tuple[int, int] | None) -> None:
    model = small_net()
    x = torch.randn(2, 1, 13, 11)
    ref = project(model, x, "2", 1, location, "guided")
    before = snapshot(model)
    with torch.inference_mode():
        out = project(model, x, "2", 1, location, "guided")
    assert torch.equal(out, ref)
    with torch.inference_mode():
        xi = x.clone()  # an inference tensor
    assert xi.is_inference()
    assert torch.equal(project(model, xi, "2", 1, location, "guided"), ref)
    with torch.inference_mode():
        both = project(model, xi, "2", 1, location, "guided", crop=False)
    assert torch.equal(both, ref)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------------------------
# Errors that are not about shapes surface unchanged


def test_a_dtype_mismatch_is_reported_as_it_is() -> None:
    model = small_net()  # float32
    x = torch.randn(2, 1, 13, 11, dtype=torch.float64)
    try:
        model(x)
    except RuntimeError as exc:
        expected = str(exc)
    with pytest.raises(RuntimeError) as info:
        project(model, x, "2", 1)
    assert str(info.value) == expected and "rejects inputs" not in expected


class OutOfMemoryOnCrops(nn.Module):
    """Identity that runs out of memory on anything smaller than the full 13x11 input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return x
        if tuple(x.shape[2:]) != (13, 11):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x


def test_out_of_memory_on_a_crop_is_not_retried_on_the_whole_input() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), OutOfMemoryOnCrops(), nn.Conv2d(3, 2, 3))
    model.eval()
    x = torch.randn(2, 1, 13, 11)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CropWarning: nothing is retried
        with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
            project(model, x, "2", 1, (3, 3))
    assert_unchanged(model, before)


def test_a_shape_error_on_crops_still_falls_back() -> None:
    class WantsWidth11(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if isinstance(x, torch.fx.Proxy):
                return x
            return x + torch.zeros(11)  # the size of tensor a must match the size of tensor b

    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), WantsWidth11(), nn.Conv2d(3, 2, 3))
    model = model.double().eval()
    x = torch.randn(2, 1, 13, 11, dtype=torch.float64)
    with pytest.warns(CropWarning, match="rejects receptive-field crops"):
        out = project(model, x, "2", 1, (3, 3))
    assert torch.equal(out, project(model, x, "2", 1, (3, 3), crop=False))


# --------------------------------------------------------------------------------------------
# NaN


def test_the_argmax_ignores_nan_like_the_scan() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3)).double().eval()
    x = torch.randn(1, 1, 9, 8, dtype=torch.float64)
    x[0, 0, 0, 0] = math.nan  # output (0, 0) is NaN
    fmap = model(x)[0, 1].detach()
    assert torch.isnan(fmap[0, 0])
    finite = torch.nan_to_num(fmap, nan=-math.inf)
    best = divmod(int(finite.flatten().argmax()), fmap.shape[1])
    assert best != (0, 0)
    out = project(model, x, "0", 1)
    assert torch.equal(out, project(model, x, "0", 1, best))
    assert not torch.isnan(out).any() and out.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# Channels-last layers


class ChannelsLast(nn.Module):
    """A ConvNeXt-style block: depthwise conv, then LayerNorm and an MLP on (N, H, W, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 6)
        self.back = nn.Linear(6, 4)
        self.out = nn.Conv2d(4, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.norm(self.dw(x).permute(0, 2, 3, 1)))  # (N, H, W, 6)
        y = self.back(torch.relu(y)).permute(0, 3, 1, 2)  # (N, 4, H, W)
        return self.out(x + y)


def test_a_channels_last_layer_is_refused_with_a_clear_message() -> None:
    model = ChannelsLast().eval()
    x = torch.randn(2, 4, 12, 10)
    with pytest.raises(ValueError, match=r"'fc' outputs its channels at dim 3 \(channels-last"):
        project(model, x, "fc", 1)
    before = snapshot(model)
    with pytest.raises(ValueError, match="channels-last"):
        project_units(model, x, [Unit("fc", 5, (1, 1)), Unit("fc", 0, (2, 3))])
    assert_unchanged(model, before)


def test_layer_norm_over_channels_last_still_crops() -> None:
    # The receptive-field trace knows the LayerNorm runs over channels only (ConvNeXt): the
    # crop stays on, with no warning, and equals the whole-input result.
    model = ChannelsLast().double().eval()
    x = torch.randn(2, 4, 12, 10, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CropWarning)
        out = project(model, x, "out", 2, (4, 5), "guided")
    torch.testing.assert_close(
        out, project(model, x, "out", 2, (4, 5), "guided", crop=False), rtol=1e-12, atol=1e-15
    )
    assert out[:, :, :, :].abs().sum() > 0


def test_layer_norm_over_positions_turns_the_crop_off() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LayerNorm([10, 8]), nn.Conv2d(2, 2, 3))
    model = model.double().eval()
    x = torch.randn(2, 1, 12, 10, dtype=torch.float64)
    with pytest.warns(CropWarning, match="LayerNorm module '1'"):
        out = project(model, x, "2", 1, (3, 3), "gradient")
    assert torch.equal(out, project(model, x, "2", 1, (3, 3), "gradient", crop=False))


# --------------------------------------------------------------------------------------------
# Loosely typed arguments


@pytest.fixture(scope="module")
def net_and_x() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    return small_net().double(), torch.randn(2, 1, 13, 11, dtype=torch.float64)


def test_numpy_and_nested_list_locations_work(net_and_x) -> None:
    model, x = net_and_x
    ref = project(model, x, "2", 1, torch.tensor([[1, 2], [4, 0]]))
    assert torch.equal(project(model, x, "2", 1, np.array([[1, 2], [4, 0]])), ref)
    assert torch.equal(project(model, x, "2", 1, [[1, 2], [4, 0]]), ref)
    assert torch.equal(project(model, x, "2", 1, [(1, 2), np.array([4, 0])]), ref)
    one = project(model, x, "2", 1, (1, 2))
    assert torch.equal(project(model, x, "2", 1, np.array([1, 2])), one)
    assert torch.equal(project(model, x, "2", np.int64(1), (np.int64(1), np.int32(2))), one)
    assert torch.equal(project(model, x, "2", np.array([1, 1]), (1, 2)), one)


def test_numpy_integer_location_on_a_1d_layer() -> None:
    model = nn.Sequential(nn.Conv1d(1, 2, 3)).double().eval()
    x = torch.randn(2, 1, 10, dtype=torch.float64)
    ref = project(model, x, "0", 1, (4,))
    assert torch.equal(project(model, x, "0", 1, np.int64(4)), ref)
    assert torch.equal(project(model, x, "0", 1, 4), ref)
    assert torch.equal(project(model, x, "0", 1, torch.tensor(4)), ref)


def test_bad_locations_and_channels_name_the_value(net_and_x) -> None:
    model, x = net_and_x
    with pytest.raises(TypeError, match=r"location \(1\.5, 2\).*1\.5"):
        project(model, x, "2", 1, (1.5, 2))
    with pytest.raises(ValueError, match=r"location.* 3 rows for 2 examples"):
        project(model, x, "2", 1, [[1, 2], [4, 0], [0, 0]])
    with pytest.raises(TypeError, match=r"location.*float64"):
        project(model, x, "2", 1, np.array([[1.0, 2.0], [4.0, 0.0]]))
    with pytest.raises(TypeError, match=r"location \(True, 2\).*True"):
        project(model, x, "2", 1, [True, 2])
    with pytest.raises(TypeError, match=r"channel.*1\.7"):
        project(model, x, "2", 1.7)
    with pytest.raises(TypeError, match=r"channel.*float32"):
        project(model, x, "2", torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"channel.*bool"):
        project(model, x, "2", torch.tensor([True, False]))
    with pytest.raises(TypeError, match=r"rows.*0\.5"):
        project_units(model, x, [Unit("2", 0)], rows=[0.5])


@pytest.mark.parametrize("channel", [1, np.int64(1), np.int32(1), torch.tensor(1)])
def test_unit_accepts_integer_channels(channel) -> None:
    unit = Unit("features.3", channel, (np.int64(2), torch.tensor(3)))
    assert unit == Unit("features.3", 1, (2, 3))
    assert type(unit.channel) is int and all(type(v) is int for v in unit.location)


@pytest.mark.parametrize(
    "channel", [1.7, 1.0, True, np.float64(2.0), torch.tensor(1.0), torch.tensor([1]), "1"]
)
def test_unit_refuses_non_integer_channels(channel) -> None:
    with pytest.raises(TypeError, match=r"Unit\.channel must be an integer, got "):
        Unit("features.3", channel)


def test_unit_refuses_non_integer_locations() -> None:
    with pytest.raises(TypeError, match=r"Unit\.location.*\(1\.5, 2\).*1\.5"):
        Unit("features.3", 1, (1.5, 2))
    with pytest.raises(TypeError, match=r"Unit\.location.*False"):
        Unit("features.3", 1, (False, 2))
    assert Unit("a", 0, np.int64(3)).location == (3,)
    assert Unit("a", 0, np.array([3, 4])).location == (3, 4)
    assert Unit("a", 0, torch.tensor([3, 4])).location == (3, 4)
