"""`translator predict`: the CLI translates a file into one line per input line, in input order, with the same
translations as `translator.translate.translate` for the same checkpoint and beam, on 1 process or 2 (DDP, gloo).

Checkpoints: the session fixture `checkpoints` (conftest.py, configs/debug.yaml briefly trained per architecture). The CLI
runs in-process through `translator.cli.main(args)` from a tmp dir (its relative output paths land there), except the
DDP run, which is a subprocess that Lightning relaunches once per rank.
"""

from __future__ import annotations

import gzip
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ENV, MODULES, MULTI30K, REPO

from translator import checkpoint, generate
from translator.cli import main
from translator.data import SourceBatches, load_sources
from translator.module import TranslationModule
from translator.tokenizer import Tokenizer, interleave
from translator.translate import one_line, translate

pytestmark = pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"Multi30k not found at {MULTI30K}")

DEBUG = str(REPO / "configs" / "debug.yaml")
MAX_LEN, MAX_TOKENS, BEAM = 64, 2048, 3  # debug.yaml's max_len and max_tokens; a beam other than its test_beam_size
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
LONG_LINE = 31  # 1-based: the line over max_len tokens


def source_lines() -> list[str]:
    """28 test sentences, an empty and a blank line, a line far over max_len tokens, two more sentences."""
    with gzip.open(MULTI30K / "test_2016_flickr.de.gz", "rt", encoding="utf-8") as f:
        real = [next(f).strip() for _ in range(30)]
    return [*real[:28], "", "   ", " ".join(["Zwei Hunde spielen im Schnee."] * 15), *real[28:]]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when sys.argv holds arguments besides `args`: here they are pytest's."""
    monkeypatch.setattr(sys, "argv", ["translator"])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    tokenizer.save(root / "tokenizer.model")
    (root / "in.de").write_text("".join(f"{line}\n" for line in source_lines()), encoding="utf-8")
    return {"tokenizer": root / "tokenizer.model", "input": root / "in.de"}


@pytest.fixture(scope="module")
def expected(checkpoints) -> dict[str, str]:
    """{arch: the output file's text}, from `translate()` on the same checkpoint, beam, budget and length limit."""
    out = {}
    for arch, path in checkpoints.items():
        model, tokenizer, _ = checkpoint.load(path)
        results = translate(model, tokenizer, source_lines(), beam=BEAM, batch_tokens=MAX_TOKENS,
                            max_input_tokens=MAX_LEN)
        out[arch] = "".join(f"{one_line(hyps[0].text)}\n" for hyps in results)
    return out


def predict_args(ckpt: Path, inputs: dict[str, Path], *extra: str) -> list[str]:
    return ["predict", "--config", DEBUG, "--data.path", str(MULTI30K), "--data.tokenizer", str(inputs["tokenizer"]),
            "--ckpt_path", str(ckpt), *QUIET, *extra]


def fails_cleanly(args: list[str], capsys) -> str:
    """Run `translator ARGS` in-process; assert exit 2 with one error line and no traceback; return that line."""
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err[-2000:]
    (line,) = [line for line in err.splitlines() if "error:" in line]
    return line


# ---- the CLI, end to end -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", MODULES)
def test_predict_writes_one_line_per_input_line_in_order(arch, checkpoints, inputs, expected, tmp_path, monkeypatch,
                                                         caplog):
    """Empty in, empty out; the over-long line truncated with a warning naming it; the translations equal
    `translate()`'s, line by line; `--model.test_beam_size` wins over the checkpoint's (debug.yaml's 2)."""
    seen: list[TranslationModule] = []
    monkeypatch.setattr(TranslationModule, "on_predict_end", lambda self: seen.append(self), raising=False)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "hyp.en"  # its directory is created
    with caplog.at_level(logging.WARNING, logger="translator.translate"):
        main(predict_args(checkpoints[arch], inputs, "--model.class_path", MODULES[arch], "--data.predict_path",
                          str(inputs["input"]), "--predict_output", str(out), "--model.test_beam_size", str(BEAM)))
    (module,) = seen
    assert module.hparams.test_beam_size == BEAM
    text = out.read_text(encoding="utf-8")
    lines = text.split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(source_lines())
    assert lines[28:30] == ["", ""]  # the empty and the blank line
    assert text == expected[arch]
    assert sum(line != "" for line in lines) == len(source_lines()) - 2  # a translation on every other line
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and f"line {LONG_LINE}:" in warnings[0] and "max_len" in warnings[0]
    assert not (tmp_path / "checkpoints" / "debug").exists()  # no logs, no config.yaml: predict writes the file only


def test_predict_takes_the_length_rule_from_the_command_line(checkpoints, inputs, tmp_path, monkeypatch):
    """`--model.length_penalty/penalty/early_stopping` reach every beam search of `translator predict` (the debug
    checkpoints never end a translation early, so the file alone could not tell the rules apart)."""
    calls: list[tuple] = []
    search = generate.beam_search

    def spy(model, src, beam_size, length_penalty, **kw):
        calls.append((beam_size, length_penalty, kw["penalty"], kw["early_stopping"]))
        return search(model, src, beam_size, length_penalty, **kw)

    monkeypatch.setattr(generate, "beam_search", spy)
    monkeypatch.chdir(tmp_path)
    main(predict_args(checkpoints["seq2seq"], inputs, "--model.class_path", MODULES["seq2seq"], "--data.predict_path",
                      str(inputs["input"]), "--predict_output", str(tmp_path / "hyp.en"), "--model.test_beam_size",
                      str(BEAM), "--model.length_penalty", "0.5", "--model.penalty", "gnmt",
                      "--model.early_stopping", "true"))
    assert calls and set(calls) == {(BEAM, 0.5, "gnmt", True)}


def test_ddp_predict_on_two_processes_writes_the_same_file(checkpoints, inputs, expected, tmp_path):
    """2 gloo ranks x 2 DataLoader workers: 4 shards of the lines, gathered and written by rank 0. The text equals
    `translate()`'s, which the 1-process CLI run equals too (test above)."""
    out = tmp_path / "hyp.en.gz"
    cmd = [sys.executable, "-m", "translator.cli", *predict_args(checkpoints["seq2seq"], inputs),
           "--data.predict_path", str(inputs["input"]), "--predict_output", str(out),
           "--model.test_beam_size", str(BEAM), "--data.num_workers", "2",
           "--trainer.devices", "2", "--trainer.strategy", "ddp"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Starting with 2 processes" in output and "distributed_backend=gloo" in output
    assert gzip.decompress(out.read_bytes()).decode("utf-8") == expected["seq2seq"]


def test_predict_defaults_to_the_source_side_of_the_test_split(checkpoints, inputs, tmp_path, monkeypatch):
    """Without --data.predict_path: `--data.test_split` of `--data.path`, blank records included. A configured logger
    is switched off: the training run's metrics.csv in the same directory stays as it was."""
    lines = source_lines()[:5] + [""]
    data = tmp_path / "data"
    data.mkdir()
    (data / "test.de").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    (data / "test.en").write_text("A.\n" * len(lines), encoding="utf-8")
    logs = tmp_path / "checkpoints" / "debug"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("step,val/loss\n10,5.0\n")
    monkeypatch.chdir(tmp_path)
    main(predict_args(checkpoints["seq2seq"], inputs, "--data.path", str(data), "--data.test_split", "test",
                      "--predict_output", "hyp.en"))
    model, tokenizer, _ = checkpoint.load(checkpoints["seq2seq"])
    beam = 2  # debug.yaml's test_beam_size
    want = [hyps[0].text for hyps in translate(model, tokenizer, lines, beam=beam, batch_tokens=MAX_TOKENS)]
    assert (tmp_path / "hyp.en").read_text(encoding="utf-8") == "".join(f"{t}\n" for t in want)
    assert want[-1] == "" and all(want[:-1])
    assert sorted(p.name for p in logs.iterdir()) == ["metrics.csv"]
    assert (logs / "metrics.csv").read_text() == "step,val/loss\n10,5.0\n"


# ---- errors: one line, exit 2 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", ["0", "1"])
def test_non_utf8_input_names_file_and_line(workers, checkpoints, inputs, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "latin1.de"
    bad.write_bytes("Ein Hund.\n\nGrüße aus Köln.\nEine Frau.\n".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    line = fails_cleanly(predict_args(checkpoints["seq2seq"], inputs, "--data.predict_path", str(bad),
                                      "--predict_output", "hyp.en", "--data.num_workers", workers), capsys)
    assert line == f"translator: error: {bad}:3: invalid UTF-8"
    assert not (tmp_path / "hyp.en").exists()


@pytest.mark.parametrize("drop, expected", [("--ckpt_path", "needs --ckpt_path"),
                                            ("--predict_output", "needs --predict_output")])
def test_predict_needs_a_checkpoint_and_an_output(drop, expected, checkpoints, inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = predict_args(checkpoints["seq2seq"], inputs, "--data.predict_path", str(inputs["input"]),
                        "--predict_output", "hyp.en")
    i = args.index(drop)
    line = fails_cleanly(args[:i] + args[i + 2:], capsys)
    assert line.startswith("translator: error: translator predict") and expected in line


def test_predict_output_is_an_argument_of_predict_only(inputs, capsys):
    """fit, validate and test (and the config.yaml fit saves) do not know --predict_output."""
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", DEBUG, "--predict_output", "hyp.en"])
    assert info.value.code == 2 and "--predict_output" in capsys.readouterr().err


def test_predict_checks_the_checkpoint_against_the_data_tokenizer(checkpoints, inputs, train_pairs, tmp_path, capsys,
                                                                  monkeypatch):
    small = tmp_path / "tok300.model"
    Tokenizer.train(interleave(train_pairs[:1000]), vocab_size=300).save(small)
    monkeypatch.chdir(tmp_path)
    args = predict_args(checkpoints["seq2seq"], inputs, "--data.predict_path", str(inputs["input"]),
                        "--predict_output", "hyp.en", "--data.tokenizer", str(small))
    line = fails_cleanly(args, capsys)
    assert "vocab size mismatch" in line and "tok300.model" in line


# ---- the dataset -------------------------------------------------------------------------------------------------
def test_source_batches_shard_every_line_once_within_the_budget(tokenizer, tmp_path):
    lines = source_lines()
    path = tmp_path / "in.de.gz"
    path.write_bytes(gzip.compress("".join(f"{line}\n" for line in lines).encode()))
    sources = load_sources(path)
    assert list(sources) == lines
    world, max_tokens = 3, 96
    seen, blank = [], []
    for rank in range(world):
        for batch in SourceBatches(sources, tokenizer, max_tokens=max_tokens, max_len=16, rank=rank, world_size=world):
            src, index = batch["src"], batch["index"]
            assert src.dtype == torch.long and src.size(0) == len(index)
            assert all(i % world == rank for i in index)
            if src.size(1) == 0:  # blank lines: nothing to decode
                blank += index
            else:
                assert src.numel() <= max_tokens and src.size(1) <= 16 and (src[:, 0] != 0).all()
            seen += index
    assert sorted(seen) == list(range(len(lines)))
    assert sorted(blank) == [i for i, line in enumerate(lines) if not line.strip()] == [28, 29]
