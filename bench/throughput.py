"""Training throughput on CIFAR-10: source images/s of each method's cifar10 preset, side by side.

For each method, in one process on one device, after warm-up (and compilation):

- ``ours``: the training step of :class:`selfsup.train.trainer.Trainer` over the cached uint8
  images: ``BatchStream`` -> ``TwoViewAugment`` on the device -> method forward (bf16 autocast,
  ``torch.compile`` when ``train.compile``) -> backward -> optimizer step -> target update, with
  the trainer's lr schedule, NaN accounting and periodic host syncs (:func:`train_step`).
- ``compute_limit``: the same model, optimizer and :func:`train_step` on synthetic, already
  augmented float views resident on the device: no augmentation, no data loading. The most any
  data pipeline could reach with this model and step.
- ``lightly``: lightly 1.6 in its standard setting (``bench/lightly_baseline.py``): lightly's
  per-image transforms in a ``DataLoader`` with ``--workers`` processes, lightly's heads and
  losses, the same backbone, precision and optimizer. ``lightly_model_only`` is that model on
  synthetic views (its own compute limit), to show where lightly's time goes.

Throughput counts source images (each yields two views) per second of wall-clock between two
``torch.cuda.synchronize()`` calls around ``--steps`` steps; ``--repeats`` windows alternate
``compute_limit`` and ``ours`` and the median is reported. Epoch-end kNN checks and checkpoints
are not part of a step (``bench/time_to_accuracy.py`` includes them). Prints ONE JSON object.

    python bench/throughput.py --device cuda --data .data/cifar10-jpg.tar.gz --methods byol
    python bench/throughput.py --device cpu --data /work/shared/data/cifar10-jpg.tar.gz \\
        --methods byol --batch-size 32 --steps 3 --warmup 1 --repeats 1 --workers 2 \\
        --set model.backbone=resnet_tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import selfsup
from selfsup.augment import TwoViewAugment
from selfsup.data import BatchStream, ImageDataset, load_dataset
from selfsup.evaluate.collapse import collapse_metrics
from selfsup.models import build_backbone
from selfsup.precision import autocast, grad_scaler, resolve_precision
from selfsup.train.config import resolve_config
from selfsup.train.distributed import resolve_device
from selfsup.train.optim import optimizer_from_config, set_lr, warmup_cosine
from selfsup.train.trainer import (
    build_augment,
    build_model,
    dataset_stats,
    make_views,
    optimizer_step,
    resolve_compile,
)

METHODS = ("simclr", "moco", "byol", "simsiam")
# The bar for the BYOL cifar10 preset.
REQUIRED_OVER_LIGHTLY = 4.0
REQUIRED_OVER_COMPUTE_LIMIT = 0.90


# --------------------------------------------------------------------------- the step


@dataclass
class StepState:
    """Everything one method's training step touches, set up as ``Trainer.fit`` sets it up."""

    cfg: DictConfig
    device: torch.device
    precision: str  # "bf16", "fp16" or "fp32"
    method: nn.Module
    step_fn: Callable[[Tensor, Tensor], dict[str, Tensor]]  # the method, compiled or not
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # selfsup.precision.grad_scaler: active for fp16 only
    augment: TwoViewAugment
    generator: torch.Generator
    stream: BatchStream
    channels_last: bool
    total_steps: int
    warmup_steps: int
    global_step: int = 0
    loss_sum: Tensor = field(default_factory=lambda: torch.zeros(()))
    bad_steps: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def autocast(self):
        return autocast(self.precision, self.device)


def build_step_state(cfg: DictConfig, train: ImageDataset) -> StepState:
    """``Trainer.fit``'s set-up for ``cfg`` on ``train``: seed, precision, dataset statistics,
    augmentation, model (channels-last on CUDA), optimizer with the scaled lr, batch stream,
    schedule lengths, augmentation generator and ``torch.compile``."""
    t = cfg.train
    device = resolve_device(t.device)
    torch.manual_seed(t.seed)
    precision = resolve_precision(t.precision, device)
    if cfg.data.mean is not None and cfg.data.std is not None:
        mean, std = list(cfg.data.mean), list(cfg.data.std)
    else:
        mean, std = dataset_stats(train.images)
    augment = build_augment(cfg, mean, std).to(device)
    method = build_model(cfg).to(device)
    channels_last = device.type == "cuda" and bool(t.channels_last)
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    optimizer = optimizer_from_config(method, cfg.optim, t.batch_size)
    stream = BatchStream(
        train.images,
        batch_size=t.batch_size,
        device=device,
        shuffle=True,
        seed=t.seed,
        drop_last=True,
    )
    generator = torch.Generator(device=device)
    generator.manual_seed(t.seed)
    method.train()
    return StepState(
        cfg=cfg,
        device=device,
        precision=precision,
        scaler=grad_scaler(precision, device),
        method=method,
        step_fn=torch.compile(method) if resolve_compile(t.compile, device) else method,
        optimizer=optimizer,
        augment=augment,
        generator=generator,
        stream=stream,
        channels_last=channels_last,
        total_steps=stream.steps_per_epoch * t.epochs,
        warmup_steps=round(cfg.optim.warmup_epochs * stream.steps_per_epoch),
        loss_sum=torch.zeros((), device=device),
        bad_steps=torch.zeros((), device=device, dtype=torch.int64),
    )


def train_step(
    state: StepState, batch: Tensor | None = None, views: tuple[Tensor, Tensor] | None = None
) -> dict[str, Tensor]:
    """One step exactly as the loop body of ``Trainer.fit`` runs it.

    Args:
        state: from :func:`build_step_state`; ``global_step`` and the accumulators advance.
        batch: uint8 ``[B, 3, H, W]`` on the device, augmented into two views here; or
        views: two ready normalised float views ``[B, 3, S, S]`` (the compute limit: the
            augmentation is skipped, everything after it is the same).

    Returns:
        The method's output dict (``"loss"``, ``"z"``, ...).
    """
    cfg, t = state.cfg, state.cfg.train
    factor = warmup_cosine(
        state.global_step, state.total_steps, state.warmup_steps, cfg.optim.min_lr_ratio
    )
    set_lr(state.optimizer, factor)
    if views is None:
        assert batch is not None
        views = make_views(state.augment, batch, state.generator, state.channels_last)
    out, finite, applied = optimizer_step(
        state.method,
        state.step_fn,
        state.optimizer,
        *views,
        autocast=state.autocast,
        progress=(state.global_step + 1) / state.total_steps,  # as the trainer
        skip_nonfinite=t.on_nan == "skip",
        scaler=state.scaler,
    )
    if applied:
        state.bad_steps += (~finite).long()
        state.loss_sum += out["loss"].detach().float()
    else:
        state.bad_steps += 1
    state.global_step += 1
    steps_per_epoch = state.stream.steps_per_epoch
    if state.global_step % t.log_every == 0 or state.global_step % steps_per_epoch == 0:
        # the trainer's periodic host sync: read the counters, log, reset the window
        int(state.bad_steps)
        float(state.loss_sum)
        state.loss_sum.zero_()
    if t.collapse != "off" and state.global_step % t.collapse_every == 0:
        with torch.no_grad():
            h, z2 = out.get("h"), out.get("z2")  # as Trainer.fit (one process: no gather)
            collapse_metrics(
                out["z"].float(),
                h=None if h is None else h.float(),
                z2=None if z2 is None else z2.float(),
            )
        if "online_target_cos" in out:
            float(out["online_target_cos"])
    return out


def epoch_batches(stream: BatchStream) -> Iterator[Tensor]:
    """uint8 batches on the device, epoch after epoch, in the trainer's order."""
    epoch = 0
    while True:
        stream.set_epoch(epoch)
        for _, batch in stream:
            yield batch
        epoch += 1


def synthetic_views(state: StepState) -> tuple[Tensor, Tensor]:
    """Two normalised float views ``[B, 3, S, S]`` on the device, laid out as ``train_step``'s."""
    b, s = state.cfg.train.batch_size, state.cfg.data.image_size
    gen = torch.Generator(device=state.device).manual_seed(1)
    views = torch.randn(2, b, 3, s, s, generator=gen, device=state.device)
    fmt = torch.channels_last if state.channels_last else torch.contiguous_format
    return views[0].contiguous(memory_format=fmt), views[1].contiguous(memory_format=fmt)


# --------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_window(
    step: Callable[[], Any], *, steps: int, warmup: int, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Run ``warmup`` then ``steps`` calls of ``step``; wall-clock of the timed ones, synced."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    return {"step_ms": 1000.0 * elapsed / steps, "images_per_s": steps * batch_size / elapsed}


def summarize(windows: list[dict[str, float]], steps: int, batch_size: int) -> dict[str, Any]:
    """Median over windows (robust to one slow window), plus every window's images/s."""
    rates = [w["images_per_s"] for w in windows]
    median = statistics.median(rates)
    return {
        "images_per_s": round(median, 1),
        "step_ms": round(1000.0 * batch_size / median, 3),
        "steps_per_window": steps,
        "windows_images_per_s": [round(r, 1) for r in rates],
    }


def measure_ours(
    cfg: DictConfig, train: ImageDataset, *, steps: int, warmup: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """``ours`` and ``compute_limit`` for one method, windows alternating between the two."""
    state = build_step_state(cfg, train)
    batches = epoch_batches(state.stream)
    views = synthetic_views(state)
    batch_size = cfg.train.batch_size
    timed: dict[str, list[dict[str, float]]] = {"compute_limit": [], "ours": []}
    last: dict[str, Tensor] = {}

    def ours() -> None:
        last["ours"] = train_step(state, batch=next(batches))["loss"].detach()

    def compute_limit() -> None:
        last["compute_limit"] = train_step(state, views=views)["loss"].detach()

    runners: dict[str, Callable[[], None]] = {"compute_limit": compute_limit, "ours": ours}
    for _ in range(repeats):
        for name, run in runners.items():
            timed[name].append(
                time_window(
                    run, steps=steps, warmup=warmup, batch_size=batch_size, device=state.device
                )
            )
    result = {name: summarize(w, steps, batch_size) for name, w in timed.items()}
    for name in result:
        result[name]["last_loss"] = round(float(last[name]), 5)
    result["ours"]["optimizer_steps_total"] = state.global_step  # both modes, warm-up included
    return result


def measure_lightly(
    cfg: DictConfig,
    data: str,
    *,
    steps: int,
    warmup: int,
    repeats: int,
    workers: int,
    compile_model: bool,
    scratch: str | None,
) -> dict[str, Any]:
    """lightly's standard setting for ``cfg``'s method; ``{"error": ...}`` if it cannot run."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # bench/ is a folder of scripts, not a package
        sys.path.insert(0, here)
    try:
        import lightly_baseline as lb

        version = lb.lightly_version()
    except ImportError as exc:
        return {"error": str(exc)}
    try:
        return _measure_lightly(
            lb,
            cfg,
            data,
            steps=steps,
            warmup=warmup,
            repeats=repeats,
            workers=workers,
            compile_model=compile_model,
            scratch=scratch,
            version=version,
        )
    except Exception as exc:  # report, do not lose the other measurements
        return {"error": f"{type(exc).__name__}: {exc}", "lightly_version": version}


def _measure_lightly(
    lb, cfg, data, *, steps, warmup, repeats, workers, compile_model, scratch, version
) -> dict[str, Any]:
    t = cfg.train
    device = resolve_device(t.device)
    name, batch_size, size = cfg.method.name, t.batch_size, cfg.data.image_size
    torch.manual_seed(t.seed)
    root = lb.image_folder_root(data, scratch)
    loader = lb.build_loader(
        root, lb.build_transform(name, size), batch_size, workers, pin_memory=device.type == "cuda"
    )
    backbone, feat_dim = build_backbone(
        cfg.model.backbone, small_stem=cfg.model.small_stem, image_size=cfg.data.image_size
    )
    options = OmegaConf.to_container(cfg.method, resolve=True)
    model = lb.LightlyMethod(name, backbone, feat_dim, options).to(device)
    channels_last = device.type == "cuda" and bool(t.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = optimizer_from_config(model, cfg.optim, batch_size)
    precision = resolve_precision(t.precision, device)
    scaler = grad_scaler(precision, device)
    forward = torch.compile(model) if compile_model else model
    total_steps = len(loader) * t.epochs
    counter = {"step": 0}

    def to_device(x: Tensor) -> Tensor:
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def step(x0: Tensor, x1: Tensor) -> None:
        set_lr(optimizer, warmup_cosine(counter["step"], total_steps, 0, cfg.optim.min_lr_ratio))
        with autocast(precision, device):
            loss = forward(x0, x1)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        model.update_target(counter["step"], total_steps)
        counter["step"] += 1

    batches = lb.endless(loader)

    def loader_step() -> None:
        views, _, _ = next(batches)
        step(to_device(views[0]), to_device(views[1]))

    gen = torch.Generator(device=device).manual_seed(1)
    synthetic = torch.randn(2, batch_size, 3, size, size, generator=gen, device=device)
    fake = (to_device(synthetic[0]), to_device(synthetic[1]))
    model.train()
    timed: dict[str, list[dict[str, float]]] = {"lightly_model_only": [], "lightly": []}
    for _ in range(repeats):
        timed["lightly_model_only"].append(
            time_window(
                lambda: step(*fake),
                steps=steps,
                warmup=warmup,
                batch_size=batch_size,
                device=device,
            )
        )
        timed["lightly"].append(
            time_window(
                loader_step, steps=steps, warmup=warmup, batch_size=batch_size, device=device
            )
        )
    result = {key: summarize(w, steps, batch_size) for key, w in timed.items()}
    result["lightly"].update(
        lightly_version=version,
        workers=workers,
        image_folder=str(root),
        compiled=compile_model,
        dataset_images=len(loader.dataset),
    )
    return result


# --------------------------------------------------------------------------- driver


def environment(device: torch.device) -> dict[str, Any]:
    import torchvision

    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "selfsup": selfsup.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    return info


def bench_config(method: str, args: argparse.Namespace) -> DictConfig:
    """The method's cifar10 preset with the benchmark's data, batch, device and compile."""
    overrides = [
        f"data.source={args.data}",
        f"train.batch_size={args.batch_size}",
        f"train.device={args.device}",
        f"train.compile={str(args.compile).lower()}",
        "train.progress=false",
        # one collapse check at the last step of every timed window, in both modes alike (at
        # the preset's 200 a window of "ours" could hold one where the compute limit's did not)
        f"train.collapse_every={args.warmup + args.steps}",
        *args.set,
    ]
    if args.cache_dir:
        overrides.append(f"data.cache_dir={args.cache_dir}")
    # one --set for every method of the run: another method's option is ignored, not refused
    return resolve_config(method, "cifar10", overrides=overrides, shared_overrides=True)


def load_train(cfg: DictConfig) -> tuple[ImageDataset, float]:
    """The cached uint8 train split (built on first use), as the trainer loads it; seconds."""
    d = cfg.data
    start = time.perf_counter()
    train = load_dataset(
        d.source,
        "train",
        image_size=d.storage_size or d.image_size,
        cache_dir=d.cache_dir,
        workers=d.workers,
        progress=False,
    )
    if d.limit and d.limit < len(train):
        train = train.subset(range(d.limit))
    return train, time.perf_counter() - start


def ratio(num: dict[str, Any] | None, den: dict[str, Any] | None) -> float | None:
    if not num or not den or "images_per_s" not in num or "images_per_s" not in den:
        return None
    return round(num["images_per_s"] / den["images_per_s"], 3)


def write_json_out(path: str | None, obj: dict[str, Any]) -> None:
    """``--json-out``: the JSON object to ``path`` (nothing without one)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def save_partial(result: dict[str, Any], path: str | None) -> None:
    """Write what is measured so far (``"partial": true``), so a timeout loses only the rest."""
    write_json_out(path, {**result, "partial": True})


def run(args: argparse.Namespace) -> dict[str, Any]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA GPU is visible; use --device cpu")
    if args.compile is None:
        args.compile = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "benchmark": "throughput",
        "unit": "source images/s (each image gives two views)",
        "command": shlex.join([sys.executable, __file__, *args.argv]),
        **environment(device),
        "settings": {
            "data": args.data,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "compile": args.compile,
            "lightly": args.lightly,
            "workers": args.workers,
            "overrides": args.set,
        },
        "methods": {},
    }
    try:
        import lightly

        result["lightly_version"] = lightly.__version__
    except ImportError:
        result["lightly_version"] = None
    train, load_s = load_train(bench_config(methods[0], args))
    result["data"] = {
        "source": args.data,
        "train_images": len(train),
        "image_shape": list(train.images.shape[1:]),
        "load_or_build_cache_s": round(load_s, 2),
    }
    for method in methods:
        cfg = bench_config(method, args)
        row: dict[str, Any] = {
            "preset": "cifar10",
            "batch_size": cfg.train.batch_size,
            "backbone": cfg.model.backbone,
        }
        result["methods"][method] = row  # filled in as measured; saved after each part
        row.update(
            measure_ours(cfg, train, steps=args.steps, warmup=args.warmup, repeats=args.repeats)
        )
        row["ours_over_compute_limit"] = ratio(row.get("ours"), row.get("compute_limit"))
        save_partial(result, args.json_out)  # a timeout during lightly's part keeps these
        _release(device)
        if args.lightly:
            lightly_rows = measure_lightly(
                cfg,
                args.data,
                steps=args.steps,
                warmup=args.warmup,
                repeats=args.lightly_repeats,
                workers=args.workers,
                compile_model=args.lightly_compile,
                scratch=args.lightly_dir,
            )
            if "error" in lightly_rows:
                row["lightly"] = lightly_rows
            else:
                row.update(lightly_rows)
            _release(device)
        row["ours_over_lightly"] = ratio(row.get("ours"), row.get("lightly"))
        save_partial(result, args.json_out)
        print(
            f"{method}: "
            + json.dumps(
                {k: row[k].get("images_per_s") if isinstance(row[k], dict) else row[k] for k in row}
            ),
            file=sys.stderr,
        )
    byol = result["methods"].get("byol")
    if byol is not None:
        over_lightly, over_limit = byol["ours_over_lightly"], byol["ours_over_compute_limit"]
        result["done_criteria_byol"] = {
            "ours_over_lightly": over_lightly,
            "required_over_lightly": REQUIRED_OVER_LIGHTLY,
            "ours_over_compute_limit": over_limit,
            "required_over_compute_limit": REQUIRED_OVER_COMPUTE_LIMIT,
            "met": (
                over_lightly is not None
                and over_lightly >= REQUIRED_OVER_LIGHTLY
                and over_limit is not None
                and over_limit >= REQUIRED_OVER_COMPUTE_LIMIT
            ),
        }
    return result


def _release(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    p.add_argument(
        "--data",
        default="/work/shared/data/cifar10-jpg.tar.gz",
        help="ImageFolder or .tar.gz of CIFAR-10 images (train/<class>/*.jpg)",
    )
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=100, help="timed steps per window")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before each window")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="windows per measurement of ours / compute limit (median reported)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train.compile for ours and the compute limit (default: on for cuda)",
    )
    p.add_argument(
        "--lightly",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure lightly 1.6's standard setting",
    )
    p.add_argument("--workers", type=int, default=16, help="lightly DataLoader workers")
    p.add_argument("--lightly-repeats", type=int, default=1)
    p.add_argument(
        "--lightly-compile",
        action="store_true",
        help="torch.compile lightly's model too (not its standard setting)",
    )
    p.add_argument(
        "--lightly-dir",
        default=None,
        help="where a .tar.gz is extracted for lightly (default $TMPDIR/selfsup-bench)",
    )
    p.add_argument("--cache-dir", default=None, help="data.cache_dir for our uint8 cache")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every method, e.g. model.backbone=resnet_tiny",
    )
    p.add_argument("--json-out", default=None, help="also write the JSON object to this file")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    result = run(args)
    print(json.dumps(result, indent=2))
    write_json_out(args.json_out, result)
    return result


if __name__ == "__main__":
    main()
