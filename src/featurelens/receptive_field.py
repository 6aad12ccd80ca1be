"""Exact, analytic receptive fields of every layer of a traced model.

Definitions follow Araujo, Norris & Sim, "Computing Receptive Fields of Convolutional Neural
Networks", Distill 2019. On one spatial axis, a layer with effective ``size`` r, ``stride`` j and
``padding`` p maps output location ``u`` to the unclipped input interval
``[u*j - p, u*j - p + r - 1]``. A convolution or pooling with kernel k, stride s, padding q and
dilation d updates them by::

    r' = r + d*(k - 1)*j        j' = j*s        p' = p + q*j

Everything here is integer arithmetic per spatial axis (tuples, never x/y twins). Where branches
merge (add, multiply, concatenate) the fields are combined as the union of their intervals; they
are *aligned* when their centres coincide (Distill's alignment check). Branches with different
strides raise :class:`NotAlignedError`. Normalisation statistics do not count as dependencies
(norms keep the field), the same convention as :func:`featurelens.empirical_receptive_field`.

An operation the engine does not know raises :class:`UnsupportedOpError` naming it; the engine
never guesses.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from featurelens.errors import (
    LayerError,
    NotAlignedError,
    ReceptiveFieldError,
    UnsupportedOpError,
)
from featurelens.graph import model_device, preserved, trace
from featurelens.unit import check_location

__all__ = [
    "NotAlignedError",
    "ReceptiveField",
    "UnsupportedOpError",
    "receptive_field",
    "receptive_fields",
    "try_receptive_field",
]


# --------------------------------------------------------------------------------------------
# The value


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one layer, per spatial axis (Distill 2019 definitions).

    Output location ``u`` sees the unclipped input interval
    ``[u*stride - padding, u*stride - padding + size - 1]`` on each axis.

    Attributes
    ----------
    size, stride, padding
        One int per spatial axis of the input.
    input_shape
        Spatial shape of the input the field was computed for.
    output_shape
        Spatial shape of the layer's output, one entry per input axis. An axis that the layer
        has pooled away or flattened counts as length 1, so a classifier's logits have
        ``output_shape == (1, 1)`` and location ``(0, 0)``.
    is_global
        Every unit of the layer depends on the whole input (global pooling, flatten + linear,
        squeeze-and-excitation gating, ...); :meth:`region` then returns the whole input.
    aligned
        False where merged branches have different centres (Distill's alignment check), or
        where one location is broadcast over a map without seeing the whole input; the
        region is then the union of the branches' regions.
    bounds
        Exact clipped input bounds ``(first, last)`` (inclusive) of every output location, per
        axis; ``(0, -1)`` for a location that sees only padding. :meth:`region` reads them:
        away from the borders they equal the clipped Distill interval, at the borders they are
        exact where the formula is not (explicit pads, crops, dilated taps that skip pixels).
    channel_dim
        The output tensor's channel dim: 1 for ``(N, C, *spatial)``, the last dim for a
        channels-last layer (see :meth:`check_channels_first`).
    statistics
        The operations before the layer that normalise over positions (GroupNorm,
        InstanceNorm, LayerNorm over spatial dims, BatchNorm with batch statistics). Their
        statistics do not count as dependencies (the empirical verifier agrees), but a unit
        computed on a crop of the input sees other statistics: projections do not crop then.
    """

    size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    is_global: bool = False
    aligned: bool = True
    bounds: tuple[tuple[tuple[int, int], ...], ...] = field(default=(), repr=False, compare=False)
    channel_dim: int = 1
    statistics: tuple[str, ...] = field(default=(), compare=False)

    def check_channels_first(self, layer: str) -> None:
        """Raise a ValueError when the layer's output is not ``(N, C, *spatial)``.

        Scans and projections read channels at dim 1; a channels-last layer (``(N, H, W, C)``
        inside ConvNeXt blocks) would be misread silently.
        """
        if self.channel_dim != 1:
            raise ValueError(
                f"layer {layer!r} outputs its channels at dim {self.channel_dim} (channels-last, "
                "e.g. after permute(0, 2, 3, 1)); featurelens reads channels at dim 1: address "
                "the layer after the permute back to (N, C, *spatial), such as the block's output"
            )

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.size)

    def _check_location(self, location: Sequence[int] | torch.Tensor | int) -> tuple[int, ...]:
        return check_location(location, self.output_shape)

    def interval(self, location: Sequence[int] | int) -> tuple[tuple[int, int], ...]:
        """Unclipped, inclusive ``(first, last)`` input positions per axis for ``location``."""
        loc = self._check_location(location)
        return tuple(
            (u * j - p, u * j - p + r - 1)
            for u, r, j, p in zip(loc, self.size, self.stride, self.padding)
        )

    def region(self, location: Sequence[int] | int, clip: bool = True) -> tuple[slice, ...]:
        """Half-open input slices seen by ``location``: use as ``x[..., *rf.region(loc)]``.

        Clipped to the input by default; with ``clip=False`` the slices may start below 0 or
        end past the input (they then describe the padded frame, not an index into ``x``).
        A global field returns the whole input.
        """
        loc = self._check_location(location)
        if not clip:
            return tuple(slice(first, last + 1) for first, last in self.interval(loc))
        if self.bounds:
            spans = [b[u] for b, u in zip(self.bounds, loc)]
            if any(last < first for first, last in spans):  # sees only padding
                return tuple(slice(0, 0) for _ in spans)
            return tuple(slice(first, last + 1) for first, last in spans)
        out = []
        for (first, last), n in zip(self.interval(loc), self.input_shape):
            first, last = max(first, 0), min(last, n - 1)
            out.append(slice(first, max(last + 1, first)))
        return tuple(out)

    def __repr__(self) -> str:
        flags = [f for f, on in (("global", self.is_global), ("unaligned", not self.aligned)) if on]
        extra = f", flags={flags}" if flags else ""
        return (
            f"ReceptiveField(size={self.size}, stride={self.stride}, padding={self.padding}, "
            f"output_shape={self.output_shape}{extra})"
        )

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{a}</td><td>{r}</td><td>{j}</td><td>{p}</td><td>{n}</td><td>{i}</td></tr>"
            for a, (r, j, p, n, i) in enumerate(
                zip(self.size, self.stride, self.padding, self.output_shape, self.input_shape)
            )
        )
        flags = ", ".join(
            f for f, on in (("global", self.is_global), ("unaligned", not self.aligned)) if on
        )
        return (
            "<table><thead><tr><th>axis</th><th>size</th><th>stride</th><th>padding</th>"
            f"<th>output</th><th>input</th></tr></thead><tbody>{rows}</tbody></table>"
            + (f"<p>{flags}</p>" if flags else "")
        )


# --------------------------------------------------------------------------------------------
# Propagation state of one tensor


_EMPTY = np.iinfo(np.int64).max  # "first" of a location that depends on no input at all


@dataclass(frozen=True, eq=False)
class _Field:
    """Receptive-field state of one tensor in the graph.

    ``dims[i]`` is the input spatial axis held by tensor dim ``i`` (None for batch, channel
    and other dims). Everything else is per input axis: the Distill geometry (``size``,
    ``stride``, ``padding``), the number of locations (``lengths``; an axis that no tensor dim
    holds any more has length 1: it has been pooled or flattened away), and the exact clipped
    bounds of every location (``first[axis][u]``, ``last[axis][u]``, inclusive; ``first`` is
    ``_EMPTY`` and ``last`` is -1 for a location that sees only padding).

    The geometry is what the layer does away from the borders; the bounds are exact everywhere,
    including border locations whose windows reach into padding, explicit pads and crops, and
    dilated windows whose taps skip the first input positions.
    """

    dims: tuple[int | None, ...]
    size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    lengths: tuple[int, ...]
    first: tuple[np.ndarray, ...]
    last: tuple[np.ndarray, ...]
    aligned: bool = True
    statistics: tuple[str, ...] = ()  # ops before it that normalise over positions

    @classmethod
    def identity(cls, spatial: tuple[int, ...]) -> _Field:
        d = len(spatial)
        return cls(
            dims=(None, None) + tuple(range(d)),
            size=(1,) * d,
            stride=(1,) * d,
            padding=(0,) * d,
            lengths=tuple(spatial),
            first=tuple(np.arange(n, dtype=np.int64) for n in spatial),
            last=tuple(np.arange(n, dtype=np.int64) for n in spatial),
        )

    def _put(self, axis: int, **values: Any) -> _Field:
        changes = {}
        for name, v in values.items():
            t = getattr(self, name)
            changes[name] = t[:axis] + (v,) + t[axis + 1 :]
        return replace(self, **changes)

    def window(self, axis: int, k: int, s: int, q: int, d: int, n_out: int) -> _Field:
        """A sliding window (kernel k, stride s, left padding q, dilation d) on ``axis``.

        Also expresses explicit padding (k=1, q=left), crops and strided slices (k=1, q=-start,
        s=step) and broadcasting one location (s=0).
        """
        r, j, p = self.size[axis], self.stride[axis], self.padding[axis]
        n_in = self.lengths[axis]
        taps = np.arange(n_out, dtype=np.int64)[:, None] * s - q + np.arange(k) * d  # (n_out, k)
        valid = (taps >= 0) & (taps < n_in)
        safe = np.clip(taps, 0, max(n_in - 1, 0))
        first = np.where(valid, self.first[axis][safe], _EMPTY).min(axis=1)
        last = np.where(valid, self.last[axis][safe], -1).max(axis=1)
        return self._put(
            axis,
            size=r + d * (k - 1) * j,
            stride=j * s,
            padding=p + q * j,
            lengths=n_out,
            first=first,
            last=last,
        )

    def collapse(self, axis: int) -> _Field:
        """Union over all locations of ``axis`` (global pooling, flatten)."""
        n = self.lengths[axis]
        # one output location: its stride is never used; keep the map's, not a surprising n*j
        return self.window(axis, n, 1, 0, 1, 1)

    def covers(self, input_shape: tuple[int, ...]) -> bool:
        """Every location sees the whole input on every axis."""
        return all(
            bool((f == 0).all() and (lst == n - 1).all())
            for f, lst, n in zip(self.first, self.last, input_shape)
        )


# --------------------------------------------------------------------------------------------
# Op tables

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.RReLU, nn.GLU,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm,
    nn.LocalResponseNorm, nn.ChannelShuffle,
)  # fmt: skip

_ELEMENTWISE_FUNCTIONS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.neg, operator.pos, operator.abs, operator.iadd, operator.imul, operator.isub,
    operator.itruediv, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.abs, torch.exp, torch.sqrt,
    torch.pow, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.clamp, torch.clip,
    torch.clamp_min, torch.maximum, torch.minimum, torch.where, torch.square, torch.rsqrt,
    torch.channel_shuffle, torch.native_channel_shuffle,
    F.relu, F.relu_, F.relu6, F.hardtanh, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu,
    F.leaky_relu, F.prelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.softplus,
    F.logsigmoid, F.threshold, F.glu, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout, F.batch_norm, F.instance_norm, F.group_norm,
    F.layer_norm, F.local_response_norm,
}  # fmt: skip

_ELEMENTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "abs", "exp", "sqrt",
    "pow", "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_",
    "clamp_min", "clamp_min_", "clip", "contiguous", "clone", "float", "double", "half",
    "bfloat16", "to", "type_as", "detach", "square", "rsqrt", "masked_fill", "expand_as",
    "requires_grad_", "__add__", "__mul__", "__radd__", "__rmul__", "__sub__", "__truediv__",
}  # fmt: skip

_SHAPE_METHODS = {"size", "dim", "numel", "stride", "ndimension", "element_size", "get_device"}

_UNSUPPORTED_HINT = (
    "not supported yet: its receptive field is not a single interval per location. "
    "Use featurelens.empirical_receptive_field for this model."
)

_UNSUPPORTED_MODULES: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.PixelUnshuffle,
    nn.Unfold, nn.Fold, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
    nn.CircularPad2d, nn.CircularPad3d, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d,
    nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d, nn.MultiheadAttention,
)  # fmt: skip


def _ntuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return tuple(int(v[0]) for _ in range(n))
        return tuple(int(x) for x in v)
    return tuple(int(v) for _ in range(n))


def _bind(args: tuple, kwargs: dict, names: Sequence[str], defaults: dict) -> dict:
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


_POOL_NAMES = {
    "max": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "avg": ("input", "kernel_size", "stride", "padding", "ceil_mode"),
    "lp": ("input", "norm_type", "kernel_size", "stride", "ceil_mode"),
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
}
_POOL_FUNCTIONS: dict[Any, tuple[str, int]] = {}
for _d in (1, 2, 3):
    for _f in (getattr(F, f"max_pool{_d}d"), getattr(F, f"max_pool{_d}d_with_indices", None),
               getattr(torch, f"max_pool{_d}d", None)):  # fmt: skip
        if _f is not None:
            _POOL_FUNCTIONS[_f] = ("max", _d)
    for _f in (getattr(F, f"avg_pool{_d}d"), getattr(torch, f"avg_pool{_d}d", None)):
        if _f is not None:
            _POOL_FUNCTIONS[_f] = ("avg", _d)
    for _f in (getattr(F, f"conv{_d}d"), getattr(torch, f"conv{_d}d", None)):
        if _f is not None:
            _POOL_FUNCTIONS[_f] = ("conv", _d)
    if _d < 3:
        _POOL_FUNCTIONS[getattr(F, f"lp_pool{_d}d")] = ("lp", _d)
_ADAPTIVE_FUNCTIONS = {
    getattr(F, f"adaptive_{kind}_pool{d}d"): d for kind in ("max", "avg") for d in (1, 2, 3)
}
_ADAPTIVE_FUNCTIONS.update(
    {getattr(F, f"adaptive_max_pool{d}d_with_indices"): d for d in (1, 2, 3)}
)


# --------------------------------------------------------------------------------------------
# The propagation


class _Propagator(fx.Interpreter):
    """Runs the traced graph on a real (zero) input and propagates fields beside the values."""

    def __init__(
        self, gm: fx.GraphModule, input_shape: tuple[int, ...], stop_at: fx.Node | None = None
    ):
        super().__init__(gm)
        self.stop_at = stop_at
        self.input_shape = input_shape
        self.spatial = input_shape[1:]
        self.fields: dict[fx.Node, Any] = {}
        self.modules = dict(gm.named_modules())
        self._placeholder_seen = False

    # -- helpers ------------------------------------------------------------------------------
    def _where(self, node: fx.Node) -> str:
        what = (
            node.target
            if node.op != "call_function"
            else getattr(node.target, "__name__", node.target)
        )
        if node.op == "call_module":
            what = f"{type(self.modules[node.target]).__name__} module {node.target!r}"
        elif node.op == "call_method":
            what = f"Tensor.{node.target}()"
        else:
            mod = getattr(node.target, "__module__", "") or ""
            what = f"{mod + '.' if mod else ''}{what}()"
        line = ""
        if node.stack_trace:
            last = [ln.strip() for ln in node.stack_trace.strip().splitlines() if ln.strip()]
            if len(last) >= 2:
                line = f" at {last[-2]}: {last[-1]}"
        return f"{what} (graph node {node.name!r}{line})"

    def _unsupported(self, node: fx.Node, why: str = _UNSUPPORTED_HINT) -> UnsupportedOpError:
        return UnsupportedOpError(f"{self._where(node)}: {why}")

    def _field_of(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.fields.get(a)
        if isinstance(a, (list, tuple)):
            return [self._field_of(x) for x in a]
        return None

    def _arg_fields(self, node: fx.Node) -> list[tuple[_Field, torch.Tensor]]:
        found: list[tuple[_Field, torch.Tensor]] = []

        def visit(a: Any) -> None:
            if isinstance(a, fx.Node):
                f = self.fields.get(a)
                if isinstance(f, _Field):
                    found.append((f, self.env[a]))
                elif isinstance(f, (list, tuple)) and any(f):
                    raise self._unsupported(node, "takes a tuple of tensors it cannot follow")
            elif isinstance(a, (list, tuple)):
                for x in a:
                    visit(x)
            elif isinstance(a, dict):
                for x in a.values():
                    visit(x)

        visit(node.args)
        visit(node.kwargs)
        return found

    # -- fx hooks -----------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.op == "placeholder":
            if self._placeholder_seen:
                self.fields[n] = None
            else:
                self.fields[n] = _Field.identity(tuple(self.spatial))
                self._placeholder_seen = True
            return result
        if n.op in ("get_attr", "output"):
            self.fields[n] = None
            return result
        self.fields[n] = self._propagate(n, result)
        if n is self.stop_at:
            raise _Done
        return result

    # -- dispatch -----------------------------------------------------------------------------
    def _propagate(self, node: fx.Node, result: Any) -> Any:
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            return None
        if node.op == "call_function" and node.target is getattr:
            return None  # x.shape, x.dtype, ...
        if node.op == "call_function" and node.target is operator.getitem:
            return self._getitem(node, result)
        inputs = self._arg_fields(node)
        if not inputs:
            return None  # constant w.r.t. the input
        if node.op == "call_module":
            return self._module(node, self.modules[node.target], inputs, result)
        if node.op == "call_function":
            return self._function(node, node.target, inputs, result)
        if node.op == "call_method":
            return self._method(node, node.target, inputs, result)
        raise self._unsupported(node)

    def _module(self, node, m, inputs, result):  # noqa: ANN001
        f, x = inputs[0]
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if m.padding_mode != "zeros":
                raise self._unsupported(
                    node, f"padding_mode={m.padding_mode!r} is not supported yet (only 'zeros')"
                )
            d = len(m.kernel_size)
            return self._conv(node, f, x, result, m.kernel_size, m.stride, m.padding, m.dilation, d)
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            d = int(type(m).__name__[-2])
            return self._conv(node, f, x, result, m.kernel_size, m.stride, m.padding, m.dilation, d)
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.LPPool1d, nn.LPPool2d)):
            d = int(type(m).__name__[-2])
            return self._conv(
                node, f, x, result, m.kernel_size, m.stride, getattr(m, "padding", 0), 1, d
            )
        if isinstance(
            m,
            (
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
            ),
        ):  # fmt: skip
            return self._adaptive(node, f, x, result, int(type(m).__name__[-2]))
        if isinstance(m, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
                          nn.ConstantPad2d, nn.ConstantPad3d)):  # fmt: skip
            return self._pad(node, f, x, result, m.padding)
        if isinstance(m, nn.Flatten):
            return self._reshape(node, f, x, result)
        if isinstance(m, nn.Linear | nn.Bilinear | nn.Softmax | nn.LogSoftmax):
            dim = -1 if isinstance(m, nn.Linear | nn.Bilinear) else m.dim
            return self._along(node, f, x, result, dim if dim is not None else 1)
        if isinstance(m, _ELEMENTWISE_MODULES):
            return self._noting_statistics(node, self._merge(node, inputs, result), x, m)
        if isinstance(m, _UNSUPPORTED_MODULES):
            raise self._unsupported(node)
        raise self._unsupported(
            node,
            "unknown layer type for receptive fields. featurelens knows convolutions, pooling, "
            "padding, flatten, linear and an allow-list of layers that keep the field "
            "(activations, norms, dropout); use featurelens.empirical_receptive_field here.",
        )

    def _function(self, node, fn, inputs, result):  # noqa: ANN001
        f, x = inputs[0]
        if fn in _POOL_FUNCTIONS:
            kind, d = _POOL_FUNCTIONS[fn]
            a = _bind(node.args, node.kwargs, _POOL_NAMES[kind], {})
            a = {k: self._value(v) for k, v in a.items()}
            if kind == "conv":
                weight = a["weight"]
                k = tuple(weight.shape[2:])
                padding = a.get("padding", 0)
                return self._conv(node, f, x, result, k, a.get("stride", 1), padding,
                                  a.get("dilation", 1), d)  # fmt: skip
            stride = a.get("stride") or a["kernel_size"]
            return self._conv(node, f, x, result, a["kernel_size"], stride,
                              a.get("padding", 0), a.get("dilation", 1), d)  # fmt: skip
        if fn in _ADAPTIVE_FUNCTIONS:
            out = self._adaptive(node, f, x, result[0] if isinstance(result, tuple) else result,
                                 _ADAPTIVE_FUNCTIONS[fn])  # fmt: skip
            return (out, None) if isinstance(result, tuple) else out
        if fn is F.pad or fn is torch.constant_pad_nd:
            a = _bind(
                node.args, node.kwargs, ("input", "pad", "mode", "value"), {"mode": "constant"}
            )
            if a["mode"] != "constant":
                raise self._unsupported(node, f"padding mode {a['mode']!r} is not supported yet")
            return self._pad(node, f, x, result, self._value(a["pad"]))
        if fn in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze):
            return self._reshape(node, f, x, result)
        if fn in (torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.t):
            return self._permute(node, f, x, result)
        if fn in (torch.cat, torch.concat, torch.concatenate, torch.stack):
            return self._cat(node, inputs, result, stack=fn is torch.stack)
        if fn in (
            torch.mean,
            torch.sum,
            torch.amax,
            torch.amin,
            torch.logsumexp,
            torch.std,
            torch.var,
        ):
            return self._reduce(node, f, x, result)
        if fn in (torch.chunk, torch.split, torch.unbind, torch.tensor_split):
            return self._split(node, f, x, result)
        if fn in (F.linear, F.softmax, F.log_softmax):
            return self._along(node, f, x, result, -1 if fn is F.linear else self._dim_arg(node, 1))
        if fn is F.normalize:  # divides by a norm over `dim` (default 1, the channels)
            dim = _bind(node.args, node.kwargs, ("input", "p", "dim"), {"dim": 1})["dim"]
            return self._along(node, f, x, result, self._value(dim))
        if fn in _ELEMENTWISE_FUNCTIONS or getattr(fn, "__name__", "") == "stochastic_depth":
            return self._noting_statistics(node, self._merge(node, inputs, result), x, fn)
        if fn in (F.interpolate, F.upsample, F.conv_transpose1d, F.conv_transpose2d,
                  F.conv_transpose3d, F.pixel_shuffle, F.pixel_unshuffle, F.unfold, F.fold,
                  F.grid_sample, torch.roll, F.scaled_dot_product_attention):  # fmt: skip
            raise self._unsupported(node)
        raise self._unsupported(
            node,
            "unknown operation for receptive fields; use featurelens.empirical_receptive_field "
            "for this model.",
        )

    def _method(self, node, name, inputs, result):  # noqa: ANN001
        f, x = inputs[0]
        if name in ("view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as"):
            return self._reshape(node, f, x, result)
        if name in ("permute", "transpose", "movedim", "swapaxes", "t"):
            return self._permute(node, f, x, result)
        if name in ("mean", "sum", "amax", "amin", "logsumexp", "std", "var"):
            return self._reduce(node, f, x, result)
        if name in ("chunk", "split", "unbind", "tensor_split"):
            return self._split(node, f, x, result)
        if name in ("softmax", "log_softmax"):
            return self._along(node, f, x, result, self._dim_arg(node, 1))
        if name in ("expand",):
            return self._merge(node, inputs, result)
        if name in _ELEMENTWISE_METHODS:
            return self._merge(node, inputs, result)
        raise self._unsupported(
            node, "unknown tensor method for receptive fields; use empirical_receptive_field."
        )

    def _value(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            return self.env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(self._value(v) for v in a)
        return a

    def _dim_arg(self, node: fx.Node, pos: int) -> int | None:
        if "dim" in node.kwargs:
            return self._value(node.kwargs["dim"])
        if len(node.args) > pos:
            return self._value(node.args[pos])
        return None

    # -- rules --------------------------------------------------------------------------------
    def _noting_statistics(self, node: fx.Node, out: _Field, x: torch.Tensor, op: Any) -> _Field:
        """Record a normalisation whose statistics run over positions (GroupNorm, InstanceNorm,
        LayerNorm over spatial dims, BatchNorm with batch statistics). By convention they keep
        the field (as in the empirical verifier), but a unit computed on a crop of the input
        would see other statistics: projections read this to decide whether to crop."""
        spatial = [i for i, a in enumerate(out.dims[: x.dim()]) if a is not None and x.shape[i] > 1]
        if not spatial:
            return out
        over_space = batch = False
        if isinstance(op, nn.GroupNorm) or op is F.group_norm:
            over_space = True
        elif isinstance(op, nn.modules.instancenorm._InstanceNorm):
            over_space = not op.track_running_stats
        elif op is F.instance_norm:
            over_space = bool(self._value(node.kwargs.get("use_input_stats", True)))
        elif isinstance(op, nn.LayerNorm) or op is F.layer_norm:
            shape = op.normalized_shape if isinstance(op, nn.Module) else self._value(
                _bind(node.args, node.kwargs, ("input", "normalized_shape"), {})["normalized_shape"]
            )  # fmt: skip
            k = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
            over_space = any(i >= x.dim() - k for i in spatial)
        elif isinstance(op, nn.modules.batchnorm._BatchNorm):
            over_space = batch = op.training or op.running_mean is None
        elif op is F.batch_norm:
            training = _bind(node.args, node.kwargs, ("input", "running_mean", "running_var",
                             "weight", "bias", "training"), {"training": False})["training"]  # fmt: skip
            over_space = batch = bool(self._value(training))
        if not over_space:
            return out
        label = self._where(node).split(" (graph node")[0]
        if batch:
            label += " with batch statistics"
        return replace(out, statistics=tuple(dict.fromkeys((*out.statistics, label))))

    def _spatial_tail(self, node: fx.Node, f: _Field, x: torch.Tensor, d: int) -> list[int]:
        """Input axes held by the last ``d`` tensor dims (the dims a d-D kernel slides over)."""
        if x.dim() != d + 2:
            raise ValueError(
                f"{self._where(node)} works on (N, C, {d} spatial dims) but gets a tensor of shape "
                f"{tuple(x.shape)}: input_shape {tuple(self.input_shape)} must be (C, *spatial) with "
                "the spatial dims this layer expects"
            )
        axes = list(f.dims[-d:]) if x.dim() >= d else []
        if len(axes) != d:
            raise self._unsupported(
                node, f"expects {d} spatial dims, tensor has shape {tuple(x.shape)}"
            )
        for i, a in enumerate(axes):
            if a is None:
                size = x.shape[x.dim() - d + i]
                if size != 1:
                    raise self._unsupported(
                        node,
                        f"slides a window over tensor dim {x.dim() - d + i} (size {size}), which is "
                        "not a spatial axis of the input (channels or a flattened dim)",
                    )
        return axes

    def _conv(self, node, f, x, result, kernel, stride, padding, dilation, d):  # noqa: ANN001
        k = _ntuple(kernel, d)
        s = _ntuple(stride if stride is not None else kernel, d)
        dil = _ntuple(dilation, d)
        if isinstance(padding, str):
            if padding == "valid":
                q = (0,) * d
            elif padding == "same":
                q = tuple(di * (ki - 1) // 2 for ki, di in zip(k, dil))
            else:
                raise self._unsupported(node, f"padding {padding!r}")
        else:
            q = _ntuple(padding, d)
        axes = self._spatial_tail(node, f, x, d)
        out = f
        for i, axis in enumerate(axes):
            n_out = result.shape[result.dim() - d + i]
            if axis is None:
                continue
            out = out.window(axis, k[i], s[i], q[i], dil[i], n_out)
        return out

    def _adaptive(self, node, f, x, result, d):  # noqa: ANN001
        axes = self._spatial_tail(node, f, x, d)
        out = f
        for i, axis in enumerate(axes):
            if axis is None:
                continue
            n_in = x.shape[x.dim() - d + i]
            n_out = result.shape[result.dim() - d + i]
            if n_out == 1:
                out = out.collapse(axis)
            elif n_in == 1:
                out = out.window(axis, 1, 0, 0, 1, n_out)  # one location, repeated
            elif n_in % n_out == 0:
                k = n_in // n_out
                out = out.window(axis, k, k, 0, 1, n_out)
            else:
                raise self._unsupported(
                    node,
                    f"adaptive pooling from {n_in} to {n_out} positions uses windows of unequal "
                    "size (not supported yet); choose an input size that makes the layer's input a "
                    "multiple of its output, or use empirical_receptive_field",
                )
        return out

    def _pad(self, node, f, x, result, pad):  # noqa: ANN001
        pad = list(pad)
        if len(pad) % 2:
            raise self._unsupported(node, f"odd pad list {pad}")
        out = f
        for i in range(len(pad) // 2):
            dim = x.dim() - 1 - i
            left = int(pad[2 * i])
            axis = f.dims[dim]
            if axis is None:
                if left or pad[2 * i + 1]:
                    raise self._unsupported(node, f"pads tensor dim {dim}, which is not spatial")
                continue
            out = out.window(axis, 1, 1, left, 1, result.shape[dim])
        return out

    def _merge(self, node, inputs, result):  # noqa: ANN001
        """Elementwise op (with broadcasting) over one or more fields: union of dependencies."""
        if not isinstance(result, torch.Tensor):
            raise self._unsupported(node, "returns a non-tensor")
        nd = result.dim()
        dims: list[int | None] = [None] * nd
        merged: _Field | None = None
        for f, x in inputs:
            offset = nd - x.dim()
            if offset < 0:
                raise self._unsupported(node, "output has fewer dims than an input")
            for i, axis in enumerate(f.dims):
                if axis is None or (x.shape[i] == 1 and result.shape[offset + i] != 1):
                    continue  # broadcast dims carry no location
                if dims[offset + i] is not None and dims[offset + i] != axis:
                    raise self._unsupported(node, "combines different spatial axes in one dim")
                dims[offset + i] = axis
            merged = f if merged is None else self._union(node, merged, f)
        return replace(merged, dims=tuple(dims))

    def _union(self, node: fx.Node, a: _Field, b: _Field) -> _Field:
        """Union of two fields over the same locations; a length-1 axis is broadcast."""
        out = a
        aligned = a.aligned and b.aligned
        for axis in range(len(a.lengths)):
            # per axis, ``big`` has the locations and ``other`` is either alike or broadcast
            big, other = (b, a) if a.lengths[axis] == 1 < b.lengths[axis] else (a, b)
            n, n_other = big.lengths[axis], other.lengths[axis]
            if n_other not in (n, 1):
                raise self._unsupported(node, f"merges maps of lengths {n} and {n_other}")
            r, j, p = big.size[axis], big.stride[axis], big.padding[axis]
            ro, jo, po = other.size[axis], other.stride[axis], other.padding[axis]
            first = np.minimum(big.first[axis], other.first[axis])
            last = np.maximum(big.last[axis], other.last[axis])
            if n_other == 1 and n > 1:
                # One location reaches every location of the map (squeeze-and-excitation
                # gating, strip pooling): the smallest geometry whose interval holds, at every
                # location, both the map's interval and that location's fixed one.
                pad = max(p, (n - 1) * j + po)
                size = pad + max(r - p, ro - po)
                if not (
                    other.first[axis][0] == 0 and other.last[axis][0] == self.spatial[axis] - 1
                ):
                    aligned = False
                out = out._put(
                    axis, size=size, stride=j, padding=pad, lengths=n, first=first, last=last
                )
                continue
            if j != jo and n > 1:
                raise NotAlignedError(
                    f"{self._where(node)}: branches merge with different effective strides on "
                    f"axis {axis} ({j} and {jo}); no single receptive-field geometry. Use "
                    "featurelens.empirical_receptive_field for these layers."
                )
            pad = max(p, po)
            size = max(r - p, ro - po) + pad
            out = out._put(
                axis, size=size, stride=j, padding=pad, lengths=n, first=first, last=last
            )
            if (r - 1) - 2 * p != (ro - 1) - 2 * po:
                aligned = False
        self._check_separable(node, a, b, out)
        statistics = tuple(dict.fromkeys(a.statistics + b.statistics))
        return replace(out, aligned=aligned, statistics=statistics)

    def _check_separable(self, node: fx.Node, a: _Field, b: _Field, out: _Field) -> None:
        """Per-axis bounds stay exact through a union unless a branch sees only padding at some
        locations where the other branch reaches further on another axis: then the union's
        bounding box differs between locations in a way one table per axis cannot hold."""

        def empty_axes(f: _Field) -> list[int]:
            return [ax for ax in range(len(f.lengths)) if (f.last[ax] < f.first[ax]).any()]

        empty = {id(a): empty_axes(a), id(b): empty_axes(b)}
        ok = True
        for x, y in ((a, b), (b, a)):
            for e in empty[id(x)]:
                n_e = out.lengths[e]
                x_empty = np.broadcast_to(x.last[e] < x.first[e], (n_e,))
                y_empty = np.broadcast_to(y.last[e] < y.first[e], (n_e,))
                if not (x_empty & ~y_empty).any():
                    continue  # wherever x sees nothing, y sees nothing either
                # there the union is y alone: fine if y alone equals the union on other axes
                if any(f != e for f in empty[id(y)]):
                    ok = False
                for ax in range(len(out.lengths)):
                    if ax != e:
                        n = out.lengths[ax]
                        ok = (
                            ok
                            and np.array_equal(np.broadcast_to(y.first[ax], (n,)), out.first[ax])
                            and np.array_equal(np.broadcast_to(y.last[ax], (n,)), out.last[ax])
                        )
        if not ok:
            raise UnsupportedOpError(
                f"{self._where(node)}: merges a branch whose border locations see only padding "
                "with a branch that reaches further; the union is not one box per axis there "
                "(not supported yet). Use featurelens.empirical_receptive_field for this layer."
            )

    def _reshape(self, node, f, x, result):  # noqa: ANN001
        """view/reshape/flatten/squeeze/unsqueeze: keep spatial dims that survive one-to-one,
        collapse the ones merged into other dims."""
        in_shape, out_shape = list(x.shape), list(result.shape)
        groups = _reshape_groups(in_shape, out_shape)
        if groups is None:
            raise self._unsupported(node, f"reshape {tuple(in_shape)} -> {tuple(out_shape)}")
        out = f
        dims: list[int | None] = [None] * len(out_shape)
        for in_dims, out_dims in groups:
            in_big = [i for i in in_dims if in_shape[i] != 1]
            out_big = [o for o in out_dims if out_shape[o] != 1]
            spatial = [f.dims[i] for i in in_dims if f.dims[i] is not None]
            if len(in_big) == 1 and len(out_big) == 1 and f.dims[in_big[0]] is not None:
                dims[out_big[0]] = f.dims[in_big[0]]
                continue
            if len(in_big) == 1 and len(out_big) == 1 and f.dims[in_big[0]] is None:
                # a non-spatial dim kept; spatial size-1 dims squeezed away stay length 1
                continue
            if not in_big and out_dims and spatial:
                # size-1 spatial dims: keep the label on a size-1 output dim when possible
                if len(out_dims) == len(in_dims):
                    for i, o in zip(in_dims, out_dims):
                        dims[o] = f.dims[i]
                continue
            for axis in spatial:
                out = out.collapse(axis)
        if all(d is None for d in dims) and any(n > 1 for n in out.lengths):
            for axis, n in enumerate(out.lengths):
                if n > 1:
                    out = out.collapse(axis)
        return replace(out, dims=tuple(dims))

    def _permute(self, node, f, x, result):  # noqa: ANN001
        nd = x.dim()
        args = [self._value(a) for a in node.args[1:]]
        kw = {k: self._value(v) for k, v in node.kwargs.items()}
        target = node.target
        name = target if isinstance(target, str) else target.__name__
        order = list(range(nd))
        if name == "permute":
            perm = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            perm = perm or kw.get("dims")
            order = [int(p) % nd for p in perm]
        elif name in ("transpose", "swapaxes"):
            a, b = (args + [kw.get("dim0"), kw.get("dim1")])[:2]
            a, b = int(a) % nd, int(b) % nd
            order[a], order[b] = order[b], order[a]
        elif name == "t":
            order = order[::-1]
        elif name == "movedim":
            src, dst = args[0], args[1]
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            moved = dict(zip([d % nd for d in dst], [s % nd for s in src]))
            rest = iter(i for i in range(nd) if i not in moved.values())
            order = [moved[i] if i in moved else next(rest) for i in range(nd)]
        return replace(f, dims=tuple(f.dims[i] for i in order))

    def _cat(self, node, inputs, result, stack):  # noqa: ANN001
        dim = self._dim_arg(node, 1) or 0
        if not stack:
            for f, x in inputs:
                if f.dims[dim % x.dim()] is not None:
                    raise self._unsupported(node, "concatenates along a spatial axis")
            return self._merge(node, inputs, result)
        nd = result.dim()
        dim %= nd
        shifted = [(replace(f, dims=f.dims[:dim] + (None,) + f.dims[dim:]), x.unsqueeze(dim))
                   for f, x in inputs]  # fmt: skip
        return self._merge(node, shifted, result)

    def _reduce(self, node, f, x, result):  # noqa: ANN001
        dim = self._dim_arg(node, 1)
        nd = x.dim()
        if dim is None:
            reduced = list(range(nd))
        else:
            reduced = [int(d) % nd for d in ([dim] if isinstance(dim, int) else dim)]
        keepdim = bool(
            self._value(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        )
        out = f
        for i in reduced:
            if f.dims[i] is not None:
                out = out.collapse(f.dims[i])
        dims = [None if i in reduced else a for i, a in enumerate(f.dims)]
        if not keepdim:
            dims = [a for i, a in enumerate(dims) if i not in reduced]
        return replace(out, dims=tuple(dims))

    def _split(self, node, f, x, result):  # noqa: ANN001
        dim = self._dim_arg(node, 2 if node.target in ("split", torch.split) or
                            getattr(node.target, "__name__", "") in ("split", "chunk", "tensor_split") else 1)  # fmt: skip
        if node.target in ("unbind", torch.unbind):
            dim = self._dim_arg(node, 1) or 0
            if f.dims[dim % x.dim()] is not None:
                raise self._unsupported(node, "unbinds a spatial axis")
            dims = f.dims[: dim % x.dim()] + f.dims[dim % x.dim() + 1 :]
            return tuple(replace(f, dims=dims) for _ in result)
        dim = 0 if dim is None else dim
        if f.dims[dim % x.dim()] is not None:
            raise self._unsupported(node, "splits along a spatial axis")
        return tuple(f for _ in result)

    def _along(self, node, f, x, result, dim):  # noqa: ANN001
        """An op that mixes one dim (linear: the last; softmax: ``dim``)."""
        d = dim % x.dim()
        if f.dims[d] is not None and x.shape[d] > 1:
            raise self._unsupported(
                node, f"mixes spatial tensor dim {d} (size {x.shape[d]}): not supported yet"
            )
        dims = list(f.dims)
        if isinstance(result, torch.Tensor) and result.dim() == len(dims):
            return replace(f, dims=tuple(dims))
        raise self._unsupported(node, "changes the number of dims")

    def _getitem(self, node, result):  # noqa: ANN001
        src, idx = node.args[0], node.args[1]
        f = self.fields.get(src) if isinstance(src, fx.Node) else None
        if f is None:
            return None
        if isinstance(f, (list, tuple)):
            return f[idx]
        x = self.env[src]
        if not isinstance(x, torch.Tensor):
            return None
        idx = self._value(idx)
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(isinstance(i, (torch.Tensor, list)) for i in idx):
            raise self._unsupported(node, "advanced (tensor) indexing")
        # expand Ellipsis
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        if Ellipsis in idx:
            k = idx.index(Ellipsis)
            idx = idx[:k] + (slice(None),) * (x.dim() - n_real) + idx[k + 1 :]
        idx = idx + (slice(None),) * (x.dim() - sum(1 for i in idx if i is not None))
        out, dims, src_dim = f, [], 0
        for i in idx:
            if i is None:
                dims.append(None)
                continue
            axis = f.dims[src_dim]
            n = x.shape[src_dim]
            if isinstance(i, int):
                if axis is not None:
                    out = out.window(axis, 1, 1, -(i % n), 1, 1)
            elif isinstance(i, slice):
                start, stop, step = i.indices(n)
                if axis is not None:
                    if step <= 0:
                        raise self._unsupported(node, "negative step on a spatial axis")
                    out = out.window(axis, 1, step, -start, 1, len(range(start, stop, step)))
                dims.append(axis)
            else:
                raise self._unsupported(node, f"index {i!r}")
            src_dim += 1
        return replace(out, dims=tuple(dims))


def _reshape_groups(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up runs of dims of two shapes with equal products (numpy's reshape grouping)."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        gi, gj = [], []
        pa = pb = 1
        if i < len(a):
            gi.append(i)
            pa *= a[i]
            i += 1
        if j < len(b):
            gj.append(j)
            pb *= b[j]
            j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif pb < pa and j < len(b):
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                return None
        # absorb trailing size-1 dims on both sides into this group
        while i < len(a) and a[i] == 1 and (j >= len(b) or b[j] != 1):
            gi.append(i)
            i += 1
        while j < len(b) and b[j] == 1 and (i >= len(a) or a[i] != 1):
            gj.append(j)
            j += 1
        groups.append((gi, gj))
    return groups


# --------------------------------------------------------------------------------------------
# Public entry points


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"input_shape must be a sequence of ints (C, *spatial), got {input_shape!r}"
        ) from exc
    if not 2 <= len(shape) <= 4 or any(v < 1 for v in shape):
        raise ValueError(
            f"input_shape {shape} is not (C, *spatial) with 1 to 3 positive spatial sizes "
            "(no batch dimension): e.g. (3, 224, 224) for images, (1, 16000) for signals, "
            "(1, 32, 64, 64) for volumes"
        )
    return shape


class _Done(Exception):
    """Stops the propagation once the requested layer's node has its field."""


def _propagate(
    model: nn.Module, input_shape: Sequence[int], stop_at: str | None = None, strict: bool = True
) -> dict[str, ReceptiveField]:
    shape = _check_input_shape(input_shape)
    traced = trace(model)
    target = traced.node(stop_at) if stop_at is not None else None
    prop = _Propagator(traced.graph_module, shape, stop_at=target)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = model_device(model)
    x = torch.zeros((1, *shape), dtype=dtype, device=device)
    with preserved(model, freeze=False), torch.no_grad():
        try:
            prop.run(x)
        except _Done:
            pass
        except (UnsupportedOpError, NotAlignedError, ValueError) as exc:
            # fx appends "While executing ..." to the message: keep ours, it names the op
            message = str(exc).split("\n\nWhile executing")[0]
            if strict or isinstance(exc, ValueError):
                raise type(exc)(message) from None
            warnings.warn(
                f"receptive fields stop at {message}. Layers after it are left out.",
                stacklevel=3,
            )
        except RuntimeError as exc:
            raise ValueError(
                f"the model rejects inputs of shape (N, {', '.join(map(str, shape))}): "
                f"{str(exc).splitlines()[0]} (input_shape is (C, *spatial) without the batch "
                "dimension, e.g. (3, 224, 224) for RGB images)"
            ) from exc
    out: dict[str, ReceptiveField] = {}
    for name, node in traced.outputs.items():
        f = prop.fields.get(node)
        if isinstance(f, _Field):
            out[name] = _to_value(f, shape[1:])
    return out


def receptive_fields(
    model: nn.Module, input_shape: Sequence[int], *, strict: bool = True
) -> dict[str, ReceptiveField]:
    """Receptive fields of every addressable layer, in execution order.

    Parameters
    ----------
    model
        Any traceable ``nn.Module`` (torch.fx); it is left exactly as given.
    input_shape
        ``(C, *spatial)`` without the batch dimension, e.g. ``(3, 224, 224)``.
    strict
        With False, an unsupported operation or unaligned merge ends the table with a warning
        naming it, instead of an error: the layers before it are returned.

    Returns
    -------
    dict
        ``{layer name: ReceptiveField}`` for :func:`featurelens.layer_names` ``(model)``.

    Raises
    ------
    TraceError
        The model cannot be traced with torch.fx (the message names the line).
    UnsupportedOpError
        An operation whose effect on the receptive field is unknown (named, with its line).
    NotAlignedError
        Branches with different effective strides merge.
    ValueError
        ``input_shape`` is not ``(C, *spatial)`` or the model rejects it.
    """
    return _propagate(model, input_shape, strict=strict)


def _to_value(f: _Field, spatial: tuple[int, ...]) -> ReceptiveField:
    return ReceptiveField(
        size=f.size,
        stride=f.stride,
        padding=f.padding,
        input_shape=tuple(spatial),
        output_shape=f.lengths,
        is_global=f.covers(spatial),
        aligned=f.aligned,
        channel_dim=next((i for i, d in enumerate(f.dims) if i >= 1 and d is None), 1),
        statistics=f.statistics,
        bounds=tuple(
            tuple((int(a), int(b)) if b >= a else (0, -1) for a, b in zip(fa, la))
            for fa, la in zip(f.first, f.last)
        ),
    )


def receptive_field(model: nn.Module, input_shape: Sequence[int], layer: str) -> ReceptiveField:
    """Receptive field of one layer (see :func:`receptive_fields`).

    Only the graph up to ``layer`` is analysed, so operations after it do not matter.
    """
    fields = _propagate(model, input_shape, stop_at=layer)
    if layer not in fields:
        raise ValueError(f"layer {layer!r} does not output a tensor with a receptive field")
    return fields[layer]


def try_receptive_field(
    model: nn.Module, input_shape: Sequence[int], layer: str
) -> tuple[ReceptiveField | None, str]:
    """The layer's receptive field, or ``(None, reason)`` when it cannot be computed.

    The one place that decides what "no analytic receptive field here" means: the model does
    not trace, an operation has no known field, branches do not align, or the model rejects
    ``input_shape``. Projections, figures and scans fall back on the whole input then and say
    ``reason``. An unknown layer name is not such a case: :class:`LayerError` propagates.

    Returns
    -------
    tuple
        ``(field, "")`` or ``(None, "TypeName: message")``.
    """
    try:
        return receptive_field(model, input_shape, layer), ""
    except (ReceptiveFieldError, ValueError) as exc:
        if isinstance(exc, LayerError):
            raise
        return None, f"{type(exc).__name__}: {exc}"


def receptive_field_table(fields: dict[str, ReceptiveField]) -> str:
    """A plain-text table: layer, output shape, size, stride, padding, flags."""
    rows = [("layer", "output", "size", "stride", "padding", "flags")]
    for name, rf in fields.items():
        flags = ",".join(
            f for f, on in (("global", rf.is_global), ("unaligned", not rf.aligned)) if on
        )

        def fmt(t: tuple[int, ...]) -> str:
            return "x".join(map(str, t))

        rows.append(
            (name, fmt(rf.output_shape), fmt(rf.size), fmt(rf.stride), fmt(rf.padding), flags)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
