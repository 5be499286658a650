"""`translator.compare` and `scripts/compare.py`, on checkpoints trained by the real CLI.

One session fixture runs `translator fit --config configs/debug.yaml` in-process (one import of Lightning) three
times on a small Multi30k subset written to a temporary directory: a Seq2SeqModule and a DecoderOnlyModule with the
same data config (so the second reuses the tokenizer file the first trained, in a temporary `tokenizer_dir`), each
logging its metrics.csv next to its checkpoints, and a third run with another vocabulary size (another tokenizer).
The script's `main()` is called in-process; it returns the exit code.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script
from sacrebleu.significance import PairedTest, _compute_p_value

from translator import checkpoint
from translator.compare import CompareError, arm_of, perplexity, read_testset
from translator.report import curve_table, plot_curves
from translator.significance import bootstrap_arms, paired_bootstrap
from translator.training_log import read_training_log, seed_band

REPO = Path(__file__).resolve().parents[1]
MULTI30K = REPO.parent / "shared" / "data" / "multi30k"
pytestmark = pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"Multi30k not found at {MULTI30K}")
SIZES = {"train": 2000, "val": 64, "test": 50}


def _write_subset(data: Path) -> None:
    """The first pairs of each split, as plain parallel files `{split}.de` / `{split}.en`."""
    data.mkdir()
    for split, n in SIZES.items():
        source = "test_2016_flickr" if split == "test" else split
        for lang in ("de", "en"):
            with gzip.open(MULTI30K / f"{source}.{lang}.gz", "rt", encoding="utf-8") as f:
                (data / f"{split}.{lang}").write_text("".join(itertools.islice(f, n)), encoding="utf-8")


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """{run: last.ckpt} for `encdec`, `decoder_only` (30 steps, shared tokenizer) and `vocab800` (5 steps)."""
    from translator.cli import main as translator_cli

    root = tmp_path_factory.mktemp("compare_runs")
    _write_subset(root / "data")

    def fit(name: str, steps: int, val_every: int, *extra: str) -> Path:
        """Run in root/name: the config's relative outputs (CSVLogger save_dir/name and the ModelCheckpoint
        dirpaths, checkpoints/debug) land there, side by side, whatever callbacks debug.yaml lists."""
        run = root / name
        run.mkdir()
        cwd = os.getcwd()
        os.chdir(run)
        try:
            translator_cli([
                "fit", "--config", str(REPO / "configs" / "debug.yaml"),
                "--data.path", str(root / "data"), "--data.test_split", "test",
                "--data.tokenizer_dir", str(root / "tokenizers"),  # shared: the second run reuses the first's file
                "--model.init_args.bleu_sentences", "8", "--trainer.num_sanity_val_steps", "0",
                "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(val_every),
                "--trainer.log_every_n_steps", "5",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                *extra,
            ])
        finally:
            os.chdir(cwd)
        ckpts = sorted(run.rglob("last.ckpt")) or sorted(run.rglob("*.ckpt"))
        assert ckpts and (ckpts[0].parent / "metrics.csv").is_file(), sorted(run.rglob("*"))
        return ckpts[0]

    found = {
        "encdec": fit("encdec", 30, 15),
        "decoder_only": fit("decoder_only", 30, 15, "--model.class_path", "translator.module.DecoderOnlyModule"),
        "vocab800": fit("vocab800", 5, 5, "--data.vocab_size", "800"),
    }
    assert len(list((root / "tokenizers").glob("*.model"))) == 2  # the 1000-piece one was trained once, reused
    return found


@pytest.fixture(scope="session")
def script():
    return load_script("compare")


def data_dir(runs: dict[str, Path]) -> Path:
    """root/data, the subset written by `runs` (the checkpoints sit a few levels below root)."""
    return next(p / "data" for p in runs["encdec"].parents if (p / "data" / "test.de").is_file())


def eval_set_args(runs: dict[str, Path]) -> list[str]:
    data = data_dir(runs)
    return ["--src", str(data / "test.de"), "--ref", str(data / "test.en")]


@pytest.fixture(scope="session")
def report(runs, script, tmp_path_factory) -> tuple[Path, dict, str]:
    """(out dir, report.json, stdout) of compare.py on encdec vs decoder_only, greedy (30-step models produce only
    empty strings under beam search, which would make every score 0)."""
    out = tmp_path_factory.mktemp("compare_out")
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = script.main(["--checkpoints", str(runs["encdec"]), str(runs["decoder_only"]), *eval_set_args(runs),
                          "--beam", "1", "--bootstrap", "300", "--out", str(out)])
    assert rc == 0
    return out, json.loads((out / "report.json").read_text()), buffer.getvalue()


# ---- end to end --------------------------------------------------------------------------------------------------
def test_compare_writes_every_output_with_every_column(report):
    out, data, stdout = report
    for name in ("report.md", "report.json", "curves_step.png", "curves_time.png", "bleu_by_length_test.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = ["model", "testset", "parameters", "non_embedding_parameters", "steps", "bleu", "bleu_bs", "chrf",
                "chrf_bs", "ppl", "sent_per_s", "train_tok_per_s", "train_wall_s"]
    assert data["columns"] == expected
    assert [r["model"] for r in data["rows"]] == ["encdec", "decoder_only"]
    for row in data["rows"]:
        assert row["sentences"] == SIZES["test"] and row["steps"] == 30
        assert 0 < row["non_embedding_parameters"] < row["parameters"]
        assert 1 < row["ppl"] < 1000 and row["sent_per_s"] > 0 and row["train_tok_per_s"] > 0
        assert row["train_wall_s"] > 0
        assert [b["bucket"] for b in row["bleu_by_length"]] == ["1-10", "11-15", "16-20", "21-25", "26+"]
        assert sum(b["sentences"] for b in row["bleu_by_length"]) == SIZES["test"]
    base, other = data["rows"]
    assert base["bleu_bs"]["delta"] is None and other["chrf_bs"]["p_value"] is not None
    assert other["chrf_bs"]["delta"] == pytest.approx(other["chrf"] - base["chrf"])
    assert "bs:300" in data["signatures"]["paired_bs"]["BLEU"] and "nrefs:1" in data["signatures"]["chrF"]
    md = (out / "report.md").read_text()
    assert "| encdec | test |" in md and "![validation curves](curves_step.png)" in md and "no time column" not in md
    assert {k: data["settings"][k] for k in ("length_penalty", "penalty", "early_stopping")} == {
        "length_penalty": 1.0, "penalty": "average", "early_stopping": False}  # the defaults of translator.generate
    assert "length penalty 1.0 (average, no early stopping)" in md
    assert stdout.startswith("| model | test set | params |") and stdout.count("\n") == 4  # header, rule, 2 rows


def test_source_attention_table_for_the_decoder_only_checkpoints(runs, script, tmp_path, capsys):
    rc = script.main(["--checkpoints", str(runs["encdec"]), str(runs["decoder_only"]), *eval_set_args(runs),
                      "--beam", "1", "--bootstrap", "0", "--source-attention", "6", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "source_attention.json").read_text())
    assert data["pairs"] == 6 and list(data["checkpoints"]) == [str(runs["decoder_only"])]  # not the enc-dec
    rows = data["checkpoints"][str(runs["decoder_only"])]
    assert rows[0]["positions"] == "0-4" and all(0 < r["source_mass"] <= 1 for r in rows)
    assert "| attention on the source |" in capsys.readouterr().out


def test_perplexity_is_the_training_definition(runs):
    """Our teacher-forced perplexity on the validation pairs equals the `val/ppl` training logged for this model."""
    model, tokenizer, _ = checkpoint.load(runs["encdec"])
    data = data_dir(runs)
    val = read_testset("val", data / "val.de", data / "val.en")
    # the DataModule's validation cuts pairs over max_len=64 tokens (debug.yaml) to 64; so must we, to score the same
    assert max(len(ids) for ids in tokenizer.encode(val.sources + val.references)) > 64  # one long pair: it matters
    logged = read_training_log(runs["encdec"].with_name("metrics.csv")).curves["val/ppl"][-1][1]
    ppl = perplexity(model, tokenizer, val.sources, val.references, batch_tokens=300, max_len=64)  # several batches
    assert ppl == pytest.approx(logged, rel=1e-5)


# ---- significance ------------------------------------------------------------------------------------------------
def test_bootstrap_of_a_system_against_itself(runs):
    refs = read_testset(None, *eval_set_args(runs)[1::2]).references
    hyps = _hypotheses(runs, "decoder_only")
    _, results = paired_bootstrap(refs, [("a", hyps), ("b", list(hyps))], n_samples=1000)
    for metric in ("BLEU", "chrF"):
        r = results["b"][metric]
        assert r.p_value >= 0.9 and r.delta == 0
        assert r.delta_ci[0] <= 0 <= r.delta_ci[1]
    # why the correction: sacreBLEU alone calls identical systems significant (strict > on a zero statistic)
    _, raw = PairedTest([("a", hyps), ("b", hyps)], _metrics(), [refs], test_type="bs", n_samples=1000)()
    assert raw["BLEU"][1].p_value < 0.01


def test_bootstrap_intervals_come_from_sacrebleus_resamples(runs):
    """For two different systems, sacreBLEU's own p-value is what its formula gives on our resampled differences,
    so the interval and the p-value describe the same resamples."""
    refs = read_testset(None, *eval_set_args(runs)[1::2]).references
    a, b = _hypotheses(runs, "encdec"), _hypotheses(runs, "decoder_only")
    assert a != b
    _, results = paired_bootstrap(refs, [("a", a), ("b", b)], n_samples=500)
    r = results["b"]["chrF"]
    diffs = np.abs(r.deltas)
    assert r.p_value == pytest.approx(_compute_p_value(diffs - diffs.mean(), abs(r.delta)))
    assert r.delta_ci[0] <= np.median(r.deltas) <= r.delta_ci[1]
    _, raw = PairedTest([("a", a), ("b", b)], _metrics(), [refs], test_type="bs", n_samples=500)()
    for metric, key in (("BLEU", "BLEU"), ("chrF", "chrF2")):  # sacreBLEU's own numbers, one run per system
        for ours, theirs in zip((results["a"][metric], results["b"][metric]), raw[key]):
            assert (ours.score, ours.mean, ours.ci) == pytest.approx((theirs.score, theirs.mean, theirs.ci), rel=1e-12)
        assert results["b"][metric].p_value == theirs.p_value


def test_an_arm_scores_the_mean_of_its_seeds_on_every_resample(runs):
    """Arms [a, b] against [a]: the arm's score is the mean of its runs' scores, on the full test set and on every
    resample, so its resampled differences are half those of b against a."""
    refs = read_testset(None, *eval_set_args(runs)[1::2]).references
    a, b = _hypotheses(runs, "encdec"), _hypotheses(runs, "decoder_only")
    _, single = paired_bootstrap(refs, [("a", a), ("b", b)], n_samples=200)
    _, pooled = bootstrap_arms(refs, [("a", [a]), ("ab", [a, b])], n_samples=200)
    for metric in ("BLEU", "chrF"):
        one, two = single["b"][metric], pooled["ab"][metric]
        assert two.score == pytest.approx((one.score + pooled["a"][metric].score) / 2)
        assert two.delta == pytest.approx(one.delta / 2)
        np.testing.assert_allclose(two.deltas, one.deltas / 2, rtol=1e-6, atol=1e-6)  # float32, as sacreBLEU


_HYPS: dict[str, list[str]] = {}


def _hypotheses(runs: dict[str, Path], name: str) -> list[str]:
    from translator.translate import translate

    if name not in _HYPS:
        model, tokenizer, _ = checkpoint.load(runs[name])
        sources = read_testset(None, *eval_set_args(runs)[1::2]).sources
        _HYPS[name] = [h[0].text for h in translate(model, tokenizer, sources, beam=1)]
    return _HYPS[name]


def _metrics():
    import sacrebleu

    return {"BLEU": sacrebleu.BLEU(), "chrF": sacrebleu.CHRF()}


# ---- errors and missing pieces -----------------------------------------------------------------------------------
def test_mismatched_tokenizers_are_refused_with_one_clear_line(runs, script, tmp_path, capsys):
    rc = script.main(["--checkpoints", str(runs["encdec"]), str(runs["vocab800"]), *eval_set_args(runs),
                      "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "different tokenizers" in err and "not comparable" in err and "800 pieces" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_missing_logs_leave_the_training_columns_out(runs, script, tmp_path, capsys):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(runs["encdec"], alone / "model.ckpt")
    rc = script.main(["--checkpoints", str(alone / "model.ckpt"), *eval_set_args(runs), "--beam", "1",
                      "--out", str(tmp_path / "out")])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "train_tok_per_s" not in data["columns"] and "train_wall_s" not in data["columns"]
    assert "bleu_bs" not in data["columns"]  # one checkpoint: nothing to test against
    assert not list((tmp_path / "out").glob("curves_*.png")) and (tmp_path / "out" / "report.md").is_file()
    assert "no metrics.csv" in (tmp_path / "out" / "report.md").read_text()
    assert "train tok/s" not in capsys.readouterr().out


def test_a_logged_time_column_gives_wall_time_and_time_curves(runs, tmp_path):
    """A metrics.csv with `train/elapsed_s` gives wall time and curves against time."""
    rows = list(csv.DictReader(runs["encdec"].with_name("metrics.csv").open()))
    with (tmp_path / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, [*rows[0], "train/elapsed_s"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "train/elapsed_s": float(r["step"]) * 2 if r["train/loss"] else ""})
    log = read_training_log(tmp_path / "metrics.csv")
    assert log.time_column == "train/elapsed_s" and log.wall_time_s == 2 * max(int(r["step"]) for r in rows
                                                                                 if r["train/loss"])
    assert log.seconds_at([10]) == [20.0]
    assert plot_curves({"run": [log]}, tmp_path / "curves_time.png", against="time")
    assert (tmp_path / "curves_time.png").stat().st_size > 0


def test_a_seed_suffix_names_the_arm():
    assert [arm_of(n) for n in ("encdec-seed0", "encdec_seed12", "runs/prefix_lm/seed3", "encdec", "seed1",
                                "encdec-seed", "a-seed1-seed2", "encdec-seed1x")] == [
        "encdec", "encdec", "runs/prefix_lm", "encdec", "seed1", "encdec-seed", "a-seed1", "encdec-seed1x"]


def test_seed_band_is_mean_min_and_max_over_the_runs(runs, tmp_path):
    """Two logs of one arm, the second's val/ppl 2 higher and stopped one validation earlier (early stopping)."""
    log = read_training_log(runs["encdec"].with_name("metrics.csv"))
    other = read_training_log(runs["encdec"].with_name("metrics.csv"))
    other.curves["val/ppl"] = [(step, v + 2) for step, v in log.curves["val/ppl"][:-1]]
    steps, mean, lo, hi = seed_band([log, other], "val/ppl")
    ppl = [v for _, v in log.curves["val/ppl"]]
    assert steps == [s for s, _ in log.curves["val/ppl"]] and len(steps) == 2
    assert mean == pytest.approx([ppl[0] + 1, ppl[1]]) and lo == ppl and hi == [ppl[0] + 2, ppl[1]]
    assert seed_band([log, other], "val/nothing") is None
    assert seed_band([log, other], "val/ppl", against="time")[0] == log.seconds_at(steps)  # both runs: the same times
    assert plot_curves({"arm": [log, other]}, tmp_path / "band.png")


def test_seeds_are_grouped_into_arms(runs, script, report, tmp_path, capsys):
    """Each checkpoint copied under two seed names: arms whose mean is the checkpoint's score with sd 0, and whose
    bootstrap is the two-checkpoint one of the `report` fixture (same sentences, same resamples); a third arm of two
    different runs has their mean and standard deviation."""
    copies = []
    for run, arm in (("encdec", "encdec"), ("encdec", "mixed"), ("decoder_only", "decoder_only"),
                     ("decoder_only", "mixed")):
        for seed in (0, 1) if arm != "mixed" else ((0,) if run == "encdec" else (1,)):
            folder = tmp_path / "runs" / f"{arm}-seed{seed}"
            folder.mkdir(parents=True)
            shutil.copy(runs[run], folder / "last.ckpt")
            shutil.copy(runs[run].with_name("metrics.csv"), folder / "metrics.csv")
            copies.append(str(folder / "last.ckpt"))
    out = tmp_path / "out"
    rc = script.main(["--checkpoints", *copies, *eval_set_args(runs), "--beam", "1", "--bootstrap", "300",
                      "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    data = json.loads((out / "report.json").read_text())
    single = {r["model"]: r for r in report[1]["rows"]}  # encdec and decoder_only, one run each
    assert data["arms"] == {"encdec": ["encdec-seed0", "encdec-seed1"], "mixed": ["mixed-seed0", "mixed-seed1"],
                            "decoder_only": ["decoder_only-seed0", "decoder_only-seed1"]}
    assert "bleu_bs" not in data["columns"]  # significance is arm against arm
    arms = {r["arm"]: r for r in data["arm_rows"]}
    for arm in ("encdec", "decoder_only"):
        for key in ("bleu", "chrf", "ppl"):
            assert arms[arm][key] == pytest.approx(single[arm][key]) and arms[arm][f"{key}_sd"] == 0
        assert arms[arm]["seeds"] == 2 and arms[arm]["bleu_by_length"] == [
            {**b, "bleu_sd": None if b["bleu"] is None else 0.0} for b in single[arm]["bleu_by_length"]]
    for key in ("bleu_bs", "chrf_bs"):
        ours, theirs = arms["decoder_only"][key], single["decoder_only"][key]
        assert ours.keys() == theirs.keys() and ours["p_value"] == theirs["p_value"]
        for field in ("score", "mean", "ci", "delta", "delta_ci"):
            assert ours[field] == pytest.approx(theirs[field]), field
        assert arms["encdec"][key]["delta"] is None
    both = [single["encdec"]["chrf"], single["decoder_only"]["chrf"]]
    assert arms["mixed"]["chrf"] == pytest.approx(np.mean(both))
    assert arms["mixed"]["chrf_sd"] == pytest.approx(np.std(both, ddof=1)) and arms["mixed"]["chrf_sd"] > 0
    p = arms["decoder_only"]["chrf_bs"]["p_value"]
    verdict = "**significant**" if p < 0.05 else "not significant"
    md = (out / "report.md").read_text()
    assert "## Arms (mean ± standard deviation over seeds)" in md and "| encdec | test | 2 |" in md
    delta = arms["decoder_only"]["chrf_bs"]["delta"]
    assert "- test: decoder_only vs encdec: BLEU" in md and f"chrF {delta:+.2f}, p={p:.3f}: {verdict}" in md
    assert "| arm | 1-10 (n=" in md and "![validation curves](curves_step.png)" in md
    assert (out / "curves_step.png").stat().st_size > 0 and (out / "bleu_by_length_test.png").stat().st_size > 0
    assert "| arm | test set | seeds |" in captured.out and captured.out.startswith("| model | test set |")


def test_curve_table_gives_each_arms_mean_and_sd_at_the_shared_steps():
    from translator.training_log import TrainingLog

    def run(*points):
        return TrainingLog("metrics.csv", curves={"val/ppl": list(points)})

    arms = {"a": [run((100, 10.0), (200, 6.0), (300, 5.0)), run((100, 12.0), (200, 8.0))],  # seed 2 stopped early
            "b": [run((100, 20.0), (200, 9.0), (300, 7.0), (400, 6.0))]}
    lines = curve_table(arms).splitlines()
    assert lines[0] == "| arm | step 100 | step 200 | step 300 |"  # step 400: arm a never got there
    assert lines[2] == f"| a | 11.00 ± {np.std([10, 12], ddof=1):.2f} | 7.00 ± {np.std([6, 8], ddof=1):.2f} | 5.00 |"
    assert lines[3] == "| b | 20.00 | 9.00 | 7.00 |"
    many = {"a": [run(*((s, 1.0) for s in range(1, 101)))]}  # at most `columns` steps, spread, first and last kept
    assert curve_table(many, columns=3).splitlines()[0] == "| arm | step 1 | step 51 | step 100 |"
    assert curve_table({"a": [run((1, 1.0))], "b": [run((2, 1.0))]}) is None


def test_testset_files_must_pair_up(tmp_path):
    (tmp_path / "a.de").write_text("Hallo\n")
    (tmp_path / "b.en").write_text("Hello\n")
    with pytest.raises(CompareError, match="same DIR and SPLIT"):
        read_testset(None, tmp_path / "a.de", tmp_path / "b.en")
    with pytest.raises(CompareError, match="file not found"):
        read_testset(None, tmp_path / "c.de", tmp_path / "c.en")
    (tmp_path / "a.en").write_text("Hello\nWorld\n")
    with pytest.raises(CompareError, match="line counts differ"):
        read_testset(None, tmp_path / "a.de", tmp_path / "a.en")
    ts = read_testset("mine", f"{MULTI30K}:val", limit=3)  # DATA:SPLIT, read by load_pairs
    assert ts.name == "mine" and len(ts.sources) == len(ts.references) == 3 and "val.de" in ts.where


def test_compare_architectures_quick_runs_the_whole_study(tmp_path):
    """scripts/compare_architectures.sh --quick: every arm for two seeds with the study's recipe (tiny widths, 4 steps),
    then compare.py's per-arm report; a second call keeps the finished runs, and bad arguments are named."""
    import subprocess
    import sys

    script = REPO / "scripts" / "compare_architectures.sh"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "study"

    def study(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script), "--quick", "--data", str(MULTI30K), "--out", str(out), *args],
                              env=env, capture_output=True, text=True, timeout=600)

    proc = study()
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [f"{arm}-seed{seed}" for seed in (0, 1) for arm in ("encdec", "causal", "prefix")]
    assert proc.stderr.count("training ") == 6
    report = json.loads((out / "report" / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == names
    assert {r["steps"] for r in report["rows"]} == {4}
    assert [(a["arm"], a["seeds"]) for a in report["arm_rows"]] == [("encdec", 2), ("causal", 2), ("prefix", 2)]
    for name in names:  # each run: its own seed, its arm's model, its command kept beside it
        run = out / "runs" / name
        meta = checkpoint.read(next((run / "checkpoints" / "run").glob("best*.ckpt")))[checkpoint.KEY]
        arm, seed = name.rsplit("-seed", 1)
        assert (run / "done").exists() and f"--seed_everything {seed} --data.seed {seed}" in (run / "command").read_text()
        assert meta["arch"] == ("seq2seq" if arm == "encdec" else "decoder_only")
        if arm != "encdec":
            assert meta["config"]["prefix_mode"] == {"causal": "causal", "prefix": "bidirectional"}[arm]
    assert "| encdec | test2016 | 2 |" in (out / "report" / "report.md").read_text()
    views = [sys.executable, str(REPO / "scripts" / "study_views.py")]
    compute = subprocess.run([*views, "compute", str(out / "runs"), "--data", str(MULTI30K)], env=env,
                             capture_output=True, text=True, timeout=300)
    assert compute.returncode == 0, compute.stderr[-3000:]
    table = [line for line in compute.stdout.splitlines() if line.startswith("| ")][1:]  # past the header
    assert [line.split(" | ")[:2] for line in table] == [["| encdec", "2"], ["| causal", "2"], ["| prefix", "2"]]
    assert "| 1.00x |" in table[0] and float(table[1].split(" | ")[2].rstrip("x")) > 1.2  # 7 layers over src + tgt
    attention = subprocess.run([*views, "attention", str(out / "runs" / "prefix-seed0"), "--pairs", "5",
                                "--data", str(MULTI30K)], env=env, capture_output=True, text=True, timeout=300)
    assert attention.returncode == 0 and "prefix-seed0: 0-4: " in attention.stdout, attention.stderr[-3000:]

    again = study("--arms", "encdec prefix-srcloss", "--seeds", "0")  # encdec-seed0 is done: only the new arm trains
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training encdec" not in again.stderr and again.stderr.count("training prefix-srcloss-seed0") == 1
    meta = checkpoint.read(out / "runs" / "prefix-srcloss-seed0" / "checkpoints" / "run" / "last.ckpt")[checkpoint.KEY]
    assert meta["config"]["source_loss"] == 0.5

    # a larger --steps carries a run that stopped at its step cap on from its last.ckpt; a run at the cap is kept
    longer = study("--arms", "encdec causal", "--seeds", "0", "--steps", "6")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert longer.stderr.count("training encdec-seed0 (resuming)") == longer.stderr.count("training causal-seed0") == 1
    assert checkpoint.read(out / "runs" / "encdec-seed0" / "checkpoints" / "run" / "last.ckpt")["global_step"] == 6
    assert "training" not in study("--arms", "encdec", "--seeds", "0", "--steps", "6").stderr

    for args, message in ((("--arms", "encdec transformer"), "unknown arm transformer"),
                          (("--seeds", "one"), "--seeds: one is not"), (("--recipe", "nope.yaml"), "--recipe: nope.yaml")):
        bad = study(*args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
