"""data.py: the guarded loading and batching a scan reads a dataset through."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory as dataloader_pin_memory

from featurelens.data import Batch, Guarded, Loaded, collate, data_size, iter_batches
from featurelens.errors import DataError


class Flaky(torch.utils.data.Dataset):
    """``(x[i], i % 3)``; items in ``broken`` raise OSError."""

    def __init__(self, x: torch.Tensor, broken: set[int]) -> None:
        self.x, self.broken = x, broken

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i in self.broken:
            raise OSError(f"cannot read {i}")
        return self.x[i], i % 3


def test_guarded_items_carry_their_error_instead_of_raising():
    x = torch.arange(12.0).view(3, 1, 2, 2)
    guarded = Guarded(Flaky(x, {1}))
    assert len(guarded) == 3
    good = guarded[0]
    assert good.index == 0 and good.error is None and torch.equal(good.item[0], x[0])
    assert guarded[1] == Loaded(1, None, "OSError: cannot read 1")


def test_batches_of_a_dataset_equal_slices_of_the_tensor_less_the_skipped_items():
    x = torch.randn(11, 2, 3, 4)
    spans = [(0, 4), (4, 8), (8, 11)]
    from_tensor = list(iter_batches(x, spans))
    from_dataset = list(iter_batches(Flaky(x, {5, 8}), spans))
    assert [b.skipped for b in from_tensor] == [{}, {}, {}]
    assert [dict(b.skipped) for b in from_dataset] == [
        {}, {5: "OSError: cannot read 5"}, {8: "OSError: cannot read 8"}
    ]  # fmt: skip
    for t, d in zip(from_tensor, from_dataset, strict=True):
        assert t.error is None and d.error is None
        keep = np.isin(t.indices, d.indices)
        assert t.x is not None and d.x is not None
        assert torch.equal(t.x[torch.from_numpy(keep)], d.x)
        assert d.indices.dtype == np.int64
    np.testing.assert_array_equal(from_dataset[1].indices, [4, 6, 7])


def test_a_batch_that_cannot_be_stacked_carries_the_message():
    x = torch.zeros(1, 5, 5)
    for items, message in (([Loaded(0, x), Loaded(1, "text")], "dataset item 1 is a str"),):
        batch = collate(items)
        assert batch.x is None and len(batch.indices) == 0 and batch.error is not None
        with pytest.raises(DataError, match=message):
            raise DataError(batch.error)
    # an item of another shape than the first is skipped and listed, the batch goes on
    odd = torch.zeros(1, 6, 5)
    batch = collate([Loaded(3, x, None), Loaded(4, odd), Loaded(5, x + 1)])
    assert batch.error is None and batch.indices.tolist() == [3, 5]
    assert batch.x is not None and torch.equal(batch.x, torch.stack([x, x + 1]))
    assert batch.skipped == {
        4: "DataError: shape (1, 6, 5) differs from the first example's shape (1, 5, 5)"
    }
    # against the scan's first example (another batch's): every item of another shape goes
    batch = collate([Loaded(6, odd), Loaded(7, x)], expected=(1, 5, 5))
    assert batch.indices.tolist() == [7] and list(batch.skipped) == [6]
    nothing = collate([Loaded(7, None, "OSError: gone")])
    assert nothing.x is None and nothing.error is None and nothing.skipped == {7: "OSError: gone"}


def test_pinning_keeps_the_batch_record(monkeypatch):
    # DataLoader(pin_memory=True) pins in a thread through this function: a Batch pins itself
    pinned: list[torch.Tensor] = []

    def fake_pin(self: torch.Tensor, *args: object) -> torch.Tensor:
        pinned.append(self)
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = Batch(np.arange(2, dtype=np.int64), torch.ones(2, 1, 3), {5: "OSError: x"})
    out = dataloader_pin_memory(batch)
    assert isinstance(out, Batch) and len(pinned) == 1 and pinned[0] is batch.x
    assert out.x is not batch.x and torch.equal(out.x, batch.x)
    assert out.indices is batch.indices and out.skipped == batch.skipped
    empty = Batch(np.zeros(0, dtype=np.int64), None, {})
    assert dataloader_pin_memory(empty) == empty


def test_data_size_refuses_what_is_not_data():
    assert data_size(torch.zeros(4, 1, 2)) == 4 and data_size([1, 2, 3]) == 3
    with pytest.raises(DataError, match=r"must be \(N, C, \*spatial\), got shape \(4,\)"):
        data_size(torch.zeros(4))
    with pytest.raises(DataError, match="must be a torch Dataset .* got int"):
        data_size(42)  # type: ignore[arg-type]
