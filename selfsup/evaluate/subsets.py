"""Class-balanced labelled subsets for the semi-supervised protocol.

SimCLR Sec. 6 / BYOL Sec. 4.2 fine-tune on 1% and 10% of the ImageNet labels, sampled in a
class-balanced way (about 13 and 128 images per class). ``balanced_subset`` draws the same number
of images from every class with a seeded generator, and ``save_subset`` writes the chosen file
list next to the result so that the exact subset can be inspected and reused.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from selfsup.data.cache import atomic_write
from selfsup.errors import ConfigError, DataError

SUBSET_HEADER = ("index", "path", "label")


def balanced_subset(labels: Tensor, fraction_percent: float, seed: int = 0) -> Tensor:
    """Indices of a class-balanced random subset holding ``fraction_percent`` % of the labels.

    Every class contributes ``max(1, round(fraction_percent / 100 * N / C))`` images (``C`` =
    number of classes present), or all of its images if it has fewer. Within a class the images
    are drawn uniformly without replacement by a ``torch.Generator`` seeded with ``seed``, so the
    same (labels, fraction, seed) always gives the same subset. ``fraction_percent=100`` returns
    every index.

    Args:
        labels: int64 ``[N]`` class labels.
        fraction_percent: in ``(0, 100]``; 1 and 10 are the papers' settings.
        seed: seeds the draw.

    Returns:
        int64 ``[M]`` indices into ``labels``, sorted ascending.
    """
    if labels is None or labels.numel() == 0:
        raise DataError("a labelled subset needs a dataset with labels; this one has none.")
    if not 0 < fraction_percent <= 100:
        raise ConfigError(
            f"label fraction must be in (0, 100] percent (e.g. 1 or 10), got {fraction_percent}; "
            "fix the eval label-fraction setting."
        )
    labels = labels.detach().cpu().long().flatten()
    if fraction_percent == 100:
        return torch.arange(labels.numel())
    classes = torch.unique(labels)  # sorted, so class order (and thus the draw) is deterministic
    per_class = max(1, round(fraction_percent / 100 * labels.numel() / classes.numel()))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in classes:
        members = (labels == cls).nonzero().flatten()
        take = min(per_class, members.numel())
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:take]])
    return torch.cat(chosen).sort().values


def save_subset(
    indices: Tensor,
    paths: Sequence[str] | None,
    labels: Tensor | Sequence[int],
    path: str | Path,
) -> Path:
    """Write the subset as CSV ``index,path,label`` (one row per chosen image).

    ``paths`` and ``labels`` may be given for the whole dataset (length ``N``, looked up at
    ``indices``) or already restricted to the subset (length ``M``, aligned with ``indices``).
    When ``N == M`` both readings agree, since ``indices`` is then every index in order.

    Args:
        indices: int64 ``[M]`` indices into the dataset.
        paths: per-image paths (``ImageDataset.paths``), ``[N]`` or ``[M]``; ``None`` writes
            empty paths.
        labels: labels ``[N]`` or ``[M]``.
        path: CSV file to write (atomically); parent folders are created.

    Returns:
        the written path.
    """
    index_list = indices.tolist()

    def pick(values: Sequence, name: str) -> list:
        if len(values) == len(index_list):
            return list(values)
        if index_list and max(index_list) >= len(values):
            raise DataError(
                f"save_subset: {name} has {len(values)} entries; give one per dataset image or "
                f"one per chosen index ({len(index_list)})."
            )
        return [values[i] for i in index_list]

    label_list = pick(labels.tolist() if isinstance(labels, Tensor) else list(labels), "labels")
    path_list = pick(list(paths), "paths") if paths is not None else [""] * len(index_list)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(SUBSET_HEADER)
            writer.writerows(zip(index_list, path_list, label_list, strict=True))

    # Atomic: a run stopped mid-write leaves the previous subset file whole, never a torn one
    # that a later `--subset` would read as fewer labels.
    atomic_write(out, write)
    return out


def load_subset(path: str | Path) -> tuple[Tensor, list[str], Tensor]:
    """Read a CSV written by :func:`save_subset`.

    Returns:
        ``(indices int64 [M], paths list[str], labels int64 [M])``.
    """
    source = Path(path)
    if not source.is_file():
        raise DataError(f"subset file {source} does not exist; pass a CSV written by save_subset.")
    with source.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(header) != SUBSET_HEADER:
            raise DataError(
                f"subset file {source} must start with the header {','.join(SUBSET_HEADER)}; "
                f"found {header}."
            )
        rows = list(reader)
    try:
        indices = torch.tensor([int(row[0]) for row in rows], dtype=torch.long)
        labels = torch.tensor([int(row[2]) for row in rows], dtype=torch.long)
    except (ValueError, IndexError) as err:
        raise DataError(f"subset file {source} has a malformed row ({err}); rewrite it.") from err
    return indices, [row[1] for row in rows], labels
