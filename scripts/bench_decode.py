#!/usr/bin/env python
"""Decoding speed (sentences/s, tokens/s), greedy and beam search, on Multi30k test2016: ours against HF generate().

    python scripts/bench_decode.py --json out/bench_decode.json                       # H100, random-init base models
    python scripts/bench_decode.py --checkpoint checkpoints/encdec/last.ckpt checkpoints/decoder_only/last.ckpt \
        --json out/bench_decode.json                                                  # + the trained models
    python scripts/bench_decode.py --device cpu --limit 32                            # CPU smoke test

Two kinds of rows:

* Trained models (``--checkpoint``, either architecture): ``generate.greedy`` / ``generate.beam_search`` on the
  test sources with their real stopping rule (eos, or ``int(1.2 * source length + 10)`` tokens), and the whole
  ``translate.translate()`` path (tokenise, batch, search, detokenise), with BLEU against ``--ref``.
* On the CPU, end to end like the ``translate()`` rows (same sentences, beams and BLEU): the checkpoint through
  ``translator.quantize`` (``--quantize int8``, the default; ``bf16``), exported to CTranslate2 (``--ctranslate2
  float32 int8``, the default) and run by ``translator.engines.CTranslate2Engine``, and exported to ONNX and run by
  ONNX Runtime (``--onnx``).
* The comparison with Hugging Face, always on randomly initialised models of the same size and configuration:
  ours (``Seq2SeqTransformer`` / ``DecoderOnlyTransformer``, preset ``--preset`` or the checkpoint's config) against
  ``MarianMTModel`` / ``GPT2LMHeadModel`` (``translator.bench.hf_model``). Fairness rule: **both sides run
  exactly the same number of decoder steps on the same batches**. Per batch, L = int(1.2 * longest source + 10);
  ours gets ``max_len_a=0, max_len_b=L`` and its eos row of the tied output layer is zeroed, so eos has logit 0
  while the top candidates of 8000 random logits are positive: every hypothesis runs to L tokens and is then
  closed with eos, L + 1 decoder steps. HF gets ``min_new_tokens = max_new_tokens = L + 1`` (eos suppressed until
  then): also L + 1 steps. So sentences/s and tokens/s ratios are the same number; tokens = sentences x (L + 1).
  Both run under bf16 autocast on CUDA (fp32 on CPU), with the KV cache, ``num_beams`` = our beam size, length
  penalty 1, early stopping. GPT-2 gets the source left-padded (``src <sep>``) because HF's decoder-only generation
  needs left padding; ours takes the same sentences right-padded (its position ids skip pads).

Batches: `translate.token_batches` over the source lengths (longest first, ``--batch-tokens`` padded source tokens),
the same list for every row. Timing: one untimed warm-up batch, then the whole set between two synchronisations.
Prints markdown tables and writes ``--json``.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import sys
import time
from pathlib import Path

import sacrebleu
import torch
from torch import Tensor, nn

from translator import checkpoint, generate, quantize
from translator.bench import autocast, hf_model, load_tokenizer, machine, sync, write_json
from translator.config import TransformerConfig
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID, Tokenizer
from translator.translate import encode_sources, pad, resolve_device, token_batches, translate

log = logging.getLogger("bench_decode")
MAX_LEN_A, MAX_LEN_B = 1.2, 10  # generate's defaults


def read_lines(path: Path, limit: int | None) -> list[str]:
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    return lines[:limit] if limit else lines


def timed(fn, batches: list, device: torch.device, warm=None) -> tuple[float, list]:
    """Run fn on `warm` (default batches[0]) once, untimed, then on every batch; returns (seconds, outputs)."""
    with autocast(device):
        fn(batches[0] if warm is None else warm)
        sync(device)
        start = time.perf_counter()
        outs = [fn(b) for b in batches]
        sync(device)
    return time.perf_counter() - start, outs


def search(model: nn.Module, src: Tensor, beam: int, max_len_a: float, max_len_b: float, static: bool = False
           ) -> list[list[int]]:
    """Token ids of the best hypothesis per sentence: `generate.greedy` for beam 1, else `generate.beam_search`;
    static: their fixed-shape form, one CUDA graph per batch on a GPU. Beam search with HF's rules in the comparison
    (score / len, early stopping), which decodes every hypothesis to the cap anyway."""
    if beam == 1:
        return generate.greedy(model, src, max_len_a, max_len_b, static=static)
    return [h[0].tokens for h in generate.beam_search(model, src, beam, 1.0, max_len_a, max_len_b, static=static,
                                                      penalty="average", early_stopping=True)]


def search_label(beam: int, static: bool, device: torch.device) -> str:
    label = "greedy" if beam == 1 else f"beam{beam}"
    return f"{label} {'graphs' if device.type == 'cuda' else 'static'}" if static else label


def row(model: str, arch: str, search: str, rule: str, n_sent: int, n_tok: int, seconds: float, **extra) -> dict:
    r = {"model": model, "arch": arch, "search": search, "length_rule": rule, "sentences": n_sent, "tokens": n_tok,
         "seconds": seconds, "sent_per_s": n_sent / seconds, "tok_per_s": n_tok / seconds, **extra}
    log.info("%s %s %s: %.1f sent/s, %.0f tok/s", model, arch, search, r["sent_per_s"], r["tok_per_s"])
    return r


# ---- trained checkpoints: the real stopping rule -----------------------------------------------------------------
def checkpoint_rows(path: str, sentences: list[str], refs: list[str] | None, args, device: torch.device) -> tuple[
        list[dict], nn.Module, Tokenizer, str]:
    model, tokenizer, meta = checkpoint.load(path, map_location=device)
    arch, name = meta["arch"], f"ours:{Path(path).name}"
    ids = encode_sources(tokenizer, sentences)
    order = token_batches([len(s) for s in ids], args.batch_tokens)
    batches = [pad([ids[i] for i in b], device) for b in order]
    flat = [i for b in order for i in b]
    rows = []

    def bleu(hyps_by_batch: list[list[list[int]]]) -> float | None:
        if refs is None:
            return None
        texts = [""] * len(sentences)
        for i, text in zip(flat, tokenizer.decode([h for batch in hyps_by_batch for h in batch])):
            texts[i] = text
        return sacrebleu.corpus_bleu(texts, [refs]).score

    warm = batches[0][:8]
    for beam, static in [(b, st) for b in args.beams for st in args.static]:
        try:
            secs, outs = timed(lambda src, k=beam, st=static: search(model, src, k, MAX_LEN_A, MAX_LEN_B, st),
                               batches, device, warm)
        except Exception:  # one failing row (a CUDA-graph capture, an OOM) must not lose the others
            log.exception("%s %s failed", name, search_label(beam, static, device))
            continue
        n_tok = sum(len(h) + 1 for batch in outs for h in batch)  # + eos
        rows.append(row(name, arch, search_label(beam, static, device), "eos or 1.2*src+10", len(flat), n_tok, secs,
                        bleu=bleu(outs)))
    rows += end_to_end_rows(name, arch, lambda s, k: translate(model, tokenizer, s, beam=k,
                                                               batch_tokens=args.batch_tokens),
                            sentences, refs, args.beams, device)
    if device.type == "cpu":
        for kind in args.quantize:  # translator.quantize: the same search over int8 / bf16 weights
            small = quantize.for_cpu(model, kind)
            rows += end_to_end_rows(f"ours {kind}:{Path(path).name}", arch,
                                    lambda s, k, m=small: translate(m, tokenizer, s, beam=k,
                                                                    batch_tokens=args.batch_tokens),
                                    sentences, refs, args.beams, device)
        rows += engine_rows(path, model, tokenizer, sentences, refs, args)
    return rows, model, tokenizer, arch


def end_to_end_rows(name: str, arch: str, run, sentences: list[str], refs: list[str] | None, beams: list[int],
                    device: torch.device) -> list[dict]:
    """One row per beam for ``run(sentences, beam) -> [[Translation, ...], ...]`` timed whole (tokenise, batch,
    search, detokenise) after an untimed warm-up on 8 sentences, with BLEU against ``refs``."""
    run(sentences[:8], max(beams))
    rows = []
    for beam in beams:
        sync(device)
        start = time.perf_counter()
        out = run(sentences, beam)
        sync(device)
        secs = time.perf_counter() - start
        n_tok = sum(len(t[0].tokens) + 1 for t in out)  # + eos
        score = sacrebleu.corpus_bleu([t[0].text for t in out], [refs]).score if refs else None
        rows.append(row(name, arch, f"translate() beam{beam}", "eos or 1.2*src+10, end to end", len(sentences),
                        n_tok, secs, bleu=score))
    return rows


def engine_rows(path: str, model: nn.Module, tokenizer: Tokenizer, sentences: list[str], refs: list[str] | None,
                args) -> list[dict]:
    """The checkpoint exported by `translator export` and run end to end by `translator.engines` on as many threads
    as torch uses, the same sentences and beams as the translate() rows:

    * CTranslate2 at each ``--ctranslate2`` quantization: its own search: score / len**1 as ours, but it stops at
      `beam` finished hypotheses (ours searches on while one can still be beaten), so beam BLEU may differ a little;
      greedy fp32 finds our tokens. No rows for a model CTranslate2 cannot express (the prefix-LM) or without the
      ctranslate2 package.
    * ONNX Runtime (``--onnx``): our search over the exported encoder / decoder-step graphs."""
    import importlib.util
    import tempfile

    from translator.engines import CTranslate2Engine, OnnxEngine
    from translator.export import ctranslate2_unsupported, export_ctranslate2
    from translator.onnx_export import export_onnx

    arch = "seq2seq" if hasattr(model, "encoder") else "decoder_only"
    engines = []
    reason = ctranslate2_unsupported(model)
    if args.ctranslate2 and (importlib.util.find_spec("ctranslate2") is None or reason is not None):
        log.warning("%s: no CTranslate2 rows: %s", path, reason or "ctranslate2 is not installed (the serve extra)")
    elif args.ctranslate2:
        engines += [(f"ctranslate2 {q}", lambda out, q=q: CTranslate2Engine(
            export_ctranslate2(model, tokenizer, out, q, source=path), threads=torch.get_num_threads()))
            for q in args.ctranslate2]
    if args.onnx:
        engines.append(("onnxruntime", lambda out: OnnxEngine(export_onnx(model, tokenizer, out, source=path),
                                                              threads=torch.get_num_threads())))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        for i, (label, make) in enumerate(engines):
            engine = make(Path(tmp) / str(i))
            rows += end_to_end_rows(f"{label}:{Path(path).name}", arch,
                                    lambda s, k, e=engine: e.translate(s, beam=k, batch_tokens=args.batch_tokens),
                                    sentences, refs, args.beams, torch.device("cpu"))
    return rows


# ---- the fixed-length comparison with Hugging Face ---------------------------------------------------------------
def random_ours(arch: str, cfg: TransformerConfig, device: torch.device) -> nn.Module:
    """A randomly initialised model whose eos logit is always 0 (eos row of the output layer zeroed): it never ends a
    hypothesis early, so it decodes exactly to the length cap."""
    torch.manual_seed(0)
    model = checkpoint.ARCHS[arch][1](cfg).to(device).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS_ID].zero_()
    return model


def gpt2_prompt(src: Tensor) -> tuple[Tensor, Tensor]:
    """Right-padded sources (B, S) -> left-padded `src <sep>` (B, S+1) and its attention mask, for HF generate."""
    keep = src != PAD_ID
    lens = keep.sum(1) + 1  # with <sep>
    width = int(lens.max())
    ids = torch.full((src.size(0), width), PAD_ID, dtype=torch.long, device=src.device)
    for i, n in enumerate(lens.tolist()):
        ids[i, width - n:] = torch.cat([src[i, : n - 1], src.new_tensor([SEP_ID])])
    return ids, (ids != PAD_ID).long()


def hf_generate(model: nn.Module, arch: str, inputs: tuple[Tensor, Tensor], beam: int, steps: int) -> Tensor:
    kw = {"max_new_tokens": steps, "min_new_tokens": steps, "num_beams": beam, "do_sample": False,
          "pad_token_id": PAD_ID, "eos_token_id": EOS_ID, "use_cache": True, "length_penalty": 1.0}
    if beam > 1:
        kw["early_stopping"] = True
    if arch == "seq2seq":
        kw["decoder_start_token_id"] = BOS_ID
    ids, mask = inputs
    return model.generate(input_ids=ids, attention_mask=mask, **kw)


def comparison_rows(arch: str, cfg: TransformerConfig, tokenizer: Tokenizer, sentences: list[str], args,
                    device: torch.device) -> list[dict]:
    ids = encode_sources(tokenizer, sentences)
    order = token_batches([len(s) for s in ids], args.batch_tokens)
    srcs = [pad([ids[i] for i in b], device) for b in order]
    caps = [int(MAX_LEN_A * int((s != PAD_ID).sum(1).max()) + MAX_LEN_B) for s in srcs]  # L per batch
    n_sent = sum(len(b) for b in order)
    n_tok = sum(len(b) * (L + 1) for b, L in zip(order, caps))  # L tokens + eos, on both sides
    rule = "fixed: L+1 steps/batch"
    rows = []
    ours = random_ours(arch, cfg, device)
    for beam, static in [(b, st) for b in args.beams for st in args.static]:
        label = search_label(beam, static, device)
        jobs, warm = list(zip(srcs, caps)), (srcs[0][:8], 4)  # warm-up: a few rows, a few steps
        try:
            secs, outs = timed(lambda job, k=beam, st=static: search(ours, job[0], k, 0.0, job[1], st), jobs, device,
                               warm)
        except Exception:  # one failing row (a CUDA-graph capture, an OOM) must not lose the others
            log.exception("ours %s %s failed", arch, label)
            continue
        short = sum(len(h) < L for batch, L in zip(outs, caps) for h in batch)
        if short:
            log.warning("ours %s %s: %d hypotheses ended before L (eos chosen); tokens/s overstates it", arch, label,
                        short)
        rows.append(row("ours (random init)", arch, label, rule, n_sent, n_tok, secs, early_eos=short))
    for beam in args.beams:  # the whole translate() path on the same model: per-sentence caps, no eos
        sync(device)
        start = time.perf_counter()
        out = translate(ours, tokenizer, sentences, beam=beam, batch_tokens=args.batch_tokens)
        sync(device)
        rows.append(row("ours (random init)", arch, f"translate() beam{beam}", "1.2*src+10 per sentence, end to end",
                        len(sentences), sum(len(t[0].tokens) + 1 for t in out), time.perf_counter() - start))
    ours = None  # free it before building the HF model
    try:
        hf = hf_model(arch, cfg).to(device).eval()
    except ImportError:
        log.warning("transformers is not installed: no Hugging Face rows (pip install transformers)")
        return rows
    inputs = [(s, (s != PAD_ID).long()) if arch == "seq2seq" else gpt2_prompt(s) for s in srcs]
    name = f"hf {type(hf).__name__}"
    for beam in args.beams:
        jobs, warm = list(zip(inputs, caps)), ((inputs[0][0][:8], inputs[0][1][:8]), 4)
        with torch.inference_mode():
            secs, outs = timed(lambda job, k=beam: hf_generate(hf, arch, job[0], k, job[1] + 1), jobs, device, warm)
        new = [o.size(1) - (1 if arch == "seq2seq" else job[0][0].size(1)) for o, job in zip(outs, jobs)]
        if any(n != L + 1 for n, L in zip(new, caps)):
            log.warning("%s %s: generated %s steps, expected %s", name, beam, new, [L + 1 for L in caps])
        rows.append(row(name, arch, "greedy" if beam == 1 else f"beam{beam}", rule, n_sent, n_tok, secs))
    return rows


def ratio_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r["model"] != "ours (random init)" or r["search"].startswith("translate"):
            continue
        hf = next((h for h in rows if h["model"].startswith("hf ") and h["arch"] == r["arch"]
                   and h["search"] == r["search"].split()[0]), None)
        if hf:
            out.append({"arch": r["arch"], "search": r["search"], "ours_over_hf": r["sent_per_s"] / hf["sent_per_s"]})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | arch | search | length rule | sentences | sent/s | tok/s | BLEU |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bleu = "-" if r.get("bleu") is None else f"{r['bleu']:.2f}"
        lines.append(f"| {r['model']} | {r['arch']} | {r['search']} | {r['length_rule']} | {r['sentences']} | "
                     f"{r['sent_per_s']:,.1f} | {r['tok_per_s']:,.0f} | {bleu} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--checkpoint", nargs="+", default=[], help="translator .ckpt files (either architecture)")
    p.add_argument("--archs", nargs="+", choices=list(checkpoint.ARCHS),
                   help="architectures for the HF comparison (default: the checkpoints', else both)")
    p.add_argument("--preset", default="base", help="size of the random-init models when no checkpoint gives one")
    p.add_argument("--src", type=Path, default=Path("../shared/data/multi30k/test_2016_flickr.de.gz"))
    p.add_argument("--ref", type=Path, default=Path("../shared/data/multi30k/test_2016_flickr.en.gz"),
                   help="references for BLEU of the checkpoint rows (skipped when missing)")
    p.add_argument("--limit", type=int, help="first N sentences only")
    p.add_argument("--beams", nargs="+", type=int, default=[1, 5], help="1 = greedy")
    p.add_argument("--batch-tokens", type=int, default=4096, help="padded source tokens per batch (translate's)")
    p.add_argument("--data", default="../shared/data/multi30k", help="tokenizer training data (no checkpoint)")
    p.add_argument("--tokenizer", help="a trained .model file (no checkpoint)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--static", nargs="+", type=lambda v: {"no": False, "yes": True}[v], default=[False, True],
                   metavar="{no,yes}", help="our search dynamic (no), static (yes: CUDA graphs on a GPU), or both")
    p.add_argument("--no-hf", action="store_true", help="skip the HF comparison")
    p.add_argument("--ctranslate2", nargs="*", default=["float32", "int8"], metavar="QUANT",
                   help="on --device cpu, also run each checkpoint exported to CTranslate2 at these quantizations "
                        "(none: skip; needs the serve extra)")
    p.add_argument("--quantize", nargs="*", default=["int8"], choices=["int8", "bf16"],
                   help="on --device cpu, also run each checkpoint through translator.quantize (none: skip)")
    p.add_argument("--onnx", action="store_true", help="on --device cpu, also run each checkpoint exported to ONNX "
                                                       "through ONNX Runtime (needs the serve extra)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if any(b < 1 for b in args.beams) or args.batch_tokens < 1 or (args.limit is not None and args.limit < 1):
        p.error("beams, --batch-tokens and --limit must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    sentences = read_lines(args.src, args.limit)
    refs = read_lines(args.ref, args.limit) if args.ref and args.ref.is_file() else None
    rows, models = [], {}
    for path in args.checkpoint:
        ckpt_rows, model, tokenizer, arch = checkpoint_rows(path, sentences, refs, args, device)
        rows += ckpt_rows
        models.setdefault(arch, (model.config, tokenizer))
        del model
    if not args.no_hf:
        archs = args.archs or list(models) or list(checkpoint.ARCHS)
        shared = None
        for arch in archs:
            if arch in models:
                cfg, tokenizer = models[arch]
            else:
                shared = shared or load_tokenizer(args.data, args.vocab_size, args.tokenizer)
                config_class = checkpoint.ARCHS[arch][0]
                cfg, tokenizer = config_class.preset(args.preset, vocab_size=shared.vocab_size), shared
            rows += comparison_rows(arch, cfg, tokenizer, sentences, args, device)
    ratios = ratio_rows(rows)
    print(f"\n## Decoding, {args.src.name} ({len(sentences)} sentences), {machine(device).get('gpu', 'CPU')}\n")
    print(markdown(rows))
    if ratios:
        print("\n| arch | search | ours / HF (sent/s = tok/s) |\n|---|---|---|")
        for r in ratios:
            print(f"| {r['arch']} | {r['search']} | {r['ours_over_hf']:.2f}x |")
    write_json(args.json, {"machine": machine(device), "command": " ".join(sys.argv), "rows": rows, "ratios": ratios,
                           "args": vars(args)})
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
