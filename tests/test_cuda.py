"""The GPU path: model on a CUDA device, data on the CPU or the GPU, results on the inputs'.

Every test compares with the same call on the CPU (float64, so that rounding differences of
another device's kernels stay far below the tolerances). Skipped without a CUDA device. The
environment variable ``FEATURELENS_TEST_DEVICE`` (default ``cuda``) runs the same tests on
another device, ``cpu`` included, to check the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_unchanged, snapshot
from featurelens import Unit, project, project_units, scan
from featurelens.demo import mnist_cnn
from featurelens.explorer import Explorer
from featurelens.figures import zf_grid
from test_projection import Awkward2d

DEVICE = torch.device(os.environ.get("FEATURELENS_TEST_DEVICE", "cuda"))

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-10, atol=1e-12)


@pytest.fixture
def model() -> torch.nn.Module:
    return Awkward2d().double().eval()


def test_project_with_inputs_on_the_cpu_and_on_the_device(model: torch.nn.Module) -> None:
    x = torch.randn(3, 2, 37, 29, dtype=torch.float64)
    channels = torch.tensor([0, 1, 4])
    expected = project(model, x, "conv3", channels, method="guided")
    before = snapshot(model)
    on_device = model.to(DEVICE)
    out = project(on_device, x, "conv3", channels, method="guided")
    assert out.device == x.device  # results on the inputs' device
    close(out, expected)
    x_dev = x.to(DEVICE)
    out_dev = project(on_device, x_dev, "conv3", channels, method="guided")
    assert out_dev.device == x_dev.device
    close(out_dev, expected)
    uncropped = project(on_device, x_dev, "conv3", channels, method="guided", crop=False)
    close(uncropped, expected)
    assert_unchanged(on_device.cpu(), before)


def test_shared_crops_and_batched_backward_on_the_device(model: torch.nn.Module) -> None:
    x = torch.randn(2, 2, 37, 29, dtype=torch.float64)
    units = [Unit("conv3", k, (2, 1)) for k in range(5)] + [Unit("pool1", 2, (4, 4))] * 2
    rows = [0] * 5 + [1, 0]
    expected = project_units(model, x, units, "deconvnet", rows=rows)
    out = project_units(model.to(DEVICE), x, units, "deconvnet", rows=rows, chunk_size=3)
    assert out.device == x.device
    close(out, expected)


def test_the_device_argument_names_where_the_model_lives(model: torch.nn.Module) -> None:
    x = torch.randn(1, 2, 37, 29, dtype=torch.float64)
    expected = project(model, x, "conv2", 3, (4, 4), "gradient")
    out = project(model.to(DEVICE), x, "conv2", 3, (4, 4), "gradient", device=DEVICE)
    close(out, expected)


def test_scan_on_the_device_equals_the_cpu_scan(model: torch.nn.Module) -> None:
    data = torch.randn(40, 2, 37, 29, dtype=torch.float64)
    layers = ["conv2", "conv3"]
    expected = scan(model, data, layers, top_k=3, batch_size=16, progress=False)
    before = snapshot(model)
    for given in (data, list(data)):  # a tensor (sliced), a dataset (collated, pinned)
        got = scan(model, given, layers, top_k=3, batch_size=16, device=DEVICE, progress=False)
        for layer in layers:
            a, b = expected.layer(layer), got.layer(layer)
            assert np.array_equal(np.asarray(a.indices), np.asarray(b.indices)), layer
            assert np.array_equal(np.asarray(a.locations), np.asarray(b.locations)), layer
            np.testing.assert_allclose(np.asarray(a.scores), np.asarray(b.scores), rtol=1e-10)
        assert next(model.parameters()).device.type == "cpu"  # moved back
    assert_unchanged(model, before)


def test_zf_grid_on_the_device_equals_the_cpu_grid(model: torch.nn.Module) -> None:
    data = torch.randn(24, 2, 37, 29, dtype=torch.float64)
    atlas = scan(model, data, ["conv3"], top_k=4, progress=False)
    expected = np.asarray(zf_grid(model, data, atlas, "conv3", 2, "guided", k=4))
    got = np.asarray(zf_grid(model.to(DEVICE), data, atlas, "conv3", 2, "guided", k=4))
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # 8-bit rounding


def test_the_explorer_on_the_device_answers_as_on_the_cpu() -> None:
    torch.manual_seed(0)
    model = mnist_cnn().double()
    data = torch.randn(16, 1, 28, 28, dtype=torch.float64)
    atlas = scan(model, data, ["features.relu2"], top_k=3, progress=False)
    cpu = Explorer(atlas, model, data)
    dev = Explorer(atlas, _copy(model), data, device=DEVICE)  # moves its model there
    assert dev.device.type == DEVICE.type
    ref = cpu.input_ref("dataset:5")
    close(dev.activations(ref, "features.relu2"), cpu.activations(ref, "features.relu2"))
    assert dev.unit(ref, "features.relu2", 7) == cpu.unit(ref, "features.relu2", 7)
    for location in (None, (3, 4)):
        a = _png(cpu.projection_png(ref, "features.relu2", 7, location, "guided"))
        b = _png(dev.projection_png(ref, "features.relu2", 7, location, "guided"))
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    clone = mnist_cnn().double()
    clone.load_state_dict(model.state_dict())
    return clone


def _png(raw: bytes) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(raw)))
