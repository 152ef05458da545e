"""The pre-training loop. It knows nothing of any particular method: a method is an ``nn.Module``
whose ``forward(x1, x2)`` returns ``{"loss", "z", ...}`` and whose ``update_target(progress)`` runs
after every optimizer step (EMA targets, momentum encoders).

One step: uint8 batch on the device -> two augmented views (on the device) -> method loss ->
backward -> optimizer step -> target update. No host synchronisation inside the step; loss, lr and
throughput are read every ``train.log_every`` steps.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import selfsup
from selfsup.augment import EvalTransform, TwoViewAugment
from selfsup.augment.preview import views_grid, write_png
from selfsup.data import ImageDataset, load_dataset, write_skip_report
from selfsup.data.cache import atomic_write_text
from selfsup.errors import (
    CheckpointError,
    CollapseError,
    ConfigError,
    DataError,
    DeviceMemoryError,
    NumericalError,
    memory_report,
)
from selfsup.evaluate.collapse import CollapseMonitor, collapse_metrics
from selfsup.methods import build_method, method_defaults
from selfsup.models import build_backbone
from selfsup.models.backbones import is_factory, on_meta
from selfsup.models.weights import IMAGENET, IMAGENET_MEAN, IMAGENET_STD, init_state
from selfsup.precision import autocast, grad_scaler, resolve_precision
from selfsup.progress import bar_options
from selfsup.train.checkpoint import (
    atomic_torch_save,
    check_not_past_the_end,
    load_checkpoint,
    save_checkpoint,
)
from selfsup.train.config import (
    config_hash,
    defaults_comment,
    resolve_views,
    to_yaml,
)
from selfsup.train.distributed import (
    DistributedBatchStream,
    all_ranks_true,
    all_reduce_mean,
    all_reduce_sum,
    any_rank,
    concat_all_gather,
    convert_sync_batchnorm,
    distributed_knn,
    gather_objects,
    init_distributed,
    main_process_first,
    per_rank_batch_size,
    process_counts_dividing,
    rank_seed,
    resume_command,
    save_on_main,
    wrap_ddp,
)
from selfsup.train.logging import MetricsLogger, environment, strict_json
from selfsup.train.optim import (
    excludes_bias_norm,
    match_parameter_layouts,
    optimizer_from_config,
    regroup_optimizer_state,
    same_group_layout,
    set_lr,
    warmup_cosine,
)
from selfsup.train.preflight import (
    batchnorm_lag_note,
    check_data_sources,
    small_image_stem_note,
    storage_size_note,
)
from selfsup.train.run_dir import VIEWS_FILE, has_checkpoint


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived, or a time/epoch limit of this invocation was reached."""


@dataclass
class TrainResult:
    run_dir: Path
    results: dict[str, Any]
    finished: bool


def resolve_compile(compile_setting: str | bool, device: torch.device) -> bool:
    """``auto``: torch.compile on CUDA (where it pays: the issue's BYOL step, 20k -> 30k images/s
    on an H100), not on the CPU (minutes of compilation for a quickstart of one minute)."""
    value = str(compile_setting).lower()
    return device.type == "cuda" if value == "auto" else value == "true"


VIEWS_SHOWN = 8
STOP_CHECK_EVERY = 5  # steps between the ranks' agreements on a stop (one host sync each)


def dataset_stats(images: torch.Tensor, limit: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] of (a strided sample of) a uint8 [N,3,H,W] array."""
    step = max(1, images.shape[0] // limit)
    sample = images[::step].float().div_(255)
    mean = sample.mean(dim=(0, 2, 3))
    std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(v, 4) for v in mean.tolist()], [round(v, 4) for v in std.tolist()]


def save_views(
    augment: TwoViewAugment, images: torch.Tensor, run_dir: Path, logger: MetricsLogger, seed: int
) -> None:
    """``views.png`` (and TensorBoard's ``augment/views``): ``VIEWS_SHOWN`` training images,
    evenly spaced over the data, each beside two views as this run's augmentation draws them,
    so that a crop or colour setting that hides what matters is seen before hours of training.
    Drawn with a generator of their own: the training's random streams are untouched."""
    count = min(VIEWS_SHOWN, len(images))
    index = torch.linspace(0, len(images) - 1, count).round().long().unique()
    picture = views_grid(augment, images[index], seed=seed)
    write_png(run_dir / VIEWS_FILE, picture)
    logger.log_image("augment/views", picture)


def build_augment(cfg: DictConfig, mean: list[float], std: list[float]) -> TwoViewAugment:
    """The method's preset views with the ``augment.*`` overrides (see ``resolve_views``)."""
    view1, view2 = resolve_views(cfg)
    return TwoViewAugment(view1, view2, cfg.data.image_size, mean=mean, std=std)


def starting_weights(cfg: DictConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``model.init``'s weights for ``cfg``'s backbone, checked against its shapes (a
    :class:`ConfigError` naming what does not fit), and notes on how they were read."""
    m, notes = cfg.model, []
    size = cfg.data.image_size
    shapes = on_meta(  # shapes only
        lambda: build_backbone(m.backbone, small_stem=m.small_stem, image_size=size)[0]
    )
    return init_state(str(m.init), shapes, m.backbone, notes=notes), notes


def _unfit_checkpoint(path: Path, cfg: DictConfig, exc: RuntimeError) -> str:
    """Why checkpoint ``path`` does not load into the model ``cfg`` builds now."""
    first = next(
        (
            line.strip()
            for line in str(exc).splitlines()
            if "size mismatch" in line or "key" in line
        ),
        str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
    )
    backbone = cfg.model.backbone
    cause = (
        f"did the code of your factory {backbone} change since the run? Put back the version "
        "that trained it, or start a new run (another --out)"
        if is_factory(backbone)
        else "start a new run (another --out), or resume with the settings the run had"
    )
    return f"{path} does not fit the model this run's config builds now ({first}); {cause}"


def build_model(cfg: DictConfig, init: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The method of ``cfg``; its backbone starts from ``init`` (``model.init``'s weights, from
    :func:`selfsup.models.weights.init_state`) before a method copies it into a target network."""
    backbone, feat_dim = build_backbone(
        cfg.model.backbone, small_stem=cfg.model.small_stem, image_size=cfg.data.image_size
    )
    if init is not None:
        backbone.load_state_dict(init)
    if cfg.model.get("bn_momentum") is not None:
        for module in backbone.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = float(cfg.model.bn_momentum)
    # options of other methods are ignored, so one preset can serve every method
    options = OmegaConf.to_container(cfg.method, resolve=True)
    return build_method(cfg.method.name, backbone, feat_dim, cfg=options)


def make_views(
    augment: TwoViewAugment, batch: torch.Tensor, generator: torch.Generator, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views of a uint8 batch, on the batch's device."""
    v1, v2 = augment(batch, generator=generator)
    if channels_last:
        v1 = v1.contiguous(memory_format=torch.channels_last)
        v2 = v2.contiguous(memory_format=torch.channels_last)
    return v1, v2


def optimizer_step(
    method: torch.nn.Module,
    step_fn,
    optimizer: torch.optim.Optimizer,
    v1: torch.Tensor,
    v2: torch.Tensor,
    *,
    autocast,
    progress: float,
    skip_nonfinite: bool = False,
    all_finite=lambda finite: finite,
    scaler: torch.amp.GradScaler,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """Forward, backward, optimizer step and target update: one training step.

    ``step_fn`` is the (possibly compiled or DDP-wrapped) ``method``. Returns the method's output,
    whether its loss is finite (a device tensor: no host sync) and whether the update was applied.
    Only ``skip_nonfinite`` reads the loss on the host, to skip a NaN/Inf step on every rank; a
    skipped step leaves weights and buffers (BatchNorm statistics, a MoCo queue) as they were.
    ``scaler`` (:func:`selfsup.precision.grad_scaler`; a pass-through but for fp16) scales the
    loss before the backward pass and unscales the gradients before the step, which it skips when
    they overflowed (then only the scale changes; the target update still runs, as after any
    step). LARS's trust ratio thus sees the true gradients.
    """
    # The forward pass itself changes buffers (BatchNorm running statistics, MoCo's queue): a
    # skipped step puts them back, or one NaN batch would poison every later evaluation.
    buffers = list(method.buffers()) if skip_nonfinite else []
    saved = [b.detach().clone() for b in buffers]
    with autocast():
        out = step_fn(v1, v2)
    finite = torch.isfinite(out["loss"])
    optimizer.zero_grad(set_to_none=True)
    if skip_nonfinite and not bool(all_finite(finite)):
        with torch.no_grad():
            for buffer, before in zip(buffers, saved, strict=True):
                buffer.copy_(before)
        discard = getattr(method, "discard_last_forward", None)  # MoCo's keys of this step
        if discard is not None:
            discard()
        return out, finite, False
    scaler.scale(out["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    method.update_target(progress)
    return out, finite, True


class _LogWindow:
    """The steps since the last metrics line. Their loss and skipped steps are summed on the
    device (no host synchronisation inside a step) and read, summed over the ranks, at a log
    step."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.bad_steps = torch.zeros((), device=device, dtype=torch.int64)
        self.steps = 0
        self.timed_from = 0  # images/s counts the window's steps of this invocation only
        self.start = time.monotonic()

    def add(self, out: dict[str, torch.Tensor], finite: torch.Tensor, applied: bool) -> None:
        if applied:
            self.bad_steps += (~finite).long()
            self.loss_sum += out["loss"].detach().float()
        else:
            self.bad_steps += 1
        self.steps += 1

    def images_per_s(self, batch_size: int) -> float:
        elapsed = time.monotonic() - self.start
        return (self.steps - self.timed_from) * batch_size / max(elapsed, 1e-9)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.bad_steps.zero_()  # skipped_steps is per logging window, like the loss
        self.steps, self.start, self.timed_from = 0, time.monotonic(), 0

    def state_dict(self, world_size: int) -> dict[str, Any]:
        """Per global step: the sum of the window's global-batch mean losses and its skipped
        steps, so that a resume on any number of processes continues the window (a collective:
        every rank calls it)."""
        return {
            "loss_sum": float(all_reduce_sum(self.loss_sum)) / world_size,
            "steps": self.steps,
            "bad_steps": int(all_reduce_sum(self.bad_steps)) // world_size,
        }

    def load_state_dict(self, saved: dict[str, Any] | None, *, is_main: bool, world_size: int):
        if not saved or not saved["steps"]:
            return
        if is_main:  # the window's sums, counted once: all_reduce_sum adds the ranks
            self.loss_sum.fill_(saved["loss_sum"] * world_size)
            self.bad_steps.fill_(saved["bad_steps"] * world_size)
        self.steps = self.timed_from = saved["steps"]


@dataclass
class _Run:
    """One invocation's training: what it trains (built by ``Trainer._build``), where the
    schedule is, and what it has measured. Checkpoints save it; ``--resume`` restores it."""

    method: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # this rank's augmentation stream
    stream: DistributedBatchStream
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    config_hash: str
    results: dict[str, Any]
    monitor: CollapseMonitor  # the streak of collapsed checks
    window: _LogWindow  # the steps since the last metrics line
    global_step: int = 0  # the schedule's step
    log_step_offset: int = 0  # logged step - schedule step (see MetricsLogger's step_offset)
    images_per_s: float = 0.0  # of the last logged window


class Trainer:
    """Pre-trains ``cfg.method`` on ``cfg.data`` into ``run_dir``; see :meth:`fit`."""

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        *,
        resume: bool = False,
        init: tuple[dict[str, torch.Tensor], list[str]] | None = None,
        continue_with: str | None = None,
    ) -> None:
        """``init``: what :func:`starting_weights` already read for ``cfg`` (``run_pretrain``
        checks ``model.init`` before it touches the run directory), so it is not read again.
        ``continue_with``: what a stop tells the user to run (default: this run's ``--resume``
        command), for a caller that resumes its runs itself (``selfsup ablate``)."""
        self.cfg = cfg
        self.continue_with = continue_with
        self._init = init
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.env = init_distributed(cfg.train.device)
        self.device = self.env.device
        self._stop_reason: str | None = None
        self.precision = cfg.train.precision  # resolved in fit
        self._activity = "setting up"  # named by an out-of-memory message

    # ------------------------------------------------------------------ set-up
    def _init_weights(self) -> dict[str, torch.Tensor] | None:
        """``model.init``'s weights for the backbone, checked against it; None for a random
        start, or for a resume (its checkpoint holds the weights)."""
        if not self.cfg.model.init or (self.resume and has_checkpoint(self.run_dir)):
            return None
        # one download of torchvision's weights, then the cache (every rank takes part: a barrier)
        with main_process_first():
            if self._init is not None:  # read by run_pretrain's check (rank 0)
                (state, notes), self._init = self._init, None  # no second copy kept
            else:
                state, notes = starting_weights(self.cfg)
        if self.env.is_main:
            for note in notes:
                print(f"selfsup: note: {note}", file=sys.stderr)
            print(f"selfsup: starting from model.init={self.cfg.model.init}", file=sys.stderr)
        return state

    def _load_data(self) -> tuple[ImageDataset, ImageDataset | None, ImageDataset | None]:
        """The training images, and the labeled bank and query of the kNN check (None, None:
        no check, said why)."""
        check_data_sources(self.cfg)  # a typo is an error before the data is decoded
        train = self._load_train()
        bank, query = self._load_knn_data(train)
        return train, bank, query

    def _load_kwargs(self) -> dict[str, Any]:
        """``load_dataset``'s keyword arguments for this run's data (sizes, cache, limit)."""
        d = self.cfg.data
        return dict(
            image_size=d.storage_size or d.image_size,
            cache_dir=d.cache_dir,
            workers=d.workers,
            progress=self.cfg.train.progress,
            limit=d.limit,  # a folder or archive then decodes only the images it uses
        )

    def _load_train(self) -> ImageDataset:
        """The training split, decoded into the cache; its skipped files listed in
        skipped.csv; checked against the batch size and MoCo's queue."""
        d, kwargs = self.cfg.data, self._load_kwargs()
        with main_process_first():  # rank 0 builds the cache, the others then read it
            train = load_dataset(d.source, "train", **kwargs)  # spread to d.limit
        report = self.run_dir / "skipped.csv"
        # written when files were skipped, or over the list of an earlier invocation (which
        # would otherwise name files that are now used); a run refused below then leaves no
        # directory holding only an empty list
        if self.env.is_main and (train.skipped or report.exists()):
            summary = write_skip_report(train, report)
            if train.skipped:
                print(f"selfsup: {summary} (list: {report})", file=sys.stderr)
        n = train.images.shape[0]
        if self.cfg.train.batch_size > n:
            raise ConfigError(
                f"train.batch_size={self.cfg.train.batch_size} is larger than the {n} usable "
                f"images "
                f"of {d.source!r}; lower --batch-size"
            )
        queue = None
        if self.cfg.method.name == "moco":
            queue = self.cfg.method.get("queue_size") or method_defaults("moco")["queue_size"]
        batch, symmetric = self.cfg.train.batch_size, self.cfg.method.get("symmetric")
        per_epoch = (n // batch) * batch * (2 if symmetric else 1)  # keys enqueued (drop_last)
        if queue and queue > per_epoch and self.env.is_main:
            # the queue then holds several keys of one image, stale ones among them
            print(
                f"selfsup: warning: method.queue_size={queue} is more than the {per_epoch} keys "
                f"an epoch enqueues ({n // batch} steps of {batch} images"
                + (", both views" if symmetric else "")
                + f"); negatives repeat (a queue of at most {per_epoch} holds each key once)",
                file=sys.stderr,
            )
        return train

    def _load_knn_data(
        self, train: ImageDataset
    ) -> tuple[ImageDataset | None, ImageDataset | None]:
        """The kNN check's labeled bank and query: data.eval_source's (or the training data's)
        train and test splits, scored by class name; (None, None) when there is none to use."""
        d, kwargs = self.cfg.data, self._load_kwargs()
        bank, query = None, None
        eval_source = d.eval_source or d.source
        try:
            with main_process_first():
                bank = (
                    train
                    if eval_source == d.source
                    else load_dataset(eval_source, "train", **kwargs)
                )
                query = load_dataset(eval_source, "test", **kwargs)
        except DataError as exc:
            if d.eval_source:  # monitoring was asked for: without it the run would be blind
                raise DataError(
                    f"data.eval_source={d.eval_source!r} cannot serve the kNN check: {exc}"
                ) from None
            if self.env.is_main:
                print(
                    f"selfsup: kNN monitoring off: {exc}; or name labeled data for the check "
                    "with data.eval_source=DIR",
                    file=sys.stderr,
                )
            bank, query = None, None
        if bank is not None and (bank.labels is None or query is None or query.labels is None):
            if d.eval_source:
                raise DataError(
                    f"data.eval_source={d.eval_source!r} has no labels (it needs class folders, "
                    "train/<class>/* and test/<class>/*) to serve the kNN check"
                )
            if self.env.is_main:  # split folders without class folders: say why, as above
                unlabeled = "train" if bank.labels is None else "test"
                print(
                    f"selfsup: kNN monitoring off: the {unlabeled} split of {eval_source!r} has "
                    "no class folders (images loose beside them are unlabeled); arrange it as "
                    "train/<class>/* and test/<class>/*, or name labeled data for the check with "
                    "data.eval_source=DIR",
                    file=sys.stderr,
                )
            bank, query = None, None
        for split, ds in (("train", bank), ("test", query)):
            if ds is not None and ds is not train and ds.skipped and self.env.is_main:
                print(f"selfsup: kNN check data ({split}): {ds.skip_summary()}", file=sys.stderr)
        if bank is not None and query is not None:
            # each split numbers its own class folders: score by class name, not by number
            query, dropped = query.with_classes_of(bank)
            if dropped and self.env.is_main:
                print(
                    f"selfsup: note: kNN check: test classes {dropped} of {eval_source!r} have "
                    f"no training images; their test images are left out ({len(query)} scored)",
                    file=sys.stderr,
                )
            if len(query) == 0:
                bank, query = None, None
        return bank, query

    def _knn(self, backbone: torch.nn.Module, bank: ImageDataset, query: ImageDataset) -> dict:
        t = self.cfg.train
        interrupted, self._activity = self._activity, "the kNN check"
        bs = max(256, t.batch_size)
        # not under the training autocast: feature extraction autocasts itself on CUDA, and the
        # kNN's similarities and weights must stay float32 (a bf16 cosine has 3 digits)
        knn = distributed_knn(
            backbone,
            bank.images,
            bank.labels,
            query.images,
            query.labels,
            self.eval_transform,
            batch_size=bs,
            device=self.device,
            k=t.knn_k,
            temperature=t.knn_temperature,
        )
        self._activity = interrupted
        return knn

    def _autocast(self):
        return autocast(self.precision, self.device)

    def _install_signal_handlers(self) -> dict:
        previous = {}

        def handler(signum, frame):  # noqa: ARG001
            if self._stop_reason is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self._stop_reason = signal.Signals(signum).name

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return previous

    def _out_of_memory(self) -> DeviceMemoryError:
        cfg, t = self.cfg, self.cfg.train
        report = memory_report(self.device)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        world = self.env.world_size
        half = max(t.batch_size // 2, 2 * world)
        share = f", {t.batch_size // world} per process" if world > 1 else ""
        last = self.run_dir / "checkpoints" / "last.pt"
        return DeviceMemoryError(
            f"{report} ran out of memory during {self._activity} (train.batch_size="
            f"{t.batch_size}{share}, model.backbone={cfg.model.backbone}, data.image_size="
            f"{cfg.data.image_size}, precision {self.precision}). Lower train.batch_size, e.g. "
            f"train.batch_size={half} (optim.lr follows it, optim.lr_scaling="
            f"{cfg.optim.lr_scaling})"
            + (
                ", use train.precision=auto (autocast halves activation memory)"
                if self.precision == "fp32" and self.device.type == "cuda"
                else ""
            )
            + ", or choose a smaller model.backbone or data.image_size; other programs on the "
            "same GPU take memory too (nvidia-smi lists them). "
            + (
                ""  # a caller that resumes its runs itself (ablate) says how to go on
                if self.continue_with
                else f"{last} is intact; continue from it with: selfsup pretrain --out "
                f"{self.run_dir} --resume train.batch_size={half}"
                if last.exists()
                else "Then run the command again with --overwrite"
            )
        )

    # ------------------------------------------------------------------ training
    def fit(self) -> TrainResult:
        """Train, checkpoint, evaluate; a device out of memory becomes a :class:`DeviceMemoryError`
        naming the settings to change."""
        try:
            return self._fit()
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory() from None

    def _restore(
        self,
        state: dict[str, Any],
        path: Path,
        method: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        generator: torch.Generator,
    ) -> None:
        """A checkpoint's weights, optimizer state, loss scale and this rank's random streams
        into a run being resumed (its step counters and data checks:
        ``_resume_from_checkpoint``)."""
        cfg, env = self.cfg, self.env
        try:
            method.load_state_dict(state["model"])
        except RuntimeError as exc:  # the config is the run's, the module is not
            raise CheckpointError(_unfit_checkpoint(path, cfg, exc)) from None
        # the momentum buffers come from the checkpoint; lr, momentum and weight decay from
        # this invocation's config, so `--resume optim.lr=0.03` takes effect
        configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        saved_optimizer = state["optimizer"]
        if not same_group_layout(saved_optimizer, optimizer):
            # the one setting that regroups the same parameters: written with the other
            written_with = not excludes_bias_norm(cfg.optim)
            saved_optimizer = regroup_optimizer_state(
                saved_optimizer, method, written_with, optimizer
            )
        optimizer.load_state_dict(saved_optimizer)
        for group, settings in zip(optimizer.param_groups, configured, strict=True):
            group.update(settings)
        match_parameter_layouts(optimizer)
        if state.get("scaler"):  # an fp16 run's loss scale; a bf16/fp32 one saved {}
            scaler.load_state_dict(state["scaler"])
        # this rank's random streams as they were: from a run on as many processes (every
        # rank's are saved; checkpoints of earlier selfsup hold rank 0's alone)
        streams = state.get("rank_rng")
        if streams is not None and len(streams) == env.world_size:
            mine = streams[env.rank]
        elif env.world_size == 1 and state.get("world_size", 1) == 1:
            mine = {k: state.get(k) for k in ("generator", "torch_rng", "cuda_rng")}
        else:
            mine = None  # another number of processes: other streams
        same_kind = (  # checkpoints before device_type: the state's size tells the kind
            mine is not None
            and state.get("device_type", self.device.type) == self.device.type
            and mine["generator"].numel() == generator.get_state().numel()
        )
        if same_kind:
            generator.set_state(mine["generator"].cpu())
        else:  # saved on another number of processes, or by another device's kind of
            # generator (a CUDA state cannot seed a CPU generator): fresh streams at this step
            generator.manual_seed(rank_seed(cfg.train.seed + state["global_step"], env.rank))
        torch.set_rng_state((mine or state)["torch_rng"])
        cuda_rng = None if mine is None else mine.get("cuda_rng")
        if cuda_rng is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(cuda_rng.cpu(), self.device)  # MoCo's shuffle

    def _build(self, train: ImageDataset, init: dict[str, torch.Tensor] | None) -> _Run:
        """Fill in ``data.mean``/``std`` when unset (config.yaml and the config hash include
        them), build ``self.augment`` and ``self.eval_transform``, and return the ``_Run`` of
        ``train``: model, optimizer, loss scaler, generator and batch stream on the device, the
        schedule's lengths, the results' first entries, the collapse monitor and the log
        window."""
        cfg, t, env = self.cfg, self.cfg.train, self.env
        if cfg.data.mean:
            mean, std = list(cfg.data.mean), list(cfg.data.std)
        elif cfg.model.init == IMAGENET:  # the inputs those weights were trained on
            mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
        else:
            mean, std = dataset_stats(train.images)
        if cfg.data.mean is None or cfg.data.std is None:
            cfg.data.mean, cfg.data.std = mean, std
        self.augment = build_augment(cfg, mean, std).to(self.device)
        self.eval_transform = EvalTransform(
            cfg.data.image_size, mean=mean, std=std, crop_fraction=cfg.data.eval_crop
        ).to(self.device)

        method = convert_sync_batchnorm(build_model(cfg, init), t.sync_bn, env).to(self.device)
        if self.device.type == "cuda" and t.channels_last:
            method = method.to(memory_format=torch.channels_last)
        stream = DistributedBatchStream(
            train.images,
            per_rank_batch_size(t.batch_size, env.world_size),
            rank=env.rank,
            world_size=env.world_size,
            device=self.device,
            shuffle=True,
            seed=t.seed,
        )
        total_steps = stream.steps_per_epoch * t.epochs
        if env.is_main and not self.resume:
            batchnorm_lag_note(cfg, method.backbone, total_steps)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(rank_seed(t.seed, env.rank))
        results = {
            "method": cfg.method.name,
            "data": cfg.data.source,
            "train_images": len(train),
            "backbone": cfg.model.backbone,
            "epochs": t.epochs,
            "batch_size": t.batch_size,
            "selfsup_version": selfsup.__version__,
        }
        return _Run(
            method=method,
            optimizer=optimizer_from_config(method, cfg.optim, t.batch_size),
            scaler=grad_scaler(self.precision, self.device),
            generator=generator,
            stream=stream,
            steps_per_epoch=stream.steps_per_epoch,
            total_steps=total_steps,
            warmup_steps=round(cfg.optim.warmup_epochs * stream.steps_per_epoch),
            config_hash=config_hash(cfg),
            results=results,
            monitor=self._collapse_monitor(results),
            window=_LogWindow(self.device),
        )

    def _resume_from_checkpoint(
        self, run: _Run, train: ImageDataset
    ) -> tuple[int, int, dict[str, Any] | None]:
        """For ``--resume``: the last checkpoint into ``run``, checked against this invocation's
        data and batch size. Returns the epoch and the step in it to start from, and the
        checkpoint (None: none was written, the run starts from step 0)."""
        cfg, t, env = self.cfg, self.cfg.train, self.env
        ckpt_dir = self.run_dir / "checkpoints"
        if not self.resume:
            return 0, 0, None
        if not has_checkpoint(self.run_dir):
            if env.is_main:
                print(
                    f"selfsup: {ckpt_dir} holds no checkpoint yet (the run stopped before its "
                    f"first); starting from step 0",
                    file=sys.stderr,
                )
            return 0, 0, None
        state, path = load_checkpoint(
            ckpt_dir,
            method=cfg.method.name,
            config_hash=run.config_hash,
            version=selfsup.__version__,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
        self._restore(state, path, run.method, run.optimizer, run.scaler, run.generator)
        if state.get("collapse_monitor"):  # the streak of collapsed checks goes on
            run.monitor.load_state_dict(state["collapse_monitor"])
        # a stop between two log steps: the window goes on, so the resumed run logs the same
        # mean loss as an uninterrupted one
        run.window.load_state_dict(
            state.get("log_window"), is_main=env.is_main, world_size=env.world_size
        )
        start_epoch, start_step = state["epoch"], state["step_in_epoch"]
        run.global_step = state["global_step"]
        check_not_past_the_end(path, start_epoch, start_step, t.epochs)
        saved_train = state.get("config", {}).get("train", {})
        saved_images = (state.get("results") or {}).get("train_images", len(train))
        saved_batch = saved_train.get("batch_size", t.batch_size)
        # a change of data or batch size renumbers the steps (refused within an epoch)
        self._check_data_change(path, state, saved_images, len(train), start_epoch, start_step)
        self._check_batch_change(path, saved_batch, start_epoch, start_step)
        if saved_images != len(train) or saved_batch != t.batch_size:
            run.global_step = start_epoch * run.steps_per_epoch
        # the steps renumbered above (a new batch size or data): the logs go on counting the
        # steps taken, and keep every record of the run so far
        logged_step = state["global_step"] + state.get("log_step_offset", 0)
        run.log_step_offset = logged_step - run.global_step
        run.results.update(state.get("results", {}))
        # this invocation's data and length: a resume may extend the run or change its batch
        run.results.update(train_images=len(train), epochs=t.epochs, batch_size=t.batch_size)
        if env.is_main:
            saved_epochs = saved_train.get("epochs", t.epochs)
            self._say_how_the_run_goes_on(
                run, path, start_epoch, len(train), saved_images, saved_batch, saved_epochs
            )
        return start_epoch, start_step, state

    def _say_how_the_run_goes_on(
        self,
        run: _Run,
        path: Path,
        start_epoch: int,
        train_images: int,
        saved_images: int,
        saved_batch: int,
        saved_epochs: int,
    ) -> None:
        """On stderr: where a resumed run continues, and what changed since the checkpoint
        (data, batch size, number of epochs) and what that does to the schedule."""
        cfg, t = self.cfg, self.cfg.train
        at = f"epoch {start_epoch + 1} (step {run.global_step} of {run.total_steps})"
        if saved_images != train_images:
            print(
                f"selfsup: note: {cfg.data.source!r} holds {train_images} training images, "
                f"{saved_images} at the checkpoint; the schedule continues at {at}",
                file=sys.stderr,
            )
        if saved_batch != t.batch_size:
            print(
                f"selfsup: train.batch_size {saved_batch} -> {t.batch_size}: "
                f"{run.steps_per_epoch} steps per epoch; the schedule continues at {at}",
                file=sys.stderr,
            )
        if saved_epochs != t.epochs and start_epoch < t.epochs:
            print(
                f"selfsup: train.epochs {saved_epochs} -> {t.epochs}: the warm-up + cosine "
                f"lr schedule (and an EMA or momentum schedule) is re-planned over "
                f"{t.epochs} epochs; it continues at step {run.global_step} of {run.total_steps}",
                file=sys.stderr,
            )
        if start_epoch >= t.epochs:
            print(
                f"selfsup: {path} is the end of the run: "
                + (f"all {t.epochs} epochs are" if t.epochs > 1 else "its 1 epoch is")
                + " done, nothing is left to train (the encoder and results are written again, "
                "with the timings measured when it trained)",
                file=sys.stderr,
            )
        else:
            print(
                f"selfsup: resumed from {path} at epoch {start_epoch + 1}, step {run.global_step}",
                file=sys.stderr,
            )

    def _check_data_change(
        self,
        path: Path,
        state: dict[str, Any],
        saved_images: int,
        n_train: int,
        start_epoch: int,
        start_step: int,
    ) -> None:
        """Refuse other training data (another number of images) within an epoch: that epoch's
        order and the schedule would no longer fit. At an epoch's end it is allowed."""
        cfg = self.cfg
        if saved_images == n_train or not start_step:
            return
        saved_data = state.get("config", {}).get("data", {})
        saved_source, saved_limit = (
            saved_data.get("source", cfg.data.source),
            saved_data.get("limit"),
        )
        if saved_limit != cfg.data.limit:  # the same data, another share of it
            now = f"data.limit={cfg.data.limit} takes {n_train} of them"
            fix = (
                "Resume without data.limit"
                if saved_limit is None
                else f"Resume with data.limit={saved_limit}"
            )
        elif saved_source == cfg.data.source:
            now, fix = f"{cfg.data.source!r} holds {n_train} now", "Restore the data"
        else:
            now = (
                f"it trained on data.source={saved_source!r}, and --data "
                f"{cfg.data.source!r} holds {n_train}"
            )
            fix = "Resume without --data"
        raise DataError(
            f"{path} was written at step {start_step} of epoch {start_epoch + 1} "
            f"of {saved_images} training images; {now}, so that epoch's order and "
            f"the schedule no longer fit. {fix} (a change of data can start at an "
            "epoch's end: add train.stop_after_epochs=1 first), or start over with "
            "--overwrite"
        )

    def _check_batch_change(
        self, path: Path, saved_batch: int, start_epoch: int, start_step: int
    ) -> None:
        """Refuse a new batch size within an epoch (steps per epoch change); at an epoch's end
        it is allowed."""
        batch_size, world = self.cfg.train.batch_size, self.env.world_size
        if saved_batch == batch_size or not start_step:
            return
        raise ConfigError(
            f"{path} was written at step {start_step} of epoch {start_epoch + 1} "
            f"with train.batch_size={saved_batch}; a new batch size can only start "
            f"at an epoch's end: resume with train.batch_size={saved_batch} "
            "train.stop_after_epochs=1"
            + (
                f" on a number of processes that divides {saved_batch} "
                f"({process_counts_dividing(saved_batch, world)}; not {world})"
                if saved_batch % world
                else ""
            )
            + f", then resume again with train.batch_size={batch_size}"
        )

    def _start_logs(self, run: _Run, train: ImageDataset, from_checkpoint: bool) -> MetricsLogger:
        """Write the run's config.yaml and open its metrics (a resume keeps the records up to
        its checkpoint), and save views.png if the run has none yet."""
        env, t = self.env, self.cfg.train
        run_config = ""  # the run's config.yaml text, also shown in TensorBoard
        if env.is_main:
            # only now, once a resume was accepted: a refused one must leave the run's config as
            # it was. Limits of this invocation are not part of the run (a --resume must not
            # inherit them).
            saved = self.cfg.copy()
            saved.train.stop_after_epochs, saved.train.time_limit_min = None, None
            # with the method's defaults and the views as comments: the run records every value
            run_config = to_yaml(saved) + "\n" + defaults_comment(saved)
            atomic_write_text(self.run_dir / "config.yaml", run_config)
        logged_step = run.global_step + run.log_step_offset
        logger = MetricsLogger(
            self.run_dir,
            enabled=env.is_main,
            # a resume keeps the records up to its checkpoint (a restart from step 0: none)
            resume_step=(logged_step if from_checkpoint else -1) if self.resume else None,
            step_offset=run.log_step_offset,
        )
        logger.log_text("config", run_config, run.global_step)  # a no-op off rank 0 (no writer)
        if env.is_main and not (self.run_dir / VIEWS_FILE).exists():
            save_views(self.augment, train.images, self.run_dir, logger, t.seed)
        return logger

    def _collapse_monitor(self, results: dict[str, Any]) -> CollapseMonitor:
        """``train.collapse``'s monitor; a warning is also recorded in ``results``."""

        def warn_collapse(message: str) -> None:  # a selfsup line, not a Python warning
            results["collapse_warning"] = message  # results.json: the encoder is suspect
            if self.env.is_main:
                print(f"\nselfsup: warning: {message}", file=sys.stderr)

        t = self.cfg.train
        monitor = CollapseMonitor(
            self.cfg.method.name,
            mode=t.collapse,
            patience=t.collapse_patience,
            on_warning=warn_collapse,
        )
        return monitor

    def _checkpoint(self, run: _Run, epoch: int, step_in_epoch: int) -> Path:
        """Save ``run`` as at ``step_in_epoch`` of ``epoch`` (rank 0 writes; every rank takes
        part). A failed write names what is intact and how to go on."""
        ckpt_dir = self.run_dir / "checkpoints"
        try:
            return self._save(run, epoch, step_in_epoch)
        except OSError as exc:  # full disk, quota, read-only remount: the old one is intact
            kept = ckpt_dir / "last.pt"
            raise CheckpointError(
                f"cannot write a checkpoint to {ckpt_dir} ({exc.strerror or exc}); "
                + (f"{kept} from before is intact. " if kept.exists() else "")
                + f"Free disk space, then: {self.continue_with or resume_command(self.run_dir)}"
            ) from None

    def _save(self, run: _Run, epoch: int, step_in_epoch: int) -> Path:
        env, device = self.env, self.device

        def random_streams() -> dict[str, Any]:
            return {
                "generator": run.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            }

        # every rank's streams (each draws its own augmentations), so that a resume on as
        # many processes goes on exactly as the uninterrupted run
        streams = gather_objects(random_streams())
        return save_on_main(
            save_checkpoint,
            {
                "model": run.method.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict(),
                **random_streams(),  # rank 0's, as checkpoints before rank_rng held them
                "device_type": device.type,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": run.global_step,
                "log_step_offset": run.log_step_offset,
                # a stop between two log steps: the steps since the last metrics line, so the
                # resumed run logs the same mean loss as an uninterrupted one
                "log_window": run.window.state_dict(env.world_size),
                "method": self.cfg.method.name,
                "config_hash": run.config_hash,
                "results": run.results,
                "collapse_monitor": run.monitor.state_dict(),
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "selfsup_version": selfsup.__version__,
                "world_size": env.world_size,
                "rank_rng": streams,
            },
            self.run_dir / "checkpoints",
        )

    def _knn_before_training(self, run: _Run, bank, query, logger: MetricsLogger) -> None:
        """Record which labeled images the kNN uses (and ``model.init``), and measure the kNN
        of the starting weights once per run (a resumed run has it): the baseline of every
        later check."""
        cfg = self.cfg
        if bank is not None:  # what the kNN numbers mean: which labeled images, how many
            run.results["knn_data"] = cfg.data.eval_source or cfg.data.source
            run.results["knn_images"] = {"bank": len(bank), "query": len(query)}
        start = "init" if cfg.model.init else "random_init"  # the weights before training
        if cfg.model.init:
            run.results["init"] = cfg.model.init
        if bank is not None and f"knn_top1_{start}" not in run.results:
            knn0 = self._knn(run.method.backbone, bank, query)
            run.results[f"knn_top1_{start}"] = knn0["top1"]
            run.results[f"knn_top5_{start}"] = knn0["top5"]
            logger.log(0, {"knn_top1": knn0["top1"], "knn_top5": knn0["top5"]}, prefix="eval")

    def _agreed_stop(self, sync_step: bool, global_step: int) -> bool:
        """Whether the run stops after this step: a signal or a limit, agreed by all ranks."""
        stop = self._stop_reason is not None
        if self.env.distributed:  # all ranks must agree: on the steps that sync anyway, and
            # every STOP_CHECK_EVERY steps, as torchrun kills its workers 30 s after it
            # forwards a signal (a log step can be minutes away)
            check = sync_step or global_step % STOP_CHECK_EVERY == 0
            stop = check and any_rank(stop)
            if stop and self._stop_reason is None:
                self._stop_reason = "stop requested on another rank"
        return stop

    def _nan_error(self, run: _Run, epoch: int) -> NumericalError:
        good = self.run_dir / "checkpoints" / "last.pt"
        return NumericalError(
            f"loss became NaN/Inf at or before step {run.global_step + run.log_step_offset} "
            f"(epoch {epoch + 1}); "
            + (
                f"the last good checkpoint is {good}"
                if good.exists()
                else "no checkpoint was written yet"
            )
            + f". Likely causes: learning rate too high (optim.lr={self.cfg.optim.lr}), "
            "fp16/bf16 overflow (try train.precision=fp32), or a collapsed batch. Resume with a "
            "lower lr, or set train.on_nan=skip to skip such steps"
        )

    def _log_window(
        self, run: _Run, n_bad: int, lr: float, epoch: int, logger: MetricsLogger, bar
    ) -> None:
        """The window's mean loss, lr, images/s and skipped steps: to the metrics and the bar."""
        env, window = self.env, run.window
        run.images_per_s = window.images_per_s(self.cfg.train.batch_size)
        # NaN when every step of the window was skipped: no loss to show
        counted = window.steps * env.world_size - n_bad
        mean_loss = float(all_reduce_sum(window.loss_sum)) / counted if counted > 0 else math.nan
        run.results["final_loss"] = mean_loss  # the last logged window's
        # a skipped step is skipped on every rank: each counted it
        n_skipped = n_bad // env.world_size
        if n_skipped:
            run.results["skipped_steps"] = run.results.get("skipped_steps", 0) + n_skipped
        logged = {
            "loss": mean_loss,
            "lr": lr,
            "images_per_s": run.images_per_s,
            "epoch": epoch + 1,
            "skipped_steps": n_skipped,
        }
        target_momentum = getattr(run.method, "target_momentum", None)  # BYOL's tau, MoCo's m
        if target_momentum is not None:
            logged["target_momentum"] = target_momentum(run.global_step / run.total_steps)
        if run.scaler.is_enabled():  # halves on each overflow, so it shows them
            logged["loss_scale"] = run.scaler.get_scale()
        logger.log(run.global_step, logged)
        bar.set_postfix(
            loss=f"{mean_loss:.4f}",
            lr=f"{lr:.3g}",
            img_s=f"{run.images_per_s:.0f}",
            epoch=epoch + 1,
        )
        window.reset()

    def _check_collapse(
        self, run: _Run, out: dict[str, torch.Tensor], epoch: int, logger: MetricsLogger
    ) -> None:
        """The collapse monitors on this step's outputs (gathered over the ranks), logged; a
        collapse that ``train.collapse=stop`` stops on is recorded in collapse.json."""
        with torch.no_grad():
            h, z2 = out.get("h"), out.get("z2")  # optional in a Method
            metrics = collapse_metrics(
                concat_all_gather(out["z"]).float(),
                h=None if h is None else concat_all_gather(h).float(),
                z2=None if z2 is None else concat_all_gather(z2).float(),
            )
        if "online_target_cos" in out:  # BYOL, MoCo
            metrics["online_target_cos"] = float(all_reduce_mean(out["online_target_cos"]))
        logger.log(run.global_step, metrics, prefix="collapse")
        step = run.global_step + run.log_step_offset  # as logged
        try:
            run.monitor.check(metrics, step=step)
        except CollapseError as exc:
            # the event is recorded; checkpoints/last.pt (the last epoch) is kept
            if self.env.is_main:
                write_json(
                    self.run_dir / "collapse.json",
                    {
                        "step": step,
                        "epoch": epoch + 1,
                        "metrics": metrics,
                        "message": str(exc),
                        "last_checkpoint": str(self.run_dir / "checkpoints" / "last.pt"),
                    },
                )
            raise

    def _end_epoch(
        self, run: _Run, epoch: int, start_epoch: int, agreed_stop: bool, bank, query, logger, bar
    ) -> None:
        """An epoch's end: its kNN check, its checkpoint, and a stop of this invocation (a
        signal, train.stop_after_epochs) as :class:`StopRequested`. ``agreed_stop``: what
        ``_agreed_stop`` said at the epoch's last step (under DDP the ranks stop together)."""
        env, t = self.env, self.cfg.train
        done_epochs = epoch + 1
        last_epoch = done_epochs == t.epochs
        if bank is not None and (last_epoch or (t.knn_every and done_epochs % t.knn_every == 0)):
            knn = self._knn(run.method.backbone, bank, query)
            run.results.update(knn_top1=knn["top1"], knn_top5=knn["top5"], knn_epoch=done_epochs)
            logger.log(
                run.global_step,
                {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "epoch": done_epochs},
                prefix="eval",
            )
            if env.is_main:
                bar.write(f"epoch {done_epochs}: kNN top-1 {knn['top1']:.4f}")
        stopping = self._stop_reason is not None and (
            not env.distributed or agreed_stop  # under DDP, what the ranks agreed on
        )
        # the checkpoint is the next epoch's start, so a resume may change the batch size
        if last_epoch or done_epochs % t.checkpoint_every == 0 or stopping:
            self._checkpoint(run, done_epochs, 0)
        if stopping and not last_epoch:
            raise StopRequested(self._stop_reason)
        if stopping and env.is_main:  # the run's last step: it is done, not stopped
            print(
                f"\nselfsup: {self._stop_reason} at the run's last step: finishing it",
                file=sys.stderr,
            )
        # epochs of this invocation, as time_limit_min counts its minutes: a job script that
        # resumes with stop_after_epochs=10 trains 10 epochs each time
        this_run = done_epochs - start_epoch
        if t.stop_after_epochs and this_run >= t.stop_after_epochs and not last_epoch:
            raise StopRequested(f"train.stop_after_epochs={t.stop_after_epochs}")

    def _fit(self) -> TrainResult:
        """Set up (weights, data, model, a resume's checkpoint, logs), then the epochs: each
        step logs every ``train.log_every`` steps and checks collapse every
        ``train.collapse_every``; each epoch ends with its kNN check and checkpoint. A stop
        (signal, limit) saves a checkpoint at the step it came; a finished run writes
        encoder.pt and results.json."""
        cfg, t, env = self.cfg, self.cfg.train, self.env
        torch.manual_seed(t.seed)
        self.precision = resolve_precision(t.precision, self.device)
        init = self._init_weights()  # checked before the data is decoded
        if env.is_main and not self.resume:
            small_image_stem_note(cfg)
            storage_size_note(cfg)
        train, bank, query = self._load_data()
        run = self._build(train, init)
        start_epoch, start_step, state = self._resume_from_checkpoint(run, train)
        run.results["precision"] = self.precision  # this invocation's: a resume may change it
        # as is the number of processes (BatchNorm statistics and random streams depend on it)
        run.results["processes"] = env.world_size
        logger = self._start_logs(run, train, from_checkpoint=state is not None)
        model = wrap_ddp(run.method, env)
        step_fn = torch.compile(model) if resolve_compile(t.compile, self.device) else model
        self._knn_before_training(run, bank, query, logger)

        started = time.monotonic()
        bar = tqdm(
            total=run.total_steps,
            initial=run.global_step,
            disable=not (t.progress and env.is_main),
            unit="step",
            dynamic_ncols=True,
            desc=f"{cfg.method.name}",
            **bar_options(),
        )
        run.window.start = time.monotonic()  # images/s times the steps, not the set-up
        channels_last = self.device.type == "cuda" and t.channels_last
        finished = False
        stop = False  # the ranks' agreed stop flag of the latest step
        previous_handlers = self._install_signal_handlers()  # put back by the finally below
        try:
            for epoch in range(start_epoch, t.epochs):
                run.method.train()
                first = start_step if epoch == start_epoch else 0
                run.stream.set_epoch(epoch, start_step=first)
                self._activity = f"epoch {epoch + 1} of training"
                for step_in_epoch, (_, batch) in enumerate(run.stream, first):
                    factor = warmup_cosine(
                        run.global_step, run.total_steps, run.warmup_steps, cfg.optim.min_lr_ratio
                    )
                    lr = set_lr(run.optimizer, factor)
                    v1, v2 = make_views(self.augment, batch, run.generator, channels_last)
                    out, finite, applied = optimizer_step(
                        run.method,
                        step_fn,
                        run.optimizer,
                        v1,
                        v2,
                        autocast=self._autocast,
                        # the update after step k (0-based) takes tau((k + 1) / K): the last
                        # one reaches tau = 1. tau(k / K) (tau_base first) measured lower on the
                        # BYOL quickstart: kNN 0.763 / 0.764 / 0.764 on seeds 0-2, against
                        # 0.799 / 0.804 / 0.811 with this one (2026-12-02, 2 CPU cores)
                        progress=(run.global_step + 1) / run.total_steps,
                        skip_nonfinite=t.on_nan == "skip",
                        all_finite=all_ranks_true,
                        scaler=run.scaler,
                    )
                    run.window.add(out, finite, applied)
                    run.global_step += 1
                    bar.update(1)

                    if (
                        self._stop_reason is None
                        and t.time_limit_min
                        and (time.monotonic() - started > 60 * t.time_limit_min)
                    ):
                        self._stop_reason = f"time limit of {t.time_limit_min} min"
                    last_step = step_in_epoch == run.steps_per_epoch - 1
                    sync_step = run.global_step % t.log_every == 0 or last_step
                    stop = self._agreed_stop(sync_step, run.global_step)
                    # also before a stop checkpoint, so no checkpoint holds NaN weights
                    if sync_step or stop:
                        n_bad = int(all_reduce_sum(run.window.bad_steps))
                        if n_bad and t.on_nan == "stop":
                            raise self._nan_error(run, epoch)
                        if sync_step:  # a stop between log steps keeps its window
                            self._log_window(run, n_bad, lr, epoch, logger, bar)
                    if t.collapse != "off" and run.global_step % t.collapse_every == 0:
                        self._check_collapse(run, out, epoch, logger)
                    if stop and not last_step:
                        self._checkpoint(run, epoch, step_in_epoch + 1)
                        raise StopRequested(self._stop_reason)
                    # a stop at an epoch's last step is _end_epoch's: its kNN and checkpoint
                    # (the next epoch's start) come first

                self._end_epoch(run, epoch, start_epoch, stop, bank, query, logger, bar)
                # images/s times training steps: not the epoch end's kNN and checkpoint (the
                # window is empty here, as an epoch's last step is a log step)
                run.window.start = time.monotonic()
            finished = True
        except StopRequested as stopped:
            bar.close()
            if env.is_main:
                try:  # a hang-up's closed terminal (EIO) must not turn the stop into a crash
                    print(
                        f"\nselfsup: stopped ({stopped}); checkpoint saved in "
                        f"{self.run_dir / 'checkpoints'}.\n"
                        f"Resume with: {self.continue_with or resume_command(self.run_dir)}",
                        file=sys.stderr,
                    )
                except OSError:
                    pass
        finally:
            bar.close()
            logger.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        if finished:
            self._finish(
                run, started, nothing_trained=state is not None and start_epoch >= t.epochs
            )
        return TrainResult(self.run_dir, run.results, finished)

    def _finish(self, run: _Run, started: float, *, nothing_trained: bool) -> None:
        """A finished run's warning of skipped steps, encoder.pt and results.json (rank 0)."""
        if not self.env.is_main:
            return
        results = run.results
        skipped = results.get("skipped_steps", 0)
        if skipped:
            print(
                f"selfsup: warning: {skipped} of {run.global_step} steps were skipped (non-finite "
                "loss, train.on_nan=skip); if that is more than a rare one, lower optim.lr or use "
                "train.precision=fp32",
                file=sys.stderr,
            )
        timings = {
            "train_time_s": round(time.monotonic() - started, 2),
            "images_per_s_last": round(run.images_per_s, 1),
            "environment": environment(self.device),  # what the speeds were measured on
        }
        if nothing_trained:  # a resume of a finished run: keep what was measured, and where
            try:
                earlier = json.loads((self.run_dir / "results.json").read_text())
            except (OSError, ValueError):
                earlier = {}
            if isinstance(earlier, dict):
                timings |= {k: earlier[k] for k in timings if k in earlier}
        results.update(timings)
        # CPU tensors: a plain torch.load on a machine without a GPU must open it
        state = {k: v.detach().cpu() for k, v in run.method.backbone.state_dict().items()}
        atomic_torch_save(state, self.run_dir / "encoder.pt")
        write_json(self.run_dir / "results.json", results)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as strict JSON (NaN/Inf as null: a run whose every step was skipped has no final
    loss), written atomically."""
    text = json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(path, text + "\n")
