"""Crash and resume, end to end: `translator fit` subprocesses killed mid-run (SIGKILL, SIGTERM), resumed with
`--ckpt_path last`, against an uninterrupted run of the same command (docs/reliability.md).

One module fixture starts four runs of configs/debug.yaml at once (dropout on, a DataLoader worker, validation every
10 steps, last.ckpt every 5): the uninterrupted one, one SIGKILLed and one SIGTERMed as soon as the first last.ckpt
appears, and one SIGTERMed at the end of step 10, when a validation is due. The three are then resumed in their own
directory, with another `seed_everything`, so that equal losses show that the generator states came from the
checkpoint. Per-step training losses come from the run's metrics.csv
(`translator.callbacks.ResumableCSVLogger`, `log_every_n_steps 1`), which the resumed run continues.
"""

from __future__ import annotations

import csv
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from translator.callbacks import PREEMPTED_EXIT_CODE, RNG_KEY, RNGState
from translator.compare import read_training_log
from translator.logging_callbacks import ResumableCSVLogger

REPO = Path(__file__).resolve().parents[1]
MULTI30K = REPO.parent / "shared" / "data" / "multi30k"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
STEPS = 20
pytestmark = pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"Multi30k not found at {MULTI30K}")


def fit(run_dir: Path, tokenizer: Path, seed: int, *extra: str) -> subprocess.Popen:
    """`translator fit` on configs/debug.yaml in run_dir (its relative checkpoints/ paths land there)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "translator.cli", "fit", "--config", str(REPO / "configs" / "debug.yaml"),
        "--data.path", str(MULTI30K), "--data.tokenizer", str(tokenizer), "--data.num_workers", "1",
        "--model.init_args.config.dropout", "0.1", "--seed_everything", str(seed), "--trainer.max_steps", str(STEPS),
        "--trainer.log_every_n_steps", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra,
    ]
    with open(run_dir / "log.txt", "w") as log:  # a file, not a pipe: a full pipe would block the run
        return subprocess.Popen(cmd, cwd=run_dir, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, run_dir: Path, expect: int = 0) -> str:
    proc.wait(timeout=300)
    log = (run_dir / "log.txt").read_text()
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}:\n{log[-3000:]}"
    return log


def last_ckpt(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "debug" / "last.ckpt"


def signal_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path, sig: int) -> None:
    """Signal as soon as the first last.ckpt (step 5) appears; SIGKILL only once the log also holds step 4's row,
    which Lightning logs just after that checkpoint (a kill in between loses that one row; docs/reliability.md)."""
    deadline = time.monotonic() + 240
    while not last_ckpt(run_dir).is_file() or (
            sig == signal.SIGKILL and sum(bool(r["train/loss"]) for r in rows(run_dir)) < 5):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint appeared:\n{(run_dir / 'log.txt').read_text()[-3000:]}")
        time.sleep(0.02)
    proc.send_signal(sig)


def metrics_csv(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "debug" / "metrics.csv"


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(metrics_csv(run_dir), newline="") as f:
        return list(csv.DictReader(f))


def losses(run_dir: Path) -> dict[int, float]:
    """{global step index: train/loss} from the metrics.csv of a run."""
    return {int(row["step"]): float(row["train/loss"]) for row in rows(run_dir) if row["train/loss"]}


SIGTERM_AT = """
import os, signal
import lightning as L

class SigtermAt(L.Callback):  # a SIGTERM at the end of a given step, as if sent by a scheduler just then
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)
"""
INTERRUPTED = ("killed", "terminated", "terminated_at_val")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer) -> dict[str, tuple[Path, str]]:
    """{name: (run dir, log)} for "full", each of INTERRUPTED and "resumed_<name>"; "saved_steps" and
    "logged_before_resume" {name: ...} for the interrupted runs. "terminated_at_val" gets its SIGTERM at the end of
    step 10 (global_step 10), after which a validation is due."""
    root = tmp_path_factory.mktemp("resume")
    tok = root / "tokenizer.model"
    tokenizer.save(tok)
    (root / "terminated_at_val").mkdir()
    (root / "terminated_at_val" / "sigterm_at.py").write_text(SIGTERM_AT)  # importable: python -m puts cwd on the path
    procs = {
        "full": fit(root / "full", tok, 0),
        "killed": fit(root / "killed", tok, 0),
        "terminated": fit(root / "terminated", tok, 0),
        "terminated_at_val": fit(root / "terminated_at_val", tok, 0, "--trainer.callbacks+=sigterm_at.SigtermAt",
                                 "--trainer.callbacks.step", "10"),
    }
    signal_after_first_checkpoint(procs["killed"], root / "killed", signal.SIGKILL)
    signal_after_first_checkpoint(procs["terminated"], root / "terminated", signal.SIGTERM)
    expect = {"killed": -signal.SIGKILL, "terminated": PREEMPTED_EXIT_CODE, "terminated_at_val": PREEMPTED_EXIT_CODE}
    out: dict = {name: (root / name, finish(procs[name], root / name, code)) for name, code in expect.items()}
    out["saved_steps"] = {name: torch.load(last_ckpt(root / name), weights_only=True)["global_step"]
                          for name in INTERRUPTED}
    out["logged_before_resume"] = {name: rows(root / name) for name in INTERRUPTED}
    resumed = {name: fit(root / name, tok, 1, "--ckpt_path", "last") for name in INTERRUPTED}  # same dirs, other seed
    out["full"] = (root / "full", finish(procs["full"], root / "full"))
    for name, proc in resumed.items():
        out[f"resumed_{name}"] = (root / name, finish(proc, root / name))
    return out


@pytest.mark.parametrize("name", INTERRUPTED)
def test_resume_repeats_the_uninterrupted_loss_curve_exactly(runs, name):
    run_dir, log = runs[f"resumed_{name}"]
    saved = runs["saved_steps"][name]
    assert 0 < saved < STEPS
    assert "Restored all states from the checkpoint" in log and str(last_ckpt(run_dir)) in log
    full, resumed = losses(runs["full"][0]), losses(run_dir)
    assert sorted(full) == list(range(STEPS))
    # the steps after the checkpoint equal the uninterrupted run's: no batch repeated or skipped, same dropout masks
    assert {s: resumed[s] for s in range(saved, STEPS)} == {s: full[s] for s in range(saved, STEPS)}
    final = torch.load(last_ckpt(run_dir), weights_only=True)
    assert final["global_step"] == STEPS
    assert final["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_seen"] == STEPS


@pytest.mark.parametrize("name", INTERRUPTED)
def test_resumed_run_continues_the_log_as_one_curve(runs, name):
    """metrics.csv after the kill and the resume: every logged step exactly once, in order, as in the uninterrupted
    run, and compare.py reads the same curves from it."""
    run_dir = runs[name][0]
    full, got = rows(runs["full"][0]), rows(run_dir)
    train_steps = [int(r["step"]) for r in got if r["train/loss"]]
    assert train_steps == list(range(STEPS))
    assert losses(run_dir) == losses(runs["full"][0])
    val_steps = [int(r["step"]) for r in got if r["val/loss"]]
    assert val_steps == [int(r["step"]) for r in full if r["val/loss"]] == [9, 19]
    assert [int(r["step"]) for r in got] == sorted(int(r["step"]) for r in got)
    curves = [read_training_log(metrics_csv(d)).curves for d in (run_dir, runs["full"][0])]  # as compare.py reads it
    assert curves[0].keys() == curves[1].keys() and "val/loss" in curves[0]
    assert all([s for s, _ in curves[0][k]] == [s for s, _ in curves[1][k]] for k in curves[0])
    # before the resume, the log held every step up to the checkpoint: on SIGTERM, the saved step's row too, and the
    # validation due after it (run before the exit, and not run again after the resume)
    saved = runs["saved_steps"][name]
    before = [int(r["step"]) for r in runs["logged_before_resume"][name] if r["train/loss"]]
    assert before[:saved] == list(range(saved))
    if name != "killed":
        assert before == list(range(saved))
    if name == "terminated_at_val":
        assert saved == 10 and [int(r["step"]) for r in runs["logged_before_resume"][name] if r["val/loss"]] == [9]


def test_sigkill_loses_at_most_the_steps_since_the_last_periodic_checkpoint(runs):
    assert runs["saved_steps"]["killed"] % 5 == 0  # every_n_train_steps: 5 in configs/debug.yaml


@pytest.mark.parametrize("name", ["terminated", "terminated_at_val"])
def test_sigterm_saves_the_current_step_and_exits_143(runs, name):
    run_dir, log = runs[name]
    step = runs["saved_steps"][name]
    assert f"SIGTERM: saved {last_ckpt(run_dir)} at step {step}; exiting with 143" in log
    assert "Traceback" not in log


def test_checkpoints_load_with_weights_only_and_hold_every_rank_generator(runs):
    for name in (*INTERRUPTED, "full"):
        ckpt = torch.load(last_ckpt(runs[name][0]), weights_only=True)
        rng = ckpt["rng_states"]
        assert rng["torch"].shape == (1, 5056) and rng["torch"].dtype == torch.uint8
        assert ckpt["translator"]["arch"] == "seq2seq" and ckpt["optimizer_states"] and ckpt["lr_schedulers"]



def test_csv_logger_keeps_and_extends_an_existing_log(tmp_path):
    """A second logger on the same directory (a resumed run, `translator validate`) keeps the rows and adds its own,
    new columns included; keep_rows_before(step) drops the rows from that step on."""
    first = ResumableCSVLogger(tmp_path, name="run", version="")
    for step in range(3):
        first.log_metrics({"train/loss": 3.0 - step}, step=step)  # each row written at once
    second = ResumableCSVLogger(tmp_path, name="run", version="")
    second.log_metrics({"val/loss": 0.5}, step=2)
    second.save()
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        assert [(r["step"], r["train/loss"], r["val/loss"]) for r in csv.DictReader(f)] == [
            ("0", "3.0", ""), ("1", "2.0", ""), ("2", "1.0", ""), ("2", "", "0.5")]
    ResumableCSVLogger(tmp_path, name="run", version="").keep_rows_before(1)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{"step": "0", "train/loss": "3.0", "val/loss": ""}]


@pytest.mark.parametrize("rank", [0, 1])
def test_rng_state_restores_torch_python_and_numpy(rank):
    """RNGState in-process: the states saved for this rank, drawn from, then restored at train start draw the same
    again. Rank 1 of 2 reads row 1 of the saved (world_size, n) tensors."""

    def trainer(world_size: int) -> SimpleNamespace:
        return SimpleNamespace(world_size=world_size, global_rank=rank if world_size > 1 else 0, is_global_zero=rank == 0,
                               strategy=SimpleNamespace(root_device=torch.device("cpu")))

    def draw():
        return torch.rand(3).tolist(), random.random(), random.gauss(0, 1), np.random.rand(), np.random.normal()

    random.gauss(0, 1), np.random.normal()  # leave a cached Gaussian in both, which the state must carry too
    mine: dict = {}
    RNGState().on_save_checkpoint(trainer(1), None, mine)
    first = draw()
    other: dict = {}
    RNGState().on_save_checkpoint(trainer(1), None, other)  # another rank's states: the ones after `first`
    rows = [other, mine] if rank == 1 else [mine, other]
    saved = {k: torch.cat([r[RNG_KEY][k] for r in rows]) for k in mine[RNG_KEY]}  # what all_gather makes of 2 ranks
    buffer = io.BytesIO()
    torch.save({RNG_KEY: saved}, buffer)
    buffer.seek(0)
    callback = RNGState()
    callback.on_load_checkpoint(trainer(2), None, torch.load(buffer, weights_only=True))
    callback.on_train_start(trainer(2), None)
    assert draw() == first
