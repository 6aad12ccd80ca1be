"""The four speed benchmarks on a CUDA device, one after the other, in fresh processes.

    .venv/bin/python bench/gpu.py [--quick]

Runs ``projection_speed.py`` (the small and the full Zeiler-Fergus job against Captum),
``scan_speed.py`` (scan vs the bare truncated forward), ``explorer_latency.py`` (a click in
forward-pass units) and ``report_speed.py`` (batched figure projections), each with
``--device cuda``: the model on the GPU, the data on the CPU (the scan's loader pins it and
copies without blocking), results on the inputs' device. ``--quick`` shortens each run (fewer
Captum channels, examples and clicks). Exits with an error when no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def runs(quick: bool) -> list[list[str]]:
    """Each benchmark's command line (script and arguments)."""
    return [
        ["projection_speed.py", "--device", "cuda", "--captum-channels", "2" if quick else "8"],
        ["scan_speed.py", "--device", "cuda", "--size", "112" if quick else "224", "--n",
         "128" if quick else "512", "--memory-sizes", "1000"],
        ["explorer_latency.py", "--device", "cuda", "--clicks", "10" if quick else "40"],
        ["report_speed.py", "--device", "cuda"],
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device is visible: bench/gpu.py measures the GPU path only")
    print(f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    failed = []
    for command in runs(args.quick):
        print(f"\n=== {' '.join(command)}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], check=False)
        print(f"=== {command[0]}: exit {done.returncode}, {time.perf_counter() - start:.0f} s")
        if done.returncode:
            failed.append(command[0])
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
