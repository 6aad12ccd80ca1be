"""The unit: one value ``y[layer, channel, location]`` of a network, as a small frozen value,
and the layout that says which dims of a layer's output hold its channels and its locations.

Shared by projections, scans, figures, the explorer and the CLI.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from featurelens.errors import UsageError

__all__ = [
    "Layout",
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


# --------------------------------------------------------------------------------------------
# Layouts

# What a layout is called, by its location dims and channel dim (see Layout.kind).
CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"
TOKENS = "tokens"


@dataclass(frozen=True)
class Layout:
    """Which dims of a layer's output ``(N, ...)`` hold its channels and its locations.

    A unit of the layer is one channel at one location; a location is one index per location
    dim, in the layer's own rank (which need not be the input's: a ``(N, 1, L)`` signal that
    the model unsqueezes to ``(N, 1, L, 1)`` has 2-D locations ``(u, 0)``).

    Attributes
    ----------
    shape
        The output's shape without the batch dim (as traced, or as stated).
    channel_dim
        The dim (batch dim included, so ``>= 1``) that holds the channels.
    location_dims
        Every other dim but the batch, in order; ``()`` for logits ``(N, K)``.
    axes
        Per location dim, the input's spatial axes it indexes: ``()`` for a size-1 dim that
        holds none (the ``1`` of ``(L, 1)`` maps), ``(a,)`` for one axis, several for a
        flattened grid (tokens, row-major: ``(0, 1)`` for the patches of an image). None when
        the caller stated the layout and the trace could not say.
    grid
        Per location dim, the number of positions along each of its axes (row-major), so a
        ViT's tokens over 14x14 patches have ``axes == ((0, 1),)`` and ``grid == ((14, 14),)``.
        None where ``axes`` is.
    prefix
        Per location dim, the extra tokens before the grid (a ViT's class token: ``(1,)``). A
        token ``t < prefix`` is not a grid position; it sees what the layer's receptive field
        says for it (nothing before the first attention, the whole input after it).
    """

    shape: tuple[int, ...]
    channel_dim: int
    location_dims: tuple[int, ...]
    axes: tuple[tuple[int, ...], ...] | None = None
    grid: tuple[tuple[int, ...], ...] | None = None
    prefix: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.shape) + 1
        if not 1 <= self.channel_dim < n:
            raise ValueError(f"channel_dim {self.channel_dim} is not a dim of (N, *{self.shape})")
        expected = tuple(d for d in range(1, n) if d != self.channel_dim)
        if self.location_dims != expected:
            raise ValueError(f"location_dims {self.location_dims} should be {expected}")
        if not self.prefix:
            object.__setattr__(self, "prefix", (0,) * len(expected))

    @classmethod
    def stated(cls, shape: Sequence[int], channel_dim: int) -> Layout:
        """The layout a caller states: channels at ``channel_dim``, every other dim a location.

        Parameters
        ----------
        shape
            The output's shape without the batch dim.
        channel_dim
            The channel dim of ``(N, *shape)``; negative values count from the end.

        Raises
        ------
        UsageError
            ``channel_dim`` is not an int naming a dim after the batch dim.
        """
        shape = tuple(int(v) for v in shape)
        dim = normalized_channel_dim(channel_dim, len(shape) + 1)
        locations = tuple(d for d in range(1, len(shape) + 1) if d != dim)
        return cls(shape, dim, locations)

    @property
    def ndim(self) -> int:
        """The output's rank, batch dim included."""
        return len(self.shape) + 1

    @property
    def channels(self) -> int:
        """The number of channels."""
        return self.shape[self.channel_dim - 1]

    @property
    def location_shape(self) -> tuple[int, ...]:
        """The sizes of the location dims: a location is one index per entry."""
        return tuple(self.shape[d - 1] for d in self.location_dims)

    @property
    def kind(self) -> str:
        """``"channels_first"`` ``(N, C, *locations)``, ``"channels_last"`` ``(N, *locations,
        C)`` or ``"tokens"`` (a location dim holds a flattened grid of several input axes or
        extra tokens, as in ``(N, T, C)`` of a ViT).

        Logits ``(N, K)`` are channels first. A dim of tokens over one axis (a signal) counts
        as a location dim like any other.
        """
        grids = self.axes or ()
        if any(len(a) > 1 for a in grids) or any(self.prefix):
            return TOKENS
        if self.channel_dim == 1:
            return CHANNELS_FIRST
        return CHANNELS_LAST if self.channel_dim == self.ndim - 1 else TOKENS

    @property
    def traced(self) -> bool:
        """Established by the trace (False: stated by the caller, locations not mapped)."""
        return self.axes is not None

    def to_channels_first(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` of this layout as ``(N, C, *location dims)`` (a view, no copy).

        Raises
        ------
        UsageError
            ``y`` is not of this layout's rank.
        """
        if y.dim() != self.ndim:
            raise UsageError(
                f"a tensor of shape {tuple(y.shape)} is not of this layout's rank {self.ndim} "
                f"(N, *{self.shape})"
            )
        return y if self.channel_dim == 1 else y.movedim(self.channel_dim, 1)

    def check_channel_dim(self, channel_dim: int | None, layer: str) -> None:
        """Check a caller's ``channel_dim`` against this layout (None: nothing to check).

        Raises
        ------
        UsageError
            The caller's dim is not this layout's channel dim (the message names both).
        """
        if channel_dim is None:
            return
        stated = normalized_channel_dim(channel_dim, self.ndim)
        if stated != self.channel_dim:
            raise UsageError(
                f"channel_dim={channel_dim} does not fit layer {layer!r}: its output "
                f"(N, {', '.join(map(str, self.shape))}) holds its channels at dim "
                f"{self.channel_dim} ({self.kind.replace('_', ' ')}), by the trace"
            )


def normalized_channel_dim(channel_dim: object, ndim: int) -> int:
    """``channel_dim`` of an ``ndim``-dim output ``(N, ...)`` as a dim ``>= 1``.

    Raises
    ------
    UsageError
        Not an int, the batch dim, or out of range (the message gives the valid dims).
    """
    try:
        dim = as_integer(channel_dim, "channel_dim")
    except TypeError as exc:
        raise UsageError(str(exc)) from None
    if not -ndim <= dim < ndim or dim % ndim == 0:
        raise UsageError(
            f"channel_dim={channel_dim} is not a dim of a {ndim}-dim output (N, ...): valid "
            f"1..{ndim - 1} or -{ndim - 1}..-1 (dim 0 is the batch)"
        )
    return dim % ndim
