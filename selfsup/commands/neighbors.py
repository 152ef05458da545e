"""``selfsup neighbors``: the most similar images of a dataset to query images."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfsup.checks import check_encode_args, check_writable, read_text_file
from selfsup.commands.common import (
    _device,
    _eval_transform,
    _normalisation,
    _run_info,
    _sizes,
    add_device_and_cache_args,
)
from selfsup.commands.embed import embed_dataset
from selfsup.errors import ConfigError, DataError
from selfsup.run import is_first_rank

if TYPE_CHECKING:  # imported where used: `selfsup --help` and argument errors stay fast
    import torch

    from selfsup.data import ImageDataset


def add_arguments(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="the most similar images of a dataset to query images",
        description="Embed --data with the encoder and print, for each query image, the -k "
        "images of the dataset with the highest cosine similarity.",
    )
    p.add_argument("encoder")
    p.add_argument("--data", required=True, help="the images to search")
    p.add_argument("--split", default="train", help="split to search (default: train)")
    p.add_argument(
        "--query",
        required=True,
        nargs="+",
        help="query image files, or one .txt file listing image paths (one a line; '#' lines "
        "are comments; relative paths may be relative to the list's folder)",
    )
    p.add_argument("-k", type=int, default=5, help="neighbours per query (default: 5)")
    p.add_argument("--limit", type=int, default=None, help="search only N images, evenly spaced")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256, help="images encoded at once")
    add_device_and_cache_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument(
        "--grid",
        default=None,
        help="also write an image grid (.png or .jpg): one row per query, the query first, "
        "then its neighbours, best first",
    )


GRID_SUFFIXES = (".png", ".jpg", ".jpeg")


def _check_grid(grid: Path) -> None:
    """Refuse a --grid that cannot be written, before any decoding or encoding."""
    if grid.suffix.lower() not in GRID_SUFFIXES:
        raise ConfigError(f"--grid {grid}: give a .png or .jpg file name")
    if grid.is_dir():
        raise ConfigError(f"--grid {grid} is a folder; give a file name such as {grid / 'nn.png'}")
    check_writable(grid.parent, "the neighbour grid")


def _read_query_list(listing: Path) -> list[str]:
    """The image paths a .txt query list names, one a line ("# comment" and blank lines
    skipped); a relative path not found from here is read from the list's own folder."""
    if not listing.is_file():
        raise DataError(f"query list {listing} does not exist")
    lines = [q.strip() for q in read_text_file(listing, "query list", DataError).splitlines()]
    queries = [q for q in lines if q and not q.startswith("#")]
    queries = [
        str(listing.parent / q)
        if not Path(q).is_absolute() and not Path(q).exists() and (listing.parent / q).exists()
        else q
        for q in queries
    ]
    if not queries:
        raise DataError(f"query list {listing} names no images; write one path a line")
    return queries


def _decode_queries(queries: list[str], listing: Path | None, load_size: int) -> list[torch.Tensor]:
    """Each query as uint8 ``[3, H, W]`` at the encoder's load size; a missing, folder or
    undecodable query fails here, before the dataset is encoded."""
    import numpy as np
    import torch

    from selfsup.data.decode import decode_image, resize_shorter

    arrays = []
    for q in queries:
        path = Path(q)
        if path.is_dir():
            raise DataError(
                f"query {q} is a folder; pass image files (a shell glob: {q}/*.jpg) or one .txt "
                "file listing image paths"
            )
        if not path.is_file():
            named = f" (a line of the query list {listing})" if listing else ""
            raise DataError(f"query image {q} does not exist{named}")
        img = resize_shorter(decode_image(path.read_bytes(), name=q), load_size)
        arrays.append(torch.from_numpy(np.array(img)).permute(2, 0, 1))  # a writable copy
    return arrays


def _hits(scores: list[float], indices: list[int], ds: ImageDataset) -> list[dict[str, Any]]:
    """One query's neighbours, best first: path (or index), similarity, class name if labeled."""
    hits = []
    for score, idx in zip(scores, indices, strict=True):
        label = None
        if ds.labels is not None:
            value = int(ds.labels[idx])
            label = ds.classes[value] if ds.classes else str(value)
        hits.append(
            {
                "path": ds.paths[idx] if ds.paths else str(idx),
                "similarity": round(score, 4),
                "label": label,
            }
        )
    return hits


def nearest_neighbors(
    encoder_path: str | Path,
    source: str,
    queries: list[str],
    k: int = 5,
    image_size: int | None = None,
    device: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
    limit: int | None = None,
    batch_size: int = 256,
    grid: str | Path | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The ``k`` images of ``source`` most cosine-similar to each query image.

    Returns one ``{"query": path, "neighbors": [{"path", "similarity", "label"}, ...]}`` per
    query, neighbors best first. ``grid``: also write those images as one picture (see
    :func:`write_neighbor_grid`).
    """
    import torch

    from selfsup.evaluate.features import extract_features
    from selfsup.export import load_encoder

    if k < 1:
        raise ConfigError(f"-k must be >= 1, got {k}")
    check_encode_args(image_size, batch_size)
    if grid is not None:
        grid = Path(grid)
        _check_grid(grid)
    listing = None
    if len(queries) == 1 and queries[0].endswith(".txt"):
        listing = Path(queries[0])
        queries = _read_query_list(listing)
    encoder = load_encoder(encoder_path)
    info = _run_info(Path(encoder_path), encoder)
    load_size, size = _sizes(info, image_size)
    arrays = _decode_queries(queries, listing, load_size)
    feats, ds = embed_dataset(
        encoder_path, source, split, image_size, batch_size, device, cache_dir, limit,
        encoder=encoder, progress=progress,
    )  # fmt: skip
    mean, std = _normalisation(info, ds.images)
    dev = _device(device)
    eval_t = _eval_transform(size, mean, std, dev, info)
    qf = extract_features(encoder, torch.stack(arrays), eval_t, batch_size=batch_size, device=dev)
    sims = torch.nn.functional.normalize(qf, dim=1) @ torch.nn.functional.normalize(feats, dim=1).T
    if k > feats.shape[0] and is_first_rank():
        print(
            f"selfsup: note: -k {k} is more than the {feats.shape[0]} images of {source}; "
            f"listing all {feats.shape[0]}",
            file=sys.stderr,
        )
    top = sims.topk(min(k, feats.shape[0]), dim=1)
    out = [
        {"query": q, "neighbors": _hits(top.values[qi].tolist(), top.indices[qi].tolist(), ds)}
        for qi, q in enumerate(queries)
    ]
    if grid is not None and is_first_rank():
        rows = [
            [arrays[qi], *(ds.images[i] for i in top.indices[qi].tolist())]
            for qi in range(len(queries))
        ]
        write_neighbor_grid(grid, rows)
    return out


def write_neighbor_grid(path: Path, rows: list[list[torch.Tensor]]) -> None:
    """One picture of uint8 ``[3, H, W]`` images, one row per list (the query, then its
    neighbours), each centre-cropped to a square and resized to ``GRID_TILE`` px, written
    atomically."""
    from selfsup.augment.preview import image_grid, write_png

    write_png(path, image_grid(rows))


def handle(args: argparse.Namespace) -> int:
    out = nearest_neighbors(
        args.encoder,
        args.data,
        args.query,
        args.k,
        args.image_size,
        args.device,
        args.cache_dir,
        args.split,
        args.limit,
        args.batch_size,
        args.grid,
        progress=not args.no_progress,
    )
    if args.grid and is_first_rank():
        print(f"selfsup: neighbour grid written to {args.grid}", file=sys.stderr)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for item in out:
            print(item["query"])
            for h in item["neighbors"]:
                label = f"  [{h['label']}]" if h["label"] is not None else ""
                print(f"  {h['similarity']:.4f}  {h['path']}{label}")
    return 0
