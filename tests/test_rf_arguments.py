"""Receptive fields read an op's arguments the same way whatever form the call takes.

Each op is written in its method and function forms, with its arguments positional and by
keyword (and NumPy's ``axis``/``keepdims`` spellings, which PyTorch accepts): every form must
give the same field, checked against the independent gradient-support verifier at every
location, or against literal values where the verifier cannot see through the op (softmax,
normalisation and variance over channels have a zero gradient once the verifier makes all
channels equal).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featurelens as fl

SHAPE = (1, 6, 7)  # (C, H, W): non-square, so swapped axes show


class Around(nn.Module):
    """``out(op(conv(x)))``: a 3x3 convolution (padding 1), then the form under test.

    ``op(m, y)`` may use ``m.k`` (a 1x3 convolution, to make a swap of H and W visible),
    ``m.b`` (a second 3x3 convolution: a wider branch to merge) and ``m.pool`` (max pooling
    that also returns indices) and the buffers ``m.mean``/``m.var`` (running statistics).
    """

    def __init__(self, op: Callable[[Around, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.k = nn.Conv2d(4, 4, (1, 3))
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.out = nn.Identity()
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.op(self, self.conv(x)))


def field_of(op: Callable) -> fl.ReceptiveField:
    return fl.receptive_field(Around(op).eval(), SHAPE, "out")


def assert_matches_empirical(op: Callable) -> fl.ReceptiveField:
    model = Around(op).eval()
    rf = fl.receptive_field(model, SHAPE, "out")
    for loc in itertools.product(*(range(n) for n in rf.output_shape)):
        emp = fl.empirical_receptive_field(model, SHAPE, "out", loc)
        assert rf.region(loc) == emp.region, (loc, rf)
    return rf


def exact(rf: fl.ReceptiveField) -> tuple:
    """Everything a field says, bounds of every location included."""
    return (rf.size, rf.stride, rf.padding, rf.output_shape, rf.is_global, rf.aligned,
            rf.bounds, rf.channel_dim, rf.statistics)  # fmt: skip


def assert_forms_agree(forms: dict[str, Callable], check: Callable) -> None:
    """Every form gives exactly the same field (bounds of every location included) as the
    first, and ``check`` (the verifier, or :func:`field_of` with literal values asserted by
    the caller) holds on the first: so on every form."""
    first_name, first_op = next(iter(forms.items()))
    first = check(first_op)
    for name, op in forms.items():
        assert exact(field_of(op)) == exact(first), (name, first_name)


CONV = ((3, 3), (1, 1), (1, 1), (6, 7))  # the 3x3 convolution's own geometry


def geometry(rf: fl.ReceptiveField) -> tuple:
    return rf.size, rf.stride, rf.padding, rf.output_shape


# --- splits: the case first ----------------------------------------------------------


def test_chunk_method_with_positional_dim():
    """``y.chunk(2, 1)``: for a method fx records the tensor as args[0], so the dim is
    args[2], not args[1] (which is the number of chunks: it was read as "split dim 2")."""
    positional = assert_matches_empirical(lambda m, y: y.chunk(2, 1)[0])
    keyword = assert_matches_empirical(lambda m, y: y.chunk(2, dim=1)[0])
    assert exact(positional) == exact(keyword)
    assert geometry(positional) == CONV
    with pytest.raises(fl.UnsupportedOpError, match=r"Tensor\.chunk\(\).*splits along a spatial"):
        field_of(lambda m, y: y.chunk(2, 2)[0])


SPLITS = {
    "chunk method, dim positional": lambda m, y: y.chunk(2, 1)[0],
    "chunk method, dim keyword": lambda m, y: y.chunk(2, dim=1)[1],
    "chunk method, numpy axis": lambda m, y: y.chunk(2, axis=1)[0],
    "chunk function, dim positional": lambda m, y: torch.chunk(y, 2, 1)[0],
    "chunk function, dim keyword": lambda m, y: torch.chunk(y, 2, dim=1)[1],
    "split method, dim positional": lambda m, y: y.split(1, 1)[1],
    "split method, dim keyword": lambda m, y: y.split(1, dim=1)[1],
    "split function, sections positional": lambda m, y: torch.split(y, [1, 3], 1)[1],
    "tensor_split method, dim positional": lambda m, y: y.tensor_split(2, 1)[0],
    "tensor_split function, dim keyword": lambda m, y: torch.tensor_split(y, 2, dim=1)[0],
    "unbind method, dim positional": lambda m, y: y.unbind(1)[2].unsqueeze(1),
    "unbind function, dim keyword": lambda m, y: torch.unbind(y, dim=1)[2].unsqueeze(1),
}


def test_split_forms_agree_with_the_verifier():
    assert_forms_agree(SPLITS, assert_matches_empirical)
    assert geometry(field_of(SPLITS["chunk method, dim positional"])) == CONV


@pytest.mark.parametrize(
    "op",
    [
        lambda m, y: y.chunk(2, 2)[0],
        lambda m, y: y.chunk(2, dim=3)[0],
        lambda m, y: y.chunk(2, axis=-1)[0],
        lambda m, y: torch.chunk(y, 2, 2)[0],
        lambda m, y: y.split(3, 2)[0],
        lambda m, y: torch.split(y, 3, dim=3)[0],
        lambda m, y: y.tensor_split(2, 3)[0],
        lambda m, y: torch.tensor_split(y, 2, 2)[0],
    ],
)
def test_split_along_a_spatial_axis_is_refused(op):
    with pytest.raises(fl.UnsupportedOpError, match="splits along a spatial axis"):
        field_of(op)


@pytest.mark.parametrize(
    "op", [lambda m, y: y.unbind(2)[0].unsqueeze(2), lambda m, y: torch.unbind(y, dim=3)[0]]
)
def test_unbind_of_a_spatial_axis_is_refused(op):
    with pytest.raises(fl.UnsupportedOpError, match="unbinds a spatial axis"):
        field_of(op)


# --- layout: transpose, permute, movedim ----------------------------------------------------

LAYOUTS = {  # swap H and W, slide the 1x3 kernel (now along H), swap back
    "transpose method, positional": lambda m, y: m.k(y.transpose(2, 3)).transpose(2, 3),
    "transpose method, dim1 keyword": lambda m, y: m.k(y.transpose(2, dim1=3)).transpose(3, 2),
    "transpose method, keywords": lambda m, y: m.k(y.transpose(dim0=2, dim1=3)).transpose(2, 3),
    "transpose function": lambda m, y: m.k(torch.transpose(y, 2, 3)).transpose(-1, -2),
    "swapaxes function, keywords": lambda m, y: m.k(torch.swapaxes(y, axis0=3, axis1=2)).swapaxes(
        2, 3
    ),
    "permute method, varargs": lambda m, y: m.k(y.permute(0, 1, 3, 2)).permute(0, 1, 3, 2),
    "permute method, one tuple": lambda m, y: m.k(y.permute((0, 1, 3, 2))).permute([0, 1, 3, 2]),
    "permute method, keyword": lambda m, y: m.k(y.permute(dims=(0, 1, 3, 2))).permute(0, 1, 3, 2),
    "permute function": lambda m, y: m.k(torch.permute(y, (0, 1, -1, -2))).permute(0, 1, 3, 2),
    "movedim method, positional": lambda m, y: m.k(y.movedim(2, 3)).movedim(3, 2),
    "movedim method, keywords": lambda m, y: m.k(y.movedim(source=2, destination=3)).movedim(3, 2),
    "movedim function, lists": lambda m, y: m.k(torch.movedim(y, [2], [3])).movedim(3, 2),
}


def test_layout_forms_agree_with_the_verifier():
    assert_forms_agree(LAYOUTS, assert_matches_empirical)
    # the 1x3 kernel slid along H: rows 3 + 2 = 5 (4 locations), columns the 3x3 alone
    assert geometry(field_of(LAYOUTS["transpose method, positional"])) == (
        (5, 3), (1, 1), (1, 1), (4, 7))  # fmt: skip
    # control: without the swap the kernel slides along W
    assert geometry(field_of(lambda m, y: m.k(y))) == ((3, 5), (1, 1), (1, 1), (6, 5))


# --- reductions ------------------------------------------------------------------------------

REDUCTIONS = {  # reduce W (dim 3), keep the dim: H stays local, every location sees all of W
    "sum method, dim and keepdim positional": lambda m, y: y.sum(3, True),
    "sum method, keywords": lambda m, y: y.sum(dim=3, keepdim=True),
    "sum method, numpy keywords": lambda m, y: y.sum(axis=3, keepdims=True),
    "mean function, positional": lambda m, y: torch.mean(y, 3, True),
    "mean function, tuple dim": lambda m, y: torch.mean(y, (3,), keepdim=True),
    "mean method, no keepdim": lambda m, y: y.mean(3).unsqueeze(3),
    "mean function, dim keyword, no keepdim": lambda m, y: torch.mean(y, dim=-1).unsqueeze(-1),
    "amax method, positional": lambda m, y: y.amax(3, True),
    "amax function, keywords": lambda m, y: torch.amax(y, dim=-1, keepdim=True),
    "amin function, positional": lambda m, y: torch.amin(y, 3, True),
    "logsumexp method, positional": lambda m, y: y.logsumexp(3, True),
}


def test_reduction_forms_agree_with_the_verifier():
    assert_forms_agree(REDUCTIONS, assert_matches_empirical)
    rf = field_of(REDUCTIONS["sum method, keywords"])
    # W: the 3x3's window spread over all 7 columns (size 3 + 6, one location)
    assert geometry(rf) == ((3, 9), (1, 1), (1, 1), (6, 1))
    assert rf.region((2, 0)) == (slice(1, 4), slice(0, 7))


VARIANCES = {  # std/var: (dim, unbiased, keepdim) positional in the old overload
    "mean, for reference": lambda m, y: y.mean(3, True),
    "std method, dim, unbiased, keepdim positional": lambda m, y: y.std(3, True, True),
    "std method, keywords": lambda m, y: y.std(dim=3, keepdim=True),
    "std method, dim and unbiased positional": lambda m, y: y.std(3, True).unsqueeze(3),
    "var function, correction keyword": lambda m, y: torch.var(y, 3, correction=0, keepdim=True),
    "var method, unbiased positional": lambda m, y: y.var(3, False, True),
}


def test_variance_forms_agree_with_the_mean():
    assert_forms_agree(VARIANCES, field_of)
    assert geometry(field_of(VARIANCES["std method, keywords"])) == ((3, 9), (1, 1), (1, 1), (6, 1))


def test_std_of_everything_is_a_global_gate():
    """``y.std(False)``: the ``unbiased`` overload reduces every dim (a 0-dim result)."""
    for op in (lambda m, y: y * y.std(False), lambda m, y: y * torch.var(y)):
        rf = field_of(op)
        assert rf.is_global and rf.output_shape == (6, 7)
        assert rf.region((0, 0)) == (slice(0, 6), slice(0, 7))


def test_reduction_with_empty_dims_reduces_everything():
    """``amax(dim=())`` reduces every dim, as PyTorch does (not none)."""
    rf = field_of(lambda m, y: y * torch.amax(y, dim=()))
    assert rf.is_global and rf.output_shape == (6, 7)


# --- ops over channels: softmax, normalize ---------------------------------------------------

CHANNEL_MIXERS = {  # mix the channels only: the convolution's field, unchanged
    "softmax method, dim positional": lambda m, y: y.softmax(1),
    "softmax method, dim keyword": lambda m, y: y.softmax(dim=1),
    "softmax function, dim positional": lambda m, y: F.softmax(y, 1),
    "log_softmax function, dim keyword": lambda m, y: F.log_softmax(y, dim=1),
    "log_softmax method, dim positional": lambda m, y: y.log_softmax(1),
    "normalize, p and dim positional": lambda m, y: F.normalize(y, 2.0, 1),
    "normalize, dim keyword": lambda m, y: F.normalize(y, dim=1),
    "normalize, default dim (channels)": lambda m, y: F.normalize(y),
}


def test_channel_mixers_keep_the_field():
    assert_forms_agree(CHANNEL_MIXERS, field_of)
    rf = field_of(CHANNEL_MIXERS["softmax method, dim positional"])
    assert geometry(rf) == CONV
    assert rf.region((0, 6)) == (slice(0, 2), slice(5, 7))


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
def test_softmax_without_dim_uses_pytorchs_implicit_dim():
    """F.softmax(y) with no dim: PyTorch's legacy choice, dim 1 for a 4-dim tensor."""
    assert exact(field_of(lambda m, y: F.softmax(y))) == exact(field_of(lambda m, y: y))


@pytest.mark.parametrize(
    "op",
    [
        lambda m, y: y.softmax(2),
        lambda m, y: y.softmax(dim=3),
        lambda m, y: F.softmax(y, 2),
        lambda m, y: F.log_softmax(y, dim=-1),
        lambda m, y: F.normalize(y, 2.0, 2),
        lambda m, y: F.normalize(y, p=2.0, dim=-1),
    ],
)
def test_mixing_a_spatial_dim_is_refused(op):
    with pytest.raises(fl.UnsupportedOpError, match="mixes spatial tensor dim"):
        field_of(op)


# --- padding ---------------------------------------------------------------------------------

PADS = {  # W: 1 left, 2 right; H: none on top, 3 below
    "F.pad, positional": lambda m, y: F.pad(y, (1, 2, 0, 3)),
    "F.pad, pad keyword": lambda m, y: F.pad(y, pad=(1, 2, 0, 3)),
    "F.pad, mode and value positional": lambda m, y: F.pad(y, (1, 2, 0, 3), "constant", 0.5),
    "F.pad, value keyword": lambda m, y: F.pad(y, [1, 2, 0, 3], value=0.5),
    "constant_pad_nd, value positional": lambda m, y: torch.constant_pad_nd(y, (1, 2, 0, 3), 0.5),
}


def test_padding_forms_agree_with_the_verifier():
    assert_forms_agree(PADS, assert_matches_empirical)
    rf = field_of(PADS["F.pad, positional"])
    assert geometry(rf) == ((3, 3), (1, 1), (1, 2), (9, 10))
    assert rf.region((8, 0)) == (slice(0, 0), slice(0, 0))  # sees only padding


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_mode_forms_agree_with_the_verifier(mode):
    """Reflected, replicated and wrapped borders (modules and convolutions with a
    padding_mode are in tests/test_rf_upsampling.py)."""
    forms = {
        "F.pad, mode positional": lambda m, y: F.pad(y, (1, 2, 0, 1), mode),
        "F.pad, keywords": lambda m, y: F.pad(y, pad=[1, 2, 0, 1], mode=mode),
        "F.pad, value too": lambda m, y: F.pad(y, (1, 2, 0, 1), mode, None),
    }
    assert_forms_agree(forms, assert_matches_empirical)


# --- concatenation ---------------------------------------------------------------------------

CATS = {  # y (3x3) beside m.b(y) (5x5): the union, 5x5
    "cat, dim positional": lambda m, y: torch.cat([y, m.b(y)], 1),
    "cat, dim keyword": lambda m, y: torch.cat([y, m.b(y)], dim=1),
    "cat, numpy axis": lambda m, y: torch.cat((y, m.b(y)), axis=1),
    "concat, dim positional": lambda m, y: torch.concat([y, m.b(y)], 1),
    "concatenate, axis keyword": lambda m, y: torch.concatenate([y, m.b(y)], axis=1),
    "stack, dim positional": lambda m, y: torch.stack([y, m.b(y)], 2).flatten(1, 2),
    "stack, dim keyword": lambda m, y: torch.stack([y, m.b(y)], dim=1).flatten(1, 2),
}


def test_concatenation_forms_agree_with_the_verifier():
    assert_forms_agree(CATS, assert_matches_empirical)
    assert geometry(field_of(CATS["cat, dim positional"])) == ((5, 5), (1, 1), (2, 2), (6, 7))


@pytest.mark.parametrize(
    "op",
    [
        lambda m, y: torch.cat([y, y], 2),
        lambda m, y: torch.cat([y, y], dim=3),
        lambda m, y: torch.cat([y, y], axis=-1),
        lambda m, y: torch.concatenate([y, y], axis=2),
    ],
)
def test_concatenating_a_spatial_axis_is_refused(op):
    with pytest.raises(fl.UnsupportedOpError, match="concatenates along a spatial axis"):
        field_of(op)


# --- pooling that also returns indices -------------------------------------------------------

POOLS = {
    "max_pool2d, positional": lambda m, y: F.max_pool2d(y, 2, 2),
    "max_pool2d, keywords": lambda m, y: F.max_pool2d(y, kernel_size=2, stride=2),
    "max_pool2d, return_indices": lambda m, y: F.max_pool2d(y, 2, return_indices=True)[0],
    "max_pool2d_with_indices": lambda m, y: F.max_pool2d_with_indices(y, 2)[0],
    "MaxPool2d module, return_indices": lambda m, y: m.pool(y)[0],
}


def test_pooling_with_indices_agrees_with_the_verifier():
    assert_forms_agree(POOLS, assert_matches_empirical)
    assert geometry(field_of(POOLS["max_pool2d, positional"])) == ((4, 4), (2, 2), (1, 1), (3, 3))


def test_adaptive_pooling_with_indices_agrees_with_the_verifier():
    rf = assert_matches_empirical(
        lambda m, y: F.adaptive_max_pool2d(y, (3, 1), return_indices=True)[0]
    )
    assert exact(rf) == exact(field_of(lambda m, y: F.adaptive_avg_pool2d(y, (3, 1))))
    assert geometry(rf) == ((4, 9), (2, 1), (1, 1), (3, 1))


# --- indexing with sizes read from the tensor ------------------------------------------------


def test_crop_with_bounds_from_the_shape():
    """Slice bounds computed from ``y.shape`` are graph nodes inside the slice objects."""
    rf = assert_matches_empirical(lambda m, y: y[:, :, : y.shape[2] - 1, y.size(3) - 5 :])
    assert exact(rf) == exact(field_of(lambda m, y: y[:, :, :5, 2:]))
    assert geometry(rf) == ((3, 3), (1, 1), (1, -1), (5, 5))


# --- normalisation statistics, positional and keyword ----------------------------------------


def test_norm_statistics_read_positional_arguments():
    """The flag saying whether a norm uses the input's statistics, in either form."""
    uses = {
        "instance_norm, use_input_stats positional": (
            lambda m, y: F.instance_norm(y, m.mean, m.var, None, None, True)),
        "instance_norm, use_input_stats keyword": (
            lambda m, y: F.instance_norm(y, m.mean, m.var, use_input_stats=True)),
        "batch_norm, training positional": (
            lambda m, y: F.batch_norm(y, m.mean, m.var, None, None, True)),
        "batch_norm, training keyword": (
            lambda m, y: F.batch_norm(y, m.mean, m.var, training=True)),
        "layer_norm over H and W, positional": lambda m, y: F.layer_norm(y, (6, 7)),
        "layer_norm over H and W, keyword": lambda m, y: F.layer_norm(y, normalized_shape=[6, 7]),
    }  # fmt: skip
    running = {
        "instance_norm, running statistics positional": (
            lambda m, y: F.instance_norm(y, m.mean, m.var, None, None, False)),
        "instance_norm, running statistics keyword": (
            lambda m, y: F.instance_norm(y, m.mean, m.var, use_input_stats=False)),
        "batch_norm, running statistics positional": (
            lambda m, y: F.batch_norm(y, m.mean, m.var, None, None, False)),
        "layer_norm over channels, channels-last": (
            lambda m, y: F.layer_norm(y.permute(0, 2, 3, 1), (4,)).permute(0, 3, 1, 2)),
    }  # fmt: skip
    for name, op in uses.items():
        rf = field_of(op)
        assert geometry(rf) == CONV, name
        assert len(rf.statistics) == 1, name
        assert ("batch statistics" in rf.statistics[0]) == ("batch_norm" in name), name
    for name, op in running.items():
        rf = field_of(op)
        assert geometry(rf) == CONV and rf.statistics == (), name
