"""Training logs next to a checkpoint: what Lightning's CSV logger wrote (`metrics.csv`, `hparams.yaml`).

    log = find_training_log("checkpoints/encdec/best-step=8000.ckpt")  # metrics.csv in its directory or the parent
    log.tok_per_s, log.wall_time_s, log.curves["val/bleu"]  # [(step, value)]
    seed_band([log0, log1, log2], "val/bleu")  # one arm's seeds: (step, mean, min, max) per logged step
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



def seed_band(logs: list[TrainingLog], metric: str, against: str = "step"
              ) -> tuple[list[float], list[float], list[float], list[float]] | None:
    """`metric`'s curve over the runs of one arm (its seeds): (x, mean, min, max) at every step that some run logged.

    A run that stopped earlier (early stopping) leaves the later steps to the others. x is the step, or with
    against="time" the mean over the runs of their wall time (s) at that step (runs without a time column left out).
    None when no run logged `metric`.
    """
    at_step: dict[int, list[tuple[float, float]]] = {}  # step -> [(x, value)], one per run
    for lg in logs:
        points = lg.curves.get(metric)
        if not points or (against == "time" and not lg.elapsed):
            continue
        steps = [s for s, _ in points]
        xs = lg.seconds_at(steps) if against == "time" else steps
        for (step, value), x in zip(points, xs):
            at_step.setdefault(step, []).append((x, value))
    if not at_step:
        return None
    steps = sorted(at_step)
    xs = [float(np.mean([x for x, _ in at_step[s]])) for s in steps]
    values = [[v for _, v in at_step[s]] for s in steps]
    return xs, [float(np.mean(v)) for v in values], [min(v) for v in values], [max(v) for v in values]
