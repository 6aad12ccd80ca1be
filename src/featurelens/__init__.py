"""featurelens: interpret the features of a convolutional network by inverting it.

Receptive fields of every layer, maximally activating examples, projections of a unit back to
the input (gradient, deconvnet, guided backprop), synthetic inputs that maximise a unit
(regularised activation maximisation on its receptive field), Zeiler-Fergus figures and an
explorer.

The public names below are imported on first use (PEP 562), so ``import featurelens`` and
``featurelens --help`` import neither torch nor the web stack; ``featurelens.project`` imports
what it needs the first time it is looked up. A name whose extra is not installed (figures,
explorer) raises :class:`~featurelens.errors.MissingExtraError` naming the extra.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

from featurelens._version import __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these
    from featurelens.app import serve
    from featurelens.atlas import Atlas, Hit
    from featurelens.effective_field import EffectiveReceptiveField, effective_receptive_field
    from featurelens.empirical import EmpiricalReceptiveField, empirical_receptive_field
    from featurelens.errors import (
        ActivationError,
        AtlasError,
        CropWarning,
        DataError,
        DeadUnitWarning,
        FeaturelensError,
        FeaturelensWarning,
        LayerError,
        LayoutError,
        NonFiniteError,
        NotAlignedError,
        ReceptiveFieldError,
        SpecError,
        TraceError,
        UnsupportedOpError,
        UsageError,
    )
    from featurelens.figures import layer_sheet, zf_figure, zf_grid
    from featurelens.graph import get_layer, layer_names, unwrap
    from featurelens.notebook import UnitView, show
    from featurelens.projection import project, project_units
    from featurelens.receptive_field import (
        ReceptiveField,
        ReceptiveFieldTable,
        layer_layout,
        receptive_field,
        receptive_fields,
    )
    from featurelens.render import STYLES
    from featurelens.report import write_report
    from featurelens.rules import METHODS, Rule
    from featurelens.sanity import SanityResult, sanity
    from featurelens.scan import SCORES, scan
    from featurelens.specs import DataSpec
    from featurelens.unit import Layout, Unit
    from featurelens.visualize import REGULARIZERS, ValueRange, Visualization, visualize

__all__ = [
    "SCORES",
    "STYLES",
    "Atlas",
    "AtlasError",
    "DataError",
    "DataSpec",
    "Hit",
    "scan",
    "METHODS",
    "ActivationError",
    "CropWarning",
    "Rule",
    "Unit",
    "project",
    "project_units",
    "EffectiveReceptiveField",
    "EmpiricalReceptiveField",
    "FeaturelensError",
    "FeaturelensWarning",
    "ReceptiveFieldError",
    "SpecError",
    "UsageError",
    "LayerError",
    "Layout",
    "LayoutError",
    "NotAlignedError",
    "ReceptiveField",
    "ReceptiveFieldTable",
    "TraceError",
    "UnsupportedOpError",
    "__version__",
    "effective_receptive_field",
    "empirical_receptive_field",
    "get_layer",
    "layer_layout",
    "layer_names",
    "receptive_field",
    "receptive_fields",
    "sanity",
    "SanityResult",
    "serve",
    "unwrap",
    "show",
    "UnitView",
    "layer_sheet",
    "write_report",
    "zf_figure",
    "zf_grid",
    "REGULARIZERS",
    "DeadUnitWarning",
    "NonFiniteError",
    "ValueRange",
    "Visualization",
    "visualize",
]

_ERRORS = "featurelens.errors"

#: public name -> (the module that defines it, the extra it needs or None).
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "Atlas": ("featurelens.atlas", None),
    "Hit": ("featurelens.atlas", None),
    "EffectiveReceptiveField": ("featurelens.effective_field", None),
    "effective_receptive_field": ("featurelens.effective_field", None),
    "EmpiricalReceptiveField": ("featurelens.empirical", None),
    "empirical_receptive_field": ("featurelens.empirical", None),
    "ActivationError": (_ERRORS, None),
    "AtlasError": (_ERRORS, None),
    "CropWarning": (_ERRORS, None),
    "DataError": (_ERRORS, None),
    "FeaturelensError": (_ERRORS, None),
    "FeaturelensWarning": (_ERRORS, None),
    "LayerError": (_ERRORS, None),
    "LayoutError": (_ERRORS, None),
    "NotAlignedError": (_ERRORS, None),
    "ReceptiveFieldError": (_ERRORS, None),
    "SpecError": (_ERRORS, None),
    "TraceError": (_ERRORS, None),
    "UnsupportedOpError": (_ERRORS, None),
    "UsageError": (_ERRORS, None),
    "get_layer": ("featurelens.graph", None),
    "layer_names": ("featurelens.graph", None),
    "unwrap": ("featurelens.graph", None),
    "project": ("featurelens.projection", None),
    "project_units": ("featurelens.projection", None),
    "ReceptiveField": ("featurelens.receptive_field", None),
    "receptive_field": ("featurelens.receptive_field", None),
    "receptive_fields": ("featurelens.receptive_field", None),
    "layer_layout": ("featurelens.receptive_field", None),
    "ReceptiveFieldTable": ("featurelens.receptive_field", None),
    "METHODS": ("featurelens.rules", None),
    "Rule": ("featurelens.rules", None),
    "SanityResult": ("featurelens.sanity", None),
    "sanity": ("featurelens.sanity", None),
    "SCORES": ("featurelens.scan", None),
    "scan": ("featurelens.scan", None),
    "DataSpec": ("featurelens.specs", None),
    "Unit": ("featurelens.unit", None),
    "Layout": ("featurelens.unit", None),
    "STYLES": ("featurelens.render", "figures"),
    "layer_sheet": ("featurelens.figures", "figures"),
    "zf_figure": ("featurelens.figures", "figures"),
    "zf_grid": ("featurelens.figures", "figures"),
    "write_report": ("featurelens.report", "figures"),
    "show": ("featurelens.notebook", "figures"),
    "UnitView": ("featurelens.notebook", "figures"),
    "serve": ("featurelens.app", "serve"),
    "DeadUnitWarning": (_ERRORS, None),
    "NonFiniteError": (_ERRORS, None),
    "REGULARIZERS": ("featurelens.visualize", None),
    "ValueRange": ("featurelens.visualize", None),
    "Visualization": ("featurelens.visualize", None),
    "visualize": ("featurelens.visualize", None),
}


def __getattr__(name: str) -> Any:
    """Import a public name on first use and keep it (PEP 562).

    Raises
    ------
    AttributeError
        ``name`` is not a public name of featurelens.
    MissingExtraError
        The name needs an extra that is not installed.
    """
    try:
        module, extra = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'featurelens' has no attribute {name!r}") from None
    if extra is not None:
        from featurelens._extras import require_extra

        require_extra(extra, f"featurelens.{name}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    """The module's attributes and every public name, imported or not."""
    return sorted(set(globals()) | set(__all__))


class _Package(ModuleType):
    """``featurelens`` itself, which keeps a function named like its submodule.

    ``featurelens.scan`` and ``featurelens.receptive_field`` are functions, as they were when
    this file imported everything eagerly. Importing a submodule makes the import system set
    the submodule as an attribute of its package; with lazy imports that could happen after
    the function was looked up, or before, and ``featurelens.scan(...)`` would then call a
    module. This class lets the function win, whatever the import order.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _EXPORTS and isinstance(value, ModuleType):
            return  # the submodule stays reachable as sys.modules["featurelens." + name]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
