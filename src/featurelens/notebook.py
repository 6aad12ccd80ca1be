"""One unit in a notebook: its projection cropped to its receptive field, beside the input patch.

:func:`show` is the notebook's quick look at a unit: a full-size projection of one deep unit is
mostly zeros (the unit sees a small window) and shows as a speck, so the picture is cut to the
unit's receptive-field box, enlarged, and drawn next to the same box of the input, the way
Zeiler & Fergus (2014) draw their figures. The returned :class:`UnitView` displays itself in
Jupyter (``_repr_png_`` and ``_repr_html_``) and keeps the numbers behind the picture.
"""

from __future__ import annotations

import base64
import dataclasses
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from featurelens._public import public
from featurelens.errors import UsageError
from featurelens.figures import check_method, layer_field, model_dtype, whole_input_box
from featurelens.graph import capture, model_device, preserved
from featurelens.projection import project
from featurelens.receptive_field import ReceptiveField
from featurelens.render import Box, box_of, get_style, render_zf, save_png
from featurelens.unit import argmax_location, as_integer, check_location

__all__ = ["UnitView", "show"]


@dataclass(frozen=True, eq=False)
class UnitView:
    """The picture of one unit and the numbers behind it; displays itself in Jupyter.

    Attributes
    ----------
    image
        The rendered picture (PIL, RGB): projection on the left, input patch on the right.
    layer, channel, location
        The unit; ``location`` in the layer's output grid (``()`` for a layer without one).
    value
        The unit's activation on the input.
    method, style
        How the projection was computed and coloured.
    box
        The unclipped inclusive ``(first, last)`` input interval per spatial axis that the
        picture shows; the whole input when the field is unknown, global or irregular.
    field
        The layer's receptive field, or None when it cannot be computed (``note`` says why).
    projection
        ``(C, *spatial)`` full-size projection, zero outside the receptive field.
    note
        Why the picture shows the whole input, or ``""``.
    """

    image: Image.Image
    layer: str
    channel: int
    location: tuple[int, ...]
    value: float
    method: str
    style: str
    box: Box
    field: ReceptiveField | None
    projection: torch.Tensor = dataclasses.field(repr=False)
    note: str = ""

    def to_png(self) -> bytes:
        """The picture as PNG bytes."""
        return save_png(self.image)

    def save(self, path: str | Path) -> Path:
        """Write the picture as a PNG file and return its path."""
        return save_png(self.image, path)

    def caption(self) -> str:
        """One line: the unit, its value, the box shown and the method."""
        box = " x ".join(f"{a}..{b}" for a, b in self.box)
        return (
            f"{self.layer} channel {self.channel} at {self.location}: {self.value:.4g}; "
            f"input box {box}; {self.method}, {self.style}"
            + (f" ({self.note})" if self.note else "")
        )

    def _repr_png_(self) -> bytes:
        return self.to_png()

    def _repr_html_(self) -> str:
        data = base64.b64encode(self.to_png()).decode("ascii")
        return (
            f'<figure style="margin:0"><img src="data:image/png;base64,{data}" '
            f'alt="{html.escape(self.caption())}"/>'
            f"<figcaption><code>{html.escape(self.caption())}</code></figcaption></figure>"
        )

    def __repr__(self) -> str:
        return f"UnitView({self.caption()})"


def _one_example(inputs: Any) -> torch.Tensor:
    """``(C, *spatial)`` -> ``(1, C, *spatial)``; anything else is refused, naming its shape."""
    if not isinstance(inputs, torch.Tensor):
        raise UsageError(
            f"inputs must be a tensor of one example (C, *spatial); got {type(inputs).__name__}"
        )
    if not 2 <= inputs.dim() <= 4:
        raise UsageError(
            f"inputs of shape {tuple(inputs.shape)} are not one example (C, *spatial) with 1 to "
            "3 spatial axes; for example i of a batch pass inputs[i]"
        )
    return inputs[None]


def _layer_output(model: nn.Module, x: torch.Tensor, layer: str, device: Any) -> torch.Tensor:
    """The layer's output for the one example ``x`` (1, C, *spatial): ``(K, *spatial_l)``."""
    with preserved(model), torch.no_grad(), capture(model, [layer]) as run:
        try:
            out = run(x.to(device or model_device(model)))[layer]
        except RuntimeError as exc:
            if "shape" not in str(exc) and "size" not in str(exc) and "dim" not in str(exc):
                raise
            raise UsageError(
                f"the model rejects one example of shape {tuple(x.shape[1:])} ({exc}); inputs "
                "must be one example (C, *spatial), without the batch axis: for example i "
                "of a batch pass inputs[i]"
            ) from None
    return out[0].detach().cpu()


@public
def show(
    model: nn.Module,
    inputs: torch.Tensor,
    layer: str,
    channel: int,
    location: Sequence[int] | int | None = None,
    method: str = "guided",
    *,
    style: str = "rgb",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scale: int | None = None,
    device: torch.device | str | None = None,
) -> UnitView:
    """Show one unit's projection cropped to its receptive field, beside its input patch.

    Parameters
    ----------
    model
        Any ``nn.Module``; left exactly as given.
    inputs
        One example ``(C, *spatial)``, without the batch axis (``images[i]``), with 1 to 3
        spatial axes: signals are drawn as line plots, volumes as the central slice of the
        box.
    layer
        Dotted layer name (:func:`featurelens.layer_names`).
    channel
        The unit's channel in ``layer``'s output.
    location
        The unit's place in the layer's output grid; default: where the channel's map is
        largest on this input (as :func:`featurelens.project` picks it).
    method
        ``"gradient"``, ``"deconvnet"`` or ``"guided"`` (:data:`featurelens.METHODS`).
    style
        A name in :data:`featurelens.STYLES`.
    mean, std
        The data's normalisation, to draw the patch in its original pixel values.
    scale
        Display pixels per input pixel for images; default about 80 pixels per box side.
    device
        Where to compute; default: where the model lives.

    Returns
    -------
    UnitView
        Displays itself in a notebook (PNG or HTML); ``.save(path)`` writes the PNG, and
        ``.projection``, ``.box``, ``.location`` and ``.value`` hold the numbers.

    Raises
    ------
    UsageError
        ``inputs`` are not one example (or the model rejects their shape); unknown method or
        style; channel or location out of
        range (the message gives the valid range).
    LayerError
        ``layer`` is not a layer of ``model`` (the message lists valid names).
    ActivationError
        An activation without a rule for ``method``.

    Examples
    --------
    >>> featurelens.show(model, image, "features.10", channel=5)  # doctest: +SKIP
    """
    check_method(method)
    style = get_style(style).name
    x = _one_example(inputs).to(model_dtype(model))
    out = _layer_output(model, x, layer, device)
    channels = out.shape[0] if out.dim() >= 1 else 0
    channel = as_integer(channel, "channel")
    if not 0 <= channel < channels:
        raise UsageError(
            f"channel {channel} is out of range: layer {layer!r} has {channels} channels "
            f"(valid 0..{channels - 1})"
        )
    fmap = out[channel]
    if location is None:
        loc = argmax_location(fmap)
    else:
        try:
            loc = check_location(location, tuple(fmap.shape), where=f"layer {layer!r} outputs")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    value = float(fmap[loc])
    spatial = tuple(x.shape[2:])
    rf, why = layer_field(model, (x.shape[1], *spatial), layer)
    proj = project(model, x, layer, channel, loc, method, field=rf, device=device)
    proj = proj.detach().cpu()  # (1, C, *spatial)
    if rf is None:
        box, note = whole_input_box(spatial), f"no receptive field: {why}"
    else:
        box = box_of(rf, loc)
        note = "" if rf.regular and not rf.is_global else "the field has no box: whole input"
    fig = render_zf(
        x.detach().cpu(),
        proj,
        [box],
        style,
        mean,
        std,
        title=f"{layer} channel {channel} at {loc} ({method})",
        labels=("projection", "input patch"),
        scale=scale,
    )
    return UnitView(
        image=fig.image,
        layer=layer,
        channel=channel,
        location=loc,
        value=value,
        method=method,
        style=style,
        box=box,
        field=rf,
        projection=proj[0],
        note=note,
    )
