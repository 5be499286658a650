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

Each name is imported from its module on first use (``__getattr__``, PEP 562): the sources need ``datasets`` and the
DataModule Lightning, which ``translator.translate`` (batching.py alone) would otherwise load for nothing.
"""

import importlib
from typing import Any

_NAMES = {  # module of this package -> the public names it defines
    "sources": ("PairStream", "SourceLines", "load_pairs", "load_sources"),
    "batching": ("Batch", "Example", "SourceBatches", "TokenBatches", "check_budget", "collate", "encode_sources",
                 "pad", "round_up", "token_batches", "token_budget_batches"),
    "datamodule": ("ResumableDataLoader", "TranslationDataModule"),
}  # fmt: skip
_HOME = {name: module for module, names in _NAMES.items() for name in names}
__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
