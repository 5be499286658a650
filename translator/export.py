"""`translator export`: a trained checkpoint as a self-contained serving directory, for CTranslate2 or ONNX Runtime.

    translator export --checkpoint CKPT --format ctranslate2 [--quantization int8|int16|float16|float32] --out DIR
    translator export --checkpoint CKPT --format onnx --out DIR

DIR holds the model, the checkpoint's SentencePiece model (`sentencepiece.model`) and `translator.json`: the
architecture, the special ids, the model config and how to call the model, so the directory alone translates
(`scripts/translate.py --model DIR`, or `translator.engines.load(DIR)`).

CTranslate2: the converter builds the model with CTranslate2's own spec API (`TransformerSpec` for the
encoder-decoder, `TransformerDecoderModelSpec` for the causal decoder-only) from our weights: pre-/post-LN, learned
and sinusoidal positions (exported as a table of `max_positions` rows, which bounds the sequence length there:
CTranslate2's built-in sinusoids are laid out [sin | cos] from position 1, ours interleave sin and cos from 0), RoPE (rotate-half layout), relu/gelu/swiglu, the sqrt(d) embedding
scale and tied embeddings. What it cannot express (the prefix-LM's bidirectional source, segment embeddings, RoPE
positions that restart at <sep>) is refused with one line naming it; export those with `--format onnx`.

ONNX: the decode-step interface as graphs with the KV cache as explicit inputs and outputs (`torch.onnx.export`,
dynamo), for both architectures, the prefix-LM included; `translator.engines.OnnxModel` runs them under ONNX Runtime
through `translator.generate`'s beam search.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from translator import checkpoint
from translator.decoder_only import DecoderOnlyTransformer
from translator.layers import Attention, Block, sinusoidal
from translator.seq2seq import Seq2SeqTransformer
from translator.tokenizer import Tokenizer

FORMATS = ("ctranslate2", "onnx")
QUANTIZATIONS = ("int8", "int16", "float16", "float32")
MANIFEST = "translator.json"
SENTENCEPIECE = "sentencepiece.model"
MAX_LEN_A, MAX_LEN_B = 1.2, 10  # generate.max_lengths' defaults: at most int(a * source tokens + b) output tokens
SUPPRESSED = ("<pad>", "<s>", "<sep>")  # what our search never emits (generate._banned_ids), as pieces


class ExportError(ValueError):
    """A model or a request that cannot be exported as asked."""


# ---- CTranslate2 -------------------------------------------------------------------------------------------------
def ctranslate2_unsupported(model: nn.Module) -> str | None:
    """Why CTranslate2 cannot run this model exactly, or None when it can."""
    cfg = model.config
    if isinstance(model, DecoderOnlyTransformer):
        if cfg.prefix_mode == "bidirectional":
            return ("the prefix-LM's bidirectional attention over the source (prefix_mode='bidirectional'): "
                    "CTranslate2's decoder-only models are causal everywhere")
        if cfg.segment_embeddings:
            return "segment embeddings (source/target), which CTranslate2's decoder-only models do not have"
        if cfg.rope_restart:
            return "RoPE positions that restart at <sep> (rope_restart=True): CTranslate2 counts positions on"
    elif not isinstance(model, Seq2SeqTransformer):
        return f"{type(model).__name__} is not a translator model"
    return None


def _set_linear(spec, weight: Tensor, bias: Tensor | None) -> None:
    spec.weight = weight.detach().float().numpy().copy()
    if bias is not None:
        spec.bias = bias.detach().float().numpy().copy()


def _set_norm(spec, norm: nn.LayerNorm) -> None:
    spec.gamma = norm.weight.detach().float().numpy().copy()
    spec.beta = norm.bias.detach().float().numpy().copy()


def _set_attention(spec, attn: Attention) -> None:
    """CTranslate2 fuses q, k, v of self-attention (our `qkv`) and k, v of cross-attention (our `kv`)."""
    if attn.cross:
        _set_linear(spec.linear[0], attn.q.weight, attn.q.bias)
        _set_linear(spec.linear[1], attn.kv.weight, attn.kv.bias)
    else:
        _set_linear(spec.linear[0], attn.qkv.weight, attn.qkv.bias)
    _set_linear(spec.linear[-1], attn.out.weight, attn.out.bias)


def _set_block(spec, block: Block) -> None:
    _set_attention(spec.self_attention, block.self_attn)
    _set_norm(spec.self_attention.layer_norm, block.norm1)
    if block.cross_attn is not None:
        _set_attention(spec.attention, block.cross_attn)
        _set_norm(spec.attention.layer_norm, block.norm2)
    fc, proj = block.mlp.fc, block.mlp.proj
    if block.mlp.activation == "swiglu":  # silu(gate) * up = CTranslate2's act(linear_0) * linear_0_noact
        gate_w, up_w = fc.weight.chunk(2)
        gate_b, up_b = (None, None) if fc.bias is None else fc.bias.chunk(2)
        _set_linear(spec.ffn.linear_0, gate_w, gate_b)
        _set_linear(spec.ffn.linear_0_noact, up_w, up_b)
    else:
        _set_linear(spec.ffn.linear_0, fc.weight, fc.bias)
    _set_linear(spec.ffn.linear_1, proj.weight, proj.bias)
    _set_norm(spec.ffn.layer_norm, block.norm3)


def _stack_options(cfg) -> dict[str, Any]:
    """The TransformerEncoderSpec/TransformerDecoderSpec arguments for our layer layout."""
    from ctranslate2.specs import common_spec

    activation = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU,  # exact (erf) GELU
                  "swiglu": common_spec.Activation.SWISH}[cfg.activation]
    options = dict(num_heads=cfg.n_heads, pre_norm=cfg.norm_first, activation=activation,
                   ffn_glu=cfg.activation == "swiglu")
    if cfg.positions == "rope":  # over the whole head, rotate-half (not interleaved) layout
        options.update(rotary_dim=0, rotary_interleave=False, rotary_base=cfg.rope_base)
    return options


def _set_inputs(spec, model: nn.Module, embedding: nn.Embedding) -> None:
    """Token embedding, its sqrt(d) scale, and the position table (absent with RoPE)."""
    cfg = model.config
    spec_embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
    spec_embeddings.weight = embedding.weight.detach().float().numpy().copy()
    spec.scale_embeddings = cfg.scale_embeddings
    if cfg.positions == "learned":
        spec.position_encodings.encodings = model.positions.table.weight.detach().float().numpy().copy()
    elif cfg.positions == "sinusoidal":  # ours, as a table: CTranslate2's own sinusoids are laid out otherwise
        spec.position_encodings.encodings = sinusoidal(torch.arange(cfg.max_positions), cfg.d_model).float().numpy()


def ctranslate2_spec(model: nn.Module, tokenizer: Tokenizer):
    """The CTranslate2 ModelSpec of a translator model (validated, not yet quantized)."""
    from ctranslate2.specs import (
        TransformerDecoderModelSpec,
        TransformerDecoderSpec,
        TransformerEncoderSpec,
        TransformerSpec,
    )

    reason = ctranslate2_unsupported(model)
    if reason is not None:
        raise ExportError(f"CTranslate2 cannot express {reason}; export it with --format onnx instead")
    cfg = model.config
    options = _stack_options(cfg)
    if isinstance(model, Seq2SeqTransformer):
        spec = TransformerSpec(TransformerEncoderSpec(cfg.n_encoder_layers, **options),
                               TransformerDecoderSpec(cfg.n_decoder_layers, **options))
        _set_inputs(spec.encoder, model, model.src_embed)
        for layer_spec, block in zip(spec.encoder.layer, model.encoder):
            _set_block(layer_spec, block)
        if cfg.norm_first:
            _set_norm(spec.encoder.layer_norm, model.enc_norm)
        decoder, embedding, blocks, final_norm = spec.decoder, model.tgt_embed, model.decoder, model.dec_norm
    else:
        spec = TransformerDecoderModelSpec(TransformerDecoderSpec(cfg.n_layers, with_encoder_attention=False,
                                                                  **options))
        decoder, embedding, blocks, final_norm = spec.decoder, model.embed, model.blocks, model.norm
    _set_inputs(decoder, model, embedding)
    for layer_spec, block in zip(decoder.layer, blocks):
        _set_block(layer_spec, block)
    if cfg.norm_first:
        _set_norm(decoder.layer_norm, final_norm)
    _set_linear(decoder.projection, model.lm_head.weight, None)  # tied: CTranslate2 aliases equal weights

    pieces = tokenizer.pieces(list(range(tokenizer.vocab_size)))
    special = dict(unk_token=pieces[tokenizer.unk_id], bos_token=pieces[cfg.bos_id], eos_token=pieces[cfg.eos_id])
    if isinstance(spec, TransformerSpec):
        spec.register_source_vocabulary(pieces)
        spec.register_target_vocabulary(pieces)
        special["decoder_start_token"] = pieces[cfg.bos_id]
    else:
        spec.register_vocabulary(pieces)
    for key, value in special.items():
        setattr(spec.config, key, value)
    spec.config.layer_norm_epsilon = next(m.eps for m in model.modules() if isinstance(m, nn.LayerNorm))
    spec.validate()
    return spec


def export_ctranslate2(model: nn.Module, tokenizer: Tokenizer, out: str | Path, quantization: str = "float32",
                       source: str = "") -> Path:
    """Write a CTranslate2 model directory (weights quantized to `quantization`) with its tokenizer and manifest."""
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"--quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    spec = ctranslate2_spec(model, tokenizer)
    spec.optimize(quantization=quantization)
    out = empty_dir(out)
    spec.save(str(out))
    seq2seq = isinstance(model, Seq2SeqTransformer)
    usage = (
        "ctranslate2.Translator(DIR).translate_batch([source pieces], beam_size=5, max_decoding_length=int(1.2 * "
        "len(source) + 10), min_decoding_length=0, suppress_sequences=[['<pad>'], ['<s>'], ['<sep>']]); the source "
        "has no <s> or </s>, the decoder starts from <s>"
        if seq2seq else
        "ctranslate2.Generator(DIR).generate_batch([source pieces + ['<sep>']], include_prompt_in_result=False, "
        "beam_size=5, max_length=int(1.2 * len(source) + 10), min_length=0, suppress_sequences=[['<pad>'], ['<s>'], "
        "['<sep>']]); the prompt is `source <sep>`, the result is the target"
    )
    write_bundle(out, model, tokenizer, "ctranslate2", source, quantization=quantization, usage=usage)
    return out


# ---- the bundle --------------------------------------------------------------------------------------------------
def empty_dir(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out}: exists and is not an empty directory; choose a new one")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_bundle(out: Path, model: nn.Module, tokenizer: Tokenizer, fmt: str, source: str, **extra: Any) -> None:
    """The tokenizer and translator.json next to the model files."""
    cfg = model.config
    tokenizer.save(out / SENTENCEPIECE)
    manifest = {
        "format": fmt,
        "arch": "seq2seq" if isinstance(model, Seq2SeqTransformer) else "decoder_only",
        "checkpoint": source,
        "sentencepiece": SENTENCEPIECE,
        "special_ids": {"pad": cfg.pad_id, "unk": tokenizer.unk_id, "bos": cfg.bos_id, "eos": cfg.eos_id,
                        "sep": cfg.sep_id},
        "start_id": model.start_id,
        "max_length": {"a": MAX_LEN_A, "b": MAX_LEN_B, "rule": "at most int(a * source tokens + b) target tokens"},
        "suppressed_pieces": list(SUPPRESSED),
        **extra,
        "model": {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def export(ckpt: str | Path, fmt: str, out: str | Path, quantization: str | None = None) -> Path:
    """Export a translator checkpoint to `out`; ExportError/CheckpointError for what cannot be done."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt != "ctranslate2" and quantization is not None:
        raise ExportError(f"--quantization applies to --format ctranslate2 only, not {fmt}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ExportError(f"--quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    model, tokenizer, _ = checkpoint.load(ckpt)
    if fmt == "ctranslate2":
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            raise ExportError("--format ctranslate2 needs the ctranslate2 package: pip install 'translator[serve]'")
        reason = ctranslate2_unsupported(model)
        if reason is not None:
            raise ExportError(f"{ckpt}: CTranslate2 cannot express {reason}; export it with --format onnx instead")
        return export_ctranslate2(model, tokenizer, out, quantization or "float32", source=str(ckpt))
    if any(importlib.util.find_spec(package) is None for package in ("onnx", "onnxscript")):
        raise ExportError("--format onnx needs the onnx and onnxscript packages: pip install 'translator[serve]'")
    from translator.onnx_export import export_onnx

    return export_onnx(model, tokenizer, out, source=str(ckpt))


# ---- the command -------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other translator error
        sys.stderr.write(f"translator: error: {message} (see translator export --help)\n")
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    """`translator export ...`: 0 on success, 2 (one line on stderr) for a bad checkpoint, format or model."""
    parser = _Parser(prog="translator export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a translator .ckpt")
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--quantization", help=f"ctranslate2 weights: one of {', '.join(QUANTIZATIONS)} "
                                               "(default float32)")
    parser.add_argument("--out", required=True, help="a new (or empty) directory to write")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.format, args.out, args.quantization)
    except (ExportError, checkpoint.CheckpointError) as err:
        sys.stderr.write(f"translator: error: {err}\n")
        return 2
    sys.stderr.write(f"translator: exported {args.checkpoint} ({args.format}) to {out}\n")
    return 0
