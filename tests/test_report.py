"""The static HTML atlas and the figure/report CLI: links resolve, images load, atlas untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from PIL import Image

import featurelens
from conftest import Permute
from featurelens.atlas import AtlasError
from featurelens.cli import main
from featurelens.figures import zf_grid
from featurelens.render import save_png
from featurelens.report import ReportError, write_report
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
        x = torch.rand(30, 1, 12, 12, generator=g)
        return torch.utils.data.TensorDataset((x - 0.5) / 0.25, torch.zeros(30, dtype=torch.long))
    """
)


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    (root / "zoo.py").write_text(ZOO)
    model_spec = ModelSpec(f"{root / 'zoo.py'}:model")
    data_spec = DataSpec(f"{root / 'zoo.py'}:data", mean=(0.5,), std=(0.25,))
    model = model_spec.build()
    atlas = featurelens.scan(
        model, data_spec.build(), ["0", "3"], top_k=4, progress=False,
        model_spec=model_spec, data_spec=data_spec,
    )  # fmt: skip
    return atlas.save(root / "atlas")


@pytest.fixture(scope="module")
def site(atlas_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    index = write_report(atlas_dir, out, method="guided", style="magnitude", progress=False)
    assert index == out / "index.html"
    return out


def tree_digest(directory: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(directory)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[dict[str, str]] = []
        self.ids: set[str] = set()
        self.stylesheets: list[str] = []
        self.cards = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "img":
            self.images.append(a)
        if tag == "link" and a.get("rel") == "stylesheet":
            self.stylesheets.append(a["href"])
        if tag == "section" and "card" in a.get("class", ""):
            self.cards += 1

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def crawl(site: Path) -> dict[Path, Page]:
    """Every page reachable from index.html by relative links."""
    pages, todo = {}, [site / "index.html"]
    while todo:
        path = todo.pop()
        if path in pages:
            continue
        pages[path] = page = parse(path)
        for href in page.links:
            target = urlsplit(href)
            assert not target.scheme and not target.netloc, f"{href} is not a relative link"
            if target.path.endswith(".html"):
                todo.append((path.parent / unquote(target.path)).resolve())
    return pages


def test_links_and_images_all_resolve(site):
    pages = crawl(site)
    assert {p.name for p in pages} == {"index.html", "layer-0.html", "layer-3.html"}
    for path, page in pages.items():
        for href in page.links:
            target = urlsplit(href)
            dest = (path.parent / unquote(target.path)).resolve() if target.path else path
            assert dest.is_file(), f"{path.name}: broken link {href}"
            if target.fragment:
                assert target.fragment in pages[dest].ids, f"{path.name}: no anchor {href}"
        for css in page.stylesheets:
            assert (path.parent / css).is_file()
        for img in page.images:
            file = path.parent / unquote(img["src"])
            assert file.is_file(), f"{path.name}: missing image {img['src']}"
            assert img.get("loading") == "lazy"
            with Image.open(file) as im:
                w, h = im.size
            if "thumb" not in img.get("class", ""):
                assert (int(img["width"]), int(img["height"])) == (w, h)


def test_index_states_model_data_and_receptive_fields(site, atlas_dir):
    atlas = featurelens.Atlas.load(atlas_dir)
    text = " ".join(parse(site / "index.html").text)
    assert "zoo.py:model" in text and "zoo.py:data" in text
    model = atlas.build_model()
    for layer in ("0", "3"):
        rf = featurelens.receptive_field(model, atlas.input_shape, layer)
        html = (site / "index.html").read_text()
        row = html[html.index(f'href="layer-{layer}.html"') :].split("</tr>")[0]
        size, stride, padding = (" x ".join(map(str, v)) for v in (rf.size, rf.stride, rf.padding))
        assert f"<td>{size}</td><td>{stride}</td><td>{padding}</td>" in row


def test_layer_page_has_a_card_per_channel_with_the_hits(site, atlas_dir):
    atlas = featurelens.Atlas.load(atlas_dir)
    for layer in atlas.layers:
        page = parse(site / f"layer-{layer}.html")
        assert page.cards == atlas.channels(layer)
        html = (site / f"layer-{layer}.html").read_text()
        for c in range(atlas.channels(layer)):
            card = html[html.index(f'id="channel-{c}"') :].split("</section>")[0]
            for rank, hit in enumerate(atlas.top(layer, c), 1):
                loc = ", ".join(map(str, hit.location))
                assert (
                    f"<td>{rank}</td><td>{hit.index}</td><td>{hit.score:.4g}</td><td>({loc})</td>"
                    in card
                )


def test_report_images_are_the_figures(site, atlas_dir):
    atlas = featurelens.Atlas.load(atlas_dir)
    model, data = atlas.build_model(), atlas.build_data()
    png = save_png(zf_grid(model, data, atlas, "3", 2, "guided", 4, "magnitude"))
    assert (site / "img" / "3" / "channel-0002.png").read_bytes() == png


def test_rendering_never_modifies_the_atlas(atlas_dir, tmp_path):
    before = tree_digest(atlas_dir)
    write_report(atlas_dir, tmp_path / "site", channels=1, progress=False)
    assert (
        main(
            [
                "figure",
                str(atlas_dir),
                "--layer",
                "3",
                "--channel",
                "1",
                "--out",
                str(tmp_path / "f.png"),
            ]
        )
        == 0
    )
    assert tree_digest(atlas_dir) == before
    with pytest.raises(ReportError, match="inside it"):
        write_report(atlas_dir, atlas_dir / "site", progress=False)
    with pytest.raises(ReportError, match="inside it"):
        write_report(atlas_dir, atlas_dir, progress=False)
    assert tree_digest(atlas_dir) == before


def test_cli_figure_equals_library(atlas_dir, tmp_path, capsys):
    out = tmp_path / "fig.png"
    argv = [
        "figure",
        str(atlas_dir),
        "--layer",
        "0",
        "--channel",
        "3",
        "--style",
        "signed",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    atlas = featurelens.Atlas.load(atlas_dir)
    expected = save_png(
        zf_grid(atlas.build_model(), atlas.build_data(), atlas, "0", 3, style="signed")
    )
    assert out.read_bytes() == expected
    sheet = tmp_path / "sheet.png"
    assert main(["figure", str(atlas_dir), "--layer", "3", "--out", str(sheet)]) == 0
    assert Image.open(sheet).size[0] > 0


def test_cli_report_prints_index(atlas_dir, tmp_path, capsys):
    assert (
        main(["report", str(atlas_dir), "--out", str(tmp_path / "s"), "--channels", "1", "--quiet"])
        == 0
    )
    assert capsys.readouterr().out.strip() == str((tmp_path / "s" / "index.html").resolve())


def broken_copy(atlas_dir: Path, tmp_path: Path, **changes) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(atlas_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(changes)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"complete": False}, "incomplete scan.*resume"),
        ({"format_version": 99}, "format version 99"),
    ],
)
def test_bad_atlas_gives_clear_errors(atlas_dir, tmp_path, capsys, change, message):
    bad = broken_copy(atlas_dir, tmp_path, **change)
    with pytest.raises(AtlasError, match=message):
        write_report(bad, tmp_path / "site", progress=False)
    assert main(["report", str(bad), "--out", str(tmp_path / "site")]) == 2
    assert "error" in capsys.readouterr().err


def test_cli_bad_inputs(atlas_dir, tmp_path, capsys):
    fig = str(tmp_path / "f.png")
    assert (
        main(["figure", str(tmp_path / "nope"), "--layer", "0", "--channel", "0", "--out", fig])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["figure", str(atlas_dir), "--layer", "9", "--channel", "0", "--out", fig]) == 2
    err = capsys.readouterr().err
    assert "'9'" in err and "'0'" in err and "'3'" in err  # the atlas' layers are listed
    assert main(["figure", str(atlas_dir), "--layer", "3", "--channel", "5", "--out", fig]) == 2
    assert "valid 0..4" in capsys.readouterr().err
    for flag, value in (("--method", "deconv"), ("--style", "heat")):
        with pytest.raises(SystemExit) as exc:
            main(
                [
                    "figure",
                    str(atlas_dir),
                    "--layer",
                    "3",
                    "--channel",
                    "0",
                    flag,
                    value,
                    "--out",
                    fig,
                ]
            )
        assert exc.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown method"):
        write_report(atlas_dir, tmp_path / "s", method="deconv", progress=False)
    with pytest.raises(ValueError, match="unknown style"):
        write_report(atlas_dir, tmp_path / "s", style="heat", progress=False)
    assert not (tmp_path / "s").exists()  # validated before anything is written


def test_report_from_atlas_object_with_python_data(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 5), torch.nn.ReLU()).eval()
    x = torch.randn(10, 3, 9, 11)
    atlas = featurelens.scan(net, x, ["0"], top_k=2, progress=False)
    index = write_report(atlas, tmp_path / "s", model=net, data=x, progress=False)
    assert (tmp_path / "s" / "img" / "0" / "channel-0001.png").is_file()
    assert "Python object" in index.read_text()


def test_report_of_a_1d_model_draws_line_plots(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 5), torch.nn.ReLU()).eval()
    x = torch.randn(8, 2, 30)
    atlas = featurelens.scan(net, x, ["0"], top_k=3, progress=False)
    index = write_report(atlas, tmp_path / "s", model=net, data=x, progress=False)
    page = parse(tmp_path / "s" / "layer-0.html")
    assert page.cards == 3 and len(page.images) == 3  # no sheet for 1-D layers
    assert "5" in index.read_text()  # the receptive field size


def test_a_second_report_with_fewer_channels_leaves_no_stale_files(
    atlas_dir, tmp_path, monkeypatch
):
    import os

    atlas_before = tree_digest(atlas_dir)
    out = tmp_path / "site"
    write_report(atlas_dir, out, progress=False)
    assert (out / "img" / "0" / "channel-0003.png").is_file()
    replaced: list[str] = []
    real_replace = os.replace

    def spy(src, dst):
        # the report is built in a temporary folder next to `out` (.tmp-site-*), then moved
        staged = Path(dst).relative_to(out.parent)
        assert staged.parts[0].startswith(".tmp-site-"), dst  # nothing written into `out`
        replaced.append(str(Path(*staged.parts[1:])))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_report(atlas_dir, out, channels=2, layers=["0"], progress=False)
    monkeypatch.undo()
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {f for f in files if f.startswith("img/0/")} == {
        "img/0/channel-0000.png", "img/0/channel-0001.png", "img/0/sheet.png",
    }  # fmt: skip
    # every file of the new report arrived whole, through a temporary file and os.replace
    written = {f for f in files if not f.startswith("img/3/") and f != "layer-3.html"}
    assert written == set(replaced)
    assert not [p for p in out.rglob(".tmp-*")]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    # the whole site was replaced: layer 3, which this report does not draw, is gone
    assert not any(f.startswith("img/3/") or f == "layer-3.html" for f in files)
    assert tree_digest(atlas_dir) == atlas_before


class _Up(torch.nn.Module):
    """conv0 -> torch.roll over all dims -> conv: the receptive-field engine cannot analyse conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv2d(1, 2, 3)
        self.conv = torch.nn.Conv2d(2, 3, 3)

    def forward(self, x):
        return self.conv(torch.roll(self.conv0(x), 1))  # flattened roll: no field


def test_a_layer_without_receptive_field_gets_whole_input_figures(tmp_path):
    from featurelens.projection import CropWarning

    torch.manual_seed(0)
    net = _Up().eval()
    x = torch.randn(8, 1, 9, 7)
    atlas = featurelens.scan(net, x, ["conv0", "conv"], top_k=2, progress=False)
    with pytest.warns(CropWarning):
        index = write_report(atlas, tmp_path / "s", model=net, data=x, progress=False)
    page = parse(tmp_path / "s" / "layer-conv.html")
    assert page.cards == 3 and len(page.images) == 4  # a card per channel and the sheet
    text = (tmp_path / "s" / "layer-conv.html").read_text()
    assert "roll" in text and "figures show the whole input" in text
    assert "figures show the whole input" in index.read_text()
    with pytest.warns(CropWarning):
        expected = zf_grid(net, x, atlas, "conv", 1, k=2)
    with Image.open(tmp_path / "s" / "img" / "conv" / "channel-0001.png") as shown:
        assert save_png(shown.convert("RGB")) == save_png(expected)


def test_a_channels_last_layer_is_refused_before_anything_is_written(tmp_path):
    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.Identity()).eval()
    x = torch.randn(5, 1, 8, 8)
    atlas = featurelens.scan(first, x, ["1"], top_k=2, progress=False)
    last = torch.nn.Sequential(first[0], Permute()).eval()  # same names, (N, H, W, C)
    with pytest.raises(ValueError, match="layer '1' outputs its channels at dim 3"):
        write_report(atlas, tmp_path / "s", model=last, data=x, progress=False)
    assert not (tmp_path / "s").exists()
