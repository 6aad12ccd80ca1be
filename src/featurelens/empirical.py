"""The independent receptive-field verifier: support of an input gradient.

Run in float64 with the model's weights swapped for strictly positive averaging kernels (in
each call, at the ``__torch_function__`` level: the model itself is neither copied nor
changed), activations and norms replaced by the identity, max pooling by average pooling of
the same geometry and bicubic interpolation by its absolute weights, the network is a positive
linear map: an input position influences a unit exactly when the unit's gradient with respect
to it is non-zero. No cancellation can hide a pixel, and float64 keeps the tiny contributions
of border pixels from underflowing (float32 does not on deep nets).

This module shares nothing with the analytic engine (:mod:`featurelens.receptive_field`): it
needs no tracing, only a forward pass with the layer captured by a hook, and it replaces
operations at the ``__torch_function__`` level, so functional calls (``F.relu``,
``F.max_pool2d``, ``x.sigmoid()``) are covered as much as modules. The forward stops at the
layer, so the layers after it cost nothing. Forward hooks of your own on the model do run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from featurelens.graph import capture, get_layer, model_device, preserved
from featurelens.unit import check_location

__all__ = ["EmpiricalReceptiveField", "empirical_receptive_field"]


@dataclass(frozen=True)
class EmpiricalReceptiveField:
    """Input positions with a non-zero gradient for one location of one layer.

    Attributes
    ----------
    mask
        Bool tensor with the input's spatial shape: True where the unit depends on the input.
    region
        Half-open bounding box of ``mask`` (empty slices if the mask is empty), comparable with
        :meth:`featurelens.ReceptiveField.region`.
    """

    mask: torch.Tensor
    region: tuple[slice, ...]

    @property
    def is_dense(self) -> bool:
        """Every position of the bounding box is in the mask (no holes, e.g. from dilation)."""
        box = self.mask[self.region]
        return bool(box.numel() > 0 and box.all())


_IDENTITY_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.hardtanh, F.hardtanh_, F.gelu, F.silu, F.mish, F.elu, F.elu_,
    F.selu, F.celu, F.leaky_relu, F.leaky_relu_, F.prelu, F.rrelu, F.hardswish, F.hardsigmoid,
    F.sigmoid, F.tanh, F.softplus, F.logsigmoid, F.threshold, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.batch_norm,
    F.instance_norm, F.group_norm, F.layer_norm, F.local_response_norm,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clip,
    torch.clamp_min, torch.batch_norm, torch.layer_norm, torch.group_norm, torch.instance_norm,
    torch.Tensor.relu, torch.Tensor.relu_, torch.Tensor.sigmoid, torch.Tensor.sigmoid_,
    torch.Tensor.tanh, torch.Tensor.tanh_, torch.Tensor.clamp, torch.Tensor.clamp_,
    torch.Tensor.clamp_min, torch.Tensor.clamp_min_, torch.Tensor.clip,
}  # fmt: skip


def _max_pool_as_average(func, args, kwargs, d: int):
    """Average pooling with max pooling's exact geometry (dilation and ceil_mode included)."""
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    a = dict(zip(names, args))
    a.update(kwargs)
    x = a["input"]
    reference = func(*args, **kwargs)  # real max pool, for its output shape
    ref = reference[0] if isinstance(reference, tuple) else reference

    def tup(v, default):
        v = default if v is None else v
        return (
            tuple(v) * (d if len(tuple(v)) == 1 else 1)
            if isinstance(v, (list, tuple))
            else (v,) * d
        )

    k = tup(a["kernel_size"], None)
    s = tup(a.get("stride") or a["kernel_size"], None)
    q = tup(a.get("padding", 0), 0)
    dil = tup(a.get("dilation", 1), 1)
    pads: list[int] = []
    for i in reversed(range(d)):
        n = x.shape[x.dim() - d + i]
        n_out = ref.shape[ref.dim() - d + i]
        needed = (n_out - 1) * s[i] + dil[i] * (k[i] - 1) + 1
        pads += [q[i], needed - n - q[i]]
    xp = F.pad(x, pads)
    c = xp.shape[1]
    weight = torch.full(
        (c, 1, *k), 1.0 / float(torch.tensor(k).prod()), dtype=x.dtype, device=x.device
    )
    conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
    out = conv(xp, weight, stride=s, dilation=dil, groups=c)
    if isinstance(reference, tuple):
        return out, reference[1]
    return out


_MAX_POOLS = {}
for _d in (1, 2, 3):
    for _f in (getattr(F, f"max_pool{_d}d"), getattr(F, f"max_pool{_d}d_with_indices"),
               getattr(torch, f"max_pool{_d}d")):  # fmt: skip
        _MAX_POOLS[_f] = _d
_ADAPTIVE_MAX = {
    getattr(F, f"adaptive_max_pool{d}d"): getattr(F, f"adaptive_avg_pool{d}d") for d in (1, 2, 3)
}
_ADAPTIVE_MAX.update(
    {
        getattr(F, f"adaptive_max_pool{d}d_with_indices"): getattr(F, f"adaptive_avg_pool{d}d")
        for d in (1, 2, 3)
    }  # fmt: skip
)


_WEIGHTED = {
    F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d, torch.conv3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
}  # fmt: skip


def _positive_bicubic(args: tuple, kwargs: dict) -> torch.Tensor:
    """Bicubic interpolation with the absolute values of its weights, one axis at a time.

    The bicubic kernel has negative lobes, so paths through it could cancel in the gradient;
    with ``|w|`` the map stays positive and reads exactly the same input positions. Each
    axis's weights are read off ``F.interpolate`` itself: the identity matrix resampled along
    that axis only (the other axes kept at length 2 and scale 1; length 1 would trip PyTorch's
    antialiased kernel).
    """
    names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor",
             "antialias")  # fmt: skip
    a = dict(zip(names, args))
    a.update(kwargs)
    x = a.pop("input")
    a.pop("mode", None)
    size, scale = a.pop("size", None), a.pop("scale_factor", None)
    d = x.dim() - 2
    for i in range(d):
        n = x.shape[2 + i]
        shape = [n if k == i else 2 for k in range(d)]
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        eye = eye.reshape(n, 1, *[n if k == i else 1 for k in range(d)]).expand(n, 1, *shape)
        per_axis: dict = {}
        if size is not None:
            sizes = list(size) if isinstance(size, (list, tuple)) else [size] * d
            per_axis["size"] = [int(sizes[i]) if k == i else 2 for k in range(d)]
        else:
            scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * d
            per_axis["scale_factor"] = [float(scales[i]) if k == i else 1.0 for k in range(d)]
        y = F.interpolate(eye, mode="bicubic", **per_axis, **a)
        weights = y[(slice(None), 0, *[slice(None) if k == i else 0 for k in range(d)])].abs()
        x = torch.movedim(torch.movedim(x, 2 + i, -1) @ weights, -1, 2 + i)
    return x


def _positive(func, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Swap the model's parameters for positive float64 constants, in this call only.

    Convolution and linear weights average their inputs (1 / fan-in, so magnitudes stay near 1
    however deep the net), biases vanish, every other parameter (layer scales, ...) becomes 1.
    """

    def swap(i: int | str, a):
        if not isinstance(a, nn.Parameter):
            return a
        if func in _WEIGHTED and i in (1, "weight"):
            return torch.full(a.shape, 1.0 / a[0].numel(), dtype=torch.float64, device=a.device)
        if func in _WEIGHTED and i in (2, "bias"):
            return None
        return torch.ones(a.shape, dtype=torch.float64, device=a.device)

    return (
        tuple(swap(i, a) for i, a in enumerate(args)),
        {k: swap(k, v) for k, v in kwargs.items()},
    )


class _PositiveLinearMode(TorchFunctionMode):
    """Parameters become positive constants, activations and norms the identity, max pooling
    average pooling: the network becomes a positive linear map.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        args, kwargs = _positive(func, args, kwargs or {})
        if func in _IDENTITY_FUNCTIONS:
            x = args[0] if args else kwargs.get("input")
            return x
        if func in _MAX_POOLS:
            return _max_pool_as_average(func, args, kwargs, _MAX_POOLS[func])
        if func in _ADAPTIVE_MAX:
            x = args[0] if args else kwargs["input"]
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            out = _ADAPTIVE_MAX[func](x, size)
            return (out, None) if func.__name__.endswith("indices") else out
        if func is F.interpolate:
            mode = args[3] if len(args) > 3 else kwargs.get("mode", "nearest")
            if mode == "bicubic":
                return _positive_bicubic(args, kwargs)
        if func in (torch.amax, torch.Tensor.amax):
            x = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", ())
            keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            return x.mean(dim=dim, keepdim=keepdim) if dim != () else x.mean()
        return func(*args, **kwargs)


def empirical_receptive_field(
    model: nn.Module,
    input_shape: Sequence[int],
    layer: str,
    location: Sequence[int] | int,
    channel_dim: int = 1,
) -> EmpiricalReceptiveField:
    """Receptive field of ``layer`` at ``location`` from the support of an input gradient.

    Independent of :func:`featurelens.receptive_field` (no tracing); slower, and exact in the
    sense that it reports precisely the positions the unit depends on. Dilated kernels can leave
    holes: compare bounding boxes (``.region``) with the analytic region.

    Parameters
    ----------
    model
        Left untouched: it runs in float64 with its parameters swapped for positive constants
        call by call (no copy is made); its mode and hooks come back as they were.
    input_shape
        ``(C, *spatial)`` without the batch dimension.
    layer
        Dotted ``named_modules()`` name.
    location
        One int per spatial axis of the layer's output (``()`` for a layer without spatial
        axes, such as a classifier).
    channel_dim
        The layer output's channel dim; the dims after it are spatial. Set it to -1 for a
        channels-last layer (``(N, *spatial, C)``, as inside ConvNeXt blocks).
    """
    shape = tuple(int(v) for v in input_shape)
    if not 2 <= len(shape) <= 4:
        raise ValueError(f"input_shape {shape} is not (C, *spatial) with 1 to 3 spatial axes")
    get_layer(model, layer)
    loc = (location,) if isinstance(location, int) else tuple(int(v) for v in location)
    device = model_device(model)
    x = torch.ones((1, *shape), dtype=torch.float64, device=device, requires_grad=True)
    with preserved(model), _PositiveLinearMode(), capture(model, [layer]) as run:
        y = run(x)[layer]
    if y.dim() > 2 and channel_dim % y.dim() != 1:
        y = y.movedim(channel_dim, 1)
    spatial = y.shape[2:]
    if y.dim() <= 2:
        if any(loc):
            raise ValueError(f"layer {layer!r} has no spatial axes; use location ()")
        target = y.sum()
    else:
        loc = check_location(loc, spatial, where=f"layer {layer!r} outputs")
        target = y[(0, slice(None), *loc)].sum()  # type: ignore[index]  # ints, not objects
    (grad,) = torch.autograd.grad(target, x)
    mask = (grad[0] != 0).any(dim=0).cpu()
    region = []
    for axis in range(mask.dim()):
        other = tuple(i for i in range(mask.dim()) if i != axis)
        hit = mask.any(dim=other) if other else mask
        idx = torch.nonzero(hit).flatten()
        region.append(slice(int(idx[0]), int(idx[-1]) + 1) if len(idx) else slice(0, 0))
    return EmpiricalReceptiveField(mask=mask, region=tuple(region))
