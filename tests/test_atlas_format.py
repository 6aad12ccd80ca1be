"""A validated atlas format: every malformed or hostile atlas gives one AtlasError naming the
file and the key, in bounded memory, before any data it declares is read; the CLI prints one
line; fuzzed manifests never raise anything else; HTML views escape manifest strings."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import featurelens as fl
from featurelens.atlas import LIMITS, MANIFEST, AtlasError, Manifest
from featurelens.cli import main
from featurelens.fingerprint import sha256_hex

Json = dict


class Digits(torch.utils.data.Dataset):
    """12 examples (1, 8, 8) with int labels."""

    def __init__(self) -> None:
        self.x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], i % 3


def base_atlas(directory: Path) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    fl.scan(model.eval(), Digits(), ["1", "3"], top_k=4, progress=False, checkpoint=directory)
    return directory


# --------------------------------------------------------------------------------------------
# Writing hostile array files


def npy_bytes(shape: tuple[int, ...], descr: str = "<f8", data: bytes = b"") -> bytes:
    """A ``.npy`` file whose header says ``shape`` and ``descr``, followed by ``data``."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    pad = (64 - (10 + len(header) + 1) % 64) % 64
    header += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def zip_bytes(members: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """A zip of ``(name, method, stored bytes, crc32, uncompressed size)`` members, written by
    hand (zipfile would compress a bomb member itself, slowly)."""
    out, central = io.BytesIO(), []
    for name, method, data, crc, size in members:
        offset = out.tell()
        raw = name.encode()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc,
                              len(data), size, len(raw), 0) + raw + data)  # fmt: skip
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0,
                                   0x21, crc, len(data), size, len(raw), 0, 0, 0, 0, 0,
                                   offset) + raw)  # fmt: skip
    start = out.tell()
    out.write(b"".join(central))
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members),
                          out.tell() - start, start, 0))  # fmt: skip
    return out.getvalue()


def deflate_bomb(npy_header: bytes, zeros: int) -> tuple[bytes, int, int]:
    """Raw deflate of ``npy_header`` + ``zeros`` zero bytes, built from one compressed 16 MiB
    block repeated (full flushes make blocks independent): ``(data, crc32, size)``."""
    chunk = bytes(1 << 24)
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = head.compress(npy_header) + head.flush(zlib.Z_FULL_FLUSH)
    body = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = body.compress(chunk) + body.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(npy_header)
    for _ in range(zeros // len(chunk)):
        crc = zlib.crc32(chunk, crc)
    data = first + block * (zeros // len(chunk)) + b"\x03\x00"  # an empty final block
    return data, crc, len(npy_header) + zeros


def replace_arrays(directory: Path, members: list[tuple[str, int, bytes, int, int]]) -> None:
    """Write ``members`` as the atlas's array file, named and hashed as a real one would be."""
    data = zip_bytes(members)
    digest = sha256_hex(data)
    for old in directory.glob("arrays-*.npz"):
        old.unlink()
    (directory / f"arrays-{digest[:16]}.npz").write_bytes(data)
    path = directory / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["arrays"] = {"file": f"arrays-{digest[:16]}.npz", "sha256": digest}
    path.write_text(json.dumps(manifest, indent=2))


def stored_members(directory: Path) -> list[tuple[str, int, bytes, int, int]]:
    manifest = json.loads((directory / MANIFEST).read_text())
    with zipfile.ZipFile(directory / manifest["arrays"]["file"]) as zf:
        return [
            (i.filename, 0, zf.read(i), i.CRC, i.file_size) for i in zf.infolist()
        ]  # fmt: skip


def with_member(directory: Path, name: str, data: bytes, method: int = 0, crc=None, size=None):
    members = [m for m in stored_members(directory) if m[0] != name]
    crc = zlib.crc32(data) if crc is None else crc
    members.append((name, method, data, crc, len(data) if size is None else size))
    replace_arrays(directory, members)


# --------------------------------------------------------------------------------------------
# The corpus: each bullet of issue 11's "malformed atlases", and more


def edit_json(change: Callable[[Json], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / MANIFEST
        value = json.loads(path.read_text())
        change(value)
        path.write_text(json.dumps(value, indent=2))

    return apply


def write_manifest(text: bytes) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        (directory / MANIFEST).write_bytes(text)

    return apply


def arrays_symlink(directory: Path) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    name = manifest["arrays"]["file"]
    outside = directory.parent / f"outside-{directory.name}.npz"
    shutil.move(directory / name, outside)
    (directory / name).symlink_to(outside)


def arrays_fifo(directory: Path) -> None:
    """The arrays file is a link to a FIFO: reading it would block for ever."""
    manifest = json.loads((directory / MANIFEST).read_text())
    name = manifest["arrays"]["file"]
    fifo = directory.parent / f"fifo-{directory.name}"
    os.mkfifo(fifo)
    (directory / name).unlink()
    (directory / name).symlink_to(fifo)


def manifest_symlink(directory: Path) -> None:
    outside = directory.parent / f"manifest-{directory.name}.json"
    shutil.move(directory / MANIFEST, outside)
    (directory / MANIFEST).symlink_to(outside)


def compressed_bomb(directory: Path) -> None:
    """A 2 MB member that inflates to 2 GiB: the header the manifest implies, then zeros."""
    header = npy_bytes((3, 4))  # what the manifest says: only the compression gives it away
    data, crc, size = deflate_bomb(header, 2**31)
    with_member(directory, "0.scores.npy", data, zipfile.ZIP_DEFLATED, crc, size)


def header_of_2_40(directory: Path) -> None:
    with_member(directory, "0.scores.npy", npy_bytes((2**40,), data=bytes(64)))


def header_matching_a_huge_manifest(directory: Path) -> None:
    """The manifest and the header agree on 2**20 channels x 12 hits; the member has 64 bytes."""
    edit_json(lambda m: m["layers"][0].update(channels=2**20))(directory)
    edit_json(lambda m: m.update(top_k=12))(directory)
    with_member(directory, "0.indices.npy", npy_bytes((2**20, 12), "<i8", data=bytes(64)))


def one_d_hits(directory: Path) -> None:
    members = {m[0]: m for m in stored_members(directory)}
    indices = np.lib.format.read_array(io.BytesIO(members["0.indices.npy"][2]))
    buf = io.BytesIO()
    np.lib.format.write_array(buf, indices.reshape(-1))
    with_member(directory, "0.indices.npy", buf.getvalue())


def array_values(name: str, change: Callable[[np.ndarray], None]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        members = {m[0]: m for m in stored_members(directory)}
        array = np.lib.format.read_array(io.BytesIO(members[name][2]))
        change(array)
        buf = io.BytesIO()
        np.lib.format.write_array(buf, array)
        with_member(directory, name, buf.getvalue())

    return apply


def unknown_member(directory: Path) -> None:
    with_member(directory, "evil.npy", npy_bytes((1,), data=bytes(8)))


def pickled_member(directory: Path) -> None:
    with_member(directory, "0.scores.npy", npy_bytes((3, 4), descr="|O", data=bytes(96)))


def huge_manifest(directory: Path) -> None:
    with open(directory / MANIFEST, "ab") as fh:
        fh.write(b" " * (LIMITS.manifest_bytes + 1))


def deep_nesting(directory: Path) -> None:
    text = (directory / MANIFEST).read_text()
    (directory / MANIFEST).write_text(
        text.replace('"skipped": []', '"skipped": ' + "[" * 100_000 + "]" * 100_000)
    )


#: name -> (how to break the base atlas, what the message must say)
CORPUS: dict[str, tuple[Callable[[Path], None], str]] = {
    "not-utf8": (write_manifest(b"\xff\xfe{}"), "is not UTF-8 text"),
    "model-null": (edit_json(lambda m: m.update(model=None)), r"'model' must be an object, got null"),
    "data-spec-object": (edit_json(lambda m: m["data"].update(spec=[1])), r"'data\.spec' must be an object"),
    "complete-false-string": (edit_json(lambda m: m.update(complete="false")), r"'complete' must be true or false"),
    "missing-key": (edit_json(lambda m: m.pop("layers")), r"key 'layers' is missing"),
    "size-bool": (edit_json(lambda m: m["data"].update(size=True)), r"'data\.size' must be an integer"),
    "arrays-absolute": (edit_json(lambda m: m["arrays"].update(file="/etc/hostname")), r"'arrays\.file' is '/etc/hostname'; it must be a file name in the atlas directory"),
    "arrays-dotdot": (edit_json(lambda m: m["arrays"].update(file="../../arrays-0123456789abcdef.npz")), r"'arrays\.file' is .*no path, no '\.\.'"),
    "arrays-symlink": (arrays_symlink, r"array file .* is a symbolic link .* refused before reading"),
    "manifest-symlink": (manifest_symlink, r"manifest\.json' is a symbolic link"),
    "compressed-bomb": (compressed_bomb, r"array '0\.scores\.npy' is compressed"),
    "header-2-40": (header_of_2_40, r"array '0\.scores' has shape \(1099511627776,\); the manifest implies \(3, 4\)"),
    "header-agrees-with-huge-manifest": (header_matching_a_huge_manifest, r"array '0\.indices' holds 64 bytes of data; its header says 100663296"),
    "one-d-hits": (one_d_hits, r"array '0\.indices' has shape \(12,\); the manifest implies \(3, 4\)"),
    "pickled-array": (pickled_member, r"array '0\.scores' has dtype object"),
    "unknown-array": (unknown_member, r"holds 'evil\.npy', which is not an array of this atlas"),
    "index-out-of-range": (array_values("0.indices.npy", lambda a: a.__setitem__((0, 0), 10**6)), r"array '0\.indices' holds the dataset index 1000000; the data has 12"),
    "location-outside": (array_values("0.locations.npy", lambda a: a.__setitem__((0, 0, 0), 99)), r"array '0\.locations' holds a location outside the output \(6, 6\)"),
    "nan-counts-lie": (array_values("0.nan_counts.npy", lambda a: a.__setitem__(0, 5)), r"array '0\.nan_counts' differs from the manifest"),
    "labels-lie": (array_values("labels.index.npy", lambda a: a.__setitem__(0, 11 - a[0])), r"array 'labels\.index' is not the sorted dataset indices of the hits"),
    "input-shape-huge": (edit_json(lambda m: m.update(input_shape=[1, 4000, 4000])), r"'input_shape' is \[1, 4000, 4000\]: 16000000 elements per example, more than featurelens handles"),
    "input-shape-axis": (edit_json(lambda m: m.update(input_shape=[1, 2**40])), r"'input_shape\[1\]' must be an integer <= 4194304"),
    "top-k-above-size": (edit_json(lambda m: m.update(top_k=13)), r"'top_k' is 13, more than the 12 examples"),
    "complete-but-not-done": (edit_json(lambda m: m["progress"].update(next_index=8)), r"'complete' is true, but the scan got to 8 of 12"),
    "nan-constant": (write_manifest(b'{"format": "featurelens-atlas", "x": NaN}'), r"is not valid JSON: NaN is not a JSON number"),
    "duplicate-key": (write_manifest(b'{"format": "featurelens-atlas", "format": "featurelens-atlas"}'), r"duplicate key 'format'"),
    "huge-integer": (lambda d: (d / MANIFEST).write_text((d / MANIFEST).read_text().replace('"top_k": 4', '"top_k": ' + "9" * 5000)), r"is not valid JSON"),
    "deep-nesting": (deep_nesting, r"is not valid JSON: nested too deeply"),
    "huge-manifest": (huge_manifest, r"manifest\.json' has \d+ bytes; at most 67108864"),
    "weights-on-a-file-spec": (edit_json(lambda m: m["model"].update(spec={"spec": "x.py:f", "weights": "DEFAULT", "checkpoint": None})), r"'model\.spec' is not a valid model spec: weights 'DEFAULT' apply to torchvision:NAME and timm:NAME specs only"),
    "bad-layout": (edit_json(lambda m: m["layers"][0].update(layout="channels_last")), r"'layers\[0\]\.layout' is 'channels_last' with channel_dim 1"),
    "bad-sample-rate": (edit_json(lambda m: m["data"].update(sample_rate=-3)), r"'data\.sample_rate' must be a positive number"),
    "bad-label-kind": (edit_json(lambda m: m["data"].update(labels="bytes")), r"'data\.labels' must be one of 'int', 'float', 'str'"),
    "unknown-score": (edit_json(lambda m: m.update(score="median")), r"'score' must be one of 'max', 'absmax', 'mean'"),
}  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return base_atlas(tmp_path_factory.mktemp("base") / "atlas")


@pytest.fixture(scope="module")
def corpus(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    out = {}
    for name, (breaks, _) in CORPUS.items():
        shutil.copytree(base, root / name)
        breaks(root / name)
        out[name] = root / name
    return out


def test_the_base_atlas_loads(base: Path):
    atlas = fl.Atlas.load(base)
    assert atlas.label_kind == "int" and atlas.top("1", 0)[0].label is not None


@pytest.mark.parametrize("name", list(CORPUS))
def test_each_malformed_atlas_is_one_atlas_error_naming_file_and_key(
    name: str, corpus: dict[str, Path], capsys
):
    directory = corpus[name]
    with pytest.raises(AtlasError, match=CORPUS[name][1]) as info:
        fl.Atlas.load(directory)
    message = str(info.value)
    assert str(directory) in message and "\n" not in message
    # the CLI: one line, exit 2, no traceback
    out = directory.parent / f"{name}.png"
    assert main(["figure", str(directory), "--layer", "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("featurelens figure: error: ") and err.count("\n") == 1
    assert "Traceback" not in err and not out.exists()


MEMORY_SCRIPT = """
import json, sys
import featurelens as fl
from featurelens.atlas import AtlasError

def peak():
    # the peak resident memory of this process, in bytes. Not getrusage's ru_maxrss: Linux
    # keeps it across exec, so a child of a large pytest worker would report the worker's peak
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

fl.Atlas.load(sys.argv[1])  # a normal atlas: imports, the first allocations
baseline, peaks = peak(), {}
for path in sys.argv[2:]:
    try:
        fl.Atlas.load(path)
    except AtlasError as exc:
        peaks[path] = peak()
    else:
        raise SystemExit(f"{path} loaded")
print(json.dumps({"baseline": baseline, "peaks": peaks}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/status and FIFOs: Linux")
def test_hostile_atlases_are_refused_in_bounded_memory(base: Path, corpus: dict[str, Path]):
    fifo = base.parent / "fifo-atlas"
    shutil.copytree(base, fifo)
    arrays_fifo(fifo)  # a regression would block here: the subprocess has a timeout
    paths = [str(p) for p in corpus.values()] + [str(fifo)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(fl.__file__).resolve().parent.parent)
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(base), *paths],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.splitlines()[-1])
    growth = {
        Path(p).name: (v - measured["baseline"]) / 2**20 for p, v in measured["peaks"].items()
    }
    # the bomb inflates to 2 GiB and the 2**40 header declares 8 TiB: none of it is allocated
    assert max(growth.values()) < 32, growth
    assert set(growth) == {*CORPUS, "fifo-atlas"}


# --------------------------------------------------------------------------------------------
# Fuzzed manifests: AtlasError or a loaded atlas, never another exception

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)  # fmt: skip


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(manifest: Json, path: tuple, action: str, value: object) -> Json:
    manifest = json.loads(json.dumps(manifest))
    if not path:
        return value if action == "replace" else manifest  # type: ignore[return-value]
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "replace":
        parent[last] = value
    elif isinstance(parent, dict):
        parent[str(value)[:10]] = value
    return manifest


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_manifests_give_atlas_error_or_load(data, base: Path, tmp_path: Path):
    original = json.loads((base / MANIFEST).read_text())
    mutated = original
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(mutated)))
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        mutated = _mutate(mutated, path, action, data.draw(json_values))
    text = json.dumps(mutated)
    with contextlib.suppress(AtlasError):
        Manifest.from_json(text, source="fuzzed")
    directory = tmp_path / "fuzzed"
    if not directory.exists():
        shutil.copytree(base, directory)
    (directory / MANIFEST).write_text(text)
    with contextlib.suppress(AtlasError):
        fl.Atlas.load(directory, allow_incomplete=True)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_bytes_are_an_atlas_error(raw):
    with pytest.raises(AtlasError):
        Manifest.from_json(raw, source="random")


# --------------------------------------------------------------------------------------------
# HTML views escape every string of a manifest


def test_repr_html_escapes_every_manifest_string(base: Path, tmp_path: Path):
    directory = tmp_path / "scripted"
    shutil.copytree(base, directory)
    script = "<script>alert(1)</script>"
    edit_json(
        lambda m: (m["model"].update({"class": script}), m["data"].update({"class": script}))
    )(directory)
    html = fl.Atlas.load(directory)._repr_html_()
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
