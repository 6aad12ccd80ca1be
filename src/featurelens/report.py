"""The static HTML atlas: ``featurelens report ATLAS_DIR --out DIR``.

Writes a site that opens from disk without a server (relative links only, no scripts)::

    DIR/index.html                     model, data, scan settings; per layer its receptive
                                       field (size, stride, padding), channel count, sheet
                                       and page link; the skipped examples and why
    DIR/layer-<slug>.html              one card per channel: its Zeiler-Fergus grid, its hits
                                       (rank, dataset index, score, location, label) and the
                                       histogram of their labels
    DIR/img/<slug>/sheet.png           the layer sheet (top-1 of every channel)
    DIR/img/<slug>/channel-<NNNN>.png  channel NNNN's grid (4 digits: channel-0007.png)
    DIR/audio/example-<i>-<a>-<b>.wav  signals with a sample rate: samples a..b of example i,
                                       a hit's receptive-field window inside the input
    DIR/style.css

``<slug>`` is the layer's dotted name with every character other than ``A-Z a-z 0-9 _ . -``
replaced by ``_`` (``-<position>`` appended when two layers give the same slug).

Images carry ``loading="lazy"`` and their size, so a page of 512 cards stays usable. The
projections are batched over many channels per call (:func:`featurelens.figures.project_hits`)
and a tqdm bar counts channels. The atlas directory is only read. Every file is written
through a temporary file and ``os.replace`` (a browser or a killed run never sees half a
file); the site is built in a temporary folder beside DIR and moved into place only when
complete (:func:`featurelens.files.replaced_directory`), so an earlier report's pages, images
and clips are replaced whole and a failed run leaves nothing partial. Every text that comes from the atlas or the model (layer names, specs, class
names, labels, errors of skipped examples) is HTML-escaped, in text and in attributes.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featurelens._public import public
from featurelens.atlas import Atlas, AtlasError
from featurelens.errors import ReportError
from featurelens.figures import (
    DEFAULT_METHOD,
    atlas_sample_rate,
    check_render_options,
    figure_from_batch,
    format_label,
    hit_captions,
    layer_field,
    normalisation,
    other_activations_note,
    project_hits,
    sheet_title,
    top_hits,
    zf_title,
)
from featurelens.files import atomic_write, replaced_directory
from featurelens.receptive_field import ReceptiveField
from featurelens.render import (
    SheetTiles,
    as_signal,
    get_signal_view,
    get_style,
    is_signal_shape,
)

__all__ = ["ReportError", "write_report"]

EXAMPLES_PER_CALL = 288  # hits projected per project() call (32 channels of top 9)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


@dataclass(frozen=True)
class _LayerInfo:
    name: str
    slug: str
    channels: list[int]
    total_channels: int
    output_shape: tuple[int, ...]
    rf: ReceptiveField | None
    rf_error: str | None = None

    @property
    def page(self) -> str:
        return f"layer-{self.slug}.html"

    @property
    def img_dir(self) -> str:
        return f"img/{self.slug}"


@dataclass(frozen=True)
class _Options:
    """How every picture and page of a report is made (one record for the writers)."""

    method: str
    style: str
    k: int
    other_activations: str
    signal_view: str
    mean: Any
    std: Any
    device: Any
    sample_rate: float | None
    signal: bool  # inputs drawn as signals (rows), not images

    @property
    def notes(self) -> tuple[str, ...]:
        """Caption lines of every figure (other activations passed as plain gradients)."""
        note = other_activations_note(self.method, self.other_activations)
        return (note,) if note else ()

    @property
    def audio(self) -> bool:
        """Whether each hit's window is written as a WAV clip (signals with a sample rate)."""
        return self.signal and bool(self.sample_rate)


def is_within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


@public
def write_report(
    atlas: Atlas | str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    data: Any = None,
    method: str = DEFAULT_METHOD,
    style: str = "rgb",
    k: int | None = None,
    layers: Sequence[str] | None = None,
    channels: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    other_activations: str = "error",
    signal_view: str = "waveform",
    trust_code: bool = False,
    visualize: bool | Mapping[str, Any] = False,
) -> Path:
    """Write the HTML atlas of ``atlas`` into ``out``; returns the path of ``index.html``.

    The site is built in a temporary folder next to ``out`` and moved into place only when it
    is complete (:func:`featurelens.files.replaced_directory`): a report that fails or is
    interrupted leaves no partial directory, and an earlier report in ``out`` is replaced
    whole (atomically on Linux). Files in ``out`` that a report does not write are kept.

    Parameters
    ----------
    atlas
        An :class:`~featurelens.Atlas` or its directory (then model and data are rebuilt from
        its manifest unless given).
    out
        Output directory (created); must not be the atlas directory or inside it.
    model, data
        The scanned model and dataset; default :meth:`Atlas.build_model` / ``build_data``.
    method, style
        Projection method (:data:`featurelens.rules.METHODS`, default
        :data:`featurelens.rules.DEFAULT_METHOD`) and style
        (:data:`featurelens.render.STYLES`).
    k
        Hits per channel (default: the atlas' top_k).
    layers
        Only these layers (default: all of the atlas).
    channels
        Only the first ``channels`` channels of each layer (default: all).
    device
        Where the projections run. A model passed in must already live there; one rebuilt
        from the atlas is moved there.
    progress
        Show a tqdm bar counting channels.
    trust_code
        Rebuild model and data from an atlas that this user did not make on this machine
        (:meth:`Atlas.build_model`): only for atlases from a source you trust.
    other_activations
        Under ``deconvnet``/``guided``: ``"error"`` (default) or ``"gradient"`` to pass
        activations that are not rectifiers (GELU, SiLU, ...) as plain gradients, as for
        :func:`featurelens.project`; every page and figure then says so.
    signal_view
        Signals only: a key of :data:`featurelens.render.SIGNAL_VIEWS` (``waveform``,
        ``spectrogram``).

    visualize
        Add to every channel card the synthetic input that maximises the channel's centre unit
        (:func:`featurelens.visualize`, one batched optimisation per layer, on the unit's
        receptive-field crop). True for the defaults, or a mapping of
        :func:`featurelens.visualize`'s keyword arguments (``steps``, ``lr``, ``seed``,
        ``regularizers``, ...).

    Returns
    -------
    Path
        ``out/index.html``.

    Raises
    ------
    FileNotFoundError, AtlasError
        No atlas, an incomplete scan (resume it first), another format version.
    UntrustedAtlasError
        Rebuilding would run code the atlas names, and it is not trusted (``trust_code``).
    LayerError, ValueError
        A layer the atlas lacks (the valid ones are listed), an unknown method, style,
        signal view or ``other_activations``, a spectrogram of images, ``out`` inside the
        atlas directory (:class:`ReportError`).
    ActivationError
        An activation without a rule for ``method`` (pass ``other_activations="gradient"``).
    """
    method, style = check_render_options(method, style, other_activations, signal_view)
    out = Path(out)
    atlas_dir = None
    if not isinstance(atlas, Atlas):
        atlas_dir = Path(atlas)
        atlas = Atlas.load(atlas_dir)
        if is_within(out, atlas_dir):
            raise ReportError(
                f"--out {str(out)!r} is the atlas directory {str(atlas_dir)!r} or inside it; "
                "rendering never writes into an atlas: choose another directory"
            )
    if not atlas.complete:
        raise AtlasError(
            "the atlas holds an incomplete scan: resume it (`featurelens scan ... --resume`) "
            "before rendering"
        )
    check_render_options(method, style, other_activations, signal_view, atlas.input_shape)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be a positive int, got {k!r}")
    if channels is not None and (not isinstance(channels, int) or channels < 1):
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    chosen_layers = list(atlas.layers) if layers is None else list(layers)
    for name in chosen_layers:
        atlas.layer(name)  # a LayerError listing the atlas' layers
    source = atlas_dir if atlas_dir is not None else atlas.directory
    if source is not None and is_within(source, out):
        entry = Path(os.path.relpath(Path(source).resolve(), out.resolve())).parts[0]
        if _is_report_entry(entry):
            raise ReportError(
                f"the atlas {str(source)!r} lies inside --out {str(out)!r} under {entry!r}, "
                "which a report replaces: choose another directory"
            )
    if model is None:
        model = atlas.build_model(trust_code=trust_code)
        if device is not None:  # our own copy: it may live where the projections run
            model.to(device)
    if data is None:
        data = atlas.build_data(trust_code=trust_code)
    k = atlas.top_k if k is None else min(k, atlas.top_k)
    mean, std = normalisation(atlas, None, None)
    options = _Options(
        method=method,
        style=style,
        k=k,
        other_activations=other_activations,
        signal_view=signal_view,
        mean=mean,
        std=std,
        device=device,
        sample_rate=atlas_sample_rate(atlas),
        signal=is_signal_shape(tuple(atlas.input_shape)[1:]),
    )

    infos: list[_LayerInfo] = []
    slugs: set[str] = set()
    for i, name in enumerate(chosen_layers):
        slug = _safe(name)
        if slug in slugs:
            slug = f"{slug}-{i}"
        slugs.add(slug)
        total = atlas.channels(name)
        picked = list(range(total if channels is None else min(channels, total)))
        rf, err = layer_field(model, atlas.input_shape, name)  # refuses channels-last layers
        infos.append(
            _LayerInfo(name, slug, picked, total, tuple(atlas.output_shape(name)), rf, err)
        )

    final = out
    with replaced_directory(final, _is_report_entry, last=("index.html",)) as out:
        atomic_write(out / "style.css", _CSS.encode())
        from tqdm.auto import tqdm

        bar = tqdm(
            total=sum(len(info.channels) for info in infos),
            unit="channel",
            desc="report",
            disable=not progress,
        )
        sheets: dict[str, tuple[int, int] | None] = {}
        clips = _Clips(out, options) if options.audio else None
        try:
            for info in infos:
                sheets[info.name] = _write_layer(
                    out,
                    model,
                    data,
                    atlas,
                    info,
                    options,
                    bar,
                    infos,
                    clips,
                    synthetic=_synthetic_layer(
                        out, model, atlas, info, visualize, device, progress
                    ),
                )
        finally:
            bar.close()
        page = _index_page(atlas, atlas_dir, infos, sheets, options)
        atomic_write(out / "index.html", page.encode())
    return final / "index.html"


def _is_report_entry(name: str) -> bool:
    """Whether ``name`` (an entry of an output directory) is something a report writes."""
    return name in ("index.html", "style.css", "img", "audio") or bool(
        re.fullmatch(r"layer-.+\.html", name)
    )


def _write_layer(
    out: Path,
    model: nn.Module,
    data: Any,
    atlas: Atlas,
    info: _LayerInfo,
    options: _Options,
    bar: Any,
    infos: list[_LayerInfo],
    clips: _Clips | None,
    synthetic: Mapping[int, str] | None = None,
) -> tuple[int, int] | None:
    img_dir = out / info.img_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    cards: list[str] = []
    widths = [0]
    style = get_style(options.style)
    sheet = SheetTiles(style, get_signal_view(options.signal_view), options.mean, options.std)
    written: set[str] = set()
    k = options.k
    per_call = max(1, EXAMPLES_PER_CALL // k)
    for start in range(0, len(info.channels), per_call):
        chunk = info.channels[start : start + per_call]
        units: list[tuple[int, Any]] = []  # (channel, hit)
        spans: list[Any] = []
        for c in chunk:
            hits = top_hits(atlas, info.name, c, k)
            spans.append((c, len(units), len(units) + len(hits), hits))
            units.extend((c, h) for h in hits)
        batch = project_hits(
            model, data, info.name, units, info.rf, options.method, options.device,
            other_activations=options.other_activations,
        )  # fmt: skip
        firsts = [lo for _, lo, _, _ in spans]
        idx = torch.tensor(firsts, dtype=torch.long)
        sheet.add(
            batch.examples[idx],
            batch.projections[idx],
            [batch.boxes[i] for i in firsts],
            [str(c) for c in chunk],
        )
        for c, lo, hi, hits in spans:
            title = zf_title(info.name, c, options.method, options.style, info.rf)
            fig = figure_from_batch(
                batch, slice(lo, hi), title, options.style, options.mean, options.std,
                captions=hit_captions(hits, options.signal), notes=options.notes,
                signal_view=options.signal_view, sample_rate=options.sample_rate,
            )  # fmt: skip
            name = f"channel-{c:04d}.png"
            atomic_write(img_dir / name, fig.to_png())
            written.add(name)
            audio = None
            if clips is not None:
                audio = [
                    clips.write(batch.examples[row], batch.boxes[row], hit.index)
                    for row, hit in zip(range(lo, hi), hits)
                ]
            histogram = _label_histogram(atlas, info.name, c, k)
            cards.append(
                _card(
                    info,
                    c,
                    hits,
                    f"{info.img_dir}/{name}",
                    fig.image.size,
                    audio,
                    histogram,
                    (synthetic or {}).get(c, ""),
                )
            )
            widths.append(fig.image.size[0])
            bar.update(1)
    sheet_size = None
    if len(sheet):
        figure = sheet.render(
            sheet_title(info.name, options.method, options.style, info.rf),
            notes=options.notes,
            sample_rate=options.sample_rate,
        )
        atomic_write(img_dir / "sheet.png", figure.to_png())
        written.add("sheet.png")
        sheet_size = figure.image.size
    written.update(f"synthetic-{c:04d}.png" for c in (synthetic or {}))
    _remove_stale_images(img_dir, written)
    page = _layer_page(atlas, info, infos, cards, sheet_size, options, max(widths))
    atomic_write(out / info.page, page.encode())
    return sheet_size


class _Clips:
    """The WAV clips of a report: each hit's receptive-field window inside its example, at the
    atlas' sample rate, written once per (example, window) under ``audio/``.
    """

    def __init__(self, out: Path, options: _Options) -> None:
        self.dir = out / "audio"
        self.options = options
        self.written: set[str] = set()

    def write(self, example: torch.Tensor, box: Any, index: int) -> str | None:
        """The page-relative path of the clip of ``box`` (unclipped) in ``example``
        ``(C, *spatial)``; None when the window holds no sample of the input.
        """
        import numpy as np

        x = example.detach().to("cpu", torch.float64).numpy()
        signal = as_signal(x[None], x[None], [box])
        if signal is None:  # pragma: no cover - clips are only made for signals
            return None
        samples, _, (window,), _ = signal
        samples = samples[0]  # (C, L)
        (first, last) = window[0]
        lo, hi = max(int(first), 0), min(int(last), samples.shape[1] - 1)
        if hi < lo:
            return None
        name = f"example-{int(index)}-{lo}-{hi}.wav"
        if name not in self.written:
            values = samples[:, lo : hi + 1]
            if self.options.mean is not None and self.options.std is not None:
                c = values.shape[0]
                m = np.broadcast_to(np.asarray(self.options.mean, dtype=np.float64), (c,))
                s = np.broadcast_to(np.asarray(self.options.std, dtype=np.float64), (c,))
                values = values * s[:, None] + m[:, None]
            self.dir.mkdir(parents=True, exist_ok=True)
            rate = float(self.options.sample_rate or 0)  # clips are made only with a rate
            atomic_write(self.dir / name, wav_bytes(values.mean(axis=0), rate))
            self.written.add(name)
        return f"audio/{name}"


def wav_bytes(samples: Any, sample_rate: float) -> bytes:
    """A mono 16-bit PCM WAV of ``samples`` (1-D floats), peak-normalised to 0.9 of full scale
    (silence stays silent), at ``sample_rate`` rounded to whole hertz. No timestamps: the same
    samples give the same bytes.
    """
    import io
    import wave

    import numpy as np

    v = np.nan_to_num(np.asarray(samples, dtype=np.float64))
    peak = float(np.abs(v).max()) if v.size else 0.0
    pcm = np.round(v / peak * 0.9 * 32767) if peak > 0 else np.zeros(v.shape)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(max(1, round(sample_rate)))
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


def _label_histogram(atlas: Atlas, layer: str, channel: int, k: int) -> Any:
    """The label histogram of the channel's top ``k`` (:meth:`Atlas.label_histogram`), None
    when the atlas records no labels. Integer labels with more than
    :data:`MAX_LABEL_CATEGORIES` distinct values among the hits are binned like floats.
    """
    if getattr(atlas, "label_kind", None) is None:
        return None
    histogram = atlas.label_histogram(layer, channel, k)
    if histogram.kind == "int" and len(histogram.bins) > MAX_LABEL_CATEGORIES:
        histogram = atlas.label_histogram(layer, channel, k, bins="auto")
    return histogram


MAX_LABEL_CATEGORIES = 12
"""Integer labels are counted one bar per label up to this many distinct values, else binned."""


def _remove_stale_images(img_dir: Path, written: set[str]) -> None:
    """Delete the images an earlier report left in ``img_dir`` that this one did not write.

    Only names this module writes are touched (``channel-*.png``, ``synthetic-*.png``,
    ``sheet.png``): a report
    with fewer channels must not leave pictures of channels it no longer lists.
    """
    for path in img_dir.iterdir():
        ours = path.name == "sheet.png" or re.fullmatch(r"(channel|synthetic)-\d+\.png", path.name)
        if ours and path.name not in written and path.is_file():
            path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _shape(shape: Sequence[int | None]) -> str:
    return " x ".join(str(v) for v in shape) if len(shape) else "-"


def _rf_cells(info: _LayerInfo) -> str:
    if info.rf is None:
        return (
            f'<td colspan="3" class="muted">not computable: {_e(info.rf_error)}; figures show '
            "the whole input</td>"
        )
    rf = info.rf
    if rf.is_global:
        return f"<td>global ({_e(_shape(rf.input_shape))})</td><td>-</td><td>-</td>"
    if not rf.regular:
        return '<td colspan="3">irregular (past upsampling): exact per location</td>'
    return (
        f"<td>{_e(_shape(rf.size))}</td><td>{_e(_shape(rf.stride))}</td>"
        f"<td>{_e(_shape(rf.padding))}</td>"
    )


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n"
        '<link rel="stylesheet" href="style.css">\n</head>\n<body>\n'
        f"{body}\n</body>\n</html>\n"
    )


def _model_text(atlas: Atlas) -> tuple[str, str]:
    spec = atlas.model_spec
    if spec is None:
        name = f"{atlas.manifest.model.class_name} (Python object, no spec)"
    else:
        name = spec.spec
        if spec.weights:
            name += f" (weights {spec.weights})"
    ckpt = spec.checkpoint if spec is not None and spec.checkpoint else "-"
    return name, ckpt


def _data_text(atlas: Atlas) -> str:
    spec = atlas.data_spec
    if spec is None:
        return f"{atlas.manifest.data.class_name} (Python object, no spec)"
    text = spec.spec
    if spec.mean is not None and spec.std is not None:
        mean = ", ".join(f"{v:g}" for v in spec.mean)
        std = ", ".join(f"{v:g}" for v in spec.std)
        text += f" (normalised: mean {mean}, std {std})"
    return text


def _projection_text(options: _Options) -> str:
    """The projections' settings, HTML-escaped: method, style, hits, other activations."""
    text = f"{_e(options.method)}, style {_e(options.style)}, {options.k} hits per channel"
    if options.signal:
        text += f", signals as {_e(options.signal_view)}"
    for note in options.notes:
        text += f"; {_e(note)}"
    return text


def _skipped_html(atlas: Atlas, limit: int = 100) -> str:
    """The examples the scan skipped and why (their errors escaped), the first ``limit``."""
    skipped = list(atlas.skipped)
    if not skipped:
        return ""
    rows = "".join(
        f"<tr><td>{_e(s.index)}</td><td><code>{_e(s.error)}</code></td></tr>"
        for s in skipped[:limit]
    )
    more = f'<p class="muted">and {len(skipped) - limit} more</p>' if len(skipped) > limit else ""
    return (
        f"<details><summary>{len(skipped)} skipped example(s)</summary>"
        '<table class="skipped"><thead><tr><th>example</th><th>error</th></tr></thead>'
        f"<tbody>{rows}</tbody></table>{more}</details>\n"
    )


def _index_page(
    atlas: Atlas,
    atlas_dir: Path | None,
    infos: list[_LayerInfo],
    sheets: dict[str, tuple[int, int] | None],
    options: _Options,
) -> str:
    m = atlas.manifest
    model_name, ckpt = _model_text(atlas)
    rows = []
    for info in infos:
        size = sheets.get(info.name)
        thumb = "-"
        if size is not None:
            w, h = size
            tw = min(w, 360)
            th = max(1, round(h * tw / w))
            thumb = (
                f'<a href="{_e(info.page)}"><img class="thumb" src="{_e(info.img_dir)}/sheet.png" '
                f'width="{tw}" height="{th}" loading="lazy" alt="sheet of {_e(info.name)}"></a>'
            )
        shown = len(info.channels)
        count = str(info.total_channels)
        if shown < info.total_channels:
            count += f" ({shown} drawn)"
        rows.append(
            f'<tr><td><a href="{_e(info.page)}"><code>{_e(info.name)}</code></a></td>'
            f"<td>{_e(count)}</td><td>{_e(_shape(info.output_shape))}</td>"
            f"{_rf_cells(info)}<td>{thumb}</td></tr>"
        )
    fingerprint = m.model.fingerprint
    rate = options.sample_rate
    facts = [
        ("model", f"<code>{_e(model_name)}</code>"),
        ("checkpoint", f"<code>{_e(ckpt)}</code>"),
        ("parameters", f"<code>{_e(fingerprint[:23])}…</code>" if fingerprint else "-"),
        ("data", f"<code>{_e(_data_text(atlas))}</code>"),
        ("examples", f"{_e(m.examples_scanned)} of {_e(atlas.data_size)} scanned, "
                     f"{len(atlas.skipped)} skipped"),
        ("input", _e(_shape(atlas.input_shape))),
        ("sample rate", f"{_e(format_label(float(rate)))} Hz" if rate else None),
        ("labels", _e(getattr(atlas, "label_kind", None)) if getattr(atlas, "label_kind", None)
         else None),
        ("score", f"{_e(atlas.score)}, top {_e(atlas.top_k)} per channel"),
        ("projections", _projection_text(options)),
        ("atlas", f"<code>{_e(atlas_dir)}</code>" if atlas_dir else "-"),
        ("made by", f"featurelens {_e(m.library_version)}"),
    ]  # fmt: skip
    dl = "".join(f"<dt>{a}</dt><dd>{b}</dd>" for a, b in facts if b is not None)
    body = (
        "<header><h1>featurelens atlas</h1>"
        '<p class="lead">For every channel of every scanned layer: its top examples, each '
        "shown as the input patch inside the unit's receptive field next to the unit's "
        "projection (Zeiler &amp; Fergus 2014).</p></header>\n<main>\n"
        f'<dl class="facts">{dl}</dl>\n'
        + _skipped_html(atlas)
        + '<h2>Layers</h2>\n<table class="layers"><thead><tr><th>layer</th><th>channels</th>'
        "<th>output</th><th>receptive field</th><th>stride</th><th>padding</th>"
        "<th>top-1 of every channel</th></tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table>\n</main>"
    )
    return _page("featurelens atlas", body)


def _histogram_html(histogram: Any) -> str:
    """A channel's label histogram as a small table of bars (``<meter>``), escaped."""
    if histogram is None:
        return ""
    items = histogram.items()
    total = sum(c for _, c in items) + histogram.missing
    last = len(items) - 1
    rows = []
    for i, (b, count) in enumerate(items):
        if isinstance(b, tuple):  # a float interval, closed on the right for the last one
            low, high = (format_label(float(v)) for v in b)
            name = f"[{low}, {high}{']' if i == last else ')'}"
        else:
            name = format_label(b)
        rows.append(
            f'<tr><td>{_e(name)}</td><td><meter min="0" max="{total}" '
            f'value="{count}"></meter></td><td>{count}</td></tr>'
        )
    if histogram.missing:
        rows.append(
            f'<tr><td class="muted">no label (NaN)</td><td><meter min="0" max="{total}" '
            f'value="{histogram.missing}"></meter></td><td>{histogram.missing}</td></tr>'
        )
    return (
        '<table class="labels"><caption>labels of these hits</caption>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _card(
    info: _LayerInfo,
    channel: int,
    hits: list,
    src: str,
    size: tuple[int, int],
    audio: list[str | None] | None = None,
    histogram: Any = None,
    extra: str = "",
) -> str:
    labels = [getattr(h, "label", None) for h in hits]
    with_labels = any(lab is not None for lab in labels)
    rows = []
    for r, h in enumerate(hits):
        cells = (
            f"<tr><td>{r + 1}</td><td>{_e(h.index)}</td><td>{_e(f'{h.score:.4g}')}</td>"
            f"<td>({_e(', '.join(map(str, h.location)))})</td>"
        )
        if with_labels:
            lab = labels[r]
            cells += f"<td>{'-' if lab is None else _e(format_label(lab))}</td>"
        if audio is not None:
            clip = audio[r]
            cells += (
                f'<td><audio controls preload="none" src="{_e(clip)}"></audio></td>'
                if clip
                else "<td>-</td>"
            )
        rows.append(cells + "</tr>")
    head = "<th>rank</th><th>example</th><th>score</th><th>location</th>"
    if with_labels:
        head += "<th>label</th>"
    if audio is not None:
        head += "<th>window</th>"
    w, h = size
    return (
        f'<section class="card" id="channel-{channel}">'
        f'<h3><a href="#channel-{channel}">channel {channel}</a></h3>'
        f'<img src="{_e(src)}" width="{w}" height="{h}" loading="lazy" '
        f'alt="Zeiler-Fergus grid of {_e(info.name)} channel {channel}">{extra}'
        f'<table class="hits"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody>'
        f"</table>{_histogram_html(histogram)}</section>"
    )


def _layer_page(
    atlas: Atlas,
    info: _LayerInfo,
    infos: list[_LayerInfo],
    cards: list[str],
    sheet_size: tuple[int, int] | None,
    options: _Options,
    card_width: int,
) -> str:
    i = infos.index(info)
    nav = ['<a href="index.html">atlas index</a>']
    if i > 0:
        nav.append(f'<a href="{_e(infos[i - 1].page)}">← {_e(infos[i - 1].name)}</a>')
    if i + 1 < len(infos):
        nav.append(f'<a href="{_e(infos[i + 1].page)}">{_e(infos[i + 1].name)} →</a>')
    if info.rf is None:
        rf_text = (
            f"receptive field not computable ({_e(info.rf_error)}): figures show the whole "
            "input as the box of every unit"
        )
    elif info.rf.is_global:
        rf_text = "receptive field: the whole input"
    elif not info.rf.regular:
        rf_text = "receptive field irregular (past upsampling): figures show the whole input"
    else:
        rf_text = (
            f"receptive field {_e(_shape(info.rf.size))}, stride {_e(_shape(info.rf.stride))}, "
            f"padding {_e(_shape(info.rf.padding))}"
        )
    jump = " ".join(f'<a href="#channel-{c}">{c}</a>' for c in info.channels)
    sheet = ""
    if sheet_size is not None:
        w, h = sheet_size
        sheet = (
            "<details open><summary>top-1 of every channel</summary>"
            f'<img class="sheet" src="{_e(info.img_dir)}/sheet.png" width="{w}" height="{h}" '
            f'loading="lazy" alt="layer sheet of {_e(info.name)}"></details>'
        )
    shown = len(info.channels)
    count = f"{info.total_channels} channels" + (
        f", the first {shown} drawn" if shown < info.total_channels else ""
    )
    method, style, k = _e(options.method), _e(options.style), options.k
    if options.signal:
        how = (
            f"One row per example, best first: the input over the unit's receptive-field "
            f"window (on the row's own axis), and under it the {method} projection of the unit "
            f"at the example's maximum (style {style}, view {_e(options.signal_view)})."
        )
        if options.audio:
            how += " Each window plays in the table (peak-normalised)."
    else:
        how = (
            f"Left block: the {method} projection of the unit at each example's maximum (style "
            f"{style}); right block: the input patch under the unit's receptive field, in the "
            "same order (row by row, best first)."
        )
    notes = "".join(f" {_e(n)}." for n in options.notes)
    body = (
        f"<nav>{' · '.join(nav)}</nav>\n"
        f"<header><h1><code>{_e(info.name)}</code></h1>"
        f'<p class="lead">{count} · output {_e(_shape(info.output_shape))} · {rf_text}</p>'
        f'<p class="lead">Each card: the top {k} examples of the channel by {_e(atlas.score)} '
        f"score. {how} A checkerboard marks the part of a box outside the input.{notes}</p>"
        "</header>\n<main>\n"
        f'<p class="jump">channels: {jump}</p>\n{sheet}\n'
        f'<div class="cards" style="--card-w: {card_width + 26}px">\n'
        + "\n".join(cards)
        + "\n</div>\n</main>"
    )
    return _page(f"{info.name} · featurelens atlas", body)


_CSS = """\
:root { color-scheme: light; --fg: #222; --muted: #666; --line: #ddd; --card: #fafafa; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
       margin: 0 auto; padding: 16px 24px 48px; max-width: 1500px; }
h1 { font-size: 1.6em; margin: 0.3em 0; }
h2 { font-size: 1.25em; margin-top: 1.5em; }
h3 { font-size: 1em; margin: 0 0 6px; }
a { color: #0b57d0; text-decoration: none; }
a:hover { text-decoration: underline; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.95em; }
nav { font-size: 0.95em; margin-bottom: 8px; }
.lead { color: var(--muted); max-width: 70em; margin: 0.3em 0; }
.muted { color: var(--muted); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 4px 10px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { font-weight: 600; }
table.layers td:nth-child(n+2):nth-child(-n+6) { white-space: nowrap; }
img { max-width: 100%; height: auto; }
img.thumb { border: 1px solid var(--line); }
details { margin: 12px 0 20px; }
summary { cursor: pointer; color: var(--muted); }
img.sheet { display: block; margin-top: 8px; }
.jump { font-size: 0.9em; line-height: 1.9; word-spacing: 4px; }
.cards { display: grid;
         grid-template-columns: repeat(auto-fill, minmax(min(100%, var(--card-w, 420px)), 1fr));
         gap: 16px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px;
        padding: 10px 12px; min-width: 0; }
.card img { display: block; margin-bottom: 6px; }
table.hits { font-size: 0.85em; font-variant-numeric: tabular-nums; }
table.hits td, table.hits th { padding: 1px 8px; }
table.hits audio { height: 24px; width: 150px; }
table.labels { font-size: 0.8em; margin-top: 6px; }
table.labels caption { text-align: left; color: var(--muted); }
table.labels td { padding: 0 6px; border: 0; }
table.skipped { font-size: 0.85em; }
figure.synthetic { margin: 0 0 6px; }
figure.synthetic img { image-rendering: pixelated; border: 1px solid var(--line); }
figure.synthetic figcaption { font-size: 0.85em; color: var(--muted); }
"""


# --------------------------------------------------------------------------------------------
# Synthetic inputs (--visualize): what each channel's centre unit wants


def _synthetic_layer(
    out: Path,
    model: nn.Module,
    atlas: Atlas,
    info: _LayerInfo,
    options: bool | Mapping[str, Any],
    device: Any,
    progress: bool,
) -> dict[int, str]:
    """Optimise the drawn channels of one layer in one batch; write their PNGs; HTML per card.

    Returns ``{channel: <figure> html}``; empty when ``options`` is False.
    """
    if options is False or options is None:
        return {}
    from featurelens.figures import synthetic_images

    given = {} if options is True else dict(options)
    v = synthetic_images(
        model, atlas, info.name, info.channels, device=device, options=given, progress=progress
    )
    img_dir = out / info.img_dir
    img_dir.mkdir(parents=True, exist_ok=True)
    top1 = {c: top_hits(atlas, info.name, c, 1)[0].score for c in info.channels}
    html_by_channel = {}
    for c, tile, act in zip(v.channels, v.tiles(), v.activations.tolist()):
        name = f"synthetic-{c:04d}.png"
        atomic_write(img_dir / name, _png(tile))
        html_by_channel[c] = _synthetic_html(v, c, act, top1[c], f"{info.img_dir}/{name}", tile)
    return html_by_channel


def _png(rgb: Any) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def _synthetic_html(v: Any, channel: int, act: float, top1: float, src: str, tile: Any) -> str:
    """The card's figure: the synthetic input, its unit's value against the top-1 example's."""
    where = "channel mean" if v.location is None else f"unit {tuple(v.location)}"
    if v.cropped:
        box = ", ".join(f"{s.start}:{s.stop}" for s in v.box)
        canvas = f"receptive-field crop [{box}]"
    else:
        canvas = "whole input" + (f" ({v.fallback})" if v.fallback else "")
    value = "dead: never moved" if channel in v.dead else f"{act:.4g}"
    low, high = v.value_range.low, v.value_range.high
    rng = f"{low[0]:.3g}..{high[0]:.3g}" if len(low) == 1 else "per channel"
    h, w = tile.shape[:2]
    return (
        f'<figure class="synthetic"><img src="{_e(src)}" width="{w}" height="{h}" '
        f'loading="lazy" alt="synthetic input of {_e(v.layer)} channel {channel}">'
        f"<figcaption>synthetic input ({v.steps} steps, values {_e(rng)}): {_e(where)} = "
        f"{_e(value)} (top-1 example scored {top1:.4g}) · {_e(canvas)}</figcaption></figure>"
    )
