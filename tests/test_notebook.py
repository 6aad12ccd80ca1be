"""Notebook helpers: show(), the receptive-field table's displays, short tracebacks."""

from __future__ import annotations

import base64
import io
import json
import pickle
import traceback
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import featurelens as fl
from featurelens._public import FULL_TRACEBACK_VARIABLE
from featurelens.notebook import UnitView, show
from featurelens.receptive_field import ReceptiveFieldTable, receptive_field_table


def _plain_gradient(model: nn.Module, x: torch.Tensor, layer: str, channel: int, loc: tuple):
    """d layer[channel, loc] / d x by plain autograd on the whole input (the reference)."""
    x = x.clone().requires_grad_(True)
    out = {}
    handle = fl.get_layer(model, layer).register_forward_hook(
        lambda m, a, o: out.__setitem__("y", o)
    )
    try:
        model(x[None])
    finally:
        handle.remove()
    out["y"][(0, channel, *loc)].backward()
    return x.grad


def _activation(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    out = {}
    handle = fl.get_layer(model, layer).register_forward_hook(
        lambda m, a, o: out.__setitem__("y", o.detach().clone())
    )
    with torch.no_grad():
        model(x[None])
    handle.remove()
    return out["y"][0]


def test_show_picks_the_arg_max_and_matches_autograd(small_cnn):
    x = torch.randn(1, 28, 28)
    view = show(small_cnn, x, "features.3", 5, method="gradient")
    act = _activation(small_cnn, x, "features.3")[5]
    assert view.location == tuple(int(v) for v in np.unravel_index(int(act.argmax()), act.shape))
    assert view.value == pytest.approx(float(act.max()))
    reference = _plain_gradient(small_cnn, x, "features.3", 5, view.location)
    torch.testing.assert_close(view.projection, reference, rtol=1e-5, atol=1e-6)
    rf = fl.receptive_field(small_cnn, (1, 28, 28), "features.3")
    assert view.box == rf.interval(view.location) and view.field == rf and view.note == ""
    # every nonzero of the projection lies inside the box shown
    nz = torch.nonzero(view.projection[0])
    (y0, y1), (x0, x1) = view.box
    assert nz.numel() and bool(((nz[:, 0] >= y0) & (nz[:, 0] <= y1)).all())
    assert bool(((nz[:, 1] >= x0) & (nz[:, 1] <= x1)).all())


def test_show_displays_as_png_and_html(small_cnn):
    view = show(small_cnn, torch.randn(1, 28, 28), "features.0", 2, (4, 7), "guided", scale=6)
    assert isinstance(view, UnitView) and view.location == (4, 7)
    png = view._repr_png_()
    image = Image.open(io.BytesIO(png))
    assert image.size == view.image.size
    # the projection cell and the patch cell are each the 3x3 box enlarged 6 times
    assert image.size[0] >= 2 * 3 * 6 and image.size[1] >= 3 * 6
    html = view._repr_html_()
    data = html.split("base64,", 1)[1].split('"', 1)[0]
    assert base64.b64decode(data) == png
    assert "features.0 channel 2 at (4, 7)" in html


def test_show_signal_box_is_the_receptive_field():
    model = nn.Sequential(nn.Conv1d(1, 4, 5), nn.ReLU(), nn.Conv1d(4, 3, 5, stride=2))
    x = torch.randn(1, 60)
    view = show(model, x, "2", 1, 10, "gradient")
    rf = fl.receptive_field(model, (1, 60), "2")
    assert view.box == rf.interval((10,)) == ((20, 28),)
    torch.testing.assert_close(view.projection, _plain_gradient(model, x, "2", 1, (10,)))
    assert view.image.size[0] > 100


@pytest.mark.parametrize(
    ("inputs", "channel", "location", "match"),
    [
        (torch.randn(2, 1, 1, 28, 28), 0, None, r"shape \(2, 1, 1, 28, 28\) are not one example"),
        (torch.randn(2, 1, 28, 28), 0, None, r"rejects one example of shape \(2, 1, 28, 28\)"),
        (torch.randn(1, 28, 28), 16, None, r"channel 16 is out of range.*valid 0\.\.15"),
        (torch.randn(1, 28, 28), 0, (14, 0), r"location \(14, 0\) is out of range"),
        ([[0.0]], 0, None, "inputs must be a tensor of one example"),
    ],
)
def test_show_refuses_bad_input(small_cnn, inputs, channel, location, match):
    with pytest.raises(fl.UsageError, match=match):
        show(small_cnn, inputs, "features.3", channel, location)


def test_receptive_fields_is_a_dict_with_a_table_display(small_cnn):
    fields = fl.receptive_fields(small_cnn, (1, 28, 28))
    assert isinstance(fields, ReceptiveFieldTable) and isinstance(fields, dict)
    expected = {
        name: fl.receptive_field(small_cnn, (1, 28, 28), name) for name in fl.layer_names(small_cnn)
    }
    assert fields == expected and dict(fields) == expected
    assert list(fields) == list(expected)
    assert pickle.loads(pickle.dumps(fields)) == fields
    assert json.loads(json.dumps({k: list(v.size) for k, v in fields.items()}))["features.5"]
    html = fields._repr_html_()
    assert html.count("<tr>") == len(fields) + 1  # header + one row per layer
    assert "<td><code>features.5</code></td><td>7 &times; 7</td><td>10 &times; 10</td>" in html
    pretty = pytest.importorskip("IPython.lib.pretty")
    assert pretty.pretty(fields) == receptive_field_table(fields) == fields.table()


def test_table_escapes_layer_names():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.add_module("<b>", nn.Conv2d(1, 1, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return getattr(self, "<b>")(x)

    html = fl.receptive_fields(Odd(), (1, 8, 8))._repr_html_()
    assert "&lt;b&gt;" in html and "<b>" not in html


def _frames(call: Callable[[], object]) -> tuple[BaseException, list[traceback.FrameSummary]]:
    try:
        call()
    except Exception as exc:  # any error the call raises
        return exc, traceback.extract_tb(exc.__traceback__)
    raise AssertionError("no error raised")


def test_layer_error_from_project_has_a_short_traceback(small_cnn, monkeypatch):
    monkeypatch.delenv(FULL_TRACEBACK_VARIABLE, raising=False)
    x = torch.randn(1, 1, 28, 28)
    exc, frames = _frames(lambda: fl.project(small_cnn, x, "features.9", 0))
    assert isinstance(exc, fl.LayerError) and "features.9" in str(exc)
    last = frames[-1]
    assert last.name == "project" and last.filename == fl.project.__wrapped__.__code__.co_filename
    # this test's lambda, the public wrapper, project itself: nothing from deeper down
    assert len(frames) == 4 and frames[0].name == "_frames"
    # the full traceback goes deeper, and is there on request
    monkeypatch.setenv(FULL_TRACEBACK_VARIABLE, "1")
    _, full = _frames(lambda: fl.project(small_cnn, x, "features.9", 0))
    assert len(full) > len(frames) and full[-1].name != "project"


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("receptive_field", lambda m: fl.receptive_field(m, (1, 28, 28), "nope")),
        ("receptive_fields", lambda m: fl.receptive_fields(m, (1, 1, 1, 28, 28))),
        ("scan", lambda m: fl.scan(m, torch.zeros(2, 1, 28, 28), ["x"], progress=False)),
        ("show", lambda m: show(m, torch.zeros(1, 28, 28), "features.3", 0, method="lrp")),
    ],
)
def test_library_errors_end_in_the_public_function(small_cnn, name, call, monkeypatch):
    monkeypatch.delenv(FULL_TRACEBACK_VARIABLE, raising=False)
    _, frames = _frames(lambda: call(small_cnn))
    assert frames[-1].name == name


def test_other_errors_keep_their_traceback(small_cnn):
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ZeroDivisionError("the model's own bug")

    model = nn.Sequential(nn.Conv2d(1, 2, 3), Broken())
    with pytest.raises(ZeroDivisionError, match="own bug") as info:
        fl.project(model, torch.zeros(1, 1, 8, 8), "1", 0, crop=False)
    assert info.traceback[-1].name == "forward"  # the user's frame, where the bug is
