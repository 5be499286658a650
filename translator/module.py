"""LightningModules: one base that owns loss, metrics, optimiser and schedule; one thin subclass per architecture.

The checkpoint is self-contained: `save_hyperparameters` stores the constructor arguments, and
`on_save_checkpoint` adds the model config and the SentencePiece model (as a uint8 tensor), so that
`translator.checkpoint.load` can rebuild model and tokenizer from the `.ckpt` alone, with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric, SumMetric

from translator import generate
from translator.config import DecoderOnlyConfig, Seq2SeqConfig, TransformerConfig
from translator.decoder_only import DecoderOnlyTransformer
from translator.metrics import BLEU, CHRF
from translator.seq2seq import Seq2SeqTransformer
from translator.tokenizer import PAD_ID, Tokenizer

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "translator"  # where on_save_checkpoint puts {arch, config, format}; absent in foreign files
CHECKPOINT_FORMAT = 1
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def token_loss(
    model: nn.Module, src: Tensor, tgt: Tensor, label_smoothing: float, tokens: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Cross-entropy over the non-pad target tokens, and the logits (B, T, V): the mean over those tokens, or with
    `tokens` (a 0-d tensor) their sum divided by it.

    src (B, S); tgt (B, T+1) = `<bos> y <eos>` padded: the model reads tgt[:, :-1] and predicts tgt[:, 1:].
    """
    logits = model(src, tgt[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=PAD_ID,
                           label_smoothing=label_smoothing, reduction="mean" if tokens is None else "sum")
    return (loss if tokens is None else loss / tokens), logits


def evaluation_metrics() -> nn.ModuleDict:
    """One evaluation stage's metrics, each synced across ranks once, at epoch end: the token-weighted mean NLL (its
    exp is the perplexity), sacreBLEU's BLEU and chrF, the sentences decoded for them, the lines scored, the lines cut
    to max_len, and the number of lines in the split (the same in every batch)."""
    return nn.ModuleDict({
        "loss": MeanMetric(), "bleu": BLEU(), "chrf": CHRF(), "decoded": SumMetric(),
        "sentences": SumMetric(), "truncated": SumMetric(), "lines": MaxMetric(),
    })  # fmt: skip


def _compiled(compile: bool | str, fn):
    """fn, or torch.compile(fn) in the given mode (True: the default mode)."""
    if compile is False or compile is None:
        return fn
    import torch._inductor.config as inductor

    # torch 2.11's inductor failed an assertion in this analysis while compiling our training step for CUDA
    # (tiling_utils.get_pw_red_splits, seen on an H200); without it the step compiles and trains (docs/results.md)
    if hasattr(inductor.triton, "coalesce_tiling_analysis"):
        inductor.triton.coalesce_tiling_analysis = False
    return torch.compile(fn, mode=None if compile is True else compile)


class TranslationModule(L.LightningModule):
    """Base module. Subclasses set `arch`, `config_class` and `model_class`.

    Args:
        preset: model size preset (`tiny`, `small`, `base`); the arguments below that are not None override it.
        vocab_size: linked from the DataModule by the CLI.
        lr, warmup_steps, schedule: peak learning rate; linear warmup, then inverse square root decay
            (`inverse_sqrt`) or cosine decay to zero at `max_steps` (`cosine`).
        label_smoothing, weight_decay: as usual; no decay on norms, biases and embeddings.
        bleu_every: compute greedy BLEU/chrF every n-th validation run (0: never).
        bleu_sentences: decode at most this many validation sentences for BLEU, in all (None: all), spread evenly over
            the split: line i when ``i % ceil(lines / bleu_sentences) == 0``. The same lines at every validation, for
            any number of ranks and in any batch order (evaluation batches carry each row's line index).
        test_beam_size: beam size for `translator test` and `translator predict` (1: greedy).
        compile: compile the training step's forward and loss with `torch.compile`: True (default mode) or a mode
            name; "reduce-overhead" adds CUDA graphs, one recording per batch shape (token-budget batches come in
            few shapes: 18 over two passes of Multi30k at 8192 tokens).
    """

    arch: str
    config_class: type[TransformerConfig]
    model_class: type[nn.Module]

    def __init__(
        self,
        preset: str = "base",
        vocab_size: int = 8000,
        d_model: int | None = None,
        n_heads: int | None = None,
        d_ff: int | None = None,
        dropout: float | None = None,
        attn_dropout: float | None = None,
        positions: str | None = None,
        activation: str | None = None,
        norm_first: bool | None = None,
        tie_embeddings: bool | None = None,
        init_std: float | None = None,
        scale_embeddings: bool | None = None,
        lr: float = 1e-3,
        warmup_steps: int = 1000,
        schedule: str = "inverse_sqrt",
        label_smoothing: float = 0.1,
        weight_decay: float = 0.01,
        bleu_every: int = 1,
        bleu_sentences: int | None = None,
        test_beam_size: int = 5,
        length_penalty: float = generate.LENGTH_PENALTY,
        compile: bool | str = False,
        **model_overrides: Any,
    ) -> None:
        super().__init__()
        if schedule not in ("inverse_sqrt", "cosine"):
            raise ValueError(f"schedule={schedule!r}: expected 'inverse_sqrt' or 'cosine'")
        if bleu_sentences is not None and bleu_sentences < 1:
            raise ValueError(f"bleu_sentences={bleu_sentences}: expected a positive number, or null for all")
        if not isinstance(compile, bool) and compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: expected true, false or a torch.compile mode {COMPILE_MODES}")
        self.save_hyperparameters()
        self.config = self.config_class.preset(
            preset,
            vocab_size=vocab_size,
            d_model=d_model,
            n_heads=n_heads,
            d_ff=d_ff,
            dropout=dropout,
            attn_dropout=attn_dropout,
            positions=positions,
            activation=activation,
            norm_first=norm_first,
            tie_embeddings=tie_embeddings,
            init_std=init_std,
            scale_embeddings=scale_embeddings,
            **model_overrides,
        )
        self.model = self.model_class(self.config)
        self.tokenizer: Tokenizer | None = None
        # a closure, not a module attribute: a second reference to the model as a child module would save every
        # weight twice in the checkpoint. self.model is looked up at each call, so a strategy that wraps it is followed
        self._train_loss = _compiled(
            compile, lambda src, tgt, tokens=None: token_loss(self.model, src, tgt, label_smoothing, tokens)[0]
        )
        self._cuda_graphs = compile in ("reduce-overhead", "max-autotune")  # the modes that record CUDA graphs
        self.val_metrics, self.test_metrics = evaluation_metrics(), evaluation_metrics()
        self._val_runs = 0
        self._signature_logged = False
        self._tokens, self._clock = 0, None
        self._elapsed, self._fit_start = 0.0, None  # training wall time, carried across resumes by the checkpoint

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
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "arch": self.arch,
            "config": self.config.to_dict(),
            "tokenizer": torch.frombuffer(bytearray(self.tokenizer.to_bytes()), dtype=torch.uint8),
            "elapsed_s": self._elapsed_s(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = Tokenizer.from_bytes(checkpoint[CHECKPOINT_KEY]["tokenizer"].cpu().numpy().tobytes())
        if self.tokenizer is not None and self.tokenizer != saved:
            raise ValueError(
                "the checkpoint was trained with another tokenizer than the data's: give the data module the "
                "checkpoint's tokenizer (--data.tokenizer) or start a new run"
            )
        self.tokenizer = saved
        self._elapsed = checkpoint[CHECKPOINT_KEY].get("elapsed_s", 0.0)

    def _elapsed_s(self) -> float:
        """Seconds of training so far, over every run that led to this state (validation included)."""
        return self._elapsed + (time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0)

    def on_train_start(self) -> None:
        self._fit_start = time.perf_counter()

    def on_train_end(self) -> None:
        self._elapsed, self._fit_start = self._elapsed_s(), None

    # ---- training ------------------------------------------------------------------------------------------------
    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """src (B, S), tgt (B, T) -> logits (B, T, V)."""
        return self.model(src, tgt)

    def _loss(self, batch: dict[str, Tensor], label_smoothing: float) -> tuple[Tensor, Tensor]:
        return token_loss(self.model, batch["src"], batch["tgt"], label_smoothing)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if self.trainer is not None and self.trainer.training:
            # counted on the host before the copy to the GPU: no device sync for the tokens/s display
            self._tokens += int((batch["src"] != PAD_ID).sum()) + int((batch["tgt"][:, 1:] != PAD_ID).sum())
        return batch

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
            now = time.perf_counter()
            # averaged over ranks (a no-op in one process): under DDP that is the mean over all ranks' target tokens
            self.log("train/loss", loss, prog_bar=True, sync_dist=True)
            self.log("train/elapsed_s", self._elapsed_s())
            if self._clock is not None:
                self.log("train/tok_per_s", self._tokens / (now - self._clock), prog_bar=True)
            self._clock, self._tokens = now, 0
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        embeddings = {id(m.weight) for m in self.model.modules() if isinstance(m, nn.Embedding)}
        for p in {id(p): p for p in self.model.parameters()}.values():
            (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=(0.9, 0.98),
            eps=1e-9,
            # Lightning's mixed precision refuses to clip the gradients of an optimizer that unscales them itself
            fused=self.device.type == "cuda" and not (self._trainer is not None and self._trainer.gradient_clip_val),
        )
        warmup = max(1, self.hparams.warmup_steps)
        # `self._trainer`: the `trainer` property raises when no Trainer is attached. The train stream is endless, so
        # without max_steps Lightning estimates -1 or inf steps: no horizon for cosine (and int(inf) would raise).
        steps = self._trainer.estimated_stepping_batches if self._trainer is not None else -1
        if self.hparams.schedule == "cosine" and not 0 < steps < math.inf:
            raise ValueError("schedule='cosine' decays to zero at trainer.max_steps: set --trainer.max_steps")
        total = max(warmup + 1, int(steps)) if self.hparams.schedule == "cosine" else warmup + 1

        def lr_lambda(step: int) -> float:
            step += 1
            if step < warmup:
                return step / warmup
            if self.hparams.schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))
            return math.sqrt(warmup / step)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- evaluation ----------------------------------------------------------------------------------------------
    def _evaluate(self, batch: dict[str, Any], metrics: nn.ModuleDict, decode: Sequence[int], beam: int) -> None:
        """Score a batch of ``TokenBatches(evaluation=True)``: the loss over every row, BLEU/chrF over the rows
        ``decode`` (indices into the batch), translated with beam size ``beam``."""
        loss, _ = self._loss(batch, 0.0)
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
            ids = [h[0].tokens for h in generate.beam_search(self.model, src, beam, self.hparams.length_penalty)]
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

    def _log_scores(self, stage: str, metrics: nn.ModuleDict) -> None:
        loss = metrics["loss"].compute()
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}/ppl", loss.exp(), prog_bar=stage == "val")
        self.log(f"{stage}/sentences", metrics["sentences"].compute())
        self.log(f"{stage}/truncated", metrics["truncated"].compute())

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics
        self._log_scores("val", metrics)
        if self._bleu_due():
            self.log("val/bleu", metrics["bleu"].compute(), prog_bar=True)
            self.log("val/chrf", metrics["chrf"].compute())
            self.log("val/bleu_sentences", metrics["decoded"].compute())
            self._log_signature(metrics["bleu"], metrics["chrf"])
        for metric in metrics.values():
            metric.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, range(len(batch["index"])), self.hparams.test_beam_size)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[tuple[int, str]]:
        """(line index, translation) per row of a ``translator.data.SourceBatches`` batch, beam ``test_beam_size``."""
        return list(zip(batch["index"], self.translate_ids(batch["src"], self.hparams.test_beam_size)))

    def on_test_epoch_end(self) -> None:
        metrics = self.test_metrics
        scored, lines = int(metrics["sentences"].compute()), int(metrics["lines"].compute())
        datamodule = getattr(self.trainer, "datamodule", None)
        if scored < lines and not getattr(datamodule, "hparams", {}).get("allow_partial_test", False):
            # a BLEU over part of a test set is comparable with no one's (e.g. --trainer.limit_test_batches)
            raise ValueError(
                f"the test scored {scored} of the {lines} lines of its split, so test/bleu would cover a subset; "
                "evaluate the whole split, or set --data.allow_partial_test true to report it anyway"
            )
        self._log_scores("test", metrics)
        self.log("test/bleu", metrics["bleu"].compute())
        self.log("test/chrf", metrics["chrf"].compute())
        self._log_signature(metrics["bleu"], metrics["chrf"])
        for metric in metrics.values():
            metric.reset()

    def _log_signature(self, bleu, chrf) -> None:
        if not self._signature_logged and self.trainer.is_global_zero:
            log.info("sacreBLEU signatures: BLEU %s | chrF %s", bleu.signature, chrf.signature)
            self._signature_logged = True


class Seq2SeqModule(TranslationModule):
    """The encoder-decoder Transformer (`translator.seq2seq`)."""

    arch, config_class, model_class = "seq2seq", Seq2SeqConfig, Seq2SeqTransformer

    def __init__(self, n_encoder_layers: int | None = None, n_decoder_layers: int | None = None, **kwargs: Any) -> None:
        super().__init__(n_encoder_layers=n_encoder_layers, n_decoder_layers=n_decoder_layers, **kwargs)


class DecoderOnlyModule(TranslationModule):
    """The decoder-only Transformer over `source <sep> target` (`translator.decoder_only`).

    Args:
        prefix_mode: `bidirectional` (prefix-LM) or `causal` (the plain recipe).
        segment_embeddings: add a learned source/target embedding.
        rope_restart: restart position ids at `<sep>`.
    """

    arch, config_class, model_class = "decoder_only", DecoderOnlyConfig, DecoderOnlyTransformer

    def __init__(
        self,
        n_layers: int | None = None,
        prefix_mode: str | None = None,
        segment_embeddings: bool | None = None,
        rope_restart: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            n_layers=n_layers,
            prefix_mode=prefix_mode,
            segment_embeddings=segment_embeddings,
            rope_restart=rope_restart,
            **kwargs,
        )


MODULES = {cls.arch: cls for cls in (Seq2SeqModule, DecoderOnlyModule)}
