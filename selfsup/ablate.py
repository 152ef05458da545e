"""``selfsup ablate NAME``: the seeds' collapse ablations as sets of short runs, one markdown table.

Each ablation is a list of variants, each variant a method plus ``key=value`` overrides on the
``cifar10`` preset (tens of epochs on one GPU) or, with ``--quick``, on the ``quickstart`` preset
(minutes on a CPU). The table puts our kNN top-1 and the collapse monitors of the last check beside
the number the seeds report for the same variant (ImageNet linear accuracy, ResNet-50: a different
scale, so compare which variants collapse and the ordering, not the values).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from selfsup.cli import register
from selfsup.errors import ConfigError, DeviceMemoryError, SelfsupError


@dataclass(frozen=True)
class Variant:
    label: str
    method: str
    overrides: tuple[str, ...] = ()
    seed_value: str = ""  # the seeds' number for this variant


@dataclass(frozen=True)
class Ablation:
    title: str
    source: str  # where the seeds' numbers come from
    variants: tuple[Variant, ...] = field(default_factory=tuple)


def _batch_variants(quick: bool) -> tuple[Variant, ...]:
    sizes = (32, 64, 128, 256) if quick else (64, 128, 256, 512, 1024)
    # The seeds give no per-batch numbers for SimCLR or BYOL (only BYOL Fig. 3a's curves), so the
    # seed column stays empty; SimSiam's SGD numbers are quoted in the ablation's source line.
    return tuple(
        Variant(f"{m} batch {b}", m, (f"train.batch_size={b}",))
        for m in ("simclr", "byol")
        for b in sizes
    )


NO_COLOUR = ("augment.both.jitter_p=0.0", "augment.both.gray_p=0.0")

ABLATIONS: dict[str, Ablation] = {
    "simsiam-stopgrad": Ablation(
        "SimSiam: stop-gradient",
        "SimSiam (Chen & He 2021) Sec. 4.1, ImageNet linear acc. %",
        (
            # the preset keeps the predictor's lr fixed, as Table 1 row (c); Sec. 4.1 decays it
            Variant("with stop-gradient", "simsiam", (), "67.7 (68.1 lr not decayed)"),
            Variant("without stop-gradient", "simsiam", ("method.stop_gradient=false",), "0.1"),
        ),
    ),
    "simsiam-predictor": Ablation(
        "SimSiam: predictor",
        "SimSiam Table 1, ImageNet linear acc. %",
        (
            # the preset keeps the predictor's lr fixed: Table 1 row (c), not the decayed 67.7
            Variant("MLP predictor", "simsiam", (), "68.1 (lr not decayed)"),
            Variant("no predictor", "simsiam", ("method.predictor=none",), "0.1"),
            Variant("fixed random predictor", "simsiam", ("method.predictor=random_fixed",), "1.5"),
        ),
    ),
    "byol-target": Ablation(
        "BYOL: EMA target vs fixed random target",
        "BYOL Sec. 3.1, ImageNet linear acc. %",
        (
            Variant("EMA target", "byol", (), "74.3 (1000 ep)"),
            Variant("fixed random-init target", "byol", ("method.target=random_fixed",), "18.8"),
        ),
    ),
    "byol-predictor": Ablation(
        "BYOL: predictor",
        "BYOL Table 5(b): removing the predictor collapses with an EMA target; 74.3 is Table 1",
        (
            Variant("with predictor", "byol", (), "74.3 (1000 ep)"),
            Variant("without predictor", "byol", ("method.predictor=false",), "collapses"),
        ),
    ),
    "augment": Ablation(
        "Colour distortion removed",
        "BYOL Fig. 3b: SimCLR loses far more than BYOL without colour",
        (
            Variant("SimCLR, full augmentation", "simclr"),
            Variant("SimCLR, no colour jitter / grayscale", "simclr", NO_COLOUR, "large drop"),
            Variant("BYOL, full augmentation", "byol"),
            Variant("BYOL, no colour jitter / grayscale", "byol", NO_COLOUR, "smaller drop"),
        ),
    ),
}
BATCH = "batch-size"
NAMES = (*ABLATIONS, BATCH)


def ablation(name: str, quick: bool) -> Ablation:
    if name == BATCH:
        return Ablation(
            "Batch size: SimCLR vs BYOL",
            "BYOL Fig. 3a: SimCLR degrades faster at small batches (SimSiam Table 2, SGD: "
            "66.1 / 67.3 / 68.1 / 68.1 / 68.0 at 64 / 128 / 256 / 512 / 1024)",
            _batch_variants(quick),
        )
    if name not in ABLATIONS:
        raise ConfigError(f"unknown ablation {name!r}; choose one of {list(NAMES)}")
    return ABLATIONS[name]


def _last_collapse(run_dir: Path) -> dict[str, float]:
    from selfsup.train.logging import read_metrics

    last: dict[str, float] = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        if "collapse/z_std_ratio" in record:
            last = {  # a non-finite metric is logged as null
                k.split("/", 1)[1]: float("nan") if v is None else v
                for k, v in record.items()
                if k.startswith("collapse/")
            }
    return last


def run_ablation(
    name: str,
    *,
    quick: bool,
    data: str | None,
    epochs: int | None,
    out: Path,
    extra: list[str],
    progress: bool,
) -> str:
    """Train every variant (skipping finished ones, resuming interrupted ones); return the table."""
    from selfsup.data.cache import atomic_write_text
    from selfsup.evaluate.collapse import CollapseMonitor
    from selfsup.train.config import resolve_config

    spec = ablation(name, quick)
    preset = "quickstart" if quick else "cifar10"
    size = _run_size(quick, epochs)
    _check_overrides(name, spec, extra)  # for all variants before any trains
    rows = []
    for i, v in enumerate(spec.variants):
        run_dir = out / name / f"{i:02d}_{v.method}"
        flags = {"data.source": data, "train.progress": progress}
        cfg = resolve_config(
            v.method, preset, flags=flags, overrides=[*size, *extra, *v.overrides],
            shared_overrides=True,  # `extra` is for every variant, of either method
        )  # fmt: skip
        _train_variant(name, spec, v, cfg, run_dir)
        results = json.loads((run_dir / "results.json").read_text())
        monitors = _last_collapse(run_dir)
        verdict = CollapseMonitor(v.method, mode="off")._symptoms(monitors) if monitors else []
        rows.append((v, results, monitors, bool(verdict) if monitors else None))
    table = _table(spec, preset, data, rows)
    (out / name).mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / name / "table.md", table)  # a stop leaves the last table whole
    return table


def _run_size(quick: bool, epochs: int | None) -> list[str]:
    """The overrides that size every variant's run: tens of epochs, or the CPU quickstart."""
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    # quick: each variant is the method's quickstart run (4,000 digits, its preset's epochs: 8;
    # MoCo 16, BYOL 24), so the unablated rows are the README's quickstart runs; 2,048 digits for 8
    # epochs were too few steps for SimSiam and BYOL to learn past their random initialisation.
    size = ["train.collapse=warn"]
    if epochs or not quick:
        size.append(f"train.epochs={epochs or 30}")
    if quick:
        size += ["train.knn_every=0", "train.collapse_every=10"]
    return size


def _varied_keys(spec: Ablation) -> set[str]:
    """The settings the ablation's variants set: what an override may not change."""
    return {o.split("=", 1)[0].strip() for v in spec.variants for o in v.overrides}


def _check_overrides(name: str, spec: Ablation, extra: list[str]) -> None:
    given = {o.split("=", 1)[0].strip() for o in extra}
    for v in spec.variants:
        clash = sorted({o.split("=", 1)[0].strip() for o in v.overrides} & given)
        if clash:
            raise ConfigError(
                f"{', '.join(clash)} is what the {name} ablation varies ({v.label}: "
                f"{' '.join(v.overrides)}); drop it from the overrides"
            )


def _train_variant(name: str, spec: Ablation, v: Variant, cfg, run_dir: Path) -> None:
    """Train variant ``v`` into ``run_dir``, unless a finished run of the same settings is there;
    an interrupted one at the same settings is resumed, one at other settings started over."""
    from selfsup.train.run_dir import prepare_run_dir
    from selfsup.train.trainer import Trainer

    same = _same_plan(run_dir, cfg)
    if same and (run_dir / "results.json").exists():
        return  # a finished variant is reused, only at the same settings
    resume = same and (run_dir / "checkpoints" / "last.pt").exists()
    if (run_dir / "config.yaml").exists() and not same:
        print(f"selfsup ablate {name}: {run_dir} was run with other settings; rerunning")
    prepare_run_dir(run_dir, resume=resume, overwrite=not resume)
    cfg.out = str(run_dir)
    print(f"selfsup ablate {name}: {v.label} -> {run_dir}")
    again = f"the same `selfsup ablate {name} ...` command (it resumes this variant)"
    try:
        finished = Trainer(cfg, run_dir, resume=resume, continue_with=again).fit().finished
    except DeviceMemoryError as exc:  # the trainer's advice, then how to apply it here
        raise DeviceMemoryError(
            f"{exc}Add the change to the overrides of this `selfsup ablate {name}` "
            "command; every variant then starts over with it, the finished ones too, as "
            "the table's rows share their settings"
            + (
                " (this ablation sets train.batch_size itself: choose a smaller "
                "model.backbone or data.image_size)"
                if "train.batch_size" in _varied_keys(spec)
                else ""
            )
        ) from None
    if not finished:
        raise AblationStopped(
            f"selfsup ablate {name} stopped during {v.label} ({run_dir}); run the same "
            "command again to resume it and go on"
        )


def _table(spec: Ablation, preset: str, data: str | None, rows: list) -> str:
    """The markdown table: per variant our kNN and last collapse check beside the seeds'."""
    run_epochs = sorted({int(results.get("epochs", 0)) for _, results, _, _ in rows})
    lines = [
        f"### {spec.title}",
        "",
        f"Ours: {preset} preset, {' / '.join(map(str, run_epochs))} epochs"
        + (f", data {data}" if data else "")
        + f". Seeds: {spec.source}.",
        "",
        "| variant | kNN top-1 | random-init kNN | z std x sqrt(d) | eff. rank | collapsed at end "
        "| seeds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v, results, mon, collapsed in rows:
        lines.append(
            f"| {v.label} | {_fmt(results.get('knn_top1'))} | "
            f"{_fmt(results.get('knn_top1_random_init'))} | {_fmt(mon.get('z_std_ratio'), 3)} | "
            f"{_fmt(mon.get('z_erank'), 1)} | {_verdict(collapsed)} | {v.seed_value} |"
        )
    if any(collapsed is None for *_, collapsed in rows):
        lines += [
            "",
            "not checked: the run ended before its first collapse check; lower "
            "train.collapse_every (or train longer) to judge it.",
        ]
    return "\n".join(lines) + "\n"


class AblationStopped(SelfsupError):
    """A variant's run stopped (signal, time limit) before it finished; its checkpoint stays."""


# what decides a variant's numbers; progress bars, limits of one invocation and the data
# statistics filled in at the start are not part of it
_PLAN_IGNORED = ("out", "train.progress", "train.stop_after_epochs", "train.time_limit_min",
                 "data.mean", "data.std")  # fmt: skip


def _same_plan(run_dir: Path, cfg) -> bool:
    """Whether ``run_dir`` holds a run of exactly the settings of ``cfg``."""
    from omegaconf import OmegaConf

    try:
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    except Exception:  # absent or unreadable: nothing to reuse
        return False
    now = OmegaConf.to_container(cfg, resolve=True)
    for dotted in _PLAN_IGNORED:
        for tree in (saved, now):
            *parents, leaf = dotted.split(".")
            node = tree
            for key in parents:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(leaf, None)
    return saved == now


def _verdict(collapsed: bool | None) -> str:
    return "not checked" if collapsed is None else "yes" if collapsed else "no"


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _add(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="run a named collapse ablation and write a markdown table",
        description="Ablations: " + ", ".join(NAMES),
    )
    p.add_argument("name", choices=(*NAMES, "all"))
    p.add_argument("--quick", action="store_true", help="CPU size: quickstart preset, digits")
    p.add_argument("--data", default=None, help="data source (default: the preset's)")
    p.add_argument(
        "--epochs", type=int, default=None, help="epochs per variant (30; quick: as quickstart)"
    )
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value settings applied to every variant")


def _handle(args: argparse.Namespace) -> int:
    import sys

    names = NAMES if args.name == "all" else (args.name,)
    for name in names:
        try:
            table = run_ablation(
                name,
                quick=args.quick,
                data=args.data,
                epochs=args.epochs,
                out=Path(args.out),
                extra=list(args.overrides),
                progress=not args.no_progress,
            )
        except AblationStopped as stop:
            print(stop, file=sys.stderr)
            return 3  # as a stopped `selfsup pretrain`: nothing lost, run it again to go on
        print(table)
        print(f"selfsup ablate {name}: table saved to {Path(args.out) / name / 'table.md'}")
    return 0


register("ablate", _add, _handle)
