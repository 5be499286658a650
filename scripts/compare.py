#!/usr/bin/env python
"""Compare translator checkpoints on the same test sets: quality, perplexity, size, speed, significance, plots.

    python scripts/compare.py --checkpoints checkpoints/encdec/best.ckpt checkpoints/decoder_only/best.ckpt \
        --src data/test_2016_flickr.de.gz --ref data/test_2016_flickr.en.gz --out docs/compare
    python scripts/compare.py --checkpoints A.ckpt B.ckpt --testset test2016=bentrevett/multi30k:test --out DIR

Test sets: pairs of --src/--ref files named DIR/SPLIT.de[.gz] and DIR/SPLIT.en[.gz] (named SPLIT), or
--testset NAME=SRC,REF, or --testset NAME=DATA:SPLIT for anything `translator.data.load_pairs` reads (hub id or
directory). Writes DIR/report.md, DIR/report.json and PNG plots, and prints the table (markdown) on stdout. Errors
(unreadable checkpoint or test set, checkpoints with different tokenizers) are one line on stderr and exit code 2.
The work is done by `translator.compare` (measurement) and `translator.report` (tables, plots, files).
"""


from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
from pathlib import Path

from translator.generate import add_search_arguments

log = logging.getLogger("compare")

SEEDS = """\
seeds: a run's name is its --names entry, else the part of its checkpoint's directory that differs from the others
(checkpoints/encdec-seed1/best.ckpt -> encdec-seed1). Runs whose names end in -seedN, _seedN or /seedN are the seeds
of one arm, named without that suffix (encdec-seed0 encdec-seed1 encdec-seed2 -> arm encdec). When an arm has several
runs, the report adds a table per arm and test set: mean ± sample standard deviation over its seeds of BLEU, chrF,
perplexity (over the same reference tokens), steps and training time; BLEU by source length and the training curves
per arm (mean, min-max band); and a paired bootstrap of every arm against the first: sentences are resampled, every
run is scored on each resample and an arm's score is the mean over its seeds. It says which differences are
significant (p < 0.05). With one run per arm, the report is per run, each against the first, as without seeds.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=SEEDS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT",
                        help="translator .ckpt files; the first (its arm, with seeds) is the baseline of the "
                        "significance tests")
    parser.add_argument("--names", nargs="+", help="a name per checkpoint (default: the checkpoint's directory); "
                        "NAME-seedN groups runs into arms (see below)")
    parser.add_argument("--src", action="append", default=[], help="source file DIR/SPLIT.de[.gz] (repeatable)")
    parser.add_argument("--ref", action="append", default=[], help="reference file DIR/SPLIT.en[.gz], one per --src")
    parser.add_argument("--testset", action="append", default=[], metavar="NAME=SRC,REF|NAME=DATA:SPLIT",
                        help="a named test set (repeatable)")
    parser.add_argument("--limit", type=int, help="use only the first N pairs of each test set")
    parser.add_argument("--beam", type=int, default=5, help="beam size (1: greedy)")
    add_search_arguments(parser)
    parser.add_argument("--batch-tokens", type=int, default=4096, help="padded source tokens per batch")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (0: no significance)")
    parser.add_argument("--examples", type=int, default=5, help="example translations per test set in report.md")
    parser.add_argument("--source-attention", type=int, default=0, metavar="N",
                        help="for each decoder-only checkpoint, the attention mass and entropy over the source by "
                             "target position, teacher-forced on the first N pairs of the first test set "
                             "(translator.source_attention; written to OUT/source_attention.json)")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    for name in ("beam", "batch_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.bootstrap < 0 or args.examples < 0 or (args.limit is not None and args.limit < 1):
        parser.error("--bootstrap and --examples must be >= 0, --limit >= 1")
    if len(args.src) != len(args.ref):
        parser.error(f"give one --ref per --src (got {len(args.src)} --src and {len(args.ref)} --ref)")
    if not args.src and not args.testset:
        parser.error("no test set: give --src/--ref or --testset")
    if args.names is not None and len(args.names) != len(args.checkpoints):
        parser.error(f"--names: {len(args.names)} names for {len(args.checkpoints)} checkpoints")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    args.testset_specs = [(None, s, r) for s, r in zip(args.src, args.ref)]
    for spec in args.testset:
        name, eq, where = spec.partition("=")
        if not eq or not name or not where:
            parser.error(f"--testset {spec!r}: expected NAME=SRC,REF or NAME=DATA:SPLIT")
        src, comma, ref = where.partition(",")
        args.testset_specs.append((name, src, ref if comma else None))
    names = [n for n, _, _ in args.testset_specs if n]
    if len(set(names)) != len(names):
        parser.error(f"--testset names must be unique, got {names}")
    args.prog = parser.prog
    return args


def write_source_attention(paths: list[str], testset, n: int, out: str) -> Path:
    """`translator.source_attention` of each decoder-only checkpoint on the first n pairs: a table on stdout and
    OUT/source_attention.json."""
    from translator import checkpoint
    from translator.decoder_only import DecoderOnlyTransformer
    from translator.source_attention import source_attention

    results = {}
    for path in paths:
        model, tokenizer, _ = checkpoint.load(path)
        if isinstance(model, DecoderOnlyTransformer):
            results[path] = source_attention(model, tokenizer, testset.sources[:n], testset.references[:n])
    lines = ["| checkpoint | target positions | attention on the source | entropy over the source (nats) | queries |",
             "|---|---|---|---|---|"]
    lines += [f"| {path} | {r['positions']} | {r['source_mass']:.3f} | {r['source_entropy']:.2f} | {r['queries']} |"
              for path, rows in results.items() for r in rows]
    sys.stdout.write("\n".join(lines) + "\n\n")
    target = Path(out) / "source_attention.json"
    target.write_text(json.dumps({"testset": testset.name, "pairs": n, "checkpoints": results}, indent=2) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    # torch and the model code load after the arguments are checked: `--help` and typos answer at once
    from translator import checkpoint
    from translator.compare import CompareError, compare, read_testset
    from translator.report import arm_table, markdown_table, write_report

    try:
        testsets = [read_testset(name, src, ref, args.limit) for name, src, ref in args.testset_specs]
        seen = [ts.name for ts in testsets]
        if len(set(seen)) != len(seen):
            raise CompareError(f"two test sets share a name ({seen}); name them with --testset NAME=SRC,REF")
        report = compare(
            args.checkpoints, testsets, beam=args.beam, batch_tokens=args.batch_tokens, device=args.device,
            bootstrap=args.bootstrap, names=args.names, length_penalty=args.length_penalty, examples=args.examples,
            penalty=args.penalty, early_stopping=args.early_stopping,
        )
        command = shlex.join(["python", "scripts/compare.py", *(sys.argv[1:] if argv is None else argv)])
        written = write_report(report, args.out, command)
        if args.source_attention:
            written.append(write_source_attention(args.checkpoints, testsets[0], args.source_attention, args.out))
    except (checkpoint.CheckpointError, CompareError, OSError) as err:
        sys.stderr.write(f"{args.prog}: error: {err}\n")
        return 2
    sys.stdout.write(markdown_table(report) + (f"\n{arm_table(report)}" if report.arm_rows else ""))
    sys.stdout.flush()
    log.info("wrote %s", ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
