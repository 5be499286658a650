"""Building blocks shared by both architectures: positions, attention, feed-forward, the block."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translator.cache import KVCache, LayerCache
from translator.config import TransformerConfig

# a model's optional replacement of its output layer: (hidden states (..., D), output weight (V, D)) -> anything
Head = Callable[[Tensor, Tensor], Tensor] | None

# ---------------------------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------------------------


def position_angles(pos: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """pos (...) integer position ids -> angles pos / base^(2i/dim), (..., dim/2), in float64.

    float64: at position p the angle is p radians, and float32 would carry an error of about p * 6e-8 (1e-4 at
    p = 2000) into every sin/cos. The cost is small: one (..., dim/2) tensor per forward.
    """
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)  # (dim/2,)
    return pos.double().unsqueeze(-1) * inv_freq


def sinusoidal(pos: Tensor, dim: int) -> Tensor:
    """The paper's encoding: PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same). pos (...) -> (..., dim),
    float64."""
    angles = position_angles(pos, dim)  # (..., dim/2)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def rope_cos_sin(pos: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles at pos (...), each (..., head_dim) in the rotate-half layout, float64."""
    angles = position_angles(pos, head_dim, base)  # (..., hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., hs)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, nh, L, hs) by per-position angles; cos/sin broadcast to it, e.g. (B, 1, L, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Positions(nn.Module):
    """Maps position ids (B, L) to an additive embedding (sinusoidal, learned) or to rotary cos/sin.

    Sinusoidal and rotary positions are computed from the ids at each call: no table, so no length limit, and no
    buffer that could differ between DDP ranks (DDP broadcasts buffers from rank 0 before each training step) or be
    created under `inference_mode` during validation. The learned table is a parameter of `max_positions` rows;
    `bound`, an upper bound on the ids taken from tensor shapes (no host-device sync), is checked against it.
    """

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.kind = cfg.positions
        self.max_positions = cfg.max_positions
        self.rope_base = cfg.rope_base
        self.head_dim = cfg.head_dim
        self.dim = cfg.d_model
        if self.kind == "learned":
            self.table = nn.Embedding(cfg.max_positions, cfg.d_model)

    @property
    def rotary(self) -> bool:
        return self.kind == "rope"

    def forward(self, pos: Tensor, bound: int, dtype: torch.dtype) -> Tensor | tuple[Tensor, Tensor]:
        """pos (B, L) -> embedding (B, L, D), or rope (cos, sin) each (B, 1, L, hs); in `dtype` (the embeddings').
        B may be 1 for ids shared by the batch: the results broadcast."""
        if self.kind == "learned":
            if bound > self.max_positions:
                raise ValueError(
                    f"sequence needs {bound} positions but the learned table has max_positions={self.max_positions}"
                )
            return self.table(pos)
        if self.kind == "sinusoidal":
            return sinusoidal(pos, self.dim).to(dtype)
        cos, sin = rope_cos_sin(pos, self.head_dim, self.rope_base)
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention over SDPA, built for one role; `forward(x, y=None)` as in torchtune.

    Self-attention (`cross=False`): q, k and v come from x through one fused (3D, D) projection `qkv`; rotary
    positions rotate q and k; a `KVCache` appends the new keys and values and returns all of them.
    Cross-attention (`cross=True`): q comes from x through `q` (D, D), k and v from the memory y through one fused
    (2D, D) projection `kv`, or, with y None, from a `KVCache` that holds them (`project_kv(memory)`, once per
    source). No positions here: the memory carries its own.
    """

    def __init__(self, cfg: TransformerConfig, cross: bool = False) -> None:
        super().__init__()
        D = cfg.d_model
        self.n_heads, self.dropout, self.cross = cfg.n_heads, cfg.attn_dropout, cross
        if cross:
            self.q = nn.Linear(D, D, bias=cfg.bias)
            self.kv = nn.Linear(D, 2 * D, bias=cfg.bias)
            self.register_load_state_dict_pre_hook(_split_fused_cross_qkv)
        else:
            self.qkv = nn.Linear(D, 3 * D, bias=cfg.bias)
        self.out = nn.Linear(D, D, bias=cfg.bias)

    def _heads(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, nh, L, hs)
        B, L, D = x.shape
        return x.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2)

    def project_kv(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values of the memory y (B, Lk, D), each (B, nh, Lk, hs)."""
        k, v = self.kv(y).split(y.size(-1), dim=-1)
        return self._heads(k), self._heads(v)

    def project(
        self, x: Tensor, y: Tensor | None = None, *, rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The queries of x (B, Lq, D) and the keys and values they attend to: q (B, nh, Lq, hs), k and v
        (B, nh, Lk, hs), as `forward` hands them to SDPA."""
        if self.cross:
            q = self._heads(self.q(x))
            k, v = self.project_kv(y) if y is not None else (cache.k, cache.v)
            return q, k, v
        if y is not None:
            raise ValueError("self-attention takes no memory y; build Attention(cfg, cross=True) for that")
        q, k, v = map(self._heads, self.qkv(x).split(x.size(-1), dim=-1))  # (B, nh, Lq, hs) each
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, Lk, hs): the cached keys, then these
        return q, k, v

    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Attend from x (B, Lq, D): to itself (self-attention), or to the memory y (B, Lk, D) or the K/V in
        `cache` (cross-attention). mask is bool, True = may attend, broadcastable to (B, nh, Lq, Lk). Returns
        (B, Lq, D)."""
        B, Lq, D = x.shape
        q, k, v = self.project(x, y, rope=rope, cache=cache)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, Lq, hs)
        return self.out(out.transpose(1, 2).reshape(B, Lq, D))


def _split_fused_cross_qkv(module: Attention, state_dict: dict[str, Tensor], prefix: str, *args) -> None:
    """Load checkpoints saved when cross-attention, like self-attention, had one (3D, D) `qkv` projection: its rows
    [:D] are the new `q`, rows [D:] the new `kv` (weight and bias alike)."""
    for name in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}qkv.{name}", None)
        if fused is not None:
            D = fused.size(0) // 3
            state_dict[f"{prefix}q.{name}"], state_dict[f"{prefix}kv.{name}"] = fused[:D], fused[D:]


# ---------------------------------------------------------------------------------------------------------------
# Feed-forward and the block
# ---------------------------------------------------------------------------------------------------------------


class Dropout(nn.Dropout):
    """`nn.Dropout`, with a cheaper mask on a CPU.

    On a CPU torch draws a dropout mask one bernoulli sample per element: forward and backward over 2,048 x 256 bf16
    values took 4.4 ms on the 2-core VM. Here each 64-bit random draw gives the mask four elements, 16-bit uniform
    integers compared with a threshold: 1.3-1.6 ms (docs/results.md, "CPU speed: dropout masks and the output
    layer"). The drop rate is p rounded to a multiple of 2^-16 (0.1 -> 0.100006) and the kept values are scaled by
    1 / (1 - that rate), so the expectation is kept. The draws come from torch's generator: seeded runs repeat.
    Other devices use torch's fused kernel.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or x.device.type != "cpu" or not 0.0 < self.p < 1.0:
            return super().forward(x)
        drop = round(self.p * 65536)
        bits = torch.randint(-(2**63), 2**63 - 1, (-(-x.numel() // 4),), dtype=torch.int64)
        keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= drop - 32768
        return x * keep.to(x.dtype) * (65536 / (65536 - drop))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        n_in = 2 * cfg.d_ff if cfg.activation == "swiglu" else cfg.d_ff
        self.fc = nn.Linear(cfg.d_model, n_in, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, L, D) -> (B, L, D)
        h = self.fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.relu(h) if self.activation == "relu" else F.gelu(h)
        return self.proj(h)


class Block(nn.Module):
    """Self-attention, optional cross-attention, FFN; each a residual branch with pre- or post-LayerNorm."""

    def __init__(self, cfg: TransformerConfig, cross: bool = False) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.self_attn, self.norm1 = Attention(cfg), nn.LayerNorm(cfg.d_model)
        self.cross_attn = Attention(cfg, cross=True) if cross else None
        self.norm2 = nn.LayerNorm(cfg.d_model) if cross else None
        self.mlp, self.norm3 = MLP(cfg), nn.LayerNorm(cfg.d_model)
        self.drop = Dropout(cfg.dropout)

    def _residual(self, x: Tensor, norm: nn.LayerNorm, fn) -> Tensor:
        if self.norm_first:
            return x + self.drop(fn(norm(x)))
        return norm(x + self.drop(fn(x)))

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        cache: LayerCache | None = None,
    ) -> Tensor:
        """x (B, L, D) -> (B, L, D). memory None with a cache: cross-attention K/V come from the cache."""
        self_kv = cache.self_kv if cache is not None else None
        x = self._residual(x, self.norm1, lambda h: self.self_attn(h, mask=mask, is_causal=is_causal, rope=rope,
                                                                   cache=self_kv))
        if self.cross_attn is not None:
            cross_kv = cache.cross_kv if cache is not None else None
            x = self._residual(x, self.norm2, lambda h: self.cross_attn(h, memory, mask=memory_mask, cache=cross_kv))
        return self._residual(x, self.norm3, self.mlp)


def init_weights(module: nn.Module, cfg: TransformerConfig) -> None:
    """`cfg.init_std` None: Xavier-uniform linear layers and N(0, d^-1/2) embeddings (unit variance once scaled by
    sqrt(d)); a number: N(0, init_std) for both (BART/Marian). Biases and the padding row start at zero.

    Cross-attention's q and kv take Xavier's bound of one (3D, D) matrix, like self-attention's qkv: both attentions
    start at the same scale, and a seed gives the weights it gave when cross-attention had one fused projection."""
    fused = {id(p) for m in module.modules() if isinstance(m, Attention) and m.cross for p in (m.q.weight, m.kv.weight)}
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if cfg.init_std is not None:
                nn.init.normal_(m.weight, std=cfg.init_std)
            elif id(m.weight) in fused:
                bound = math.sqrt(3.0) * math.sqrt(2.0 / (cfg.d_model + 3 * cfg.d_model))  # xavier_uniform_'s formula
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=cfg.d_model**-0.5 if cfg.init_std is None else cfg.init_std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()


def count_parameters(model: nn.Module, non_embedding: bool = False) -> int:
    """Parameters, a tied weight once (`parameters()` yields each tensor once); with non_embedding, token/position/
    segment embeddings and an untied output layer are left out."""
    skip = set()
    if non_embedding:
        skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        head = getattr(model, "lm_head", None)
        if head is not None:
            skip.add(id(head.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)
