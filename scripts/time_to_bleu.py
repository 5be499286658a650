#!/usr/bin/env python
"""Wall-clock time for the tuned Multi30k recipe to reach a test2016 BLEU target (default 41.3), then beam 5.

    python scripts/time_to_bleu.py --json out/time_to_bleu.json                          # H100: the recipe
    python scripts/time_to_bleu.py --preset tiny --max-steps 20 --device cpu --num-workers 0   # CPU smoke test

The recipe is read from the same YAML files the CLI uses (default ``configs/encdec.yaml`` and
``configs/data/multi30k.yaml``: model class and init args, data settings, ``max_steps`` and ``gradient_clip_val``),
with the data pointed at the local Multi30k copy (``--data``; splits ``train``/``val``/``test_2016_flickr``), and
trained through the real path: ``Trainer.fit(module, datamodule)``, bf16-mixed on CUDA (``configs/trainer/gpu.yaml``),
fp32 on CPU. Lightning's own validation, logging, checkpointing and progress bar are off.

Clock: training time starts at ``on_train_start`` (so DataLoader start-up and the first batches count) and stops
at each evaluation. Evaluation, every ``--eval-every-seconds`` of training time (or ``--eval-every-steps``) and at
``max_steps``: greedy decoding of test2016 through ``TranslationModule.translate_ids`` (bf16 autocast on CUDA),
detokenised sacreBLEU (13a, the module's metric). Its time is excluded from the training clock and reported
separately. The first evaluation at or above the target stops training; the model at that point is then decoded
with beam ``--beam`` to confirm. Tokenizer training (cached) and data setup happen before the clock starts and are
reported as ``setup_s``. Note the trigger uses the *test* set, as the benchmark target is defined on it; it measures
speed, not model selection. Writes ``--json``.

For tuning, evaluate on the validation split instead and cap the time: ``--test-split val --target 100
--max-seconds 100 --model-arg lr=2e-3`` gives the curve of validation BLEU against training time of one recipe
variant (``scripts/gpu_runbook.sh tune`` runs four).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import sacrebleu
import torch
import yaml

import translator.module
from translator.data import TokenBatches, TranslationDataModule, load_pairs
from translator.module import TranslationModule

log = logging.getLogger("time_to_bleu")
DATA_KEYS = {"src_lang", "tgt_lang", "vocab_size", "max_tokens", "max_len", "shuffle_buffer", "num_workers", "seed",
             "pad_to_multiple"}


def load_recipe(paths: list[Path]) -> dict[str, Any]:
    """Merge the YAML configs the way LightningCLI stacks `--config` files (later files win, per top-level key)."""
    recipe: dict[str, Any] = {"model": {}, "data": {}, "trainer": {}}
    for path in paths:
        for key, value in (yaml.safe_load(path.read_text()) or {}).items():
            if isinstance(value, dict) and isinstance(recipe.get(key), dict):
                recipe[key] = {**recipe[key], **value}
            else:
                recipe[key] = value
    return recipe


def parse_value(text: str) -> Any:
    """A command-line value: a number when it reads as one (YAML would leave `2e-3` a string), else YAML."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class TimeToBleu(L.Callback):
    """Keeps the training clock, runs the greedy evaluations and stops training at the target."""

    def __init__(self, batches: list[tuple[torch.Tensor, list[str]]], target: float, every_s: float, every_steps: int,
                 device: torch.device, max_s: float | None = None) -> None:
        self.batches, self.target, self.every_s, self.every_steps, self.device = batches, target, every_s, every_steps, device
        self.max_s = max_s
        self.history: list[dict[str, float]] = []
        self.hit: dict[str, float] | None = None
        self.train_s = self.eval_s = 0.0
        self.first_step_s: float | None = None
        self._segment = self._next_eval = 0.0

    def bleu(self, module: TranslationModule, beam: int) -> tuple[float, float]:
        """(test BLEU, seconds) of `beam` decoding (1 = greedy) over the evaluation batches."""
        was_training = module.training
        module.eval()
        sync(self.device)
        start = time.perf_counter()
        hyps, refs = [], []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            for src, texts in self.batches:
                hyps += module.translate_ids(src, beam)
                refs += texts
        score = sacrebleu.corpus_bleu(hyps, [refs]).score
        sync(self.device)
        module.train(was_training)
        return score, time.perf_counter() - start

    def on_train_start(self, trainer: L.Trainer, module: TranslationModule) -> None:
        sync(self.device)
        self._segment = time.perf_counter()
        self._next_eval = self.every_s

    def on_train_batch_end(self, trainer: L.Trainer, module: TranslationModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.first_step_s is None:
            sync(self.device)
            self.first_step_s = time.perf_counter() - self._segment
        running = self.train_s + time.perf_counter() - self._segment  # host time: may run ahead of the GPU a little
        due = (self.every_steps and step % self.every_steps == 0) or (self.every_s and running >= self._next_eval)
        if not (due or step >= trainer.max_steps):
            return
        sync(self.device)
        self.train_s += time.perf_counter() - self._segment
        score, seconds = self.bleu(module, beam=1)
        self.eval_s += seconds
        self.history.append({"step": step, "train_s": self.train_s, "greedy_bleu": score, "eval_s": seconds})
        log.info("step %d, %.1f s of training: greedy BLEU %.2f (eval %.1f s)", step, self.train_s, score, seconds)
        if score >= self.target and self.hit is None:
            self.hit = self.history[-1]
            trainer.should_stop = True
        if self.max_s is not None and self.train_s >= self.max_s:
            trainer.should_stop = True
        self._next_eval = self.train_s + self.every_s
        self._segment = time.perf_counter()


def eval_batches(data: str, split: str, dm: TranslationDataModule, max_tokens: int, limit: int | None,
                 device: torch.device) -> list[tuple[torch.Tensor, list[str]]]:
    stream = TokenBatches(load_pairs(data, split), dm.tokenizer, max_tokens=max_tokens, max_len=dm.hparams.max_len,
                          pad_to_multiple=dm.hparams.pad_to_multiple, shuffle=False, passes=1, limit_pairs=limit,
                          evaluation=True)  # every line, as `translator test` scores it
    return [(b["src"].to(device), b["tgt_text"]) for b in stream]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", type=Path, default=[Path("configs/encdec.yaml"), Path("configs/data/multi30k.yaml")],
                   help="recipe YAML files, as given to `translator fit --config`")
    p.add_argument("--data", default="../shared/data/multi30k", help="local Multi30k directory")
    p.add_argument("--val-split", default="val")
    p.add_argument("--test-split", default="test_2016_flickr")
    p.add_argument("--tokenizer", help="a trained .model file (default: trained once and cached)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--preset", help="override the model preset (e.g. tiny for a smoke test)")
    p.add_argument("--max-steps", type=int, help="override trainer.max_steps")
    p.add_argument("--max-tokens", type=int, help="override data.max_tokens (the batch size)")
    p.add_argument("--num-workers", type=int, help="override data.num_workers")
    p.add_argument("--compile", nargs="?", const=True, default=None, metavar="MODE",
                   help="train with the module's torch.compile option (a mode, e.g. reduce-overhead, or the default)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model init arg of the recipe (repeatable; VALUE a number or YAML), e.g. lr=2e-3")
    p.add_argument("--max-seconds", type=float, help="stop after this much training time (at an evaluation)")
    p.add_argument("--target", type=float, default=41.3, help="test2016 BLEU to reach")
    p.add_argument("--eval-every-seconds", type=float, default=5.0, help="greedy eval every N s of training (0: off)")
    p.add_argument("--eval-every-steps", type=int, default=0, help="greedy eval every N steps (0: off)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="padded tokens per evaluation batch")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N test pairs only (smoke runs)")
    p.add_argument("--beam", type=int, default=5, help="beam size of the confirmation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    recipe = load_recipe(args.config)
    started = time.perf_counter()
    L.seed_everything(args.seed, verbose=False)

    data_args = {k: v for k, v in recipe["data"].items() if k in DATA_KEYS}
    data_args.update(path=args.data, val_split=args.val_split, test_split=args.test_split, tokenizer=args.tokenizer)
    for key in ("max_tokens", "num_workers"):
        if getattr(args, key) is not None:
            data_args[key] = getattr(args, key)
    dm = TranslationDataModule(**data_args)
    dm.prepare_data()
    dm.setup("fit")
    batches = eval_batches(args.data, args.test_split, dm, args.eval_tokens, args.eval_limit, device)
    n_test = sum(len(texts) for _, texts in batches)

    model_cfg = recipe["model"]
    module_class = getattr(translator.module, model_cfg.get("class_path", "Seq2SeqModule").rsplit(".", 1)[-1])
    init = dict(model_cfg.get("init_args", {}), vocab_size=dm.vocab_size)
    if args.preset:
        init["preset"] = args.preset
    for item in args.model_arg:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"time_to_bleu.py: error: --model-arg {item!r}: expected KEY=VALUE")
        init[key] = parse_value(value)
    if args.compile is not None:
        init["compile"] = args.compile
    module = module_class(**init)
    max_steps = args.max_steps or recipe["trainer"].get("max_steps", 8000)
    clock = TimeToBleu(batches, args.target, args.eval_every_seconds, args.eval_every_steps, device, args.max_seconds)
    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=max_steps, gradient_clip_val=recipe["trainer"].get("gradient_clip_val"), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[clock])
    setup_s = time.perf_counter() - started
    trainer.fit(module, datamodule=dm)

    final = clock.hit or (clock.history[-1] if clock.history else None)
    beam_bleu, beam_s = clock.bleu(module, args.beam)
    result = {
        "target": args.target, "reached": clock.hit is not None,
        "time_to_target_s": clock.hit["train_s"] if clock.hit else None,
        "step_at_target": clock.hit["step"] if clock.hit else None,
        "greedy_bleu": final["greedy_bleu"] if final else None, "beam": args.beam, "beam_bleu": beam_bleu,
        "beam_eval_s": beam_s, "steps": trainer.global_step, "train_s": clock.train_s, "eval_s": clock.eval_s,
        "first_step_s": clock.first_step_s, "setup_s": setup_s, "wall_s": time.perf_counter() - started,
        "test_pairs": n_test, "history": clock.history,
        "recipe": {"module": module_class.__name__, "init_args": init, "data": data_args, "max_steps": max_steps,
                   "gradient_clip_val": recipe["trainer"].get("gradient_clip_val"),
                   "precision": trainer.precision, "configs": [str(p) for p in args.config]},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "command": " ".join(sys.argv),
    }
    state = (f"reached {args.target} after {result['time_to_target_s']:.1f} s of training (step {result['step_at_target']})"
             if clock.hit else f"did not reach {args.target} in {trainer.global_step} steps ({clock.train_s:.1f} s)")
    print(f"\n{state}; greedy {result['greedy_bleu']:.2f}, beam {args.beam} {beam_bleu:.2f} BLEU on {n_test} {args.test_split} pairs;"
          f" evaluation {clock.eval_s:.1f} s (excluded), setup {setup_s:.1f} s, first step {clock.first_step_s:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
