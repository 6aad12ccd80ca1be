"""Layer addressing, tracing and truncated forward passes.

Everything else in featurelens asks this module which layers a model has, in which order they
run, and for their outputs. Layers are PyTorch's dotted ``named_modules()`` names.

Two mechanisms live here, on purpose independent of each other:

* :func:`trace` records the model once with :mod:`torch.fx` (used for layer order and for the
  analytic receptive fields);
* :func:`capture` runs the real model with forward hooks and stops the forward pass as soon as
  every requested layer has produced its output (used by projections and scans, and working on
  models that cannot be traced).
"""

from __future__ import annotations

import contextlib
import difflib
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from featurelens.errors import LayerError, TraceError

__all__ = [
    "LayerError",
    "TraceError",
    "Traced",
    "capture",
    "get_layer",
    "layer_names",
    "model_device",
    "model_state",
    "preserved",
    "resolve_layers",
    "trace",
]


def unknown_name_message(bad: str, valid: Sequence[str], what: str = "layer") -> str:
    """The message for an unknown name: close matches first, then the valid names in order.

    For example "unknown layer 'x'. Did you mean ...? Valid names (in order): ..." (execution
    order for layers).
    """
    close = difflib.get_close_matches(str(bad), list(valid), n=5, cutoff=0.5)
    shown = ", ".join(repr(v) for v in valid[:25])
    more = f", ... ({len(valid) - 25} more)" if len(valid) > 25 else ""
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {what} {bad!r}.{hint} Valid names (in order): {shown}{more}"


# --------------------------------------------------------------------------------------------
# Model hygiene: the caller's model comes back exactly as it was given.


@dataclass(frozen=True)
class ModelState:
    """What featurelens may touch on a model and must put back."""

    training: dict[str, bool]
    requires_grad: dict[str, bool]


def model_state(model: nn.Module) -> ModelState:
    """The ``training`` flag of every module and ``requires_grad`` of every parameter."""
    return ModelState(
        training={n: m.training for n, m in model.named_modules()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
    )


def _restore(model: nn.Module, state: ModelState) -> None:
    # train() first, so a custom train()/eval() override gets to undo its own side effects;
    # then the flags that differ from the root's (a submodule the caller froze in eval mode).
    if "" in state.training:
        model.train(state.training[""])
    for name, module in model.named_modules():
        if name in state.training and module.training != state.training[name]:
            module.training = state.training[name]
    for name, param in model.named_parameters():
        if name in state.requires_grad:
            param.requires_grad_(state.requires_grad[name])


@contextlib.contextmanager
def preserved(model: nn.Module, *, eval_mode: bool = True, freeze: bool = True) -> Iterator[None]:
    """Put ``model`` in eval mode with frozen parameters, and restore both on exit.

    Restores every submodule's ``training`` flag and every parameter's ``requires_grad``
    exactly, also when the body raises.
    """
    state = model_state(model)
    try:
        if eval_mode:
            model.eval()
        if freeze:
            for p in model.parameters():
                p.requires_grad_(False)
        yield
    finally:
        _restore(model, state)


def model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """Where the model lives: its first parameter's device, else its first buffer's."""
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return torch.device(default)


# --------------------------------------------------------------------------------------------
# Tracing


class _RecordingTracer(fx.Tracer):
    """An fx tracer that remembers, for every module call, the node holding its output."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, list[fx.Node | None]] = {}

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        node = out.node if isinstance(out, fx.Proxy) else None
        self.calls.setdefault(name, []).append(node)
        return out


@dataclass
class Traced:
    """A model traced once with torch.fx.

    Attributes
    ----------
    graph_module
        The traced graph; it shares the model's submodules and parameters.
    outputs
        ``{layer name: node}`` for every addressable layer, in execution order.
    reused
        ``{layer name: call count}`` for modules called more than once (not addressable:
        their output is ambiguous).
    """

    graph_module: fx.GraphModule
    outputs: dict[str, fx.Node]
    reused: dict[str, int] = field(default_factory=dict)
    not_tensor: list[str] = field(default_factory=list)

    def node(self, layer: str) -> fx.Node:
        """The graph node whose value is ``layer``'s output; raises LayerError when there is none."""
        if layer in self.outputs:
            return self.outputs[layer]
        if layer in self.reused:
            raise LayerError(
                f"layer {layer!r} is called {self.reused[layer]} times in forward(), so its "
                "output is ambiguous; address the layer that contains it or the one after it. "
                "Valid names: " + ", ".join(repr(v) for v in list(self.outputs)[:40])
            )
        raise LayerError(unknown_name_message(layer, list(self.outputs)))


_TRACE_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[int, Traced]] = weakref.WeakKeyDictionary()


def _structure_key(model: nn.Module) -> int:
    return hash(tuple((n, type(m), id(m)) for n, m in model.named_modules()))


def trace(model: nn.Module) -> Traced:
    """Trace ``model`` with torch.fx (in eval mode; the caller's mode is restored).

    Raises
    ------
    TraceError
        With the op and source line that failed, when the model's forward cannot be traced
        symbolically (for instance data-dependent control flow).
    """
    key = _structure_key(model)
    cached = _TRACE_CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    tracer = _RecordingTracer()
    with preserved(model, freeze=False):
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # fx raises many types; we re-raise with context
            raise TraceError(_trace_failure(model, exc)) from exc
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    outputs: dict[str, fx.Node] = {}
    reused: dict[str, int] = {}
    not_tensor: list[str] = []
    order: list[tuple[int, str, fx.Node]] = []
    position = {n: i for i, n in enumerate(graph.nodes)}
    for name, nodes in tracer.calls.items():
        if name == "":
            continue
        if len(nodes) > 1:
            reused[name] = len(nodes)
        elif nodes[0] is None or nodes[0].op == "placeholder":
            not_tensor.append(name)
        else:
            order.append((position[nodes[0]], name, nodes[0]))
    # Execution order: the order in which outputs are produced; a container comes right after
    # its last child (stable sort keeps the tracer's completion order for shared nodes).
    for _, name, node in sorted(order, key=lambda t: t[0]):
        outputs[name] = node
    traced = Traced(gm, outputs, reused, not_tensor)
    _TRACE_CACHE[model] = (key, traced)
    return traced


def _trace_failure(model: nn.Module, exc: BaseException) -> str:
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename.replace("\\", "/")]
    where = user[-1] if user else (frames[-1] if frames else None)
    loc = f" at {where.filename}:{where.lineno} ({where.line!s})" if where else ""
    return (
        f"cannot trace {type(model).__name__} with torch.fx: {type(exc).__name__}: {exc}{loc}. "
        "Analytic receptive fields need a traceable forward(); "
        "featurelens.empirical_receptive_field still works on this model, and so do projections "
        "(without the receptive-field crop) and scans."
    )


# --------------------------------------------------------------------------------------------
# Addressing


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def layer_names(model: nn.Module) -> list[str]:
    """The addressable layers of ``model``: dotted ``named_modules()`` names in execution order.

    A layer is addressable when its module is called exactly once by ``forward()`` and returns
    a tensor. Modules called several times (a ``ReLU`` reused inside a block) and modules never
    called are left out; their output is ambiguous or absent.
    """
    return list(trace(model).outputs)


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a :class:`LayerError` listing valid names otherwise."""
    if not isinstance(name, str):
        raise LayerError(f"layer names are strings, got {name!r} ({type(name).__name__})")
    modules = dict(model.named_modules())
    if name == "" or name not in modules:
        try:
            valid = layer_names(model)
        except TraceError:
            valid = _module_names(model)
        raise LayerError(unknown_name_message(name, valid))
    return modules[name]


def resolve_layers(model: nn.Module, layers: str | Iterable[str]) -> list[str]:
    """Validate layer names (existence; single use when the model traces). Returns a list."""
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise LayerError("no layer given; valid names: " + ", ".join(_valid_names(model)[:40]))
    try:
        traced: Traced | None = trace(model)
    except TraceError:
        traced = None
    for name in names:
        get_layer(model, name)
        if traced is not None:
            traced.node(name)
    return names


def _valid_names(model: nn.Module) -> list[str]:
    try:
        return layer_names(model)
    except TraceError:
        return _module_names(model)


# --------------------------------------------------------------------------------------------
# Truncated forward


class _StopForward(Exception):
    """Raised from a forward hook once every requested layer has been seen."""


@contextlib.contextmanager
def capture(
    model: nn.Module,
    layers: Sequence[str],
    on_output: Callable[[str, torch.Tensor], None] | None = None,
) -> Iterator[Callable[..., dict[str, torch.Tensor]]]:
    """Hooks that collect layer outputs and stop the forward pass after the last one.

    Use as::

        with capture(model, ["features.3", "features.8"]) as run:
            outs = run(x)          # {"features.3": tensor, "features.8": tensor}

    Nothing after the deepest requested layer runs. ``on_output(name, tensor)`` is called inside
    the hook, right when the output is produced: reduce there when later in-place operations
    (``ReLU(inplace=True)``) would overwrite the tensor. Without it, outputs are returned as
    produced (the last layer's output is never overwritten: the forward stops there).
    The hooks are removed when the ``with`` block ends, also on error.
    """
    names = list(dict.fromkeys(layers))
    modules = {name: get_layer(model, name) for name in names}
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            if name in outputs:
                return None
            if not isinstance(output, torch.Tensor):
                raise LayerError(
                    f"layer {name!r} returns {type(output).__name__}, not a tensor; "
                    "address one of its submodules instead"
                )
            outputs[name] = output
            if on_output is not None:
                on_output(name, output)
            if len(outputs) == len(names):
                raise _StopForward
            return None

        return hook

    def run(*args, **kwargs) -> dict[str, torch.Tensor]:
        outputs.clear()
        with contextlib.suppress(_StopForward):
            model(*args, **kwargs)
        missing = [n for n in names if n not in outputs]
        if missing:
            raise LayerError(
                f"layer(s) {missing} were never called by forward(); "
                "valid names: " + ", ".join(_valid_names(model)[:40])
            )
        return dict(outputs)

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield run
    finally:
        for h in handles:
            h.remove()
