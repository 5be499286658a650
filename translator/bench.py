"""What the benchmarks share (scripts/bench_train.py, bench_decode.py, bench_overhead.py, time_to_bleu.py): the device
clock, bf16 autocast, a description of the machine, and the Hugging Face models of our configs' size with their loss.
The device comes from `translator.translate.resolve_device`; the recipe (loss, optimiser, schedule) from
`translator.recipe`; the configs from `translator.cli.build`.

Hugging Face `transformers` is imported only by the functions that build or describe its models (the `bench` extra).
"""

from __future__ import annotations

import json
import logging
import platform
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from translator import quantize
from translator.config import TransformerConfig
from translator.data import TranslationDataModule
from translator.recipe import target_loss
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID, Tokenizer

log = logging.getLogger(__name__)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that the host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_autocast(device: torch.device) -> bool:
    """Whether bf16 autocast pays on this device: any CUDA GPU here; a CPU only with native bf16 arithmetic
    (AVX512-BF16 or AMX), which torch reports at run time. Never assumed."""
    if device.type == "cuda":
        return True
    return quantize.bf16_supported()


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on a GPU, nothing on the CPU: how the decoding benchmarks run."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def machine(device: torch.device) -> dict:
    """Host, CPU, library versions and (on CUDA) the GPU, for the JSON a benchmark writes."""
    info = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__,
            "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def write_json(path: Path | None, result: dict) -> None:
    """Write a benchmark's result to `path` (nothing when None), its directory made, other objects as strings."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    log.info("wrote %s", path)


def load_tokenizer(data: str, vocab_size: int, path: str | None = None) -> Tokenizer:
    """The SentencePiece model at `path`, or the one the DataModule trains on `data`'s train split (once: cached under
    checkpoints/tokenizers)."""
    dm = TranslationDataModule(data, val_split="val", test_split="test_2016_flickr", tokenizer=path,
                               vocab_size=vocab_size, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm.tokenizer


# ---- Hugging Face peers ----------------------------------------------------------------------------------------
def hf_model(arch: str, cfg: TransformerConfig, attn_implementation: str = "sdpa") -> nn.Module:
    """A randomly initialised Hugging Face model of our config's size and dropout: Marian (post-LN, sinusoidal) for
    seq2seq, GPT-2 (pre-LN, learned positions) for decoder-only; ReLU FFN, tied embeddings, attention dropout 0."""
    import transformers

    common = {"vocab_size": cfg.vocab_size, "pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
              "tie_word_embeddings": True}
    if arch == "seq2seq":
        conf = transformers.MarianConfig(
            d_model=cfg.d_model, encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
            encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads, encoder_ffn_dim=cfg.d_ff,
            decoder_ffn_dim=cfg.d_ff, max_position_embeddings=256, activation_function="relu", dropout=cfg.dropout,
            attention_dropout=0.0, activation_dropout=0.0, scale_embedding=True, decoder_start_token_id=BOS_ID,
            forced_eos_token_id=None, share_encoder_decoder_embeddings=True, **common)
        return transformers.AutoModelForSeq2SeqLM.from_config(conf, attn_implementation=attn_implementation)
    conf = transformers.GPT2Config(
        n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff, n_positions=512,
        activation_function="relu", resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0, **common)
    return transformers.AutoModelForCausalLM.from_config(conf, attn_implementation=attn_implementation)


def gpt2_inputs(src: Tensor, tgt: Tensor) -> dict[str, Tensor]:
    """Our decoder-only sequence `src <sep> y` for GPT-2: source pads masked and skipped by the position ids.
    src (B, S), tgt (B, T+1) -> input_ids (B, S+T) and the arguments that keep the logits of the T target inputs."""
    keep = src != PAD_ID  # (B, S)
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], SEP_ID), tgt[:, 1:-1]], 1)  # (B, T)
    T = tgt_in.size(1)
    pos = torch.cat([(keep.long().cumsum(1) - 1).clamp(min=0),
                     keep.sum(1, keepdim=True) + torch.arange(T, device=src.device)], 1)
    mask = torch.cat([keep, torch.ones_like(tgt_in, dtype=torch.bool)], 1).long()
    return {"input_ids": torch.cat([src, tgt_in], 1), "attention_mask": mask, "position_ids": pos,
            "logits_to_keep": T}


def hf_loss(arch: str, model: Callable, label_smoothing: float) -> Callable[[Tensor, Tensor], Tensor]:
    """(src, tgt) -> the recipe's loss (`translator.recipe.target_loss`) of a model from `hf_model`."""
    if arch == "seq2seq":
        return lambda src, tgt: target_loss(model(input_ids=src, attention_mask=(src != PAD_ID).long(),
                                                  decoder_input_ids=tgt[:, :-1]).logits, tgt, label_smoothing)
    return lambda src, tgt: target_loss(model(**gpt2_inputs(src, tgt)).logits, tgt, label_smoothing)
