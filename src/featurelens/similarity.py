"""How alike two projection maps are, measured as Adebayo et al. 2018 measure it.

"Sanity Checks for Saliency Maps" (Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, NeurIPS
2018, arXiv 1810.03292) compares the map of a unit on the trained network with its map on a
network whose weights were randomised, by four numbers (section 3 and the authors' released
notebooks, whose normalisations we follow):

=================  ===========================================================================
``spearman_abs``   Spearman rank correlation of the *absolute-value* maps: ``sum_c |m_c|``
                   over input channels, scaled to ``[0, 1]`` between its minimum and its 99th
                   percentile and clipped (:func:`grayscale`, the paper's visualisation).
``spearman``       Spearman rank correlation of the *signed* maps: ``sum_c m_c`` scaled by the
                   absolute 99th percentile and clipped (:func:`diverging`).
``ssim``           Structural similarity (Wang et al. 2004) of the maps scaled to ``[0, 1]``
                   between their minimum and maximum (:func:`unit_range`), channels averaged,
                   Gaussian weights of sigma 1.5 (:func:`ssim`).
``hog``            Rank correlation of the histograms of oriented gradients (Dalal & Triggs
                   2005) of the same ``[0, 1]`` maps, 16-pixel cells (:func:`hog`). The paper's
                   text says Pearson; its released code, which made its figures, ranks.
=================  ===========================================================================

Every function here is our own numpy code; ``tests/test_similarity.py`` checks them against
``scipy.stats.spearmanr``, ``skimage.metrics.structural_similarity`` and
``skimage.feature.hog``. Maps are ``(C, *spatial)`` arrays with 1 to 3 spatial axes.

A number that is not defined is NaN, never a made-up value: a correlation with a constant map
(no order to compare), SSIM on a map shorter than 3 on an axis, HOG on anything but a 2-D map
of at least 6 x 6. Small maps get a smaller Gaussian window or smaller HOG cells than the
paper's 224-pixel images did (see :func:`ssim_sigma` and :func:`hog_cell`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SIMILARITIES",
    "Similarity",
    "diverging",
    "grayscale",
    "hog",
    "hog_cell",
    "hog_similarity",
    "pearson",
    "rank",
    "spearman",
    "ssim",
    "ssim_sigma",
    "unit_range",
]

PERCENTILE = 99.0
"""The percentile :func:`grayscale` and :func:`diverging` scale by (the paper's)."""

SSIM_SIGMA = 1.5
"""The Gaussian weights of SSIM (Wang et al. 2004, and the paper's ``gaussian_weights=True``)."""
SSIM_TRUNCATE = 3.5  # window radius = int(3.5 * sigma + 0.5), as scipy.ndimage and skimage

HOG_CELL = 16
"""Pixels per HOG cell side in the paper (``pixels_per_cell=(16, 16)``)."""
HOG_BLOCK = 3  # cells per block side (skimage's default, which the paper kept)
HOG_ORIENTATIONS = 9
HOG_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Correlations


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks ``1..n`` of a 1-D array, ties sharing the mean of their ranks.

    The ``"average"`` method of ``scipy.stats.rankdata``: ``[3, 1, 3]`` -> ``[2.5, 1, 2.5]``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    # Start of each run of equal values, in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], v.size]
    mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    out = np.empty(v.size, dtype=np.float64)
    out[order] = np.repeat(mean_rank, ends - starts)
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays of equal size; NaN when either is constant."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"arrays of {x.size} and {y.size} values cannot be correlated")
    x = x - x.mean()
    y = y - y.mean()
    den = np.sqrt(np.dot(x, x) * np.dot(y, y))
    if x.size < 2 or den == 0 or not np.isfinite(den):
        return float("nan")
    return float(np.clip(np.dot(x, y) / den, -1.0, 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (Pearson of average ranks), as ``scipy.stats.spearmanr``."""
    return pearson(rank(a), rank(b))


# --------------------------------------------------------------------------------------------
# The paper's normalisations: (C, *spatial) -> a map


def grayscale(m: np.ndarray, percentile: float = PERCENTILE) -> np.ndarray:
    """``(C, *spatial) -> (*spatial)``: ``sum_c |m_c|`` in ``[0, 1]``, clipped at a percentile.

    ``(a - min a) / (p99(a) - min a)`` clipped to ``[0, 1]``, the absolute-value picture of the
    paper (PAIR saliency's ``VisualizeImageGrayscale``). All zeros when the percentile equals
    the minimum.
    """
    a = np.abs(np.asarray(m, dtype=np.float64)).sum(axis=0)
    lo, hi = a.min(), np.percentile(a, percentile)
    if hi <= lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def diverging(m: np.ndarray, percentile: float = PERCENTILE) -> np.ndarray:
    """``(C, *spatial) -> (*spatial)``: ``sum_c m_c`` scaled by its percentile, signs kept.

    ``(s + p) / (2 p)`` clipped to ``[-1, 1]`` with ``p = |p99(s)|``, the signed picture of the
    paper (PAIR saliency's ``VisualizeImageDiverging``). All zeros when ``p`` is 0.
    """
    s = np.asarray(m, dtype=np.float64).sum(axis=0)
    span = abs(float(np.percentile(s, percentile)))
    if span == 0:
        return np.zeros_like(s)
    return np.clip((s + span) / (2 * span), -1.0, 1.0)


def unit_range(m: np.ndarray) -> np.ndarray:
    """``(m - min) / (max - min)`` over the whole array; all zeros when it is constant."""
    a = np.asarray(m, dtype=np.float64)
    lo, hi = a.min(), a.max()
    if hi <= lo:
        return np.zeros_like(a)
    return (a - lo) / (hi - lo)


# --------------------------------------------------------------------------------------------
# SSIM


def ssim_sigma(spatial: tuple[int, ...]) -> float | None:
    """The Gaussian sigma SSIM uses on maps of this spatial shape, None when too small.

    The paper's 1.5 (an 11-wide window) when every axis has at least 11 values; on smaller
    maps the largest window that fits, ``2r + 1`` with ``r = (shortest - 1) // 2``, and
    ``sigma = 1.5 r / 5`` so that ``int(3.5 sigma + 0.5) == r``. None below 3 values.
    """
    r = min(5, (min(spatial) - 1) // 2)
    if r < 1:
        return None
    return SSIM_SIGMA * r / 5


def _gaussian(sigma: float) -> np.ndarray:
    radius = int(SSIM_TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 / sigma**2 * x**2)
    return w / w.sum()


def _valid_filter(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable filter over every axis of ``x``, keeping only positions the window fits in.

    ``scipy.ndimage.gaussian_filter`` followed by skimage's crop of ``(len(w) - 1) // 2`` per
    side gives the same values: those positions never read the padding.
    """
    k = len(w)
    for axis in range(x.ndim):
        n = x.shape[axis] - k + 1
        parts = [np.take(x, np.arange(j, j + n), axis=axis) * w[j] for j in range(k)]
        x = np.sum(parts, axis=0)
    return x


def ssim(
    a: np.ndarray,
    b: np.ndarray,
    data_range: float = 1.0,
    sigma: float | None = None,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Mean structural similarity of two ``(C, *spatial)`` maps, channels averaged.

    Gaussian-weighted means, variances and covariance (sample covariance, as the paper's call
    of ``skimage``'s ``compare_ssim(..., gaussian_weights=True)``), averaged over the positions
    where the whole window fits. Equals ``skimage.metrics.structural_similarity(a, b,
    channel_axis=0, gaussian_weights=True, sigma=sigma, data_range=data_range)``.

    Parameters
    ----------
    a, b
        Maps of equal shape ``(C, *spatial)``.
    data_range
        The range the maps' values span (1 for maps from :func:`unit_range`).
    sigma
        The Gaussian's sigma; default :func:`ssim_sigma` of the spatial shape.

    Returns
    -------
    float
        In ``[-1, 1]``, 1 for equal maps; NaN when the map is too small for a window.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"maps of shapes {x.shape} and {y.shape} cannot be compared")
    sigma = ssim_sigma(x.shape[1:]) if sigma is None else sigma
    if sigma is None:
        return float("nan")
    w = _gaussian(sigma)
    if min(x.shape[1:]) < len(w):
        return float("nan")
    n_window = len(w) ** (x.ndim - 1)
    cov_norm = n_window / (n_window - 1)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    scores = []
    for xc, yc in zip(x, y):
        ux, uy = _valid_filter(xc, w), _valid_filter(yc, w)
        uxx, uyy = _valid_filter(xc * xc, w), _valid_filter(yc * yc, w)
        uxy = _valid_filter(xc * yc, w)
        vx = cov_norm * (uxx - ux * ux)
        vy = cov_norm * (uyy - uy * uy)
        vxy = cov_norm * (uxy - ux * uy)
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        scores.append(s.mean())
    return float(np.mean(scores))


# --------------------------------------------------------------------------------------------
# HOG


def hog_cell(spatial: tuple[int, ...]) -> int | None:
    """Pixels per HOG cell side for maps of this 2-D shape, None when HOG is not defined.

    The paper's 16 when both sides hold a block of 3 x 3 such cells (48 pixels); on smaller
    maps ``shortest // 3`` so that one block fits; None for 1-D or 3-D maps and below 6 pixels.
    """
    if len(spatial) != 2:
        return None
    cell = min(HOG_CELL, min(spatial) // HOG_BLOCK)
    return cell if cell >= 2 else None


def _gradients(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Central differences along rows and columns of ``(C, H, W)``, zero on the border."""
    g_row = np.zeros_like(image)
    g_col = np.zeros_like(image)
    g_row[:, 1:-1, :] = image[:, 2:, :] - image[:, :-2, :]
    g_col[:, :, 1:-1] = image[:, :, 2:] - image[:, :, :-2]
    return g_row, g_col


def hog(
    image: np.ndarray,
    cell: int = HOG_CELL,
    block: int = HOG_BLOCK,
    orientations: int = HOG_ORIENTATIONS,
) -> np.ndarray:
    """Histogram-of-oriented-gradients features of a ``(C, H, W)`` or ``(H, W)`` map.

    Dalal & Triggs 2005 as ``skimage.feature.hog`` computes them (its defaults but the cell):
    central-difference gradients, at each pixel the channel with the largest gradient
    magnitude; unsigned orientations in ``orientations`` bins of ``[0, 180)`` degrees; per
    ``cell x cell`` cell the magnitudes of each bin summed and divided by the cell's area;
    blocks of ``block x block`` cells, L2-Hys normalised.

    Returns
    -------
    np.ndarray
        ``(n_blocks_row * n_blocks_col * block * block * orientations,)``, skimage's order.

    Raises
    ------
    ValueError
        A map smaller than one block (``block * cell`` pixels) on an axis.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3:
        raise ValueError(f"HOG needs a (C, H, W) or (H, W) map, got shape {np.shape(image)}")
    _, h, w = img.shape
    n_rows, n_cols = h // cell, w // cell
    if n_rows < block or n_cols < block:
        raise ValueError(
            f"a {h} x {w} map is smaller than one HOG block of {block} x {block} cells of "
            f"{cell} pixels"
        )
    g_row, g_col = _gradients(img)
    magnitude = np.hypot(g_row, g_col)
    strongest = magnitude.argmax(axis=0)[None]  # first channel on ties, as numpy's argmax
    g_row = np.take_along_axis(g_row, strongest, axis=0)[0]
    g_col = np.take_along_axis(g_col, strongest, axis=0)[0]
    magnitude = np.hypot(g_row, g_col)
    angle = np.rad2deg(np.arctan2(g_row, g_col)) % 180
    width = 180.0 / orientations
    bins = np.floor(angle / width).astype(np.int64)
    bins[angle < bins * width] -= 1  # the exact comparisons of bin edges, not the division's
    bins[angle >= (bins + 1) * width] += 1
    bins = np.clip(bins, 0, orientations - 1)
    # Only whole cells count; each pixel votes its magnitude into its cell and bin.
    magnitude = magnitude[: n_rows * cell, : n_cols * cell]
    bins = bins[: n_rows * cell, : n_cols * cell]
    rows = np.arange(n_rows * cell) // cell
    cols = np.arange(n_cols * cell) // cell
    index = (rows[:, None] * n_cols + cols[None, :]) * orientations + bins
    hist = np.bincount(
        index.ravel(), weights=magnitude.ravel(), minlength=n_rows * n_cols * orientations
    ).reshape(n_rows, n_cols, orientations) / (cell * cell)
    windows = np.lib.stride_tricks.sliding_window_view(hist, (block, block), axis=(0, 1))
    blocks = np.moveaxis(windows, 2, -1)  # (n_br, n_bc, block, block, orientations)
    norm = np.sqrt((blocks**2).sum(axis=(2, 3, 4), keepdims=True) + HOG_EPS**2)
    blocks = np.minimum(blocks / norm, 0.2)
    norm = np.sqrt((blocks**2).sum(axis=(2, 3, 4), keepdims=True) + HOG_EPS**2)
    return (blocks / norm).ravel()


def hog_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of the HOG features of two ``(C, H, W)`` maps (:func:`hog`).

    The cell is :func:`hog_cell` of the maps' shape; NaN where HOG is not defined.
    """
    x = np.asarray(a, dtype=np.float64)
    cell = hog_cell(tuple(x.shape[1:]))
    if cell is None:
        return float("nan")
    return spearman(hog(x, cell), hog(b, cell))


# --------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class Similarity:
    """One way of comparing a unit's original map with its map on a randomised network.

    Attributes
    ----------
    name
        Its key in :data:`SIMILARITIES`.
    compare
        ``compare(original, randomised) -> float`` on ``(C, *spatial)`` maps; NaN when not
        defined for these maps.
    summary
        One line for tables and ``--help``.
    """

    name: str
    compare: Callable[[np.ndarray, np.ndarray], float]
    summary: str


SIMILARITIES: dict[str, Similarity] = {
    s.name: s
    for s in (
        Similarity(
            "spearman_abs",
            lambda a, b: spearman(grayscale(a), grayscale(b)),
            "rank correlation of the absolute-value maps",
        ),
        Similarity(
            "spearman",
            lambda a, b: spearman(diverging(a), diverging(b)),
            "rank correlation of the signed maps",
        ),
        Similarity(
            "ssim",
            lambda a, b: ssim(unit_range(a), unit_range(b)),
            "structural similarity of the maps scaled to [0, 1]",
        ),
        Similarity(
            "hog",
            lambda a, b: hog_similarity(unit_range(a), unit_range(b)),
            "rank correlation of the HOG features of the maps scaled to [0, 1] (2-D only)",
        ),
    )
}
"""The similarity measures of a sanity check, in the paper's order."""
