"""Receptive fields of every layer vs the empirical verifier for one layer, per classifier.

Prints, for each torchvision classifier (weights=None): the time of
``featurelens.receptive_fields`` over all layers (analytic, exact) beside the time of
``featurelens.empirical_receptive_field`` for one location of one mid-network layer, and
their ratio; "first call" includes tracing the model with torch.fx (cached afterwards). Goal:
the analytic table under 1 s per model on a 2-core machine.

Run: ``.venv/bin/python bench/rf_speed.py``
"""

from __future__ import annotations

import time

import torch
import torchvision

import featurelens as fl

MODELS = {
    "alexnet": 224,
    "vgg16": 224,
    "resnet18": 224,
    "resnet50": 224,
    "densenet121": 224,
    "inception_v3": 299,
    "mobilenet_v2": 224,
    "efficientnet_b0": 224,
    "convnext_tiny": 224,
}


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"{'model':16} {'layers':>6} {'first call':>11} {'analytic, all layers':>21} "
        f"{'empirical, 1 unit':>18} {'ratio':>7}"
    )
    for name, size in MODELS.items():
        kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
        model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
        shape = (3, size, size)
        start = time.perf_counter()
        fields = fl.receptive_fields(model, shape)  # first call: traces the model, then caches
        cold = time.perf_counter() - start
        analytic = best_of(lambda: fl.receptive_fields(model, shape))  # noqa: B023
        layer = list(fields)[len(fields) // 2]
        loc = tuple(n // 2 for n in fields[layer].output_shape)
        empirical = best_of(lambda: fl.empirical_receptive_field(model, shape, layer, loc), 1)  # noqa: B023
        print(
            f"{name:16} {len(fields):6d} {cold:10.3f}s {analytic:20.3f}s {empirical:17.3f}s "
            f"{empirical / analytic:6.1f}x"
        )


if __name__ == "__main__":
    main()
