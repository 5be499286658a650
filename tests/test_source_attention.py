"""translator.source_attention: attention mass and entropy over the source by target position (decoder-only)."""

import copy
import math

import pytest
from conftest import read_pairs
from torch import nn

from translator import checkpoint
from translator.source_attention import source_attention
from translator.translate import attention_map


@pytest.fixture(scope="module")
def decoder_only(checkpoints):
    return checkpoint.load(checkpoints["decoder_only"])[:2]


def test_buckets_cover_every_target_position_with_valid_values(decoder_only):
    model, tokenizer = decoder_only
    pairs = read_pairs("val", 12)
    stats = source_attention(model, tokenizer, [s for s, _ in pairs], [t for _, t in pairs])
    expected = sum(len(tokenizer.encode([t])[0]) + 1 for _, t in pairs)  # <sep> y1 .. yn: n + 1 queries
    assert sum(r["queries"] for r in stats) == expected
    assert stats[0]["positions"] == "0-4" and stats[0]["queries"] == 5 * len(pairs)
    longest = max(len(tokenizer.encode([s])[0]) for s, _ in pairs)
    for r in stats:
        assert 0 < r["source_mass"] <= 1 and 0 <= r["source_entropy"] <= math.log(longest) + 1e-6


def test_one_layer_mass_is_the_attention_maps_source_share(decoder_only):
    """With one block, the mass is the head-averaged attention that `attention_map` draws, summed over the source."""
    model, tokenizer = decoder_only
    single = copy.deepcopy(model)
    single.blocks = nn.ModuleList(single.blocks[-1:])
    (source, reference), = read_pairs("val", 1)
    stats = source_attention(single, tokenizer, [source], [reference], edges=(0,))
    amap = attention_map(single, tokenizer, tokenizer.encode([source])[0], tokenizer.encode([reference])[0])
    assert stats[0]["source_mass"] == pytest.approx(amap.weights.sum(-1).mean().item(), rel=1e-5)


def test_an_encoder_decoder_is_refused(checkpoints):
    model, tokenizer, _ = checkpoint.load(checkpoints["seq2seq"])
    with pytest.raises(TypeError, match="decoder-only"):
        source_attention(model, tokenizer, ["Ein Hund."], ["A dog."])
