"""Encoder-decoder Transformer with cross-attention (Vaswani et al., 2017), pre-LN by default."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from translator.cache import DecodeState, LayerCache
from translator.config import Seq2SeqConfig
from translator.layers import Block, Dropout, Head, Positions, count_parameters, init_weights


class Seq2SeqTransformer(nn.Module):
    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        cfg = self.config = config
        self.src_embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.tgt_embed = (
            self.src_embed
            if cfg.tie_embeddings
            else nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        )
        self.positions = Positions(cfg)
        self.drop = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(Block(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(Block(cfg, cross=True) for _ in range(cfg.n_decoder_layers))
        self.enc_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
        self.dec_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.src_embed.weight
        self.emb_scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0

    @property
    def start_id(self) -> int:
        return self.config.bos_id

    def _embed(self, embedding: nn.Embedding, tokens: Tensor, pos: Tensor, bound: int):
        """tokens (B, L), pos (B or 1, L) -> x (B, L, D) and rope (cos, sin) or None."""
        x = embedding(tokens) * self.emb_scale
        p = self.positions(pos, bound, x.dtype)
        if self.positions.rotary:
            return self.drop(x), p
        return self.drop(x + p), None

    def encode(self, src: Tensor) -> Tensor:
        """src (B, S) -> memory (B, S, D). Pads (config.pad_id) are masked as keys."""
        S = src.size(1)
        pos = torch.arange(S, device=src.device)[None]  # (1, S): the same for every row
        x, rope = self._embed(self.src_embed, src, pos, S)
        mask = (src != self.config.pad_id)[:, None, None, :]  # (B, 1, 1, S)
        for block in self.encoder:
            x = block(x, mask=mask, rope=rope)
        return self.enc_norm(x)

    def decode(
        self, tgt: Tensor, memory: Tensor, src_pad_mask: Tensor, state: DecodeState | None = None, head: Head = None
    ) -> Tensor:
        """tgt (B, T) target inputs after whatever `state` holds; memory (B, S, D); src_pad_mask (B, S), True
        at pads. Returns logits (B, T, V), or `head(hidden states (B, T, D), lm_head.weight)` (see `forward`).
        Without a state the pass is causal over tgt from position 0."""
        T = tgt.size(1)
        if state is None:  # causal from position 0 (target pads sit at the end, after every real token); a constant
            # is_causal, not `T > 1`: under torch.compile T is symbolic, and SDPA takes a Python bool only
            pos, bound, mask, is_causal = torch.arange(T, device=tgt.device)[None], T, None, True  # pos (1, T)
        else:
            (pos, bound), (mask, is_causal) = state.positions(T), state.self_mask(T)
        memory_mask = ~src_pad_mask[:, None, None, :]  # (B, 1, 1, S)
        x, rope = self._embed(self.tgt_embed, tgt, pos, bound)
        for i, block in enumerate(self.decoder):
            cache = state.layers[i] if state is not None else None
            x = block(x, mask=mask, is_causal=is_causal, rope=rope, memory=memory, memory_mask=memory_mask, cache=cache)
        x = self.dec_norm(x)
        return self.lm_head(x) if head is None else head(x, self.lm_head.weight)

    def forward(self, src: Tensor, tgt: Tensor, head: Head = None) -> Tensor:
        """src (B, S), tgt (B, T) teacher-forced inputs (`<bos> y1 .. y_{T-1}`) -> logits (B, T, V); or with a
        `head`, its value on the hidden states (B, T, D) and the output layer's weight (V, D): a loss that projects
        them itself (`translator.recipe.token_loss`), inside the forward, where a wrapper such as FSDP has the weights."""
        return self.decode(tgt, self.encode(src), src == self.config.pad_id, head=head)

    # ---- the decode-step interface (docs/design.md) ------------------------------------------------------------
    def init_state(self, src: Tensor) -> DecodeState:
        """Encode once and project each layer's cross-attention K/V once."""
        src_pad = src == self.config.pad_id
        state = DecodeState([LayerCache() for _ in self.decoder], src_pad, torch.zeros_like(src[:, 0]))
        memory = self.encode(src)
        for block, cache in zip(self.decoder, state.layers):  # the state alone carries the source
            cache.cross_kv.k, cache.cross_kv.v = block.cross_attn.project_kv(memory)
        return state

    def decode_step(self, tokens: Tensor, state: DecodeState) -> Tensor:
        """tokens (B, n) -> logits (B, n, V); the state grows by n."""
        logits = self.decode(tokens, None, state.key_pad, state)  # memory unused: cross K/V are cached
        state.advance(tokens.size(1))
        return logits

    def num_parameters(self, non_embedding: bool = False) -> int:
        return count_parameters(self, non_embedding)
