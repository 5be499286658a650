"""Decoder-only Transformer over one sequence `source <sep> target`, trained as a language model on the target.

The batch is the seq2seq one (docs/design.md). In training, the model packs each row as the source's real tokens, then
the target inputs (whose leading `<bos>` becomes `<sep>`), then every pad: positions are plain 0, 1, 2, ..., the plain
recipe needs no mask at all (causal attention; pads come after every real token, so no real query sees them: flash
kernels run), and a sentence's outputs do not depend on how much padding its batch needed. Decoding prefills the
right-padded source instead, with its pads masked as keys and skipped by the position ids: the same positions.

`prefix_mode="bidirectional"` is a prefix-LM: source positions attend to the whole source, target positions
causally to everything before them. `"causal"` is the plain recipe: causal everywhere.

`config.source_loss > 0` adds a source-side task in training, in the same pass (`forward(..., with_source=True)`):
the causal model predicts each next source token; the prefix-LM gets a share of its source tokens replaced by
`<unk>` and restores them from the whole (bidirectional) source, a masked-LM denoising loss. The target then reads
the corrupted source, as with word dropout, unless `config.source_loss_separate` moves the denoising to a second pass
over the source alone (the prefill's attention), which leaves the training pass clean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translator.cache import DecodeState, LayerCache
from translator.config import DecoderOnlyConfig
from translator.layers import Block, Dropout, Head, Positions, count_parameters, init_weights
from translator.tokenizer import UNK_ID


class DecoderOnlyTransformer(nn.Module):
    def __init__(self, config: DecoderOnlyConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.segment = nn.Embedding(2, cfg.d_model) if cfg.segment_embeddings else None
        self.positions = Positions(cfg)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.emb_scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0

    @property
    def start_id(self) -> int:
        return self.config.sep_id

    def _embed(self, tokens: Tensor, pos: Tensor, segment: int | Tensor, bound: int):
        """tokens (B, L), pos (B or 1, L) -> x (B, L, D) and rope (cos, sin) or None."""
        x = self.embed(tokens) * self.emb_scale
        if self.segment is not None:
            x = x + (self.segment.weight[segment] if isinstance(segment, int) else self.segment(segment))
        p = self.positions(pos, bound, x.dtype)
        if self.positions.rotary:
            return self.drop(x), p
        return self.drop(x + p), None

    def _source_positions(self, src_keep: Tensor) -> Tensor:
        """(B, S) bool, True at real tokens -> position ids (B, S) that skip pads."""
        return (src_keep.long().cumsum(1) - 1).clamp(min=0)

    def _prefix_mask(self, src_keep: Tensor) -> Tensor:
        """Source-to-source attention, (B, 1, S, S) bool."""
        S = src_keep.size(1)
        allowed = torch.ones(S, S, dtype=torch.bool, device=src_keep.device)
        if self.config.prefix_mode == "causal":
            allowed = allowed.tril()
        return allowed & src_keep[:, None, None, :]

    def _source_task(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> (the source the model reads, the source-side targets (B, S), pad where there is no loss)."""
        pad = self.config.pad_id
        if self.config.prefix_mode == "causal":  # position j predicts source token j + 1 (the last one: nothing)
            return src, torch.cat([src[:, 1:], torch.full_like(src[:, :1], pad)], dim=1)
        masked = (torch.rand(src.shape, device=src.device) < self.config.source_mask_rate) & (src != pad)
        return src.masked_fill(masked, UNK_ID), src.masked_fill(~masked, pad)

    def forward(
        self, src: Tensor, tgt: Tensor, with_source: bool = False, head: Head = None
    ) -> Tensor | tuple[Tensor, Tensor]:
        """src (B, S), tgt (B, T) teacher-forced inputs (`<bos> y1 .. y_{T-1}`) -> logits (B, T, V) for the
        target positions only (`<sep>` predicts y1), or `head(their hidden states (B, T, D), lm_head.weight)` (as
        `Seq2SeqTransformer.forward`); with_source: also the source-side loss (a 0-d tensor, see the module
        docstring)."""
        (B, S), T = src.shape, tgt.size(1)
        if with_source and self.config.source_loss_separate:
            return self(src, tgt, head=head), self._source_loss(*self._source_task(src))
        if with_source:
            src, src_targets = self._source_task(src)
        n = (src != self.config.pad_id).sum(1, keepdim=True)  # (B, 1) source length = position of <sep>
        tgt = torch.cat([torch.full_like(tgt[:, :1], self.config.sep_id), tgt[:, 1:]], dim=1)
        # pack: packed position j holds source token j (j < n), else target token j - n
        j = torch.arange(S + T, device=src.device)  # (L,)
        in_tgt = j >= n  # (B, L)
        take = torch.where(in_tgt, S + j - n, j).clamp(max=S + T - 1)  # (B, L) index into cat([src, tgt])
        tokens = torch.cat([src, tgt], dim=1).gather(1, take)  # (B, L), the tail past the target is pad
        tokens = tokens.masked_fill(j >= n + T, self.config.pad_id)
        pos = torch.where(in_tgt, j - n, j) if self.config.rope_restart else j[None]  # (B or 1, L)
        x, rope = self._embed(tokens, pos, in_tgt.long(), S + T)
        if self.config.prefix_mode == "causal":
            mask = None
        else:  # (B, 1, L, L): causal, plus the whole source for source queries
            in_src = ~in_tgt
            mask = (j[:, None] >= j[None, :]) | (in_src[:, None, :, None] & in_src[:, None, None, :])
        for block in self.blocks:
            x = block(x, mask=mask, is_causal=mask is None, rope=rope)
        out = (n + torch.arange(T, device=src.device)).clamp(max=S + T - 1)  # (B, T) packed target positions
        hidden = self.norm(x.gather(1, out.unsqueeze(-1).expand(B, T, x.size(-1))))  # (B, T, D)
        logits = self.lm_head(hidden) if head is None else head(hidden, self.lm_head.weight)  # (B, T, V)
        if not with_source:
            return logits
        # packed positions j < S hold source token j where j < n; the targets there are pad from n on
        return logits, self._source_loss(src, src_targets, x[:, :S])

    def _source_loss(self, src: Tensor, targets: Tensor, hidden: Tensor | None = None) -> Tensor:
        """The mean cross-entropy over the source-side targets (B, S); hidden (B, S, D): the source positions' last
        block output, or None to run the source alone through the prefix attention."""
        if hidden is None:
            src_keep = src != self.config.pad_id
            hidden, rope = self._embed(src, self._source_positions(src_keep), 0, src.size(1))
            mask = self._prefix_mask(src_keep)
            for block in self.blocks:
                hidden = block(hidden, mask=mask, rope=rope)
        logits = self.lm_head(self.norm(hidden))  # (B, S, V)
        total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=self.config.pad_id,
                                reduction="sum")
        return total / (targets != self.config.pad_id).sum().clamp(min=1)  # a batch may mask none

    # ---- the decode-step interface (docs/design.md) ------------------------------------------------------------
    def init_state(self, src: Tensor) -> DecodeState:
        """Prefill the source prefix into the self-attention caches."""
        src_keep = src != self.config.pad_id
        state = DecodeState([LayerCache() for _ in self.blocks], ~src_keep, src_keep.sum(1), prefix_len=src.size(1))
        if self.config.rope_restart:
            state.pos = torch.zeros_like(state.pos)
        x, rope = self._embed(src, self._source_positions(src_keep), 0, src.size(1))
        mask = self._prefix_mask(src_keep)
        for block, cache in zip(self.blocks, state.layers):
            x = block(x, mask=mask, rope=rope, cache=cache)
        return state

    def decode_step(self, tokens: Tensor, state: DecodeState) -> Tensor:
        """tokens (B, n) -> logits (B, n, V); the state grows by n."""
        n = tokens.size(1)
        (pos, bound), (mask, is_causal) = state.positions(n), state.self_mask(n)
        x, rope = self._embed(tokens, pos, 1, bound)
        for block, cache in zip(self.blocks, state.layers):
            x = block(x, mask=mask, is_causal=is_causal, rope=rope, cache=cache)
        state.advance(n)
        return self.lm_head(self.norm(x))

    def num_parameters(self, non_embedding: bool = False) -> int:
        return count_parameters(self, non_embedding)
