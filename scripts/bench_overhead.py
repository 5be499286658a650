#!/usr/bin/env python
"""Host-side work per step, ours against Hugging Face: the number of aten operators a training step or a decoding
step dispatches, and its time on a model too narrow to compute anything.

    python scripts/bench_overhead.py            # CPU, one thread; about a minute

At this project's sizes a GPU waits on the host that launches its kernels (issue #8: every implementation timed on
the H100 was launch-bound), so the operator count of a step is what bounds eager speed there. This script needs no
GPU: it builds the base models' depth (3+3 and 7 layers) at width 32, so that compute is negligible, and counts the
top-level aten operators of one step with the profiler (views included; on a GPU most non-view operators are one
kernel launch each). Training: forward + label-smoothed cross-entropy + backward (no optimizer: fused AdamW is a few
kernels on CUDA). Decoding: one beam-5 step of our dynamic search, its static (CUDA-graph) form run eagerly, and HF
`generate()`, over 8 sentences of 12 tokens, 20 steps each (eos suppressed). The times are CPU milliseconds and only
a proxy for launch overhead.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from translator import generate
from translator.bench import hf_loss, hf_model
from translator.checkpoint import ARCHS
from translator.recipe import token_loss
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID

V, B, S, T, STEPS = 64, 8, 12, 20, 20
LABEL_SMOOTHING = 0.1


def count_ops(fn) -> int:
    """Top-level aten operators of one call (those not called by another aten operator)."""
    with torch.profiler.profile() as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def ms_per_call(fn, repeats: int = 10) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def configs():
    """(arch, config, model class) of each architecture: the base preset's depth at width 32."""
    for arch, (config_class, model_class) in ARCHS.items():
        yield arch, config_class.preset("base", vocab_size=V, d_model=32, n_heads=2, d_ff=64), model_class


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(5, V, (B, S), generator=g)
    tgt = torch.randint(5, V, (B, T), generator=g)
    tgt[:, 0] = BOS_ID
    src[0, S - 4:], tgt[0, T - 6:] = PAD_ID, PAD_ID
    print("| arch | step | ours ops | HF ops | ours ms | HF ms |\n|---|---|---|---|---|---|")
    for arch, cfg, cls in configs():
        torch.manual_seed(0)
        ours, hf = cls(cfg), hf_model(arch, cfg)
        train = {}
        losses = {"ours": lambda src, tgt: token_loss(ours, src, tgt, LABEL_SMOOTHING),
                  "hf": hf_loss(arch, hf, LABEL_SMOOTHING)}
        for name, model in (("ours", ours), ("hf", hf)):
            step_loss = losses[name]

            def train_step(model=model, step_loss=step_loss):
                step_loss(src, tgt).backward()
                model.zero_grad(set_to_none=True)

            train[name] = (count_ops(train_step), ms_per_call(train_step))
        print(f"| {arch} | train fwd+bwd | {train['ours'][0]} | {train['hf'][0]} | {train['ours'][1]:.2f} | "
              f"{train['hf'][1]:.2f} |")

        ours.eval(), hf.eval()
        with torch.no_grad():
            ours.lm_head.weight[EOS_ID] = -10.0  # never eos: every search runs STEPS + 1 steps
        per_step = {}
        for static in (False, True):
            def search(static=static):
                generate.beam_search(ours, src, 5, max_len_a=0, max_len_b=STEPS, static=static)
            per_step["static" if static else "dynamic"] = (count_ops(search) / (STEPS + 1),
                                                          ms_per_call(search, 3) / (STEPS + 1))
        if arch == "seq2seq":
            inputs = {"input_ids": src, "attention_mask": (src != PAD_ID).long(), "decoder_start_token_id": BOS_ID}
        else:
            ids = torch.cat([src, torch.full((B, 1), SEP_ID)], 1)
            inputs = {"input_ids": ids, "attention_mask": (ids != PAD_ID).long()}

        def hf_search():
            with torch.inference_mode():
                hf.generate(**inputs, num_beams=5, max_new_tokens=STEPS + 1, min_new_tokens=STEPS + 1,
                            do_sample=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID, early_stopping=True)
        hf_ops, hf_ms = count_ops(hf_search) / (STEPS + 1), ms_per_call(hf_search, 3) / (STEPS + 1)
        for name, (ops, ms) in per_step.items():
            print(f"| {arch} | beam-5 step, {name} | {ops:.0f} | {hf_ops:.0f} | {ms:.2f} | {hf_ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
