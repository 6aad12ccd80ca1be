"""Layer addressing, tracing and truncated forward passes.

Everything else in featurelens asks this module which layers a model has, in which order they
run, and for their outputs. Layers are PyTorch's dotted ``named_modules()`` names.

Three mechanisms live here:

* :func:`trace` records the model once with :mod:`torch.fx`, symbolically (layer order and
  single use without an input shape);
* :func:`module_calls` puts forward pre- and post-hooks on every submodule for the duration of
  a ``with`` block: the analytic receptive fields run the model eagerly on a concrete input
  under it (so shape-dependent Python control flow is followed), and :func:`layer_names` lists
  the layers of a model that torch.fx cannot trace that way;
* :func:`capture` runs the real model with forward hooks and stops the forward pass as soon as
  every requested layer has produced its output (used by projections and scans).

Wrapped models (``torch.compile``, ``nn.DataParallel``, ``DistributedDataParallel``) are
unwrapped by :func:`unwrap` at every entry point: layers have the inner model's names.
"""

from __future__ import annotations

import contextlib
import difflib
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
import torch.fx as fx
from torch import nn

from featurelens.errors import LayerError, TraceError, UsageError

__all__ = [
    "LayerError",
    "TraceError",
    "Traced",
    "capture",
    "get_layer",
    "input_shape_of",
    "layer_names",
    "model_device",
    "model_state",
    "module_calls",
    "preserved",
    "resolve_layers",
    "trace",
    "unwrap",
]


# --------------------------------------------------------------------------------------------
# Wrapped models


def _compiled_class() -> type | None:
    """torch.compile's wrapper class, if torch._dynamo is loaded (no compiled model otherwise)."""
    module = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(module, "OptimizedModule", None)


def _wrapper_kinds() -> tuple[tuple[type, str], ...]:
    """``(class, attribute holding the inner model)`` of the wrappers featurelens unwraps."""
    kinds: list[tuple[type, str]] = [
        (nn.DataParallel, "module"),
        (nn.parallel.DistributedDataParallel, "module"),
    ]
    compiled = _compiled_class()
    if compiled is not None:
        kinds.append((compiled, "_orig_mod"))
    return tuple(kinds)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``torch.compile``, ``nn.DataParallel`` or ``DistributedDataParallel``
    wrapper (also nested ones); any other model as it is.

    Only these known kinds are unwrapped: a wrapper of another kind is a model like any other
    (its layers carry its own prefix), whatever its class is called. featurelens runs the inner
    model eagerly on one device, so results equal the plain model's; layer names are the
    inner model's (``features.0``, not ``module.features.0`` or ``_orig_mod.features.0``).

    Parameters
    ----------
    model
        Any ``nn.Module``.

    Returns
    -------
    nn.Module
        The innermost model (the same object the wrapper holds; nothing is copied).
    """
    kinds = _wrapper_kinds()
    seen = 0
    while seen < 16:  # a wrapper that holds itself would loop forever
        for cls, attribute in kinds:
            if isinstance(model, cls):
                model = getattr(model, attribute)
                break
        else:
            return model
        seen += 1
    return model


def _wrapper_prefix(model: nn.Module) -> str:
    """``"module."`` / ``"_orig_mod."`` (nested: joined) of a wrapped model, else ``""``."""
    prefix = ""
    kinds = _wrapper_kinds()
    for _ in range(16):
        for cls, attribute in kinds:
            if isinstance(model, cls):
                prefix += attribute + "."
                model = getattr(model, attribute)
                break
        else:
            break
    return prefix


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
    """An fx tracer that remembers, for every module call, the node holding its output (and,
    for a module returning a list or tuple of tensors, the node of each element).
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, list[fx.Node | None]] = {}
        self.elements: dict[str, tuple[fx.Node | None, ...]] = {}

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        name = self.path_of_module(m)
        node = out.node if isinstance(out, fx.Proxy) else None
        self.calls.setdefault(name, []).append(node)
        if isinstance(out, (list, tuple)) and name not in self.elements:
            self.elements[name] = tuple(e.node if isinstance(e, fx.Proxy) else None for e in out)
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
    elements: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def node(self, layer: str) -> fx.Node:
        """The node holding ``layer``'s output.

        Raises
        ------
        LayerError
            Unknown, called several times, or returning a list/tuple (the message says which
            layer makes each element).
        """
        if layer in self.outputs:
            return self.outputs[layer]
        if layer in self.reused:
            raise LayerError(reused_message(layer, self.reused[layer], list(self.outputs)))
        if layer in self.elements:
            raise LayerError(sequence_message(layer, "list or tuple", self.elements[layer]))
        raise LayerError(unknown_name_message(layer, list(self.outputs)))


def reused_message(layer: str, calls: int, valid: Sequence[str]) -> str:
    """The message for a layer called ``calls`` times (its output is ambiguous)."""
    return (
        f"layer {layer!r} is called {calls} times in forward(), so its output is ambiguous; "
        "address the layer that contains it or the one after it. Valid names: "
        + ", ".join(repr(v) for v in list(valid)[:40])
    )


def sequence_message(layer: str, kind: str, makers: Sequence[str]) -> str:
    """The message for a layer that returns ``kind`` (a list, a tuple) of tensors.

    ``makers[i]`` says where element ``i`` comes from (see :func:`element_maker`); they are
    listed when some element comes from a layer inside it.
    """
    which = "; ".join(f"element {i} is {m}" for i, m in enumerate(makers))
    known = any(m.startswith("the output of") for m in makers)
    return (
        f"layer {layer!r} outputs a {kind} of tensors ({len(makers)}), not one tensor"
        + (f" ({which})" if known else "")
        + ": address the layer that makes (or takes) the element you want"
    )


def element_maker(name: str | None, calls: int) -> str:
    """How :func:`sequence_message` names the maker of one element."""
    if name is None:
        return "computed in forward() by no layer of its own"
    if calls > 1:
        return f"the output of {name!r}, which is called {calls} times (not addressable)"
    return f"the output of layer {name!r}"


_TRACE_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[int, Traced | TraceError]] = (
    weakref.WeakKeyDictionary()
)


def _structure_key(model: nn.Module) -> int:
    return hash(tuple((n, type(m), id(m)) for n, m in model.named_modules()))


def trace(model: nn.Module) -> Traced:
    """Trace ``model`` (unwrapped) with torch.fx, symbolically (in eval mode; the caller's mode
    is restored). Cached per model while its modules stay the same, failures included.

    Raises
    ------
    TraceError
        With the op and source line that failed, when the model's forward cannot be traced
        symbolically (for instance Python control flow on a shape or a value).
    """
    model = unwrap(model)
    key = _structure_key(model)
    cached = _TRACE_CACHE.get(model)
    if cached is not None and cached[0] == key:
        if isinstance(cached[1], TraceError):
            raise TraceError(str(cached[1]))
        return cached[1]
    tracer = _RecordingTracer()
    with preserved(model, freeze=False):
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # fx raises many types; we re-raise with context
            error = TraceError(_trace_failure(model, exc))
            _TRACE_CACHE[model] = (key, error)
            raise error from exc
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
    # which layer makes each element of a layer returning a list/tuple: the last one (in
    # execution order) whose output is that node, as a container follows its last child
    maker: dict[fx.Node, str] = {}
    for name, node in outputs.items():
        maker[node] = name
    calls = {name: len(nodes) for name, nodes in tracer.calls.items()}
    for name, nodes in tracer.calls.items():
        for called in nodes:
            if called is not None and called not in maker and name:
                maker[called] = name
    elements = {
        name: tuple(
            element_maker(
                made := (maker.get(e) if e is not None else None),
                calls.get(made, 1) if made is not None else 1,
            )
            for e in nodes
        )
        for name, nodes in tracer.elements.items()
        if name in not_tensor
    }
    traced = Traced(gm, outputs, reused, not_tensor, elements)
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
        "Listing its layers without running it needs a forward() that torch.fx can trace: "
        "pass input_shape=(C, *spatial) to featurelens.layer_names to list them by running the "
        "model once (receptive fields, projections and scans run it anyway)."
    )


# --------------------------------------------------------------------------------------------
# Module calls: hooks on every submodule, owned by a context manager


class StopForward(Exception):
    """Raised from a forward hook to end the forward pass once everything needed was seen."""


_Before: TypeAlias = Callable[[str, nn.Module, tuple, dict], None]
_After: TypeAlias = Callable[[str, nn.Module, tuple, dict, Any], None]


@contextlib.contextmanager
def module_calls(model: nn.Module, before: _Before, after: _After) -> Iterator[None]:
    """Forward pre- and post-hooks on every module of ``model`` (itself included) while the
    ``with`` block runs; removed on exit, also on error.

    ``before(name, module, args, kwargs)`` runs as a module's ``forward`` starts and
    ``after(name, module, args, kwargs, output)`` as it returns, with the module's dotted
    ``named_modules()`` name (``""`` for ``model`` itself). Either may raise
    :class:`StopForward` to end the forward pass; the caller catches it.
    """
    handles = []

    def pre(name: str) -> Callable[..., None]:
        return lambda module, args, kwargs: before(name, module, args, kwargs)

    def post(name: str) -> Callable[..., None]:
        return lambda module, args, kwargs, out: after(name, module, args, kwargs, out)

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(module.register_forward_hook(post(name), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def zero_input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """A zero batch of one ``(1, *input_shape)`` in the model's floating dtype, on its device."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.zeros((1, *input_shape), dtype=dtype, device=model_device(model))


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """``input_shape`` as a tuple ``(C, *spatial)`` with 1 to 3 spatial axes.

    Raises
    ------
    UsageError
        Not a sequence of positive ints of that form (the message gives examples).
    """
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError) as exc:
        raise UsageError(
            f"input_shape must be a sequence of ints (C, *spatial), got {input_shape!r}"
        ) from exc
    if not 2 <= len(shape) <= 4 or any(v < 1 for v in shape):
        raise UsageError(
            f"input_shape {shape} is not (C, *spatial) with 1 to 3 positive spatial sizes "
            "(no batch dimension): e.g. (3, 224, 224) for images, (1, 16000) for signals, "
            "(1, 32, 64, 64) for volumes"
        )
    return shape


def rejected_shape(input_shape: Sequence[int], exc: BaseException) -> UsageError:
    """The error for a model that raises on a zero input of ``input_shape``."""
    shape = ", ".join(map(str, input_shape))
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UsageError(
        f"the model rejects inputs of shape (N, {shape}): {first} (input_shape is "
        "(C, *spatial) without the batch dimension, e.g. (3, 224, 224) for RGB images)"
    )


@dataclass
class Listing:
    """The module calls of one eager forward pass on a zero input.

    Attributes
    ----------
    order
        Modules that returned a tensor, in the order they returned (a container right after
        its last child), each once.
    calls
        ``{name: number of calls}`` of every module that ran.
    sequences
        ``{name: (kind, makers)}`` for modules returning a list or tuple of tensors, with
        what makes each element (see :func:`sequence_message`).
    """

    order: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    sequences: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)

    def layers(self) -> list[str]:
        """The addressable layers: called once, returning a tensor, in execution order."""
        return [n for n in self.order if self.calls.get(n) == 1]

    def check(self, layer: str, valid: Sequence[str] | None = None) -> None:
        """Raise the :class:`LayerError` that says why ``layer`` is not addressable, if it is not.

        Raises
        ------
        LayerError
            Never called, called several times, or returning a list/tuple.
        """
        valid = self.layers() if valid is None else valid
        calls = self.calls.get(layer, 0)
        if calls > 1:
            raise LayerError(reused_message(layer, calls, valid))
        if layer in self.sequences:
            kind, makers = self.sequences[layer]
            raise LayerError(sequence_message(layer, kind, makers))
        if calls == 0:
            raise LayerError(
                f"layer {layer!r} is never called by forward() on this input; valid names: "
                + ", ".join(repr(v) for v in list(valid)[:40])
            )


def list_calls(model: nn.Module, input_shape: Sequence[int]) -> Listing:
    """Run ``model`` (unwrapped, eval mode, no gradients) once on zeros of ``input_shape`` and
    record its module calls.

    Raises
    ------
    UsageError
        ``input_shape`` is not ``(C, *spatial)``, or the model rejects it.
    """
    model = unwrap(model)
    shape = check_input_shape(input_shape)
    listing = Listing()
    maker_of = _TensorNames()  # the last module that returned each tensor

    def before(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        return None

    def after(name: str, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if not name:
            return
        listing.calls[name] = listing.calls.get(name, 0) + 1
        if isinstance(out, torch.Tensor):
            if name not in listing.order:
                listing.order.append(name)
            maker_of.set(out, name)
        elif is_tensor_sequence(out) and name not in listing.sequences:
            kind = "list" if isinstance(out, list) else "tuple"
            listing.sequences[name] = (kind, tuple(maker_of.get(e) or "" for e in out))

    x = zero_input(model, shape)
    with preserved(model, freeze=False), torch.no_grad(), module_calls(model, before, after):
        try:
            model(x)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise rejected_shape(shape, exc) from exc
    listing.sequences = {
        name: (kind, tuple(element_maker(m or None, listing.calls.get(m, 1)) for m in makers_))
        for name, (kind, makers_) in listing.sequences.items()
    }
    return listing


def is_tensor_sequence(value: Any) -> bool:
    """A non-empty list or tuple of tensors (what a multi-output layer returns)."""
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(e, torch.Tensor) for e in value)
    )


class _TensorNames:
    """``tensor -> name`` by identity, without keeping tensors alive."""

    def __init__(self) -> None:
        from torch.utils.weak import WeakIdKeyDictionary

        self._names: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def set(self, t: torch.Tensor, name: str) -> None:
        self._names[t] = name

    def get(self, t: torch.Tensor) -> str | None:
        return self._names.get(t)


def input_shape_of(model: nn.Module) -> tuple[int, ...] | None:
    """The input shape a model declares, or None: timm's ``pretrained_cfg["input_size"]``.

    Parameters
    ----------
    model
        Any model (unwrapped first).

    Returns
    -------
    tuple or None
        ``(C, *spatial)``, e.g. ``(3, 224, 224)``.
    """
    cfg = getattr(unwrap(model), "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, (list, tuple)) and 2 <= len(size) <= 4:
        try:
            return tuple(int(v) for v in size)
        except (TypeError, ValueError):
            return None
    return None


# --------------------------------------------------------------------------------------------
# Addressing


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in unwrap(model).named_modules() if n]


def layer_names(model: nn.Module, input_shape: Sequence[int] | None = None) -> list[str]:
    """The addressable layers of ``model``: dotted ``named_modules()`` names in execution order.

    A layer is addressable when its module is called exactly once by ``forward()`` and returns
    a tensor. Modules called several times (a ``ReLU`` reused inside a block) and modules never
    called are left out; their output is ambiguous or absent. A wrapped model
    (:func:`unwrap`) lists its inner model's names.

    Parameters
    ----------
    model
        Any ``nn.Module``; left as it was given.
    input_shape
        ``(C, *spatial)`` without the batch dim. Without it the model is traced symbolically
        with torch.fx; with it (or, when torch.fx cannot trace the model, with the shape a
        timm model declares in ``pretrained_cfg["input_size"]``) the model runs once on zeros
        of that shape with hooks, which follows Python control flow on shapes (timm's
        ``vgg16`` head). On a model that branches on its input's values, that run lists the
        path a zero input takes.

    Returns
    -------
    list of str

    Raises
    ------
    TraceError
        No ``input_shape``, torch.fx cannot trace the model and it declares no input size: the
        message names the failing line and says to pass ``input_shape``.
    UsageError
        ``input_shape`` is not ``(C, *spatial)`` or the model rejects it.
    """
    model = unwrap(model)
    if input_shape is None:
        try:
            return list(trace(model).outputs)
        except TraceError:
            input_shape = input_shape_of(model)
            if input_shape is None:
                raise
    return list_calls(model, input_shape).layers()


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (of the unwrapped model); a :class:`LayerError` listing
    valid names otherwise.

    A name with a wrapper's prefix (``module.features.0`` of an ``nn.DataParallel``) is refused
    with a message giving the inner name: featurelens names every layer one way.
    """
    if not isinstance(name, str):
        raise LayerError(f"layer names are strings, got {name!r} ({type(name).__name__})")
    prefix = _wrapper_prefix(model)
    model = unwrap(model)
    modules = dict(model.named_modules())
    if name == "" or name not in modules:
        if prefix and name.startswith(prefix) and name[len(prefix) :] in modules:
            inner = name[len(prefix) :]
            raise LayerError(
                f"layer {name!r} names a layer through the {type(model).__name__} model's "
                f"wrapper; featurelens unwraps the model and uses the inner names: {inner!r}"
            )
        raise LayerError(unknown_name_message(name, _valid_names(model)))
    return modules[name]


def resolve_layers(model: nn.Module, layers: str | Iterable[str]) -> list[str]:
    """Validate layer names (existence; single use when the model traces). Returns a list."""
    model = unwrap(model)
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
    except (TraceError, UsageError):
        return _module_names(model)


# --------------------------------------------------------------------------------------------
# Truncated forward


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
    model = unwrap(model)
    names = list(dict.fromkeys(layers))
    modules = {name: get_layer(model, name) for name in names}
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def traced_elements() -> dict[str, tuple[str, ...]]:
        try:
            return trace(model).elements
        except TraceError:
            return {}

    def make_hook(name: str):
        def hook(module, args, output):
            if name in outputs:
                return None
            if not isinstance(output, torch.Tensor):
                if isinstance(output, (list, tuple)) and name in traced_elements():
                    raise LayerError(sequence_message(name, type(output).__name__,
                                                      traced_elements()[name]))  # fmt: skip
                raise LayerError(
                    f"layer {name!r} returns {type(output).__name__}, not a tensor; "
                    "address one of its submodules instead"
                )
            outputs[name] = output
            if on_output is not None:
                on_output(name, output)
            if len(outputs) == len(names):
                raise StopForward
            return None

        return hook

    def run(*args, **kwargs) -> dict[str, torch.Tensor]:
        outputs.clear()
        with contextlib.suppress(StopForward):
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
