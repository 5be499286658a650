"""The DataModule that Lightning drives, and the DataLoader that makes a training stream resumable.

DDP, uneven shards and exact resume:

* The train stream is endless: pass p = 0, 1, ... re-reads the source and reshuffles with (seed, p, shard), so no rank
  ever runs out of batches and training length is ``Trainer(max_steps=...)`` (epochs mean nothing here). A shard that
  yields no batch in a whole pass raises instead of spinning forever.
* Validation and test are one finite pass and may be uneven across ranks (by a few pairs and so by a batch or more).
  That cannot hang DDP because evaluation steps run no collectives: metrics are torchmetrics objects that sync once,
  at epoch end, where every rank arrives after its own last batch.
* The train stream is a deterministic function of (data, tokenizer, batching settings, seed, rank, world size,
  workers). ``ResumableDataLoader.state_dict()`` holds the number of batches consumed; Lightning saves it in the
  checkpoint (``fit_loop`` -> ``CombinedLoader._state_dicts``) and hands it back before the first ``iter()`` on
  resume, and the loader then regenerates and skips that many batches (each worker skips its own share, in
  parallel, without collating them). Rank 0's state is saved and every rank loads it, which is right because all
  ranks consume the same number of batches per step. Resuming with another world size or worker count cannot be
  exact; it is allowed with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from translator.data.batching import Batch, SourceBatches, TokenBatches, check_budget
from translator.data.sources import PairStream, SourceLines, load_pairs, load_sources
from translator.tokenizer import PAD_ID, Tokenizer, interleave

log = logging.getLogger(__name__)


# ---- resumable loader --------------------------------------------------------------------------------------------
class ResumableDataLoader(DataLoader):
    """A DataLoader (batch_size=None) over TokenBatches whose position survives a checkpoint.

    ``state_dict()`` returns ``{"batches_seen": n, ...}``, the number of batches consumed; after
    ``load_state_dict(state)`` the next iteration skips those n batches, so the resumed run sees exactly the batches
    the interrupted one would have. ``lookahead`` is the number of batches the consumer fetches before using them:
    Lightning's training loop fetches one ahead for loaders without a length (``_PrefetchDataFetcher`` in
    lightning/pytorch/loops/fetchers.py), so the DataModule sets 1 and a checkpoint after step k records k, not k + 1.
    """

    def __init__(
        self, dataset: TokenBatches, num_workers: int = 0, pin_memory: bool = False, lookahead: int = 0
    ) -> None:
        # no persistent workers: they would keep a copy of the dataset made before load_state_dict set skip_batches
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory)
        self.lookahead = lookahead
        self.batches_seen = 0  # batches handed out, counting the skipped ones
        self._yielded = 0  # batches handed out by the current iterator
        self._resume_at = 0

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.skip_batches, self._resume_at = self._resume_at, 0
        self.batches_seen, self._yielded = self.dataset.skip_batches, 0
        for batch in super().__iter__():
            self.batches_seen += 1
            self._yielded += 1
            yield batch

    def _identity(self) -> dict[str, int]:
        return {"world_size": self.dataset.world_size, "num_workers": self.num_workers, "seed": self.dataset.seed}

    def state_dict(self) -> dict[str, int]:
        return {"batches_seen": self.batches_seen - min(self.lookahead, self._yielded), **self._identity()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        changed = {k: (state_dict[k], v) for k, v in self._identity().items() if k in state_dict and state_dict[k] != v}
        if changed:
            log.warning(
                "resuming with %s (saved, now) changed: the stream differs, so resumption is not exact", changed
            )
        self._resume_at = self.batches_seen = int(state_dict["batches_seen"])
        self._yielded = 0


# ---- DataModule --------------------------------------------------------------------------------------------------
class TranslationDataModule(L.LightningDataModule):
    """Token-budget batches of a parallel corpus (local files or a hub dataset) for fit, validate and test, and of
    sentences to translate for predict: the lines of ``predict_path`` (a UTF-8 text file, plain or .gz), by default the
    source side of ``test_split`` (see ``SourceBatches``).

    Without ``tokenizer`` (a .model file), ``prepare_data`` trains a joint SentencePiece model on the train split
    once per node and saves it as ``tokenizer_dir/<name>-<vocab_size>-<hash of data and settings>.model``, reusing the
    file when present; ``setup`` loads it in every process. See the module docstring for sharding, DDP and resume.

    Validation and test score every line of their split (``TokenBatches(evaluation=True)``); ``limit_val_pairs``
    validates on the first lines only. ``translator test`` refuses to report scores over part of the test split
    (e.g. under ``--trainer.limit_test_batches``): they are not comparable with anyone's; ``allow_partial_test=True``
    reports them anyway.
    """

    def __init__(
        self,
        path: str = "bentrevett/multi30k",
        name: str | None = None,
        src_lang: str = "de",
        tgt_lang: str = "en",
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        predict_path: str | None = None,
        tokenizer: str | None = None,
        tokenizer_dir: str = "checkpoints/tokenizers",
        vocab_size: int = 8000,
        max_tokens: int = 4096,
        max_len: int = 128,
        shuffle_buffer: int = 10_000,
        num_workers: int = 2,
        seed: int = 0,
        pad_to_multiple: int = 8,
        limit_val_pairs: int | None = None,
        allow_partial_test: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for key in ("vocab_size", "max_tokens", "max_len", "shuffle_buffer", "pad_to_multiple"):
            if self.hparams[key] < 1:
                raise ValueError(f"{key} must be positive, got {self.hparams[key]}")
        if num_workers < 0 or (limit_val_pairs is not None and limit_val_pairs < 1):
            raise ValueError(f"bad num_workers={num_workers} or limit_val_pairs={limit_val_pairs}")
        check_budget(max_tokens, max_len, pad_to_multiple)
        self._tokenizer = Tokenizer.from_file(tokenizer) if tokenizer else None
        if self._tokenizer is not None and self._tokenizer.vocab_size != vocab_size:
            # a given tokenizer fixes the vocabulary: adopt its size (the model is linked to it) rather than keep a
            # stale configured value that would contradict the model's in the checkpoint's hyper-parameters
            log.info("tokenizer %s has %d pieces: vocab_size=%d ignored", tokenizer, self._tokenizer.vocab_size, vocab_size)
            self.hparams.vocab_size = self._tokenizer.vocab_size
        self._streams: dict[str, PairStream] = {}
        self._sources: SourceLines | None = None

    # ---- what the model is linked to -----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise RuntimeError("the tokenizer is loaded by setup(); call prepare_data() and setup() first")
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The given tokenizer's size, else the configured one (which the trained tokenizer will have)."""
        return self.hparams.vocab_size

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def tokenizer_path(self) -> Path:
        h = self.hparams
        if h.tokenizer:
            return Path(h.tokenizer)
        key = json.dumps([h.path, h.name, h.train_split, h.src_lang, h.tgt_lang, h.vocab_size])
        stem = re.sub(r"[^A-Za-z0-9]+", "-", f"{Path(h.path).name}-{h.name or ''}").strip("-") or "data"
        return Path(h.tokenizer_dir) / f"{stem}-{h.vocab_size}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.model"

    # ---- Lightning hooks -----------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Train and save the tokenizer (once per node) unless one was given or is already saved."""
        out = self.tokenizer_path
        if self.hparams.tokenizer or out.is_file():
            return
        h = self.hparams
        pairs = load_pairs(h.path, h.train_split, h.src_lang, h.tgt_lang, h.name)
        log.info("training a %d-piece tokenizer on %s -> %s", h.vocab_size, pairs.where, out)
        tokenizer = Tokenizer.train(interleave(pairs), vocab_size=h.vocab_size)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        tokenizer.save(tmp)
        os.replace(tmp, out)  # atomic: nodes sharing a file system may race to write the same file

    def setup(self, stage: str | None = None) -> None:
        if self._tokenizer is None:
            path = self.tokenizer_path
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer {path} not found: prepare_data() trains it (the Trainer calls it)")
            self._tokenizer = Tokenizer.from_file(path)
        h = self.hparams
        if stage == "predict":  # opened here so that a missing file fails before any step
            if h.predict_path:
                self._sources = load_sources(h.predict_path)
            else:
                pairs = load_pairs(h.path, h.test_split, h.src_lang, h.tgt_lang, h.name)
                self._sources = SourceLines(f"{pairs.where} (source side)", pairs=pairs)
            return
        roles = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val", "test"))
        for role in roles:  # opening the streams here makes missing files fail before any step
            self._streams[role] = load_pairs(h.path, h[f"{role}_split"], h.src_lang, h.tgt_lang, h.name)

    def train_dataloader(self) -> ResumableDataLoader:
        if self.trainer is not None and self.trainer.max_steps == -1:
            log.warning("the train stream is endless: without Trainer(max_steps=...) or max_time, training never ends")
        lookahead = 1 if self.trainer is not None else 0  # Lightning's training loop fetches one batch ahead
        return ResumableDataLoader(
            self.batches("train"), self.hparams.num_workers, torch.cuda.is_available(), lookahead
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        if self._sources is None:
            self.setup("predict")
        h, (rank, world) = self.hparams, self._rank_world()
        batches = SourceBatches(self._sources, self.tokenizer, h.max_tokens, h.max_len, h.shuffle_buffer, rank, world)
        return DataLoader(batches, batch_size=None, num_workers=h.num_workers, pin_memory=torch.cuda.is_available())

    # ---- helpers -------------------------------------------------------------------------------------------------
    def batches(self, role: str) -> TokenBatches:
        """This process's TokenBatches for ``role`` in ("train", "val", "test"); train is endless and shuffled."""
        if role not in self._streams:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[role])
        h, (rank, world) = self.hparams, self._rank_world()
        train = role == "train"
        return TokenBatches(
            self._streams[role],
            self.tokenizer,
            h.max_tokens,
            h.max_len,
            h.pad_to_multiple,
            h.shuffle_buffer,
            shuffle=train,
            passes=None if train else 1,
            seed=h.seed,
            rank=rank,
            world_size=world,
            limit_pairs=h.limit_val_pairs if role == "val" else None,
            evaluation=not train,
        )

    def _eval_loader(self, role: str) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            self.batches(role),
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            # its own generator: an evaluation iterator draws a seed, and from the global generator that draw would
            # shift training's dropout masks by when validation ran, so a resumed run would not repeat the original
            generator=torch.Generator(),
        )

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1
