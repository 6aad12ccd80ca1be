"""Shared fixtures: seeded tiny nets and the offline torchvision zoo (weights=None)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="session")
def _featurelens_home(tmp_path_factory: pytest.TempPathFactory):
    """Every test session has its own featurelens home (the per-user secret and the signatures
    of the atlases "this user" made, featurelens.trust), never the real user's; processes the
    tests start inherit it."""
    before = os.environ.get("FEATURELENS_HOME")
    os.environ["FEATURELENS_HOME"] = str(tmp_path_factory.mktemp("featurelens-home"))
    yield
    if before is None:
        os.environ.pop("FEATURELENS_HOME", None)
    else:
        os.environ["FEATURELENS_HOME"] = before


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def snapshot(model: nn.Module) -> dict:
    """Everything about a model that featurelens must leave as it was given."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {
            n: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for n, m in model.named_modules()
        },
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    for kind in ("params", "buffers"):
        assert after[kind].keys() == before[kind].keys()
        for name, value in before[kind].items():
            assert torch.equal(after[kind][name], value), f"{kind[:-1]} {name} changed"


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module: makes channels-last layers (``(0, 2, 3, 1)``)."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims or (0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class SmallCNN(nn.Module):
    """A Zeiler-Fergus-style net: (conv, ReLU, max-pool) x 2, then a classifier."""

    def __init__(self, in_channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.fixture
def small_cnn() -> nn.Module:
    model = SmallCNN()
    model(torch.zeros(1, 1, 28, 28))  # materialise the lazy layer
    return model.eval()
