"""featurelens.visualize: regularised activation maximisation on the receptive-field crop.

References, independent of the code under test: the plain model's forward on the full input
(the crop's pixels pasted in, the rest anything), random inputs of the value range, a scan's
top-1 dataset example, and torch-lucent (Olah et al.'s own parameterisation, on the full
image) when it is installed.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_unchanged, snapshot
from featurelens import (
    REGULARIZERS,
    CropWarning,
    DeadUnitWarning,
    NonFiniteError,
    UsageError,
    ValueRange,
    Visualization,
    scan,
    visualize,
)
from featurelens.demo import mnist_cnn
from featurelens.errors import ChannelError
from featurelens.visualize import DEFAULT_REGULARIZERS, VisualizationCache

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def rgb_net() -> nn.Module:
    """Three conv blocks on RGB inputs (non-square kernels, a stride-2 conv, a pool)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, (3, 5), padding=(1, 2)),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1),
    ).eval()


def value_at(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's output on ``x``, by a plain forward hook (no featurelens code)."""
    out = {}
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, a, y: out.setdefault("y", y.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return out["y"]


def unit_values(model, v: Visualization, x: torch.Tensor) -> torch.Tensor:
    """Each row's unit (v.channels[i] at v.location) on the full inputs ``x`` ``(B, ...)``."""
    y = value_at(model, v.layer, x)
    rows = torch.arange(len(v.channels))
    return y[(rows, torch.tensor(v.channels), *[torch.tensor(u) for u in v.location])]


def quiet(**kwargs):
    return {"progress": False, **kwargs}


# --------------------------------------------------------------------------------------------
# The canvas is the receptive field, exactly


@pytest.mark.parametrize(
    ("make", "shape", "layer", "location"),
    [
        (lambda: mnist_cnn().double(), (1, 28, 28), "features.conv3", (3, 3)),
        (lambda: mnist_cnn().double(), (1, 28, 28), "features.relu2", (0, 6)),  # a border unit
        (lambda: rgb_net().double(), (3, 40, 36), "3", (4, 7)),
        (lambda: rgb_net().double(), (3, 40, 36), "5", None),  # the centre
    ],
)
def test_the_crop_gives_the_units_value_on_any_full_input(make, shape, layer, location) -> None:
    model = make()
    v = visualize(model, layer, [0, 2, 5], location, input_shape=shape, steps=6, **quiet())
    assert v.cropped and not v.fallback
    assert v.images.dtype == torch.float64
    # the crop's pixels in the middle of the range, in random inputs: the same value
    g = torch.Generator().manual_seed(1)
    noise = torch.rand((len(v.channels), *shape), generator=g, dtype=torch.float64)
    for full in (v.full(), v.full(noise)):
        torch.testing.assert_close(unit_values(model, v, full), v.activations, rtol=0, atol=1e-12)


def test_the_crop_holds_the_field_and_is_much_smaller_than_the_input() -> None:
    model = mnist_cnn()
    v = visualize(model, "features.conv3", 0, (3, 3), input_shape=(1, 28, 28), steps=2, **quiet())
    from featurelens import receptive_field

    rf = receptive_field(model, (1, 28, 28), "features.conv3")
    region = rf.region((3, 3))
    for sl, a, n in zip(region, v.start, v.size):
        assert a <= sl.start and sl.stop <= a + n
    assert np.prod(v.size) * 1.9 < 28 * 28  # 20 x 20 of 28 x 28


@pytest.mark.parametrize(
    ("net", "shape", "layer"),
    [
        (
            lambda: nn.Sequential(
                nn.Conv1d(2, 4, 5, padding=2), nn.ReLU(), nn.Conv1d(4, 6, 3, stride=2)
            ),
            (2, 64),
            "2",
        ),
        (
            lambda: nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 5, 3)),
            (1, 12, 14, 10),
            "2",
        ),
    ],
    ids=["1d", "3d"],
)
def test_one_and_three_dimensional_inputs(net, shape, layer) -> None:
    torch.manual_seed(0)
    model = net().double().eval()
    v = visualize(model, layer, [0, 3], input_shape=shape, steps=8, **quiet())
    assert v.cropped and v.images.shape[:2] == (2, shape[0])
    assert len(v.size) == len(shape) - 1
    torch.testing.assert_close(unit_values(model, v, v.full()), v.activations, rtol=0, atol=1e-12)
    assert v.tiles()[0].ndim == 3  # drawable


def test_the_channel_objective_uses_the_whole_input_and_says_so() -> None:
    model = rgb_net().double()
    v = visualize(
        model, "3", [1, 4], input_shape=(3, 24, 20), objective="channel", steps=4, **quiet()
    )
    assert not v.cropped and v.location is None and "channel" in v.fallback
    y = value_at(model, "3", v.images)
    torch.testing.assert_close(y[[0, 1], [1, 4]].mean(dim=(1, 2)), v.activations)


def test_a_global_field_uses_the_whole_input_and_says_so() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Conv2d(4, 6, 1), nn.ReLU()
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CropWarning)  # global is not a failure: no warning
        v = visualize(model, "2", [0, 5], input_shape=(3, 16, 16), steps=3, **quiet())
    assert not v.cropped and "global" in v.fallback
    assert v.location == (0, 0)


def test_a_layer_without_a_field_falls_back_with_a_crop_warning() -> None:
    class Untraceable(nn.Module):  # data-dependent control flow: no fx trace
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3)

        def forward(self, x):
            return self.conv(x) if float(x.sum()) > -1e9 else self.conv(-x)

    with pytest.warns(CropWarning, match="optimises the whole input"):
        v = visualize(Untraceable().eval(), "conv", 1, input_shape=(1, 10, 10), steps=2, **quiet())
    assert not v.cropped and v.fallback


# --------------------------------------------------------------------------------------------
# Seeded, batched


def test_the_same_seed_gives_the_same_images_and_another_seed_others() -> None:
    model = rgb_net()
    args = dict(input_shape=(3, 32, 32), steps=12, **quiet())
    a = visualize(model, "3", [0, 1, 2], seed=7, **args)
    b = visualize(model, "3", [0, 1, 2], seed=7, **args)
    c = visualize(model, "3", [0, 1, 2], seed=8, **args)
    assert torch.equal(a.images, b.images) and torch.equal(a.activations, b.activations)
    assert not torch.allclose(a.images, c.images)


def test_a_channel_gets_the_same_image_alone_as_in_a_batch() -> None:
    model = rgb_net().double()
    args = dict(input_shape=(3, 32, 32), steps=10, seed=3, **quiet())
    batch = visualize(model, "5", [4, 9, 2], **args)
    alone = visualize(model, "5", 9, **args)
    torch.testing.assert_close(alone.image(9), batch.image(9), rtol=1e-9, atol=1e-9)
    chunked = visualize(model, "5", [4, 9, 2], chunk_size=1, **args)
    torch.testing.assert_close(chunked.images, batch.images, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------
# It works: the unit ends far above where random inputs put it


def test_the_optimised_units_beat_random_inputs_and_the_top1_dataset_example() -> None:
    model = rgb_net()
    shape, layer = (3, 32, 32), "5"
    vr = ValueRange.normalized(IMAGENET_MEAN, IMAGENET_STD)
    v = visualize(model, layer, range(16), input_shape=shape, value_range=vr, steps=96, **quiet())
    lo = torch.tensor(vr.low).view(1, 3, 1, 1)
    hi = torch.tensor(vr.high).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    data = lo + (hi - lo) * torch.rand(256, *shape, generator=g)  # uniform in the range
    # the images are valid inputs
    assert bool(((v.images > lo) & (v.images < hi)).all())
    # random inputs: the same unit, at the same location
    y = value_at(model, layer, data)[(slice(None), slice(0, 16), *v.location)]  # (256, 16)
    assert bool((v.activations > y.max(dim=0).values).all())
    # the scan's top-1 over the dataset, at any location: most channels beaten (an atlas
    # hit may sit at the border, where padding helps; the synthetic unit is at the centre)
    atlas = scan(model, data, [layer], top_k=1, progress=False)
    top1 = torch.tensor([atlas.top(layer, c)[0].score for c in range(16)])
    fraction = float((v.activations >= top1).float().mean())
    assert fraction >= 0.9, (fraction, v.activations, top1)


def test_activation_is_at_least_lucents_on_the_same_objective() -> None:
    """torch-lucent (Olah et al.'s parameterisation, full image) as reference.

    Same parameterisation (Fourier, decorrelated colours, sigmoid, ImageNet normalisation),
    Adam at 0.05, no random transforms on either side (Lucent's default ones are sized for
    224-pixel images: on 32 pixels they leave the unit near 0, which would prove nothing).
    """
    pytest.importorskip("lucent")
    pytest.importorskip("kornia")
    import copy

    from lucent.optvis import objectives, param, render

    model = rgb_net()
    layer, channels, steps, size = "5", [0, 3], 40, 32  # lucent takes ~0.5 s a step here
    vr = ValueRange.normalized(IMAGENET_MEAN, IMAGENET_STD)
    ours = visualize(
        model, layer, channels, input_shape=(3, size, size), value_range=vr, steps=steps,
        lr=0.05, regularizers=("fourier", "decorrelate"), **quiet(),
    )  # fmt: skip
    theirs = []
    norm_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    norm_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for c in channels:
        torch.manual_seed(c)
        np.random.seed(c)
        twin = copy.deepcopy(model)  # lucent leaves its hooks on the model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            images = render.render_vis(
                twin, objectives.neuron(layer, c), param_f=lambda: param.image(size),
                transforms=[], thresholds=(steps,), show_image=False, progress=False,
                fixed_image_size=size,
            )  # fmt: skip
        x = torch.from_numpy(images[0]).permute(0, 3, 1, 2).float()
        x = (x - norm_mean) / norm_std
        y = value_at(model, layer, x)
        theirs.append(float(y[(0, c, *ours.location)]))
    theirs_t = torch.tensor(theirs)
    print(f"featurelens {ours.activations.tolist()}, lucent {theirs}")
    assert bool((theirs_t > 0.1).all())  # the reference did its job
    assert bool((ours.activations >= 0.8 * theirs_t).all()), (ours.activations, theirs_t)


# --------------------------------------------------------------------------------------------
# The registry: every regulariser runs and changes the result


@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_every_regularizer_changes_the_result(name: str) -> None:
    model = rgb_net().double()
    # decorrelate acts on the Fourier image here; everything else on plain pixels
    base: tuple[str, ...] = ("fourier",) if name == "decorrelate" else ()
    args = dict(input_shape=(3, 32, 32), steps=8, seed=1, **quiet())
    options = {"every": 1} if name == "blur" else None
    without = visualize(model, "3", [0, 1], regularizers=base, **args)
    with_it = visualize(model, "3", [0, 1], regularizers={**dict.fromkeys(base), name: options},
                        **args)  # fmt: skip
    assert name in [n for n, _ in with_it.regularizers]
    assert not torch.allclose(without.images, with_it.images, atol=1e-6), name


def test_the_registry_documents_its_defaults() -> None:
    kinds = {"parameterization", "transform", "step"}
    for name, reg in REGULARIZERS.items():
        assert reg.name == name and reg.kind in kinds and reg.help
        for key, default in reg.defaults.items():
            assert key in reg.limits
            if default is not None:
                lo, hi = reg.limits[key]
                assert lo <= default <= hi
    assert set(DEFAULT_REGULARIZERS) <= set(REGULARIZERS)
    papers = " ".join(r.help for r in REGULARIZERS.values())
    assert "Yosinski" in papers and "Olah" in papers


def test_decay_pulls_towards_the_middle_of_the_range() -> None:
    model = rgb_net().double()
    args = dict(input_shape=(3, 32, 32), steps=20, seed=1, **quiet())
    plain = visualize(model, "3", [0, 1], regularizers=(), **args)
    decayed = visualize(model, "3", [0, 1], regularizers={"decay": {"rate": 0.2}}, **args)
    mid = 0.5
    assert float((decayed.images - mid).abs().mean()) < float((plain.images - mid).abs().mean())


# --------------------------------------------------------------------------------------------
# Bad input: refused with the bad value named


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"channel": 99}, ChannelError, "channel 99 is out of range"),
        ({"location": (9, 9)}, ValueError, r"\(9, 9\)"),
        ({"objective": "mean"}, UsageError, "unknown objective 'mean'"),
        ({"objective": "channel", "location": (1, 1)}, UsageError, "location=None"),
        ({"regularizers": ["blurr"]}, UsageError, "unknown regularizer 'blurr'"),
        ({"regularizers": "fourier"}, UsageError, r"write \('fourier',\)"),
        ({"regularizers": ["fourier", "decay"]}, UsageError, "cannot be combined"),
        ({"regularizers": {"blur": {"radius": 2}}}, UsageError, "no option 'radius'"),
        ({"regularizers": {"scale": {"amount": 2}}}, UsageError, r"\[0, 0.9\]"),
        ({"steps": 0}, UsageError, "steps must be at least 1"),
        ({"lr": -1.0}, UsageError, "lr must be a positive number"),
        ({"value_range": (1.0, 0.0)}, UsageError, "must be below"),
        ({"value_range": ((0, 0), (1, 1))}, UsageError, "one per input channel"),
        ({"input_shape": None}, UsageError, "needs input_shape"),
        ({"input_shape": (3, 1, 2, 3, 4)}, UsageError, "1 to 3 spatial axes"),
        ({"input_shape": (4, 32, 32)}, UsageError, "rejects inputs of shape"),
        ({"layer": "nope"}, Exception, "nope"),
        ({"channel": []}, UsageError, "no channel given"),
    ],
)
def test_bad_arguments_are_refused_naming_the_value(kwargs, error, match) -> None:
    model = rgb_net()
    before = snapshot(model)
    args = {"layer": "3", "channel": 0, "input_shape": (3, 32, 32), "steps": 2, **kwargs}
    with pytest.raises(error, match=match):
        visualize(model, args.pop("layer"), args.pop("channel"), **args, progress=False)
    assert_unchanged(model, before)


def test_a_unit_that_sees_only_padding_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=4)).eval()  # corners see only zeros
    with pytest.raises(UsageError, match="no receptive field"):
        visualize(model, "0", 0, (0, 0), input_shape=(1, 8, 8), steps=2, **quiet())


def test_a_dead_unit_warns_and_keeps_its_starting_image() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].bias[0] = 5.0  # channel 0 fires everywhere
        model[0].bias[1] = -1e3  # channel 1 never fires
    with pytest.warns(DeadUnitWarning, match=r"channel\(s\) \[1\]"):
        v = visualize(model, "1", [0, 1], input_shape=(1, 12, 12), steps=5, **quiet())
    assert v.dead == (1,)
    assert float(v.activations[0]) > 0 and float(v.activations[1]) == 0


def test_non_finite_values_are_refused_naming_channel_and_step() -> None:
    class Blowup(nn.Module):
        def forward(self, x):
            return x / (x - x)  # NaN everywhere

    model = nn.Sequential(nn.Conv2d(1, 2, 3), Blowup()).eval()
    with pytest.raises(NonFiniteError, match="channel 0 .* step 0"):
        visualize(model, "1", [0, 1], input_shape=(1, 12, 12), steps=3, **quiet())


# --------------------------------------------------------------------------------------------
# The caller's model, and the cache the explorer calls


def test_the_model_comes_back_unchanged_also_after_an_error() -> None:
    model = rgb_net().train()
    model[0].bias.requires_grad_(False)
    before = snapshot(model)
    visualize(model, "3", [0, 1], input_shape=(3, 32, 32), steps=3, **quiet())
    assert_unchanged(model, before)
    with pytest.raises(ChannelError):
        visualize(model, "3", 50, input_shape=(3, 32, 32), steps=3, **quiet())
    assert_unchanged(model, before)
    assert all(not m._forward_hooks for m in model.modules())


def test_the_cache_computes_each_channel_once() -> None:
    model = rgb_net()
    cache = VisualizationCache(model, (3, 32, 32), steps=4, progress=False)
    a = cache.get("3", 2)
    b = cache.get("3", 2)
    assert a is b and a.channels == (2,)
    direct = visualize(model, "3", 2, input_shape=(3, 32, 32), steps=4, **quiet())
    assert torch.equal(a.images, direct.images)
    png = cache.png("3", 2)
    assert png.startswith(b"\x89PNG")
    assert cache.get("3", 2, (1, 1)) is not a
