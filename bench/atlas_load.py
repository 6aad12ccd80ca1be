"""Time of ``Atlas.load`` on a normal atlas: what validating the format costs.

Builds one atlas the size of a real one (4 layers of 64 / 128 / 256 / 512 channels, top 9,
2-D maps), saved from Python objects, then times ``featurelens.Atlas.load`` of it (median of
``--repeat`` loads, after one warm-up load) and prints the atlas's size on disk.

    PYTHONPATH=src .venv/bin/python bench/atlas_load.py
    PYTHONPATH=/path/to/older/src .venv/bin/python bench/atlas_load.py   # the same, before

It uses only ``scan``, ``Atlas.save`` and ``Atlas.load``, so it runs against older versions too.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import featurelens as fl


def make_atlas(directory: Path, top_k: int) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 512, 3, padding=1), nn.ReLU(),
    ).eval()  # fmt: skip
    x = torch.randn(64, 3, 16, 16)
    atlas = fl.scan(model, x, ["1", "3", "5", "7"], top_k=top_k, batch_size=32, progress=False)
    return atlas.save(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--top-k", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = make_atlas(Path(tmp) / "atlas", args.top_k)
        size = sum(p.stat().st_size for p in directory.iterdir())
        fl.Atlas.load(directory)  # warm-up: imports, page cache
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fl.Atlas.load(directory)
            times.append(time.perf_counter() - t0)
    print(
        f"featurelens {fl.__version__} ({Path(fl.__file__).parent}): Atlas.load of "
        f"{size / 1e6:.2f} MB, median {statistics.median(times) * 1e3:.2f} ms, "
        f"min {min(times) * 1e3:.2f} ms over {args.repeat}"
    )


if __name__ == "__main__":
    main()
