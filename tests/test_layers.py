"""Building blocks: positional encodings (sinusoidal, learned, RoPE), attention, the causal mask.

References are written independently here (plain formulas, complex numbers, an explicit softmax), not by calling
the functions under test.
"""

from __future__ import annotations

import contextlib
import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ENV, REPO, read_pairs

from translator import recipe
from translator.cache import KVCache, causal_mask
from translator.config import Seq2SeqConfig
from translator.layers import Attention, Dropout, Positions, apply_rope, rope_cos_sin, sinusoidal

# ---------------------------------------------------------------------------------------------------------------
# Sinusoidal
# ---------------------------------------------------------------------------------------------------------------


def test_sinusoidal_matches_paper_formula():
    n, d = 60, 16
    expected = torch.empty(n, d, dtype=torch.float64)
    for p in range(n):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            expected[p, 2 * i] = math.sin(angle)
            expected[p, 2 * i + 1] = math.cos(angle)
    torch.testing.assert_close(sinusoidal(torch.arange(n), d), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------------------------


def rope_reference(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Independent RoPE: rotate interleaved pairs as complex numbers, in the rotate-half layout.

    x (..., L, hs) is in the rotate-half layout (dim i pairs with dim i + hs/2); pos (L,) integer positions.
    """
    hs = x.size(-1)
    half = hs // 2
    # rotate-half -> interleaved: (x0, x_h, x1, x_{h+1}, ...)
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).reshape(-1)
    inter = x[..., perm].double()
    z = torch.view_as_complex(inter.reshape(*inter.shape[:-1], half, 2).contiguous())  # (..., L, hs/2)
    theta = torch.tensor([base ** (-2 * j / hs) for j in range(half)], dtype=torch.float64)
    rot = torch.polar(torch.ones(len(pos), half, dtype=torch.float64), pos.double()[:, None] * theta)
    out_inter = torch.view_as_real(z * rot).reshape(inter.shape)
    out = torch.empty_like(out_inter)
    out[..., perm] = out_inter  # back to rotate-half
    return out


def rope(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """apply_rope on x (B, nh, L, hs) at positions pos (L,) via the library's cos/sin."""
    cos, sin = rope_cos_sin(pos, x.size(-1), base)
    return apply_rope(x, cos.to(x.dtype), sin.to(x.dtype))


@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_rope_matches_complex_reference(base):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, 16, generator=g, dtype=torch.float64)
    pos = torch.arange(40) * 7  # up to 273: angles of a few hundred radians
    # angles are computed in float64, so the two agree to double precision even at a few hundred radians
    torch.testing.assert_close(rope(x, pos, base), rope_reference(x, pos, base), rtol=0, atol=1e-12)


def test_rope_score_depends_only_on_relative_distance():
    g = torch.Generator().manual_seed(1)
    hs = 32
    q, k = torch.randn(2, 1, 1, 1, hs, generator=g, dtype=torch.float64)

    def score(pq: int, pk: int) -> float:
        return float((rope(q, torch.tensor([pq])) * rope(k, torch.tensor([pk]))).sum())

    for pq, pk in [(5, 2), (2, 5), (0, 0), (17, 3)]:
        reference = score(pq, pk)
        for shift in [1, 10, 100, 250]:
            assert score(pq + shift, pk + shift) == pytest.approx(reference, abs=1e-12)  # float64 angles
    # and it does depend on the distance (else the check above is vacuous)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3


def test_rope_appending_tokens_keeps_earlier_rotations():
    cfg = Seq2SeqConfig.preset("tiny", vocab_size=50, positions="rope")
    positions = Positions(cfg)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.n_heads, 300, cfg.head_dim, generator=g)
    pos = torch.arange(300).expand(2, 300)
    short = apply_rope(x[:, :, :10], *positions(pos[:, :10], 10, x.dtype))
    long = apply_rope(x, *positions(pos, 300, x.dtype))
    assert torch.equal(long[:, :, :10], short)  # bit-identical, not merely close


# ---------------------------------------------------------------------------------------------------------------
# The Positions module
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sinusoidal", "rope"])
def test_computed_positions_have_no_state_and_no_length_limit(kind):
    """Sinusoidal and rotary positions are computed from the ids: no buffer (which DDP would broadcast between ranks
    of different lengths, see test_ddp_fit_with_a_long_pair_on_one_rank), any position, the same values per id."""
    cfg = Seq2SeqConfig.preset("tiny", vocab_size=50, positions=kind)
    positions = Positions(cfg)
    assert list(positions.buffers()) == [] and list(positions.parameters()) == []
    pos = torch.tensor([[0, 255, 256, 5000, 3], [7, 7, 100000, 1, 0]])
    out = positions(pos, 100001, torch.float32)
    single = [positions(pos[b : b + 1, i : i + 1], 1, torch.float32) for b in range(2) for i in range(5)]
    if kind == "sinusoidal":
        assert out.shape == (2, 5, cfg.d_model)
        assert torch.equal(out.flatten(0, 1), torch.cat(single).flatten(0, 1))
        torch.testing.assert_close(out[0, 3, :2], torch.tensor([math.sin(5000), math.cos(5000)]))
    else:
        assert out[0].shape == out[1].shape == (2, 1, 5, cfg.head_dim)
        for k in range(2):
            assert torch.equal(out[k].flatten(0, 2), torch.cat([s[k] for s in single]).flatten(0, 2))


@pytest.mark.parametrize("kind", ["sinusoidal", "rope"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_positions_come_in_the_requested_dtype(kind, dtype):
    """In the embeddings' dtype, so that a model cast with .double() / .to(bfloat16) stays in it at any length."""
    positions = Positions(Seq2SeqConfig.preset("tiny", vocab_size=50, positions=kind))
    out = positions(torch.tensor([[0, 400]]), 401, dtype)
    assert all(t.dtype == dtype for t in (out if kind == "rope" else (out,)))


def test_learned_positions_refuse_ids_past_the_table():
    positions = Positions(Seq2SeqConfig.preset("tiny", vocab_size=50, positions="learned", max_positions=16))
    assert positions(torch.arange(16)[None], 16, torch.float32).shape == (1, 16, 32)
    with pytest.raises(ValueError, match="max_positions"):
        positions(torch.arange(17)[None], 17, torch.float32)


def test_ddp_fit_with_a_long_pair_on_one_rank(tokenizer, tmp_path: Path):
    """2-process gloo DDP `translator fit` of the decoder-only model (sinusoidal positions) where rank 0 alone holds a
    pair of over 256 positions, in training and in validation: sanity-check validation, training, validation,
    training. With position tables in buffers that grow on demand, rank 0's table outgrew rank 1's (gloo aborts on
    the size mismatch when DDP broadcasts buffers) and was regrown under inference_mode in validation (the next
    training step's broadcast into it raises)."""
    data = tmp_path / "data"
    data.mkdir()
    sentences = read_pairs("val", 60)
    long = tuple(" ".join(side for side in sides) for sides in zip(*sentences[:6]))
    n_long = [len(ids) for ids in tokenizer.encode(list(long))]
    assert all(n <= 192 for n in n_long) and sum(n_long) + 1 > 256, n_long  # within max_len, past the old table
    # pair i goes to rank i % 2: pair 0 (the long one) to rank 0
    for split, pairs in (("train", [long, *sentences[6:46]]), ("val", [long, *sentences[46:54]])):
        for lang, side in (("de", 0), ("en", 1)):
            (data / f"{split}.{lang}").write_text("".join(p[side] + "\n" for p in pairs), encoding="utf-8")
    tokenizer.save(tmp_path / "tokenizer.model")
    cmd = [sys.executable, "-m", "translator.cli", "fit", "--config", str(REPO / "configs" / "debug.yaml"),
           "--model.class_path", "translator.module.DecoderOnlyModule", "--model.init_args.config.positions", "sinusoidal",
           "--data.path", str(data), "--data.tokenizer", str(tmp_path / "tokenizer.model"), "--data.max_len", "192",
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "4",
           "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "distributed_backend=gloo" in output and "`max_steps=4` reached" in output
    with open(tmp_path / "checkpoints" / "debug" / "metrics.csv", encoding="utf-8") as f:
        val_steps = [int(row["step"]) for row in csv.DictReader(f) if row["val/loss"]]
    assert val_steps == [1, 3]  # validated after steps 2 and 4 (the column counts from 0), trained in between


# ---------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------


def reference_attention(attn: Attention, x, y, allowed=None, rope_pos=None):
    """softmax(Q K^T / sqrt(hs)) V by hand with attn's weights; allowed (B, 1|nh, Lq, Lk) bool or None."""
    D, nh = x.size(-1), attn.n_heads
    hs = D // nh
    projections = (attn.q, attn.kv) if attn.cross else (attn.qkv,)  # W, b: the rows of q, then k, then v
    W, b = (torch.cat([getattr(p, name) for p in projections]) for name in ("weight", "bias"))
    q = x @ W[:D].T + b[:D]
    k = y @ W[D : 2 * D].T + b[D : 2 * D]
    v = y @ W[2 * D :].T + b[2 * D :]

    def heads(t):  # (B, L, D) -> (B, nh, L, hs)
        return t.reshape(t.size(0), t.size(1), nh, hs).permute(0, 2, 1, 3)

    q, k, v = heads(q), heads(k), heads(v)
    if rope_pos is not None:
        q, k = rope_reference(q, rope_pos), rope_reference(k, rope_pos)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs)  # (B, nh, Lq, Lk)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # (B, nh, Lq, hs)
    out = out.permute(0, 2, 1, 3).reshape(x.size(0), x.size(1), D)
    return out @ attn.out.weight.T + attn.out.bias


def test_self_and_cross_attention_have_their_own_projections():
    """Self-attention projects q, k, v of x with one (3D, D) weight; cross-attention q of x with a (D, D) one and k, v
    of the memory with a (2D, D) one: no weight is sliced, and a self-attention module takes no memory."""
    cfg = Seq2SeqConfig.preset("tiny", vocab_size=50)
    D = cfg.d_model

    def shapes(module):
        return {name: tuple(p.shape) for name, p in module.named_parameters()}

    assert shapes(Attention(cfg)) == {"qkv.weight": (3 * D, D), "qkv.bias": (3 * D,), "out.weight": (D, D),
                                      "out.bias": (D,)}
    assert shapes(Attention(cfg, cross=True)) == {"q.weight": (D, D), "q.bias": (D,), "kv.weight": (2 * D, D),
                                                  "kv.bias": (2 * D,), "out.weight": (D, D), "out.bias": (D,)}
    x = torch.randn(2, 3, D)
    with pytest.raises(ValueError, match="self-attention takes no memory"):
        Attention(cfg)(x, x)


def make_attention(seed: int = 0, cross: bool = False, **overrides) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(Seq2SeqConfig.preset("tiny", vocab_size=50, **overrides), cross=cross).double().eval()
    with torch.no_grad():  # non-zero biases, so that a misplaced bias would show
        for name, p in attn.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return attn


def key_padding(lengths: list[int], L: int) -> torch.Tensor:
    """(B, 1, 1, L) bool, True at real keys."""
    return (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


def test_self_attention_matches_reference():
    attn = make_attention()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 32, generator=g, dtype=torch.float64)
    mask = key_padding([7, 4, 1], 7)
    torch.testing.assert_close(attn(x, mask=mask), reference_attention(attn, x, x, mask), rtol=0, atol=1e-12)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(
        attn(x, is_causal=True), reference_attention(attn, x, x, causal[None, None]), rtol=0, atol=1e-12
    )


def test_self_attention_with_rope_matches_reference():
    attn = make_attention(positions="rope")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 9, 32, generator=g, dtype=torch.float64)
    pos = torch.arange(9)
    cos, sin = rope_cos_sin(pos, 16)
    out = attn(x, rope=(cos[None, None], sin[None, None]))
    torch.testing.assert_close(out, reference_attention(attn, x, x, rope_pos=pos), rtol=0, atol=1e-12)


def sdpa_ops(fn) -> set[str]:
    """The aten SDPA kernels that fn() runs (forward and backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_training_attention_takes_the_math_kernel_as_accurately(dtype):
    """`recipe.training_attention`: on a CPU under autograd, attention runs SDPA's math kernel (its backward is the
    faster one there); under no_grad SDPA's own choice, the flash kernel. Against a float64 reference from the same
    (rounded) inputs, output and gradients are as accurate as the flash kernel's."""
    cpu = torch.device("cpu")
    reference = make_attention()  # float64
    attn = make_attention().to(dtype)
    reference.load_state_dict({k: v.double() for k, v in attn.state_dict().items()})  # the rounded weights
    x = torch.randn(4, 11, 32, generator=torch.Generator().manual_seed(5)).to(dtype)
    mask = key_padding([11, 7, 3, 1], 11)

    def train_step(module, kernel_choice: bool):
        module.zero_grad()
        xx = x.to(module.out.weight.dtype).detach().requires_grad_()
        with recipe.training_attention(cpu) if kernel_choice else contextlib.nullcontext():
            out = module(xx, mask=mask)
        (out.double() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        return [t.double() for t in (out, xx.grad, *(p.grad for p in module.parameters()))]

    ops = sdpa_ops(lambda: train_step(attn, True))
    assert "aten::_scaled_dot_product_attention_math" in ops
    assert not any("flash" in op for op in ops), ops
    with torch.no_grad(), recipe.training_attention(cpu):
        assert any("flash" in op for op in sdpa_ops(lambda: attn(x, mask=mask)))
    assert any("flash" in op for op in sdpa_ops(lambda: train_step(attn, False)))  # SDPA's own choice
    truth, ours, flash = train_step(reference, False), train_step(attn, True), train_step(attn, False)
    for t, a, b in zip(truth, ours, flash, strict=True):
        error, flash_error = ((a - t).norm() / t.norm()).item(), ((b - t).norm() / t.norm()).item()
        assert error <= 1.5 * flash_error + (1e-7 if dtype == torch.float32 else 1e-4), (error, flash_error)


def test_cross_attention_cached_equals_uncached():
    attn = make_attention(cross=True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 32, generator=g, dtype=torch.float64)
    memory = torch.randn(3, 6, 32, generator=g, dtype=torch.float64)
    mask = key_padding([6, 2, 5], 6)
    uncached = attn(x, memory, mask=mask)
    cache = KVCache(*attn.project_kv(memory))
    cached = attn(x, mask=mask, cache=cache)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-12)
    torch.testing.assert_close(uncached, reference_attention(attn, x, memory, mask), rtol=0, atol=1e-12)
    # one query at a time against the cache gives the same rows
    for t in range(4):
        one = attn(x[:, t : t + 1], mask=mask, cache=cache)
        torch.testing.assert_close(one, uncached[:, t : t + 1], rtol=0, atol=1e-12)


def test_self_attention_kv_cache_incremental_equals_full():
    attn = make_attention()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 8, 32, generator=g, dtype=torch.float64)
    full = attn(x, is_causal=True)
    cache = KVCache()
    chunks = [3, 1, 2, 2]  # several tokens after cached ones need the offset causal mask
    start, outs = 0, []
    for n in chunks:
        mask = causal_mask(n, start + n, x.device)
        outs.append(attn(x[:, start : start + n], mask=mask, cache=cache))
        start += n
    assert cache.k.shape == (2, 2, 8, 16)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-12)


def test_causal_mask_offsets():
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)  # 2 new tokens after 3 cached
    assert torch.equal(causal_mask(2, 5, torch.device("cpu")), expected)
    assert torch.equal(causal_mask(4, 4, torch.device("cpu")), torch.ones(4, 4, dtype=torch.bool).tril())


# ---------------------------------------------------------------------------------------------------------------
# Dropout (the CPU mask)
# ---------------------------------------------------------------------------------------------------------------


def test_cpu_dropout_drops_at_its_rate_everywhere_and_keeps_the_expectation():
    """A million ones through Dropout(0.1): the dropped share is 0.1 at each of the four 16-bit lanes of a draw
    (a draw with a biased top bit would drop none or all in one lane), the kept values are 1 / (1 - rate), the mean
    stays 1, and neighbours are dropped independently."""
    torch.manual_seed(0)
    drop = Dropout(0.1).train()
    y = drop(torch.ones(250_000, 4))
    dropped = y == 0
    for lane in range(4):  # sd of each share: sqrt(0.09 / 250,000) = 6e-4
        assert abs(dropped[:, lane].float().mean().item() - 0.1) < 0.003, lane
    assert abs((dropped[:, 0] & dropped[:, 1]).float().mean().item() - 0.01) < 0.001
    kept = y[~dropped]
    torch.testing.assert_close(kept, torch.full_like(kept, 65536 / (65536 - 6554)))
    assert abs(y.mean().item() - 1.0) < 0.003


def test_cpu_dropout_gradient_eval_and_seeds():
    """The gradient is the forward's mask times its scale; bf16 stays bf16; eval mode and p = 0 pass the input
    through; a seed repeats the mask, another seed does not."""
    drop = Dropout(0.3).train()
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(5)
    y = drop(x)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.where(y != 0, 65536 / (65536 - round(0.3 * 65536)), 0.0))
    torch.manual_seed(5)
    assert torch.equal(drop(x), y)
    assert not torch.equal(drop(x), y)
    assert drop(x.detach().bfloat16()).dtype == torch.bfloat16
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
