"""Consent before code: an atlas runs the code its manifest names (model and data factories,
image folders outside it) only when trusted: made by this user on this machine (signed into
the user's store), or opened with trust_code=True / --trust-code. Nothing is imported before
that decision, the refusal shows what would run, and the model is still fingerprint-checked."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch import nn

import featurelens as fl
from featurelens import trust
from featurelens.cli import main
from featurelens.errors import AtlasError, UntrustedAtlasError
from featurelens.specs import DataSpec, ModelSpec

NET_PY = """
import torch
from torch import nn


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())


def data():
    return torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
"""

PAYLOAD_PY = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
from torch import nn


def make():
    pathlib.Path({marker!r}).write_text("ran")
    return nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU())
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    src = str(Path(fl.__file__).resolve().parent.parent)
    e["PYTHONPATH"] = src + os.pathsep + e.get("PYTHONPATH", "")
    return e


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """tmp/project: net.py (model and data factories) and atlas/, scanned by this user."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "net.py").write_text(NET_PY)
    model_spec, data_spec = ModelSpec(f"{root / 'net.py'}:net"), DataSpec(f"{root / 'net.py'}:data")
    fl.scan(
        model_spec.build(), data_spec.build(), ["1"], top_k=2, progress=False,
        checkpoint=root / "atlas", model_spec=model_spec, data_spec=data_spec,
    )  # fmt: skip
    return root


def edit(atlas_dir: Path, **specs: object) -> None:
    """Set ``model.spec`` / ``data.spec`` of a saved manifest (what a hostile atlas would do)."""
    path = atlas_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    if "model" in specs:
        manifest["model"]["spec"] = specs["model"]
    if "data" in specs:
        manifest["data"]["spec"] = specs["data"]
    path.write_text(json.dumps(manifest, indent=2))


def model_spec(spec: str) -> dict:
    return {"spec": spec, "weights": None, "checkpoint": None}


def data_spec(spec: str) -> dict:
    return {"spec": spec, "input_size": None, "mean": None, "std": None, "sample_rate": None}


def test_an_atlas_made_by_the_user_opens_without_a_flag(project: Path, tmp_path: Path, capsys):
    atlas = fl.Atlas.load(project / "atlas")
    assert atlas.trusted
    recorded = json.loads((project / "atlas" / "manifest.json").read_text())
    assert recorded["model"]["spec"]["spec"] == "../net.py:net"  # stored beside the atlas
    model, data = atlas.build_model(), atlas.build_data()
    again = fl.scan(model, data, ["1"], top_k=2, progress=False)
    np.testing.assert_array_equal(again.layer("1").indices, atlas.layer("1").indices)
    out = tmp_path / "fig.png"
    args = ["figure", str(project / "atlas"), "--layer", "1", "--channel", "0", "--out", str(out)]
    assert main(args) == 0 and out.is_file()
    # the signature lives in the user's store, with a 0600 secret; the atlas is untouched
    home = Path(os.environ["FEATURELENS_HOME"])
    assert stat.S_IMODE((home / "secret").stat().st_mode) == 0o600
    assert list((home / "trusted").iterdir())
    assert sorted(p.name for p in (project / "atlas").iterdir())[-1] == "manifest.json"
    # moved with its code (a relative spec), it is still the user's
    moved = tmp_path / "elsewhere" / "project"
    shutil.copytree(project, moved)
    assert fl.Atlas.load(moved / "atlas").trusted
    assert isinstance(fl.Atlas.load(moved / "atlas").build_model(), nn.Module)


def test_an_atlas_from_another_user_is_refused_until_consent(
    project: Path, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.setenv("FEATURELENS_HOME", str(tmp_path / "other-user"))  # another secret
    atlas = fl.Atlas.load(project / "atlas")
    assert not atlas.trusted
    with pytest.raises(UntrustedAtlasError) as info:
        atlas.build_model()
    message = str(info.value)
    assert "'../net.py:net'" in message and str(project / "net.py") in message
    assert "calls net()" in message and "--trust-code" in message and "trust_code=True" in message
    assert "\n" not in message and isinstance(info.value, AtlasError)
    with pytest.raises(UntrustedAtlasError, match=r"data spec '\.\./net\.py:data'"):
        atlas.build_data()
    out = tmp_path / "fig.png"
    args = ["figure", str(project / "atlas"), "--layer", "1", "--channel", "0", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "../net.py:net" in err and "--trust-code" in err
    assert not out.exists()
    # consent: per call, or for the loaded atlas, or on the command line
    assert isinstance(atlas.build_model(trust_code=True), nn.Module)
    assert len(fl.Atlas.load(project / "atlas", trust_code=True).build_data()) == 6
    assert main([*args, "--trust-code"]) == 0 and out.is_file()
    # saving it does not make it trusted (no laundering through a save)
    fl.Atlas.load(project / "atlas").save(project / "copy")
    with pytest.raises(UntrustedAtlasError):
        fl.Atlas.load(project / "copy").build_model()


def hostile(project: Path, name: str) -> Path:
    """A copy of the user's atlas whose manifest was edited by someone else."""
    target = project.parent / name
    shutil.copytree(project / "atlas", target)
    return target


def test_a_payload_inside_the_atlas_never_runs_without_consent(project: Path, capsys):
    bad = hostile(project, "payload-atlas")
    marker = project.parent / "marker.txt"
    (bad / "payload.py").write_text(PAYLOAD_PY.format(marker=str(marker)))
    edit(bad, model=model_spec("payload.py:make"))
    atlas = fl.Atlas.load(bad)  # reading runs nothing
    refs = atlas.code_references()
    assert [(r.kind, r.target, r.needs_consent) for r in refs][0] == (
        "file",
        str(bad / "payload.py"),
        True,
    )
    with pytest.raises(UntrustedAtlasError) as info:
        atlas.build_model()
    assert "'payload.py:make'" in str(info.value) and str(bad / "payload.py") in str(info.value)
    assert not marker.exists()
    assert not [
        m for m in sys.modules.values() if getattr(m, "__file__", "") == str(bad / "payload.py")
    ]
    figure = ["figure", str(bad), "--layer", "1", "--out", str(bad.parent / "f.png")]
    report = ["report", str(bad), "--out", str(bad.parent / "site"), "--quiet"]
    for argv in (figure, report):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "payload.py:make" in err and str(bad / "payload.py") in err
        assert "Traceback" not in err and err.count("\n") == 1
    assert not marker.exists() and not (bad.parent / "site").exists()
    # with consent it runs, and the rebuilt model is still checked against the scanned one
    with pytest.raises(AtlasError, match="other parameters than the scanned one"):
        fl.Atlas.load(bad, trust_code=True).build_model()
    assert marker.read_text() == "ran"


def test_an_absolute_path_and_a_module_never_run_without_consent(
    project: Path, tmp_path: Path, monkeypatch
):
    marker = tmp_path / "marker.txt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "evil.py").write_text(PAYLOAD_PY.format(marker=str(marker)))
    bad = hostile(project, "absolute-atlas")
    edit(bad, model=model_spec(f"{elsewhere / 'evil.py'}:make"))
    with pytest.raises(UntrustedAtlasError, match=str(elsewhere / "evil.py")):
        fl.Atlas.load(bad).build_model()
    assert not marker.exists()
    # a module in the current directory: not even imported (no entry in sys.modules)
    (tmp_path / "evil_module_xyz.py").write_text(PAYLOAD_PY.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    edit(bad, model=model_spec("evil_module_xyz:make"))
    with pytest.raises(UntrustedAtlasError, match="imports the module 'evil_module_xyz'"):
        fl.Atlas.load(bad).build_model()
    assert not marker.exists() and "evil_module_xyz" not in sys.modules
    try:
        with pytest.raises(AtlasError, match="other parameters"):  # consent: it runs
            fl.Atlas.load(bad).build_model(trust_code=True)
        assert marker.read_text() == "ran"
    finally:
        sys.modules.pop("evil_module_xyz", None)


@pytest.mark.parametrize(
    ("spec", "ran"),
    [
        ("os:abort", lambda result: result.returncode == -signal.SIGABRT),
        # the console reads EOF from stdin, returns None: it ran, then the spec is refused
        ("code:interact", lambda result: "returned NoneType" in result.stderr),
    ],
)
def test_os_abort_and_code_interact_need_consent(project: Path, tmp_path: Path, spec, ran):
    bad = hostile(project, "module-atlas")
    edit(bad, model=model_spec(spec))
    args = [sys.executable, "-m", "featurelens", "figure", str(bad), "--layer", "1",
            "--channel", "0", "--out", str(tmp_path / "f.png")]  # fmt: skip
    refused = subprocess.run(
        args, env=env(), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120
    )
    assert refused.returncode == 2, refused.stderr  # alive, and said no
    module, _, call = spec.partition(":")
    assert (
        f"imports the module {module!r}" in refused.stderr and f"calls {call}()" in refused.stderr
    )
    assert "--trust-code" in refused.stderr and "Traceback" not in refused.stderr
    consented = subprocess.run(
        [*args, "--trust-code"], env=env(), capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip
    assert ran(consented), (consented.returncode, consented.stderr[-2000:])


def write_image(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "secret.png")


def test_a_data_spec_naming_a_private_folder_needs_consent(project: Path, tmp_path: Path):
    private = tmp_path / "private"
    write_image(private)
    bad = hostile(project, "folder-atlas")
    edit(bad, data=data_spec(str(private)) | {"input_size": 8})
    atlas = fl.Atlas.load(bad)
    with pytest.raises(UntrustedAtlasError) as info:
        atlas.build_data()
    assert f"reads every image under the folder {private} (outside the atlas)" in str(info.value)
    # consent: the folder is read (its one image; the size then differs from the scan's)
    with pytest.raises(AtlasError, match="has 1 examples, the scanned one had 6"):
        atlas.build_data(trust_code=True)
    # a folder inside the atlas is part of it: no consent, unless a link in it leads out
    write_image(bad / "images")
    edit(bad, data=data_spec("images") | {"input_size": 8})
    with pytest.raises(AtlasError, match="has 1 examples"):
        fl.Atlas.load(bad).build_data()
    (bad / "images" / "more").symlink_to(private)
    with pytest.raises(UntrustedAtlasError, match="a link in it leads out"):
        fl.Atlas.load(bad).build_data()


def test_well_known_libraries_need_no_consent(project: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FEATURELENS_HOME", str(tmp_path / "other-user"))
    bad = hostile(project, "library-atlas")
    edit(bad, model=model_spec("featurelens.demo:mnist_cnn"))
    atlas = fl.Atlas.load(bad)
    model_ref = atlas.code_references()[0]
    assert (model_ref.kind, model_ref.needs_consent) == ("library", False)
    with pytest.raises(AtlasError, match="other parameters") as info:
        atlas.build_model()  # built (it is featurelens' own), then refused by its fingerprint
    assert not isinstance(info.value, UntrustedAtlasError)
    for spec in ("torchvision:resnet18", "timm:resnet18"):
        edit(bad, model=model_spec(spec))
        refs = fl.Atlas.load(bad).code_references()
        assert refs[0].kind == "library" and not refs[0].needs_consent
    edit(bad, data=data_spec("mnist"))
    assert not fl.Atlas.load(bad).code_references()[1].needs_consent


def test_a_changed_code_file_or_secret_withdraws_the_signature(project: Path):
    atlas_dir = project / "atlas"
    assert fl.Atlas.load(atlas_dir).trusted
    net = project / "net.py"
    net.write_text(net.read_text() + "\n# edited after the scan\n")
    with pytest.raises(UntrustedAtlasError, match="net.py:net"):
        fl.Atlas.load(atlas_dir).build_model()
    net.write_text(NET_PY)
    assert fl.Atlas.load(atlas_dir).trusted
    secret = trust.home() / trust.SECRET
    secret.chmod(0o644)  # readable by others: a signature made with it proves nothing
    try:
        with pytest.raises(UntrustedAtlasError, match="chmod 600"):
            fl.Atlas.load(atlas_dir).build_model()
    finally:
        secret.chmod(0o600)


def test_serve_refuses_an_untrusted_atlas_before_serving(project: Path, capsys):
    pytest.importorskip("starlette")
    bad = hostile(project, "serve-atlas")
    marker = project.parent / "marker.txt"
    (bad / "payload.py").write_text(PAYLOAD_PY.format(marker=str(marker)))
    edit(bad, model=model_spec("payload.py:make"))
    assert main(["serve", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "payload.py:make" in err and "--trust-code" in err and not marker.exists()


def test_consent_is_a_boolean(project: Path):
    with pytest.raises(TypeError, match="trust_code must be True or False"):
        fl.Atlas.load(project / "atlas", trust_code="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="trust_code must be True or False"):
        fl.Atlas.load(project / "atlas").build_model(trust_code=1)  # type: ignore[arg-type]


def test_refusal_text_names_every_spec_that_would_run(project: Path, tmp_path: Path):
    bad = hostile(project, "both-atlas")
    private = tmp_path / "private"
    write_image(private)
    edit(bad, model=model_spec("payload.py:make"), data=data_spec(str(private)))
    atlas = fl.Atlas.load(bad)
    described = [r.describe() for r in atlas.code_references()]
    assert described == [
        f"model spec 'payload.py:make' imports the Python file {bad / 'payload.py'} and calls make()",
        f"data spec {str(private)!r} reads every image under the folder {private} (outside the atlas)",
    ]
