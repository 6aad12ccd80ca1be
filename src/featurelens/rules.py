"""Backward rules for rectifiers: plain gradient, deconvnet and guided backpropagation.

The three projection methods of a unit back to the input differ in one place only: how the
backward pass goes through a rectifier ``y = max(x, 0)``. Given the gradient arriving at the
rectifier's output ``g`` and the forward mask ``x > 0``:

==========  ===================================  ==========================================
method      rectifier backward                   reference
==========  ===================================  ==========================================
gradient    ``g * (x > 0)`` (plain autograd)     Simonyan, Vedaldi & Zisserman 2013
deconvnet   ``relu(g)`` (forward mask ignored)   Zeiler & Fergus 2014 (arXiv 1311.2901)
guided      ``relu(g) * (x > 0)``                Springenberg et al. 2014 (arXiv 1412.6806)
==========  ===================================  ==========================================

Max pooling needs no rule: autograd's max-pool backward already routes the signal through the
forward switches, which is what the deconvnet does. Everything else is plain autograd.

A rule is installed by :func:`rule_mode`, a :class:`torch.overrides.TorchFunctionMode`, so it
sees every rectifier however it is written: ``nn.ReLU`` (in place or not, reused on any number
of branches), ``F.relu``, ``F.relu_``, ``torch.relu``, ``Tensor.relu``/``relu_``,
``clamp``/``clip``/``clamp_min`` with ``min=0`` and no max, ``F.threshold(x, 0, 0)``. Module
backward hooks (Captum, pytorch-grad-cam) miss the functional forms and mis-route a module
reused on interleaved branches; an override of the function itself does neither.

Other activations (GELU, SiLU, LeakyReLU, ReLU6, sigmoid, ...) have no deconvnet or guided rule.
Under those methods they raise :class:`ActivationError`, naming the activation and the module
running it, unless the caller passes ``other_activations="gradient"`` (back-propagate them as
plain gradients).

Adding a rule is one entry in :data:`METHODS`::

    METHODS["positive-gradient"] = Rule(
        "positive-gradient", lambda g, positive: g.clamp(min=0) * positive, "...")
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from featurelens.errors import ActivationError

__all__ = [
    "METHODS",
    "OTHER_ACTIVATIONS",
    "ActivationError",
    "Rule",
    "check_other_activations",
    "get_rule",
    "method_names",
    "rule_mode",
]


@dataclass(frozen=True)
class Rule:
    """How the backward pass goes through a rectifier.

    Attributes
    ----------
    name
        The method's name (the key in :data:`METHODS`).
    backward
        ``backward(grad_out, positive) -> grad_in``: ``grad_out`` is the gradient arriving at
        the rectifier's output, ``positive`` the bool mask ``forward input > 0`` (same shape).
    summary
        One line for menus and ``--help``.
    autograd
        True when the rule is exactly autograd's own ReLU backward: then nothing is overridden
        at all and results are bit-identical to ``torch.autograd.grad``.
    uses_mask
        False when ``backward`` ignores ``positive`` (deconvnet): the mask is then not kept
        (``positive`` is None), which saves memory.
    """

    name: str
    backward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    summary: str
    autograd: bool = False
    uses_mask: bool = True


def _mask(positive: torch.Tensor | None) -> torch.Tensor:
    """The forward mask of a rule that uses it (``uses_mask``): never None there."""
    assert positive is not None, "a rule with uses_mask=True always gets its mask"
    return positive


METHODS: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule(
            "gradient",
            lambda g, positive: g * _mask(positive),
            "saliency: the plain gradient d unit / d input (Simonyan et al. 2013)",
            autograd=True,
        ),
        Rule(
            "deconvnet",
            lambda g, positive: g.clamp(min=0),
            "deconvnet: rectify the backward signal, ignore the forward mask (Zeiler & Fergus 2014)",
            uses_mask=False,
        ),
        Rule(
            "guided",
            lambda g, positive: g.clamp(min=0) * _mask(positive),
            "guided backprop: rectified backward signal through the forward mask "
            "(Springenberg et al. 2014)",
        ),
    )
}
"""The projection methods, in one registry read by the library, the CLI and the explorer."""

OTHER_ACTIVATIONS = ("error", "gradient")
"""Choices for ``other_activations``: what non-rectifier activations do under a rule."""


def method_names() -> list[str]:
    """The valid projection methods, in registry order."""
    return list(METHODS)


def get_rule(method: str | Rule) -> Rule:
    """The :class:`Rule` called ``method``; a ValueError listing the valid names otherwise."""
    if isinstance(method, Rule):
        return method
    if method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}; valid methods: {', '.join(map(repr, METHODS))}"
        )
    return METHODS[method]


def check_other_activations(other_activations: str) -> None:
    """A ValueError listing the valid choices unless ``other_activations`` is one of them."""
    if other_activations not in OTHER_ACTIVATIONS:
        raise ValueError(
            f"unknown other_activations {other_activations!r}; valid: "
            + ", ".join(map(repr, OTHER_ACTIVATIONS))
        )


# --------------------------------------------------------------------------------------------
# The override


class _Rectify(torch.autograd.Function):
    """``max(x, 0)`` whose backward is a :class:`Rule`; in place when asked (``relu_``)."""

    @staticmethod
    def forward(ctx, x, rule, inplace):
        out = x.relu_() if inplace else x.relu()
        if inplace:
            ctx.mark_dirty(x)
        # A bool mask rather than a saved tensor: later in-place ops on the output (legal under
        # autograd for clamp, which saves its input) must not invalidate this backward.
        ctx.positive = out > 0 if rule.uses_mask else None
        ctx.rule = rule
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return ctx.rule.backward(grad_out, ctx.positive), None, None


def _is_zero(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


def _arg(args: tuple, kwargs: dict, pos: int, name: str, default: Any = None) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name, default)


def _relu_call(func: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool] | None:
    """``(input, inplace)`` when ``func(*args, **kwargs)`` is a rectifier ``max(x, 0)``."""
    if func in _RELU:
        x = _arg(args, kwargs, 0, "input")
        inplace = func in _RELU_INPLACE or bool(_arg(args, kwargs, 1, "inplace", False))
        return x, inplace
    if func in _CLAMP:
        x = _arg(args, kwargs, 0, "input")
        lo = _arg(args, kwargs, 1, "min")
        hi = _arg(args, kwargs, 2, "max")
        if _is_zero(lo) and hi is None:
            return x, func in _CLAMP_INPLACE
        return None
    if func in _CLAMP_MIN:
        x = _arg(args, kwargs, 0, "input")
        if _is_zero(_arg(args, kwargs, 1, "min")):
            return x, func in _CLAMP_INPLACE
        return None
    if func in _THRESHOLD:
        x = _arg(args, kwargs, 0, "input")
        if _is_zero(_arg(args, kwargs, 1, "threshold")) and _is_zero(
            _arg(args, kwargs, 2, "value")
        ):
            inplace = func in _THRESHOLD_INPLACE or bool(_arg(args, kwargs, 3, "inplace", False))
            return x, inplace
        return None
    return None


_T = torch.Tensor
_RELU_INPLACE = {torch.relu_, _T.relu_, F.relu_}
_RELU = {F.relu, torch.relu, _T.relu} | _RELU_INPLACE
_CLAMP_INPLACE = {torch.clamp_, _T.clamp_, torch.clip_, _T.clip_, torch.clamp_min_, _T.clamp_min_}
_CLAMP = {
    torch.clamp,
    _T.clamp,
    torch.clip,
    _T.clip,
    torch.clamp_,
    _T.clamp_,
    torch.clip_,
    _T.clip_,
}
_CLAMP_MIN = {torch.clamp_min, _T.clamp_min, torch.clamp_min_, _T.clamp_min_}
_THRESHOLD_INPLACE = {torch.threshold_, F.threshold_}  # type: ignore[attr-defined]  # not in stubs
_THRESHOLD = {F.threshold, torch.threshold} | _THRESHOLD_INPLACE

# Activations with no deconvnet/guided rule, by the name shown in errors. Clamps, clips and
# thresholds with other bounds land here too (see _activation_name).
_OTHER: dict[Any, str] = {}
for _name, _funcs in {
    "GELU": (F.gelu,),
    "SiLU": (F.silu,),
    "Mish": (F.mish,),
    "LeakyReLU": (F.leaky_relu, F.leaky_relu_),
    "ReLU6": (F.relu6,),
    "Hardtanh": (F.hardtanh, F.hardtanh_),
    "ELU": (F.elu, F.elu_, torch.nn.functional.elu),
    "SELU": (F.selu, torch.selu, torch.selu_),
    "CELU": (F.celu, torch.celu, torch.celu_),
    "PReLU": (F.prelu, torch.prelu),
    "RReLU": (F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_),
    "Sigmoid": (F.sigmoid, torch.sigmoid, torch.sigmoid_, _T.sigmoid, _T.sigmoid_,
                torch.special.expit),
    "Tanh": (F.tanh, torch.tanh, torch.tanh_, _T.tanh, _T.tanh_),
    "Hardswish": (F.hardswish,),
    "Hardsigmoid": (F.hardsigmoid,),
    "Softplus": (F.softplus,),
    "Softsign": (F.softsign,),
    "LogSigmoid": (F.logsigmoid,),
    "Tanhshrink": (F.tanhshrink,),
    "GLU": (F.glu,),
}.items():  # fmt: skip
    for _f in _funcs:
        _OTHER[_f] = _name


def _activation_name(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The name of a non-rectifier activation, or None when ``func`` is not an activation."""
    if func in _OTHER:
        return _OTHER[func]
    if func in _CLAMP or func in _CLAMP_MIN:
        lo = _arg(args, kwargs, 1, "min")
        hi = None if func in _CLAMP_MIN else _arg(args, kwargs, 2, "max")
        return f"{getattr(func, '__name__', 'clamp')}(min={lo!r}, max={hi!r})"
    if func in _THRESHOLD:
        t, v = _arg(args, kwargs, 1, "threshold"), _arg(args, kwargs, 2, "value")
        return f"threshold(threshold={t!r}, value={v!r})"
    return None


class _RuleMode(TorchFunctionMode):
    """Routes every rectifier through :class:`_Rectify`; refuses other activations."""

    def __init__(self, rule: Rule, other_activations: str, where: Callable[[], str]) -> None:
        super().__init__()
        self.rule = rule
        self.other = other_activations
        self.where = where

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = _relu_call(func, args, kwargs)
        if call is not None:
            x, inplace = call
            if isinstance(x, torch.Tensor) and (x.requires_grad or not inplace):
                return _Rectify.apply(x, self.rule, inplace)
            return func(*args, **kwargs)
        if self.other == "error":
            name = _activation_name(func, args, kwargs)
            if name is not None:
                raise ActivationError(
                    f"{name} (called as {getattr(func, '__module__', '') or 'torch'}."
                    f"{getattr(func, '__name__', func)}) in {self.where()} has no "
                    f"{self.rule.name!r} rule: only rectifiers max(x, 0) do. Use "
                    "method='gradient', or pass other_activations='gradient' to back-propagate "
                    "other activations as plain gradients."
                )
        return func(*args, **kwargs)


@contextlib.contextmanager
def rule_mode(
    model: nn.Module | None, rule: str | Rule, other_activations: str = "error"
) -> Iterator[None]:
    """Install ``rule`` on every rectifier run inside the ``with`` block.

    Parameters
    ----------
    model
        Used only to name the module running an activation that has no rule (forward pre/post
        hooks on every submodule, removed on exit, also on error). May be None.
    rule
        A name in :data:`METHODS` or a :class:`Rule`. A rule with ``autograd=True`` installs
        nothing: gradients stay bit-identical to plain autograd.
    other_activations
        ``"error"`` (default): a non-rectifier activation raises :class:`ActivationError`
        naming it and the module running it. ``"gradient"``: back-propagate it as the plain
        gradient.
    """
    rule = get_rule(rule)
    check_other_activations(other_activations)
    if rule.autograd:
        yield
        return
    stack: list[tuple[str, str]] = []  # (dotted name, module type) of the modules running
    handles = []

    def where() -> str:
        if stack:
            name, kind = stack[-1]
            return f"module {name!r} ({kind})"
        return "the model's own forward()"

    try:
        if model is not None and other_activations == "error":
            for name, module in model.named_modules():
                label = (name or "<the model itself>", type(module).__name__)
                handles.append(module.register_forward_pre_hook(_push(stack, label)))
                handles.append(module.register_forward_hook(_pop(stack), always_call=True))
        with _RuleMode(rule, other_activations, where):
            yield
    finally:
        for h in handles:
            h.remove()


def _push(stack: list[tuple[str, str]], label: tuple[str, str]) -> Callable[..., None]:
    def hook(module, args):
        stack.append(label)

    return hook


def _pop(stack: list[tuple[str, str]]) -> Callable[..., None]:
    def hook(module, args, output):
        if stack:
            stack.pop()

    return hook
