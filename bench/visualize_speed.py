"""What a unit wants: featurelens.visualize against torch-lucent on VGG16 conv3_3.

    .venv/bin/python bench/visualize_speed.py [--steps 32] [--channels 0,1] [--all] [--threads N]

The objective of issue 13: one channel of torchvision ``vgg16`` (weights=None, seeded; no
pretrained weights download here) at layer ``features.15`` (the ReLU after conv3_3), the unit
at the centre of its 56 x 56 grid, on 224 x 224 ImageNet-normalised inputs. Both libraries use
the same parameterisation (Fourier coefficients scaled by 1/frequency, decorrelated colours,
a sigmoid into pixels 0..1, then ImageNet's normalisation), Adam at lr 0.05, and the same
kinds of random transforms (jitter, scale, rotation) at each library's own defaults.

* **torch-lucent** (0.1.8) optimises the whole 224 x 224 image (padded by 12 for its
  transforms) through the whole model, one channel per ``render_vis`` call.
* **featurelens** optimises only the 42 x 42 crop that holds the unit's receptive field,
  with the network truncated at the layer; ``--all`` also times every channel of the layer
  (256) in one batched call.

Both run in the same process on the same machine, interleaved channel by channel, after one
warm-up each (imports, first-call costs). The final activation is the unit's value on each
library's final image, untransformed, computed by the same plain forward. The issue's full
run is ``--steps 256 --all`` (minutes on a 2-core CPU); the default is kept small.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import numpy as np
import torch
import torchvision

from featurelens import ValueRange, visualize

LAYER = "features.15"
LUCENT_LAYER = "features_15"  # lucent joins module names with "_"
SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def unit_value(model: torch.nn.Module, x: torch.Tensor, channel: int) -> float:
    """The centre unit of ``channel`` on normalised ``x`` ``(1, 3, 224, 224)``: a plain forward."""
    with torch.no_grad():
        y = model.features[:16](x)  # (1, 256, 56, 56)
    return float(y[0, channel, y.shape[2] // 2, y.shape[3] // 2])


def run_lucent(model: torch.nn.Module, channel: int, steps: int) -> tuple[float, float]:
    """Seconds and final activation of torch-lucent's ``render_vis`` for one channel."""
    from lucent.optvis import objectives, param, render

    torch.manual_seed(channel)
    np.random.seed(channel)
    twin = copy.deepcopy(model)  # lucent leaves its hooks on the model it is given
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = render.render_vis(
            twin, objectives.neuron(LUCENT_LAYER, channel), param_f=lambda: param.image(SIZE),
            thresholds=(steps,), show_image=False, progress=False,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    x = torch.from_numpy(images[0]).permute(0, 3, 1, 2).float()  # (1, 3, 224, 224) in 0..1
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return seconds, unit_value(model, x, channel)


def run_featurelens(
    model: torch.nn.Module, channels: list[int], steps: int
) -> tuple[float, list[float], tuple[int, ...]]:
    """Seconds, final activations (checked by a plain forward) and the canvas size."""
    vr = ValueRange.normalized(MEAN, STD)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dead units of a random network are expected
        v = visualize(
            model, LAYER, channels, input_shape=(3, SIZE, SIZE), value_range=vr, steps=steps,
            lr=0.05, progress=False,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    full = v.full()  # the crops pasted into grey inputs
    acts = [unit_value(model, full[i : i + 1], c) for i, c in enumerate(channels)]
    for a, b in zip(acts, v.activations.tolist()):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (a, b)  # the crop gives the unit's value
    return seconds, acts, v.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="optimiser steps (issue: 256)")
    parser.add_argument("--channels", default="0,1", help="channels compared with lucent")
    parser.add_argument("--all", action="store_true", help="also time all 256 channels at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    channels = [int(c) for c in args.channels.split(",")]
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    print(f"vgg16 (weights=None) {LAYER}, centre unit, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")  # fmt: skip

    run_lucent(model, 0, 1)  # warm-ups: imports (kornia, dynamo via Adam), first calls
    run_featurelens(model, [0], 1)

    rows = []
    for c in channels:
        t_fl, (a_fl,), size = run_featurelens(model, [c], args.steps)
        t_lu, a_lu = run_lucent(model, c, args.steps)
        rows.append((c, t_fl, a_fl, t_lu, a_lu))
        print(
            f"channel {c:3d}: featurelens {t_fl:7.2f} s  act {a_fl:8.4f}  (canvas {size}) | "
            f"lucent {t_lu:7.2f} s  act {a_lu:8.4f} (224 x 224) | speed-up {t_lu / t_fl:5.1f}x, "
            f"activation ratio {a_fl / a_lu if a_lu else float('inf'):5.2f}"
        )
    t_fl = sum(r[1] for r in rows)
    t_lu = sum(r[3] for r in rows)
    print(f"total: featurelens {t_fl:.2f} s, lucent {t_lu:.2f} s: {t_lu / t_fl:.1f}x faster")
    if args.all:
        t_all, acts, _ = run_featurelens(model, list(range(256)), args.steps)
        live = sum(a > 0 for a in acts)
        print(
            f"featurelens, all 256 channels in one call: {t_all:.1f} s "
            f"({t_all / 256:.2f} s per channel; lucent per channel here: "
            f"{t_lu / len(rows):.1f} s); {live} of 256 units above 0"
        )


if __name__ == "__main__":
    main()
