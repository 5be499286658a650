"""`translator`: the Lightning CLI (fit / validate / test / predict) over both architectures.

    translator fit --config configs/encdec.yaml --config configs/data/multi30k.yaml --config configs/trainer/gpu.yaml

The model is chosen by `class_path` (`translator.module.Seq2SeqModule` or `translator.module.DecoderOnlyModule`);
the vocabulary size is linked from the data to the model, never typed twice.
"""

from __future__ import annotations

import logging

from lightning.pytorch.cli import LightningCLI

from translator.data import TranslationDataModule
from translator.module import TranslationModule


class TranslatorCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")


def main(args: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    TranslatorCLI(
        TranslationModule,
        TranslationDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
