"""Text specs that name a model (and, later, a dataset), so an atlas can rebuild both.

Model specs:

* ``torchvision:NAME`` - a torchvision classifier, ``weights=None`` unless ``weights`` is given
  (``"DEFAULT"`` or a weights enum name; downloading needs a network);
* ``path/to/file.py:factory`` - a function in a Python file, called with no arguments;
* ``package.module:factory`` - a function in an importable module.

Any of them can be followed by a ``checkpoint`` (a ``state_dict`` saved with ``torch.save``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ModelSpec", "SpecError", "load_factory", "load_model"]


class SpecError(ValueError):
    """A model or data spec that cannot be resolved; the message says what would be valid."""


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
        return load_model(self.spec, weights=self.weights, checkpoint=self.checkpoint)


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
    """Build the model named by ``spec`` (see the module docstring), in eval mode."""
    if spec.startswith("torchvision:"):
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
        model = torchvision.models.get_model(name, **kwargs)
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
        model.load_state_dict(state)
    return model.eval()
