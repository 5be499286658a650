"""How much a decoder-only model still looks at its source as the translation grows (Fu et al. 2023's attention
degeneration), measured teacher-forced over reference translations.

For each target position t (the query that predicts target token t + 1; position 0 is `<sep>`), every layer and
head: the attention mass on the source prefix, and the entropy of that attention renormalised over the source
tokens (in nats; low: it points at few source tokens). Both are averaged over heads and layers, then over the
sentences, by bucket of target position. A model that forgets the source shows a falling mass in later buckets.

    stats = source_attention(model, tokenizer, sources, references)
    for row in stats: print(row["positions"], row["source_mass"], row["source_entropy"], row["queries"])
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from translator.decoder_only import DecoderOnlyTransformer
from translator.tokenizer import Tokenizer
from translator.translate import recompute_attention

BUCKETS = (0, 5, 10, 20, 40)  # target positions [0, 5), [5, 10), [10, 20), [20, 40), [40, ...)


def _bucket(t: int, edges: tuple[int, ...]) -> int:
    return max(i for i, edge in enumerate(edges) if t >= edge)


@torch.inference_mode()
def source_attention(model: nn.Module, tokenizer: Tokenizer, sources: list[str], references: list[str],
                     edges: tuple[int, ...] = BUCKETS) -> list[dict]:
    """One dict per bucket of target positions: `positions` (a label such as "5-9"), `source_mass` and
    `source_entropy` (means over the queries of the bucket, each averaged over layers and heads), `queries`."""
    if not isinstance(model, DecoderOnlyTransformer):
        raise TypeError("source_attention measures decoder-only models (an encoder-decoder's cross-attention looks "
                        "only at the source)")
    device = next(model.parameters()).device
    attns = [block.self_attn for block in model.blocks]
    signature = inspect.signature(attns[0].forward)
    mass, entropy, count = [0.0] * len(edges), [0.0] * len(edges), [0] * len(edges)
    was_training = model.training
    model.eval()
    try:
        for source, reference in zip(sources, references):
            src_ids, tgt_ids = tokenizer.encode([source, reference])
            if not src_ids or not tgt_ids:
                continue
            calls = []
            hooks = [a.register_forward_pre_hook(lambda m, args, kw: calls.append(signature.bind(*args, **kw)),
                                                 with_kwargs=True) for a in attns]
            try:
                model(torch.tensor([src_ids], device=device),
                      torch.tensor([[model.config.bos_id, *tgt_ids]], device=device))
            finally:
                for h in hooks:
                    h.remove()
            S = len(src_ids)
            per_layer = []
            for attn, call in zip(attns, calls):
                a = call.arguments
                probs, _ = recompute_attention(attn, a["x"], a.get("y"), a.get("mask"), a.get("is_causal", False),
                                               a.get("rope"))
                per_layer.append(probs[0, :, S:, :])  # (nh, T, L): target queries over every key
            probs = torch.stack(per_layer)  # (layers, nh, T, L)
            on_source = probs[..., :S].sum(-1)  # (layers, nh, T)
            p = probs[..., :S] / on_source.clamp(min=1e-12).unsqueeze(-1)
            h = -(p * p.clamp(min=1e-12).log()).sum(-1)  # (layers, nh, T)
            for t, (m, e) in enumerate(zip(on_source.mean((0, 1)).tolist(), h.mean((0, 1)).tolist())):
                b = _bucket(t, edges)
                mass[b], entropy[b], count[b] = mass[b] + m, entropy[b] + e, count[b] + 1
    finally:
        model.train(was_training)
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    return [{"positions": label, "source_mass": m / n, "source_entropy": e / n, "queries": n}
            for label, m, e, n in zip(labels, mass, entropy, count) if n]
