"""Library side of `scripts/compare.py`: compare translator checkpoints on the same test sets.

    report = compare(["checkpoints/encdec/best.ckpt", "checkpoints/decoder_only/best.ckpt"],
                     [read_testset("test2016", "data/test_2016_flickr.de.gz", "data/test_2016_flickr.en.gz")])
    write_report(report, "docs/compare")  # report.md, report.json, *.png
    print(markdown_table(report))

Per checkpoint and test set: parameters (total, non-embedding), sacreBLEU BLEU and chrF, target-token perplexity under
teacher forcing (exp of the mean cross-entropy over `y1 .. yn <eos>`, as in training), decoding speed (sentences/s,
wall time of `translate.translate` over the test set), and, when the training logs sit next to the checkpoint
(`metrics.csv`, `hparams.yaml` in its directory or the parent), training throughput and wall time.

Significance: sacreBLEU's paired bootstrap (`sacrebleu.significance.PairedTest`, test_type="bs") of every checkpoint
against the first. From sacreBLEU: the scores, each system's bootstrap mean and 95% half-width, and the p-value. Added
here, from the same resamples (same seed, same draw, sacreBLEU's sufficient statistics): the difference system -
baseline with its 95% interval. One correction: sacreBLEU counts only resampled statistics strictly above the
observed one, so two systems whose per-sentence statistics are identical get p = 1/(n+1) ~ 0.001 ("significant");
such a pair is reported with p = 1 (the difference is 0 in every resample).

Perplexities over different token sets cannot be compared, so all checkpoints must carry the same tokenizer (the
serialized SentencePiece bytes are compared); otherwise `TokenizerMismatch`.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F
import yaml
from sacrebleu.significance import PairedTest, estimate_ci
from torch import nn

from translator import checkpoint
from translator.data import load_pairs
from translator.generate import LENGTH_PENALTY
from translator.metrics import SACREBLEU_TESTED, sacrebleu_internal, score_from_statistics, sentence_statistics
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from translator.translate import pad, resolve_device, token_batches, translate

log = logging.getLogger(__name__)

LENGTH_EDGES = (10, 15, 20, 25)  # source-word buckets 1-10, 11-15, 16-20, 21-25, 26+
# wall-time columns, in order of preference; else the first column whose name mentions elapsed/wall/time
TIME_COLUMNS = ("train/elapsed_s", "elapsed_s", "train/wall_time_s", "wall_time_s", "time")


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


# ---- training logs -----------------------------------------------------------------------------------------------
@dataclass
class TrainingLog:
    """What the CSV logger left next to a checkpoint. `curves[metric]` = [(step, value)] for every `val/*` column;
    `elapsed` = [(step, seconds)] when a time column exists."""

    metrics_csv: str
    hparams_yaml: str | None = None
    hparams: dict[str, Any] | None = None
    tok_per_s: float | None = None
    wall_time_s: float | None = None
    time_column: str | None = None
    last_step: int | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    elapsed: list[tuple[int, float]] = field(default_factory=list)

    def seconds_at(self, steps: list[int]) -> list[float] | None:
        """Wall time at each step, interpolated from the logged time column (None without one)."""
        if not self.elapsed:
            return None
        xs, ys = zip(*sorted(self.elapsed))
        return [float(v) for v in np.interp(steps, xs, ys)]


def find_training_log(ckpt_path: str | os.PathLike) -> TrainingLog | None:
    """The `metrics.csv` (and `hparams.yaml`) in the checkpoint's directory or its parent, read; None if absent."""
    here = Path(ckpt_path).resolve().parent
    for folder in (here, here.parent):
        if (folder / "metrics.csv").is_file():
            return read_training_log(folder / "metrics.csv")
    return None


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def read_training_log(metrics_csv: str | os.PathLike) -> TrainingLog:
    """Training throughput (median of `train/tok_per_s`: the logged values are windowed averages, the first ones
    include start-up), wall time (the largest value of the first column in `TIME_COLUMNS`), validation curves."""
    metrics_csv = Path(metrics_csv)
    with metrics_csv.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    out = TrainingLog(str(metrics_csv))
    hparams = metrics_csv.with_name("hparams.yaml")
    if hparams.is_file():
        out.hparams_yaml = str(hparams)
        try:
            loaded = yaml.safe_load(hparams.read_text(encoding="utf-8"))
            out.hparams = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError as err:
            log.warning("%s: unreadable (%s); ignored", hparams, err)
    steps = [int(s) for r in rows if (s := _number(r.get("step"))) is not None]
    out.last_step = max(steps) if steps else None
    rates = [v for r in rows if (v := _number(r.get("train/tok_per_s"))) is not None]
    out.tok_per_s = float(np.median(rates)) if rates else None
    out.time_column = next((c for c in TIME_COLUMNS if c in columns), None) or next(
        (c for c in columns if any(word in c.lower() for word in ("elapsed", "wall", "time"))), None)
    for r in rows:
        step = _number(r.get("step"))
        if step is None:
            continue
        if out.time_column and (t := _number(r.get(out.time_column))) is not None:
            out.elapsed.append((int(step), t))
        for c in columns:
            if c.startswith("val/") and (v := _number(r.get(c))) is not None:
                out.curves.setdefault(c, []).append((int(step), v))
    out.wall_time_s = max(t for _, t in out.elapsed) if out.elapsed else None
    return out


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
                    length_penalty: float = LENGTH_PENALTY) -> tuple[list[str], float]:
    """Best translation of each sentence and the wall time in seconds (after an untimed warm-up batch)."""
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    translate(model, tokenizer, sentences[:8], beam=beam, length_penalty=length_penalty, batch_tokens=batch_tokens)
    sync()
    start = time.perf_counter()
    results = translate(model, tokenizer, sentences, beam=beam, length_penalty=length_penalty, batch_tokens=batch_tokens)
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


# ---- significance ------------------------------------------------------------------------------------------------
@dataclass
class Paired:
    """One metric of one system against the baseline (the first system)."""

    score: float
    mean: float | None  # sacreBLEU: bootstrap mean of the system's score
    ci: float | None  # sacreBLEU: half-width of its 95% interval
    delta: float | None = None  # system - baseline (None for the baseline)
    delta_ci: tuple[float, float] | None = None  # 95% interval of the resampled differences
    p_value: float | None = None  # sacreBLEU's paired bootstrap p-value (tie-corrected, see the module docstring)
    deltas: np.ndarray | None = field(default=None, repr=False)  # the resampled differences (not in the report)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "deltas"}


def _resampled_scores(metric, stats: np.ndarray, idxs: np.ndarray) -> np.ndarray:
    return np.array([score_from_statistics(metric, s.sum(0)) for s in stats[idxs]])


def paired_bootstrap(references: list[str], systems: list[tuple[str, list[str]]], n_samples: int = 1000
                     ) -> tuple[dict[str, str], dict[str, dict[str, Paired]]]:
    """sacreBLEU's paired bootstrap of BLEU and chrF, every system against `systems[0]`.

    Returns ({metric: signature}, {system: {metric: Paired}}), metric in ("BLEU", "chrF"). The seed is sacreBLEU's
    (`SACREBLEU_SEED`, default 12345; it is in the signature). The draw of the resamples is sacreBLEU's, not a
    public API: each system's resampled scores are checked against the mean and interval that sacreBLEU reports, so
    that a release drawing them otherwise stops here instead of giving intervals of other resamples (unless
    `SACREBLEU_SEED=none`: then no two draws are the same anyway).
    """
    metrics = {"BLEU": sacrebleu.BLEU(), "chrF": sacrebleu.CHRF()}
    test = PairedTest(systems, metrics, [references], test_type="bs", n_samples=n_samples)
    signatures, scores = test()
    ours = dict(zip(test.metrics, metrics))  # sacreBLEU names chrF "chrF2"
    # the index draw of sacrebleu.significance._paired_bs_test, so that our intervals come from its resamples
    seed = sacrebleu_internal(test, "_seed") or None
    N = len(references)
    out: dict[str, dict[str, Paired]] = {name: {} for name, _ in systems}
    for key, metric in test.metrics.items():
        results = scores[key]
        base_stats = np.array(sentence_statistics(metric, systems[0][1], references), dtype="float32")
        base = results[0]
        out[systems[0][0]][ours[key]] = Paired(base.score, base.mean, base.ci)
        for (name, hyps), res in zip(systems[1:], results[1:]):
            idxs = np.random.default_rng(seed).choice(N, size=(test.n_samples, N), replace=True)
            stats = np.array(sentence_statistics(metric, hyps, references), dtype="float32")
            resampled = _resampled_scores(metric, stats, idxs)
            if seed is not None and not np.allclose(estimate_ci(resampled), (res.mean, res.ci), rtol=1e-9, atol=1e-9):
                raise RuntimeError(
                    f"sacrebleu {sacrebleu.__version__} draws its paired-bootstrap resamples otherwise than translator "
                    f"reproduces them ({key} of {name!r}: mean {resampled.mean()} vs sacreBLEU's {res.mean}); install a "
                    f"tested release: pip install 'sacrebleu{SACREBLEU_TESTED}'"
                )
            deltas = resampled - _resampled_scores(metric, base_stats, idxs)
            ordered = np.sort(deltas)
            lo = len(ordered) // 40  # sacrebleu.significance.estimate_ci's 95% convention
            p = 1.0 if np.array_equal(stats, base_stats) else res.p_value
            out[name][ours[key]] = Paired(res.score, res.mean, res.ci, res.score - base.score,
                                          (float(ordered[lo]), float(ordered[-lo - 1])), p, deltas)
    return {ours[k]: str(v) for k, v in signatures.items()}, out


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


def compare(checkpoints: list[str | os.PathLike], testsets: list[TestSet], beam: int = 5, batch_tokens: int = 4096,
            device: str = "auto", bootstrap: int = 1000, names: list[str] | None = None, length_penalty: float = LENGTH_PENALTY,
            examples: int = 5) -> Report:
    """Evaluate every checkpoint on every test set (one model in memory at a time); see the module docstring."""
    if not checkpoints or not testsets:
        raise CompareError("need at least one checkpoint and one test set")
    names = names or checkpoint_names(checkpoints)
    if len(names) != len(checkpoints) or len(set(names)) != len(names):
        raise CompareError(f"need one unique name per checkpoint, got {names}")
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
            out, seconds = timed_translate(model, tokenizer, ts.sources, beam, batch_tokens, length_penalty)
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
    if bootstrap > 0 and len(names) > 1:
        for ts in testsets:
            sigs, paired = paired_bootstrap(ts.references, [(n, hyps[n, ts.name]) for n in names], bootstrap)
            signatures["paired_bs"] = sigs
            for row in rows:
                if row["testset"] == ts.name:
                    for metric, result in paired[row["model"]].items():
                        row[metric.lower() + "_bs"] = result.to_dict()

    chosen = {ts.name: list(range(min(examples, len(ts.sources)))) for ts in testsets}
    example_rows = {
        ts.name: [{"source": ts.sources[i], "reference": ts.references[i], **{n: hyps[n, ts.name][i] for n in names}}
                  for i in chosen[ts.name]]
        for ts in testsets
    }
    settings = {
        "beam": beam, "length_penalty": length_penalty, "batch_tokens": batch_tokens, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(), "bootstrap": bootstrap, "torch": torch.__version__,
        "sacrebleu": sacrebleu.__version__, "tokenizer_pieces": tokenizer.vocab_size,
        "tokenizer_sha256": hashlib.sha256(tokenizer.to_bytes()).hexdigest(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    testset_rows = [{"name": ts.name, "where": ts.where, "sentences": len(ts.sources)} for ts in testsets]
    return Report(settings, signatures, ckpt_rows, testset_rows, rows, example_rows, logs, notes)


# ---- output ------------------------------------------------------------------------------------------------------
def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


# (key, header, formatter); training columns only when some checkpoint has them, significance only when computed
_COLUMNS = [
    ("model", "model", str),
    ("testset", "test set", str),
    ("parameters", "params", _count),
    ("non_embedding_parameters", "non-emb params", _count),
    ("steps", "steps", str),
    ("bleu", "BLEU", lambda v: f"{v:.2f}"),
    ("bleu_bs", "ΔBLEU [95% CI] (p)", None),
    ("chrf", "chrF", lambda v: f"{v:.2f}"),
    ("chrf_bs", "ΔchrF [95% CI] (p)", None),
    ("ppl", "PPL", lambda v: f"{v:.2f}"),
    ("sent_per_s", "decode sent/s", lambda v: f"{v:.1f}"),
    ("train_tok_per_s", "train tok/s", lambda v: f"{v:,.0f}"),
    ("train_wall_s", "train time", lambda v: f"{v / 3600:.2f} h" if v >= 3600 else f"{v / 60:.1f} min"),
]


def _format_paired(p: dict[str, Any]) -> str:
    if p.get("delta") is None:
        return "baseline"
    lo, hi = p["delta_ci"]
    return f"{p['delta']:+.2f} [{lo:+.2f}, {hi:+.2f}] (p={p['p_value']:.3f})"


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The keys of `_COLUMNS` that some row has a value for (so missing logs drop their columns)."""
    return [key for key, _, _ in _COLUMNS if any(r.get(key) is not None for r in rows)]


def markdown_table(report: Report) -> str:
    columns = table_columns(report.rows)
    spec = {key: (header, fmt) for key, header, fmt in _COLUMNS}
    lines = ["| " + " | ".join(spec[c][0] for c in columns) + " |",
             "|" + "|".join("---" if c in ("model", "testset") else "---:" for c in columns) + "|"]
    for r in report.rows:
        cells = []
        for c in columns:
            v, fmt = r.get(c), spec[c][1]
            cells.append("–" if v is None else _format_paired(v) if fmt is None else fmt(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_curves(logs: dict[str, TrainingLog], path: str | Path, against: str = "step") -> bool:
    """Validation perplexity and BLEU (those logged) of each run, against step or wall time ("time"); False when
    there is nothing to draw."""
    metrics = [m for m in ("val/ppl", "val/bleu") if any(m in lg.curves for lg in logs.values())]
    runs = {n: lg for n, lg in logs.items() if against == "step" or lg.elapsed}
    if not metrics or not runs:
        return False
    fig = _figure(5.5 * len(metrics), 4)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        for name, lg in runs.items():
            points = lg.curves.get(metric)
            if not points:
                continue
            steps, values = zip(*points)
            xs = [t / 3600 for t in lg.seconds_at(list(steps))] if against == "time" else steps
            ax.plot(xs, values, marker=".", label=name)
        ax.set_xlabel("training wall time (h)" if against == "time" else "step")
        ax.set_ylabel(metric)
        if metric == "val/ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def plot_length_buckets(report: Report, testset: str, path: str | Path) -> None:
    """Grouped bars: BLEU per source-length bucket, one bar per checkpoint."""
    rows = [r for r in report.rows if r["testset"] == testset]
    buckets = rows[0]["bleu_by_length"]
    fig = _figure(max(6.0, 1.2 * len(buckets) * max(1, len(rows)) / 2), 4)
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        xs = [i + (k - (len(rows) - 1) / 2) * width for i in range(len(buckets))]
        ax.bar(xs, [b["bleu"] or 0.0 for b in r["bleu_by_length"]], width, label=r["model"])
    ax.set_xticks(range(len(buckets)), labels=[f"{b['bucket']}\n(n={b['sentences']})" for b in buckets])
    ax.set_xlabel("source length (words)")
    ax.set_ylabel("BLEU")
    ax.set_title(testset, fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def write_report(report: Report, out_dir: str | os.PathLike, command: str | None = None) -> list[Path]:
    """Write report.json, the plots and report.md (which embeds them) into `out_dir`; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    curves: list[tuple[str, Path]] = []
    if report.logs:
        for against in ("step", "time"):
            path = out / f"curves_{against}.png"
            if plot_curves(report.logs, path, against):
                curves.append(("training step" if against == "step" else "training wall time", path))
    buckets_png = {}
    for ts in report.testsets:
        buckets_png[ts["name"]] = out / f"bleu_by_length_{_slug(ts['name'])}.png"
        plot_length_buckets(report, ts["name"], buckets_png[ts["name"]])
    written = [p for _, p in curves] + list(buckets_png.values())

    data = {
        "command": command, "settings": report.settings, "signatures": report.signatures,
        "columns": table_columns(report.rows), "rows": report.rows, "checkpoints": report.checkpoints,
        "testsets": report.testsets, "examples": report.examples, "notes": report.notes,
        "training_logs": {n: asdict(lg) for n, lg in report.logs.items()},
    }
    text = json.dumps(data, indent=2, ensure_ascii=False, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    (out / "report.json").write_text(text + "\n", encoding="utf-8")
    written.append(out / "report.json")

    s = report.settings
    md = ["# Checkpoint comparison", ""]
    if command:
        md += ["```", command, "```", ""]
    md += [
        (f"{s['date']}; device {s['device']} ({s['device_name']}), torch {s['torch']}; beam {s['beam']}, "
         f"length penalty {s['length_penalty']}, {s['batch_tokens']} source tokens per batch; shared tokenizer of "
         f"{s['tokenizer_pieces']} pieces (sha256 {s['tokenizer_sha256'][:12]})."), "",
        "Test sets: " + "; ".join(f"{t['name']} ({t['sentences']} pairs, {t['where']})" for t in report.testsets), "",
        markdown_table(report),
        "PPL: exp of the mean cross-entropy over the reference target tokens (`y1 .. yn </s>`) under teacher forcing. "
        "decode sent/s: wall time of beam search over the whole test set. "
        + ("Δ: difference to the first checkpoint with the 95% interval of the paired bootstrap resamples and "
           f"sacreBLEU's paired-bootstrap p-value ({s['bootstrap']} resamples). " if "paired_bs" in report.signatures
           else "")
        + "train tok/s: median of the logged `train/tok_per_s` (source + target tokens).", "",
        "sacreBLEU signatures:", "",
        f"- BLEU `{report.signatures['BLEU']}`",
        f"- chrF `{report.signatures['chrF']}`",
    ]
    for metric, sig in report.signatures.get("paired_bs", {}).items():
        md.append(f"- paired bootstrap, {metric} `{sig}`")
    md.append("")
    for against, path in curves:
        md += [f"## Validation curves against {against}", "", f"![validation curves]({path.name})", ""]
    for ts in report.testsets:
        rows = [r for r in report.rows if r["testset"] == ts["name"]]
        buckets = [b["bucket"] for b in rows[0]["bleu_by_length"]]
        md += [f"## BLEU by source length ({ts['name']})", "",
               "| model | " + " | ".join(f"{b} (n={x['sentences']})" for b, x in zip(buckets, rows[0]["bleu_by_length"])) + " |",
               "|---|" + "---:|" * len(buckets)]
        for r in rows:
            md.append(f"| {r['model']} | " + " | ".join("–" if b["bleu"] is None else f"{b['bleu']:.1f}"
                                                       for b in r["bleu_by_length"]) + " |")
        md += ["", f"![BLEU by source length]({buckets_png[ts['name']].name})", ""]
        if report.examples.get(ts["name"]):
            names = [c["name"] for c in report.checkpoints]
            md += [f"## Example translations ({ts['name']})", "", "| | " + " | ".join(["source", "reference", *names]) + " |",
                   "|---|" + "---|" * (2 + len(names))]
            for i, ex in enumerate(report.examples[ts["name"]], 1):
                md.append(f"| {i} | " + " | ".join(_md_escape(ex[k]) for k in ["source", "reference", *names]) + " |")
            md.append("")
    if report.notes:
        md += ["## Notes", ""] + [f"- {n}" for n in report.notes] + [""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    written.append(out / "report.md")
    return written
