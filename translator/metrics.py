"""sacreBLEU's BLEU and chrF as torchmetrics metrics, exact under DDP.

Each metric sums sacreBLEU's own sufficient statistics per sentence (n-gram matches and totals, lengths) into
one tensor state; torchmetrics all-reduces it across ranks, and sacreBLEU turns the sum into the score. So the
result equals `sacrebleu.corpus_bleu` on the union of every rank's sentences, whatever the split.
"""

from __future__ import annotations

import sacrebleu
import torch
from torchmetrics import Metric


class SacreMetric(Metric):
    full_state_update = False
    higher_is_better = True

    def __init__(self, scorer: sacrebleu.metrics.base.Metric, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scorer = scorer
        n = len(scorer._extract_corpus_statistics(["a"], [["a"]])[0])
        self.add_state("stats", torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def signature(self) -> str:
        return str(self.scorer.get_signature())

    def update(self, hypotheses: list[str], references: list[str]) -> None:
        if not hypotheses:
            return
        stats = self.scorer._extract_corpus_statistics(hypotheses, [references])
        self.stats += torch.tensor(stats, dtype=torch.float64).sum(0).to(self.stats.device)

    def compute(self) -> torch.Tensor:
        stats = [int(x) for x in self.stats.tolist()]
        return torch.tensor(self.scorer._compute_score_from_stats(stats).score)


def BLEU(**kwargs) -> SacreMetric:
    return SacreMetric(sacrebleu.BLEU(), **kwargs)


def CHRF(**kwargs) -> SacreMetric:
    return SacreMetric(sacrebleu.CHRF(), **kwargs)
