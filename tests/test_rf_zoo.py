"""Analytic receptive fields equal the empirical verifier on the torchvision zoo
(weights=None), at several layers, for central and corner locations."""

from __future__ import annotations

import pytest
import torch
import torchvision

import featurelens as fl
from featurelens.graph import capture, preserved

ZOO = [
    "alexnet",
    "vgg16",
    "resnet18",
    "resnet50",
    "densenet121",
    "inception_v3",
    "mobilenet_v2",
    "efficientnet_b0",
    "convnext_tiny",
]


def build(name: str) -> torch.nn.Module:
    kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
    return getattr(torchvision.models, name)(weights=None, **kwargs).eval()


def channels_first_layers(model, shape, names):
    """Layers whose output is (N, C, *spatial): the verifier's default layout."""
    keep = []
    with preserved(model), torch.no_grad(), capture(model, names) as run:
        outs = run(torch.zeros(1, *shape))
    for name in names:
        rf = fl.receptive_field(model, shape, name)
        if outs[name].dim() == 2 or tuple(outs[name].shape[2:]) == rf.output_shape:
            keep.append(name)
    return keep


def locations(rf: fl.ReceptiveField):
    n = rf.output_shape
    return {tuple(0 for _ in n), tuple(v // 2 for v in n), tuple(v - 1 for v in n)}


def check(name: str, size: int, picks: int) -> int:
    model = build(name)
    shape = (3, size, size)
    names = fl.layer_names(model)
    candidates = [names[i * len(names) // (picks + 1)] for i in range(1, picks + 1)]
    chosen = []
    for layer in [*candidates, names[-1]]:  # the last one is the classifier: global
        try:
            fl.receptive_field(model, shape, layer)
            chosen.append(layer)
        except fl.UnsupportedOpError:
            pass  # after adaptive pooling that does not divide at this input size
    checked = 0
    for layer in channels_first_layers(model, shape, chosen):
        rf = fl.receptive_field(model, shape, layer)
        for loc in locations(rf):
            emp = fl.empirical_receptive_field(model, shape, layer, loc)
            assert rf.region(loc) == emp.region, (name, layer, loc, rf)
            for (first, last), sl in zip(rf.interval(loc), emp.region):
                assert first <= sl.start and sl.stop - 1 <= last, (name, layer, loc, rf)
            checked += 1
    return checked


@pytest.mark.parametrize("name", ZOO)
def test_zoo_small_inputs(name):
    size = {"inception_v3": 107, "alexnet": 224, "vgg16": 128}.get(name, 96)
    assert check(name, size, picks=2) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_full_size(name):
    size = 299 if name == "inception_v3" else 224
    assert check(name, size, picks=4) >= 8


def test_zoo_classifiers_are_global():
    model = build("resnet18")
    rf = fl.receptive_field(model, (3, 224, 224), "fc")
    assert rf.is_global and rf.output_shape == ()  # logits (N, 1000): one location ()
    assert fl.receptive_field(model, (3, 224, 224), "layer4").is_global is False
