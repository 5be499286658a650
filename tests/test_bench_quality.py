"""scripts/bench_quality.py end to end on a tiny budget: the HF peers and ours train on the same batches and land in
one table (needs the `bench` extra, which `scripts/setup.sh` installs)."""

from __future__ import annotations

import json

import pytest
from conftest import MULTI30K, REPO, load_script

pytest.importorskip("transformers")


def test_peers_and_ours_in_one_table(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = load_script("bench_quality")
    args = ["--recipe", str(REPO / "configs" / "debug.yaml"), "--data", str(MULTI30K), "--steps", "3",
            "--eval-limit", "6", "--beam", "2", "--out", str(tmp_path / "out"),
            "--systems", "marian", "gpt2", "encdec", "causal"]
    assert bench.main(args) == 0
    runs = [json.loads(line) for line in (tmp_path / "out" / "runs.jsonl").read_text().splitlines()]
    assert [r["system"] for r in runs] == ["marian", "gpt2", "encdec", "causal"]
    for r in runs:
        assert r["steps"] == 3 and r["tok_per_step"] > 0
        assert r["val"]["ppl"] > 1 and 0 <= r["test"]["bleu"] <= 100 and len(r["examples"]) == 3
    # peers batch without pad-to-multiple; the same token budget then holds at least as many real tokens
    assert runs[0]["tok_per_step"] >= runs[2]["tok_per_step"]
    table = capsys.readouterr().out
    assert table.count("| marian |") == 2 and "| causal |" in table  # per-run row, then the final table
    assert bench.main(["--report", str(tmp_path / "out")]) == 0
    assert "| gpt2 |" in capsys.readouterr().out


def test_bad_arguments_are_one_line(tmp_path, capsys):
    bench = load_script("bench_quality")
    with pytest.raises(SystemExit) as info:
        bench.main(["--recipe", str(tmp_path / "nope.yaml")])
    assert info.value.code == 2 and "nope.yaml" in capsys.readouterr().err
