"""Parallel text in, (src, tgt) string pairs out: ``load_pairs`` opens one split of a corpus as a ``PairStream``, and
``load_sources`` the lines of a text file to translate as ``SourceLines``.

Sources understood by ``load_pairs`` (every one through ``datasets.load_dataset(..., streaming=True)``):

* a directory of parallel text files ``{split}.{src}[.gz]`` + ``{split}.{tgt}[.gz]`` (Multi30k layout);
* JSON lines, ``{"translation": {"de": .., "en": ..}}`` (hub translation format) or ``{"de": .., "en": ..}``
  (top-level columns), and TSV ``de<TAB>en``: a file, or a directory holding ``{split}.jsonl`` / ``{split}.tsv``;
* anything else ``datasets.load_dataset(path, name)`` can open: a hub id (``wmt14``/``de-en``,
  ``bentrevett/multi30k``, ``iwslt2017``) or a local dataset repository; the translation-dict or column layout
  is detected from the first batch of records.

Local files are read with the ``text`` builder and parsed line by line here, so that every error names its file and
line. ``validation`` also finds local files named ``valid``/``dev``/``val``, as ``datasets`` does for the hub.

``PairStream.shard`` splits a stream across ranks and DataLoader workers (whole files of a hub dataset when it has
enough, else pair i to shard i % n); ``PairStream.numbered`` gives evaluation every line with its index.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node

log = logging.getLogger(__name__)

_READ_BATCH = 1024  # records per `datasets` read; `.iter(batch_size)` also keeps datasets from splitting by worker
_SPLIT_ALIASES = {"validation": ("validation", "valid", "dev", "val")}
_LOCAL_SUFFIXES = (".gz", ".jsonl", ".json", ".tsv", ".txt")


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
