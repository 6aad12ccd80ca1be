"""Live video and other activations: POST /api/frame answers activations and a projection
from one forward pass; ``other_activations`` lets deconvnet/guided run on SiLU networks.

References: the layer output by running the model's children by hand, projections by
:func:`featurelens.project` with ``crop=False`` on the same preprocessed tensor (it computes
the same gradient its own way), forwards counted by a hook.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import featurelens
from featurelens.app import create_app
from featurelens.atlas import Atlas
from featurelens.errors import ActivationError
from featurelens.explorer import Explorer, decode_image
from featurelens.render import render_projection
from test_app import (
    MNIST_MEAN,
    MNIST_STD,
    digit,
    image_bytes,
    make_atlas,
    page_client,
    reference_output,
)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    return create_app(make_atlas(tmp_path_factory.mktemp("live")))


@pytest.fixture(scope="module")
def client(app):
    with page_client(app) as c:
        yield c


def _frame_of(data, index: int) -> bytes:
    pixels = (digit(data, index)[0] * MNIST_STD + MNIST_MEAN).clamp(0, 1)
    return image_bytes(np.round(pixels.numpy() * 255).astype(np.uint8))


def _decoded(url: str) -> np.ndarray:
    head, _, b64 = url.partition(",")
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _post(client, raw: bytes, **params):
    return client.post("/api/frame", params=params, content=raw,
                       headers={"content-type": "image/jpeg"})  # fmt: skip


@pytest.mark.parametrize("method", ["gradient", "deconvnet", "guided"])
def test_a_frame_gives_activations_and_the_units_projection(app, client, method):
    ex = app.state.explorer
    raw = _frame_of(ex.data, 7)
    x = ex.preprocess(decode_image(raw, ex.max_upload_pixels).image)  # what the server runs
    r = _post(client, raw, layer="features.4", channel=2, method=method, style="signed")
    assert r.status_code == 200, r.text
    answer = r.json()
    ref = reference_output(ex.model, x[None], "features.4")
    layout = answer["layout"]
    assert layout["input"] == "frame" and layout["map_shape"] == [14, 14]
    np.testing.assert_allclose(layout["channel_max"], ref.flatten(1).max(1).values, rtol=1e-5)
    loc = tuple(np.unravel_index(int(ref[2].argmax()), (14, 14)))
    assert tuple(answer["unit"]["location"]) == loc
    assert answer["unit"]["value"] == pytest.approx(float(ref[(2, *loc)]), rel=1e-5)
    expected = featurelens.project(ex.model, x[None], "features.4", 2, loc, method, crop=False)
    rgb = np.round(render_projection(expected[0], "signed") * 255).astype(np.uint8)
    np.testing.assert_array_equal(_decoded(answer["projection"]), rgb)
    assert _decoded(answer["sprite"]).shape[2] == 3
    rf = featurelens.receptive_field(ex.model, ex.input_shape, "features.4")
    assert answer["unit"]["rf"]["region"] == [[s.start, s.stop - 1] for s in rf.region(loc)]


def test_one_forward_per_frame(app, client):
    ex = app.state.explorer
    calls = []
    handle = ex.model.features[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        for i in range(3):
            raw = _frame_of(ex.data, i)
            assert (
                _post(client, raw, layer="features.4", channel=1, location="3,4").status_code == 200
            )
            assert len(calls) == i + 1
        assert _post(client, raw, layer="features.0").status_code == 200  # no unit: no backward
        assert len(calls) == 4
    finally:
        handle.remove()
    assert not ex.model.features[0]._forward_hooks


def test_frames_are_not_kept_and_bad_frames_are_refused(app, client):
    ex = app.state.explorer
    before = len(ex._uploads)
    assert _post(client, _frame_of(ex.data, 1), layer="features.0").status_code == 200
    assert len(ex._uploads) == before
    assert _post(client, b"", layer="features.0").status_code == 400
    r = _post(client, b"not an image", layer="features.0")
    assert r.status_code == 415 and "PNG or JPEG" in r.json()["error"]
    r = _post(client, _frame_of(ex.data, 1), layer="features.0", channel=99)
    assert r.status_code == 404
    r = _post(client, _frame_of(ex.data, 1), layer="features.4", channel=0, location="99,0")
    assert r.status_code == 404
    # Any size is resized like an upload; a frame over the byte limit is a 413.
    big = image_bytes(np.zeros((300, 500), np.uint8))
    assert _post(client, big, layer="features.0").status_code == 200
    with page_client(create_app(ex.atlas, model=ex.model, data=ex.data,
                                max_upload_bytes=100)) as small:  # fmt: skip
        assert _post(small, big, layer="features.0").status_code == 413
    assert client.get("/api/info").status_code == 200  # still serving


class _SiLUNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)
        self.act = torch.nn.SiLU()
        self.conv2 = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.act(self.conv(x))))


def test_other_activations_lets_deconvnet_and_guided_run_on_silu(tmp_path: Path):
    torch.manual_seed(0)
    net = _SiLUNet().eval()
    images = torch.rand(6, 1, 12, 12)
    featurelens.scan(net, images, ["relu"], top_k=2, progress=False).save(tmp_path / "a")
    params = {"input": "dataset:2", "layer": "relu", "channel": 1, "method": "guided",
              "location": "5,6", "style": "signed"}  # fmt: skip
    with page_client(create_app(tmp_path / "a", model=net, data=images)) as c:
        assert c.get("/api/info").json()["other_activations"] == "error"
        r = c.get("/api/projection.png", params=params)
        assert r.status_code == 422 and "SiLU" in r.json()["error"]
    app = create_app(tmp_path / "a", model=net, data=images, other_activations="gradient")
    with page_client(app) as c:
        assert c.get("/api/info").json()["other_activations"] == "gradient"
        r = c.get("/api/projection.png", params=params)
        assert r.status_code == 200
        expected = featurelens.project(net, images[2:3], "relu", 1, (5, 6), "guided",
                                       other_activations="gradient")  # fmt: skip
        rgb = np.round(render_projection(expected[0], "signed") * 255).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), rgb)
    with pytest.raises(ActivationError):
        featurelens.project(net, images[2:3], "relu", 1, (5, 6), "guided")
    with pytest.raises(ValueError, match="other_activations"):
        Explorer(Atlas.load(tmp_path / "a"), net, images, other_activations="ignore")


def test_cli_serve_other_activations(app, monkeypatch):
    import featurelens.app as app_package
    from featurelens.cli import build_parser

    assert build_parser().parse_args(["serve", "a"]).other_activations == "error"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "a", "--other-activations", "ignore"])
    seen = {}

    def fake_serve(atlas, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # as a user stopping the server

    monkeypatch.setattr(app_package, "serve", fake_serve)
    atlas_dir = app.state.explorer.atlas._directory
    args = build_parser().parse_args(["serve", str(atlas_dir), "--other-activations", "gradient"])
    assert args.func(args) == 0 and seen["other_activations"] == "gradient"
