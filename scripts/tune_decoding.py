#!/usr/bin/env python
"""Beam-search length settings against BLEU and brevity on a validation split (tune on val, never on test).

    python scripts/tune_decoding.py --checkpoint checkpoints/quickstart/last.ckpt --data ../shared/data/multi30k \\
        --split val --penalty gnmt average --alpha 0.6 1.0 1.4 2.0

Prints one row per (early stopping, length penalty form, alpha): BLEU, chrF, brevity penalty, hypothesis/reference
length ratio (sacreBLEU 13a), and the share of sentences whose translation has under 0.75x (`short`) or over 1.25x
(`long`) the reference's words, so that the defaults in `translator.generate` can be chosen from measurements.
`--eos` first prints where the model puts eos under teacher forcing: its mean log-probability at the reference's
end, its mean probability before the end, and how often it is the most likely token there. A model that places eos
as well as another yet writes shorter drops content as it generates (under-translation): no length setting fixes
that.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import sacrebleu
import torch
from torch import nn

from translator import checkpoint
from translator.compare import read_testset
from translator.tokenizer import BOS_ID, EOS_ID, Tokenizer
from translator.translate import pad, token_batches, translate

SHORT, LONG = 0.75, 1.25  # a sentence's word count against its reference's


def eos_placement(model: nn.Module, tokenizer: Tokenizer, sources: list[str], references: list[str],
                  batch_tokens: int = 4096) -> dict[str, float]:
    """Teacher-forced eos statistics over the references `y1 .. yn <eos>`: the mean log-probability of eos at the
    end (`end_logp`), its mean probability at the n positions before (`early_p`), and the share of those positions
    where eos is the most likely token (`early_argmax`)."""
    src_ids = tokenizer.encode(sources)
    tgt_ids = [[BOS_ID, *t, EOS_ID] for t in tokenizer.encode(references)]
    end_logp, early_p, early_argmax, early = 0.0, 0.0, 0, 0
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        for batch in token_batches([len(s) + len(t) for s, t in zip(src_ids, tgt_ids)], batch_tokens):
            lp = model(pad([src_ids[i] for i in batch], device), pad([tgt_ids[i] for i in batch], device)[:, :-1])
            lp = lp.float().log_softmax(-1)  # (B, T, V)
            for row, i in enumerate(batch):
                n = len(tgt_ids[i]) - 2  # target tokens before eos
                end_logp += lp[row, n, EOS_ID].item()
                early_p += lp[row, :n, EOS_ID].exp().sum().item()
                early_argmax += int((lp[row, :n].argmax(-1) == EOS_ID).sum())
                early += n
    return {"end_logp": end_logp / len(tgt_ids), "early_p": early_p / max(1, early),
            "early_argmax": early_argmax / max(1, early)}


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
    p.add_argument("--eos", action="store_true", help="first report where the model puts eos under teacher forcing")
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
    if args.eos:
        eos = eos_placement(model, tokenizer, ts.sources, ts.references, args.batch_tokens)
        print(f"eos under teacher forcing: mean log p at the end {eos['end_logp']:.3f}, mean p before the end "
              f"{eos['early_p']:.2e}, most likely token before the end at {eos['early_argmax']:.2%} of positions")
    print("| early stop | penalty | alpha | BLEU | chrF | BP | len ratio | short | long | seconds |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for early, penalty, alpha in itertools.product(args.early_stopping, args.penalty, args.alpha):
        start = time.perf_counter()
        hyps = [h[0].text for h in translate(model, tokenizer, ts.sources, beam=args.beam, length_penalty=alpha,
                                             penalty=penalty, early_stopping=early == "yes",
                                             batch_tokens=args.batch_tokens)]
        bleu = sacrebleu.corpus_bleu(hyps, [ts.references])
        chrf = sacrebleu.corpus_chrf(hyps, [ts.references]).score
        ratios = [len(h.split()) / max(1, len(r.split())) for h, r in zip(hyps, ts.references)]
        short = sum(r < SHORT for r in ratios) / max(1, len(ratios))
        long = sum(r > LONG for r in ratios) / max(1, len(ratios))
        print(f"| {early} | {penalty} | {alpha} | {bleu.score:.2f} | {chrf:.1f} | {bleu.bp:.3f} | "
              f"{bleu.sys_len / bleu.ref_len:.3f} | {short:.1%} | {long:.1%} | {time.perf_counter() - start:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
