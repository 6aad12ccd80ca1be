"""Fingerprints: ``sha256:<hex>`` strings that tell a model, a dataset or a file from another.

An atlas records the fingerprint of the model and of the data it was scanned from; a resumed
scan and a rebuilt model are checked against them. This module sits at the bottom of
featurelens: it imports only :mod:`featurelens.data` (the one rule for loading an item), so
that ``specs``, ``atlas`` and ``scan`` can all use it without import cycles.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch
from torch import nn

from featurelens.data import Guarded, SizedDataset

__all__ = ["data_fingerprint", "hash_tensor", "model_fingerprint", "sha256_hex"]


class Hasher(Protocol):
    """What :func:`hash_tensor` feeds: a ``hashlib`` object (``update(bytes)``)."""

    def update(self, data: bytes | memoryview, /) -> None: ...


def hash_tensor(h: Hasher, t: torch.Tensor) -> None:
    """Feed ``t``'s dtype, shape and bytes to the hash object ``h``.

    Parameters
    ----------
    h
        A ``hashlib`` object (``hashlib.sha256()``).
    t
        Any tensor, on any device (copied to the CPU when needed).
    """
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # a memoryview: no copy


def model_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` of every parameter and buffer (names, dtypes, shapes and values).

    Hashing reads every weight (about 0.5 s per 100M parameters on a CPU core). It is not
    cached: writes through ``.data`` do not bump tensor version counters, so no cheap key
    tells a modified model from the one hashed before. A scan hashes its model once.

    Parameters
    ----------
    model
        Any module; lazy (uninitialized) parameters and buffers are hashed as such.

    Returns
    -------
    str
        ``"sha256:"`` and 64 hex digits, over ``state_dict`` order.
    """
    state = model.state_dict(keep_vars=True)
    uninitialized = nn.parameter.UninitializedParameter | nn.parameter.UninitializedBuffer
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        if isinstance(t, uninitialized):
            h.update(b"uninitialized")
            continue
        hash_tensor(h, t)
    return "sha256:" + h.hexdigest()


def data_fingerprint(
    data: SizedDataset | torch.Tensor, size: int
) -> tuple[str, tuple[int, ...] | None]:
    """``sha256:<hex>`` identifying the data, and the shape of one example (None if unknown).

    A tensor is hashed whole. A dataset is hashed by its length and the items at a few fixed
    indices (first, middle, last), loaded through :class:`featurelens.data.Guarded` as a scan
    loads them: an item that fails to load is hashed as skipped. Cheap, and enough to tell a
    resumed scan that it was handed other data of the same size.

    Parameters
    ----------
    data
        A dataset or a tensor (N, C, *spatial).
    size
        ``len(data)`` (at least 1).

    Returns
    -------
    tuple[str, tuple[int, ...] | None]
        The fingerprint, and ``(C, *spatial)`` of the first sampled item that is a tensor.
    """
    h = hashlib.sha256()
    if isinstance(data, torch.Tensor):
        h.update(b"tensor")
        hash_tensor(h, data)
        return "sha256:" + h.hexdigest(), tuple(int(v) for v in data.shape[1:])
    h.update(f"dataset of {size}".encode())
    guarded = Guarded(data)
    shape = None
    for index in sorted({0, size // 2, size - 1}):
        loaded = guarded[index]
        h.update(f"|{index}:".encode())
        item = loaded.item
        x = item[0] if isinstance(item, tuple | list) and item else item
        if loaded.error is not None:
            h.update(b"skipped")
        elif isinstance(x, torch.Tensor):
            hash_tensor(h, x)
            shape = shape or tuple(int(v) for v in x.shape)
        else:  # the scan reports non-tensor items with a clear DataError
            h.update(type(x).__name__.encode())
    return "sha256:" + h.hexdigest(), shape


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data`` as 64 hex digits (how an atlas names and checks its array file).

    Parameters
    ----------
    data
        A file's whole content.

    Returns
    -------
    str
        64 lowercase hex digits, no prefix.
    """
    return hashlib.sha256(data).hexdigest()
