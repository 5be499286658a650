"""Train the joint German-English SentencePiece tokenizer on one split of a parallel corpus.

    python scripts/train_tokenizer.py --data ../shared/data/multi30k --vocab-size 8000 --out checkpoints/tokenizers/multi30k-8000.model
    python scripts/train_tokenizer.py --data wmt14 --name de-en --out wmt14-32000.model --vocab-size 32000

``--data`` is anything ``translator.data.load_pairs`` reads: a directory of parallel text files, a .jsonl/.tsv file or
a directory holding ``{split}.jsonl``/``{split}.tsv``, or a Hugging Face dataset id (with ``--name`` for its config).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from translator.data import load_pairs
from translator.tokenizer import SEP_ID, Tokenizer, interleave

log = logging.getLogger("train_tokenizer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="local path or hub dataset id")
    parser.add_argument("--name", default=None, help="hub dataset config, e.g. de-en")
    parser.add_argument("--split", default="train")
    parser.add_argument("--src-lang", default="de")
    parser.add_argument("--tgt-lang", default="en")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--out", required=True, type=Path, help="where to write the .model file")
    args = parser.parse_args(argv)
    if args.vocab_size <= SEP_ID + 1:
        parser.error(f"--vocab-size must exceed the {SEP_ID + 1} special pieces, got {args.vocab_size}")
    if args.out.suffix != ".model" or args.out.is_dir():
        parser.error(f"--out must be a .model file path, got {args.out}")
    if args.src_lang == args.tgt_lang:
        parser.error("--src-lang and --tgt-lang must differ")

    try:
        pairs = load_pairs(args.data, args.split, args.src_lang, args.tgt_lang, args.name)
        log.info("training a %d-piece tokenizer on %s", args.vocab_size, pairs.where)
        tokenizer = Tokenizer.train(interleave(pairs), vocab_size=args.vocab_size)
    except (FileNotFoundError, ValueError) as err:  # bad path, bad data, vocabulary too large for the corpus
        log.error("%s", err)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(args.out)
    log.info("wrote %s (%d pieces)", args.out, tokenizer.vocab_size)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
