#!/usr/bin/env python
"""SDPA's attention kernels on this machine: time and accuracy of flash against math, the evidence behind
`translator.layers.CPU_TRAINING_SDPA` (which kernel training takes on a CPU).

    python scripts/bench_attention.py                      # CPU: the shapes of Multi30k batches at 4,096 tokens
    python scripts/bench_attention.py --device cuda --json out/bench_attention.json

For each shape (batch, heads, query length, key length; head size 64), mask (causal, or padding: the last quarter of
the keys masked in every other row, as a source's pads are) and dtype it times, per call, the forward and backward of
`F.scaled_dot_product_attention` under autograd (training), and the forward alone under `no_grad` (inference), with
each kernel forced by `torch.nn.attention.sdpa_kernel`; the median of `--repeats` calls after 3 warm-up calls.
Accuracy: the relative error (Frobenius norm) of the output and of the three input gradients against the math kernel
in float64 on the same (rounded) inputs, for each kernel in each dtype. Query lengths of 1 are decode steps
(inference only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from translator.bench import machine, write_json
from translator.translate import resolve_device

KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (batch, heads, query length, key length, mask): training batches of 4,096 tokens at Multi30k's lengths (the
# encoder's self-attention, the decoder's self- and cross-attention, the decoder-only model over source + target in
# big and small batches), then decode steps of 64 sentences x beam 5 over a 20-token source and a 60-token prefix
SHAPES = [(128, 4, 16, 16, "padding"), (128, 4, 17, 17, "causal"), (128, 4, 17, 16, "padding"),
          (64, 4, 40, 40, "causal"), (32, 4, 80, 80, "causal"), (320, 4, 1, 20, "padding"), (320, 4, 1, 60, "padding")]


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of fn() over `repeats` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def inputs(shape, dtype: torch.dtype, device: torch.device, grad: bool, compute: torch.dtype | None = None):
    """q, k, v, the output gradient and the SDPA mask arguments of a shape: random values rounded to `dtype`, held in
    `compute` (default: dtype)."""
    B, H, Lq, Lk, mask = shape
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Lq, 64, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, Lk, 64, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(B, H, Lq, 64, generator=g, dtype=torch.float64)
    qkv = [t.to(dtype).to(device, compute or dtype).requires_grad_(grad) for t in (q, k, v)]
    if mask == "causal":
        masks = {"is_causal": True}
    else:  # True = may attend; every other row loses its last quarter of keys (at least one key stays)
        keep = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        keep[::2, ..., Lk - Lk // 4:] = False
        masks = {"attn_mask": keep.to(device)}
    return qkv, dout.to(dtype).to(device, compute or dtype), masks


def run(kernel: str, shape, dtype: torch.dtype, device: torch.device, grad: bool, compute: torch.dtype | None = None):
    """One call: the output and (with grad) the input gradients, in float64."""
    (q, k, v), dout, masks = inputs(shape, dtype, device, grad, compute)
    with sdpa_kernel(KERNELS[kernel]), torch.set_grad_enabled(grad):
        out = F.scaled_dot_product_attention(q, k, v, **masks)
        if not grad:
            return [out.double()]
        out.backward(dout)
    return [t.double() for t in (out, q.grad, k.grad, v.grad)]


def measure(shape, dtype_name: str, kernel: str, device: torch.device, repeats: int) -> dict:
    dtype, train = DTYPES[dtype_name], shape[2] > 1
    row = {"shape": list(shape[:4]), "mask": shape[4], "dtype": dtype_name, "kernel": kernel}
    try:
        if train:
            (q, k, v), dout, masks = inputs(shape, dtype, device, True)

            def step():
                with sdpa_kernel(KERNELS[kernel]):
                    F.scaled_dot_product_attention(q, k, v, **masks).backward(dout)

            row["train_ms"] = timed(step, repeats, device)
        (q, k, v), _, masks = inputs(shape, dtype, device, False)
        with torch.no_grad(), sdpa_kernel(KERNELS[kernel]):
            row["infer_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, **masks), repeats, device)
        truth = run("math", shape, dtype, device, train, compute=torch.float64)
        ours = run(kernel, shape, dtype, device, train)
        row["rel_error"] = [((a - t).norm() / t.norm()).item() for a, t in zip(ours, truth)]
    except RuntimeError as err:  # a kernel that does not take this dtype or device
        row["error"] = str(err).splitlines()[0][:200]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    device = resolve_device(args.device)
    rows = [measure(shape, d, kernel, device, args.repeats)
            for shape in SHAPES for d in DTYPES for kernel in KERNELS]
    print(f"## SDPA kernels ({machine(device).get('gpu', 'CPU')}, {torch.get_num_threads()} threads), ms per call\n")
    print("| B x H x Lq x Lk | mask | dtype | kernel | fwd+bwd ms | fwd ms (no_grad) | rel. error: out, dq, dk, dv |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        err = r.get("error") or ", ".join(f"{e:.1e}" for e in r.get("rel_error", [])) or "-"
        train = f"{r['train_ms']:.2f}" if "train_ms" in r else "-"
        infer = f"{r['infer_ms']:.3f}" if "infer_ms" in r else "-"
        print(f"| {' x '.join(map(str, r['shape']))} | {r['mask']} | {r['dtype']} | {r['kernel']} | {train} | "
              f"{infer} | {err} |")
    write_json(args.json, {"machine": machine(device), "command": " ".join(sys.argv), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
