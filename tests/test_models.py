"""Both architectures, all three position types: causality, padding invariance, cached decoding, gradients,
overfitting real pairs, parameter counts, bf16 autocast, config validation.

Exactness checks run in float64 (`.double()`), where the paths under comparison agree to ~1e-12; the padding checks
run in float32 with atol 1e-5, the precision a real batch has.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from translator.config import DecoderOnlyConfig, Seq2SeqConfig
from translator.decoder_only import DecoderOnlyTransformer
from translator.recipe import training_attention
from translator.seq2seq import Seq2SeqTransformer
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

V = 50  # vocabulary of the random-token tests; ids 5..V-1 are ordinary tokens
ARCHS = ["seq2seq", "prefix-lm", "causal-lm"]
POSITIONS = ["sinusoidal", "learned", "rope"]
EXACT = dict(rtol=0, atol=1e-9)  # float64, same computation in a different order/shape


def build(arch: str, positions: str = "sinusoidal", dtype=torch.float64, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if arch == "seq2seq":
        model = Seq2SeqTransformer(Seq2SeqConfig.preset("tiny", vocab_size=V, positions=positions, **overrides))
    else:
        mode = "bidirectional" if arch == "prefix-lm" else "causal"
        cfg = DecoderOnlyConfig.preset("tiny", vocab_size=V, positions=positions, prefix_mode=mode, **overrides)
        model = DecoderOnlyTransformer(cfg)
    return model.to(dtype).eval()


def random_batch(src_lens: list[int], tgt_lens: list[int], seed: int = 0, src_width: int = 0, tgt_width: int = 0):
    """src (B, S) right-padded ids; tgt (B, T+1) = <bos> y1..yn <eos>, right-padded; widths pad further."""
    g = torch.Generator().manual_seed(seed)
    S, T = max(max(src_lens), src_width), max(max(tgt_lens) + 2, tgt_width)
    src = torch.full((len(src_lens), S), PAD_ID)
    tgt = torch.full((len(tgt_lens), T), PAD_ID)
    for b, (n, m) in enumerate(zip(src_lens, tgt_lens)):
        src[b, :n] = torch.randint(5, V, (n,), generator=g)
        ys = torch.randint(5, V, (m,), generator=g)
        tgt[b, : m + 2] = torch.cat([torch.tensor([BOS_ID]), ys, torch.tensor([EOS_ID])])
    return src, tgt


def block_outputs(model, src, tgt) -> list[torch.Tensor]:
    """Run forward and return every decoder-only block's output (B, S+T, D) via forward hooks."""
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, out: outs.append(out)) for b in model.blocks]
    try:
        model(src, tgt)
    finally:
        for h in handles:
            h.remove()
    return outs


def decode_in_chunks(model, src, inputs, chunks: list[int]) -> torch.Tensor:
    """init_state + decode_step over `inputs` (B, T) split into chunks -> logits (B, T, V)."""
    state = model.init_state(src)
    logits, start = [], 0
    for n in chunks:
        logits.append(model.decode_step(inputs[:, start : start + n], state))
        start += n
    assert start == inputs.size(1)
    return torch.cat(logits, dim=1)


def decoder_inputs(model, tgt: torch.Tensor) -> torch.Tensor:
    """What the decode-step interface is fed for teacher-forced `tgt[:, :-1]`: start_id, then y1.. ."""
    inputs = tgt[:, :-1].clone()
    inputs[:, 0] = model.start_id
    return inputs


# ---------------------------------------------------------------------------------------------------------------
# Causality and masks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_future_target_tokens_do_not_change_past_logits(arch, positions):
    model = build(arch, positions)
    src, tgt = random_batch([6, 4], [8, 8])
    logits = model(src, tgt)
    for t in [0, 3, 7]:
        changed = tgt.clone()
        changed[:, t + 1 :] = torch.randint(5, V, changed[:, t + 1 :].shape, generator=torch.Generator().manual_seed(t))
        logits2 = model(src, changed)
        torch.testing.assert_close(logits2[:, : t + 1], logits[:, : t + 1], **EXACT)
        assert (logits2[:, t + 1] - logits[:, t + 1]).abs().max() > 1e-4  # the change is visible right after t


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("arch", ["prefix-lm", "causal-lm"])
def test_target_tokens_never_change_source_states(arch, positions):
    model = build(arch, positions)
    lengths = [6, 3]
    src, tgt = random_batch(lengths, [5, 5])
    changed = tgt.clone()
    changed[:, 1:] = torch.randint(5, V, changed[:, 1:].shape, generator=torch.Generator().manual_seed(9))
    before, after = block_outputs(model, src, tgt), block_outputs(model, src, changed)
    for a, b in zip(before, after):  # packed rows: row i's source states are its first lengths[i] positions
        for i, n in enumerate(lengths):
            torch.testing.assert_close(b[i, :n], a[i, :n], **EXACT)
            assert (b[i, n + 1 :] - a[i, n + 1 :]).abs().max() > 1e-4  # target states (after <sep>) do change
    # the prefilled cache (what decoding attends to) does not see the target at all, and equals forward's K/V
    state = model.init_state(src)
    k_forward = []
    hook = model.blocks[-1].self_attn.qkv.register_forward_hook(lambda m, a, out: k_forward.append(out))
    model(src, tgt)
    hook.remove()
    if positions != "rope":  # K before rotation equals the cached K only without rope; rope is covered by decoding
        D = model.config.d_model
        cached = state.layers[-1].self_kv.k.transpose(1, 2).flatten(2)  # (B, S, D), right-padded source
        for i, n in enumerate(lengths):
            torch.testing.assert_close(cached[i, :n], k_forward[0][i, :n, D : 2 * D], **EXACT)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("arch", ["prefix-lm", "causal-lm"])
def test_source_mask_is_bidirectional_only_for_prefix_lm(arch, positions):
    model = build(arch, positions)
    src, tgt = random_batch([7, 7], [3, 3])
    changed = src.clone()
    changed[:, 5] = torch.where(src[:, 5] == 5, 6, 5)  # a later source token
    first_before, first_after = block_outputs(model, src, tgt)[0], block_outputs(model, changed, tgt)[0]
    earlier = (first_after[:, :5] - first_before[:, :5]).abs().max()
    if arch == "causal-lm":
        assert earlier < 1e-12, f"causal prefix: earlier source states changed by {earlier}"
    else:
        assert earlier > 1e-4, "prefix-LM: earlier source states should see later source tokens"


# ---------------------------------------------------------------------------------------------------------------
# Padding invariance (float32, atol 1e-5)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_padding_does_not_change_real_logits(arch, positions):
    model = build(arch, positions, dtype=torch.float32)
    tol = dict(rtol=0, atol=1e-5)
    src, tgt = random_batch([5], [4], seed=1)  # one sentence, no padding at all
    T = tgt.size(1) - 1
    alone = model(src, tgt[:, :-1])  # (1, T, V)

    # more source padding
    padded_src = F.pad(src, (0, 6), value=PAD_ID)
    torch.testing.assert_close(model(padded_src, tgt[:, :-1]), alone, **tol)
    # more target padding (after <eos>)
    padded_tgt = F.pad(tgt, (0, 5), value=PAD_ID)
    torch.testing.assert_close(model(src, padded_tgt[:, :-1])[:, :T], alone, **tol)
    # in a batch with a longer sentence, in either row
    other_src, other_tgt = random_batch([11], [9], seed=2)
    for row in [0, 1]:
        pairs = [(src, tgt), (other_src, other_tgt)] if row == 0 else [(other_src, other_tgt), (src, tgt)]
        S, U = max(p[0].size(1) for p in pairs), max(p[1].size(1) for p in pairs)
        batch_src = torch.cat([F.pad(s, (0, S - s.size(1)), value=PAD_ID) for s, _ in pairs])
        batch_tgt = torch.cat([F.pad(t, (0, U - t.size(1)), value=PAD_ID) for _, t in pairs])
        torch.testing.assert_close(model(batch_src, batch_tgt[:, :-1])[row : row + 1, :T], alone, **tol)


# ---------------------------------------------------------------------------------------------------------------
# Cached incremental decoding (float64)
# ---------------------------------------------------------------------------------------------------------------

DECODING_CASES = [(arch, positions, {}) for arch in ARCHS for positions in POSITIONS] + [
    (arch, positions, extra)
    for arch in ["prefix-lm", "causal-lm"]
    for positions in POSITIONS
    for extra in [{"rope_restart": True}, {"segment_embeddings": True}]
] + [
    ("seq2seq", "rope", {"norm_first": False, "activation": "swiglu", "bias": False, "tie_embeddings": False}),
    ("prefix-lm", "learned", {"norm_first": False, "activation": "gelu", "bias": False, "tie_embeddings": False}),
]


def _case_id(case) -> str:
    arch, positions, extra = case
    return "-".join([arch, positions, *extra])


@pytest.mark.parametrize("case", DECODING_CASES, ids=_case_id)
def test_cached_decoding_equals_forward(case):
    arch, positions, extra = case
    model = build(arch, positions, **extra)
    src, tgt = random_batch([6, 2, 4], [7, 3, 5], seed=3)  # source and target padding in the batch
    full = model(src, tgt[:, :-1])  # (B, T, V)
    inputs = decoder_inputs(model, tgt)
    T = inputs.size(1)
    for chunks in [[1] * T, [3, 1, 2, T - 6], [T], [1, T - 1]]:
        torch.testing.assert_close(decode_in_chunks(model, src, inputs, chunks), full, **EXACT, msg=f"chunks {chunks}")


REORDER_CASES = [(arch, positions, {}) for arch in ARCHS for positions in POSITIONS] + [
    ("prefix-lm", "rope", {"rope_restart": True}),
    ("causal-lm", "sinusoidal", {"segment_embeddings": True}),
]


@pytest.mark.parametrize("case", REORDER_CASES, ids=_case_id)
def test_reorder_then_continue_equals_reordered_batch(case):
    arch, positions, extra = case
    model = build(arch, positions, **extra)
    src, tgt = random_batch([6, 2, 4], [7, 3, 5], seed=4)
    inputs = decoder_inputs(model, tgt)
    index = torch.tensor([2, 0, 0, 1])  # reorder, duplicate (beam search grows the batch) and drop nothing
    state = model.init_state(src)
    for t in range(3):
        model.decode_step(inputs[:, t : t + 1], state)
    state.reorder(index)
    after = [model.decode_step(inputs[index, 3:5], state)]  # several tokens at once after the reorder
    after += [model.decode_step(inputs[index, t : t + 1], state) for t in range(5, inputs.size(1))]
    scratch = decode_in_chunks(model, src[index], inputs[index], [1] * inputs.size(1))
    torch.testing.assert_close(torch.cat(after, dim=1), scratch[:, 3:], **EXACT)
    # and a shrinking reorder (finished hypotheses dropped)
    state.reorder(torch.tensor([3, 0]))
    assert state.key_pad.size(0) == 2 and state.pos.size(0) == 2 and state.layers[0].self_kv.k.size(0) == 2


# ---------------------------------------------------------------------------------------------------------------
# Gradients, bf16, parameter counts
# ---------------------------------------------------------------------------------------------------------------


def token_loss(logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over non-pad tokens of tgt[:, 1:]; logits (B, T, V)."""
    return F.cross_entropy(logits.float().flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD_ID)


GRADIENT_CASES = [(arch, positions, {}) for arch in ARCHS for positions in POSITIONS] + [
    ("prefix-lm", "rope", {"segment_embeddings": True}),
    ("causal-lm", "learned", {"segment_embeddings": True, "tie_embeddings": False}),
    ("seq2seq", "learned", {"tie_embeddings": False, "activation": "swiglu"}),
]


@pytest.mark.parametrize("case", GRADIENT_CASES, ids=_case_id)
def test_every_parameter_gets_a_gradient(case):
    arch, positions, extra = case
    model = build(arch, positions, dtype=torch.float32, **extra).train()
    src, tgt = random_batch([6, 3], [5, 2], seed=5)
    token_loss(model(src, tgt[:, :-1]), tgt).backward()
    names = [n for n, _ in model.named_parameters()]
    if extra.get("segment_embeddings"):
        assert "segment.weight" in names
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert p.grad.abs().max() > 0, f"{name}: gradient is all zero"
    if extra.get("segment_embeddings"):  # both segments (source and target) are used
        assert (model.segment.weight.grad.abs().amax(dim=1) > 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_forward_backward(arch):
    """bf16 autocast on a CPU, with attention on the kernel that training takes there (`recipe.training_attention`):
    finite loss and gradients, the float32 loss within bf16's rounding, gradients pointing the same way. In eval mode:
    no dropout, so that both passes see the same network."""
    model = build(arch, "rope", dtype=torch.float32).eval()
    src, tgt = random_batch([6, 3], [5, 2], seed=6)
    grads = {}
    for amp in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), training_attention(src.device):
            logits = model(src, tgt[:, :-1])
        loss = token_loss(logits, tgt)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        grads[amp] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    (loss32, g32), (loss16, g16) = grads[False], grads[True]
    torch.testing.assert_close(loss16, loss32, rtol=0.01, atol=0)
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99


def test_base_parameter_counts_match():
    seq2seq = Seq2SeqTransformer(Seq2SeqConfig.preset("base"))
    decoder_only = DecoderOnlyTransformer(DecoderOnlyConfig.preset("base"))
    counts = {
        name: (m.num_parameters(), m.num_parameters(non_embedding=True))
        for name, m in [("seq2seq", seq2seq), ("decoder-only", decoder_only)]
    }
    for name, (total, non_emb) in counts.items():
        print(f"\n{name:>12} base: {total:,} parameters, {non_emb:,} non-embedding")
    (s_total, s_non), (d_total, d_non) = counts["seq2seq"], counts["decoder-only"]
    assert 25e6 < s_total < 27e6, f"base encoder-decoder should be about 26M, is {s_total:,}"
    assert abs(d_total - s_total) / s_total < 0.05, (s_total, d_total)
    assert abs(d_non - s_non) / s_non < 0.05, (s_non, d_non)


def test_tied_weights_count_once():
    """Tying shares one tensor between the embeddings and the output layer: counted once in the total, and left
    out, like an untied output layer, of the non-embedding count."""
    cfg = dict(vocab_size=V, d_model=32)
    tied = Seq2SeqTransformer(Seq2SeqConfig.preset("tiny", **cfg))
    untied = Seq2SeqTransformer(Seq2SeqConfig.preset("tiny", tie_embeddings=False, **cfg))
    assert untied.num_parameters() - tied.num_parameters() == 2 * V * 32  # a target embedding and an output layer
    assert untied.num_parameters(non_embedding=True) == tied.num_parameters(non_embedding=True)
    assert tied.num_parameters(non_embedding=True) == tied.num_parameters() - V * 32 - sum(
        p.numel() for p in tied.positions.parameters())


@pytest.mark.parametrize("arch", ["seq2seq", "causal-lm"])
def test_attention_projections_start_at_the_fused_scale(arch):
    """Xavier's bound for a (3D, D) matrix in every attention's q, k, v, cross-attention's separate q and kv included
    (their own shapes' bounds would be sqrt(2) and sqrt(4/3) times larger)."""
    model = build(arch, dtype=torch.float32, d_model=256, n_heads=4)
    bound = (6 / (256 + 3 * 256)) ** 0.5
    weights = [p for name, p in model.named_parameters() if name.endswith(("qkv.weight", "q.weight", "kv.weight"))]
    assert len(weights) == {"seq2seq": 4, "causal-lm": 2}[arch]  # tiny: 1 + 1 layers, or 2 layers
    for w in weights:
        assert 0.99 * bound < w.abs().max() <= bound


def fused_cross_attention_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as saved before cross-attention had its own projections: one (3D, D) `qkv`, q's rows first."""
    old = {}
    for name, tensor in state.items():
        if ".cross_attn.q." in name:
            old[name.replace(".cross_attn.q.", ".cross_attn.qkv.")] = torch.cat(
                [tensor, state[name.replace(".cross_attn.q.", ".cross_attn.kv.")]])
        elif ".cross_attn.kv." not in name:
            old[name] = tensor
    return old


@pytest.mark.parametrize("bias", [True, False])
def test_checkpoint_with_fused_cross_attention_loads(bias):
    """Old checkpoints keep loading, also under a prefix (Lightning's `model.`), strictly, with the same logits."""
    model = build("seq2seq", bias=bias)
    old = fused_cross_attention_layout(model.state_dict())
    assert sum(".cross_attn.qkv." in name for name in old) == model.config.n_decoder_layers * (1 + bias)
    src, tgt = random_batch([6, 3], [5, 2], seed=7)
    fresh = build("seq2seq", seed=1, bias=bias)
    assert not torch.equal(fresh(src, tgt[:, :-1]), model(src, tgt[:, :-1]))
    wrapper = torch.nn.Module()
    wrapper.model = fresh
    wrapper.load_state_dict({f"model.{name}": tensor for name, tensor in old.items()})
    assert torch.equal(fresh(src, tgt[:, :-1]), model(src, tgt[:, :-1]))
    assert fresh.state_dict().keys() == model.state_dict().keys()


# ---------------------------------------------------------------------------------------------------------------
# Overfitting real pairs
# ---------------------------------------------------------------------------------------------------------------


def real_batch(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The docs/design.md batch: src ids; tgt = <bos> ids <eos>; both right-padded with 0."""
    src_ids = tokenizer.encode([de for de, _ in pairs])
    tgt_ids = [[BOS_ID, *ids, EOS_ID] for ids in tokenizer.encode([en for _, en in pairs])]
    src = torch.full((len(pairs), max(map(len, src_ids))), PAD_ID)
    tgt = torch.full((len(pairs), max(map(len, tgt_ids))), PAD_ID)
    for b, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        src[b, : len(s)], tgt[b, : len(t)] = torch.tensor(s), torch.tensor(t)
    return src, tgt


@pytest.mark.parametrize(
    "arch, positions", [("seq2seq", "sinusoidal"), ("prefix-lm", "rope"), ("causal-lm", "learned")]
)
def test_tiny_model_overfits_real_pairs(arch, positions, tokenizer, train_pairs):
    torch.manual_seed(0)
    size = dict(vocab_size=tokenizer.vocab_size, positions=positions, d_model=64, d_ff=256, dropout=0.0)
    if arch == "seq2seq":
        model = Seq2SeqTransformer(Seq2SeqConfig.preset("tiny", **size))
    else:
        mode = "bidirectional" if arch == "prefix-lm" else "causal"
        model = DecoderOnlyTransformer(DecoderOnlyConfig.preset("tiny", prefix_mode=mode, **size))
    src, tgt = real_batch(tokenizer, train_pairs[:64])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    started = time.perf_counter()
    model.train()
    for step in range(400):
        loss = token_loss(model(src, tgt[:, :-1]), tgt)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    model.eval()
    with torch.no_grad():
        final = token_loss(model(src, tgt[:, :-1]), tgt).item()
    print(f"\n{arch}: mean token CE {final:.4f} after {step + 1} steps, {time.perf_counter() - started:.1f}s")
    assert final < 0.1, f"{arch} did not overfit 64 pairs: CE {final:.3f} after {step + 1} steps"


# ---------------------------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Seq2SeqConfig, DecoderOnlyConfig])
@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(positions="alibi"), "positions"),
        (dict(activation="tanh"), "activation"),
        (dict(d_model=30, n_heads=4), "n_heads"),
        (dict(d_model=6, n_heads=2, positions="rope"), "rope"),
        (dict(vocab_size=4), "vocab_size"),
    ],
)
def test_bad_config_raises_naming_the_field(cls, fields, name):
    with pytest.raises(ValueError, match=name):
        cls(**fields)
    with pytest.raises(ValueError, match=name):
        cls.preset("tiny", **fields)


def test_bad_prefix_mode_raises():
    with pytest.raises(ValueError, match="prefix_mode"):
        DecoderOnlyConfig(prefix_mode="sideways")


@pytest.mark.parametrize("cls", [Seq2SeqConfig, DecoderOnlyConfig])
def test_preset_rejects_unknown_names_and_fields(cls):
    with pytest.raises(ValueError, match="huge"):
        cls.preset("huge")
    with pytest.raises(ValueError, match="n_layerz"):
        cls.preset("tiny", n_layerz=3)
    cfg = cls.preset("small", d_model=128, dropout=None)  # None overrides are ignored
    assert (cfg.d_model, cfg.n_heads, cfg.dropout) == (128, 4, 0.1)


@pytest.mark.parametrize("arch", ["seq2seq", "prefix-lm", "causal-lm"])
def test_train_flops_matches_torch_flop_counter(arch):
    """`train_flops` (used for MFU) agrees with torch's own count of a forward + backward, within 3% (torch counts
    causal attention blocks in full and the formula half; attention is small at these lengths)."""
    from torch.utils.flop_counter import FlopCounterMode

    from translator.config import train_flops

    torch.manual_seed(0)
    if arch == "seq2seq":
        cfg = Seq2SeqConfig.preset("small", vocab_size=1000)
        model = Seq2SeqTransformer(cfg)
    else:
        prefix_mode = "bidirectional" if arch == "prefix-lm" else "causal"
        cfg = DecoderOnlyConfig.preset("small", vocab_size=1000, prefix_mode=prefix_mode)
        model = DecoderOnlyTransformer(cfg)
    B, S, T = 4, 12, 9
    src, tgt = torch.randint(5, 1000, (B, S)), torch.randint(5, 1000, (B, T + 1))
    with FlopCounterMode(display=False) as counter:
        model(src, tgt[:, :-1]).sum().backward()
    expected = train_flops(cfg, torch.full((B,), S), torch.full((B,), T))
    assert abs(expected - counter.get_total_flops()) / counter.get_total_flops() < 0.03


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_training_loss_traces_without_graph_breaks(arch, positions):
    """torch.compile(fullgraph=True) of forward + loss over batches of changing shapes (dynamic dimensions): a graph
    break would split `compile=True` training into pieces and defeat CUDA graphs (it happened: `is_causal=T > 1`
    became a symbolic bool). Dynamo's tracing only (backend="eager"), so it takes seconds."""
    from translator.module import token_loss

    torch._dynamo.reset()  # each test's model is new: without a reset, recompiles of token_loss pile up to the limit
    model = build(arch, positions, dtype=torch.float32).train()
    step = torch.compile(lambda s, t: token_loss(model, s, t, 0.1), fullgraph=True, backend="eager")
    for lengths in ([5, 3], [7, 2, 4], [4, 6, 2, 3]):
        src, tgt = random_batch(lengths, lengths[::-1], seed=len(lengths))
        step(src, tgt).backward()


@pytest.mark.parametrize("restart", [False, True])
def test_rope_restart_counts_target_positions_from_zero_at_sep(restart):
    """With rope_restart the position ids start again at 0 at `<sep>` (any position kind; here sinusoidal), in
    training and in decoding; without it they continue from the source length."""
    model = build("prefix-lm", "sinusoidal", rope_restart=restart)
    seen = []
    model.positions.register_forward_hook(lambda m, args, out: seen.append(args[0].expand(2, -1).clone()))
    src, tgt = random_batch([3, 5], [4, 2], seed=5)
    model(src, tgt[:, :-1])
    pos, T = seen[-1], tgt.size(1) - 1
    for row, n in enumerate([3, 5]):
        target = pos[row, n : n + T].tolist()
        assert pos[row, :n].tolist() == list(range(n))
        assert target == (list(range(T)) if restart else list(range(n, n + T)))
    state = model.init_state(src)  # decoding: the first target step (`<sep>`) is at position 0, or at n
    model.decode_step(torch.full((2, 1), model.config.sep_id), state)
    assert seen[-1].flatten().tolist() == ([0, 0] if restart else [3, 5])


# ---------------------------------------------------------------------------------------------------------------
# The source-side loss of the decoder-only model (config.source_loss)
# ---------------------------------------------------------------------------------------------------------------


def test_causal_source_loss_is_next_token_prediction_over_the_source():
    """The causal model's source loss equals the cross-entropy of the same model run as a plain LM over the source
    (decoding source tokens 1.. after a prefill of token 0): every position predicts the next source token."""
    model = build("causal-lm")
    src, tgt = random_batch([6, 4, 5], [3, 5, 2], seed=3)
    _, loss = model(src, tgt[:, :-1], with_source=True)
    nll, count = 0.0, 0
    for b in range(src.size(0)):
        row = src[b, : int((src[b] != PAD_ID).sum())][None]  # (1, n)
        first = model.lm_head(model.norm(_prefill_output(model, row[:, :1])))  # position 0 predicts token 1
        state = model.init_state(row[:, :1])
        rest = model.decode_step(row[:, 1:-1], state)  # positions 1 .. n-2 predict tokens 2 .. n-1
        preds = torch.cat([first, rest], dim=1)  # (1, n-1, V)
        nll += F.cross_entropy(preds[0], row[0, 1:], reduction="sum")
        count += row.size(1) - 1
    torch.testing.assert_close(loss, nll / count)


def _prefill_output(model, src):
    """The last block's output (B, S, D) of the decoder-only prefill over `src`."""
    outs = []
    handle = model.blocks[-1].register_forward_hook(lambda m, a, out: outs.append(out))
    try:
        model.init_state(src)
    finally:
        handle.remove()
    return outs[0]


def test_prefix_lm_source_loss_restores_the_masked_tokens_only():
    """The prefix-LM masks a share of the real source tokens (never pads) with <unk>, and is scored on those alone."""
    model = build("prefix-lm", source_mask_rate=0.5)
    src, tgt = random_batch([9, 4, 7], [3, 5, 2], seed=4)
    torch.manual_seed(0)
    corrupted, targets = model._source_task(src)
    masked = corrupted != src
    assert masked.any() and (corrupted[masked] == 1).all() and not (masked & (src == PAD_ID)).any()
    assert ((targets != PAD_ID) == masked).all() and (targets[masked] == src[masked]).all()
    torch.manual_seed(0)
    _, loss = model(src, tgt[:, :-1], with_source=True)
    assert torch.isfinite(loss) and loss > 0


def test_separate_source_loss_leaves_the_target_reading_the_clean_source():
    """source_loss_separate: the target's logits are those of the plain pass over the clean source (the same pass
    sharing the corruption changes them), and the source loss is the prefill's own denoising cross-entropy."""
    model = build("prefix-lm", source_mask_rate=0.5).eval()  # no dropout: the passes compare exactly
    src, tgt = random_batch([9, 4, 7], [3, 5, 2], seed=6)
    clean = model(src, tgt[:, :-1])
    torch.manual_seed(0)
    shared, _ = model(src, tgt[:, :-1], with_source=True)
    assert not torch.allclose(shared, clean)  # the target read the masked source
    model.config.source_loss_separate = True
    torch.manual_seed(0)
    logits, loss = model(src, tgt[:, :-1], with_source=True)
    torch.testing.assert_close(logits, clean)
    torch.manual_seed(0)
    corrupted, targets = model._source_task(src)
    hidden = _prefill_output(model, corrupted)  # the source alone, through the prefix attention
    keep = targets != PAD_ID
    expected = F.cross_entropy(model.lm_head(model.norm(hidden))[keep], targets[keep])
    torch.testing.assert_close(loss, expected)


def test_separate_source_loss_needs_the_prefix_lm():
    with pytest.raises(ValueError, match="source_loss_separate: only the prefix-LM"):
        build("causal-lm", source_loss=0.5, source_loss_separate=True)


def test_source_loss_is_added_in_training_only():
    """The module adds config.source_loss times the source-side loss to its training loss, and evaluates without."""
    from translator.module import DecoderOnlyModule, evaluation_metrics
    from translator.recipe import token_loss

    torch.manual_seed(0)
    module = DecoderOnlyModule(preset="tiny", vocab_size=V, config={"prefix_mode": "causal", "source_loss": 0.5})
    src, tgt = random_batch([6, 4], [3, 5], seed=5)
    plain = token_loss(module.model, src, tgt, 0.0)
    source = module.model(src, tgt[:, :-1], with_source=True)[1]
    metrics = evaluation_metrics()
    module._evaluate({"src": src, "tgt": tgt, "index": [0, 1], "truncated": [False, False], "num_pairs": 2}, metrics,
                     decode=[], beam=1)
    torch.testing.assert_close(metrics["loss"].compute(), plain.float())  # evaluation: the target loss alone
    smoothing = module.hparams.label_smoothing
    torch.testing.assert_close(module.training_loss(src, tgt),
                               token_loss(module.model, src, tgt, smoothing) + 0.5 * source)


# ---------------------------------------------------------------------------------------------------------------
# The fused output layer and loss of CPU training (`translator.recipe.linear_cross_entropy`)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_linear_cross_entropy_equals_torchs_loss_and_gradients(smoothing):
    """Value and gradients of torch's cross-entropy over hidden @ weight.T, in float64, with pad targets skipped;
    3,000 pieces make chunks of 699 rows, so 1,500 rows end in a partial chunk. Without autograd: the same value."""
    from translator.recipe import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1500, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (0.3 * torch.randn(3000, 16, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(5, 3000, (1500,), generator=g)
    targets[::7] = PAD_ID
    expected = F.cross_entropy(hidden @ weight.T, targets, ignore_index=PAD_ID, label_smoothing=smoothing,
                               reduction="sum")
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, smoothing)
    torch.testing.assert_close(loss, expected, **EXACT)
    for got, want in zip(torch.autograd.grad(2.5 * loss, (hidden, weight)), expected_grads):
        torch.testing.assert_close(got, 2.5 * want, **EXACT)  # the incoming gradient scales both
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, smoothing), expected, **EXACT)


@pytest.mark.parametrize("arch, extra", [("seq2seq", {}), ("prefix-lm", {}), ("causal-lm", {"source_loss": 0.5}),
                                         ("prefix-lm", {"source_loss": 0.5, "source_loss_separate": True})])
def test_cpu_training_loss_equals_the_loss_over_the_logits(arch, extra, monkeypatch):
    """`token_loss` on a CPU (the fused output layer and loss) against the same loss over the model's logits
    (`recipe.fused_loss` off, as on a GPU): equal loss and gradients in float64; in bf16 autocast, equal within
    bf16's rounding of the logits."""
    from translator import recipe

    model = build(arch, dtype=torch.float64, **extra)
    src, tgt = random_batch([6, 3, 5], [5, 2, 4], seed=3)
    weight = extra.get("source_loss", 0.0)

    def loss_and_grads(fused: bool, amp: bool = False):
        monkeypatch.setattr(recipe, "fused_loss", lambda device: fused)
        torch.manual_seed(1)  # the source denoising's random mask
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = recipe.token_loss(model, src, tgt, 0.1, source_weight=weight)
        return loss.detach(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    (fused, fused_grads), (plain, plain_grads) = loss_and_grads(True), loss_and_grads(False)
    torch.testing.assert_close(fused, plain, **EXACT)
    for a, b in zip(fused_grads, plain_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **EXACT)
    model.float()
    (fused, fused_grads), (plain, plain_grads) = loss_and_grads(True, amp=True), loss_and_grads(False, amp=True)
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=0)
    a, b = (torch.cat([g.flatten() for g in grads if g is not None]) for grads in (fused_grads, plain_grads))
    assert F.cosine_similarity(a, b, dim=0) > 0.999
