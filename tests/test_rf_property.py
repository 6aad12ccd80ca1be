"""Property tests: on random conv/pool stacks with branches (1-D, 2-D, 3-D), the analytic
region equals the bounding box of the gradient support at every location."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import featurelens as fl

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_MAX = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVG = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


class Residual(nn.Module):
    """x + conv(x) with 'same' geometry (odd kernel, dilation)."""

    def __init__(self, d: int, k: tuple[int, ...], dil: int) -> None:
        super().__init__()
        self.conv = _CONV[d](2, 2, k, padding=tuple(dil * (ki - 1) // 2 for ki in k), dilation=dil)

    def forward(self, x):
        return x + self.conv(x)


class Shifted(nn.Module):
    """Concatenate a centred branch and one shifted by asymmetric F.pad: misaligned."""

    def __init__(self, d: int, left: int) -> None:
        super().__init__()
        self.left = left
        self.a = _CONV[d](2, 1, 3, padding=1)
        self.b = _CONV[d](2, 1, 3)

    def forward(self, x):
        d = x.dim() - 2
        pad = [self.left, 2 - self.left] * d
        return torch.cat([self.a(x), self.b(F.pad(x, pad))], dim=1)


@st.composite
def stacks(draw, d: int):
    """A list of (name, module) for a random stack on 2 channels."""
    ops: list[nn.Module] = [_CONV[d](1, 2, 1)]
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "max", "avg", "residual", "shifted"]))
        k = tuple(draw(st.integers(1, 4)) for _ in range(d))
        s = tuple(draw(st.integers(1, 3)) for _ in range(d))
        if kind == "conv":
            pad = tuple(draw(st.integers(0, ki)) for ki in k)
            dil = draw(st.integers(1, 2))
            ops.append(_CONV[d](2, 2, k, stride=s, padding=pad, dilation=dil))
        elif kind == "max":
            pad = tuple(draw(st.integers(0, ki // 2)) for ki in k)
            ops.append(_MAX[d](k, s, pad, dilation=draw(st.integers(1, 2)),
                               ceil_mode=draw(st.booleans())))  # fmt: skip
        elif kind == "avg":
            pad = tuple(draw(st.integers(0, ki // 2)) for ki in k)
            ops.append(_AVG[d](k, s, pad, ceil_mode=draw(st.booleans())))
        elif kind == "residual":
            k = tuple(draw(st.sampled_from([1, 3, 5])) for _ in range(d))
            ops.append(Residual(d, k, draw(st.integers(1, 2))))
        else:
            ops.append(Shifted(d, draw(st.integers(0, 2))))
    return ops


_SIZES = {1: (8, 32), 2: (5, 11), 3: (4, 6)}


def _check(d: int, ops: list[nn.Module], data) -> None:
    model = nn.Sequential(*ops).eval()
    lo, hi = _SIZES[d]
    shape = (1, *(data.draw(st.integers(lo, hi)) for _ in range(d)))
    try:
        rfs = fl.receptive_fields(model, shape)
    except ValueError:
        assume(False)  # the stack shrinks the input below a kernel: not a valid model
    last = list(rfs)[-1]
    for layer in [last]:
        rf = rfs[layer]
        for loc in itertools.product(*(range(n) for n in rf.output_shape)):
            emp = fl.empirical_receptive_field(model, shape, layer, loc)
            assert rf.region(loc) == emp.region, (layer, loc, rf, model)
            if emp.region[0].stop > emp.region[0].start:
                # the unclipped interval contains the exact region
                for (first, last_), sl in zip(rf.interval(loc), emp.region):
                    assert first <= sl.start and sl.stop - 1 <= last_


_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=True,
)


@pytest.mark.parametrize("d", [1, 2, 3])
@_SETTINGS
@given(data=st.data())
def test_analytic_equals_empirical_on_random_stacks(d, data):
    _check(d, data.draw(stacks(d)), data)
