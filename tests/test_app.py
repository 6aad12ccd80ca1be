"""The explorer's API: every endpoint with good and bad input, uploads, traversal, concurrency.

A small atlas is made once per session: a tiny seeded CNN from a Python file and 40 MNIST
digits from a data factory, so the manifest can rebuild both. References are computed
independently of the server: layer outputs by slicing the ``nn.Sequential`` by hand, gradients
with plain autograd, pixels from the dataset tensors.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import featurelens
from conftest import Permute
from featurelens.app import create_app, serve
from featurelens.atlas import Atlas
from featurelens.render import STYLES, render_projection
from featurelens.rules import METHODS
from featurelens.specs import DataSpec, ModelSpec

with warnings.catch_warnings():  # starlette asks for httpx2, which is not installed here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

MODEL_SOURCE = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """conv-ReLU-pool twice, then a linear classifier: MNIST-sized, seeded."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 7 * 7, 10))

    def forward(self, x):
        return self.head(self.features(x))


def tiny():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return Tiny().eval()


def digits():
    from featurelens.specs import MnistDigits

    return torch.utils.data.Subset(MnistDigits(), range(40))
'''

#: What the page sends on every API request (besides its browser's Sec-Fetch-Site): the
#: test clients behave like the page, on a loopback Host as a browser would name it.
PAGE_HEADERS = {"X-Featurelens": "1"}
BASE_URL = "http://127.0.0.1:8000"


def page_client(app, **options) -> TestClient:
    """A TestClient that asks like the explorer's page: loopback Host, the client header."""
    return TestClient(app, base_url=BASE_URL, headers=PAGE_HEADERS, **options)


LAYERS = ["features.0", "features.4", "features.5", "head.1"]
N_EXAMPLES = 40
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def make_atlas(root: Path) -> Path:
    """Write the tiny model/data file and an atlas of it under ``root``; returns the atlas dir."""
    root.mkdir(parents=True, exist_ok=True)
    source = root / "tiny_model.py"
    source.write_text(textwrap.dedent(MODEL_SOURCE))
    model_spec = ModelSpec(f"{source}:tiny")
    data_spec = DataSpec(f"{source}:digits", mean=(MNIST_MEAN,), std=(MNIST_STD,))
    model, data = model_spec.build(), data_spec.build()
    atlas = featurelens.scan(
        model, data, LAYERS, top_k=4, batch_size=20, progress=False,
        model_spec=model_spec, data_spec=data_spec,
    )  # fmt: skip
    out = root / "atlas"
    atlas.save(out)
    return out


def dir_state(directory: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under ``directory`` (and the directory's own mtime)."""
    state = {".": ("", directory.stat().st_mtime_ns)}
    for p in sorted(directory.rglob("*")):
        state[str(p.relative_to(directory))] = (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "",
            p.stat().st_mtime_ns,
        )
    return state


@pytest.fixture(scope="session")
def atlas_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_atlas(tmp_path_factory.mktemp("explorer"))


@pytest.fixture(scope="session")
def atlas(atlas_dir: Path) -> Atlas:
    return Atlas.load(atlas_dir)


@pytest.fixture(scope="session")
def model(atlas: Atlas) -> torch.nn.Module:
    return atlas.build_model()


@pytest.fixture(scope="session")
def data(atlas: Atlas):
    return atlas.build_data()


@pytest.fixture(scope="module")
def app(atlas_dir: Path):
    return create_app(atlas_dir)


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    # raise_server_exceptions=True: any request reaching the catch-all 500 fails the test.
    with page_client(app) as c:
        yield c


def png(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def image_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def reference_output(model, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The layer's output by running the Sequential's children by hand (no hooks)."""
    part, index = layer.split(".")
    with torch.no_grad():
        h = x.clone()
        if part == "head":
            h = model.features(h)
        for i, module in enumerate(getattr(model, part)):
            if isinstance(module, torch.nn.ReLU):
                h = torch.relu(h)  # not in place: keep h of earlier layers intact
            else:
                h = module(h)
            if i == int(index):
                return h[0]
    raise AssertionError(layer)


def digit(data, index: int) -> torch.Tensor:
    return data[index][0]


# --------------------------------------------------------------------------------------------
# Good input


def test_info_reads_the_registries_and_the_atlas(client, atlas, model):
    info = client.get("/api/info").json()
    assert info["methods"] == list(METHODS)
    assert info["styles"] == list(STYLES)
    assert info["data_size"] == N_EXAMPLES
    assert info["input_shape"] == [1, 28, 28]
    assert [entry["name"] for entry in info["layers"]] == LAYERS
    for entry in info["layers"]:
        assert entry["channels"] == atlas.channels(entry["name"])
        rf = featurelens.receptive_field(model, (1, 28, 28), entry["name"])
        assert entry["rf"]["size"] == list(rf.size)
        assert entry["rf"]["stride"] == list(rf.stride)
        assert entry["rf"]["padding"] == list(rf.padding)
        assert entry["rf"]["is_global"] == rf.is_global
    # Hand-derived geometry: 3x3 conv pad 1, pool 2, 3x3 conv pad 1, pool 2.
    by_name = {e["name"]: e["rf"] for e in info["layers"]}
    assert by_name["features.0"] == {"size": [3, 3], "stride": [1, 1], "padding": [1, 1],
                                     "output_shape": [28, 28], "is_global": False}  # fmt: skip
    assert by_name["features.4"]["size"] == [8, 8] and by_name["features.4"]["stride"] == [2, 2]
    assert by_name["head.1"]["is_global"]


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="/static/app.js">' in page.text
    for name, kind in [("app.js", "javascript"), ("style.css", "css"), ("index.html", "html")]:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]


def test_top_hits_come_from_the_atlas(client, atlas):
    for layer in ("features.0", "head.1"):
        r = client.get("/api/top", params={"layer": layer, "channel": 2}).json()
        expected = [
            {"index": h.index, "score": h.score, "location": list(h.location), "label": h.label}
            for h in atlas.top(layer, 2)
        ]
        assert r["hits"] == expected


def test_input_png_is_the_denormalised_example(client, data):
    for index in (0, 17, N_EXAMPLES - 1):
        got = png(client.get("/api/input.png", params={"input": f"dataset:{index}"}))
        pixels = digit(data, index)[0].numpy() * MNIST_STD + MNIST_MEAN
        expected = np.round(np.clip(pixels, 0, 1) * 255)
        assert got.shape == (28, 28, 3)
        assert np.abs(got[..., 0].astype(float) - expected).max() <= 1
        assert (got[..., 0] == got[..., 1]).all()  # grayscale


@pytest.mark.parametrize("layer", LAYERS)
def test_activation_stats_match_a_hand_run_forward(client, model, data, layer):
    x = digit(data, 5)[None]
    ref = reference_output(model, x, layer)
    r = client.get("/api/activations", params={"input": "dataset:5", "layer": layer}).json()
    flat = ref.reshape(ref.shape[0], -1)
    assert r["channels"] == ref.shape[0]
    np.testing.assert_allclose(r["channel_max"], flat.max(1).values.numpy(), rtol=1e-5, atol=1e-6)
    for k in range(ref.shape[0]):
        loc = tuple(r["channel_argmax"][k])
        assert torch.isclose(ref[(k, *loc)], flat[k].max(), rtol=1e-6, atol=1e-7)
    assert r["spatial_dims"] == ref.dim() - 1
    assert r["signed"] == bool(ref.min() < 0)


def test_activation_sprite_colours_each_map(client, model, data):
    layer = "features.4"  # rectified: the sequential colour map, 0 at its low end
    ref = reference_output(model, digit(data, 3)[None], layer)  # (6, 14, 14)
    params = {"input": "dataset:3", "layer": layer, "scale": "channel"}
    layout = client.get("/api/activations", params=params).json()
    sprite = png(client.get("/api/activations.png", params=params))
    h, w = layout["map_shape"]
    gap, cols = layout["gap"], layout["cols"]
    lut = np.round(matplotlib.colormaps["inferno"](np.linspace(0, 1, 256))[:, :3] * 255)
    for k in range(ref.shape[0]):
        r, c = divmod(k, cols)
        cell = sprite[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w]
        peak = float(ref[k].max())
        if peak <= 0:
            continue
        expected = lut[np.round(ref[k].numpy() / peak * 255).astype(int)]
        assert np.abs(cell.astype(float) - expected).max() <= 1, f"channel {k}"
    # layer scale: one peak for the whole layer
    params["scale"] = "layer"
    sprite = png(client.get("/api/activations.png", params=params))
    k = int(ref.reshape(6, -1).max(1).values.argmax())
    r, c = divmod(k, cols)
    cell = sprite[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w]
    assert (cell.reshape(-1, 3) == lut[255]).all(1).any()
    signed = png(client.get("/api/activations.png", params={"input": "dataset:3",
                                                            "layer": "features.0"}))  # fmt: skip
    assert signed.shape[0] > 28


def test_unit_location_value_and_receptive_field(client, model, data):
    layer, channel = "features.4", 2
    ref = reference_output(model, digit(data, 7)[None], layer)[channel]
    rf = featurelens.receptive_field(model, (1, 28, 28), layer)
    r = client.get("/api/unit", params={"input": "dataset:7", "layer": layer, "channel": channel})
    body = r.json()
    peak = tuple(int(v) for v in np.unravel_index(int(ref.argmax()), ref.shape))
    assert tuple(body["location"]) == peak
    assert body["value"] == pytest.approx(float(ref.max()), rel=1e-6)
    assert body["rf"]["interval"] == [list(v) for v in rf.interval(peak)]
    assert body["rf"]["region"] == [[s.start, s.stop - 1] for s in rf.region(peak)]
    pinned = client.get("/api/unit", params={"input": "dataset:7", "layer": layer,
                                             "channel": channel, "location": "0,13"}).json()  # fmt: skip
    assert pinned["location"] == [0, 13]
    assert pinned["value"] == pytest.approx(float(ref[0, 13]), rel=1e-6, abs=1e-7)
    # size 8, stride 2, padding 3: u sees [2u - 3, 2u + 4], clipped to 0..27
    assert pinned["rf"]["region"] == [[0, 4], [23, 27]]
    logits = client.get("/api/unit", params={"input": "dataset:7", "layer": "head.1",
                                             "channel": 4}).json()  # fmt: skip
    assert logits["location"] == [] and logits["rf"]["is_global"]
    assert logits["rf"]["region"] == [[0, 27], [0, 27]]


def test_rf_endpoint(client, model):
    rf = featurelens.receptive_field(model, (1, 28, 28), "features.5")
    r = client.get("/api/rf", params={"layer": "features.5", "location": "6,0"}).json()
    assert r["interval"] == [list(v) for v in rf.interval((6, 0))]
    assert r["region"] == [[s.start, s.stop - 1] for s in rf.region((6, 0))]


def test_projection_is_the_units_gradient(client, model, data):
    layer, channel, loc = "features.4", 1, (5, 6)
    x = digit(data, 9)[None].clone().requires_grad_(True)
    # An independent reference: plain autograd on a copy of the truncated model.
    part = copy.deepcopy(torch.nn.Sequential(*list(model.features)[:5]))
    for m in part.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    part(x)[0, channel, loc[0], loc[1]].backward()
    params = {"input": "dataset:9", "layer": layer, "channel": channel, "location": "5,6",
              "method": "gradient", "style": "signed"}  # fmt: skip
    got = png(client.get("/api/projection.png", params=params))
    expected = np.round(render_projection(x.grad[0], "signed") * 255)
    assert got.shape == (28, 28, 3)
    assert np.abs(got.astype(float) - expected).max() <= 1
    # Default location = the channel's arg-max on this input; methods differ on a deep unit.
    images = {}
    for method in METHODS:
        params.update(method=method, style="rgb")
        params.pop("location", None)
        images[method] = png(client.get("/api/projection.png", params=params))
    assert not np.array_equal(images["gradient"], images["deconvnet"])


def test_zf_grid_is_the_figure_of_the_library(client, model, data, atlas):
    from featurelens.figures import zf_grid

    r = client.get("/api/zf.png", params={"layer": "features.4", "channel": 3,
                                          "method": "guided", "style": "magnitude", "k": 3})  # fmt: skip
    expected = np.asarray(
        zf_grid(
            model, data, atlas, "features.4", 3, method="guided", k=3, style="magnitude"
        ).convert("RGB")
    )
    assert np.array_equal(png(r), expected)
    default = client.get("/api/zf.png", params={"layer": "features.0", "channel": 0})
    assert png(default).shape[0] > 0


def test_upload_of_a_dataset_digit_gives_the_same_activations(client, data):
    pixels = np.round((digit(data, 11)[0].numpy() * MNIST_STD + MNIST_MEAN) * 255)
    raw = image_bytes(pixels.astype(np.uint8))
    r = client.post("/api/inputs", content=raw, headers={"content-type": "image/png"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["input"].startswith("upload:") and (body["width"], body["height"]) == (28, 28)
    ours = client.get("/api/activations", params={"input": body["input"], "layer": "features.4"})
    theirs = client.get("/api/activations", params={"input": "dataset:11", "layer": "features.4"})
    np.testing.assert_allclose(ours.json()["channel_max"], theirs.json()["channel_max"],
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    shown = png(client.get("/api/input.png", params={"input": body["input"]}))
    assert np.abs(shown[..., 0].astype(float) - pixels).max() <= 1
    # Uploaded units project too.
    proj = client.get("/api/projection.png", params={"input": body["input"], "layer": "features.5",
                                                      "channel": 0, "method": "guided"})  # fmt: skip
    assert png(proj).shape == (28, 28, 3)


def test_upload_can_be_inverted(client, data):
    pixels = np.round((digit(data, 13)[0].numpy() * MNIST_STD + MNIST_MEAN) * 255)
    raw = image_bytes(255 - pixels.astype(np.uint8))  # dark strokes on light paper
    r = client.post("/api/inputs", params={"invert": 1}, content=raw,
                    headers={"content-type": "image/png"})  # fmt: skip
    assert r.status_code == 201, r.text
    shown = png(client.get("/api/input.png", params={"input": r.json()["input"]}))
    assert np.abs(shown[..., 0].astype(float) - pixels).max() <= 1
    bad = client.post("/api/inputs", params={"invert": "yes"}, content=raw)
    assert bad.status_code == 400 and "invert" in bad.json()["error"]


def test_upload_is_resized_and_converted_like_the_data(client, data):
    # An RGB JPEG of 4x the size: converted to grayscale, resized to 28x28.
    pixels = np.round((digit(data, 2)[0].numpy() * MNIST_STD + MNIST_MEAN) * 255).astype(np.uint8)
    big = np.repeat(np.repeat(pixels, 4, 0), 4, 1)
    rgb = np.stack([big, big, big], -1)
    r = client.post("/api/inputs", files={"file": ("digit.jpg", image_bytes(rgb, "JPEG"),
                                                    "image/jpeg")})  # fmt: skip
    assert r.status_code == 201, r.text
    assert (r.json()["width"], r.json()["height"]) == (112, 112)
    shown = png(client.get("/api/input.png", params={"input": r.json()["input"]}))
    assert shown.shape == (28, 28, 3)
    expected = np.asarray(Image.fromarray(big).resize((28, 28), Image.Resampling.BILINEAR))
    assert np.abs(shown[..., 0].astype(float) - expected).mean() < 6  # JPEG noise only


# --------------------------------------------------------------------------------------------
# Bad input: 4xx with a JSON error, never the catch-all


BAD_GETS = [
    ("/api/top", {"layer": "nope", "channel": 0}, 404, "unknown layer"),
    ("/api/top", {"layer": "features.0"}, 400, "channel"),
    ("/api/top", {"channel": 0}, 400, "layer"),
    ("/api/top", {"layer": "features.0", "channel": -1}, 404, "out of range"),
    ("/api/top", {"layer": "features.0", "channel": 4}, 404, "0..3"),
    ("/api/top", {"layer": "features.0", "channel": "1.5"}, 400, "not an integer"),
    ("/api/top", {"layer": "features.0", "channel": "9" * 40}, 404, "out of range"),
    ("/api/input.png", {}, 400, "input"),
    ("/api/input.png", {"input": "dataset:-1"}, 404, "out of range"),
    ("/api/input.png", {"input": f"dataset:{N_EXAMPLES}"}, 404, "0..39"),
    ("/api/input.png", {"input": "dataset:x"}, 400, "not an integer"),
    ("/api/input.png", {"input": "upload:0123456789abcdef"}, 404, "upload"),
    ("/api/input.png", {"input": "../../etc/passwd"}, 400, "dataset:INDEX"),
    ("/api/input.png", {"input": "file:/etc/passwd"}, 400, "dataset:INDEX"),
    ("/api/activations", {"input": "dataset:0", "layer": "features.1"}, 404, "features.4"),
    ("/api/activations", {"input": "dataset:0", "layer": "features.0", "scale": "x"}, 400, "scale"),
    ("/api/activations.png", {"input": "dataset:0"}, 400, "layer"),
    ("/api/unit", {"input": "dataset:0", "layer": "features.4", "channel": 0, "location": "1"},
     400, "2 spatial axes"),
    ("/api/unit", {"input": "dataset:0", "layer": "features.4", "channel": 0, "location": "14,0"},
     404, "out of range"),
    ("/api/unit", {"input": "dataset:0", "layer": "features.4", "channel": 0, "location": "a,b"},
     400, "integers"),
    ("/api/unit", {"input": "dataset:0", "layer": "head.1", "channel": 0, "location": "0"},
     400, "0 spatial axes"),
    ("/api/rf", {"layer": "features.4"}, 400, "location"),
    ("/api/rf", {"layer": "features.4", "location": "-1,0"}, 404, "out of range"),
    ("/api/rf", {"layer": "features.4", "location": "1,2,3"}, 400, "axes"),
    ("/api/projection.png", {"input": "dataset:0", "layer": "features.4", "channel": 0,
                             "method": "lrp"}, 400, "gradient"),
    ("/api/projection.png", {"input": "dataset:0", "layer": "features.4", "channel": 0,
                             "style": "jet"}, 400, "magnitude"),
    ("/api/projection.png", {"input": "dataset:0", "layer": "features.4", "channel": 6}, 404,
     "0..5"),
    ("/api/projection.png", {"input": "dataset:0", "layer": "features.4", "channel": 0,
                             "location": "99,0"}, 404, "out of range"),
    ("/api/zf.png", {"layer": "features.4", "channel": 0, "k": 0}, 400, "1..4"),
    ("/api/zf.png", {"layer": "features.4", "channel": 0, "k": 5}, 400, "1..4"),
    ("/api/zf.png", {"layer": "features.4", "channel": 0, "method": "x"}, 400, "deconvnet"),
    ("/api/nothing", {}, 404, ""),
    ("/static/missing.js", {}, 404, "missing.js"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "params", "status", "words"), BAD_GETS)
def test_bad_requests_get_a_json_4xx(client, path, params, status, words):
    r = client.get(path, params=params)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert words in error
    assert "Traceback" not in r.text


def test_wrong_http_method(client):
    assert client.post("/api/info").status_code == 405
    r = client.get("/api/inputs")
    assert r.status_code == 405 and "error" in r.json()


def _noise_png(side: int) -> bytes:
    rng = np.random.default_rng(0)
    return image_bytes(rng.integers(0, 256, (side, side), dtype=np.uint8))


@pytest.fixture(scope="module")
def strict_client(atlas_dir):
    app = create_app(atlas_dir, max_upload_bytes=4000, max_upload_pixels=100 * 100)
    with page_client(app) as c:
        yield c


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (_noise_png(120), "image/png", 413, "limit of 4000"),  # bytes
        (image_bytes(np.zeros((101, 100), np.uint8)), "image/png", 413, "pixels"),
        (b"GIF89a" + bytes(200), "image/gif", 415, "PNG or JPEG"),
        (image_bytes(np.zeros((8, 8), np.uint8), "GIF"), "image/gif", 415, "GIF"),
        (image_bytes(np.zeros((8, 8), np.uint8), "BMP"), "image/bmp", 415, "BMP"),
        (b"this is not an image", "image/png", 415, "PNG or JPEG"),
        (image_bytes(np.zeros((40, 40), np.uint8))[:60], "image/png", 415, "readable"),
        (b"", "image/png", 400, "empty"),
        (b"--x\r\ngarbage", "multipart/form-data; boundary=x", 400, "multipart"),
    ],
)  # fmt: skip
def test_bad_uploads_are_refused(strict_client, body, content_type, status, words):
    r = strict_client.post("/api/inputs", content=body, headers={"content-type": content_type})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_oversize_multipart_upload(strict_client):
    big = _noise_png(200)
    r = strict_client.post("/api/inputs", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413
    r = strict_client.post("/api/inputs", files={"note": (None, "hello")})
    assert r.status_code == 400 and "without a file" in r.json()["error"]
    small = image_bytes(np.zeros((50, 50), np.uint8))
    assert strict_client.post("/api/inputs", files={"f": ("a.png", small)}).status_code == 201


def test_unexpected_errors_are_json_without_traceback(atlas_dir, monkeypatch):
    app = create_app(atlas_dir)

    def boom():
        raise RuntimeError("secret internals /home/user/model.py line 3")

    monkeypatch.setattr(app.state.explorer, "info", boom)
    with page_client(app, raise_server_exceptions=False) as c:
        r = c.get("/api/info")
        assert r.status_code == 500
        assert r.json() == {"error": "internal error (RuntimeError); see the server log"}
        assert c.get("/api/top", params={"layer": "features.0", "channel": 0}).status_code == 200


def test_library_refusals_are_4xx(atlas_dir, atlas, data):
    # A model whose rectifier is a GELU: deconvnet/guided have no rule for it.
    gelu = atlas.build_model()
    gelu.features[4] = torch.nn.GELU()
    with page_client(create_app(atlas_dir, model=gelu, data=data)) as c:
        params = {"input": "dataset:0", "layer": "features.5", "channel": 0, "method": "guided"}
        r = c.get("/api/projection.png", params=params)
        assert r.status_code == 422 and "GELU" in r.json()["error"]
        params["method"] = "gradient"
        assert c.get("/api/projection.png", params=params).status_code == 200


# --------------------------------------------------------------------------------------------
# Serving, traversal, concurrency, caching, the atlas left alone


def _raw_get(
    port: int, target: str, host: str = "127.0.0.1", headers: dict[str, str] = PAGE_HEADERS
) -> tuple[int, bytes]:
    """Send ``GET target`` byte for byte (no client-side normalisation of ``..``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    status = int(response.split(b" ", 2)[1])
    return status, response


TRAVERSALS = [
    "/static/../server.py",
    "/static/%2e%2e/server.py",
    "/static/%2E%2E/server.py",
    "/static/%2e%2e%2fserver.py",
    "/static/..%2fserver.py",
    "/static/..%2f..%2fapp%2fserver.py",
    "/static/%252e%252e%252fserver.py",
    "/static/..%5cserver.py",
    "/static/.%2e/.%2e/app/server.py",
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/..",
    "/static/.",
    "/static/",
    "/../../../../etc/passwd",
    "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/%00app.js",
    "/static/app.js%00.png",
    "/static/../../atlas/manifest.json",
    "/static/%2e%2e/%2e%2e/%2e%2e/tiny_model.py",
    "/api/../tiny_model.py",
    "/manifest.json",
    "/tiny_model.py",
    "/atlas/manifest.json",
]


@pytest.fixture(scope="module")
def live(atlas_dir):
    server = serve(atlas_dir, port=0)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("target", TRAVERSALS)
def test_path_traversal_is_refused(live, target):
    status, response = _raw_get(live.port, target)
    assert status in (400, 404), response[:300]
    for secret in (b"def create_app", b"root:", b"featurelens-atlas", b"def tiny"):
        assert secret not in response


def test_serve_binds_loopback_and_stops(atlas_dir):
    server = serve(atlas_dir, port=0)
    try:
        assert server.host == "127.0.0.1" and server.url == f"http://127.0.0.1:{server.port}/"
        status, response = _raw_get(server.port, "/api/info")
        assert status == 200 and json.loads(response.split(b"\r\n\r\n", 1)[1])["layers"]
        assert server.running
    finally:
        server.stop()
    assert not server.running
    with pytest.raises(OSError):
        _raw_get(server.port, "/api/info")


def test_foreign_host_headers_are_refused(live):
    # DNS rebinding: a page on evil.example resolving to 127.0.0.1 must not read the API.
    status, response = _raw_get(live.port, "/api/info", host="evil.example")
    assert status == 400 and b"not allowed" in response and b"layers" not in response
    for host in ("localhost", "127.0.0.1"):
        assert _raw_get(live.port, "/api/info", host=host)[0] == 200


def test_signals_are_drawn_as_strips(tmp_path):
    # A 1-D model over a plain tensor (no data spec): maps are rows, locations one int.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Conv1d(2, 3, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool1d(2)
        ).eval()
        signals = torch.randn(12, 2, 32)
    featurelens.scan(net, signals, ["2"], top_k=3, progress=False).save(tmp_path / "atlas")
    with page_client(create_app(tmp_path / "atlas", model=net, data=signals)) as c:
        shown = png(c.get("/api/input.png", params={"input": "dataset:4"}))
        assert shown.shape == (1, 32, 3)
        layout = c.get("/api/activations", params={"input": "dataset:4", "layer": "2"}).json()
        assert layout["map_shape"] == [1, 16] and layout["spatial_dims"] == 1
        with torch.no_grad():
            ref = net(signals[4:5])[0]
        np.testing.assert_allclose(layout["channel_max"], ref.max(1).values, rtol=1e-5)
        unit = c.get("/api/unit", params={"input": "dataset:4", "layer": "2", "channel": 1})
        peak = int(ref[1].argmax())
        assert unit.json()["location"] == [peak]
        assert unit.json()["rf"]["interval"] == [[2 * peak - 2, 2 * peak + 3]]
        sprite = png(c.get("/api/activations.png", params={"input": "dataset:4", "layer": "2"}))
        assert sprite.shape == (3 * 2 - 1, 16, 3)  # three one-pixel rows, one-pixel gaps
        upload = c.post("/api/inputs", content=image_bytes(np.zeros((8, 8), np.uint8)),
                        headers={"content-type": "image/png"})  # fmt: skip
        assert upload.status_code == 422 and "2-D image" in upload.json()["error"]


class _Flaky(torch.utils.data.Dataset):
    """The atlas's digits, but item 3 fails to load, item 4 has the wrong shape, 6 is NaN."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if index == 3:
            raise OSError("truncated file digits/3.png")
        if index == 4:
            return torch.zeros(3, 8, 8), 0
        if index == 6:
            return torch.full((1, 28, 28), float("nan")), 0
        return self.data[index]


def test_examples_that_fail_to_load_are_4xx(atlas_dir, model, data):
    with page_client(create_app(atlas_dir, model=model, data=_Flaky(data))) as c:
        r = c.get("/api/input.png", params={"input": "dataset:3"})
        assert r.status_code == 422 and "truncated file" in r.json()["error"]
        r = c.get("/api/activations", params={"input": "dataset:4", "layer": "features.0"})
        assert r.status_code == 422 and "(1, 28, 28)" in r.json()["error"]
        assert c.get("/api/input.png", params={"input": "dataset:5"}).status_code == 200
        # NaN activations: null in JSON, drawn as zero, never the arg-max.
        nan = {"input": "dataset:6", "layer": "features.4"}
        layout = c.get("/api/activations", params=nan).json()
        assert layout["channel_max"] == [None] * 6
        assert png(c.get("/api/activations.png", params=nan)).shape[0] > 14
        unit = c.get("/api/unit", params={**nan, "channel": 0}).json()
        assert unit["value"] is None and unit["location"] == [0, 0]


class _Untraceable(torch.nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so no receptive-field geometry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.conv(x)


def test_models_without_geometry_still_work(tmp_path):
    net = _Untraceable().eval()
    images = torch.rand(5, 1, 9, 9)
    featurelens.scan(net, images, ["conv"], top_k=2, progress=False).save(tmp_path / "atlas")
    with page_client(create_app(tmp_path / "atlas", model=net, data=images)) as c:
        info = c.get("/api/info").json()
        assert info["layers"][0]["rf"] is None and "trace" in info["layers"][0]["rf_error"]
        unit = c.get("/api/unit", params={"input": "dataset:1", "layer": "conv", "channel": 1})
        assert unit.status_code == 200 and unit.json()["rf"] is None
        r = c.get("/api/rf", params={"layer": "conv", "location": "0,0"})
        assert r.status_code == 422 and "no receptive field" in r.json()["error"]
        params = {"input": "dataset:1", "layer": "conv", "channel": 1, "method": "gradient"}
        with pytest.warns(UserWarning):  # the projection falls back to the whole input
            assert png(c.get("/api/projection.png", params=params)).shape == (9, 9, 3)


class _Tracking(torch.nn.Module):
    """Wraps the atlas model: counts forwards and the most that ever ran at once."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.features, self.head = inner.features, inner.head
        self.active = 0
        self.most = 0
        self.calls = 0
        self._lock = threading.Lock()

    def forward(self, x):
        with self._lock:
            self.active += 1
            self.calls += 1
            self.most = max(self.most, self.active)
        try:
            threading.Event().wait(0.002)  # widen the window in which a race would show
            return self.head(self.features(x))
        finally:
            with self._lock:
                self.active -= 1


def test_concurrent_requests_are_serialised_and_correct(atlas_dir, atlas, data):
    from conftest import snapshot

    tracked = _Tracking(atlas.build_model())
    before = snapshot(tracked)
    server = serve(atlas_dir, port=0, model=tracked, data=data)
    urls = []
    for i in range(6):
        for layer in ("features.0", "features.4"):
            urls.append(f"api/activations.png?input=dataset:{i}&layer={layer}")
        urls.append(f"api/projection.png?input=dataset:{i}&layer=features.5&channel={i % 6}"
                    f"&method={list(METHODS)[i % 3]}")  # fmt: skip
        urls.append(f"api/unit?input=dataset:{i}&layer=features.4&channel=1")
    urls.append("api/zf.png?layer=features.4&channel=2&k=2")
    try:
        import httpx

        with (
            httpx.Client(base_url=server.url, headers=PAGE_HEADERS, timeout=60) as http,
            ThreadPoolExecutor(8) as pool,
        ):
            concurrent = list(pool.map(lambda u: http.get(u), urls))
    finally:
        server.stop()
    assert all(r.status_code == 200 for r in concurrent), [r.text for r in concurrent][:3]
    assert tracked.most == 1  # never two forwards at once on the shared model
    from conftest import assert_unchanged

    assert_unchanged(tracked, before)
    # The same answers one request at a time, from a fresh app (no shared cache).
    with page_client(create_app(atlas_dir, model=atlas.build_model(), data=data)) as c:
        for url, r in zip(urls, concurrent):
            assert c.get("/" + url).content == r.content, url


def test_results_are_cached_per_input_and_unit(atlas_dir, atlas, data):
    tracked = _Tracking(atlas.build_model())
    app = create_app(atlas_dir, model=tracked, data=data)
    tracked.calls = 0  # torch.fx tracing for the receptive fields calls forward() too
    with page_client(app) as c:
        params = {"input": "dataset:1", "layer": "features.4"}
        c.get("/api/activations", params=params)
        c.get("/api/activations.png", params=params)
        c.get("/api/unit", params={**params, "channel": 3})
        assert tracked.calls == 1  # one forward serves the stats, the sprite and the unit
        unit = {**params, "channel": 3, "method": "guided"}
        first = c.get("/api/projection.png", params=unit).content
        calls = tracked.calls
        assert c.get("/api/projection.png", params=unit).content == first
        assert tracked.calls == calls
        c.get("/api/activations", params={**params, "input": "dataset:2"})
        assert tracked.calls == calls + 1


def test_the_atlas_directory_is_never_written(tmp_path):
    atlas_dir = make_atlas(tmp_path)
    before = dir_state(atlas_dir)
    parent_before = sorted(p.name for p in tmp_path.iterdir())
    app = create_app(atlas_dir)
    with page_client(app) as c:
        layer = {"layer": "features.4"}
        for path, params in [
            ("/", {}),
            ("/api/info", {}),
            ("/api/top", {**layer, "channel": 0}),
            ("/api/input.png", {"input": "dataset:0"}),
            ("/api/activations", {"input": "dataset:0", **layer}),
            ("/api/activations.png", {"input": "dataset:0", **layer}),
            ("/api/unit", {"input": "dataset:0", **layer, "channel": 0}),
            ("/api/rf", {**layer, "location": "1,1"}),
            ("/api/projection.png", {"input": "dataset:0", **layer, "channel": 0}),
            ("/api/zf.png", {**layer, "channel": 0, "k": 2}),
        ]:
            assert c.get(path, params=params).status_code == 200, path
        up = c.post("/api/inputs", content=image_bytes(np.zeros((28, 28), np.uint8)),
                    headers={"content-type": "image/png"})  # fmt: skip
        assert up.status_code == 201
        for path, params, *_ in BAD_GETS:
            c.get(path, params=params)
    assert dir_state(atlas_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == parent_before


# --------------------------------------------------------------------------------------------
# CLI


def test_cli_serve_arguments():
    from featurelens.cli import build_parser

    args = build_parser().parse_args(["serve", "some/atlas"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    args = build_parser().parse_args(["serve", "a", "--host", "0.0.0.0", "--port", "0"])
    assert (args.host, args.port) == ("0.0.0.0", 0)


def test_cli_serve_missing_atlas_is_one_line(tmp_path, capsys):
    from featurelens.cli import main

    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_cli_serve_runs_until_interrupted(atlas_dir):
    import signal

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "featurelens.cli", "serve", str(atlas_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        port = int(line.rsplit(":", 1)[1].strip().strip("/"))
        status, _ = _raw_get(port, "/api/info")
        assert status == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------
# Model dtype, channels-last layers, one arg-max rule


def test_a_float64_model_works_end_to_end_and_agrees_with_the_scan(tmp_path):
    # Two peaks 1e-12 apart: equal in float32, ordered in float64. The scan (float64) stores
    # the second; the explorer must find the same one, so it must run in the model's dtype.
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.ReLU()).double().eval()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
    images = torch.zeros(3, 1, 6, 5, dtype=torch.float64)
    images[:, 0, 1, 1] = 1.0
    images[:, 0, 4, 2] = 1.0 + 1e-12
    images[2] = 0.0  # example 2: NaN first, then two equal peaks: the first one wins
    images[2, 0, 0, 0] = float("nan")
    images[2, 0, 2, 1] = images[2, 0, 3, 3] = 1.0
    atlas = featurelens.scan(net, images, ["0", "1"], top_k=3, progress=False)
    assert atlas.top("1", 0)[0].location == (4, 2)
    assert [h.location for h in atlas.top("1", 0) if h.index == 2] == [(2, 1)]
    atlas.save(tmp_path / "atlas")
    with page_client(create_app(tmp_path / "atlas", model=net, data=images)) as c:
        base = {"input": "dataset:1", "layer": "1"}
        layout = c.get("/api/activations", params=base).json()
        assert layout["channel_argmax"] == [[4, 2], [4, 2]]
        unit = c.get("/api/unit", params={**base, "channel": 0}).json()
        assert unit["location"] == [4, 2] and unit["value"] == 1.0 + 1e-12
        params = {**base, "channel": 1, "method": "gradient", "style": "signed"}
        shown = png(c.get("/api/projection.png", params=params))
        x = images[1:2].clone().requires_grad_(True)
        net(x)[0, 1, 4, 2].backward()
        expected = render_projection(x.grad[0].detach(), "signed")
        np.testing.assert_array_equal(shown, np.round(expected * 255).astype(np.uint8))
        zf = c.get("/api/zf.png", params={"layer": "1", "channel": 0, "k": 2})
        assert zf.status_code == 200
        nan_tie = {"input": "dataset:2", "layer": "1"}
        assert c.get("/api/activations", params=nan_tie).json()["channel_argmax"][0] == [2, 1]
        unit = c.get("/api/unit", params={**nan_tie, "channel": 0}).json()
        assert unit["location"] == [2, 1]


def _permuting(channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.conv = torch.nn.Conv2d(1, 3, 3)
    net.permute = Permute(0, 2, 3, 1) if channels_last else torch.nn.Identity()
    net.back = Permute(0, 3, 1, 2) if channels_last else torch.nn.Identity()
    net.relu = torch.nn.ReLU()
    return net.eval()


def test_a_channels_last_layer_is_refused_with_the_library_message(tmp_path):
    images = torch.rand(4, 1, 9, 8)
    featurelens.scan(_permuting(False), images, ["permute", "relu"], top_k=2, progress=False).save(
        tmp_path / "atlas"
    )
    with page_client(create_app(tmp_path / "atlas", model=_permuting(True), data=images)) as c:
        for path, extra in (
            ("/api/activations", {}),
            ("/api/unit", {"channel": 0}),
            ("/api/projection.png", {"channel": 0}),
            ("/api/zf.png", {"channel": 0}),
        ):
            params = {"input": "dataset:0", "layer": "permute", **extra}
            r = c.get(path, params=params)
            assert r.status_code == 422, (path, r.text)
            assert "'permute' outputs its channels at dim 3" in r.json()["error"]
        ok = c.get("/api/unit", params={"input": "dataset:0", "layer": "relu", "channel": 2})
        assert ok.status_code == 200


# --------------------------------------------------------------------------------------------
# Who may ask: the origin rule, the Host check, the token, the security headers

OWN_HOST = "127.0.0.1:8000"
TOKEN = "test-token-0123456789abcdef"

# (method, path, headers besides Host, allowed): the rule of featurelens.app.http.refusal.
ORIGIN_RULE = [
    # The page, in a browser that sends fetch metadata (to loopback and HTTPS servers).
    ("GET", "/api/info", {"sec-fetch-site": "same-origin"}, True),
    ("POST", "/api/inputs", {"sec-fetch-site": "same-origin", "origin": "http://127.0.0.1:8000"},
     True),
    # The page where the browser sends none (plain HTTP to another machine): its header.
    ("GET", "/api/projection.png", {"x-featurelens": "1"}, True),
    ("POST", "/api/inputs", {"x-featurelens": "1", "origin": "http://127.0.0.1:8000"}, True),
    ("POST", "/api/inputs", {"x-featurelens": "1", "origin": "https://127.0.0.1:8000"}, True),
    # A person typing an API address; a program (curl, a script, these tests).
    ("GET", "/api/info", {"sec-fetch-site": "none"}, True),
    ("GET", "/api/info", {"x-featurelens": "1"}, True),
    ("GET", "/api/info", {}, False),
    ("POST", "/api/inputs", {}, False),
    ("GET", "/api/info", {"x-featurelens": ""}, False),
    # Another page: <img>, no-cors fetch, a form; a page on another port of the same machine is
    # "same-site" but another origin.
    ("GET", "/api/projection.png", {"sec-fetch-site": "cross-site"}, False),
    ("GET", "/api/projection.png", {"sec-fetch-site": "same-site"}, False),
    ("GET", "/api/projection.png", {"sec-fetch-site": "same-site", "x-featurelens": "1"}, False),
    ("POST", "/api/inputs", {"sec-fetch-site": "same-site", "origin": "http://127.0.0.1:9999"},
     False),
    ("POST", "/api/inputs", {"origin": "http://evil.example"}, False),  # no fetch metadata
    ("POST", "/api/inputs", {"origin": "http://evil.example", "x-featurelens": "1"}, False),
    ("POST", "/api/inputs", {"origin": "http://127.0.0.1:9999", "x-featurelens": "1"}, False),
    ("POST", "/api/inputs", {"origin": "null", "x-featurelens": "1"}, False),
    ("POST", "/api/inputs", {"sec-fetch-site": "none", "x-featurelens": "1"}, False),
    ("GET", "/api/info", {"sec-fetch-site": "same-origin", "origin": "http://evil.example"},
     False),
    ("OPTIONS", "/api/inputs", {"sec-fetch-site": "cross-site", "origin": "http://evil.example",
                                "access-control-request-headers": "x-featurelens"}, False),
    # The page and its files: from anywhere (a link), nothing needed.
    ("GET", "/", {"sec-fetch-site": "cross-site"}, True),
    ("GET", "/static/app.js", {"sec-fetch-site": "cross-site"}, True),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "headers", "allowed"), ORIGIN_RULE)
def test_the_origin_rule(method, path, headers, allowed):
    from featurelens.app.http import refusal

    why = refusal(method, path, {"host": OWN_HOST, **headers})
    assert (why is None) == allowed, why
    if not allowed:
        assert "refused" in why or "X-Featurelens" in why


def test_cross_site_requests_cause_no_work(atlas_dir):
    app = create_app(atlas_dir)
    ex = app.state.explorer
    raw = image_bytes(np.zeros((28, 28), np.uint8))
    unit = {"input": "dataset:0", "layer": "features.4", "channel": 1, "method": "guided"}
    with TestClient(app, base_url=BASE_URL) as c:  # a browser, sending what browsers send
        before = (ex.cache.misses, ex.uploads_added)
        foreign = "http://127.0.0.1:9999"
        attacks = [
            # no-cors POSTs from a page on another port, a form-like multipart one from afar
            c.post("/api/inputs", content=raw, headers={
                "content-type": "text/plain", "origin": foreign, "sec-fetch-site": "same-site"}),
            c.post("/api/inputs", files={"f": ("a.png", raw, "image/png")},
                   headers={"origin": "http://evil.example"}),
            # <img src=.../api/projection.png> on another site, and over plain HTTP (no metadata)
            c.get("/api/projection.png", params=unit,
                  headers={"sec-fetch-site": "cross-site", "sec-fetch-dest": "image"}),
            c.get("/api/projection.png", params=unit),
            c.get("/api/info", headers={"sec-fetch-site": "same-site"}),
            # a CORS preflight for the header: refused, and never granted
            c.options("/api/inputs", headers={
                "origin": foreign, "sec-fetch-site": "same-site",
                "access-control-request-method": "POST",
                "access-control-request-headers": "x-featurelens"}),
        ]  # fmt: skip
        assert [r.status_code for r in attacks] == [403] * len(attacks)
        assert all("error" in r.json() for r in attacks)
        assert not any("access-control-allow-origin" in r.headers for r in attacks)
        assert (ex.cache.misses, ex.uploads_added) == before
        assert app.state.refusals["origin"] == len(attacks)
        # The same requests from the page do the work: the counters can move.
        page = c.get("/api/projection.png", params=unit, headers={"sec-fetch-site": "same-origin"})
        assert page.status_code == 200 and ex.cache.misses > before[0]
        up = c.post("/api/inputs", content=raw, headers={
            "content-type": "image/png", "origin": "http://127.0.0.1:8000", **PAGE_HEADERS})  # fmt: skip
        assert up.status_code == 201 and ex.uploads_added == before[1] + 1


def test_security_headers_on_every_answer(atlas_dir, monkeypatch):
    from featurelens.app.http import SECURITY_HEADERS

    csp = SECURITY_HEADERS["Content-Security-Policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "object-src 'none'",
                      "frame-ancestors 'none'", "base-uri 'none'"):  # fmt: skip
        assert directive in csp
    assert "unsafe" not in csp
    app = create_app(atlas_dir)
    monkeypatch.setattr(app.state.explorer, "rf", lambda *a: 1 / 0)  # a bug: the catch-all
    with page_client(app, raise_server_exceptions=False) as c:
        answers = {
            "page": c.get("/"),
            "script": c.get("/static/app.js"),
            "json": c.get("/api/top", params={"layer": "features.0", "channel": 0}),
            "png": c.get("/api/input.png", params={"input": "dataset:0"}),
            "404": c.get("/api/nothing"),
            "400": c.get("/api/top"),
            "405": c.post("/api/info"),
            "403": c.get("/api/info", headers={"sec-fetch-site": "cross-site"}),
            "host": c.get("/api/info", headers={"host": "evil.example"}),
            "500": c.get("/api/rf", params={"layer": "features.0", "location": "0,0"}),
        }
    statuses = {name: r.status_code for name, r in answers.items()}
    assert statuses == {"page": 200, "script": 200, "json": 200, "png": 200, "404": 404,
                        "400": 400, "405": 405, "403": 403, "host": 400, "500": 500}  # fmt: skip
    for name, r in answers.items():
        for key, value in SECURITY_HEADERS.items():
            assert r.headers.get(key) == value, (name, key)
        assert r.headers["x-content-type-options"] == "nosniff"


def test_the_page_has_no_inline_script_and_builds_no_html_from_strings():
    import re

    from featurelens.app.http import STATIC_DIR

    html = (STATIC_DIR / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son[a-z]+\s*=", html, re.I)  # no inline event handlers
    assert not re.search(r"\sstyle\s*=", html, re.I) and "<style" not in html
    assert not re.search(r"javascript:", html, re.I)
    code = re.sub(r"(^|\s)//.*$", "", (STATIC_DIR / "app.js").read_text(), flags=re.M)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "setTimeout(\"", ".setAttribute(\"on", "srcdoc"):  # fmt: skip
        assert sink not in code, sink
    assert "textContent" in code  # how server text gets into the page
    assert code.count("fetch(") == 1 and "X-Featurelens" in code  # one fetch, with the header


def test_a_token_guards_the_page_and_the_api(atlas_dir):
    app = create_app(atlas_dir, token=TOKEN)
    unit = {"input": "dataset:0", "layer": "features.4", "channel": 0}
    with page_client(app) as c:
        refused = c.get("/")
        assert refused.status_code == 403 and "text/plain" in refused.headers["content-type"]
        assert "?token=" in refused.text
        assert c.get("/api/info").status_code == 403
        assert c.get("/static/app.js").status_code == 200  # the package's own files
        assert c.get("/", params={"token": "wrong-token-0123456789ab"}).status_code == 403
        page = c.get("/", params={"token": TOKEN})
        assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
        cookie = page.headers["set-cookie"]
        assert cookie.startswith(f"featurelens-token-8000={TOKEN};")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert c.get("/api/info").status_code == 200  # the client keeps the cookie, as a browser
        assert c.get("/api/unit", params=unit).status_code == 200
        c.cookies.clear()
        assert c.get("/api/info").status_code == 403
        assert c.get("/api/info", params={"token": TOKEN}).status_code == 200
        assert c.get("/api/info", headers={"authorization": f"token {TOKEN}"}).status_code == 200
        assert c.get("/api/info", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        wrong = f"token {TOKEN[:-1]}x"
        assert c.get("/api/info", headers={"authorization": wrong}).status_code == 403
        # The token is no pass for another origin: a page on another port of this machine
        # (same site, so the browser sends the cookie) is still refused, before the token.
        other = c.get("/api/projection.png", params=unit, headers={
            "sec-fetch-site": "same-site", "cookie": f"featurelens-token-8000={TOKEN}"})  # fmt: skip
        assert other.status_code == 403 and "Sec-Fetch-Site" in other.json()["error"]
    assert app.state.refusals["token"] == 5 and app.state.refusals["origin"] == 1


@pytest.mark.parametrize("token", ["short", "x" * 15, "with space 0123456789", "é" * 20, 10**20])
def test_weak_tokens_are_refused(atlas_dir, token):
    from featurelens.app.http import check_token
    from featurelens.errors import UsageError

    with pytest.raises(UsageError, match="at least 16 characters"):
        check_token(token)
    with pytest.raises(UsageError):
        create_app(atlas_dir, token=token)
    assert check_token("a" * 16) == "a" * 16


def test_serve_off_loopback_needs_a_token_and_names_the_machine(atlas_dir, model, data):
    from featurelens.app.server import machine_hosts
    from featurelens.errors import UsageError

    with pytest.raises(UsageError, match="needs an access token"):
        serve(atlas_dir, host="0.0.0.0", port=0, model=model, data=data, token=False)
    names = machine_hosts("0.0.0.0")
    assert names[:3] == ("127.0.0.1", "localhost", "[::1]")
    assert socket.gethostname().lower() in names
    for info in socket.getaddrinfo(socket.gethostname(), None):
        address = info[4][0]
        assert (f"[{address}]" if ":" in address else address) in names
    assert "192.0.2.7" in machine_hosts("192.0.2.7")  # the address bound to, if specific
    # On loopback: no token unless asked for; a token asked for is in the URL.
    with serve(atlas_dir, port=0, model=model, data=data) as server:
        assert server.token is None and server.url == server.base_url
    with serve(atlas_dir, port=0, model=model, data=data, token=True) as server:
        assert len(server.token) >= 32 and server.url == f"{server.base_url}?token={server.token}"
        assert _raw_get(server.port, "/api/info")[0] == 403
        assert _raw_get(server.port, f"/api/info?token={server.token}")[0] == 200


def test_serving_on_every_interface_needs_the_host_and_the_token(atlas_dir):
    import signal
    from urllib.parse import parse_qs, urlsplit

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FEATURELENS_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "featurelens.cli", "serve", str(atlas_dir), "--host", "0.0.0.0",
         "--port", "0", "--allow-host", "Explorer.Example"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # featurelens explorer: http://HOSTNAME:PORT/?token=...
        assert line.startswith("featurelens explorer: http://"), line + proc.stderr.read()
        url = urlsplit(line.split(": ", 1)[1].strip())
        port, token = url.port, parse_qs(url.query)["token"][0]
        assert url.hostname == socket.gethostname().lower() and len(token) >= 32
        assert proc.stdout.readline().strip() == f"or: http://127.0.0.1:{port}/?token={token}"
        # A foreign Host (DNS rebinding) learns nothing, token or not.
        for target in ("/api/info", f"/api/info?token={token}", f"/?token={token}"):
            status, response = _raw_get(port, target, host="evil.example")
            assert status == 400 and b"layers" not in response and b"tiny" not in response
        # The machine's names and the one allowed: the token is required.
        for host in ("127.0.0.1", "localhost", socket.gethostname(), "explorer.example"):
            assert _raw_get(port, "/api/info", host=host)[0] == 403, host
            assert _raw_get(port, "/", host=host, headers={})[0] == 403, host
            status, response = _raw_get(port, f"/api/info?token={token}", host=host)
            assert status == 200 and b'"layers"' in response, host
        assert _raw_get(port, "/api/info?token=" + "x" * len(token))[0] == 403
        # The page: the printed URL sets the cookie, and the cookie opens the API.
        status, response = _raw_get(port, f"/?token={token}", headers={})
        head = response.split(b"\r\n\r\n", 1)[0].decode()
        cookie = next(v for k, v in (h.split(": ", 1) for h in head.split("\r\n")[1:])
                      if k.lower() == "set-cookie")  # fmt: skip
        assert status == 200 and "HttpOnly" in cookie and "SameSite=strict" in cookie
        name_value = cookie.split(";", 1)[0]
        assert _raw_get(port, "/api/info", headers={**PAGE_HEADERS, "Cookie": name_value})[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_takes_the_token_from_the_environment(atlas_dir):
    import signal

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FEATURELENS_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "featurelens.cli", "serve", str(atlas_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.strip().endswith(f"/?token={TOKEN}"), line + proc.stderr.read()
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        assert _raw_get(port, "/api/info")[0] == 403
        assert _raw_get(port, f"/api/info?token={TOKEN}")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_refuses_a_weak_token_in_one_line(atlas_dir, monkeypatch, capsys):
    from featurelens.cli import main

    monkeypatch.setenv("FEATURELENS_TOKEN", "short")
    assert main(["serve", str(atlas_dir), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "at least 16 characters" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# What answers say: no absolute paths, no object reprs


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_info_names_no_absolute_path(client, atlas_dir):
    info = client.get("/api/info").json()
    assert info["model"]["spec"] == "tiny_model.py:tiny"  # the manifest has the absolute path
    assert info["data"]["spec"] == "tiny_model.py:digits"
    assert Atlas.load(atlas_dir).model_spec.spec == f"{atlas_dir.parent}/tiny_model.py:tiny"
    strings = _strings(info)
    assert not any(str(atlas_dir.parent) in s or s.startswith("/") for s in strings)


class _Reader:
    """An object with the default repr (with its address)."""


class _Leaky(torch.utils.data.Dataset):
    """The atlas's digits, but item 3 fails with a message naming a path and an object."""

    def __init__(self, data, secret: Path) -> None:
        self.data, self.secret = data, secret

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if index == 3:
            raise OSError(f"cannot read {self.secret / 'digits' / '3.png'} with {_Reader()!r}")
        return self.data[index]


@pytest.mark.parametrize(
    ("message", "sent", "expected"),
    [
        ("<featurelens.x.Thing object at 0x7f3a2b1c9d>", "", "<Thing object>"),
        ("<function f at 0x7f3a2b1c9d>", "", "<function f>"),
        ("id 0x7f3a2b1c9d0e", "", "id 0x..."),
        ("at /home/me/nets/model.py:12 (if x)", "", "at .../model.py:12 (if x)"),
        ("spec '/srv/x/m.py:build' failed", "", "spec '.../m.py:build' failed"),
        ("no file C:\\Users\\me\\m.py", "", "no file .../m.py"),
        ("input '/etc/passwd' is not valid", "/api/input.png?input=/etc/passwd",
         "input '/etc/passwd' is not valid"),
        ("truncated file digits/3.png", "", "truncated file digits/3.png"),
        ("see /api/zf.png or /static/app.js", "", "see /api/zf.png or /static/app.js"),
        ("open http://HOST:PORT/?token=...", "", "open http://HOST:PORT/?token=..."),
        ("k=1/2 of 3 and/or 4", "", "k=1/2 of 3 and/or 4"),
    ],
)  # fmt: skip
def test_scrub(message, sent, expected):
    from featurelens.app.http import scrub

    assert scrub(message, sent) == expected


def test_error_messages_carry_no_paths_or_reprs(tmp_path, atlas_dir, model, data):
    secret = tmp_path / "private-project"
    app = create_app(atlas_dir, model=model, data=_Leaky(data, secret))
    with page_client(app) as c:
        r = c.get("/api/input.png", params={"input": "dataset:3"})
        error = r.json()["error"]
        assert r.status_code == 422 and "cannot read .../3.png with <_Reader object>" in error
        assert str(tmp_path) not in error and "0x" not in error and "test_app." not in error
        # A path the client sent itself is quoted back.
        r = c.get("/api/input.png", params={"input": "/etc/passwd"})
        assert r.status_code == 400 and "'/etc/passwd'" in r.json()["error"]
    # torch.fx names the model's source file in its message (with an absolute path).
    net, images = _Untraceable().eval(), torch.rand(3, 1, 9, 9)
    featurelens.scan(net, images, ["conv"], top_k=2, progress=False).save(tmp_path / "atlas")
    app = create_app(tmp_path / "atlas", model=net, data=images)
    here = str(Path(__file__).parent)
    assert here in app.state.explorer.field_errors["conv"]  # the library's message has it
    with page_client(app) as c:
        rf_error = c.get("/api/info").json()["layers"][0]["rf_error"]
        r = c.get("/api/rf", params={"layer": "conv", "location": "0,0"})
        assert r.status_code == 422
        for text in (rf_error, r.json()["error"]):
            assert ".../test_app.py:" in text and here not in text


# --------------------------------------------------------------------------------------------
# Never a 500 for what an atlas, a model or a request can contain


class _InfiniteOut(torch.nn.Module):
    """A conv whose outputs are all infinite (or NaN where the conv gives 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.out = torch.nn.Identity()

    def forward(self, x):
        return self.out(self.conv(x) * float("inf"))


def _odd_apps(tmp_path: Path, atlas_dir: Path, model, data) -> dict[str, tuple[object, dict]]:
    """Apps over atlases and models the explorer must answer without a 500, with a valid unit."""
    torch.manual_seed(0)
    apps = {}

    def add(name, net, inputs, layers, unit):
        featurelens.scan(net, inputs, layers, top_k=2, progress=False).save(tmp_path / name)
        apps[name] = (create_app(tmp_path / name, model=net, data=inputs), unit)

    signal = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 5, padding=2), torch.nn.ReLU()).eval()
    add("signal", signal, torch.randn(6, 2, 32), ["1"], {"layer": "1", "channel": 1})
    volume = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.ReLU()).eval()
    add("volume", volume, torch.randn(4, 1, 6, 7, 8), ["1"], {"layer": "1", "channel": 0})
    add("infinite", _InfiniteOut().eval(), torch.rand(4, 1, 9, 9), ["out"],
        {"layer": "out", "channel": 1})  # fmt: skip
    add("untraceable", _Untraceable().eval(), torch.rand(4, 1, 9, 9), ["conv"],
        {"layer": "conv", "channel": 1})  # fmt: skip
    images = torch.rand(4, 1, 9, 8)
    featurelens.scan(_permuting(False), images, ["permute", "relu"], top_k=2,
                     progress=False).save(tmp_path / "channels-last")  # fmt: skip
    apps["channels-last"] = (
        create_app(tmp_path / "channels-last", model=_permuting(True), data=images),
        {"layer": "permute", "channel": 0},
    )
    lacking = copy.deepcopy(model)
    lacking.head = torch.nn.Sequential(torch.nn.Flatten())
    apps["lacking"] = (create_app(atlas_dir, model=lacking, data=data),
                       {"layer": "head.1", "channel": 0})  # fmt: skip
    apps["flaky"] = (create_app(atlas_dir, model=model, data=_Flaky(data)),
                     {"layer": "features.4", "channel": 0})  # fmt: skip
    return apps


ODD_VALUES = ["", "-1", "0", "1", "99999999999999999999", "1e3", "nan", "x", "0,0", "0,0,0",
              "-1,-1", ",", "dataset:", "upload:", "dataset:3", "dataset:-0", "\u00e9\u00e9",
              "<script>", "../../etc/passwd", "%00"]  # fmt: skip


API_GETS = ("/api/info", "/api/top", "/api/input.png", "/api/activations", "/api/activations.png",
            "/api/unit", "/api/rf", "/api/projection.png", "/api/zf.png")  # fmt: skip


@pytest.mark.filterwarnings("ignore::featurelens.errors.CropWarning")  # the untraceable model
def test_no_answer_is_a_500_for_odd_models_and_data(tmp_path, atlas_dir, model, data):
    # raise_server_exceptions=True: a request reaching the catch-all raises here.
    for name, (app, unit) in _odd_apps(tmp_path, atlas_dir, model, data).items():
        statuses = set()
        with page_client(app) as c:
            base = {"input": "dataset:3", **unit, "k": "2"}
            for path in API_GETS:
                for params in (base, {**base, "input": "dataset:4", "location": "0,0"},
                               {**base, "method": "deconvnet", "style": "signed"}):  # fmt: skip
                    r = c.get(path, params=params)
                    assert r.status_code < 500, (name, path, params, r.text)
                    statuses.add(r.status_code)
            assert c.post("/api/inputs", content=b"\x89PNG\r\n").status_code < 500
        assert 200 in statuses, name  # each app answers some requests


def test_no_answer_is_a_500_for_odd_parameters(client):
    base = {"input": "dataset:3", "layer": "features.4", "channel": "1", "location": "2,3",
            "k": "1", "method": "gradient", "style": "rgb"}  # fmt: skip
    uses = {"/api/top": "layer channel", "/api/input.png": "input",
            "/api/activations": "input layer scale", "/api/activations.png": "input layer scale",
            "/api/unit": "input layer channel location", "/api/rf": "layer location",
            "/api/projection.png": "input layer channel location method style",
            "/api/zf.png": "layer channel method style k"}  # fmt: skip
    for path, keys in uses.items():
        for key in keys.split():
            for value in ODD_VALUES:
                r = client.get(path, params={**base, key: value})
                assert r.status_code < 500, (path, key, value, r.text)


def test_projections_of_signals_are_strips_and_of_volumes_a_422(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 5, padding=2), torch.nn.ReLU()).eval()
    signals = torch.randn(6, 2, 32)
    featurelens.scan(net, signals, ["1"], top_k=2, progress=False).save(tmp_path / "signal")
    with page_client(create_app(tmp_path / "signal", model=net, data=signals)) as c:
        params = {"input": "dataset:2", "layer": "1", "channel": 1, "location": "7",
                  "method": "gradient", "style": "signed"}  # fmt: skip
        shown = png(c.get("/api/projection.png", params=params))
        x = signals[2:3].clone().requires_grad_(True)
        net(x)[0, 1, 7].backward()  # plain autograd: the gradient of the unit
        expected = np.round(render_projection(x.grad[0], "signed") * 255)[None]  # one row
        assert shown.shape == (1, 32, 3)
        np.testing.assert_array_equal(shown, expected.astype(np.uint8))
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.ReLU()).eval()
    volumes = torch.randn(4, 1, 6, 7, 8)
    featurelens.scan(net, volumes, ["1"], top_k=2, progress=False).save(tmp_path / "volume")
    app = create_app(tmp_path / "volume", model=net, data=volumes)
    with page_client(app) as c:
        r = c.get("/api/projection.png", params={"input": "dataset:1", "layer": "1", "channel": 0})
        assert r.status_code == 422
        assert "1-D and 2-D inputs" in r.json()["error"] and "(1, 6, 7, 8)" in r.json()["error"]
        assert app.state.explorer.cache.misses <= 1  # refused before projecting
        assert c.get("/api/zf.png", params={"layer": "1", "channel": 0}).status_code == 200


# --------------------------------------------------------------------------------------------
# Memory: concurrent uploads of a small file with huge dimensions

UPLOAD_SERVER = r"""
import sys, torch, featurelens
from featurelens.app import serve
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
data = torch.rand(8, 3, 64, 64)
featurelens.scan(net, data, ["1"], top_k=2, progress=False).save(sys.argv[1])
server = serve(sys.argv[1], port=0, model=net, data=data)
print(server.port, flush=True)
server.wait()
"""


def huge_jpeg(side: int = 4000) -> bytes:
    """A ``side`` x ``side`` progressive JPEG of a few strokes: about 110 KB at 4000."""
    from PIL import ImageDraw

    image = Image.new("RGB", (side, side), (20, 30, 40))
    draw = ImageDraw.Draw(image)
    points = [(side // 5, side // 5), (4 * side // 5, side // 5), (2 * side // 5, 4 * side // 5)]
    draw.line(points, fill=(250, 250, 250), width=side // 12)
    buf = io.BytesIO()
    image.save(buf, "JPEG", progressive=True, quality=20)
    return buf.getvalue()


def _memory_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(key)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_concurrent_huge_uploads_keep_memory_flat(tmp_path):
    import httpx

    body = huge_jpeg()
    with Image.open(io.BytesIO(body)) as probe:
        assert probe.size == (4000, 4000) and probe.info.get("progressive")
    assert len(body) < 150_000
    proc = subprocess.Popen([sys.executable, "-c", UPLOAD_SERVER, str(tmp_path / "atlas")],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = int(proc.stdout.readline())
        url = f"http://127.0.0.1:{port}/api/inputs"
        headers = {"content-type": "image/jpeg", **PAGE_HEADERS}
        n = 16
        with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=n)) as http:

            def post(_: int) -> httpx.Response:
                return http.post(url, content=body, headers=headers)

            first = post(0)  # warm-up: imports and first allocations
            assert first.status_code == 201 and first.json()["width"] == 4000
            before = _memory_mb(proc.pid, "VmRSS")
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # peak := now
            with ThreadPoolExecutor(n) as pool:
                answers = list(pool.map(post, range(n)))
            peak = _memory_mb(proc.pid, "VmHWM")
            after = _memory_mb(proc.pid, "VmRSS")
    finally:
        proc.terminate()
        proc.wait(10)
    assert [r.status_code for r in answers] == [201] * n
    assert {r.json()["input"] for r in answers} == {first.json()["input"]}
    print(f"RSS {before:.0f} MB, peak {peak:.0f} MB (+{peak - before:.0f}), after {after:.0f} MB")
    # Decoded at full size and all at once, 8 such uploads took about 860 MB more (measured
    # before the fix, bench/upload_memory.py); at reduced size, two at a time: ~40-130 MB.
    assert peak - before < 200
    assert after - before < 200
