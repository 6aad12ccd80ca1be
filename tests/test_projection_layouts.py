"""Projections of layers whose channels are not at dim 1 (channels-last maps, tokens) or whose
rank is not the input's (a signal unsqueezed to 2-D maps): each map equals plain autograd of
the unit read with the true channel axis; a layout nobody can establish is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import featurelens as fl
from conftest import assert_unchanged, snapshot
from featurelens.errors import LayoutError, UsageError
from test_rf_layouts import ConvNeXtBlock, Heads, TinyViT, Unsqueezed


def layer_output(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The layer's output on ``x`` through a plain forward hook (the whole forward runs)."""
    seen = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, y: seen.append(y))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


def reference(model, x, layer, channel_dim, channels, locations) -> torch.Tensor:
    """Plain autograd, one example at a time: d y[i, channel at channel_dim, location] / d x,
    the location being the first arg-max (row-major) of the channel's map when None."""
    maps = []
    for i, (c, loc) in enumerate(zip(channels, locations)):
        xi = x[i : i + 1].clone().requires_grad_(True)
        y = layer_output(model, xi, layer).movedim(channel_dim, 1)[0, c]  # (*locations)
        if loc is None:
            flat = int(y.detach().flatten().argmax())
            loc = tuple(int(v) for v in torch.unravel_index(torch.tensor(flat), y.shape))
        (g,) = torch.autograd.grad(y[tuple(loc)], xi)
        maps.append(g[0])
    return torch.stack(maps)


@pytest.mark.parametrize("crop", [True, False])
@pytest.mark.parametrize("given", ["located", "argmax"])
def test_channels_last_layer(crop, given):
    torch.manual_seed(0)
    m = ConvNeXtBlock().eval()
    before = snapshot(m)
    x = torch.rand(3, 4, 7, 9)
    channels = [0, 5, 7]
    locations = [(0, 0), (3, 4), (6, 8)] if given == "located" else [None] * 3
    got = fl.project(m, x, "mlp", torch.tensor(channels),
                     None if given == "argmax" else torch.tensor(locations), crop=crop)  # fmt: skip
    want = reference(m, x, "mlp", 3, channels, locations)
    torch.testing.assert_close(got, want)
    assert got.abs().sum() > 0
    # the stated dim, either way of counting, gives the same maps
    torch.testing.assert_close(fl.project(m, x, "mlp", torch.tensor(channels),
                                          None if given == "argmax" else
                                          torch.tensor(locations), crop=crop, channel_dim=-1),
                               got)  # fmt: skip
    assert_unchanged(m, before)


def test_channels_last_units_crop_like_the_whole_input():
    """A crop of a channels-last layer is exact (compared with crop=False, bit for bit in
    float64), and a unit whose channel index exceeds the spatial size is no longer misread."""
    torch.manual_seed(1)
    m = ConvNeXtBlock().double().eval()
    x = torch.rand(2, 4, 7, 9, dtype=torch.float64)
    units = [fl.Unit("mlp", 7, (2, 3)), fl.Unit("act", 6, (5, 1)), fl.Unit("out", 3, (1, 8))]
    cropped = fl.project_units(m, x, units, rows=[0, 1, 1])
    whole = fl.project_units(m, x, units, rows=[0, 1, 1], crop=False)
    assert torch.equal(cropped, whole)
    for k, (u, row, dim) in enumerate(zip(units, [0, 1, 1], [3, 3, 1])):
        want = reference(m, x[row : row + 1], u.layer, dim, [u.channel], [u.location])
        torch.testing.assert_close(cropped[k : k + 1], want)


@pytest.mark.parametrize("layer", ["tokens", "mixed"])
def test_token_layers(layer):
    torch.manual_seed(2)
    m = TinyViT("sdpa").eval()
    x = torch.rand(3, 3, 16, 12)
    channels = [1, 4, 7]
    for locations in ([(0,), (5,), (12,)], [None] * 3):
        got = fl.project(m, x, layer, torch.tensor(channels),
                         None if locations[0] is None else torch.tensor(locations))  # fmt: skip
        torch.testing.assert_close(got, reference(m, x, layer, 2, channels, locations))
    if layer == "tokens":  # before attention, patch token 1 + 3*2 + 1 sees its 4x4 patch only
        got = fl.project(m, x, layer, 3, (8,))
        assert got[:, :, 8:12, 4:8].abs().sum() > 0
        outside = got.clone()
        outside[:, :, 8:12, 4:8] = 0
        assert outside.abs().sum() == 0


def test_a_signal_into_2d_maps():
    """(N, 1, L) unsqueezed to (N, 1, L, 1): locations (u, 0) in the layer's own rank."""
    torch.manual_seed(3)
    m = Unsqueezed().eval()
    x = torch.rand(4, 1, 37)
    channels = [0, 1, 2, 1]
    for layer, locations in [("c2", [(0, 0), (2, 0), (4, 0), (1, 0)]), ("c1", [None] * 4),
                             ("c2", [None] * 4)]:  # fmt: skip
        for crop in (True, False):
            got = fl.project(m, x, layer, torch.tensor(channels),
                             None if locations[0] is None else locations, crop=crop)  # fmt: skip
            assert got.shape == x.shape
            want = reference(m, x, layer, 1, channels, locations)
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"location \(2,\) of example 0 has 1 coordinate"):
        fl.project(m, x, "c2", 0, (2,))


def test_stated_channel_dims_are_checked():
    m = ConvNeXtBlock().eval()
    x = torch.rand(1, 4, 7, 9)
    with pytest.raises(UsageError, match=r"channel_dim=1 does not fit layer 'mlp'.*dim 3"):
        fl.project(m, x, "mlp", 0, (0, 0), channel_dim=1)
    with pytest.raises(UsageError, match=r"channel_dim=1 does not fit"):
        fl.project(m, x, "mlp", 0, (0, 0), channel_dim=1, crop=False)
    with pytest.raises(UsageError, match=r"channel_dim=4 is not a dim of a 4-dim output"):
        fl.project(m, x, "mlp", 0, (0, 0), channel_dim=4)
    with pytest.raises(TypeError, match=r"channel_dim must be an integer, got 1.5"):
        fl.project(m, x, "mlp", 0, (0, 0), channel_dim=1.5)
    with pytest.raises(TypeError, match=r"channel_dim of layer 'mlp' must be an integer"):
        fl.project_units(m, x, [fl.Unit("mlp", 0, (0, 0))], channel_dim={"mlp": "last"})
    # a channel of a channels-last layer is checked against its channels, not its rows
    with pytest.raises(ValueError, match=r"channel 8 of example 0 is out of range.*8 channels"):
        fl.project(m, x, "mlp", 8, (0, 0))


def test_a_layout_nobody_can_establish_is_refused_until_stated():
    torch.manual_seed(4)
    m = Heads().eval()
    x = torch.rand(2, 1, 5)
    for crop in (True, False):
        with pytest.raises(LayoutError, match=r"layer 'q' \(output \(N, 2, 5, 2\)\).*channel_dim="):
            fl.project(m, x, "q", 0, (0, 0), crop=crop)
    got = fl.project(m, x, "q", torch.tensor([1, 0]), torch.tensor([(1, 3), (0, 4)]),
                     channel_dim=-1, crop=False)  # fmt: skip
    torch.testing.assert_close(got, reference(m, x, "q", 3, [1, 0], [(1, 3), (0, 4)]))
    # with crop on: no field to crop by (its locations are not mapped), the whole input
    cropped = fl.project(m, x, "q", torch.tensor([1, 0]), torch.tensor([(1, 3), (0, 4)]),
                         channel_dim=-1)  # fmt: skip
    torch.testing.assert_close(cropped, got)
    # per layer: a mapping; layers not in it take the trace's layout
    units = [fl.Unit("q", 1, (1, 3)), fl.Unit("embed", 2, (4,))]
    maps = fl.project_units(m, x, units, channel_dim={"q": 3}, crop=False)
    torch.testing.assert_close(maps[:1], got[:1])
    torch.testing.assert_close(maps[1:], reference(m, x[1:], "embed", 1, [2], [(4,)]))


class _ValueDependent(nn.Module):
    """The path depends on the input's values: the trace cannot reach ``conv``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if float(x.sum()) > -1e9 else self.conv(-x)


def test_an_unreached_layer_says_its_channel_dim_is_assumed():
    # Without a trace the channel dim is an assumption (dim 1, as before layouts): the warning
    # says so and how to state it; once stated, the warning no longer speaks of it.
    model = _ValueDependent().double().eval()
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    with pytest.warns(fl.CropWarning, match=r"channels are read at dim 1 .*channel_dim="):
        maps = fl.project(model, x, "conv", 1, (2, 3))
    with pytest.warns(fl.CropWarning) as stated:
        again = fl.project(model, x, "conv", 1, (2, 3), channel_dim=1)
    assert not any("channels are read" in str(w.message) for w in stated)
    assert torch.equal(maps, again)
    assert torch.equal(maps, reference(model, x, "conv", 1, [1, 1], [(2, 3), (2, 3)]))
