"""`translator export --format onnx`: the decode-step interface (docs/design.md) as two ONNX graphs.

- `init.onnx`: `src` (B, S) int64, right-padded -> seq2seq: `cross_k{i}`, `cross_v{i}` (B, nh, S, hs), the
  cross-attention K/V of each decoder layer; decoder-only: `k{i}`, `v{i}` (B, nh, S, hs), the source prefix's
  self-attention cache.
- `step.onnx`: `tokens` (B, 1) int64, `pos` (B,) int64 (the token's position id), `key_pad` (B, S) bool (True at
  source pads), `k{i}`, `v{i}` (B, nh, L, hs) the self-attention cache so far (seq2seq: L = 0 at the first step),
  and for seq2seq `cross_k{i}`, `cross_v{i}` -> `logits` (B, V) of the next token, `new_k{i}`, `new_v{i}`
  (B, nh, L+1, hs).

The graphs are traced from the model's own modules (`Block`, `Positions`, `Attention`) by `torch.onnx.export(...,
dynamo=True)` with dynamic batch, source and cache lengths; position tables are grown to `max_positions` first, so a
sequence may reach that many positions. The prefix-LM's bidirectional source attention is inside `init.onnx`.
`translator.engines.OnnxModel` feeds them from a `DecodeState`, so that `translator.generate`'s searches run on them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from translator.cache import KVCache, LayerCache
from translator.decoder_only import DecoderOnlyTransformer
from translator.export import empty_dir, write_bundle
from translator.seq2seq import Seq2SeqTransformer
from translator.tokenizer import Tokenizer

OPSET = 18


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.decoder if isinstance(model, Seq2SeqTransformer) else model.blocks


class InitGraph(nn.Module):
    """`model.init_state(src)` with the state's tensors as outputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor) -> tuple[Tensor, ...]:
        state = self.model.init_state(src)
        kv = [(c.cross_kv if isinstance(self.model, Seq2SeqTransformer) else c.self_kv) for c in state.layers]
        return tuple(t for cache in kv for t in (cache.k, cache.v))


class StepGraph(nn.Module):
    """One decoding step of one token against explicit caches: `model.decode_step` unrolled, with the key mask
    built without relating the cache length to the source length (so that both stay free dimensions)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seq2seq = isinstance(model, Seq2SeqTransformer)

    def forward(self, tokens: Tensor, pos: Tensor, key_pad: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        m, n = self.model, len(_layers(self.model))
        past, cross = caches[: 2 * n], caches[2 * n:]
        layers = [LayerCache(KVCache(past[2 * i], past[2 * i + 1]),
                             KVCache(*cross[2 * i: 2 * i + 2]) if self.seq2seq else KVCache()) for i in range(n)]
        # bound=1: the tables were grown to max_positions before tracing, so nothing grows here
        if self.seq2seq:
            x, rope = m._embed(m.tgt_embed, tokens, pos[:, None], 1)
            memory_mask = ~key_pad[:, None, None, :]  # (B, 1, 1, S)
            for block, cache in zip(m.decoder, layers):  # one new token: it may see every cached key, no mask
                x = block(x, rope=rope, memory_mask=memory_mask, cache=cache)
            x = m.dec_norm(x)
        else:
            S, L = key_pad.size(1), past[0].size(2)
            j = torch.arange(L + 1, device=tokens.device)  # key slots: the source's S, the generated, the new one
            src_keep = (~key_pad).gather(1, j.clamp(max=S - 1).expand(key_pad.size(0), L + 1))
            mask = ((j >= S) | src_keep)[:, None, None, :]  # (B, 1, 1, L+1)
            x, rope = m._embed(tokens, pos[:, None], 1, 1)
            for block, cache in zip(m.blocks, layers):
                x = block(x, mask=mask, rope=rope, cache=cache)
            x = m.norm(x)
        logits = m.lm_head(x)[:, -1]  # (B, V)
        return logits, *(t for c in layers for t in (c.self_kv.k, c.self_kv.v))


def graph_names(model: nn.Module) -> dict[str, list[str]]:
    """Input and output names of both graphs."""
    n = len(_layers(model))
    kv = [name for i in range(n) for name in (f"k{i}", f"v{i}")]
    cross = [name for i in range(n) for name in (f"cross_k{i}", f"cross_v{i}")]
    seq2seq = isinstance(model, Seq2SeqTransformer)
    return {
        "init_inputs": ["src"],
        "init_outputs": cross if seq2seq else kv,
        "step_inputs": ["tokens", "pos", "key_pad", *kv, *(cross if seq2seq else [])],
        "step_outputs": ["logits", *(f"new_{name}" for name in kv)],
    }


def export_onnx(model: nn.Module, tokenizer: Tokenizer, out: str | Path, source: str = "") -> Path:
    """Write init.onnx and step.onnx (float32), the tokenizer and translator.json to a new directory `out`."""
    if not isinstance(model, (Seq2SeqTransformer, DecoderOnlyTransformer)):
        raise TypeError(f"not a translator model: {type(model).__name__}")
    model = model.float().eval()
    cfg = model.config
    names = graph_names(model)
    B = torch.export.Dim("batch")
    S, L = (torch.export.Dim(name, max=cfg.max_positions) for name in ("source", "cache"))
    src = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0], [12, 13, 0, 0]])  # traced on 3 rows of 4 with pads
    with torch.no_grad():
        init_out = InitGraph(model)(src)
        state = model.init_state(src)
        for _ in range(2):  # a cache of 2 generated tokens (seq2seq), 4 + 2 (decoder-only)
            model.decode_step(torch.full((3, 1), model.start_id), state)
    kv = [t for c in state.layers for t in (c.self_kv.k, c.self_kv.v)]
    cross = list(init_out) if isinstance(model, Seq2SeqTransformer) else []
    step_args = (torch.full((3, 1), 7), state.pos, state.key_pad, *kv, *cross)
    # dynamic dimensions, shaped like the arguments (StepGraph's *caches are one tuple)
    caches_shapes = tuple([{0: B, 2: L}] * len(kv) + [{0: B, 2: S}] * len(cross))
    step_shapes = ({0: B}, {0: B}, {0: B, 1: S}, caches_shapes)
    out = empty_dir(out)
    graphs = [("init.onnx", InitGraph(model).eval(), (src,), ({0: B, 1: S},), "init"),
              ("step.onnx", StepGraph(model).eval(), step_args, step_shapes, "step")]
    for filename, graph, args, shapes, prefix in graphs:
        torch.onnx.export(
            graph, args, str(out / filename), dynamo=True, opset_version=OPSET, external_data=False,
            input_names=names[f"{prefix}_inputs"], output_names=names[f"{prefix}_outputs"],
            dynamic_shapes=shapes, verbose=False,
        )
    usage = ("onnxruntime: run init.onnx on the right-padded source, then step.onnx once per token from start_id, "
             "feeding back new_k*/new_v* as k*/v*; translator.engines.OnnxModel does this for translator.generate")
    write_bundle(out, model, tokenizer, "onnx", source, graphs={"init": "init.onnx", "step": "step.onnx", **names},
                  usage=usage)
    return out
