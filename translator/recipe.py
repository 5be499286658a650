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


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, label_smoothing: float) -> Tensor:
    """The output projection and the label-smoothed cross-entropy in one, a chunk of rows at a time: hidden (N, D),
    weight (V, D), targets (N,) -> the loss summed over the rows whose target is not PAD_ID, the value of
    `F.cross_entropy(hidden @ weight.T, targets, ignore_index=PAD_ID, label_smoothing=..., reduction="sum")`. Under
    autocast the projection runs in its dtype and the softmax in float32, as there.

    Torch's way makes about ten passes over the (N, V) logits in float32: the cast, log-softmax, the zero-filled
    gradient, the smoothing's, their sum, the log-softmax backward, the cast back. The logits of 2,000 target tokens
    over 8,000 pieces are 61 MB in float32, more than a CPU's caches. Here each chunk of rows (2^21 logits, 8 MB) is
    projected, scored and, with autograd on, turned into its gradient, softmax - (1 - eps) onehot - eps / V, while it
    is in cache; the forward keeps that gradient (in the projection's dtype) instead of the logits, and the backward
    is two matrix products. On the 2-core VM: 85 against 176 ms for forward and backward at N = 1,920 in bf16
    (docs/results.md, "CPU speed: dropout masks and the output layer").
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, label_smoothing)
    return _chunked_cross_entropy(*_projection_inputs(hidden, weight), targets, label_smoothing, grads=False)[0]


def _projection_inputs(hidden: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """hidden and weight in the dtype autocast would give their product (their own outside autocast)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return hidden.to(dtype), weight.to(dtype)


def _chunked_cross_entropy(h: Tensor, w: Tensor, targets: Tensor, eps: float, grads: bool):
    """-> (the summed loss, its gradient with respect to the logits (N, V) in h's dtype, or None); see
    `linear_cross_entropy`."""
    V, softmax_dtype = w.size(0), torch.promote_types(h.dtype, torch.float32)  # float32, or float64 in float64
    grad = torch.empty(h.size(0), V, dtype=h.dtype, device=h.device) if grads else None
    total = torch.zeros((), dtype=softmax_dtype, device=h.device)
    rows = max(1, (1 << 21) // V)
    with torch.autocast(h.device.type, enabled=False):
        for i in range(0, h.size(0), rows):
            z = (h[i : i + rows] @ w.T).to(softmax_dtype)  # (r, V) logits
            y = targets[i : i + rows, None]
            keep = (y != PAD_ID).to(softmax_dtype)  # (r, 1)
            z_y, z_sum, z_max = z.gather(1, y), z.sum(-1, keepdim=True), z.amax(-1, keepdim=True)
            e = z.sub_(z_max).exp_()  # in place: the chunk's one float buffer
            e_sum = e.sum(-1, keepdim=True)
            lse = z_max + e_sum.log()
            total += (keep * (lse - (1 - eps) * z_y - eps / V * z_sum)).sum()
            if grads:  # (softmax - eps / V - (1 - eps) onehot(y)), zero at pads
                grad[i : i + rows] = e.mul_(keep / e_sum).sub_(keep * (eps / V)).scatter_add_(1, y, keep * (eps - 1))
    return total, grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, label_smoothing: float) -> Tensor:
        h, w = _projection_inputs(hidden, weight)
        total, grad = _chunked_cross_entropy(h, w, targets, label_smoothing, grads=True)
        ctx.save_for_backward(h, w, grad)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        h, w, grad = ctx.saved_tensors
        grad_hidden = (grad @ w).mul_(grad_total).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_weight = (grad.T @ h).mul_(grad_total).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def fused_loss(device: torch.device) -> bool:
    """Whether `token_loss` takes `linear_cross_entropy`: on a CPU, outside torch.compile (which fuses torch's own
    ops and would unroll the chunk loop). On a GPU torch's fused cross-entropy kernels are used as they are."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def token_loss(
    model: nn.Module, src: Tensor, tgt: Tensor, label_smoothing: float, tokens: Tensor | None = None,
    source_weight: float = 0.0,
) -> Tensor:
    """`target_loss` of our model on a batch: src (B, S); tgt (B, T+1) = `<bos> y <eos>` padded; the model reads
    tgt[:, :-1] and predicts tgt[:, 1:]. `source_weight` > 0 (a decoder-only model's `config.source_loss`, in
    training) adds its source-side loss times that weight (`translator.decoder_only`). The forward runs under
    `training_attention`; on a CPU the output layer and the loss are one `linear_cross_entropy`."""
    targets = tgt[:, 1:].flatten()
    head = None  # the model's output layer, then torch's cross-entropy over the logits
    if fused_loss(src.device):
        def head(hidden: Tensor, weight: Tensor) -> Tensor:
            return linear_cross_entropy(hidden.flatten(0, 1), weight, targets, label_smoothing)

    with training_attention(src.device):
        out = model(src, tgt[:, :-1], head=head, **({"with_source": True} if source_weight else {}))
    out, source = out if source_weight else (out, None)
    if head is None:
        loss = target_loss(out, tgt, label_smoothing, tokens)
    else:  # the summed loss
        loss = out / (tokens if tokens is not None else (targets != PAD_ID).sum())
    return loss if source is None else loss + source_weight * source


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
