"""Labels and sample rates in the report: each hit's label beside it, the label histogram of a
channel's top hits, and the WAV clip of each hit's window of a signal.

References come from the dataset itself (the label of example ``i`` is known by construction)
and from plain numpy (the clip's samples).
"""

from __future__ import annotations

import re
import wave
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from torch import nn

import featurelens
from featurelens.atlas import Atlas
from featurelens.report import write_report

pytestmark = pytest.mark.skipif(
    not hasattr(Atlas, "label_histogram"),
    reason="labels and sample rates come with atlas format 2 (branch b-atlas)",
)


class Labelled(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, label, sample_rate: float | None = None) -> None:
        self.x, self.label = x, label
        if sample_rate is not None:
            self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.label(i)


class Cards(HTMLParser):
    """Per channel card: the rows of its hits table and of its labels table, as cell texts,
    and the audio sources."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: dict[int, dict[str, list]] = {}
        self.card = self.table = None
        self.row: list[str] | None = None
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section" and "card" in a.get("class", ""):
            self.card = self.cards.setdefault(int(a["id"].split("-")[1]),
                                              {"hits": [], "labels": [], "audio": []})  # fmt: skip
        elif tag == "table" and self.card is not None:
            self.table = a.get("class")
        elif tag == "tr":
            self.row = []
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "audio" and self.card is not None:
            self.card["audio"].append(a["src"])
        elif tag == "meter" and self.row is not None:
            self.row.append(a["value"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None and self.row is not None:
            self.row.append("".join(self.cell).strip())
            self.cell = None
        elif tag == "tr" and self.row is not None and self.card is not None and self.table:
            self.card[self.table].append(self.row)
            self.row = None
        elif tag == "section":
            self.card = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def cards(path) -> dict[int, dict[str, list]]:
    parser = Cards()
    parser.feed(path.read_text())
    return parser.cards


def test_the_report_shows_each_hits_label_and_the_histogram(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU()).eval()
    x = torch.randn(20, 1, 8, 8)
    names = ["cat", "dog", "<owl>"]
    data = Labelled(x, lambda i: names[i % 3])
    atlas = featurelens.scan(net, data, ["0"], top_k=5, progress=False)
    out = tmp_path / "s"
    index = write_report(atlas, out, model=net, data=x, progress=False)
    assert "<owl>" not in (out / "layer-0.html").read_text()  # escaped
    assert "str" in index.read_text()  # the label kind
    for c, card in cards(out / "layer-0.html").items():
        hits = card["hits"]
        assert hits[0][-1] == "label"
        indices = [int(row[1]) for row in hits[1:]]
        assert [row[-1] for row in hits[1:]] == [names[i % 3] for i in indices]
        want = Counter(names[i % 3] for i in indices)
        got = {row[0]: int(row[-1]) for row in card["labels"]}
        assert got == dict(want)
        assert indices == [h.index for h in atlas.top("0", c)]


def test_signals_with_a_sample_rate_get_clips_of_each_window(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(1, 2, 9, padding=4), nn.ReLU()).eval()
    x = torch.randn(10, 1, 64)
    pitch = [100.0 + 10 * i for i in range(10)]
    data = Labelled(x, lambda i: pitch[i], sample_rate=8000.0)
    atlas = featurelens.scan(net, data, ["0"], top_k=3, progress=False)
    assert atlas.sample_rate == 8000.0
    out = tmp_path / "s"
    write_report(atlas, out, model=net, data=x, progress=False)
    rf = featurelens.receptive_field(net, (1, 64), "0")
    for c, card in cards(out / "layer-0.html").items():
        assert len(card["audio"]) == 3
        for hit, src in zip(atlas.top("0", c), card["audio"]):
            ((first, last),) = rf.interval(hit.location)
            a, b = max(first, 0), min(last, 63)
            assert re.fullmatch(rf"audio/example-{hit.index}-{a}-{b}\.wav", src)
            with wave.open(str(out / src)) as w:
                assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
                pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            window = x[hit.index, 0, a : b + 1].double().numpy()
            want = np.round(window / np.abs(window).max() * 0.9 * 32767)
            assert pcm.shape == want.shape and np.abs(pcm - want).max() <= 1
        assert card["hits"][0][-2:] == ["label", "window"]
        floats = [float(row[-2]) for row in card["hits"][1:]]
        assert floats == [pitch[h.index] for h in atlas.top("0", c)]
