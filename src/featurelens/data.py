"""Examples of a dataset as tensors: the one rule every part of featurelens reads data by.

A dataset item is a tensor ``(C, *spatial)`` or a tuple/list whose first element is one (the
usual ``(tensor, label)`` pair); the label, when there is one, is the second element. Scans,
figures, reports and the explorer all go through :func:`split_example`, so a dataset is read
the same way everywhere and a bad item gets the same message everywhere.

A scan reads a dataset in sequential index ranges through :func:`iter_batches`: items load
under :class:`Guarded` (an item that raises is skipped and listed, not fatal), and
:func:`collate` stacks the ones that loaded into a :class:`Batch`; an item whose shape differs
from the scan's first example is skipped and listed the same way. Labels become plain numbers
or strings (:func:`label_value`) so that an atlas can record them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from featurelens.errors import DataError

__all__ = [
    "LABEL_KINDS",
    "MAX_LABEL_CHARS",
    "Batch",
    "Guarded",
    "Label",
    "Loaded",
    "SizedDataset",
    "Unrecordable",
    "check_sample_rate",
    "collate",
    "data_size",
    "example_tensor",
    "iter_batches",
    "label_kind",
    "label_value",
    "split_example",
]

#: What a recorded label is: an ``int``, a ``float`` or a ``str`` (see :func:`label_value`).
LABEL_KINDS: tuple[str, ...] = ("int", "float", "str")
#: The longest string label an atlas records (longer ones are refused with a DataError).
MAX_LABEL_CHARS = 1024

#: A label as an atlas records it.
Label = int | float | str


@dataclass(frozen=True)
class Unrecordable:
    """A label that an atlas cannot record (not a scalar): what it is, for messages.

    Attributes
    ----------
    what
        ``"dict"``, ``"Tensor of shape (2, 3)"``, ...
    """

    what: str


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


def label_value(label: Any, index: int) -> Label | Unrecordable | None:
    """A label as an atlas records it: a plain ``int``, ``float`` or ``str``.

    Parameters
    ----------
    label
        The second element of a dataset item (see :func:`split_example`), None when it has
        none. Python and NumPy numbers and strings are taken as they are (a ``bool`` becomes
        0 or 1); a tensor or array with one element becomes its number.
    index
        The item's dataset index, for the error message.

    Returns
    -------
    int, float, str, Unrecordable or None
        None for an item without a label; :class:`Unrecordable` for a label that is not a
        scalar (a dict, a mask, a tuple of targets: an atlas records no labels then).

    Raises
    ------
    DataError
        A string label longer than :data:`MAX_LABEL_CHARS`, or an integer out of int64.
    """
    if label is None:
        return None
    if isinstance(label, torch.Tensor | np.ndarray):
        elements = label.size if isinstance(label, np.ndarray) else label.numel()
        if elements != 1:
            return Unrecordable(f"{type(label).__name__} of shape {tuple(label.shape)}")
        label = label.item()
    if isinstance(label, str):
        if len(label) > MAX_LABEL_CHARS:
            raise DataError(
                f"dataset item {index} has a label of {len(label)} characters; an atlas records "
                f"labels of up to {MAX_LABEL_CHARS}"
            )
        return str(label)
    if isinstance(label, bool | np.bool_):
        return int(label)
    if isinstance(label, numbers.Integral):
        value = int(label)
        if not -(2**63) <= value < 2**63:
            raise DataError(f"dataset item {index} has the label {value}, outside int64")
        return value
    if isinstance(label, numbers.Real):
        return float(label)
    return Unrecordable(type(label).__name__)


def label_kind(value: Label) -> str:
    """``"int"``, ``"float"`` or ``"str"``: the kind of a :func:`label_value`."""
    return "str" if isinstance(value, str) else "float" if isinstance(value, float) else "int"


def check_sample_rate(
    value: Any, what: str, error: type[Exception] = DataError
) -> int | float | None:
    """A sample rate (samples per second) checked: None, or a positive finite number.

    Parameters
    ----------
    value
        The sample rate to check (an int stays an int, a float a float).
    what
        Where it came from, for the message (``"DataSpec(sample_rate=...)"``).
    error
        The exception class to raise.

    Returns
    -------
    int, float or None

    Raises
    ------
    error
        A value that is not a number (a string, a bool) or not positive and finite.
    """
    if value is None:
        return None
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise error(
            f"{what} must be a positive number of samples per second (e.g. 16000), got "
            f"{type(value).__name__} {value!r}"
        )
    number = int(value) if isinstance(value, numbers.Integral) else float(value)
    if not (math.isfinite(number) and number > 0):
        raise error(
            f"{what} must be a positive, finite number of samples per second, got {value!r}"
        )
    return number


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
    with ``__len__``, a list, ...). Items follow :func:`split_example`.
    """

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
        ``{index: "ExceptionType: message"}`` for items that failed to load, and for items
        whose shape differs from the expected one.
    error
        Set instead of the rest when the batch cannot be stacked (an item that is no tensor):
        the :class:`~featurelens.errors.DataError` message, raised by the scanning process.
    labels
        The labels of the rows of ``x`` (:func:`label_value`: None for items without one),
        or ``()`` when the batch is empty.
    """

    indices: np.ndarray
    x: torch.Tensor | None
    skipped: Mapping[int, str]
    error: str | None = None
    labels: tuple[Label | Unrecordable | None, ...] = ()

    def pin_memory(self) -> Batch:
        """The batch with ``x`` in page-locked memory (``DataLoader(pin_memory=True)`` calls
        this in its pinning thread, so that the copy to the GPU can overlap).
        """
        x = None if self.x is None else self.x.pin_memory()
        return dataclasses.replace(self, x=x)


def shape_mismatch(shape: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """The reason a scan lists for an item of another shape than its first example's."""
    return f"DataError: shape {shape} differs from the first example's shape {expected}"


def collate(items: list[Loaded], expected: tuple[int, ...] | None = None) -> Batch:
    """Stack the items that loaded into one :class:`Batch` (the DataLoader ``collate_fn``).

    Parameters
    ----------
    items
        The batch's items, as :class:`Guarded` loads them.
    expected
        The shape ``(C, *spatial)`` every example must have (the scan's first example); None:
        the batch's first loaded item's. Items of another shape are skipped and listed, like
        items that fail to load.

    Returns
    -------
    Batch
        Never raises for bad data: in DataLoader workers an exception would come back wrapped
        in a worker traceback, so an item that is no tensor travels as :attr:`Batch.error`.
    """
    good: list[int] = []
    tensors: list[torch.Tensor] = []
    labels: list[Label | Unrecordable | None] = []
    skipped: dict[int, str] = {}
    try:
        for loaded in items:
            if loaded.error is not None:
                skipped[loaded.index] = loaded.error
                continue
            x, label = split_example(loaded.item, loaded.index)
            shape = tuple(int(v) for v in x.shape)
            if expected is None:
                expected = shape
            if shape != expected:
                skipped[loaded.index] = shape_mismatch(shape, expected)
                continue
            tensors.append(x)
            labels.append(label_value(label, loaded.index))
            good.append(loaded.index)
    except DataError as exc:
        return Batch(np.zeros(0, dtype=np.int64), None, {}, str(exc))
    if not tensors:
        return Batch(np.zeros(0, dtype=np.int64), None, skipped)
    return Batch(
        np.asarray(good, dtype=np.int64), torch.stack(tensors), skipped, None, tuple(labels)
    )


def iter_batches(
    data: SizedDataset | torch.Tensor,
    spans: Sequence[tuple[int, int]],
    num_workers: int = 0,
    pin_memory: bool = False,
    expected: tuple[int, ...] | None = None,
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
    expected
        The shape of every example (see :func:`collate`); items of another shape are skipped.

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
        collate_fn=functools.partial(collate, expected=expected),
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    yield from loader
