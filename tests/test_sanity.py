"""Sanity checks (Adebayo et al. 2018): randomised copies, the caller's model, the curves.

References: the parameters themselves (which layers changed at each step), plain autograd for
the maps, scipy's ``spearmanr`` for the scores, and Quantus' model-parameter randomisation
test (``quantus.MPRT``, test-only) on the same model, units and randomisation.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SmallCNN, assert_unchanged, snapshot
from featurelens import LayerError, Unit, receptive_field
from featurelens.errors import ChannelError, DataError, UsageError
from featurelens.rules import METHODS
from featurelens.sanity import MODES, randomisation_order, randomisations, sanity
from featurelens.similarity import SIMILARITIES

scipy_stats = pytest.importorskip("scipy.stats")


def _small() -> nn.Module:
    model = SmallCNN()
    model(torch.zeros(1, 1, 28, 28))
    return model.eval()


def _changed(model: nn.Module, reference: dict[str, torch.Tensor]) -> set[str]:
    """Modules with a parameter that differs from ``reference`` (a state dict)."""
    now = model.state_dict()
    return {k.rpartition(".")[0] for k, v in reference.items() if not torch.equal(now[k], v)}


def test_randomisation_order_is_what_reaches_the_units_top_first() -> None:
    model = _small()
    assert randomisation_order(model, ["features.3"]) == (["features.3", "features.0"], [])
    assert randomisation_order(model, ["head.1"])[0] == ["head.1", "features.3", "features.0"]


@pytest.mark.parametrize("mode", MODES)
def test_randomised_copies_differ_layer_by_layer(mode: str) -> None:
    model = _small()
    twin = copy.deepcopy(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    order = ["head.1", "features.3", "features.0"]
    seen = []
    for i, name in enumerate(randomisations(twin, order, mode, seed=5)):
        seen.append(name)
        expected = set(order[: i + 1]) if mode == "cascading" else {name}
        assert _changed(twin, original) == expected
        w = dict(twin.named_modules())[name].weight
        assert w.std() > 0  # drawn anew, not zeroed
    assert seen == order
    assert _changed(twin, original) == (set(order) if mode == "cascading" else set())
    # the same layer draws the same weights in both tests (seeded per layer, not per step)
    again = copy.deepcopy(model)
    gen = randomisations(again, ["features.3"], "cascading", seed=5)
    next(gen)
    if mode == "cascading":
        assert torch.equal(again.features[3].weight, twin.features[3].weight)


def test_sanity_leaves_the_callers_model_bit_identical_and_the_global_rng_alone() -> None:
    model = _small().train()
    model.features[0].bias.requires_grad_(False)
    before = snapshot(model)
    data = torch.rand(3, 1, 28, 28)
    state = torch.random.get_rng_state()
    units = [Unit("features.3", c) for c in range(2)]
    result = sanity(model, data, units, ["gradient", "guided"], keep_maps=1)
    assert_unchanged(model, before)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert result.layers == ("features.3", "features.0")


def _gradient_map(model: nn.Module, x: torch.Tensor, unit: Unit) -> np.ndarray:
    xe = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model.features[:4](xe)[(0, unit.channel, *unit.location)], xe)
    return g[0].double().numpy()


def test_scores_are_the_measures_of_the_plain_autograd_maps_of_the_randomised_copies() -> None:
    model = _small().double()
    data = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    units = [Unit("features.3", 2, (3, 4)), Unit("features.3", 7, (6, 6))]
    result = sanity(model, data, units, ["gradient"], rows=[1, 3], modes=["cascading"], seed=9)
    # redo every step by hand: the same randomisation on a copy, autograd, the measures
    originals = [
        _gradient_map(model, data[r : r + 1], u)[(slice(None), *region)]
        for u, r, region in zip(units, result.rows, result.regions)
    ]
    twin = copy.deepcopy(model)
    gen = randomisations(twin, list(result.layers), "cascading", seed=9)
    for step in range(1 + len(result.layers)):
        if step:
            next(gen)
        for k, (u, r, region) in enumerate(zip(units, result.rows, result.regions)):
            m = _gradient_map(twin, data[r : r + 1], u)[(slice(None), *region)]
            for measure, sim in SIMILARITIES.items():
                got = result.scores[("cascading", "gradient", measure)][step, k]
                want = sim.compare(originals[k], m)
                assert got == pytest.approx(want, abs=1e-9, nan_ok=True), (step, k, measure)
            ref = scipy_stats.spearmanr(np.abs(originals[k]).ravel(), np.abs(m).ravel())[0]
            if step == 0:
                assert ref == pytest.approx(1.0)
    # the region is the unit's receptive field (8 x 8 at features.3), not the whole input
    rf = receptive_field(model, (1, 28, 28), "features.3")
    assert rf.size == (8, 8)
    assert list(result.regions) == [rf.region(u.location) for u in units]


def test_the_gradient_similarity_falls_on_the_demo_cnn() -> None:
    from featurelens.demo import mnist_cnn

    model = mnist_cnn()
    data = torch.rand(4, 1, 28, 28)
    units = [Unit("features.conv3", c) for c in range(3)]
    result = sanity(model, data, units, list(METHODS), keep_maps=2)
    assert result.layers == ("features.conv3", "features.conv2", "features.conv1")
    for method in METHODS:
        for measure in SIMILARITIES:
            assert result.curve(method, measure, "cascading")[0] == pytest.approx(1.0)
    grad = result.curve("gradient", "spearman_abs", "cascading")
    assert grad[-1] < 0.6 and all(g < 0.6 for g in grad[1:])
    assert result.curve("gradient", "ssim", "cascading")[-1] < 0.5
    # the kept maps: per method and unit, (1 + layers, C, *region)
    kept = result.maps[("cascading", "gradient")]
    region = tuple(s.stop - s.start for s in result.regions[0])
    assert len(kept) == 2 and kept[0].shape == (4, 1, *region)
    assert all(0 < w <= 20 for w in region)  # the unit's field, clipped to the input
    assert "gradient" in result.table() and "features.conv1" in result.table("ssim", "independent")


def test_a_randomisation_that_changes_nothing_scores_one() -> None:
    model = _small()
    data = torch.rand(2, 1, 28, 28)
    result = sanity(
        model, data, [Unit("features.3", 1), Unit("features.3", 4)], ["gradient", "guided"],
        randomise=lambda module, seed: None,
    )  # fmt: skip
    for key, values in result.scores.items():
        finite = values[np.isfinite(values)]
        assert finite.size and np.allclose(finite, 1.0), key


def test_quantus_mprt_gives_the_same_cascading_curve() -> None:
    """Quantus' model-parameter randomisation test on the same model, units and randomisation.

    Quantus randomises every module with ``reset_parameters`` in reverse registration order,
    seeding the global generator with ``seed + 1`` before each; we pass that order and that
    randomisation to :func:`sanity`, and Quantus our projections as its ``explain_func``.
    Quantus compares whole inputs (``abs=True``, no normalisation, scipy's spearmanr); the
    maps we keep are cut to each unit's receptive field, outside which both maps are zero, so
    padding them back with zeros must give Quantus' numbers. Our own ``spearman_abs`` differs
    on purpose: it ranks only the receptive field (the zeros outside would tie and inflate the
    correlation of a small-field unit; Quantus reports ~0.96 here where we report ~0.3) and it
    clips at the 99th percentile as the paper's pictures do.
    """
    quantus = pytest.importorskip("quantus")
    from featurelens import project_units
    from featurelens.demo import mnist_cnn

    model = mnist_cnn()
    data = torch.rand(3, 1, 28, 28)
    layer, location, channels = "features.conv3", (1, 2), [0, 3, 5]
    units = [Unit(layer, c, location) for c in channels]

    def explain(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **_: object):
        us = [Unit(layer, int(t), location) for t in targets]
        x = torch.as_tensor(inputs)
        return project_units(model, x, us, "gradient", rows=range(len(us))).detach().numpy()

    order = [n for n, m in model.named_modules() if hasattr(m, "reset_parameters")][::-1]

    def quantus_reset(module: nn.Module, seed: int) -> None:
        torch.manual_seed(42 + 1)
        module.reset_parameters()

    metric = quantus.MPRT(
        similarity_func=quantus.similarity_func.correlation_spearman,
        layer_order="top_down", seed=42, abs=True, normalise=False, disable_warnings=True,
    )  # fmt: skip
    theirs = metric(
        model=model, x_batch=data.numpy(), y_batch=np.array(channels), a_batch=None,
        explain_func=explain, device="cpu",
    )  # fmt: skip
    ours = sanity(
        model, data, units, ["gradient"], modes=["cascading"], layers=order,
        randomise=quantus_reset, keep_maps=len(units),
    )  # fmt: skip
    assert list(theirs) == ["original", *order]
    assert ours.layers == tuple(order)
    # the default order: the same, less the classifier, which cannot reach the units
    assert randomisation_order(model, [layer])[0] == [n for n in order if n != "classifier.fc"]
    maps = ours.maps[("cascading", "gradient")]
    for step, name in enumerate(["original", *order]):
        for k in range(len(units)):
            full = [np.zeros((1, 28, 28)) for _ in range(2)]
            full[0][(slice(None), *ours.regions[k])] = maps[k][0]
            full[1][(slice(None), *ours.regions[k])] = maps[k][step]
            mine = scipy_stats.spearmanr(np.abs(full[0]).ravel(), np.abs(full[1]).ravel())[0]
            assert mine == pytest.approx(theirs[name][k], abs=1e-6), (name, k)
    # the region-restricted score is the stricter one
    assert ours.curve("gradient")[-1] < np.mean(theirs[order[-1]]) - 0.3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"data": torch.zeros(0, 1, 28, 28)}, DataError, "no example"),
        ({"methods": ["gradient", "lrp"]}, ValueError, "lrp"),
        ({"methods": []}, UsageError, "checks nothing"),
        ({"modes": ["shuffled"]}, UsageError, "shuffled"),
        ({"units": []}, UsageError, "no unit"),
        ({"units": [Unit("features.3", 16)]}, ChannelError, "16 channels"),
        ({"units": [Unit("features.3", 1, (14, 0))]}, ValueError, "14"),
        ({"units": [Unit("features.9", 1)]}, LayerError, "features.3"),
        ({"rows": [3]}, UsageError, "rows\\[0\\] = 3"),
        ({"rows": [0, 1]}, UsageError, "2 entries for 1 units"),
        ({"layers": ["features.7"]}, UsageError, "features.7"),
        ({"keep_maps": -1}, UsageError, "keep_maps"),
    ],
)
def test_bad_input_is_refused_and_leaves_the_model_as_given(kwargs, error, match) -> None:
    model = _small().train()
    before = snapshot(model)
    call = {"data": torch.rand(3, 1, 28, 28), "units": [Unit("features.3", 1)], **kwargs}
    with pytest.raises(error, match=match):
        sanity(model, call.pop("data"), call.pop("units"), **call)
    assert_unchanged(model, before)
