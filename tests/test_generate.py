"""Greedy and beam search: exact hypotheses and scores against a scripted fake model, then the real models.

The fake model implements the decode-step interface of docs/design.md. Its state stores each row's source and
prefix, and its next-token probabilities are a hand-written function of (source, prefix), so the scores of the
search's hypotheses are only right if the search reorders the state along with its beams.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from translator import static_search
from translator.generate import Hypothesis, beam_search, greedy, length_factor
from translator.static_search import StaticState
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID, UNK_ID

A, B, C = 5, 6, 7  # ordinary tokens of the fake vocabulary
E = EOS_ID
V = 8
ln = math.log

Script = Callable[[tuple[int, ...], tuple[int, ...]], dict[int, float]]


class ScriptedState:
    def __init__(self, src: torch.Tensor) -> None:
        self.src = src  # (B, S)
        self.prefix = torch.empty((src.size(0), 0), dtype=torch.long)  # (B, t) tokens fed so far, start included

    def reorder(self, index: torch.Tensor, beams_only: bool = False) -> None:
        if beams_only:  # the search's promise: each new row comes from a row of the same source
            assert torch.equal(self.src[index], self.src)
        self.src, self.prefix = self.src[index], self.prefix[index]


class BrokenReorderState(ScriptedState):
    """Selects the right rows but in sorted order: a cache that forgets to permute."""

    def reorder(self, index: torch.Tensor, beams_only: bool = False) -> None:
        super().reorder(index.sort().values)


class ScriptedModel:
    """Next-token probabilities = script(source without pads, prefix without the start token)."""

    start_id = BOS_ID

    def __init__(self, script: Script, dtype: torch.dtype = torch.float32, state_cls=ScriptedState) -> None:
        self.script, self.dtype, self.state_cls = script, dtype, state_cls
        self.config = SimpleNamespace(eos_id=EOS_ID, pad_id=PAD_ID)
        self.rows: list[int] = []  # batch size of each decode_step call

    def init_state(self, src: torch.Tensor) -> ScriptedState:
        return self.state_cls(src.clone())

    def decode_step(self, tokens: torch.Tensor, state: ScriptedState) -> torch.Tensor:
        assert tokens.size(1) == 1 and tokens.size(0) == state.prefix.size(0)
        state.prefix = torch.cat([state.prefix, tokens], 1)
        self.rows.append(tokens.size(0))
        logits = torch.full((tokens.size(0), V), -math.inf)
        for r, (src, prefix) in enumerate(zip(state.src.tolist(), state.prefix.tolist())):
            assert prefix[0] == self.start_id
            for tok, p in self.script(tuple(s for s in src if s != PAD_ID), tuple(prefix[1:])).items():
                logits[r, tok] = ln(p)
        return logits.to(self.dtype).unsqueeze(1)  # (B, 1, V)


# Two finished hypotheses compete: [A] (p = .6 * .5 = .3) and [B, C] (p = .4 * .6 * 1 = .24).
# Raw log-prob prefers [A]; so does GNMT with alpha 1; `average` with alpha 1 and GNMT with alpha 2 prefer [B, C].
TABLE = {
    (): {A: 0.6, B: 0.4},
    (A,): {E: 0.5, A: 0.3, C: 0.2},
    (B,): {C: 0.6, A: 0.25, E: 0.15},
    (B, C): {E: 1.0},
    (A, A): {E: 0.6, B: 0.4},
}


def table(src, prefix):
    return TABLE.get(prefix, {E: 0.5, C: 0.5})


def loop(src, prefix):  # A forever, eos always .1: only the max length stops it
    return {A: 0.9, E: 0.1}


def by_source(src, prefix):  # a batch mixing both scripts, chosen by the first source token
    return table(src, prefix) if src[0] == A else loop(src, prefix)


def src_of(*rows: list[int]) -> torch.Tensor:
    S = max(map(len, rows))
    return torch.tensor([r + [PAD_ID] * (S - len(r)) for r in rows])


def assert_hyps(got: list[Hypothesis], want: list[tuple[list[int], float]]) -> None:
    assert [h.tokens for h in got] == [w[0] for w in want]
    assert [h.score for h in got] == pytest.approx([w[1] for w in want], rel=1e-5)


def gnmt(n, alpha):
    return ((5 + n) / 6) ** alpha


# ---- scripted model ------------------------------------------------------------------------------------------
def test_length_factor():
    assert length_factor(3, 0.0, "gnmt") == 1 and length_factor(3, 0.0, "average") == 1
    assert length_factor(3, 1.0, "gnmt") == pytest.approx(8 / 6)
    assert length_factor(3, 2.0, "average") == 9
    with pytest.raises(ValueError):
        length_factor(3, 1.0, "bogus")


@pytest.mark.parametrize(
    "alpha, penalty, want",
    [
        (0.0, "gnmt", [([A], ln(0.3)), ([B, C], ln(0.24))]),
        (0.0, "average", [([A], ln(0.3)), ([B, C], ln(0.24))]),
        (1.0, "average", [([B, C], ln(0.24) / 3), ([A], ln(0.3) / 2)]),
        (1.0, "gnmt", [([A], ln(0.3) / gnmt(2, 1)), ([B, C], ln(0.24) / gnmt(3, 1))]),
        (2.0, "gnmt", [([B, C], ln(0.24) / gnmt(3, 2)), ([A], ln(0.3) / gnmt(2, 2))]),
    ],
)
def test_beam_exact_hypotheses_and_length_penalty(alpha, penalty, want):
    model = ScriptedModel(table)
    (hyps,) = beam_search(model, src_of([A]), beam_size=2, nbest=2, length_penalty=alpha, penalty=penalty)
    assert_hyps(hyps, want)
    (best,) = beam_search(model, src_of([A]), beam_size=2, nbest=1, length_penalty=alpha, penalty=penalty)
    assert_hyps(best, want[:1])


def test_nbest_sorted_and_bounded():
    (hyps,) = beam_search(ScriptedModel(table), src_of([A]), beam_size=3, nbest=3, length_penalty=0.0)
    # step 1 keeps [B, C], [A, A], [A, C] (p .24, .18, .12); step 2 finishes [B, C] and [A, A] (p .108) as well
    assert_hyps(hyps, [([A], ln(0.3)), ([B, C], ln(0.24)), ([A, A], ln(0.108))])
    with pytest.raises(ValueError):
        beam_search(ScriptedModel(table), src_of([A]), beam_size=2, nbest=3)


def test_max_length_cuts_off_with_eos_scored():
    # max_len = int(0 * 1 + 1) = 1: every hypothesis is closed with eos after one token, scored with p(eos)
    (hyps,) = beam_search(ScriptedModel(table), src_of([A]), beam_size=2, nbest=2, length_penalty=0.0,
                          max_len_a=0, max_len_b=1)
    assert_hyps(hyps, [([A], ln(0.6 * 0.5)), ([B], ln(0.4 * 0.15))])
    assert greedy(ScriptedModel(loop), src_of([A, B]), max_len_a=0.5, max_len_b=2) == [[A, A, A]]  # int(3)
    assert greedy(ScriptedModel(loop), src_of([A, B]), max_len_a=0, max_len_b=0) == [[]]


def test_early_stopping_false_searches_on():
    kw = dict(beam_size=2, nbest=2, length_penalty=1.0, penalty="average", max_len_a=0, max_len_b=3, min_len=0)
    # fairseq early stopping: done once 2 hypotheses finished ([] at step 0, [A] at step 1)
    (hyps,) = beam_search(ScriptedModel(loop), src_of([B]), early_stopping=True, **kw)
    assert_hyps(hyps, [([A], ln(0.9 * 0.1) / 2), ([], ln(0.1))])
    # otherwise, longer hypotheses can still win under length normalisation: search until none can
    (hyps,) = beam_search(ScriptedModel(loop), src_of([B]), early_stopping=False, **kw)
    assert_hyps(hyps, [([A, A, A], ln(0.9**3 * 0.1) / 4), ([A, A], ln(0.9**2 * 0.1) / 3)])


def test_reorder_is_required():
    # at step 2 the live beams are [B, C] (from beam 1) and [A, A] (from beam 0): the cache must be permuted
    want = beam_search(ScriptedModel(table), src_of([A]), beam_size=2, nbest=2, length_penalty=0.0)
    broken = ScriptedModel(table, state_cls=BrokenReorderState)
    got = beam_search(broken, src_of([A]), beam_size=2, nbest=2, length_penalty=0.0)
    assert want == [[Hypothesis([A], pytest.approx(ln(0.3))), Hypothesis([B, C], pytest.approx(ln(0.24)))]]
    assert got != want  # the broken cache scores [B, C] with the prefix [A, C]: p(eos) .5 instead of 1


@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_size_one_equals_greedy_scripted(early_stopping):
    """One beam is greedy search, also without early stopping (it would otherwise search on after eos)."""
    for script, src in [(table, [A]), (loop, [A, B, C]), (by_source, [B, C])]:
        (hyps,) = beam_search(ScriptedModel(script), src_of(src), beam_size=1, nbest=1, early_stopping=early_stopping,
                              penalty="average", length_penalty=1.0)
        assert [h.tokens for h in hyps] == greedy(ScriptedModel(script), src_of(src))


def test_batch_equals_one_by_one_and_finished_sentences_leave_the_batch():
    # sentence 0 follows TABLE (max_len 3), sentence 1 loops (max_len 7)
    kw = dict(beam_size=2, nbest=2, length_penalty=1.0, penalty="average", early_stopping=False,
              max_len_a=2, max_len_b=1)
    model = ScriptedModel(by_source)
    batched = beam_search(model, src_of([A], [B, C, C]), **kw)
    alone = [beam_search(ScriptedModel(by_source), src_of(s), **kw)[0] for s in ([A], [B, C, C])]
    assert batched == alone
    assert_hyps(batched[0], [([B, C], ln(0.24) / 3), ([A], ln(0.3) / 2)])
    assert_hyps(batched[1], [([A] * 7, ln(0.9**7 * 0.1) / 8), ([A] * 6, ln(0.9**6 * 0.1) / 7)])
    # sentence 0 is done after step 2; the remaining steps only compute sentence 1's two beams
    assert model.rows == [4, 4, 4, 2, 2, 2, 2, 2]

    model = ScriptedModel(by_source)
    assert greedy(model, src_of([A], [B, C, C]), max_len_a=2, max_len_b=1) == [[A], [A] * 7]
    assert model.rows == [2, 2, 1, 1, 1, 1, 1, 1]


def test_special_tokens_never_generated():
    def greedy_for_pad(src, prefix):
        if not prefix:
            return {PAD_ID: 0.3, BOS_ID: 0.2, SEP_ID: 0.2, A: 0.15, UNK_ID: 0.05, E: 0.1}
        return {PAD_ID: 0.5, SEP_ID: 0.2, E: 0.3}

    assert greedy(ScriptedModel(greedy_for_pad), src_of([A])) == [[A]]
    (hyps,) = beam_search(ScriptedModel(greedy_for_pad), src_of([A]), beam_size=2, nbest=2, length_penalty=0.0,
                          min_len=0)
    # scores stay the model's own log-probs (no renormalisation over the allowed tokens)
    assert_hyps(hyps, [([], ln(0.1)), ([A], ln(0.15 * 0.3))])


def eager(src, prefix):  # eos is the likeliest token at every step
    return {E: 0.6, A: 0.3, B: 0.1} if len(prefix) < 3 else {E: 1.0}


def test_min_len_bans_eos_until_reached():
    kw = dict(beam_size=2, nbest=2, length_penalty=0.0)
    # without a minimum, eos wins at step 0: an empty translation
    assert greedy(ScriptedModel(eager), src_of([A]), min_len=0) == [[]]
    (hyps,) = beam_search(ScriptedModel(eager), src_of([A]), min_len=0, **kw)
    assert_hyps(hyps, [([], ln(0.6)), ([A], ln(0.3 * 0.6))])
    # the default, 1 for a non-empty source: eos cannot come first; scores stay the model's own log-probs
    assert greedy(ScriptedModel(eager), src_of([A])) == [[A]]
    (hyps,) = beam_search(ScriptedModel(eager), src_of([A]), **kw)
    assert_hyps(hyps, [([A], ln(0.3 * 0.6)), ([A, A], ln(0.3 * 0.3 * 0.6))])  # [B, eos] fell out of the beam
    # min_len=2; and a row whose source is empty may still end at once, in the same batch
    assert greedy(ScriptedModel(eager), src_of([A], []), min_len=2) == [[A, A], []]
    hyps = beam_search(ScriptedModel(eager), src_of([A], []), min_len=2, **kw)
    assert_hyps(hyps[0][:1], [([A, A], ln(0.3 * 0.3 * 0.6))])
    assert_hyps(hyps[1], [([], ln(0.6)), ([A], ln(0.3 * 0.6))])
    # the max length wins over the minimum: int(0 * 1 + 1) = 1 token, then eos
    assert greedy(ScriptedModel(eager), src_of([A]), max_len_a=0, max_len_b=1, min_len=5) == [[A]]
    with pytest.raises(ValueError, match="min_len"):
        greedy(ScriptedModel(eager), src_of([A]), min_len=-1)


def test_bf16_logits_are_searched_in_float32():
    (hyps,) = beam_search(ScriptedModel(table, dtype=torch.bfloat16), src_of([A]), beam_size=2, nbest=2,
                          length_penalty=1.0, penalty="average")
    assert [h.tokens for h in hyps] == [[B, C], [A]]
    assert [h.score for h in hyps] == pytest.approx([ln(0.24) / 3, ln(0.3) / 2], rel=1e-2)
    assert greedy(ScriptedModel(table, dtype=torch.bfloat16), src_of([A])) == [[A]]


# ---- real tiny models ----------------------------------------------------------------------------------------
class Uncached:
    """Reference: every step re-runs the model's teacher-forced forward over the whole prefix, no cache."""

    def __init__(self, model) -> None:
        self.model, self.config, self.start_id = model, model.config, model.start_id

    def init_state(self, src):
        return ScriptedState(src.clone())

    def decode_step(self, tokens, state):
        state.prefix = torch.cat([state.prefix, tokens], 1)
        tgt = state.prefix.clone()
        tgt[:, 0] = self.config.bos_id  # forward() takes `<bos> y1 ..` (the decoder-only model swaps in <sep>)
        return self.model(state.src, tgt)[:, -tokens.size(1):]


REAL_VOCAB = 48


def real_models():
    from translator.config import DecoderOnlyConfig, Seq2SeqConfig
    from translator.decoder_only import DecoderOnlyTransformer
    from translator.seq2seq import Seq2SeqTransformer

    return {
        "seq2seq": lambda: Seq2SeqTransformer(Seq2SeqConfig.preset("tiny", vocab_size=REAL_VOCAB)),
        "seq2seq-rope": lambda: Seq2SeqTransformer(
            Seq2SeqConfig.preset("tiny", vocab_size=REAL_VOCAB, positions="rope")),
        "decoder-only": lambda: DecoderOnlyTransformer(DecoderOnlyConfig.preset("tiny", vocab_size=REAL_VOCAB)),
        "decoder-only-causal-rope": lambda: DecoderOnlyTransformer(DecoderOnlyConfig.preset(
            "tiny", vocab_size=REAL_VOCAB, positions="rope", prefix_mode="causal", rope_restart=True)),
    }


REAL = ["seq2seq", "seq2seq-rope", "decoder-only", "decoder-only-causal-rope"]


@pytest.fixture(params=REAL)
def real(request):
    torch.manual_seed(0)
    model = real_models()[request.param]().eval()
    with torch.no_grad():  # make eos likely enough that hypotheses finish at different lengths
        model.lm_head.weight[EOS_ID] *= 4
    g = torch.Generator().manual_seed(1)
    lengths = [5, 2, 7]
    rows = [torch.randint(5, REAL_VOCAB, (n,), generator=g).tolist() for n in lengths]
    return model, src_of(*rows)


def test_real_cached_beam_equals_uncached(real):
    model, src = real
    kw = dict(beam_size=4, nbest=4, max_len_a=1.0, max_len_b=4)
    cached, uncached = beam_search(model, src, **kw), beam_search(Uncached(model), src, **kw)
    for got, want in zip(cached, uncached):
        assert [h.tokens for h in got] == [h.tokens for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-4)
    assert greedy(model, src, max_len_a=1.0, max_len_b=4) == greedy(Uncached(model), src, max_len_a=1.0, max_len_b=4)


@pytest.mark.parametrize("early_stopping", [True, False])
def test_real_beam_one_equals_greedy(real, early_stopping):
    model, src = real
    hyps = beam_search(model, src, beam_size=1, early_stopping=early_stopping)
    assert [h[0].tokens for h in hyps] == greedy(model, src)


def test_real_batched_equals_one_by_one(real):
    model, src = real
    kw = dict(beam_size=3, nbest=3, max_len_a=1.0, max_len_b=4)
    batched, batched_greedy = beam_search(model, src, **kw), greedy(model, src)
    for i in range(src.size(0)):
        row = src[i : i + 1, : int((src[i] != PAD_ID).sum())]  # alone, without padding
        (alone,) = beam_search(model, row, **kw)
        assert [h.tokens for h in batched[i]] == [h.tokens for h in alone]
        assert [h.score for h in batched[i]] == pytest.approx([h.score for h in alone], abs=1e-4)
        assert batched_greedy[i] == greedy(model, row)[0]
    assert model.training is False  # the search leaves the mode alone


# ---- the static search (fixed shapes, CUDA graphs on a GPU) ----------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        dict(beam_size=4, nbest=4, max_len_a=1.0, max_len_b=4),
        dict(beam_size=3, nbest=2, length_penalty=0.0, early_stopping=False),
        dict(beam_size=2, length_penalty=1.5, penalty="average", max_len_a=0.5, max_len_b=1),
        dict(beam_size=1),
    ],
    ids=["nbest", "no-early-stop", "average-short", "beam1"],
)
def test_real_static_equals_dynamic(real, kw):
    """Same hypotheses and scores, although the static search keeps done sentences' rows to the end."""
    model, src = real
    dynamic, static = beam_search(model, src, **kw), beam_search(model, src, static=True, **kw)
    for got, want in zip(static, dynamic):
        assert [h.tokens for h in got] == [h.tokens for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
    if kw["beam_size"] == 1:
        assert greedy(model, src, static=True) == greedy(model, src)


def test_real_min_len_static_equals_dynamic(real):
    """With eos the likeliest first token, min_len keeps every hypothesis at least that long, the same in both
    searches."""
    model, src = real
    with torch.no_grad():  # a feature that is large at every position and points to eos
        (model.dec_norm if hasattr(model, "dec_norm") else model.norm).bias[0] += 4.0
        model.lm_head.weight[EOS_ID, 0] += 3.0
    kw = dict(beam_size=3, nbest=3, max_len_a=1.0, max_len_b=4)
    assert any(h.tokens == [] for hs in beam_search(model, src, min_len=0, **kw) for h in hs)  # eos can win at once
    assert [] in greedy(model, src, min_len=0)
    dynamic, static = beam_search(model, src, min_len=3, **kw), beam_search(model, src, static=True, min_len=3, **kw)
    assert all(len(h.tokens) >= 3 for hs in dynamic for h in hs)
    for got, want in zip(static, dynamic):
        assert [h.tokens for h in got] == [h.tokens for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
    assert greedy(model, src, static=True, min_len=3) == greedy(model, src, min_len=3)
    assert all(len(tokens) >= 3 for tokens in greedy(model, src, min_len=3))


def test_static_step_keeps_shapes_and_addresses(real):
    """What a CUDA graph needs: in a StaticState, steps and beam reorders update the same tensors in place."""
    model, src = real
    with torch.inference_mode():
        state = model.init_state(src)
        state.reorder(torch.arange(src.size(0)).repeat_interleave(2))
        state = StaticState.of(state, 6)

        def buffers():
            return [(t.data_ptr(), t.shape) for layer in state.layers for t in (layer.self_kv.k, layer.self_kv.v)]

        before, pos = buffers(), state.pos.data_ptr()
        last = torch.full((state.pos.size(0), 1), model.start_id)
        for step in range(4):
            logits = model.decode_step(last, state)
            last = logits[:, -1].argmax(-1, keepdim=True)
            state.reorder(torch.arange(state.pos.size(0)).view(-1, 2).flip(1).reshape(-1), beams_only=True)
        assert buffers() == before and state.pos.data_ptr() == pos
        assert int(state.layers[-1].self_kv.filled) == state.length - 6 + 4
        with pytest.raises(ValueError, match="keeps its rows"):  # dropping rows would reallocate
            state.reorder(torch.tensor([0]))


def test_static_decoding_equals_dynamic_logits(real):
    """Step by step, the fixed-size cache (stale slots masked out) gives the growing cache's logits."""
    model, src = real
    tokens = torch.randint(5, REAL_VOCAB, (src.size(0), 5), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = model.start_id
    with torch.inference_mode():
        dynamic, static = model.init_state(src), StaticState.of(model.init_state(src), 5)
        for t in range(5):
            want = model.decode_step(tokens[:, t : t + 1], dynamic)
            torch.testing.assert_close(model.decode_step(tokens[:, t : t + 1], static), want, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="one token per step"):
            model.decode_step(tokens[:, :2], static)


class SyncAudit(TorchDispatchMode):
    """Records the ops a CUDA graph capture cannot hold: host syncs, data-dependent shapes, host-to-device copies of
    Python values."""

    FORBIDDEN = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "masked_select", "lift_fresh",
                 "lift_fresh_copy", "unique", "_unique2", "equal"}

    def __init__(self) -> None:
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.FORBIDDEN or (name == "index" and any(
                i is not None and i.dtype == torch.bool for i in args[1])):
            self.bad.append(str(func))
        return func(*args, **(kwargs or {}))


def step_tensors(one_step) -> dict[str, torch.Tensor]:
    """Every tensor a static step can reach: its closure's, and the decode state's."""
    out = {}
    for name, cell in zip(one_step.__code__.co_freevars, one_step.__closure__):
        value = cell.cell_contents
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, tuple):
            out.update({f"{name}[{i}]": v for i, v in enumerate(value) if isinstance(v, torch.Tensor)})
        elif hasattr(value, "layers"):  # the DecodeState
            for i, layer in enumerate(value.layers):
                for kind in ("self_kv", "cross_kv"):
                    kv = getattr(layer, kind)
                    out.update({f"{kind}{i}.{a}": getattr(kv, a) for a in ("k", "v", "filled")
                                if getattr(kv, a, None) is not None})  # the cross K/V have no `filled`
            out.update({a: getattr(value, a) for a in ("key_pad", "pos", "seen")})
    return out


def test_static_step_is_capturable(real, monkeypatch):
    """The CUDA-graph contract, checked on CPU: after the warm-up step, a step runs no host-syncing op and reads and
    writes only tensors that keep their identity, address and shape; the search still equals the dynamic one."""
    model, src = real
    checked = []

    def audited(one_step, done, cap):
        one_step()  # step 0: the warm-up
        if cap == 0 or done.all():
            return
        before = {k: (id(v), v.data_ptr(), v.shape) for k, v in step_tensors(one_step).items()}
        with SyncAudit() as audit:
            one_step()  # what capture would record
        assert audit.bad == []
        assert {k: (id(v), v.data_ptr(), v.shape) for k, v in step_tensors(one_step).items()} == before
        checked.append(len(before))
        for _ in range(cap - 1):
            one_step()
            if done.all():
                break

    monkeypatch.setattr(static_search, "_run_static", audited)
    kw = dict(beam_size=3, nbest=2, max_len_a=1.0, max_len_b=4)
    static, dynamic = beam_search(model, src, static=True, **kw), beam_search(model, src, **kw)
    assert checked and checked[0] >= 19  # the search's 11 tensors, the state's 3 and every layer's cache
    assert [[h.tokens for h in hs] for hs in static] == [[h.tokens for h in hs] for hs in dynamic]


def test_empty_batch(real):
    model, _ = real
    empty = torch.zeros((0, 4), dtype=torch.long)
    for static in (False, True):
        assert beam_search(model, empty, static=static) == [] and greedy(model, empty, static=static) == []
