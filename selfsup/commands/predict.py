"""``selfsup predict``: a classifier of ``eval --save-classifiers`` applied to images."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfsup.checks import check_encode_args, check_writable
from selfsup.commands.common import (
    _atomic_output,
    _check_limit,
    _on_every_process,
    _torchrun_device,
    add_device_and_cache_args,
)
from selfsup.commands.embed import _encode_source, _text_path
from selfsup.errors import ConfigError

if TYPE_CHECKING:  # imported where used: `selfsup --help` and argument errors stay fast
    pass


PREDICT_FIELDS = ("path", "class", "confidence")  # + "label" when the data has labels


def add_arguments(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="classify images with a classifier saved by `selfsup eval --save-classifiers`",
        description="Classify every image of --data with a classifier that `selfsup eval "
        "--save-classifiers` saved (<run>/classifiers/*.pt), its images prepared as that "
        "evaluation prepared them. Writes a CSV with path, class, confidence (the softmax "
        "probability of that class) and, when the data has labels, label; prints the "
        "accuracy when the labels' class names are the classifier's.",
    )
    p.add_argument("classifier", help="a <run>/classifiers/*.pt (or the .json beside it)")
    p.add_argument("--data", required=True, help="the images to classify (as `selfsup embed`)")
    p.add_argument("--split", default="train", help="split to classify (default: train)")
    p.add_argument("--out", default="predictions.csv", help="output CSV (default: predictions.csv)")
    p.add_argument("--limit", type=int, default=None, help="only N images, evenly spaced")
    p.add_argument("--batch-size", type=int, default=256, help="images classified at once")
    add_device_and_cache_args(p)


def predict_dataset(
    classifier_path: str | Path,
    source: str,
    split: str = "train",
    batch_size: int = 256,
    device: str | None = None,
    cache_dir: str | None = None,
    limit: int | None = None,
    classifier=None,
    progress: bool = False,
) -> dict[str, Any]:
    """Classify ``source`` / ``split`` with a saved classifier (``classifier``, when given, is the
    loaded one). Returns ``{"dataset", "index" int64 [N], "confidence" [N], "classes",
    "correct", "scored"}``: ``scored`` counts the labeled images whose class name is one of the
    classifier's (0 for unlabeled data), ``correct`` those predicted right."""
    import torch

    from selfsup.export import load_classifier

    check_encode_args(None, batch_size)
    # loaded before the data: a missing or foreign classifier fails fast
    clf = classifier if classifier is not None else load_classifier(classifier_path)
    logits, ds = _encode_source(
        clf.model, clf.metadata, source, split, None, batch_size, device, cache_dir, limit,
        progress, where=classifier_path,
    )  # fmt: skip
    confidence, index = logits.softmax(dim=1).max(dim=1)
    correct = scored = 0
    if ds.labels is not None:
        names = ds.classes or [str(i) for i in range(int(ds.labels.max()) + 1)]
        position = {c: i for i, c in enumerate(clf.classes)}
        # the data's label numbers as the classifier's (-1: a class it does not know)
        as_clf = torch.tensor([position.get(str(c), -1) for c in names], dtype=torch.long)
        truth = as_clf[ds.labels.long()]
        known = truth >= 0
        scored = int(known.sum())
        correct = int((index[known] == truth[known]).sum())
    return {
        "dataset": ds,
        "index": index,
        "confidence": confidence,
        "classes": clf.classes,
        "correct": correct,
        "scored": scored,
    }


def _write_predictions(path: Path, result: dict[str, Any]) -> None:
    ds, classes = result["dataset"], result["classes"]
    labeled = ds.labels is not None
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow((*PREDICT_FIELDS, "label") if labeled else PREDICT_FIELDS)
        for i, (k, p) in enumerate(
            zip(result["index"].tolist(), result["confidence"].tolist(), strict=True)
        ):
            row = [_text_path(ds.paths[i]) if ds.paths else str(i), _text_path(classes[k])]
            row.append(f"{p:.6f}")
            if labeled:
                value = int(ds.labels[i])
                row.append(_text_path(ds.classes[value]) if ds.classes else str(value))
            writer.writerow(row)


def handle(args: argparse.Namespace) -> int:
    from selfsup.export import load_classifier

    out = Path(args.out)
    check_encode_args(None, args.batch_size)
    _check_limit(args.limit)
    clf = load_classifier(args.classifier)  # a missing or foreign file: before any decoding
    if out.is_dir():
        raise ConfigError(
            f"--out {out} is a folder; pass a file name such as {out}/predictions.csv"
        )
    check_writable(out.parent, "the predictions")

    def predict() -> dict[str, Any]:
        return predict_dataset(
            args.classifier,
            args.data,
            args.split,
            args.batch_size,
            str(_torchrun_device(args.device, "predict")),
            args.cache_dir,
            args.limit,
            classifier=clf,
            progress=not args.no_progress,
        )

    result, main = _on_every_process(predict)
    if not main:  # every process holds all the rows; one writes them
        return 0
    _atomic_output(out, lambda tmp: _write_predictions(tmp, result))
    n, scored, ds = len(result["index"]), result["scored"], result["dataset"]
    line = f"selfsup: {n} images of {args.data} ({args.split}) classified into {out}"
    if scored:
        line += f"; accuracy {result['correct'] / scored:.4f} ({result['correct']}/{scored})"
        if scored < n:
            line += f", {n - scored} images of classes the classifier does not know left out"
    elif ds.labels is not None:
        line += "; no accuracy: none of the data's class names is one of the classifier's"
    print(line)
    return 0
