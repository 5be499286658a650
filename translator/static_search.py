"""The static beam search (`generate.beam_search(static=True)`): fixed shapes, in-place updates, CUDA graphs.

Every tensor a step reads or writes keeps its shape and address from step to step, so that on CUDA one step is
captured once as a CUDA graph and replayed: a step then costs one launch instead of a few hundred, which is what
decoding small models on a GPU is bound by. Two things make the steps fixed:

- the search keeps every sentence's rows to the end of the batch: a done sentence's rows run on and are ignored
  (`generate._beam_step(frozen=...)` leaves its finished hypotheses alone);
- the decode state becomes a `StaticState`: each self-attention cache a buffer with room for every step, written in
  place at slot `filled`, and a mask over the slots that hides the ones not yet written.

The models do not know: they ask the state where the new token sits (`positions`) and what it sees (`self_mask`), and
the caches' `append` and `reorder` do the rest, as with the growing cache of `translator/cache.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from translator.cache import DecodeState, KVCache, LayerCache


@dataclass
class StaticKVCache(KVCache):
    """k, v (B, nh, capacity, hs) buffers, written in place from slot `filled` (a () int64 tensor) on; slots
    >= filled hold stale values that `StaticState.self_mask` hides."""

    filled: Tensor | None = None

    @classmethod
    def grow(cls, k: Tensor, v: Tensor, extra: int) -> StaticKVCache:
        """Buffers holding k, v (B, nh, L, hs) and room for `extra` more."""
        B, nh, L, hs = k.shape
        buffers = k.new_zeros(B, nh, L + extra, hs), v.new_zeros(B, nh, L + extra, hs)
        buffers[0][:, :, :L], buffers[1][:, :, :L] = k, v
        return cls(*buffers, filled=torch.tensor(L, device=k.device))

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        slots = self.filled + torch.arange(k.size(2), device=k.device)  # (n,)
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        self.filled += k.size(2)
        return self.k, self.v

    def reorder(self, index: Tensor, start: int = 0) -> None:
        """Rows `index` (B,) of the cache, in place (a captured graph holds these buffers), from slot `start` on."""
        for buf in (self.k, self.v):
            part = buf[:, :, start:]
            part.copy_(part.index_select(0, index))


@dataclass
class StaticState(DecodeState):
    """A `DecodeState` of fixed-size caches that decodes one token per step; `seen` (B, capacity) bool is True at
    the self-attention slots a query may see. `length` is the capacity."""

    seen: Tensor | None = None

    @classmethod
    def of(cls, state: DecodeState, steps: int) -> StaticState:
        """`state` with room for `steps` more tokens. Keys already cached stay visible, except the source pads of a
        decoder-only prefix."""
        layers = []
        for layer in state.layers:
            k, v = layer.self_kv.k, layer.self_kv.v
            if k is None:  # seq2seq before its first token: shape the buffers like the cross K/V
                k = v = layer.cross_kv.k[:, :, :0]
            layers.append(LayerCache(StaticKVCache.grow(k, v, steps), layer.cross_kv))
        B, P = state.key_pad.size(0), state.prefix_len
        seen = torch.ones(B, state.length, dtype=torch.bool, device=state.key_pad.device)  # keys cached so far
        seen[:, :P] = ~state.key_pad[:, :P]
        seen = torch.cat([seen, seen.new_zeros(B, steps)], 1)  # (B, capacity)
        return cls(layers, state.key_pad, state.pos.clone(), P, seen)  # pos is advanced in place from now on

    def _one_token(self, n: int) -> None:
        if n != 1:
            raise ValueError(f"a static decode state takes one token per step, got {n}")

    def positions(self, n: int) -> tuple[Tensor, int]:
        self._one_token(n)
        return self.pos[:, None], self.length

    def self_mask(self, n: int) -> tuple[Tensor, bool]:
        """(B, 1, 1, capacity): the slots written so far, the new token's included (marked seen here)."""
        self._one_token(n)
        self.seen.index_fill_(1, self.layers[0].self_kv.filled.view(1), True)
        return self.seen[:, None, None, :], False

    def advance(self, n: int) -> None:
        self.pos += n

    def reorder(self, index: Tensor, beams_only: bool = False) -> None:
        """Reorder beams within their sentences, in place; the source slots (the same in every beam) stay."""
        if not beams_only:
            raise ValueError("a static decode state keeps its rows: it reorders beams of the same sentence only")
        for layer in self.layers:
            layer.self_kv.reorder(index, self.prefix_len)


def search(next_lprobs: Callable[..., Tensor], step: Callable[..., tuple], state: DecodeState,
                max_len: Tensor, min_len: Tensor, cap: int, K: int, scores: Tensor, tokens: Tensor, last: Tensor,
                fin: tuple[Tensor, Tensor, Tensor]) -> None:
    """The loop of `generate.beam_search(static=True)` over all B sentences' rows, from the state after the source
    (B*K rows). `next_lprobs(last, state, force_eos, ban_eos)` and `step` are that search's `_next_lprobs` and
    `_beam_step`; scores (B, K), tokens (B*K, cap+1), last (B*K, 1) are its tensors, updated in place, and the
    finished hypotheses are written into `fin`."""
    B, device = scores.size(0), scores.device
    if B == 0:
        return
    state = StaticState.of(state, cap + 1)
    t = torch.zeros((), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device).unsqueeze(1)  # (B, 1)

    def one_step() -> None:
        force_eos = (max_len == t).repeat_interleave(K)  # (B*K,)
        ban_eos = (min_len > t).repeat_interleave(K)  # (B*K,)
        lprobs = next_lprobs(last, state, force_eos, ban_eos)  # (B*K, V)
        new_fin, next_beam, next_tok, next_scores, now_done = step(lprobs, scores, tokens, fin, t, max_len,
                                                                   frozen=done)
        for old, new in zip(fin, new_fin):
            old.copy_(new)
        done.logical_or_(now_done)
        index = (rows * K + next_beam).view(-1)  # (B*K,)
        state.reorder(index, beams_only=True)  # in place
        tokens.copy_(tokens.index_select(0, index))
        tokens.index_copy_(1, t.view(1), next_tok.view(-1, 1))
        last.copy_(next_tok.view(-1, 1))
        scores.copy_(next_scores)
        t.add_(1)

    _run_static(one_step, done, cap)


def _run_static(one_step: Callable[[], None], done: Tensor, cap: int) -> None:
    """Run the static search's steps (at most cap + 1) until every sentence is done."""
    device = done.device
    if device.type != "cuda":
        for _ in range(cap + 1):
            one_step()
            if done.all():  # the loop's one host sync
                break
        return
    # CUDA: step 0 runs eagerly on a side stream (the warm-up capture needs), step 1 is recorded (not run) on that
    # stream, and steps 1..cap are replays. Autocast's weight cache is off inside: cached casts made during capture
    # would be freed under the graph.
    autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                              enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
    with torch.cuda.device(device):
        side = _side_stream(device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:
            one_step()
        torch.cuda.current_stream().wait_stream(side)
        if cap == 0 or done.all():
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"), autocast:
            one_step()
        for _ in range(cap):
            graph.replay()
            if done.all():  # the loop's one host sync
                break


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU for warm-up and capture: a new stream per batch would make cuBLAS keep a workspace
    for each."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]
