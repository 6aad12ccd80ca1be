"""Signals in the explorer: waveforms, 1-D maps as rows, audio (WAV) and labels.

References are computed here with numpy from the data itself (denormalised samples, peak
scaling, the receptive field's region from :func:`featurelens.receptive_field`, label counts).
"""

from __future__ import annotations

import io
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import featurelens
from featurelens.app import create_app
from featurelens.explorer import MAX_ROW_PIXELS, WAVEFORM_HEIGHT, Explorer, encode_wav
from test_app import page_client, png

RATE = 8000
LIGHT = (120, 200, 255)


class Tones(torch.utils.data.Dataset):
    """Noisy tones (1, L) with string labels (one of them markup) and a sample rate."""

    sample_rate = RATE
    NAMES = ["low", "mid", "<b>high</b>"]

    def __init__(self, n: int = 12, length: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        t = torch.arange(length) / RATE
        self.labels = [self.NAMES[i % 3] for i in range(n)]
        freqs = torch.tensor([200.0, 800.0, 2000.0])[torch.arange(n) % 3]
        self.x = torch.sin(2 * torch.pi * freqs[:, None] * t)[:, None] * 0.5
        self.x = self.x + 0.05 * torch.randn(n, 1, length, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.x[i], self.labels[i]


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 9, padding=4), torch.nn.ReLU(), torch.nn.MaxPool1d(4),
        torch.nn.Conv1d(4, 5, 5, padding=2), torch.nn.ReLU(),
    ).eval()  # fmt: skip


@pytest.fixture(scope="module")
def tones(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tones")
    net, data = _net(), Tones()
    atlas = featurelens.scan(net, data, ["1", "4"], top_k=4, progress=False)
    atlas.save(root / "atlas")
    app = create_app(root / "atlas", model=net, data=data)
    with page_client(app) as client:
        yield client, net, data


def _wav(response) -> tuple[int, np.ndarray]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "audio/wav"
    with wave.open(io.BytesIO(response.content)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2")


def _pcm(x: np.ndarray) -> np.ndarray:
    return np.round(x / np.abs(x).max() * 32767).astype(np.int16)


def test_audio_of_an_example_and_of_a_receptive_field_window(tones):
    client, net, data = tones
    x = data[5][0].double().numpy()[0]
    rate, samples = _wav(client.get("/api/audio.wav", params={"input": "dataset:5"}))
    assert rate == RATE
    np.testing.assert_array_equal(samples, _pcm(x))
    rf = featurelens.receptive_field(net, (1, 256), "4")
    for u in (0, 17, 63):
        params = {"input": "dataset:5", "layer": "4", "location": str(u)}
        _, window = _wav(client.get("/api/audio.wav", params=params))
        (region,) = rf.region((u,))
        np.testing.assert_array_equal(window, _pcm(x[region]))
    r = client.get("/api/audio.wav", params={"input": "dataset:5", "location": "3"})
    assert r.status_code == 400 and "layer and a location" in r.json()["error"]


def test_no_sample_rate_no_audio(tmp_path: Path):
    net, data = _net(), Tones()
    signals = data.x.clone()  # a plain tensor: no sample rate, no labels
    featurelens.scan(net, signals, ["1"], top_k=2, progress=False).save(tmp_path / "a")
    with page_client(create_app(tmp_path / "a", model=net, data=signals)) as c:
        r = c.get("/api/audio.wav", params={"input": "dataset:1"})
        assert r.status_code == 422 and "sample rate" in r.json()["error"]
        info = c.get("/api/info").json()
        assert info["sample_rate"] is None and info["labels"] is None
        top = c.get("/api/top", params={"layer": "1", "channel": 0}).json()
        assert top["labels"] is None and all(h["label"] is None for h in top["hits"])


def test_encode_wav_bounds_and_silence():
    with wave.open(io.BytesIO(encode_wav(np.zeros(10), 16000.0))) as w:
        assert w.getnframes() == 10 and w.readframes(10) == b"\0" * 20
    with pytest.raises(featurelens.errors.UsageError, match="sample rate"):
        encode_wav(np.ones(3), 0.2)


def test_labels_beside_hits_and_their_histogram(tones):
    client, _, data = tones
    info = client.get("/api/info").json()
    assert info["sample_rate"] == RATE and info["labels"] == "str"
    for channel in range(5):
        top = client.get("/api/top", params={"layer": "4", "channel": channel}).json()
        labels = [h["label"] for h in top["hits"]]
        assert labels == [data.labels[h["index"]] for h in top["hits"]]
        hist = top["labels"]
        assert hist["kind"] == "str"
        assert dict(zip(hist["bins"], hist["counts"])) == Counter(labels)


def test_waveforms_are_drawn_per_sample(tones):
    client, _, data = tones
    shown = png(client.get("/api/waveform.png", params={"input": "dataset:2"}))
    assert shown.shape == (WAVEFORM_HEIGHT, 256, 3)
    x = data[2][0].double().numpy()[0]
    lit = np.all(shown == LIGHT, axis=-1)  # (H, L)
    y = (WAVEFORM_HEIGHT - 1) * (1 - x / np.abs(x).max()) / 2
    for q in range(256):
        rows = np.flatnonzero(lit[:, q])
        assert rows.size and rows.min() <= y[q] <= rows.max() and rows.size <= 2, q
    # An example the data does not have.
    r = client.get("/api/waveform.png", params={"input": "dataset:99"})
    assert r.status_code == 404


def test_long_rows_are_reduced_keeping_the_peaks(tmp_path: Path):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 3, padding=1)).eval()
    length = 3 * MAX_ROW_PIXELS + 5
    signals = torch.randn(3, 1, length)
    featurelens.scan(net, signals, ["0"], top_k=1, progress=False).save(tmp_path / "a")
    ex = Explorer(featurelens.Atlas.load(tmp_path / "a"), net, signals)
    ref = ex.input_ref("dataset:0")
    layout = ex.activation_layout(ref, "0")
    group = -(-length // MAX_ROW_PIXELS)  # samples per drawn pixel: 4
    width = -(-length // group)
    assert layout["map_shape"] == [1, length] and layout["cell"] == [1, width] and width <= 4096
    maps, _ = ex._maps(ref, "0")
    act = ex.activations(ref, "0")
    for c in range(2):
        for q in (0, 100, maps.shape[2] - 1):
            block = act[c, q * group : (q + 1) * group]
            assert maps[c, 0, q] == block[block.abs().argmax()]
    sprite = Image.open(io.BytesIO(ex.activation_png(ref, "0")))
    assert sprite.size == (width, 3)
    wave_png = Image.open(io.BytesIO(ex.waveform_png(ref)))
    assert wave_png.size == (MAX_ROW_PIXELS, WAVEFORM_HEIGHT)
    # The sample of largest magnitude reaches the top or bottom row of its column.
    x = signals[0, 0].double().numpy()
    k = int(np.abs(x).argmax())
    q = int(np.searchsorted(np.linspace(0, length, MAX_ROW_PIXELS + 1).round(), k, "right")) - 1
    column = np.all(np.asarray(wave_png.convert("RGB"))[:, q] == LIGHT, axis=-1)
    assert column[0 if x[k] > 0 else WAVEFORM_HEIGHT - 1]


class _Unsqueezing(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, (5, 1), stride=(2, 1), padding=(2, 0))

    def forward(self, x):
        return torch.relu(self.conv(x.unsqueeze(-1)))


def test_maps_of_one_column_are_drawn_as_rows(tmp_path: Path):
    torch.manual_seed(0)
    net = _Unsqueezing().eval()
    signals = torch.randn(4, 1, 600)
    featurelens.scan(net, signals, ["conv"], top_k=2, progress=False).save(tmp_path / "a")
    with page_client(create_app(tmp_path / "a", model=net, data=signals)) as c:
        params = {"input": "dataset:1", "layer": "conv"}
        layout = c.get("/api/activations", params=params).json()
        assert layout["map_shape"] == [300, 1] and layout["transposed"]
        assert layout["cell"] == [1, 300] and layout["cols"] == 1 and layout["rows"] == 3
        sprite = png(c.get("/api/activations.png", params=params))
        assert sprite.shape == (3 * 2 - 1, 300, 3)  # three rows, not tiles 300 pixels tall
        with torch.no_grad():
            ref = net(signals[1:2])[0, :, :, 0]
        np.testing.assert_allclose(layout["channel_max"], ref.max(1).values, rtol=1e-5)
        assert layout["channel_argmax"][2] == [int(ref[2].argmax()), 0]
