"""Atlas storage: round trip, atomic writes, clear errors, rebuilding model and data, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import featurelens as fl
from featurelens.atlas import FORMAT_VERSION, AtlasError, ChannelError, Preprocessing
from featurelens.cli import main
from featurelens.fingerprint import model_fingerprint
from featurelens.graph import LayerError
from featurelens.specs import DataSpec, ModelSpec, load_model

MODEL_PY = """
import torch
from torch import nn


def net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3), nn.ReLU(inplace=True),
    )


def seeded():
    torch.manual_seed(5)
    return net()


def small_digits():
    from featurelens.specs import MnistDigits

    return torch.utils.data.Subset(MnistDigits(), range(64))
"""


@pytest.fixture
def model_py(tmp_path: Path) -> Path:
    path = tmp_path / "model.py"
    path.write_text(MODEL_PY)
    return path


def small_atlas() -> fl.Atlas:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 6, 4))
    x = torch.randn(20, 2, 10, 8)
    x[4] = math.nan
    return fl.scan(model, x, ["0", "3"], top_k=20, batch_size=6, progress=False)


def test_save_load_round_trip(tmp_path: Path):
    atlas = small_atlas()
    atlas.save(tmp_path / "a")
    loaded = fl.Atlas.load(tmp_path / "a")
    assert loaded.layers == ["0", "3"] and loaded.complete
    assert loaded.manifest == atlas.manifest
    for layer in atlas.layers:
        assert loaded.channels(layer) == atlas.channels(layer)
        for c in range(atlas.channels(layer)):
            a, b = atlas.top(layer, c), loaded.top(layer, c)
            assert [(h.index, h.location) for h in a] == [(h.index, h.location) for h in b]
            np.testing.assert_array_equal([h.score for h in a], [h.score for h in b])
        np.testing.assert_array_equal(loaded.nan_counts(layer), atlas.nan_counts(layer))
    hits = loaded.top("0", 1)
    assert len(hits) == 20 and math.isnan(hits[-1].score) and hits[-1].index == 4
    assert isinstance(hits[0], fl.Hit) and isinstance(hits[0].location, tuple)
    assert loaded.output_shape("0") == (8, 6) and loaded.top("3", 0)[0].location == ()
    assert loaded.input_shape == (2, 10, 8)
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())  # the file as written
    assert m["format_version"] == FORMAT_VERSION and m["library_version"] == fl.__version__
    assert m["model"]["spec"] is None and m["model"]["fingerprint"].startswith("sha256:")
    assert m["data"].pop("fingerprint").startswith("sha256:")
    assert m["data"] == {
        "spec": None, "class": "Tensor", "size": 20, "sample_rate": None, "labels": None,
    }  # fmt: skip
    assert m["layers"][0] == {
        "name": "0",
        "channels": 3,
        "output_shape": [8, 6],
        "channel_dim": 1,
        "layout": "channels_first",
        "nan_counts": {"0": 1, "1": 1, "2": 1},
    }
    # saving again gives the same bytes (no timestamps); stale files are cleaned up
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    loaded.save(tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert sorted(before) == [next(n for n in before if n.startswith("arrays-")), "manifest.json"]


def test_a_write_killed_midway_leaves_the_old_atlas(tmp_path: Path, monkeypatch):
    atlas = small_atlas()
    atlas.save(tmp_path / "a")
    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith("manifest.json"):
            raise KeyboardInterrupt  # the process dies between the arrays and the manifest
        return real_replace(src, dst)

    changed = fl.Atlas(
        dataclasses.replace(atlas.manifest, top_k=99), {n: atlas.layer(n) for n in atlas.layers}
    )
    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        changed.save(tmp_path / "a")
    monkeypatch.setattr(os, "replace", real_replace)
    assert fl.Atlas.load(tmp_path / "a").top_k == 20
    assert not list((tmp_path / "a").glob(".tmp-*"))


def test_load_errors_are_clear(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="atlas directory .*nope.* does not exist"):
        fl.Atlas.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not an atlas: it has no manifest.json"):
        fl.Atlas.load(tmp_path / "empty")
    small_atlas().save(tmp_path / "a")
    manifest_path = tmp_path / "a" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(AtlasError, match="format version 99; .* reads versions 1 and 2"):
        fl.Atlas.load(tmp_path / "a")
    manifest_path.write_text(
        json.dumps(manifest | {"complete": False, "progress": {"next_index": 12, "batch_size": 6}})
    )
    with pytest.raises(AtlasError, match=r"incomplete scan \(12 of 20 examples\): resume it"):
        fl.Atlas.load(tmp_path / "a")
    assert not fl.Atlas.load(tmp_path / "a", allow_incomplete=True).complete
    manifest_path.write_text(json.dumps(manifest))
    array_file = tmp_path / "a" / manifest["arrays"]["file"]
    array_file.write_bytes(array_file.read_bytes()[:-10])
    with pytest.raises(AtlasError, match="corrupt"):
        fl.Atlas.load(tmp_path / "a")


def test_unknown_layer_and_channel_list_the_valid_ones():
    atlas = small_atlas()
    with pytest.raises(
        LayerError, match=r"unknown layer in this atlas '4'.*Valid names.*: '0', '3'"
    ):
        atlas.top("4", 0)
    with pytest.raises(ChannelError, match=r"channel 3 out of range for layer '0': .*0\.\.2"):
        atlas.top("0", 3)
    with pytest.raises(ChannelError):
        atlas.top("0", -1)
    with pytest.raises(TypeError, match="channel must be an int"):
        atlas.top("0", "1")


def test_html_table_lists_layers_channels_and_top_hits():
    atlas = small_atlas()
    html = atlas._repr_html_()
    best = max(range(3), key=lambda c: atlas.top("0", c)[0].score)
    hit = atlas.top("0", best)[0]
    assert "<table>" in html and "<code>3</code>" in html
    assert f"channel {best}: example {hit.index}" in html
    assert "20 of 20 examples" in html and "score max" in html


def test_python_objects_without_specs_cannot_be_rebuilt():
    atlas = small_atlas()
    assert atlas.model_spec is None and atlas.data_spec is None
    with pytest.raises(AtlasError, match="without a model spec") as info:
        atlas.build_model()
    # the message says how to fix it, in one line (the CLI prints one)
    for fix in (
        "model_spec=featurelens.specs.ModelSpec(...)",
        "ModelSpec(...).build()",
        "featurelens.zf_grid(model, data, atlas, ...)",
        "featurelens.app.create_app(atlas_dir, model=..., data=...)",
    ):
        assert fix in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(AtlasError, match="without a data spec") as info:
        atlas.build_data()
    assert "data_spec=featurelens.specs.DataSpec(...)" in str(info.value)
    assert "DataSpec(...).build()" in str(info.value)


def test_cli_scan_records_specs_that_rebuild_model_and_data(model_py: Path, tmp_path: Path, capsys):
    out = tmp_path / "atlas"
    argv = ["scan", f"{model_py}:net", "mnist", "--layers", "0,3", "--top-k", "3",
            "--out", str(out), "--batch-size", "500", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "written to" in capsys.readouterr().out
    atlas = fl.Atlas.load(out)
    assert atlas.model_spec == ModelSpec(f"{model_py}:net")
    assert atlas.data_spec == DataSpec("mnist")
    assert atlas.manifest.preprocessing == Preprocessing(
        input_size=None, mean=(0.1307,), std=(0.3081,)
    )
    model = atlas.build_model()  # random init, seeded: the very model that was scanned
    assert model_fingerprint(model) == atlas.manifest.model.fingerprint
    data = atlas.build_data()
    assert len(data) == 5000
    # the atlas's hits are reproducible from what it rebuilds
    again = fl.scan(model, data, ["0", "3"], top_k=3, batch_size=500, progress=False)
    for layer in ("0", "3"):
        for c in range(atlas.channels(layer)):
            assert again.top(layer, c) == atlas.top(layer, c)
    # an existing atlas is not overwritten without --resume; --resume returns it
    assert main(argv) == 2
    assert (
        "already holds a complete atlas (5000 examples, layers 0, 3); choose another --out or "
        "delete it" in capsys.readouterr().err
    )
    assert main([*argv, "--resume"]) == 0
    # resuming with other settings says what differs
    assert main([*argv[:6], "4", *argv[7:], "--resume"]) == 2
    assert "top_k differs (4 vs 3)" in capsys.readouterr().err


def test_rebuilt_model_with_other_parameters_is_refused(model_py: Path, tmp_path: Path):
    spec = ModelSpec(f"{model_py}:seeded")
    model = spec.build()
    with torch.no_grad():  # fine-tuned after building: the spec no longer rebuilds it
        model[0].weight.mul_(2)
    atlas = fl.scan(model, torch.randn(4, 1, 8, 8), ["0"], top_k=2, progress=False, model_spec=spec)
    with pytest.raises(AtlasError, match="other parameters than the scanned one"):
        atlas.build_model()
    with pytest.warns(UserWarning, match="other parameters"):
        atlas.build_model(strict=False)


def test_rebuilt_data_of_another_size_is_refused(model_py: Path):
    spec = DataSpec(f"{model_py}:small_digits")
    data = spec.build()
    assert len(data) == 64
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    atlas = fl.scan(model, data, ["0"], top_k=2, data_spec=spec, progress=False)
    assert len(atlas.build_data()) == 64
    manifest = atlas.manifest
    manifest = dataclasses.replace(manifest, data=dataclasses.replace(manifest.data, size=65))
    shrunk = fl.Atlas(manifest, {"0": atlas.layer("0")})
    with pytest.raises(AtlasError, match="has 64 examples, the scanned one had 65"):
        shrunk.build_data()


def test_model_fingerprint_sees_every_parameter_and_buffer():
    a = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    b = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b[1].running_mean[0] += 1e-6  # in place
    assert model_fingerprint(a) != model_fingerprint(b)
    b[0].weight = nn.Parameter(a[0].weight.detach() + 1)  # replaced
    b[1].running_mean = a[1].running_mean.clone()
    assert model_fingerprint(a) != model_fingerprint(b)
    b[0].weight = nn.Parameter(a[0].weight.detach().clone())
    assert model_fingerprint(a) == model_fingerprint(b)


def test_model_fingerprint_sees_writes_through_data():
    # `.data` writes do not bump tensor version counters: a cache keyed on them went stale
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    before = model_fingerprint(model)
    model[0].weight.data.mul_(2)
    after = model_fingerprint(model)
    assert after != before
    model[1].running_var.data.add_(1)
    assert model_fingerprint(model) != after


def test_save_leaves_other_writers_temp_files_and_sets_mode_without_umask(
    tmp_path: Path, monkeypatch
):
    directory = tmp_path / "a"
    directory.mkdir()
    other = directory / ".tmp-someone-elses-write"
    other.write_bytes(b"in progress")

    def no_umask(mask):  # os.umask changes the whole process: not thread-safe
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", no_umask)
    small_atlas().save(directory)
    monkeypatch.undo()
    assert other.read_bytes() == b"in progress"
    mask = os.umask(0)
    os.umask(mask)
    assert (directory / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_scan_records_the_specs_of_objects_built_from_specs(model_py: Path, tmp_path: Path):
    """The README's Python example: an atlas the CLI (figure/report/serve) can open."""
    model_spec, data_spec = ModelSpec(f"{model_py}:net"), DataSpec(f"{model_py}:small_digits")
    model, data = model_spec.build(), data_spec.build()
    assert model.featurelens_spec == model_spec and data.featurelens_spec == data_spec
    # a plain attribute: no parameter, buffer or submodule
    plain = load_model(f"{model_py}:net")
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in model.named_modules()] == [n for n, _ in plain.named_modules()]
    assert model_fingerprint(model) == model_fingerprint(plain)
    fl.scan(model, data, ["0", "3"], top_k=2, checkpoint=tmp_path / "atlas", progress=False)
    atlas = fl.Atlas.load(tmp_path / "atlas")
    assert atlas.model_spec == model_spec and atlas.data_spec == data_spec
    assert model_fingerprint(atlas.build_model()) == atlas.manifest.model.fingerprint
    assert len(atlas.build_data()) == 64
    # an explicit spec wins over the remembered one
    other = ModelSpec(f"{model_py}:net", weights=None, checkpoint=None)
    other_data = DataSpec(f"{model_py}:small_digits", mean=(0.5,), std=(0.25,))
    explicit = fl.scan(
        model, data, ["0"], top_k=2, progress=False, model_spec=other, data_spec=other_data
    )
    assert explicit.data_spec == other_data and explicit.model_spec == other


def test_a_model_changed_after_build_records_no_spec(model_py: Path):
    model = ModelSpec(f"{model_py}:seeded").build()
    with torch.no_grad():  # fine-tuned after building: the spec would rebuild another model
        model[0].weight.mul_(2)
    with pytest.warns(RuntimeWarning, match="parameters changed since .*records none"):
        atlas = fl.scan(model, torch.randn(4, 1, 8, 8), ["0"], top_k=2, progress=False)
    assert atlas.model_spec is None
