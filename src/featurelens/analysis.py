"""What a model's structure determines, computed once and kept while the structure holds.

A projection needs, per layer, two things that depend only on the model's *structure* and the
inputs' shape, never on the weights or the input values: the layer's receptive field, and its
layout (the output shape, and what a crop would change on the way to it). Computing them costs
a trace or a forward pass; an interactive caller (the explorer, a notebook) asks again and again
for the same layer. :class:`AnalysisCache` keeps them per model, weakly (a model that is
dropped takes its entries with it), under a key that says exactly what they depend on:

* the model's **structural signature** (:func:`structure_signature`): for every submodule, its
  dotted name, type and identity, its hyper-parameters (every public attribute that is not a
  tensor's value: ``stride``, ``padding``, ``inplace``, ``track_running_stats``, an instance
  ``forward`` attribute...), the names, shapes, dtypes and devices of its parameters and
  buffers, and its forward hooks. A module added, replaced, re-wrapped or reconfigured changes
  it, and every entry of the model is dropped;
* the **input shape** ``(C, *spatial)`` (with the inputs' dtype and device for the layout, which
  comes from a real forward);
* the **layer**.

Weights are not in the key: they change no geometry, and nothing cached here is an activation.
Values are immutable (frozen dataclasses, tuples), so callers share them safely.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["ANALYSES", "AnalysisCache", "LayerLayout", "structure_signature"]

_V = TypeVar("_V")
_SIMPLE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _value_signature(value: Any) -> Hashable:
    """A hashable stand-in for one attribute: itself when simple, else its type and identity."""
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value):
        return (type(value).__name__, tuple(value))
    if isinstance(value, torch.Tensor):  # a plain tensor attribute: its shape, not its values
        return ("tensor", id(value), tuple(value.shape), value.dtype, value.device)
    return (type(value).__qualname__, id(value))


def _tensors_signature(tensors: Mapping[str, torch.Tensor | None]) -> Hashable:
    return tuple(
        (k, None if t is None else (tuple(t.shape), t.dtype, t.device)) for k, t in tensors.items()
    )


def _module_signature(module: nn.Module) -> Hashable:
    """One submodule's part of :func:`structure_signature` (its children excluded)."""
    attributes = tuple(
        (k, _value_signature(v))
        for k, v in sorted(vars(module).items())
        if not k.startswith("_") and k != "training"
    )
    hooks = tuple(
        tuple(getattr(module, d).keys())
        for d in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks")
    )
    return (
        type(module),
        id(module),
        attributes,
        _tensors_signature(module._parameters),
        _tensors_signature(module._buffers),
        hooks,
    )


def structure_signature(model: nn.Module) -> tuple[Hashable, ...]:
    """What the model's geometry and layouts depend on, as one hashable value.

    Parameters
    ----------
    model
        Any ``nn.Module``.

    Returns
    -------
    tuple
        One entry per ``named_modules()`` item: ``(name, type, id, public attributes,
        parameter and buffer shapes/dtypes/devices, forward/backward hook ids)``. Equal
        signatures mean the same modules, configured alike, wired by the same code; the weights'
        values are left out on purpose.
    """
    return tuple((name, _module_signature(m)) for name, m in model.named_modules())


@dataclass(frozen=True)
class LayerLayout:
    """A layer's output as a forward of full-size inputs measured it.

    Attributes
    ----------
    shape
        The output of one example without the batch axis: ``(K, *spatial_l)``.
    batch_statistics
        A BatchNorm on the way uses batch statistics (rows of a pass would mix).
    pools
        Adaptive poolings to a fixed size larger than 1 on the way, as shown in messages.
    resampled
        ``F.interpolate`` runs on the way.
    """

    shape: tuple[int, ...]
    batch_statistics: bool
    pools: tuple[str, ...]
    resampled: bool


class AnalysisCache:
    """Per-model results keyed by what they depend on; dropped when the structure changes.

    Parameters
    ----------
    max_entries
        Most results kept per model (the oldest go first): bounds memory for a caller that
        asks for many input shapes.

    Attributes
    ----------
    computed
        How many results were computed (cache misses): what a test counts.
    """

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = int(max_entries)
        self._models: weakref.WeakKeyDictionary[nn.Module, tuple[Hashable, dict[Hashable, Any]]]
        self._models = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.computed = 0

    def get(
        self,
        model: nn.Module,
        signature: Hashable,
        key: Hashable,
        compute: Callable[[], _V],
    ) -> _V:
        """The value kept for ``(model, signature, key)``, or ``compute()``'s, then kept.

        Parameters
        ----------
        model
            The model the value belongs to (weakly referenced).
        signature
            :func:`structure_signature` ``(model)``, read by the caller before it installed
            any hook of its own (a call reads it once and uses it for all its look-ups).
        key
            What else the value depends on (a kind, the input shape, the layer...).
        compute
            Called without the lock held; an exception propagates and nothing is kept.

        Returns
        -------
        Any
            The value.
        """
        with self._lock:
            entry = self._models.get(model)
            if entry is not None and entry[0] == signature and key in entry[1]:
                return entry[1][key]
            self.computed += 1
        value = compute()
        with self._lock:
            entry = self._models.get(model)
            if entry is None or entry[0] != signature:  # another structure: its values go
                entry = (signature, {})
                self._models[model] = entry
            values = entry[1]
            values[key] = value
            while len(values) > self.max_entries:
                del values[next(iter(values))]
        return value

    def clear(self) -> None:
        """Forget every model's results."""
        with self._lock:
            self._models.clear()


ANALYSES = AnalysisCache()
"""The process's cache of receptive fields and layer layouts, shared by every projection."""
