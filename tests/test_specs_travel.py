"""Specs that travel: modules from the working directory, file specs stored relative to the
atlas, specs that resolve nowhere; timm:NAME and --weights only where it means something;
reports and demos that appear whole or not at all."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import featurelens as fl
from featurelens.cli import main
from featurelens.errors import MissingExtraError, SpecError
from featurelens.fingerprint import model_fingerprint
from featurelens.specs import DataSpec, ModelSpec, load_model

NET_PY = textwrap.dedent(
    """
    import torch
    from torch import nn


    def net():
        return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.ReLU())


    def data():
        x = torch.randn(10, 1, 9, 9, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.TensorDataset(x, torch.arange(10) % 2)
    """
)


def test_a_module_spec_resolves_from_the_working_directory(tmp_path: Path, monkeypatch):
    (tmp_path / "travel_mod_xyz.py").write_text(NET_PY)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    try:
        model = ModelSpec("travel_mod_xyz:net").build()
        assert isinstance(model, torch.nn.Sequential)
        assert len(DataSpec("travel_mod_xyz:data").build()) == 10
    finally:
        sys.modules.pop("travel_mod_xyz", None)
    assert sys.path == path_before  # the working directory was on it for that import only


def test_a_spec_that_resolves_nowhere_says_where_it_looked(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        load_model("nowhere_module_xyz:net")
    assert str(info.value) == (
        "model spec 'nowhere_module_xyz:net': cannot import module 'nowhere_module_xyz': no "
        f"module named 'nowhere_module_xyz' (looked in the current directory {tmp_path} and on "
        "sys.path)"
    )
    with pytest.raises(SpecError) as info:
        load_model("nets/missing.py:net")
    assert str(info.value) == (
        "model spec 'nets/missing.py:net': file 'nets/missing.py' does not exist (looked at "
        f"{tmp_path / 'nets' / 'missing.py'}, relative to the current directory)"
    )
    # a module that exists but fails inside is not "nowhere"
    (tmp_path / "broken_mod_xyz.py").write_text("import not_installed_dependency_xyz\n")
    with pytest.raises(SpecError, match="cannot import module 'broken_mod_xyz': No module named "
                       "'not_installed_dependency_xyz'"):  # fmt: skip
        load_model("broken_mod_xyz:net")
    assert main(["rf", "nowhere_module_xyz:net", "--input-shape", "1,8,8"]) == 2
    assert "looked in the current directory" in capsys.readouterr().err


def test_file_specs_are_stored_relative_to_the_atlas_and_travel(tmp_path: Path, monkeypatch):
    project = tmp_path / "project"
    (project / "nets").mkdir(parents=True)
    (project / "nets" / "net.py").write_text(NET_PY)
    monkeypatch.chdir(project)
    argv = ["scan", "nets/net.py:net", "nets/net.py:data", "--layers", "1,3", "--top-k", "2",
            "--out", "runs/atlas", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    manifest = json.loads((project / "runs" / "atlas" / "manifest.json").read_text())
    assert manifest["model"]["spec"]["spec"] == "../../nets/net.py:net"
    assert manifest["data"]["spec"]["spec"] == "../../nets/net.py:data"
    # from anywhere else: the figure finds the files beside the atlas
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    atlas_dir = project / "runs" / "atlas"
    argv = ["figure", str(atlas_dir), "--layer", "3", "--channel", "1", "--out", "f.png"]
    assert main(argv) == 0 and (elsewhere / "f.png").is_file()
    atlas = fl.Atlas.load(atlas_dir)
    assert atlas.model_spec == ModelSpec(f"{project / 'nets' / 'net.py'}:net")
    # resuming from elsewhere, with the absolute spec, is the same scan
    again = fl.scan(
        ModelSpec(f"{project}/nets/net.py:net").build(), DataSpec(f"{project}/nets/net.py:data").build(),
        ["1", "3"], top_k=2, progress=False, checkpoint=atlas_dir,
    )  # fmt: skip
    assert again.manifest == atlas.manifest


def test_a_file_far_from_the_atlas_is_stored_absolute(tmp_path: Path, capsys):
    far = tmp_path / "a" / "b" / "c"
    far.mkdir(parents=True)
    (far / "net.py").write_text(NET_PY)
    atlas_dir = tmp_path / "x" / "y" / "z" / "atlas"
    spec = ModelSpec(f"{far / 'net.py'}:net")
    fl.scan(spec.build(), DataSpec(f"{far / 'net.py'}:data").build(), ["1"], top_k=2,
            progress=False, checkpoint=atlas_dir)  # fmt: skip
    recorded = json.loads((atlas_dir / "manifest.json").read_text())["model"]["spec"]["spec"]
    assert recorded == f"{far / 'net.py'}:net"  # four levels up: absolute
    # a file that is not where the atlas says: a SpecError naming the value and the place
    (far / "net.py").unlink()
    with pytest.raises(SpecError) as info:
        fl.Atlas.load(atlas_dir).build_model()
    assert f"the file {far / 'net.py'} does not exist" in str(info.value)
    assert repr(recorded) in str(info.value)


def test_weights_mean_pretrained_weights_of_a_library_only(tmp_path: Path, capsys):
    (tmp_path / "net.py").write_text(NET_PY)
    for spec in (f"{tmp_path / 'net.py'}:net", "some.module:net"):
        with pytest.raises(SpecError, match=r"weights 'DEFAULT' apply to torchvision:NAME and "
                           r"timm:NAME specs only; .* makes its own weights"):  # fmt: skip
            ModelSpec(spec, weights="DEFAULT")
    argv = ["rf", f"{tmp_path / 'net.py'}:net", "--input-shape", "1,9,9", "--weights", "DEFAULT"]
    assert main(argv) == 2
    assert "apply to torchvision:NAME and timm:NAME specs only" in capsys.readouterr().err
    out = tmp_path / "atlas"
    argv = ["scan", f"{tmp_path / 'net.py'}:net", f"{tmp_path / 'net.py'}:data", "--layers", "1",
            "--out", str(out), "--weights", "DEFAULT", "--quiet"]  # fmt: skip
    assert main(argv) == 2 and not out.exists()  # refused, not ignored, nothing recorded


def test_timm_models_are_seeded_and_named_like_timm():
    pytest.importorskip("timm")
    a, b = ModelSpec("timm:resnet18").build(), load_model("timm:resnet18")
    assert model_fingerprint(a) == model_fingerprint(b)  # random init, seeded like torchvision's
    import timm

    torch.manual_seed(0)
    assert model_fingerprint(a) == model_fingerprint(timm.create_model("resnet18").eval())
    with pytest.raises(SpecError, match=r"unknown timm model 'resnet1800'; did you mean resnet18"):
        load_model("timm:resnet1800")
    with pytest.raises(SpecError, match=r"unknown weights 'FOO' for timm:resnet18; valid: "
                       r"DEFAULT, a1_in1k"):  # fmt: skip
        load_model("timm:resnet18", weights="FOO")


def test_timm_pretrained_weights_without_a_network_are_a_clear_error(monkeypatch, capsys):
    pytest.importorskip("timm")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", "/nonexistent-featurelens-test")
    with pytest.raises(SpecError, match=r"could not load timm's pretrained weights of "
                       r"resnet18\.tv_in1k .*needs a network"):  # fmt: skip
        load_model("timm:resnet18", weights="tv_in1k")
    argv = ["rf", "timm:resnet18", "--input-shape", "3,64,64", "--weights", "DEFAULT"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not load timm's pretrained weights" in err


def test_timm_needs_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingExtraError, match=r"model spec 'timm:resnet18' needs the 'timm' "
                       r"extra: pip install 'featurelens\[timm\]'"):  # fmt: skip
        load_model("timm:resnet18")


def test_featurelens_rf_takes_a_timm_model(capsys):
    pytest.importorskip("timm")
    assert main(["rf", "timm:resnet18", "--input-shape", "3,64,64", "--layer", "layer1"]) == 0
    assert "layer1" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Reports and demos appear whole or not at all


@pytest.fixture
def atlas_dir(tmp_path: Path) -> Path:
    (tmp_path / "net.py").write_text(NET_PY)
    model_spec, data_spec = ModelSpec(f"{tmp_path}/net.py:net"), DataSpec(f"{tmp_path}/net.py:data")
    fl.scan(model_spec.build(), data_spec.build(), ["1", "3"], top_k=2, progress=False,
            checkpoint=tmp_path / "atlas")  # fmt: skip
    return tmp_path / "atlas"


def tree(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def temporary_folders(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".tmp-")]


def test_an_interrupted_report_leaves_no_partial_directory(atlas_dir: Path, monkeypatch):
    import featurelens.report as report

    out = atlas_dir.parent / "site"
    calls = []
    write_layer = report._write_layer

    def fails_on_the_second_layer(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the report
        return write_layer(*args, **kwargs)

    monkeypatch.setattr(report, "_write_layer", fails_on_the_second_layer)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(atlas_dir, out, progress=False)
    assert not out.exists() and not temporary_folders(out.parent)
    assert calls[0] != out and calls[0].parent == out.parent  # it wrote beside, not into, out
    # over an existing report: the old one stays whole
    monkeypatch.setattr(report, "_write_layer", write_layer)
    report.write_report(atlas_dir, out, progress=False)
    before = tree(out)
    calls.clear()
    monkeypatch.setattr(report, "_write_layer", fails_on_the_second_layer)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(atlas_dir, out, channels=1, progress=False)
    assert tree(out) == before and not temporary_folders(out.parent)


def test_a_report_replaces_its_own_files_and_keeps_the_users(atlas_dir: Path):
    from featurelens.report import write_report

    out = atlas_dir.parent / "site"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "layer-old.html").write_text("a page of an earlier report")
    index = write_report(atlas_dir, out, channels=1, progress=False)
    assert index == out / "index.html" and index.is_file()
    assert (out / "notes.txt").read_text() == "mine"  # not the report's: kept
    assert not (out / "layer-old.html").exists()  # the report's name, not in this report: gone
    assert not temporary_folders(out.parent)
    # the demo's layout: a report next to its atlas, in the same folder
    write_report(atlas_dir, atlas_dir.parent, channels=1, progress=False)
    assert fl.Atlas.load(atlas_dir).complete and (atlas_dir.parent / "net.py").is_file()
    assert (atlas_dir.parent / "index.html").is_file()


def test_a_failed_demo_leaves_nothing(tmp_path: Path, monkeypatch):
    import featurelens.report as report
    from featurelens.demo import run_demo

    (tmp_path / "net.py").write_text(NET_PY)
    out = tmp_path / "demo"

    def broken(*args, **kwargs):
        raise RuntimeError("the report broke")

    monkeypatch.setattr(report, "write_report", broken)
    with pytest.raises(RuntimeError, match="the report broke"):
        run_demo(out, model=f"{tmp_path}/net.py:net", data=f"{tmp_path}/net.py:data",
                 progress=False, log=lambda text: None)  # fmt: skip
    assert not out.exists() and not temporary_folders(tmp_path)
    monkeypatch.undo()
    result = run_demo(out, model=f"{tmp_path}/net.py:net", data=f"{tmp_path}/net.py:data",
                      progress=False, log=lambda text: None)  # fmt: skip
    assert result.index == out / "index.html" and result.index.is_file()
    atlas = fl.Atlas.load(out / "atlas")
    assert json.loads((out / "atlas" / "manifest.json").read_text())["model"]["spec"]["spec"] == (
        "../../net.py:net"
    )
    assert atlas.trusted and isinstance(atlas.build_model(), torch.nn.Module)
    assert not temporary_folders(tmp_path) and os.listdir(out)
