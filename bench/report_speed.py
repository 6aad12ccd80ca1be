"""How much batching the projections saves when drawing an HTML atlas.

Measured side by side in one run, on the demo CNN (``featurelens.demo:mnist_cnn``, random
weights, so no training or dataset download is needed) over 2,000 random 28 x 28 inputs, for
every channel of ``features.conv3`` (64 channels x top 9 = 576 deconvnet maps):

* per hit: one ``project`` call per (channel, hit) - what a naive figure loop does;
* per channel: one call per channel (its 9 hits) - what ``zf_grid`` does;
* batched: ``EXAMPLES_PER_CALL`` hits per call (32 channels) - what ``featurelens report`` does;

then the whole ``write_report`` for the three conv layers (112 channels, images included).
Prints times, ratios, and the max abs difference between the batched and per-hit maps.

Run: ``.venv/bin/python bench/report_speed.py [--device cuda]``
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import featurelens
from featurelens.demo import mnist_cnn
from featurelens.figures import project_hits
from featurelens.report import EXAMPLES_PER_CALL, write_report

LAYER = "features.conv3"


def timed(fn):  # noqa: ANN001, ANN201
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    device = torch.device(parser.parse_args().device)
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


if __name__ == "__main__":
    main()
