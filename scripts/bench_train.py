#!/usr/bin/env python
"""Training throughput of both architectures on real Multi30k batches: ours (several variants) against Hugging Face.

    python scripts/bench_train.py --json out/bench_train.json                      # H100: the full sweep
    python scripts/bench_train.py --device cpu --tokens 512 --steps 3             # CPU smoke test

What runs (per architecture, per token budget, every variant on the *same* list of batches):

* the recipe: each ``--configs`` file (default ``configs/encdec.yaml`` and ``configs/decoder_only.yaml``) with
  ``configs/data/multi30k.yaml``, built as ``translator fit`` builds it (`translator.cli.build`), at ``--preset``:
  model config (dropout included), label smoothing, AdamW, LR schedule and gradient clipping all come from there
  (`translator.recipe`), for our models and the HF peers alike.
* batches: the DataModule's train batches (``TranslationDataModule.batches("train")``) with ``max_tokens`` = the
  budget (sorted, shuffled, padded to multiples of 8, exactly as training makes them), tokenizer trained once by
  `TranslationDataModule.prepare_data` and cached.
  The first ``--batches`` batches filled to at least half the budget are kept (the tail batch of each sorted buffer is
  skipped) and cycled; warm-up steps cover every distinct batch shape before timing starts.
* variants (``--variants``): ``eager`` = bf16 autocast (on a CPU only where it has bf16 arithmetic, see
  `bf16_autocast`), fused AdamW on CUDA, no host sync in the loop (the reference); ``fp32`` (no autocast), ``unfused`` (foreach AdamW), ``item`` (``loss.item()`` every step) change one thing each;
  ``compile`` = ``torch.compile`` of forward + loss (as ``Seq2SeqModule(compile=True)`` does); ``reduce-overhead``
  = the same in ``mode="reduce-overhead"`` (CUDA graphs: one recording per batch shape; token-budget batches come in
  few shapes, see docs/benchmarks.md); ``lightning`` / ``lightning-compile`` / ``lightning-graphs`` = the real ``Trainer.fit``
  path (the config's module with ``compile`` False / True / "reduce-overhead", bf16-mixed, gradient clipping,
  ``TrainingClock``) over the same batches; ``hf`` / ``hf-fp32`` / ``hf-compile`` = ``MarianMTModel`` (3+3 layers) or
  ``GPT2LMHeadModel`` (7 layers) of the same size, same loss, optimiser, clipping and batches. The attention kernel
  (CPU only): ``sdpa-auto`` = ours on SDPA's own choice (flash), where ours trains on the math kernel on a CPU
  (`translator.recipe.training_attention`); ``hf-math`` = HF on the math kernel, the same choice given to HF;
  ``torch-dropout`` = ours with torch's ``nn.Dropout`` (one bernoulli draw per element) where ours draws its CPU masks
  16 bits at a time (`translator.layers.Dropout`); ``torch-loss`` = ours with the output layer and torch's
  cross-entropy over the logits, where ours fuses them on a CPU (`translator.recipe.linear_cross_entropy`);
  ``torch-both`` = both, the step of commit c7ac655.
* ``--rounds R``: every variant measured R times in ABBA order; each row is the median round.
* every step (bare loops and Lightning alike): copy the pinned batch to the device (non_blocking), forward, label-
  smoothed cross-entropy, backward, clip to norm 1, AdamW step, LR schedule step, zero grads.
* timing: a CUDA event after each step (host clock on CPU); step time = gap between consecutive events, so host
  overhead and data transfer count; warm-up excluded; median over the timed steps. tok/s = median of per-step
  (non-pad source + non-pad target tokens) / step time. Peak memory = ``torch.cuda.max_memory_allocated`` (model,
  optimiser state and activations; reset before each variant).
* MFU = model FLOPs of the real (non-pad) tokens / step time / peak (``--peak-tflops``, default 800: the dense
  bf16 matmul rate measured on the lent H100, issue #8's reference; the spec sheet says 989), with FLOPs =
  6 x (matmul weights applied per token) x tokens, per side, + 3 x attention forward (see `train_flops`). The same
  count is used for the HF models, so MFU ratios equal throughput ratios.
* SDPA: which ``aten::_scaled_dot_product_*`` op (and CUDA kernel) each model's attention dispatches to, from the
  profiler over one training step, plus whether the causal-no-mask and masked calls run under FLASH/EFFICIENT/CUDNN
  only (``torch.nn.attention.sdpa_kernel``).

Prints markdown tables and writes ``--json``. Hugging Face rows need ``transformers`` (imported lazily; skipped with a
message when it is missing).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from translator import recipe
from translator.bench import bf16_autocast, hf_loss, hf_model, machine, write_json
from translator.cli import TranslatorCLI, build
from translator.config import TransformerConfig, train_flops
from translator.data import TranslationDataModule
from translator.layers import Dropout
from translator.logging_callbacks import TrainingClock
from translator.module import MODULES, TranslationModule
from translator.tokenizer import PAD_ID, Tokenizer
from translator.translate import resolve_device

log = logging.getLogger("bench_train")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "configs" / "encdec.yaml", REPO / "configs" / "decoder_only.yaml"]
DATA_CONFIG = REPO / "configs" / "data" / "multi30k.yaml"


@dataclass(frozen=True)
class Variant:
    impl: str  # ours | lightning | hf
    autocast: bool = True
    fused: bool = True
    compile: str | None = None  # None | default | reduce-overhead
    item: bool = False
    cuda_only: bool = False
    cpu_only: bool = False  # a CPU matter: on CUDA the same as eager (sdpa-auto) or not what ours does (hf-math)
    same_on_cpu: bool = False  # indistinguishable from eager on CPU (no fused AdamW there; no autocast without bf16)
    attention: str | None = None  # None: as each runs; "auto": ours on SDPA's own kernel; "math": HF on the math one
    torch_dropout: bool = False  # ours with torch's nn.Dropout in place of translator.layers.Dropout
    torch_loss: bool = False  # ours with the logits and F.cross_entropy in place of recipe.linear_cross_entropy


VARIANTS = {
    "eager": Variant("ours"),
    "sdpa-auto": Variant("ours", attention="auto", cpu_only=True),
    "torch-dropout": Variant("ours", torch_dropout=True, cpu_only=True),
    "torch-loss": Variant("ours", torch_loss=True, cpu_only=True),
    "torch-both": Variant("ours", torch_dropout=True, torch_loss=True, cpu_only=True),
    "fp32": Variant("ours", autocast=False),
    "unfused": Variant("ours", fused=False, same_on_cpu=True),
    "item": Variant("ours", item=True),
    "compile": Variant("ours", compile="default"),
    "reduce-overhead": Variant("ours", compile="reduce-overhead", cuda_only=True),
    "lightning": Variant("lightning"),
    "lightning-compile": Variant("lightning", compile="default"),
    "lightning-graphs": Variant("lightning", compile="reduce-overhead", cuda_only=True),
    "hf": Variant("hf"),
    "hf-fp32": Variant("hf", autocast=False),
    "hf-math": Variant("hf", attention="math", cpu_only=True),
    "hf-compile": Variant("hf", compile="default"),
}
DEFAULT_VARIANTS = ["eager", "fp32", "unfused", "item", "compile", "reduce-overhead", "lightning", "hf"]
COMPILED_ON_CPU_ONLY_IF_ASKED = {"compile", "lightning-compile", "hf-compile"}


# ---- batches -----------------------------------------------------------------------------------------------------
@dataclass
class BenchBatch:
    src: Tensor  # (B, S) int64, pinned on CUDA hosts
    tgt: Tensor  # (B, T+1)
    src_lens: Tensor  # (B,) non-pad source tokens
    tgt_lens: Tensor  # (B,) non-pad target tokens predicted (= target input positions)

    @property
    def tokens(self) -> int:
        return int(self.src_lens.sum() + self.tgt_lens.sum())

    @property
    def padded(self) -> int:
        return self.src.numel() + self.tgt.numel()


def build_recipe(args: argparse.Namespace, config: Path, device: torch.device, max_tokens: int = 8192,
                 compile: bool | str = False, steps: int = 1, callbacks: Sequence[L.Callback] = ()) -> TranslatorCLI:
    """`translator fit --config CONFIG` with this run's data, tokenizer, preset and seed, built but not run: the module,
    the DataModule (batches of `max_tokens`) and a Trainer for timing: `steps` steps on the device, no logger,
    checkpoints, validation, progress bar or configured callbacks; `callbacks` instead."""
    return build([
        "--config", str(config), "--config", str(DATA_CONFIG), "--seed_everything", str(args.seed),
        "--data.path", args.data, "--data.val_split", "val", "--data.test_split", "test_2016_flickr",
        "--data.max_tokens", str(max_tokens), "--data.num_workers", "0", "--data.seed", str(args.seed),
        *(["--data.tokenizer", args.tokenizer] if args.tokenizer else ["--data.vocab_size", str(args.vocab_size)]),
        "--model.init_args.preset", args.preset, "--model.init_args.compile", json.dumps(compile).strip('"'),
        "--trainer.accelerator", device.type, "--trainer.devices", "1", "--trainer.max_steps", str(steps),
        "--trainer.precision", "bf16-mixed" if bf16_autocast(device) else "32-true", "--trainer.logger", "false",
        "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar",
        "false", "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0",
    ], trainer_defaults={"callbacks": list(callbacks)})


def make_batches(dm: TranslationDataModule, n: int, pin: bool) -> list[BenchBatch]:
    """The first n training batches of the DataModule that are at least half full (real batches, not synthetic)."""
    max_tokens = dm.hparams.max_tokens
    out = []
    for b in itertools.islice(dm.batches("train"), 50 * n):
        if b["src"].numel() + b["tgt"].numel() < max_tokens // 2:
            continue
        src, tgt = (b["src"].pin_memory(), b["tgt"].pin_memory()) if pin else (b["src"], b["tgt"])
        out.append(BenchBatch(src, tgt, (src != PAD_ID).sum(1), (tgt[:, 1:] != PAD_ID).sum(1)))
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"no Multi30k batch fills half of max_tokens={max_tokens}")
    return out


# ---- FLOPs -------------------------------------------------------------------------------------------------------
FLOPS_FORMULA = (
    "train FLOPs = 6 * (N_src * s + N_tgt * t) + 3 * attention_fwd, over real (non-pad) tokens; s, t = source / "
    "target tokens (t = predicted positions). seq2seq: N_src = L_enc*(4d^2 + 2*d*d_ff) + L_dec*2d^2 (cross-attn K/V), "
    "N_tgt = L_dec*(6d^2 + 2*d*d_ff) + d*V; attention_fwd = sum over sentences of 4d*(L_enc*s^2 + L_dec*(t^2/2 + t*s)). "
    "decoder-only: N_src = L*(4d^2 + 2*d*d_ff), N_tgt = N_src + d*V; attention_fwd = 4d*L*(s^2 + t*s + t^2/2) "
    "(bidirectional prefix; s^2/2 for prefix_mode=causal). Causal blocks count half. Embedding lookups, norms, "
    "softmax and the optimiser are not counted."
)


# ---- losses and the optimiser --------------------------------------------------------------------------------------


def loss_fn(impl: str, arch: str, model: nn.Module, label_smoothing: float,
            attention: str | None = None, torch_loss: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """(src, tgt) -> the recipe's loss (label-smoothed cross-entropy over the non-pad target tokens), ours or HF's.
    attention: None, each as it runs (ours under `recipe.training_attention`, HF under SDPA's own choice); "auto":
    ours under SDPA's own choice too; "math": HF under SDPA's math kernel, what `training_attention` picks on a CPU.
    torch_loss: ours through its logits and torch's cross-entropy, as on a GPU (`recipe.fused_loss`)."""
    if impl == "hf":
        loss = hf_loss(arch, model, label_smoothing)
        if attention != "math":
            return loss

        def math_loss(src: Tensor, tgt: Tensor) -> Tensor:
            with sdpa_kernel(SDPBackend.MATH):
                return loss(src, tgt)

        return math_loss
    if attention == "auto":
        return lambda src, tgt: recipe.target_loss(model(src, tgt[:, :-1]), tgt, label_smoothing)
    if torch_loss:
        def logits_loss(src: Tensor, tgt: Tensor) -> Tensor:
            with recipe.training_attention(src.device):
                return recipe.target_loss(model(src, tgt[:, :-1]), tgt, label_smoothing)

        return logits_loss
    return lambda src, tgt: recipe.token_loss(model, src, tgt, label_smoothing)


def make_optimizer(module: TranslationModule, model: nn.Module, total_steps: int, fused: bool | None = None,
                   foreach: bool | None = None) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser and schedule of `module.configure_optimizers` (`translator.recipe`, the module's hyper-parameters)
    over any model, ours or HF's; `fused` / `foreach` pick torch's AdamW implementation."""
    hp = module.hparams
    optimizer = recipe.adamw(model, hp.lr, hp.weight_decay, fused=fused, foreach=foreach)
    return optimizer, recipe.lr_schedule(optimizer, hp.schedule, hp.warmup_steps, total_steps)


# ---- timing ------------------------------------------------------------------------------------------------------
class StepClock:
    """Marks on the device timeline (CUDA events) or on the host clock; step times are gaps between marks."""

    def __init__(self, device: torch.device) -> None:
        self.cuda, self.marks = device.type == "cuda", []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]
        return [b - a for a, b in itertools.pairwise(self.marks)]


class ClockCallback(L.Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_start(self, trainer, pl_module) -> None:
        self.clock.mark()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.mark()


class BatchList(torch.utils.data.Dataset):
    def __init__(self, batches: list[BenchBatch], n: int) -> None:
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        b = self.batches[i % len(self.batches)]
        return {"src": b.src, "tgt": b.tgt}


def bare_loop(model: nn.Module, step_loss: Callable, optimizer: torch.optim.Optimizer,
              schedule: torch.optim.lr_scheduler.LRScheduler, clip: float | None, batches: list[BenchBatch],
              n_steps: int, v: Variant, device: torch.device) -> list[float]:
    """Train for n_steps over the cycled batches; returns every step's time in seconds."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    amp = v.autocast and bf16_autocast(device)
    clock = StepClock(device)
    model.train()
    clock.mark()
    for i in range(n_steps):
        b = batches[i % len(batches)]
        src, tgt = b.src.to(device, non_blocking=True), b.tgt.to(device, non_blocking=True)
        if v.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = step_loss(src, tgt)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if v.item:
            loss.item()
        clock.mark()
    return clock.intervals()


def lightning_loop(cli: TranslatorCLI, tokenizer: Tokenizer, batches: list[BenchBatch],
                   clock: StepClock) -> list[float]:
    """The built Trainer's `fit` of the built module over the cycled batches (CPU tensors, pinned: Lightning copies
    them), timed by the Trainer's `ClockCallback`."""
    cli.model.tokenizer = tokenizer
    # the batches are pinned already (as DataLoader(pin_memory=True) leaves them); Lightning copies them non_blocking
    loader = torch.utils.data.DataLoader(BatchList(batches, cli.trainer.max_steps), batch_size=None, shuffle=False)
    cli.trainer.fit(cli.model, train_dataloaders=loader)
    return clock.intervals()


# ---- SDPA dispatch -----------------------------------------------------------------------------------------------
_ATTN_NAME = re.compile(r"scaled_dot_product_(flash|efficient|cudnn|attention_math|fused)|flash_fwd|flash_bwd|fmha|"
                        r"cutlass.*attention|cudnn.*(sdpa|mha|attn)", re.IGNORECASE)


def sdpa_dispatch(step_loss: Callable, batch: BenchBatch, device: torch.device) -> dict[str, int]:
    """Profiler counts of the SDPA implementations (aten ops and GPU kernels) in one forward + backward."""
    from torch.profiler import ProfilerActivity, profile

    src, tgt = batch.src.to(device), batch.tgt.to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = step_loss(src, tgt)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return {e.key[:120]: e.count for e in prof.key_averages() if _ATTN_NAME.search(e.key)}


def sdpa_backend_probe(cfg: TransformerConfig, batch: BenchBatch, device: torch.device) -> dict[str, dict[str, str]]:
    """Can each SDPA backend alone run our two kinds of call (forward + backward) at this batch's shapes?

    `causal, no mask`: seq2seq decoder self-attention in training. `bool key mask`: encoder self-attention, cross-
    attention and every decoder-only layer (a (B, 1, Lq, Lk) or (B, 1, 1, Lk) boolean mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, T, S = batch.tgt.size(0), batch.tgt.size(1) - 1, batch.src.size(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (B, cfg.n_heads, T, cfg.head_dim)
    q = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    kv = torch.randn(B, cfg.n_heads, S, cfg.head_dim, device=device, dtype=dtype, requires_grad=True)
    key_mask = (batch.src != PAD_ID).to(device)[:, None, None, :]
    cases = {
        "causal, no mask": lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True),
        "bool key mask": lambda: F.scaled_dot_product_attention(q, kv, kv, attn_mask=key_mask),
    }
    out: dict[str, dict[str, str]] = {}
    for name, call in cases.items():
        out[name] = {}
        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            try:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    call().sum().backward()
                out[name][backend] = "ok"
            except RuntimeError as err:
                out[name][backend] = "no: " + str(err).strip().splitlines()[0][:100]
    return out


# ---- one measurement ---------------------------------------------------------------------------------------------
def free_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def use_torch_dropout(model: nn.Module) -> None:
    """Swap every `translator.layers.Dropout` of `model` for torch's `nn.Dropout` of the same rate."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Dropout):
                setattr(parent, name, nn.Dropout(child.p))


def measure(config: Path, arch: str, name: str, size: int, args: argparse.Namespace, batches: list[BenchBatch],
            tokenizer: Tokenizer, device: torch.device) -> dict:
    """One row: variant `name` of the recipe `config` (architecture `arch`) on `batches` of `size` tokens."""
    v = VARIANTS[name]
    free_memory(device)
    shapes = len({(b.src.shape, b.tgt.shape) for b in batches})
    warmup = args.warmup + (3 * len(batches) if v.compile else 0)  # every shape compiled (and recorded) before timing
    started = time.perf_counter()
    clock = StepClock(device)
    lightning = v.impl == "lightning"
    callbacks = [ClockCallback(clock), TrainingClock()] if lightning else []  # TrainingClock: as the configs have it
    cli = build_recipe(args, config, device, size, compile=(v.compile or False) if lightning else False,
                       steps=warmup + args.steps, callbacks=callbacks)
    module, cfg = cli.model, cli.model.config
    if lightning:
        times = lightning_loop(cli, tokenizer, batches, clock)
        n_params = module.model.num_parameters()
    else:
        torch.manual_seed(args.seed)
        model = (module.model if v.impl == "ours" else hf_model(arch, cfg, args.hf_attn)).to(device)
        if v.torch_dropout:
            use_torch_dropout(model)
        step_loss = loss_fn(v.impl, arch, model, module.hparams.label_smoothing, v.attention, v.torch_loss)
        if v.compile:  # forward and loss, compiled together as the module does
            step_loss = recipe.compiled(v.compile, step_loss)
        cuda = device.type == "cuda"  # as configure_optimizers: fused on CUDA; on CPU torch's default (per tensor)
        optimizer, schedule = make_optimizer(module, model, warmup + args.steps, fused=v.fused and cuda,
                                             foreach=True if cuda and not v.fused else None)
        times = bare_loop(model, step_loss, optimizer, schedule, cli.trainer.gradient_clip_val, batches,
                          warmup + args.steps, v, device)
        n_params = sum(p.numel() for p in model.parameters())
        del model, step_loss, optimizer
    del cli, module
    wall = time.perf_counter() - started
    timed = times[warmup:]
    timed_batches = [batches[(warmup + i) % len(batches)] for i in range(len(timed))]
    rates = [b.tokens / t for b, t in zip(timed_batches, timed)]
    flops = [train_flops(cfg, b.src_lens, b.tgt_lens) / t for b, t in zip(timed_batches, timed)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    row = {
        "arch": arch, "max_tokens": size, "variant": name, "impl": v.impl, "params": n_params,
        "steps_timed": len(timed), "warmup_steps": warmup, "distinct_shapes": shapes, "wall_s": round(wall, 2),
        "tok_per_s": statistics.median(rates), "tok_per_s_mean": sum(b.tokens for b in timed_batches) / sum(timed),
        "step_ms": 1e3 * statistics.median(timed), "peak_mem_gib": peak,
        "real_tokens_per_step": statistics.median(b.tokens for b in timed_batches),
        "padded_tokens_per_step": statistics.median(b.padded for b in timed_batches),
        "achieved_tflops": statistics.median(flops) / 1e12,
        "mfu": statistics.median(flops) / (args.peak_tflops * 1e12) if args.peak_tflops else None,
    }
    log.info("%s %s %d: %.0f tok/s, %.1f ms/step", arch, name, size, row["tok_per_s"], row["step_ms"])
    return row


def merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per (arch, size, variant): with --rounds > 1, the row of its median round by tok/s (the lower middle
    one for an even count), every round's tok/s kept in `rounds_tok_per_s` (a shared CPU drifts over minutes; rounds
    in ABBA order cancel a drift)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["arch"], r["max_tokens"], r["variant"]), []).append(r)
    merged = []
    for group in groups.values():
        middle = statistics.median_low(r["tok_per_s"] for r in group)
        row = next(r for r in group if r["tok_per_s"] == middle)
        merged.append(dict(row, rounds_tok_per_s=[r["tok_per_s"] for r in group]))
    return merged


# ---- report ------------------------------------------------------------------------------------------------------
def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict]) -> str:
    lines = ["| arch | max_tokens | variant | real tok/step | tok/s | step ms | peak GiB | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['arch']} | {r['max_tokens']} | {r['variant']} | {r['real_tokens_per_step']:.0f} | "
                     f"{r['tok_per_s']:,.0f} | {r['step_ms']:.1f} | {_fmt(r['peak_mem_gib'], '.2f')} | "
                     f"{r['achieved_tflops']:.2f} | {mfu} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[dict]:
    """Per (arch, size): ours/HF (eager vs eager, best ours vs HF) and the Lightning-vs-bare-loop gap."""
    out = []
    for (arch, size), group in itertools.groupby(rows, key=lambda r: (r["arch"], r["max_tokens"])):
        by = {r["variant"]: r["tok_per_s"] for r in group}
        ours = {k: t for k, t in by.items() if VARIANTS[k].impl == "ours"}
        best = max(ours, key=ours.get) if ours else None
        entry = {"arch": arch, "max_tokens": size, "best_ours": best}
        if "hf" in by:
            entry["eager_over_hf"] = by["eager"] / by["hf"] if "eager" in by else None
            entry["best_over_hf"] = ours[best] / by["hf"] if best else None
        if "hf-compile" in by and "compile" in by:
            entry["compile_over_hf_compile"] = by["compile"] / by["hf-compile"]
        if "lightning" in by and "eager" in by:
            entry["lightning_gap"] = by["lightning"] / by["eager"] - 1
        if "lightning-compile" in by and "compile" in by:
            entry["lightning_compile_gap"] = by["lightning-compile"] / by["compile"] - 1
        out.append(entry)
    return out


def ratio_markdown(entries: list[dict]) -> str:
    def f(x, pct=False):
        return "-" if x is None else (f"{100 * x:+.1f}%" if pct else f"{x:.2f}x")

    header = ("| arch | max_tokens | eager / HF | best ours / HF (variant) | compile / HF compile | "
              "Lightning vs bare (eager) | Lightning vs bare (compile) |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['arch']} | {e['max_tokens']} | {f(e.get('eager_over_hf'))} | "
                     f"{f(e.get('best_over_hf'))} ({e['best_ours'] or '-'}) | {f(e.get('compile_over_hf_compile'))} | "
                     f"{f(e.get('lightning_gap'), True)} | {f(e.get('lightning_compile_gap'), True)} |")
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--configs", nargs="+", type=Path, default=CONFIGS, help="the recipes: `translator fit` configs")
    p.add_argument("--archs", nargs="+", default=list(MODULES), choices=list(MODULES),
                   help="only the recipes of these architectures")
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 8192, 16384, 65536, 131072],
                   help="token budgets (max_tokens, padded src + tgt per batch); 8192 is the recipe's")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every variant this many times, in ABBA order; each row is its median round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiled variants add 3 per shape)")
    p.add_argument("--batches", type=int, default=8, help="distinct real batches per size, cycled")
    p.add_argument("--preset", default="base", help="model size preset (tiny/small/base)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--data", default="../shared/data/multi30k", help="Multi30k directory (--data.path)")
    p.add_argument("--tokenizer", help="a trained .model file (default: trained once and cached)")
    p.add_argument("--peak-tflops", type=float,
                   help="peak for MFU (default on CUDA: 800, the bf16 matmul rate measured on the H100; spec: 989)")
    p.add_argument("--hf-attn", default="sdpa", help="HF attn_implementation (sdpa, eager, flash_attention_2)")
    p.add_argument("--no-sdpa-report", action="store_true", help="skip the SDPA dispatch report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batches < 1 or args.rounds < 1:
        p.error("need --steps >= 1, --warmup >= 0, --batches >= 1, --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = 800.0
    variants = []
    for name in args.variants:
        v = VARIANTS[name]
        # without bf16 arithmetic a CPU runs eager in fp32: the fp32 rows would repeat it
        if device.type != "cuda" and (v.cuda_only or v.same_on_cpu or not (v.autocast or bf16_autocast(device))):
            log.warning("skipping %s on %s (%s)", name, device, "needs CUDA" if v.cuda_only else "same as eager here")
        elif device.type == "cuda" and v.cpu_only:
            log.warning("skipping %s on CUDA (a CPU variant: SDPA's kernel choice in CPU training)", name)
        elif device.type != "cuda" and name in COMPILED_ON_CPU_ONLY_IF_ASKED and args.variants == DEFAULT_VARIANTS:
            log.warning("skipping %s on CPU by default (slow to compile); name it in --variants to run it", name)
        else:
            variants.append(name)
    if any(VARIANTS[n].impl == "hf" for n in variants):
        try:
            import transformers  # noqa: F401
        except ImportError:
            log.warning("transformers is not installed: skipping the Hugging Face rows (pip install transformers)")
            variants = [n for n in variants if VARIANTS[n].impl != "hf"]

    recipes = {}  # {config: arch} of the recipes to run; the first one trains (or finds) the tokenizer
    for config in args.configs:
        cli = build_recipe(args, config, device)
        if not recipes:
            cli.datamodule.prepare_data()
            args.tokenizer = args.tokenizer or str(cli.datamodule.tokenizer_path)
        if cli.model.arch in args.archs:
            recipes[config] = cli.model.arch
    rows, sdpa, failures = [], {}, []
    for size in args.tokens:
        dm = build_recipe(args, args.configs[0], device, size).datamodule
        batches = make_batches(dm, args.batches, pin=device.type == "cuda")
        log.info("max_tokens %d: %d batches, %.0f real / %.0f padded tokens each (median)", size, len(batches),
                 statistics.median(b.tokens for b in batches), statistics.median(b.padded for b in batches))
        for config, arch in recipes.items():
            if not args.no_sdpa_report and arch not in sdpa:
                module = build_recipe(args, config, device, size).model
                sdpa[arch] = {"backend_probe": sdpa_backend_probe(module.config, batches[0], device)}
                for impl in ("ours", "hf"):
                    if impl == "hf" and not any(VARIANTS[n].impl == "hf" for n in variants):
                        continue
                    free_memory(device)
                    model = (module.model if impl == "ours" else hf_model(arch, module.config, args.hf_attn)).to(device)
                    step_loss = loss_fn(impl, arch, model, module.hparams.label_smoothing)
                    sdpa[arch][impl] = sdpa_dispatch(step_loss, batches[0], device)
                    del model, step_loss
                del module
            for name in itertools.chain.from_iterable(variants[::-1] if r % 2 else variants
                                                      for r in range(args.rounds)):  # ABBA order over rounds
                try:
                    rows.append(measure(config, arch, name, size, args, batches, dm.tokenizer, device))
                except Exception as err:  # one failing variant (OOM, compile error) must not end the sweep
                    log.exception("%s %s at %d tokens failed", arch, name, size)
                    failures.append({"arch": arch, "max_tokens": size, "variant": name,
                                     "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"})
                    free_memory(device)

    rows = merge_rounds(rows)
    table, ratio_entries = markdown(rows), ratios(rows)
    print(f"\n## Training throughput ({machine(device).get('gpu', 'CPU')}, preset {args.preset})\n")
    print(table)
    print("\n## Ratios\n")
    print(ratio_markdown(ratio_entries))
    for f in failures:
        print(f"FAILED: {f['arch']} {f['variant']} at {f['max_tokens']} tokens: {f['error']}")
    if sdpa:
        print("\n## SDPA dispatch (profiler counts over one forward + backward; backend probe at the first batch)\n")
        print(json.dumps(sdpa, indent=1))
    print(f"\nMFU peak: {args.peak_tflops} TFLOP/s. {FLOPS_FORMULA}")
    write_json(args.json, {"machine": machine(device), "command": " ".join(sys.argv), "peak_tflops": args.peak_tflops,
                           "flops_formula": FLOPS_FORMULA, "results": rows, "failures": failures,
                           "ratios": ratio_entries, "sdpa": sdpa, "args": vars(args)})
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
