"""What a unit wants: regularised activation maximisation on the unit's exact receptive field.

:func:`visualize` finds, by gradient ascent, an input that drives one unit (or one whole
channel) of a layer as high as it can, within the data's value range: the fourth view of the
Deep Visualization Toolbox (Yosinski et al. 2015, "Understanding Neural Networks Through Deep
Visualization"), with the parameterisation and transformation robustness of Olah et al. 2017
("Feature Visualization", Distill).

What makes it fast and exact:

* **The receptive field is the canvas.** A unit ``y[layer, channel, location]`` depends only on
  the input inside its receptive field, so only the crop that holds that field is optimised,
  with the network truncated at the layer (:func:`featurelens.graph.capture`). The crop is
  planned exactly as projections plan theirs (:func:`featurelens.projection.plan_crop`:
  aligned on the layer's effective stride, clamped to the input, checked to hold the unit's
  exact field), so the unit's value on the crop is its value on any full input that has
  these pixels there (tested in float64). A channel objective (the mean over every location)
  and a unit whose field is global use the whole input, and the result says so
  (:attr:`Visualization.fallback`).
* **Batched.** Many channels of one layer are optimised at once, one row of a batch each:
  rows are independent in eval mode, so each row's gradient is its own unit's.

Every regulariser is a named entry of one registry, :data:`REGULARIZERS`, with documented
defaults: the CLI, the report and the tests read it. Each row draws its starting noise and its
random transforms from its own generator, seeded by ``(seed, channel)``: the same call gives
the same images, bit for bit on the CPU, and a channel starts from the same noise and sees the
same transforms whether it is optimised alone or in a batch.

The model is used in eval mode with frozen parameters and comes back exactly as it was given
(:func:`featurelens.graph.preserved`); no hook is left.
"""

from __future__ import annotations

import base64
import html
import io
import math
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from featurelens._extras import require_extra
from featurelens.errors import (
    ChannelError,
    CropWarning,
    DeadUnitWarning,
    MissingExtraError,
    NonFiniteError,
    UsageError,
)
from featurelens.graph import capture, model_device, preserved, resolve_layers
from featurelens.projection import (
    _about_shape,
    _CropHazards,
    _first_line,
    _grad_enabled,
    plan_crop,
)
from featurelens.receptive_field import ReceptiveField, try_receptive_field
from featurelens.specs import DataSpec
from featurelens.unit import as_integer, as_location, check_location

if TYPE_CHECKING:
    from featurelens.atlas import Atlas

__all__ = [
    "DEFAULT_REGULARIZERS",
    "OBJECTIVES",
    "REGULARIZERS",
    "Regularizer",
    "ValueRange",
    "Visualization",
    "VisualizationCache",
    "visualize",
]

AUTO_CHUNK_VALUES = 2**19
"""With ``chunk_size=None``, rows per batch = this many canvas values / values of one canvas."""

PIXEL_INIT_SD = 0.01
"""Standard deviation of the starting noise of the pixel parameterisation (before the sigmoid)."""

FOURIER_GAIN = 0.25
"""Scale of the Fourier image before the colour transform and the sigmoid (Olah et al. 2017's
implementation divides by 4: larger images saturate the sigmoid sooner)."""

# The square root of ImageNet's RGB colour covariance (Olah et al. 2017, from the Lucid
# library's published statistics), each column scaled so the largest has norm 1: a step in
# the decorrelated space moves all three channels as natural colours co-vary.
_COLOUR_SQRT = np.array(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=np.float64
)
_COLOUR = _COLOUR_SQRT / np.linalg.norm(_COLOUR_SQRT, axis=0).max()

_MAX_AXES = 3  # spatial axes of the inputs: signals, images, volumes


# --------------------------------------------------------------------------------------------
# The value range


@dataclass(frozen=True)
class ValueRange:
    """The values an input may take, per channel, in the model's own input space.

    Optimised images stay strictly inside: every parameterisation ends in a sigmoid mapped
    onto ``(low, high)`` (Olah et al. 2017), so each image is valid by construction.

    Attributes
    ----------
    low, high
        One float per input channel (or one for all), ``low < high``.
    """

    low: tuple[float, ...]
    high: tuple[float, ...]

    def __post_init__(self) -> None:
        low = _floats(self.low, "ValueRange.low")
        high = _floats(self.high, "ValueRange.high")
        if len(low) != len(high):
            raise UsageError(f"value range low {low} and high {high} have different lengths")
        for a, b in zip(low, high):
            if not a < b:
                raise UsageError(
                    f"value range low {low} must be below high {high}, channel by channel"
                )
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    @classmethod
    def normalized(
        cls,
        mean: Sequence[float],
        std: Sequence[float],
        pixels: tuple[float, float] = (0.0, 1.0),
    ) -> ValueRange:
        """The range of ``(pixel - mean) / std`` for pixels in ``pixels``, per channel.

        Parameters
        ----------
        mean, std
            The data's normalisation, one value per channel (as :class:`DataSpec` records it).
        pixels
            The range of raw pixel values (default 0..1).

        Returns
        -------
        ValueRange

        Raises
        ------
        UsageError
            Lengths that differ, a standard deviation that is not positive.
        """
        m, s = _floats(mean, "mean"), _floats(std, "std")
        if len(m) != len(s):
            raise UsageError(f"mean {m} and std {s} have different lengths")
        if any(v <= 0 for v in s):
            raise UsageError(f"std values must be positive, got {s}")
        lo, hi = pixels
        return cls(
            tuple((lo - a) / b for a, b in zip(m, s)), tuple((hi - a) / b for a, b in zip(m, s))
        )

    @classmethod
    def of(cls, value: Any) -> ValueRange:
        """A :class:`ValueRange` from what :func:`visualize` accepts as ``value_range``.

        Parameters
        ----------
        value
            A :class:`ValueRange`; ``(low, high)`` (two floats, or two per-channel sequences);
            a :class:`featurelens.specs.DataSpec` or an object with ``mean`` and ``std``
            (pixels in 0..1, normalised with them).

        Returns
        -------
        ValueRange

        Raises
        ------
        UsageError
            Anything else, or a data spec that records no normalisation.
        """
        if isinstance(value, ValueRange):
            return value
        if isinstance(value, DataSpec):
            if value.mean is None or value.std is None:
                raise UsageError(
                    f"{value!r} records no normalisation (mean/std): pass value_range=(low, high)"
                )
            return cls.normalized(value.mean, value.std)
        if isinstance(value, (tuple, list)) and len(value) == 2:
            low, high = value
            low = (low,) if _is_number(low) else low
            high = (high,) if _is_number(high) else high
            return cls(tuple(low), tuple(high))
        raise UsageError(
            f"value_range {value!r} is not a ValueRange, a (low, high) pair or a DataSpec with "
            "mean and std"
        )

    def bounds(
        self, channels: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low, high)`` for inputs of ``channels`` channels, as two tensors ``(C,)``.

        Raises
        ------
        UsageError
            The range has neither one value nor one per channel.
        """
        if len(self.low) not in (1, channels):
            raise UsageError(
                f"value range low {self.low} / high {self.high} has {len(self.low)} values: "
                f"give one, or one per input channel ({channels})"
            )
        lo = torch.tensor(self.low, dtype=dtype, device=device).expand(channels)
        hi = torch.tensor(self.high, dtype=dtype, device=device).expand(channels)
        return lo.contiguous(), hi.contiguous()


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _floats(values: Any, what: str) -> tuple[float, ...]:
    """``values`` (a number or a sequence of them) as a non-empty tuple of finite floats."""
    if _is_number(values):
        values = (values,)
    elif isinstance(values, (torch.Tensor, np.ndarray)):
        values = values.tolist()
    items = list(values) if isinstance(values, (list, tuple)) else None
    if not items or not all(_is_number(v) and math.isfinite(v) for v in items):
        raise UsageError(f"{what} must be a finite number or a sequence of them, got {values!r}")
    return tuple(float(v) for v in items)


# --------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Regularizer:
    """One named way to shape the optimisation: a parameterisation, a transform or a step.

    Attributes
    ----------
    name
        Its key in :data:`REGULARIZERS`.
    kind
        ``"parameterization"`` (how the image is made from the optimised numbers),
        ``"transform"`` (a random transformation of the image before each forward: the
        optimum must survive it) or ``"step"`` (an operation on the pixel parameters after
        each optimiser step; these need the pixel parameterisation, not ``"fourier"``).
    defaults
        Its options and their default values.
    limits
        The valid interval ``(low, high)`` (inclusive) of each numeric option.
    help
        One line for menus and ``--help``, with the paper it comes from.
    integers
        The options that take whole numbers.
    """

    name: str
    kind: str
    defaults: Mapping[str, float | int | None]
    limits: Mapping[str, tuple[float, float]]
    help: str
    integers: frozenset[str] = frozenset()

    def options(self, given: Mapping[str, Any] | None) -> dict[str, float | int | None]:
        """The defaults updated with ``given``, checked.

        Raises
        ------
        UsageError
            An option it does not have (the message lists its options), or a value that is
            not a number in its interval.
        """
        out = dict(self.defaults)
        for key, value in (given or {}).items():
            if key not in self.defaults:
                valid = ", ".join(self.defaults) or "none"
                raise UsageError(
                    f"regularizer {self.name!r} has no option {key!r}; its options: {valid}"
                )
            if value is None and self.defaults[key] is None:
                out[key] = None
                continue
            lo, hi = self.limits[key]
            whole = key in self.integers
            if (
                not _is_number(value)
                or not math.isfinite(value)
                or not lo <= float(value) <= hi
                or (whole and float(value) != int(value))
            ):
                kind = "a whole number" if whole else "a number"
                raise UsageError(
                    f"option {key!r} of regularizer {self.name!r} must be {kind} in "
                    f"[{lo:g}, {hi:g}], got {value!r}"
                )
            out[key] = int(value) if whole else float(value)
        return out


def _entry(
    name: str,
    kind: str,
    help: str,
    **options: tuple[float | int | None, tuple[float, float]],
) -> Regularizer:
    """A registry entry; ``options``: ``name=(default, (low, high))``, an int default or
    limits for a None default making the option whole-numbered.
    """
    integers = frozenset(
        k
        for k, (v, (lo, _)) in options.items()
        if isinstance(v, int) or (v is None and isinstance(lo, int))
    )
    return Regularizer(
        name,
        kind,
        MappingProxyType({k: v for k, (v, _) in options.items()}),
        MappingProxyType({k: lim for k, (_, lim) in options.items()}),
        help,
        integers,
    )


_INF = math.inf
REGULARIZERS: dict[str, Regularizer] = {
    r.name: r
    for r in (
        _entry(
            "fourier",
            "parameterization",
            "optimise the image's Fourier coefficients, scaled by 1/frequency^decay_power, so "
            "that steps are whitened; sd: starting noise (Olah et al. 2017)",
            decay_power=(1.0, (0.0, 4.0)),
            sd=(0.01, (0.0, 10.0)),
        ),
        _entry(
            "decorrelate",
            "parameterization",
            "optimise decorrelated colours: the square root of ImageNet's RGB covariance maps "
            "them to RGB (Olah et al. 2017); inputs that do not have 3 channels are left as "
            "they are",
        ),
        _entry(
            "jitter",
            "transform",
            "shift the image by a random whole number of positions, up to pixels on each axis "
            "(default None: 1/16 of the canvas, at least 1) (Olah et al. 2017; Mordvintsev et "
            "al. 2015)",
            pixels=(None, (0, 4096)),
        ),
        _entry(
            "scale",
            "transform",
            "rescale the image about its centre by a random factor in [1 - amount, 1 + amount] "
            "(Olah et al. 2017)",
            amount=(0.1, (0.0, 0.9)),
        ),
        _entry(
            "rotate",
            "transform",
            "rotate the image about its centre by a random angle in [-degrees, degrees], in "
            "the plane of the last two axes; nothing on 1-D inputs (Olah et al. 2017)",
            degrees=(10.0, (0.0, 180.0)),
        ),
        _entry(
            "decay",
            "step",
            "L2 decay: multiply the pixel parameters by 1 - rate after each step, towards the "
            "middle of the value range (Yosinski et al. 2015)",
            rate=(0.01, (0.0, 1.0)),
        ),
        _entry(
            "blur",
            "step",
            "Gaussian blur of the pixel parameters, standard deviation sigma (in positions), "
            "every `every` steps (Yosinski et al. 2015)",
            sigma=(0.5, (0.0, 64.0)),
            every=(4, (1, 1_000_000)),
        ),
        _entry(
            "norm_clip",
            "step",
            "set to the middle of the range the positions whose parameter norm over channels "
            "is below this percentile, after each step (Yosinski et al. 2015)",
            percentile=(20.0, (0.0, 100.0)),
        ),
        _entry(
            "contribution_clip",
            "step",
            "set to the middle of the range the positions whose contribution |sum over channels "
            "of (x - middle) * d unit / d x| is below this percentile, after each step "
            "(Yosinski et al. 2015)",
            percentile=(20.0, (0.0, 100.0)),
        ),
    )
}
"""Regularisers by name: parameterisations, transforms and step operations (see
:class:`Regularizer`). ``visualize(..., regularizers=...)`` takes names or ``{name: options}``."""

DEFAULT_REGULARIZERS: tuple[str, ...] = ("fourier", "decorrelate", "jitter", "scale", "rotate")
"""What :func:`visualize` uses by default: Olah et al. 2017's Fourier parameterisation with
decorrelated colours and transformation robustness (the Lucid/Lucent defaults)."""

OBJECTIVES: dict[str, str] = {
    "unit": "one unit y[channel, location]: optimised on the crop holding its receptive field",
    "channel": "the mean of the channel over every location: optimised on the whole input",
}
"""What :func:`visualize` maximises, by name."""


def _resolve(
    spec: Sequence[str] | Mapping[str, Mapping[str, Any] | None] | None,
) -> tuple[tuple[str, dict[str, Any]], ...]:
    """``regularizers`` as ``((name, options), ...)`` in registry order, checked."""
    if spec is None:
        spec = DEFAULT_REGULARIZERS
    if isinstance(spec, str):
        raise UsageError(
            f"regularizers must be a sequence of names or a mapping, got the string {spec!r}: "
            f"write ({spec!r},)"
        )
    items = dict(spec) if isinstance(spec, Mapping) else dict.fromkeys(spec)
    for name in items:
        if name not in REGULARIZERS:
            raise UsageError(
                f"unknown regularizer {name!r}; valid: {', '.join(map(repr, REGULARIZERS))}"
            )
        if items[name] is not None and not isinstance(items[name], Mapping):
            raise UsageError(
                f"the options of regularizer {name!r} must be a mapping or None, got "
                f"{items[name]!r}"
            )
    chosen = tuple((n, REGULARIZERS[n].options(items[n])) for n in REGULARIZERS if n in items)
    steps = [n for n, _ in chosen if REGULARIZERS[n].kind == "step"]
    if steps and "fourier" in items:
        raise UsageError(
            f"regularizer(s) {', '.join(map(repr, steps))} act on the pixel parameterisation; "
            "they cannot be combined with 'fourier': drop one or the other"
        )
    return chosen


# --------------------------------------------------------------------------------------------
# The result


@dataclass(frozen=True, eq=False)
class Visualization:
    """What :func:`visualize` found: one image per channel, on its canvas.

    Attributes
    ----------
    layer
        The layer.
    channels
        The channel of each row.
    objective
        ``"unit"`` or ``"channel"`` (:data:`OBJECTIVES`).
    location
        The unit's location on the layer's output grid (``()`` for a layer without spatial
        axes); None for the channel objective.
    images
        ``(B, C, *canvas)``: the optimised inputs, in the model's input space (normalised as
        the data is), strictly inside :attr:`value_range`. The canvas is the crop
        :attr:`start` / :attr:`size` of an input of shape :attr:`input_shape`.
    activations
        ``(B,)``: the objective's final value on each image (no transform).
    curve
        ``(steps, B)``: the objective at each step, on the transformed images it saw.
    start, size
        Where the canvas lies in the input: one int per spatial axis each.
    input_shape
        ``(C, *spatial)`` of a full input.
    value_range
        The values the images may take.
    fallback
        Why the canvas is the whole input rather than the unit's receptive field; ``""``
        when it is the receptive-field crop.
    dead
        The channels whose gradient was zero at every step (their images are the starting
        noise; a :class:`DeadUnitWarning` said so).
    regularizers
        ``((name, options), ...)`` as used.
    steps, lr, seed
        As passed.
    notes
        What else the call decided: regularisers without effect on these inputs, the
        default value range.
    """

    layer: str
    channels: tuple[int, ...]
    objective: str
    location: tuple[int, ...] | None
    images: torch.Tensor
    activations: torch.Tensor
    curve: torch.Tensor
    start: tuple[int, ...]
    size: tuple[int, ...]
    input_shape: tuple[int, ...]
    value_range: ValueRange
    fallback: str = ""
    dead: tuple[int, ...] = ()
    regularizers: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    steps: int = 0
    lr: float = 0.0
    seed: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def cropped(self) -> bool:
        """Whether the canvas is smaller than the input (the receptive-field crop)."""
        return tuple(self.size) != tuple(self.input_shape[1:])

    @property
    def box(self) -> tuple[slice, ...]:
        """The canvas as spatial slices of the input: ``x[..., *result.box] = images``."""
        return tuple(slice(a, a + n) for a, n in zip(self.start, self.size))

    def image(self, channel: int) -> torch.Tensor:
        """The image ``(C, *canvas)`` of ``channel``.

        Raises
        ------
        ChannelError
            ``channel`` was not visualised (the message lists those that were).
        """
        channel = as_integer(channel, "channel")
        if channel not in self.channels:
            raise ChannelError(
                f"channel {channel} of layer {self.layer!r} was not visualised; these were: "
                f"{list(self.channels)}"
            )
        return self.images[self.channels.index(channel)]

    def full(self, fill: torch.Tensor | float | None = None) -> torch.Tensor:
        """The images pasted into full inputs ``(B, *input_shape)``.

        Parameters
        ----------
        fill
            The rest of the input: a tensor of shape ``input_shape`` or ``(B, *input_shape)``,
            or a float; default the middle of the value range. Outside the receptive field it
            does not change the unit's value.

        Returns
        -------
        torch.Tensor
            ``(B, C, *spatial)``, on the images' device.
        """
        b = len(self.channels)
        x = self.images
        if fill is None:
            lo, hi = self.value_range.bounds(self.input_shape[0], x.dtype, x.device)
            mid = (lo + hi) / 2
            out = mid.view(1, -1, *[1] * (len(self.input_shape) - 1)).expand(b, *self.input_shape)
            out = out.clone()
        elif isinstance(fill, torch.Tensor):
            out = fill.to(x).expand(b, *self.input_shape).clone()
        else:
            out = torch.full((b, *self.input_shape), float(fill), dtype=x.dtype, device=x.device)
        out[(slice(None), slice(None), *self.box)] = x
        return out

    def pixels(self) -> torch.Tensor:
        """The images mapped from the value range to ``[0, 1]``, for display: ``(B, C, *canvas)``."""
        x = self.images.detach()
        lo, hi = self.value_range.bounds(x.shape[1], x.dtype, x.device)
        shape = (1, -1, *[1] * (x.dim() - 2))
        return ((x - lo.view(shape)) / (hi - lo).view(shape)).clamp(0.0, 1.0)

    def tiles(self, scale: int | None = None) -> list[np.ndarray]:
        """One ``(h, w, 3)`` uint8 picture per row: RGB for 3 channels, grey otherwise.

        1-D canvases are drawn as a strip (channels averaged), 3-D canvases as their middle
        slice along the first spatial axis. ``scale``: nearest-neighbour enlargement
        (default: to about 96 display pixels).
        """
        p = self.pixels().to("cpu", torch.float64).numpy()
        if p.ndim == 3:  # (B, C, L): a strip 1 position high
            p = p[:, :, None, :]
        elif p.ndim == 5:
            p = p[:, :, p.shape[2] // 2]
        out = []
        for img in p:  # (C, h, w)
            rgb = (
                img.transpose(1, 2, 0)
                if img.shape[0] == 3
                else np.repeat(img.mean(0)[..., None], 3, -1)
            )
            h, w = rgb.shape[:2]
            k = scale or max(1, min(32, 96 // max(h, w, 1)))
            hk = 8 * k if h == 1 else k  # a 1-D strip gets some height
            big = np.repeat(np.repeat(rgb, hk, axis=0), k, axis=1)
            out.append(np.round(big * 255).astype(np.uint8))
        return out

    def png(self, channel: int | None = None, scale: int | None = None) -> bytes:
        """A PNG of one channel's image, or of every row side by side (at most 64).

        Parameters
        ----------
        channel
            A visualised channel; default all rows.
        scale
            Nearest-neighbour enlargement (default: about 96 display pixels per image).

        Returns
        -------
        bytes
            The PNG file's bytes.

        Raises
        ------
        ChannelError
            ``channel`` was not visualised.
        MissingExtraError
            Pillow (the ``figures`` extra) is not installed.
        """
        require_extra("figures", "Visualization.png")
        from PIL import Image

        tiles = self.tiles(scale)
        if channel is not None:
            self.image(channel)  # a ChannelError naming the visualised channels
            tiles = [tiles[self.channels.index(as_integer(channel, "channel"))]]
        tiles = tiles[:64]
        gap = 4
        h = max(t.shape[0] for t in tiles)
        w = sum(t.shape[1] for t in tiles) + gap * (len(tiles) - 1)
        canvas = np.full((h, w, 3), 255, dtype=np.uint8)
        x = 0
        for t in tiles:
            canvas[: t.shape[0], x : x + t.shape[1]] = t
            x += t.shape[1] + gap
        buf = io.BytesIO()
        Image.fromarray(canvas).save(buf, format="PNG")
        return buf.getvalue()

    def _repr_png_(self) -> bytes | None:
        try:
            return self.png()
        except MissingExtraError:  # notebooks then show the text repr
            return None

    def _repr_html_(self) -> str:
        png = self._repr_png_()
        img = (
            f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" '
            'style="image-rendering: pixelated">'
            if png
            else ""
        )
        where = (
            "whole input" if not self.cropped else f"crop {_show(self.box)} of {self.input_shape}"
        )
        acts = ", ".join(
            f"{c}: {float(a):.4g}" for c, a in zip(self.channels[:16], self.activations[:16])
        )
        more = f" ... ({len(self.channels) - 16} more)" if len(self.channels) > 16 else ""
        rows = [
            ("layer", self.layer),
            (
                "objective",
                f"{self.objective}" + (f" at {self.location}" if self.location is not None else ""),
            ),
            ("canvas", where + (f" ({self.fallback})" if self.fallback else "")),
            ("activations", acts + more),
            ("steps / lr / seed", f"{self.steps} / {self.lr:g} / {self.seed}"),
            ("regularizers", ", ".join(n for n, _ in self.regularizers) or "none"),
        ]
        if self.dead:
            rows.append(("dead channels", str(list(self.dead))))
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
            for k, v in rows
        )
        return f"<div>{img}<table>{body}</table></div>"

    def __repr__(self) -> str:
        where = "whole input" if not self.cropped else f"crop {_show(self.box)}"
        return (
            f"Visualization(layer={self.layer!r}, channels={_short(self.channels)}, "
            f"objective={self.objective!r}, location={self.location}, canvas={where}, "
            f"images={tuple(self.images.shape)})"
        )


def _show(slices: Sequence[slice]) -> str:
    return "[" + ", ".join(f"{s.start}:{s.stop}" for s in slices) + "]"


def _short(values: Sequence[int]) -> str:
    return (
        str(list(values))
        if len(values) <= 8
        else f"[{values[0]}, ..., {values[-1]}] ({len(values)})"
    )


# --------------------------------------------------------------------------------------------
# Public API


def visualize(
    model: nn.Module,
    layer: str,
    channel: int | Sequence[int] | torch.Tensor,
    location: Sequence[int] | int | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    objective: str = "unit",
    regularizers: Sequence[str] | Mapping[str, Mapping[str, Any] | None] | None = None,
    steps: int = 256,
    lr: float = 0.05,
    seed: int = 0,
    value_range: ValueRange | tuple[Any, Any] | DataSpec | None = None,
    atlas: Atlas | None = None,
    crop: bool = True,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    field: ReceptiveField | None = None,
    progress: bool = True,
) -> Visualization:
    """The inputs that maximise units (or whole channels) of a layer.

    Regularised activation maximisation (Yosinski et al. 2015; Olah et al. 2017): gradient
    ascent with Adam on a parameterised image, under the regularisers chosen from
    :data:`REGULARIZERS`, for ``steps`` steps. All channels are optimised at once as one batch.

    Parameters
    ----------
    model
        Any ``nn.Module``; left exactly as given (mode, parameters, ``requires_grad``, hooks).
    layer
        Dotted ``named_modules()`` name (:func:`featurelens.layer_names`); its output is
        ``(N, K, *spatial_l)`` or ``(N, K)``.
    channel
        One channel, or several (a sequence or 1-D integer tensor): one image each.
    location
        ``objective="unit"``: the unit's location on the layer's output grid, one int per
        spatial axis (a single int on a 1-D layer); default None: the centre, ``n // 2`` on
        every axis. Must be None for ``objective="channel"``.
    input_shape
        ``(C, *spatial)`` of one input (1 to 3 spatial axes); default: the atlas's.
    objective
        A name in :data:`OBJECTIVES`: ``"unit"`` (the unit at ``location``, optimised on the
        crop that holds its receptive field) or ``"channel"`` (the mean over every location,
        optimised on the whole input).
    regularizers
        Names in :data:`REGULARIZERS` (their defaults), or ``{name: {option: value}}``;
        default :data:`DEFAULT_REGULARIZERS`. Without ``"fourier"`` the image is optimised
        pixel by pixel (through a sigmoid into the value range); the ``"step"`` regularisers
        need that. ``()``: plain gradient ascent on pixels.
    steps
        Optimiser steps (each one forward and one backward of the truncated network).
    lr
        Adam's learning rate.
    seed
        Seeds each row's generator together with its channel: the same call gives the same
        images (bit for bit on the CPU).
    value_range
        The values an input may take, in the model's input space: a :class:`ValueRange`, a
        ``(low, high)`` pair (floats or per-channel sequences), or a
        :class:`~featurelens.specs.DataSpec` (pixels 0..1 normalised with its mean/std).
        Default: the atlas's data spec, else ``(0, 1)`` (noted in the result).
    atlas
        An :class:`~featurelens.Atlas` of this model: its input shape and data spec fill in
        ``input_shape`` and ``value_range`` when they are not given.
    crop
        Optimise a unit on the crop that holds its receptive field (exact, much faster).
        Falls back to the whole input when the field is global (said in
        :attr:`Visualization.fallback`) and, with a :class:`CropWarning`, when the field
        cannot be computed or a crop would not reproduce the unit (as projections do).
    chunk_size
        Rows optimised together; default: as many canvases as hold
        :data:`AUTO_CHUNK_VALUES` values (1 when the network uses batch statistics).
    device
        Where to compute (the model must already live there); default: the model's device.
    field
        The layer's receptive field for inputs of ``input_shape``, when the caller has it
        (the explorer does): then the model is not traced for it.
    progress
        A tqdm progress bar over the steps.

    Returns
    -------
    Visualization
        Images ``(B, C, *canvas)``, final activations, the canvas's place in the input, what
        fell back; ``_repr_png_``/``_repr_html_`` for notebooks.

    Raises
    ------
    LayerError
        ``layer`` is not an addressable layer (the message lists valid names).
    ChannelError
        A channel the layer does not have.
    UsageError
        Bad arguments (unknown objective or regulariser, options out of range, a location
        with ``objective="channel"``, no ``input_shape``, inputs the model rejects, a unit
        whose receptive field holds no input position).
    ValueError
        A location out of range or of the wrong rank.
    NonFiniteError
        The unit's value or its gradient became NaN or infinite (the message names channel
        and step).

    Warns
    -----
    CropWarning
        A unit was optimised on the whole input because its crop could not be used.
    DeadUnitWarning
        Some units never moved: their gradient was zero at every step.

    Examples
    --------
    >>> v = featurelens.visualize(model, "features.15", range(256), input_shape=(3, 224, 224),
    ...                           value_range=ValueRange.normalized(IMAGENET_MEAN, IMAGENET_STD))
    >>> v.images.shape                       # the 44 x 44 crop around the centre unit's field
    torch.Size([256, 3, 44, 44])
    """
    call = _Call.create(
        model, layer, channel, location, input_shape=input_shape, objective=objective,
        regularizers=regularizers, steps=steps, lr=lr, seed=seed, value_range=value_range,
        atlas=atlas, crop=crop, chunk_size=chunk_size, device=device, field=field,
        progress=progress,
    )  # fmt: skip
    result, warned = _visualize(call)
    for category, message in warned:
        warnings.warn(message, category, stacklevel=2)  # the caller's line
    return result


class VisualizationCache:
    """Synthetic images computed on demand, once per ``(layer, channel, location)``.

    For the explorer (and notebooks): it asks for the selected channel's image, and gets the
    stored one after the first time. The call's other arguments are fixed when the cache is
    made; receptive fields are computed once per layer. Thread-safe (one optimisation at a
    time); the least recently used results beyond ``maxsize`` are dropped.

    Parameters
    ----------
    model
        The model; left as given by every call (as :func:`visualize`).
    input_shape
        ``(C, *spatial)`` of one input.
    maxsize
        How many results are kept.
    **options
        The other keyword arguments of :func:`visualize` (``value_range``, ``regularizers``,
        ``steps``, ``lr``, ``seed``, ``objective``, ``crop``, ``device``, ``progress``,
        ``atlas``); checked on the first call.

    Examples
    --------
    >>> cache = VisualizationCache(model, (1, 28, 28), steps=128, progress=False)
    >>> png = cache.png("features.conv2", 5)        # optimised now
    >>> png = cache.png("features.conv2", 5)        # from the cache
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        *,
        maxsize: int = 256,
        **options: Any,
    ) -> None:
        for key in ("field", "input_shape", "chunk_size"):
            if key in options:
                raise UsageError(f"VisualizationCache sets {key!r} itself; do not pass it")
        self.model = model
        self.input_shape = _input_shape(input_shape)
        self.maxsize = as_integer(maxsize, "maxsize")
        self.options = dict(options)
        self._results: OrderedDict[tuple[str, int, tuple[int, ...] | None], Visualization]
        self._results = OrderedDict()
        self._fields: dict[str, ReceptiveField | None] = {}
        self._lock = threading.Lock()

    def get(
        self, layer: str, channel: int, location: Sequence[int] | int | None = None
    ) -> Visualization:
        """The :class:`Visualization` of one channel (one row), computed on first request.

        Parameters
        ----------
        layer, channel, location
            As :func:`visualize` takes them (one channel).

        Returns
        -------
        Visualization
            The same object for the same arguments while it stays in the cache.

        Raises
        ------
        FeaturelensError
            What :func:`visualize` raises for these arguments (nothing is cached then).
        """
        loc = None if location is None else as_location(location, "location")
        key = (str(layer), as_integer(channel, "channel"), loc)
        with self._lock:
            hit = self._results.get(key)
            if hit is not None:
                self._results.move_to_end(key)
                return hit
            if layer not in self._fields:
                rf, _ = try_receptive_field(self.model, self.input_shape, layer)
                self._fields[layer] = rf
            result = visualize(
                self.model, layer, key[1], loc, input_shape=self.input_shape,
                field=self._fields[layer], **self.options,
            )  # fmt: skip
            self._results[key] = result
            while len(self._results) > self.maxsize:
                self._results.popitem(last=False)
            return result

    def png(self, layer: str, channel: int, location: Sequence[int] | int | None = None) -> bytes:
        """The PNG of :meth:`get`'s image (:meth:`Visualization.png`)."""
        return self.get(layer, channel, location).png()

    def clear(self) -> None:
        """Drop every stored result."""
        with self._lock:
            self._results.clear()


# --------------------------------------------------------------------------------------------
# The call's arguments, checked


@dataclass(frozen=True)
class _Call:
    """Everything one :func:`visualize` call shares, checked."""

    model: nn.Module
    layer: str
    channels: tuple[int, ...]
    location: tuple[int, ...] | None
    input_shape: tuple[int, ...]
    objective: str
    regularizers: tuple[tuple[str, dict[str, Any]], ...]
    steps: int
    lr: float
    seed: int
    value_range: ValueRange
    crop: bool
    chunk_size: int | None
    device: torch.device
    dtype: torch.dtype
    field: ReceptiveField | None
    progress: bool
    notes: tuple[str, ...]

    @classmethod
    def create(
        cls,
        model: Any,
        layer: Any,
        channel: Any,
        location: Any,
        *,
        input_shape: Any,
        objective: Any,
        regularizers: Any,
        steps: Any,
        lr: Any,
        seed: Any,
        value_range: Any,
        atlas: Any,
        crop: Any,
        chunk_size: Any,
        device: Any,
        field: Any,
        progress: Any,
    ) -> _Call:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if objective not in OBJECTIVES:
            raise UsageError(
                f"unknown objective {objective!r}; valid: {', '.join(map(repr, OBJECTIVES))}"
            )
        channels = _channels(channel)
        loc = None if location is None else as_location(location, "location")
        if objective == "channel" and loc is not None:
            raise UsageError(
                f"objective 'channel' reads every location of the channel; got location {loc}: "
                "pass location=None, or objective='unit' for one unit"
            )
        notes: list[str] = []
        if input_shape is None and atlas is not None:
            input_shape = atlas.input_shape
        shape = _input_shape(input_shape)
        if value_range is None and atlas is not None and atlas.data_spec is not None:
            spec = atlas.data_spec
            if spec.mean is not None and spec.std is not None:
                value_range = spec
        if value_range is None:
            value_range = ValueRange((0.0,), (1.0,))
            notes.append("value range (0, 1) by default: pass value_range= for normalised inputs")
        vr = ValueRange.of(value_range)
        vr.bounds(shape[0], torch.float64, torch.device("cpu"))  # checks the channel count
        steps = as_integer(steps, "steps")
        if steps < 1:
            raise UsageError(f"steps must be at least 1, got {steps}")
        if not _is_number(lr) or not math.isfinite(lr) or lr <= 0:
            raise UsageError(f"lr must be a positive number, got {lr!r}")
        seed = as_integer(seed, "seed")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise UsageError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if field is not None and not isinstance(field, ReceptiveField):
            raise TypeError(
                f"field must be a featurelens.ReceptiveField, got {type(field).__name__}"
            )
        if field is not None and tuple(field.input_shape) != shape[1:]:
            raise UsageError(
                f"the receptive field given for layer {layer!r} was computed for inputs of "
                f"spatial shape {tuple(field.input_shape)}, but input_shape is {shape}: pass "
                f"receptive_field(model, {shape}, {layer!r}), or none"
            )
        regs = _resolve(regularizers)
        names = {n for n, _ in regs}
        if "decorrelate" in names and shape[0] != 3:
            notes.append(
                f"decorrelate: the inputs have {shape[0]} channel(s), not 3: colours left as they are"
            )
        if "rotate" in names and len(shape) == 2:
            notes.append("rotate: 1-D inputs have no plane to rotate in: not rotated")
        where = torch.device(device) if device is not None else model_device(model)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        return cls(
            model, layer, channels, loc, shape, objective, regs, steps, float(lr), seed, vr,
            bool(crop), chunk_size, where, dtype, field, bool(progress), tuple(notes),
        )  # fmt: skip

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.regularizers)

    def options(self, name: str) -> dict[str, Any]:
        return next(o for n, o in self.regularizers if n == name)


def _channels(channel: Any) -> tuple[int, ...]:
    if isinstance(channel, np.ndarray):
        channel = torch.from_numpy(np.ascontiguousarray(channel))
    if isinstance(channel, torch.Tensor) and channel.dim() > 0:
        if channel.is_floating_point() or channel.is_complex() or channel.dtype == torch.bool:
            raise TypeError(f"channel must hold integers, got {channel.dtype}")
        if channel.dim() != 1:
            raise UsageError(
                f"channel must be an int or a 1-D tensor, got shape {tuple(channel.shape)}"
            )
        values = [int(c) for c in channel.tolist()]
    elif isinstance(channel, (Sequence, range)) and not isinstance(channel, (str, bytes)):
        values = [as_integer(c, f"channel[{i}]") for i, c in enumerate(channel)]
    else:
        values = [as_integer(channel, "channel (an int or a sequence of ints)")]
    if not values:
        raise UsageError("no channel given: pass an int or a non-empty sequence of ints")
    return tuple(values)


def _input_shape(shape: Any) -> tuple[int, ...]:
    if shape is None:
        raise UsageError(
            "visualize needs input_shape=(C, *spatial), e.g. (3, 224, 224), or atlas= (its "
            "input shape)"
        )
    try:
        out = tuple(as_integer(n, "input_shape") for n in shape)
    except TypeError as exc:
        raise UsageError(f"input_shape must be (C, *spatial) integers, got {shape!r}") from exc
    if not 2 <= len(out) <= 1 + _MAX_AXES or any(n < 1 for n in out):
        raise UsageError(
            f"input_shape {out} is not (C, *spatial) with 1 to 3 spatial axes of positive "
            "length: e.g. (3, 224, 224), (1, 16000), (1, 32, 64, 64)"
        )
    return out


# --------------------------------------------------------------------------------------------
# The canvas: which crop of the input is optimised


@dataclass(frozen=True)
class _Canvas:
    """Where the images live in the input, and where the unit is on the canvas's grid."""

    start: tuple[int, ...]
    size: tuple[int, ...]
    local: tuple[int, ...] | None  # the unit on the canvas's output grid; None: channel
    location: tuple[int, ...] | None
    fallback: str
    channels: int  # of the layer
    batch_statistics: bool


def _plan(
    call: _Call,
    run: Any,
    found: tuple[ReceptiveField | None, str],
    warned: list[tuple[type[Warning], str]],
) -> _Canvas:
    """Probe the layer, check the channels and the location, and plan the canvas.

    ``found``: the layer's receptive field, or None and why not (computed before ``run``'s
    hooks were installed: computing it runs the model).
    """
    spatial_in = call.input_shape[1:]
    whole = ((0,) * len(spatial_in), spatial_in)
    hazards = _CropHazards()
    x = _middle(call, (1, *call.input_shape))
    try:
        with torch.no_grad(), hazards:
            y = run(x)[call.layer]
    except RuntimeError as exc:
        if not _about_shape(exc):
            raise
        raise UsageError(
            f"the model rejects inputs of shape {(1, *call.input_shape)}: {_first_line(exc)}"
        ) from exc
    if y.dim() < 2:
        raise UsageError(f"layer {call.layer!r} outputs shape {tuple(y.shape)}: no channel axis")
    k, spatial = y.shape[1], tuple(y.shape[2:])
    for c in call.channels:
        if not 0 <= c < k:
            raise ChannelError(
                f"channel {c} is out of range: layer {call.layer!r} has {k} channels, valid "
                f"0..{k - 1}"
            )
    stats = hazards.batch_statistics

    if call.objective == "channel":
        why = "the 'channel' objective reads every location, so the canvas is the whole input"
        return _Canvas(*whole, None, None, why, k, stats)
    if call.location is None:
        location = tuple(n // 2 for n in spatial)
    else:
        location = check_location(call.location, spatial, "", f"layer {call.layer!r} outputs")
    if not call.crop:
        return _Canvas(*whole, location, location, "crop=False", k, stats)
    if len(spatial) != len(spatial_in):
        why = f"the layer's output {tuple(y.shape)} has no grid over the input's axes"
        return _Canvas(*whole, location, location, why, k, stats)

    crops, why = plan_crop(
        call.layer, spatial, call.input_shape, found, hazards, given=call.field is not None
    )
    if why:
        warned.append((CropWarning, _crop_warning(call.layer, why)))
        return _Canvas(*whole, location, location, why, k, stats)
    rf = found[0]
    assert rf is not None
    if rf.is_global or crops.is_full:
        what = "global" if rf.is_global else "as large as the input"
        return _Canvas(
            *whole, location, location, f"the unit's receptive field is {what}", k, stats
        )
    region = rf.region(location)
    if any(s.stop <= s.start for s in region):
        raise UsageError(
            f"the unit at {location} of layer {call.layer!r} has no receptive field on an input "
            f"of shape {call.input_shape}: it sees only padding, so no input can change it; "
            "choose a location nearer the middle of the layer's grid "
            f"{spatial}"
        )
    start, size = crops.window(location)
    if not crops.holds(location, (start, size)):
        why = f"the crop {_show(_slices(start, size))} does not hold its receptive field {_show(region)}"
        warned.append((CropWarning, _crop_warning(call.layer, why)))
        return _Canvas(*whole, location, location, why, k, stats)
    local = crops.local(location, start)
    why = _check_crop(call, run, size, local)
    if why:
        warned.append((CropWarning, _crop_warning(call.layer, why)))
        return _Canvas(*whole, location, location, why, k, stats)
    return _Canvas(start, size, local, location, "", k, stats)


def _check_crop(call: _Call, run: Any, size: tuple[int, ...], local: tuple[int, ...]) -> str:
    """Why the truncated model cannot compute the unit on a crop of ``size``; ``""`` if it can."""
    x = _middle(call, (1, call.input_shape[0], *size))
    try:
        with torch.no_grad():
            y = run(x)[call.layer]
    except RuntimeError as exc:
        if not _about_shape(exc):
            raise
        return f"the model rejects receptive-field crops of shape {tuple(x.shape)} ({_first_line(exc)})"
    grid = tuple(y.shape[2:])
    if len(grid) != len(local) or any(not 0 <= u < n for u, n in zip(local, grid)):
        return (
            f"a crop of shape {tuple(x.shape)} gives a {grid} grid that misses the unit at {local}"
        )
    return ""


def _crop_warning(layer: str, why: str) -> str:
    return (
        f"visualize of layer {layer!r} optimises the whole input (exact, slower): {why}. "
        "Pass crop=False to silence this warning."
    )


def _slices(start: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(a, a + n) for a, n in zip(start, size))


def _middle(call: _Call, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``shape`` ``(N, C, *spatial)`` at the middle of the value range."""
    lo, hi = call.value_range.bounds(call.input_shape[0], call.dtype, call.device)
    mid = ((lo + hi) / 2).view(1, -1, *[1] * (len(shape) - 2))
    return mid.expand(shape).contiguous()


# --------------------------------------------------------------------------------------------
# Parameterisations: numbers -> image in the value range


class _Image:
    """The optimised numbers of a batch of rows and the images they make.

    ``pixel`` (no ``"fourier"``): one number per input value. ``fourier``: the real and
    imaginary parts of the image's spectrum, scaled by ``1 / max(f, 1 / max(size))^p``
    (Olah et al. 2017). Then optionally decorrelated colours, then a sigmoid onto the value
    range per channel.
    """

    def __init__(self, call: _Call, size: tuple[int, ...], generators: list[torch.Generator]):
        c = call.input_shape[0]
        self.size = size
        self.dims = tuple(range(2, 2 + len(size)))
        lo, hi = call.value_range.bounds(c, call.dtype, call.device)
        view = (1, c, *[1] * len(size))
        self.low, self.span = lo.view(view), (hi - lo).view(view)
        self.fourier = call.options("fourier") if call.has("fourier") else None
        self.colour = (
            torch.tensor(_COLOUR, dtype=call.dtype, device=call.device)
            if call.has("decorrelate") and c == 3
            else None
        )
        if self.fourier is None:
            shape, sd = (c, *size), PIXEL_INIT_SD
        else:
            freq = _frequencies(size)
            p = float(self.fourier["decay_power"])
            scale = 1.0 / np.maximum(freq, 1.0 / max(size)) ** p
            # With Adam every coefficient moves about lr a step, so a pixel moves up to about
            # sum_k scale_k / sqrt(N) (ortho norm): for decay 1/f, about sqrt(N) on any number
            # of axes. Scaled by sqrt(whole input / canvas), a crop moves as the same place of
            # a whole-input canvas does: lr means the same, cropped or not.
            scale = scale * math.sqrt(math.prod(call.input_shape[1:]) / math.prod(size))
            self.scale = torch.tensor(scale, dtype=call.dtype, device=call.device)[..., None]
            shape, sd = (c, *freq.shape, 2), float(self.fourier["sd"])
        rows = [torch.randn(shape, generator=g, dtype=torch.float64) * sd for g in generators]
        self.theta = torch.stack(rows).to(call.dtype).to(call.device).requires_grad_(True)

    def signal(self) -> torch.Tensor:
        """The unsquashed image ``(B, C, *size)``: pixels, or the inverse Fourier transform."""
        if self.fourier is None:
            return self.theta
        spectrum = torch.view_as_complex((self.theta * self.scale).contiguous())
        return torch.fft.irfftn(spectrum, s=self.size, dim=self.dims, norm="ortho") * FOURIER_GAIN

    def __call__(self) -> torch.Tensor:
        """The images ``(B, C, *size)``, strictly inside the value range."""
        s = self.signal()
        if self.colour is not None:
            s = torch.einsum("ij,bj...->bi...", self.colour, s)
        return self.low + self.span * torch.sigmoid(s)


def _frequencies(size: tuple[int, ...]) -> np.ndarray:
    """``|f|`` (cycles per position) of each coefficient of ``rfftn`` over ``size``."""
    axes = [np.fft.fftfreq(n) for n in size[:-1]] + [np.fft.rfftfreq(size[-1])]
    grids = np.meshgrid(*axes, indexing="ij")
    return np.sqrt(sum(g * g for g in grids))


# --------------------------------------------------------------------------------------------
# Transforms: one random affine resampling per row and step


_DRAWS = 2 + _MAX_AXES  # uniforms per row and step: shift per axis, scale, angle


class _Transforms:
    """The random jitter, scale and rotation of every row at every step, drawn up front."""

    def __init__(self, call: _Call, size: tuple[int, ...], uniforms: torch.Tensor):
        # uniforms: (B, steps, _DRAWS) in [0, 1), from each row's own generator
        d = len(size)
        self.size = size
        self.on = call.has("jitter") or call.has("scale") or (call.has("rotate") and d >= 2)
        u = 2 * uniforms.to(torch.float64) - 1  # [-1, 1)
        b, steps = u.shape[:2]
        shift = torch.zeros(b, steps, d, dtype=torch.float64)
        if call.has("jitter"):
            px = call.options("jitter")["pixels"]
            most = torch.tensor(
                [px if px is not None else max(1, round(n / 16)) for n in size], dtype=torch.float64
            )
            shift = torch.round(u[..., :d] * most)
        scale = torch.ones(b, steps, dtype=torch.float64)
        if call.has("scale"):
            scale = 1 + u[..., _MAX_AXES] * call.options("scale")["amount"]
        angle = torch.zeros(b, steps, dtype=torch.float64)
        if call.has("rotate") and d >= 2:
            angle = u[..., _MAX_AXES + 1] * math.radians(call.options("rotate")["degrees"])
        self.theta = _affine(size, shift, scale, angle).to(call.dtype).to(call.device)

    def __call__(self, x: torch.Tensor, step: int, middle: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, C, *size)`` resampled with step ``step``'s transforms; outside, ``middle``."""
        if not self.on:
            return x
        theta = self.theta[:, step]
        flat = x.dim() == 3  # 1-D: a 2-D image one position high
        z = (x - middle).unsqueeze(2) if flat else x - middle
        grid = F.affine_grid(theta, list(z.shape), align_corners=False)
        out = F.grid_sample(z, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return (out.squeeze(2) if flat else out) + middle


def _affine(
    size: tuple[int, ...], shift: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor
) -> torch.Tensor:
    """``affine_grid`` matrices ``(B, steps, k, k + 1)`` (k = 2, or 3 for volumes).

    Output position ``q`` (in positions, from the centre) samples the input at
    ``scale * R(angle) q + shift``; the rotation is in the plane of the last two axes. In
    affine_grid's normalised coordinates (x = last axis), that is ``D^-1 (s R D p) + D^-1 t``
    with ``D = diag(n / 2)``.
    """
    d = len(size)
    k = 2 if d == 1 else d
    sizes = (1, size[0]) if d == 1 else size  # 1-D as a 2-D image one position high
    half = torch.tensor([n / 2 for n in reversed(sizes)], dtype=torch.float64)  # (x, y[, z])
    b, steps = scale.shape
    rot = torch.eye(k, dtype=torch.float64).expand(b, steps, k, k).clone()
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot[..., 0, 0], rot[..., 0, 1], rot[..., 1, 0], rot[..., 1, 1] = cos, -sin, sin, cos
    a = scale[..., None, None] * rot
    if d == 1:  # no scaling across the strip
        a[..., 1, :] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a = a * half[None, None, None, :] / half[None, None, :, None]  # D^-1 A D
    t = torch.zeros(b, steps, k, dtype=torch.float64)
    t[..., :d] = shift.flip(-1)  # positions per axis -> (x, y, z) order
    t = t / half
    return torch.cat([a, t[..., None]], dim=-1)


# --------------------------------------------------------------------------------------------
# Step regularisers (pixel parameterisation): operations on the parameters after each step


@dataclass
class _StepState:
    """What a step regulariser may read: the parameters, the image and its gradient."""

    theta: torch.Tensor  # (B, C, *size), modified in place
    image: torch.Tensor  # (B, C, *size), before the step
    grad: torch.Tensor | None  # d objective / d image, (B, C, *size); contribution_clip only
    middle: torch.Tensor  # (1, C, 1, ...)
    step: int


def _decay(s: _StepState, o: Mapping[str, Any]) -> None:
    s.theta.mul_(1.0 - o["rate"])


def _blur(s: _StepState, o: Mapping[str, Any]) -> None:
    if (s.step + 1) % int(o["every"]) == 0 and o["sigma"] > 0:
        s.theta.copy_(_gaussian(s.theta, float(o["sigma"])))


def _norm_clip(s: _StepState, o: Mapping[str, Any]) -> None:
    _clip_below(s.theta, s.theta.norm(dim=1), float(o["percentile"]))


def _contribution_clip(s: _StepState, o: Mapping[str, Any]) -> None:
    assert s.grad is not None
    contribution = ((s.image - s.middle) * s.grad).sum(dim=1).abs()
    _clip_below(s.theta, contribution, float(o["percentile"]))


def _clip_below(theta: torch.Tensor, score: torch.Tensor, percentile: float) -> None:
    """Set to 0 (the middle of the range) the positions whose ``score`` ``(B, *size)`` is below
    the row's ``percentile``.
    """
    if percentile <= 0:
        return
    flat = score.flatten(1).to(torch.float64)
    cut = torch.quantile(flat, percentile / 100.0, dim=1, keepdim=True)
    keep = (flat >= cut).view(score.shape).unsqueeze(1)
    theta.mul_(keep.to(theta.dtype))


def _gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``(B, C, *size)`` over its spatial axes (edges
    replicated).
    """
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x)
    for axis in range(2, x.dim()):
        moved = x.movedim(axis, -1)
        shape = moved.shape
        line = F.pad(moved.reshape(-1, 1, shape[-1]), (r, r), mode="replicate")
        x = F.conv1d(line, kernel.view(1, 1, -1)).reshape(shape).movedim(-1, axis)
    return x


_STEPS: dict[str, Callable[[_StepState, Mapping[str, Any]], None]] = {
    "decay": _decay,
    "blur": _blur,
    "norm_clip": _norm_clip,
    "contribution_clip": _contribution_clip,
}


# --------------------------------------------------------------------------------------------
# The core


def _row_seed(seed: int, channel: int) -> int:
    """A row's generator seed from the call's seed and the row's channel (platform-independent)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, channel])
    return int(state.generate_state(2, np.uint64)[0] & ((1 << 63) - 1))


def _field(call: _Call) -> tuple[ReceptiveField | None, str]:
    """The layer's receptive field (the caller's, else computed), or None and why not."""
    if call.field is not None:
        return call.field, ""
    if call.objective == "channel" or not call.crop:
        return None, "not needed"
    rf, why = try_receptive_field(call.model, call.input_shape, call.layer)
    return rf, "" if rf is not None else f"its receptive field cannot be computed ({why})"


def _visualize(call: _Call) -> tuple[Visualization, list[tuple[type[Warning], str]]]:
    warned: list[tuple[type[Warning], str]] = []
    model = call.model
    resolve_layers(model, [call.layer])
    found = _field(call)
    with preserved(model), _grad_enabled(), capture(model, [call.layer]) as run:
        canvas = _plan(call, run, found, warned)
        b = len(call.channels)
        step = 1 if canvas.batch_statistics else call.chunk_size
        step = step or max(1, AUTO_CHUNK_VALUES // (call.input_shape[0] * math.prod(canvas.size)))
        images, acts, curves, moved = [], [], [], []
        chunks = range(0, b, step)
        with tqdm(
            total=call.steps * len(chunks),
            desc=f"visualize {call.layer}",
            disable=not call.progress,
            leave=False,
        ) as bar:
            for lo in chunks:
                out = _optimise(call, run, canvas, call.channels[lo : lo + step], bar)
                images.append(out[0])
                acts.append(out[1])
                curves.append(out[2])
                moved.append(out[3])
    moved_all = torch.cat(moved)
    dead = tuple(c for c, m in zip(call.channels, moved_all.tolist()) if not m)
    if dead:
        warned.append(
            (
                DeadUnitWarning,
                f"visualize: channel(s) {_short(dead)} of layer {call.layer!r} never moved: the "
                "gradient of the objective was zero at every step (a dead unit, such as a "
                "ReLU that stays at 0 near the starting image, or a unit that depends on no "
                "input). Their images are the starting noise; try the layer before the ReLU, "
                "another seed or objective='channel'",
            )
        )
    result = Visualization(
        layer=call.layer,
        channels=call.channels,
        objective=call.objective,
        location=canvas.location,
        images=torch.cat(images),
        activations=torch.cat(acts),
        curve=torch.cat(curves, dim=1),
        start=canvas.start,
        size=canvas.size,
        input_shape=call.input_shape,
        value_range=call.value_range,
        fallback=canvas.fallback,
        dead=dead,
        regularizers=tuple((n, MappingProxyType(dict(o))) for n, o in call.regularizers),
        steps=call.steps,
        lr=call.lr,
        seed=call.seed,
        notes=call.notes,
    )
    return result, warned


def _optimise(
    call: _Call, run: Any, canvas: _Canvas, channels: tuple[int, ...], bar: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimise one batch of rows: ``(images, final activations, curve, moved)``."""
    generators = [torch.Generator().manual_seed(_row_seed(call.seed, c)) for c in channels]
    image = _Image(call, canvas.size, generators)
    uniforms = torch.stack(
        [torch.rand(call.steps, _DRAWS, generator=g, dtype=torch.float64) for g in generators]
    )
    transforms = _Transforms(call, canvas.size, uniforms)
    middle = _middle(call, (1, call.input_shape[0], *[1] * len(canvas.size)))
    steps = [(n, o, _STEPS[n]) for n, o in call.regularizers if n in _STEPS]
    wants_grad = call.has("contribution_clip")
    rows = torch.arange(len(channels), device=call.device)
    index = torch.tensor(channels, device=call.device)

    def objective(y: torch.Tensor) -> torch.Tensor:  # (B, K, *grid) -> (B,)
        y = y[rows, index]
        if canvas.local is not None:
            where: tuple[slice | int, ...] = (slice(None), *canvas.local)
            return y[where]
        return y.flatten(1).mean(dim=1) if y.dim() > 1 else y

    opt = torch.optim.Adam([image.theta], lr=call.lr)
    curve = torch.empty(call.steps, len(channels), dtype=call.dtype)
    moved = torch.zeros(len(channels), dtype=torch.bool)
    for t in range(call.steps):
        x = image()
        a = objective(run(transforms(x, t, middle))[call.layer])
        wrt = [image.theta, x] if wants_grad else [image.theta]
        grads = torch.autograd.grad(a.sum(), wrt)
        g = grads[0]
        _check_finite(call, channels, t, a, g)
        moved |= g.detach().flatten(1).ne(0).any(dim=1).cpu()
        image.theta.grad = -g  # ascent
        opt.step()
        if steps:
            with torch.no_grad():
                state = _StepState(
                    image.theta, x.detach(), grads[-1] if wants_grad else None, middle, t
                )
                for _, options, apply in steps:
                    apply(state, options)
        curve[t] = a.detach().cpu()
        bar.update(1)
    with torch.no_grad():
        x = image()
        final = objective(run(x)[call.layer])
    return x.detach(), final.detach(), curve, moved


def _check_finite(
    call: _Call, channels: tuple[int, ...], step: int, a: torch.Tensor, g: torch.Tensor
) -> None:
    ok_a = torch.isfinite(a.detach())
    ok_g = torch.isfinite(g.detach()).flatten(1).all(dim=1)
    if bool(ok_a.all()) and bool(ok_g.all()):
        return
    row = int((~(ok_a & ok_g)).nonzero()[0, 0])
    what = "value" if not bool(ok_a[row]) else "gradient"
    bad = [c for c, fine in zip(channels, (ok_a & ok_g).tolist()) if not fine]
    raise NonFiniteError(
        f"visualize: the {what} of channel {channels[row]} of layer {call.layer!r} is not finite "
        f"(NaN or infinite) at step {step} (channels affected: {_short(bad)}): the network "
        f"produces non-finite values on inputs in the value range {call.value_range.low} .. "
        f"{call.value_range.high}; check the model, or pass a narrower value_range or a "
        "smaller lr"
    )
