"""The progress bar of a run bounded by max_time (translator.logging_callbacks.TimeBoundProgressBar) and the training
clock (TrainingClock: tokens/s, training time across a resume), on a model whose steps take a known time. (The
checkpoint and log callbacks are tested end to end in tests/test_resume.py.)"""

from __future__ import annotations

import itertools
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, Timer, TQDMProgressBar
from torch.utils.data import DataLoader, IterableDataset

from translator import checkpoint
from translator.logging_callbacks import TimeBoundProgressBar, TrainingClock

STEP_S = 0.02


class _Endless(IterableDataset):
    def __iter__(self):
        return (torch.ones(1) for _ in itertools.count())


class _SlowSteps(L.LightningModule):
    """Every training step sleeps STEP_S seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        time.sleep(STEP_S)
        return (self.w * batch).sum()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Endless(), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Recording(TimeBoundProgressBar):
    def on_train_batch_end(self, *args) -> None:
        super().on_train_batch_end(*args)
        self.totals.append(self.train_progress_bar.total)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "max_steps": 100_000, "logger": False, "enable_checkpointing": False,
                        "enable_model_summary": False, **kwargs})


def test_time_bound_bar_total_is_the_steps_max_time_allows() -> None:
    bar = _Recording()
    bar.totals = []
    trainer = _trainer(max_time={"seconds": 3}, callbacks=[bar])
    trainer.fit(_SlowSteps())
    steps = trainer.global_step  # what max_time allowed: about 3 s / STEP_S
    assert 0.5 * 3 / STEP_S < steps < 100_000
    # from a fifth of the run on, the bar's total (and so its ETA) is within 20% of where the run really ended;
    # Lightning's bar says 100000
    assert all(abs(total - steps) <= 0.2 * steps for total in bar.totals[steps // 5 :]), (steps, bar.totals)


def test_time_bound_bar_replaces_lightnings_default_only_under_max_time() -> None:
    timed, untimed = _trainer(max_time={"minutes": 14}), _trainer()
    for trainer in (timed, untimed):
        assert type(trainer.progress_bar_callback) in (TQDMProgressBar, RichProgressBar)  # Lightning's default
        TimeBoundProgressBar.replace_default(trainer)
    assert isinstance(timed.progress_bar_callback, TimeBoundProgressBar)
    assert not isinstance(untimed.progress_bar_callback, TimeBoundProgressBar)


# ---- TrainingClock -----------------------------------------------------------------------------------------------
SRC_TOKENS, TGT_TOKENS = 7, 5  # non-pad tokens per batch: source, and target y1 .. yn <eos>


class _Batches(IterableDataset):
    """Endless batches of 2 rows, padded, with SRC_TOKENS + TGT_TOKENS real tokens in all."""

    def __iter__(self):
        src = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 0]])  # 7 tokens
        tgt = torch.tensor([[2, 9, 9, 3], [2, 9, 3, 0]])  # <bos> counted out: 3 + 2
        return ({"src": src, "tgt": tgt} for _ in itertools.count())


class _SlowBatches(_SlowSteps):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return super().training_step(batch["src"][:1, :1].float(), batch_idx)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Batches(), batch_size=None)


def test_training_clock_logs_tokens_per_second_and_time_that_survives_a_resume(tmp_path) -> None:
    clock = TrainingClock()
    first = _trainer(max_steps=11, log_every_n_steps=5, callbacks=[clock], enable_progress_bar=False)
    first.fit(_SlowBatches())
    assert [type(cb) for cb in first.callbacks].count(Timer) == 1  # added, as no max_time set one
    rate = float(first.callback_metrics["train/tok_per_s"])
    assert 0.5 < rate / ((SRC_TOKENS + TGT_TOKENS) / STEP_S) <= 1.0  # at most one batch per STEP_S
    elapsed = float(first.callback_metrics["train/elapsed_s"])  # logged at the end of the 11th step (index 10)
    assert 11 * STEP_S <= elapsed < 11 * STEP_S + 1.0
    first.save_checkpoint(tmp_path / "eleven.ckpt")
    saved = torch.load(tmp_path / "eleven.ckpt", weights_only=True)
    assert checkpoint.training_seconds(saved) >= elapsed

    resumed = _trainer(max_steps=21, log_every_n_steps=5, callbacks=[TrainingClock()], enable_progress_bar=False,
                       max_time={"hours": 1})  # Lightning's own Timer: the clock uses it, adds none
    resumed.fit(_SlowBatches(), ckpt_path=tmp_path / "eleven.ckpt")
    assert [type(cb) for cb in resumed.callbacks].count(Timer) == 1
    assert float(resumed.callback_metrics["train/elapsed_s"]) >= checkpoint.training_seconds(saved) + 10 * STEP_S
