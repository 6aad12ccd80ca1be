"""Synthetic inputs in the product: ``report --visualize``, ``figure --visualize``.

The reference is the library call itself: :func:`featurelens.visualize` with the same
arguments, drawn by :meth:`Visualization.tiles`.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import featurelens
from featurelens.cli import main
from featurelens.figures import join, layer_sheet, synthetic_sheet, zf_grid
from featurelens.render import save_png
from featurelens.report import write_report
from featurelens.specs import DataSpec, ModelSpec

ZOO = textwrap.dedent(
    """
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
        )

    def data():
        g = torch.Generator().manual_seed(2)
        x = torch.rand(30, 1, 16, 16, generator=g)
        return torch.utils.data.TensorDataset((x - 0.5) / 0.25, torch.zeros(30, dtype=torch.long))
    """
)
STEPS = 6


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vis-report")
    (root / "zoo.py").write_text(ZOO)
    model_spec = ModelSpec(f"{root / 'zoo.py'}:model")
    data_spec = DataSpec(f"{root / 'zoo.py'}:data", mean=(0.5,), std=(0.25,))
    atlas = featurelens.scan(
        model_spec.build(), data_spec.build(), ["0", "3"], top_k=3, progress=False,
        model_spec=model_spec, data_spec=data_spec,
    )  # fmt: skip
    return atlas.save(root / "atlas")


def direct(atlas_dir: Path, layer: str, channels) -> featurelens.Visualization:
    atlas = featurelens.Atlas.load(atlas_dir)
    return featurelens.visualize(
        atlas.build_model(), layer, list(channels), input_shape=atlas.input_shape,
        value_range=featurelens.ValueRange.normalized((0.5,), (0.25,)), steps=STEPS,
        progress=False,
    )  # fmt: skip


def test_report_visualize_puts_the_synthetic_input_on_every_card(atlas_dir, tmp_path) -> None:
    out = tmp_path / "site"
    write_report(atlas_dir, out, layers=["3"], visualize={"steps": STEPS}, progress=False)
    page = next(out.glob("layer-*.html")).read_text()
    v = direct(atlas_dir, "3", range(5))
    assert v.cropped  # the receptive-field crop, not the whole input
    for i, c in enumerate(range(5)):
        card = page[page.index(f'id="channel-{c}"') :].split("</section>")[0]
        src = re.search(r'<figure class="synthetic"><img src="([^"]+)"', card).group(1)
        pixels = np.asarray(Image.open(out / src).convert("RGB"))
        assert np.array_equal(pixels, v.tiles()[i])  # the library's image, pixel for pixel
        assert f"= {float(v.activations[i]):.4g}" in card
        assert "values -2..2" in card  # the data spec's normalisation of pixels 0..1
        assert "receptive-field crop" in card
    # a later report without --visualize leaves no stale synthetic images
    write_report(atlas_dir, out, layers=["3"], progress=False)
    assert not list(out.rglob("synthetic-*.png"))
    assert 'class="synthetic"' not in next(out.glob("layer-*.html")).read_text()


def test_cli_figure_visualize_joins_the_grid_and_the_synthetic_input(atlas_dir, tmp_path) -> None:
    out = tmp_path / "fig.png"
    argv = ["figure", str(atlas_dir), "--layer", "3", "--channel", "2", "--out", str(out),
            "--visualize", "--visualize-steps", str(STEPS)]  # fmt: skip
    assert main(argv) == 0
    atlas = featurelens.Atlas.load(atlas_dir)
    grid = zf_grid(atlas.build_model(), atlas.build_data(), atlas, "3", 2)
    expected = join([grid, synthetic_sheet(direct(atlas_dir, "3", [2]))])
    assert out.read_bytes() == save_png(expected)

    sheet = tmp_path / "sheet.png"
    argv = ["figure", str(atlas_dir), "--layer", "0", "--out", str(sheet), "--visualize",
            "--visualize-steps", str(STEPS)]  # fmt: skip
    assert main(argv) == 0
    plain = layer_sheet(atlas.build_model(), atlas.build_data(), atlas, "0")
    expected = join([plain, synthetic_sheet(direct(atlas_dir, "0", range(4)))], vertical=True)
    assert sheet.read_bytes() == save_png(expected)


def test_cli_report_visualize(atlas_dir, tmp_path, capsys) -> None:
    out = tmp_path / "s"
    argv = ["report", str(atlas_dir), "--out", str(out), "--channels", "2", "--quiet",
            "--visualize", "--visualize-steps", "3"]  # fmt: skip
    assert main(argv) == 0
    names = sorted(p.name for p in out.rglob("synthetic-*.png"))
    assert names == ["synthetic-0000.png", "synthetic-0000.png", "synthetic-0001.png",
                     "synthetic-0001.png"]  # fmt: skip
    assert "3 steps" in next(out.glob("layer-*.html")).read_text()


def test_cli_refuses_bad_visualize_steps(atlas_dir, tmp_path, capsys) -> None:
    argv = ["report", str(atlas_dir), "--out", str(tmp_path / "s"), "--quiet", "--visualize",
            "--visualize-steps", "0"]  # fmt: skip
    assert main(argv) != 0
    assert "steps must be at least 1" in capsys.readouterr().err
