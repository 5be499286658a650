"""Greedy and beam search over the decode-step interface shared by both models (see ``docs/design.md``).

The search talks to the model only through ``model.start_id``, ``model.config.eos_id``, ``model.config.pad_id``,
``model.init_state(src)``, ``model.decode_step(tokens, state)`` and ``state.reorder(index)``, so one implementation
serves the encoder-decoder and the decoder-only Transformer (and the scripted fake model in the tests).

Everything is batched over ``(sentences x beams)`` rows; there is no Python loop per sentence or per beam during the
search. A sentence that is done is dropped from the active batch (``state.reorder`` with a shrinking index), so its
rows are never computed again.

Callers should put the model in eval mode (``model.eval()``) first: these functions leave the mode alone, so that
dropout stays under the caller's control. They run under ``torch.inference_mode()`` themselves.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from functools import partial
from typing import Literal, Protocol, get_args

import torch
from torch import Tensor

from translator import static_search
from translator.tokenizer import BOS_ID, SEP_ID

Penalty = Literal["gnmt", "average"]
PENALTIES: tuple[Penalty, ...] = get_args(Penalty)

# The decoding defaults, in one place, chosen on Multi30k *validation* with scripts/tune_decoding.py (docs/results.md,
# "Length"): the average log-probability (score / len**1.0) searched without early stopping, as HF `generate` does,
# was the best setting on val for each of the three quickstart checkpoints it was tried on (+0.2 to +1.05 BLEU over
# GNMT 2.0 with early stopping, the default before). Every caller (translate, the modules' test/predict, compare,
# the engines, the scripts) uses them.
LENGTH_PENALTY: float = 1.0  # alpha
PENALTY: Penalty = "average"  # how the summed log-prob is normalised by length
EARLY_STOPPING: bool = False  # True: stop at beam_size finished hypotheses (fairseq); False: when none can be beaten
MIN_LEN: int = 1


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The beam search's length options of the scripts: --length-penalty, --penalty, --[no-]early-stopping."""
    parser.add_argument("--length-penalty", type=float, default=LENGTH_PENALTY, metavar="ALPHA",
                        help=f"length penalty alpha (default {LENGTH_PENALTY})")
    parser.add_argument("--penalty", choices=PENALTIES, default=PENALTY,
                        help=f"length normalisation: gnmt ((5+len)/6)**alpha or average len**alpha (default {PENALTY})")
    parser.add_argument("--early-stopping", action=argparse.BooleanOptionalAction, default=EARLY_STOPPING,
                        help="end a sentence's search at beam-size finished hypotheses (fairseq) rather than when "
                             "no live beam can beat them (default: %(default)s)")


class DecodeState(Protocol):
    def reorder(self, index: Tensor, beams_only: bool = False) -> None: ...


class DecodeModel(Protocol):
    """What the search needs from a model (both Transformers implement it)."""

    start_id: int
    config: object  # has eos_id and pad_id

    def init_state(self, src: Tensor) -> DecodeState: ...

    def decode_step(self, tokens: Tensor, state: DecodeState) -> Tensor: ...


@dataclass
class Hypothesis:
    """A finished translation: token ids without bos/eos, and its length-normalised log-probability."""

    tokens: list[int]
    score: float


# ---- helpers ---------------------------------------------------------------------------------------------------
def length_factor(length: Tensor | float, alpha: float, penalty: Penalty = "gnmt") -> Tensor | float:
    """Divisor of the summed log-prob; ``length`` counts eos. GNMT: ((5+len)/6)**alpha; average: len**alpha."""
    if penalty == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    if penalty == "average":
        return length**alpha
    raise ValueError(f"unknown length penalty {penalty!r}; expected 'gnmt' or 'average'")


def max_lengths(src: Tensor, pad_id: int, max_len_a: float, max_len_b: float) -> Tensor:
    """Per-sentence cap on output tokens (eos not counted): ``int(a * src_len + b)``, src_len = non-pad tokens.

    Returns (B,) int64. Computed in float64 so that it matches Python's ``int(a * n + b)`` exactly.
    """
    src_len = (src != pad_id).sum(1).double()  # (B,)
    return (max_len_a * src_len + max_len_b).long().clamp_min(0)  # .long() truncates like int()


def min_lengths(src: Tensor, pad_id: int, min_len: int, max_len: Tensor) -> Tensor:
    """Per-sentence minimum of output tokens (eos not counted) before eos may come: ``min_len`` for a non-empty
    source, 0 for an empty one (its translation may be empty), never above ``max_len`` (B,). Returns (B,) int64."""
    if min_len < 0:
        raise ValueError(f"min_len must be >= 0, got {min_len}")
    return torch.where((src != pad_id).any(1), min_len, 0).minimum(max_len)


def _banned_ids(model: DecodeModel) -> list[int]:
    """Ids the search never emits: pad, bos, sep and whatever the model starts decoding with."""
    eos = model.config.eos_id
    return sorted({model.config.pad_id, BOS_ID, SEP_ID, model.start_id} - {eos})


def _next_lprobs(model: DecodeModel, banned: Tensor, last: Tensor, state: DecodeState,
                 force_eos: Tensor, ban_eos: Tensor) -> Tensor:
    """Float32 log-probs of the next token for each row, with banned ids at -inf.

    banned: (n,) ids, on the device; last: (R, 1) previous token per row; force_eos: (R,) bool, rows that must end
    now (max length reached), which keep only eos (scored with the model's own eos log-prob); ban_eos: (R,) bool,
    rows that may not end yet (min length not reached; never together with force_eos). Returns (R, V).
    """
    logits = model.decode_step(last, state)[:, -1]  # (R, V)
    lprobs = logits.float().log_softmax(-1)  # float32 even for bf16 models
    lprobs.index_fill_(1, banned, -math.inf)
    is_eos = torch.arange(lprobs.size(-1), device=lprobs.device) == model.config.eos_id  # (V,)
    lprobs = lprobs.masked_fill(force_eos.unsqueeze(1) & ~is_eos, -math.inf)  # no host sync
    return lprobs.masked_fill(ban_eos.unsqueeze(1) & is_eos, -math.inf)


# ---- greedy ----------------------------------------------------------------------------------------------------
def greedy(
    model: DecodeModel, src: Tensor, max_len_a: float = 1.2, max_len_b: float = 10, static: bool = False,
    min_len: int = MIN_LEN,
) -> list[list[int]]:
    """Greedy decoding. src: (B, S) right-padded source ids. Returns token ids (no bos/eos) per sentence.

    A sentence stops at eos or after ``int(a * src_len + b)`` tokens; finished sentences leave the batch, and the
    loop ends as soon as all have stopped. eos cannot come before ``min_len`` tokens (``min_lengths``: an empty
    source may end at once). ``static=True``: the static beam search with one beam (CUDA graphs on a GPU; see
    ``beam_search``), which finds the same tokens.
    """
    if static:
        hyps = beam_search(model, src, 1, max_len_a=max_len_a, max_len_b=max_len_b, static=True, min_len=min_len)
        return [h[0].tokens for h in hyps]
    with torch.inference_mode():
        eos = model.config.eos_id
        B, device = src.size(0), src.device
        banned = torch.tensor(_banned_ids(model), device=device)
        max_len = max_lengths(src, model.config.pad_id, max_len_a, max_len_b).to(device)  # (B,)
        min_len = min_lengths(src, model.config.pad_id, min_len, max_len)  # (B,)
        cap = int(max_len.max()) if B else 0
        out = torch.full((B, cap), model.config.pad_id, dtype=torch.long, device=device)  # (B, cap)
        lengths = max_len.clone()  # (B,) overwritten when eos comes early

        state = model.init_state(src)
        active = torch.arange(B, device=device)  # (A,) original index of each live row
        last = torch.full((B, 1), model.start_id, dtype=torch.long, device=device)  # (A, 1)
        for t in range(cap + 1):
            if active.numel() == 0:
                break
            force_eos = max_len[active] == t  # (A,)
            lprobs = _next_lprobs(model, banned, last, state, force_eos, min_len[active] > t)  # (A, V)
            tok = lprobs.argmax(-1).masked_fill(force_eos, eos)  # (A,)
            ended = tok == eos  # (A,)
            if t < cap:
                out[active, t] = tok
            lengths[active[ended]] = t
            if ended.any():
                keep = (~ended).nonzero().squeeze(1)  # (A',)
                state.reorder(keep)
                active, tok = active[keep], tok[keep]
            last = tok.unsqueeze(1)
        return [row[:n] for row, n in zip(out.tolist(), lengths.tolist())]


# ---- beam search -----------------------------------------------------------------------------------------------
def beam_search(
    model: DecodeModel,
    src: Tensor,
    beam_size: int = 5,
    length_penalty: float = LENGTH_PENALTY,
    max_len_a: float = 1.2,
    max_len_b: float = 10,
    nbest: int = 1,
    early_stopping: bool = EARLY_STOPPING,
    penalty: Penalty = PENALTY,
    static: bool = False,
    min_len: int = MIN_LEN,
) -> list[list[Hypothesis]]:
    """Beam search over the model's KV cache. src: (B, S) right-padded source ids.

    Returns, per sentence, the ``nbest`` best finished hypotheses sorted by score (best first), where
    score = sum of token log-probs (eos included) / penalty(len), len counting eos, and penalty is GNMT
    ``((5+len)/6)**alpha`` or ``len**alpha`` (``penalty="average"``), alpha = ``length_penalty``.

    Each step scores ``beam_size * V`` extensions per sentence by raw summed log-prob and keeps the best
    ``2 * beam_size`` (fairseq): eos candidates among the top ``beam_size`` are finished (normalised, then
    merged into the sentence's ``beam_size`` best finished hypotheses); the best ``beam_size`` others go on.
    A hypothesis reaching ``int(a * src_len + b)`` tokens is closed with eos (scored with its log-prob); one with
    fewer than ``min_len`` tokens cannot take eos (``min_lengths``: an empty source may end at once), as in fairseq.

    A sentence is done:
      - ``early_stopping=True``: once it has ``beam_size`` finished hypotheses (fairseq);
      - ``early_stopping=False``: once it has ``beam_size`` finished hypotheses and no live beam can still beat the
        worst of them, whatever its future length. Log-probs are <= 0, so a live beam's best possible score is
        ``score / max(penalty(len + 1), penalty(max_len + 1))``; that is a true upper bound, so stopping never
        loses a hypothesis that the beam could still have found (but it may search up to max length);
      - in either case, at max length, or when no live beam has a finite score left.
    ``beam_size=1`` always stops early, which makes it greedy search (HF runs greedy search for one beam too).

    Two ways to run the same search, with the same results:
      - dynamic (default): done sentences are dropped from the batch (``state.reorder``), so they cost nothing
        afterwards; one host sync per step decides which rows remain;
      - ``static=True`` (``translator/static_search.py``): every row stays to the end of the batch (a done
        sentence's rows run on, and are ignored), the caches are fixed-size buffers, and each step updates fixed
        tensors in place, so that on CUDA the step is captured once as a CUDA graph and replayed. Needs a model whose
        state is a ``translator.cache.DecodeState``.
    A sentence gets fewer than ``nbest`` hypotheses only if the model gives eos probability 0 (scripted models).
    """
    if beam_size < 1 or not 1 <= nbest <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= nbest <= beam_size, got {beam_size=} {nbest=}")
    K = beam_size
    with torch.inference_mode():
        B, device, pad = src.size(0), src.device, model.config.pad_id
        banned = torch.tensor(_banned_ids(model), device=device)
        max_len = max_lengths(src, pad, max_len_a, max_len_b).to(device)  # (B,)
        min_len = min_lengths(src, pad, min_len, max_len)  # (B,)
        cap = int(max_len.max()) if B else 0
        step = partial(_beam_step, K=K, eos=model.config.eos_id, alpha=length_penalty, penalty=penalty,
                       early_stopping=early_stopping or K == 1, ranks=torch.arange(2 * K, device=device))

        # finished hypotheses, kept as the K best per sentence (sorted), -inf where empty
        fin_scores = torch.full((B, K), -math.inf, device=device)  # (B, K)
        fin_tokens = torch.full((B, K, cap), pad, dtype=torch.long, device=device)  # (B, K, cap)
        fin_lens = torch.zeros((B, K), dtype=torch.long, device=device)  # (B, K) without eos

        # encode once, then copy each sentence's state K times: row = sentence * K + beam
        state = model.init_state(src)
        state.reorder(torch.arange(B, device=device).repeat_interleave(K))
        tokens = torch.full((B * K, cap + 1), pad, dtype=torch.long, device=device)  # (A*K, cap+1) generated so far
        last = torch.full((B * K, 1), model.start_id, dtype=torch.long, device=device)  # (A*K, 1)
        # all beams start identical: only beam 0 may be extended at step 0
        scores = torch.full((B, K), -math.inf, device=device)  # (A, K) summed log-probs of live beams
        scores[:, 0] = 0.0
        fin = (fin_scores, fin_tokens, fin_lens)
        next_lprobs = partial(_next_lprobs, model, banned)  # (last, state, force_eos, ban_eos) -> (R, V)
        if static:
            static_search.search(next_lprobs, step, state, max_len, min_len, cap, K, scores, tokens, last, fin)
        else:
            active = torch.arange(B, device=device)  # (A,) original index of each live sentence
            act_max, act_min, act_fin = max_len, min_len, fin  # (A,) (A,) and the live sentences' finished ones
            for t in range(cap + 1):  # t = tokens generated so far; the next one has length t + 1 with eos
                A = active.numel()
                force_eos = (act_max == t).repeat_interleave(K)  # (A*K,)
                ban_eos = (act_min > t).repeat_interleave(K)  # (A*K,)
                lprobs = next_lprobs(last, state, force_eos, ban_eos)  # (A*K, V)
                act_fin, next_beam, next_tok, next_scores, done = step(lprobs, scores, tokens, act_fin, t, act_max)

                keep = (~done).nonzero().squeeze(1)  # (A',)  the step's one host sync
                if keep.numel() < A:  # some sentences are done: their finished hypotheses are final
                    for out, f in zip(fin, act_fin):
                        out[active] = f
                    if keep.numel() == 0:
                        break
                    act_fin = tuple(f[keep] for f in act_fin)
                    active, act_max, act_min = active[keep], act_max[keep], act_min[keep]
                # select the live beams' rows (and drop done sentences) in one reorder of the cache
                index = (keep.unsqueeze(1) * K + next_beam[keep]).view(-1)  # (A'*K,)
                state.reorder(index, beams_only=keep.numel() == A)
                tokens = tokens[index]
                tokens[:, t] = next_tok[keep].view(-1)
                last = next_tok[keep].view(-1, 1)  # (A'*K, 1)
                scores = next_scores[keep]  # (A', K)

        hyps = []
        for toks, lens, scs in zip(fin_tokens[:, :nbest].tolist(), fin_lens[:, :nbest].tolist(),
                                   fin_scores[:, :nbest].tolist()):
            hyps.append([Hypothesis(tok[:n], s) for tok, n, s in zip(toks, lens, scs) if s != -math.inf])
        return hyps


def _beam_step(
    lprobs: Tensor, scores: Tensor, tokens: Tensor, fin: tuple[Tensor, Tensor, Tensor], t: int | Tensor,
    max_len: Tensor, K: int, eos: int, alpha: float, penalty: Penalty, early_stopping: bool, ranks: Tensor,
    frozen: Tensor | None = None,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor, Tensor, Tensor, Tensor]:
    """One step of beam search for A sentences, without side effects.

    lprobs (A*K, V) next-token log-probs; scores (A, K) summed log-probs of the live beams; tokens (A*K, cap+1)
    generated so far (pad from column t on); fin = the K best finished (scores (A, K), tokens (A, K, cap), lengths
    (A, K)); t tokens generated so far (int, or a () tensor in the static search); max_len (A,); ranks = arange(2K),
    made once per search; frozen (A,) bool:
    sentences already done, whose finished hypotheses must not change (static search only).
    Returns (fin, next_beam, next_tok, next_scores, done): the live beams' parents, tokens and scores (A, K) each,
    and done (A,).
    """
    A, V = scores.size(0), lprobs.size(-1)
    fin_scores, fin_tokens, fin_lens = fin
    cand = (scores.unsqueeze(2) + lprobs.view(A, K, V)).view(A, K * V)  # (A, K*V)
    cand_scores, cand_idx = cand.topk(2 * K, dim=1)  # (A, 2K) best first
    cand_beam, cand_tok = cand_idx // V, cand_idx % V  # (A, 2K)
    is_eos = cand_tok == eos  # (A, 2K)

    # finish eos candidates ranked in the top K; merge them into the K best finished per sentence
    new_fin = is_eos[:, :K] & cand_scores[:, :K].isfinite()  # (A, K)
    if frozen is not None:
        new_fin &= ~frozen.unsqueeze(1)
    if frozen is not None or new_fin.any():  # the static search cannot ask (a host sync): it always merges
        rows = torch.arange(A, device=lprobs.device).unsqueeze(1)  # (A, 1)
        normalised = cand_scores[:, :K] / length_factor(t + 1.0, alpha, penalty)  # (A, K)
        new_scores = torch.where(new_fin, normalised, -math.inf)
        cap = fin_tokens.size(2)
        new_tokens = tokens.view(A, K, -1)[rows, cand_beam[:, :K], :cap]  # (A, K, cap)
        all_scores = torch.cat([fin_scores, new_scores], 1)  # (A, 2K)
        all_tokens = torch.cat([fin_tokens, new_tokens], 1)  # (A, 2K, cap)
        all_lens = torch.cat([fin_lens, torch.zeros_like(fin_lens) + t], 1)  # (A, 2K)
        fin_scores, best = all_scores.topk(K, dim=1)  # (A, K)
        fin_tokens, fin_lens = all_tokens[rows, best], all_lens[rows, best]

    # live beams: the K best non-eos candidates (eos ranks sort after every non-eos rank)
    _, pick = torch.topk(is_eos * 2 * K + ranks, K, dim=1, largest=False)  # (A, K)
    next_beam, next_tok, next_scores = cand_beam.gather(1, pick), cand_tok.gather(1, pick), cand_scores.gather(1, pick)

    # which sentences are done after this step
    full = fin_scores.isfinite().all(1)  # (A,) K finished hypotheses
    best_live = next_scores.max(1).values  # (A,)
    done = (max_len == t) | (best_live == -math.inf)
    if early_stopping:
        done |= full
    else:
        # largest divisor over the lengths a live beam can still end at (the factor is monotone)
        longest = length_factor(max_len + 1.0, alpha, penalty)  # (A,)
        shortest = length_factor(torch.zeros_like(best_live) + (t + 2.0), alpha, penalty)  # (A,)
        done |= full & (fin_scores.min(1).values >= best_live / torch.maximum(longest, shortest))
    return (fin_scores, fin_tokens, fin_lens), next_beam, next_tok, next_scores, done
