"""Callbacks and the logger that show what a run does: the training log, its throughput and time, its progress bar.

* ``ResumableCSVLogger`` (the configs' logger) and ``ContinueLog`` keep ``metrics.csv`` one curve across a resume:
  Lightning's CSVLogger deletes the file when its directory is reused and writes rows only every 100 steps.
* ``TrainingClock`` logs ``train/tok_per_s`` and ``train/elapsed_s``; the time is Lightning's ``Timer``'s, which the
  checkpoint keeps across resumes.
* ``TimeBoundProgressBar`` (put in place of Lightning's bar by ``translator fit`` when ``max_time`` is set) shows
  the end that the time limit sets rather than ``max_steps``'.

``ContinueLog`` and ``TrainingClock`` go in ``trainer.callbacks`` of every config, beside those of
``translator.callbacks``.
"""

from __future__ import annotations

import csv
import logging
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, Timer, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor

from translator.tokenizer import PAD_ID

log = logging.getLogger(__name__)


# ---- the training log -----------------------------------------------------------------------------------------
class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the deletion of an existing ``metrics.csv`` when it starts; new rows are appended
    under the file's header (extended, and the file rewritten, when a new column comes)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.metrics_keys = self._read()[0]

    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here; ContinueLog decides instead
        pass

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        if not self._fs.isfile(self.metrics_file_path):
            return [], []
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows

    def keep_rows_before(self, step: int) -> int:
        """Drop the rows of ``metrics.csv`` logged at ``step`` or later; return how many rows are kept."""
        self.save()
        keys, rows = self._read()
        if not keys:
            return 0
        rows = [row for row in rows if int(row["step"]) < step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        return len(rows)


class ResumableCSVLogger(CSVLogger):
    """Lightning's ``CSVLogger`` whose ``metrics.csv`` survives a crash and a resume as one curve.

    Lightning's deletes ``metrics.csv`` whenever its directory already holds logs (the configs reuse one directory per
    run: ``version: ""``), so a resumed run kept only the steps after the resume; and it writes the rows every 100
    steps, so a crash lost up to 100 of them. This one writes every row as it is logged (``flush_logs_every_n_steps``
    1; a row is logged every ``log_every_n_steps``) and keeps the file; ``ContinueLog`` then drops the rows at or after
    the step training starts from: those a crashed run logged after its last checkpoint, which the resumed run logs
    again, or the whole file for a run from scratch.
    """

    def __init__(self, save_dir: str, name: str | None = "lightning_logs", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 1) -> None:
        super().__init__(save_dir, name, version, prefix, flush_logs_every_n_steps)

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def keep_rows_before(self, step: int) -> None:
        kept = self.experiment.keep_rows_before(step)
        if kept:
            log.info("%s: continued from step %d (%d earlier rows kept)", self.experiment.metrics_file_path, step, kept)


class ContinueLog(L.Callback):
    """When training starts, cut every ``ResumableCSVLogger``'s ``metrics.csv`` back to the rows logged before the
    step it starts from: the checkpoint's ``global_step`` when resuming (every row logged up to the checkpoint is
    kept, and the resumed run appends the rest), 0 from scratch (the file starts empty, as with Lightning's logger).

    Rows carry Lightning's ``step``: training step i (0-based) logs at i, a validation after it at i too, so a
    checkpoint after g steps holds exactly the rows before g (a validation due after step g - 1 is not run again after
    the resume, and its row, when the crashed run logged it, is kept).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger):
                logger.keep_rows_before(trainer.global_step)


# ---- the progress bar ------------------------------------------------------------------------------------------------
class TimeBoundProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar for a run that ``max_time`` may end first: the training bar's total (and so its ETA) is the
    steps done plus those the time left allows at the rate measured since training started (validation included),
    capped by ``max_steps``; without ``max_time``, Lightning's bar as is. The quickstart (``max_steps`` 100000,
    ``max_time`` 14 min) showed n/100000 and a 16-hour ETA."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = (time.monotonic(), trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._cap = self.train_progress_bar.total  # Lightning's: max_steps - global_step (None: no limit)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        t0, steps = self._start[0], trainer.global_step - self._start[1]
        if remaining is not None and steps > 0:
            total = batch_idx + 1 + round(max(remaining, 0.0) * steps / (time.monotonic() - t0))
            self.train_progress_bar.total = total if self._cap is None else min(total, self._cap)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @classmethod
    def replace_default(cls, trainer: L.Trainer) -> None:
        """Put this bar in place of Lightning's default one (TQDM, or Rich where installed) when ``max_time`` is set;
        a bar of another class in the configured callbacks is left alone."""
        timed = any(isinstance(cb, Timer) and cb.time_remaining() is not None for cb in trainer.callbacks)
        for i, cb in enumerate(trainer.callbacks):
            if timed and isinstance(cb, ProgressBar) and type(cb).__module__.startswith("lightning.pytorch.callbacks"):
                trainer.callbacks[i] = cls(refresh_rate=cb.refresh_rate)


# ---- throughput and time ---------------------------------------------------------------------------------------
class TrainingClock(L.Callback):
    """Log, on the steps that log ``train/loss`` (every ``log_every_n_steps``): ``train/tok_per_s``, the non-pad
    source + target tokens per second since the previous such step (also on the progress bar), and
    ``train/elapsed_s``, the seconds of training so far over every run that led here, validation included.

    The time is Lightning's ``Timer``'s: the trainer's own when ``max_time`` is set, else one that this callback adds
    (without a duration: it never stops training). The Timer's state goes in the checkpoint and comes back on a
    resume; ``translator.checkpoint.training_seconds`` reads it from a ``.ckpt``. Tokens are counted where the batch
    is, without a host sync; the count is read on logging steps only, which read the loss back anyway.
    """

    def __init__(self) -> None:
        self._timer: Timer | None = None
        self._tokens: Tensor | int = 0
        self._since: float | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        if self._timer is None:  # before the checkpoint's callback states are restored, so this one's is too
            self._timer = Timer()
            trainer.callbacks.append(self._timer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._tokens, self._since = 0, None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Tensor],
                             batch_idx: int) -> None:
        self._tokens = self._tokens + (batch["src"] != PAD_ID).sum() + (batch["tgt"][:, 1:] != PAD_ID).sum()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if (trainer.global_step - 1) % trainer.log_every_n_steps:  # the step just done, as training_step saw it
            return
        now = time.perf_counter()
        pl_module.log("train/elapsed_s", self._timer.time_elapsed("train"))
        if self._since is not None:
            pl_module.log("train/tok_per_s", int(self._tokens) / (now - self._since), prog_bar=True)
        self._tokens, self._since = 0, now
