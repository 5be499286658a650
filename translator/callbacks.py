"""Callbacks that make a run survive a crash or a preemption and resume exactly (docs/reliability.md), and the one that
writes ``translator predict``'s output. (What a run logs and shows is in ``translator.logging_callbacks``.)

* ``RNGState`` puts every process's torch / CUDA / Python / NumPy generator states in the checkpoint and restores them
  when training restarts, so that dropout after a resume draws the same masks as an uninterrupted run. Lightning
  saves model, optimiser, scheduler, loop counters and the train DataLoader's position (``ResumableDataLoader``), but
  not the generators.
* ``PreemptionCheckpoint`` turns SIGTERM (what SLURM, Kubernetes and cloud spot instances send before killing a job)
  into "finish this step, save ``last.ckpt``, exit with status 143 (128 + SIGTERM)".
* ``TranslationWriter`` (added by ``translator predict``, not by the configs) writes the translations of every rank to
  one file, in input order.

``RNGState`` and ``PreemptionCheckpoint`` go in ``trainer.callbacks`` of every config; periodic checkpoints are a
``ModelCheckpoint`` with ``every_n_train_steps`` and ``save_last: true`` beside them. Resume with
``translator fit ... --ckpt_path last``.
"""

from __future__ import annotations

import gzip
import logging
import random
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message
from torch import Tensor

from translator.logging_callbacks import ContinueLog, ResumableCSVLogger  # noqa: F401  (class paths of saved configs)
from translator.translate import one_line

log = logging.getLogger(__name__)

RNG_KEY = "rng_states"  # checkpoint key; every value is a tensor, so weights_only=True still loads it
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


# ---- generator states ------------------------------------------------------------------------------------------
def _local_rng_states(device: torch.device) -> dict[str, Tensor]:
    """This process's generator states as 1-D tensors (no numpy arrays or tuples: weights_only=True loads them)."""
    _, mt, gauss = random.getstate()  # (version, 625 ints, gauss_next or None)
    _, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),  # uint8 (5056,)
        "python": torch.tensor([*mt, 0 if gauss is None else 1], dtype=torch.int64),  # (626,)
        "python_gauss": torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64),
        "numpy": torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64),  # (626,)
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_local_rng_states(states: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    mt = states["python"].tolist()
    random.setstate((3, tuple(mt[:-1]), float(states["python_gauss"]) if mt[-1] else None))
    keys = states["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(keys[:-2], dtype=np.uint32), keys[-2], keys[-1], float(states["numpy_gauss"])))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


class RNGState(L.Callback):
    """Save the random generator states of every rank in the checkpoint; restore them when training resumes.

    Saved under ``checkpoint["rng_states"]`` as ``{name: Tensor (world_size, ...)}``, row r for rank r (gathered
    from all ranks, so ``trainer.save_checkpoint`` must run on every rank, as ``ModelCheckpoint`` does). Restored in
    ``on_train_start``: after Lightning has built the train iterator (which draws a seed from the torch generator) and
    before the first resumed step, the same point in the step sequence at which the state was saved. A checkpoint
    from a different world size restores rank ``r % saved_world_size`` with a warning (not exact).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Tensor] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        device = trainer.strategy.root_device
        local = _local_rng_states(device)
        if trainer.world_size == 1:
            checkpoint[RNG_KEY] = {k: v.unsqueeze(0) for k, v in local.items()}
            return
        gather = trainer.strategy.all_gather  # (world_size, ...) on every rank; NCCL needs device tensors
        checkpoint[RNG_KEY] = {k: gather(v.to(device)).cpu() for k, v in local.items()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._pending = checkpoint.get(RNG_KEY)
        if self._pending is None and trainer.is_global_zero:
            log.warning("the checkpoint holds no random generator states: dropout after the resume will not repeat "
                        "an uninterrupted run")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        saved_world = len(self._pending["torch"])
        if saved_world != trainer.world_size and trainer.is_global_zero:
            log.warning("random generator states were saved by %d rank(s) and are restored on %d: not exact",
                        saved_world, trainer.world_size)
        row = trainer.global_rank % saved_world
        # clone: a row of the (world_size, n) tensor is a view at an offset, and set_rng_state reads the whole storage
        _set_local_rng_states({k: v[row].clone() for k, v in self._pending.items()}, trainer.strategy.root_device)
        self._pending = None


# ---- preemption ------------------------------------------------------------------------------------------------
class PreemptionCheckpoint(Checkpoint):
    """On SIGTERM, finish the current step (and validation, if one is running), save ``last.ckpt`` and exit 143.

    The handler only sets a flag; the check runs at every ``on_train_batch_end`` and ``on_validation_end``. With
    several ranks the flag is OR-reduced across them (one tiny collective per step), so every rank saves the same
    step together and stops even when only one of them was signalled. The checkpoint goes to ``dirpath``, default:
    the directory of the first ``ModelCheckpoint`` with ``save_last`` (else of the first one, else
    ``<default_root_dir>/checkpoints``), under the ``last`` name, so ``--ckpt_path last`` resumes from it. Then it
    raises Lightning's ``SIGTERMException`` with status 143 (128 + SIGTERM) at the next step's start or the end of
    training, so that Lightning first logs the saved step's metrics (raising in ``on_train_batch_end`` lost that row
    of the training log), and schedulers and restart policies see a run that did not finish. A validation due after
    the saved step runs first, and the checkpoint is saved again after it; should the grace period end before that,
    the step's checkpoint is there, and only that validation is lost.

    Lightning's own SIGTERM handling (``_SignalConnector``) sets ``trainer.received_sigterm`` and raises
    ``SIGTERMException`` with status 0 at the next step boundary or in the middle of a validation run, without
    saving anything. This callback replaces that handler while training runs (Lightning puts the previous handlers
    back at teardown), so that validation is never cut short and the step is always saved. It is a ``Checkpoint``,
    so Lightning runs it after the other callbacks and after the ``ModelCheckpoint``s listed before it (the best
    checkpoint of a validation is written before the exit); and so Lightning adds no default ``ModelCheckpoint``
    beside it: list one (every config does), or ``--ckpt_path last`` finds nothing.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved_path: str | None = None  # set once a SIGTERM made it save
        self._signalled = False
        self._previous: Any = None
        self._installed = False

    # -- the handler -----------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._signalled = trainer.received_sigterm  # a signal before training started (Lightning's handler saw it)
        self.saved_path = None
        if threading.current_thread() is not threading.main_thread():  # signal.signal only works there
            log.warning("PreemptionCheckpoint: not in the main thread, SIGTERM will not save a checkpoint")
            return
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # no logging here: a handler can run inside a logging call, and the logging lock is not reentrant
        self._signalled = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    # -- the checks ------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.saved_path is None and self._signalled_anywhere(trainer):
            self._save(trainer)  # exit at the next hook: Lightning logs this step's metrics after this one

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._exit_if_saved()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        # a validation due after the saved step has run (its metrics are logged before this hook): save again, so
        # that the resumed run does not repeat it
        if self.saved_path is not None or self._signalled_anywhere(trainer):
            self._save(trainer)
            self._exit_if_saved()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run that stops between periodic saves (max_time, or max_steps off the every_n_train_steps grid) still
        leaves ``last.ckpt`` at its final step: ModelCheckpoint writes it at the end only if it never saved one."""
        self._exit_if_saved()  # the step that ended training was saved on SIGTERM: keep that checkpoint
        path = self._last_path(trainer)
        saved = [getattr(cb, "_last_global_step_saved", None) for cb in trainer.checkpoint_callbacks
                 if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.last_model_path == path]
        if trainer.global_step > 0 and trainer.global_step not in saved:
            trainer.save_checkpoint(path, weights_only=False)
            log.info(rank_prefixed_message(f"end of training: saved {path} at step {trainer.global_step}",
                                           trainer.global_rank))

    def _signalled_anywhere(self, trainer: L.Trainer) -> bool:
        if trainer.world_size > 1:  # every rank must take the same decision: save_checkpoint is collective
            return trainer.strategy.reduce_boolean_decision(self._signalled, all=False)
        return self._signalled

    def _save(self, trainer: L.Trainer) -> None:
        path = self._last_path(trainer)
        for cb in trainer.checkpoint_callbacks:  # so that ModelCheckpoint goes on writing this file after the resume
            if isinstance(cb, ModelCheckpoint) and cb.save_last and Path(cb.dirpath or "") == Path(path).parent:
                cb.last_model_path = path
        trainer.save_checkpoint(path, weights_only=False)
        self.saved_path = path
        log.info(rank_prefixed_message(
            f"SIGTERM: saved {path} at step {trainer.global_step}; exiting with {PREEMPTED_EXIT_CODE}. Resume with "
            "the same command and --ckpt_path last", trainer.global_rank))

    def _exit_if_saved(self) -> None:
        # Lightning's exception handling then finalizes the loggers, which writes the rows still in memory
        if self.saved_path is not None:
            raise SIGTERMException(PREEMPTED_EXIT_CODE)

    def _last_path(self, trainer: L.Trainer) -> str:
        ckpts = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        ckpts = [cb for cb in ckpts if cb.save_last] or ckpts
        if self.dirpath is None and ckpts:
            metrics = {"step": torch.tensor(trainer.global_step), "epoch": torch.tensor(trainer.current_epoch)}
            return ckpts[0].format_checkpoint_name(metrics, ckpts[0].CHECKPOINT_NAME_LAST)
        dirpath = self.dirpath or str(Path(trainer.default_root_dir) / "checkpoints")
        return str(Path(dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}")


# ---- prediction output -----------------------------------------------------------------------------------------
class TranslationWriter(L.Callback):
    """Write the translations of ``predict_step`` to ``output``, one line per input line, in input order.

    ``predict_step`` returns (line index, translation) pairs; each rank keeps its own. At the end, every rank's pairs
    are gathered (``torch.distributed.all_gather_object``) and rank 0 writes the texts sorted by index, UTF-8, gzip when
    ``output`` ends in .gz. The indices must then be exactly 0 .. n-1: a line lost or doubled by the sharding raises
    instead of shifting every line after it. A directory as ``output`` fails before any decoding.

    A plain Callback rather than Lightning's ``BasePredictionWriter``: the line indices travel in the batches, and the
    writer machinery would look for sampler indices that an iterable dataset does not have (and warn).
    """

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output)
        self._rows: list[tuple[int, str]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict" and trainer.is_global_zero:
            if self.output.is_dir():
                raise ValueError(f"{self.output}: is a directory, not a file to write the translations to")
            try:
                self.output.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ValueError(f"{self.output}: cannot create its directory: {err}") from None

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             outputs: list[tuple[int, str]], *args: Any) -> None:
        self._rows.extend(outputs)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self._rows
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[list[tuple[int, str]] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, rows)
            rows = [row for part in parts for row in part]
        if trainer.is_global_zero:
            rows.sort(key=lambda row: row[0])
            if [i for i, _ in rows] != list(range(len(rows))):
                raise RuntimeError(f"prediction indices are not 0..{len(rows) - 1}: lines lost or doubled")
            self.write([text for _, text in rows])

    def write(self, texts: list[str]) -> None:
        data = "".join(one_line(text) + "\n" for text in texts).encode("utf-8")  # one line per input line
        try:
            self.output.write_bytes(gzip.compress(data) if self.output.suffix == ".gz" else data)
        except OSError as err:
            raise ValueError(f"{self.output}: cannot write the translations: {err}") from None
        log.info("wrote %d translations to %s", len(texts), self.output)
