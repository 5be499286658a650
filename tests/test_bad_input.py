"""Bad inputs across data, CLI/config, checkpoints and translation: each ends in one clear line naming the offender
(file, line, argument) and exit status 2 without a traceback, or, where skipping is the documented behaviour, in a
skip counted in the log.

`translator` runs in-process through `translator.cli.main(args)` (an uncaught exception would fail the test, so
"exit 2" there means "no traceback"); a few run end to end as subprocesses, where stderr is checked for "Traceback".
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
from conftest import load_script, read_pairs

from translator.cli import main
from translator.data import TranslationDataModule
from translator.module import Seq2SeqModule
from translator.tokenizer import Tokenizer, interleave

REPO = Path(__file__).resolve().parents[1]
MULTI30K = REPO.parent / "shared" / "data" / "multi30k"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"Multi30k not found at {MULTI30K}")

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--trainer.logger", "false",
         "--trainer.num_sanity_val_steps", "0"]


def cli_args(subcommand: str, data: Path | str, tokenizer: Path, *extra: str) -> list[str]:
    return [subcommand, "--config", str(REPO / "configs" / "debug.yaml"), "--data.path", str(data),
            "--data.tokenizer", str(tokenizer), "--trainer.max_steps", "2", *QUIET, *extra]


def fails_cleanly(args: list[str], capsys) -> str:
    """Run `translator ARGS` in-process; assert exit 2 without a traceback; return the error line."""
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert lines, err[-2000:]
    return lines[-1]


def parallel_dir(root: Path, de: list[str] | bytes, en: list[str] | bytes, split: str = "train") -> Path:
    """A Multi30k-layout directory with the given train files and the real val split."""
    root.mkdir(parents=True, exist_ok=True)
    for lang, text in (("de", de), ("en", en)):
        data = text if isinstance(text, bytes) else "".join(f"{line}\n" for line in text).encode()
        (root / f"{split}.{lang}").write_bytes(data)
    for lang in ("de", "en"):
        shutil.copy(MULTI30K / f"val.{lang}.gz", root)
    return root


# ---- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when sys.argv holds arguments besides `args`: here they are pytest's."""
    monkeypatch.setattr(sys, "argv", ["translator"])


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return read_pairs("train", 40)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """The test tokenizer, a 2-step CLI checkpoint made with it, another 1000-piece and a 300-piece tokenizer."""
    root = tmp_path_factory.mktemp("bad_input")
    out = {"tokenizer": root / "tok1000.model", "other1000": root / "other1000.model", "tok300": root / "tok300.model"}
    tokenizer.save(out["tokenizer"])
    other = read_pairs("train", 6000)[3000:]
    Tokenizer.train(interleave(other), vocab_size=1000).save(out["other1000"])
    Tokenizer.train(interleave(other[:1000]), vocab_size=300).save(out["tok300"])
    with contextlib.chdir(root), mock.patch.object(sys, "argv", ["translator"]):
        main(cli_args("fit", MULTI30K, out["tokenizer"], "--trainer.limit_val_batches", "0"))
    out["ckpt"] = root / "checkpoints" / "debug" / "last.ckpt"
    return out


@pytest.fixture(scope="module")
def translate_script():
    return load_script("translate")


class Evil:
    """Unpickling this runs `Path(marker).touch()`: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"translator": {"arch": "seq2seq"}, "state_dict": {}, "payload": Evil(marker)}, path)
    return path


# ---- data --------------------------------------------------------------------------------------------------------
def mismatched_line_counts(root: Path, pairs) -> tuple[Path, list[str]]:
    return parallel_dir(root, [d for d, _ in pairs], [e for _, e in pairs[:-1]]), ["train.de has 40 lines", "train.en has 39"]


def missing_target_file(root: Path, pairs) -> tuple[Path, list[str]]:
    parallel_dir(root, [d for d, _ in pairs], [e for _, e in pairs])
    (root / "train.en").unlink()
    return root, ["train.de has no parallel file", "train.en.gz"]


def invalid_utf8(root: Path, pairs) -> tuple[Path, list[str]]:
    de = [d.encode() for d, _ in pairs]
    de[6] += b" \xff\xfe"  # latin-1 debris on line 7
    return parallel_dir(root, b"".join(line + b"\n" for line in de), [e for _, e in pairs]), ["train.de:7:", "invalid UTF-8"]


def empty_files(root: Path, pairs) -> tuple[Path, list[str]]:
    return parallel_dir(root, b"", b""), ["train.de", "no usable pairs"]


def json_without_a_key(root: Path, pairs) -> tuple[Path, list[str]]:
    parallel_dir(root, b"", b"")
    (root / "train.de").unlink(), (root / "train.en").unlink()
    (root / "train.jsonl").write_text('{"de": "Hallo.", "en": "Hello."}\n{"translation": {"de": "Nur Deutsch."}}\n')
    return root, ["train.jsonl:2", "no 'en' text"]


@pytest.mark.parametrize("make", [mismatched_line_counts, missing_target_file, invalid_utf8, empty_files, json_without_a_key])
def test_bad_data_is_one_line_naming_file_and_line(make, files, pairs, tmp_path, capsys, monkeypatch):
    root, expected = make(tmp_path / "data", pairs)
    monkeypatch.chdir(tmp_path)
    line = fails_cleanly(cli_args("fit", root, files["tokenizer"]), capsys)
    assert line.startswith("translator: error:") and all(s in line for s in expected), line


@pytest.mark.parametrize("make", [mismatched_line_counts, invalid_utf8, json_without_a_key])
def test_bad_data_found_while_training_the_tokenizer_is_a_data_error(make, files, pairs, tmp_path, capsys, monkeypatch):
    """No --data.tokenizer: prepare_data trains one on the train split, and the data's own error comes out, as one line,
    not wrapped in SentencePiece's "training failed ... INTERNAL ... At: data.py(...)"."""
    root, expected = make(tmp_path / "data", pairs)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([*cli_args("fit", root, files["tokenizer"]), "--data.tokenizer", "null"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err, err[-2000:]
    message = err[err.index("translator: error:") :]
    assert message.count("\n") == 1 and all(s in message for s in expected), message  # one line, the data's own
    assert "SentencePiece" not in message and not (tmp_path / "checkpoints" / "tokenizers").exists()


def test_missing_data_directory(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = fails_cleanly(cli_args("fit", tmp_path / "nowhere", files["tokenizer"]), capsys)
    assert str(tmp_path / "nowhere") in line


def test_wrong_language_code_names_the_files_looked_for(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = fails_cleanly(cli_args("fit", MULTI30K, files["tokenizer"], "--data.src_lang", "fr"), capsys)
    assert "train.fr" in line and "train.fr.gz" in line


def test_over_long_pairs_are_skipped_and_counted(files, pairs, tmp_path, caplog, monkeypatch):
    long = [(" ".join([d] * 12), " ".join([e] * 12)) for d, e in pairs[:3]]  # far over debug.yaml's max_len=64
    data = parallel_dir(tmp_path / "data", [d for d, _ in pairs + long], [e for _, e in pairs + long])
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="translator.data"):
        main(cli_args("fit", data, files["tokenizer"], "--trainer.limit_val_batches", "0"))
    assert "dropped 3 of 43 pairs over max_len=64" in caplog.text


# ---- CLI and config ----------------------------------------------------------------------------------------------
def test_unknown_argument_is_named(files, capsys):
    line = fails_cleanly(cli_args("fit", MULTI30K, files["tokenizer"], "--trainer.max_stepz", "3"), capsys)
    assert "--trainer.max_stepz" in line


def test_unknown_key_in_a_config_file_is_named(files, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    d_modle: 64\n")
    with pytest.raises(SystemExit) as info:
        main(cli_args("fit", MULTI30K, files["tokenizer"], "--config", str(bad)))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "d_modle" in err and "Traceback" not in err


def test_impossible_value_is_named(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = fails_cleanly(cli_args("fit", MULTI30K, files["tokenizer"], "--data.max_tokens", "10"), capsys)
    assert "max_tokens=10" in line


@pytest.mark.parametrize(
    "arg, value, expected",
    [("schedule", "linear", "schedule='linear'"), ("compile", "fast", "compile='fast'"),
     ("config.positions", "alibi", "positions='alibi'")],
)
def test_impossible_model_value_is_named(arg, value, expected, files, tmp_path, capsys, monkeypatch):
    """The module's own check, although jsonargparse re-raises it as a Union validation error."""
    monkeypatch.chdir(tmp_path)
    line = fails_cleanly(cli_args("fit", MULTI30K, files["tokenizer"], f"--model.init_args.{arg}", value), capsys)
    assert expected in line


def test_impossible_trainer_setting_is_named(files, tmp_path, capsys, monkeypatch):
    """Lightning's own check of the Trainer's arguments, as one line (it raised from deep inside the Trainer)."""
    monkeypatch.chdir(tmp_path)
    args = cli_args("fit", MULTI30K, files["tokenizer"], "--trainer.strategy", "fsdp", "--trainer.accelerator", "cpu")
    assert "requires a GPU accelerator" in fails_cleanly(args, capsys)


def test_missing_tokenizer_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = fails_cleanly(cli_args("fit", MULTI30K, tmp_path / "nope.model"), capsys)
    assert "nope.model" in line


def test_debug_env_keeps_the_traceback(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRANSLATOR_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="train.fr"):
        main(cli_args("fit", MULTI30K, files["tokenizer"], "--data.src_lang", "fr"))


# ---- checkpoints -------------------------------------------------------------------------------------------------
def test_checkpoint_of_another_vocab_size(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = fails_cleanly(cli_args("test", MULTI30K, files["tok300"], "--ckpt_path", str(files["ckpt"])), capsys)
    assert "vocab size mismatch" in line and "1000" in line and "300" in line and "tok300.model" in line


def test_checkpoint_of_another_tokenizer_of_the_same_size(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = fails_cleanly(cli_args("fit", MULTI30K, files["other1000"], "--ckpt_path", str(files["ckpt"])), capsys)
    assert "different tokenizer" in line and "other1000.model" in line


def test_module_refuses_a_model_built_for_another_vocab_size(files, tmp_path):
    """The Python API, where no CLI link keeps the sizes equal: the module's setup raises."""
    dm = TranslationDataModule(str(MULTI30K), val_split="val", tokenizer=str(files["tokenizer"]), num_workers=0)
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=True, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab size mismatch: the tokenizer has 1000 pieces .* vocab_size=500"):
        trainer.fit(Seq2SeqModule(preset="tiny", vocab_size=500), datamodule=dm)


def corrupt(path: Path, files: dict[str, Path]) -> tuple[Path, str]:
    path.write_bytes(files["ckpt"].read_bytes()[:3000])
    return path, "not a readable PyTorch checkpoint"


def foreign(path: Path, files: dict[str, Path]) -> tuple[Path, str]:
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 3}, path)
    return path, "not a translator checkpoint"


def missing(path: Path, files: dict[str, Path]) -> tuple[Path, str]:
    return path, "checkpoint not found"


def json_text(path: Path, files: dict[str, Path]) -> tuple[Path, str]:  # read as pickle opcodes, it looked unsafe
    path.write_text('{"model": {"lr": 0.003}, "steps": 20}\n', encoding="utf-8")
    return path, "not a PyTorch checkpoint (a text file"


def log_text(path: Path, files: dict[str, Path]) -> tuple[Path, str]:  # ... or corrupt ("KeyError: 101")
    path.write_text("hello: step 20, val/loss 5.1 – done\n", encoding="utf-8")
    return path, "not a PyTorch checkpoint (a text file"


def empty(path: Path, files: dict[str, Path]) -> tuple[Path, str]:
    path.write_bytes(b"")
    return path, "not a PyTorch checkpoint: the file is empty"


@pytest.mark.parametrize("make", [corrupt, foreign, missing, json_text, log_text, empty])
@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_bad_checkpoint_path(make, subcommand, files, tmp_path, capsys, monkeypatch):
    path, expected = make(tmp_path / f"{make.__name__}.ckpt", files)
    monkeypatch.chdir(tmp_path)
    line = fails_cleanly(cli_args(subcommand, MULTI30K, files["tokenizer"], "--ckpt_path", str(path)), capsys)
    assert str(path) in line and expected in line


def test_malicious_checkpoint_is_refused_by_the_cli(files, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    monkeypatch.chdir(tmp_path)
    line = fails_cleanly(cli_args("fit", MULTI30K, files["tokenizer"], "--ckpt_path", str(evil)), capsys)
    assert str(evil) in line and "refused to load" in line and not marker.exists()


def test_training_checkpoint_loads_with_weights_only(files):
    ckpt = torch.load(files["ckpt"], weights_only=True)
    assert {"state_dict", "optimizer_states", "loops", "callbacks", "translator", "rng_states"} <= set(ckpt)


# ---- translation -------------------------------------------------------------------------------------------------
def test_malicious_checkpoint_is_refused_by_translate_script(files, tmp_path, translate_script, capsys):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    assert translate_script.main(["--checkpoint", str(evil), "Ein Hund."]) == 2
    err = capsys.readouterr().err
    assert str(evil) in err and "refused to load" in err and "Traceback" not in err and not marker.exists()


def test_text_file_as_checkpoint_is_named_as_such_by_translate_script(files, tmp_path, translate_script, capsys):
    path, expected = json_text(tmp_path / "config.ckpt", files)
    assert translate_script.main(["--checkpoint", str(path), "Ein Hund."]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {expected}" in err and "pickled" not in err and len(err.strip().splitlines()) == 1


def test_empty_input_translates_to_empty_output(files, tmp_path, translate_script, capsys):
    empty = tmp_path / "empty.de"
    empty.write_bytes(b"")
    assert translate_script.main(["--checkpoint", str(files["ckpt"]), "--input", str(empty)]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "Traceback" not in out.err


# ---- end to end: the real console entry points, as subprocesses ------------------------------------------------
def test_subprocesses_exit_2_with_one_line_and_no_traceback(files, pairs, tmp_path):
    """A data error raised inside Lightning's fit loop; a malicious checkpoint given to scripts/translate.py."""
    data = parallel_dir(tmp_path / "data", [d for d, _ in pairs], [e for _, e in pairs[:-1]])
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    cli = [sys.executable, "-m", "translator.cli"]
    commands = {
        "fit with bad data": (cli + cli_args("fit", data, files["tokenizer"]), "train.de has 40 lines"),
        "translate.py with malicious ckpt": ([sys.executable, str(REPO / "scripts" / "translate.py"), "--checkpoint",
                                              str(evil), "Ein Hund."], "refused to load"),
    }
    procs = {name: subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, (cmd, _) in commands.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert proc.returncode == 2 and "Traceback" not in err, f"{name}: exit {proc.returncode}\n{err[-3000:]}"
        assert len(errors) == 1 and commands[name][1] in errors[0], f"{name}:\n{err[-3000:]}"
    assert not marker.exists()
