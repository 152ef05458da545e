"""``selfsup embed``: the encoder's features of a dataset, with paths and labels."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfsup.checks import check_encode_args, check_writable
from selfsup.commands.common import (
    _atomic_output,
    _device,
    _eval_transform,
    _load,
    _normalisation,
    _on_every_process,
    _run_info,
    _sizes,
    _torchrun_device,
    add_device_and_cache_args,
)
from selfsup.errors import ConfigError
from selfsup.run import is_first_rank

if TYPE_CHECKING:  # imported where used: `selfsup --help` and argument errors stay fast
    import numpy as np
    import torch

    from selfsup.data import ImageDataset


def add_arguments(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="write embeddings (+ paths and labels) of a dataset",
        description="Write the encoder's features of every image of a dataset. "
        ".npz holds arrays embeddings [N, D] float32, paths [N], and labels [N] "
        "and classes when the data has labels; .parquet holds one row per image with columns "
        "path, label and class (when labeled) and embedding (a fixed-size list of D float32; "
        "needs pyarrow); .npy holds the embeddings only, "
        "with index, path, label and class (the class's name) in a CSV of the same name beside it.",
    )
    p.add_argument("encoder", help="run directory or encoder file")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train", help="split to embed (default: train)")
    p.add_argument(
        "--out",
        required=True,
        help="output .npz (embeddings, paths, labels), .parquet, or .npy (embeddings; paths, "
        "labels and class names in a .csv of the same name beside it)",
    )
    p.add_argument("--limit", type=int, default=None, help="only N images, evenly spaced")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    add_device_and_cache_args(p)


def embed_dataset(
    encoder_path: str | Path,
    source: str,
    split: str = "train",
    image_size: int | None = None,
    batch_size: int = 256,
    device: str | None = None,
    cache_dir: str | None = None,
    limit: int | None = None,
    encoder: torch.nn.Module | None = None,
    progress: bool = False,
):
    """(features float32 ``[N, D]`` on the CPU, the ``ImageDataset``) of ``source``/``split``.

    Images are resized to the encoder's pre-training size and normalised with its pre-training
    mean/std (from the run or export metadata; the data's own statistics for a bare file).
    ``encoder``, when given, is used instead of loading ``encoder_path`` again. Under torchrun
    (after ``_torchrun_device``), each process encodes its share and all get every row.
    """
    from selfsup.export import load_encoder

    check_encode_args(image_size, batch_size)
    # loaded before the data: a folder that is no run, or a file that is no encoder, fails fast
    model = encoder if encoder is not None else load_encoder(encoder_path)
    info = _run_info(Path(encoder_path), model)
    return _encode_source(
        model, info, source, split, image_size, batch_size, device, cache_dir, limit, progress,
        where=encoder_path,
    )  # fmt: skip


def _encode_source(
    model: torch.nn.Module,
    info: dict[str, Any],
    source: str,
    split: str,
    image_size: int | None,
    batch_size: int,
    device: str | None,
    cache_dir: str | None,
    limit: int | None,
    progress: bool = False,
    *,
    where: str | Path | None = None,
):
    """(``model``'s outputs float32 ``[N, K]`` on the CPU, the ``ImageDataset``): ``source`` /
    ``split`` decoded at the sizes of ``info`` (a run's or a classifier's metadata: storage and
    image size, eval_crop, mean/std) and prepared by the evaluation's transform, as ``eval`` does.
    The images of ``embed`` (K = the feature size) and ``predict`` (K = the classes). Under
    torchrun each process encodes its share and all get every row. ``where``: the encoder (or
    classifier) file or run directory given, which an error names."""
    from selfsup.export import check_input_size
    from selfsup.train.distributed import distributed_extract_features, main_process_first

    load_size, size = _sizes(info, image_size)
    check_input_size(model, size, where or "the encoder", info.get("image_size"))
    with main_process_first():
        ds = _load(source, split, load_size, cache_dir, limit, progress and is_first_rank())
    mean, std = _normalisation(info, ds.images)
    dev = _device(device)
    eval_t = _eval_transform(size, mean, std, dev, info)
    out = distributed_extract_features(model, ds.images, eval_t, batch_size=batch_size, device=dev)
    return out, ds


EMBED_FORMATS = (".npz", ".parquet", ".npy")
INDEX_FIELDS = ("index", "path", "label", "class")  # the header of the CSV beside an embed's .npy
EARLIER_INDEX_FIELDS = ("index", "path", "label")  # selfsup before the class column


def _text_path(path: str) -> str:
    """``path`` as valid UTF-8 text, for the CSV and parquet files (which must hold UTF-8).

    A file name that is not valid UTF-8 (Linux allows any bytes) arrives from ``os.listdir`` with
    its bad bytes as lone surrogates; those are written back-slash escaped, ``bad\\xff.png``, as
    ``write_skip_report`` does: readable, and the rest of the name exact. (.npz keeps the names
    as they are: numpy's strings hold surrogates, and ``os.fsencode`` gives the bytes back.)
    """
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a surrogate that no file name decodes to: escape it as such
        return path.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def check_index_csv(out: Path) -> None:
    """A ConfigError unless the ``.csv`` beside an ``.npy`` --out is absent or an index an earlier
    ``selfsup embed`` wrote (its header row is :data:`INDEX_FIELDS`): no one else's file is
    replaced."""
    index = out.with_suffix(".csv")
    if not index.exists() and not index.is_symlink():
        return
    header = None
    with contextlib.suppress(OSError, csv.Error):  # a folder, or unreadable: not ours either
        with open(index, newline="", encoding="utf-8", errors="replace") as fh:
            header = next(csv.reader(fh), None)
    if header not in (list(INDEX_FIELDS), list(EARLIER_INDEX_FIELDS)):
        raise ConfigError(
            f"--out {out}: the paths and labels of a .npy go to {index}, which exists and is "
            f"not an index written by `selfsup embed` (header {','.join(INDEX_FIELDS)}); pass "
            "another --out, or move that file aside"
        )


def _write_index_csv(path: Path, ds) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(INDEX_FIELDS)
        # class: the folder name of the label, as the .npz's classes and the parquet's column
        classes = [_text_path(c) for c in ds.classes] if ds.classes else None
        for i in range(len(ds)):
            label = "" if ds.labels is None else int(ds.labels[i])
            name = classes[label] if classes is not None and label != "" else ""
            writer.writerow((i, _text_path(ds.paths[i]) if ds.paths else "", label, name))


def _require_pyarrow(out: Path):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"--out {out}: writing .parquet needs pyarrow: pip install pyarrow (or "
            "pip install 'selfsup[parquet]'); or write a .npz instead"
        ) from None
    return pyarrow


def _write_parquet(path: Path, feats: np.ndarray, ds) -> None:
    """One row per image: ``path``, ``label`` and ``class`` (labeled data only), ``embedding``
    (``fixed_size_list<float32>[D]``, which pandas reads as one array per row)."""
    import numpy as np

    pa = _require_pyarrow(path)
    import pyarrow.parquet as pq

    n, dim = feats.shape
    # pa.string() is UTF-8: names that are not are escaped (_text_path), as in the .npy's CSV
    columns = {"path": pa.array([_text_path(p) for p in ds.paths or [""] * n], pa.string())}
    if ds.labels is not None:
        labels = np.asarray(ds.labels, dtype=np.int64)
        columns["label"] = pa.array(labels)
        if ds.classes:  # folder names, as undecodable as file names
            classes = [_text_path(c) for c in ds.classes]
            columns["class"] = pa.array([classes[i] for i in labels], pa.string())
    flat = pa.array(np.ascontiguousarray(feats, dtype=np.float32).reshape(-1))
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    pq.write_table(pa.table(columns), path)


def handle(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix not in EMBED_FORMATS:
        raise ConfigError(
            f"--out {out}: use a .npz (embeddings, paths, labels), .parquet (one row per image) "
            "or .npy (embeddings only) file name"
        )
    check_encode_args(args.image_size, args.batch_size)
    if out.suffix == ".parquet":
        _require_pyarrow(out)  # before any encoding
    check_writable(out.parent, "the embeddings")
    if out.suffix == ".npy":
        check_index_csv(out)
    import numpy as np

    def embed() -> tuple[torch.Tensor, ImageDataset]:
        return embed_dataset(
            args.encoder,
            args.data,
            args.split,
            args.image_size,
            args.batch_size,
            str(_torchrun_device(args.device, "embed")),
            args.cache_dir,
            args.limit,
            progress=not args.no_progress,
        )

    (feats, ds), main = _on_every_process(embed)
    if not main:  # every process holds all the rows; one writes them
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        _atomic_output(out.with_suffix(".csv"), lambda tmp: _write_index_csv(tmp, ds))
        _atomic_output(out, lambda tmp: np.save(tmp, feats.numpy()))
    elif out.suffix == ".parquet":
        _atomic_output(out, lambda tmp: _write_parquet(tmp, feats.numpy(), ds))
    else:
        arrays = {"embeddings": feats.numpy(), "paths": np.array(ds.paths or [], dtype=str)}
        if ds.labels is not None:
            arrays["labels"] = ds.labels.numpy()
            arrays["classes"] = np.array(ds.classes or [], dtype=str)
        _atomic_output(out, lambda tmp: np.savez(tmp, **arrays))
    index = f" (paths and labels: {out.with_suffix('.csv')})" if out.suffix == ".npy" else ""
    print(f"selfsup: {feats.shape[0]} embeddings of dim {feats.shape[1]} written to {out}{index}")
    return 0
