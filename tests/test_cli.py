"""The command line: `featurelens rf` tables equal the library; every failure is one line, exit 2."""

from __future__ import annotations

import textwrap

import torchvision

import featurelens as fl
from featurelens.cli import main


def test_rf_table_matches_library(capsys):
    assert main(["rf", "torchvision:resnet18", "--input-shape", "3,224,224"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in out[2:]}
    fields = fl.receptive_fields(torchvision.models.resnet18(weights=None), (3, 224, 224))
    assert list(rows) == list(fields)
    rf = fields["layer3"]
    fmt = "x".join
    expected = [fmt(map(str, t)) for t in (rf.output_shape, rf.size, rf.stride, rf.padding)]
    assert rows["layer3"][:4] == expected
    assert rows["fc"][-1] == "global"


def test_rf_from_a_file_factory_and_one_layer(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text(
        textwrap.dedent(
            """
            from torch import nn
            def make():
                return nn.Sequential(nn.Conv1d(1, 4, 5, stride=2), nn.ReLU(), nn.Conv1d(4, 4, 3))
            """
        )
    )
    assert main(["rf", f"{path}:make", "--input-shape", "1,100", "--layer", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].split()[:5] == ["2", "46", "9", "2", "0"]


def test_rf_bad_inputs_exit_2(capsys):
    assert (
        main(["rf", "torchvision:resnet18", "--input-shape", "3,224,224", "--layer", "layr1"]) == 2
    )
    assert "Did you mean 'layer1'" in capsys.readouterr().err
    assert main(["rf", "torchvision:resnet1800", "--input-shape", "3,224,224"]) == 2
    assert "unknown torchvision model 'resnet1800'" in capsys.readouterr().err
    assert main(["rf", "nowhere.py:make", "--input-shape", "3,8,8"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_version(capsys):
    import pytest

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"featurelens {fl.__version__}"


def test_unknown_weights_list_the_valid_ones(capsys):
    assert main(["rf", "torchvision:resnet18", "--input-shape", "3,64,64", "--weights", "FOO"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown weights 'FOO' for resnet18; valid: DEFAULT" in err


def test_a_checkpoint_that_does_not_fit_is_one_line(tmp_path, capsys):
    import torch

    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    args = ["rf", "torchvision:alexnet", "--input-shape", "3,64,64", "--checkpoint", str(path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not fit model 'torchvision:alexnet'" in err


def test_unexpected_errors_are_one_line_too(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text("def make():\n    raise RuntimeError('factory broke\\nsecond line')\n")
    assert main(["rf", f"{path}:make", "--input-shape", "1,8,8"]) == 2
    assert capsys.readouterr().err == "featurelens rf: error: RuntimeError: factory broke\n"


def test_device_and_port_are_checked_before_anything_runs(capsys):
    import pytest
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as info:
            main(["scan", "torchvision:resnet18", "mnist", "--layers", "layer1", "--out", "x",
                  "--device", "cuda"])  # fmt: skip
        assert info.value.code == 2
        assert "this machine has no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "x", "--port", "99999"])
    assert "'99999' is not a port: use 0..65535" in capsys.readouterr().err
