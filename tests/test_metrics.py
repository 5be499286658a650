"""`translator.metrics`: the torchmetrics BLEU/chrF equal sacreBLEU's corpus scores whatever the update chunks, and
summing two instances' `stats` (what the DDP all-reduce does) scores the union of their sentences."""

from __future__ import annotations

import pytest
import sacrebleu
import torch
from conftest import read_pairs

from translator.metrics import BLEU, CHRF

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
