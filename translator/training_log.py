"""Training logs next to a checkpoint: what Lightning's CSV logger wrote (`metrics.csv`, `hparams.yaml`).

    log = find_training_log("checkpoints/encdec/best-step=8000.ckpt")  # metrics.csv in its directory or the parent
    log.tok_per_s, log.wall_time_s, log.curves["val/bleu"]  # [(step, value)]
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

log = logging.getLogger(__name__)

# wall-time columns, in order of preference; else the first column whose name mentions elapsed/wall/time
TIME_COLUMNS = ("train/elapsed_s", "elapsed_s", "train/wall_time_s", "wall_time_s", "time")


@dataclass
class TrainingLog:
    """What the CSV logger left next to a checkpoint. `curves[metric]` = [(step, value)] for every `val/*` column;
    `elapsed` = [(step, seconds)] when a time column exists."""

    metrics_csv: str
    hparams_yaml: str | None = None
    hparams: dict[str, Any] | None = None
    tok_per_s: float | None = None
    wall_time_s: float | None = None
    time_column: str | None = None
    last_step: int | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    elapsed: list[tuple[int, float]] = field(default_factory=list)

    def seconds_at(self, steps: list[int]) -> list[float] | None:
        """Wall time at each step, interpolated from the logged time column (None without one)."""
        if not self.elapsed:
            return None
        xs, ys = zip(*sorted(self.elapsed))
        return [float(v) for v in np.interp(steps, xs, ys)]


def find_training_log(ckpt_path: str | os.PathLike) -> TrainingLog | None:
    """The `metrics.csv` (and `hparams.yaml`) in the checkpoint's directory or its parent, read; None if absent."""
    here = Path(ckpt_path).resolve().parent
    for folder in (here, here.parent):
        if (folder / "metrics.csv").is_file():
            return read_training_log(folder / "metrics.csv")
    return None


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def read_training_log(metrics_csv: str | os.PathLike) -> TrainingLog:
    """Training throughput (median of `train/tok_per_s`: the logged values are windowed averages, the first ones
    include start-up), wall time (the largest value of the first column in `TIME_COLUMNS`), validation curves."""
    metrics_csv = Path(metrics_csv)
    with metrics_csv.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    out = TrainingLog(str(metrics_csv))
    hparams = metrics_csv.with_name("hparams.yaml")
    if hparams.is_file():
        out.hparams_yaml = str(hparams)
        try:
            loaded = yaml.safe_load(hparams.read_text(encoding="utf-8"))
            out.hparams = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError as err:
            log.warning("%s: unreadable (%s); ignored", hparams, err)
    steps = [int(s) for r in rows if (s := _number(r.get("step"))) is not None]
    out.last_step = max(steps) if steps else None
    rates = [v for r in rows if (v := _number(r.get("train/tok_per_s"))) is not None]
    out.tok_per_s = float(np.median(rates)) if rates else None
    out.time_column = next((c for c in TIME_COLUMNS if c in columns), None) or next(
        (c for c in columns if any(word in c.lower() for word in ("elapsed", "wall", "time"))), None)
    for r in rows:
        step = _number(r.get("step"))
        if step is None:
            continue
        if out.time_column and (t := _number(r.get(out.time_column))) is not None:
            out.elapsed.append((int(step), t))
        for c in columns:
            if c.startswith("val/") and (v := _number(r.get(c))) is not None:
                out.curves.setdefault(c, []).append((int(step), v))
    out.wall_time_s = max(t for _, t in out.elapsed) if out.elapsed else None
    return out

