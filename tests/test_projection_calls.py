"""How one projection call runs: receptive fields given by the caller, one capture per layer,
crop fallbacks warned once at the caller's line, and which errors mean a rejected shape."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import featurelens.figures
import featurelens.projection
from conftest import assert_unchanged, snapshot
from featurelens import (
    Unit,
    project,
    project_units,
    receptive_field,
    receptive_fields,
    scan,
)
from featurelens.analysis import ANALYSES
from featurelens.projection import CropWarning
from test_projection import Awkward2d, Normalised, dyadic_, dyadic_input, every_unit


def line_of(marker: str) -> int:
    """The line of this file holding ``marker`` in a comment (where a call under test is)."""
    lines = inspect.getsource(inspect.getmodule(line_of)).splitlines()
    hits = [i + 1 for i, text in enumerate(lines) if text.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, marker
    return hits[0]


@pytest.fixture
def no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail when a projection computes a receptive field itself."""

    def refuse(*args, **kwargs):
        raise AssertionError("the receptive field was computed again")

    monkeypatch.setattr(featurelens.projection, "try_receptive_field", refuse)


# --------------------------------------------------------------------------------------------
# Receptive fields given by the caller


def test_a_given_field_gives_the_same_maps_without_tracing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = dyadic_(Awkward2d())
    x = dyadic_input(2, 2, 37, 29)
    rf = receptive_field(model, (2, 37, 29), "conv2")
    units, rows, _ = every_unit(model, (2, 37, 29), "conv2", 2)
    units, rows = units[::7], rows[::7]
    expected_one = project(model, x, "conv2", torch.tensor([1, 4]), None, "guided")
    expected_many = project_units(model, x, units, "deconvnet", rows=rows)
    uncropped = project_units(model, x, units, "deconvnet", rows=rows, crop=False)
    assert torch.equal(expected_many, uncropped)  # the reference is exact

    calls = []
    real = featurelens.projection.try_receptive_field
    monkeypatch.setattr(
        featurelens.projection,
        "try_receptive_field",
        lambda *a, **k: calls.append(a[2]) or real(*a, **k),
    )
    before = snapshot(model)
    one = project(model, x, "conv2", torch.tensor([1, 4]), None, "guided", field=rf)
    many = project_units(
        model, x, units, "deconvnet", rows=rows, fields=receptive_fields(model, (2, 37, 29))
    )
    assert calls == []  # neither call traced the model for its field
    assert torch.equal(one, expected_one) and torch.equal(many, expected_many)
    assert_unchanged(model, before)
    # Layers missing from `fields` still get theirs computed (once per model structure: the
    # cache of earlier calls is emptied first, as for a model not seen before).
    ANALYSES.clear()
    project_units(model, x, [Unit("pool1", 0, (1, 1)), Unit("conv2", 1, (2, 2))], fields={})
    assert calls == ["pool1", "conv2"]


def test_a_field_for_other_inputs_is_refused() -> None:
    model = Awkward2d().double().eval()
    x = torch.randn(2, 2, 37, 29, dtype=torch.float64)
    other = receptive_field(model, (2, 40, 29), "conv2")
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"'conv2' was computed for inputs of spatial shape \(40, 29\), but these inputs "
        r"are \(37, 29\): pass receptive_field\(model, \(2, 37, 29\), 'conv2'\)",
    ):
        project(model, x, "conv2", 1, field=other)
    with pytest.raises(ValueError, match=r"'conv2' was computed for inputs of spatial shape"):
        project_units(model, x, [Unit("conv2", 1, (0, 0))] * 2, fields={"conv2": other})
    with pytest.raises(ValueError, match="was computed for inputs of spatial shape"):
        project(model, x, "conv2", 1, crop=False, field=other)  # checked even when unused
    assert_unchanged(model, before)


def test_a_field_of_another_layer_with_another_grid_is_refused() -> None:
    model = Awkward2d().double().eval()
    x = torch.randn(2, 2, 37, 29, dtype=torch.float64)
    pool1 = receptive_field(model, (2, 37, 29), "pool1")
    grid = receptive_field(model, (2, 37, 29), "conv3").output_shape
    assert pool1.output_shape != grid
    with pytest.raises(
        ValueError,
        match=rf"given for layer 'conv3' has the output grid \({pool1.output_shape[0]}, "
        rf"{pool1.output_shape[1]}\), but the layer outputs \({grid[0]}, {grid[1]}\) on these "
        r"inputs: is it another layer's\?",
    ):
        project(model, x, "conv3", 1, field=pool1)


def test_fields_of_the_wrong_type_are_refused() -> None:
    model = Awkward2d().double().eval()
    x = torch.randn(2, 2, 37, 29, dtype=torch.float64)
    rf = receptive_field(model, (2, 37, 29), "conv2")
    with pytest.raises(TypeError, match=r"given for layer 'conv2' is a tuple, not a featurelens"):
        project(model, x, "conv2", 1, field=(rf, ""))
    with pytest.raises(TypeError, match="fields must map layer names to ReceptiveField"):
        project_units(model, x, [Unit("conv2", 1)] * 2, fields=[rf])


def test_figures_compute_the_receptive_field_once(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = dyadic_(Awkward2d())
    data = dyadic_input(12, 2, 37, 29)
    atlas = scan(model, data, ["conv2"], top_k=3, progress=False)
    expected = featurelens.figures.zf_figure(model, data, atlas, "conv2", 1, "guided", 3)
    calls = []
    for module in (featurelens.figures, featurelens.projection):
        real = module.try_receptive_field
        monkeypatch.setattr(
            module,
            "try_receptive_field",
            lambda *a, real=real, **k: calls.append(a[2]) or real(*a, **k),
        )
    fig = featurelens.figures.zf_figure(model, data, atlas, "conv2", 1, "guided", 3)
    assert calls == ["conv2"]  # the boxes' field is the crops' field
    assert fig.to_png() == expected.to_png()


def test_project_hits_refuses_a_field_for_other_examples() -> None:
    torch.manual_seed(0)
    model = Awkward2d().eval()
    data = torch.randn(6, 2, 37, 29)
    atlas = scan(model, data, ["conv2"], top_k=2, progress=False)
    wrong = receptive_field(model, (2, 36, 29), "conv2")
    units = [(0, h) for h in atlas.top("conv2", 0)]
    with pytest.raises(ValueError, match=r"spatial shape \(36, 29\), but these inputs are"):
        featurelens.figures.project_hits(model, data, "conv2", units, wrong, "guided")


# --------------------------------------------------------------------------------------------
# One capture per layer


def test_one_capture_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    model = dyadic_(Awkward2d())
    x = dyadic_input(5, 2, 37, 29)
    units = [Unit(layer, c) for layer in ("conv2", "conv3") for c in (0, 3) for _ in range(5)]
    units += [Unit("conv2", 1, (4, 7)), Unit("conv3", 2, (0, 1))]
    rows = [i for _ in range(4) for i in range(5)] + [3, 4]
    expected = project_units(model, x, units, "guided", rows=rows, chunk_size=2)
    entered = []
    real = featurelens.projection.capture

    @contextlib.contextmanager
    def counting(model: nn.Module, layers: list[str], *args, **kwargs) -> Iterator:
        entered.append(tuple(layers))
        with real(model, layers, *args, **kwargs) as run:
            yield run

    monkeypatch.setattr(featurelens.projection, "capture", counting)
    # chunk_size=2: probe, several arg-max forwards and several passes per layer
    out = project_units(model, x, units, "guided", rows=rows, chunk_size=2)
    assert entered == [("conv2",), ("conv3",)]
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------------------------
# Crop fallbacks: collected, warned once per reason, at the caller's line


def test_crop_warnings_point_at_the_callers_line() -> None:
    model = Normalised().double().eval()  # GroupNorm: no crop
    x = torch.randn(3, 1, 17, 15, dtype=torch.float64)
    units = [Unit("conv2", c) for c in range(4) for _ in range(3)]
    rows = list(range(3)) * 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        project(model, x, "conv2", 3, (1, 2), "guided")  # call-project
        project_units(model, x, units, "guided", rows=rows, chunk_size=2)  # call-units
    crops = [w for w in caught if issubclass(w.category, CropWarning)]
    assert [(w.filename, w.lineno) for w in crops] == [
        (__file__, line_of("call-project")),
        (__file__, line_of("call-units")),
    ]  # one warning per call, however many units, chunks and arg-max forwards
    assert all("GroupNorm" in str(w.message) and "'conv2'" in str(w.message) for w in crops)


def test_each_reason_is_warned_once_at_the_callers_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two layers, two reasons: crops that miss their field, and crops the model rejects."""

    class WantsWidth(nn.Module):
        """Fails on crops narrower than the whole input's width at this point."""

        width = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if isinstance(x, torch.fx.Proxy):
                return x
            return x + torch.zeros(self.width, dtype=x.dtype)

    model = dyadic_(Awkward2d())
    x = dyadic_input(2, 2, 37, 29)
    seen = []
    hook = model.pool1.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    model(x)
    hook.remove()
    gate = WantsWidth()
    gate.width = seen[0]
    model.conv2 = nn.Sequential(gate, model.conv2)
    units, rows, pool1 = every_unit(model, (2, 37, 29), "pool1", 2)
    units = units[::5] + [Unit("conv2.1", 1, (2, 2)), Unit("conv2.1", 0, (3, 1))]
    rows = rows[::5] + [0, 1]
    full = project_units(model, x, units, "guided", rows=rows, crop=False)
    window = featurelens.projection._Crop.window

    def short_on_pool1(self, location):
        start, size = window(self, location)
        if self.field is None or self.field.size != pool1.size:  # conv2.1: same grid
            return start, size
        return start, tuple(max(s - 1, 1) for s in size)

    monkeypatch.setattr(featurelens.projection._Crop, "window", short_on_pool1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = project_units(model, x, units, "guided", rows=rows)  # call-two-reasons
    crops = [w for w in caught if issubclass(w.category, CropWarning)]
    assert {(w.filename, w.lineno) for w in crops} == {(__file__, line_of("call-two-reasons"))}
    texts = [str(w.message) for w in crops]
    assert len(texts) == 2, texts  # one per layer and reason, however many units and passes
    assert sum("'pool1'" in t and "does not hold" in t for t in texts) == 1
    assert sum("'conv2.1'" in t and "rejects receptive-field crops" in t for t in texts) == 1
    assert torch.equal(out, full)


# --------------------------------------------------------------------------------------------
# Which errors mean a rejected shape


class FailsOnBatchesOfCrops(nn.Module):
    """Identity that raises ``error`` on more than one crop at once (not on full inputs)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return x
        if x.shape[0] > 1 and tuple(x.shape[2:]) != (13, 11):
            raise self.error
        return x


@pytest.mark.parametrize(
    "error",
    [
        # PyTorch's CPU allocator: a plain RuntimeError
        RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate"),
        # a message full of shape words that is about the batch, not the crop's size
        RuntimeError("shape '[1, 3, 5, 5]' is invalid for input of size 150"),
        NotImplementedError("no kernel for this backend"),
        torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    ],
    ids=["cpu-allocator", "batch-shape", "not-implemented", "accelerator"],
)
def test_errors_on_a_batch_of_crops_propagate_unchanged(error: BaseException) -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), FailsOnBatchesOfCrops(error), nn.Conv2d(3, 2, 3)
    ).eval()
    x = torch.randn(2, 1, 13, 11)
    assert project(model, x[:1], "2", 1, (3, 3)).abs().sum() > 0  # one crop runs
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CropWarning: nothing is retried on whole inputs
        with pytest.raises(type(error)) as info:
            project(model, x, "2", 1, (3, 3))
    assert info.value is error
    assert_unchanged(model, before)


class RejectsAll(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return x + 0  # a node of its own: an addressable layer
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (13x11 and 12x4)")


def test_the_probe_blames_the_shape_only_when_dtype_and_device_fit() -> None:
    model = nn.Sequential(RejectsAll(), nn.Conv2d(1, 3, 3)).eval()  # float32
    x = torch.randn(2, 1, 13, 11)
    with pytest.raises(ValueError, match=r"rejects inputs of shape \(2, 1, 13, 11\): mat1"):
        project(model, x, "0", 0, crop=False)
    # float64 inputs for a float32 model: the dtype may be at fault, the error stays as it is
    with pytest.raises(RuntimeError, match="^mat1 and mat2") as info:
        project(model, x.double(), "0", 0, crop=False)
    assert not isinstance(info.value, ValueError)
