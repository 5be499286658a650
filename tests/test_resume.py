"""Crash and resume, end to end: `translator fit` subprocesses killed mid-run (SIGKILL, SIGTERM), resumed with
`--ckpt_path last`, against an uninterrupted run of the same command (docs/reliability.md).

One module fixture starts three runs of configs/debug.yaml at once (dropout on, a DataLoader worker, validation every
10 steps, last.ckpt every 5): the uninterrupted one, one SIGKILLed and one SIGTERMed as soon as the first last.ckpt
appears. Both are then resumed, with another `seed_everything`, so that equal losses show that the generator states
came from the checkpoint. Per-step training losses come from the CSVLogger (`log_every_n_steps 1`).
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
        "--model.init_args.dropout", "0.1", "--seed_everything", str(seed), "--trainer.max_steps", str(STEPS),
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
    deadline = time.monotonic() + 240
    while not last_ckpt(run_dir).is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint appeared:\n{(run_dir / 'log.txt').read_text()[-3000:]}")
        time.sleep(0.02)
    proc.send_signal(sig)


def losses(run_dir: Path, version: str = "") -> dict[int, float]:
    """{global step index: train/loss} from the CSVLogger of a run."""
    with open(run_dir / "checkpoints" / "debug" / version / "metrics.csv") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer) -> dict[str, tuple[Path, str]]:
    """{name: (run dir, log)} for "full", "killed", "resumed_kill", "terminated", "resumed_term"."""
    root = tmp_path_factory.mktemp("resume")
    tok = root / "tokenizer.model"
    tokenizer.save(tok)
    full = fit(root / "full", tok, 0)
    killed = fit(root / "killed", tok, 0)
    terminated = fit(root / "terminated", tok, 0)
    signal_after_first_checkpoint(killed, root / "killed", signal.SIGKILL)
    signal_after_first_checkpoint(terminated, root / "terminated", signal.SIGTERM)
    out = {"killed": (root / "killed", finish(killed, root / "killed", -signal.SIGKILL))}
    out["terminated"] = (root / "terminated", finish(terminated, root / "terminated", PREEMPTED_EXIT_CODE))
    out["saved_steps"] = {name: torch.load(last_ckpt(out[name][0]), weights_only=True)["global_step"]
                          for name in ("killed", "terminated")}
    resumed = {  # same directories, another seed; a logger version of their own so the curves stay apart
        name: fit(root / name, tok, 1, "--ckpt_path", "last", "--trainer.logger.init_args.version", "resumed")
        for name in ("killed", "terminated")
    }
    out["full"] = (root / "full", finish(full, root / "full"))
    for name, proc in resumed.items():
        out[f"resumed_{name[:4]}"] = (root / name, finish(proc, root / name))
    return out


@pytest.mark.parametrize("name", ["killed", "terminated"])
def test_resume_repeats_the_uninterrupted_loss_curve_exactly(runs, name):
    run_dir, log = runs[f"resumed_{name[:4]}"]
    saved = runs["saved_steps"][name]
    assert 0 < saved < STEPS
    assert "Restored all states from the checkpoint" in log and str(last_ckpt(run_dir)) in log
    full, resumed = losses(runs["full"][0]), losses(run_dir, "resumed")
    assert sorted(full) == list(range(STEPS))
    # every step after the checkpoint, each exactly once: no batch repeated or skipped, same dropout masks
    assert sorted(resumed) == list(range(saved, STEPS))
    assert {s: full[s] for s in resumed} == resumed
    final = torch.load(last_ckpt(run_dir), weights_only=True)
    assert final["global_step"] == STEPS
    assert final["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_seen"] == STEPS


def test_sigkill_loses_at_most_the_steps_since_the_last_periodic_checkpoint(runs):
    assert runs["saved_steps"]["killed"] % 5 == 0  # every_n_train_steps: 5 in configs/debug.yaml


def test_sigterm_saves_the_current_step_and_exits_143(runs):
    run_dir, log = runs["terminated"]
    step = runs["saved_steps"]["terminated"]
    assert f"SIGTERM: saved {last_ckpt(run_dir)} at step {step}; exiting with 143" in log
    assert "Traceback" not in log


def test_checkpoints_load_with_weights_only_and_hold_every_rank_generator(runs):
    for name in ("killed", "terminated", "full"):
        ckpt = torch.load(last_ckpt(runs[name][0]), weights_only=True)
        rng = ckpt["rng_states"]
        assert rng["torch"].shape == (1, 5056) and rng["torch"].dtype == torch.uint8
        assert ckpt["translator"]["arch"] == "seq2seq" and ckpt["optimizer_states"] and ckpt["lr_schedulers"]



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
