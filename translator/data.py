"""Parallel text in, token-budget batches out: sources, streaming, rank/worker sharding and the DataModule.

Pipeline (one pass over a split)::

    load_pairs(path, split)      PairStream of (src, tgt) str pairs, read through `datasets` (streaming=True),
                                 validated (file:line errors), surrounding whitespace stripped, empty pairs skipped
      .shard(k, n)               k = rank * workers + worker of n = world * workers: whole files each (a hub dataset of
                                 n or more files or Parquet row groups), else pair i to shard i % n; train passes read
                                 a hub dataset's files in a shuffled order, interleaved
    TokenBatches                 per shard: fill a buffer of pairs, tokenize, drop pairs over max_len, sort by length,
                                 cut into batches of at most max_tokens padded tokens, shuffle the batch order (train)

Evaluation (validation, test) scores every line instead: ``PairStream.numbered`` keeps empty pairs and each line's
index, and ``TokenBatches(evaluation=True)`` cuts an over-long pair's ids to ``max_len`` (counted) instead of dropping
it, so that ``test/bleu`` covers the whole split; see ``TokenBatches``.
    ResumableDataLoader          batch_size=None over TokenBatches; counts batches so that a run resumes exactly

Prediction (``translator predict``) reads sentences, not pairs: ``SourceLines`` (the lines of a text file, blank ones
kept, or the source side of a split) -> ``SourceBatches`` (line i to shard i % n as above; tokenized, truncated and
batched by ``translate.encode_sources`` / ``token_batches``), every batch carrying its line indices so that the writer
(``translator.callbacks.TranslationWriter``) restores the input order.

Sources understood by ``load_pairs`` (every one through ``datasets.load_dataset(..., streaming=True)``):

* a directory of parallel text files ``{split}.{src}[.gz]`` + ``{split}.{tgt}[.gz]`` (Multi30k layout);
* JSON lines, ``{"translation": {"de": .., "en": ..}}`` (hub translation format) or ``{"de": .., "en": ..}``
  (top-level columns), and TSV ``de<TAB>en``: a file, or a directory holding ``{split}.jsonl`` / ``{split}.tsv``;
* anything else ``datasets.load_dataset(path, name)`` can open: a hub id (``wmt14``/``de-en``,
  ``bentrevett/multi30k``, ``iwslt2017``) or a local dataset repository; the translation-dict or column layout
  is detected from the first batch of records.

Local files are read with the ``text`` builder and parsed line by line here, so that every error names its file and
line. ``validation`` also finds local files named ``valid``/``dev``/``val``, as ``datasets`` does for the hub.

Batch format (docs/design.md): ``src`` (B, S) and ``tgt`` (B, T+1) = ``<bos> y <eos>``, int64, right-padded with
pad (0), S and T+1 rounded up to a multiple of ``pad_to_multiple``; plus ``src_text`` / ``tgt_text`` (list[str], B),
the raw strings for sacreBLEU, in every split (one format). ``B * (S + T + 1) <= max_tokens`` always, and no pair has
more than ``max_len`` sentence tokens (bos/eos not counted) on either side: longer training pairs are dropped and
counted, longer evaluation pairs cut and counted. Evaluation batches also carry ``index`` (list[int], B: each row's
line index in the split), ``truncated`` (list[bool], B) and ``num_pairs`` (int: the lines of the evaluated split).

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

import gzip
import hashlib
import itertools
import json
import logging
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, interleave
from translator.translate import encode_sources, pad, token_batches

log = logging.getLogger(__name__)

Batch = dict[str, Any]  # src (B, S) int64, tgt (B, T+1) int64, src_text / tgt_text list[str]

_READ_BATCH = 1024  # records per `datasets` read; `.iter(batch_size)` also keeps datasets from splitting by worker
_SPLIT_ALIASES = {"validation": ("validation", "valid", "dev", "val")}
_LOCAL_SUFFIXES = (".gz", ".jsonl", ".json", ".tsv", ".txt")


# ---- sources -----------------------------------------------------------------------------------------------------
@dataclass
class PairStream:
    """A re-iterable stream of (src, tgt) sentence pairs: one split of one source, read from the start each time.

    ``kind`` is ``"parallel"`` (``streams`` = the src-file and tgt-file text streams), ``"jsonl"`` or ``"tsv"`` (one
    text stream) or ``"hub"`` (one ``load_dataset`` stream); ``where`` names the source in messages.
    """

    kind: str
    streams: tuple[datasets.IterableDataset, ...]
    files: tuple[str, ...]
    where: str
    src_lang: str = "de"
    tgt_lang: str = "en"

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return self.shard(0, 1)

    def sources(self) -> Iterator[str]:
        """The source text of every record, blank ones included (what ``translator predict`` translates by default)."""
        if self.kind == "parallel":  # the source file alone: one sentence per line
            return (line for _, line in _lines(self.streams[0], self.files[0]))
        return (src for src, _ in self._raw())

    def numbered(self, index: int, num_shards: int, limit: int | None = None) -> Iterator[tuple[int, str, str]]:
        """``(i, src, tgt)``, stripped, for pairs ``i = index, index + num_shards, ...`` of the first ``limit`` records
        (all when None), empty pairs included: what an evaluation scores (every line, each with its line index).

        Every reader reads the whole split and keeps its own lines, whatever the number of files: evaluation splits
        are small, and the line index is what evaluation selects and counts by.
        """
        pairs = ((i, src.strip(), tgt.strip()) for i, (src, tgt) in enumerate(self._raw()))
        return itertools.islice(itertools.islice(pairs, limit), index, None, num_shards)

    def shard(
        self, index: int, num_shards: int, limit: int | None = None, file_seed: Sequence[int] | None = None
    ) -> Iterator[tuple[str, str]]:
        """Shard ``index`` of ``num_shards`` disjoint shards that together cover the first ``limit`` usable pairs (all
        when None).

        A hub dataset of at least ``num_shards`` files (``IterableDataset.num_shards``), read whole (``limit`` None),
        is split by file: each shard opens only its own files (``datasets.distributed.split_dataset_by_node``, whose
        nested node-then-worker split is this same ``index = rank * workers + worker``). Otherwise every shard reads
        the whole stream and keeps pairs ``index, index + num_shards, ...``.

        ``file_seed`` (training) shuffles the order of a hub dataset's files and interleaves ten at a time
        (``IterableDataset.shuffle`` with a buffer of 1: TokenBatches shuffles the pairs): a corpus stored in domain
        order would otherwise reach the model one domain at a time, and a buffer holds only a sliver of it. Every
        shard draws the same order, so the shards stay a partition.
        """
        stream = self
        if self.kind == "hub":
            ds = self.streams[0]
            if file_seed is not None:
                ds = ds.shuffle(generator=np.random.default_rng(list(file_seed)), buffer_size=1)
            if num_shards > 1 and limit is None and ds.num_shards >= num_shards:
                ds = split_dataset_by_node(ds, rank=index, world_size=num_shards, strategy="shards")
                where = f"{self.where} (files of shard {index}/{num_shards})"
                return replace(self, streams=(ds,), where=where)._usable(log_skips=index == 0)
            stream = replace(self, streams=(ds,))
        pairs = stream._usable(log_skips=index == 0)
        return itertools.islice(itertools.islice(pairs, limit), index, None, num_shards)

    def _usable(self, log_skips: bool) -> Iterator[tuple[str, str]]:
        kept = empty = 0
        for src, tgt in self._raw():
            src, tgt = src.strip(), tgt.strip()
            if not src or not tgt:
                empty += 1
                continue
            kept += 1
            yield src, tgt
        if kept == 0:
            raise ValueError(f"{self.where}: no usable pairs ({empty} empty or whitespace-only pairs skipped)")
        if empty and log_skips:
            log.info("%s: skipped %d empty or whitespace-only pairs, kept %d", self.where, empty, kept)

    def _raw(self) -> Iterator[tuple[str, str]]:
        if self.kind == "parallel":
            yield from _zip_parallel(self.streams, self.files)
        elif self.kind == "jsonl":
            for line_no, line in _lines(self.streams[0], self.files[0]):
                yield _parse_jsonl(line, self.files[0], line_no, self.src_lang, self.tgt_lang)
        elif self.kind == "tsv":
            for line_no, line in _lines(self.streams[0], self.files[0]):
                yield _parse_tsv(line, self.files[0], line_no)
        else:
            yield from _hub_pairs(self.streams[0], self.where, self.src_lang, self.tgt_lang)


def load_pairs(
    path: str | os.PathLike, split: str = "train", src_lang: str = "de", tgt_lang: str = "en", name: str | None = None
) -> PairStream:
    """Open one split of a parallel corpus (see the module docstring for the layouts) as a ``PairStream``.

    Raises FileNotFoundError, listing what was looked for, when nothing matches; malformed content raises
    ValueError naming file and line while the stream is read.
    """
    path = str(path)
    local = Path(path).expanduser()
    if local.is_file():
        return _file_stream(local, src_lang, tgt_lang)
    if local.is_dir():
        return _dir_stream(local, split, src_lang, tgt_lang, name)
    if local.suffix in _LOCAL_SUFFIXES or path.startswith((".", "/", "~")) or path.count("/") > 1:  # not a hub id
        raise FileNotFoundError(f"no such file or directory: {path}")
    return _hub_stream(path, split, src_lang, tgt_lang, name, looked_for=[])


@dataclass
class SourceLines:
    """A re-iterable stream of sentences to translate, one per input line, blank lines included (so that output line i
    answers input line i): the lines of a text file (``stream``, read with the ``text`` builder) or the source side of
    a split (``pairs``). ``where`` names it in messages; for a file, it is the path (re-read to find a bad line)."""

    where: str
    stream: datasets.IterableDataset | None = None
    pairs: PairStream | None = None

    def __iter__(self) -> Iterator[str]:
        if self.pairs is not None:
            return self.pairs.sources()
        return (line for _, line in _lines(self.stream, self.where))


def load_sources(path: str | os.PathLike) -> SourceLines:
    """The lines of a UTF-8 text file, plain or .gz; invalid UTF-8 raises ValueError naming file and line (on reading)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return SourceLines(str(file), stream=_text_dataset(file))


def _text_dataset(file: Path) -> datasets.IterableDataset:
    # utf-8-sig drops a leading byte-order mark; decoding stays strict and _lines reports bad bytes by line
    return datasets.load_dataset("text", data_files=str(file), split="train", streaming=True, encoding="utf-8-sig")


def _file_stream(file: Path, src_lang: str, tgt_lang: str) -> PairStream:
    suffixes = [s for s in file.suffixes if s != ".gz"]
    kind = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv"}.get(suffixes[-1] if suffixes else "")
    if kind is None:
        raise ValueError(f"{file}: unknown format (expected .jsonl, .json or .tsv, optionally .gz)")
    return PairStream(kind, (_text_dataset(file),), (str(file),), str(file), src_lang, tgt_lang)


def _dir_stream(root: Path, split: str, src_lang: str, tgt_lang: str, name: str | None) -> PairStream:
    looked_for: list[str] = []
    for s in _SPLIT_ALIASES.get(split, (split,)):
        src_file = _first_existing(root, [f"{s}.{src_lang}", f"{s}.{src_lang}.gz"], looked_for)
        tgt_file = _first_existing(root, [f"{s}.{tgt_lang}", f"{s}.{tgt_lang}.gz"], looked_for)
        if src_file and tgt_file:
            files = (str(src_file), str(tgt_file))
            where = f"{src_file} + {tgt_file}"
            return PairStream(
                "parallel", (_text_dataset(src_file), _text_dataset(tgt_file)), files, where, src_lang, tgt_lang
            )
        if src_file or tgt_file:
            raise FileNotFoundError(
                f"{src_file or tgt_file} has no parallel file (looked for: {', '.join(looked_for)})"
            )
        for kind in ("jsonl", "tsv"):
            file = _first_existing(root, [f"{s}.{kind}", f"{s}.{kind}.gz"], looked_for)
            if file:
                return _file_stream(file, src_lang, tgt_lang)
    present = sorted({p.name.split(".")[0] for p in root.glob(f"*.{src_lang}*")})
    if present:  # a parallel-text directory without this split: datasets would misread its files
        raise FileNotFoundError(
            f"{root}: split {split!r} not found (looked for: {', '.join(looked_for)}); splits present: {present}"
        )
    return _hub_stream(str(root), split, src_lang, tgt_lang, name, looked_for)


def _first_existing(root: Path, names: list[str], looked_for: list[str]) -> Path | None:
    looked_for.extend(names)
    return next((root / n for n in names if (root / n).is_file()), None)


def _hub_stream(
    path: str, split: str, src_lang: str, tgt_lang: str, name: str | None, looked_for: list[str]
) -> PairStream:
    where = f"{path}{f' [{name}]' if name else ''} split {split!r}"
    try:
        ds = datasets.load_dataset(path, name, split=split, streaming=True)
    except Exception as err:  # noqa: BLE001 -- hub, network and config errors come as many types
        local = f"looked for {', '.join(looked_for)} in {path}; " if looked_for else ""
        raise FileNotFoundError(f"cannot open {where}: {local}datasets.load_dataset said: {err}") from None
    try:  # Parquet (the hub's format): one shard per row group, not per file, so that WMT14's few files can still
        ds = ds.reshard()  # give 64 readers whole shards of their own (PairStream.shard); a no-op for other formats
    except NotImplementedError:
        pass
    return PairStream("hub", (ds,), (), where, src_lang, tgt_lang)


# ---- readers (each error names its file and line) ----------------------------------------------------------------
def _lines(ds: datasets.IterableDataset, file: str) -> Iterator[tuple[int, str]]:
    """(line number, line) for every line of a text stream, blank lines included."""
    line_no = 0
    try:
        for batch in ds.iter(batch_size=_READ_BATCH):
            for line in batch["text"]:
                line_no += 1
                yield line_no, line
    except UnicodeDecodeError:  # raised for a whole read chunk: find the line
        raise ValueError(f"{file}:{_first_bad_utf8_line(file)}: invalid UTF-8") from None
    except (OSError, EOFError) as err:  # corrupt gzip and the like, raised deep inside the reader
        raise ValueError(f"{file}: unreadable after line {line_no}: {err}") from None


def _first_bad_utf8_line(file: str) -> int | str:
    """Line number of the first line that is not UTF-8 (only run once decoding has already failed)."""
    with (gzip.open if file.endswith(".gz") else open)(file, "rb") as f:
        for line_no, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return line_no
    return "?"


def _zip_parallel(dss: Sequence[datasets.IterableDataset], files: Sequence[str]) -> Iterator[tuple[str, str]]:
    src_lines, tgt_lines = _lines(dss[0], files[0]), _lines(dss[1], files[1])
    for n, (src, tgt) in enumerate(itertools.zip_longest(src_lines, tgt_lines)):
        if src is None or tgt is None:  # the shorter file had n lines: count the rest of the other, then fail loudly
            n_longer = n + 1 + sum(1 for _ in (src_lines if tgt is None else tgt_lines))
            n_src, n_tgt = (n_longer, n) if tgt is None else (n, n_longer)
            raise ValueError(f"line counts differ: {files[0]} has {n_src} lines, {files[1]} has {n_tgt}")
        yield src[1], tgt[1]


def _parse_jsonl(line: str, file: str, line_no: int, src_lang: str, tgt_lang: str) -> tuple[str, str]:
    if not line.strip():
        return "", ""  # a blank line counts as an empty pair
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}:{line_no}: invalid JSON ({err.msg})") from None
    return _pair_from_record(record, f"{file}:{line_no}", src_lang, tgt_lang)


def _parse_tsv(line: str, file: str, line_no: int) -> tuple[str, str]:
    if not line.strip():
        return "", ""
    fields = line.split("\t")
    if len(fields) != 2:
        raise ValueError(f"{file}:{line_no}: expected 2 tab-separated fields (src<TAB>tgt), found {len(fields)}")
    return fields[0], fields[1]


def _pair_from_record(record: Any, where: str, src_lang: str, tgt_lang: str) -> tuple[str, str]:
    """(src, tgt) from ``{"translation": {src: .., tgt: ..}}`` or ``{src: .., tgt: ..}``."""
    fields = record if isinstance(record, dict) else {}
    if isinstance(fields.get("translation"), dict):
        fields = fields["translation"]
    src, tgt = fields.get(src_lang), fields.get(tgt_lang)
    missing = [lang for lang, text in ((src_lang, src), (tgt_lang, tgt)) if not isinstance(text, str)]
    if missing:
        raise ValueError(f"{where}: no {missing[0]!r} text in {json.dumps(record, ensure_ascii=False)[:200]}")
    return src, tgt


def _hub_pairs(ds: datasets.IterableDataset, where: str, src_lang: str, tgt_lang: str) -> Iterator[tuple[str, str]]:
    record_no = 0
    for batch in ds.iter(batch_size=_READ_BATCH):
        if "translation" in batch:
            rows = batch["translation"]
        elif src_lang in batch and tgt_lang in batch:
            rows = [{src_lang: s, tgt_lang: t} for s, t in zip(batch[src_lang], batch[tgt_lang])]
        else:
            raise ValueError(
                f"{where}: neither a 'translation' column nor {src_lang!r}/{tgt_lang!r} columns (found {sorted(batch)})"
            )
        for row in rows:
            yield _pair_from_record(row or {}, f"{where}, record {record_no}", src_lang, tgt_lang)
            record_no += 1


# ---- token-budget batches ----------------------------------------------------------------------------------------
def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_budget(max_tokens: int, max_len: int, pad_to_multiple: int) -> None:
    """A batch budget must hold one pair of the longest allowed length, padded (tgt has bos and eos)."""
    need = round_up(max_len, pad_to_multiple) + round_up(max_len + 2, pad_to_multiple)
    if max_tokens < need:
        raise ValueError(f"max_tokens={max_tokens} cannot hold one pair of max_len={max_len} tokens ({need} padded)")


def token_budget_batches(
    lengths: Sequence[tuple[int, int]], max_tokens: int, pad_to_multiple: int = 1
) -> list[list[int]]:
    """Cut examples, in the order given, into consecutive batches (lists of indices) that fit the token budget.

    ``lengths[i] = (src length, tgt row length with bos/eos)``. A batch of B examples costs
    ``B * (round_up(max src) + round_up(max tgt))`` padded tokens, and that never exceeds ``max_tokens``.
    Sort the examples by length first, or padding (and the number of batches) grows.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    width = (0, 0)  # padded (S, T+1) of the current batch
    for i, (s, t) in enumerate(lengths):
        own = (round_up(s, pad_to_multiple), round_up(t, pad_to_multiple))
        if sum(own) > max_tokens:
            raise ValueError(f"example {i} alone needs {sum(own)} padded tokens, over max_tokens={max_tokens}")
        grown = (max(width[0], own[0]), max(width[1], own[1]))
        if (len(current) + 1) * sum(grown) > max_tokens:
            batches.append(current)
            current, grown = [], own
        current.append(i)
        width = grown
    if current:
        batches.append(current)
    return batches


def pad_rows(rows: Sequence[Sequence[int]], pad_to_multiple: int = 1) -> torch.Tensor:
    """Right-pad id lists with pad (0) into a (B, round_up(max len)) int64 tensor."""
    lengths = torch.tensor([len(r) for r in rows])
    out = torch.full((len(rows), round_up(int(lengths.max()), pad_to_multiple)), PAD_ID, dtype=torch.long)
    mask = torch.arange(out.shape[1]) < lengths[:, None]  # (B, W), row-major order = concatenated rows
    out[mask] = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
    return out


Example = tuple[list[int], list[int], str, str, int, bool]
"""src ids, tgt row (``<bos> y <eos>``; no eos when y was cut), src text, tgt text (both whole), line index in the split
(evaluation; -1 in training), whether an id list was cut to max_len (evaluation)."""


def collate(examples: Sequence[Example], pad_to_multiple: int = 1, num_pairs: int | None = None) -> Batch:
    """Batch dict: src (B, S), tgt (B, T+1) int64 padded with 0; src_text, tgt_text list[str] (B). With ``num_pairs``
    (evaluation) also index (list[int], B: line indices in the split), truncated (list[bool], B) and num_pairs (int:
    the number of lines in the evaluated split)."""
    batch = {
        "src": pad_rows([e[0] for e in examples], pad_to_multiple),
        "tgt": pad_rows([e[1] for e in examples], pad_to_multiple),
        "src_text": [e[2] for e in examples],
        "tgt_text": [e[3] for e in examples],
    }
    if num_pairs is not None:
        batch.update(index=[e[4] for e in examples], truncated=[e[5] for e in examples], num_pairs=num_pairs)
    return batch


class TokenBatches(IterableDataset):
    """Token-budget batches of this process's shard of a PairStream, split further across DataLoader workers.

    Worker w on rank r reads shard ``r * workers + w`` of ``world_size * workers`` (``PairStream.shard``: whole files of
    a hub dataset that has enough of them, else pairs i with ``i % (world_size * workers) == r * workers + w``; with
    ``shuffle``, a hub dataset's files are read in an order drawn from (seed, pass)). Per shard, buffers of
    ``buffer_size`` pairs are tokenized, pairs over ``max_len`` tokens dropped, sorted by (padded src length, tgt
    length) and cut by ``token_budget_batches``. With ``shuffle`` the buffer is shuffled before the (stable) sort, so
    equal-length pairs meet different partners each pass, and the batch order is shuffled; the generator is seeded
    with (seed, pass, shard). ``passes=None`` repeats forever (training). ``skip_batches`` (set by
    ResumableDataLoader) skips the first batches of the loader; each worker skips its own share without collating.

    ``evaluation=True`` scores every line of the split (``PairStream.numbered``; line i to shard i as above): nothing is
    dropped. Empty pairs stay (an empty source is an all-pad row); an id list over ``max_len`` is cut to its first
    ``max_len`` ids (a cut target gets no eos) and counted, while ``src_text``/``tgt_text`` stay whole, so BLEU
    scores the whole reference. Batches then carry ``index``, ``truncated`` and ``num_pairs`` (see ``collate``).
    """

    def __init__(
        self,
        pairs: PairStream,
        tokenizer: Tokenizer,
        max_tokens: int = 4096,
        max_len: int = 128,
        pad_to_multiple: int = 8,
        buffer_size: int = 10_000,
        shuffle: bool = False,
        passes: int | None = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        limit_pairs: int | None = None,
        evaluation: bool = False,
    ) -> None:
        super().__init__()
        check_budget(max_tokens, max_len, pad_to_multiple)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.pairs, self.tokenizer = pairs, tokenizer
        self.max_tokens, self.max_len, self.pad_to_multiple = max_tokens, max_len, pad_to_multiple
        self.buffer_size, self.shuffle, self.passes, self.seed = buffer_size, shuffle, passes, seed
        self.rank, self.world_size, self.limit_pairs = rank, world_size, limit_pairs
        self.evaluation = evaluation
        self.skip_batches = 0
        self._num_pairs: int | None = None  # lines in the evaluated split, counted once
        self._logged = False

    def num_pairs(self) -> int:
        """The number of lines an evaluation scores: the split's, or its first ``limit_pairs``."""
        if self._num_pairs is None:
            self._num_pairs = sum(1 for _ in self.pairs.numbered(0, 1, self.limit_pairs))
            if self._num_pairs == 0:
                raise ValueError(f"{self.pairs.where}: no pairs to evaluate")
        return self._num_pairs

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A DataLoader asks its workers in turn, starting with worker 0 at every new iterator. Uninterrupted, batch j
        # comes from worker j % workers; after skipping n batches, the resumed loader's first batch is due from worker
        # n % workers, so worker w takes over the stream of worker (w + n) % workers and skips that one's share.
        worker = (worker + self.skip_batches) % workers
        shard, num_shards = self.rank * workers + worker, self.world_size * workers
        to_skip = len(range(worker, self.skip_batches, workers))
        num_pairs = self.num_pairs() if self.evaluation else None
        for p in itertools.count() if self.passes is None else range(self.passes):
            rng = random.Random(f"{self.seed}/{p}/{shard}")  # str seeds hash with sha512: same in every process
            produced = 0
            file_seed = (self.seed, p) if self.shuffle else None  # the same on every shard: see PairStream.shard
            for examples in self._pass(shard, num_shards, rng, log_drops=p == 0, file_seed=file_seed):
                produced += 1
                if to_skip:
                    to_skip -= 1
                    continue
                yield collate(examples, self.pad_to_multiple, num_pairs)
            if produced == 0 and self.passes is None:  # an endless loop over nothing would hang the run
                raise ValueError(
                    f"{self.pairs.where}: shard {shard} of {num_shards} (rank {self.rank}, worker {worker}) has no "
                    f"pairs; the split is too small for {self.world_size} rank(s) x {workers} worker(s)"
                )

    def _pass(
        self, shard: int, num_shards: int, rng: random.Random, log_drops: bool, file_seed: tuple[int, int] | None
    ) -> Iterator[list[Example]]:
        if self.evaluation:
            lines = self.pairs.numbered(shard, num_shards, self.limit_pairs)
        else:
            lines = ((-1, src, tgt) for src, tgt in self.pairs.shard(shard, num_shards, self.limit_pairs, file_seed))
        seen = dropped = truncated = 0
        n = self.max_len
        while chunk := list(itertools.islice(lines, self.buffer_size)):
            src_ids = self.tokenizer.encode([src for _, src, _ in chunk])
            tgt_ids = self.tokenizer.encode([tgt for _, _, tgt in chunk])
            examples = []
            for (i, src, tgt), s, t in zip(chunk, src_ids, tgt_ids):
                if self.evaluation:
                    cut = len(s) > n or len(t) > n
                    truncated += cut
                    examples.append((s[:n], [BOS_ID, *t[:n], *([EOS_ID] if len(t) <= n else [])], src, tgt, i, cut))
                elif 0 < len(s) <= n and 0 < len(t) <= n:
                    examples.append((s, [BOS_ID, *t, EOS_ID], src, tgt, i, False))
            seen, dropped = seen + len(chunk), dropped + len(chunk) - len(examples)
            if self.shuffle:
                rng.shuffle(examples)
            m = self.pad_to_multiple
            examples.sort(key=lambda e: (round_up(len(e[0]), m), len(e[1])))
            batches = token_budget_batches([(len(e[0]), len(e[1])) for e in examples], self.max_tokens, m)
            if self.shuffle:
                rng.shuffle(batches)
            for batch in batches:
                yield [examples[i] for i in batch]
        if seen and dropped == seen:
            raise ValueError(
                f"{self.pairs.where}: all {seen} pairs of shard {shard} are empty or over max_len={self.max_len} tokens"
            )
        if dropped and log_drops:
            log.info(
                "%s, shard %d/%d: dropped %d of %d pairs over max_len=%d tokens (or empty once tokenized)",
                self.pairs.where, shard, num_shards, dropped, seen, self.max_len,
            )  # fmt: skip
        if truncated and not self._logged:  # once: every evaluation pass cuts the same lines
            self._logged = True
            log.warning(
                "%s, shard %d/%d: %d of %d pairs over max_len=%d tokens are scored on their first %d tokens "
                "(BLEU against the whole reference); counted as */truncated",
                self.pairs.where, shard, num_shards, truncated, seen, n, n,
            )  # fmt: skip


class SourceBatches(IterableDataset):
    """Token-budget batches of sentences to translate, each row with its line index (``translator predict``).

    Line i (0-based, blank lines included) goes to shard ``i % (world_size * workers) == rank * workers + worker``, as
    pairs do in TokenBatches. Per shard, buffers of ``buffer_size`` lines are tokenized by
    ``translate.encode_sources`` (lines over ``max_len`` tokens are truncated, with a warning naming the line), sorted
    by length and cut by ``translate.token_batches`` (rows x longest source <= ``max_tokens``). Batch: ``src`` (B, S)
    int64 right-padded with pad (0), and ``index`` (list[int], B), the rows' line indices. Lines empty once tokenized
    come as one batch of width 0, ``src`` (B, 0): their translation is empty, nothing is decoded.
    """

    def __init__(
        self,
        lines: SourceLines,
        tokenizer: Tokenizer,
        max_tokens: int = 4096,
        max_len: int = 128,
        buffer_size: int = 10_000,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.lines, self.tokenizer, self.max_tokens, self.max_len = lines, tokenizer, max_tokens, max_len
        self.buffer_size, self.rank, self.world_size = buffer_size, rank, world_size

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard, num_shards = self.rank * workers + worker, self.world_size * workers
        numbered = itertools.islice(enumerate(self.lines), shard, None, num_shards)
        while chunk := list(itertools.islice(numbered, self.buffer_size)):
            index = [i for i, _ in chunk]
            ids = encode_sources(self.tokenizer, [s for _, s in chunk], self.max_len, [i + 1 for i in index], "max_len")
            empty = [i for i, seq in zip(index, ids) if not seq]
            if empty:
                yield {"src": torch.zeros(len(empty), 0, dtype=torch.long), "index": empty}
            for batch in token_batches([len(seq) for seq in ids], self.max_tokens):
                yield {"src": pad([ids[j] for j in batch]), "index": [index[j] for j in batch]}


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
