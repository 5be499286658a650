"""Translation from a directory written by `translator export`: CTranslate2, or ONNX Runtime through our own search.

    engine = load("exported/")           # the format comes from the directory's translator.json
    best = [hyps[0].text for hyps in engine.translate(["Ein Hund läuft."], beam=5)]

Each engine's `translate` takes the arguments of `translator.translate.translate` (less the model and tokenizer) and
returns the same n-best lists of `Translation`, in input order; empty sentences get one empty translation.

- `CTranslate2Engine` runs CTranslate2's own search. It normalises scores by len**alpha, our default form
  (`penalty="average"`; GNMT's form is refused), and always stops a sentence once `beam` hypotheses have finished,
  whatever `early_stopping` says (CTranslate2 has no other rule); its scores are CTranslate2's. Sentences are batched
  with others of the same source length, so that each gets our length cap, int(1.2 * source tokens + 10) target
  tokens, exactly (CTranslate2 takes one cap per batch). Greedy search in float32 finds our tokens
  (tests/test_export.py).
- `OnnxEngine` runs the exported graphs under ONNX Runtime behind the decode-step interface (`OnnxModel`), so the
  search is `translator.generate.beam_search` itself: same hypotheses and scoring rules as the PyTorch model.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from translator.cache import DecodeState, KVCache, LayerCache
from translator.export import MANIFEST
from translator.generate import EARLY_STOPPING, LENGTH_PENALTY, PENALTY, Penalty
from translator.tokenizer import Tokenizer
from translator.translate import Translation, encode_sources, translate


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The translator.json of an exported directory; FileNotFoundError/ValueError with one clear line."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{path}: not a directory written by `translator export` (no {MANIFEST})")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON: {err}") from None


def load(path: str | Path, threads: int = 0) -> CTranslate2Engine | OnnxEngine:
    """The engine for an exported directory, by the format its translator.json names."""
    manifest = read_manifest(path)
    if manifest.get("format") == "ctranslate2":
        return CTranslate2Engine(path, threads=threads)
    if manifest.get("format") == "onnx":
        return OnnxEngine(path, threads=threads)
    raise ValueError(f"{Path(path) / MANIFEST}: unknown format {manifest.get('format')!r}")


def _threads(threads: int) -> int:
    """0: OMP_NUM_THREADS when set, else the engine's default (0)."""
    return threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)


class CTranslate2Engine:
    """A CTranslate2 Translator (encoder-decoder) or Generator (decoder-only over `source <sep>`)."""

    def __init__(self, path: str | Path, device: str = "cpu", compute_type: str = "default", threads: int = 0) -> None:
        import ctranslate2

        self.path = Path(path)
        self.manifest = read_manifest(path)
        self.tokenizer = Tokenizer.from_file(self.path / self.manifest["sentencepiece"])
        self.seq2seq = self.manifest["arch"] == "seq2seq"
        runtime = ctranslate2.Translator if self.seq2seq else ctranslate2.Generator
        self.model = runtime(str(path), device=device, compute_type=compute_type, intra_threads=_threads(threads))
        self.sep = self.tokenizer.pieces([self.manifest["special_ids"]["sep"]])[0]

    def max_length(self, n_source: int) -> int:
        """generate.max_lengths' rule for one sentence: at most int(a * n + b) target tokens, eos not counted."""
        rule = self.manifest["max_length"]
        return int(rule["a"] * n_source + rule["b"])

    def generate(self, sources: Sequence[Sequence[str]], beam: int, nbest: int, length_penalty: float,
                 max_length: int) -> list[list[tuple[list[str], float]]]:
        """Source pieces -> per sentence, the `nbest` (target pieces, score), for one length cap."""
        options = dict(beam_size=beam, num_hypotheses=nbest, length_penalty=length_penalty, return_scores=True,
                       suppress_sequences=[[p] for p in self.manifest["suppressed_pieces"]])
        if self.seq2seq:
            results = self.model.translate_batch(
                [list(s) for s in sources], max_decoding_length=max_length, min_decoding_length=0,
                max_input_length=0, **options)
        else:
            results = self.model.generate_batch(
                [[*s, self.sep] for s in sources], max_length=max_length, min_length=0,
                include_prompt_in_result=False, **options)
        return [list(zip(r.hypotheses if self.seq2seq else r.sequences, r.scores)) for r in results]

    def translate(self, sentences: list[str], beam: int = 5, nbest: int = 1, length_penalty: float = LENGTH_PENALTY,
                  batch_tokens: int = 4096, max_input_tokens: int = 256, penalty: Penalty = PENALTY,
                  early_stopping: bool = EARLY_STOPPING) -> list[list[Translation]]:
        """Like `translator.translate.translate`; batches hold sentences of one source length, under
        `batch_tokens` source tokens. `early_stopping` is not CTranslate2's to choose (see the module docstring)."""
        if beam < 1 or not 1 <= nbest <= beam:
            raise ValueError(f"need beam >= 1 and 1 <= nbest <= beam, got beam={beam} nbest={nbest}")
        if penalty != "average":
            raise ValueError(f"penalty={penalty!r}: CTranslate2 normalises scores by len**alpha only (penalty "
                             "'average')")
        sources = encode_sources(self.tokenizer, sentences, max_input_tokens)
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, ids in enumerate(sources):
            if ids:
                by_length[len(ids)].append(i)
        results: list[list[Translation]] = [[Translation([], 0.0, "")] for _ in sentences]
        for n, members in sorted(by_length.items(), reverse=True):
            rows = max(1, batch_tokens // n)
            for start in range(0, len(members), rows):
                batch = members[start:start + rows]
                pieces = [self.tokenizer.pieces(sources[i]) for i in batch]
                for i, hyps in zip(batch, self.generate(pieces, beam, nbest, length_penalty, self.max_length(n))):
                    ids = [[self.tokenizer.sp.piece_to_id(p) for p in h] for h, _ in hyps]
                    texts = self.tokenizer.decode(ids)
                    results[i] = [Translation(t, s, text) for t, (_, s), text in zip(ids, hyps, texts)]
        return results


# ---- ONNX Runtime ------------------------------------------------------------------------------------------------
class OnnxModel:
    """The decode-step interface (docs/design.md) over the graphs of `translator export --format onnx`.

    The state is the models' own `DecodeState`, holding the caches that the graphs take and return, so its
    `reorder` serves the searches unchanged; tensors cross to ONNX Runtime as numpy arrays (no copy on CPU).
    """

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        import onnxruntime as ort

        from translator import checkpoint

        self.path = Path(path)
        self.manifest = read_manifest(path)
        config_class, _ = checkpoint.ARCHS[self.manifest["arch"]]
        self.config = config_class(**self.manifest["model"])
        self.start_id = self.manifest["start_id"]
        self.seq2seq = self.manifest["arch"] == "seq2seq"
        options = ort.SessionOptions()
        options.intra_op_num_threads = _threads(threads)
        graphs = self.manifest["graphs"]
        self.init = ort.InferenceSession(str(self.path / graphs["init"]), options, providers=["CPUExecutionProvider"])
        self.step = ort.InferenceSession(str(self.path / graphs["step"]), options, providers=["CPUExecutionProvider"])
        self.n_layers = len(graphs["step_outputs"]) // 2

    def init_state(self, src: torch.Tensor) -> DecodeState:
        """src (B, S) -> the state after the source: cross K/V (seq2seq) or the prefilled prefix (decoder-only)."""
        out = [torch.from_numpy(a) for a in self.init.run(None, {"src": src.numpy()})]
        pairs = [KVCache(out[2 * i], out[2 * i + 1]) for i in range(self.n_layers)]
        key_pad = src == self.config.pad_id
        if self.seq2seq:
            B, nh, _, hs = out[0].shape
            empty = out[0].new_zeros(B, nh, 0, hs)
            layers = [LayerCache(KVCache(empty, empty), cross) for cross in pairs]
            return DecodeState(layers, key_pad, torch.zeros_like(src[:, 0]))
        pos = torch.zeros_like(src[:, 0]) if self.config.rope_restart else (~key_pad).sum(1)
        return DecodeState([LayerCache(self_kv) for self_kv in pairs], key_pad, pos, prefix_len=src.size(1))

    def decode_step(self, tokens: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """tokens (B, 1) -> logits (B, 1, V); the state's caches grow by one."""
        feed = {"tokens": tokens.numpy(), "pos": state.pos.numpy(), "key_pad": state.key_pad.numpy()}
        for i, layer in enumerate(state.layers):
            feed[f"k{i}"], feed[f"v{i}"] = layer.self_kv.k.numpy(), layer.self_kv.v.numpy()
            if self.seq2seq:
                feed[f"cross_k{i}"], feed[f"cross_v{i}"] = layer.cross_kv.k.numpy(), layer.cross_kv.v.numpy()
        logits, *kv = (torch.from_numpy(a) for a in self.step.run(None, feed))
        for i, layer in enumerate(state.layers):
            layer.self_kv.k, layer.self_kv.v = kv[2 * i], kv[2 * i + 1]
        state.advance(1)
        return logits[:, None]


class OnnxEngine:
    """`translator.translate.translate` over an `OnnxModel`: our own searches, ONNX Runtime's arithmetic."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        self.model = OnnxModel(path, threads)
        self.tokenizer = Tokenizer.from_file(self.model.path / self.model.manifest["sentencepiece"])

    def translate(self, sentences: list[str], beam: int = 5, nbest: int = 1, length_penalty: float = LENGTH_PENALTY,
                  batch_tokens: int = 4096, max_input_tokens: int = 256, penalty: Penalty = PENALTY,
                  early_stopping: bool = EARLY_STOPPING) -> list[list[Translation]]:
        return translate(self.model, self.tokenizer, sentences, beam=beam, nbest=nbest, length_penalty=length_penalty,
                         batch_tokens=batch_tokens, max_input_tokens=max_input_tokens, penalty=penalty,
                         early_stopping=early_stopping)
