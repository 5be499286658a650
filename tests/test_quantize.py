"""CPU inference in int8 / bf16 (`translator.quantize`) on the trained test models of both architectures."""

import pytest
import torch
from conftest import read_pairs
from torch import nn

from translator import checkpoint, quantize
from translator.translate import translate


@pytest.fixture(scope="module")
def loaded(checkpoints):
    return {arch: checkpoint.load(path) for arch, path in checkpoints.items()}


@pytest.mark.parametrize("arch", ["seq2seq", "decoder_only"])
def test_int8_replaces_every_linear_and_keeps_the_greedy_translations(loaded, arch):
    model, tokenizer, _ = loaded[arch]
    q = quantize.for_cpu(model, "int8")
    assert not any(type(m) is nn.Linear for m in q.modules()), "a float nn.Linear is left"
    assert any(type(m) is nn.Linear for m in model.modules()), "the original model was changed"
    sources = [s for s, _ in read_pairs("val", 64)]
    fp32 = [t[0].text for t in translate(model, tokenizer, sources, beam=1)]
    int8 = [t[0].text for t in translate(q, tokenizer, sources, beam=1)]
    same = sum(a == b for a, b in zip(fp32, int8)) / len(sources)
    # the tiny test models (a few hundred steps) have many near-tied logits, so some sentences flip under int8's
    # rounding: 72% stayed in a fresh-clone CI run once training took the math attention kernel (75% or more before,
    # with other rounding in training); a broken quantisation changes most of them
    assert same >= 2 / 3, f"only {same:.0%} of greedy translations unchanged by int8"


@pytest.mark.parametrize("arch", ["seq2seq", "decoder_only"])
def test_int8_and_bf16_logits_stay_close(loaded, arch):
    model, tokenizer, _ = loaded[arch]
    (de, en), = read_pairs("val", 1)
    src, tgt = torch.tensor([tokenizer.encode(de)]), torch.tensor([[model.start_id, *tokenizer.encode(en)]])
    with torch.no_grad():
        ref = model(src, tgt).log_softmax(-1)
        for kind, tol in (("int8", 0.5), ("bf16", 0.5)):
            got = quantize.for_cpu(model, kind)(src, tgt).float().log_softmax(-1)
            # the most likely tokens keep their log-probabilities within tol nats
            top = ref.topk(5, dim=-1).indices
            assert (got.gather(-1, top) - ref.gather(-1, top)).abs().max() < tol, kind


def test_unknown_kind_is_a_clear_error(loaded):
    with pytest.raises(ValueError, match="expected one of none, int8, bf16"):
        quantize.for_cpu(loaded["seq2seq"][0], "int4")
