"""Effective receptive fields of every conv layer of resnet18: batched crops vs one backward per unit.

    .venv/bin/python bench/erf_speed.py [--images 256] [--size 128] [--layers all] [--threads N]

torchvision ``resnet18`` (weights=None, seeded, eval) on ``--images`` random images of
``--size`` x ``--size`` (the issue's setting is 256 images of 128 x 128). For each conv layer,
:func:`featurelens.effective_receptive_field` (the central unit, one random channel per image,
computed through ``project_units`` on receptive-field crops, batched) is timed against the
naive computation: per unit, the full forward of the whole model on the whole image and one
backward of that unit, summing ``|d y / d x|``. Both use the same units; the output gives the
ratio of the times and the largest difference between the two normalised maps.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from featurelens import effective_receptive_field, get_layer


def naive(model: torch.nn.Module, x: torch.Tensor, layer: str, units, loc) -> torch.Tensor:
    """sum over units of sum_c |d y_u / d x_c|, normalised: one full backward per unit."""
    module = get_layer(model, layer)
    total = torch.zeros(x.shape[2:], dtype=torch.float64)
    seen: dict[str, torch.Tensor] = {}
    handle_output = seen.__setitem__
    for e, c in units:
        handle = module.register_forward_hook(lambda m, i, o: handle_output("y", o))
        xe = x[e : e + 1].clone().requires_grad_(True)
        try:
            model(xe)
        finally:
            handle.remove()
        (g,) = torch.autograd.grad(seen["y"][(0, c, *loc)], xe)
        total += g[0].abs().sum(0).double()
    return total / total.sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--layers", default="all", help="comma-separated conv layers, or all")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(args.images, 3, args.size, args.size)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    layers = convs if args.layers == "all" else args.layers.split(",")
    print(
        f"resnet18, {args.images} images of {args.size}x{args.size}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'layer':24} {'featurelens s':>13} {'naive s':>9} {'ratio':>7} {'max diff':>9}  extents"
    )
    total_f = total_n = 0.0
    worst = 0.0
    for layer in layers:
        t0 = time.perf_counter()
        erf = effective_receptive_field(model, x, layer, examples=args.images)
        t1 = time.perf_counter()
        ref = naive(model, x, layer, erf.units, erf.location)
        t2 = time.perf_counter()
        diff = float(abs(erf.map - ref.numpy()).max())
        worst = max(worst, diff)
        total_f += t1 - t0
        total_n += t2 - t1
        ext = " ".join(f"{q:.0%}:{erf.extent(q)[0]}" for q in (0.5, 0.95, 1.0))
        print(
            f"{layer:24} {t1 - t0:13.2f} {t2 - t1:9.2f} {(t2 - t1) / (t1 - t0):7.1f} "
            f"{diff:9.1e}  theoretical {erf.theoretical_size[0]} {ext}"
        )
    print(
        f"{'all':24} {total_f:13.2f} {total_n:9.2f} {total_n / total_f:7.1f} {worst:9.1e}"
        "  (max |difference| of the normalised maps)"
    )


if __name__ == "__main__":
    main()
