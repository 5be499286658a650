"""`translator.metrics`: the torchmetrics BLEU/chrF equal sacreBLEU's corpus scores whatever the update chunks, and
summing two instances' `stats` (what the DDP all-reduce does) scores the union of their sentences."""

from __future__ import annotations

import re

import pytest
import sacrebleu
import torch
from conftest import REPO, read_pairs
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from translator.compare import paired_bootstrap
from translator.metrics import BLEU, CHRF, SACREBLEU_TESTED, score_from_statistics, sentence_statistics

METRICS = {"bleu": (BLEU, sacrebleu.corpus_bleu), "chrf": (CHRF, sacrebleu.corpus_chrf)}


@pytest.fixture(scope="module")
def hyps_refs() -> tuple[list[str], list[str]]:
    """Real English references and imperfect 'translations' of them: words dropped, neighbours' words mixed in."""
    refs = [en for _, en in read_pairs("val", 300)]
    hyps = []
    for i, ref in enumerate(refs):
        words, other = ref.split(), refs[(i + 1) % len(refs)].split()
        kept = [w for j, w in enumerate(words) if (i + j) % 4 != 1]  # drop every 4th word
        hyps.append(" ".join(kept[: len(kept) // 2] + other[: i % 3] + kept[len(kept) // 2 :]))
    hyps[5] = ""  # an empty hypothesis counts (length 0, no matches)
    hyps[7] = refs[7]  # and an exact one
    return hyps, refs


def chunks(items: list[str], sizes: list[int]) -> list[list[str]]:
    out, start = [], 0
    for n in sizes:
        out.append(items[start : start + n])
        start += n
    assert start == len(items)
    return out


@pytest.mark.parametrize("name", METRICS)
@pytest.mark.parametrize("sizes", [[300], [1] * 300, [17, 0, 100, 3, 180]], ids=["one", "singles", "uneven"])
def test_chunked_updates_equal_sacrebleu_corpus_score(name, sizes, hyps_refs):
    make, corpus_score = METRICS[name]
    hyps, refs = hyps_refs
    metric = make()
    for h, r in zip(chunks(hyps, sizes), chunks(refs, sizes)):
        metric.update(h, r)
    expected = corpus_score(hyps, [refs]).score
    assert 5 < expected < 95  # a real, non-degenerate score
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)  # compute() returns float32


@pytest.mark.parametrize("name", METRICS)
def test_summed_states_of_two_ranks_equal_the_union(name, hyps_refs):
    """Two 'ranks' holding interleaved shards (as translator.data shards pairs: i % world) merge exactly."""
    make, corpus_score = METRICS[name]
    hyps, refs = hyps_refs
    ranks = [make(), make()]
    for r, metric in enumerate(ranks):
        metric.update(hyps[r::2], refs[r::2])
    expected = corpus_score(hyps, [refs]).score

    merged = make()
    merged.update([], [])  # marks it updated (no compute-before-update warning); adds nothing
    merged.stats = ranks[0].stats + ranks[1].stats  # the all-reduce of a dist_reduce_fx="sum" state
    assert merged.compute().item() == pytest.approx(expected, rel=1e-6)

    # torchmetrics' own merge (the same reduction its DDP sync applies)
    ranks[0].merge_state(ranks[1])
    assert ranks[0].compute().item() == merged.compute().item()

    # a single rank's score is not the union's: the merge is what makes the two equal
    assert make().stats.dtype == torch.float64
    assert corpus_score(hyps[0::2], [refs[0::2]]).score != pytest.approx(expected, rel=1e-6)


def test_state_is_exact_counts_and_reset_clears_it(hyps_refs):
    hyps, refs = hyps_refs
    metric = BLEU()
    metric.update(hyps, refs)
    stats = metric.stats
    assert torch.equal(stats, stats.round()) and stats.sum() > 0  # integer n-gram counts and lengths
    metric.update([], [])  # an empty update (a rank that decoded nothing) changes nothing
    assert torch.equal(metric.stats, stats)
    metric.reset()
    assert torch.equal(metric.stats, torch.zeros_like(stats))


def test_signatures_name_the_default_sacrebleu_settings():
    assert "tok:13a" in BLEU().signature and "smooth:exp" in BLEU().signature
    assert "nc:6" in CHRF().signature and "nw:0" in CHRF().signature


# ---- sacreBLEU internals (translator.metrics.sentence_statistics / score_from_statistics, compare.paired_bootstrap) --
CHANGED = (f"sacrebleu {sacrebleu.__version__} changed an internal that translator.metrics relies on (checked on "
           f"sacrebleu{SACREBLEU_TESTED}): update translator/metrics.py or pin a tested release")


def test_pyproject_pins_the_tested_sacrebleu_releases():
    pin = re.search(r'"sacrebleu([^"]*)"', (REPO / "pyproject.toml").read_text(encoding="utf-8")).group(1)
    assert pin == SACREBLEU_TESTED
    assert Version(sacrebleu.__version__) in SpecifierSet(SACREBLEU_TESTED), CHANGED


@pytest.mark.parametrize("name", METRICS)
def test_sacrebleu_statistics_are_per_sentence_counts_that_sum_to_the_corpus_score(name, hyps_refs):
    """What both functions must keep doing: one row of integer counts per sentence, of one length, whose sum over
    any subset scores that subset as `corpus_score` does."""
    hyps, refs = hyps_refs
    scorer = {"bleu": sacrebleu.BLEU, "chrf": sacrebleu.CHRF}[name]()
    stats = sentence_statistics(scorer, hyps, refs)
    assert isinstance(stats, list) and len(stats) == len(hyps), CHANGED
    assert len({len(row) for row in stats}) == 1, CHANGED
    assert all(float(x).is_integer() and x >= 0 for row in stats for x in row), CHANGED
    for subset in (slice(None), slice(0, 7), slice(3, None, 5)):
        summed = [sum(col) for col in zip(*stats[subset])]
        expected = scorer.corpus_score(hyps[subset], [refs[subset]]).score
        assert score_from_statistics(scorer, summed) == pytest.approx(expected, rel=1e-9), CHANGED
    if name == "bleu":  # the layout: lengths, then 1..4-gram matches, then 1..4-gram totals
        assert sentence_statistics(scorer, ["a b c d"], ["a b c e"]) == [[4, 4, 3, 2, 1, 0, 4, 3, 2, 1]], CHANGED


def test_a_missing_internal_is_one_clear_error(monkeypatch):
    monkeypatch.delattr(sacrebleu.metrics.base.Metric, "_extract_corpus_statistics")
    with pytest.raises(RuntimeError, match=r"has no BLEU\._extract_corpus_statistics.*pip install 'sacrebleu>=2"):
        BLEU()


def test_paired_bootstrap_checks_that_its_resamples_are_sacrebleus(hyps_refs, monkeypatch):
    """compare.paired_bootstrap redraws sacreBLEU's resamples (its seed, its index draw) for the intervals of the
    differences; a release that draws them otherwise must stop it, not give intervals of other resamples."""
    hyps, refs = hyps_refs
    other = [h.replace(" a ", " the ") for h in hyps]
    systems = [("a", hyps), ("b", other)]
    _, results = paired_bootstrap(refs, systems, n_samples=100)  # the same draw: no error
    assert results["b"]["BLEU"].delta != 0

    from sacrebleu import significance

    draw = significance._paired_bs_test  # (..., n_samples, n_ar_confidence, seed)
    monkeypatch.setattr(significance, "_paired_bs_test", lambda *args: draw(*args[:-1], 7))  # another seed
    with pytest.raises(RuntimeError, match="paired-bootstrap resamples otherwise"):
        paired_bootstrap(refs, systems, n_samples=100)
