"""Projections: exact crops, batching, truncation, dimensionality, errors, hand references.

Exactness tests run in float64 on *dyadic* weights and inputs (small multiples of 1/8):
every sum is then exact whatever order BLAS adds in, so ``torch.equal`` tests the crop's
geometry alone. (With random float64 weights MKL's dgemm adds the last few outputs of a
matrix in a different order, so a crop and the full image can differ by one ulp at the far
corner; that is rounding, not geometry, and is covered by a tolerance test below.)
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_unchanged, snapshot
from featurelens import LayerError, Unit, project, project_units, receptive_field
from featurelens.projection import CropWarning, _Crop
from featurelens.rules import METHODS, ActivationError


def dyadic_(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-4, 5, p.shape, dtype=torch.float64) / 8)
    return model.double().eval()


def dyadic_input(*shape: int) -> torch.Tensor:
    return torch.randint(-8, 9, shape, dtype=torch.float64) / 4


class Awkward2d(nn.Module):
    """Stride-2 non-square convs, padded ceil-mode pooling, dilation, a residual merge."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, (3, 5), stride=(2, 1), padding=(1, 2))
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.conv2 = nn.Conv2d(4, 6, 3, dilation=2, padding=2)
        self.branch = nn.Conv2d(4, 6, 1)
        # kernel 2: divisors 4, 2, 1 keep dyadic values dyadic
        self.pool2 = nn.AvgPool2d(2, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.conv3 = nn.Conv2d(6, 5, 3, stride=(1, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = F.relu(self.conv2(x) + self.branch(x))
        x = self.pool2(x).clamp(min=0)
        return self.head(torch.relu(self.conv3(x)))


class Net1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 4, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(3, stride=2, padding=1),
            nn.Conv1d(4, 6, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(6, 3, 3, stride=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class Net3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d(2, ceil_mode=True),
            nn.Conv3d(3, 4, (3, 1, 3), stride=(1, 2, 1), padding=(1, 0, 1)),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


CASES = {  # name: (model factory, input shape without batch, layers to sweep)
    "2d": (Awkward2d, (2, 37, 29), ["pool1", "conv2", "pool2", "conv3"]),
    "1d": (Net1d, (1, 61), ["features.2", "features.4", "features.5"]),
    "3d": (Net3d, (1, 9, 11, 13), ["features.2", "features.4"]),
}


def every_unit(model: nn.Module, shape: tuple[int, ...], layer: str, n: int) -> tuple:
    """Units at every border location (three deep on each side) and a grid of interior ones."""
    rf = receptive_field(model, shape, layer)
    axes = [
        sorted({u for u in range(size) if u < 3 or u >= size - 3 or u % 4 == 0})
        for size in rf.output_shape
    ]
    grid = torch.cartesian_prod(*[torch.tensor(a) for a in axes]).reshape(-1, len(axes))
    units, rows = [], []
    for i, loc in enumerate(grid.tolist()):
        units.append(Unit(layer, i % 3, tuple(loc)))
        rows.append(i % n)
    return units, rows, rf


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", list(METHODS))
def test_crop_equals_full_input_bit_for_bit(case: str, method: str) -> None:
    factory, shape, layers = CASES[case]
    model = dyadic_(factory())
    x = dyadic_input(2, *shape)
    for layer in layers:
        units, rows, rf = every_unit(model, shape, layer, 2)
        assert not rf.is_global
        cropped = project_units(model, x, units, method, rows=rows)
        full = project_units(model, x, units, method, rows=rows, crop=False)
        assert torch.equal(cropped, full), f"{case} {layer}"
        assert cropped.abs().sum() > 0
        # outside the receptive field the map is exactly zero
        for m, u in zip(cropped, units):
            inside = torch.zeros(shape[1:], dtype=torch.bool)
            inside[rf.region(u.location)] = True
            assert not m[:, ~inside].any()


def test_crops_are_smaller_than_the_input() -> None:
    # Guards the test above: it must really compare crops with the full input.
    model = dyadic_(Awkward2d())
    rf = receptive_field(model, (2, 37, 29), "conv2")
    plan = _Crop.for_field(rf)
    assert all(c < n for c, n in zip(plan.size, (37, 29)))
    units, _, _ = every_unit(model, (2, 37, 29), "conv2", 1)
    sizes = {plan.window(u.location)[1] for u in units}
    assert len(sizes) == 4  # interior and far-border crop sizes on both axes are exercised


def test_a_misaligned_crop_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: starting crops one pixel off the stride grid changes the maps."""
    model = dyadic_(Awkward2d())
    x = dyadic_input(1, 2, 37, 29)
    units, rows, _ = every_unit(model, (2, 37, 29), "conv2", 1)
    full = project_units(model, x, units, "guided", rows=rows, crop=False)
    window = _Crop.window

    def off_grid(self, location):
        start, size = window(self, location)
        moved = tuple(a + 1 if a + s < n else a for a, s, n in zip(start, size, self.input_shape))
        return moved, size

    monkeypatch.setattr(_Crop, "window", off_grid)
    with pytest.warns(CropWarning, match="does not hold"):  # the safety net catches some units
        shifted = project_units(model, x, units, "guided", rows=rows)
    assert not torch.equal(shifted, full)  # the others: a crop that holds the field is not enough


def test_crop_matches_full_to_rounding_with_random_float64_weights() -> None:
    model = Awkward2d().double().eval()
    x = torch.randn(2, 2, 37, 29, dtype=torch.float64)
    units, rows, _ = every_unit(model, (2, 37, 29), "conv3", 2)
    cropped = project_units(model, x, units, "guided", rows=rows)
    full = project_units(model, x, units, "guided", rows=rows, crop=False)
    torch.testing.assert_close(cropped, full, rtol=1e-12, atol=1e-14)


def test_batched_equals_one_by_one() -> None:
    model = dyadic_(Awkward2d())
    x = dyadic_input(3, 2, 37, 29)
    units = [Unit("conv2", 1, (0, 0)), Unit("conv2", 5), Unit("conv3", 2, (3, 1)), Unit("pool1", 0)]
    rows = [2, 0, 1, 2]
    for method in METHODS:
        batched = project_units(model, x, units, method, rows=rows, chunk_size=3)
        for m, u, r in zip(batched, units, rows):
            single = project(model, x[r : r + 1], u.layer, u.channel, u.location, method)
            assert torch.equal(m, single[0])


def test_batched_equals_one_by_one_float32() -> None:
    model = Awkward2d().eval()
    x = torch.randn(4, 2, 37, 29)
    channels = torch.tensor([0, 3, 5, 1])
    batched = project(model, x, "conv2", channels, method="guided")
    for i in range(4):
        single = project(model, x[i : i + 1], "conv2", int(channels[i]), method="guided")
        torch.testing.assert_close(batched[i], single[0], rtol=1e-6, atol=1e-7)


def test_location_none_is_the_first_argmax() -> None:
    model = Awkward2d().double().eval()
    x = torch.randn(3, 2, 37, 29, dtype=torch.float64)
    acts = model.conv2(model.pool1(model.relu1(model.conv1(x)))).detach()
    channels = torch.tensor([4, 0, 2])
    locations = []
    for i, k in enumerate(channels.tolist()):
        fmap = acts[i, k]
        best = fmap.max()
        locations.append(next(divmod(j, fmap.shape[1]) for j, v in
                              enumerate(fmap.flatten().tolist()) if v == best))  # fmt: skip
    ours = project(model, x, "conv2", channels, None, "gradient")
    explicit = project(model, x, "conv2", channels, torch.tensor(locations), "gradient")
    assert torch.equal(ours, explicit)


def test_argmax_ties_take_the_first_location_in_row_major_order() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()).double().eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(1.0)  # a constant map: every location ties
    x = torch.randn(1, 1, 8, 6, dtype=torch.float64)
    assert torch.equal(project(model, x, "0", 1), project(model, x, "0", 1, (0, 0)))


def test_gradient_equals_autograd_on_the_full_model() -> None:
    model = Awkward2d().double().eval()
    x = torch.randn(2, 2, 37, 29, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    y = model.conv3(model.pool2(F.relu(model.conv2(model.pool1(model.relu1(model.conv1(xr)))) +
                                       model.branch(model.pool1(model.relu1(model.conv1(xr)))))))  # fmt: skip
    (ref,) = torch.autograd.grad(y[0, 3, 3, 2] + y[1, 1, 0, 0], xr)
    ours = project(model, x, "conv3", torch.tensor([3, 1]), torch.tensor([[3, 2], [0, 0]]))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)


def test_project_units_equals_project_across_layers_and_rows() -> None:
    model = Awkward2d().double().eval()
    x = torch.randn(2, 2, 37, 29, dtype=torch.float64)
    units = [Unit("conv3", 4), Unit("pool1", 1, (2, 3)), Unit("conv3", 0, (1, 1))]
    rows = torch.tensor([1, 0, 1])
    many = project_units(model, x, units, "deconvnet", rows=rows)
    for m, u, r in zip(many, units, rows.tolist()):
        one = project(model, x[r : r + 1], u.layer, u.channel, u.location, "deconvnet")
        torch.testing.assert_close(m, one[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", list(METHODS))
def test_the_forward_stops_at_the_layer(method: str) -> None:
    calls = []

    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if isinstance(x, torch.fx.Proxy):  # symbolic tracing (receptive fields) is fine
                return x
            calls.append(1)
            raise AssertionError("ran past the layer")

    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), Boom(), nn.GELU())
    x = torch.randn(2, 1, 13, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the crop is used: no CropWarning
        out = project(model.eval(), x, "2", 2, method=method)
    assert not calls  # and the GELU after the layer is never refused either
    xr = x.clone().requires_grad_(True)
    y = model[:3](xr)
    loc = (
        divmod_nd(int(y[0, 2].argmax()), y.shape[2:]),
        divmod_nd(int(y[1, 2].argmax()), y.shape[2:]),
    )
    (ref,) = torch.autograd.grad(y[0, 2][loc[0]] + y[1, 2][loc[1]], xr)
    if method == "gradient":
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    else:  # one rectifier before a max pool: guided == gradient, deconvnet differs only in sign
        assert out.abs().sum() > 0


def test_inputs_and_model_are_left_alone() -> None:
    model = Awkward2d().train()
    model.conv1.weight.requires_grad_(False)
    x = torch.randn(2, 2, 37, 29, requires_grad=True)
    keep = x.detach().clone()
    before = snapshot(model)
    with torch.no_grad():  # a caller in no_grad still gets projections
        out = project(model, x, "conv2", 1, method="guided")
    assert out.abs().sum() > 0 and not out.requires_grad
    assert x.requires_grad and x.grad is None and torch.equal(x.detach(), keep)
    assert_unchanged(model, before)


def test_1d_and_3d_match_autograd() -> None:
    for factory, shape, layer in (
        (Net1d, (1, 61), "features.4"),
        (Net3d, (1, 9, 11, 13), "features.4"),
    ):
        model = factory().double().eval()
        x = torch.randn(2, *shape, dtype=torch.float64)
        ours = project(model, x, layer, torch.tensor([2, 1]))
        xr = x.clone().requires_grad_(True)
        y = model.features[: int(layer.split(".")[1]) + 1](xr)
        loc = [divmod_nd(int(y[i, c].argmax()), y.shape[2:]) for i, c in enumerate((2, 1))]
        (ref,) = torch.autograd.grad(y[0, 2][loc[0]] + y[1, 1][loc[1]], xr)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)


def divmod_nd(flat: int, shape: torch.Size) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        flat, r = divmod(flat, size)
        out.append(r)
    return tuple(reversed(out))


def test_global_fields_use_the_whole_input_without_warning() -> None:
    model = Awkward2d().double().eval()
    x = torch.randn(2, 2, 37, 29, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = project(model, x, "head.2", torch.tensor([0, 2]), ())
    xr = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(model(xr)[[0, 1], [0, 2]].sum(), xr)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-15)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace this
            x = torch.relu(self.conv1(x))
        return self.conv2(x)


class Normalised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.norm(self.conv1(x))))


@pytest.mark.parametrize("factory", [Untraceable, Normalised])
def test_crop_falls_back_to_the_whole_input_with_a_warning(factory) -> None:
    model = factory().double().eval()
    x = torch.randn(2, 1, 17, 15, dtype=torch.float64)
    with pytest.warns(CropWarning, match="'conv2'"):
        out = project(model, x, "conv2", 3, (1, 2), "guided")
    assert torch.equal(out, project(model, x, "conv2", 3, (1, 2), "guided", crop=False))
    if factory is Normalised:  # GroupNorm: the unit depends on the whole input
        assert out[:, :, 10:, :].abs().sum() > 0


def test_reused_relu_on_interleaved_branches_and_functional_rectifiers() -> None:
    model = Interleaved().double().eval()
    x = torch.randn(3, 3, 14, 12, dtype=torch.float64)
    for method in METHODS:
        ours = project(model, x, "out", torch.tensor([0, 3, 1]), None, method)
        y = model(x)
        loc = [divmod_nd(int(y[i, c].argmax()), y.shape[2:]) for i, c in enumerate((0, 3, 1))]
        ref = reference_interleaved(model, x, [(0, *loc[0]), (3, *loc[1]), (1, *loc[2])], method)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)


class Interleaved(nn.Module):
    """One nn.ReLU reused on branches a, b, a, b, plus every functional rectifier form."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.b1 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 3, padding=1)
        self.a2, self.b2 = nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.out = nn.Conv2d(6, 4, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.a1(x))
        b = self.relu(self.b1(x))
        a = self.relu(self.a2(a))
        b = self.relu(self.b2(b))
        h = F.relu(self.c(a + b))
        h = torch.relu(h - 0.1)
        h = (h - 0.2).relu_()
        return self.out(h.clamp(min=0) - F.threshold(h - 0.3, 0.0, 0.0))


def _rect(h: torch.Tensor, method: str) -> torch.Tensor:
    """Reference rectifier: autograd for the mask, a tensor hook for the rectified signal."""
    if method == "gradient":
        return torch.relu(h)
    out = torch.relu(h)
    if method == "deconvnet":
        out = out.detach() + (h - h.detach())  # forward relu(h), backward the identity
    out.register_hook(lambda g: g.clamp(min=0))
    return out


def reference_interleaved(model: Interleaved, x: torch.Tensor, units: list, method: str):
    """A plain re-implementation of Interleaved.forward with reference rectifiers."""
    xr = x.clone().requires_grad_(True)
    conv = lambda m, t: F.conv2d(t, m.weight, m.bias, m.stride, m.padding)  # noqa: E731
    a = _rect(conv(model.a1, xr), method)
    b = _rect(conv(model.b1, xr), method)
    a = _rect(conv(model.a2, a), method)
    b = _rect(conv(model.b2, b), method)
    h = _rect(conv(model.c, a + b), method)
    h = _rect(h - 0.1, method)
    h = _rect(h - 0.2, method)
    y = conv(model.out, _rect(h, method) - _rect(h - 0.3, method))
    target = sum(y[i, c, u, v] for i, (c, u, v) in enumerate(units))
    (grad,) = torch.autograd.grad(target, xr)
    return grad


def test_errors_name_the_bad_value_and_the_valid_range() -> None:
    model = Awkward2d().eval()
    x = torch.randn(2, 2, 37, 29)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"channel 6 of example 0 .* 6 channels, valid 0\.\.5"):
        project(model, x, "conv2", 6)
    with pytest.raises(ValueError, match=r"channel -1 of example 1"):
        project(model, x, "conv2", torch.tensor([0, -1]))
    with pytest.raises(
        ValueError, match=r"location \(1, 2, 3\) .* 3 coordinate.*\(10, 15\), so a location has 2"
    ):
        project(model, x, "conv2", 0, (1, 2, 3))
    with pytest.raises(ValueError, match=r"location \(10, 0\) .* axis 0: valid 0\.\.9"):
        project(model, x, "conv2", 0, (10, 0))
    with pytest.raises(ValueError, match=r"unknown method 'guided-backprop'.*'guided'"):
        project(model, x, "conv2", 0, method="guided-backprop")
    with pytest.raises(LayerError, match=r"'conv9'.*'conv2'"):
        project(model, x, "conv9", 0)
    with pytest.raises(ValueError, match=r"rejects inputs of shape \(2, 3, 37, 29\)"):
        project(model, torch.randn(2, 3, 37, 29), "conv2", 0)
    with pytest.raises(ValueError, match=r"not \(N, C, \*spatial\)"):
        project(model, torch.randn(37, 29), "conv2", 0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        project(model, x, "conv2", torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"rows\[1\] = 5 is out of range: valid 0\.\.1"):
        project_units(model, x, [Unit("conv2", 0), Unit("conv2", 1)], rows=[0, 5])
    with pytest.raises(ActivationError, match="GELU"):
        project(nn.Sequential(nn.Conv2d(2, 2, 3), nn.GELU()), x, "1", 0, method="guided")
    assert_unchanged(model, before)


def test_device_argument_and_results_on_the_inputs_device() -> None:
    model = Net1d().eval()
    x = torch.randn(2, 1, 61)
    out = project(model, x, "features.4", 1, device="cpu")
    assert out.device == x.device and torch.equal(out, project(model, x, "features.4", 1))


@pytest.fixture(scope="module")
def integer_resnet18() -> nn.Module:
    """torchvision resnet18 with sparse integer weights and identity batch norms (float64).

    Integer weights keep every value an integer (inputs: multiples of 1/4), so sums are exact
    in any order and ``torch.equal`` checks the geometry of a real residual architecture:
    7x7 stride-2 stem, padded 3x3 stride-2 max pool, stride-2 blocks with 1x1 downsampling.
    """
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                w = torch.randint(-1, 2, m.weight.shape, dtype=torch.float64)
                m.weight.copy_(w * (torch.rand(m.weight.shape) < 0.2))
            elif isinstance(m, nn.BatchNorm2d):
                m.eps = 0.0  # (x - 0) / sqrt(1 + 0) * 1 + 0 == x exactly
    return model


@pytest.mark.parametrize("method", list(METHODS))
def test_crop_equals_full_input_bit_for_bit_on_resnet18(
    integer_resnet18: nn.Module, method: str
) -> None:
    model, shape = integer_resnet18, (3, 64, 48)
    x = dyadic_input(2, *shape)
    for layer in ["maxpool", "layer1.1", "layer2.0", "layer2.1.conv1"]:
        units, rows, rf = every_unit(model, shape, layer, 2)
        step = max(1, len(units) // 24)
        units, rows = units[::step], rows[::step]
        assert not rf.is_global
        cropped = project_units(model, x, units, method, rows=rows)
        full = project_units(model, x, units, method, rows=rows, crop=False)
        assert torch.equal(cropped, full), layer
        assert cropped.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_on_the_gpu_inputs_and_results_on_the_cpu() -> None:
    model = Awkward2d().double().eval()
    x = torch.randn(3, 2, 37, 29, dtype=torch.float64)
    cpu = project(model, x, "conv3", torch.tensor([0, 1, 4]), method="guided")
    before = snapshot(model)
    gpu_model = model.cuda()
    out = project(gpu_model, x, "conv3", torch.tensor([0, 1, 4]), method="guided")
    assert out.device == x.device
    torch.testing.assert_close(out, cpu, rtol=1e-10, atol=1e-12)
    assert_unchanged(gpu_model.cpu(), before)


def test_batch_statistics_in_eval_mode_do_not_mix_units() -> None:
    # BatchNorm without running statistics normalises over the batch even in eval mode: each
    # unit then goes alone (and uncropped), so results equal one-example calls.
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
        nn.Conv2d(3, 2, 3),
    ).double()  # fmt: skip
    x = torch.randn(3, 1, 12, 10, dtype=torch.float64)
    with pytest.warns(CropWarning, match="batch statistics"):
        out = project(model, x, "3", 1, (2, 2), "guided")
    for i in range(3):
        with pytest.warns(CropWarning):
            one = project(model, x[i : i + 1], "3", 1, (2, 2), "guided")
        torch.testing.assert_close(out[i], one[0], rtol=1e-12, atol=1e-14)
