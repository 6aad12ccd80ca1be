"""Effective receptive fields against independent references.

* plain autograd, one example and one unit at a time, on the full input (no crops, no batching);
* on a linear stack of convolutions with uniform positive weights, the analytic profile: per
  axis the box kernels of the layers convolved (a discrete Gaussian-like curve), computed here
  in numpy by pushing a delta back through each layer;
* a brute-force search for the smallest centred box holding a share of the mass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SmallCNN, assert_unchanged, snapshot
from featurelens import LayerError, receptive_field
from featurelens.effective_field import LEVELS, effective_receptive_field
from featurelens.errors import ChannelError, DataError, UsageError


def _autograd_erf(model: nn.Module, x: torch.Tensor, upto: nn.Module, units, loc) -> np.ndarray:
    """sum_c |d y / d x_c| averaged over ``units`` ((example, channel)), normalised: by hand."""
    total = torch.zeros(x.shape[2:], dtype=torch.float64)
    for e, c in units:
        xe = x[e : e + 1].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(upto(xe)[(0, c, *loc)], xe)
        total += g[0].abs().sum(0).double()
    return (total / total.sum()).numpy()


@pytest.mark.parametrize("random_inputs", [False, True])
def test_erf_equals_plain_autograd_one_unit_at_a_time(random_inputs: bool) -> None:
    model = SmallCNN().double().eval()
    model(torch.zeros(1, 1, 28, 28, dtype=torch.float64))
    data = torch.rand(10, 1, 28, 28, dtype=torch.float64)
    erf = effective_receptive_field(
        model, data, "features.3", examples=7, random_inputs=random_inputs, seed=3
    )
    assert erf.location == (6, 6)  # the 14 x 14 map's unit whose field is centred nearest 13.5
    assert len(erf.units) == 7 and erf.random_inputs is random_inputs
    if random_inputs:  # the same noise: the first draw of a generator seeded with the seed
        g = torch.Generator().manual_seed(3)
        x = torch.randn((7, 1, 28, 28), generator=g, dtype=torch.float64)
    else:
        x = data
    ref = _autograd_erf(model, x, model.features[:4], erf.units, erf.location)
    np.testing.assert_allclose(erf.map, ref, rtol=0, atol=1e-12)
    assert erf.map.sum() == pytest.approx(1.0)


def test_erf_explicit_channels_off_centre_location() -> None:
    model = SmallCNN().double().eval()
    model(torch.zeros(1, 1, 28, 28, dtype=torch.float64))
    data = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    erf = effective_receptive_field(
        model, data, "features.3", examples=None, channels=[0, 5, 11], location=(2, 9)
    )
    assert sorted(erf.units) == [(e, c) for e in range(6) for c in (0, 5, 11)]
    ref = _autograd_erf(model, data, model.features[:4], erf.units, (2, 9))
    np.testing.assert_allclose(erf.map, ref, rtol=0, atol=1e-12)
    # the 100 % box never leaves the theoretical field, and the map is zero outside it
    rf = receptive_field(model, (1, 28, 28), "features.3")
    region = rf.region((2, 9))
    outside = erf.map.copy()
    outside[region] = 0
    assert not outside.any()
    assert all(e <= t for e, t in zip(erf.extent(1.0), erf.theoretical_size))


def _profile(layers: list[tuple[int, int]], length: int, centre_out: int) -> np.ndarray:
    """The input gradient of one output unit of a stack of all-ones 1-D kernels (k, stride).

    Backward through each layer by hand: output position i reads inputs i*s .. i*s + k - 1.
    """
    lengths = [length]
    for k, s in layers:
        lengths.append((lengths[-1] - k) // s + 1)
    g = np.zeros(lengths[-1])
    g[centre_out] = 1.0
    for (k, s), n_in in zip(reversed(layers), reversed(lengths[:-1])):
        up = np.zeros(n_in)
        for i, v in enumerate(g):
            up[i * s : i * s + k] += v
        g = up
    return g


def _box_by_brute_force(marginal: np.ndarray, centre: float, share: float) -> int:
    """The smallest width of a box centred on ``centre`` holding ``share``: try every width."""
    total = marginal.sum()
    for w in range(1, 2 * len(marginal) + 3):
        if (w % 2 == 1) != (round(2 * centre) % 2 == 0):
            continue
        lo, hi = centre - (w - 1) / 2, centre + (w - 1) / 2
        idx = np.arange(len(marginal))
        inside = marginal[(idx >= lo) & (idx <= hi)].sum()
        if inside >= share * total * (1 - 1e-12) and (share < 1 or inside == total):
            return int(min(hi, len(marginal) - 1) - max(lo, 0) + 1)
    raise AssertionError("no box holds it")


@pytest.mark.parametrize("random_inputs", [False, True])
@pytest.mark.parametrize(
    "ndim, kernels, strides, shape",
    [
        (2, [(3, 5), (3, 3), (5, 3)], [(1, 1), (2, 2), (1, 2)], (41, 46)),
        (1, [(3,), (4,), (3,)], [(1,), (2,), (1,)], (50,)),
    ],
)
def test_linear_conv_stack_equals_the_analytic_profile(
    ndim: int, kernels: list, strides: list, shape: tuple, random_inputs: bool
) -> None:
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[ndim]
    chans = [2, 3, 2, 4]
    layers = []
    for i, (k, s) in enumerate(zip(kernels, strides)):
        layer = conv(chans[i], chans[i + 1], k, stride=s, bias=False)
        nn.init.constant_(layer.weight, 0.25)  # uniform positive: the gradient is the profile
        layers.append(layer)
    model = nn.Sequential(*layers).double().eval()
    data = torch.randn(5, 2, *shape, dtype=torch.float64)
    erf = effective_receptive_field(model, data, "2", examples=4, random_inputs=random_inputs)
    grid = model(data[:1]).shape[2:]
    profiles = [
        _profile([(k[a], s[a]) for k, s in zip(kernels, strides)], shape[a], erf.location[a])
        for a in range(ndim)
    ]
    expected = profiles[0]
    for p in profiles[1:]:
        expected = np.multiply.outer(expected, p)
    expected = expected / expected.sum()
    np.testing.assert_allclose(erf.map, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(erf.map, expected, rtol=1e-12, atol=1e-15)
    # the location whose field is centred nearest the input's centre
    rf = receptive_field(model, tuple(data.shape[1:]), "2")
    for a in range(ndim):
        centres = np.arange(grid[a]) * rf.stride[a] - rf.padding[a] + (rf.size[a] - 1) / 2
        assert erf.location[a] == int(np.argmin(np.abs(centres - (shape[a] - 1) / 2)))
    # extents: a brute-force search on the analytic profiles; 100 % is the theoretical field
    for share in LEVELS:
        widths = erf.extent(share)
        for a in range(ndim):
            assert widths[a] == _box_by_brute_force(profiles[a], erf.centre[a], share), (
                share,
                a,
            )
    assert erf.extent(1.0) == erf.theoretical_size == tuple(rf.size)
    assert erf.extent(0.5) < erf.extent(0.9) <= erf.extent(0.95) <= erf.extent(1.0)


def test_demo_cnn_effective_field_is_smaller_than_the_theoretical() -> None:
    from featurelens.demo import mnist_cnn

    model = mnist_cnn()
    data = torch.rand(32, 1, 28, 28)
    erf = effective_receptive_field(model, data, "features.conv3", examples=32)
    theo = erf.theoretical_size
    assert theo == (20, 20)
    assert all(e <= t for e, t in zip(erf.extent(1.0), theo))
    assert all(e < t for e, t in zip(erf.extent(0.5), theo))
    assert "theoretical=20x20" in repr(erf) and "50%" in erf.table()


def test_box_of_another_unit_moves_by_the_stride() -> None:
    model = SmallCNN().eval()
    model(torch.zeros(1, 1, 28, 28))
    erf = effective_receptive_field(model, torch.rand(8, 1, 28, 28), "features.3", examples=8)
    here = erf.box(0.9)
    there = erf.box(0.9, (erf.location[0] + 2, erf.location[1] - 1))
    stride = erf.field.stride
    assert there == (
        (here[0][0] + 2 * stride[0], here[0][1] + 2 * stride[0]),
        (here[1][0] - stride[1], here[1][1] - stride[1]),
    )


class _Dead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        nn.init.constant_(self.conv.bias, -1e6)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


@pytest.mark.parametrize(
    "make, kwargs, error, match",
    [
        (lambda: torch.zeros(0, 1, 28, 28), {}, DataError, "no example"),
        (lambda: torch.rand(4, 1, 28, 28), {"layer": "head.1"}, UsageError, "no spatial axis"),
        (lambda: torch.rand(4, 1, 28, 28), {"layer": "features.9"}, LayerError, "features.3"),
        (lambda: torch.rand(4, 1, 28, 28), {"channels": [0, 16]}, ChannelError, "16 channels"),
        (lambda: torch.rand(4, 1, 28, 28), {"examples": 0}, UsageError, "examples=0"),
        (lambda: torch.rand(4, 1, 28, 28), {"location": (14, 0)}, ValueError, "14"),
    ],
)
def test_bad_input_is_refused_and_leaves_the_model_as_given(make, kwargs, error, match) -> None:
    model = SmallCNN()
    model(torch.zeros(1, 1, 28, 28))
    model.train()
    before = snapshot(model)
    call = {"layer": "features.3", **kwargs}
    with pytest.raises(error, match=match):
        effective_receptive_field(model, make(), call.pop("layer"), **call)
    assert_unchanged(model, before)


def test_dead_units_are_refused_not_normalised_into_nan() -> None:
    with pytest.raises(UsageError, match="every input gradient"):
        effective_receptive_field(_Dead(), torch.rand(3, 1, 9, 9), "relu")


def test_bad_share_is_refused() -> None:
    model = SmallCNN().eval()
    model(torch.zeros(1, 1, 28, 28))
    erf = effective_receptive_field(model, torch.rand(3, 1, 28, 28), "features.0", examples=3)
    for share in (0, 1.5, "half", True):
        with pytest.raises(UsageError, match="share"):
            erf.extent(share)
