"""The tiny ``selfsup pretrain`` that the end-to-end tests share: ``resnet_tiny`` on 16 px crops of
1,024 quickstart digits (spread over the set), batch 64, kNN only at the random init and the end."""

from selfsup.cli import main

TINY = [
    "model.backbone=resnet_tiny",
    "data.image_size=16",
    "data.storage_size=16",
    "data.limit=1024",
    "train.batch_size=64",
    "train.knn_every=0",
    "train.log_every=4",
    "train.collapse=off",
    "train.progress=false",
    "optim.lr=0.1",
    "augment.both.crop_scale=[0.5,1.0]",  # 16 px digits: keep most of the digit
]


def run(tmp_path, method, *extra, out="run"):
    """``selfsup pretrain`` in-process into ``tmp_path / out``; ``extra`` settings win."""
    argv = [
        "pretrain",
        "--method",
        method,
        "--out",
        str(tmp_path / out),
        *TINY,
        f"data.cache_dir={tmp_path / 'cache'}",
        *extra,
    ]
    return main(argv)
