"""Every error and warning featurelens raises, in one hierarchy.

Catch :class:`FeaturelensError` to handle any library error in one place (the explorer turns
them into 4xx answers, the CLI into one-line messages); each class also derives from the
built-in exception a caller would expect (``ValueError`` for a bad value, ``KeyError`` for an
unknown name), so existing ``except ValueError`` code keeps working.

::

    FeaturelensError (Exception)
    ├── UsageError (ValueError)             an argument that is not valid
    │   ├── ChannelError (IndexError)        a channel the layer does not have
    │   ├── NotFoundError (LookupError)      an example, upload or location that is not there
    │   ├── LimitError                       an input over a configured size limit
    │   ├── FormatError                      bytes that are not an accepted file format
    │   ├── StyleError                       an unknown picture style
    │   └── ReportError                      a report that cannot be written as asked
    ├── LayerError (KeyError)                a layer name the model does not have
    ├── LayoutError (ValueError)             a layer whose channel dim / locations are unknown
    ├── ActivationError (ValueError)         an activation without a rule for the method
    ├── ReceptiveFieldError                  no analytic receptive field here
    │   ├── TraceError (RuntimeError)        the model cannot be traced
    │   ├── UnsupportedOpError (NotImplementedError)
    │   └── NotAlignedError (ValueError)     branches with different strides merge
    ├── DataError (TypeError, ValueError)    data that cannot be scanned
    ├── SpecError (ValueError)               a model or data spec that does not resolve
    ├── AtlasError (ValueError)              an atlas that cannot be used as asked
    │   ├── UntrustedAtlasError              an atlas names code it may not run without consent
    │   └── LockedError                      a directory another scan is writing
    ├── NonFiniteError (FloatingPointError)  a value or gradient became NaN or infinite
    └── MissingExtraError (ModuleNotFoundError)  an optional dependency that is not installed

    FeaturelensWarning (UserWarning)
    ├── CropWarning                          a projection ran on the whole input
    └── DeadUnitWarning                      a unit visualize could not move (zero gradient)

:class:`featurelens.scan.ScanInterrupted` is a ``KeyboardInterrupt`` on purpose (code that
stops on Ctrl-C still stops) and so stands outside this hierarchy.
"""

from __future__ import annotations

__all__ = [
    "ActivationError",
    "AtlasError",
    "ChannelError",
    "CropWarning",
    "DataError",
    "DeadUnitWarning",
    "FeaturelensError",
    "FeaturelensWarning",
    "FormatError",
    "LayerError",
    "LayoutError",
    "LimitError",
    "NonFiniteError",
    "LockedError",
    "MissingExtraError",
    "NotAlignedError",
    "NotFoundError",
    "ReceptiveFieldError",
    "ReportError",
    "SpecError",
    "StyleError",
    "TraceError",
    "UnsupportedOpError",
    "UntrustedAtlasError",
    "UsageError",
]


class FeaturelensError(Exception):
    """Base of every error featurelens raises; the message says what to do."""


class FeaturelensWarning(UserWarning):
    """Base of every warning featurelens emits."""


class UsageError(FeaturelensError, ValueError):
    """An argument that is not valid; the message names the value and what would be."""


class ChannelError(UsageError, IndexError):
    """A channel index that the layer does not have; the message gives the valid range."""


class NotFoundError(UsageError, LookupError):
    """A name or index with nothing behind it; the message says what exists.

    A dataset example past the end, an upload that is not (or no longer) kept, a location
    outside a layer's map.
    """


class LimitError(UsageError):
    """An input over a configured size limit (upload bytes, pixels); the message gives both."""


class FormatError(UsageError):
    """Bytes that are not in an accepted file format; the message says what was found."""


class StyleError(UsageError):
    """An unknown picture style; the message lists the valid ones."""


class ReportError(UsageError):
    """A report that cannot be written as asked (for example ``--out`` inside the atlas)."""


class LayerError(FeaturelensError, KeyError):
    """A layer name that the model does not have (or cannot address).

    The message names the bad value and lists valid names, close matches first.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class LayoutError(FeaturelensError, ValueError):
    """A layer whose layout (which dim holds the channels, which the locations) cannot be
    established by the trace; the message says why and how to state it (``channel_dim=``).

    Not a :class:`ReceptiveFieldError` on purpose: a caller that falls back on the whole
    input when a layer has no receptive field must not read such a layer's channels at a
    guessed dim.
    """


class ActivationError(FeaturelensError, ValueError):
    """An activation without a rule for the chosen method (e.g. GELU under guided backprop)."""


class ReceptiveFieldError(FeaturelensError):
    """The analytic receptive field of a layer cannot be computed; the message says why."""


class TraceError(ReceptiveFieldError, RuntimeError):
    """The model could not be traced symbolically (data-dependent control flow, ...)."""


class UnsupportedOpError(ReceptiveFieldError, NotImplementedError):
    """An operation whose effect on the receptive field featurelens does not know."""


class NotAlignedError(ReceptiveFieldError, ValueError):
    """Branches merge with different effective strides: no single receptive-field geometry."""


class DataError(FeaturelensError, TypeError, ValueError):
    """Data that cannot be scanned: items that are not tensors, shapes that do not stack."""


class SpecError(FeaturelensError, ValueError):
    """A model or data spec that cannot be resolved; the message says what would be valid."""


class AtlasError(FeaturelensError, ValueError):
    """An atlas directory that cannot be used as asked (incomplete, other version, ...)."""


class UntrustedAtlasError(AtlasError):
    """An atlas names code (or a folder outside itself) that featurelens would run or read to
    rebuild its model or data, and it is not trusted: it was not made by this user on this
    machine and no consent was given. The message shows exactly what would run and how to
    allow it (``--trust-code`` on the CLI, ``trust_code=True`` in Python).
    """


class LockedError(AtlasError):
    """A directory that another scan holds the lock of; the message names the holder (process
    id, host, start time) and what to do.
    """


class NonFiniteError(FeaturelensError, FloatingPointError):
    """A value or gradient became NaN or infinite (:func:`featurelens.visualize`); the message
    names the channel and the step.
    """


class MissingExtraError(FeaturelensError, ModuleNotFoundError):
    """Something needs an extra that is not installed; the message names it and the command.

    For example ``the explorer needs the 'serve' extra: pip install 'featurelens[serve]'``.
    ``name`` is the first missing module, as for any ``ModuleNotFoundError``.
    """


class CropWarning(FeaturelensWarning):
    """The receptive-field crop was turned off for a call (the result is still exact)."""


class DeadUnitWarning(FeaturelensWarning):
    """:func:`featurelens.visualize` could not move some units: their gradient was zero at
    every step (a dead unit); their images are the starting noise.
    """
