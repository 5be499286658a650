"""Paired bootstrap resampling of BLEU and chrF (sacreBLEU's test), every system or arm of seeds against the first.

The test is sacreBLEU's (`sacrebleu.significance.PairedTest`, test_type="bs": its seed, its draw of resampled
sentences, its p-value), computed here from sacreBLEU's sufficient statistics so that it also serves arms of several
runs, and checked against sacreBLEU's own run of it. Reported per system: the score, the bootstrap mean and 95%
half-width, and against the baseline the difference with its 95% interval (from the same resamples) and the p-value.
One correction: sacreBLEU counts only resampled statistics strictly above the observed one, so two systems whose
per-sentence statistics are identical get p = 1/(n+1) ~ 0.001 ("significant"); such a pair is reported with p = 1
(the difference is 0 in every resample)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import sacrebleu
from sacrebleu.significance import PairedTest, estimate_ci

from translator.metrics import SACREBLEU_TESTED, sacrebleu_internal, score_from_statistics, sentence_statistics

ALPHA = 0.05  # a difference with p < ALPHA is reported as significant


@dataclass
class Paired:
    """One metric of one system (or arm of seeds) against the baseline (the first)."""

    score: float  # the corpus score (an arm's: the mean of its runs' scores)
    mean: float | None  # bootstrap mean of the score
    ci: float | None  # half-width of its 95% interval
    delta: float | None = None  # system - baseline (None for the baseline)
    delta_ci: tuple[float, float] | None = None  # 95% interval of the resampled differences
    p_value: float | None = None  # sacreBLEU's paired bootstrap p-value (tie-corrected, see the module docstring)
    deltas: np.ndarray | None = field(default=None, repr=False)  # the resampled differences (not in the report)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "deltas"}


def _resampled_scores(metric, stats: np.ndarray, idxs: np.ndarray) -> np.ndarray:
    """Corpus score of each resample: stats (N, k) per-sentence statistics, idxs (R, N) sentence indices -> (R,)."""
    return np.array([score_from_statistics(metric, s.sum(0)) for s in stats[idxs]])


def _p_value(deltas: np.ndarray, delta: float) -> float:
    """sacreBLEU's paired-bootstrap p-value: the share of centred resampled |differences| strictly above the observed
    one, +1 smoothed; 1 when the difference is 0 in every resample (see the module docstring)."""
    if delta == 0 and not deltas.any():
        return 1.0
    diffs = np.abs(deltas)
    return (int(np.sum(diffs - diffs.mean() > abs(delta))) + 1) / (len(deltas) + 1)


def paired_bootstrap(references: list[str], systems: list[tuple[str, list[str]]], n_samples: int = 1000
                     ) -> tuple[dict[str, str], dict[str, dict[str, Paired]]]:
    """sacreBLEU's paired bootstrap of BLEU and chrF, every system (hypotheses of one run) against `systems[0]`:
    `bootstrap_arms` with one run per arm."""
    return bootstrap_arms(references, [(name, [hyps]) for name, hyps in systems], n_samples)


def bootstrap_arms(references: list[str], arms: list[tuple[str, list[list[str]]]], n_samples: int = 1000
                   ) -> tuple[dict[str, str], dict[str, dict[str, Paired]]]:
    """Paired bootstrap of BLEU and chrF, every arm (the hypotheses of one or more runs: seeds) against `arms[0]`.

    Each resample draws N sentences with replacement; every run is scored on those sentences and an arm's score is the
    mean over its runs (seeds), so the observed score is the mean of the runs' corpus scores, and the test asks whether
    the seed-averaged systems differ beyond what the choice of sentences explains. Seed-to-seed variation is not in
    the p-value: report it beside (the standard deviation over seeds). With one run per arm this is exactly
    sacreBLEU's test.

    Returns ({metric: signature}, {arm: {metric: Paired}}), metric in ("BLEU", "chrF"). The seed is sacreBLEU's
    (`SACREBLEU_SEED`, default 12345; it is in the signature). The draw of the resamples is sacreBLEU's, not a
    public API: sacreBLEU's `PairedTest` runs on the first run of every arm, and its bootstrap mean and interval must
    be ours for that run, so that a release drawing them otherwise stops here instead of giving intervals of other
    resamples (unless `SACREBLEU_SEED=none`: then no two draws are the same anyway).
    """
    metrics = {"BLEU": sacrebleu.BLEU(), "chrF": sacrebleu.CHRF()}
    test = PairedTest([(name, runs[0]) for name, runs in arms], metrics, [references], test_type="bs",
                      n_samples=n_samples)
    signatures, checks = test()
    ours = dict(zip(test.metrics, metrics))  # sacreBLEU names chrF "chrF2"
    # the index draw of sacrebleu.significance._paired_bs_test, so that our resamples are its resamples
    seed = sacrebleu_internal(test, "_seed") or None
    N = len(references)
    idxs = np.random.default_rng(seed).choice(N, size=(test.n_samples, N), replace=True)
    out: dict[str, dict[str, Paired]] = {name: {} for name, _ in arms}
    for key, metric in test.metrics.items():
        scores, resampled = [], []  # per arm: mean observed score, (R,) mean resampled score
        for (name, runs), check in zip(arms, checks[key]):
            stats = [np.array(sentence_statistics(metric, hyps, references), dtype=np.int64) for hyps in runs]
            per_run = [_resampled_scores(metric, s.astype("float32"), idxs) for s in stats]  # sacreBLEU's float32
            if seed is not None and not np.allclose(estimate_ci(per_run[0]), (check.mean, check.ci), rtol=1e-9, atol=1e-9):
                raise RuntimeError(
                    f"sacrebleu {sacrebleu.__version__} draws its paired-bootstrap resamples otherwise than translator "
                    f"reproduces them ({key} of {name!r}: mean {per_run[0].mean()} vs sacreBLEU's {check.mean}); "
                    f"install a tested release: pip install 'sacrebleu{SACREBLEU_TESTED}'"
                )
            scores.append(float(np.mean([score_from_statistics(metric, s.sum(0)) for s in stats])))
            resampled.append(np.mean(per_run, axis=0))
        for i, (name, _) in enumerate(arms):
            mean, ci = estimate_ci(resampled[i])
            if i == 0:
                out[name][ours[key]] = Paired(scores[0], mean, ci)
                continue
            deltas = resampled[i] - resampled[0]
            ordered = np.sort(deltas)
            lo = len(ordered) // 40  # sacrebleu.significance.estimate_ci's 95% convention
            delta = scores[i] - scores[0]
            out[name][ours[key]] = Paired(scores[i], mean, ci, delta, (float(ordered[lo]), float(ordered[-lo - 1])),
                                          _p_value(deltas, delta), deltas)
    return {ours[k]: str(v) for k, v in signatures.items()}, out
