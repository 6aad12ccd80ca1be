"""The unit: one value ``y[layer, channel, location]`` of a network, as a small frozen value.

Shared by projections, scans, figures, the explorer and the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Unit", "argmax_location", "check_location", "first_argmax"]


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
        object.__setattr__(self, "channel", int(self.channel))
        if self.location is not None:
            loc = self.location
            if isinstance(loc, int):
                loc = (loc,)
            object.__setattr__(self, "location", tuple(int(v) for v in loc))
