#!/usr/bin/env python
"""Quality at equal budget: HF transformers peers against ours, same recipe, same data, same wall (or step) budget.

    python scripts/bench_quality.py --systems marian gpt2 encdec causal --minutes 14 --seeds 0 1 --out out/quality
    python scripts/bench_quality.py --systems encdec --steps 500 --tag post-ln \\
        --ours-arg=--model.init_args.config.norm_first=false --out out/ablation        # one ablation arm
    python scripts/bench_quality.py --report out/ablation                       # the table of every run so far

Systems, trained one after the other in this process's machine, each on the same token-budget batches:
- ``encdec`` / ``causal`` / ``prefix``: ours, trained by the real CLI (``translator fit --config RECIPE``, default
  ``configs/quickstart.yaml``, as ``scripts/quickstart.sh`` does; ``causal``/``prefix`` swap in the decoder-only
  module) in a subprocess, then decoded from the checkpoint of the best validation loss (``--ckpt best``, the peers'
  rule, which ``scripts/quickstart.sh`` tests too) with the library's default decoding settings;
- ``marian``: HF ``MarianMTModel`` of the same size (post-LN, N(0, 0.02) init, embeddings scaled by sqrt(d)), and
  ``gpt2``: HF ``GPT2LMHeadModel`` over ``src <sep> tgt`` with the loss on the target; both in a plain PyTorch loop
  with the recipe's optimiser, schedule, label smoothing, clipping and validation cadence (``--recipe`` as
  ``translator fit`` builds it: `translator.cli.build`, `translator.recipe`), keeping the weights of the best
  validation loss, decoded with ``generate(num_beams=5)``.

Every system sees the batches of ``translator.data.TranslationDataModule`` built from the recipe's data section
(the peers with ``pad_to_multiple=1``, what they were measured with) and the same SentencePiece model. Reported per
run: test BLEU / chrF / brevity penalty (beam 5, sacreBLEU 13a), validation BLEU (beam 5) and perplexity (over the
same target tokens ``y1 .. yn <eos>`` for every system), steps, real tokens per step, training tokens/s. Each run
appends one JSON line to ``OUT/runs.jsonl``; the table is printed from that file. ``transformers`` comes with
``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sacrebleu
import torch
import torch.nn.functional as F

from translator import checkpoint, recipe
from translator.cli import build
from translator.compare import read_testset
from translator.data import TranslationDataModule
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID, Tokenizer
from translator.translate import pad, translate

REPO = Path(__file__).resolve().parents[1]
OURS = {"encdec": None, "causal": "causal", "prefix": "bidirectional"}
PEERS = ("marian", "gpt2")


# ---- the recipe --------------------------------------------------------------------------------------------------
def recipe_args(args: argparse.Namespace, tokenizer: Path | None, seed: int) -> list[str]:
    """`translator fit` arguments of the recipe on the local Multi30k: ours trains with them, the peers are built
    from them (`translator.cli.build`)."""
    return ["--config", str(args.recipe.resolve()), "--data.path", str(Path(args.data).resolve()),
            "--data.val_split", "val", "--data.test_split", "test_2016_flickr", "--seed_everything", str(seed),
            *(["--data.tokenizer", str(tokenizer.resolve())] if tokenizer else []),
            *(["--model.init_args.preset", args.preset] if args.preset else [])]


def seconds(max_time: str) -> float:
    """Lightning's "DD:HH:MM:SS" as seconds."""
    d, h, m, s = (int(x) for x in max_time.split(":"))
    return ((d * 24 + h) * 60 + m) * 60 + s


# ---- evaluation, shared by every system ----------------------------------------------------------------------------
def score(hyps: list[str], refs: list[str]) -> dict[str, float]:
    bleu = sacrebleu.corpus_bleu(hyps, [refs])
    return {"bleu": bleu.score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score, "bp": bleu.bp,
            "sys_len": bleu.sys_len, "ref_len": bleu.ref_len}


def evaluate(translate_fn, nll_fn, tokenizer: Tokenizer, args) -> dict[str, Any]:
    """translate_fn(sentences) -> hypotheses; nll_fn(src (B,S), tgt (B,T+1)) -> summed NLL of tgt[:, 1:]."""
    out: dict[str, Any] = {}
    for split in ("val", "test_2016_flickr"):
        ts = read_testset(split, f"{args.data}/{split}.de.gz", f"{args.data}/{split}.en.gz", limit=args.eval_limit)
        start = time.perf_counter()
        hyps = translate_fn(ts.sources)
        name = "test" if split != "val" else "val"
        out[name] = {**score(hyps, ts.references), "decode_s": time.perf_counter() - start}
        if split == "val":
            out["val"]["ppl"] = target_perplexity(nll_fn, tokenizer, ts.sources, ts.references)
    out["examples"] = hyps[:3]
    return out


def target_perplexity(nll_fn, tokenizer: Tokenizer, sources: list[str], references: list[str]) -> float:
    """exp(mean NLL) over the target tokens `y1 .. yn <eos>`, the same tokens for every system."""
    src_ids = tokenizer.encode(sources)
    tgt_ids = [[BOS_ID, *t, EOS_ID] for t in tokenizer.encode(references)]
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(src_ids), 64):
            src = pad([s or [PAD_ID] for s in src_ids[i:i + 64]])
            tgt = pad(tgt_ids[i:i + 64])
            total += float(nll_fn(src, tgt))
            count += int((tgt[:, 1:] != PAD_ID).sum())
    return math.exp(total / count)


# ---- ours: the real CLI ----------------------------------------------------------------------------------------------
def run_ours(system: str, args, tokenizer: Path, seed: int, run_dir: Path) -> dict[str, Any]:
    fit = [*recipe_args(args, tokenizer, seed), "--trainer.enable_progress_bar", "false"]
    if OURS[system] is not None:
        fit += ["--model.class_path", "translator.module.DecoderOnlyModule",
                "--model.init_args.config.prefix_mode", OURS[system]]
    # a step budget lifts the recipe's time limit (and the reverse), so that a slow machine cannot cut a run short
    fit += (["--trainer.max_steps", str(args.steps), "--trainer.max_time", "null"] if args.steps else
            ["--trainer.max_steps", "1000000", "--trainer.max_time", args.max_time])
    fit += args.ours_arg
    cmd = [sys.executable, "-m", "translator.cli", "fit", *fit]
    start = time.perf_counter()
    pattern = "last.ckpt" if args.ckpt == "best" else args.ckpt
    if args.reuse and next(run_dir.rglob(pattern), None) is not None:
        print(f"reusing the trained {run_dir}: evaluating again", flush=True)
        proc = subprocess.CompletedProcess(cmd, 0)
    else:
        with open(run_dir / "fit.log", "w") as log:
            proc = subprocess.run(cmd, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"bench_quality.py: error: translator fit failed; see {run_dir / 'fit.log'}")
    ckpt = next(run_dir.rglob(pattern), None)
    if ckpt is None:
        raise SystemExit(f"bench_quality.py: error: no {pattern} under {run_dir}")
    if args.ckpt == "best":
        ckpt = checkpoint.best_of(ckpt)
    model, tok, meta = checkpoint.load(ckpt)
    raw = checkpoint.read(ckpt)
    dm = build(fit).datamodule  # the run's data, --ours-arg included
    result = {"steps": raw["global_step"], "train_s": checkpoint.training_seconds(raw), "fit_wall_s": wall,
              "tok_per_step": real_tokens_per_step(dm),
              "params": sum(p.numel() for p in model.parameters()),
              "command": " ".join(cmd), "checkpoint": str(ckpt.resolve().relative_to(run_dir.resolve()))}

    def nll(src, tgt):
        logits = model(src, tgt[:, :-1]).float()
        return F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD_ID, reduction="sum")

    result.update(evaluate(lambda s: [h[0].text for h in translate(model, tok, s, beam=args.beam)], nll, tok, args))
    # the same run's other weights, when the recipe keeps them: EMA's current weights (the same as the average in a
    # checkpoint saved after training ended: Lightning's callback copies the average over them then), and the mean
    # of periodic weights-only checkpoints (`avg-*.ckpt`: current weights) as scripts/average_checkpoints.py makes it
    others = {}
    if "current_model_state" in raw:
        others["raw"] = raw["current_model_state"]
    periodic = sorted(((checkpoint.read(p), p) for p in run_dir.rglob("avg-*.ckpt")), key=lambda c: c[0]["global_step"])
    if len(periodic) > 1:
        ckpts, paths = zip(*periodic)
        others[f"avg{len(paths)}"] = checkpoint.average(list(paths), list(ckpts))["state_dict"]
    for name, state in others.items():
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
        result[name] = evaluate(lambda s: [h[0].text for h in translate(model, tok, s, beam=args.beam)], nll, tok,
                                args)
    return result


def real_tokens_per_step(dm: TranslationDataModule, n: int = 200) -> float:
    """Mean non-pad tokens (source + target `y1 .. yn <eos>`) of the first n training batches of this data setup."""
    total, batches = 0, dm.batches("train")
    for i, batch in zip(range(n), batches):
        total += int((batch["src"] != PAD_ID).sum()) + int((batch["tgt"][:, 1:] != PAD_ID).sum())
    return total / n


# ---- the HF peers: a plain PyTorch loop -------------------------------------------------------------------------------
def build_peer(system: str, vocab_size: int, preset: str, dropout: float):
    """The HF model of the same size as our `preset` (layers, width, heads, FFN) and the same vocabulary."""
    import transformers

    from translator.config import DecoderOnlyConfig, Seq2SeqConfig

    s2s, dec = Seq2SeqConfig.preset(preset), DecoderOnlyConfig.preset(preset)
    d, heads, ff = s2s.d_model, s2s.n_heads, s2s.d_ff
    if system == "marian":
        config = transformers.MarianConfig(
            vocab_size=vocab_size, d_model=d, encoder_layers=s2s.n_encoder_layers, decoder_layers=s2s.n_decoder_layers, encoder_attention_heads=heads,
            decoder_attention_heads=heads, encoder_ffn_dim=ff, decoder_ffn_dim=ff, activation_function="relu",
            dropout=dropout, attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=512,
            scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
            pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID, decoder_start_token_id=BOS_ID,
            forced_eos_token_id=EOS_ID, decoder_vocab_size=vocab_size)
        return transformers.MarianMTModel(config)
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=1024, n_embd=d, n_layer=dec.n_layers, n_head=heads, n_inner=ff,
        activation_function="relu", resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=0.0,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=True)
    return transformers.GPT2LMHeadModel(config)


def gpt2_rows(src: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `src <sep> y1 .. yn <eos>` rows and their labels (-100 except at target tokens)."""
    rows, labels = [], []
    for s, t in zip(src.tolist(), tgt.tolist()):
        s = [x for x in s if x != PAD_ID]
        t = [x for x in t[1:] if x != PAD_ID]
        rows.append(torch.tensor([*s, SEP_ID, *t]))
        labels.append(torch.tensor([-100] * (len(s) + 1) + t))
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=PAD_ID)
    return ids, torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)


def peer_loss(system: str, model, src: torch.Tensor, tgt: torch.Tensor, smoothing: float,
              reduction: str = "mean") -> torch.Tensor:
    if system == "marian":
        logits = model(input_ids=src, attention_mask=src != PAD_ID, decoder_input_ids=tgt[:, :-1],
                       decoder_attention_mask=tgt[:, :-1] != PAD_ID).logits
        labels = tgt[:, 1:]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=PAD_ID,
                               label_smoothing=smoothing, reduction=reduction)
    ids, labels = gpt2_rows(src, tgt)
    logits = model(input_ids=ids, attention_mask=ids != PAD_ID).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           label_smoothing=smoothing, reduction=reduction)


def peer_translate(system: str, model, tokenizer: Tokenizer, sentences: list[str], beam: int) -> list[str]:
    model.eval()
    ids = tokenizer.encode([s.strip() for s in sentences])
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [""] * len(ids)
    gen = dict(num_beams=beam, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False)
    with torch.inference_mode():
        for i in range(0, len(order), 64):
            batch = [ids[j] or [EOS_ID] for j in order[i:i + 64]]
            S = max(map(len, batch))
            if system == "marian":
                src = pad(batch)
                hyp = model.generate(input_ids=src, attention_mask=src != PAD_ID, max_new_tokens=int(1.2 * S + 10),
                                     decoder_start_token_id=BOS_ID, **gen)[:, 1:]
            else:  # left-padded prompts `src <sep>`
                rows = [[PAD_ID] * (S - len(b)) + b + [SEP_ID] for b in batch]
                src = torch.tensor(rows)
                hyp = model.generate(input_ids=src, attention_mask=src != PAD_ID, max_new_tokens=int(1.2 * S + 10),
                                     **gen)[:, src.size(1):]
            for j, row in zip(order[i:i + 64], hyp.tolist()):
                row = row[: row.index(EOS_ID)] if EOS_ID in row else row
                out[j] = tokenizer.decode([[x for x in row if x != PAD_ID]])[0]
    return out


def run_peer(system: str, args, tokenizer: Path, seed: int, run_dir: Path) -> dict[str, Any]:
    """Train an HF peer with the recipe as `translator fit` builds it: its module's hyper-parameters (preset, dropout,
    label smoothing, `translator.recipe`'s optimiser and schedule), its trainer's clipping and validation cadence,
    its data (batches not padded to a multiple, and shuffled by the run's seed)."""
    cli = build([*recipe_args(args, tokenizer, seed), "--data.seed", str(seed), "--data.pad_to_multiple", "1"])
    hp, dm, tr = cli.model.hparams, cli.datamodule, cli.trainer
    dm.setup("fit")
    torch.manual_seed(seed)
    model = build_peer(system, dm.vocab_size, hp.preset, cli.model.config.dropout)
    optimizer = recipe.adamw(model, hp.lr, hp.weight_decay)
    schedule = recipe.lr_schedule(optimizer, hp.schedule, hp.warmup_steps, args.steps)
    smoothing, clip = hp.label_smoothing, tr.gradient_clip_val
    # validation every val_check_interval steps (an int; the train stream is endless: no epochs), on
    # limit_val_batches batches (an int; else all of them)
    val_every = cli.config.trainer.val_check_interval
    val_every = val_every if isinstance(val_every, int) else None
    val_batches = tr.limit_val_batches if isinstance(tr.limit_val_batches, int) else None
    budget = None if args.steps else seconds(args.max_time)
    amp = str(tr.precision) == "bf16-mixed"  # the recipe's precision, as the Trainer resolved it for this CPU
    best, best_loss, step, tokens, train_s = None, math.inf, 0, 0, 0.0
    start = time.perf_counter()
    model.train()
    for batch in dm.train_dataloader():
        src, tgt = batch["src"], batch["tgt"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = peer_loss(system, model, src, tgt, smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        step += 1
        tokens += int((src != PAD_ID).sum()) + int((tgt[:, 1:] != PAD_ID).sum())
        elapsed = time.perf_counter() - start
        done = (args.steps and step >= args.steps) or (budget is not None and elapsed >= budget)
        if (val_every and step % val_every == 0) or done:
            train_s = elapsed
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):  # as Lightning validates
                val_loss = validate_peer(system, model, dm, val_batches)
            if val_loss < best_loss:
                best, best_loss = copy.deepcopy(model.state_dict()), val_loss
            model.train()
        if done:
            break
    train_s = time.perf_counter() - start
    if best is not None:
        model.load_state_dict(best)
    model.eval()
    result = {"steps": step, "train_s": train_s, "tok_per_step": tokens / step,
              "params": sum(p.numel() for p in model.parameters()), "checkpoint": "best val/loss",
              "command": " ".join(sys.argv)}
    tok = dm.tokenizer
    result.update(evaluate(lambda s: peer_translate(system, model, tok, s, args.beam),
                           lambda src, tgt: peer_loss(system, model, src, tgt, 0.0, "sum"), tok, args))
    return result


def validate_peer(system: str, model, dm: TranslationDataModule, n_batches: int | None) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i, batch in enumerate(dm.val_dataloader()):
            if n_batches is not None and i >= n_batches:
                break
            total += float(peer_loss(system, model, batch["src"], batch["tgt"], 0.0, "sum"))
            count += int((batch["tgt"][:, 1:] != PAD_ID).sum())
    return total / max(count, 1)


# ---- the table -----------------------------------------------------------------------------------------------------
COLUMNS = ("system", "tag", "seed", "steps", "tok/step", "tok/s", "val ppl", "val BLEU", "test BLEU", "chrF", "BP")


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in runs:
        per_step = r["tok_per_step"]
        tps = per_step * r["steps"] / r["train_s"]
        cells = [r["system"], r.get("tag") or "", r["seed"], r["steps"], f"{per_step:,.0f}", f"{tps:,.0f}",
                 f"{r['val']['ppl']:.2f}", f"{r['val']['bleu']:.2f}", f"{r['test']['bleu']:.2f}",
                 f"{r['test']['chrf']:.1f}", f"{r['test']['bp']:.3f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", nargs="+", default=["marian", "gpt2", "encdec", "causal"],
                   choices=[*PEERS, *OURS])
    p.add_argument("--recipe", type=Path, default=REPO / "configs" / "quickstart.yaml")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "multi30k"),
                   help="a local Multi30k directory (splits train, val, test_2016_flickr)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="wall-clock training budget per run (default: the recipe's)")
    budget.add_argument("--steps", type=int, help="a step budget instead of a wall-clock one")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--preset", help="override the recipe's model preset for every system (tiny: smoke runs)")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N pairs of each split only (smoke runs)")
    p.add_argument("--ckpt", default="best", help="which of our checkpoints to test: best (the best validation loss, "
                   "the peers' rule too: checkpoint.best_of), or a file name pattern such as last.ckpt")
    p.add_argument("--ours-arg", action="append", default=[], help="an extra `translator fit` argument for ours "
                   "(repeatable; write it as --ours-arg=--model.init_args.config.norm_first=false)")
    p.add_argument("--reuse", action="store_true", help="ours: evaluate a run already trained in OUT again instead "
                   "of training it (e.g. after changing the decoding defaults)")
    p.add_argument("--tag", default="", help="a name for this variant in the table")
    p.add_argument("--out", type=Path, default=Path("out/bench_quality"))
    p.add_argument("--report", type=Path, metavar="OUT", help="print the table of OUT/runs.jsonl and exit")
    args = p.parse_args(argv)
    if not args.recipe.is_file():
        p.error(f"--recipe {args.recipe}: no such file")
    if args.report is None and not Path(args.data, "train.de.gz").is_file():
        p.error(f"--data {args.data}: no train.de.gz there")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        runs = [json.loads(line) for line in (args.report / "runs.jsonl").read_text().splitlines() if line]
        print(table(runs))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    # one tokenizer for every system: trained once from the recipe's data settings, cached under OUT
    base = build([*recipe_args(args, None, args.seeds[0]), "--data.tokenizer_dir", str(args.out / "tokenizers")])
    base.datamodule.prepare_data()
    tokenizer = base.datamodule.tokenizer_path
    minutes = args.minutes
    args.max_time = (f"00:00:{int(minutes):02d}:{round(60 * (minutes % 1)):02d}" if minutes is not None
                     else base.config.trainer.max_time or "00:00:14:00")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    runs = []
    for seed in args.seeds:
        for system in args.systems:
            run_dir = args.out / f"{system}{'-' + args.tag if args.tag else ''}-seed{seed}"
            run_dir.mkdir(parents=True, exist_ok=True)
            print(f"== {system} {args.tag} seed {seed}", flush=True)
            run = run_peer if system in PEERS else run_ours
            result = run(system, args, tokenizer, seed, run_dir)
            result.update(system=system, tag=args.tag, seed=seed, machine=machine,
                          budget={"steps": args.steps} if args.steps else {"max_time": args.max_time})
            with open(args.out / "runs.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            runs.append(result)
            print(table([result]).splitlines()[-1], flush=True)
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
