"""Parallel text in, token-budget batches out: sources, streaming, rank/worker sharding and the DataModule.

Pipeline (one pass over a split)::

    load_pairs(path, split)      sources.py: a PairStream of (src, tgt) str pairs, read through `datasets`
                                 (streaming=True), validated (file:line errors), surrounding whitespace stripped,
                                 empty pairs skipped
      .shard(k, n)               k = rank * workers + worker of n = world * workers: whole files each (a hub dataset of
                                 n or more files or Parquet row groups), else pair i to shard i % n; train passes read
                                 a hub dataset's files in a shuffled order, interleaved
    TokenBatches                 batching.py: per shard, fill a buffer of pairs, tokenize, drop pairs over max_len, sort
                                 by length, cut into batches of at most max_tokens padded tokens (token_budget_batches),
                                 pad (pad), shuffle the batch order (train)
    ResumableDataLoader          datamodule.py: batch_size=None over TokenBatches; counts batches so that a run resumes
                                 exactly; TranslationDataModule builds it all for Lightning

``translator predict`` reads sentences (``load_sources`` -> ``SourceBatches``), and ``translator.translate`` batches
and pads them with the same ``token_batches`` and ``pad``. Each module's docstring says more: sources.py the formats,
batching.py the batch format, datamodule.py DDP and exact resume.
"""

from translator.data.batching import (
    Batch,
    Example,
    SourceBatches,
    TokenBatches,
    check_budget,
    collate,
    pad_rows,
    round_up,
    token_budget_batches,
)
from translator.data.datamodule import ResumableDataLoader, TranslationDataModule
from translator.data.sources import PairStream, SourceLines, load_pairs, load_sources

__all__ = [
    "Batch",
    "Example",
    "PairStream",
    "ResumableDataLoader",
    "SourceBatches",
    "SourceLines",
    "TokenBatches",
    "TranslationDataModule",
    "check_budget",
    "collate",
    "load_pairs",
    "load_sources",
    "pad_rows",
    "round_up",
    "token_budget_batches",
]
