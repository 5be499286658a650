"""sacreBLEU's BLEU and chrF as torchmetrics metrics, exact under DDP.

Each metric sums sacreBLEU's own sufficient statistics per sentence (n-gram matches and totals, lengths) into
one tensor state; torchmetrics all-reduces it across ranks, and sacreBLEU turns the sum into the score. So the
result equals `sacrebleu.corpus_bleu` on the union of every rank's sentences, whatever the split.

sacreBLEU has no public API for those statistics (its `corpus_score` returns the score of one call's sentences;
chrF's score does not even carry its counts), so `sentence_statistics` and `score_from_statistics` call two of its
private methods, and nothing else here or in `translator.compare` does so directly. pyproject.toml pins the releases
they were checked on (`SACREBLEU_TESTED`); `tests/test_metrics.py` fails with a message naming them if a release
changes what they return, and a release without them gets a clear error instead of an AttributeError.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sacrebleu
import torch
from torchmetrics import Metric

SACREBLEU_TESTED = ">=2.4,<2.7"  # the releases whose internals were checked (2.4.0, 2.5.1, 2.6.0); as in pyproject


def sacrebleu_internal(obj: object, name: str) -> Any:
    """`obj.<name>`, a private attribute of a sacreBLEU object; a clear error if this release has none."""
    try:
        return getattr(obj, name)
    except AttributeError:
        raise RuntimeError(
            f"sacrebleu {sacrebleu.__version__} has no {type(obj).__name__}.{name}, an internal that translator needs "
            f"for exact corpus scores; install a tested release: pip install 'sacrebleu{SACREBLEU_TESTED}'"
        ) from None


def sentence_statistics(scorer: sacrebleu.metrics.base.Metric, hypotheses: Sequence[str],
                        references: Sequence[str]) -> list[list[int]]:
    """sacreBLEU's sufficient statistics, one row of integers per sentence (BLEU: hypothesis and reference lengths,
    n-gram matches and totals; chrF: character and word n-gram matches and totals). Summed over any set of
    sentences, they give that set's corpus score through `score_from_statistics`."""
    return sacrebleu_internal(scorer, "_extract_corpus_statistics")(hypotheses, [references])


def score_from_statistics(scorer: sacrebleu.metrics.base.Metric, stats: Sequence[float]) -> float:
    """The corpus score of summed `sentence_statistics` (a list or a 1-D array)."""
    return sacrebleu_internal(scorer, "_compute_score_from_stats")(stats).score


class SacreMetric(Metric):
    full_state_update = False
    higher_is_better = True

    def __init__(self, scorer: sacrebleu.metrics.base.Metric, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scorer = scorer
        n = len(sentence_statistics(scorer, ["a"], ["a"])[0])
        self.add_state("stats", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def signature(self) -> str:
        return str(self.scorer.get_signature())

    def update(self, hypotheses: list[str], references: list[str]) -> None:
        if not hypotheses:
            return
        stats = sentence_statistics(self.scorer, hypotheses, references)
        self.stats += torch.tensor(stats, dtype=torch.float64).sum(0).to(self.stats.device)

    def compute(self) -> torch.Tensor:
        stats = [int(x) for x in self.stats.tolist()]
        return torch.tensor(score_from_statistics(self.scorer, stats))


def BLEU(**kwargs) -> SacreMetric:
    return SacreMetric(sacrebleu.BLEU(), **kwargs)


def CHRF(**kwargs) -> SacreMetric:
    return SacreMetric(sacrebleu.CHRF(), **kwargs)
