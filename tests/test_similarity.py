"""The sanity checks' similarity measures against the reference implementations.

``featurelens.similarity`` is our own numpy code; scipy's ``spearmanr`` and scikit-image's
``structural_similarity`` and ``hog`` (test-only dependencies) are the references.
"""

from __future__ import annotations

import numpy as np
import pytest

from featurelens import similarity as S

scipy_stats = pytest.importorskip("scipy.stats")
skimage_metrics = pytest.importorskip("skimage.metrics")
skimage_feature = pytest.importorskip("skimage.feature")


def _pair(shape: tuple[int, ...], seed: int, noise: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape)
    return a, a + noise * rng.normal(size=shape)


@pytest.mark.parametrize("seed", range(4))
def test_rank_matches_scipy_rankdata_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    v = np.round(rng.normal(size=200), 1)  # many ties
    assert np.array_equal(S.rank(v), scipy_stats.rankdata(v))


@pytest.mark.parametrize("shape", [(3, 40, 37), (1, 28, 28), (2, 50), (1, 6, 7, 8)])
def test_spearman_matches_scipy(shape: tuple[int, ...]) -> None:
    a, b = _pair(shape, 1)
    a[..., :3] = 0  # ties, as zero borders give
    b[..., :3] = 0
    ref = scipy_stats.spearmanr(a.ravel(), b.ravel())[0]
    assert S.spearman(a, b) == pytest.approx(ref, abs=1e-12)
    # the two map-level measures: the paper's normalisations, then scipy's rank correlation
    ga, gb = S.grayscale(a), S.grayscale(b)
    assert S.SIMILARITIES["spearman_abs"].compare(a, b) == pytest.approx(
        scipy_stats.spearmanr(ga.ravel(), gb.ravel())[0], abs=1e-12
    )
    da, db = S.diverging(a), S.diverging(b)
    assert S.SIMILARITIES["spearman"].compare(a, b) == pytest.approx(
        scipy_stats.spearmanr(da.ravel(), db.ravel())[0], abs=1e-12
    )


def test_a_constant_map_has_no_rank_correlation() -> None:
    a = np.zeros((1, 10, 10))
    b = np.random.default_rng(0).normal(size=(1, 10, 10))
    assert np.isnan(S.spearman(a, b))
    assert np.isnan(S.SIMILARITIES["spearman_abs"].compare(a, b))


def test_normalisations_are_the_papers() -> None:
    m = np.random.default_rng(2).normal(size=(3, 30, 20))
    a = np.abs(m).sum(0)
    p = np.percentile(a, 99)
    assert np.allclose(S.grayscale(m), np.clip((a - a.min()) / (p - a.min()), 0, 1))
    s = m.sum(0)
    span = abs(np.percentile(s, 99))
    assert np.allclose(S.diverging(m), np.clip((s + span) / (2 * span), -1, 1))
    u = S.unit_range(m)
    assert u.min() == 0 and u.max() == 1 and S.unit_range(np.ones((1, 3, 3))).max() == 0


@pytest.mark.parametrize(
    "shape", [(3, 40, 37), (1, 64, 64), (3, 11, 12), (2, 5, 9), (1, 30), (2, 12, 13, 14)]
)
def test_ssim_matches_scikit_image(shape: tuple[int, ...]) -> None:
    a, b = _pair(shape, 3)
    ua, ub = S.unit_range(a), S.unit_range(b)
    sigma = S.ssim_sigma(shape[1:])
    ref = skimage_metrics.structural_similarity(
        ua, ub, channel_axis=0, gaussian_weights=True, sigma=sigma, data_range=1.0
    )
    assert S.ssim(ua, ub) == pytest.approx(ref, abs=1e-12)
    assert S.SIMILARITIES["ssim"].compare(a, b) == pytest.approx(ref, abs=1e-12)
    assert S.ssim(ua, ua) == pytest.approx(1.0)


def test_ssim_window_is_the_papers_on_large_maps_and_nan_on_tiny_ones() -> None:
    assert S.ssim_sigma((11, 40)) == 1.5  # gaussian_weights=True in the paper's call
    assert S.ssim_sigma((224, 224)) == 1.5
    assert S.ssim_sigma((5, 9)) == pytest.approx(0.6)
    assert S.ssim_sigma((2, 9)) is None
    assert np.isnan(S.ssim(np.zeros((1, 2, 9)), np.ones((1, 2, 9))))


@pytest.mark.parametrize("shape", [(1, 64, 64), (3, 40, 37), (3, 11, 12), (1, 96, 50)])
def test_hog_matches_scikit_image(shape: tuple[int, ...]) -> None:
    a, b = _pair(shape, 4)
    ua, ub = S.unit_range(a), S.unit_range(b)
    cell = S.hog_cell(shape[1:])
    assert cell is not None

    def ref(u: np.ndarray) -> np.ndarray:
        if u.shape[0] == 1:
            return skimage_feature.hog(u[0], pixels_per_cell=(cell, cell))
        return skimage_feature.hog(
            np.moveaxis(u, 0, -1), pixels_per_cell=(cell, cell), channel_axis=-1
        )

    ra, rb = ref(ua), ref(ub)
    # skimage sums each cell's magnitudes in single precision: agreement to ~1e-7
    np.testing.assert_allclose(S.hog(ua, cell), ra, rtol=1e-5, atol=1e-6)
    assert S.SIMILARITIES["hog"].compare(a, b) == pytest.approx(
        scipy_stats.spearmanr(ra, rb)[0], abs=1e-3
    )


def test_hog_uses_the_papers_cells_and_is_nan_where_undefined() -> None:
    assert S.hog_cell((224, 224)) == 16  # pixels_per_cell=(16, 16) in the paper's code
    assert S.hog_cell((44, 44)) == 14
    assert S.hog_cell((5, 40)) is None
    assert S.hog_cell((40,)) is None and S.hog_cell((8, 8, 8)) is None
    assert np.isnan(S.SIMILARITIES["hog"].compare(np.ones((1, 50)), np.zeros((1, 50))))
    with pytest.raises(ValueError, match="smaller than one HOG block"):
        S.hog(np.zeros((10, 10)), cell=16)


def test_every_measure_is_one_for_equal_maps() -> None:
    a, _ = _pair((3, 48, 48), 5)
    for sim in S.SIMILARITIES.values():
        assert sim.compare(a, a) == pytest.approx(1.0), sim.name


def test_measures_can_tell_unrelated_maps_apart() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(3, 64, 64)), rng.normal(size=(3, 64, 64))
    near = a + 0.3 * rng.normal(size=a.shape)
    for sim in S.SIMILARITIES.values():
        assert sim.compare(a, near) > sim.compare(a, b) + 0.3, sim.name
    # Unrelated noise: the pixel-wise measures are near 0. HOG is not: the zero gradients on
    # the border (central differences) put every map's border cells in the same bins, so two
    # unrelated maps share that part of their features (skimage's hog does the same).
    for name in ("spearman_abs", "spearman", "ssim"):
        assert abs(S.SIMILARITIES[name].compare(a, b)) < 0.1, name
