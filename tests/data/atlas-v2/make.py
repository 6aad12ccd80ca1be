"""Writes the atlases of this folder: ``python make.py OUT`` (with featurelens importable).

Version 2 of the atlas format (featurelens 0.1.0 after the format bump): the scans of
``../atlas-v1/make.py`` (same network, digits, skipped items and NaN maps), now recording the
labels of the hits, with specs whose paths are stored relative to the atlas directory (so the
bytes do not depend on where they are written), plus a 1-D scan with float labels and a sample
rate and a scan of Python objects with string labels. ``tests/test_manifest.py`` checks that
featurelens reads them, writes them back byte for byte, and writes the same files from the
same scans.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import warnings
from pathlib import Path

import torch
from torch import nn


def _v1():
    path = Path(__file__).resolve().parent.parent / "atlas-v1" / "make.py"
    spec = importlib.util.spec_from_file_location("atlas_v1_make_for_v2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


V1 = _v1()
net, images, Digits, N, SKIPPED = V1.net, V1.images, V1.Digits, V1.N, V1.SKIPPED


def signal_net() -> nn.Module:
    model = nn.Sequential(nn.Conv1d(1, 2, 5), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_((torch.arange(10.0).view(2, 1, 5) % 3 - 1) / 4)
        model[0].bias.copy_(torch.tensor([0.25, -0.5]))
    return model.eval()


class Tones(torch.utils.data.Dataset):
    """12 signals (1, 40), multiples of 1/4; labels: a pitch in Hz (float); 8 kHz."""

    sample_rate = 8000

    def __init__(self) -> None:
        self.x = (torch.arange(12 * 40.0).view(12, 1, 40) * 3 % 11) / 4 - 1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        return self.x[i], 110.0 * (1 + i % 4) + 0.5


def words() -> list[tuple[torch.Tensor, str]]:
    """Six of the digits with string labels."""
    x = images()[12:18]
    return [(x[i], f"caf\u00e9-{i % 2}") for i in range(6)]


def scan_options(out: Path) -> dict:
    from featurelens.specs import DataSpec, ModelSpec

    return dict(
        top_k=5,
        batch_size=8,
        progress=False,
        # beside the atlases: stored as ../model.py:net and ../model/net.pt
        model_spec=ModelSpec(f"{out / 'model.py'}:net", checkpoint=str(out / "model" / "net.pt")),
        data_spec=DataSpec("mnist"),
    )


def write(out: Path) -> None:
    import featurelens as fl
    from featurelens.scan import ScanInterrupted

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped examples
        fl.scan(net(), Digits(), ["0", "3"], checkpoint=out / "complete", **scan_options(out))
        with contextlib.suppress(ScanInterrupted):  # the state of examples 0..15 is saved
            fl.scan(
                net(), Digits(stop_at=20), ["0", "3"], checkpoint=out / "checkpoint",
                **scan_options(out),
            )  # fmt: skip
        fl.scan(net(), words(), ["0"], top_k=2, progress=False, checkpoint=out / "python-objects")
        fl.scan(
            signal_net(), Tones(), ["1"], top_k=3, batch_size=5, progress=False,
            checkpoint=out / "signals",
        )  # fmt: skip


if __name__ == "__main__":
    write(Path(sys.argv[1]))
