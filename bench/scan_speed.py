"""Speed and memory of featurelens.scan, measured side by side in one run.

On the same data and a VGG-style network (torchvision vgg11, weights=None) this prints
images/s of:

* ``scan``       featurelens.scan over 3 layers (top-9, score max);
* ``truncated``  the bare forward pass cut after the deepest of those layers: the limit;
* ``full``       the bare full forward pass;
* ``naive``      the naive way: full forward with hooks on the 3 layers + torch.topk per batch;

and their ratios. Goals: scan within 5% of the truncated forward, and faster than naive by
about the share of the network it skips (full / truncated time).

Then the peak resident memory (RSS high-water, fresh subprocess each) of scans over 1,000 and
5,000 examples produced on the fly: it must not grow with the dataset.

    .venv/bin/python bench/scan_speed.py --threads 1   # about 2-3 minutes on a CPU
    .venv/bin/python bench/scan_speed.py --size 112 --n 128 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torchvision

import featurelens as fl

LAYERS = ["features.4", "features.9", "features.14"]  # ReLUs after conv 2, 4 and 6 of 8


def vgg() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.vgg11(weights=None).eval()


def timed(fn) -> tuple[float, float]:
    """Wall and process-CPU seconds of one run of ``fn``."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def batches(x: torch.Tensor, batch_size: int):
    for s in range(0, len(x), batch_size):
        yield x[s : s + batch_size]


def naive_scan(model, x, layers, top_k, batch_size, device):
    """Full forward, hooks keep every requested output, then topk over (kept + batch)."""
    outs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o.clone()))
        for n in layers
    ]
    best: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                model(x[s : s + batch_size].to(device))
                for n in layers:
                    score = outs[n].flatten(2).amax(2).T  # (C, N)
                    idx = torch.arange(s, s + score.shape[1], device=device).expand_as(score)
                    if n in best:
                        score = torch.cat([best[n][0], score], 1)
                        idx = torch.cat([best[n][1], idx], 1)
                    v, k = score.topk(top_k, dim=1)
                    best[n] = (v, idx.gather(1, k))
    finally:
        for h in handles:
            h.remove()
    return best


class OnTheFly(torch.utils.data.Dataset):
    """``n`` random images made when asked (the dataset itself holds no memory)."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.size, self.size, generator=g)


def memory_child(n: int, size: int, batch_size: int) -> None:
    model = vgg()
    data = OnTheFly(n, size)
    warm = torch.utils.data.Subset(data, range(2 * batch_size))
    fl.scan(model, warm, LAYERS, top_k=9, batch_size=batch_size, progress=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t = time.perf_counter()
    fl.scan(model, data, LAYERS, top_k=9, batch_size=batch_size, progress=False)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": n, "base_mib": base / 1024, "peak_mib": peak / 1024, "s": wall}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="input side (default 64)")
    p.add_argument("--n", type=int, default=256, help="examples for the speed runs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory-sizes", default="1000,5000")
    p.add_argument("--memory-input", type=int, default=32, help="input side for memory runs")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child is not None:
        if args.threads:
            torch.set_num_threads(args.threads)
        memory_child(args.memory_child, args.memory_input, args.batch_size)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = vgg().to(device)
    torch.manual_seed(1)
    x = torch.randn(args.n, 3, args.size, args.size)
    deepest = max(int(n.split(".")[1]) for n in LAYERS)
    truncated_net = model.features[: deepest + 1]
    bs = args.batch_size

    def truncated():
        with torch.inference_mode():
            for b in batches(x, bs):
                truncated_net(b.to(device))

    def full():
        with torch.inference_mode():
            for b in batches(x, bs):
                model(b.to(device))

    def scan():
        fl.scan(model, x, LAYERS, top_k=9, batch_size=bs, device=device, progress=False)

    def naive():
        naive_scan(model, x, LAYERS, 9, bs, device)

    print(
        f"vgg11 (weights=None) {args.size}x{args.size}, {args.n} images, batch {bs}, "
        f"layers {LAYERS}, device {device}, torch threads {torch.get_num_threads()}"
    )
    candidates = {"truncated": truncated, "scan": scan, "naive": naive, "full": full}
    for fn in candidates.values():  # warm-up: allocator, fx trace, model fingerprint
        fn()
    walls: dict[str, float] = {}
    cpus: dict[str, float] = {}
    # interleaved, best of --repeats: load changes on a shared machine hit every candidate;
    # CPU seconds of this process are less sensitive to other processes than wall time
    for _ in range(args.repeats):
        for name, fn in candidates.items():
            wall, cpu = timed(fn)
            walls[name] = min(walls.get(name, float("inf")), wall)
            cpus[name] = min(cpus.get(name, float("inf")), cpu)
    print(f"  {'':<10} {'images/s (wall)':>16} {'images/CPU-s':>13}")
    for name in candidates:
        print(f"  {name:<10} {args.n / walls[name]:16.1f} {args.n / cpus[name]:13.1f}")
    for label, t in (("wall", walls), ("CPU", cpus)):
        print(
            f"  [{label}] scan / truncated forward speed: {t['truncated'] / t['scan']:.3f} "
            f"(goal >= 0.95); scan / naive speed: {t['naive'] / t['scan']:.2f}x "
            f"(full / truncated forward: {t['full'] / t['truncated']:.2f}x)"
        )

    print(f"peak memory of scan, {args.memory_input}x{args.memory_input} inputs made on the fly:")
    for n in (int(v) for v in args.memory_sizes.split(",")):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(n), "--memory-input",
             str(args.memory_input), "--batch-size", str(bs), "--threads", str(args.threads)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"  {r['n']:>6} examples: RSS high-water {r['peak_mib']:.0f} MiB "
            f"(after a warm-up scan {r['base_mib']:.0f} MiB; grew {r['peak_mib'] - r['base_mib']:.1f}"
            f" MiB), {r['n'] / r['s']:.0f} images/s"
        )


if __name__ == "__main__":
    main()
