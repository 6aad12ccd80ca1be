"""Scans hold a lock on their output: a second scan into it is refused naming the first, a lock
left by a dead process is taken over; an item of another shape is skipped, not fatal."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import featurelens as fl
from featurelens.atlas import Manifest
from featurelens.cli import main
from featurelens.errors import LockedError
from featurelens.files import LOCK_NAME, exclusive_lock, lock_holder
from featurelens.scan import ScanInterrupted

SLOW_PY = """
import os
import pathlib
import time
import torch
from torch import nn


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU())


class Slow(torch.utils.data.Dataset):
    \"\"\"Item 120 waits until the file $RELEASE exists (when the variable is set).\"\"\"

    def __init__(self):
        self.x = torch.randn(200, 1, 10, 10, generator=torch.Generator().manual_seed(0))
        self.release = os.environ.get("RELEASE")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        while i == 120 and self.release and not pathlib.Path(self.release).exists():
            time.sleep(0.05)
        return self.x[i], i % 4


def slow():
    return Slow()
"""

SCAN = """
import sys
from featurelens import scan
from featurelens.specs import load_factory
work = sys.argv[1]
scan(load_factory(work + ":net")(), load_factory(work + ":slow")(), ["1"], top_k=3,
     batch_size=10, checkpoint=sys.argv[2], checkpoint_every=1, progress=False)
print("done", flush=True)
"""

HOLD_LOCK = """
import sys, time
from featurelens.files import exclusive_lock
with exclusive_lock(sys.argv[1], "scan"):
    print("locked", flush=True)
    time.sleep(600)
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    src = str(Path(fl.__file__).resolve().parent.parent)
    e["PYTHONPATH"] = src + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def wait_for(predicate, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_concurrent_scans_into_one_directory(tmp_path: Path, capsys):
    work = tmp_path / "work.py"
    work.write_text(SLOW_PY)
    out = tmp_path / "atlas"
    release = tmp_path / "release"
    first = subprocess.Popen(
        [sys.executable, "-c", SCAN, str(work), str(out)],
        env=env() | {"RELEASE": str(release)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: lock_holder(out) is not None or first.poll() is not None)
        holder = lock_holder(out)
        assert holder is not None and holder.pid == first.pid, first.stderr
        assert holder.host == socket.gethostname() and holder.purpose == "scan"
        # a second scan, from another process: refused at once, naming the first
        second = subprocess.run(
            [sys.executable, "-c", SCAN, str(work), str(out)],
            env=env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert second.returncode != 0 and "done" not in second.stdout
        assert "LockedError" in second.stderr
        assert (
            f"is being written by a scan by process {first.pid} on {holder.host}" in second.stderr
        )
        # the CLI says the same in one line, before building anything
        argv = ["scan", f"{work}:net", f"{work}:slow", "--layers", "1", "--top-k", "3",
                "--out", str(out), "--quiet"]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"process {first.pid}" in err and holder.started in err
        # and in Python, in this process
        with pytest.raises(LockedError, match=f"by process {first.pid}"):
            Manifest.check_new_output(out)
        assert first.poll() is None  # still scanning, untouched by the refused ones
        release.touch()
        assert first.wait(timeout=240) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    # the atlas on disk is the first scan's, complete, and the lock is gone
    atlas = fl.Atlas.load(out)
    assert atlas.complete and atlas.manifest.examples_scanned == 200
    assert not (out / LOCK_NAME).exists() and lock_holder(out) is None


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path: Path):
    out = tmp_path / "atlas"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)], env=env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert lock_holder(out).pid == holder.pid  # type: ignore[union-attr]
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
        holder.wait()
    assert (out / LOCK_NAME).exists()  # left behind, but nobody holds it
    assert lock_holder(out) is None
    x = torch.randn(8, 1, 6, 6)
    atlas = fl.scan(nn.Sequential(nn.Conv2d(1, 2, 3)), x, ["0"], top_k=2, progress=False,
                    checkpoint=out)  # fmt: skip
    assert atlas.complete and sorted(p.name for p in out.iterdir())[-1] == "manifest.json"
    assert not (out / LOCK_NAME).exists()


def test_a_scan_in_this_process_holding_the_lock_refuses_another(tmp_path: Path):
    out = tmp_path / "atlas"
    x = torch.randn(8, 1, 6, 6)
    with exclusive_lock(out, "scan"):
        with pytest.raises(LockedError, match=f"by process {os.getpid()} on"):
            fl.scan(nn.Sequential(nn.Conv2d(1, 2, 3)), x, ["0"], top_k=2, progress=False,
                    checkpoint=out)  # fmt: skip
        assert not (out / "manifest.json").exists()  # the refused scan wrote nothing
    assert not out.exists()  # the lock's directory was made for it, and removed when empty


class OneOdd(torch.utils.data.Dataset):
    """40 examples (1, 8, 8) with labels; ``odd`` ones are (1, 9, 9)."""

    def __init__(self, odd: set[int], stop_at: int | None = None) -> None:
        self.x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(2))
        self.odd, self.stop_at, self.fired = odd, stop_at, False

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == self.stop_at and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        if i in self.odd:
            return torch.zeros(1, 9, 9), 7
        return self.x[i], i % 5


class Unreadable(OneOdd):
    """The same, the odd items failing to load instead."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i in self.odd:
            raise OSError(f"cannot read {i}")
        return super().__getitem__(i)


def scan(data, **kw) -> fl.Atlas:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fl.scan(model, data, ["1"], top_k=5, batch_size=8, progress=False, **kw)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_wrongly_shaped_item_mid_dataset_is_skipped_counted_and_listed(workers: int):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        atlas = fl.scan(
            nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU()).eval(), OneOdd({17, 30}), ["1"],
            top_k=5, batch_size=8, progress=False, num_workers=workers,
        )  # fmt: skip
    assert [str(w.message) for w in caught] == [
        f"skipping example {i} (DataError: shape (1, 9, 9) differs from the first example's "
        "shape (1, 8, 8)); it is listed in the atlas manifest"
        for i in (17, 30)
    ]
    m = atlas.manifest
    assert [s.index for s in m.skipped] == [17, 30] and m.examples_scanned == 38
    assert m.skipped[0].error.startswith("DataError: shape (1, 9, 9) differs")
    # the same hits as when those items cannot be read at all
    reference = scan(Unreadable({17, 30}))
    for c in range(3):
        assert atlas.top("1", c) == reference.top("1", c)
        assert all(h.index not in (17, 30) for h in atlas.top("1", c))
    np.testing.assert_array_equal(atlas.layer("1").indices, reference.layer("1").indices)


def test_a_wrongly_shaped_item_does_not_stop_a_resumed_scan(tmp_path: Path):
    ckpt = tmp_path / "atlas"
    with pytest.raises(ScanInterrupted):
        scan(OneOdd({17}, stop_at=26), checkpoint=ckpt, checkpoint_every=1)
    saved = json.loads((ckpt / "manifest.json").read_text())
    assert saved["progress"]["next_index"] == 24 and [s["index"] for s in saved["skipped"]] == [17]
    resumed = scan(OneOdd({17}), checkpoint=ckpt)
    full = scan(OneOdd({17}))
    assert resumed.complete and resumed.manifest.skipped == full.manifest.skipped
    for c in range(3):
        assert resumed.top("1", c) == full.top("1", c)
