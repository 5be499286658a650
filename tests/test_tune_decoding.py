"""scripts/tune_decoding.py: the length table and the teacher-forced eos report, on tiny trained checkpoints."""

from __future__ import annotations

import gzip
import re

import pytest
import torch
from conftest import load_script, read_pairs

from translator import checkpoint
from translator.tokenizer import BOS_ID, EOS_ID


@pytest.fixture(scope="module")
def tune():
    return load_script("tune_decoding")


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory):
    pairs = read_pairs("val", 12)
    root = tmp_path_factory.mktemp("val")
    for lang, col in (("de", 0), ("en", 1)):
        with gzip.open(root / f"val.{lang}.gz", "wt", encoding="utf-8") as f:
            f.writelines(p[col] + "\n" for p in pairs)
    return root, pairs


@pytest.mark.parametrize("arch", ["seq2seq", "decoder_only"])
def test_eos_placement_matches_one_sentence_at_a_time(tune, checkpoints, val_dir, arch):
    """Batched and padded, the eos statistics equal those of each pair run alone (no pad leaks into them)."""
    model, tokenizer, _ = checkpoint.load(checkpoints[arch])
    pairs = val_dir[1]
    sources, references = [p[0] for p in pairs], [p[1] for p in pairs]
    batched = tune.eos_placement(model, tokenizer, sources, references, batch_tokens=4096)
    end, early, argmax, n_early = [], 0.0, 0, 0
    with torch.inference_mode():
        for src, ref in zip(tokenizer.encode(sources), tokenizer.encode(references)):
            tgt = torch.tensor([[BOS_ID, *ref]])
            lp = model(torch.tensor([src]), tgt).float().log_softmax(-1)[0]  # (n + 1, V)
            end.append(lp[-1, EOS_ID].item())
            early += lp[:-1, EOS_ID].exp().sum().item()
            argmax += int((lp[:-1].argmax(-1) == EOS_ID).sum())
            n_early += len(ref)
    assert batched["end_logp"] == pytest.approx(sum(end) / len(end), abs=1e-4)
    assert batched["early_p"] == pytest.approx(early / n_early, rel=1e-3)
    assert batched["early_argmax"] == pytest.approx(argmax / n_early)


def test_table_has_the_length_shares_and_the_eos_line(tune, checkpoints, val_dir, capsys):
    root, pairs = val_dir
    assert tune.main(["--checkpoint", str(checkpoints["seq2seq"]), "--data", str(root), "--beam", "2",
                      "--penalty", "average", "--alpha", "1.0", "--early-stopping", "no", "--eos"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"eos under teacher forcing: mean log p at the end -?\d+\.\d{3}", out)
    row = [line for line in out.splitlines() if line.startswith("| no | average | 1.0 |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    short, long = (float(c.rstrip("%")) / 100 for c in cells[7:9])
    # each share is a count of the 12 sentences
    assert all(0 <= x <= 1 and abs(x * len(pairs) - round(x * len(pairs))) < 0.01 for x in (short, long))
    assert short + long <= 1


def test_missing_split_is_a_clear_error(tune, checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        tune.main(["--checkpoint", str(checkpoints["seq2seq"]), "--data", str(tmp_path)])
    assert exit_.value.code == 2
    assert "val.de.gz" in capsys.readouterr().err
