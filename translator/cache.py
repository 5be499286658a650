"""What cached decoding carries from step to step, for both models: each layer's keys and values, and the state.

The cache grows: each step appends its keys and values, and the search reorders rows (beams) or drops them (finished
sentences) with `DecodeState.reorder`. The state also says where the next tokens sit (`positions`) and which cached
keys they see (`self_mask`), so that the models hold no cache logic of their own. The fixed-size form that CUDA
graphs need is the static search's (`translator/static_search.py`): the same interface, other shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class KVCache:
    """Keys and values of one attention layer, each (B, nh, L, hs); `append` grows L by the new tokens."""

    k: Tensor | None = None
    v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add k, v (B, nh, n, hs) after the cached ones; returns all keys and values (B, nh, L + n, hs)."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v

    def reorder(self, index: Tensor) -> None:
        """Rows `index` (B',) of the cache."""
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


@dataclass
class LayerCache:
    self_kv: KVCache = field(default_factory=KVCache)
    cross_kv: KVCache = field(default_factory=KVCache)  # seq2seq: the memory's K/V, projected once per source


def causal_mask(n_new: int, n_keys: int, device: torch.device) -> Tensor:
    """(n_new, n_keys) bool: new token i (at key index n_keys - n_new + i) sees keys up to itself."""
    offset = n_keys - n_new
    return torch.arange(n_keys, device=device)[None, :] <= torch.arange(n_new, device=device)[:, None] + offset


@dataclass
class DecodeState:
    """Everything incremental decoding carries between steps, for either architecture.

    `key_pad` (B, S) marks source pads: masked in cross-attention (seq2seq) or among the cached prefix keys
    (decoder-only, whose self-attention caches start with the `prefix_len` = S source slots). `pos` (B,) is the
    position id of the next token.
    """

    layers: list[LayerCache]
    key_pad: Tensor
    pos: Tensor
    prefix_len: int = 0  # self-attention cache slots holding the source (decoder-only: S), the same in all beams

    @property
    def length(self) -> int:
        """Number of keys in the self-attention cache."""
        k = self.layers[0].self_kv.k
        return 0 if k is None else k.size(2)

    def positions(self, n: int) -> tuple[Tensor, int]:
        """Position ids (B, n) of the next n tokens, and a bound on them that needs no host sync."""
        pos = self.pos[:, None] if n == 1 else self.pos[:, None] + torch.arange(n, device=self.pos.device)
        return pos, self.length + n

    def self_mask(self, n: int) -> tuple[Tensor | None, bool]:
        """What the next n tokens' self-attention sees, as SDPA's (attn_mask, is_causal): every cached key but the
        source pads of a decoder-only prefix, and the new tokens causally. The mask is (B, 1, n, length + n) bool."""
        start, device = self.length, self.pos.device
        if self.prefix_len == 0:  # no pads among the keys: at most a causal mask over the new tokens
            mask = causal_mask(n, start + n, device) if n > 1 and start > 0 else None
            return mask, mask is None and start == 0  # one token after a cache sees every key
        B, S = self.key_pad.shape
        keep = torch.cat([~self.key_pad, self.key_pad.new_ones(B, start + n - S)], 1)[:, None, None, :]
        return (keep if n == 1 else keep & causal_mask(n, start + n, device)), False

    def advance(self, n: int) -> None:
        """Positions move on by n decoded tokens."""
        self.pos = self.pos + n

    def reorder(self, index: Tensor, beams_only: bool = False) -> None:
        """Keep/reorder batch rows (beam search); index (B',) into the current batch.

        beams_only: every new row copies a row of the same source sentence (a beam step that dropped no sentence),
        so what depends only on the source (cross-attention K/V, source pads, positions) is left as it is.
        """
        for layer in self.layers:
            layer.self_kv.reorder(index)
            if not beams_only:
                layer.cross_kv.reorder(index)
        if not beams_only:
            self.key_pad = self.key_pad.index_select(0, index)
            self.pos = self.pos.index_select(0, index)
