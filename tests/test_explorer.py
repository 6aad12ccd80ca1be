"""The explorer's logic without HTTP: typed calls, library errors, the cache, the import boundary.

`featurelens.explorer.Explorer` is called directly here; tests/test_app.py drives the same logic
through HTTP. References are independent of the explorer: layer outputs by running the
``nn.Sequential`` by hand, arg-max locations by ``np.unravel_index``, fields from
``featurelens.receptive_field``, PNG bytes from a second app with its own cache.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import featurelens
from featurelens import errors
from featurelens.app import create_app
from featurelens.app.http import ERROR_STATUS, status_of
from featurelens.atlas import Atlas
from featurelens.errors import (
    AtlasError,
    ChannelError,
    FeaturelensError,
    FormatError,
    LayerError,
    LimitError,
    NotFoundError,
    ReceptiveFieldError,
    UsageError,
)
from featurelens.explorer import SCALES, Explorer, InputRef, LRUCache
from test_app import (
    LAYERS,
    _permuting,
    _Untraceable,
    digit,
    image_bytes,
    make_atlas,
    reference_output,
)

with warnings.catch_warnings():  # starlette asks for httpx2, which is not installed here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

WEB_STACK = {"starlette", "uvicorn", "multipart", "python_multipart"}


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_atlas(tmp_path_factory.mktemp("explorer-logic"))


@pytest.fixture(scope="module")
def atlas(atlas_dir: Path) -> Atlas:
    return Atlas.load(atlas_dir)


@pytest.fixture(scope="module")
def model(atlas: Atlas) -> torch.nn.Module:
    return atlas.build_model()


@pytest.fixture(scope="module")
def data(atlas: Atlas):
    return atlas.build_data()


@pytest.fixture(scope="module")
def ex(atlas: Atlas, model, data) -> Explorer:
    return Explorer(atlas, model, data)


# --------------------------------------------------------------------------------------------
# The import boundary


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_explorer_module_imports_no_web_stack():
    # featurelens/__init__.py is bypassed (an empty package object stands in for it), so this
    # checks explorer.py and everything it imports, whatever the package's __init__ does.
    (package,) = importlib.util.find_spec("featurelens").submodule_search_locations
    code = textwrap.dedent(f"""
        import sys, types
        package = types.ModuleType("featurelens")
        package.__path__ = [{package!r}]
        sys.modules["featurelens"] = package
        import featurelens.explorer
        assert "torch" in sys.modules and "featurelens.figures" in sys.modules
        web = sorted(m for m in sys.modules if m.split(".")[0] in {WEB_STACK!r})
        assert not web, web
    """)
    r = _run(code)
    assert r.returncode == 0, r.stderr
    # The check can fail: the HTTP side does import the web stack.
    r = _run(code.replace("import featurelens.explorer", "import featurelens.app.http"))
    assert r.returncode != 0 and "starlette" in r.stderr


def test_import_featurelens_explorer_loads_no_web_stack():
    for module in ("featurelens", "featurelens.explorer"):
        r = _run(
            f"import {module}, sys; assert not any(m.split('.')[0] in "
            f"{WEB_STACK!r} for m in sys.modules)"
        )
        assert r.returncode == 0, (module, r.stderr)


# --------------------------------------------------------------------------------------------
# One table from library errors to HTTP statuses

EXPECTED_STATUS = {
    UsageError: 400,
    errors.StyleError: 400,
    errors.ReportError: 400,
    ChannelError: 404,
    LayerError: 404,
    NotFoundError: 404,
    LimitError: 413,
    FormatError: 415,
    AtlasError: 422,
    errors.DataError: 422,
    errors.SpecError: 422,
    errors.ActivationError: 422,
    ReceptiveFieldError: 422,
    errors.TraceError: 422,
    errors.UnsupportedOpError: 422,
    errors.NotAlignedError: 422,
}


def _subclasses(cls: type) -> set[type]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


@pytest.mark.parametrize("cls", sorted(EXPECTED_STATUS, key=lambda c: c.__name__))
def test_error_status_table(cls):
    assert status_of(cls("x")) == EXPECTED_STATUS[cls]


def test_every_library_error_is_a_4xx():
    # A class added later (anywhere in the library) takes its nearest base's status: never 500.
    classes = _subclasses(FeaturelensError)
    assert set(EXPECTED_STATUS) <= classes
    for cls in classes:
        status = status_of(cls.__new__(cls))
        assert 400 <= status < 500, cls
    assert set(ERROR_STATUS) <= classes | {FeaturelensError}


# --------------------------------------------------------------------------------------------
# Typed calls, checked against independent references


@pytest.mark.parametrize("layer", LAYERS)
def test_activations_are_the_layer_output(ex, model, data, layer):
    ref = reference_output(model, digit(data, 5)[None], layer)
    got = ex.activations(ex.input_ref("dataset:5"), layer)
    torch.testing.assert_close(got, ref)
    layout = ex.activation_layout(InputRef("dataset", 5), layer)
    flat = ref.reshape(ref.shape[0], -1)
    assert layout["channels"] == ref.shape[0] and layout["scale"] == "layer"
    np.testing.assert_allclose(layout["channel_max"], flat.max(1).values, rtol=0, atol=6e-7)
    peaks = [list(np.unravel_index(int(f.argmax()), ref.shape[1:])) for f in flat]
    assert layout["channel_argmax"] == peaks


def test_unit_with_a_typed_location(ex, model, data):
    layer, channel = "features.4", 2
    ref = reference_output(model, digit(data, 7)[None], layer)[channel]
    rf = featurelens.receptive_field(model, (1, 28, 28), layer)
    ref7 = ex.input_ref("dataset:7")
    peak = tuple(int(v) for v in np.unravel_index(int(ref.argmax()), ref.shape))
    assert ex.location(ref7, layer, channel) == peak
    for location in ((0, 13), [0, 13], np.array([0, 13])):  # any sequence of ints
        unit = ex.unit(ref7, layer, channel, location)
        assert unit["location"] == [0, 13]
        assert unit["value"] == pytest.approx(float(ref[0, 13]), rel=1e-6, abs=1e-7)
        assert unit["rf"]["interval"] == [list(v) for v in rf.interval((0, 13))]
    box = ex.rf(layer, (3, 5))
    assert box["region"] == [[s.start, s.stop - 1] for s in rf.region((3, 5))]


def test_answers_equal_the_http_answers(atlas_dir, ex):
    # The HTTP side only parses and serialises: same bytes from a separate app and cache.
    ref = ex.input_ref("dataset:2")
    with TestClient(create_app(atlas_dir)) as c:
        base = {"input": "dataset:2", "layer": "features.4"}
        for scale in SCALES:
            params = {**base, "scale": scale}
            assert c.get("/api/activations.png", params=params).content == ex.activation_png(
                ref, "features.4", scale
            )
            assert c.get("/api/activations", params=params).json() == ex.activation_layout(
                ref, "features.4", scale
            )
        unit = {**base, "channel": 3, "location": "2,9", "method": "guided", "style": "signed"}
        assert c.get("/api/projection.png", params=unit).content == ex.projection_png(
            ref, "features.4", 3, (2, 9), "guided", "signed"
        )
        assert c.get("/api/zf.png", params={"layer": "features.0", "channel": 1}).content == (
            ex.zf_png("features.0", 1)
        )
        assert c.get("/api/input.png", params={"input": "dataset:2"}).content == ex.input_png(ref)
        assert c.get("/api/info").json() == json.loads(json.dumps(ex.info()))


# --------------------------------------------------------------------------------------------
# Bad values: the library's error classes, messages that name the value


BAD_CALLS = [
    (lambda ex: ex.check_layer("nope"), LayerError, "unknown layer 'nope'"),
    (lambda ex: ex.check_channel("features.0", 4), ChannelError, "0..3"),
    (lambda ex: ex.check_channel("features.0", -1), ChannelError, "out of range"),
    (lambda ex: ex.check_channel("features.0", True), UsageError, "must be an int"),
    (lambda ex: ex.check_channel("features.0", 1.0), UsageError, "must be an int"),
    (lambda ex: ex.check_method("lrp"), UsageError, "gradient"),
    (lambda ex: ex.check_style("jet"), UsageError, "magnitude"),
    (lambda ex: ex.check_scale("x"), UsageError, "layer, channel"),
    (lambda ex: ex.check_k("features.4", 0, 5), UsageError, "1..4"),
    (lambda ex: ex.input_ref("dataset:40"), NotFoundError, "0..39"),
    (lambda ex: ex.input_ref("dataset:x"), UsageError, "not an integer"),
    (lambda ex: ex.input_ref("file:/etc/passwd"), UsageError, "dataset:INDEX"),
    (lambda ex: ex.input_ref("upload:0123456789abcdef"), NotFoundError, "upload it again"),
    (lambda ex: ex.location(InputRef("dataset", 0), "features.4", 0, (1,)), UsageError,
     "2 spatial axes"),
    (lambda ex: ex.location(InputRef("dataset", 0), "features.4", 0, (14, 0)), NotFoundError,
     "axis 0: valid 0..13"),
    (lambda ex: ex.location(InputRef("dataset", 0), "features.4", 6), ChannelError, "0..5"),
    (lambda ex: ex.rf("features.4", (0, -1)), NotFoundError, "axis 1"),
    (lambda ex: ex.rf("features.4", (1, 2, 3)), UsageError, "3 coordinate(s)"),
    (lambda ex: ex.activations(InputRef("dataset", 0), "nope"), LayerError, "unknown layer"),
    (lambda ex: ex.activation_png(InputRef("dataset", 0), "features.0", "x"), UsageError,
     "scale"),
    (lambda ex: ex.projection_png(InputRef("dataset", 0), "features.4", 0, method="x"),
     UsageError, "deconvnet"),
    (lambda ex: ex.zf_png("features.4", 9), ChannelError, "0..5"),
    (lambda ex: ex.top("head", 0), LayerError, "head.1"),
    (lambda ex: ex.add_upload(b""), UsageError, "empty upload"),
    (lambda ex: ex.add_upload(b"GIF89a" + bytes(100)), FormatError, "PNG or JPEG"),
    (lambda ex: ex.add_upload(b"not an image"), FormatError, "readable"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "words"), BAD_CALLS)
def test_bad_values_raise_library_errors(ex, call, error, words):
    with pytest.raises(error) as info:
        call(ex)
    assert words in str(info.value)
    assert 400 <= status_of(info.value) < 500


def test_upload_limits_names_and_eviction(atlas, model, data):
    ex = Explorer(atlas, model, data, max_upload_bytes=4000, max_upload_pixels=50 * 50,
                  max_uploads=2)  # fmt: skip
    noise = np.random.default_rng(0).integers(0, 256, (120, 120), dtype=np.uint8)
    with pytest.raises(LimitError, match="limit of 4000"):
        ex.add_upload(image_bytes(noise))
    with pytest.raises(LimitError, match="51x50 pixels"):
        ex.add_upload(image_bytes(np.zeros((50, 51), np.uint8)))
    names = []
    for value in (0, 100, 200):
        raw = image_bytes(np.full((28, 28), value, np.uint8))
        answer = ex.add_upload(raw)
        assert (answer["width"], answer["height"]) == (28, 28)
        assert ex.add_upload(raw) == answer  # the name is a hash of the preprocessed tensor
        names.append(answer["input"])
    assert len(set(names)) == 3
    with pytest.raises(NotFoundError, match="upload it again"):  # the oldest was dropped
        ex.input_ref(names[0])
    shown = ex.input_tensor(ex.input_ref(names[2]))  # (1, 28, 28), normalised like the data
    torch.testing.assert_close(shown, torch.full((1, 28, 28), (200 / 255 - 0.1307) / 0.3081))


def test_uploads_to_a_signal_model_are_an_atlas_error(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 5), torch.nn.ReLU()).eval()
    signals = torch.randn(6, 2, 16)
    ex = Explorer(featurelens.scan(net, signals, ["1"], top_k=2, progress=False), net, signals)
    with pytest.raises(AtlasError, match="2-D image model"):
        ex.add_upload(image_bytes(np.zeros((8, 8), np.uint8)))


def test_a_model_without_a_layer_of_the_atlas(atlas_dir, atlas, data):
    # The atlas has head.1; the model given does not. Requests that need the model refuse with
    # an AtlasError (422), not the LayerError (404) that an unknown name in the request gets.
    lacking = atlas.build_model()
    lacking.head = torch.nn.Sequential(torch.nn.Flatten())
    ex = Explorer(atlas, lacking, data)
    ref = ex.input_ref("dataset:1")
    assert ex.check_layer("head.1") == "head.1" and ex.fields["head.1"] is None
    for call in (
        lambda: ex.activations(ref, "head.1"),
        lambda: ex.projection_png(ref, "head.1", 0),
        lambda: ex.zf_png("head.1", 0),
    ):
        with pytest.raises(AtlasError, match="unknown layer 'head.1'") as info:
            call()
        assert isinstance(info.value.__cause__, LayerError)
    with pytest.raises(ReceptiveFieldError, match="no receptive field for 'head.1'"):
        ex.rf("head.1", ())
    assert ex.top("head.1", 0)  # the atlas alone still answers
    with TestClient(create_app(atlas_dir, model=lacking, data=data)) as c:
        params = {"input": "dataset:1", "layer": "head.1", "channel": 0}
        for path in ("/api/activations", "/api/unit", "/api/projection.png", "/api/zf.png"):
            r = c.get(path, params=params)
            assert r.status_code == 422 and "unknown layer 'head.1'" in r.json()["error"], path
        assert c.get("/api/top", params=params).status_code == 200
        assert c.get("/api/activations", params={**params, "layer": "nope"}).status_code == 404


def test_refused_and_fieldless_layers(tmp_path):
    images = torch.rand(4, 1, 9, 8)
    atlas = featurelens.scan(
        _permuting(False), images, ["permute", "relu"], top_k=2, progress=False
    )
    ex = Explorer(atlas, _permuting(True), images)
    with pytest.raises(AtlasError, match="'permute' outputs its channels at dim 3"):
        ex.check_layer("permute")
    with pytest.raises(AtlasError, match="channels at dim 3"):
        ex.activations(InputRef("dataset", 0), "permute")
    assert ex.unit(InputRef("dataset", 0), "relu", 2)["rf"] is not None
    net = _Untraceable().eval()
    images = torch.rand(3, 1, 9, 9)
    ex = Explorer(featurelens.scan(net, images, ["conv"], top_k=2, progress=False), net, images)
    with pytest.raises(ReceptiveFieldError, match="no receptive field for 'conv'"):
        ex.rf("conv", (0, 0))
    assert ex.unit(InputRef("dataset", 1), "conv", 1)["rf"] is None


def test_examples_that_fail_to_load_are_data_errors(atlas, model, data):
    from test_app import _Flaky

    ex = Explorer(atlas, model, _Flaky(data))
    with pytest.raises(errors.DataError, match="truncated file"):
        ex.input_png(InputRef("dataset", 3))
    with pytest.raises(errors.DataError, match=r"\(1, 28, 28\)"):
        ex.activations(InputRef("dataset", 4), "features.0")


# --------------------------------------------------------------------------------------------
# The cache


def test_lru_is_bounded_by_bytes():
    cache = LRUCache(max_bytes=1000)
    for i in range(10):
        cache.get_or_compute(i, lambda: bytes(300))
    assert len(cache) == 3
    computed = []
    cache.get_or_compute(9, lambda: computed.append(1) or b"")
    cache.get_or_compute(0, lambda: computed.append(1) or bytes(10))
    assert computed == [1]  # 9 was cached, 0 had been evicted
    cache.get_or_compute("huge", lambda: bytes(5000))  # bigger than the budget: not kept
    assert "huge" not in cache
    assert (cache.hits, cache.misses) == (1, 12)
