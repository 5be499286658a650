"""Two views of a finished study (scripts/compare_architectures.sh) that its report does not give (docs/comparison.md).

    python scripts/study_views.py compute out/compare/runs                  # validation perplexity at equal compute
    python scripts/study_views.py attention out/compare/runs/prefix-seed0 ...  # attention to the source by position

compute: for each seed, every arm's validation perplexity when it has spent what the baseline arm (default encdec)
spent in its whole run: in steps, in training FLOPs (`translator.config.train_flops` over the train set's lengths,
with each run's own model config; a source-side loss's extra output layer is not counted) and in training wall
time; interpolated between validations on a log scale. Finished runs only (their `done` file).
attention: `translator.source_attention` of each run's best checkpoint over the first N val pairs.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from translator import checkpoint
from translator.compare import read_testset
from translator.config import train_flops
from translator.data import load_pairs
from translator.training_log import read_training_log

RUN = re.compile(r"^(?P<arm>.+)-seed(?P<seed>\d+)$")


def best(run: Path) -> Path:
    last = run / "checkpoints" / "run" / "last.ckpt"
    if not last.is_file():
        raise SystemExit(f"study_views.py: error: {run} has no checkpoints/run/last.ckpt (not a finished run?)")
    return checkpoint.best_of(last)


def at(log, metric: str, step: float) -> float:
    if np.isnan(step):
        return step
    steps, values = map(np.array, zip(*log.curves[metric]))
    return float(np.exp(np.interp(step, steps, np.log(values))))


def compute_view(runs_dir: Path, baseline: str, data: str) -> None:
    runs = defaultdict(dict)  # seed -> arm -> run directory
    for run in sorted(runs_dir.iterdir()):
        if (m := RUN.match(run.name)) and (run / "done").exists():  # finished runs only
            runs[int(m["seed"])][m["arm"]] = run
    pairs = list(load_pairs(data, "train"))
    lengths, flops = {}, {}
    rows = defaultdict(list)  # arm -> [(steps, flops, time) perplexities]
    for seed, arms in sorted(runs.items()):
        if baseline not in arms:
            continue
        logs = {arm: read_training_log(run / "checkpoints" / "run" / "metrics.csv") for arm, run in arms.items()}
        for arm, run in arms.items():
            if arm not in flops:
                model, tokenizer, meta = checkpoint.load(best(run))
                key = meta["tokenizer"].numpy().tobytes()
                if key not in lengths:  # (source, target) token counts of the train set: the runs share a tokenizer
                    src = tokenizer.encode([s for s, _ in pairs])
                    tgt = tokenizer.encode([t for _, t in pairs])
                    lengths[key] = (torch.tensor([len(x) + 1 for x in src]), torch.tensor([len(x) + 1 for x in tgt]))
                flops[arm] = train_flops(model.config, *lengths[key])
        base = logs[baseline]
        last = base.curves["val/ppl"][-1][0]  # the baseline's last validated step (metrics.csv: step count - 1)
        seconds = base.seconds_at([last])[0] if base.elapsed else None
        for arm, lg in logs.items():
            step_at_flops = (last + 1) * flops[baseline] / flops[arm] - 1
            step_at_time = float("nan")  # without logged training time (a run shorter than one logging interval)
            if seconds is not None and lg.elapsed:
                el_steps, el_time = map(np.array, zip(*sorted(lg.elapsed)))
                step_at_time = float(np.interp(seconds, el_time, el_steps))
            rows[arm].append((at(lg, "val/ppl", last), at(lg, "val/ppl", step_at_flops), at(lg, "val/ppl", step_at_time),
                              step_at_flops + 1, step_at_time + 1))
    print(f"validation perplexity at {baseline}'s budget, mean over seeds (the runs' steps in brackets)\n")
    print("| arm | seeds | FLOPs per step vs " + baseline + " | equal steps | equal FLOPs | equal wall time |")
    print("|---|---:|---:|---:|---:|---:|")
    for arm, values in sorted(rows.items(), key=lambda item: item[0] != baseline):
        v = np.array(values)
        print(f"| {arm} | {len(v)} | {flops[arm] / flops[baseline]:.2f}x | {v[:, 0].mean():.2f} | {v[:, 1].mean():.2f} "
              f"(step {v[:, 3].mean():.0f}) | {v[:, 2].mean():.2f} (step {v[:, 4].mean():.0f}) |")


def attention_view(runs: list[Path], data: str, n: int) -> None:
    from translator.source_attention import source_attention

    val = read_testset("val", f"{data}:val", limit=n)
    print(f"attention on the source (mass / entropy in nats) by target position, first {n} val pairs\n")
    for run in runs:
        model, tokenizer, _ = checkpoint.load(best(run))
        rows = source_attention(model, tokenizer, val.sources, val.references)
        print(f"{run.name}: " + "  ".join(f"{r['positions']}: {r['source_mass']:.3f} / {r['source_entropy']:.2f}"
                                         for r in rows), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("view", choices=("compute", "attention"))
    p.add_argument("runs", nargs="+", type=Path, help="compute: the study's runs/ folder; attention: run folders")
    p.add_argument("--baseline", default="encdec", help="compute: the arm whose budget the others are read at")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/multi30k"),
                   help="the study's data (train split for compute, val for attention)")
    p.add_argument("--pairs", type=int, default=200, help="attention: val pairs")
    args = p.parse_args(argv)
    for run in args.runs:
        if not run.is_dir():
            p.error(f"{run}: not a directory")
    if args.view == "compute":
        if len(args.runs) != 1:
            p.error("compute takes one folder: the study's runs/")
        compute_view(args.runs[0], args.baseline, args.data)
    else:
        attention_view(args.runs, args.data, args.pairs)


if __name__ == "__main__":
    sys.exit(main())
