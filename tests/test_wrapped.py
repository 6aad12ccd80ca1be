"""Wrapped models (``torch.compile``, ``nn.DataParallel``, ``DistributedDataParallel``) are
unwrapped: layers have the inner model's names and every result equals the plain model's,
computed independently on the plain model."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

import featurelens as fl
from conftest import assert_unchanged, snapshot
from featurelens.graph import get_layer, unwrap


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3),
        nn.ReLU(),
    ).eval()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group on this machine (DistributedDataParallel needs one)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        yield
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


WRAPPERS = {
    "compile": lambda m: torch.compile(m),
    "data_parallel": nn.DataParallel,
    "ddp": nn.parallel.DistributedDataParallel,
    "nested": lambda m: nn.DataParallel(torch.compile(m)),
}


@pytest.fixture(params=sorted(WRAPPERS))
def wrapped(request):
    """``(plain, wrapper)``: the same model object inside the wrapper."""
    if request.param == "ddp":
        request.getfixturevalue("process_group")
    plain = small_net()
    return plain, WRAPPERS[request.param](plain)


def test_unwrap_returns_the_inner_model(wrapped):
    plain, model = wrapped
    assert model is not plain and unwrap(model) is plain
    assert unwrap(plain) is plain


def test_names_are_the_inner_models(wrapped):
    plain, model = wrapped
    assert fl.layer_names(model) == fl.layer_names(plain) == ["0", "1", "2", "3", "4"]
    assert fl.layer_names(model, (3, 12, 12)) == fl.layer_names(plain)
    assert get_layer(model, "3") is plain[3]
    wrapped_name = next(n for n, _ in model.named_modules() if n.endswith(".3"))
    with pytest.raises(fl.LayerError, match=r"through the .* wrapper.*inner names: '3'"):
        get_layer(model, wrapped_name)


def test_receptive_fields_equal_the_plain_models(wrapped):
    plain, model = wrapped
    shape = (3, 12, 10)
    assert fl.receptive_fields(model, shape) == fl.receptive_fields(plain, shape)
    for loc in [(0, 0), (1, 2), (3, 2)]:
        emp = fl.empirical_receptive_field(model, shape, "3", loc)
        assert emp.region == fl.empirical_receptive_field(plain, shape, "3", loc).region
        assert emp.region == fl.receptive_field(model, shape, "3").region(loc)


def test_projections_equal_plain_autograd(wrapped):
    plain, model = wrapped
    before = snapshot(model)
    torch.manual_seed(1)
    x = torch.rand(3, 3, 12, 10)
    channels = [0, 2, 4]
    maps = fl.project(model, x, "3", torch.tensor(channels), crop=False)
    x_ref = x.clone().requires_grad_(True)
    y = plain[:4](x_ref)
    locations = [divmod(int(y[i, c].flatten().argmax()), y.shape[-1]) for i, c in
                 enumerate(channels)]  # fmt: skip
    target = sum(y[i, c, h, w] for i, (c, (h, w)) in enumerate(zip(channels, locations)))
    (grad,) = torch.autograd.grad(target, x_ref)
    torch.testing.assert_close(maps, grad)
    cropped = fl.project(model, x, "3", torch.tensor(channels))
    torch.testing.assert_close(cropped, fl.project(plain, x, "3", torch.tensor(channels)))
    assert_unchanged(model, before)


def test_scans_equal_the_plain_models(wrapped):
    plain, model = wrapped
    torch.manual_seed(2)
    images = torch.rand(6, 3, 12, 10)
    got = fl.scan(model, images, ["1", "3"], top_k=2, progress=False)
    ref = fl.scan(plain, images, ["1", "3"], top_k=2, progress=False)
    for layer in ("1", "3"):
        a, b = got.layer(layer), ref.layer(layer)
        assert (a.indices == b.indices).all() and (a.locations == b.locations).all()
        assert (a.scores == b.scores).all()
    # brute force: the top score of each channel of "3" over the plain model's maps
    with torch.no_grad():
        maps = plain[:4](images).double().amax((2, 3))
    torch.testing.assert_close(torch.from_numpy(got.layer("3").scores[:, 0]), maps.max(0).values)


class Holder(nn.Module):
    """A wrapper of a kind featurelens does not know: a model like any other."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner

    def forward(self, x):
        return self.module(x)


def test_an_unknown_wrapper_is_a_model_like_any_other():
    plain = small_net()
    model = Holder(plain)
    assert unwrap(model) is model
    assert fl.layer_names(model)[:2] == ["module.0", "module.1"]
    with pytest.raises(fl.LayerError, match=r"unknown layer '3'.*'module\.3'"):
        get_layer(model, "3")
