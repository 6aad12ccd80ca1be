"""Tracing on the concrete input: shape-dependent Python control flow is followed, value-
dependent control flow is refused (naming the line), the forward stops at the layer, in-place
ops and tensors made inside the model are followed, and layers are listed without torch.fx
where it cannot trace. Fields are checked against the empirical verifier."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import featurelens as fl
from conftest import assert_unchanged, snapshot
from featurelens.graph import capture, resolve_layers
from featurelens.receptive_field import try_receptive_field


def assert_exact(model: nn.Module, shape: tuple[int, ...], layer: str) -> fl.ReceptiveField:
    rf = fl.receptive_field(model, shape, layer)
    for loc in itertools.product(*(range(n) for n in rf.output_shape)):
        emp = fl.empirical_receptive_field(model, shape, layer, loc, channel_dim=rf.channel_dim)
        assert rf.region(loc) == emp.region, (layer, loc, rf)
    return rf


# --- control flow -------------------------------------------------------------------------------


class ShapeBranch(nn.Module):
    """A head that branches on the map's size (timm's VGG head does), and a default argument
    that changes the path (CREPE's ``embed``): torch.fx cannot trace either."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.small = nn.Conv2d(2, 2, 1)
        self.large = nn.Conv2d(2, 2, 3, stride=2)

    def forward(self, x, embed=False):
        x = self.conv(x)
        if embed:
            return x
        return self.small(x) if x.shape[-1] < 8 else self.large(x)


def test_shape_dependent_control_flow_is_followed():
    m = ShapeBranch().eval()
    with pytest.raises(fl.TraceError, match=r"pass input_shape=\(C, \*spatial\)"):
        fl.layer_names(m)
    assert fl.layer_names(m, (1, 7, 7)) == ["conv", "small"]
    assert fl.layer_names(m, (1, 12, 12)) == ["conv", "large"]
    assert list(fl.receptive_fields(m, (1, 12, 12))) == ["conv", "large"]
    assert assert_exact(m, (1, 12, 12), "large").size == (5, 5)
    assert assert_exact(m, (1, 7, 7), "small").size == (3, 3)
    with pytest.raises(fl.LayerError, match=r"'large' is never called.*\(1, 7, 7\)"):
        fl.receptive_field(m, (1, 7, 7), "large")


class ValueBranch(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 2, 3)
        self.after = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "item":
            y = y * 2 if y.max().item() > 1 else y
        elif self.how == "tolist":
            y = y + len([v for v in y.mean((2, 3)).tolist()[0] if v > 0])
        elif self.how == "nonzero":
            y = y + torch.nonzero(y).shape[0]
        return self.after(y)


@pytest.mark.parametrize(
    ("how", "what"),
    [
        ("item", r"Tensor\.item\(\).*y = y \* 2 if y\.max\(\)\.item\(\) > 1 else y"),
        ("tolist", r"Tensor\.tolist\(\).*tolist\(\)\[0\] if v > 0"),
        ("nonzero", r"nonzero\(\).*shape depends on the values"),
    ],
)
def test_value_dependent_control_flow_is_refused_naming_the_line(how, what):
    m = ValueBranch(how).eval()
    with pytest.raises(fl.TraceError, match=f"cannot trace ValueBranch.*{what}") as info:
        fl.receptive_field(m, (1, 8, 8), "after")
    assert "zero input" in str(info.value) and "empirical_receptive_field" in str(info.value)
    assert fl.receptive_field(m, (1, 8, 8), "conv").size == (3, 3)  # before the branch: fine
    rf, why = try_receptive_field(m, (1, 8, 8), "after")
    assert rf is None and why.startswith("TraceError: cannot trace ValueBranch")


class RaisingHead(nn.Module):
    """A head that fails on other input sizes; with ``branch``, value-dependent control flow
    after the features too (torch.fx cannot trace it then)."""

    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.branch = branch
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
        self.head = nn.Linear(2 * 24 * 24, 3)  # for 28x28 inputs

    def forward(self, x):
        x = self.features(x)
        if self.branch and x.abs().sum() > 0:
            x = x * 2
        return self.head(x.flatten(1))


def test_only_the_model_up_to_the_layer_matters():
    m = RaisingHead(branch=False).eval()
    calls = []
    handle = m.head.register_forward_pre_hook(lambda mod, a: calls.append(1))
    try:
        assert assert_exact(m, (1, 11, 9), "features.2").output_shape == (7, 5)
    finally:
        handle.remove()
    assert calls == []  # the forward stopped at the layer
    with pytest.raises(fl.UsageError, match=r"rejects inputs of shape \(N, 1, 11, 9\)"):
        fl.receptive_fields(m, (1, 11, 9))
    # value-dependent control flow and a failing head after the layer do not matter either
    m = RaisingHead(branch=True).eval()
    assert fl.receptive_field(m, (1, 11, 9), "features.2").output_shape == (7, 5)
    with pytest.raises(fl.TraceError, match=r"x\.abs\(\)\.sum\(\) > 0"):
        fl.receptive_fields(m, (1, 28, 28))
    with pytest.warns(UserWarning, match="receptive fields stop at"):
        assert list(fl.receptive_fields(m, (1, 28, 28), strict=False)) == [
            "features.0", "features.1", "features.2", "features"]  # fmt: skip


class ReusedUntraceable(nn.Module):
    """A module called twice in a model torch.fx cannot trace: its output stays ambiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.shape[-1] > 4:
            x = self.act(self.conv(x))
        return self.act(x)


def test_a_reused_module_is_found_without_torch_fx():
    m = ReusedUntraceable().eval()
    with pytest.raises(fl.LayerError, match="'act' is called 2 times"):
        fl.receptive_field(m, (1, 9, 9), "act")
    assert fl.layer_names(m, (1, 9, 9)) == ["conv"]


# --- in-place ops, writes, constants -------------------------------------------------------------


class InPlace(nn.Module):
    """``+=`` of a wider branch, in-place activations, writes into channels of a tensor made
    inside the model, a constant added."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(1, 2, 5, padding=2)
        self.c = nn.Conv2d(1, 2, (1, 3), padding=(0, 1))
        self.summed = nn.Identity()
        self.written = nn.Identity()

    def forward(self, x):
        y = self.a(x)
        y += self.b(x)
        F.relu(y, inplace=True)
        y = self.summed(y)
        out = torch.zeros(x.shape[0], 4, *x.shape[2:])
        out[:, :2] = y
        out[:, 2:] = self.c(x) + torch.ones(1, 2, 1, 1)
        return self.written(out)


def test_in_place_ops_and_writes():
    m = InPlace().eval()
    assert assert_exact(m, (1, 7, 8), "summed").size == (5, 5)
    assert assert_exact(m, (1, 7, 8), "written").size == (5, 5)  # channels: a union


class ViewUpdate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(1, 1, 5, padding=2)

    def forward(self, x):
        y = self.a(x)
        part = y[:, :1]  # a view of y
        part.add_(self.b(x))  # changes what y depends on, through the view
        return y


def test_an_in_place_update_through_a_view_is_refused():
    with pytest.raises(fl.UnsupportedOpError, match=r"add_\(\).*part\.add_.*shares memory"):
        fl.receptive_fields(ViewUpdate().eval(), (1, 8, 8))


# --- layers that return lists -------------------------------------------------------------------


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3)
        self.b = nn.Conv2d(1, 2, 5, padding=1)

    def forward(self, x):
        return [self.a(x), self.b(x)]


class WithBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.split = Branches()
        self.out = nn.Identity()

    def forward(self, x):
        a, b = self.split(x)
        return self.out(a + b)


def test_a_layer_returning_a_list_says_which_layer_makes_each_element():
    m = WithBranches().eval()
    message = (
        r"layer 'split' outputs a list of tensors \(2\), not one tensor \(element 0 is the "
        r"output of layer 'split\.a'; element 1 is the output of layer 'split\.b'\)"
    )
    with pytest.raises(fl.ReceptiveFieldError, match=message):
        fl.receptive_field(m, (1, 9, 9), "split")
    with pytest.raises(fl.LayerError, match=message.replace("a list", "a list or tuple")):
        resolve_layers(m, ["split"])
    with (
        pytest.raises(fl.LayerError, match=r"'split' outputs a list of tensors"),
        capture(m, ["split"]) as run,
    ):
        run(torch.zeros(1, 1, 9, 9))
    assert assert_exact(m, (1, 9, 9), "out").size == (5, 5)


def test_timm_hrnet_stage_returning_a_list():
    timm = pytest.importorskip("timm")
    m = timm.create_model("hrnet_w18_small", pretrained=False).eval()
    with pytest.raises(fl.LayerError, match=r"'stage2' outputs a list or tuple of tensors \(2\)"
                       r".*element 0 is the output of 'stage2.0.fuse_act'"):  # fmt: skip
        resolve_layers(m, ["stage2"])
    assert "stage2" not in fl.layer_names(m)


# --- layer listing and timm ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_listing_by_running_equals_listing_by_torch_fx(name):
    model = getattr(torchvision.models, name)(weights=None).eval()
    assert fl.layer_names(model, (3, 64, 64)) == fl.layer_names(model)


def test_timm_vgg16_lists_its_layers_and_gives_early_fields():
    timm = pytest.importorskip("timm")
    m = timm.create_model("vgg16", pretrained=False).eval()
    before = snapshot(m)
    names = fl.layer_names(m)  # torch.fx fails on the head: the declared (3, 224, 224) is run
    assert names[:3] == ["features.0", "features.1", "features.2"] and "head.fc" in names
    assert fl.layer_names(m, (3, 64, 64)) == names
    shape = (3, 48, 40)
    for layer in ("features.4", "features.10"):
        rf = fl.receptive_field(m, shape, layer)
        corners = itertools.product(*((0, n // 2, n - 1) for n in rf.output_shape))
        for loc in corners:
            emp = fl.empirical_receptive_field(m, shape, layer, loc)
            assert rf.region(loc) == emp.region, (layer, loc)
    assert fl.receptive_field(m, shape, "features.10").size == (24, 24)
    assert_unchanged(m, before)
