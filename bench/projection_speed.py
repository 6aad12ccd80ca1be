"""Guided backprop on VGG16 conv3_3: a small interactive job and the Zeiler-Fergus job.

    .venv/bin/python bench/projection_speed.py [--job small|full|both] [--captum-channels 4]
        [--repeats 6] [--threads N] [--device cpu|cuda]

The small job: 27 maps (3 channels x 9 images, locations given), what one interactive call
asks; timed on its first call (the receptive field and the layer's layout computed) and on
repeated calls (both kept, :mod:`featurelens.analysis`), against three Captum calls.
The full job:

2,304 maps: every channel of torchvision ``vgg16`` (weights=None, seeded) layer
``features.15`` (the ReLU after conv3_3, 256 channels) on 9 scikit-image photos resized to
224x224 and normalised, each unit at its own arg-max. featurelens computes all of them in one
:func:`featurelens.project_units` call (forward truncated at the layer, receptive-field
crops, batched). Captum needs one ``NeuronGuidedBackprop`` call per channel (whole model,
whole image, a per-example selector): a subset of channels is timed and extrapolated, which
the output says. Both are measured in the same run on the same machine; the maps are compared
on the subset.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import NeuronGuidedBackprop

from featurelens import Unit, get_layer, project_units

LAYER = "features.15"
PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
    "immunohistochemistry", "retina", "camera", "coins",
)  # fmt: skip
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def images(size: int = 224) -> torch.Tensor:
    """(9, 3, size, size): the photos, RGB in [0, 1], resized, ImageNet-normalised."""
    out = []
    for name in PHOTOS:
        im = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        if im.ndim == 2:
            im = np.stack([im] * 3, axis=-1)
        t = torch.from_numpy(im[..., :3]).permute(2, 0, 1) / 255.0
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True)[0]
        out.append((t.clamp(0, 1) - MEAN) / STD)
    return torch.stack(out)


def captum_channel(model: torch.nn.Module, x: torch.Tensor, channel: int, locs) -> torch.Tensor:
    rows = torch.arange(len(x), device=x.device)
    chans = torch.full((len(x),), channel, device=x.device)
    us, vs = locs[:, 0], locs[:, 1]

    def selector(out: torch.Tensor) -> torch.Tensor:
        return out[rows, chans, us, vs]

    return NeuronGuidedBackprop(model, get_layer(model, LAYER)).attribute(x, selector)


def argmax_locations(acts: torch.Tensor, channel: int) -> torch.Tensor:
    """(N, 2): each example's first arg-max of ``channel`` in ``acts`` (N, K, H, W)."""
    flat = acts[:, channel].flatten(1).argmax(dim=1)
    return torch.stack([flat // acts.shape[3], flat % acts.shape[3]], dim=1)


def time_captum(model, x, acts, channels, maps) -> tuple[float, float]:
    """Seconds per channel of Captum (N maps each), and its worst difference from ``maps``
    ``(len(channels), N, C, H, W)``."""
    worst = 0.0
    start = time.perf_counter()
    for k, ours in zip(channels, maps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            device = next(model.parameters()).device
            ref = captum_channel(model, x.to(device), k, argmax_locations(acts, k).to(device))
            ref = ref.cpu()  # waits for the GPU too
        worst = max(worst, float((ref - ours).abs().max()))
    return (time.perf_counter() - start) / len(channels), worst


def small_job(model, x, acts, repeats: int) -> None:
    """27 units (3 channels x 9 images, locations given): the cost of one interactive call."""
    n, chosen = len(x), [7, 100, 200]
    units, rows = [], []
    for k in chosen:
        for i, loc in enumerate(argmax_locations(acts, k).tolist()):
            units.append(Unit(LAYER, k, tuple(loc)))
            rows.append(i)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        maps = project_units(model, x, units, "guided", rows=rows)
        times.append(time.perf_counter() - start)
    first, warm = times[0], statistics.median(times[1:]) if len(times) > 1 else times[0]
    maps = maps.view(len(chosen), n, *x.shape[1:])
    per_channel, worst = time_captum(model, x, acts, chosen, maps)
    captum = per_channel * len(chosen)
    print(f"small job: {len(units)} maps ({len(chosen)} channels x {n} images, locations "
          f"given): first call {first:.3f} s (field and layout computed), then median "
          f"{warm:.3f} s over {len(times) - 1} calls (kept)")  # fmt: skip
    print(f"  captum: {captum:.3f} s for the same {len(units)} maps")
    print(f"  speed-up: {captum / warm:.1f}x (repeated call), {captum / first:.1f}x (first call)")
    print(f"  max abs difference: {worst:.3g} (largest map value {float(maps.abs().max()):.3g})")


def full_job(model, x, acts, captum_channels: int, chunk_size: int | None) -> None:
    """Every channel on every image, each at its own arg-max (the Zeiler-Fergus job)."""
    n, channels = len(x), acts.shape[1]
    units = [Unit(LAYER, k) for k in range(channels) for _ in range(n)]
    rows = [i for _ in range(channels) for i in range(n)]
    start = time.perf_counter()
    maps = project_units(model, x, units, "guided", rows=rows, chunk_size=chunk_size)
    ours = time.perf_counter() - start
    maps = maps.view(channels, n, *x.shape[1:])
    print(f"full job: {len(units)} maps in {ours:.1f} s ({1000 * ours / len(units):.1f} ms/map)")
    subset = np.linspace(0, channels - 1, captum_channels).round().astype(int).tolist()
    per_channel, worst = time_captum(model, x, acts, subset, maps[subset])
    captum = per_channel * channels
    scale = float(maps[subset].abs().max())
    print(f"  captum: {len(subset)} of {channels} channels timed ({per_channel:.2f} s per channel "
          f"of {n} maps), extrapolated to {channels} channels: {captum:.0f} s")  # fmt: skip
    print(f"  speed-up: {captum / ours:.1f}x")
    print(f"  max abs difference over the {len(subset) * n} compared maps: {worst:.3g} "
          f"(largest map value {scale:.3g})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captum-channels", type=int, default=4, help="channels timed for Captum")
    parser.add_argument("--chunk-size", type=int, default=None, help="units per pass (auto)")
    parser.add_argument("--job", choices=("small", "full", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=6, help="calls of the small job")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval().to(args.device)
    x = images()  # on the CPU: featurelens copies crops to the model, maps come back here
    print(f"vgg16 (weights=None, seed 0), layer {LAYER!r}, {len(x)} images {tuple(x.shape[1:])}, "
          f"{torch.get_num_threads()} threads, {args.device}")  # fmt: skip

    # Arg-max locations for the small job and Captum's selector, from a plain hooked forward.
    seen = {}
    hook = get_layer(model, LAYER).register_forward_hook(
        lambda m, i, o: seen.setdefault("y", o.detach().clone())
    )
    with torch.no_grad():
        model(x.to(args.device))
    hook.remove()
    acts = seen["y"].cpu()  # (9, 256, 56, 56)
    if args.job in ("small", "both"):
        small_job(model, x, acts, max(2, args.repeats))
    if args.job in ("full", "both"):
        full_job(model, x, acts, args.captum_channels, args.chunk_size)


if __name__ == "__main__":
    main()
