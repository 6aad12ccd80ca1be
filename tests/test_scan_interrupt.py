"""Stopping a checkpointed scan (Ctrl-C, SIGTERM) saves the batches done; resuming finishes it;
an output directory already holding a scan is described."""

from __future__ import annotations

import signal
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import featurelens as fl
from featurelens.atlas import AtlasError, Manifest
from featurelens.scan import ScanInterrupted, _State

check_new_output = Manifest.check_new_output

N, BATCH = 120, 16


def make_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3)).eval()


def images() -> torch.Tensor:
    return torch.randn(N, 1, 12, 12, generator=torch.Generator().manual_seed(0))


class StopsOnce(torch.utils.data.Dataset):
    """Calls ``stop()`` the first time item ``at`` is loaded (in the scan's own process)."""

    def __init__(self, x: torch.Tensor, at: int, stop) -> None:
        self.x, self.at, self.stop, self.fired = x, at, stop, False

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.at and not self.fired:
            self.fired = True
            self.stop()
        return self.x[i]


def run(data, ckpt: Path | None, **kw) -> fl.Atlas:
    return fl.scan(
        make_net(), data, ["1", "3"], top_k=4, batch_size=BATCH, checkpoint=ckpt, progress=False,
        checkpoint_every=100, **kw,
    )  # fmt: skip


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


needs_main_thread = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers run only in the main thread",
)


def assert_interrupted_then_resumes(ckpt: Path, info, done: int) -> None:
    message = str(info.value)
    assert message == (
        f"scan interrupted after {done} of {N} examples; state saved in {str(ckpt)!r}: run the "
        "same scan again (CLI: --resume) to continue"
    )
    assert (info.value.scanned, info.value.size, info.value.directory) == (done, N, ckpt)
    saved = fl.Atlas.load(ckpt, allow_incomplete=True)
    assert not saved.complete and saved.manifest.progress.next_index == done
    assert saved.manifest.examples_scanned == done
    # the saved state is exactly a scan of the first `done` examples
    head = run(images()[:done], None)
    for layer in ("1", "3"):
        for c in range(saved.channels(layer)):
            assert saved.top(layer, c) == head.top(layer, c)
    resumed = run(StopsOnce(images(), -1, None), ckpt)
    full = run(images(), None)
    assert resumed.complete and resumed.manifest.examples_scanned == N
    for layer in ("1", "3"):
        for c in range(full.channels(layer)):
            assert resumed.top(layer, c) == full.top(layer, c)


def test_ctrl_c_saves_the_batches_done_and_the_same_scan_resumes(tmp_path: Path):
    ckpt = tmp_path / "atlas"
    data = StopsOnce(images(), 70, raise_keyboard_interrupt)  # in the 5th batch (64..79)
    with pytest.raises(ScanInterrupted) as info:
        run(data, ckpt)
    assert isinstance(info.value, KeyboardInterrupt)  # code that stops on Ctrl-C still does
    assert_interrupted_then_resumes(ckpt, info, 64)


@needs_main_thread
def test_sigterm_stops_like_ctrl_c_and_the_handlers_come_back(tmp_path: Path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    ckpt = tmp_path / "atlas"
    data = StopsOnce(images(), 40, lambda: signal.raise_signal(signal.SIGTERM))
    with pytest.raises(ScanInterrupted) as info:
        run(data, ckpt)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert_interrupted_then_resumes(ckpt, info, 32)


@needs_main_thread
def test_a_signal_while_a_batch_is_recorded_stops_after_that_batch(tmp_path: Path, monkeypatch):
    calls = [0]
    add_batch = _State.add_batch

    def add_batch_then_signal(self, *args, **kw):
        calls[0] += 1
        if calls[0] == 5:  # the 3rd batch (2 layers a batch), between its two layers
            signal.raise_signal(signal.SIGINT)
        return add_batch(self, *args, **kw)

    monkeypatch.setattr(_State, "add_batch", add_batch_then_signal)
    ckpt = tmp_path / "atlas"
    with pytest.raises(ScanInterrupted) as info:
        run(StopsOnce(images(), -1, None), ckpt)
    monkeypatch.setattr(_State, "add_batch", add_batch)
    assert_interrupted_then_resumes(ckpt, info, 48)  # the 3rd batch was recorded whole


def test_without_a_checkpoint_ctrl_c_is_a_plain_keyboard_interrupt():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as info:
        run(StopsOnce(images(), 70, raise_keyboard_interrupt), None)
    assert type(info.value) is KeyboardInterrupt
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_interrupted_before_any_batch_saves_nothing(tmp_path: Path):
    with pytest.raises(ScanInterrupted, match=f"after 0 of {N} examples; nothing to save yet"):
        run(StopsOnce(images(), 1, raise_keyboard_interrupt), tmp_path / "atlas")
    assert not (tmp_path / "atlas").exists()


def test_resume_with_nothing_to_resume_warns_once_and_starts_afresh(tmp_path: Path):
    with pytest.warns(RuntimeWarning, match="nothing to resume in .*new.*starting afresh") as rec:
        atlas = run(images(), tmp_path / "new", resume=True)
    assert len([w for w in rec if "nothing to resume" in str(w.message)]) == 1
    assert atlas.complete
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(images(), tmp_path / "other")  # a first scan without resume=True: no warning
        run(images(), tmp_path / "other", resume=True)  # a complete one: returned as is


def test_an_existing_output_is_described(tmp_path: Path):
    check_new_output(tmp_path / "absent")  # nothing there: fine
    check_new_output(tmp_path)
    done = tmp_path / "done"
    run(images(), done)
    with pytest.raises(AtlasError) as info:
        check_new_output(done)
    assert str(info.value) == (
        f"{str(done)!r} already holds a complete atlas ({N} examples, layers 1, 3); "
        "choose another --out or delete it"
    )
    part = tmp_path / "part"
    with pytest.raises(ScanInterrupted):
        run(StopsOnce(images(), 70, raise_keyboard_interrupt), part)
    with pytest.raises(AtlasError) as info:
        check_new_output(part)
    assert str(info.value) == (
        f"{str(part)!r} holds an interrupted scan at 64 of {N} examples (layers 1, 3); pass "
        "--resume to continue it, or choose another --out"
    )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(AtlasError, match="unreadable atlas manifest"):
        check_new_output(tmp_path / "bad")


def test_top_k_above_the_dataset_size_says_how_to_fix_it():
    with pytest.raises(ValueError, match=r"dataset size 6, got 9 \(use --top-k N with N <= the"):
        fl.scan(make_net(), images()[:6], ["1"], top_k=9, progress=False)
