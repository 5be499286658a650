"""Library side of `scripts/translate.py`: batched translation of raw sentences, and attention heatmaps.

    model, tokenizer, _ = checkpoint.load("checkpoints/encdec/last.ckpt")
    best = [hyps[0].text for hyps in translate(model, tokenizer, ["Ein Hund läuft."], beam=5)]

`translate` tokenises, truncates over-long sources (with a warning naming the line), sorts the sentences by length
and packs them into batches under a source-token budget (`translator.data.batching`, as `translator predict` does),
runs `generate.beam_search` (bf16 autocast on CUDA), and returns the n-best list of each sentence in input order.
Empty sentences are not decoded: they get one empty translation with score 0.

`attention_map` recomputes attention weights from the model's own modules without changing the model: a forward
pre-hook captures the inputs of the last decoder layer's attention module, and the weights are recomputed from its
own projection (`Attention.project`) as softmax(q k^T / sqrt(hs)) under the same mask. Encoder-decoder: that layer's cross-attention,
(target x source). Decoder-only: the last block's self-attention, rows of the target positions restricted to the
source prefix (so a row sums to the share of attention that goes to the source, <= 1).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from translator.data.batching import encode_sources, pad, token_batches
from translator.decoder_only import DecoderOnlyTransformer
from translator.generate import EARLY_STOPPING, LENGTH_PENALTY, MIN_LEN, PENALTY, Hypothesis, Penalty, beam_search
from translator.layers import Attention
from translator.seq2seq import Seq2SeqTransformer
from translator.tokenizer import EOS_ID, Tokenizer


@dataclass
class Translation(Hypothesis):
    """A hypothesis (`tokens` without bos/eos, length-normalised `score`) with its detokenised `text`."""

    text: str = ""


def one_line(text: str) -> str:
    """A translation as one output line: each whitespace run (tabs, newlines, Unicode line separators) becomes one
    space, and the ends are stripped, so the output keeps one line per input line and its TSV columns. Used by
    `scripts/translate.py` and by `translator predict`'s writer alike."""
    return " ".join(text.split())


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is a ValueError, not a late crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def translate(
    model: nn.Module,
    tokenizer: Tokenizer,
    sentences: list[str],
    beam: int = 5,
    nbest: int = 1,
    length_penalty: float = LENGTH_PENALTY,
    batch_tokens: int = 4096,
    max_input_tokens: int = 256,
    device: torch.device | str | None = None,
    static: bool = False,
    min_len: int = MIN_LEN,
    penalty: Penalty = PENALTY,
    early_stopping: bool = EARLY_STOPPING,
) -> list[list[Translation]]:
    """Translate raw sentences; returns, in input order, each sentence's best `nbest` translations, best first.

    `model`: a Transformer, or any object with the decode-step interface (`translator.engines.OnnxModel`).
    `batch_tokens` bounds the padded source tokens of a batch (the search holds `beam` rows per sentence).
    `device`: where to run (the model is moved there); None keeps the model where it is. On CUDA the search runs
    under bf16 autocast (the log-probs themselves are float32, see `generate`). `static`: the fixed-shape search,
    one CUDA graph per batch on a GPU (`generate.beam_search`); same translations. `min_len`: tokens before eos may
    come (a non-empty sentence gets a non-empty translation unless 0). `penalty`, `early_stopping`: as in
    `generate.beam_search`.
    """
    if beam < 1 or not 1 <= nbest <= beam:
        raise ValueError(f"need beam >= 1 and 1 <= nbest <= beam, got beam={beam} nbest={nbest}")
    if isinstance(model, nn.Module):
        if device is not None:
            model.to(device)
        device = next(model.parameters()).device
        model.eval()
    else:  # a decode-step model outside torch (translator.engines.OnnxModel) takes host tensors
        device = torch.device("cpu")
    sources = encode_sources(tokenizer, sentences, max_input_tokens)
    results: list[list[Translation]] = [[Translation([], 0.0, "")] for _ in sentences]
    for batch in token_batches([len(s) for s in sources], batch_tokens):
        src = pad([sources[i] for i in batch], device)  # (B, S)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hyps = beam_search(model, src, beam, length_penalty, nbest=nbest, static=static, min_len=min_len,
                               penalty=penalty, early_stopping=early_stopping)
        for i, sentence_hyps in zip(batch, hyps):
            texts = tokenizer.decode([h.tokens for h in sentence_hyps])
            results[i] = [Translation(h.tokens, h.score, t) for h, t in zip(sentence_hyps, texts)]
    return results


# ---- attention ---------------------------------------------------------------------------------------------------
@dataclass
class AttentionMap:
    """weights (T, S), averaged over heads: row t is the target position that predicts `target[t]`, column s the
    source piece `source[s]`."""

    weights: Tensor
    source: list[str]
    target: list[str]


def recompute_attention(attn: Attention, x: Tensor, y: Tensor | None = None, mask: Tensor | None = None,
                        is_causal: bool = False, rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The probabilities and values that `attn(x, y, mask=mask, is_causal=is_causal, rope=rope)` feeds to SDPA (no
    cache, no dropout), from the module's own projection; the softmax in float32.

    x (B, Lq, D); y (B, Lk, D) the memory of a cross-attention module (None for self-attention). Returns probs
    (B, nh, Lq, Lk) and v (B, nh, Lk, hs) in float32, so that `attn.out((probs @ v).transpose(1, 2).flatten(2))`
    equals the module's output.
    """
    q, k, v = (t.float() for t in attn.project(x, y, rope=rope))  # (B, nh, Lq, hs), (B, nh, Lk, hs) twice
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, Lq, Lk)
    if is_causal:
        causal = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return scores.softmax(-1), v


def _capture_inputs(module: nn.Module, run) -> inspect.BoundArguments:
    """Run `run()` and return the arguments of the (last) call of `module`, bound to its forward's signature."""
    calls: list[inspect.BoundArguments] = []
    signature = inspect.signature(module.forward)

    def hook(_module, args, kwargs):
        calls.append(signature.bind(*args, **kwargs))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    if not calls:
        raise RuntimeError(f"{type(module).__name__} was not called")
    bound = calls[-1]
    bound.apply_defaults()
    return bound


def attention_map(model: nn.Module, tokenizer: Tokenizer, src_ids: list[int], tgt_ids: list[int]) -> AttentionMap:
    """Head-averaged attention of the last decoder layer for one sentence and its translation (ids without bos/eos).

    Target rows are labelled with the pieces they predict (`tgt_ids` then `</s>`), source columns with the source
    pieces. Runs one teacher-forced forward pass in float32.
    """
    if not src_ids:
        raise ValueError("attention_map needs a non-empty source")
    device = next(model.parameters()).device
    src = torch.tensor([src_ids], device=device)  # (1, S)
    tgt = torch.tensor([[model.config.bos_id, *tgt_ids]], device=device)  # (1, T), decoder-only swaps bos for sep
    if isinstance(model, Seq2SeqTransformer):
        attn = model.decoder[-1].cross_attn
    elif isinstance(model, DecoderOnlyTransformer):
        attn = model.blocks[-1].self_attn
    else:
        raise TypeError(f"attention_map supports Seq2SeqTransformer and DecoderOnlyTransformer, not {type(model)}")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            a = _capture_inputs(attn, lambda: model(src, tgt)).arguments
            probs, _ = recompute_attention(attn, a["x"], a["y"], a["mask"], a["is_causal"], a["rope"])
    finally:
        model.train(was_training)
    weights = probs[0].mean(0)  # (Lq, Lk)
    if isinstance(model, DecoderOnlyTransformer):
        S = len(src_ids)
        weights = weights[S:, :S]  # target rows (<sep> y1 .. yn) over the source prefix
    return AttentionMap(weights.cpu(), tokenizer.pieces(src_ids), tokenizer.pieces([*tgt_ids, EOS_ID]))


def plot_attention(amap: AttentionMap, path: str | Path, title: str | None = None) -> None:
    """Write the heatmap as an image (format from the suffix, e.g. .png), with matplotlib's Agg canvas: no display,
    no global pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    T, S = amap.weights.shape
    fig = Figure(figsize=(min(40.0, max(4.5, 2.5 + 0.3 * S)), min(40.0, max(3.5, 2.0 + 0.3 * T))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(amap.weights.numpy(), cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(S), labels=amap.source, rotation=90)
    ax.set_yticks(range(T), labels=amap.target)
    ax.set_xlabel("source")
    ax.set_ylabel("target (predicted piece)")
    if title:
        ax.set_title(title, fontsize="small")
    fig.colorbar(image, ax=ax, label="attention (mean over heads)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
