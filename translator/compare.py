"""Library side of `scripts/compare.py`: measure translator checkpoints on the same test sets.

    report = compare(["checkpoints/encdec/best.ckpt", "checkpoints/decoder_only/best.ckpt"],
                     [read_testset("test2016", "data/test_2016_flickr.de.gz", "data/test_2016_flickr.en.gz")])
    translator.report.write_report(report, "docs/compare")  # report.md, report.json, *.png

Per checkpoint and test set: parameters (total, non-embedding), sacreBLEU BLEU and chrF, target-token perplexity under
teacher forcing (exp of the mean cross-entropy over `y1 .. yn <eos>`, as in training), decoding speed (sentences/s,
wall time of `translate.translate` over the test set), and, when the training logs sit next to the checkpoint
(`metrics.csv`, `hparams.yaml` in its directory or the parent; `translator.training_log`), training throughput and
wall time. Significance: the paired bootstrap of `translator.significance`, every checkpoint against the first.
Reporting (tables, plots, files) is `translator.report`'s.

Seeds: runs whose names end in `-seedN`, `_seedN` or `/seedN` (`arm_of`) are the seeds of one arm, named without
that suffix (encdec-seed0, encdec-seed1 -> encdec). When some arm has several runs, `Report.arm_rows` gives each arm's
mean and standard deviation over its seeds, and the paired bootstrap compares arms (seeds pooled, every arm against
the first) instead of runs. With one run per arm the report is the per-run one alone.

Perplexities over different token sets cannot be compared, so all checkpoints must carry the same tokenizer (the
serialized SentencePiece bytes are compared); otherwise `TokenizerMismatch`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F
from torch import nn

from translator import checkpoint
from translator.data import load_pairs
from translator.generate import EARLY_STOPPING, LENGTH_PENALTY, PENALTY, Penalty
from translator.significance import bootstrap_arms
from translator.significance import paired_bootstrap as paired_bootstrap  # re-exported: its home before the split
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from translator.training_log import TIME_COLUMNS, TrainingLog, find_training_log
from translator.training_log import read_training_log as read_training_log  # re-exported, as paired_bootstrap
from translator.translate import pad, resolve_device, token_batches, translate

log = logging.getLogger(__name__)

LENGTH_EDGES = (10, 15, 20, 25)  # source-word buckets 1-10, 11-15, 16-20, 21-25, 26+
SEED_SUFFIX = re.compile(r"(?P<arm>.+?)[-_/]seed\d+")  # a run name `ARM-seedN`, `ARM_seedN` or `ARM/seedN`


class CompareError(ValueError):
    """Inputs that cannot be compared as given (unreadable test set, checkpoints that do not fit together)."""


class TokenizerMismatch(CompareError):
    """The checkpoints were trained with different tokenizers."""


# ---- test sets ---------------------------------------------------------------------------------------------------
@dataclass
class TestSet:
    name: str
    sources: list[str]
    references: list[str]
    where: str

    __test__ = False  # not a pytest class


def _split_and_lang(path: Path) -> tuple[str, str]:
    """`dir/test_2016_flickr.de.gz` -> ("test_2016_flickr", "de")."""
    name = path.name.removesuffix(".gz")
    split, dot, lang = name.rpartition(".")
    if not dot or not split or not lang:
        raise CompareError(f"{path}: expected a file named SPLIT.LANG or SPLIT.LANG.gz (e.g. test_2016_flickr.de.gz)")
    return split, lang


def read_testset(name: str | None, src: str | os.PathLike, ref: str | os.PathLike | None = None,
                 limit: int | None = None) -> TestSet:
    """A test set from two parallel files `DIR/SPLIT.SRC[.gz]` + `DIR/SPLIT.TGT[.gz]` (same DIR and SPLIT), or, with
    `ref=None`, from `src` = `DATA:SPLIT` or `DATA:CONFIG:SPLIT`, anything `translator.data.load_pairs` opens (a hub
    id such as `bentrevett/multi30k:test` or `wmt14:de-en:test`, or a directory).

    Read through `load_pairs`, so empty pairs are skipped and unequal line counts are an error. `limit`: the first
    n pairs only. Errors are `CompareError`s naming the files.
    """
    try:
        if ref is None:
            data, *name_and_split = str(src).split(":")
            if not data or len(name_and_split) not in (1, 2) or not all(name_and_split):
                raise CompareError(f"{src!r}: expected DATA:SPLIT or DATA:CONFIG:SPLIT (a hub id or directory, "
                                   "a dataset config such as de-en, a split)")
            config, split = name_and_split if len(name_and_split) == 2 else (None, name_and_split[0])
            pairs = load_pairs(data, split, name=config)
            name = name or split
        else:
            src, ref = Path(src), Path(ref)
            (split, src_lang), (ref_split, tgt_lang) = _split_and_lang(src), _split_and_lang(ref)
            if src.resolve().parent != ref.resolve().parent or split != ref_split:
                raise CompareError(
                    f"{src} and {ref}: source and reference must be DIR/SPLIT.{src_lang}[.gz] and "
                    f"DIR/SPLIT.{tgt_lang}[.gz] with the same DIR and SPLIT (the layout translator.data.load_pairs reads)"
                )
            for file in (src, ref):
                if not file.is_file():
                    raise CompareError(f"{file}: file not found")
            pairs = load_pairs(src.parent, split, src_lang, tgt_lang)
            name = name or split
        kept = list(pairs.shard(0, 1, limit))
    except (FileNotFoundError, ValueError) as err:
        if isinstance(err, CompareError):
            raise
        raise CompareError(f"test set {name or src}: {err}") from None
    return TestSet(name, [s for s, _ in kept], [t for _, t in kept], pairs.where)



# ---- the checks and measurements ---------------------------------------------------------------------------------
def check_same_tokenizer(paths: list[str | os.PathLike]) -> tuple[Tokenizer, list[dict]]:
    """Read every checkpoint (weights_only) and make sure they all carry the same serialized tokenizer.

    Returns the tokenizer and each checkpoint's `{global_step, hyper_parameters}`; raises `TokenizerMismatch`
    naming the checkpoints that differ from the first.
    """
    blobs, infos = [], []
    for path in paths:
        ckpt = checkpoint.read(path)
        blobs.append(ckpt["translator"]["tokenizer"].numpy().tobytes())
        infos.append({"global_step": ckpt.get("global_step"), "hyper_parameters": ckpt.get("hyper_parameters")})
        del ckpt

    def describe(i: int) -> str:
        pieces, digest = Tokenizer.from_bytes(blobs[i]).vocab_size, hashlib.sha256(blobs[i]).hexdigest()[:12]
        return f"{paths[i]} ({pieces} pieces, sha256 {digest})"

    differ = [i for i in range(1, len(paths)) if blobs[i] != blobs[0]]
    if differ:
        raise TokenizerMismatch(
            f"the checkpoints use different tokenizers: {describe(0)} vs "
            + ", ".join(describe(i) for i in differ)
            + ". Perplexities over different token sets are not comparable (nor are the models' vocabularies), so "
            "compare only checkpoints trained with the same tokenizer (same data config or --data.tokenizer)"
        )
    return Tokenizer.from_bytes(blobs[0]), infos


def perplexity(model: nn.Module, tokenizer: Tokenizer, sources: list[str], references: list[str],
               batch_tokens: int = 4096, max_len: int | None = None) -> float:
    """exp(mean cross-entropy) over the non-pad target tokens `y1 .. yn <eos>` under teacher forcing, in float32,
    without label smoothing: what training logs as `val/ppl`. Runs on the model's device. With `max_len`, source and
    target are cut to their first `max_len` tokens (a cut target has no eos), as the DataModule's validation does."""
    device = next(model.parameters()).device
    whole = lambda ids: max_len is None or len(ids) <= max_len  # noqa: E731
    src_ids = [s[:max_len] for s in tokenizer.encode(sources)]
    tgt_ids = [[BOS_ID, *t[:max_len], *([EOS_ID] if whole(t) else [])] for t in tokenizer.encode(references)]
    nll, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for batch in token_batches([len(s) + len(t) for s, t in zip(src_ids, tgt_ids)], batch_tokens):
            src = pad([src_ids[i] or [PAD_ID] for i in batch], device)  # (B, S); an empty source is all pad
            tgt = pad([tgt_ids[i] for i in batch], device)  # (B, T+1)
            logits = model(src, tgt[:, :-1]).float()  # (B, T, V)
            nll += F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD_ID, reduction="sum")
            tokens += sum(len(tgt_ids[i]) - 1 for i in batch)
    model.train(was_training)
    return math.exp(nll.item() / tokens)


def timed_translate(model: nn.Module, tokenizer: Tokenizer, sentences: list[str], beam: int, batch_tokens: int,
                    **search: Any) -> tuple[list[str], float]:
    """Best translation of each sentence and the wall time in seconds (after an untimed warm-up batch). `search`:
    `length_penalty`, `penalty`, `early_stopping` of `translator.translate.translate` (its defaults when left out)."""
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    translate(model, tokenizer, sentences[:8], beam=beam, batch_tokens=batch_tokens, **search)
    sync()
    start = time.perf_counter()
    results = translate(model, tokenizer, sentences, beam=beam, batch_tokens=batch_tokens, **search)
    sync()
    return [hyps[0].text for hyps in results], time.perf_counter() - start


def length_buckets(sources: list[str], edges: tuple[int, ...] = LENGTH_EDGES) -> tuple[list[str], list[int]]:
    """Bucket labels ("1-10", ..., "26+") and each sentence's bucket index, by source words (whitespace split)."""
    bounds = [0, *edges]
    labels = [f"{lo + 1}-{hi}" for lo, hi in itertools.pairwise(bounds)] + [f"{edges[-1] + 1}+"]
    return labels, [int(np.searchsorted(edges, len(s.split()), side="left")) for s in sources]


def bleu_by_length(sources: list[str], hypotheses: list[str], references: list[str],
                   edges: tuple[int, ...] = LENGTH_EDGES) -> list[dict[str, Any]]:
    """Corpus BLEU per source-length bucket: [{bucket, sentences, bleu (None when empty)}]."""
    labels, index = length_buckets(sources, edges)
    out = []
    for b, label in enumerate(labels):
        members = [i for i, k in enumerate(index) if k == b]
        score = None
        if members:
            score = sacrebleu.BLEU().corpus_score([hypotheses[i] for i in members], [[references[i] for i in members]]).score
        out.append({"bucket": label, "sentences": len(members), "bleu": score})
    return out


# ---- the comparison ----------------------------------------------------------------------------------------------
@dataclass
class Report:
    settings: dict[str, Any]
    signatures: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    testsets: list[dict[str, Any]]
    rows: list[dict[str, Any]]  # one per (checkpoint, test set)
    examples: dict[str, list[dict[str, str]]]  # test set -> a few sources, references and each model's output
    logs: dict[str, TrainingLog]  # checkpoint name -> its training log (those found)
    notes: list[str]
    arms: dict[str, list[str]]  # arm -> its runs (checkpoint names), in the order given; the first is the baseline
    arm_rows: list[dict[str, Any]]  # one per (arm, test set) when some arm has several runs (seeds), else none


def checkpoint_names(paths: list[str | os.PathLike]) -> list[str]:
    """Short unique names: the part of the checkpoints' directories that differs (`checkpoints/encdec/best.ckpt`,
    `checkpoints/decoder_only/best.ckpt` -> encdec, decoder_only); the file stems when they share a directory."""
    paths = [Path(p).resolve() for p in paths]
    if len(set(paths)) < len(paths):
        raise CompareError("the same checkpoint is given twice (give --names to compare a model with itself)")
    dirs = [p.parent.parts for p in paths]
    if len(paths) == 1:
        return [paths[0].parent.name or paths[0].stem]
    shortest = min(map(len, dirs))
    pre = next((i for i in range(shortest) if len({d[i] for d in dirs}) > 1), shortest)
    suf = next((i for i in range(shortest - pre) if len({d[-1 - i] for d in dirs}) > 1), shortest - pre)
    names = ["/".join(d[pre:len(d) - suf]) for d in dirs]
    if not all(names) or len(set(names)) < len(names):  # same or nested directories: add the file names
        names = [f"{n}/{p.stem}" if n else p.stem for n, p in zip(names, paths)]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    return names


def arm_of(run: str) -> str:
    """The arm a run belongs to: its name without a trailing `-seedN`, `_seedN` or `/seedN` (encdec-seed2 -> encdec,
    prefix_lm/seed0 -> prefix_lm); any other name is an arm of its own."""
    match = SEED_SUFFIX.fullmatch(run)
    return match["arm"] if match else run


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None for one value) of the values that are not None."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    return float(np.mean(present)), float(np.std(present, ddof=1)) if len(present) > 1 else None


def summarise_arms(rows: list[dict[str, Any]], arms: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One row per (arm, test set): mean (`bleu`, ...) and standard deviation over seeds (`bleu_sd`, ...) of steps,
    BLEU, chrF, perplexity (each run's, over the same reference tokens), training wall time, and BLEU per source-length
    bucket; `parameters` are the first run's."""
    by_run = {(r["model"], r["testset"]): r for r in rows}
    out = []
    for arm, runs in arms.items():
        for testset in dict.fromkeys(r["testset"] for r in rows):
            members = [by_run[run, testset] for run in runs]
            row = {"arm": arm, "testset": testset, "seeds": len(runs), "runs": runs,
                   "parameters": members[0]["parameters"]}
            for key in ("steps", "bleu", "chrf", "ppl", "train_wall_s"):
                row[key], row[f"{key}_sd"] = _mean_sd([m[key] for m in members])
            row["bleu_by_length"] = []
            for k, bucket in enumerate(members[0]["bleu_by_length"]):
                mean, sd = _mean_sd([m["bleu_by_length"][k]["bleu"] for m in members])
                row["bleu_by_length"].append({**bucket, "bleu": mean, "bleu_sd": sd})
            out.append(row)
    return out


def compare(checkpoints: list[str | os.PathLike], testsets: list[TestSet], beam: int = 5, batch_tokens: int = 4096,
            device: str = "auto", bootstrap: int = 1000, names: list[str] | None = None, length_penalty: float = LENGTH_PENALTY,
            examples: int = 5, penalty: Penalty = PENALTY, early_stopping: bool = EARLY_STOPPING) -> Report:
    """Evaluate every checkpoint on every test set (one model in memory at a time); see the module docstring."""
    if not checkpoints or not testsets:
        raise CompareError("need at least one checkpoint and one test set")
    search = dict(length_penalty=length_penalty, penalty=penalty, early_stopping=early_stopping)
    names = names or checkpoint_names(checkpoints)
    if len(names) != len(checkpoints) or len(set(names)) != len(names):
        raise CompareError(f"need one unique name per checkpoint, got {names}")
    arms: dict[str, list[str]] = {}
    for name in names:
        arms.setdefault(arm_of(name), []).append(name)
    tokenizer, infos = check_same_tokenizer(checkpoints)
    try:
        dev = resolve_device(device)
    except ValueError as err:
        raise CompareError(str(err)) from None
    notes: list[str] = []
    logs = {n: lg for n, p in zip(names, checkpoints) if (lg := find_training_log(p)) is not None}
    for n in names:
        if n not in logs:
            notes.append(f"{n}: no metrics.csv next to the checkpoint (or in its parent): no training columns")
        elif logs[n].time_column is None:
            notes.append(f"{n}: {logs[n].metrics_csv} has no time column ({', '.join(TIME_COLUMNS[:2])}): "
                         "training wall time unknown")

    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    ckpt_rows, hyps = [], {}  # hyps[(name, testset)] = translations
    rows = []
    for name, path, info in zip(names, checkpoints, infos):
        model, _, meta = checkpoint.load(path, map_location=dev)
        lg = logs.get(name)
        ckpt_rows.append({
            "name": name, "path": str(path), "arch": meta["arch"], "config": meta["config"],
            "parameters": model.num_parameters(), "non_embedding_parameters": model.num_parameters(non_embedding=True),
            "steps": info["global_step"], "hyper_parameters": info["hyper_parameters"],
            "metrics_csv": lg.metrics_csv if lg else None, "hparams_yaml": lg.hparams_yaml if lg else None,
        })
        for ts in testsets:
            log.info("%s on %s (%d sentences): translating with beam %d", name, ts.name, len(ts.sources), beam)
            out, seconds = timed_translate(model, tokenizer, ts.sources, beam, batch_tokens, **search)
            hyps[name, ts.name] = out
            row = {
                "model": name, "testset": ts.name, "sentences": len(ts.sources),
                "parameters": ckpt_rows[-1]["parameters"],
                "non_embedding_parameters": ckpt_rows[-1]["non_embedding_parameters"], "steps": info["global_step"],
                "bleu": bleu.corpus_score(out, [ts.references]).score,
                "chrf": chrf.corpus_score(out, [ts.references]).score,
                "ppl": perplexity(model, tokenizer, ts.sources, ts.references, batch_tokens),
                "decode_s": seconds, "sent_per_s": len(ts.sources) / seconds,
                "train_tok_per_s": lg.tok_per_s if lg else None, "train_wall_s": lg.wall_time_s if lg else None,
                "bleu_by_length": bleu_by_length(ts.sources, out, ts.references),
            }
            rows.append(row)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    signatures = {"BLEU": str(bleu.get_signature()), "chrF": str(chrf.get_signature())}
    arm_rows = summarise_arms(rows, arms) if len(arms) < len(names) else []
    if bootstrap > 0 and len(arms) > 1:  # arm against arm, or with one run per arm run against run
        for ts in testsets:
            sigs, paired = bootstrap_arms(ts.references, [(arm, [hyps[n, ts.name] for n in runs])
                                                          for arm, runs in arms.items()], bootstrap)
            signatures["paired_bs"] = sigs
            for row in arm_rows or rows:
                if row["testset"] == ts.name:
                    for metric, result in paired[row["arm"] if arm_rows else arm_of(row["model"])].items():
                        row[metric.lower() + "_bs"] = result.to_dict()

    chosen = {ts.name: list(range(min(examples, len(ts.sources)))) for ts in testsets}
    example_rows = {
        ts.name: [{"source": ts.sources[i], "reference": ts.references[i], **{n: hyps[n, ts.name][i] for n in names}}
                  for i in chosen[ts.name]]
        for ts in testsets
    }
    settings = {
        "beam": beam, **search, "batch_tokens": batch_tokens, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "bootstrap": bootstrap, "torch": torch.__version__,
        "sacrebleu": sacrebleu.__version__, "tokenizer_pieces": tokenizer.vocab_size,
        "tokenizer_sha256": hashlib.sha256(tokenizer.to_bytes()).hexdigest(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    testset_rows = [{"name": ts.name, "where": ts.where, "sentences": len(ts.sources)} for ts in testsets]
    return Report(settings, signatures, ckpt_rows, testset_rows, rows, example_rows, logs, notes, arms, arm_rows)

