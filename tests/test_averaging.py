"""Weight averaging: `scripts/average_checkpoints.py` (the mean of N checkpoints, still self-contained) and EMA through
Lightning's `EMAWeightAveraging` callback (validation and the checkpoint use the averaged weights)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ENV, MULTI30K, REPO, load_script

from translator import checkpoint
from translator.data import TranslationDataModule
from translator.tokenizer import PAD_ID
from translator.translate import translate


@pytest.fixture(scope="module")
def average_script():
    return load_script("average_checkpoints")


def shifted_copy(src: Path, dst: Path, shift: float, step: int) -> None:
    """A copy of checkpoint `src` whose floating weights are moved by `shift`, saved as training step `step`."""
    ckpt = torch.load(src, weights_only=True)
    ckpt["state_dict"] = {k: v + shift if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    ckpt["global_step"] = step
    torch.save(ckpt, dst)


def test_average_is_the_mean_and_stays_self_contained(checkpoints, average_script, tmp_path, capsys):
    src = checkpoints["seq2seq"]
    paths = [tmp_path / f"step{i}.ckpt" for i in range(3)]
    for i, path in enumerate(paths):  # weights w + 0, w + 1, w + 5 at steps 100, 200, 300
        shifted_copy(src, path, (0.0, 1.0, 5.0)[i], 100 * (i + 1))
    out = tmp_path / "avg.ckpt"
    assert average_script.main([*map(str, reversed(paths)), "--last", "2", "--output", str(out)]) == 0
    assert "steps 200, 300" in capsys.readouterr().out  # the two newest, whatever the argument order
    original = torch.load(src, weights_only=True)["state_dict"]
    averaged = torch.load(out, weights_only=True)
    assert "optimizer_states" not in averaged
    for name, tensor in original.items():
        expected = tensor + 3.0 if tensor.is_floating_point() else tensor  # mean of +1 and +5
        torch.testing.assert_close(averaged["state_dict"][name], expected)
    model, tokenizer, meta = checkpoint.load(out)  # weights_only=True inside
    assert meta["averaged"] == [str(paths[1]), str(paths[2])]
    assert translate(model, tokenizer, ["Ein Hund läuft."], beam=2)[0][0].text is not None


def test_average_refuses_checkpoints_of_different_models(checkpoints, average_script, tmp_path, capsys):
    out = tmp_path / "avg.ckpt"
    code = average_script.main([str(checkpoints["seq2seq"]), str(checkpoints["decoder_only"]), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "another model" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert average_script.main([str(text), "-o", str(out)]) == 2
    assert str(text) in capsys.readouterr().err


def test_ema_weights_are_validated_and_saved(tokenizer, tmp_path):
    """With EMAWeightAveraging, the logged val/loss is that of the averaged weights, and those are the checkpoint's."""
    tokenizer.save(tmp_path / "tok.model")
    common = ["--config", str(REPO / "configs" / "debug.yaml"), "--data.path", str(MULTI30K),
              "--data.tokenizer", str(tmp_path / "tok.model"), "--trainer.enable_progress_bar", "false"]
    fit = [sys.executable, "-m", "translator.cli", "fit", *common,
           "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging", "--trainer.callbacks.decay", "0.5"]
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(fit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "checkpoints" / "debug" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ema, raw = ckpt["state_dict"], ckpt["current_model_state"]
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)  # the average differs from the current weights
    model, _, _ = checkpoint.load(last)
    torch.testing.assert_close(model.lm_head.weight, ema["model.lm_head.weight"])
    # val/loss logged at the last step (20) == a plain validation of the checkpoint's state_dict (no callback)
    with open(tmp_path / "checkpoints" / "debug" / "metrics.csv") as f:
        logged = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")][-1]
    dm = TranslationDataModule(path=str(MULTI30K), val_split="val", tokenizer=str(tmp_path / "tok.model"),
                               vocab_size=1000, max_tokens=2048, max_len=64, num_workers=0, limit_val_pairs=64)
    dm.setup("validate")
    nll, count = 0.0, 0
    with torch.inference_mode():
        for batch in dm.val_dataloader():
            logits = model(batch["src"], batch["tgt"][:, :-1])
            gold = batch["tgt"][:, 1:]
            nll += float(F.cross_entropy(logits.flatten(0, 1), gold.flatten(), ignore_index=PAD_ID, reduction="sum"))
            count += int((gold != PAD_ID).sum())
    assert abs(nll / count - logged) < 1e-4


def test_best_of_finds_the_monitored_checkpoint_even_after_a_move(tmp_path):
    """checkpoint.best_of reads the best path from last.ckpt's ModelCheckpoint state (the one with a monitor), also
    when the run directory was moved; without one it is last.ckpt itself."""
    import torch

    from translator.checkpoint import best_of

    run = tmp_path / "moved"
    run.mkdir()
    callbacks = {
        "ModelCheckpoint{'monitor': None}": {"monitor": None, "best_model_path": ""},
        "ModelCheckpoint{'monitor': 'val/loss'}": {"monitor": "val/loss",
                                                   "best_model_path": "/elsewhere/epoch=0-step=1000.ckpt"},
    }
    torch.save({"translator": {}, "state_dict": {}, "global_step": 1000, "callbacks": callbacks},
               run / "epoch=0-step=1000.ckpt")
    torch.save({"translator": {}, "state_dict": {}, "global_step": 1000, "callbacks": callbacks}, run / "last.ckpt")
    assert best_of(run / "last.ckpt") == run / "epoch=0-step=1000.ckpt"
    torch.save({"translator": {}, "state_dict": {}, "callbacks": {k: v for k, v in callbacks.items() if "None" in k}},
               run / "last.ckpt")
    assert best_of(run / "last.ckpt") == run / "last.ckpt"


def test_best_of_finds_a_best_saved_after_last(tmp_path):
    """last.ckpt is written before its step's validation: when that validation saves a new best (and deletes the old
    one), last.ckpt names a file that is gone. best_of then takes the newest checkpoint that names itself as best."""
    import torch

    from translator.checkpoint import best_of

    def save(path, step, best):
        state = {"monitor": "val/loss", "best_model_path": str(tmp_path / best)}
        torch.save({"translator": {}, "state_dict": {}, "global_step": step,
                    "callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": state}}, path)

    save(tmp_path / "last.ckpt", 1000, "best-step=800.ckpt")  # deleted when best-step=1000 was saved
    save(tmp_path / "best-step=1000.ckpt", 1000, "best-step=1000.ckpt")
    save(tmp_path / "best-step=600.ckpt", 600, "best-step=600.ckpt")  # an older best (e.g. a copied run's)
    save(tmp_path / "other.ckpt", 1200, "best-step=1000.ckpt")  # names another file: not a best
    assert best_of(tmp_path / "last.ckpt") == tmp_path / "best-step=1000.ckpt"


def test_best_of_a_copied_run_that_continued_is_its_best_scored_checkpoint(tmp_path, caplog):
    """A run copied to another folder and continued: its periodic last.ckpt of step 1400, written before that step's
    validation, still names the original folder's best of step 1000, a file that exists there. Resumed in another
    folder, Lightning forgot the old scores and saved step 1200 as a "best" though it was worse. The best is the
    checkpoint beside last.ckpt with the best score of those that name themselves: step 1400, else the copied 1000.
    A checkpoint that cannot be read is skipped, and the warning names it; a best saved in another folder only is
    found there."""
    import torch

    from translator.checkpoint import best_of

    def save(path, step, best, score=None):
        state = {"monitor": "val/loss", "best_model_path": str(best),
                 "best_model_score": None if score is None else torch.tensor(score)}
        key = "ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min', 'every_n_train_steps': 0}"
        torch.save({"translator": {}, "state_dict": {}, "global_step": step, "callbacks": {key: state}}, path)

    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir(), copy.mkdir()
    save(original / "best-step=1000.ckpt", 1000, original / "best-step=1000.ckpt", 2.0)
    save(copy / "best-step=1000.ckpt", 1000, original / "best-step=1000.ckpt", 2.0)  # copied: names the original
    save(copy / "best-step=1200.ckpt", 1200, copy / "best-step=1200.ckpt", 2.1)  # the forced first "best"
    save(copy / "last.ckpt", 1400, copy / "best-step=1200.ckpt", 2.1)
    save(copy / "best-step=1400.ckpt", 1400, copy / "best-step=1400.ckpt", 1.9)
    (copy / "partial.ckpt").write_bytes(b"PK\x03\x04 cut short")
    assert best_of(copy / "last.ckpt") == copy / "best-step=1400.ckpt"
    assert "partial.ckpt" in caplog.text
    (copy / "best-step=1400.ckpt").unlink()
    assert best_of(copy / "last.ckpt") == copy / "best-step=1000.ckpt"
    for path in copy.glob("best-*.ckpt"):
        path.unlink()
    save(copy / "last.ckpt", 1400, original / "best-step=1000.ckpt", 2.0)  # its best only in the original folder
    assert best_of(copy / "last.ckpt") == original / "best-step=1000.ckpt"
