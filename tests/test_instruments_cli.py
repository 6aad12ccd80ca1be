"""`featurelens erf` and `featurelens sanity`: the same numbers as the library, the atlas untouched,
pages whose images load, every failure one line with exit 2."""

from __future__ import annotations

import hashlib
import textwrap
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featurelens
from featurelens import Unit
from featurelens.cli import main
from featurelens.effective_field import LEVELS, effective_receptive_field
from featurelens.sanity import sanity
from featurelens.specs import DataSpec, ModelSpec

ZOO = textwrap.dedent(
    """
    import torch
    from torch import nn

    def model():
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
        )

    def data():
        g = torch.Generator().manual_seed(2)
        x = torch.rand(24, 1, 14, 14, generator=g)
        return torch.utils.data.TensorDataset((x - 0.5) / 0.25, torch.zeros(24, dtype=torch.long))
    """
)


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("instruments")
    (root / "zoo.py").write_text(ZOO)
    model_spec = ModelSpec(f"{root / 'zoo.py'}:model")
    data_spec = DataSpec(f"{root / 'zoo.py'}:data", mean=(0.5,), std=(0.25,))
    atlas = featurelens.scan(
        model_spec.build(), data_spec.build(), ["0", "3"], top_k=3, progress=False,
        model_spec=model_spec, data_spec=data_spec,
    )  # fmt: skip
    return atlas.save(root / "atlas")


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_erf_prints_the_librarys_extents_and_writes_heat_maps(atlas_dir, tmp_path, capsys):
    before = _hashes(atlas_dir)
    heat = tmp_path / "heat"
    assert main(["erf", str(atlas_dir), "--examples", "9", "--heatmaps", str(heat)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["layer", "location", "theoretical", "50%", "90%", "95%", "100%",
                                "units"]  # fmt: skip
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:4]}
    atlas = featurelens.Atlas.load(atlas_dir)
    model, data = atlas.build_model(), atlas.build_data()
    for layer in ("0", "3"):
        erf = effective_receptive_field(model, data, layer, examples=9, seed=0)
        expected = [
            ",".join(map(str, erf.location)),
            "x".join(map(str, erf.theoretical_size)),
            *("x".join(map(str, erf.extent(q))) for q in LEVELS),
            "9",
        ]
        assert rows[layer] == expected
        image = Image.open(heat / f"erf-{layer}.png")
        assert image.size[0] >= 14 * 8  # enlarged by a whole factor
    assert rows["3"][1] == "8x8"  # 3 x 3 conv, 2 x 2 pool, 3 x 3 conv
    assert _hashes(atlas_dir) == before


def test_erf_random_inputs_and_one_layer(atlas_dir, capsys):
    assert main(["erf", str(atlas_dir), "--layers", "3", "--random-inputs", "--examples", "5"]) == 0
    out = capsys.readouterr().out
    assert "random inputs" in out and len(out.splitlines()) == 4


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_sanity_page_and_table_match_the_library(atlas_dir, tmp_path, capsys):
    before = _hashes(atlas_dir)
    out = tmp_path / "sanity"
    args = ["sanity", str(atlas_dir), "--units", "2", "--out", str(out), "--methods",
            "gradient,guided", "--maps", "1", "--seed", "4"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    atlas = featurelens.Atlas.load(atlas_dir)
    hits = [atlas.top("3", c)[0] for c in range(2)]
    units = [Unit("3", c, h.location) for c, h in enumerate(hits)]
    result = sanity(
        atlas.build_model(), atlas.build_data(), units, ["gradient", "guided"],
        rows=[h.index for h in hits], seed=4, keep_maps=1,
    )  # fmt: skip
    assert printed[: len(result.methods) + 1] == result.table().splitlines()
    assert printed[-1] == str((out / "index.html").resolve())
    parser = _Images()
    parser.feed((out / "index.html").read_text())
    files = [s for s in parser.sources if not s.startswith("data:")]
    assert sorted(files) == ["curves-cascading.png", "curves-independent.png"]
    for name in files:
        Image.open(out / name).verify()
    # one grid: per method, the input and one map per step
    steps = 1 + len(result.layers)
    inline = [s for s in parser.sources if s.startswith("data:image/png;base64,")]
    assert len(inline) == 2 * (1 + steps)
    assert _hashes(atlas_dir) == before
    assert np.isfinite(result.curve("gradient")).all()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--units", "0"], "--units 0"),
        (["--units", "1", "--methods", "gradient,lrp"], "lrp"),
        (["--units", "1", "--layer", "7"], "'7'"),
        (["--units", "1", "--modes", "sideways"], "sideways"),
    ],
)
def test_sanity_bad_arguments_are_one_line(atlas_dir, tmp_path, capsys, extra, message):
    before = _hashes(atlas_dir)
    assert main(["sanity", str(atlas_dir), "--out", str(tmp_path / "s"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("featurelens sanity: error")
    assert _hashes(atlas_dir) == before


def test_nothing_is_written_into_the_atlas(atlas_dir, capsys):
    before = _hashes(atlas_dir)
    assert main(["sanity", str(atlas_dir), "--units", "1", "--out", str(atlas_dir / "s")]) == 2
    assert "inside the atlas directory" in capsys.readouterr().err
    assert main(["erf", str(atlas_dir), "--heatmaps", str(atlas_dir / "h")]) == 2
    assert "inside the atlas directory" in capsys.readouterr().err
    assert main(["erf", str(atlas_dir), "--layers", "0,9"]) == 2
    assert "'9'" in capsys.readouterr().err
    assert _hashes(atlas_dir) == before
