"""``other_activations`` and the one default method through figures, report, explorer and CLI;
hit captions; the report's file names and escaping.

The reference for a deconvnet projection through a SiLU network is written here with plain
autograd: a ReLU whose backward rectifies the gradient (Zeiler & Fergus) and SiLU left to
autograd, which is what ``other_activations="gradient"`` promises.
"""

from __future__ import annotations

import inspect
import io
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import featurelens
from featurelens.cli import build_parser, main
from featurelens.errors import ActivationError
from featurelens.figures import hit_captions, layer_sheet, project_hits, zf_figure, zf_grid
from featurelens.render import render_zf, save_png
from featurelens.report import write_report
from featurelens.rules import DEFAULT_METHOD, METHODS
from featurelens.specs import DataSpec, ModelSpec

ZOO = textwrap.dedent(
    """
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.SiLU(),
            nn.Conv2d(3, 2, 3),
        ).eval()

    def data():
        return torch.randn(12, 1, 10, 10, generator=torch.Generator().manual_seed(3))
    """
)
LAYER = "4"


@pytest.fixture(scope="module")
def silu(tmp_path_factory):
    root = tmp_path_factory.mktemp("silu")
    (root / "zoo.py").write_text(ZOO)
    model_spec = ModelSpec(f"{root / 'zoo.py'}:model")
    data_spec = DataSpec(f"{root / 'zoo.py'}:data")
    model, data = model_spec.build(), data_spec.build()
    atlas = featurelens.scan(
        model, data, [LAYER], top_k=3, progress=False, model_spec=model_spec, data_spec=data_spec
    )
    directory = atlas.save(root / "atlas")
    return model, data, atlas, directory


class _DeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, g):
        return g.clamp(min=0)  # deconvnet: rectify the signal, ignore the forward mask


def deconvnet_reference(model: nn.Sequential, x: torch.Tensor, channel: int, loc) -> np.ndarray:
    x = x[None].clone().requires_grad_(True)
    h = _DeconvReLU.apply(model[0](x))
    y = model[4](torch.nn.functional.silu(model[2](h)))  # SiLU: the plain gradient
    y[0, channel][tuple(loc)].backward()
    return x.grad[0].detach().numpy()


def decode(image: Image.Image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(save_png(image))).convert("RGB")).astype(int)


def test_one_default_method_everywhere():
    from featurelens.demo import run_demo
    from featurelens.explorer import Explorer

    assert DEFAULT_METHOD in METHODS
    for fn in (featurelens.project, zf_grid, zf_figure, layer_sheet, project_hits, write_report,
               run_demo):  # fmt: skip
        assert inspect.signature(fn).parameters["method"].default == DEFAULT_METHOD, fn
    parser = build_parser(lazy=False)
    for argv in (["figure", "a", "--layer", "x", "--out", "f.png"], ["report", "a", "--out", "o"],
                 ["demo"]):  # fmt: skip
        assert parser.parse_args(argv).method == DEFAULT_METHOD
    explorer = SimpleNamespace(methods=list(METHODS))
    assert Explorer.check_method(explorer, None) == DEFAULT_METHOD


def test_other_activations_reach_the_grid_and_equal_the_autograd_reference(silu):
    model, data, atlas, _ = silu
    with pytest.raises(ActivationError, match="SiLU"):
        zf_grid(model, data, atlas, LAYER, 0, "deconvnet")
    with pytest.raises(ActivationError, match="SiLU"):
        layer_sheet(model, data, atlas, LAYER, "deconvnet")
    fig = zf_figure(model, data, atlas, LAYER, 1, "deconvnet", k=3, other_activations="gradient")
    assert fig.meta["other_activations"] == "gradient"
    assert "passed as plain gradient" in fig.meta["note"]
    rf = featurelens.receptive_field(model, atlas.input_shape, LAYER)
    hits = atlas.top(LAYER, 1)[:3]
    maps = np.stack([deconvnet_reference(model, data[h.index], 1, h.location) for h in hits])
    boxes = [rf.interval(h.location) for h in hits]
    ref = render_zf(data[[h.index for h in hits]].numpy(), maps, boxes, "rgb")
    got, want = decode(fig.image), decode(ref.image)
    for a, b in zip(fig.layout.projection_boxes, ref.layout.projection_boxes):
        cell_a = got[a[1] : a[3], a[0] : a[2]]
        cell_b = want[b[1] : b[3], b[0] : b[2]]
        assert cell_a.shape == cell_b.shape and np.abs(cell_a - cell_b).max() <= 1
    # the plain gradient needs no rule: nothing to say
    plain = zf_figure(model, data, atlas, LAYER, 1, "gradient", k=3, other_activations="gradient")
    assert plain.meta["note"] is None
    sheet = layer_sheet(model, data, atlas, LAYER, "guided", other_activations="gradient")
    assert sheet.size[0] > 0


def test_the_report_uses_and_states_other_activations(silu, tmp_path):
    model, data, atlas, _ = silu
    with pytest.raises(ActivationError, match="other_activations='gradient'"):
        write_report(atlas, tmp_path / "no", model=model, data=data, method="guided",
                     progress=False)  # fmt: skip
    out = tmp_path / "site"
    index = write_report(atlas, out, model=model, data=data, method="guided",
                         other_activations="gradient", progress=False)  # fmt: skip
    assert "passed as plain gradient" in index.read_text()
    assert "passed as plain gradient" in (out / f"layer-{LAYER}.html").read_text()
    png = zf_grid(model, data, atlas, LAYER, 1, "guided", k=3, other_activations="gradient")
    assert (out / "img" / LAYER / "channel-0001.png").read_bytes() == save_png(png)


def test_cli_other_activations_flag(silu, tmp_path, capsys):
    model, data, atlas, directory = silu
    png = tmp_path / "g.png"
    argv = ["figure", str(directory), "--layer", LAYER, "--channel", "0", "--method", "deconvnet",
            "--k", "3", "--out", str(png)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "SiLU" in err and "--other-activations gradient" in err and not png.exists()
    assert main([*argv, "--other-activations", "gradient"]) == 0
    want = zf_grid(model, data, atlas, LAYER, 0, "deconvnet", k=3, other_activations="gradient")
    assert png.read_bytes() == save_png(want)
    out = tmp_path / "site"
    assert main(["report", str(directory), "--out", str(out), "--method", "guided", "--quiet",
                 "--other-activations", "gradient"]) == 0  # fmt: skip
    assert "passed as plain gradient" in (out / "index.html").read_text()
    args = build_parser(lazy=False).parse_args(["serve", "a", "--other-activations", "gradient"])
    assert args.other_activations == "gradient"


def test_the_explorer_takes_other_activations(silu):
    pytest.importorskip("starlette")
    from featurelens.explorer import Explorer

    model, data, atlas, _ = silu
    refusing = Explorer(atlas, model, data)
    with pytest.raises(ActivationError):
        refusing.zf_png(LAYER, 0, "deconvnet", k=3)
    explorer = Explorer(atlas, model, data, other_activations="gradient")
    assert explorer.info()["other_activations"] == "gradient"
    want = zf_grid(model, data, atlas, LAYER, 0, "deconvnet", k=3, other_activations="gradient")
    assert explorer.zf_png(LAYER, 0, "deconvnet", k=3) == save_png(want)
    with pytest.raises(ValueError, match="other_activations"):
        Explorer(atlas, model, data, other_activations="ignore")


def test_hit_captions():
    hits = [SimpleNamespace(index=5, score=2.5, label=440.0),
            SimpleNamespace(index=7, score=1.25, label=None)]  # fmt: skip
    assert hit_captions(hits, signal=True) == [
        "1 · example 5 · score 2.5 · label 440",
        "2 · example 7 · score 1.25",
    ]
    assert hit_captions(hits, signal=False) == ["440", ""]
    assert hit_captions([SimpleNamespace(index=1, score=1.0)], signal=False) is None


ODD = "a<b>&c"


def test_report_file_names_and_escaping(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module(ODD, nn.Conv2d(1, 2, 3))
    net.add_module("relu", nn.ReLU())
    net.eval()
    x = torch.randn(6, 1, 8, 8)

    class Broken(torch.utils.data.Dataset):  # example 4 fails to load, with markup in its error
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> torch.Tensor:
            if i == 4:
                raise ValueError("<script>alert(1)</script>")
            return x[i]

    with pytest.warns(RuntimeWarning, match="skipping example 4"):
        atlas = featurelens.scan(net, Broken(), [ODD], top_k=2, progress=False)
    assert [s.index for s in atlas.skipped] == [4]
    out = tmp_path / "s"
    write_report(atlas, out, model=net, data=x, progress=False)
    index = (out / "index.html").read_text()
    assert "<script>" not in index and "&lt;script&gt;alert(1)&lt;/script&gt;" in index
    slug = "a_b__c"  # every character but A-Z a-z 0-9 _ . - becomes _
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        f"img/{slug}/channel-0000.png", f"img/{slug}/channel-0001.png", f"img/{slug}/sheet.png",
        "index.html", f"layer-{slug}.html", "style.css",
    ]  # fmt: skip
    for page in (out / "index.html", out / f"layer-{slug}.html"):
        text = page.read_text()
        assert ODD not in text and "a&lt;b&gt;&amp;c" in text
