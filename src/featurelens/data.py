"""Examples of a dataset as tensors: the one rule every part of featurelens reads data by.

A dataset item is a tensor ``(C, *spatial)`` or a tuple/list whose first element is one (the
usual ``(tensor, label)`` pair); the label, when there is one, is the second element. Scans,
figures, reports and the explorer all go through :func:`split_example`, so a dataset is read
the same way everywhere and a bad item gets the same message everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from featurelens.errors import DataError

__all__ = ["example_tensor", "split_example"]


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


def example_tensor(data: Any, index: int) -> torch.Tensor:
    """The tensor ``(C, *spatial)`` of example ``index`` of ``data`` (a Dataset or a tensor).

    Raises
    ------
    DataError
        The item is not a tensor nor a ``(tensor, label)`` pair (see :func:`split_example`).
    """
    if isinstance(data, torch.Tensor):
        return data[index]
    return split_example(data[index], index)[0]
