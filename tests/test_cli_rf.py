"""`featurelens rf`: the table equals the library's values; bad input exits 2 with a message."""

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
