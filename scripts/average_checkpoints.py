#!/usr/bin/env python
"""Average the weights of several checkpoints of one run into one self-contained `.ckpt` (Vaswani et al. 2017).

    python scripts/average_checkpoints.py checkpoints/quickstart/step=*.ckpt --last 5 --output avg.ckpt
    python scripts/translate.py --checkpoint avg.ckpt "Ein Hund läuft durch den Schnee."

The inputs must share architecture, model config and tokenizer (checked). `--last N` keeps the N inputs with the
highest training step. The output is the newest input with its `state_dict` replaced by the element-wise mean
(computed in float64, stored in each tensor's own dtype) and the training state (optimizer, schedulers, loops,
callbacks) left out: it translates, tests and compares like any checkpoint, loads with `torch.load(weights_only=True)`,
and is not meant for resuming. Bad inputs end with one line, `average_checkpoints.py: error: ...`, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from translator.checkpoint import CheckpointError, average, read


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="average_checkpoints.py", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help="translator .ckpt files of one run")
    p.add_argument("--last", type=int, help="average only the N checkpoints with the highest training step")
    p.add_argument("--output", "-o", type=Path, required=True, help="where to write the averaged .ckpt")
    args = p.parse_args(argv)
    if args.last is not None and args.last < 1:
        p.error(f"--last must be >= 1, got {args.last}")
    if args.output.resolve() in {path.resolve() for path in args.inputs}:
        p.error(f"--output {args.output} is one of the inputs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        loaded = sorted(((read(path), path) for path in args.inputs), key=lambda c: c[0].get("global_step", 0))
        ckpts, paths = zip(*loaded[-(args.last or len(loaded)):])
        averaged = average(list(paths), list(ckpts))
    except CheckpointError as err:
        print(f"average_checkpoints.py: error: {err}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(averaged, args.output)
    print(f"averaged {len(paths)} checkpoints (steps {', '.join(str(c.get('global_step')) for c in ckpts)}) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
