"""`translator.translate` and `scripts/translate.py`, against checkpoints trained by the real CLI.

The session fixture `checkpoints` (conftest.py) runs `translator fit --config configs/debug.yaml` briefly for both
architectures at once (one thread each, in temporary directories, with the shared test tokenizer); the tests then
translate with the library in-process, run the script end to end in subprocesses (arguments, stdin, --input/--output,
n-best TSV, --reference, --attention), and call its `main()` in-process for the error paths (cheaper than a process
each).
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MODULES, load_script, read_pairs

from translator import checkpoint
from translator.translate import attention_map, recompute_attention, token_batches, translate

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "translate.py"
MULTI30K = REPO.parent / "shared" / "data" / "multi30k"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

SENTENCES = [
    "Ein Mann fährt Fahrrad.",
    "",
    "Zwei Hunde spielen im Schnee und ein kleines Mädchen schaut ihnen vom Fenster aus zu.",
    "   ",
    "Eine Frau.",
]


def reads_as_text(line: str) -> bool:
    """At least two different words: neither empty nor one piece repeated, as a barely trained model writes."""
    return len(set(line.split())) >= 2


# ---- fixtures (`checkpoints`, the two trained models, is in conftest.py) ------------------------------------
@pytest.fixture(scope="session")
def loaded(checkpoints):
    return {arch: checkpoint.load(path) for arch, path in checkpoints.items()}


@pytest.fixture(scope="session")
def script():
    return load_script("translate")


def run_script(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], input=stdin, capture_output=True, env=ENV,
                          cwd=REPO, timeout=300)


# ---- library -----------------------------------------------------------------------------------------------------
def test_token_batches_respect_the_budget_and_cover_every_nonempty_sequence():
    lengths = [5, 0, 9, 3, 3, 20, 1, 0, 7]
    batches = token_batches(lengths, batch_tokens=12)
    assert sorted(i for b in batches for i in b) == [i for i, n in enumerate(lengths) if n]
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 12
    assert batches[0] == [5]  # longest first, alone since it exceeds the budget


@pytest.mark.parametrize("arch", MODULES)
def test_translate_keeps_order_count_and_empty_lines(loaded, arch):
    model, tokenizer, _ = loaded[arch]
    results = translate(model, tokenizer, SENTENCES, beam=3, nbest=2)
    assert len(results) == len(SENTENCES)
    best = [hyps[0].text for s, hyps in zip(SENTENCES, results) if s.strip()]
    assert all(best) and len(set(best)) == len(best), best  # distinct translations: the equalities below bite
    if arch == "decoder_only":  # trained to write text (conftest.FIT_ARGS); the 20-step seq2seq writes "A A A ..."
        assert all(map(reads_as_text, best)), best
    for sentence, hyps in zip(SENTENCES, results):
        if sentence.strip():
            assert 1 <= len(hyps) <= 2
            assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
            assert all(h.text == tokenizer.decode([h.tokens])[0] for h in hyps)
        else:
            assert [(h.tokens, h.text) for h in hyps] == [([], "")]
    # one sentence per batch (in another order) gives the same translations: the order is restored
    alone = translate(model, tokenizer, SENTENCES, beam=3, nbest=2, batch_tokens=1)
    assert [[h.text for h in hyps] for hyps in alone] == [[h.text for h in hyps] for hyps in results]
    reversed_ = translate(model, tokenizer, SENTENCES[::-1], beam=3, nbest=2)
    assert [h[0].text for h in reversed_[::-1]] == [h[0].text for h in results]
    static = translate(model, tokenizer, SENTENCES, beam=3, nbest=2, static=True)  # the CUDA-graph form, on CPU
    assert [[h.text for h in hyps] for hyps in static] == [[h.text for h in hyps] for hyps in results]
    assert [h.score for hyps in static for h in hyps] == pytest.approx([h.score for hyps in results for h in hyps])


def test_long_input_is_truncated_with_a_warning_naming_the_line(loaded, caplog):
    model, tokenizer, _ = loaded["seq2seq"]
    long = " ".join(["Ein Mann fährt Fahrrad."] * 20)
    with caplog.at_level(logging.WARNING, logger="translator.translate"):
        results = translate(model, tokenizer, ["Ein Hund.", "", long], beam=2, max_input_tokens=10)
    assert len(results) == 3
    assert len(caplog.records) == 1 and "line 3" in caplog.text and "truncated" in caplog.text


@pytest.mark.parametrize("arch", MODULES)
def test_recomputed_attention_reproduces_the_module_output(loaded, arch):
    """softmax(q k^T / sqrt(hs)) recomputed from the captured inputs, times v, through `out`, equals what the
    module returned in the forward pass: the heatmap shows the weights the model really used."""
    model, tokenizer, _ = loaded[arch]
    attn = model.decoder[-1].cross_attn if arch == "seq2seq" else model.blocks[-1].self_attn
    src_ids = tokenizer.encode(["Ein Mann fährt Fahrrad."])[0]
    tgt_ids = tokenizer.encode(["A man rides a bike."])[0]
    seen = {}
    handle = attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(args=args, kwargs=kwargs, out=out),
                                        with_kwargs=True)
    try:
        with torch.no_grad():
            model(torch.tensor([src_ids]), torch.tensor([[model.config.bos_id, *tgt_ids]]))
    finally:
        handle.remove()
    assert seen["kwargs"].pop("cache") is None
    probs, v = recompute_attention(attn, *seen["args"], **seen["kwargs"])
    out = attn.out((probs @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, seen["out"], rtol=1e-4, atol=1e-5)

    amap = attention_map(model, tokenizer, src_ids, tgt_ids)
    assert amap.weights.shape == (len(tgt_ids) + 1, len(src_ids))
    assert amap.source == tokenizer.pieces(src_ids) and amap.target[-1] == "</s>"
    row_sums = amap.weights.sum(1)
    if arch == "seq2seq":  # cross-attention rows are distributions over the source
        torch.testing.assert_close(row_sums, torch.ones_like(row_sums))
    else:  # decoder-only rows: the share of attention that goes to the source prefix
        assert ((row_sums > 0) & (row_sums <= 1 + 1e-5)).all()


# ---- the script, end to end --------------------------------------------------------------------------------------
def test_script_input_file_output_nbest_reference_attention(checkpoints, tmp_path):
    src = tmp_path / "in.de.gz"
    long = " ".join(["Zwei Hunde spielen im Schnee."] * 10)
    lines = ["Ein Mann fährt Fahrrad.", "", long, "Eine Frau."]
    src.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    ref = tmp_path / "ref.en"
    ref.write_text("A man rides a bike.\n\nTwo dogs play in the snow.\nA woman.\n", encoding="utf-8")
    out, png = tmp_path / "out.tsv", tmp_path / "attn.png"
    proc = run_script("--checkpoint", str(checkpoints["seq2seq"]), "--input", str(src), "--output", str(out),
                      "--beam", "2", "--nbest", "2", "--reference", str(ref), "--attention", str(png),
                      "--max-input-tokens", "16")
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and proc.stdout == b""
    rows = [row.split("\t") for row in out.read_text(encoding="utf-8").splitlines()]
    assert all(len(row) == 4 for row in rows)
    assert sorted({int(row[0]) for row in rows}) == [1, 2, 3, 4]  # every input line, the empty one included
    for line_no in (1, 3, 4):
        ranks = [(int(r[1]), float(r[2])) for r in rows if r[0] == str(line_no)]
        assert [r for r, _ in ranks] == [1, 2] and ranks[0][1] >= ranks[1][1]
    assert [r[1:] for r in rows if r[0] == "2"] == [["1", "0.0000", ""]]
    assert "line 3" in stderr and "truncated" in stderr  # the over-long line, still translated
    assert "BLEU = " in stderr and "chrF2 = " in stderr and "nrefs:1|case:mixed" in stderr and "nc:6" in stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_script_stdin_keeps_the_line_count_decoder_only(checkpoints, tmp_path):
    png = tmp_path / "attn.png"
    text = "\n".join(SENTENCES) + "\n\n"  # ends with an empty line too
    proc = run_script("--checkpoint", str(checkpoints["decoder_only"]), "--beam", "2", "--attention", str(png),
                      stdin=text.encode())
    assert proc.returncode == 0, proc.stderr.decode()
    out = proc.stdout.decode().split("\n")
    assert out[-1] == "" and len(out) - 1 == len(SENTENCES) + 1
    assert [reads_as_text(o) for o, s in zip(out, SENTENCES)] == [bool(s.strip()) for s in SENTENCES], out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_script_sentences_as_arguments(checkpoints):
    proc = run_script("--checkpoint", str(checkpoints["seq2seq"]), "--beam", "1", "Ein Hund läuft.", "Eine Frau.")
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(proc.stdout.decode().splitlines()) == 2
    static = run_script("--checkpoint", str(checkpoints["seq2seq"]), "--beam", "1", "--static", "Ein Hund läuft.",
                        "Eine Frau.")
    assert static.returncode == 0 and static.stdout == proc.stdout, static.stderr.decode()


def test_script_quantize_int8_translates_and_is_refused_for_other_engines(checkpoints, script, capsys):
    sentences = [s for s, _ in read_pairs("val", 8)]
    fp32 = run_script("--checkpoint", str(checkpoints["decoder_only"]), "--beam", "2", *sentences)
    int8 = run_script("--checkpoint", str(checkpoints["decoder_only"]), "--beam", "2", "--quantize", "int8",
                      *sentences)
    assert int8.returncode == 0, int8.stderr.decode()
    lines, ref = int8.stdout.decode().splitlines(), fp32.stdout.decode().splitlines()
    assert len(lines) == 8 and all(reads_as_text(line) for line in lines)
    assert sum(a == b for a, b in zip(lines, ref)) >= 4, (lines, ref)  # int8 keeps most translations
    with pytest.raises(SystemExit) as err:
        script.main(["--model", "somewhere", "--engine", "onnx", "--quantize", "int8", "Ein Hund."])
    assert err.value.code == 2 and "--quantize int8 is for --engine torch only" in capsys.readouterr().err


def test_script_and_predict_writer_clean_a_hypothesis_alike(script, tmp_path):
    """scripts/translate.py and `translator predict`'s writer turn the same hypothesis into the same line."""
    from translator.callbacks import TranslationWriter
    from translator.translate import Translation

    texts = [" A dog\truns\n through  snow.\r\n", "two\u2028lines\x0bor a\x0cpage ", "\t \n"]
    writer = TranslationWriter(tmp_path / "out.en")
    writer.write(texts)
    written = (tmp_path / "out.en").read_bytes().decode("utf-8")
    assert written == script.format_output([[Translation([], 0.0, t)] for t in texts], None)
    assert written == "A dog runs through snow.\ntwo lines or a page\n\n"


def test_script_missing_checkpoint_exits_2_without_traceback(tmp_path):
    missing = tmp_path / "nope.ckpt"
    proc = run_script("--checkpoint", str(missing), "Ein Hund.")
    stderr = proc.stderr.decode()
    assert proc.returncode == 2 and str(missing) in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


# ---- error paths, in-process -------------------------------------------------------------------------------------
def corrupt(path: Path, real: Path) -> None:
    path.write_bytes(real.read_bytes()[:2000])  # a truncated zip archive


def foreign(path: Path, real: Path) -> None:
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 3}, path)  # a plain Lightning-like dict


def not_a_checkpoint(path: Path, real: Path) -> None:
    path.write_bytes(b"\x00\x01 not a checkpoint at all")


@pytest.mark.parametrize("make", [corrupt, foreign, not_a_checkpoint])
def test_bad_checkpoint_is_one_clear_line_and_exit_2(script, checkpoints, tmp_path, capsys, make):
    bad = tmp_path / f"{make.__name__}.ckpt"
    make(bad, checkpoints["seq2seq"])
    assert script.main(["--checkpoint", str(bad), "Ein Hund."]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "error" in err


def test_non_utf8_input_names_file_and_line(script, checkpoints, tmp_path, capsys):
    src = tmp_path / "latin1.de"
    src.write_bytes("Ein Hund.\n\nGrüße aus Köln.\n".encode("latin-1"))
    assert script.main(["--checkpoint", str(checkpoints["seq2seq"]), "--input", str(src)]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and "line 3" in err and "UTF-8" in err


def test_non_utf8_stdin_names_the_line(script, checkpoints, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\xff\xfe\n")))
    assert script.main(["--checkpoint", str(checkpoints["seq2seq"])]) == 2
    err = capsys.readouterr().err
    assert "<stdin>" in err and "line 2" in err


def test_reference_line_count_must_match(script, checkpoints, tmp_path, capsys):
    ref = tmp_path / "ref.en"
    ref.write_text("one\ntwo\nthree\n", encoding="utf-8")
    assert script.main(["--checkpoint", str(checkpoints["seq2seq"]), "--reference", str(ref), "Ein Hund."]) == 2
    err = capsys.readouterr().err
    assert str(ref) in err and "3 reference lines" in err and "1 lines" in err


@pytest.mark.parametrize("argv", [
    ["--checkpoint", "x.ckpt", "--beam", "2", "--nbest", "3", "a"],
    ["--checkpoint", "x.ckpt", "--beam", "0", "a"],
    ["--checkpoint", "x.ckpt", "--min-len", "-1", "a"],
    ["--checkpoint", "x.ckpt", "--device", "tpu", "a"],
    ["--checkpoint", "x.ckpt", "--input", "f.de", "a"],
    ["a"],
])
def test_bad_arguments_are_argparse_errors(script, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    assert exc.value.code == 2 and "usage:" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(script, checkpoints, capsys):
    assert script.main(["--checkpoint", str(checkpoints["seq2seq"]), "--device", "cuda", "Ein Hund."]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_checkpoint_loads_onto_another_device_with_its_tokenizer(checkpoints):
    """map_location moves the model only: the tokenizer's bytes are read on the CPU. Loading with map_location="cuda"
    failed on a GPU ("can't convert cuda:0 device type tensor to numpy"); the meta device fails the same way here."""
    model, tokenizer, _ = checkpoint.load(checkpoints["seq2seq"], map_location="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert tokenizer == checkpoint.load(checkpoints["seq2seq"])[1]
