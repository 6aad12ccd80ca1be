"""Examples of a dataset as tensors: the one rule every part of featurelens reads data by.

A dataset item is a tensor ``(C, *spatial)`` or a tuple/list whose first element is one (the
usual ``(tensor, label)`` pair); the label, when there is one, is the second element. Scans,
figures, reports and the explorer all go through :func:`split_example`, so a dataset is read
the same way everywhere and a bad item gets the same message everywhere.

A scan reads a dataset in sequential index ranges through :func:`iter_batches`: items load
under :class:`Guarded` (an item that raises is skipped and listed, not fatal), and
:func:`collate` stacks the ones that loaded into a :class:`Batch`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from featurelens.errors import DataError

__all__ = [
    "Batch",
    "Guarded",
    "Loaded",
    "SizedDataset",
    "collate",
    "data_size",
    "example_tensor",
    "iter_batches",
    "split_example",
]


def split_example(item: Any, index: int) -> tuple[torch.Tensor, Any]:
    """``(tensor, label)`` of one dataset item; ``label`` is None when the item has none.

    Parameters
    ----------
    item
        What ``dataset[index]`` returned: a tensor ``(C, *spatial)``, or a tuple/list whose
        first element is that tensor and whose second (if any) is the label.
    index
        The item's dataset index, for the error message.

    Raises
    ------
    DataError
        The item is not a tensor nor a tuple/list starting with one; the message names the
        index and the type found, and suggests a transform for PIL images.
    """
    x, label = item, None
    if isinstance(item, tuple | list) and item:
        x = item[0]
        label = item[1] if len(item) > 1 else None
    if not isinstance(x, torch.Tensor):
        what = type(item).__name__
        if isinstance(item, tuple | list):
            what = f"{what} whose first element is {type(x).__name__}"
        hint = " (add a ToTensor/pil_to_tensor transform)" if "Image" in what else ""
        raise DataError(
            f"dataset item {index} is a {what}; featurelens needs a tensor (C, *spatial) or a "
            f"(tensor, label) tuple{hint}"
        )
    return x, label


def example_tensor(data: SizedDataset | torch.Tensor, index: int) -> torch.Tensor:
    """The tensor ``(C, *spatial)`` of example ``index`` of ``data`` (a Dataset or a tensor).

    Raises
    ------
    DataError
        The item is not a tensor nor a ``(tensor, label)`` pair (see :func:`split_example`).
    """
    if isinstance(data, torch.Tensor):
        return data[index]
    return split_example(data[index], index)[0]


# --------------------------------------------------------------------------------------------
# Batches for a scan: sequential index ranges, items that fail to load skipped, not raised


class SizedDataset(Protocol):
    """What featurelens reads examples from: ``len(data)`` and ``data[i]`` (a ``Dataset``
    with ``__len__``, a list, ...). Items follow :func:`split_example`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Any: ...


def data_size(data: SizedDataset | torch.Tensor) -> int:
    """The number of examples of ``data``, after checking that it is data at all.

    Parameters
    ----------
    data
        A dataset (``__getitem__`` and ``__len__``) or a tensor (N, C, *spatial).

    Returns
    -------
    int
        ``len(data)``, or N for a tensor.

    Raises
    ------
    DataError
        A tensor with fewer than 2 dimensions, or an object that is neither.
    """
    if isinstance(data, torch.Tensor):
        if data.dim() < 2:
            raise DataError(
                f"a data tensor must be (N, C, *spatial), got shape {tuple(data.shape)}"
            )
        return int(data.shape[0])
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise DataError(
            f"data must be a torch Dataset (items: tensor or (tensor, label)) or a tensor "
            f"(N, C, *spatial), got {type(data).__name__}"
        )
    return len(data)


@dataclass(frozen=True)
class Loaded:
    """One dataset item as :class:`Guarded` returns it: the item, or why it failed to load.

    Attributes
    ----------
    index
        The dataset index.
    item
        What ``dataset[index]`` returned (None when it raised).
    error
        ``"ExceptionType: message"`` when ``dataset[index]`` raised, else None.
    """

    index: int
    item: Any
    error: str | None = None


class Guarded(torch.utils.data.Dataset):
    """A dataset whose items never raise: an item that fails comes back as a :class:`Loaded`
    with its error, so that a scan can skip and list it (also from DataLoader workers, where an
    exception would come back wrapped in a worker traceback).

    Parameters
    ----------
    dataset
        Any dataset (``__getitem__`` and ``__len__``).
    """

    def __init__(self, dataset: SizedDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Loaded:
        try:
            return Loaded(index, self.dataset[index])
        except Exception as exc:  # any failure to load/transform one example skips it
            return Loaded(index, None, f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Batch:
    """The examples of one index range, stacked.

    Attributes
    ----------
    indices
        (B,) int64 dataset indices of the rows of ``x``, ascending.
    x
        (B, C, *spatial) the examples that loaded; None when none did.
    skipped
        ``{index: "ExceptionType: message"}`` for items that failed to load.
    error
        Set instead of the rest when the batch cannot be stacked (an item that is no tensor,
        items of different shapes): the :class:`~featurelens.errors.DataError` message, raised
        by the scanning process.
    """

    indices: np.ndarray
    x: torch.Tensor | None
    skipped: Mapping[int, str]
    error: str | None = None

    def pin_memory(self) -> Batch:
        """The batch with ``x`` in page-locked memory (``DataLoader(pin_memory=True)`` calls
        this in its pinning thread, so that the copy to the GPU can overlap)."""
        x = None if self.x is None else self.x.pin_memory()
        return dataclasses.replace(self, x=x)


def collate(items: list[Loaded]) -> Batch:
    """Stack the items that loaded into one :class:`Batch` (the DataLoader ``collate_fn``).

    Never raises for bad data: in DataLoader workers an exception would come back wrapped in
    a worker traceback, so the error travels as :attr:`Batch.error` instead.
    """
    good: list[int] = []
    tensors: list[torch.Tensor] = []
    skipped: dict[int, str] = {}
    try:
        for loaded in items:
            if loaded.error is not None:
                skipped[loaded.index] = loaded.error
                continue
            tensors.append(split_example(loaded.item, loaded.index)[0])
            good.append(loaded.index)
    except DataError as exc:
        return Batch(np.zeros(0, dtype=np.int64), None, {}, str(exc))
    if not tensors:
        return Batch(np.zeros(0, dtype=np.int64), None, skipped)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        return Batch(
            np.zeros(0, dtype=np.int64),
            None,
            {},
            f"dataset items {good[0]}..{good[-1]} have different shapes {sorted(shapes)}; "
            "resize or crop them to one size",
        )
    return Batch(np.asarray(good, dtype=np.int64), torch.stack(tensors), skipped)


def iter_batches(
    data: SizedDataset | torch.Tensor,
    spans: Sequence[tuple[int, int]],
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """One :class:`Batch` per ``(start, stop)`` index range of ``spans``, in order.

    Parameters
    ----------
    data
        A dataset or a tensor (N, C, *spatial); a tensor is sliced (no copy, no pinning).
    spans
        Index ranges ``[start, stop)``.
    num_workers
        DataLoader worker processes loading a dataset.
    pin_memory
        Put each batch of a dataset in page-locked memory (for a copy to a GPU).

    Returns
    -------
    Iterator[Batch]
        Lazily: items are loaded as the iterator advances.
    """
    if isinstance(data, torch.Tensor):
        for start, stop in spans:
            yield Batch(np.arange(start, stop, dtype=np.int64), data[start:stop], {})
        return
    loader = torch.utils.data.DataLoader(
        Guarded(data),
        batch_sampler=[list(range(start, stop)) for start, stop in spans],
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    yield from loader
