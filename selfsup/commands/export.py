"""``selfsup export``: a run's encoder as torchvision weights, safetensors, TorchScript or ONNX."""

from __future__ import annotations

import argparse

# selfsup.export.EXPORT_FORMATS, spelled out so that building the parser imports no torch
# (tests/test_cli_startup.py checks that the two agree)
EXPORT_FORMATS = ("torchvision", "safetensors", "torchscript", "onnx")


def add_arguments(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="export the encoder of a run",
        description="torchvision: the torchvision model's state_dict, with a fresh "
        "classifier (fc, classifier or head); "
        "safetensors: the encoder state_dict with its metadata; torchscript: a "
        "traced module that loads without selfsup; onnx: an ONNX graph for ONNX Runtime and "
        "other runtimes, any batch size (pip install 'selfsup[onnx]').",
    )
    p.add_argument(
        "run",
        help="run directory or encoder file, or a classifier of eval --save-classifiers "
        "(--format onnx exports it whole: images -> logits)",
    )
    p.add_argument(
        "--format", choices=EXPORT_FORMATS, default="torchvision", help="default: torchvision"
    )
    p.add_argument("--out", default=None, help="output folder (default <run>/export)")
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="example input size for TorchScript or ONNX, >= 8 (default: the pre-training "
        "size, which the export's metadata records either way)",
    )


def handle(args: argparse.Namespace) -> int:
    from pathlib import Path

    from selfsup.export import export_encoder, is_saved_classifier

    path = export_encoder(args.run, args.format, args.out, image_size=args.image_size)
    whole = args.format == "onnx" and is_saved_classifier(Path(args.run))
    print(f"selfsup: exported {args.format} {'classifier' if whole else 'encoder'} to {path}")
    return 0
