"""`translator`: the Lightning CLI (fit / validate / test / predict) over both architectures, and `export`.

    translator fit --config configs/encdec.yaml --config configs/data/multi30k.yaml --config configs/trainer/gpu.yaml
    translator predict --config configs/encdec.yaml --config configs/data/multi30k.yaml --ckpt_path CKPT \
        --data.predict_path test.de.gz --predict_output hyp.en [--model.test_beam_size 5]
    translator export --checkpoint CKPT --format ctranslate2|onnx [--quantization int8] --out DIR

`predict` translates a UTF-8 text file (one sentence per line, plain or .gz; default: the source side of
`--data.test_split`) with beam search of width `test_beam_size` (1: greedy) and the model's length rule
(`length_penalty`, `penalty`, `early_stopping`), and writes one line per input line, in input order, to
`--predict_output` (gzip if it ends in .gz): an empty line gives an empty line, a line over `--data.max_len`
tokens is truncated with a warning naming it. Batches follow the data's token budget and are sharded over DDP ranks
and DataLoader workers; `translator.callbacks.TranslationWriter` gathers them and rank 0 writes the file.
`--ckpt_path` and `--predict_output` are required: an untrained model's output is noise, and the progress bar shares
stdout.

`export` (translator/export.py) writes a checkpoint as a CTranslate2 or ONNX serving directory; it is dispatched
before LightningCLI, with its own argparse parser.

The model is chosen by `class_path` (`translator.module.Seq2SeqModule` or `translator.module.DecoderOnlyModule`),
its size by `--model.init_args.preset`, and any field of its config (`translator.config`) by
`--model.init_args.config.<field>` (e.g. `--model.init_args.config.positions rope`); the vocabulary size is linked
from the data to the model, never typed twice. `build` gives the same objects without running them (the benchmarks).

Errors in what the user gave (a missing file, malformed data, a bad or unsafe checkpoint, a tokenizer that does not
match the checkpoint) end the command with one line, `translator: error: <message>`, and exit status 2, like
argument errors; set TRANSLATOR_DEBUG=1 to get the traceback instead. A run stopped by SIGTERM (after
`translator.callbacks.PreemptionCheckpoint` saved `last.ckpt`) exits with 143; resume it with `--ckpt_path last`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from translator import checkpoint, quantize
from translator.callbacks import TranslationWriter
from translator.data import TranslationDataModule
from translator.logging_callbacks import TimeBoundProgressBar
from translator.module import TranslationModule
from translator.tokenizer import Tokenizer

log = logging.getLogger(__name__)
_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc")  # resolved by Lightning among the run's own checkpoints
# the model fields that checkpoints saved before they moved under `--model.init_args.config` hold as init args
_OLD_INIT_ARGS = {f.name for config, _ in checkpoint.ARCHS.values() for f in fields(config)}
_OLD_INIT_ARGS -= {"vocab_size", "_presets"}  # still an init arg; not a field


class SaveFitConfig(SaveConfigCallback):
    """Write the resolved config.yaml next to the logs of `fit` only: validate/test would overwrite the
    training run's copy, or drop a config.yaml into the working directory when the logger is off."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class Trainer(L.Trainer):
    """Lightning's Trainer, whose `predict` also takes `predict_output`. LightningCLI gives each subcommand the
    arguments of the Trainer method of its name, so `--predict_output` belongs to `translator predict` alone: fit,
    validate and test (and the config.yaml that fit saves) never see it."""

    def predict(self, model: L.LightningModule | None = None, dataloaders: Any = None,
                datamodule: L.LightningDataModule | None = None, return_predictions: bool | None = False,
                ckpt_path: str | None = None, predict_output: str | None = None, **kwargs: Any) -> Any:
        """Translate; see `lightning.Trainer.predict` for the other arguments.

        Args:
            return_predictions: keep the translations in memory too (the file is written either way).
            predict_output: write the translations here, one line per input line, in input order (.gz: gzip),
                with `translator.callbacks.TranslationWriter`; nothing is logged then: a configured logger would
                write into the training run's log directory (Lightning's CSVLogger would even empty its metrics.csv).
        """
        if predict_output is not None:
            self.callbacks.append(TranslationWriter(predict_output))
            self.logger = None
        return super().predict(model=model, dataloaders=dataloaders, datamodule=datamodule,
                               return_predictions=return_predictions, ckpt_path=ckpt_path, **kwargs)


class TranslatorCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    # A --ckpt_path file is read safely (translator.checkpoint.read: weights_only=True) right after parsing: Lightning
    # itself loads it next (LightningCLI merges its hyperparameters into the config) and would fail with torch's
    # unpickling or zip errors; and after instantiation its model and tokenizer are checked against the config's.
    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        self._ckpt_meta = None
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if subcommand == "predict":
            if path is None:
                raise ValueError("translator predict needs --ckpt_path: the trained checkpoint to translate with")
            if not self.config.predict.predict_output:
                raise ValueError("translator predict needs --predict_output FILE: where to write the translations")
        if path is not None and str(path) not in _SPECIAL_CKPT_PATHS and not str(path).startswith("registry"):
            ckpt = checkpoint.read(path)
            _check_hparams_layout(path, ckpt.get("hyper_parameters", {}))
            self._ckpt_meta = (str(path), ckpt[checkpoint.KEY])

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        _cpu_precision((self.config[subcommand] if subcommand else self.config).trainer)  # build(): no subcommand

    def before_fit(self) -> None:
        self._check_ckpt_matches()
        TimeBoundProgressBar.replace_default(self.trainer)  # --trainer.max_time: the bar shows the real end

    def before_validate(self) -> None:
        self._check_ckpt_matches()

    def before_test(self) -> None:
        self._check_ckpt_matches()

    def before_predict(self) -> None:
        self._check_ckpt_matches()

    def _check_ckpt_matches(self) -> None:
        """Refuse a checkpoint of the other architecture, or made with another tokenizer than the data's.

        Lightning would fail on a vocabulary size mismatch deep inside load_state_dict, and would not fail at all on a
        different tokenizer of the same size (every id would mean another piece).
        """
        if self._ckpt_meta is None:
            return
        path, meta = self._ckpt_meta
        model = self.model
        if meta.get("arch") != model.arch:
            raise checkpoint.CheckpointError(
                f"{path}: a {meta.get('arch')!r} checkpoint, but the config builds {model.arch!r} "
                f"({type(model).__name__}); set --model.class_path to match"
            )
        saved_vocab, vocab = meta["config"].get("vocab_size"), model.config.vocab_size
        tokenizer_file = self._data_tokenizer_file()
        if saved_vocab != vocab:
            raise checkpoint.CheckpointError(
                f"{path}: vocab size mismatch: the checkpoint's model has {saved_vocab} pieces, but the data's "
                f"tokenizer ({tokenizer_file or f'--data.vocab_size {vocab}'}) has {vocab}; use the tokenizer the "
                "checkpoint was trained with (--data.tokenizer)"
            )
        if tokenizer_file is not None and Tokenizer.from_file(tokenizer_file).to_bytes() != meta["tokenizer"].numpy().tobytes():
            raise checkpoint.CheckpointError(
                f"{path}: the checkpoint was trained with a different tokenizer than {tokenizer_file} (same size, "
                "other pieces); use the tokenizer it was trained with (--data.tokenizer)"
            )

    def _data_tokenizer_file(self) -> str | None:
        """The tokenizer file the DataModule will use, when it exists already (else prepare_data trains it)."""
        dm = self.datamodule
        if not isinstance(dm, TranslationDataModule):
            return None
        path = dm.tokenizer_path
        return str(path) if path.is_file() else None


def _cpu_precision(trainer: Any) -> None:
    """A CPU run that asks for bf16-mixed (configs/quickstart.yaml does: with native bf16 arithmetic it trains 1.3x
    faster, docs/results.md) on a CPU without avx512_bf16 or AMX, where torch would emulate bf16, slower than
    float32: run in 32-true there, and say so. `trainer`: the parsed trainer arguments."""
    if str(trainer.get("precision")) not in ("bf16-mixed", "bf16"):  # "bf16": Lightning's alias of bf16-mixed
        return
    accelerator = trainer.get("accelerator")
    on_cpu = accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available()
                                      and not torch.backends.mps.is_available())
    if on_cpu and not quantize.bf16_supported():
        log.warning("--trainer.precision %s: this CPU has no bf16 arithmetic (avx512_bf16 or AMX), where bf16 "
                    "would be emulated and slower than float32; running in 32-true", trainer.get("precision"))
        trainer.precision = "32-true"


def _check_hparams_layout(path: str, hparams: dict[str, Any]) -> None:
    """Refuse, by name, a checkpoint whose hyper-parameters name model fields as init args (`d_model`, ...): Lightning
    would pass them to the module, which takes them in `config` now, and fail with a TypeError."""
    old = sorted(_OLD_INIT_ARGS & set(hparams))
    if old:
        raise checkpoint.CheckpointError(
            f"{path}: saved before the model fields moved under `config` (its hyper-parameters have {', '.join(old[:3])}"
            ", ... as init args); --ckpt_path needs a checkpoint of the current layout. Its weights still load with "
            "translator.checkpoint.load (scripts/translate.py, translator export)"
        )


def build(args: list[str], **kwargs: Any) -> TranslatorCLI:
    """What `translator fit ARGS` builds, not run: `.model`, `.datamodule`, `.trainer` and the parsed `.config`. The
    benchmarks take the recipe from the configs this way. `kwargs` go to LightningCLI (e.g. `trainer_defaults=
    {"callbacks": [...]}`, callbacks beside the configured ones); ARGS seed with `--seed_everything N`."""
    with warnings.catch_warnings():  # a script that builds from its own arguments has a sys.argv of its own too
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return TranslatorCLI(TranslationModule, TranslationDataModule, subclass_mode_model=True, trainer_class=Trainer,
                             save_config_callback=None, run=False, args=args, **kwargs)


def _user_error(err: BaseException) -> str | None:
    """The message of an error in the user's input (data, files, checkpoint, config values), None for a bug.

    FileNotFoundError and CheckpointError count wherever they come from; ValueError when translator code raised it
    (in this process, or in a DataLoader worker: torch re-raises those with the worker's traceback as the message).
    The chain of causes counts too: jsonargparse re-raises a constructor's ValueError (a bad `--model.init_args`
    value) as its own "Does not validate against any of the Union subtypes".
    """
    while err is not None:
        message = _own_user_error(err)
        if message is not None:
            return message
        err = err.__cause__
    return None


def _own_user_error(err: BaseException) -> str | None:
    message, origin = str(err), ""
    if "Original Traceback" in message:  # from a DataLoader worker: keep the original exception's last line
        origin = message.rsplit('File "', 1)[-1]
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    else:
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        origin = tb.tb_frame.f_code.co_filename if tb is not None else ""
    if isinstance(err, (FileNotFoundError, checkpoint.CheckpointError, MisconfigurationException)):
        return message
    # ours, or the Trainer's checks of its arguments (accelerator, strategy, devices, precision) in its connectors
    if isinstance(err, ValueError) and (f"{_PACKAGE_DIR}{os.sep}" in origin
                                        or f"{os.sep}trainer{os.sep}connectors{os.sep}" in origin):
        return message
    return None


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:  # a plain command, not a Trainer run: its own small parser (translator.export)
        from translator.export import main as export_main

        sys.exit(export_main(argv[1:]))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        TranslatorCLI(
            TranslationModule,
            TranslationDataModule,
            subclass_mode_model=True,
            trainer_class=Trainer,
            save_config_callback=SaveFitConfig,
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except Exception as err:
        message = _user_error(err)
        if message is None or os.environ.get("TRANSLATOR_DEBUG", "") not in ("", "0"):
            raise
        sys.stderr.write(f"translator: error: {message}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
