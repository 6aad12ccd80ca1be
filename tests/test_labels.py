"""Labels of (x, label) datasets recorded with the hits, label histograms, the sample rate of
1-D data, and each layer's layout, in atlas format 2."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import featurelens as fl
from featurelens.atlas import AtlasError, LabelHistogram
from featurelens.cli import main
from featurelens.errors import DataError, SpecError, UsageError
from featurelens.scan import ScanInterrupted
from featurelens.specs import DataSpec

V1 = Path(__file__).parent / "data" / "atlas-v1"


class Labelled(torch.utils.data.Dataset):
    """``(x[i], labels[i])``; ``x`` (N, C, *spatial)."""

    def __init__(self, x: torch.Tensor, labels: list, stop_at: int | None = None) -> None:
        self.x, self.labels, self.stop_at, self.fired = x, labels, stop_at, False

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i == self.stop_at and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return self.x[i], self.labels[i]


def net2d() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).eval()


def images(n: int = 30) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def scan(data, layers=("1", "3"), **kw) -> fl.Atlas:
    kw = {"top_k": 5, "batch_size": 7, "progress": False, **kw}
    return fl.scan(net2d(), data, list(layers), **kw)


@pytest.mark.parametrize(
    ("labels", "kind"),
    [
        ([i % 4 for i in range(30)], "int"),
        ([110.0 * (1 + i % 5) + 0.25 for i in range(30)], "float"),
        ([f"word-{i % 3}-caf\u00e9" for i in range(30)], "str"),
        ([np.int64(i % 2) for i in range(30)], "int"),
        ([torch.tensor(i / 8) for i in range(30)], "float"),  # a tensor scalar is a number
        ([torch.tensor([i % 3]) for i in range(30)], "int"),  # one element too
        ([bool(i % 2) for i in range(30)], "int"),
    ],
)
def test_labels_round_trip_through_the_atlas(labels, kind, tmp_path: Path):
    data = Labelled(images(), labels)
    atlas = scan(data)
    assert atlas.label_kind == kind and atlas.manifest.data.labels == kind
    plain = {"int": int, "float": float, "str": str}[kind]
    for layer in atlas.layers:
        for c in range(atlas.channels(layer)):
            for hit in atlas.top(layer, c):
                expected = labels[hit.index]
                expected = expected.item() if isinstance(expected, torch.Tensor) else expected
                assert type(hit.label) is plain and hit.label == plain(expected)
    atlas.save(tmp_path / "a")
    loaded = fl.Atlas.load(tmp_path / "a")
    for layer in atlas.layers:
        for c in range(atlas.channels(layer)):
            assert [h.label for h in loaded.top(layer, c)] == [h.label for h in atlas.top(layer, c)]
    assert loaded.label(atlas.top("1", 0)[0].index) == atlas.top("1", 0)[0].label
    # only the hits' labels are stored: one per distinct hit index
    hits = {h.index for layer in atlas.layers for c in range(atlas.channels(layer))
            for h in atlas.top(layer, c)}  # fmt: skip
    with np.load(tmp_path / "a" / loaded.manifest.arrays.file) as npz:
        assert sorted(hits) == npz["labels.index"].tolist()


def test_datasets_without_labels_or_with_masks_record_none():
    assert scan(images()).label_kind is None  # a tensor
    assert scan([images()[i] for i in range(30)]).label_kind is None  # bare tensors
    masks = Labelled(images(), [torch.zeros(8, 8) for _ in range(30)])
    with pytest.warns(RuntimeWarning, match=r"labels are not recorded .*Tensor of shape \(8, 8\)"):
        atlas = scan(masks)
    assert atlas.label_kind is None and atlas.top("1", 0)[0].label is None
    with pytest.raises(AtlasError, match="records no labels"):
        atlas.label_histogram("1", 0)


def test_labels_of_mixed_types_are_a_clear_error():
    labels: list = [i % 3 for i in range(30)]
    labels[17] = "cat"
    with pytest.raises(DataError, match=r"dataset labels mix types: item 17 has the str label "
                       r"'cat', item 0 has the int label 0"):  # fmt: skip
        scan(Labelled(images(), labels))
    labels[17] = None
    with pytest.raises(DataError, match="item 17 has no label, item 0 has the int label 0"):
        scan(Labelled(images(), labels))
    # ints and floats are numbers: they mix as floats
    labels[17] = 2.5
    atlas = scan(Labelled(images(), labels))
    assert atlas.label_kind == "float"
    assert all(isinstance(h.label, float) for h in atlas.top("1", 1))


def test_labels_survive_workers_and_resuming(tmp_path: Path):
    labels = [f"s{i % 7}" for i in range(30)]
    full = scan(Labelled(images(), labels))
    in_workers = scan(Labelled(images(), labels), num_workers=2)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(ScanInterrupted):
        scan(Labelled(images(), labels, stop_at=16), checkpoint=ckpt, checkpoint_every=1)
    resumed = scan(Labelled(images(), labels), checkpoint=ckpt)
    for other in (in_workers, resumed):
        for layer in full.layers:
            for c in range(full.channels(layer)):
                assert [h.label for h in other.top(layer, c)] == [
                    h.label for h in full.top(layer, c)
                ]
    assert fl.Atlas.load(ckpt).manifest == resumed.manifest


def test_label_histograms_count_ints_and_strings_and_bin_floats():
    labels = [i % 4 for i in range(30)]
    atlas = scan(Labelled(images(), labels), top_k=9, layers=("1",))
    for c in range(4):
        hits = atlas.top("1", c)
        counts = Counter(h.label for h in hits)
        histogram = atlas.label_histogram("1", c)
        assert dict(histogram.items()) == counts and sum(histogram.counts) == 9
        assert list(histogram.counts) == sorted(histogram.counts, reverse=True)
        assert atlas.label_histogram("1", c, k=3).counts == tuple(
            n for _, n in sorted(Counter(h.label for h in hits[:3]).items(),
                                 key=lambda item: (-item[1], item[0]))
        )  # fmt: skip
    pitches = [55.0 * 2 ** (i / 12) for i in range(30)]
    pitches[4] = math.nan
    atlas = scan(Labelled(images(), pitches), top_k=9, layers=("1",))
    for c in range(4):
        values = np.array([h.label for h in atlas.top("1", c)])
        finite = values[np.isfinite(values)]
        histogram = atlas.label_histogram("1", c)
        assert isinstance(histogram, LabelHistogram) and histogram.kind == "float"
        counts, edges = np.histogram(finite, bins="auto")  # the reference
        assert histogram.counts == tuple(counts.tolist())
        assert histogram.bins == tuple(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))
        assert histogram.missing == len(values) - len(finite)
        assert histogram.bins[0][0] == finite.min() and histogram.bins[-1][1] == finite.max()
        four = atlas.label_histogram("1", c, bins=4)
        assert len(four.bins) == 4 and sum(four.counts) == len(finite)
    with pytest.raises(UsageError, match="k must be a positive int"):
        atlas.label_histogram("1", 0, k=0)


class Tones(torch.utils.data.Dataset):
    sample_rate = 16000

    def __init__(self, rate=16000) -> None:
        self.sample_rate = rate
        self.x = torch.randn(10, 1, 64, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return self.x[i], 220.0 * (1 + i % 3)


def net1d() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 2, 5), nn.ReLU()).eval()


def test_the_sample_rate_of_1d_data_is_recorded(tmp_path: Path):
    atlas = fl.scan(net1d(), Tones(), ["1"], top_k=3, progress=False)
    assert atlas.sample_rate == 16000
    atlas.save(tmp_path / "a")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["data"]["sample_rate"] == 16000 and m["data"]["labels"] == "float"
    assert fl.Atlas.load(tmp_path / "a").sample_rate == 16000
    # from a data spec, and on the command line
    tones = tmp_path / "tones.py"
    tones.write_text(
        "import torch\n"
        "def tones():\n"
        "    return torch.randn(6, 1, 32, generator=torch.Generator().manual_seed(1))\n"
        "def net():\n"
        "    return torch.nn.Sequential(torch.nn.Conv1d(1, 2, 5))\n"
    )
    spec = DataSpec(f"{tones}:tones", sample_rate=22050.5)
    atlas = fl.scan(net1d(), spec.build(), ["1"], top_k=2, progress=False)
    assert atlas.sample_rate == 22050.5 and atlas.data_spec.sample_rate == 22050.5
    out = tmp_path / "cli"
    argv = ["scan", f"{tones}:net", f"{tones}:tones", "--layers", "0", "--top-k", "2",
            "--out", str(out), "--sample-rate", "8000", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert fl.Atlas.load(out).sample_rate == 8000


def test_a_wrong_sample_rate_is_a_clear_error(tmp_path: Path, capsys):
    for bad in ("16k", -1, 0, math.inf, True):
        with pytest.raises(DataError, match=r"Tones\.sample_rate must be a positive"):
            fl.scan(net1d(), Tones(rate=bad), ["1"], top_k=2, progress=False)
        with pytest.raises(SpecError, match=r"DataSpec\(sample_rate=\.\.\.\) must be a positive"):
            DataSpec("mnist", sample_rate=bad)
    (tmp_path / "t.py").write_text(
        "import torch\nclass T(torch.utils.data.Dataset):\n    sample_rate = 16000\n"
        "    def __len__(self):\n        return 4\n"
        "    def __getitem__(self, i):\n        return torch.zeros(1, 32)\n"
        "def t():\n    return T()\n"
    )
    with pytest.raises(DataError, match="the data spec says sample_rate=8000, the dataset's"):
        spec = DataSpec(f"{tmp_path / 't.py'}:t", sample_rate=8000)
        fl.scan(net1d(), spec.build(), ["1"], top_k=2, progress=False, data_spec=spec)
    with pytest.raises(UsageError, match=r"a sample rate \(16000\) is for 1-D data \(C, L\); "
                       r"the examples are \(1, 8, 8\)"):  # fmt: skip
        data = Labelled(images(), list(range(30)))
        data.sample_rate = 16000  # type: ignore[attr-defined]
        scan(data)
    assert main(["scan", "x.py:f", "mnist", "--layers", "0", "--out", str(tmp_path / "o"),
                 "--sample-rate", "nan"]) == 2  # fmt: skip
    assert "sample_rate" in capsys.readouterr().err


def test_layers_record_their_layout(tmp_path: Path):
    atlas = scan(images())
    for layer in atlas.layers:
        assert (atlas.layout(layer), atlas.channel_dim(layer)) == ("channels_first", 1)
    atlas.save(tmp_path / "a")
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [(r["layout"], r["channel_dim"]) for r in m["layers"]] == [("channels_first", 1)] * 2
    # version 1 atlases have no such keys: channels first
    old = fl.Atlas.load(V1 / "complete")
    assert old.manifest.format_version == 1 and old.label_kind is None
    assert [(old.layout(n), old.channel_dim(n)) for n in old.layers] == [("channels_first", 1)] * 2
    assert old.top("0", 0)[0].label is None and old.sample_rate is None


def test_a_version_1_checkpoint_resumes_as_version_1(tmp_path: Path):
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(V1 / "checkpoint", ckpt)
    spec = importlib.util.spec_from_file_location("v1make", V1 / "make.py")
    assert spec is not None and spec.loader is not None
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = fl.scan(make.net(), make.Digits(), ["0", "3"], checkpoint=ckpt,
                          **make.scan_options())  # fmt: skip
    assert resumed.manifest.format_version == 1 and resumed.label_kind is None
    assert json.loads((ckpt / "manifest.json").read_text())["format_version"] == 1
