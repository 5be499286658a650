#!/usr/bin/env python
"""Beam-search length settings against BLEU and brevity on a validation split (tune on val, never on test).

    python scripts/tune_decoding.py --checkpoint checkpoints/quickstart/last.ckpt --data ../shared/data/multi30k \\
        --split val --penalty gnmt average --alpha 0.6 1.0 1.4 2.0

Prints one row per (early stopping, length penalty form, alpha): BLEU, chrF, brevity penalty and hypothesis/reference length ratio
(sacreBLEU 13a), so that the defaults in `translator.generate` can be chosen from measurements.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import sacrebleu
import torch

from translator import checkpoint
from translator.compare import read_testset
from translator.translate import translate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tune_decoding.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="../shared/data/multi30k", help="a directory of SPLIT.de.gz / SPLIT.en.gz")
    p.add_argument("--split", default="val")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--penalty", nargs="+", default=["gnmt", "average"], choices=["gnmt", "average"])
    p.add_argument("--alpha", nargs="+", type=float, default=[0.6, 1.0, 1.4, 2.0])
    p.add_argument("--early-stopping", nargs="+", default=["yes"], choices=["yes", "no"],
                   help="yes: a sentence ends with its beam-size-th finished hypothesis (fairseq); no: once no live "
                        "beam can beat the finished ones")
    p.add_argument("--batch-tokens", type=int, default=4096)
    args = p.parse_args(argv)
    if "test" in args.split:
        print(f"tune_decoding.py: warning: tuning on {args.split!r}; tune on a validation split", file=sys.stderr)
    try:
        model, tokenizer, _ = checkpoint.load(args.checkpoint)
        ts = read_testset(args.split, f"{args.data}/{args.split}.de.gz", f"{args.data}/{args.split}.en.gz")
    except ValueError as err:
        p.exit(2, f"tune_decoding.py: error: {err}\n")
    print(f"{args.checkpoint}, {len(ts.sources)} {args.split} pairs, beam {args.beam}, torch threads "
          f"{torch.get_num_threads()}")
    print("| early stop | penalty | alpha | BLEU | chrF | BP | len ratio | seconds |\n|---|---|---|---|---|---|---|---|")
    for early, penalty, alpha in itertools.product(args.early_stopping, args.penalty, args.alpha):
        start = time.perf_counter()
        hyps = [h[0].text for h in translate(model, tokenizer, ts.sources, beam=args.beam, length_penalty=alpha,
                                             penalty=penalty, early_stopping=early == "yes",
                                             batch_tokens=args.batch_tokens)]
        bleu = sacrebleu.corpus_bleu(hyps, [ts.references])
        chrf = sacrebleu.corpus_chrf(hyps, [ts.references]).score
        print(f"| {early} | {penalty} | {alpha} | {bleu.score:.2f} | {chrf:.1f} | {bleu.bp:.3f} | "
              f"{bleu.sys_len / bleu.ref_len:.3f} | {time.perf_counter() - start:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
