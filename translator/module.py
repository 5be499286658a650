"""LightningModules: one base that owns the metrics and calls the recipe (`translator.recipe`: loss, optimiser,
schedule); one thin subclass per architecture of `translator.checkpoint.ARCHS`.

The checkpoint is self-contained: `save_hyperparameters` stores the constructor arguments, and
`on_save_checkpoint` adds the model config and the SentencePiece model (as a uint8 tensor), so that
`translator.checkpoint.load` can rebuild model and tokenizer from the `.ckpt` alone, with
`torch.load(weights_only=True)`. Throughput and training time are logged by a callback,
`translator.logging_callbacks.TrainingClock`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric, SumMetric

from translator import generate, recipe
from translator.checkpoint import ARCHS, KEY
from translator.metrics import BLEU, CHRF
from translator.recipe import token_loss
from translator.tokenizer import PAD_ID, Tokenizer

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# chosen when decoding: not saved with the weights
DECODING_HPARAMS = ("test_beam_size", "length_penalty", "penalty", "early_stopping")


def evaluation_metrics() -> nn.ModuleDict:
    """One evaluation stage's metrics, each synced across ranks once, at epoch end: the token-weighted mean NLL (its
    exp is the perplexity), sacreBLEU's BLEU and chrF, the sentences decoded for them, the lines scored, the lines cut
    to max_len, and the number of lines in the split (the same in every batch)."""
    return nn.ModuleDict({
        "loss": MeanMetric(), "bleu": BLEU(), "chrf": CHRF(), "decoded": SumMetric(),
        "sentences": SumMetric(), "truncated": SumMetric(), "lines": MaxMetric(),
    })  # fmt: skip


class TranslationModule(L.LightningModule):
    """Base module. Subclasses set `arch`, a key of `translator.checkpoint.ARCHS` (its config and model classes).

    Args:
        preset: model size preset (`tiny`, `small`, `base`) of the architecture's config class.
        config: fields of that config class (`translator.config`) that override the preset, e.g.
            ``{positions: rope, dropout: 0.2}``; on the command line ``--model.init_args.config.positions rope``.
        vocab_size: linked from the DataModule by the CLI.
        lr, warmup_steps, schedule, label_smoothing, weight_decay: the recipe (`translator.recipe`): peak learning
            rate; linear warmup, then inverse square root decay (`inverse_sqrt`) or cosine decay to zero at
            `max_steps` (`cosine`); no weight decay on norms, biases and embeddings.
        bleu_every: compute greedy BLEU/chrF every n-th validation run (0: never).
        bleu_sentences: decode at most this many validation sentences for BLEU, in all (None: all), spread evenly over
            the split: line i when ``i % ceil(lines / bleu_sentences) == 0``. The same lines at every validation, for
            any number of ranks and in any batch order (evaluation batches carry each row's line index).
        test_beam_size, length_penalty, penalty, early_stopping: the search of `translator test` and `translator
            predict` (beam 1: greedy; the others as in `translator.generate.beam_search`, defaults there); decoding
            settings, left out of the checkpoint's hyper-parameters, so that a `--ckpt_path` never overrides the
            ones given.
        compile: compile the training step's forward and loss with `torch.compile`: True (default mode) or a mode
            name; "reduce-overhead" adds CUDA graphs, one recording per batch shape (token-budget batches come in
            few shapes: 18 over two passes of Multi30k at 8192 tokens).
    """

    arch: str

    def __init__(
        self,
        preset: str = "base",
        config: dict[str, Any] | None = None,
        vocab_size: int = 8000,
        lr: float = 1e-3,
        warmup_steps: int = 1000,
        schedule: str = "inverse_sqrt",
        label_smoothing: float = 0.1,
        weight_decay: float = 0.01,
        bleu_every: int = 1,
        bleu_sentences: int | None = None,
        test_beam_size: int = 5,
        length_penalty: float = generate.LENGTH_PENALTY,
        penalty: generate.Penalty = generate.PENALTY,
        early_stopping: bool = generate.EARLY_STOPPING,
        compile: bool | str = False,
    ) -> None:
        super().__init__()
        if schedule not in recipe.SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: expected one of {recipe.SCHEDULES}")
        if penalty not in generate.PENALTIES:
            raise ValueError(f"penalty={penalty!r}: expected one of {generate.PENALTIES}")
        if bleu_sentences is not None and bleu_sentences < 1:
            raise ValueError(f"bleu_sentences={bleu_sentences}: expected a positive number, or null for all")
        if not isinstance(compile, bool) and compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: expected true, false or a torch.compile mode {COMPILE_MODES}")
        if config and "vocab_size" in config:
            raise ValueError("config.vocab_size: the vocabulary size comes from the data (--data.vocab_size)")
        self.save_hyperparameters()
        config_class, model_class = ARCHS[self.arch]
        self.config = config_class.preset(preset, vocab_size=vocab_size, **(config or {}))
        self.model = model_class(self.config)
        self.tokenizer: Tokenizer | None = None
        # a closure, not a module attribute: a second reference to the model as a child module would save every
        # weight twice in the checkpoint. self.model is looked up at each call, so a strategy that wraps it is followed
        source_weight = getattr(self.config, "source_loss", 0.0)  # the decoder-only source-side loss, training only
        self._train_loss = recipe.compiled(
            compile, lambda src, tgt, tokens=None: token_loss(self.model, src, tgt, label_smoothing, tokens,
                                                              source_weight)
        )
        self._cuda_graphs = compile in ("reduce-overhead", "max-autotune")  # the modes that record CUDA graphs
        self.val_metrics, self.test_metrics = evaluation_metrics(), evaluation_metrics()
        self._val_runs = 0
        self._signature_logged = False

    # ---- tokenizer plumbing --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.tokenizer is None and datamodule is not None:
            self.tokenizer = datamodule.tokenizer
        if self.tokenizer is None:
            raise ValueError("no tokenizer: give the Trainer a TranslationDataModule or load a translator checkpoint")
        if self.tokenizer.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"vocab size mismatch: the tokenizer has {self.tokenizer.vocab_size} pieces but the model was built "
                f"for vocab_size={self.config.vocab_size}; set --data.vocab_size (or --model.init_args.vocab_size) "
                "to match, or retrain the tokenizer"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for key in DECODING_HPARAMS:
            checkpoint.get("hyper_parameters", {}).pop(key, None)
        checkpoint[KEY] = {
            "format": CHECKPOINT_FORMAT,
            "arch": self.arch,
            "config": self.config.to_dict(),
            "tokenizer": torch.frombuffer(bytearray(self.tokenizer.to_bytes()), dtype=torch.uint8),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = Tokenizer.from_bytes(checkpoint[KEY]["tokenizer"].cpu().numpy().tobytes())
        if self.tokenizer is not None and self.tokenizer != saved:
            raise ValueError(
                "the checkpoint was trained with another tokenizer than the data's: give the data module the "
                "checkpoint's tokenizer (--data.tokenizer) or start a new run"
            )
        self.tokenizer = saved

    # ---- training ------------------------------------------------------------------------------------------------
    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """src (B, S), tgt (B, T) -> logits (B, T, V)."""
        return self.model(src, tgt)

    def training_loss(self, src: Tensor, tgt: Tensor) -> Tensor:
        """This rank's training loss on a batch: src (B, S), tgt (B, T+1), as `token_loss`.

        One process: the mean over the batch's target tokens. Under DDP, which averages the gradients of the W ranks:
        the sum over this rank's target tokens divided by N / W, N the target tokens of all ranks' batches, so that the
        average is the mean over all N tokens, as fairseq normalises. Each rank's own mean would weigh the tokens of a
        rank with fewer of them more.
        """
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if distributed else 1
        if world == 1:
            return self._train_loss(src, tgt)
        tokens = (tgt[:, 1:] != PAD_ID).sum().float()
        # torch's all_reduce rather than the strategy's reduce, which adds a barrier: on NCCL this one runs on the GPU
        # without a host sync. Outside the (maybe compiled) loss, which takes the count as a tensor input
        torch.distributed.all_reduce(tokens)
        return self._train_loss(src, tgt, tokens / world)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten now
        loss = self.training_loss(batch["src"], batch["tgt"])
        if self._cuda_graphs:
            loss = loss.clone()  # a graph output is overwritten by the next replay; Lightning keeps the loss longer
        # log only on logging steps: showing a tensor reads it back from the GPU, a host sync that stalls the queue
        if self.global_step % self.trainer.log_every_n_steps == 0:
            # averaged over ranks (a no-op in one process): under DDP that is the mean over all ranks' target tokens
            self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # fused only without clipping: Lightning's mixed precision refuses to clip an optimizer that unscales itself
        clip = self._trainer is not None and self._trainer.gradient_clip_val
        optimizer = recipe.adamw(self.model, hp.lr, hp.weight_decay, fused=self.device.type == "cuda" and not clip)
        # `self._trainer`: the `trainer` property raises when no Trainer is attached (cosine then has no horizon)
        steps = self._trainer.estimated_stepping_batches if self._trainer is not None else None
        scheduler = recipe.lr_schedule(optimizer, hp.schedule, hp.warmup_steps, steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- evaluation ----------------------------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Any], metrics: nn.ModuleDict, decode: Sequence[int], beam: int) -> None:
        """Score a batch of ``TokenBatches(evaluation=True)``: the loss over every row, BLEU/chrF over the rows
        ``decode`` (indices into the batch), translated with beam size ``beam``."""
        loss = token_loss(self.model, batch["src"], batch["tgt"], 0.0)
        metrics["loss"].update(loss, weight=(batch["tgt"][:, 1:] != PAD_ID).sum())
        metrics["sentences"].update(len(batch["index"]))
        metrics["truncated"].update(sum(batch["truncated"]))
        metrics["lines"].update(batch["num_pairs"])
        if decode:
            hyps = self.translate_ids(batch["src"][list(decode)], beam)
            refs = [batch["tgt_text"][j] for j in decode]
            metrics["bleu"].update(hyps, refs)
            metrics["chrf"].update(hyps, refs)
            metrics["decoded"].update(len(hyps))

    def translate_ids(self, src: Tensor, beam: int = 1) -> list[str]:
        """Detokenised translations of a padded source batch (B, S); an empty (all-pad) source translates to ''."""
        lengths = (src != PAD_ID).sum(1).tolist()
        rows = [i for i, n in enumerate(lengths) if n]
        texts = [""] * len(lengths)
        if not rows:
            return texts
        src = src[rows, : max(lengths)]  # (R, S') without the empty rows and the all-pad columns
        if beam <= 1:
            ids = generate.greedy(self.model, src)
        else:
            hp = self.hparams
            ids = [h[0].tokens for h in generate.beam_search(self.model, src, beam, hp.length_penalty,
                                                             penalty=hp.penalty, early_stopping=hp.early_stopping)]
        for i, text in zip(rows, self.tokenizer.decode(ids)):
            texts[i] = text
        return texts

    def on_validation_epoch_start(self) -> None:
        self._val_runs += 1

    def _bleu_due(self) -> bool:
        return self.hparams.bleu_every > 0 and self._val_runs % self.hparams.bleu_every == 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        rows = []
        if self._bleu_due():
            # by line index, not by batch position: batches are sorted by length, so the first sentences seen are
            # the shortest; a stride over the whole split is a fixed sample of every length, on any number of ranks
            limit = self.hparams.bleu_sentences
            stride = 1 if limit is None else -(-batch["num_pairs"] // limit)
            rows = [j for j, i in enumerate(batch["index"]) if i % stride == 0]
        self._evaluate(batch, self.val_metrics, rows, 1)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, range(len(batch["index"])), self.hparams.test_beam_size)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[tuple[int, str]]:
        """(line index, translation) per row of a ``translator.data.SourceBatches`` batch, beam ``test_beam_size``."""
        return list(zip(batch["index"], self.translate_ids(batch["src"], self.hparams.test_beam_size)))

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val", self.val_metrics, bleu=self._bleu_due())

    def on_test_epoch_end(self) -> None:
        scored, lines = int(self.test_metrics["sentences"].compute()), int(self.test_metrics["lines"].compute())
        datamodule = getattr(self.trainer, "datamodule", None)
        if scored < lines and not getattr(datamodule, "hparams", {}).get("allow_partial_test", False):
            # a BLEU over part of a test set is comparable with no one's (e.g. --trainer.limit_test_batches)
            raise ValueError(
                f"the test scored {scored} of the {lines} lines of its split, so test/bleu would cover a subset; "
                "evaluate the whole split, or set --data.allow_partial_test true to report it anyway"
            )
        self._log_scores("test", self.test_metrics, bleu=True)

    def _log_scores(self, stage: str, metrics: nn.ModuleDict, bleu: bool) -> None:
        """Log a stage's epoch metrics (`stage`/loss, ppl, sentences, truncated; with `bleu` also bleu, chrf and
        bleu_sentences, the lines decoded for them), then reset them. Validation's loss, ppl and BLEU go on the bar."""
        loss, bar = metrics["loss"].compute(), stage == "val"
        self.log(f"{stage}/loss", loss, prog_bar=bar)
        self.log(f"{stage}/ppl", loss.exp(), prog_bar=bar)
        self.log(f"{stage}/sentences", metrics["sentences"].compute())
        self.log(f"{stage}/truncated", metrics["truncated"].compute())
        if bleu:
            self.log(f"{stage}/bleu", metrics["bleu"].compute(), prog_bar=bar)
            self.log(f"{stage}/chrf", metrics["chrf"].compute())
            self.log(f"{stage}/bleu_sentences", metrics["decoded"].compute())
            if not self._signature_logged and self.trainer.is_global_zero:
                bleu, chrf = metrics["bleu"].signature, metrics["chrf"].signature
                log.info("sacreBLEU signatures: BLEU %s | chrF %s", bleu, chrf)
                self._signature_logged = True
        for metric in metrics.values():
            metric.reset()


class Seq2SeqModule(TranslationModule):
    """The encoder-decoder Transformer (`translator.seq2seq`); `config` takes the fields of `Seq2SeqConfig`."""

    arch = "seq2seq"


class DecoderOnlyModule(TranslationModule):
    """The decoder-only Transformer over `source <sep> target` (`translator.decoder_only`); `config` takes the fields
    of `DecoderOnlyConfig`, e.g. prefix_mode (`bidirectional`: prefix-LM; `causal`: the plain recipe)."""

    arch = "decoder_only"


MODULES: dict[str, type[TranslationModule]] = {cls.arch: cls for cls in (Seq2SeqModule, DecoderOnlyModule)}
