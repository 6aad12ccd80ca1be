"""Receptive-field boxes in the explorer: always the unit's own, or none with a reason.

The reference is :func:`featurelens.receptive_field` (``region`` of each location) on the
model's own rank, and a hand-computed interval for a model that unsqueezes its signal to 2-D
maps: there the explorer either draws that interval or refuses; it never draws the box of
another location.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import featurelens
from featurelens.app import create_app
from featurelens.atlas import Atlas
from featurelens.errors import ReceptiveFieldError
from featurelens.explorer import Explorer
from test_app import make_atlas, page_client


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Explorer:
    atlas = Atlas.load(make_atlas(tmp_path_factory.mktemp("geometry")))
    return Explorer(atlas)


def _region(box) -> list[list[int]]:
    return box["region"]


@pytest.mark.parametrize("layer", ["features.0", "features.4", "features.5"])
def test_every_box_is_the_fields_region_of_that_location(tiny, layer):
    rf = featurelens.receptive_field(tiny.model, tiny.input_shape, layer)
    h, w = rf.output_shape
    for loc in [(i, j) for i in range(h) for j in range(w)]:
        expected = [[s.start, s.stop - 1] for s in rf.region(loc)]
        assert _region(tiny.rf(layer, loc)) == expected, loc
    # And for units on an input: the box of the unit's own (arg-max or given) location.
    ref = tiny.input_ref("dataset:3")
    for channel in range(2):
        unit = tiny.unit(ref, layer, channel)
        loc = tuple(unit["location"])
        assert unit["rf"]["region"] == [[s.start, s.stop - 1] for s in rf.region(loc)]
        assert unit["rf_error"] is None
        last = (h - 1, w - 1)
        unit = tiny.unit(ref, layer, channel, last)
        assert unit["rf"]["region"] == [[s.start, s.stop - 1] for s in rf.region(last)]


def test_logits_have_the_whole_input(tiny):
    unit = tiny.unit(tiny.input_ref("dataset:0"), "head.1", 3)
    assert unit["location"] == [] and unit["rf"]["is_global"]
    assert unit["rf"]["region"] == [[0, 27], [0, 27]]


def test_projections_use_the_field_the_explorer_computed(tiny, monkeypatch):
    import featurelens.projection as projection

    def no_tracing(*args, **kwargs):
        raise AssertionError("project traced the model for a field the explorer had")

    monkeypatch.setattr(projection, "try_receptive_field", no_tracing)
    ref = tiny.input_ref("dataset:5")
    png = tiny.projection_png(ref, "features.4", 1, (3, 4), "gradient", "signed")
    assert png.startswith(b"\x89PNG")


class _Unsqueezing(torch.nn.Module):
    """Audio-style: takes (N, 1, L) and runs 2-D convolutions over (L, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, (5, 1), stride=(2, 1), padding=(2, 0))
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x.unsqueeze(-1)))


def _true_region(u: int, length: int) -> list[list[int]]:
    """Kernel 5, stride 2, padding 2 over the signal: location (u, 0) sees 2u-2 .. 2u+2."""
    return [[max(2 * u - 2, 0), min(2 * u + 2, length - 1)]]


def test_a_model_that_changes_rank_never_gets_a_wrong_box(tmp_path: Path):
    torch.manual_seed(0)
    net = _Unsqueezing().eval()
    signals = torch.randn(8, 1, 32)
    featurelens.scan(net, signals, ["relu"], top_k=3, progress=False).save(tmp_path / "a")
    app = create_app(tmp_path / "a", model=net, data=signals)
    ex = app.state.explorer
    answers = 0
    with page_client(app) as c:
        for index in range(8):
            for channel in range(3):
                params = {"input": f"dataset:{index}", "layer": "relu", "channel": channel}
                r = c.get("/api/unit", params=params)
                assert r.status_code == 200, r.text
                unit = r.json()
                u, zero = unit["location"]  # the layer's own rank: (L', 1)
                assert zero == 0
                if unit["rf"] is None:  # refused, with the reason
                    assert "draws no box" in unit["rf_error"]
                else:  # right: the unit's own interval on the input's axis
                    assert unit["rf"]["region"] == _true_region(u, 32), unit
                    answers += 1
        for u in (0, 7, 15):
            r = c.get("/api/rf", params={"layer": "relu", "location": f"{u},0"})
            if r.status_code == 200:
                assert r.json()["region"] == _true_region(u, 32)
            else:
                assert r.status_code == 422 and "draws no box" in r.json()["error"], r.text
        info = c.get("/api/info").json()["layers"][0]
        if info["rf"] is None:  # the page then draws no hover boxes either
            assert "draws no box" in info["rf_error"]
    if ex.fields["relu"] is None:
        with pytest.raises(ReceptiveFieldError, match="draws no box"):
            ex.rf("relu", (3, 0))
    print(f"boxes drawn: {answers} of 24")
