"""The explorer's logic without HTTP: typed calls, library errors, the cache, the import boundary.

`featurelens.explorer.Explorer` is called directly here; tests/test_app.py drives the same logic
through HTTP. References are independent of the explorer: layer outputs by running the
``nn.Sequential`` by hand, arg-max locations by ``np.unravel_index``, fields from
``featurelens.receptive_field``, PNG bytes from a second app with its own cache.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import textwrap
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
    page_client,
    reference_output,
)

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
    with page_client(create_app(atlas_dir)) as c:
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
    with page_client(create_app(atlas_dir, model=lacking, data=data)) as c:
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
    # An entry of 300 bytes is charged its key, its value and the entry's own objects.
    entry = LRUCache.size_of(0) + LRUCache.size_of(bytes(300)) + LRUCache.ENTRY_OVERHEAD
    assert entry == 28 + 333 + LRUCache.ENTRY_OVERHEAD  # sys.getsizeof of an int, of the bytes
    cache = LRUCache(max_bytes=3 * entry + entry // 2)
    for i in range(10):
        cache.get_or_compute(i, lambda: bytes(300))
    assert len(cache) == 3 and cache.nbytes == 3 * entry
    computed = []
    cache.get_or_compute(9, lambda: computed.append(1) or b"")
    cache.get_or_compute(0, lambda: computed.append(1) or bytes(10))
    assert computed == [1]  # 9 was cached, 0 had been evicted
    cache.get_or_compute("huge", lambda: bytes(5000))  # bigger than the budget: not kept
    assert "huge" not in cache
    assert (cache.hits, cache.misses) == (1, 12)


def _racing(n: int, cache: LRUCache, key, compute):
    """n threads asking ``cache`` for ``key`` at once; their results (or exceptions)."""
    from concurrent.futures import ThreadPoolExecutor

    def ask():
        try:
            return cache.get_or_compute(key, compute)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: ask(), range(n)))


def _slow(calls: list, cache: LRUCache, waiting: int, result):
    """A compute that holds on until ``waiting`` other callers wait for it."""
    import time

    def compute():
        calls.append(1)
        deadline = time.monotonic() + 20
        while cache.waits < waiting and time.monotonic() < deadline:
            time.sleep(0.001)
        if isinstance(result, Exception):
            raise result
        return result

    return compute


def test_concurrent_requests_for_one_key_compute_once():
    cache, calls = LRUCache(1 << 20), []
    value = bytes(100)
    got = _racing(6, cache, "k", _slow(calls, cache, 5, value))
    assert calls == [1] and cache.waits == 5 and cache.misses == 1
    assert all(v is value for v in got)  # every caller got the one computed value
    assert cache.get_or_compute("k", lambda: calls.append(1)) is value and calls == [1]


def test_a_failed_computation_fails_its_waiters_and_is_not_kept():
    cache, calls = LRUCache(1 << 20), []
    got = _racing(4, cache, "k", _slow(calls, cache, 3, UsageError("bad unit")))
    assert calls == [1]
    assert all(isinstance(v, UsageError) and str(v) == "bad unit" for v in got)
    assert "k" not in cache
    assert cache.get_or_compute("k", lambda: b"now") == b"now"  # asked again: computed again


def test_concurrent_clicks_on_one_unit_project_once(atlas, model, data, monkeypatch):
    import featurelens.explorer

    ex = Explorer(atlas, model, data)
    real, calls = featurelens.explorer.project, []

    def counted(*args, **kwargs):
        calls.append(1)
        import time

        deadline = time.monotonic() + 20
        while ex.cache.waits < 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        return real(*args, **kwargs)

    monkeypatch.setattr(featurelens.explorer, "project", counted)
    ref, layer = ex.input_ref("dataset:3"), LAYERS[0]
    ex.activations(ref, layer)  # the arg-max's forward, done before the clicks race
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(6) as pool:
        pngs = list(pool.map(lambda _: ex.projection_png(ref, layer, 2, None, "guided"), range(6)))
    assert calls == [1]
    assert len(set(pngs)) == 1
    fresh = Explorer(atlas, model, data)  # its own cache: the answer is the same
    assert fresh.projection_png(ref, layer, 2, None, "guided") == pngs[0]


CACHE_FILL = r"""
import gc, sys, torch
from featurelens.explorer import LRUCache

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

kind, n = sys.argv[1], int(sys.argv[2])
make = {
    "logits": lambda i: torch.full((10,), float(i)),  # a classifier's layer: 40 bytes
    "maps": lambda i: torch.full((6, 14, 14), float(i)),  # a small layer's activations
    "large": lambda i: torch.full((64, 56, 56), float(i)),  # a large one
    "view": lambda i: torch.full((8, 32, 32), float(i))[0],  # a view keeps its storage
    "png": lambda i: i.to_bytes(4, "little") * 100,  # a small PNG's bytes
    "sprite": lambda i: i.to_bytes(4, "little") * 5000,
}[kind]
cache = LRUCache(max_bytes=1 << 40)


def fill(start, stop):
    for i in range(start, stop):  # keys as the explorer's: a constant, the input's name, a layer
        layer = "".join(["features", ".4"])
        cache.get_or_compute(("act", f"dataset:{i}", layer), lambda: make(i))
    gc.collect()


# A first batch fills the memory that importing left free (the allocator reuses it, so growth
# there under-counts); the second batch's growth is what each further entry really costs.
fill(0, n // 4)
charged, before = cache.nbytes, rss()
fill(n // 4, n // 4 + n)
print(cache.nbytes - charged, rss() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    ("kind", "n"),
    [("logits", 40000), ("maps", 20000), ("large", 150), ("view", 4000), ("png", 40000),
     ("sprite", 5000)],
)  # fmt: skip
def test_the_cache_charges_what_its_entries_occupy(kind, n):
    # Independent measure: how much a fresh process's resident memory grows while a cache
    # keeps n entries (values of a kind the explorer caches, keys like the explorer's).
    r = _run(CACHE_FILL.replace("sys.argv[1], int(sys.argv[2])", f"{kind!r}, {n}"))
    assert r.returncode == 0, r.stderr
    charged, grown = (int(v) for v in r.stdout.split())
    assert grown > 20 * 2**20  # large enough to measure
    # Charged within 15-20% of the real growth (measured here: 0.99-1.04). The old size_of
    # charged 40 bytes for a 10-float tensor and 400 for a 400-byte PNG: 5% and 50% of what
    # they occupy.
    assert 0.85 <= charged / grown <= 1.2, (kind, charged, grown)


def test_size_of_counts_storages_and_containers():
    t = torch.zeros(4, 8)
    assert LRUCache.size_of(t) == 128 + LRUCache.TENSOR_OVERHEAD
    assert LRUCache.size_of(t[0]) == LRUCache.size_of(t)  # a view keeps the whole storage
    assert LRUCache.size_of(b"abc") == sys.getsizeof(b"abc")
    pair = (t, b"abc")
    assert LRUCache.size_of(pair) == sys.getsizeof(pair) + LRUCache.size_of(t) + 36
    d = {"k": [t]}
    assert LRUCache.size_of(d) == (
        sys.getsizeof(d) + sys.getsizeof("k") + sys.getsizeof([t]) + LRUCache.size_of(t)
    )
    a = np.zeros(1000)
    assert LRUCache.size_of(a) >= 8000 and LRUCache.size_of(a[:10]) >= 8000


# --------------------------------------------------------------------------------------------
# Uploads: decoded at reduced size, a few at a time


def _jpeg(array: np.ndarray, **options) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", **options)
    return buf.getvalue()


def _smooth(height: int, width: int) -> np.ndarray:
    """An RGB picture of broad gradients (what a resize keeps), height x width."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, (x + y) / (width + height)], -1)
    return np.round(rgb * 255).astype(np.uint8)


def test_decode_image_reduces_jpeg_in_the_decoder_and_png_after():
    from featurelens.explorer import decode_image

    picture = _smooth(1200, 1600)
    for raw, fmt in ((_jpeg(picture, quality=95), "JPEG"), (image_bytes(picture), "PNG")):
        full = decode_image(raw, 4000 * 4000)
        small = decode_image(raw, 4000 * 4000, min_side=100)
        assert (full.width, full.height) == (small.width, small.height) == (1600, 1200)
        assert full.image.size == (1600, 1200)
        assert min(small.image.size) >= 100
        # JPEG: 1/8 scale in the decoder (200 x 150); PNG: a box reduction by 12.
        expected = (200, 150) if fmt == "JPEG" else (134, 100)  # sides rounded up
        assert small.image.size == expected, fmt
        # The same picture, smaller: resized to 56 x 42 both agree to within JPEG noise.
        a = np.asarray(full.image.resize((56, 42)), float)
        b = np.asarray(small.image.resize((56, 42)), float)
        assert np.abs(a - b).mean() < 2, fmt
    tiny = decode_image(image_bytes(picture[:50, :60]), 4000 * 4000, min_side=100)
    assert tiny.image.size == (60, 50)  # never enlarged


def test_decode_image_reports_the_upright_size():
    from PIL import Image

    from featurelens.explorer import decode_image

    image = Image.fromarray(_smooth(300, 800))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif)
    decoded = decode_image(buf.getvalue(), 10**7, min_side=40)
    assert (decoded.width, decoded.height) == (300, 800)  # as shown, not as stored
    assert decoded.image.height > decoded.image.width


def test_a_reduced_upload_gives_nearly_the_tensor_of_a_full_one(atlas, model, data):
    from PIL import Image

    ex = Explorer(atlas, model, data)
    picture = _smooth(2000, 2400)
    reduced = ex.input_tensor(ex.input_ref(ex.add_upload(_jpeg(picture, quality=95))["input"]))
    full = ex.preprocess(Image.open(io.BytesIO(_jpeg(picture, quality=95))).convert("RGB"))
    assert reduced.shape == full.shape == (1, 28, 28)
    pixels = (reduced - full).abs() * 0.3081 * 255  # in grey levels
    assert float(pixels.mean()) < 2 and float(pixels.max()) < 8


def test_uploads_decode_a_few_at_a_time_on_their_own_threads(atlas, model, data, monkeypatch):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import featurelens.explorer as explorer

    state = {"active": 0, "most": 0, "threads": set()}
    lock = threading.Lock()
    real = explorer.decode_image

    def tracked(*args, **kwargs):
        with lock:
            state["active"] += 1
            state["most"] = max(state["most"], state["active"])
            state["threads"].add(threading.current_thread().name)
        try:
            time.sleep(0.05)  # widen the window in which a third would show
            return real(*args, **kwargs)
        finally:
            with lock:
                state["active"] -= 1

    monkeypatch.setattr(explorer, "decode_image", tracked)
    ex = Explorer(atlas, model, data, decode_slots=2)
    raws = [image_bytes(np.full((28, 28), 10 * i, np.uint8)) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ex.add_upload, raws))
    assert len({a["input"] for a in answers}) == 8 and ex.uploads_added == 8
    assert state["most"] == 2
    assert all(name.startswith("featurelens-decode") for name in state["threads"])
    with pytest.raises(UsageError, match="decode_slots"):
        Explorer(atlas, model, data, decode_slots=0)


# --------------------------------------------------------------------------------------------
# What info() shows, atlases refused at the start


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("/home/me/nets/model.py:build", "model.py:build"),
        ("/data/photos", "photos"),
        ("/data/photos/", "photos"),
        ("C:\\nets\\m.py:f", "m.py:f"),
        ("\\\\server\\share\\m.py:f", "m.py:f"),
        ("torchvision:resnet18", "torchvision:resnet18"),
        ("mnist", "mnist"),
        ("pkg.module:factory", "pkg.module:factory"),
        ("../model/net.pt", "../model/net.pt"),
        ("nets/model.py:build", "nets/model.py:build"),
    ],
)  # fmt: skip
def test_public_name(text, shown):
    from featurelens.explorer import public_name

    assert public_name(text) == shown


def test_info_shows_file_names_not_paths(tmp_path):
    from featurelens.specs import ModelSpec

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU()).eval()
    images = torch.rand(4, 1, 9, 9)
    checkpoint = tmp_path / "private" / "weights.pt"
    spec = ModelSpec(f"{tmp_path}/private/net.py:build", checkpoint=str(checkpoint))
    atlas = featurelens.scan(net, images, ["1"], top_k=2, progress=False, model_spec=spec)
    info = Explorer(atlas, net, images).info()
    assert info["model"]["spec"] == "net.py:build"
    assert info["model"]["checkpoint"] == "weights.pt"
    assert str(tmp_path) not in json.dumps(info)


def _with_layer_top(atlas: Atlas, **changes) -> Atlas:
    import copy
    import dataclasses

    layer = atlas.layers[0]
    tops = {name: copy.deepcopy(atlas.layer(name)) for name in atlas.layers}
    tops[layer] = dataclasses.replace(tops[layer], **changes)
    return Atlas(atlas.manifest, tops)


def test_atlases_whose_hits_do_not_fit_are_refused_at_the_start(atlas, model, data):
    top = atlas.layer(atlas.layers[0])  # features.0: (4, 4) hits on a 28 x 28 map
    far = top.indices.copy()
    far[1, 2] = 40  # the data has examples 0..39
    outside = top.locations.copy()
    outside[3, 0] = (5, 28)
    cases = [
        (dict(indices=top.indices[:, 0]), "indices must be (channels, k)"),
        (dict(scores=top.scores[:, :2]), "scores of the same shape"),
        (dict(locations=top.locations[..., :1]), "locations must be (4, 4, 2)"),
        (dict(indices=top.indices.astype(float)), "must be integers"),
        (dict(indices=far), "hit 2 of channel 1 is example 40, but the data has examples 0..39"),
        (dict(locations=outside), "hit 0 of channel 3 is at (5, 28), outside the layer's map"),
    ]  # fmt: skip
    for changes, words in cases:
        with pytest.raises(AtlasError, match="atlas layer 'features.0'") as info:
            Explorer(_with_layer_top(atlas, **changes), model, data)
        assert words in str(info.value)
    empty = top.indices.copy()
    empty[0, 1:] = -1  # empty slots (fewer hits than k) are fine, wherever they point
    locations = top.locations.copy()
    locations[0, 1:] = -1
    ex = Explorer(_with_layer_top(atlas, indices=empty, locations=locations), model, data)
    assert len(ex.top("features.0", 0)) == 1
