"""Shared fixtures: real Multi30k pairs, a small joint SentencePiece tokenizer trained on them, and a tiny checkpoint
of each architecture trained by the real CLI."""

from __future__ import annotations

import gzip
import importlib.util
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from translator import module
from translator.tokenizer import Tokenizer, interleave

REPO = Path(__file__).resolve().parents[1]
MULTI30K = REPO.parent / "shared" / "data" / "multi30k"
# {arch: the class path that selects it, e.g. for --model.class_path}
MODULES = {arch: f"{cls.__module__}.{cls.__qualname__}" for arch, cls in module.MODULES.items()}
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package), for in-process `main(argv) -> exit code`."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def read_pairs(split: str, n: int) -> list[tuple[str, str]]:
    """The first n (German, English) pairs of a Multi30k split; skips the test when the data is missing."""
    de, en = MULTI30K / f"{split}.de.gz", MULTI30K / f"{split}.en.gz"
    if not (de.is_file() and en.is_file()):
        pytest.skip(f"Multi30k {split} data not found under {MULTI30K}")
    with gzip.open(de, "rt", encoding="utf-8") as f_de, gzip.open(en, "rt", encoding="utf-8") as f_en:
        return [(d.strip(), e.strip()) for d, e in itertools.islice(zip(f_de, f_en), n)]


@pytest.fixture(scope="session")
def train_pairs() -> list[tuple[str, str]]:
    return read_pairs("train", 3000)


@pytest.fixture(scope="session")
def tokenizer(train_pairs: list[tuple[str, str]]) -> Tokenizer:
    """A 1000-piece joint tokenizer (under a second to train)."""
    return Tokenizer.train(interleave(train_pairs), vocab_size=1000)


# Extra `translator fit` arguments per architecture. 20 steps of debug.yaml leave the decoder-only model emitting
# empty lines or one piece repeated, which would make the equalities of the translation tests nearly vacuous; 300
# steps at a higher learning rate (about 10 s more, in parallel with the seq2seq run) give short real sentences
# ("Two dogs and a man in the snow."; val BLEU about 9).
FIT_ARGS = {
    "seq2seq": [],
    "decoder_only": ["--trainer.max_steps", "300", "--trainer.val_check_interval", "300",
                     "--model.init_args.lr", "1e-2", "--model.init_args.warmup_steps", "30"],
}


def fit_tiny(root: Path, tokenizer: Tokenizer, runs: dict[str, list[str]], steps: int = 20) -> dict[str, Path]:
    """{name: last.ckpt} from `translator fit --config configs/debug.yaml` plus each run's own arguments, `steps`
    steps each, all runs in parallel (one thread each), under `root`."""
    tokenizer.save(root / "tokenizer.model")
    procs = {}
    for name, extra in runs.items():
        run_dir = root / name
        run_dir.mkdir()
        cmd = [
            sys.executable, "-m", "translator.cli", "fit", "--config", str(REPO / "configs" / "debug.yaml"),
            "--data.path", str(MULTI30K),
            "--data.tokenizer", str(root / "tokenizer.model"),  # the shared test tokenizer: no training here
            "--trainer.max_steps", str(steps),
            "--trainer.default_root_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false",
            *extra,
        ]
        # cwd = run_dir: the config's relative output paths (checkpoints/..., tokenizer_dir) land in the tmp dir
        procs[name] = (run_dir, subprocess.Popen(cmd, cwd=run_dir, env=ENV, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True))
    found = {}
    for name, (run_dir, proc) in procs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"translator fit ({name}) failed:\n{log[-3000:]}"
        ckpts = sorted(run_dir.rglob("last.ckpt"))
        assert len(ckpts) == 1, f"expected one last.ckpt under {run_dir}, found {ckpts}\n{log[-2000:]}"
        found[name] = ckpts[0]
    return found


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """{arch: last.ckpt} from `translator fit` on configs/debug.yaml (`FIT_ARGS`), both runs in parallel."""
    runs = {arch: ["--model.class_path", class_path, *FIT_ARGS[arch]] for arch, class_path in MODULES.items()}
    return fit_tiny(tmp_path_factory.mktemp("fit"), tokenizer, runs)
