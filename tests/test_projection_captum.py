"""Projections against Captum's neuron methods (an independent implementation).

Captum runs the whole model on the whole image with module backward hooks on ``nn.ReLU``;
featurelens truncates at the layer, crops to the receptive field and overrides the rectifier
function. Where Captum is right (every rectifier an ``nn.ReLU`` module) the two must agree.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import NeuronDeconvolution, NeuronGradient, NeuronGuidedBackprop
from torch import nn

from featurelens import get_layer, project
from test_projection import _rect

CAPTUM = {
    "gradient": NeuronGradient,
    "deconvnet": NeuronDeconvolution,
    "guided": NeuronGuidedBackprop,
}


def captum_maps(model, x, layer, channels, method):
    """Captum with a per-example selector at each example's arg-max (found with a hook)."""
    module = get_layer(model, layer)
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.setdefault("y", o.detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    y = seen["y"]
    index = []
    for i, k in enumerate(channels.tolist()):
        fmap = y[i, k]
        flat = int(fmap.flatten().argmax())
        index.append((i, k, *divmod(flat, fmap.shape[1])))
    rows, chans, us, vs = (torch.tensor(t) for t in zip(*index))

    def selector(out: torch.Tensor) -> torch.Tensor:
        return out[rows, chans, us, vs]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns about its hooks
        return CAPTUM[method](model, module).attribute(x, selector)


@pytest.fixture(scope="module")
def vgg16() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vgg16(weights=None).eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def assert_matches(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ref.abs().sum() > 0
    scale = ref.abs().max()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6 * float(scale))


@pytest.mark.parametrize("method", list(CAPTUM))
@pytest.mark.parametrize("layer", ["features.8", "features.15"])
def test_vgg16_equals_captum(vgg16: nn.Module, layer: str, method: str) -> None:
    x = torch.randn(3, 3, 64, 64)
    channels = torch.tensor([5, 77, 120])
    assert_matches(project(vgg16, x, layer, channels, method=method),
                   captum_maps(vgg16, x, layer, channels, method))  # fmt: skip


@pytest.mark.parametrize("method", list(CAPTUM))
@pytest.mark.parametrize("layer", ["layer1.0.conv2", "layer2.1"])
def test_resnet18_equals_captum(resnet18: nn.Module, layer: str, method: str) -> None:
    x = torch.randn(2, 3, 64, 64)
    channels = torch.tensor([3, 60])
    assert_matches(project(resnet18, x, layer, channels, method=method),
                   captum_maps(resnet18, x, layer, channels, method))  # fmt: skip


class Functional(nn.Module):
    """Rectifiers written as functions: module hooks (Captum) never see them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = self.conv2(h).clamp(min=0)
        return self.conv3(h)


@pytest.mark.parametrize("method", ["deconvnet", "guided"])
def test_functional_rectifiers_where_captum_falls_back_to_the_gradient(method: str) -> None:
    model = Functional().double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    channels = torch.tensor([1, 2])
    ours = project(model, x, "conv3", channels, method=method)
    xr = x.clone().requires_grad_(True)
    h = _rect(model.conv1(xr), method)
    y = model.conv3(_rect(model.conv2(h), method))
    index = [(i, k, *divmod(int(y[i, k].flatten().argmax()), y.shape[3]))
             for i, k in enumerate(channels.tolist())]  # fmt: skip
    (ref,) = torch.autograd.grad(sum(y[t] for t in index), xr)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
    captum = captum_maps(model, x, "conv3", channels, method)
    plain = captum_maps(model, x, "conv3", channels, "gradient")
    assert torch.allclose(captum, plain)  # Captum silently returns the plain gradient
    assert not torch.allclose(captum, ref)
