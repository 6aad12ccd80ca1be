"""The atlas format has one owner, ``atlas.Manifest``: atlases written before it read and write
back byte for byte, the same scans write the same files, and a malformed manifest is refused
with an ``AtlasError`` that names the file and the key."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import featurelens as fl
from featurelens.atlas import (
    MANIFEST,
    AtlasError,
    DataRecord,
    LayerRecord,
    Manifest,
    ModelRecord,
    Preprocessing,
    Progress,
    ScanIdentity,
    SkippedExample,
)
from featurelens.cli import main
from featurelens.specs import ModelSpec

#: Atlases written by featurelens before ``Manifest`` existed (see make.py there).
V1 = Path(__file__).parent / "data" / "atlas-v1"
KINDS = ("complete", "checkpoint", "python-objects")
#: Atlases of format version 2 (labels, sample rate, layouts, paths relative to the atlas).
V2 = Path(__file__).parent / "data" / "atlas-v2"
KINDS_V2 = (*KINDS, "signals")


def _make_module(folder: Path = V1):
    spec = importlib.util.spec_from_file_location(f"atlas_{folder.name}_make", folder / "make.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make = _make_module()
make_v2 = _make_module(V2)


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def without_data_fingerprint(text: str) -> str:
    """The manifest as featurelens wrote it before it recorded a data fingerprint."""
    value = json.loads(text)
    del value["data"]["fingerprint"]
    return json.dumps(value, indent=2) + "\n"


@pytest.mark.parametrize("kind", KINDS)
def test_manifests_written_before_round_trip_byte_for_byte(kind: str):
    text = (V1 / kind / MANIFEST).read_text()
    assert Manifest.from_json(text).to_json() == text
    raw = (V1 / kind / MANIFEST).read_bytes()
    assert Manifest.from_json(raw).to_json().encode() == raw
    older = without_data_fingerprint(text)
    assert older != text and Manifest.from_json(older).to_json() == older
    assert Manifest.from_json(older).data.fingerprint is None


def test_the_manifest_reads_as_typed_records():
    m = Manifest.read(V1 / "complete")
    assert m.model == ModelRecord(
        ModelSpec("model.py:net", checkpoint="../model/net.pt"),
        "Sequential",
        m.model.fingerprint,
    )
    assert m.model.fingerprint.startswith("sha256:") and len(m.model.fingerprint) == 71
    assert m.data.size == 30 and m.data.class_name == "Digits" and m.data.spec is not None
    assert m.data.spec.to_spec() == fl.DataSpec("mnist")
    assert m.preprocessing == Preprocessing(None, (0.1307,), (0.3081,))
    assert m.input_shape == (1, 8, 7)
    assert m.layers == (
        LayerRecord("0", 3, (6, 5), ((0, 2), (1, 2), (2, 2))),
        LayerRecord("3", 4, (), ((0, 2), (1, 2), (2, 2), (3, 2))),
    )
    assert m.skipped == tuple(
        SkippedExample(i, f"OSError: cannot read example {i} (caf\u00e9)") for i in make.SKIPPED
    )
    assert (m.score, m.top_k, m.examples_scanned, m.complete) == ("max", 5, 28, True)
    assert m.progress == Progress(30, 8) and m.library_version == "0.1.0"
    assert m.arrays is not None and (V1 / "complete" / m.arrays.file).is_file()
    checkpoint = Manifest.read(V1 / "checkpoint")
    assert not checkpoint.complete and checkpoint.progress == Progress(16, 8)
    assert checkpoint.differences(m) == [] and m.identity == checkpoint.identity
    objects = Manifest.read(V1 / "python-objects")
    assert objects.model.spec is None and objects.data.spec is None
    assert objects.preprocessing is None


@pytest.mark.parametrize("kind", KINDS)
def test_atlases_written_before_load_and_save_the_same_bytes(kind: str, tmp_path: Path):
    atlas = fl.Atlas.load(V1 / kind, allow_incomplete=True)
    atlas.save(tmp_path / kind)
    assert files(tmp_path / kind) == files(V1 / kind)
    assert files(V1 / kind) == files(V1 / kind)  # reading changed nothing


def test_the_same_scans_write_the_same_files(tmp_path: Path):
    # scans write format version 2 now: the same scans as atlas-v1's, and more
    make_v2.write(tmp_path)
    for kind in KINDS_V2:
        assert files(tmp_path / kind) == files(V2 / kind), kind


@pytest.mark.parametrize("kind", KINDS_V2)
def test_version_2_manifests_round_trip_and_save_the_same_bytes(kind: str, tmp_path: Path):
    text = (V2 / kind / MANIFEST).read_text()
    assert Manifest.from_json(text).to_json() == text
    assert Manifest.from_json(text).format_version == 2
    # beside the same files (the specs are stored relative to the atlas): the same bytes
    copy = tmp_path / "atlas-v2"
    shutil.copytree(V2, copy)
    fl.Atlas.load(copy / kind, allow_incomplete=True).save(copy / f"{kind}-again")
    assert files(copy / f"{kind}-again") == files(V2 / kind)
    assert files(copy / kind) == files(V2 / kind)  # reading changed nothing


def test_version_2_reads_labels_sample_rate_and_layouts():
    m = Manifest.read(V2 / "complete")
    assert m.data.labels == "int" and m.data.sample_rate is None
    assert m.model.spec == ModelSpec("../model.py:net", checkpoint="../model/net.pt")
    assert [(r.layout, r.channel_dim) for r in m.layers] == [("channels_first", 1)] * 2
    atlas = fl.Atlas.load(V2 / "complete")
    assert atlas.model_spec == ModelSpec(
        f"{V2 / 'model.py'}:net", checkpoint=str(V2 / "model" / "net.pt")
    )  # resolved beside the atlas, wherever the current directory is
    digits = make_v2.Digits()
    for layer in atlas.layers:
        for c in range(atlas.channels(layer)):
            assert all(h.label == digits[h.index][1] for h in atlas.top(layer, c))
    signals = fl.Atlas.load(V2 / "signals")
    assert signals.sample_rate == 8000 and signals.label_kind == "float"
    assert signals.top("1", 0)[0].label == make_v2.Tones()[signals.top("1", 0)[0].index][1]
    words = fl.Atlas.load(V2 / "python-objects")
    assert words.label_kind == "str" and words.top("0", 0)[0].label.startswith("caf\u00e9-")


@pytest.mark.filterwarnings("ignore:skipping example")
def test_a_version_2_checkpoint_resumes_to_the_complete_atlas(tmp_path: Path):
    copy = tmp_path / "atlas-v2"
    shutil.copytree(V2, copy)
    resumed = fl.scan(
        make_v2.net(), make_v2.Digits(), ["0", "3"], checkpoint=copy / "checkpoint",
        **make_v2.scan_options(copy),
    )  # fmt: skip
    assert resumed.complete
    assert files(copy / "checkpoint") == files(V2 / "complete")


@pytest.mark.filterwarnings("ignore:skipping example")
def test_a_checkpoint_written_before_resumes_to_the_complete_atlas(tmp_path: Path):
    ckpt = tmp_path / "checkpoint"
    shutil.copytree(V1 / "checkpoint", ckpt)
    resumed = fl.scan(make.net(), make.Digits(), ["0", "3"], checkpoint=ckpt, **make.scan_options())
    assert resumed.complete  # the fingerprints of model and data are those of the time
    assert files(ckpt) == files(V1 / "complete")


def test_differences_name_what_differs_new_vs_saved():
    saved = Manifest.read(V1 / "complete")
    same = dataclasses.replace(saved, complete=False, skipped=(), examples_scanned=3)
    assert saved.differences(same) == []  # progress is not identity
    other = ScanIdentity(
        model=dataclasses.replace(saved.model, fingerprint="sha256:" + "0" * 64, spec=None),
        data=DataRecord(None, "Tensor", 31, "sha256:" + "1" * 64),
        layers=("0",),
        score="mean",
        top_k=4,
    )
    assert other.differences(saved.identity) == [
        f"the model differs (parameter fingerprint sha256:000000000000... vs "
        f"{saved.model.fingerprint[:19]}...)",
        "the model spec differs (None vs {'spec': 'model.py:net', 'weights': None, "
        "'checkpoint': '../model/net.pt'})",
        "the data spec differs (None vs {'spec': 'mnist', 'input_size': None, "
        "'mean': [0.1307], 'std': [0.3081]})",
        "the data size differs (31 vs 30 examples)",
        f"the data differs (fingerprint sha256:111111111111... vs "
        f"{str(saved.data.fingerprint)[:19]}...: other examples at the same indices)",
        "the layers differ (['0'] vs ['0', '3'])",
        "score differs ('mean' vs 'max')",
        "top_k differs (4 vs 5)",
    ]
    older = dataclasses.replace(saved.data, fingerprint=None)  # a checkpoint without one
    assert saved.identity.differences(dataclasses.replace(saved, data=older).identity) == []


# --------------------------------------------------------------------------------------------
# Malformed manifests

Json = dict


def _set(path: str, value: object) -> Callable[[Json], None]:
    def change(m: Json) -> None:
        *parents, last = path.split("/")
        for key in parents:
            m = m[int(key)] if isinstance(m, list) else m[key]
        if isinstance(m, list):
            m[int(last)] = value
        else:
            m[last] = value

    return change


def _delete(path: str) -> Callable[[Json], None]:
    def change(m: Json) -> None:
        *parents, last = path.split("/")
        for key in parents:
            m = m[int(key)] if isinstance(m, list) else m[key]
        del m[last]

    return change


MALFORMED = [
    (_set("complete", "false"), r"'complete' must be true or false, got the string \"false\""),
    (_set("complete", 0), r"'complete' must be true or false, got the number 0"),
    (_set("data/size", "30"), r"'data\.size' must be an integer >= 0, got the string \"30\""),
    (_set("data/size", -1), r"'data\.size' must be an integer >= 0, got the number -1"),
    (_delete("model/fingerprint"), r"key 'model\.fingerprint' is missing"),
    (_delete("progress/batch_size"), r"key 'progress\.batch_size' is missing"),
    (_delete("skipped"), r"key 'skipped' is missing"),
    (_set("layers/1/channels", True), r"'layers\[1\]\.channels' must be an integer >= 0, got "
     "the boolean true"),
    (_set("layers/0", "0"), r"'layers\[0\]' must be an object, got the string \"0\""),
    (_set("layers/0/nan_counts", {"x": 1}), r"'layers\[0\]\.nan_counts' has key 'x'; keys must "
     r"be channel numbers 0\.\.2"),
    (_set("layers/0/nan_counts", {"3": 1}), r"'layers\[0\]\.nan_counts' has key '3'"),
    (_set("layers/0/nan_counts", {"01": 1}), r"'layers\[0\]\.nan_counts' has key '01'"),
    (_set("layers/0/nan_counts", {"\u00b2": 1}), r"'layers\[0\]\.nan_counts' has key '\u00b2'"),
    (_set("layers/0/nan_counts", {"1": 1.5}), r"'layers\[0\]\.nan_counts\.1' must be an integer"),
    (_set("layers/0/output_shape", [6, "5"]), r"'layers\[0\]\.output_shape\[1\]' must be an int"),
    (_set("input_shape", [1, 8.5, 7]), r"'input_shape\[1\]' must be an integer >= 0, got the "
     "number 8.5"),
    (_set("data/spec/mean", ["a"]), r"'data\.spec\.mean\[0\]' must be a number, got the string"),
    (_set("model/spec/weights", 5), r"'model\.spec\.weights' must be a string, got the number 5"),
    (_set("data/fingerprint", None), r"'data\.fingerprint' must be a string, got null"),
    (_set("skipped", {}), r"'skipped' must be an array, got the object \{\}"),
    (_set("skipped/0/index", "4"), r"'skipped\[0\]\.index' must be an integer"),
    (_set("top_k", 0), r"'top_k' must be an integer >= 1, got the number 0"),
    (_set("progress", None), r"'progress' must be an object, got null"),
    (_set("arrays/sha256", ["x"]), r"'arrays\.sha256' must be a string, got the array \[\"x\"\]"),
    (_set("score", None), r"'score' must be a string, got null"),
    (_set("format_version", True), r"format version True; .* reads versions 1 and 2 only"),
    (_set("format", "other"), r"is not a featurelens-atlas manifest"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "message"), MALFORMED)
def test_a_malformed_manifest_is_refused_naming_the_file_and_the_key(
    change: Callable[[Json], None], message: str, tmp_path: Path
):
    atlas_dir = tmp_path / "atlas"
    shutil.copytree(V1 / "complete", atlas_dir)
    path = atlas_dir / MANIFEST
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value, indent=2))
    with pytest.raises(AtlasError, match=message) as info:
        fl.Atlas.load(atlas_dir)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(AtlasError, match=message):
        Manifest.from_json(path.read_text(), source=str(path))
    with pytest.raises(AtlasError, match="already holds an unreadable atlas manifest"):
        Manifest.check_new_output(atlas_dir)


def test_a_manifest_that_is_not_json_or_not_text_is_refused(tmp_path: Path, capsys):
    atlas_dir = tmp_path / "atlas"
    shutil.copytree(V1 / "complete", atlas_dir)
    path = atlas_dir / MANIFEST
    for content, message in (
        (b"\xff\xfe not utf-8", "is not UTF-8 text"),
        (b"{not json", "is not valid JSON"),
        (b"[1, 2]", "is not a featurelens-atlas manifest"),
    ):
        path.write_bytes(content)
        with pytest.raises(AtlasError, match=message):
            fl.Atlas.load(atlas_dir)
        out = str(tmp_path / "site")
        assert main(["report", str(atlas_dir), "--out", out, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_check_new_output_peeks_without_loading_arrays(tmp_path: Path):
    atlas_dir = tmp_path / "atlas"
    shutil.copytree(V1 / "checkpoint", atlas_dir)
    for npz in atlas_dir.glob("arrays-*.npz"):
        npz.unlink()  # only the manifest is read
    with pytest.raises(AtlasError, match=r"holds an interrupted scan at 16 of 30 examples"):
        Manifest.check_new_output(atlas_dir)
    assert Manifest.peek(tmp_path / "absent") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Manifest.read(tmp_path / "absent")


def test_an_atlas_needs_the_arrays_of_exactly_its_layers():
    atlas = fl.Atlas.load(V1 / "complete")
    with pytest.raises(AtlasError, match=r"exactly its layers \['0', '3'\], got arrays of \['0'\]"):
        fl.Atlas(atlas.manifest, {"0": atlas.layer("0")})
