"""Wall-clock time to kNN top-1 0.80 and 0.85 on CIFAR-10, from command start, cache build included.

Runs ``selfsup pretrain --method M --preset cifar10 --data PATH`` in a subprocess, with a kNN check
every ``--knn-every`` epochs, and reads ``metrics.jsonl``'s ``eval/knn_top1`` records and their
timestamps. A run longer than one command's time limit is done in parts: each part stops itself
(SIGTERM, which the trainer answers with a checkpoint) before ``--budget-min`` minutes from the
command's start; the next part continues it with ``--resume``. Each part's start and end go to
``<out>/tta_parts.json``; a kNN record's wall-clock is the sum of the earlier parts' durations plus
its time into its own part, so the gaps between parts are not counted and the first part's data
loading and cache build are.

    python bench/time_to_accuracy.py --method byol --data .data/cifar10-jpg.tar.gz \\
        --out runs/tta-byol --copy-to "$OUT"            # part 1
    python bench/time_to_accuracy.py --method byol --data .data/cifar10-jpg.tar.gz \\
        --out runs/tta-byol --copy-to "$OUT" --resume   # part 2, 3, ... until done
    python bench/time_to_accuracy.py --out runs/tta-byol --report-only

Prints ONE JSON object (also ``--json-out`` and ``<out>/time_to_accuracy.json``). kNN values are
fractions in [0, 1]; a run that logged percentages is converted (and says so).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PARTS_FILE = "tta_parts.json"
RESULT_FILE = "time_to_accuracy.json"
KNN_KEY = "eval/knn_top1"
DEFAULT_THRESHOLDS = (0.80, 0.85)
EXIT_STOPPED = 3  # selfsup pretrain: stopped early (time limit / signal), checkpoint saved


# --------------------------------------------------------------------------- accounting


def cumulative_seconds(t: float, parts: list[dict[str, Any]]) -> float | None:
    """Run time at wall time ``t`` (``time.time()``), gaps between parts excluded.

    ``parts``: ``[{"start": s, "end": e or None}, ...]`` in order; an unfinished part ends now.
    ``None`` if ``t`` falls in no part (a record from another run).
    """
    done = 0.0
    for part in parts:
        start = part["start"]
        end = part["end"] if part.get("end") is not None else time.time()
        if start <= t <= end + 1.0:  # a record flushed just as the part's end was taken
            return t - start + done
        done += end - start
    return None


def knn_records(
    records: list[dict[str, Any]], parts: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], str | None]:
    """``[{"wall_clock_s", "epoch", "step", "knn_top1"}, ...]`` of the kNN checks, in time order.

    Returns the list and a note when the values were percentages (then divided by 100).
    """
    evals = [r for r in records if KNN_KEY in r and "time" in r]
    note = None
    if any(float(r[KNN_KEY]) > 1.0 for r in evals):
        note = "eval/knn_top1 was logged in percent; divided by 100"
    scale = 0.01 if note else 1.0
    out = []
    for r in sorted(evals, key=lambda r: r["time"]):
        wall = cumulative_seconds(float(r["time"]), parts)
        if wall is None:
            continue
        out.append(
            {
                "wall_clock_s": round(wall, 2),
                "epoch": _as_int(r.get("eval/epoch", 0 if r.get("step", 0) == 0 else None)),
                "step": r.get("step"),
                "knn_top1": round(float(r[KNN_KEY]) * scale, 5),
            }
        )
    return out, note


def _as_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def crossings(
    curve: list[dict[str, Any]], thresholds: tuple[float, ...]
) -> dict[str, dict[str, Any] | None]:
    """First kNN check at or above each threshold (``None``: not reached yet)."""
    result: dict[str, dict[str, Any] | None] = {}
    for threshold in thresholds:
        hit = next((c for c in curve if c["knn_top1"] >= threshold), None)
        result[f"{threshold:.2f}"] = dict(hit) if hit else None
    return result


def report(run_dir: Path, thresholds: tuple[float, ...]) -> dict[str, Any]:
    """The time-to-accuracy JSON of ``run_dir`` from its parts file and metrics."""
    state = read_parts(run_dir)
    parts = state.get("parts", [])
    metrics = run_dir / "metrics.jsonl"
    records = []
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill
                continue
    curve, note = knn_records(records, parts)
    results_file = run_dir / "results.json"
    finished = results_file.exists()
    durations = [
        (p["end"] if p.get("end") is not None else time.time()) - p["start"] for p in parts
    ]
    first_record = min((r["time"] for r in records if "time" in r), default=None)
    startup = None
    if parts and first_record is not None:
        startup = round(first_record - parts[0]["start"], 2)
    out: dict[str, Any] = {
        "benchmark": "time_to_accuracy",
        "method": state.get("method"),
        "data": state.get("data"),
        "run_dir": str(run_dir),
        "thresholds": crossings(curve, thresholds),
        "run_time_s": round(sum(durations), 2),
        "parts": [{**p, "duration_s": round(d, 2)} for p, d in zip(parts, durations, strict=True)],
        "first_part_startup_s": startup,
        "finished_all_epochs": finished,
        "knn_every": state.get("knn_every"),
        "knn_curve": curve,
        "clock": "wall-clock from the first part's command start (imports, cache build and "
        "random-init kNN included), gaps between parts excluded",
    }
    if note:
        out["note"] = note
    if state.get("environment"):
        out["environment"] = state["environment"]
    return out


def read_parts(run_dir: Path) -> dict[str, Any]:
    path = run_dir / PARTS_FILE
    return json.loads(path.read_text()) if path.exists() else {"parts": []}


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- one part


def pretrain_command(args: argparse.Namespace, run_dir: Path, time_limit_min: float) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "selfsup",
        "pretrain",
        "--method",
        args.method,
        "--preset",
        "cifar10",
        "--data",
        args.data,
        "--out",
        str(run_dir),
        "--no-progress",
        f"train.knn_every={args.knn_every}",
        # checkpoints each kNN check (a stop writes one anyway): not every 2-s epoch
        f"train.checkpoint_every={args.knn_every}",
        f"train.time_limit_min={time_limit_min:.2f}",
    ]
    if args.epochs:
        cmd.append(f"train.epochs={args.epochs}")
    if args.cache_dir:
        cmd.append(f"data.cache_dir={args.cache_dir}")
    cmd += args.set
    cmd.append("--resume" if args.resume else "--overwrite")
    return cmd


def reached_all(run_dir: Path, parts: list[dict[str, Any]], thresholds: tuple[float, ...]) -> bool:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return False
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    curve, _ = knn_records(records, parts)
    return all(v is not None for v in crossings(curve, thresholds).values())


def run_part(args: argparse.Namespace, command_start: float) -> dict[str, Any]:
    """One part: start (or resume) the run, stop it before the budget, record the part."""
    run_dir = Path(args.out)
    thresholds = tuple(args.thresholds)
    if args.resume:
        state = read_parts(run_dir)
        if not state.get("parts") or not (run_dir / "checkpoints").exists():
            raise SystemExit(
                f"--resume: {run_dir} has no earlier part ({PARTS_FILE} and checkpoints/); "
                "start without --resume (on the device, the machine may have been given back "
                "between the parts: then the run must start again)"
            )
        if state.get("method") != args.method:
            raise SystemExit(f"--resume: {run_dir} is a {state.get('method')} run")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        state = {"method": args.method, "data": args.data, "knn_every": args.knn_every, "parts": []}
    part = {"start": command_start, "end": None, "resumed": bool(args.resume)}
    state["parts"].append(part)
    write_json(run_dir / PARTS_FILE, state)

    deadline = command_start + 60.0 * args.budget_min
    # Backstop in the trainer itself (its clock starts after data loading, so it is later).
    limit_min = max(0.1, (deadline - time.time()) / 60.0)
    cmd = pretrain_command(args, run_dir, limit_min)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    print(f"time_to_accuracy: {shlex.join(cmd)}", file=sys.stderr)
    # the child's stdout (progress lines) goes to stderr: stdout carries only the JSON
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr)
    stop_reason = None
    killed = False
    term_sent_at = None
    try:
        while proc.poll() is None:
            time.sleep(args.poll_s)
            now = time.time()
            if term_sent_at is None:
                if now >= deadline:
                    stop_reason = f"part budget of {args.budget_min} min"
                elif args.stop_when_reached and reached_all(run_dir, state["parts"], thresholds):
                    stop_reason = "all thresholds reached"
                if stop_reason:
                    proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits
                    term_sent_at = now
            elif now - term_sent_at > args.grace_s:
                proc.kill()  # no checkpoint for this part's last epochs
                killed = True
                break
    except KeyboardInterrupt:  # the child got the SIGINT too and checkpoints: record the part
        stop_reason = "interrupted"
    code = proc.wait()
    part.update(end=time.time(), exit_code=code, stop_reason=stop_reason, killed=killed)
    if not state.get("environment"):
        state["environment"] = environment()
    write_json(run_dir / PARTS_FILE, state)
    if code not in (0, EXIT_STOPPED) and not (stop_reason and code in (-15, -9, 130, 143)):
        print(f"time_to_accuracy: pretrain exited with {code}", file=sys.stderr)
    return part


def environment() -> dict[str, Any]:
    """Device and versions, read in a child so this process stays light while training."""
    code = (
        "import json, platform, torch; d = torch.cuda.is_available(); print(json.dumps({"
        "'device_name': torch.cuda.get_device_name() if d else platform.machine(), "
        "'torch': torch.__version__, 'python': platform.python_version()}))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"error": str(exc)}


# --------------------------------------------------------------------------- driver


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", choices=("byol", "simclr", "moco", "simsiam"), default="byol")
    p.add_argument(
        "--data",
        default="/work/shared/data/cifar10-jpg.tar.gz",
        help="ImageFolder or .tar.gz of CIFAR-10 with train/ and test/ splits",
    )
    p.add_argument("--out", default=None, help="run directory (default runs/tta-<method>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (next part)")
    p.add_argument("--report-only", action="store_true", help="only report --out, train nothing")
    p.add_argument(
        "--budget-min",
        type=float,
        default=9.0,
        help="stop this part this many minutes after the command started",
    )
    p.add_argument(
        "--grace-s",
        type=float,
        default=40.0,
        help="after SIGTERM, wait this long for the checkpoint before killing",
    )
    p.add_argument("--knn-every", type=int, default=5, help="epochs between kNN checks")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs (default: preset's)")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS))
    p.add_argument(
        "--stop-when-reached",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop the run once every threshold is reached",
    )
    p.add_argument("--cache-dir", default=None, help="data.cache_dir")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting for selfsup pretrain (repeatable)",
    )
    p.add_argument("--poll-s", type=float, default=2.0, help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None, help="also write the JSON object here")
    p.add_argument(
        "--copy-to", default=None, help="copy the small result files here (the device's $OUT)"
    )
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    command_start = time.time()
    args = build_parser().parse_args(argv)
    args.out = args.out or f"runs/tta-{args.method}"
    run_dir = Path(args.out)
    if not args.report_only:
        run_part(args, command_start)
    result = report(run_dir, tuple(args.thresholds))
    result["command"] = shlex.join(
        [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)]
    )
    text = json.dumps(result, indent=2)
    print(text)
    if run_dir.exists():
        write_json(run_dir / RESULT_FILE, result)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text + "\n")
    if args.copy_to:
        dest = Path(args.copy_to)
        dest.mkdir(parents=True, exist_ok=True)
        for name in (RESULT_FILE, PARTS_FILE, "metrics.jsonl", "results.json", "config.yaml"):
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, dest / f"{result.get('method')}-{name}")
    return result


if __name__ == "__main__":
    main()
