"""featurelens: interpret the features of a convolutional network by inverting it.

Receptive fields of every layer, maximally activating examples, projections of a unit back to
the input (gradient, deconvnet, guided backprop), Zeiler-Fergus figures and an explorer.
"""

from featurelens.app import serve
from featurelens.atlas import Atlas, AtlasError, Hit
from featurelens.empirical import EmpiricalReceptiveField, empirical_receptive_field
from featurelens.errors import (
    FeaturelensError,
    FeaturelensWarning,
    ReceptiveFieldError,
    SpecError,
    UsageError,
)
from featurelens.figures import layer_sheet, zf_figure, zf_grid
from featurelens.graph import LayerError, TraceError, get_layer, layer_names
from featurelens.projection import CropWarning, project, project_units
from featurelens.receptive_field import (
    NotAlignedError,
    ReceptiveField,
    UnsupportedOpError,
    receptive_field,
    receptive_fields,
)
from featurelens.render import STYLES
from featurelens.report import write_report
from featurelens.rules import METHODS, ActivationError, Rule
from featurelens.scan import SCORES, DataError, scan
from featurelens.specs import DataSpec
from featurelens.unit import Unit

__version__ = "0.1.0"

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
    "EmpiricalReceptiveField",
    "FeaturelensError",
    "FeaturelensWarning",
    "ReceptiveFieldError",
    "SpecError",
    "UsageError",
    "LayerError",
    "NotAlignedError",
    "ReceptiveField",
    "TraceError",
    "UnsupportedOpError",
    "__version__",
    "empirical_receptive_field",
    "get_layer",
    "layer_names",
    "receptive_field",
    "receptive_fields",
    "serve",
    "layer_sheet",
    "write_report",
    "zf_figure",
    "zf_grid",
]
