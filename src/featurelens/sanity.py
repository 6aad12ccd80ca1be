"""Sanity checks for projections: whether the maps change when the weights are random.

Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim 2018 ("Sanity Checks for Saliency Maps",
NeurIPS, arXiv 1810.03292) showed that guided backpropagation (and the deconvnet) give nearly
the same pictures on a trained network and on one whose weights were randomised, layer after
layer: such maps show the input's edges more than what the network learned. The plain gradient
changes as it should. :func:`sanity` runs their two tests for featurelens units and every method
of :data:`featurelens.rules.METHODS`:

* **cascading randomisation**: the layers that reach the units are randomised one more at a
  time, from the top (nearest the units) down to the input;
* **independent randomisation**: one layer at a time, the others as trained.

After each step every unit's map is compared with its map on the trained network by the
measures of :data:`featurelens.similarity.SIMILARITIES` (rank correlations of absolute and
signed maps, SSIM, HOG). The comparison is made over the unit's receptive field (the clipped
region :meth:`~featurelens.ReceptiveField.region` gives; the whole input when the field is
global or unknown): outside it both maps are zero by construction, and those zeros would make
any two maps of a small-field unit look alike.

Randomisation happens on a deep copy of the model: the caller's model is never touched. A layer
is randomised by drawing its parameters anew with its own initialisation
(``reset_parameters()``), seeded per layer, so a run is reproducible and the global random state
is left alone. Parameters of modules that have no ``reset_parameters`` (a bare ``nn.Parameter``
used in ``forward``, ``nn.MultiheadAttention``) are not randomised: the result lists them in
:attr:`SanityResult.notes`.
"""

from __future__ import annotations

import copy
import html
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from featurelens.data import SizedDataset, data_size, example_tensor
from featurelens.errors import ChannelError, DataError, TraceError, UsageError
from featurelens.graph import (
    capture,
    model_device,
    preserved,
    resolve_layers,
    trace,
    unknown_name_message,
)
from featurelens.receptive_field import ReceptiveField, try_receptive_field
from featurelens.rules import METHODS, check_other_activations, get_rule
from featurelens.similarity import SIMILARITIES
from featurelens.unit import Unit, argmax_location, as_integer, check_location

__all__ = [
    "MODES",
    "SanityResult",
    "randomisation_order",
    "randomisations",
    "reinitialise",
    "sanity",
]

MODES = ("cascading", "independent")
"""The two randomisation tests of Adebayo et al. 2018, in the paper's order."""

Randomise = Callable[[nn.Module, int], None]


# --------------------------------------------------------------------------------------------
# Randomising layers


def reinitialise(module: nn.Module, seed: int) -> None:
    """Draw ``module``'s parameters anew with its own ``reset_parameters()``, seeded.

    The global random state (CPU and the module's CUDA devices) is restored afterwards.

    Parameters
    ----------
    module
        A module with a ``reset_parameters`` method (convolutions, linear layers, norms).
    seed
        Seeds the draw.

    Raises
    ------
    UsageError
        The module has no ``reset_parameters``.
    """
    reset = getattr(module, "reset_parameters", None)
    if not callable(reset):
        raise UsageError(
            f"{type(module).__name__} has no reset_parameters(): pass randomise= a function "
            "(module, seed) that randomises it"
        )
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        reset()


def layer_seed(seed: int, layer: str) -> int:
    """The seed of ``layer``'s randomisation: the same in both tests, whatever the order."""
    return (seed * 0x9E3779B1 + zlib.crc32(layer.encode())) % 2**63


def _randomisable(module: nn.Module) -> bool:
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return bool(own) and callable(getattr(module, "reset_parameters", None))


def randomisation_order(model: nn.Module, layers: Sequence[str]) -> tuple[list[str], list[str]]:
    """The modules whose parameters reach ``layers``, top (nearest them) first, and notes.

    From the model's torch.fx graph: every module called on the way to one of ``layers``
    (the layers themselves included) that has parameters or buffers of its own and a
    ``reset_parameters``, in reverse execution order. A model that does not trace falls back on
    every such module in reverse registration order (Quantus' choice), which may include modules
    that cannot change the maps; a note says so.

    Returns
    -------
    tuple
        ``(names, notes)``: dotted module names, and sentences about what is left out.
    """
    modules = dict(model.named_modules())
    try:
        traced = trace(model)
    except TraceError as exc:
        every = [n for n, m in modules.items() if n and _randomisable(m)]
        note = (
            "the model does not trace, so every module with parameters is randomised, in reverse "
            f"registration order, whether it reaches the units or not ({exc})"
        )
        return every[::-1], [note]
    wanted: set[Any] = set()
    stack = [traced.node(layer) for layer in layers]
    while stack:
        node = stack.pop()
        if node not in wanted:
            wanted.add(node)
            stack.extend(node.all_input_nodes)
    names: list[str] = []
    skipped: list[str] = []
    for node in traced.graph_module.graph.nodes:
        if node not in wanted or node.op not in ("call_module", "get_attr"):
            continue
        target = str(node.target)
        owner = target if node.op == "call_module" else target.rpartition(".")[0]
        module = modules.get(owner)
        if module is None:
            continue
        if _randomisable(module):
            if owner not in names:
                names.append(owner)
        elif any(True for _ in module.parameters(recurse=False)) and owner not in skipped:
            skipped.append(owner)
    notes = [
        f"{name!r} ({type(modules[name]).__name__}) has parameters but no reset_parameters(): "
        "not randomised"
        for name in skipped
        if name not in names
    ]
    return names[::-1], notes


def randomisations(
    model: nn.Module,
    layers: Sequence[str],
    mode: str = "cascading",
    *,
    seed: int = 0,
    randomise: Randomise | None = None,
) -> Iterator[str]:
    """Randomise ``layers`` of ``model`` in place, step by step: yields each layer's name.

    ``model`` should be a copy: ``"cascading"`` leaves every layer randomised at the end;
    ``"independent"`` puts each layer back (its parameters and buffers, bit for bit) before
    the next, and the last when the generator is closed.

    Parameters
    ----------
    model
        The model to randomise (:func:`sanity` passes its copy).
    layers
        Dotted module names, in the order to randomise them (top first).
    mode
        A key of :data:`MODES`.
    seed
        Layer ``name`` is randomised with :func:`layer_seed` ``(seed, name)``.
    randomise
        ``randomise(module, seed)``; default :func:`reinitialise`.

    Yields
    ------
    str
        The layer just randomised; the model holds that step's weights until the next one.
    """
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; valid modes: {', '.join(map(repr, MODES))}")
    randomise = reinitialise if randomise is None else randomise
    modules = dict(model.named_modules())
    for name in layers:
        module = modules[name]
        saved = (
            {k: v.detach().clone() for k, v in module.state_dict().items()}
            if mode == "independent"
            else None
        )
        randomise(module, layer_seed(seed, name))
        try:
            yield name
        finally:
            if saved is not None:
                module.load_state_dict(saved)


# --------------------------------------------------------------------------------------------
# The result


@dataclass(frozen=True, eq=False)
class SanityResult:
    """Similarity of every unit's maps to the trained network's, step by step.

    Attributes
    ----------
    units
        The units, their locations resolved (the arg-max on the trained network where none
        was given).
    rows
        Each unit's example: its index in the data.
    methods
        The projection methods compared.
    layers
        The randomised modules, in the order randomised (top first).
    modes
        The tests run (keys of :data:`MODES`).
    scores
        ``{(mode, method, measure): (1 + len(layers), len(units))}`` float64: row 0 the
        trained network compared with itself, row ``i`` after randomising ``layers[i - 1]``
        (with all the layers above it in the cascading test). NaN where a measure is not
        defined for a unit's map (see :mod:`featurelens.similarity`).
    regions
        Per unit, the input slices its maps are compared over.
    maps
        ``{(mode, method): maps}`` for the first ``keep_maps`` units: per unit a float32 array
        ``(1 + len(layers), C, *region)``, row 0 the trained network's map.
    seed
        The seed of the randomisations.
    notes
        What the checks could not do (parameters not randomised, a model that did not trace).
    """

    units: tuple[Unit, ...]
    rows: tuple[int, ...]
    methods: tuple[str, ...]
    layers: tuple[str, ...]
    modes: tuple[str, ...]
    scores: Mapping[tuple[str, str, str], np.ndarray]
    regions: tuple[tuple[slice, ...], ...]
    maps: Mapping[tuple[str, str], tuple[np.ndarray, ...]]
    seed: int
    notes: tuple[str, ...] = ()

    @property
    def steps(self) -> tuple[str, ...]:
        """Column names of the curves: ``"original"``, then the randomised layers."""
        return ("original", *self.layers)

    def curve(
        self, method: str, measure: str = "spearman_abs", mode: str = "cascading"
    ) -> np.ndarray:
        """The mean similarity over units per step, ``(1 + len(layers),)``, NaN ignored.

        Raises
        ------
        UsageError
            A method, measure or mode this result does not hold (the message lists them).
        """
        key = (mode, method, measure)
        if key not in self.scores:
            raise UsageError(
                f"no scores for mode {mode!r}, method {method!r}, measure {measure!r}: this "
                f"result has modes {list(self.modes)}, methods {list(self.methods)}, measures "
                f"{list(SIMILARITIES)}"
            )
        values = self.scores[key]
        with warnings.catch_warnings():  # a step where every unit is NaN stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(values, axis=1)

    def table(self, measure: str = "spearman_abs", mode: str = "cascading") -> str:
        """A plain-text table: one row per method, one column per step (mean over units)."""
        head = ["method", *self.steps]
        rows = [head] + [
            [m, *(f"{v:.3f}" for v in self.curve(m, measure, mode))] for m in self.methods
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)

    def __repr__(self) -> str:
        """Units, methods, layers and modes, without the arrays."""
        return (
            f"SanityResult({len(self.units)} units, methods={list(self.methods)}, "
            f"{len(self.layers)} layers, modes={list(self.modes)}, seed={self.seed})"
        )

    def _repr_html_(self) -> str:
        parts = []
        for mode in self.modes:
            for measure in SIMILARITIES:
                head = "".join(f"<th>{html.escape(s)}</th>" for s in self.steps)
                body = "".join(
                    f"<tr><td>{html.escape(m)}</td>"
                    + "".join(f"<td>{v:.3f}</td>" for v in self.curve(m, measure, mode))
                    + "</tr>"
                    for m in self.methods
                )
                parts.append(
                    f"<p>{html.escape(mode)} randomisation, {html.escape(measure)} "
                    f"({html.escape(SIMILARITIES[measure].summary)})</p><table><thead><tr>"
                    f"<th>method</th>{head}</tr></thead><tbody>{body}</tbody></table>"
                )
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return "".join(parts) + (f"<ul>{notes}</ul>" if notes else "")


# --------------------------------------------------------------------------------------------
# The checks


def sanity(
    model: nn.Module,
    data: SizedDataset | torch.Tensor,
    units: Sequence[Unit],
    methods: Sequence[str] | None = None,
    *,
    rows: Sequence[int] | None = None,
    modes: Sequence[str] = MODES,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    randomise: Randomise | None = None,
    keep_maps: int = 4,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    other_activations: str = "error",
) -> SanityResult:
    """Cascading and independent randomisation tests (Adebayo et al. 2018) for some units.

    Parameters
    ----------
    model
        Any ``nn.Module``; never modified (the tests randomise a deep copy, so memory holds
        the model twice).
    data
        A dataset (items: a tensor ``(C, *spatial)`` or ``(tensor, label)``) or a tensor
        ``(N, C, *spatial)``.
    units
        M :class:`featurelens.Unit` values, of any layers; ``location=None`` means the arg-max
        of the unit's channel on its example, on the trained network (kept for every step).
    methods
        Keys of :data:`featurelens.rules.METHODS`; default all of them.
    rows
        The example of each unit, ``(M,)`` indices into ``data``. Default: unit ``i`` on
        example ``i``.
    modes
        Keys of :data:`MODES`: ``"cascading"``, ``"independent"``, or both (default).
    layers
        The modules to randomise, top first; default :func:`randomisation_order` (every module
        with parameters on the way to the units).
    seed
        Seeds every randomisation (:func:`layer_seed`); the global random state is untouched
        by the default ``randomise``.
    randomise
        ``randomise(module, seed)`` draws a module's parameters anew; default
        :func:`reinitialise` (the module's own ``reset_parameters()``).
    keep_maps
        Keep the maps of the first this many units (:attr:`SanityResult.maps`).
    chunk_size, device, other_activations
        As in :func:`featurelens.project_units`. With ``other_activations="gradient"``,
        GELU/SiLU networks run under deconvnet and guided backpropagation.

    Returns
    -------
    SanityResult
        Scores per mode, method, measure, step and unit; the kept maps.

    Raises
    ------
    UsageError
        No unit, an unknown method or mode (the message lists the valid ones), rows out of
        range or of the wrong length, a model that cannot be copied, a location outside the
        layer's grid, an unknown module in ``layers``.
    ChannelError
        A unit's channel that its layer does not have.
    LayerError
        A unit's layer that the model does not have.
    DataError
        Data without examples, items that are not tensors.
    ActivationError
        An activation without a rule for a method (see ``other_activations``).

    Warns
    -----
    CropWarning
        Units computed on the whole input (exact, slower), once per reason.
    """
    names = _check_methods(methods)
    mode_list = _check_modes(modes)
    check_other_activations(other_activations)
    unit_list = _check_units(units)
    n = data_size(data)
    if n == 0:
        raise DataError("the data holds no example: a sanity check needs the units' examples")
    row_list = _check_rows(rows, len(unit_list), n)
    seed = as_integer(seed, "seed")
    keep = as_integer(keep_maps, "keep_maps")
    if keep < 0:
        raise UsageError(f"keep_maps={keep}: keep the maps of 0 or more units")
    resolve_layers(model, [u.layer for u in unit_list])

    examples = sorted(set(row_list))
    inputs = _load(model, data, examples)  # (E, C, *spatial)
    local = [examples.index(r) for r in row_list]
    twin = _copy(model)
    order, notes = (
        randomisation_order(twin, [u.layer for u in unit_list])
        if layers is None
        else (_check_layers(twin, layers), [])
    )
    fields = _fields(twin, inputs, unit_list)
    resolved = _locate(twin, inputs, unit_list, local, device)
    regions = tuple(_region(fields.get(u.layer), u, inputs) for u in resolved)
    job = _Job(
        twin, inputs, resolved, local, regions, fields, chunk_size, device, other_activations
    )

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        original = {m: job.maps(m) for m in names}
        scores: dict[tuple[str, str, str], np.ndarray] = {}
        kept: dict[tuple[str, str], list[list[np.ndarray]]] = {}
        for mode in sorted(mode_list, key=lambda m: m != "independent"):  # cascading last
            steps = {m: [original[m]] for m in names}
            for _ in randomisations(twin, order, mode, seed=seed, randomise=randomise):
                for m in names:
                    steps[m].append(job.maps(m))
            for m in names:
                for measure, sim in SIMILARITIES.items():
                    scores[(mode, m, measure)] = np.array(
                        [
                            [sim.compare(o, r) for o, r in zip(original[m], step)]
                            for step in steps[m]
                        ]
                    )
                kept[(mode, m)] = [
                    [step[k] for step in steps[m]] for k in range(min(keep, len(resolved)))
                ]
    for message in dict.fromkeys(str(w.message) for w in caught):
        category = next(w.category for w in caught if str(w.message) == message)
        warnings.warn(message, category, stacklevel=2)  # the caller's line
    return SanityResult(
        units=tuple(resolved),
        rows=tuple(row_list),
        methods=tuple(names),
        layers=tuple(order),
        modes=tuple(m for m in MODES if m in mode_list),
        scores=MappingProxyType(scores),
        regions=regions,
        maps=MappingProxyType(
            {k: tuple(np.stack(v).astype(np.float32) for v in per) for k, per in kept.items()}
        ),
        seed=seed,
        notes=tuple(notes),
    )


@dataclass(frozen=True)
class _Job:
    """What every projection of a sanity check shares: the copy, inputs, units, regions."""

    model: nn.Module
    inputs: torch.Tensor
    units: list[Unit]
    rows: list[int]
    regions: tuple[tuple[slice, ...], ...]
    fields: Mapping[str, ReceptiveField]
    chunk_size: int | None
    device: torch.device | str | None
    other_activations: str

    def maps(self, method: str) -> list[np.ndarray]:
        """Each unit's map under ``method`` on the model as it is now, cut to its region."""
        from featurelens.projection import project_units

        maps = project_units(
            self.model,
            self.inputs,
            self.units,
            method,
            rows=self.rows,
            chunk_size=self.chunk_size,
            device=self.device,
            other_activations=self.other_activations,
            fields=self.fields,
        ).detach()
        return [
            maps[i][(slice(None), *region)].to("cpu", torch.float64).numpy()
            for i, region in enumerate(self.regions)
        ]


# --------------------------------------------------------------------------------------------
# Argument checks and preparation


def _check_methods(methods: Sequence[str] | None) -> list[str]:
    if methods is None:
        return list(METHODS)
    if isinstance(methods, str):
        methods = [methods]
    names = [get_rule(m).name for m in methods]  # unknown: a ValueError listing the valid ones
    if not names:
        raise UsageError(f"methods=[] checks nothing: give some of {', '.join(map(repr, METHODS))}")
    return list(dict.fromkeys(names))


def _check_modes(modes: Sequence[str]) -> list[str]:
    if isinstance(modes, str):
        modes = [modes]
    out = list(dict.fromkeys(modes))
    for mode in out:
        if mode not in MODES:
            raise UsageError(f"unknown mode {mode!r}; valid modes: {', '.join(map(repr, MODES))}")
    if not out:
        raise UsageError(f"modes=[] runs nothing: give some of {', '.join(map(repr, MODES))}")
    return out


def _check_units(units: Sequence[Unit]) -> list[Unit]:
    if isinstance(units, Unit):
        units = [units]
    out = list(units)
    for i, u in enumerate(out):
        if not isinstance(u, Unit):
            raise TypeError(f"units[{i}] is {u!r}, not a featurelens.Unit")
    if not out:
        raise UsageError("no unit given: a sanity check compares the maps of some units")
    return out


def _check_rows(rows: Sequence[int] | None, m: int, n: int) -> list[int]:
    if rows is None:
        if m > n:
            raise UsageError(
                f"{m} units for {n} examples: pass rows= (the example of each unit), or at "
                "most one unit per example"
            )
        return list(range(m))
    if isinstance(rows, torch.Tensor):
        rows = rows.tolist()
    out = [as_integer(r, f"rows[{i}]") for i, r in enumerate(rows)]
    if len(out) != m:
        raise UsageError(f"rows has {len(out)} entries for {m} units")
    for i, r in enumerate(out):
        if not 0 <= r < n:
            raise UsageError(f"rows[{i}] = {r} is out of range: the data has examples 0..{n - 1}")
    return out


def _check_layers(model: nn.Module, layers: Sequence[str]) -> list[str]:
    modules = dict(model.named_modules())
    out = [layers] if isinstance(layers, str) else list(layers)
    for name in out:
        if name not in modules or not name:
            valid = [n for n, m in modules.items() if n and _randomisable(m)]
            raise UsageError(unknown_name_message(name, valid, "module to randomise"))
    return list(dict.fromkeys(out))


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # anything a module's __deepcopy__ or pickling raises
        raise UsageError(
            f"the model cannot be copied ({type(exc).__name__}: {exc}); sanity checks randomise "
            "a copy so that the model given stays as it is"
        ) from exc


def _load(model: nn.Module, data: Any, indices: list[int]) -> torch.Tensor:
    xs = [example_tensor(data, i).detach() for i in indices]
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise DataError(f"the units' examples have different shapes {sorted(shapes)}")
    dtype = next(
        (t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()),
        torch.get_default_dtype(),
    )
    return torch.stack(xs).to(dtype)


def _fields(model: nn.Module, inputs: torch.Tensor, units: list[Unit]) -> dict[str, ReceptiveField]:
    """The receptive field of every unit's layer that has one (geometry: weights do not matter)."""
    out = {}
    for layer in dict.fromkeys(u.layer for u in units):
        rf, _ = try_receptive_field(model, tuple(inputs.shape[1:]), layer)
        if rf is not None:
            out[layer] = rf
    return out


def _locate(
    model: nn.Module,
    inputs: torch.Tensor,
    units: list[Unit],
    rows: list[int],
    device: torch.device | str | None,
) -> list[Unit]:
    """``units`` with channels and locations checked, missing locations the arg-max."""
    where = torch.device(device) if device is not None else model_device(model, inputs.device)
    out = list(units)
    for layer in dict.fromkeys(u.layer for u in units):
        mine = [i for i, u in enumerate(units) if u.layer == layer]
        needed = sorted({rows[i] for i in mine})
        with preserved(model), torch.no_grad(), capture(model, [layer]) as run:
            outputs = {r: run(inputs[r : r + 1].to(where))[layer][0] for r in needed}
        for i in mine:
            u, y = units[i], outputs[rows[i]]  # y: (K, *spatial_l)
            if y.dim() < 1 or not 0 <= u.channel < y.shape[0]:
                k = y.shape[0] if y.dim() else 0
                raise ChannelError(
                    f"channel {u.channel} of units[{i}] is out of range: layer {layer!r} has {k} "
                    f"channels, valid 0..{k - 1}"
                )
            if u.location is None:
                out[i] = Unit(layer, u.channel, argmax_location(y[u.channel]))
            else:
                check_location(
                    u.location, tuple(y.shape[1:]), f" of units[{i}]", f"layer {layer!r} outputs"
                )
    return out


def _region(rf: ReceptiveField | None, unit: Unit, inputs: torch.Tensor) -> tuple[slice, ...]:
    """The input slices a unit's maps are compared over: its clipped receptive field."""
    whole = tuple(slice(0, n) for n in inputs.shape[2:])
    loc = unit.location or ()
    if rf is None or rf.is_global or len(loc) != rf.ndim or tuple(rf.output_shape) == ():
        return whole
    try:
        region = rf.region(loc)
    except ValueError:  # a layer grid that is not the field's: compare everything
        return whole
    if any(sl.stop <= sl.start for sl in region):  # sees only padding
        return whole
    return region
