"""Every public call leaves the model exactly as given: no hook, same mode, same numbers.

One generic test, parametrised over :data:`CALLS` (and :data:`FAILING` for calls that must
raise). To cover a new public function, append a ``(name, call)`` case: ``call(model, x)``
runs it on the hygiene model below and an input batch ``x`` of shape (2, 3, 20, 18).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from conftest import assert_unchanged, snapshot
from featurelens import (
    LayerError,
    Unit,
    effective_receptive_field,
    empirical_receptive_field,
    layer_layout,
    layer_names,
    project,
    project_units,
    receptive_field,
    receptive_fields,
    sanity,
    scan,
    visualize,
)
from featurelens.errors import ChannelError, DataError, UsageError
from featurelens.figures import layer_sheet, zf_grid
from featurelens.graph import preserved
from featurelens.rules import METHODS, rule_mode
from featurelens.visualize import REGULARIZERS

Call = Callable[[nn.Module, torch.Tensor], object]

LAYER = "features.4"  # after the module that Exploding arms


def _rule_mode_forward(method: str) -> Call:
    def call(model: nn.Module, x: torch.Tensor) -> object:
        with preserved(model), rule_mode(model, method):  # rule_mode leaves modes to the caller
            return model(x)

    return call


def _atlas(x: torch.Tensor):
    # hits from an intact twin (same layers): the call under test may have an armed model
    return scan(make_model(armed=False), x.detach(), [LAYER], top_k=2, progress=False)


def _report(model: nn.Module, x: torch.Tensor, **kwargs: object) -> object:
    import tempfile

    from featurelens.report import write_report

    with tempfile.TemporaryDirectory() as out:
        return write_report(_atlas(x), out, model=model, data=x, progress=False, **kwargs)


def _explorer(model: nn.Module, x: torch.Tensor, requests: list[tuple[str, dict]]) -> object:
    """GET each request from the explorer; a 4xx/5xx answer raises LookupError."""
    import warnings

    from featurelens.app import create_app

    with warnings.catch_warnings():  # starlette's TestClient import warns about httpx
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    app = create_app(_atlas(x), model=model, data=x)  # asked as the page asks (docs/explorer.md)
    with TestClient(app, base_url="http://127.0.0.1", headers={"X-Featurelens": "1"}) as client:
        for path, params in requests:
            r = client.get(path, params={"input": "dataset:1", "layer": LAYER, **params})
            if r.status_code >= 400:
                raise LookupError(r.text)


def _show(model: nn.Module, x: torch.Tensor, layer: str, channel: int) -> object:
    from featurelens.notebook import show

    return show(model, x, layer, channel, method="deconvnet")


EXPLORE = [("/api/activations", {}), ("/api/unit", {"channel": 2}),
           ("/api/projection.png", {"channel": 1, "method": "guided"})]  # fmt: skip

CALLS: list[tuple[str, Call]] = [
    ("layer_names", lambda m, x: layer_names(m)),
    ("layer_names[input_shape]", lambda m, x: layer_names(m, tuple(x.shape[1:]))),
    ("layer_layout", lambda m, x: layer_layout(m, tuple(x.shape[1:]), LAYER)),
    ("receptive_field", lambda m, x: receptive_field(m, tuple(x.shape[1:]), LAYER)),
    ("receptive_fields", lambda m, x: receptive_fields(m, tuple(x.shape[1:]))),
    ("empirical_receptive_field",
     lambda m, x: empirical_receptive_field(m, tuple(x.shape[1:]), LAYER, (2, 1))),
    *[(f"project[{k}]", lambda m, x, k=k: project(m, x, LAYER, 3, method=k)) for k in METHODS],
    *[(f"project[{k}, no crop]",
       lambda m, x, k=k: project(m, x, LAYER, torch.tensor([1, 2]), (1, 1), k, crop=False))
      for k in METHODS],
    ("project[channel_dim]", lambda m, x: project(m, x, LAYER, 3, channel_dim=1)),
    ("project_units", lambda m, x: project_units(
        m, x, [Unit(LAYER, 1), Unit("features.1", 0, (0, 3)), Unit(LAYER, 2)], "guided",
        rows=[0, 1, 1])),
    *[(f"rule_mode[{k}]", _rule_mode_forward(k)) for k in METHODS],
    ("scan", lambda m, x: scan(m, x, [LAYER, "features.1"], top_k=2, progress=False)),
    ("scan[absmax, batch 1]",
     lambda m, x: scan(m, x, ["features.2", LAYER], top_k=1, score="absmax", batch_size=1,
                       progress=False)),
    ("effective_receptive_field", lambda m, x: effective_receptive_field(m, x, LAYER, examples=2)),
    ("effective_receptive_field[random inputs, channels]",
     lambda m, x: effective_receptive_field(m, x, LAYER, examples=3, channels=[0, 2],
                                            random_inputs=True)),
    ("sanity", lambda m, x: sanity(m, x, [Unit(LAYER, 1), Unit("features.1", 0, (0, 3))],
                                   ["gradient", "guided"], rows=[0, 1], keep_maps=1)),
    ("zf_grid", lambda m, x: zf_grid(m, x, _atlas(x), LAYER, 1, "guided", k=2)),
    ("layer_sheet", lambda m, x: layer_sheet(m, x, _atlas(x), LAYER, "deconvnet")),
    ("write_report", lambda m, x: _report(m, x, channels=2)),
    ("explorer", lambda m, x: _explorer(m, x, EXPLORE)),
    ("show", lambda m, x: _show(m, x[1], LAYER, 2)),
    ("visualize", lambda m, x: visualize(m, LAYER, [0, 2], input_shape=tuple(x.shape[1:]),
                                         steps=2, progress=False)),
    ("visualize[pixels, every regularizer]",
     lambda m, x: visualize(m, LAYER, 1, (2, 2), input_shape=tuple(x.shape[1:]), steps=4,
                            regularizers=[n for n in REGULARIZERS if n != "fourier"],
                            progress=False)),
    ("visualize[channel]", lambda m, x: visualize(m, LAYER, 3, objective="channel",
                                                  input_shape=tuple(x.shape[1:]), steps=2,
                                                  progress=False)),
    ("write_report[visualize]", lambda m, x: _report(m, x, channels=2, visualize={"steps": 2})),
]  # fmt: skip
"""Public calls that must succeed on the intact model."""

FAILING: list[tuple[str, Call, type[Exception]]] = [
    ("project: bad channel", lambda m, x: project(m, x, LAYER, 999, method="guided"), ValueError),
    ("project: bad location", lambda m, x: project(m, x, LAYER, 0, (99, 0)), ValueError),
    ("project: bad layer", lambda m, x: project(m, x, "features.44", 0), LayerError),
    ("project: bad method", lambda m, x: project(m, x, LAYER, 0, method="lrp"), ValueError),
    ("project: bad channel_dim", lambda m, x: project(m, x, LAYER, 0, channel_dim=-1),
     ValueError),
    ("project: bad input", lambda m, x: project(m, x[:, :2], LAYER, 0, method="deconvnet"),
     ValueError),
    ("project_units: bad unit", lambda m, x: project_units(m, x, [Unit(LAYER, 1), Unit(LAYER, 77)]),
     ValueError),
    ("receptive_field: bad layer",
     lambda m, x: receptive_field(m, tuple(x.shape[1:]), "features.44"), LayerError),
    ("empirical_receptive_field: bad layer",
     lambda m, x: empirical_receptive_field(m, tuple(x.shape[1:]), "nope", (0, 0)), LayerError),
    ("scan: bad layer", lambda m, x: scan(m, x, ["features.44"], progress=False), LayerError),
    ("scan: bad top_k", lambda m, x: scan(m, x, [LAYER], top_k=3, progress=False), ValueError),
    ("scan: bad score",
     lambda m, x: scan(m, x, [LAYER], top_k=1, score="median", progress=False), ValueError),
    ("effective_receptive_field: no spatial axis",
     lambda m, x: effective_receptive_field(m, x, "head.1"), UsageError),
    ("effective_receptive_field: bad channel",
     lambda m, x: effective_receptive_field(m, x, LAYER, channels=[6]), ChannelError),
    ("effective_receptive_field: empty data",
     lambda m, x: effective_receptive_field(m, x[:0], LAYER), DataError),
    ("sanity: bad method", lambda m, x: sanity(m, x, [Unit(LAYER, 1)], ["lrp"]), ValueError),
    ("sanity: bad unit", lambda m, x: sanity(m, x, [Unit(LAYER, 6)], ["gradient"]), ChannelError),
    ("sanity: bad rows",
     lambda m, x: sanity(m, x, [Unit(LAYER, 1)], ["gradient"], rows=[2]), UsageError),
    ("zf_grid: bad channel", lambda m, x: zf_grid(m, x, _atlas(x), LAYER, 6), ValueError),
    ("layer_sheet: bad channel",
     lambda m, x: layer_sheet(m, x, _atlas(x), LAYER, channels=[0, 9]), ValueError),
    ("write_report: bad layer", lambda m, x: _report(m, x, layers=["head.2"]), LayerError),
    ("visualize: bad channel",
     lambda m, x: visualize(m, LAYER, 9, input_shape=tuple(x.shape[1:]), progress=False),
     ValueError),
    ("visualize: bad input shape",
     lambda m, x: visualize(m, LAYER, 0, input_shape=(2, 20, 18), progress=False), ValueError),
    ("explorer: bad location",
     lambda m, x: _explorer(m, x, [("/api/projection.png", {"channel": 1, "location": "99,0"})]),
     LookupError),
    ("show: bad channel", lambda m, x: _show(m, x[0], LAYER, 99), ValueError),
]  # fmt: skip
"""Public calls that must raise (the exception type given) on the intact model."""


class Exploding(nn.MaxPool2d):
    """A pooling layer that raises mid-forward once armed (also while being traced)."""

    armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise RuntimeError("boom: a submodule raised mid-forward")
        return super().forward(x)


class HygieneNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),  # in train mode a forward would move its running statistics
            nn.ReLU(inplace=True),
            Exploding(2),
            nn.Conv2d(8, 6, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_model(armed: bool) -> nn.Module:
    model = HygieneNet().train()
    model.features[0].bias.requires_grad_(False)  # a mixed state that must come back as it was
    model.head.eval()
    model.features[3].armed = armed
    return model


def assert_clean(model: nn.Module, before: dict) -> None:
    assert_unchanged(model, before)
    assert not nn.modules.module._global_forward_hooks
    assert not nn.modules.module._global_forward_pre_hooks
    assert torch._C._len_torch_function_stack() == 0  # no TorchFunctionMode left active
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("name", [name for name, _ in CALLS])
def test_a_successful_call_leaves_the_model_unchanged(name: str) -> None:
    call = dict(CALLS)[name]
    model = make_model(armed=False)
    x = torch.randn(2, 3, 20, 18, requires_grad=True)
    before = snapshot(model)
    call(model, x)
    assert_clean(model, before)
    assert x.requires_grad and x.grad is None


@pytest.mark.parametrize("name", [name for name, _ in CALLS])
def test_a_submodule_raising_mid_forward_leaves_the_model_unchanged(name: str) -> None:
    call = dict(CALLS)[name]
    model = make_model(armed=True)
    x = torch.randn(2, 3, 20, 18)
    before = snapshot(model)
    with pytest.raises(Exception):  # noqa: B017 - any error, as long as nothing leaks
        call(model, x)
    assert_clean(model, before)


@pytest.mark.parametrize("name", [name for name, *_ in FAILING])
def test_a_failing_call_leaves_the_model_unchanged(name: str) -> None:
    _, call, error = next(case for case in FAILING if case[0] == name)
    model = make_model(armed=False)
    x = torch.randn(2, 3, 20, 18)
    before = snapshot(model)
    with pytest.raises(error):
        call(model, x)
    assert_clean(model, before)
