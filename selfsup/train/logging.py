"""Metrics to ``metrics.jsonl`` (one JSON object per line, flushed) and to TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from selfsup.data.cache import atomic_write_text


class MetricsLogger:
    """Append-only metrics: every record is flushed, so a killed run keeps what it logged."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
        step_offset: int = 0,
    ) -> None:
        """``resume_step``: the (logged) step a resumed run continues after. Records of later
        steps (of the stopped run, which the resumed one replays) are dropped from both logs, so
        that no step appears twice.

        ``step_offset`` is added to every step logged: a resume that changed the batch size or
        the data renumbers its schedule's steps, while the logs go on counting the optimizer
        steps taken, so that they keep the history before the change and increase.
        """
        self.enabled = enabled
        self.step_offset = step_offset
        path = run_dir / "metrics.jsonl"
        if enabled and resume_step is not None and path.exists():
            kept = [r for r in read_metrics(path) if int(r.get("step", 0)) <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._fh = open(path, "a") if enabled else None  # noqa: SIM115
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except (
                ImportError
            ):  # tensorboard is a dependency, but a broken install must not stop training
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge)

    def log(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        step += self.step_offset
        record = {
            "time": round(time.time(), 3),
            "step": step,
            **{f"{prefix}/{k}": _json_number(v) for k, v in values.items()},
        }
        assert self._fh is not None
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and math.isfinite(float(value)):
                    self._tb.add_scalar(f"{prefix}/{key}", float(value), step)
            self._tb.flush()

    def log_text(self, tag: str, text: str, step: int = 0) -> None:
        """Text for TensorBoard's Text tab (the run's config): markdown, shown as a code block."""
        if self._tb is not None:
            self._tb.add_text(tag, "    " + text.replace("\n", "\n    "), step + self.step_offset)
            self._tb.flush()

    def log_image(self, tag: str, picture: Any, step: int = 0) -> None:
        """A uint8 ``[3, H, W]`` picture for TensorBoard's Images tab."""
        if self._tb is not None:
            self._tb.add_image(tag, picture, step, dataformats="CHW")
            self._tb.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def environment(device: Any) -> dict[str, str]:
    """What produced a result file's numbers (its speeds, its last digits): Python, torch,
    torchvision and selfsup versions and the device's name (``"cpu"``, or the GPU's, e.g.
    ``"NVIDIA H100 80GB HBM3"``), for results.json and eval JSONs."""
    import platform

    import torch
    import torchvision

    import selfsup

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "selfsup": selfsup.__version__,
        "device": name,
    }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``; a last line torn by a kill is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _json_number(value: Any) -> Any:
    """A float for numbers, ``None`` (JSON null) for NaN/Inf: strict JSON readers (jq, JavaScript,
    DuckDB) refuse the bare ``NaN`` that Python's json writes."""
    if isinstance(value, float | int) and not isinstance(value, bool):
        return float(value) if math.isfinite(float(value)) else None
    return value


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN/Inf float, at any depth, as ``None`` (JSON null); integers and
    everything else unchanged. For ``results.json`` and printed results (see
    :func:`_json_number`)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: strict_json(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(value) for value in obj]
    return obj
