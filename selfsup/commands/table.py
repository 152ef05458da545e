"""``selfsup table``: the results CSV that ``eval`` appends to, as a runs x protocols table."""

from __future__ import annotations

import argparse
import contextlib
import csv
from pathlib import Path
from typing import Any

from selfsup.commands.common import _atomic_output
from selfsup.errors import DataError

RESULT_FIELDS = (
    "time",
    "run",
    "method",
    "pretrain_data",
    "epochs",
    "eval_data",
    "protocol",
    "encoder",
    "metric",
    "value",
    "config_hash",
    "weights",  # sha256 prefix of the encoder file: a retrained run is another row
    "limit",
    "image_size",
)
TABLE_FIELDS = RESULT_FIELDS[:-3]  # what a results CSV of an earlier selfsup holds
CSV_METRICS = ("top1", "top5", "seconds")  # the numbers of a result that get a CSV line


def _csv_header(csv_path: Path, fix: str, *, new_file_ok: bool = False) -> list[str] | None:
    """The header of an existing CSV file; a folder, or a file that is not text (a binary file,
    a spreadsheet), is a DataError that says ``fix``, not a traceback. A folder's
    ``results.csv`` is named as the file to pass when it exists (or ``new_file_ok``)."""
    if csv_path.is_dir():
        inside = csv_path / "results.csv"
        fix = f"pass the file, e.g. {inside}" if new_file_ok or inside.is_file() else fix
        raise DataError(f"{csv_path} is a folder, not a results CSV; {fix}")
    try:
        with open(csv_path, newline="") as fh:
            return csv.DictReader(fh).fieldnames
    except UnicodeDecodeError:
        raise DataError(
            f"{csv_path} is not a results CSV written by `selfsup eval` (it is not text: "
            f"a binary file or a spreadsheet?); {fix}"
        ) from None


def check_results_csv(csv_path: Path) -> None:
    """A DataError unless ``csv_path`` is absent or a results CSV of selfsup (this or the earlier
    format): results are appended to no one else's CSV."""
    if not csv_path.exists():
        return
    fix = "pass another --results-csv, or move it aside"
    header = _csv_header(csv_path, fix, new_file_ok=True) or []
    if header not in (list(RESULT_FIELDS), list(TABLE_FIELDS)):
        raise DataError(
            f"{csv_path} is not a results CSV written by `selfsup eval` (its header is "
            f"{','.join(header) or 'empty'}); pass another --results-csv, or move it aside"
        )


def append_results(csv_path: Path, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` (keys ``RESULT_FIELDS``) to ``csv_path``, writing the header if new (a CSV
    with fewer columns, from an earlier selfsup, is first rewritten with the new ones empty)."""
    new = not csv_path.exists()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    if not new:
        check_results_csv(csv_path)
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            old_rows = list(reader) if reader.fieldnames == list(TABLE_FIELDS) else None
        if old_rows is not None:  # the format of an earlier selfsup: add the new columns

            def migrate(tmp: Path) -> None:
                with open(tmp, "w", newline="") as fh:
                    writer = csv.DictWriter(fh, fieldnames=RESULT_FIELDS, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(old_rows)

            _atomic_output(csv_path, migrate)
    with open(csv_path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def add_arguments(sub, name: str) -> None:
    p = sub.add_parser(name, help="a markdown table of a results CSV (runs x protocols)")
    p.add_argument("csv", nargs="?", default="runs/results.csv")
    p.add_argument("--metric", default="top1", choices=CSV_METRICS)


def results_table(csv_path: Path, metric: str = "top1") -> str:
    """Markdown table of a results CSV: one row per (run, encoder, eval data), one column per
    protocol; the newest line of each cell wins."""
    if not csv_path.exists():
        raise DataError(f"{csv_path} does not exist; run `selfsup eval` first (or pass the CSV)")
    _csv_header(csv_path, "pass the results CSV that `selfsup eval` wrote (runs/results.csv)")
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not set(TABLE_FIELDS) <= set(reader.fieldnames):
            raise DataError(
                f"{csv_path} is not a results CSV written by `selfsup eval` (its "
                f"header must hold {', '.join(TABLE_FIELDS)})"
            )
        try:
            rows = [r for r in reader if r["metric"] == metric]
        except (UnicodeDecodeError, csv.Error):  # a good header, then bytes that are no text
            raise DataError(
                f"{csv_path} is damaged after line {reader.line_num} (not text): restore it "
                "from a copy, or delete the damaged lines"
            ) from None
    # one table row per evaluated thing: the run's weights (a retrained run is a new row), the
    # encoder (ssl / baselines), the eval data and how much of it (--limit) at which size
    latest: dict[tuple, dict] = {}
    for r in rows:  # the newest line of each (row, protocol) wins
        key = (r["run"], r.get("weights", ""), r["encoder"], r["eval_data"], r.get("limit", ""))
        latest[(*key, r.get("image_size", ""), r["protocol"])] = r
    protocols = sorted({k[-1] for k in latest}, key=_protocol_order)
    first: dict[tuple, dict] = {}
    for key, row in latest.items():
        first.setdefault(key[:-1], row)
    lines = [
        "| run | method | epochs | weights | encoder | eval data | " + " | ".join(protocols) + " |",
        "| " + " | ".join(["---"] * (6 + len(protocols))) + " |",
    ]
    for group in sorted(first, key=lambda g: (g[0], first[g]["time"], g[2:])):
        row = first[group]
        run, weights, enc, data, limit, size = group
        cells = [
            f"{float(latest[(*group, p)]['value']):.4f}" if (*group, p) in latest else ""
            for p in protocols
        ]
        where = data + (f" (limit {limit})" if limit else "") + (f", {size} px" if size else "")
        lines.append(
            f"| {_shown_run(run)} | {row['method']} | {row['epochs']} | {weights[:8]} | {enc} | "
            f"{where} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def _shown_run(run: str) -> str:
    """A run's recorded (absolute) path, relative to this directory when it lies below it."""
    path, sep, rest = run.partition(" (")  # "<run> (export/encoder.safetensors)"
    with contextlib.suppress(ValueError):
        path = str(Path(path).relative_to(Path.cwd()))
    return path + sep + rest


def _protocol_order(protocol: str) -> tuple:
    """knn, linear_fast, linear_full, then fine-tuning by label fraction (1% before 10%)."""
    import re

    match = re.fullmatch(r"finetune_([\d.]+)pct", protocol)
    return (1, float(match.group(1)), "") if match else (0, 0.0, protocol)


def handle(args: argparse.Namespace) -> int:
    print(results_table(Path(args.csv), args.metric))
    return 0
