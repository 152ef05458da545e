"""``selfsup eval / embed / neighbors / export / table``: use and judge a trained encoder."""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selfsup.cli import register
from selfsup.errors import ConfigError, DataError

PROTOCOLS = ("knn", "linear", "finetune", "all")
RESULT_FIELDS = ("time", "run", "method", "pretrain_data", "epochs", "eval_data", "protocol",
                 "encoder", "metric", "value", "config_hash")


# ---------------------------------------------------------------------------- shared helpers
def _run_info(target: Path) -> dict[str, Any]:
    """What the run directory says of an encoder: method, data, epochs, mean/std, image size."""
    run_dir = target if target.is_dir() else target.parent
    info: dict[str, Any] = {"run_dir": run_dir}
    config = run_dir / "config.yaml"
    if config.exists():
        from omegaconf import OmegaConf

        from selfsup.train.config import config_hash

        cfg = OmegaConf.load(config)
        info.update(method=cfg.method.name, pretrain_data=cfg.data.source, epochs=cfg.train.epochs,
                    image_size=cfg.data.image_size, mean=cfg.data.mean, std=cfg.data.std,
                    config_hash=config_hash(cfg))
    return info


def _transforms(image_size: int, mean, std, device: torch.device):
    from selfsup.augment import EvalTransform, ViewAugment, ViewConfig

    # the papers' linear / fine-tuning augmentation: random resized crop and flip only
    crop_flip = ViewConfig(crop_scale=(0.08, 1.0), jitter_p=0.0, gray_p=0.0, blur_p=0.0,
                           solarize_p=0.0)
    train_t = ViewAugment(crop_flip, image_size, mean, std).to(device)
    eval_t = EvalTransform(image_size, mean=mean, std=std).to(device)
    return train_t, eval_t


def _device(name: str | None) -> torch.device:
    from selfsup.train.trainer import resolve_device

    return resolve_device(name or "auto")


def _load_split(source: str, split: str, image_size: int, cache_dir: str | None):
    from selfsup.data import load_dataset

    ds = load_dataset(source, split, image_size=image_size, cache_dir=cache_dir)
    if ds.labels is None:
        raise DataError(f"{source!r} ({split} split) has no labels; evaluation needs an ImageFolder "
                        f"layout (<class>/<image>) with train/ and test/ splits")
    return ds


def append_results(csv_path: Path, rows: list[dict[str, Any]]) -> None:
    new = not csv_path.exists()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------- eval
def _add_eval(sub, name: str) -> None:
    p = sub.add_parser(name, help="evaluate an encoder: kNN, linear probe, fine-tuning, transfer",
                       description="Evaluate a run directory or an encoder file on a labeled "
                       "dataset (the pre-training data, or another one: transfer).")
    p.add_argument("encoder", help="run directory or encoder file")
    p.add_argument("--data", default=None, help="labeled source (default: the run's own data)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="knn")
    p.add_argument("--label-fraction", type=float, nargs="+", default=[1, 10],
                   help="fine-tuning label fractions in percent (default: 1 10)")
    p.add_argument("--linear-mode", choices=("fast", "full", "both"), default="fast")
    p.add_argument("--linear-epochs", type=int, default=100)
    p.add_argument("--finetune-epochs", type=int, default=30)
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-temperature", type=float, default=0.1)
    p.add_argument("--baselines", action="store_true",
                   help="also evaluate a random-init encoder and a supervised one (same budget)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--results-csv", default=None,
                   help="append one line per number here (default: <run dir>/../results.csv)")
    p.add_argument("--no-progress", action="store_true")


def evaluate_encoder(args: argparse.Namespace) -> dict[str, Any]:
    from selfsup.evaluate.features import extract_features
    from selfsup.evaluate.finetune import finetune, supervised_baseline
    from selfsup.evaluate.knn import knn_accuracy
    from selfsup.evaluate.linear import linear_probe, linear_probe_features
    from selfsup.evaluate.subsets import balanced_subset, save_subset
    from selfsup.export import load_encoder
    from selfsup.train.trainer import dataset_stats, write_json

    target = Path(args.encoder)
    info = _run_info(target)
    source = args.data or info.get("pretrain_data")
    if source is None:
        raise ConfigError(f"{target}: no config.yaml beside the encoder; pass --data")
    image_size = args.image_size or info.get("image_size") or 32
    device = _device(args.device)
    encoder = load_encoder(target)
    if not isinstance(encoder, torch.nn.Module):
        raise ConfigError(f"{target} did not load as a torch module")
    train = _load_split(source, "train", image_size, args.cache_dir)
    test = _load_split(source, "test", image_size, args.cache_dir)
    mean, std = (info["mean"], info["std"]) if info.get("mean") else dataset_stats(train.images)
    train_t, eval_t = _transforms(image_size, list(mean), list(std), device)
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    progress = not args.no_progress
    protocols = ("knn", "linear", "finetune") if args.protocol == "all" else (args.protocol,)

    encoders = {"ssl": encoder}
    if args.baselines:
        from selfsup.models import build_backbone

        torch.manual_seed(args.seed)
        encoders["random_init"] = build_backbone(*_arch(target, encoder))[0]
    results: dict[str, Any] = {"encoder": str(target), "eval_data": source, "image_size": image_size,
                               "num_classes": num_classes, "protocols": {}}
    rows: list[dict[str, Any]] = []

    def record(enc: str, protocol: str, metrics: dict[str, Any]) -> None:
        results["protocols"].setdefault(protocol, {})[enc] = metrics
        for key, value in metrics.items():
            if isinstance(value, float | int) and key in ("top1", "top5", "seconds"):
                rows.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                             "run": str(info["run_dir"]), "method": info.get("method", ""),
                             "pretrain_data": info.get("pretrain_data", ""),
                             "epochs": info.get("epochs", ""), "eval_data": source,
                             "protocol": protocol, "encoder": enc, "metric": key, "value": value,
                             "config_hash": info.get("config_hash", "")})

    for enc_name, enc in encoders.items():
        feats = None
        if "knn" in protocols or ("linear" in protocols and args.linear_mode in ("fast", "both")):
            t0 = time.monotonic()
            feats = (extract_features(enc, train.images, eval_t, batch_size=args.batch_size,
                                      device=device),
                     extract_features(enc, test.images, eval_t, batch_size=args.batch_size,
                                      device=device))
            feat_seconds = time.monotonic() - t0
        if "knn" in protocols:
            m = knn_accuracy(feats[0], train.labels, feats[1], test.labels, k=args.knn_k,
                             temperature=args.knn_temperature, num_classes=num_classes)
            record(enc_name, "knn", {**m, "k": args.knn_k, "temperature": args.knn_temperature})
        if "linear" in protocols:
            if args.linear_mode in ("fast", "both"):
                t0 = time.monotonic()
                m = linear_probe_features(feats[0], train.labels, feats[1], test.labels,
                                          num_classes=num_classes, epochs=args.linear_epochs,
                                          device=device, seed=args.seed)
                m = {**m, "seconds": round(time.monotonic() - t0 + feat_seconds, 2)}
                record(enc_name, "linear_fast", m)
            if args.linear_mode in ("full", "both"):
                t0 = time.monotonic()
                m = linear_probe(enc, train.images, train.labels, test.images, test.labels,
                                 train_transform=train_t, eval_transform=eval_t,
                                 num_classes=num_classes, epochs=args.linear_epochs,
                                 batch_size=args.batch_size, device=device, seed=args.seed,
                                 progress=progress)
                record(enc_name, "linear_full", {**m, "seconds": round(time.monotonic() - t0, 2)})
        if "finetune" in protocols:
            for fraction in args.label_fraction:
                idx = balanced_subset(train.labels, fraction, seed=args.seed)
                subset_file = info["run_dir"] / f"subset_{_slug(source)}_{fraction:g}pct_seed{args.seed}.csv"
                save_subset(idx, [train.paths[i] for i in idx.tolist()] if train.paths else None,
                            train.labels[idx], subset_file)
                t0 = time.monotonic()
                m = finetune(enc, train.images[idx], train.labels[idx], test.images, test.labels,
                             num_classes=num_classes, train_transform=train_t, eval_transform=eval_t,
                             epochs=args.finetune_epochs, batch_size=args.batch_size, device=device,
                             seed=args.seed, progress=progress)
                m = {**m, "seconds": round(time.monotonic() - t0, 2), "subset_file": subset_file.name,
                     "labeled_images": int(idx.numel())}
                record(enc_name, f"finetune_{fraction:g}pct", m)
                if args.baselines and enc_name == "ssl":
                    from selfsup.models import build_backbone

                    torch.manual_seed(args.seed)
                    fresh = build_backbone(*_arch(target, encoder))[0]
                    m = supervised_baseline(fresh, train.images[idx], train.labels[idx], test.images,
                                            test.labels, num_classes=num_classes,
                                            train_transform=train_t, eval_transform=eval_t,
                                            epochs=args.finetune_epochs, batch_size=args.batch_size,
                                            device=device, seed=args.seed, progress=progress)
                    record("supervised", f"finetune_{fraction:g}pct", m)

    out_json = info["run_dir"] / f"eval_{_slug(source)}_{args.protocol}.json"
    write_json(out_json, results)
    csv_path = Path(args.results_csv) if args.results_csv else info["run_dir"].parent / "results.csv"
    append_results(csv_path, rows)
    results["_json"], results["_csv"] = str(out_json), str(csv_path)
    return results


def _arch(target: Path, encoder: torch.nn.Module) -> tuple[str, bool]:
    from selfsup.export import infer_architecture

    name, small = infer_architecture(encoder.state_dict())
    return name, small


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(text).name or text)[:40]


def _eval(args: argparse.Namespace) -> int:
    results = evaluate_encoder(args)
    print(format_eval_table(results))
    print(f"selfsup: results in {results['_json']}; one line per number appended to {results['_csv']}")
    return 0


def format_eval_table(results: dict[str, Any]) -> str:
    lines = ["| protocol | encoder | top-1 | top-5 | note |", "| --- | --- | --- | --- | --- |"]
    for protocol, by_encoder in results["protocols"].items():
        for enc, m in by_encoder.items():
            note = m.get("mode", "") if isinstance(m.get("mode"), str) else ""
            lines.append(f"| {protocol} | {enc} | {m.get('top1', float('nan')):.4f} | "
                         f"{m.get('top5', float('nan')):.4f} | {note} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- embed / neighbors
def _add_embed(sub, name: str) -> None:
    p = sub.add_parser(name, help="write embeddings (+ paths and labels) of a dataset")
    p.add_argument("encoder", help="run directory or encoder file")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--out", required=True, help="output .npz (embeddings, paths, labels) or .npy")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=None)


def embed_dataset(encoder_path: str, source: str, split: str, image_size: int | None,
                  batch_size: int, device: str | None, cache_dir: str | None):
    from selfsup.data import load_dataset
    from selfsup.evaluate.features import extract_features
    from selfsup.export import load_encoder
    from selfsup.train.trainer import dataset_stats

    info = _run_info(Path(encoder_path))
    size = image_size or info.get("image_size") or 32
    ds = load_dataset(source, split, image_size=size, cache_dir=cache_dir)
    mean, std = (info["mean"], info["std"]) if info.get("mean") else dataset_stats(ds.images)
    dev = _device(device)
    _, eval_t = _transforms(size, list(mean), list(std), dev)
    feats = extract_features(load_encoder(encoder_path), ds.images, eval_t, batch_size=batch_size,
                             device=dev)
    return feats, ds


def _embed(args: argparse.Namespace) -> int:
    feats, ds = embed_dataset(args.encoder, args.data, args.split, args.image_size, args.batch_size,
                              args.device, args.cache_dir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, feats.numpy())
    else:
        np.savez(out, embeddings=feats.numpy(), paths=np.array(ds.paths or [], dtype=str),
                 labels=(ds.labels.numpy() if ds.labels is not None else np.array([], dtype=np.int64)),
                 classes=np.array(ds.classes or [], dtype=str))
    print(f"selfsup: {feats.shape[0]} embeddings of dim {feats.shape[1]} written to {out}")
    return 0


def _add_neighbors(sub, name: str) -> None:
    p = sub.add_parser(name, help="the most similar images of a dataset to query images")
    p.add_argument("encoder")
    p.add_argument("--data", required=True, help="the images to search")
    p.add_argument("--query", required=True, nargs="+",
                   help="query image files, or one text file listing image paths")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def nearest_neighbors(encoder_path: str, source: str, queries: list[str], k: int,
                      image_size: int | None, device: str | None, cache_dir: str | None):
    from selfsup.data.decode import decode_image, resize_shorter
    from selfsup.evaluate.features import extract_features
    from selfsup.export import load_encoder

    if len(queries) == 1 and queries[0].endswith(".txt"):
        queries = [q.strip() for q in Path(queries[0]).read_text().splitlines() if q.strip()]
    info = _run_info(Path(encoder_path))
    size = image_size or info.get("image_size") or 32
    feats, ds = embed_dataset(encoder_path, source, "train", size, 256, device, cache_dir)
    arrays = []
    for q in queries:
        path = Path(q)
        if not path.is_file():
            raise DataError(f"query image {q} does not exist")
        img = resize_shorter(decode_image(path.read_bytes(), name=q), size)
        arrays.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1))
    from selfsup.train.trainer import dataset_stats

    mean, std = (info["mean"], info["std"]) if info.get("mean") else dataset_stats(ds.images)
    dev = _device(device)
    _, eval_t = _transforms(size, list(mean), list(std), dev)
    qf = extract_features(load_encoder(encoder_path), torch.stack(arrays), eval_t, device=dev)
    sims = torch.nn.functional.normalize(qf, dim=1) @ torch.nn.functional.normalize(feats, dim=1).T
    top = sims.topk(min(k, feats.shape[0]), dim=1)
    out = []
    for qi, q in enumerate(queries):
        hits = []
        for score, idx in zip(top.values[qi].tolist(), top.indices[qi].tolist(), strict=True):
            label = ds.classes[int(ds.labels[idx])] if ds.labels is not None and ds.classes else None
            hits.append({"path": ds.paths[idx] if ds.paths else str(idx), "similarity": round(score, 4),
                         "label": label})
        out.append({"query": q, "neighbors": hits})
    return out


def _neighbors(args: argparse.Namespace) -> int:
    out = nearest_neighbors(args.encoder, args.data, args.query, args.k, args.image_size,
                            args.device, args.cache_dir)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for item in out:
            print(item["query"])
            for h in item["neighbors"]:
                print(f"  {h['similarity']:.4f}  {h['path']}" + (f"  [{h['label']}]" if h["label"] else ""))
    return 0


# ---------------------------------------------------------------------------- export / table
def _add_export(sub, name: str) -> None:
    from selfsup.export import EXPORT_FORMATS

    p = sub.add_parser(name, help="export the encoder of a run")
    p.add_argument("run", help="run directory or encoder file")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="torchvision")
    p.add_argument("--out", default=None, help="output folder (default <run>/export)")
    p.add_argument("--image-size", type=int, default=None, help="example input size for TorchScript")


def _export(args: argparse.Namespace) -> int:
    from selfsup.export import export_encoder

    info = _run_info(Path(args.run))
    path = export_encoder(args.run, args.format, args.out,
                          image_size=args.image_size or info.get("image_size") or 32)
    print(f"selfsup: exported {args.format} encoder to {path}")
    return 0


def _add_table(sub, name: str) -> None:
    p = sub.add_parser(name, help="a markdown table of a results CSV (runs x protocols)")
    p.add_argument("csv", nargs="?", default="runs/results.csv")
    p.add_argument("--metric", default="top1")


def results_table(csv_path: Path, metric: str = "top1") -> str:
    if not csv_path.exists():
        raise DataError(f"{csv_path} does not exist; run `selfsup eval` first")
    with open(csv_path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["metric"] == metric]
    latest: dict[tuple, dict] = {}
    for r in rows:  # the newest line of each (run, encoder, eval data, protocol) wins
        latest[(r["run"], r["encoder"], r["eval_data"], r["protocol"])] = r
    protocols = sorted({k[3] for k in latest})
    keys = sorted({k[:3] for k in latest})
    lines = ["| run | method | epochs | encoder | eval data | " + " | ".join(protocols) + " |",
             "| " + " | ".join(["---"] * (5 + len(protocols))) + " |"]
    for run, enc, data in keys:
        any_row = next(v for k, v in latest.items() if k[:3] == (run, enc, data))
        cells = [f"{float(latest[(run, enc, data, p)]['value']):.4f}" if (run, enc, data, p) in latest
                 else "" for p in protocols]
        lines.append(f"| {run} | {any_row['method']} | {any_row['epochs']} | {enc} | {data} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _table(args: argparse.Namespace) -> int:
    print(results_table(Path(args.csv), args.metric))
    return 0


for _name, _adder, _handler in (
    ("eval", _add_eval, _eval), ("embed", _add_embed, _embed),
    ("neighbors", _add_neighbors, _neighbors), ("export", _add_export, _export),
    ("table", _add_table, _table),
):
    register(_name, _adder, _handler)

__all__ = ["evaluate_encoder", "embed_dataset", "nearest_neighbors", "results_table"]
