"""Writes the atlases of this folder: ``python make.py OUT`` (with featurelens importable).

They were written by featurelens 0.1.0 at commit 2bf31f9, before the manifest had one owner
(``atlas.Manifest``); ``tests/test_manifest.py`` checks that today's featurelens reads them,
writes them back byte for byte, and writes the same files from the same scans.

Every number is exact in float32 (multiples of 1/4 and 1/8, short sums), so the scans give the
same bits on every machine: ``complete`` and ``checkpoint`` have data specs, skipped items, NaN
maps and a layer without spatial axes; ``checkpoint`` is an interrupted scan;
``python-objects`` has no specs.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

N = 30
SKIPPED = (4, 19)


def net() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 5, 4))
    with torch.no_grad():
        model[0].weight.copy_((torch.arange(27.0).view(3, 1, 3, 3) % 5 - 2) / 4)
        model[0].bias.copy_(torch.tensor([0.5, -0.25, 0.0]))
        model[3].weight.copy_((torch.arange(360.0).view(4, 90) % 7 - 3) / 8)
        model[3].bias.zero_()
    return model.eval()


def images() -> torch.Tensor:
    """(N, 1, 8, 7), multiples of 1/8 in -1.5..2.75; example 7 all NaN, one NaN in 11."""
    x = (torch.arange(N * 56.0).view(N, 1, 8, 7) * 5 % 13) / 4 - 1.5
    x += (torch.arange(N * 1.0) * 7 % 11).view(N, 1, 1, 1) / 8  # examples differ
    x[7] = math.nan
    x[11, 0, 2, 3] = math.nan
    return x


class Digits(torch.utils.data.Dataset):
    """``images()`` with labels; items 4 and 19 fail to load; ``stop_at`` raises Ctrl-C."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.x = images()
        self.stop_at = stop_at

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == self.stop_at:
            raise KeyboardInterrupt
        if i in SKIPPED:
            raise OSError(f"cannot read example {i} (caf\u00e9)")
        return self.x[i], i % 3


def scan_options() -> dict:
    from featurelens.specs import DataSpec, ModelSpec

    return dict(
        top_k=5,
        batch_size=8,
        progress=False,
        model_spec=ModelSpec("model.py:net", checkpoint="../model/net.pt"),
        data_spec=DataSpec("mnist"),
    )


def write(out: Path) -> None:
    import featurelens as fl
    from featurelens.scan import ScanInterrupted

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped examples
        fl.scan(net(), Digits(), ["0", "3"], checkpoint=out / "complete", **scan_options())
        with contextlib.suppress(ScanInterrupted):  # the state of examples 0..15 is saved
            fl.scan(
                net(), Digits(stop_at=20), ["0", "3"], checkpoint=out / "checkpoint",
                **scan_options(),
            )  # fmt: skip
        fl.scan(
            net(),
            images()[12:18],
            ["0"],
            top_k=2,
            progress=False,
            checkpoint=out / "python-objects",
        )


if __name__ == "__main__":
    write(Path(sys.argv[1]))
