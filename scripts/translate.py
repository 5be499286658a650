#!/usr/bin/env python
"""Translate German sentences with a trained translator checkpoint (either architecture), in PyTorch, CTranslate2 or
ONNX Runtime.

    python scripts/translate.py --checkpoint checkpoints/encdec/last.ckpt "Ein Hund läuft durch den Schnee."
    python scripts/translate.py --checkpoint CKPT --input test.de.gz --reference test.en.gz --output out.en
    zcat test.de.gz | python scripts/translate.py --checkpoint CKPT --nbest 3 > nbest.tsv
    translator export --checkpoint CKPT --format ctranslate2 --quantization int8 --out ct2/
    python scripts/translate.py --model ct2/ --input test.de.gz      # the engine is the directory's format

Input: the sentence arguments, else one sentence per line from --input (plain or gzip) or stdin. Output: one line
per input line, in input order (empty in, empty out); with --nbest N a TSV `line_no, rank, score, translation`
(1-based), N rows per line (one for an empty line). Errors (unreadable checkpoint, bad input) are one line on
stderr and exit code 2. The work is done by `translator.translate` and `translator.engines`.

Engines (--engine): `torch` (default with --checkpoint) runs our model; `ctranslate2` and `onnx` run a directory
written by `translator export` (--model DIR; default: the directory's own format), or export --checkpoint on the fly
into a temporary directory (float32) first. `onnx` runs our own search over ONNX Runtime's graphs (same hypotheses and
scores as torch); `ctranslate2` runs CTranslate2's search, which normalises by len**alpha only (--penalty average, the
default), stops at --beam finished hypotheses whatever --early-stopping says, and gives scores of its own. Both run on
the CPU; --static and --attention are torch's.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import re
import sys
import tempfile
from pathlib import Path

from translator.generate import MIN_LEN, add_search_arguments

log = logging.getLogger("translate")
ENGINES = ("torch", "ctranslate2", "onnx")


class InputError(ValueError):
    """Input that cannot be used as given (unreadable file, invalid UTF-8, mismatched reference)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sentences", nargs="*", metavar="SENTENCE", help="sentences to translate (else --input/stdin)")
    parser.add_argument("--checkpoint", help="a translator .ckpt")
    parser.add_argument("--model", metavar="DIR", help="a directory written by `translator export` (instead of "
                                                       "--checkpoint)")
    parser.add_argument("--engine", choices=ENGINES, help="torch (default with --checkpoint), ctranslate2 or onnx "
                                                          "(default with --model: the directory's format)")
    parser.add_argument("--beam", type=int, default=5, help="beam size (1: greedy)")
    parser.add_argument("--nbest", type=int, help="write the N best per line as TSV: line_no, rank, score, text")
    add_search_arguments(parser)
    parser.add_argument("--min-len", type=int, default=MIN_LEN,
                        help="tokens before the end of a translation may come (0: a translation may be empty)")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="padded source tokens per batch")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--input", help="one sentence per line, plain or gzip (default: stdin)")
    parser.add_argument("--output", help="write translations here (.gz: gzip) instead of stdout")
    parser.add_argument("--reference", help="reference translations (one per input line): print BLEU and chrF")
    parser.add_argument("--max-input-tokens", type=int, default=256, help="truncate longer inputs (with a warning)")
    parser.add_argument("--attention", metavar="PNG", help="draw the first sentence's attention heatmap here")
    parser.add_argument("--quantize", choices=("none", "int8", "bf16"), default="none",
                        help="CPU only, --engine torch: int8 linear layers (dynamic quantisation) or bf16 weights "
                             "(fast only where the CPU has bf16 arithmetic); see translator.quantize")
    parser.add_argument("--static", action="store_true",
                        help="fixed-shape beam search: one CUDA graph per batch on a GPU (same translations)")
    args = parser.parse_args(argv)
    for name in ("beam", "batch_tokens", "max_input_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.min_len < 0:
        parser.error(f"--min-len must be >= 0, got {args.min_len}")
    if args.nbest is not None and not 1 <= args.nbest <= args.beam:
        parser.error(f"--nbest must be between 1 and --beam ({args.beam}), got {args.nbest}")
    if args.sentences and args.input:
        parser.error("give sentences as arguments or --input, not both")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if (args.checkpoint is None) == (args.model is None):
        parser.error("give either --checkpoint CKPT or --model DIR (a directory written by `translator export`)")
    if args.model is not None and args.engine == "torch":
        parser.error("--engine torch needs --checkpoint: --model is a directory for ctranslate2 or onnx")
    if args.engine is None and args.checkpoint is not None:
        args.engine = "torch"
    if args.engine != "torch":  # None: the --model directory's format, known once it is read
        for flag, used in (("--static", args.static), ("--attention", args.attention),
                           (f"--quantize {args.quantize}", args.quantize != "none"),
                           (f"--device {args.device}", args.device not in ("auto", "cpu"))):
            if used:
                parser.error(f"{flag} is for --engine torch only")
    args.prog = parser.prog
    return args


class DeviceError(RuntimeError):
    """The requested device does not exist here."""


# ---- I/O ---------------------------------------------------------------------------------------------------------
def read_lines(path: str | None) -> list[str]:
    """Lines of a plain or gzip file (None: stdin), split on \\n only, so the count is the file's line count."""
    name = "<stdin>" if path is None else path
    try:
        raw = sys.stdin.buffer.read() if path is None else Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise InputError(f"{name}: file not found") from None
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise InputError(f"{name}: cannot read: {err}") from None
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the final newline ends the last line; it does not start another
    text = []
    for number, line in enumerate(lines, 1):
        try:
            decoded = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise InputError(
                f"{name}: line {number}: not valid UTF-8 (byte {line[err.start:err.start + 1]!r} at column "
                f"{err.start + 1})"
            ) from None
        text.append(decoded.removesuffix("\r"))
    return text


def format_output(results: list, nbest: int | None) -> str:
    """One translation per line, or with nbest the TSV rows `line_no, rank, score, translation` (1-based)."""
    from translator.translate import one_line  # loaded with the model code, after the arguments are checked

    if nbest is None:
        return "".join(one_line(hyps[0].text) + "\n" for hyps in results)
    return "".join(
        f"{line}\t{rank}\t{h.score:.4f}\t{one_line(h.text)}\n"
        for line, hyps in enumerate(results, 1)
        for rank, h in enumerate(hyps, 1)
    )


def write_output(text: str, path: str | None) -> None:
    data = text.encode("utf-8")
    if path is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        Path(path).write_bytes(gzip.compress(data) if path.endswith(".gz") else data)
    except OSError as err:
        raise InputError(f"{path}: cannot write: {err}") from None


def report_scores(hypotheses: list[str], references: list[str]) -> None:
    """sacreBLEU's BLEU and chrF with their signatures, on stderr."""
    import sacrebleu

    for metric in (sacrebleu.BLEU(), sacrebleu.CHRF()):
        score = metric.corpus_score(hypotheses, [references])
        sys.stderr.write(f"{score}  (signature: {metric.get_signature()})\n")


# ---- exported models ---------------------------------------------------------------------------------------------
class EngineError(RuntimeError):
    """An exported directory or an engine that cannot be used as asked."""


def translate_exported(args: argparse.Namespace, sentences: list[str], options: dict) -> list:
    """Translate with the ctranslate2/onnx engine: on --model DIR, or on --checkpoint exported to a temporary
    directory first."""
    from translator import engines
    from translator.export import ExportError, export

    with tempfile.TemporaryDirectory(prefix="translator-export-") as tmp:
        try:
            path = args.model or export(args.checkpoint, args.engine, Path(tmp) / args.engine)
            manifest = engines.read_manifest(path)
            if args.engine is not None and manifest.get("format") != args.engine:
                raise EngineError(f"--model {path}: a {manifest.get('format')} export, not {args.engine}")
            engine = engines.load(path)
            return engine.translate(sentences, **options)
        except (ExportError, FileNotFoundError, ValueError, ImportError) as err:
            raise EngineError(err) from None


# ---- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # torch and the model code load after the arguments are checked: `--help` and typos answer at once
    from translator import checkpoint, quantize
    from translator.translate import attention_map, plot_attention, resolve_device, translate

    try:
        try:
            # int8/bf16 inference is a CPU path: "auto" picks the CPU for it
            device = resolve_device("cpu" if args.quantize != "none" and args.device == "auto" else args.device)
        except ValueError as err:
            raise DeviceError(err) from None
        sentences = args.sentences or read_lines(args.input)
        references = read_lines(args.reference) if args.reference else None
        if references is not None and len(references) != len(sentences):
            raise InputError(
                f"{args.reference}: {len(references)} reference lines, but the input has {len(sentences)} lines"
            )
        options = dict(beam=args.beam, nbest=args.nbest or 1, length_penalty=args.length_penalty, penalty=args.penalty,
                       early_stopping=args.early_stopping, batch_tokens=args.batch_tokens,
                       max_input_tokens=args.max_input_tokens)
        if args.engine == "torch":
            model, tokenizer, _ = checkpoint.load(args.checkpoint, map_location=device)
            if args.quantize != "none":
                if device.type != "cpu":
                    raise EngineError(f"--quantize {args.quantize} is for the CPU; this run uses {device}")
                model = quantize.for_cpu(model, args.quantize)
            results = translate(model, tokenizer, sentences, static=args.static, min_len=args.min_len, **options)
        else:
            results = translate_exported(args, sentences, options)
        write_output(format_output(results, args.nbest), args.output)
        if references is not None:
            report_scores([hyps[0].text for hyps in results], references)
        if args.attention:
            first = next((i for i, s in enumerate(sentences) if s.strip()), None)
            if first is None:
                log.warning("--attention: every input line is empty; no heatmap drawn")
            else:
                src_ids = tokenizer.encode([sentences[first].strip()])[0][: args.max_input_tokens]
                amap = attention_map(model, tokenizer, src_ids, results[first][0].tokens)
                try:
                    plot_attention(amap, args.attention, title=f"line {first + 1}: {results[first][0].text}")
                except OSError as err:
                    raise InputError(f"{args.attention}: cannot write: {err}") from None
                log.info("attention heatmap of line %d written to %s", first + 1, args.attention)
    except (checkpoint.CheckpointError, InputError, DeviceError, EngineError) as err:
        sys.stderr.write(f"{args.prog}: error: {err}\n")
        return 2
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    sys.exit(main())
