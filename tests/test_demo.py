"""The main job end to end: `featurelens demo --quick` trains, scans, reports; cached reruns."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
import torch

import featurelens
from featurelens.atlas import model_fingerprint
from featurelens.cli import main
from featurelens.demo import (
    TrainConfig,
    conv_layers,
    mnist_cnn,
    split_indices,
    train_mnist_cnn,
)
from featurelens.specs import SpecError


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "featurelens-demo"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    return out, buf.getvalue()


def test_quick_demo_runs_end_to_end(quick_demo):
    out, log = quick_demo
    index = out / "index.html"
    assert index.is_file()
    assert str(index.resolve()) in log  # the path of index.html is printed
    accuracy = float(log.split("held-out accuracy: ")[1].split("%")[0]) / 100
    assert accuracy > 0.5  # 40 steps already beat chance (10%) by far
    atlas = featurelens.Atlas.load(out / "atlas")
    assert atlas.layers == ["features.conv1", "features.conv2", "features.conv3"]
    assert atlas.data_size == 5000 and atlas.complete
    for layer in atlas.layers:
        assert (out / f"layer-{layer}.html").is_file()
        assert len(list((out / "img" / layer).glob("channel-*.png"))) == 4  # --quick: 4 a layer


def test_demo_atlas_rebuilds_the_trained_model(quick_demo):
    out, _ = quick_demo
    atlas = featurelens.Atlas.load(out / "atlas")
    spec = atlas.model_spec
    assert spec.spec == "featurelens.demo:mnist_cnn" and Path(spec.checkpoint).is_file()
    model = atlas.build_model()  # strict: the fingerprint must match the scanned weights
    assert model_fingerprint(model) == atlas.manifest.model.fingerprint
    assert model_fingerprint(model) != model_fingerprint(mnist_cnn())  # trained, not random


def test_second_run_loads_the_cached_checkpoint(quick_demo, capsys, tmp_path):
    # on a copy: a second run replaces the whole output, and other tests read the first one's
    out = tmp_path / "featurelens-demo"
    shutil.copytree(quick_demo[0], out)
    before = sorted(p.name for p in (out / "model").iterdir())
    from featurelens.demo import run_demo

    result = run_demo(out, quick=True, progress=False, layers=["features.conv1"], channels=1)
    log = capsys.readouterr().out
    assert "loaded the cached model" in log and "training" not in log
    assert sorted(p.name for p in (out / "model").iterdir()) == before
    assert result.index.is_file()


def test_demo_on_the_users_model_and_data(tmp_path):
    (tmp_path / "mine.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def net():
                return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.ReLU())

            def images():
                return torch.randn(12, 3, 10, 10, generator=torch.Generator().manual_seed(0))
            """
        )
    )
    spec = str(tmp_path / "mine.py")
    out = tmp_path / "out"
    argv = [
        "demo",
        "--quiet",
        "--out",
        str(out),
        "--model",
        f"{spec}:net",
        "--data",
        f"{spec}:images",
    ]
    assert main(argv) == 0
    atlas = featurelens.Atlas.load(out / "atlas")
    assert atlas.layers == ["0", "2"]  # every conv layer
    assert (out / "layer-2.html").is_file() and not (out / "model").exists()


def test_demo_needs_model_and_data_together(tmp_path):
    from featurelens.demo import run_demo

    with pytest.raises(SpecError, match="both --model and --data"):
        run_demo(tmp_path, model="torchvision:resnet18")


def test_training_is_seeded_and_split_held_out():
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(1, 28, 28, generator=g), i % 10) for i in range(120)]
    config = TrainConfig(epochs=1, max_steps=2, batch_size=16, heldout=20)
    a, acc_a = train_mnist_cnn(data, config, log=None)
    b, acc_b = train_mnist_cnn(data, config, log=None)
    assert model_fingerprint(a) == model_fingerprint(b) and acc_a == acc_b
    train, held = split_indices(120, 20, seed=0)
    assert len(held) == 20 and len(train) == 100
    assert not set(train.tolist()) & set(held.tolist())


def test_conv_layers_finds_every_convolution():
    assert conv_layers(mnist_cnn()) == ["features.conv1", "features.conv2", "features.conv3"]


def test_demo_output_can_be_moved(quick_demo, tmp_path):
    import json
    import shutil

    out, _ = quick_demo
    recorded = json.loads((out / "atlas" / "manifest.json").read_text())["model"]["spec"]
    assert not Path(recorded["checkpoint"]).is_absolute()  # relative to the atlas directory
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    atlas = featurelens.Atlas.load(moved / "atlas")
    assert Path(atlas.model_spec.checkpoint).is_relative_to(moved.resolve())
    model = atlas.build_model()  # strict: the fingerprint must match
    assert model_fingerprint(model) == atlas.manifest.model.fingerprint


def test_demo_on_fewer_images_than_top_k_shows_them_all(tmp_path, capsys):
    (tmp_path / "few.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def net():
                return nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())

            def six():
                return torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
            """
        )
    )
    spec = str(tmp_path / "few.py")
    out = tmp_path / "out"
    argv = ["demo", "--quiet", "--out", str(out), "--model", f"{spec}:net", "--data", f"{spec}:six"]
    assert main(argv) == 0  # the default --top-k 9 > 6 images
    assert "note: --top-k 9 > the 6 examples; using --top-k 6" in capsys.readouterr().out
    atlas = featurelens.Atlas.load(out / "atlas")
    assert atlas.top_k == 6
    assert sorted(h.index for h in atlas.top("0", 0)) == list(range(6))


def test_synthetic_inputs_beat_the_top1_digit_for_most_channels(quick_demo):
    """Issue 13: on the trained demo CNN, the synthetic input (pixels 0..1, normalised as the
    digits are) drives its unit at least as high as the best of the 5,000 digits does."""
    out, _ = quick_demo
    atlas = featurelens.Atlas.load(out / "atlas")
    model = atlas.build_model()
    layer = "features.conv2"
    v = featurelens.visualize(
        model, layer, range(atlas.channels(layer)), atlas=atlas, steps=128, progress=False
    )
    assert v.value_range.low == ((0 - 0.1307) / 0.3081,) and v.cropped
    top1 = torch.tensor([atlas.top(layer, c)[0].score for c in v.channels])
    beaten = v.activations >= top1
    print(f"synthetic >= top-1 digit on {int(beaten.sum())} of {len(beaten)} channels")
    assert float(beaten.float().mean()) >= 0.75, (v.activations, top1)
