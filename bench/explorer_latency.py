"""The explorer's latency per click, in units of one bare truncated forward pass.

    .venv/bin/python bench/explorer_latency.py [--clicks 20] [--threads N] [--device cpu|cuda]

For two models -- the demo CNN (1 x 28 x 28, layer ``features.relu2``) and torchvision
``resnet18`` (weights=None, seeded; 3 x 224 x 224, layer ``layer2``) -- an atlas is scanned
from random inputs, an :class:`featurelens.explorer.Explorer` is built on it, and two requests
are timed from call to PNG bytes, each on what the explorer has not computed yet:

* **activations**: ``activation_png`` of a new input (one truncated forward, the sprite drawn);
* **projection**: ``projection_png`` of a clicked unit (a new channel and location, guided
  backprop) on an input whose activations the page already shows.

Each is reported as median and 95th percentile, divided by the median time of one bare
truncated forward of one example (forward hooks stop the model at the layer, under no_grad).
The goal: a median of at most 2. The first projection of a layer (which measures the layer's
layout once) is shown apart. The HTTP layer (:mod:`featurelens.app.http`) adds parsing and
headers on top of these calls.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import featurelens as fl
from featurelens.demo import mnist_cnn
from featurelens.explorer import Explorer
from featurelens.graph import capture, preserved

MODELS = {  # name: (factory, input shape, layer)
    "demo CNN": (mnist_cnn, (1, 28, 28), "features.relu2"),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), (3, 224, 224), "layer2"),
}


def bare_forward(model: torch.nn.Module, x: torch.Tensor, layer: str, repeats: int) -> float:
    """Median seconds of one truncated forward of ``x`` (1, C, *spatial), no grad."""
    times = []
    with preserved(model), torch.no_grad(), capture(model, [layer]) as run:
        run(x)  # warm-up
        for _ in range(repeats):
            synchronize(x.device)
            start = time.perf_counter()
            run(x)
            synchronize(x.device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (CUDA runs asynchronously); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(name: str, clicks: int, device: str) -> None:
    factory, shape, layer = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval().to(device)
    data = torch.randn(2 * clicks + 2, *shape)
    atlas = fl.scan(model, data, [layer], top_k=4, progress=False, device=device)
    ex = Explorer(atlas, model, data)
    unit = bare_forward(model, data[:1].to(device), layer, max(5, clicks))

    activations = []
    for i in range(clicks):  # a new input each time: nothing cached
        ref = ex.input_ref(f"dataset:{i}")
        start = time.perf_counter()
        ex.activation_png(ref, layer)
        activations.append(time.perf_counter() - start)

    generator = torch.Generator().manual_seed(1)
    channels = int(atlas.channels(layer))
    grid = tuple(ex.activations(ex.input_ref("dataset:0"), layer).shape[1:])
    projections, first = [], None
    for i in range(clicks + 1):
        ref = ex.input_ref(f"dataset:{clicks + i}")
        ex.activations(ref, layer)  # the page shows the input's activations before a click
        channel = int(torch.randint(channels, (1,), generator=generator))
        location = tuple(int(torch.randint(n, (1,), generator=generator)) for n in grid)
        start = time.perf_counter()
        ex.projection_png(ref, layer, channel, location, "guided")
        elapsed = time.perf_counter() - start
        if first is None:
            first = elapsed
        else:
            projections.append(elapsed)

    print(f"{name} {shape}, layer {layer!r}, {device}: one bare truncated forward "
          f"{1000 * unit:.2f} ms")  # fmt: skip
    for what, times in (("activations", activations), ("projection", projections)):
        median, p95 = statistics.median(times), percentile(times, 0.95)
        print(f"  {what:12s} median {1000 * median:8.2f} ms = {median / unit:5.2f} forwards, "
              f"p95 {1000 * p95:8.2f} ms = {p95 / unit:5.2f} forwards ({len(times)} clicks)")  # fmt: skip
    assert first is not None
    print(f"  first projection of the layer (its layout measured): {1000 * first:.2f} ms = "
          f"{first / unit:.2f} forwards")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=20, help="requests timed of each kind")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} torch threads")
    for name in MODELS if args.model == "all" else [args.model]:
        measure(name, args.clicks, args.device)


if __name__ == "__main__":
    main()
