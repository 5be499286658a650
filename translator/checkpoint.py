"""Load what translation needs from a `.ckpt` safely: `torch.load(weights_only=True)`, no arbitrary pickles; and the
one registry of architectures, `ARCHS` (name -> config and model class), which `translator.module` builds on."""

from __future__ import annotations

import codecs
import logging
import math
import pickle
from pathlib import Path

import torch
from torch import nn

from translator.config import DecoderOnlyConfig, Seq2SeqConfig, TransformerConfig
from translator.decoder_only import DecoderOnlyTransformer
from translator.seq2seq import Seq2SeqTransformer
from translator.tokenizer import Tokenizer

log = logging.getLogger(__name__)

ARCHS: dict[str, tuple[type[TransformerConfig], type[nn.Module]]] = {
    "seq2seq": (Seq2SeqConfig, Seq2SeqTransformer),
    "decoder_only": (DecoderOnlyConfig, DecoderOnlyTransformer),
}
KEY = "translator"  # where TranslationModule.on_save_checkpoint puts {format, arch, config, tokenizer}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or not a translator checkpoint."""


def read(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The raw checkpoint dict, loaded with weights_only=True; clear errors for every way it can fail. mmap: map the
    tensors from the file instead of reading them (cheap when only the metadata is wanted)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_format(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):  # not a pickle at all: text, garbage, a truncated file
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?)") from None
        detail = next((line for line in str(err).splitlines() if "Unsupported" in line), "").strip()
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled objects other than tensors and plain containers, which "
            f"could run arbitrary code ({detail or 'weights_only=True rejected it'})"
        ) from None
    except Exception as err:  # torch raises many types here (RuntimeError, EOFError, KeyError, BadZipFile, ...)
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {type(err).__name__}: {err}"
        ) from None
    if not isinstance(ckpt, dict) or KEY not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a translator checkpoint (no 'translator' entry); was it made by another program?")
    return ckpt


def _check_format(path: Path) -> None:
    """torch.save writes a zip archive (a pickle in legacy mode); anything else is refused by name before unpickling,
    where text would otherwise read as pickle opcodes and fail with a misleading message."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):  # zip; pickle protocol >= 2
        return
    if not head:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint: the file is empty")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)  # not final: a character cut at byte 512 is fine
        text = b"\x00" not in head
    except UnicodeDecodeError:
        text = False
    what = "a text file" if text else f"it starts with {head[:8]!r}"
    raise CheckpointError(f"{path}: not a PyTorch checkpoint ({what}; torch.save writes a zip archive)")


def load(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, Tokenizer, dict]:
    """(model in eval mode on `map_location`, tokenizer, checkpoint's `translator` entry) from a translator `.ckpt`."""
    ckpt = read(path)  # on the CPU: the tokenizer's bytes are read back through numpy, the model is moved at the end
    meta = ckpt[KEY]
    if meta.get("arch") not in ARCHS:
        raise CheckpointError(f"{path}: unknown architecture {meta.get('arch')!r}")
    config_class, model_class = ARCHS[meta["arch"]]
    try:
        model = model_class(config_class(**meta["config"]))
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        model.load_state_dict(state)
        tokenizer = Tokenizer.from_bytes(meta["tokenizer"].numpy().tobytes())
    except (TypeError, RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: inconsistent translator checkpoint: {err}") from None
    return model.to(map_location).eval(), tokenizer, meta


def training_seconds(ckpt: dict) -> float | None:
    """Seconds of training (validation included, over every resumed run) that led to a checkpoint as `read` returns
    it: Lightning's `Timer` state (`translator.logging_callbacks.TrainingClock` puts a Timer in every run it logs),
    else the `elapsed_s` that checkpoints written before the clock left the module kept in their `translator` entry;
    None when neither is there."""
    timer = ckpt.get("callbacks", {}).get("Timer")
    if timer is not None:
        return timer["time_elapsed"]["train"]
    return ckpt[KEY].get("elapsed_s")


TRAINING_STATE = ("optimizer_states", "lr_schedulers", "loops", "callbacks", "current_model_state",
                  "averaging_state", "rng_states")


def average(paths: list[Path], ckpts: list[dict]) -> dict:
    """The checkpoints `ckpts` (as `read` returns them, from `paths`, newest last) as one: the element-wise mean of
    their weights (float64 sums, each tensor's own dtype), the newest one's everything else, its training state
    (optimizer, loops, callbacks, weight-averaging state) left out. They must share architecture, config and
    tokenizer."""
    first = ckpts[0][KEY]
    for path, ckpt in zip(paths[1:], ckpts[1:]):
        meta = ckpt[KEY]
        for key in ("arch", "config"):
            if meta.get(key) != first.get(key):
                raise CheckpointError(f"{path}: another model than {paths[0]} ({key} differs): average checkpoints "
                                      "of one run only")
        if not torch.equal(meta["tokenizer"], first["tokenizer"]):
            raise CheckpointError(f"{path}: another tokenizer than {paths[0]}: average checkpoints of one run only")
        if ckpt["state_dict"].keys() != ckpts[0]["state_dict"].keys():
            raise CheckpointError(f"{path}: its weights have other names than {paths[0]}'s")
    out = {k: v for k, v in ckpts[-1].items() if k not in TRAINING_STATE}
    out["state_dict"] = {
        name: (torch.stack([c["state_dict"][name].double() for c in ckpts]).mean(0).to(tensor.dtype)
               if tensor.is_floating_point() else tensor)
        for name, tensor in ckpts[-1]["state_dict"].items()
    }
    out[KEY] = {**ckpts[-1][KEY], "averaged": [str(p) for p in paths]}
    return out


def best_of(last: str | Path) -> Path:
    """The best checkpoint of the run that saved `last` (its last.ckpt), by the run's ModelCheckpoint that monitors a
    metric (the recipes' `val/loss`); `last` itself when the run kept none.

    Of the checkpoints beside `last` that name themselves as their run's best, the one with the best score (each holds
    its own), the newest among equals. The path that `last` names is not enough: a periodic last.ckpt is written before
    its step's validation, which may replace that best; a run copied elsewhere and continued names the original
    folder's files; and Lightning, resuming in another folder, forgets the old scores, so the copy's first new "best"
    may be worse than the copied one. Failing that (the best was saved in another folder), the named best, beside
    `last` or where it was saved. A checkpoint that cannot be read is skipped, with a warning."""
    last = Path(last)
    named = _best_paths(read(last))
    if not named:
        return last
    own = []
    for path in sorted(last.parent.glob("*.ckpt")):
        if path == last:
            continue
        try:
            ckpt = read(path, mmap=True)
        except CheckpointError as err:
            log.warning("best_of: skipping %s", err)
            continue
        for key, state in _monitoring(ckpt):
            if Path(state["best_model_path"]).name == path.name:
                score = state.get("best_model_score")
                score = math.inf if score is None else float(score) * (-1 if "'mode': 'max'" in key else 1)
                own.append((score, -ckpt.get("global_step", 0), path))
    if own:
        return min(own)[2]
    for saved in named:
        for path in (last.parent / saved.name, saved):
            if path.is_file():
                return path
    return last


def _monitoring(ckpt: dict) -> list[tuple[str, dict]]:
    """(state key, state) of each ModelCheckpoint in `ckpt` that monitors a metric and has saved a best."""
    return [(key, state) for key, state in ckpt.get("callbacks", {}).items()
            if key.startswith("ModelCheckpoint") and state.get("monitor") and state.get("best_model_path")]


def _best_paths(ckpt: dict) -> list[Path]:
    """The best_model_path of each ModelCheckpoint state in `ckpt` that monitors a metric."""
    return [Path(state["best_model_path"]) for _, state in _monitoring(ckpt)]
