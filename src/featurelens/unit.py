"""The unit: one value ``y[layer, channel, location]`` of a network, as a small frozen value.

Shared by projections, scans, figures, the explorer and the CLI.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Unit",
    "argmax_location",
    "as_integer",
    "as_location",
    "check_location",
    "first_argmax",
]


def first_argmax(values: torch.Tensor) -> torch.Tensor:
    """``(..., S) -> (...)``: index of the first maximum along the last dim, NaN ignored.

    The one arg-max rule of featurelens (scan, projections, explorer): ties go to the first
    index (row-major order once maps are flattened), NaN never wins, an all-NaN row gives 0.
    """
    nan = torch.isnan(values)
    if bool(nan.any()):
        values = values.masked_fill(nan, -math.inf)
    return values.argmax(dim=-1)  # documented to return the first of equal maxima


def argmax_location(fmap: torch.Tensor) -> tuple[int, ...]:
    """Location of the first maximum of one feature map ``(*spatial)``, NaN ignored."""
    if fmap.dim() == 0:
        return ()
    flat = int(first_argmax(fmap.reshape(-1)))
    return tuple(int(v) for v in torch.unravel_index(torch.tensor(flat), fmap.shape))


def check_location(
    location: Sequence[int] | int, spatial_shape: Sequence[int], owner: str = "", where: str = ""
) -> tuple[int, ...]:
    """``location`` as a tuple of ints, checked against a layer's output ``spatial_shape``.

    Raises a ValueError naming the location and the valid range; ``owner`` (e.g. " of unit 3")
    and ``where`` (e.g. "layer 'features.3' outputs") complete the message.
    """
    if isinstance(location, int):
        location = (location,)
    elif hasattr(location, "tolist"):
        location = location.tolist()
    assert not isinstance(location, int)  # made a sequence above
    loc = tuple(int(v) for v in location)
    shape = tuple(int(n) for n in spatial_shape)
    where = where or "the layer outputs"
    if len(loc) != len(shape):
        raise ValueError(
            f"location {loc}{owner} has {len(loc)} coordinate(s); {where} spatial shape "
            f"{shape}, so a location has {len(shape)}"
        )
    for axis, (u, n) in enumerate(zip(loc, shape)):
        if not 0 <= u < n:
            raise ValueError(
                f"location {loc}{owner} is out of range on axis {axis}: valid 0..{n - 1} "
                f"({where} spatial shape {shape})"
            )
    return loc


@dataclass(frozen=True)
class Unit:
    """One unit of a layer.

    Attributes
    ----------
    layer
        Dotted ``named_modules()`` name.
    channel
        Feature map index ``k``.
    location
        One int per spatial axis of the layer's output, or None for "the arg-max of this
        channel's map on the given input".
    """

    layer: str
    channel: int
    location: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.layer, str):
            raise TypeError(f"Unit.layer must be a dotted layer name, got {self.layer!r}")
        object.__setattr__(self, "channel", as_integer(self.channel, "Unit.channel"))
        if self.location is not None:
            object.__setattr__(self, "location", as_location(self.location, "Unit.location"))


def as_integer(value: object, what: str) -> int:
    """``value`` as an int: ints, numpy integers, 0-d integer tensors; never bools or floats.

    ``int(1.7)`` would quietly become 1, a different unit: anything not integral is refused
    with a TypeError that starts with ``what``.
    """
    if _is_integer(value):
        return operator.index(value)  # type: ignore[arg-type]  # _is_integer checked it
    raise TypeError(f"{what} must be an integer, got {_describe(value)}")


def _is_integer(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
        )
    is_bool = isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool
    return hasattr(value, "__index__") and not is_bool


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value!r} (a {value.dtype} tensor of shape {tuple(value.shape)})"
    return repr(value)


def as_location(location: object, what: str) -> tuple[int, ...]:
    """A location (one integer per spatial axis, or a single integer) as a tuple of ints."""
    if getattr(location, "ndim", None) == 0 or not hasattr(location, "__iter__"):
        return (as_integer(location, what),)
    if isinstance(location, (str, bytes)):
        raise TypeError(f"{what} must be integers, one per spatial axis, got {location!r}")
    values = list(location)
    for v in values:
        if not _is_integer(v):
            shown = tuple(
                v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v for v in values
            )
            raise TypeError(
                f"{what} {shown} must hold integers, one per spatial axis; got {_describe(v)}"
            )
    return tuple(operator.index(v) for v in values)
