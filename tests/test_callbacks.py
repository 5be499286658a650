"""The progress bar of a run bounded by max_time (translator.callbacks.TimeBoundProgressBar), on a model whose steps
take a known time. (The checkpoint and log callbacks are tested end to end in tests/test_resume.py.)"""

from __future__ import annotations

import itertools
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from torch.utils.data import DataLoader, IterableDataset

from translator.callbacks import TimeBoundProgressBar

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
    return L.Trainer(accelerator="cpu", max_steps=100_000, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, **kwargs)


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
