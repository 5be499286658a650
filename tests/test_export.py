"""`translator export` (translator/export.py) and the engines that run its directories (translator/engines.py).

CTranslate2: tiny models of both architectures (the encoder-decoder and the causal decoder-only), trained by the real
CLI for 400 steps (long enough that their greedy outputs differ from sentence to sentence), are exported through
`translator export`; CTranslate2's greedy search on the exported directory alone must find our tokens for >= 98% of 100
Multi30k validation sentences, and its per-token log-probs must equal ours. Every layer layout the converter maps
(pre/post-LN, sinusoidal/learned/rotary positions, relu/gelu/swiglu, tied or not, scaled or not, biases or not) is
checked on random weights.

ONNX: the same models and the prefix-LM (the causal model's weights with a bidirectional source) are exported as graphs;
their logits, step by step through a beam-like reorder of the cache, must equal PyTorch's within LOGIT_TOL, and our
beam search over them must find our hypotheses. Tests that need ctranslate2 or onnxruntime are skipped without them
(the `serve` extra installs them).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MODULES, fit_tiny, load_script, read_pairs

from translator import checkpoint
from translator.cli import main
from translator.config import DecoderOnlyConfig, Seq2SeqConfig
from translator.decoder_only import DecoderOnlyTransformer
from translator.seq2seq import Seq2SeqTransformer
from translator.translate import translate

needs_ct2 = pytest.mark.skipif(importlib.util.find_spec("ctranslate2") is None, reason="ctranslate2 not installed")
needs_onnx = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnxscript")),
                                reason="onnxruntime or onnxscript not installed")
STEPS = 400
LOGPROB_TOL = 1e-4  # float32 CTranslate2 against float32 PyTorch: observed ~1e-6
LOGIT_TOL = 1e-4  # float32 ONNX Runtime against float32 PyTorch, logits of magnitude ~5: observed ~4e-6


# ---- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """{seq2seq, causal}: last.ckpt of tiny models trained for STEPS steps (validated once, at the end)."""
    once = ["--trainer.val_check_interval", str(STEPS)]
    runs = {"seq2seq": ["--model.class_path", MODULES["seq2seq"], *once],
            "causal": ["--model.class_path", MODULES["decoder_only"], "--model.init_args.config.prefix_mode", "causal", *once]}
    return fit_tiny(tmp_path_factory.mktemp("export_fit"), tokenizer, runs, steps=STEPS)


@pytest.fixture(scope="module")
def val_sources() -> list[str]:
    return [de for de, _ in read_pairs("val", 100)]


def run_export(*args: str) -> tuple[int, str]:
    """`translator export ARGS` in-process: (exit code, stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        main(["export", *args])
    return info.value.code, err.getvalue()


def exported(ckpt: Path, out: Path, fmt: str = "ctranslate2", *extra: str) -> Path:
    code, err = run_export("--checkpoint", str(ckpt), "--format", fmt, "--out", str(out), *extra)
    assert code == 0, err
    return out


def variant(src: Path, dst: Path, **config: object) -> Path:
    """A copy of checkpoint `src` whose model config has `config` changed (same weights)."""
    ckpt = torch.load(src, weights_only=True)
    ckpt["translator"]["config"].update(config)
    torch.save(ckpt, dst)
    return dst


# ---- CTranslate2 -------------------------------------------------------------------------------------------------
@needs_ct2
@pytest.mark.parametrize("arch", ["seq2seq", "causal"])
def test_ctranslate2_greedy_finds_our_tokens(arch, trained, val_sources, tmp_path):
    from translator.engines import load

    out = exported(trained[arch], tmp_path / "ct2")
    assert {"model.bin", "sentencepiece.model", "translator.json"} <= {p.name for p in out.iterdir()}
    model, tokenizer, _ = checkpoint.load(trained[arch])
    ours = translate(model, tokenizer, val_sources, beam=1)
    theirs = load(out, threads=1).translate(val_sources, beam=1)  # the directory alone: no checkpoint, no torch model
    same = sum(a[0].tokens == b[0].tokens for a, b in zip(ours, theirs))
    assert same >= 98, f"{same}/100 identical"
    # the models say something different for most sentences: the agreement is not that of a constant output
    assert len({hyps[0].text for hyps in ours}) >= 30


def ct2_token_logprobs(out: Path, arch: str, src: list[str], tgt: list[str]) -> np.ndarray:
    """CTranslate2's log-prob of each target piece and of </s>, given the source pieces."""
    import ctranslate2

    if arch == "seq2seq":
        return np.array(ctranslate2.Translator(str(out), intra_threads=1).score_batch([src], [tgt])[0].log_probs)
    generator = ctranslate2.Generator(str(out), intra_threads=1)
    return np.array(generator.score_batch([[*src, "<sep>", *tgt, "</s>"]])[0].log_probs)[len(src):]


def our_token_logprobs(model, src: list[int], tgt: list[int]) -> np.ndarray:
    with torch.no_grad():
        lprobs = model(torch.tensor([src]), torch.tensor([[model.config.bos_id, *tgt]])).log_softmax(-1)[0]
    return lprobs.gather(1, torch.tensor([*tgt, model.config.eos_id])[:, None])[:, 0].numpy()


@needs_ct2
@pytest.mark.parametrize("arch", ["seq2seq", "causal"])
def test_ctranslate2_scores_the_references_as_we_do(arch, trained, tmp_path):
    out = exported(trained[arch], tmp_path / "ct2")
    model, tokenizer, _ = checkpoint.load(trained[arch])
    for de, en in read_pairs("val", 20):
        src, tgt = tokenizer.encode([de, en])
        theirs = ct2_token_logprobs(out, arch, tokenizer.pieces(src), tokenizer.pieces(tgt))
        np.testing.assert_allclose(theirs, our_token_logprobs(model, src, tgt), atol=LOGPROB_TOL)


LAYOUTS = [{}, dict(norm_first=False), dict(positions="learned"), dict(positions="rope"), dict(activation="gelu"),
           dict(activation="swiglu"), dict(tie_embeddings=False), dict(scale_embeddings=False), dict(bias=False)]


@needs_ct2
@pytest.mark.parametrize("arch", ["seq2seq", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()) or "default")
def test_every_layer_layout_converts_exactly(arch, layout, tokenizer, tmp_path):
    from translator.export import export_ctranslate2

    torch.manual_seed(0)
    if arch == "seq2seq":
        config = Seq2SeqConfig.preset("tiny", vocab_size=tokenizer.vocab_size, n_encoder_layers=2, n_decoder_layers=2,
                                      **layout)
        model = Seq2SeqTransformer(config).eval()
    else:
        config = DecoderOnlyConfig.preset("tiny", vocab_size=tokenizer.vocab_size, prefix_mode="causal", **layout)
        model = DecoderOnlyTransformer(config).eval()
    with torch.no_grad():  # norms and biases start at 1 and 0: move them, so that a misplaced one shows
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    out = export_ctranslate2(model, tokenizer, tmp_path / "ct2")
    for de, en in read_pairs("val", 3):
        src, tgt = tokenizer.encode([de, en])
        theirs = ct2_token_logprobs(out, arch, tokenizer.pieces(src), tokenizer.pieces(tgt))
        np.testing.assert_allclose(theirs, our_token_logprobs(model, src, tgt), atol=LOGPROB_TOL)


@needs_ct2
def test_int8_export_is_smaller_and_mostly_agrees(trained, val_sources, tmp_path):
    from translator.engines import load

    fp32 = exported(trained["seq2seq"], tmp_path / "fp32")
    int8 = exported(trained["seq2seq"], tmp_path / "int8", "ctranslate2", "--quantization", "int8")
    assert json.loads((int8 / "translator.json").read_text())["quantization"] == "int8"
    # the weights are int8; the position table stays float32
    assert (int8 / "model.bin").stat().st_size < 0.7 * (fp32 / "model.bin").stat().st_size
    a = load(fp32, threads=1).translate(val_sources, beam=1)
    b = load(int8, threads=1).translate(val_sources, beam=1)
    same = sum(x[0].tokens == y[0].tokens for x, y in zip(a, b))
    assert same >= 70, f"int8 and float32 greedy agree on {same}/100"  # observed 95 on such tiny models


@needs_ct2
def test_prefix_lm_is_refused_in_one_line(trained, tmp_path):
    prefix_lm = variant(trained["causal"], tmp_path / "prefix_lm.ckpt", prefix_mode="bidirectional")
    code, err = run_export("--checkpoint", str(prefix_lm), "--format", "ctranslate2", "--out", str(tmp_path / "o"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("translator: error: ") and "Traceback" not in err
    assert "bidirectional" in err and "--format onnx" in err
    assert not (tmp_path / "o").exists()


def test_bad_export_requests_are_one_line_and_exit_2(trained, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 3}, foreign)
    out = str(tmp_path / "o")
    cases = {
        "corrupt": (["--checkpoint", str(garbage), "--format", "ctranslate2", "--out", out], "garbage.ckpt"),
        "not translator": (["--checkpoint", str(foreign), "--format", "ctranslate2", "--out", out], "not a translator"),
        "missing": (["--checkpoint", str(tmp_path / "nope.ckpt"), "--format", "onnx", "--out", out], "not found"),
        "unknown format": (["--checkpoint", str(trained["seq2seq"]), "--format", "tflite", "--out", out], "tflite"),
        "bad quantization": (["--checkpoint", str(trained["seq2seq"]), "--format", "ctranslate2", "--quantization",
                              "int4", "--out", out], "int4"),
        "quantized onnx": (["--checkpoint", str(trained["seq2seq"]), "--format", "onnx", "--quantization", "int8",
                            "--out", out], "--quantization"),
        "no checkpoint": (["--format", "onnx", "--out", out], "--checkpoint"),
    }
    for name, (args, expected) in cases.items():
        code, err = run_export(*args)
        assert code == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("translator: error: "), (name, err)
        assert expected in err, (name, err)
    assert not Path(out).exists()


# ---- ONNX --------------------------------------------------------------------------------------------------------
def assert_steps_match(model, onnx_model, src: torch.Tensor, tgt: torch.Tensor) -> None:
    """Teacher-forced decoding of tgt after src, step by step, with a beam-like reorder of the rows after step 3:
    the ONNX graphs' logits equal the model's within LOGIT_TOL at every step (seq2seq: from an empty cache)."""
    with torch.no_grad():
        ours, theirs = model.init_state(src), onnx_model.init_state(src)
        for t in range(tgt.size(1)):
            tokens = torch.full((src.size(0), 1), model.start_id) if t == 0 else tgt[:, t - 1:t]
            expected = model.decode_step(tokens, ours)
            torch.testing.assert_close(onnx_model.decode_step(tokens, theirs), expected, atol=LOGIT_TOL, rtol=0)
            if t == 3:
                index = torch.tensor([3, 1, 1, 0, *range(4, src.size(0))])
                ours.reorder(index)
                theirs.reorder(index)


@needs_onnx
@pytest.mark.parametrize("arch", ["seq2seq", "causal", "prefix_lm"])
def test_onnx_graphs_give_our_logits_and_our_beam_search(arch, trained, val_sources, tmp_path):
    from translator.engines import OnnxModel, load
    from translator.translate import pad

    ckpt = trained["seq2seq" if arch == "seq2seq" else "causal"]
    if arch == "prefix_lm":
        ckpt = variant(ckpt, tmp_path / "prefix_lm.ckpt", prefix_mode="bidirectional")
    out = exported(ckpt, tmp_path / "onnx", "onnx")
    assert {"init.onnx", "step.onnx", "sentencepiece.model", "translator.json"} <= {p.name for p in out.iterdir()}
    model, tokenizer, _ = checkpoint.load(ckpt)
    pairs = read_pairs("val", 16)
    src, tgt = (pad(tokenizer.encode(list(side))) for side in zip(*pairs))
    assert_steps_match(model, OnnxModel(out, threads=1), src, tgt)

    sentences = val_sources[:40]
    ours = translate(model, tokenizer, sentences, beam=5, nbest=2)
    theirs = load(out, threads=1).translate(sentences, beam=5, nbest=2)  # generate.beam_search over the graphs
    for a, b in zip(ours, theirs):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


@needs_onnx
@pytest.mark.parametrize("arch", ["seq2seq", "decoder_only"])
def test_onnx_export_of_other_layouts(arch, tokenizer, tmp_path):
    """RoPE, swiglu, post-LN without biases (seq2seq); the prefix-LM with RoPE restarting at <sep>, segment
    embeddings and gelu (decoder-only, which CTranslate2 cannot express): random weights, logits as PyTorch's."""
    from translator.engines import OnnxModel
    from translator.onnx_export import export_onnx
    from translator.translate import pad

    torch.manual_seed(0)
    if arch == "seq2seq":
        model = Seq2SeqTransformer(Seq2SeqConfig.preset(
            "tiny", vocab_size=tokenizer.vocab_size, positions="rope", activation="swiglu", norm_first=False,
            bias=False, n_decoder_layers=2))
    else:
        model = DecoderOnlyTransformer(DecoderOnlyConfig.preset(
            "tiny", vocab_size=tokenizer.vocab_size, positions="rope", rope_restart=True, segment_embeddings=True,
            activation="gelu"))
    out = export_onnx(model.eval(), tokenizer, tmp_path / "onnx")
    pairs = read_pairs("val", 4)
    src, tgt = (pad(tokenizer.encode(list(side))) for side in zip(*pairs))
    assert_steps_match(model, OnnxModel(out, threads=1), src, tgt)


# ---- scripts/translate.py --engine -------------------------------------------------------------------------------
def script_output(capsys, *argv: str) -> str:
    assert load_script("translate").main(list(argv)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@needs_ct2
def test_translate_script_ctranslate2_engine_one_line_in_one_line_out(trained, tmp_path, capsys):
    out = exported(trained["seq2seq"], tmp_path / "ct2")
    sentence = "Ein Mann fährt mit dem Fahrrad durch die Stadt."
    torch_line = script_output(capsys, "--checkpoint", str(trained["seq2seq"]), "--beam", "1", sentence)
    ct2_line = script_output(capsys, "--model", str(out), "--beam", "1", sentence)  # engine: the directory's format
    assert ct2_line == torch_line and ct2_line.count("\n") == 1 and ct2_line.strip()
    nbest = script_output(capsys, "--model", str(out), "--engine", "ctranslate2", "--beam", "4", "--nbest", "2",
                          sentence, "Eine Frau.")
    rows = [line.split("\t") for line in nbest.splitlines()]
    assert [(r[0], r[1]) for r in rows] == [("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")]
    assert all(len(r) == 4 and float(r[2]) <= 0 for r in rows)


@needs_onnx
def test_translate_script_onnx_engine_exports_on_the_fly_and_matches_torch(trained, tmp_path, capsys):
    src = tmp_path / "in.de"
    src.write_text("Ein Hund läuft im Schnee.\n\nZwei Männer spielen Fußball.\n", encoding="utf-8")
    ckpt = str(trained["causal"])
    torch_out = script_output(capsys, "--checkpoint", ckpt, "--input", str(src), "--nbest", "2")
    onnx_out = script_output(capsys, "--checkpoint", ckpt, "--engine", "onnx", "--input", str(src), "--nbest", "2")
    assert onnx_out == torch_out and len(onnx_out.splitlines()) == 5  # 2 + 1 (the empty line) + 2 rows


@needs_ct2
def test_translate_script_engine_errors(trained, tmp_path, capsys):
    script = load_script("translate")
    out = exported(trained["seq2seq"], tmp_path / "ct2")
    assert script.main(["--model", str(out), "--engine", "onnx", "Ein Hund."]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a ctranslate2 export, not onnx" in err
    assert script.main(["--model", str(tmp_path), "Ein Hund."]) == 2
    assert "not a directory written by `translator export`" in capsys.readouterr().err
    assert script.main(["--model", str(out), "--penalty", "gnmt", "Ein Hund."]) == 2  # CTranslate2 has len**alpha only
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "penalty='gnmt'" in err and "len**alpha only" in err
    for argv in (["--model", str(out), "--static", "a"], ["--model", str(out), "--engine", "torch", "a"],
                 ["--checkpoint", "x.ckpt", "--model", str(out), "a"]):
        with pytest.raises(SystemExit) as info:
            script.main(argv)
        assert info.value.code == 2 and "usage:" in capsys.readouterr().err
