"""Analysis kept across calls, and work shared among units.

* Receptive fields and layer layouts are computed once per (model structure, input shape,
  layer) and reused; the cached values equal fresh ones; a structural change (module added,
  replaced, re-wrapped, reconfigured, a hook) drops them, so that a stale geometry is never
  used; weights are not part of the key and never leak into results.
* Units of one example whose crops coincide (every channel at one location), in passes of any
  chunk size: every map equals the one-unit call and plain autograd (float64, dyadic weights:
  exact).
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

import featurelens.projection
from conftest import assert_unchanged, snapshot
from featurelens import Unit, project, project_units, receptive_field
from featurelens.analysis import ANALYSES, AnalysisCache, structure_signature
from featurelens.receptive_field import try_receptive_field
from featurelens.rules import METHODS
from test_projection import Awkward2d, dyadic_, dyadic_input


def plain_gradient(model: nn.Module, x: torch.Tensor, layer: str, units: list, rows: list):
    """d unit / d input by autograd on the whole, unhooked model: the reference."""
    out = []
    module = dict(model.named_modules())[layer]
    for u, r in zip(units, rows):
        xr = x[r : r + 1].clone().requires_grad_(True)
        seen = {}
        handle = module.register_forward_hook(lambda m, i, o, seen=seen: seen.setdefault("y", o))
        try:
            model(xr)
        finally:
            handle.remove()
        (g,) = torch.autograd.grad(seen["y"][(0, u.channel, *u.location)], xr)
        out.append(g[0])
    return torch.stack(out)


class Counting(nn.Module):
    """Awkward2d's layers, wrapped so that a test can count the model's forwards from outside
    (a hook of its own on the model would change the model's structure signature)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.fx.Proxy):
            self.shapes.append(tuple(x.shape))
        return self.inner(x)


# --------------------------------------------------------------------------------------------
# Analysis kept across calls


def test_cached_analysis_equals_fresh_and_is_computed_once() -> None:
    model = dyadic_(Awkward2d())
    x = dyadic_input(3, 2, 37, 29)
    units = [Unit("conv2", 1, (3, 4)), Unit("conv3", 2, (1, 1)), Unit("pool1", 0, (0, 7))]
    rows = [0, 2, 1]
    ANALYSES.clear()
    first = project_units(model, x, units, "guided", rows=rows)
    computed = ANALYSES.computed
    for layer in ("conv2", "conv3", "pool1"):
        cached = featurelens.projection._field(
            featurelens.projection._Context.create(
                model,
                x,
                "guided",
                crop=True,
                chunk_size=None,
                device=None,
                other_activations="error",
                fields=None,
            ),  # fmt: skip
            layer,
        )
        assert cached == (try_receptive_field(model, (2, 37, 29), layer)[0], "")
        assert cached[0] == receptive_field(model, (2, 37, 29), layer)
    assert ANALYSES.computed == computed  # those look-ups were hits
    again = project_units(model, x, units, "guided", rows=rows)
    assert ANALYSES.computed == computed
    assert torch.equal(first, again)
    assert torch.equal(first, project_units(model, x, units, "guided", rows=rows, crop=False))


@pytest.mark.xfail(
    strict=True,
    reason="not delivered yet: projections probe one full-size example per call to learn the "
    "layer's layout (channels first/last, tokens) before cropping; the layout cache that "
    "skipped the probe did not survive the merge with traced layouts",
)
def test_no_probe_forward_when_locations_are_given_and_the_layout_is_known() -> None:
    model = Counting(dyadic_(Awkward2d())).double().eval()
    x = dyadic_input(2, 2, 37, 29)
    units = [Unit("inner.conv2", 1, (3, 4)), Unit("inner.conv2", 4, (4, 3))]
    ANALYSES.clear()
    first = project_units(model, x, units, "deconvnet", rows=[0, 1])
    assert (1, 2, 37, 29) in model.shapes  # the first call measured the layer: one probe
    model.shapes.clear()
    again = project_units(model, x, units, "deconvnet", rows=[0, 1])
    assert torch.equal(first, again)
    assert all(shape[2:] != (37, 29) for shape in model.shapes), model.shapes  # crops only
    assert len(model.shapes) == 1  # one batched pass
    model.shapes.clear()
    # Arg-max locations still cost one forward per example, and nothing more.
    project(model, x, "inner.conv2", 3, method="deconvnet")
    full = [shape for shape in model.shapes if shape[2:] == (37, 29)]
    assert sum(shape[0] for shape in full) == 2


def test_another_input_shape_dtype_or_layer_is_analysed_anew() -> None:
    model = dyadic_(Awkward2d())
    ANALYSES.clear()
    project(model, dyadic_input(1, 2, 37, 29), "conv2", 1, (2, 2))
    computed = ANALYSES.computed
    project(model, dyadic_input(1, 2, 41, 29), "conv2", 1, (2, 2))
    assert ANALYSES.computed == computed + 1  # a field for the new shape
    project(model, dyadic_input(1, 2, 41, 29), "conv3", 1, (1, 1))
    assert ANALYSES.computed == computed + 2
    project(model, dyadic_input(1, 2, 41, 29), "conv3", 2, (1, 1))
    assert ANALYSES.computed == computed + 2  # the same shape and layer: reused
    model.float()
    project(model, dyadic_input(1, 2, 41, 29).float(), "conv3", 1, (1, 1))
    assert ANALYSES.computed == computed + 3  # the parameters' dtype is structure


def _structural_changes() -> dict:
    """name: a change of Awkward2d's structure that changes conv2's geometry, in place."""

    def replace(m: Awkward2d) -> None:  # same type, other kernel
        m.conv2 = nn.Conv2d(4, 6, 5, dilation=2, padding=4).double()

    def rewrap(m: Awkward2d) -> None:  # the same module, inside a pooling wrapper
        m.conv1 = nn.Sequential(m.conv1, nn.MaxPool2d(2, ceil_mode=True))

    def reconfigure(m: Awkward2d) -> None:  # a hyper-parameter changed on the live module
        m.conv2.dilation = (1, 1)
        m.conv2.padding = (1, 1)

    def add(m: Awkward2d) -> None:  # a module added to an existing container, then used
        m.head.insert(0, nn.MaxPool2d(1))
        m.pool1 = nn.Sequential(m.pool1, nn.MaxPool2d(3, stride=1, padding=1))

    return {"replace": replace, "rewrap": rewrap, "reconfigure": reconfigure, "add": add}


@pytest.mark.parametrize("change", list(_structural_changes()))
def test_a_structural_change_drops_the_cached_analysis(change: str) -> None:
    torch.manual_seed(3)
    model = dyadic_(Awkward2d())
    x = dyadic_input(2, 2, 37, 29)
    units = [Unit("conv2", k, (u, v)) for k in (0, 5) for u, v in ((0, 0), (2, 3), (5, 7))]
    rows = [0, 1] * 3
    ANALYSES.clear()
    before_change = project_units(model, x, units, "gradient", rows=rows)
    old_field = receptive_field(model, (2, 37, 29), "conv2")
    _structural_changes()[change](model)
    dyadic_(model)  # new modules get dyadic weights too; every sum stays exact
    new_field = receptive_field(model, (2, 37, 29), "conv2")
    assert new_field != old_field  # the change matters for the geometry
    computed = ANALYSES.computed
    after = project_units(model, x, units, "gradient", rows=rows)
    assert ANALYSES.computed > computed  # analysed anew
    assert torch.equal(after, plain_gradient(model, x, "conv2", units, rows))
    assert torch.equal(after, project_units(model, x, units, "gradient", rows=rows, crop=False))
    assert not torch.equal(after, before_change)


def test_a_stale_field_would_give_wrong_maps() -> None:
    """Negative control for the test above: the old geometry on the new model is wrong."""
    model = dyadic_(Awkward2d())
    x = dyadic_input(1, 2, 37, 29)
    old = receptive_field(model, (2, 37, 29), "conv2")
    model.conv2 = dyadic_(nn.Conv2d(4, 6, 5, dilation=2, padding=4))
    units = [Unit("conv2", 2, (4, 3))]
    right = plain_gradient(model, x, "conv2", units, [0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", featurelens.projection.CropWarning)
        stale = project_units(model, x, units, "gradient", rows=[0], fields={"conv2": old})
    assert not torch.equal(stale, right)


def test_weights_are_not_structure_and_never_leak() -> None:
    model = dyadic_(Awkward2d())
    x = dyadic_input(2, 2, 37, 29)
    units = [Unit("conv3", 1, (2, 1)), Unit("conv3", 4, (0, 0))]
    ANALYSES.clear()
    first = project_units(model, x, units, "gradient", rows=[0, 1])
    computed = ANALYSES.computed
    dyadic_(model)  # new weights, same structure
    second = project_units(model, x, units, "gradient", rows=[0, 1])
    assert ANALYSES.computed == computed  # the geometry is kept
    assert not torch.equal(first, second)  # the maps follow the weights
    assert torch.equal(second, plain_gradient(model, x, "conv3", units, [0, 1]))
    # Arg-max locations follow the weights too: they are never cached.
    located = project(model, x, "conv3", 4, method="gradient")
    seen = {}
    handle = model.conv3.register_forward_hook(lambda m, i, o: seen.setdefault("y", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    acts = seen["y"]
    for i in range(2):
        flat = int(acts[i, 4].flatten().argmax())
        loc = divmod(flat, acts.shape[3])
        ref = plain_gradient(model, x, "conv3", [Unit("conv3", 4, loc)], [i])
        assert torch.equal(located[i], ref[0])


def test_the_signature_sees_structure_not_weights_or_modes() -> None:
    model = Awkward2d()
    sig = structure_signature(model)
    with torch.no_grad():
        model.conv1.weight.add_(1.0)
    model.train()
    model.conv1.weight.requires_grad_(False)
    assert structure_signature(model) == sig
    model.relu1.inplace = False
    assert structure_signature(model) != sig
    model.relu1.inplace = True
    assert structure_signature(model) == sig
    handle = model.conv1.register_forward_hook(lambda m, i, o: o * 2)  # changes outputs
    assert structure_signature(model) != sig
    handle.remove()
    assert structure_signature(model) == sig
    model.branch.forward = lambda x: x  # an instance forward is structure
    assert structure_signature(model) != sig


def test_the_cache_keeps_no_model_alive() -> None:
    cache = AnalysisCache()
    model = Awkward2d()
    cache.get(model, structure_signature(model), "k", lambda: 1)
    assert cache.get(model, structure_signature(model), "k", lambda: 2) == 1
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    assert len(cache._models) == 0


def test_an_error_keeps_nothing() -> None:
    cache = AnalysisCache()
    model = Awkward2d()
    sig = structure_signature(model)

    def fail() -> int:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.get(model, sig, "k", fail)
    assert cache.get(model, sig, "k", lambda: 3) == 3


# --------------------------------------------------------------------------------------------
# Units on one crop


@pytest.mark.parametrize("method", list(METHODS))
def test_every_channel_at_one_location_equals_one_unit_calls(method: str) -> None:
    model = Counting(dyadic_(Awkward2d())).double().eval()
    x = dyadic_input(2, 2, 37, 29)
    layer = "inner.conv2"
    units = [Unit(layer, k, (4, 3)) for k in range(6)] + [Unit(layer, k, (0, 13)) for k in (1, 2)]
    rows = [1] * 6 + [0, 0]
    project_units(model, x, units[:1], method, rows=rows[:1])  # the layout, measured once
    model.shapes.clear()
    before = snapshot(model)
    shared = project_units(model, x, units, method, rows=rows)
    assert_unchanged(model, before)
    # one probe of a full-size example (the layer's layout), every other forward on crops
    assert sum(s[2:] == (37, 29) for s in model.shapes) == 1, model.shapes
    for m, u, r in zip(shared, units, rows):
        one = project(model, x[r : r + 1], u.layer, u.channel, u.location, method, crop=False)
        assert torch.equal(m, one[0]), u
    if method == "gradient":
        plain = plain_gradient(model, x, layer, units, rows)
        assert torch.equal(shared, plain)


def test_units_on_one_crop_in_passes_of_any_chunk_size() -> None:
    model = dyadic_(Awkward2d())
    x = dyadic_input(3, 2, 37, 29)
    units = (
        [Unit("conv3", k, (2, 1)) for k in range(5)]  # five on one crop of example 0
        + [Unit("conv3", k, (1, 2)) for k in (0, 4)]  # two on one crop of example 1
        + [Unit("conv3", 3, (0, 0)), Unit("conv3", 2, (3, 2)), Unit("pool1", 1, (3, 3))]
    )
    rows = [0] * 5 + [1, 1] + [2, 0, 1]
    expected = torch.stack([
        project(model, x[r : r + 1], u.layer, u.channel, u.location, "guided", crop=False)[0]
        for u, r in zip(units, rows)
    ])  # fmt: skip
    for chunk in (None, 1, 2, 3, 100):
        got = project_units(model, x, units, "guided", rows=rows, chunk_size=chunk)
        assert torch.equal(got, expected), chunk


def test_units_on_one_crop_match_autograd_with_random_float64_weights() -> None:
    model = Awkward2d().double().eval()
    x = torch.randn(2, 2, 37, 29, dtype=torch.float64)
    units = [Unit("conv3", k, (2, 1)) for k in range(5)] * 2
    rows = [0] * 5 + [1] * 5
    shared = project_units(model, x, units, "gradient", rows=rows)
    plain = plain_gradient(model, x, "conv3", units, rows)
    torch.testing.assert_close(shared, plain, rtol=1e-12, atol=1e-14)
