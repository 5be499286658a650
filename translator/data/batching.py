"""Sentences in, padded token-budget batches out: the one batcher (``token_budget_batches``), the one padder
(``pad``), and the two datasets built on them, ``TokenBatches`` (pairs: fit, validate, test) and ``SourceBatches``
(sentences: predict).

    TokenBatches                 per shard of a PairStream: fill a buffer of pairs, tokenize, drop pairs over max_len,
                                 sort by length, cut into batches of at most max_tokens padded tokens, shuffle the
                                 batch order (train)

Evaluation (validation, test) scores every line instead: ``PairStream.numbered`` keeps empty pairs and each line's
index, and ``TokenBatches(evaluation=True)`` cuts an over-long pair's ids to ``max_len`` (counted) instead of dropping
it, so that ``test/bleu`` covers the whole split; see ``TokenBatches``.

Prediction (``translator predict``) reads sentences, not pairs: ``SourceLines`` (the lines of a text file, blank ones
kept, or the source side of a split) -> ``SourceBatches`` (line i to shard i % n, as pairs are; tokenized, truncated and
batched by ``encode_sources`` / ``token_batches``, as ``translator.translate`` does), every batch carrying its line
indices so that the writer (``translator.callbacks.TranslationWriter``) restores the input order.

Batch format (docs/design.md): ``src`` (B, S) and ``tgt`` (B, T+1) = ``<bos> y <eos>``, int64, right-padded with
pad (0), S and T+1 rounded up to a multiple of ``pad_to_multiple``; plus ``src_text`` / ``tgt_text`` (list[str], B),
the raw strings for sacreBLEU, in every split (one format). ``B * (S + T + 1) <= max_tokens`` always, and no pair has
more than ``max_len`` sentence tokens (bos/eos not counted) on either side: longer training pairs are dropped and
counted, longer evaluation pairs cut and counted. Evaluation batches also carry ``index`` (list[int], B: each row's
line index in the split), ``truncated`` (list[bool], B) and ``num_pairs`` (int: the lines of the evaluated split).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import IterableDataset, get_worker_info

from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

if TYPE_CHECKING:
    from translator.data.sources import PairStream, SourceLines

log = logging.getLogger(__name__)

Batch = dict[str, Any]  # src (B, S) int64, tgt (B, T+1) int64, src_text / tgt_text list[str]


# ---- tokens, token budgets, padding ------------------------------------------------------------------------------
def encode_sources(
    tokenizer: Tokenizer,
    sentences: list[str],
    max_input_tokens: int = 256,
    line_numbers: Sequence[int] | None = None,
    limit_name: str = "max_input_tokens",
) -> list[list[int]]:
    """Token ids per sentence (stripped); those over `max_input_tokens` are cut, with a warning naming the line:
    `line_numbers[i]` for sentence i (default: its 1-based position in `sentences`) and the limit's setting."""
    if max_input_tokens < 1:
        raise ValueError(f"{limit_name} must be >= 1, got {max_input_tokens}")
    ids = tokenizer.encode([s.strip() for s in sentences])
    for i, seq in enumerate(ids):
        if len(seq) > max_input_tokens:
            line = i + 1 if line_numbers is None else line_numbers[i]
            log.warning("line %d: %d tokens, truncated to the first %d (%s)", line, len(seq), max_input_tokens,
                        limit_name)
            ids[i] = seq[:max_input_tokens]
    return ids


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

    The one batcher (training and evaluation pairs here; sentences to translate through ``token_batches``).
    ``lengths[i] = (src length, tgt row length with bos/eos)``; sentences alone have tgt length 0. A batch of B
    examples costs ``B * (round_up(max src) + round_up(max tgt))`` padded tokens, and that never exceeds
    ``max_tokens``; an example that alone exceeds it raises. Sort the examples by length first, or padding (and the
    number of batches) grows.
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


def token_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices of non-empty sentences, longest first, cut by ``token_budget_batches`` so that a batch's padded source
    (rows x longest) stays within ``batch_tokens``; a sentence longer than the budget goes alone. Similar lengths share
    a batch, so little is spent on padding; the longest batch comes first, so running out of memory shows at once."""
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    alone = sum(lengths[i] > batch_tokens for i in order)  # the over-long ones, first in the order
    fitting = order[alone:]
    cut = token_budget_batches([(lengths[i], 0) for i in fitting], batch_tokens)  # no target side
    return [[i] for i in order[:alone]] + [[fitting[j] for j in batch] for batch in cut]


def pad(rows: Sequence[Sequence[int]], device: torch.device | str = "cpu", *, pad_to_multiple: int = 1) -> Tensor:
    """Right-pad id lists with pad (0) into a (B, round_up(longest, pad_to_multiple)) int64 tensor on ``device``.

    The one padder: training and evaluation batches (``collate``), ``translator predict`` (``SourceBatches``) and
    ``translator.translate``. An empty row is all pad.
    """
    flat = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)  # one tensor, not one per row
    out = pad_sequence(flat.split([len(r) for r in rows]), batch_first=True, padding_value=PAD_ID)  # (B, longest)
    return F.pad(out, (0, -out.size(1) % pad_to_multiple), value=PAD_ID).to(device)


Example = tuple[list[int], list[int], str, str, int, bool]
"""src ids, tgt row (``<bos> y <eos>``; no eos when y was cut), src text, tgt text (both whole), line index in the split
(evaluation; -1 in training), whether an id list was cut to max_len (evaluation)."""


def collate(examples: Sequence[Example], pad_to_multiple: int = 1, num_pairs: int | None = None) -> Batch:
    """Batch dict: src (B, S), tgt (B, T+1) int64 padded with 0; src_text, tgt_text list[str] (B). With ``num_pairs``
    (evaluation) also index (list[int], B: line indices in the split), truncated (list[bool], B) and num_pairs (int:
    the number of lines in the evaluated split)."""
    batch = {
        "src": pad([e[0] for e in examples], pad_to_multiple=pad_to_multiple),
        "tgt": pad([e[1] for e in examples], pad_to_multiple=pad_to_multiple),
        "src_text": [e[2] for e in examples],
        "tgt_text": [e[3] for e in examples],
    }
    if num_pairs is not None:
        batch.update(index=[e[4] for e in examples], truncated=[e[5] for e in examples], num_pairs=num_pairs)
    return batch


# ---- the datasets: pairs (fit, validate, test) and sentences (predict) -------------------------------------------
def _worker() -> tuple[int, int]:
    """(this DataLoader worker's id, the number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


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
        worker, workers = _worker()
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
    ``encode_sources`` (lines over ``max_len`` tokens are truncated, with a warning naming the line), sorted
    by length and cut by ``token_batches`` (rows x longest source <= ``max_tokens``). Batch: ``src`` (B, S)
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
        worker, workers = _worker()
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
