"""Command-line interface: argument parsing only; every command calls library functions.

Each command has one ``_add_<name>(subparsers)`` function that declares its arguments and sets
``func`` to a handler. Errors from the library (bad names, bad specs) print as one line and exit
with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape like 3,224,224 (channels first, no batch)"
        ) from exc


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="torchvision:NAME, path/to/file.py:factory or package.module:factory",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="torchvision weights (e.g. DEFAULT); needs a network. Default: random (weights=None)",
    )
    p.add_argument("--checkpoint", default=None, help="a state_dict saved with torch.save")


# ---- rf -------------------------------------------------------------------------------------
def _add_rf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rf", help="print the receptive field of every layer")
    _add_model_args(p)
    p.add_argument("--input-shape", type=_shape, required=True, help="C,H,W (or C,L / C,D,H,W)")
    p.add_argument("--layer", default=None, help="only this layer (dotted name)")
    p.set_defaults(func=_run_rf)


def _run_rf(args: argparse.Namespace) -> int:
    from featurelens.receptive_field import receptive_field_table, receptive_fields
    from featurelens.specs import load_model

    model = load_model(args.model, weights=args.weights, checkpoint=args.checkpoint)
    fields = receptive_fields(model, args.input_shape)
    if args.layer is not None:
        from featurelens.receptive_field import receptive_field

        fields = {args.layer: receptive_field(model, args.input_shape, args.layer)}
    print(receptive_field_table(fields))
    return 0


# ---- scan (issue: maximally activating examples) --------------------------------------------

# ---- figure / report / demo (issue: figures) ------------------------------------------------

# ---- serve (issue: explorer) ----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featurelens",
        description="Interpret the features of a convolutional network by inverting it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, adder in sorted(globals().items()):
        if name.startswith("_add_") and name != "_add_model_args" and callable(adder):
            adder(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from featurelens.graph import LayerError, TraceError
    from featurelens.receptive_field import NotAlignedError, UnsupportedOpError
    from featurelens.specs import SpecError

    try:
        return int(args.func(args) or 0)
    except (LayerError, TraceError, SpecError, NotAlignedError, UnsupportedOpError, ValueError,
            FileNotFoundError) as exc:  # fmt: skip
        print(f"featurelens {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
