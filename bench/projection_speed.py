"""The Zeiler-Fergus job: guided backprop for every channel of VGG16 conv3_3 on 9 images.

    .venv/bin/python bench/projection_speed.py [--captum-channels 4] [--threads N]

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
    rows = torch.arange(len(x))
    chans = torch.full((len(x),), channel)
    us, vs = locs[:, 0], locs[:, 1]

    def selector(out: torch.Tensor) -> torch.Tensor:
        return out[rows, chans, us, vs]

    return NeuronGuidedBackprop(model, get_layer(model, LAYER)).attribute(x, selector)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captum-channels", type=int, default=4, help="channels timed for Captum")
    parser.add_argument("--chunk-size", type=int, default=None, help="units per pass (auto)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    x = images()
    n, channels = len(x), 256
    print(f"vgg16 (weights=None, seed 0), layer {LAYER!r}, {n} images {tuple(x.shape[1:])}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip

    units = [Unit(LAYER, k) for k in range(channels) for _ in range(n)]
    rows = [i for _ in range(channels) for i in range(n)]
    start = time.perf_counter()
    maps = project_units(model, x, units, "guided", rows=rows, chunk_size=args.chunk_size)
    ours = time.perf_counter() - start
    maps = maps.view(channels, n, *x.shape[1:])
    print(f"featurelens: {len(units)} maps in {ours:.1f} s ({1000 * ours / len(units):.1f} ms/map)")

    # Arg-max locations for Captum's selector, from a plain hooked forward.
    seen = {}
    hook = get_layer(model, LAYER).register_forward_hook(
        lambda m, i, o: seen.setdefault("y", o.detach().clone())
    )
    with torch.no_grad():
        model(x)
    hook.remove()
    acts = seen["y"]  # (9, 256, 56, 56)

    subset = np.linspace(0, channels - 1, args.captum_channels).round().astype(int).tolist()
    worst = 0.0
    start = time.perf_counter()
    for k in subset:
        flat = acts[:, k].flatten(1).argmax(dim=1)
        locs = torch.stack([flat // acts.shape[3], flat % acts.shape[3]], dim=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = captum_channel(model, x, k, locs)
        worst = max(worst, float((ref - maps[k]).abs().max()))
    per_channel = (time.perf_counter() - start) / len(subset)
    captum = per_channel * channels
    scale = float(maps[subset].abs().max())
    print(f"captum: {len(subset)} of {channels} channels timed ({per_channel:.2f} s per channel "
          f"of {n} maps), extrapolated to {channels} channels: {captum:.0f} s")  # fmt: skip
    print(f"speed-up: {captum / ours:.1f}x")
    print(f"max abs difference over the {len(subset) * n} compared maps: {worst:.3g} "
          f"(largest map value {scale:.3g})")  # fmt: skip


if __name__ == "__main__":
    main()
