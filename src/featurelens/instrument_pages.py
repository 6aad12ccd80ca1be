"""Pictures and pages of the trust instruments: effective-field heat maps, sanity-check pages.

Arrays in, PIL images and static HTML out (the ``figures`` extra: Pillow and matplotlib):

* :func:`erf_heatmap`: an :class:`~featurelens.effective_field.EffectiveReceptiveField` as a
  heat map with the boxes holding 50 % and 95 % of its mass and the theoretical field;
* :func:`sanity_curves` and :func:`sanity_grid`: a :class:`~featurelens.sanity.SanityResult`
  as the similarity curves per method and the grid of maps of Adebayo et al. 2018, figure 2;
* :func:`write_sanity_page`: both in one static HTML page (every string escaped, no script).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from featurelens.files import atomic_write
from featurelens.similarity import SIMILARITIES, grayscale

if TYPE_CHECKING:  # effective_field imports this module for notebooks' heat maps: no cycle
    from featurelens.sanity import SanityResult

__all__ = [
    "erf_heatmap",
    "input_patch",
    "png_bytes",
    "png_data_uri",
    "sanity_curves",
    "sanity_grid",
    "write_sanity_page",
]

HEAT_TARGET = 192
"""Display pixels of the longer side of a heat map (integer enlargement, nearest neighbour)."""
CELL_TARGET = 96
"""Display pixels of the longer side of a cell of the sanity grid."""
COLORMAP = "inferno"
BOX_COLORS = {"theoretical": (255, 255, 255), "95%": (79, 195, 247), "50%": (129, 199, 132)}
"""Outline colours of the boxes drawn on heat maps (the page's legend names them)."""


def png_bytes(image: Image.Image) -> bytes:
    """``image`` as PNG bytes (no timestamps: the same image gives the same bytes)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def png_data_uri(image: Image.Image) -> str:
    """``image`` as a ``data:image/png;base64,...`` URI, for self-contained HTML."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def _to_2d(values: np.ndarray) -> np.ndarray:
    """A map of 1 to 3 axes as a 2-D picture: 1-D as a band, 3-D summed over its first axis."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        return np.repeat(v[None, :], max(4, len(v) // 16), axis=0)
    if v.ndim == 3:
        return v.sum(axis=0)
    return v


def _colour(unit: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB through the colour map."""
    import matplotlib

    rgba = matplotlib.colormaps[COLORMAP](np.clip(unit, 0.0, 1.0))
    return np.round(rgba[..., :3] * 255).astype(np.uint8)


def _fit(rgb: np.ndarray, target: int) -> tuple[Image.Image, float]:
    """``(h, w, 3)`` uint8 -> an image whose longer side is about ``target``, and its scale.

    Small maps are enlarged by a whole factor (nearest neighbour: a pixel stays a square),
    large ones reduced by averaging.
    """
    h, w = rgb.shape[:2]
    image = Image.fromarray(rgb, "RGB")
    longer = max(h, w)
    if longer <= target:
        scale = max(1, target // longer)
        return image.resize((w * scale, h * scale), Image.Resampling.NEAREST), float(scale)
    scale = target / longer
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image.resize(size, Image.Resampling.BOX), scale


def input_patch(
    example: Any,
    region: tuple[slice, ...],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Image.Image:
    """The ``region`` of an input ``(C, *spatial)`` as a picture (un-normalised when given
    ``mean`` and ``std``), sized like a cell of the sanity grid; 3-D inputs summed over depth.
    """
    from featurelens.render import render_patch

    rgb = render_patch(example[(slice(None), *region)], mean, std)  # (*region, 3)
    if rgb.ndim == 2:  # 1-D: a band
        rgb = np.repeat(rgb[None], max(4, rgb.shape[0] // 16), axis=0)
    elif rgb.ndim == 4:
        rgb = rgb.mean(axis=0)
    return _fit(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), CELL_TARGET)[0]


# --------------------------------------------------------------------------------------------
# Effective receptive fields


def erf_heatmap(erf: Any, target: int = HEAT_TARGET) -> Image.Image:
    """An :class:`~featurelens.effective_field.EffectiveReceptiveField` as a heat map, scaled to
    its peak (typed ``Any``: effective_field imports this module, so this one cannot import it).

    Outlines (:data:`BOX_COLORS`): the unit's theoretical field clipped to the input (white),
    the boxes holding 95 % and 50 % of the mass. 1-D maps are drawn as a band, 3-D maps summed
    over their first axis.
    """
    mass = np.asarray(erf.map, dtype=np.float64)
    peak = float(mass.max())
    picture = _to_2d(mass / peak if peak > 0 else mass)
    image, scale = _fit(_colour(picture / max(picture.max(), 1e-300)), target)
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[str, tuple[tuple[int, int], ...]]] = []
    if erf.field is not None and not erf.note:
        region = erf.field.region(erf.location)
        boxes.append(("theoretical", tuple((sl.start, sl.stop - 1) for sl in region)))
    boxes += [("95%", erf.boxes[0.95]), ("50%", erf.boxes[0.5])]
    for name, box in boxes:
        if len(box) == 1:  # a band: the box spans its height
            (c0, c1), (r0, r1) = box[0], (0, picture.shape[0] - 1)
        else:
            (r0, r1), (c0, c1) = box[-2], box[-1]
        draw.rectangle(
            (c0 * scale, r0 * scale, (c1 + 1) * scale - 1, (r1 + 1) * scale - 1),
            outline=BOX_COLORS[name],
            width=max(1, round(scale / 4)) if scale >= 1 else 1,
        )
    return image


# --------------------------------------------------------------------------------------------
# Sanity checks


def sanity_curves(result: SanityResult, mode: str = "cascading") -> Image.Image:
    """One panel per similarity measure: the mean over units per step, a line per method."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    steps = result.steps
    fig = Figure(figsize=(3.2 * len(SIMILARITIES), 2.2 + 0.09 * max(len(s) for s in steps)))
    axes = fig.subplots(1, len(SIMILARITIES), sharey=True)
    x = np.arange(len(steps))
    for ax, measure in zip(np.atleast_1d(axes), SIMILARITIES):
        for method in result.methods:
            ax.plot(x, result.curve(method, measure, mode), "o-", lw=1.5, ms=3, label=method)
        ax.axhline(0.0, color="0.6", lw=0.8, ls="--")
        ax.set_title(measure, fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels(steps, rotation=90, fontsize=7)
        ax.set_ylim(-0.25, 1.05)
        ax.tick_params(axis="y", labelsize=7)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{mode} randomisation: similarity to the trained network's maps", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _cell(values: np.ndarray) -> Image.Image:
    """One map ``(C, *region)`` as the paper shows it: the absolute-value grayscale picture."""
    gray = _to_2d(grayscale(values))
    rgb = np.repeat(np.round(gray * 255).astype(np.uint8)[..., None], 3, axis=-1)
    return _fit(rgb, CELL_TARGET)[0]


def sanity_grid(result: SanityResult, unit: int = 0, mode: str = "cascading") -> list[list[str]]:
    """The grid of figure 2 for one kept unit: per method, the PNG data URI of every step.

    Rows are methods, columns ``"original"`` and then each randomisation step; each cell is
    the unit's absolute-value map over its region (:func:`featurelens.similarity.grayscale`).

    Raises
    ------
    IndexError
        ``unit`` is not one of the units whose maps were kept.
    """
    rows = []
    for method in result.methods:
        maps = result.maps[(mode, method)]
        if not 0 <= unit < len(maps):
            raise IndexError(
                f"unit {unit} has no kept maps: the result keeps units 0..{len(maps) - 1}"
            )
        rows.append([png_data_uri(_cell(step)) for step in maps[unit]])
    return rows


_CSS = """\
body { font: 15px/1.45 system-ui, sans-serif; color: #222; margin: 0 auto; padding: 16px 24px;
       max-width: 1500px; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #ddd; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid th { font-weight: 500; font-size: 0.75em; max-width: 110px; overflow-wrap: anywhere; }
.grid td { padding: 2px; }
.muted { color: #666; }
img { max-width: 100%; height: auto; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def write_sanity_page(
    result: SanityResult,
    out: str | Path,
    *,
    title: str = "Sanity checks",
    about: str = "",
    patches: Sequence[Image.Image | None] | None = None,
    labels: Sequence[str] | None = None,
) -> Path:
    """Write ``out/index.html`` and its PNGs: curves per method, tables, grids of maps.

    Parameters
    ----------
    result
        What :func:`featurelens.sanity` returned.
    out
        A directory (created if needed).
    title, about
        The page's heading and a sentence under it (escaped).
    patches
        Per kept unit, a picture of its input region to show beside its grid (or None).
    labels
        Per kept unit, how the page names it (default: layer, channel, location, example).

    Returns
    -------
    Path
        ``out/index.html``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{_e(title)}</h1>"]
    if about:
        parts.append(f"<p class='muted'>{_e(about)}</p>")
    parts.append(
        "<p>Adebayo et al. 2018: the layers that reach the units are randomised from the top "
        "down (cascading) or one at a time (independent), and each unit's map is compared with "
        "its map on the trained network over the unit's receptive field. A method whose maps "
        "stay alike while the weights become random shows the input more than the network. "
        "Measures: "
        + "; ".join(f"<b>{_e(n)}</b>: {_e(s.summary)}" for n, s in SIMILARITIES.items())
        + ". Curves are means over units (NaN where undefined left out).</p>"
    )
    for mode in result.modes:
        name = f"curves-{mode}.png"
        atomic_write(out / name, png_bytes(sanity_curves(result, mode)))
        parts.append(f"<h2>{_e(mode.capitalize())} randomisation</h2>")
        parts.append(f'<img alt="{_e(mode)} curves" src="{_e(name)}">')
        for measure in SIMILARITIES:
            head = "".join(f"<th>{_e(s)}</th>" for s in result.steps)
            body = "".join(
                f"<tr><td>{_e(m)}</td>"
                + "".join(f'<td class="num">{v:.3f}</td>' for v in result.curve(m, measure, mode))
                + "</tr>"
                for m in result.methods
            )
            parts.append(
                f"<details><summary>{_e(measure)} table</summary><table><thead><tr>"
                f"<th>method</th>{head}</tr></thead><tbody>{body}</tbody></table></details>"
            )
    kept = len(next(iter(result.maps.values()), ()))
    if kept:
        parts.append("<h2>Maps (cascading randomisation, as the paper's figure 2)</h2>")
        mode = "cascading" if "cascading" in result.modes else result.modes[0]
        for k in range(kept):
            u = result.units[k]
            label = (
                labels[k]
                if labels is not None
                else f"{u.layer} channel {u.channel} at {u.location}, example {result.rows[k]}"
            )
            grid = sanity_grid(result, k, mode)
            head = "".join(f"<th>{_e(s)}</th>" for s in result.steps)
            patch = patches[k] if patches is not None and k < len(patches) else None
            input_head = "<th>input</th>" if patch is not None else ""
            rows = []
            for method, cells in zip(result.methods, grid):
                first = (
                    f'<td><img alt="input" src="{png_data_uri(patch)}"></td>'
                    if patch is not None
                    else ""
                )
                rows.append(
                    f"<tr><th>{_e(method)}</th>{first}"
                    + "".join(f'<td><img alt="{_e(method)}" src="{c}"></td>' for c in cells)
                    + "</tr>"
                )
            parts.append(
                f"<h3>{_e(label)}</h3><table class='grid'><thead><tr><th></th>{input_head}"
                f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            )
    if result.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in result.notes))
        parts.append("</ul>")
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>\n{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )
    return atomic_write(out / "index.html", page.encode("utf-8"))
