"""Layer addressing and truncated forward passes, checked against plain module hooks and the
model's own forward."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import featurelens as fl
from conftest import assert_unchanged, snapshot
from featurelens.graph import capture, preserved, resolve_layers


def hook_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Independent reference: the order in which modules finish, from forward hooks."""
    order: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, a, out, name=name: order.append(name))
        for name, m in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    counts = {n: order.count(n) for n in order}
    return [n for n in order if counts[n] == 1]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "squeezenet1_0"])
def test_layer_names_follow_execution_order(name):
    model = getattr(torchvision.models, name)(weights=None).eval()
    assert fl.layer_names(model) == hook_order(model, torch.zeros(1, 3, 64, 64))


def test_layer_names_leave_out_reused_and_unused_modules():
    relu = nn.ReLU()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 2, 3)
            self.relu = relu
            self.b = nn.Conv2d(2, 2, 3)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.relu(self.b(self.relu(self.a(x))))

    assert fl.layer_names(Net()) == ["a", "b"]


def test_get_layer_error_lists_close_matches_first(small_cnn):
    with pytest.raises(fl.LayerError) as info:
        fl.get_layer(small_cnn, "feature.3")
    message = str(info.value)
    assert "unknown layer 'feature.3'" in message
    assert message.index("'features.3'") < message.index("'head.1'")
    with pytest.raises(fl.LayerError, match="layer names are strings"):
        fl.get_layer(small_cnn, 3)


def test_capture_stops_after_the_deepest_layer(small_cnn):
    calls = []
    handle = small_cnn.head.register_forward_pre_hook(lambda m, a: calls.append("head"))
    try:
        with capture(small_cnn, ["features.0", "features.3"]) as run:
            outs = run(torch.randn(2, 1, 28, 28))
    finally:
        handle.remove()
    assert calls == []  # nothing after features.3 ran
    assert set(outs) == {"features.0", "features.3"}
    assert all(not m._forward_hooks for m in small_cnn.modules())


def test_capture_outputs_equal_the_plain_forward(small_cnn):
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = small_cnn.features[:4](x)
        with capture(small_cnn, ["features.3"]) as run:
            got = run(x)["features.3"]
    assert torch.equal(got, expected)


def test_capture_removes_hooks_when_forward_raises(small_cnn):
    before = snapshot(small_cnn)
    with pytest.raises(RuntimeError), capture(small_cnn, ["features.3"]) as run:
        run(torch.randn(1, 3, 28, 28))  # wrong channel count
    assert_unchanged(small_cnn, before)


def test_preserved_restores_modes_and_requires_grad(small_cnn):
    small_cnn.train()
    small_cnn.features[0].eval()
    small_cnn.features[3].weight.requires_grad_(False)
    before = snapshot(small_cnn)
    with pytest.raises(KeyError), preserved(small_cnn):
        assert not small_cnn.training
        assert not any(p.requires_grad for p in small_cnn.parameters())
        raise KeyError("boom")
    assert_unchanged(small_cnn, before)


def test_resolve_layers_validates_every_name(small_cnn):
    assert resolve_layers(small_cnn, "features.3") == ["features.3"]
    with pytest.raises(fl.LayerError, match="'features.9'"):
        resolve_layers(small_cnn, ["features.0", "features.9"])
    with pytest.raises(fl.LayerError, match="no layer given"):
        resolve_layers(small_cnn, [])


def test_preserved_lets_a_custom_train_undo_its_side_effects():
    class FreezesBatchNorm(nn.Module):
        """Like detection backbones: train() keeps its BatchNorm frozen and records it."""

        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(1)
            self.updating = False

        def train(self, mode: bool = True):
            super().train(mode)
            self.updating = mode
            self.bn.eval()
            return self

        def forward(self, x):
            return self.bn(x)

    m = FreezesBatchNorm().train()
    assert m.updating and not m.bn.training
    with preserved(m):
        assert not m.updating
    assert m.updating and m.training and not m.bn.training
