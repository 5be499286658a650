"""Faster CPU inference: a trained model with int8 linear layers or bf16 weights.

    model, tokenizer, _ = checkpoint.load(path)
    model = quantize.for_cpu(model, "int8")      # then translate() / generate as usual

- ``int8``: dynamic quantisation (`torch.ao.quantization.quantize_dynamic`) of every `nn.Linear`: int8 weights with
  one scale per output channel, activations quantised per batch on the fly, int32 accumulation (fbgemm / oneDNN
  kernels). torch marks this API deprecated in favour of torchao's `quantize_`, but on this 2-core CPU its kernels
  were the fast ones: a small decoder-only forward took 91 ms against 186 ms in fp32, torchao 0.18's
  `Int8DynamicActivationInt8WeightConfig` 161 ms (eager, no compile). The output projection is quantised too; with tied embeddings it becomes an int8 copy of the embedding
  matrix, the embedding lookup itself staying float. Attention's softmax, norms and the search stay in fp32.
- ``bf16``: every weight in bfloat16. It pays only on a CPU with bf16 arithmetic (avx512_bf16 or AMX, see
  `bf16_supported`); elsewhere it is emulated and slower.

The model keeps the decode-step interface, so `translator.generate` and `translator.translate` run it unchanged.
Quality is measured by `scripts/bench_decode.py --quantize int8` (BLEU beside the fp32 rows).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

KINDS = ("none", "int8", "bf16")


def bf16_supported() -> bool:
    """Whether this CPU has bf16 arithmetic (avx512_bf16 or AMX), as torch's own CPU capability check reports."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def for_cpu(model: nn.Module, kind: str) -> nn.Module:
    """A copy of `model` (on the CPU, eval mode) for inference in `kind`: "none" (as is), "int8" or "bf16"."""
    if kind not in KINDS:
        raise ValueError(f"quantization {kind!r}: expected one of {', '.join(KINDS)}")
    model = copy.deepcopy(model).cpu().eval()
    if kind == "int8":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():  # torch 2.13 marks quantised tensors for a future removal; they work today
            warnings.filterwarnings("ignore", message=".*quantize_per_.*deprecated", category=UserWarning)
            model = quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    elif kind == "bf16":
        model = model.to(torch.bfloat16)
    return model
