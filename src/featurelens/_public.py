"""The boundary between a user's call and the library: errors surface at the public call.

A library error found deep inside a call (a bad layer name noticed while tracing, a shape the
model rejects) used to print every frame between the user's line and the check, torch's
internals included, before its message. :func:`public` wraps a public function so that an error
featurelens raises (a :class:`~featurelens.errors.FeaturelensError`, or any exception raised
by featurelens's own code) leaving it carries a short traceback: the user's frames, then the
public function's own line, then the message. Chained causes (a torch error the message
explains) keep their tracebacks.

Set the environment variable ``FEATURELENS_FULL_TRACEBACK=1`` to keep every frame (for
debugging featurelens itself). Errors raised elsewhere (``torch`` running out of memory, a bug
in the user's model) are never touched: their frames are where the problem is.

Only the error path changes: a wrapped function adds one frame to the stack while it runs, so a
warning it issues with ``stacklevel=n`` to reach its caller uses ``n + 1``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

from featurelens.errors import FeaturelensError

__all__ = ["FULL_TRACEBACK_VARIABLE", "public"]

FULL_TRACEBACK_VARIABLE = "FEATURELENS_FULL_TRACEBACK"
"""Environment variable that keeps the full traceback of library errors when set to ``1``."""

_F = TypeVar("_F", bound=Callable[..., Any])


_PACKAGE = str(Path(__file__).resolve().parent)


def _full_traceback() -> bool:
    return os.environ.get(FULL_TRACEBACK_VARIABLE, "").strip() not in ("", "0")


def _ours(exc: BaseException, tb: TracebackType) -> bool:
    """A featurelens error, or one raised by featurelens's own code (the innermost frame)."""
    if isinstance(exc, FeaturelensError):
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(_PACKAGE)


def public(func: _F) -> _F:
    """Make ``func`` a public entry point whose library errors end at its own frame.

    Parameters
    ----------
    func
        A public function of featurelens.

    Returns
    -------
    callable
        ``func`` wrapped (same name, signature and docstring): a
        :class:`~featurelens.errors.FeaturelensError`, or another exception raised by
        featurelens's code, anywhere below ``func`` leaves with a traceback whose last frame
        is ``func``'s line that led to it.
    """

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # pytest and IPython leave this frame out
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            own = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
            if own is None or own.tb_next is None or _full_traceback() or not _ours(exc, own):
                raise
            own.tb_next = None  # drop the frames below the public function
            raise exc.with_traceback(own)  # noqa: B904 - the same exception, shortened

    return cast(_F, call)
