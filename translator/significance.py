"""Paired bootstrap resampling of BLEU and chrF (sacreBLEU's test), every system against the first.

From sacreBLEU (`sacrebleu.significance.PairedTest`, test_type="bs"): the scores, each system's bootstrap mean and 95%
half-width, and the p-value. Added here, from the same resamples (same seed, same draw, sacreBLEU's sufficient
statistics): the difference system - baseline with its 95% interval. One correction: sacreBLEU counts only resampled
statistics strictly above the observed one, so two systems whose per-sentence statistics are identical get
p = 1/(n+1) ~ 0.001 ("significant"); such a pair is reported with p = 1 (the difference is 0 in every resample).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import sacrebleu
from sacrebleu.significance import PairedTest, estimate_ci

from translator.metrics import SACREBLEU_TESTED, sacrebleu_internal, score_from_statistics, sentence_statistics


@dataclass
class Paired:
    """One metric of one system against the baseline (the first system)."""

    score: float
    mean: float | None  # sacreBLEU: bootstrap mean of the system's score
    ci: float | None  # sacreBLEU: half-width of its 95% interval
    delta: float | None = None  # system - baseline (None for the baseline)
    delta_ci: tuple[float, float] | None = None  # 95% interval of the resampled differences
    p_value: float | None = None  # sacreBLEU's paired bootstrap p-value (tie-corrected, see the module docstring)
    deltas: np.ndarray | None = field(default=None, repr=False)  # the resampled differences (not in the report)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "deltas"}


def _resampled_scores(metric, stats: np.ndarray, idxs: np.ndarray) -> np.ndarray:
    return np.array([score_from_statistics(metric, s.sum(0)) for s in stats[idxs]])


def paired_bootstrap(references: list[str], systems: list[tuple[str, list[str]]], n_samples: int = 1000
                     ) -> tuple[dict[str, str], dict[str, dict[str, Paired]]]:
    """sacreBLEU's paired bootstrap of BLEU and chrF, every system against `systems[0]`.

    Returns ({metric: signature}, {system: {metric: Paired}}), metric in ("BLEU", "chrF"). The seed is sacreBLEU's
    (`SACREBLEU_SEED`, default 12345; it is in the signature). The draw of the resamples is sacreBLEU's, not a
    public API: each system's resampled scores are checked against the mean and interval that sacreBLEU reports, so
    that a release drawing them otherwise stops here instead of giving intervals of other resamples (unless
    `SACREBLEU_SEED=none`: then no two draws are the same anyway).
    """
    metrics = {"BLEU": sacrebleu.BLEU(), "chrF": sacrebleu.CHRF()}
    test = PairedTest(systems, metrics, [references], test_type="bs", n_samples=n_samples)
    signatures, scores = test()
    ours = dict(zip(test.metrics, metrics))  # sacreBLEU names chrF "chrF2"
    # the index draw of sacrebleu.significance._paired_bs_test, so that our intervals come from its resamples
    seed = sacrebleu_internal(test, "_seed") or None
    N = len(references)
    out: dict[str, dict[str, Paired]] = {name: {} for name, _ in systems}
    for key, metric in test.metrics.items():
        results = scores[key]
        base_stats = np.array(sentence_statistics(metric, systems[0][1], references), dtype="float32")
        base = results[0]
        out[systems[0][0]][ours[key]] = Paired(base.score, base.mean, base.ci)
        for (name, hyps), res in zip(systems[1:], results[1:]):
            idxs = np.random.default_rng(seed).choice(N, size=(test.n_samples, N), replace=True)
            stats = np.array(sentence_statistics(metric, hyps, references), dtype="float32")
            resampled = _resampled_scores(metric, stats, idxs)
            if seed is not None and not np.allclose(estimate_ci(resampled), (res.mean, res.ci), rtol=1e-9, atol=1e-9):
                raise RuntimeError(
                    f"sacrebleu {sacrebleu.__version__} draws its paired-bootstrap resamples otherwise than translator "
                    f"reproduces them ({key} of {name!r}: mean {resampled.mean()} vs sacreBLEU's {res.mean}); install a "
                    f"tested release: pip install 'sacrebleu{SACREBLEU_TESTED}'"
                )
            deltas = resampled - _resampled_scores(metric, base_stats, idxs)
            ordered = np.sort(deltas)
            lo = len(ordered) // 40  # sacrebleu.significance.estimate_ci's 95% convention
            p = 1.0 if np.array_equal(stats, base_stats) else res.p_value
            out[name][ours[key]] = Paired(res.score, res.mean, res.ci, res.score - base.score,
                                          (float(ordered[lo]), float(ordered[-lo - 1])), p, deltas)
    return {ours[k]: str(v) for k, v in signatures.items()}, out

