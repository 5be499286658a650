"""Model configurations: one dataclass per architecture, primitives only, with named presets.

Presets (parameter counts for vocab 8000, tied embeddings; `translator.config` prints them):

| preset | d_model | heads | d_ff | enc+dec layers | decoder-only layers |
|---|---|---|---|---|---|
| tiny  | 32  | 2 | 64   | 1+1 | 2 |
| small | 256 | 4 | 1024 | 3+3 | 7 |
| base  | 512 | 8 | 2048 | 3+3 | 7 |

With d_ff = 4 d, an encoder layer holds 12 d^2 weights (attention 4 d^2, FFN 8 d^2) and a decoder layer 16 d^2
(cross-attention adds 4 d^2): 3+3 layers hold 84 d^2, exactly what 7 decoder-only layers hold. Biases and norms
differ by well under 1% (`tests/test_models.py` checks the 5% bound).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from types import UnionType
from typing import Any, get_args, get_type_hints

import torch

from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID

POSITIONS = ("sinusoidal", "learned", "rope")
ACTIVATIONS = ("relu", "gelu", "swiglu")


@dataclass
class TransformerConfig:
    """What both architectures share."""

    vocab_size: int = 8000
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    dropout: float = 0.1
    attn_dropout: float = 0.0
    positions: str = "sinusoidal"  # sinusoidal | learned | rope
    max_positions: int = 1024  # size of the learned table; sinusoidal/rope positions are computed, unlimited
    rope_base: float = 10000.0
    activation: str = "relu"  # relu | gelu | swiglu
    norm_first: bool = True  # pre-LN (False: the original post-LN)
    bias: bool = True
    tie_embeddings: bool = True  # source embedding = target embedding = output projection
    # initialisation: None = Xavier-uniform linear layers and N(0, d^-1/2) embeddings (unit scale after the sqrt(d)
    # factor); a number = N(0, init_std) for every linear and embedding weight (BART/Marian: 0.02)
    init_std: float | None = None
    scale_embeddings: bool = True  # multiply token embeddings by sqrt(d_model) (Vaswani et al.)
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    sep_id: int = SEP_ID

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}: expected one of {POSITIONS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}: expected one of {ACTIVATIONS}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head size, got d_model/n_heads={self.head_dim}")
        if self.vocab_size <= max(self.pad_id, self.bos_id, self.eos_id, self.sep_id):
            raise ValueError(f"vocab_size={self.vocab_size} is smaller than the special ids")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    _presets: dict[str, dict[str, Any]] = None  # type: ignore[assignment]  # set per subclass below

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TransformerConfig:
        """A named preset with some fields overridden. A `None` override is ignored, except for a field that may be
        None (`init_std`), which it sets; there "null" and "None" mean None too, as the command line hands a null
        over inside the module's `config` dict. An unknown field, or a value of another type than the field's (an
        int for a float field is fine), raises a ValueError that names it."""
        if name not in cls._presets:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; choose from {sorted(cls._presets)}")
        hints = get_type_hints(cls)
        types = {f.name: hints[f.name] for f in fields(cls) if not f.name.startswith("_")}
        unknown = sorted(set(overrides) - set(types))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; its fields: {', '.join(types)}")
        nullable = {key for key, kind in types.items() if _has_type(None, kind)}
        overrides = {k: None if k in nullable and v in ("null", "None") else v for k, v in overrides.items()}
        for key, value in overrides.items():
            if value is not None and not _has_type(value, types[key]):
                kind = getattr(types[key], "__name__", types[key])
                raise ValueError(f"{key}={value!r}: expected {kind} ({cls.__name__}.{key})")
        given = {k: v for k, v in overrides.items() if v is not None or k in nullable}
        return cls(**{**cls._presets[name], **given})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> TransformerConfig:
        return replace(self, **changes)


def _has_type(value: Any, kind: Any) -> bool:
    """Whether a value (from YAML or the command line) fits a field's type: bool, int, float, str or a union of them."""
    if isinstance(kind, UnionType):
        return any(_has_type(value, k) for k in get_args(kind))
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return kind is type(None) and value is None or isinstance(kind, type) and isinstance(value, kind)


_SIZES = {
    "tiny": dict(d_model=32, n_heads=2, d_ff=64, dropout=0.0),
    "small": dict(d_model=256, n_heads=4, d_ff=1024),
    "base": dict(d_model=512, n_heads=8, d_ff=2048),
}


@dataclass
class Seq2SeqConfig(TransformerConfig):
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3


@dataclass
class DecoderOnlyConfig(TransformerConfig):
    n_layers: int = 7
    prefix_mode: str = "bidirectional"  # bidirectional (prefix-LM) | causal (the plain recipe)
    segment_embeddings: bool = False  # add a learned source/target embedding
    rope_restart: bool = False  # restart position ids at <sep> (target positions count from 0)
    # weight of a source-side loss in training (Gao et al. 2022), added to the target's: causal, predict each next
    # source token; prefix-LM, restore the source tokens masked at rate source_mask_rate (denoising)
    source_loss: float = 0.0
    source_mask_rate: float = 0.15
    # prefix-LM: denoise in a second pass over the source alone, so the target reads the clean source (costs about
    # the source's share of a training step more); false: in the training pass itself, the target reads the masks
    source_loss_separate: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prefix_mode not in ("bidirectional", "causal"):
            raise ValueError(f"prefix_mode={self.prefix_mode!r}: expected 'bidirectional' or 'causal'")
        if self.source_loss < 0 or not 0 < self.source_mask_rate < 1:
            raise ValueError(f"source_loss={self.source_loss}, source_mask_rate={self.source_mask_rate}: expected a "
                             "weight >= 0 and a rate between 0 and 1")
        if self.source_loss_separate and self.prefix_mode == "causal":
            raise ValueError("source_loss_separate: only the prefix-LM corrupts its source; the causal model's source "
                             "loss (next-token prediction) already leaves the target's source clean")


Seq2SeqConfig._presets = {
    "tiny": {**_SIZES["tiny"], "n_encoder_layers": 1, "n_decoder_layers": 1},
    "small": {**_SIZES["small"], "n_encoder_layers": 3, "n_decoder_layers": 3},
    "base": {**_SIZES["base"], "n_encoder_layers": 3, "n_decoder_layers": 3},
}
DecoderOnlyConfig._presets = {
    "tiny": {**_SIZES["tiny"], "n_layers": 2},
    "small": {**_SIZES["small"], "n_layers": 7},
    "base": {**_SIZES["base"], "n_layers": 7},
}


def train_flops(config: TransformerConfig, src_lens: torch.Tensor, tgt_lens: torch.Tensor) -> float:
    """Model FLOPs of one training step (forward + backward) over a batch's real tokens, for MFU.

    src_lens, tgt_lens: (B,) non-pad token counts (target: `y1 .. yn <eos>`). 6 x the matmul weights each token
    passes through, per side (seq2seq: the source through the encoder and the cross-attention K/V projection, the
    target through the decoder and the output layer; decoder-only: every token through every layer, the output
    layer on target tokens only), plus 3 x the attention forward (q.k and p.v, 2 x 2d FLOPs per query-key pair;
    causal blocks count half). Embedding lookups, norms, softmax and the optimizer are not counted.
    """
    d, V = config.d_model, config.vocab_size
    mlp = d * config.d_ff * (3 if config.activation == "swiglu" else 2)
    s, t = src_lens.double(), tgt_lens.double()
    S, T = float(s.sum()), float(t.sum())
    ss, tt, ts = float((s * s).sum()), float((t * t).sum()), float((t * s).sum())
    if isinstance(config, Seq2SeqConfig):
        le, ld = config.n_encoder_layers, config.n_decoder_layers
        matmul = S * (le * (4 * d * d + mlp) + ld * 2 * d * d) + T * (ld * (6 * d * d + mlp) + d * V)
        attn = 4 * d * (le * ss + ld * (tt / 2 + ts))
    else:
        n = config.n_layers
        matmul = (S + T) * n * (4 * d * d + mlp) + T * d * V
        attn = 4 * d * n * ((ss / 2 if config.prefix_mode == "causal" else ss) + ts + tt / 2)
    return 6 * matmul + 3 * attn
