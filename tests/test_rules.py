"""Backward rules: every rectifier form gets the rule; references are written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_unchanged, snapshot
from featurelens.rules import METHODS, ActivationError, Rule, get_rule, method_names, rule_mode

# Each form returns the rectified tensor the net goes on with; in-place forms go on with the
# mutated input itself (the case that needs ctx.mark_dirty).
RECTIFIERS = {
    "nn.ReLU": lambda h: nn.ReLU()(h),
    "nn.ReLU(inplace)": lambda h: (nn.ReLU(inplace=True)(h), h)[1],
    "F.relu": F.relu,
    "F.relu(inplace)": lambda h: (F.relu(h, inplace=True), h)[1],
    "F.relu_": lambda h: (F.relu_(h), h)[1],
    "torch.relu": torch.relu,
    "torch.relu_": lambda h: (torch.relu_(h), h)[1],
    "Tensor.relu": lambda h: h.relu(),
    "Tensor.relu_": lambda h: (h.relu_(), h)[1],
    "clamp(min=0)": lambda h: h.clamp(min=0),
    "torch.clamp(h, 0)": lambda h: torch.clamp(h, 0),
    "clamp_(min=0)": lambda h: (h.clamp_(min=0), h)[1],
    "clip(min=0)": lambda h: h.clip(min=0),
    "clamp_min(0)": lambda h: h.clamp_min(0),
    "clamp_min_(0)": lambda h: (h.clamp_min_(0), h)[1],
    "F.threshold(h, 0, 0)": lambda h: F.threshold(h, 0.0, 0.0),
}


class TwoLayer(nn.Module):
    """y = W2 act(W1 x + b1): the rectifier's backward is the only non-linear step."""

    def __init__(self, act) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x) * 1.0))  # * 1.0: in-place forms may not hit a leaf


def hand_backward(model: TwoLayer, x: torch.Tensor, unit: int, method: str) -> torch.Tensor:
    """The projection of output ``unit`` written out: no autograd at all."""
    W1, b1 = model.fc1.weight.detach(), model.fc1.bias.detach()
    W2 = model.fc2.weight.detach()
    h = x @ W1.T + b1  # (N, 12)
    g = W2[unit].expand_as(h)  # d y_unit / d act(h)
    if method == "gradient":
        g = g * (h > 0)
    elif method == "deconvnet":
        g = g.clamp(min=0)
    else:
        g = g.clamp(min=0) * (h > 0)
    return g @ W1


def projected(model: nn.Module, x: torch.Tensor, unit: int, method: str, **kw) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    with rule_mode(model, method, **kw):
        y = model(x)
    (grad,) = torch.autograd.grad(y[:, unit].sum(), x)
    return grad


@pytest.fixture
def data() -> torch.Tensor:
    return torch.randn(7, 6, dtype=torch.float64)


def test_registry_is_the_single_source_of_names() -> None:
    assert method_names() == list(METHODS) == ["gradient", "deconvnet", "guided"]
    assert all(isinstance(r, Rule) and r.name == k for k, r in METHODS.items())
    assert METHODS["gradient"].autograd and not METHODS["guided"].autograd
    with pytest.raises(ValueError, match="'gradiant'.*'gradient', 'deconvnet', 'guided'"):
        get_rule("gradiant")


@pytest.mark.parametrize("form", list(RECTIFIERS))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_rectifier_form_gets_the_rule(form: str, method: str, data: torch.Tensor) -> None:
    model = TwoLayer(RECTIFIERS[form]).double()
    for unit in range(5):
        ours = projected(model, data, unit, method)
        ref = hand_backward(model, data, unit, method)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_the_three_methods_differ_on_the_test_net(data: torch.Tensor) -> None:
    # Guards the test above: a broken override (e.g. plain gradient everywhere) must fail it.
    model = TwoLayer(F.relu).double()
    maps = {m: hand_backward(model, data, 0, m) for m in METHODS}
    assert not torch.allclose(maps["gradient"], maps["deconvnet"])
    assert not torch.allclose(maps["gradient"], maps["guided"])
    assert not torch.allclose(maps["deconvnet"], maps["guided"])


def test_gradient_is_plain_autograd_bit_for_bit(data: torch.Tensor) -> None:
    model = TwoLayer(nn.ReLU(inplace=True)).double()
    x = data.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(x)[:, 2].sum(), x)
    assert torch.equal(projected(model, data, 2, "gradient"), plain)


def test_override_machinery_with_the_gradient_expression_equals_autograd() -> None:
    # The same expression as 'gradient', but routed through the override: any error in how
    # rectifiers are intercepted (in place, clamp, reused modules) shows up against autograd.
    relu = nn.ReLU(inplace=True)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), relu, nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten())
    model = model.double()
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64)
    through = Rule("gradient-through-override", METHODS["gradient"].backward, "test")
    a = x.clone().requires_grad_(True)
    with rule_mode(model, through):
        ya = model(a)
    b = x.clone().requires_grad_(True)
    yb = model(b)
    (ga,) = torch.autograd.grad(ya[:, 7].sum(), a)
    (gb,) = torch.autograd.grad(yb[:, 7].sum(), b)
    assert torch.equal(ga, gb)


def test_a_new_rule_is_one_expression(data: torch.Tensor) -> None:
    negative = Rule("negative", lambda g, positive: g.clamp(max=0) * positive, "test")
    model = TwoLayer(torch.relu).double()
    ours = projected(model, data, 1, negative)
    W1, b1, W2 = model.fc1.weight.detach(), model.fc1.bias.detach(), model.fc2.weight.detach()
    h = data @ W1.T + b1
    ref = (W2[1].expand_as(h).clamp(max=0) * (h > 0)) @ W1
    torch.testing.assert_close(ours, ref)


OTHER = {
    "GELU": nn.GELU(),
    "SiLU": nn.SiLU(),
    "LeakyReLU": nn.LeakyReLU(0.1),
    "ReLU6": nn.ReLU6(),
    "Sigmoid": nn.Sigmoid(),
    "Tanh": nn.Tanh(),
    "ELU": nn.ELU(),
    "Hardswish": nn.Hardswish(),
    "Mish": nn.Mish(),
    "Softplus": nn.Softplus(),
    "PReLU": nn.PReLU(),
    "clamp(min=0, max=6)": lambda h: h.clamp(0, 6),
}


class Wrapped(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 12)
        self.head = nn.Linear(12, 5)
        if isinstance(act, nn.Module):  # nested: the error names 'blocks.inner.act'
            self.blocks = nn.ModuleDict({"inner": nn.ModuleDict({"act": act})})
            act = None
        self.fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = self.blocks["inner"]["act"](h) if self.fn is None else self.fn(h)
        return self.head(h)


@pytest.mark.parametrize("name", list(OTHER))
@pytest.mark.parametrize("method", ["deconvnet", "guided"])
def test_other_activations_are_refused_with_their_name_and_place(
    name: str, method: str, data: torch.Tensor
) -> None:
    model = Wrapped(OTHER[name]).double()
    before = snapshot(model)
    where = (
        "'blocks.inner.act'"
        if isinstance(OTHER[name], nn.Module)
        else "'<the model itself>' (Wrapped)"
    )
    with pytest.raises(ActivationError) as info:
        projected(model, data, 0, method)
    message = str(info.value)
    key = name.split("(")[0]
    assert key in message or key.lower() in message.lower()
    assert where in message and "other_activations='gradient'" in message
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", ["GELU", "Sigmoid", "LeakyReLU"])
def test_other_activations_opt_in_to_the_gradient(name: str, data: torch.Tensor) -> None:
    model = Wrapped(OTHER[name]).double()
    ours = projected(model, data, 3, "guided", other_activations="gradient")
    plain = projected(model, data, 3, "gradient")  # no rectifier in this net: same as autograd
    assert torch.equal(ours, plain)
    assert not torch.equal(projected(model, data, 3, "gradient"), torch.zeros_like(plain))


def test_gradient_never_refuses_other_activations(data: torch.Tensor) -> None:
    model = Wrapped(nn.GELU()).double()
    x = data.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(x)[:, 0].sum(), x)
    assert torch.equal(projected(model, data, 0, "gradient"), plain)


def test_rule_mode_leaves_no_hook_also_on_error(data: torch.Tensor) -> None:
    model = Wrapped(nn.GELU()).double()
    before = snapshot(model)
    with pytest.raises(ActivationError):
        projected(model, data, 0, "guided")
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="other_activations"):
        projected(model, data, 0, "guided", other_activations="ignore")
    assert_unchanged(model, before)
