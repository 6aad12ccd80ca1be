"""Peak memory of the explorer under concurrent uploads of a small file with huge dimensions.

A 4000x4000 progressive JPEG of about 110 KB is POSTed N times at once to an explorer running
in a subprocess (an RGB model taking 64x64 inputs); the server's resident memory is read from
``/proc/PID/status`` (Linux only): VmRSS before, the peak (VmHWM, reset with ``clear_refs``
after a warm-up upload) and VmRSS after. Run it against any source tree::

    PYTHONPATH=src python bench/upload_memory.py               # this tree, N = 8 and 40
    python bench/upload_memory.py --src /tmp/old/src --n 8 40  # another version

The test ``tests/test_app.py::test_concurrent_huge_uploads_keep_memory_flat`` asserts a bound
on the same measurement.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SERVER = r"""
import sys, torch, featurelens
from featurelens.app import serve
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
data = torch.rand(8, 3, 64, 64)
featurelens.scan(net, data, ["1"], top_k=2, progress=False).save(sys.argv[1])
server = serve(sys.argv[1], port=0, model=net, data=data)
print(server.port, flush=True)
server.wait()
"""


def huge_jpeg(side: int = 4000) -> bytes:
    """A ``side`` x ``side`` progressive JPEG of a few strokes: about 110 KB at 4000."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (side, side), (20, 30, 40))
    draw = ImageDraw.Draw(image)
    points = [(side // 5, side // 5), (4 * side // 5, side // 5), (2 * side // 5, 4 * side // 5)]
    draw.line(points, fill=(250, 250, 250), width=side // 12)
    buf = io.BytesIO()
    image.save(buf, "JPEG", progressive=True, quality=20)
    return buf.getvalue()


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of ``pid`` in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def reset_peak(pid: int) -> None:
    """Set VmHWM to the current RSS (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def measure(src: str | None, counts: list[int]) -> list[dict[str, float]]:
    """Start a server, then for each N: N concurrent uploads; RSS before, peak, after (MB)."""
    import httpx

    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(Path(tmp) / "atlas")],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        try:
            port = int(proc.stdout.readline())
            body = huge_jpeg()
            headers = {"content-type": "image/jpeg", "x-featurelens": "1"}
            url = f"http://127.0.0.1:{port}/api/inputs"
            with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=100)) as http:

                def post(_: int) -> int:
                    return http.post(url, content=body, headers=headers).status_code

                assert post(0) == 201  # warm-up: imports, first allocations
                for n in counts:
                    time.sleep(1.0)
                    before = memory_mb(proc.pid)["VmRSS"]
                    reset_peak(proc.pid)
                    start = time.perf_counter()
                    with ThreadPoolExecutor(n) as pool:
                        statuses = list(pool.map(post, range(n)))
                    seconds = time.perf_counter() - start
                    assert statuses == [201] * n, statuses
                    peak = memory_mb(proc.pid)["VmHWM"]
                    time.sleep(1.0)
                    after = memory_mb(proc.pid)["VmRSS"]
                    rows.append({"n": n, "before": before, "peak": peak, "after": after,
                                 "growth": peak - before, "seconds": seconds})  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(10)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", help="PYTHONPATH of the featurelens to measure (default: as is)")
    parser.add_argument("--n", type=int, nargs="+", default=[8, 40], help="concurrent uploads")
    args = parser.parse_args()
    print(f"upload: {len(huge_jpeg())} bytes, 4000x4000 progressive JPEG")
    for row in measure(args.src, args.n):
        print(
            f"N={row['n']:3d}: RSS before {row['before']:.0f} MB, peak {row['peak']:.0f} MB "
            f"(+{row['growth']:.0f} MB), after {row['after']:.0f} MB, {row['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
