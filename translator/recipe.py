"""The training recipe in one place: the loss (and the attention kernel it trains with), AdamW with its weight-decay
groups, and the learning-rate schedule.

`TranslationModule` trains with these functions, and the benchmarks (scripts/bench_train.py, bench_quality.py) call
the same ones, for our models and for the Hugging Face peers alike, so that a change of the recipe reaches them all.
"""

from __future__ import annotations

import contextlib
import math
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from translator.tokenizer import PAD_ID

SCHEDULES = ("inverse_sqrt", "cosine")


def target_loss(logits: Tensor, tgt: Tensor, label_smoothing: float, tokens: Tensor | None = None) -> Tensor:
    """Cross-entropy of logits (B, T, V) against tgt[:, 1:] (tgt (B, T+1) = `<bos> y <eos>` padded) over the non-pad
    target tokens: their mean, or with `tokens` (a 0-d tensor) their sum divided by it."""
    loss = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD_ID,
                           label_smoothing=label_smoothing, reduction="mean" if tokens is None else "sum")
    return loss if tokens is None else loss / tokens


def training_attention(device: torch.device) -> AbstractContextManager:
    """The SDPA kernel that a training forward runs under (its backward follows it): on a CPU, with autograd on, the
    math kernel, whose forward and backward are 1.9-4.8x faster there than the flash kernel's in bf16 at our sentence
    lengths, up to 1.5x in float32 (docs/benchmarks.md, "Attention kernels on a CPU"); elsewhere, and for inference,
    SDPA's own choice (the flash forward is the faster one). With attention dropout, SDPA takes the math kernel on a
    CPU anyway."""
    if device.type == "cpu" and torch.is_grad_enabled():
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def token_loss(
    model: nn.Module, src: Tensor, tgt: Tensor, label_smoothing: float, tokens: Tensor | None = None,
    source_weight: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """`target_loss` of our model on a batch, and the logits (B, T, V): src (B, S); tgt (B, T+1) = `<bos> y <eos>`
    padded; the model reads tgt[:, :-1] and predicts tgt[:, 1:]. `source_weight` > 0 (a decoder-only model's
    `config.source_loss`, in training) adds its source-side loss times that weight (`translator.decoder_only`).
    The forward runs under `training_attention`."""
    with training_attention(src.device):
        if not source_weight:
            logits = model(src, tgt[:, :-1])
            return target_loss(logits, tgt, label_smoothing, tokens), logits
        logits, source = model(src, tgt[:, :-1], with_source=True)
    return target_loss(logits, tgt, label_smoothing, tokens) + source_weight * source, logits


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices of linear layers only: none on norms, biases and embeddings (token, position,
    segment; a tied output projection shares the token embedding's weight and counts as one). In parameter order."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # each shared (tied) parameter once
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: nn.Module, lr: float, weight_decay: float, fused: bool | None = None,
          foreach: bool | None = None) -> torch.optim.AdamW:
    """AdamW(betas (0.9, 0.98), eps 1e-9) over `param_groups`; `fused`/`foreach` choose torch's implementation."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-9, fused=fused,
                             foreach=foreach)


def lr_schedule(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                total_steps: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps` to the optimizer's lr, then inverse square root decay (`inverse_sqrt`) or
    cosine decay to zero at `total_steps` (`cosine`: needs a finite total). Stepped once per optimizer step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: expected one of {SCHEDULES}")
    warmup = max(1, warmup_steps)
    # an endless train stream without max_steps gives Lightning's estimate -1 or inf: no horizon for cosine
    if schedule == "cosine" and not (total_steps is not None and 0 < total_steps < math.inf):
        raise ValueError("schedule='cosine' decays to zero at trainer.max_steps: set --trainer.max_steps")
    total = max(warmup + 1, int(total_steps)) if schedule == "cosine" else warmup + 1

    def lr_lambda(step: int) -> float:
        step += 1  # the 1-based optimizer step about to run
        if step < warmup:
            return step / warmup
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))
        return math.sqrt(warmup / step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def compiled(compile: bool | str | None, fn):
    """fn, or torch.compile(fn) in the given mode (True: the default mode)."""
    if compile is False or compile is None:
        return fn
    import torch._inductor.config as inductor

    # torch 2.11's inductor failed an assertion in this analysis while compiling our training step for CUDA
    # (tiling_utils.get_pw_red_splits, seen on an H200); without it the step compiles and trains (docs/results.md)
    if hasattr(inductor.triton, "coalesce_tiling_analysis"):
        inductor.triton.coalesce_tiling_analysis = False
    return torch.compile(fn, mode=None if compile is True else compile)
