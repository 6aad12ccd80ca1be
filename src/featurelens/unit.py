"""The unit: one value ``y[layer, channel, location]`` of a network, as a small frozen value.

Shared by projections, scans, figures, the explorer and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Unit"]


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
