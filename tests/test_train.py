"""Training end to end on CPU: `translator fit --trainer.fast_dev_run` per architecture and per shipped config, a tiny
model that learns, checkpoint round trips, the learning-rate schedule and weight-decay groups, and a 2-process DDP run
whose synced validation metrics equal a single process's on the same checkpoint.

All outputs (logs, checkpoints, saved configs) go to tmp dirs: every CLI run is made from one (`monkeypatch.chdir`)
with absolute paths to the configs and the data; a 1000-piece tokenizer trained once (tests/conftest.py) replaces the
one `prepare_data` would train on the whole train split.
"""

from __future__ import annotations

import csv
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import MULTI30K, read_pairs
from torch import nn

from translator import checkpoint
from translator.cli import main
from translator.data import TranslationDataModule
from translator.module import DecoderOnlyModule, Seq2SeqModule, TranslationModule, token_loss
from translator.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DEBUG = str(CONFIGS / "debug.yaml")
pytestmark = pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"Multi30k not found at {MULTI30K}")


@pytest.fixture(scope="module")
def tokenizer_file(tokenizer: Tokenizer, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tokenizer") / "multi30k-1000.model"
    tokenizer.save(path)
    return str(path)


def data_args(tokenizer_file: str) -> list[str]:
    """Local Multi30k, the session tokenizer, no DataLoader workers, a small shuffle buffer (quick to fill).

    `--data.vocab_size` must equal the given tokenizer's size even though the model's is linked from the tokenizer:
    otherwise Lightning refuses to log the hyperparameters ("Error while merging hparams: ... vocab_size").
    """
    return [
        "--data.path", str(MULTI30K), "--data.val_split", "val", "--data.test_split", "test_2016_flickr",
        "--data.tokenizer", tokenizer_file, "--data.vocab_size", "1000", "--data.num_workers", "0",
        "--data.shuffle_buffer", "1000",
    ]  # fmt: skip


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **kwargs,
    )  # fmt: skip


def datamodule(tokenizer_file: str, **kwargs) -> TranslationDataModule:
    settings = {
        "path": str(MULTI30K), "val_split": "val", "tokenizer": tokenizer_file, "max_tokens": 2048, "max_len": 64,
        "shuffle_buffer": 2000, "num_workers": 0, "limit_val_pairs": 200,
    }  # fmt: skip
    return TranslationDataModule(**{**settings, **kwargs})


@pytest.fixture
def fitted(monkeypatch) -> list[TranslationModule]:
    """Collects the module of every fit the CLI runs (TranslationModule.on_fit_end)."""
    seen: list[TranslationModule] = []
    monkeypatch.setattr(TranslationModule, "on_fit_end", lambda self: seen.append(self), raising=False)
    return seen


# ---- the CLI -----------------------------------------------------------------------------------------------------
DECODER_ONLY = ["--model.class_path", "translator.module.DecoderOnlyModule"]
ARCHS = {
    "seq2seq": [],
    "prefix-lm": DECODER_ONLY,
    "causal-lm": [*DECODER_ONLY, "--model.init_args.config.prefix_mode", "causal"],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_dev_run_debug_config(arch, tokenizer_file, tmp_path, monkeypatch, fitted):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", DEBUG, *data_args(tokenizer_file), *ARCHS[arch], "--trainer.fast_dev_run=true"])
    (module,) = fitted
    assert type(module) is (Seq2SeqModule if arch == "seq2seq" else DecoderOnlyModule)
    if arch != "seq2seq":
        assert module.config.prefix_mode == ("causal" if arch == "causal-lm" else "bidirectional")
    assert module.config.d_model == 32 and module.hparams.lr == 3e-3  # debug.yaml's init_args survive class_path
    assert module.config.vocab_size == 1000  # linked from the data's tokenizer
    trainer = module.trainer
    assert trainer.global_step == 1
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/ppl", "val/bleu", "val/chrf"} <= set(metrics)
    assert torch.isfinite(metrics["val/loss"]) and metrics["val/ppl"] > 1


@pytest.mark.parametrize("name", ["encdec", "decoder_only", "decoder_only_causal", "quickstart"])
def test_fast_dev_run_shipped_config(name, tokenizer_file, tmp_path, monkeypatch, fitted):
    """The GPU configs as documented (model + data/multi30k.yaml), on CPU with the tiny preset: the YAMLs parse and run."""
    monkeypatch.chdir(tmp_path)
    configs = [str(CONFIGS / f"{name}.yaml")]
    if name != "quickstart":  # quickstart.yaml carries its own data and CPU trainer sections
        configs += [str(CONFIGS / "data" / "multi30k.yaml"), str(CONFIGS / "trainer" / "cpu.yaml")]
    args = [a for c in configs for a in ("--config", c)]
    main(["fit", *args, *data_args(tokenizer_file), "--model.init_args.preset", "tiny", "--trainer.fast_dev_run=true"])
    (module,) = fitted
    assert module.config.d_model == 32 and module.trainer.global_step == 1
    assert module.trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert "val/loss" in module.trainer.callback_metrics


# ---- learning and checkpoints ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_seq2seq(tokenizer_file, tmp_path_factory):
    """A tiny encoder-decoder trained 300 steps: (module, datamodule, val metrics before, after, checkpoint path)."""
    torch.manual_seed(0)
    dm = datamodule(tokenizer_file)
    module = Seq2SeqModule(preset="tiny", vocab_size=1000, lr=3e-3, warmup_steps=30, bleu_every=0)
    before = quiet_trainer().validate(module, datamodule=dm, verbose=False)[0]
    trainer = quiet_trainer(max_steps=300, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    after = quiet_trainer().validate(module, datamodule=dm, verbose=False)[0]
    path = tmp_path_factory.mktemp("ckpt") / "seq2seq.ckpt"
    trainer.save_checkpoint(path)
    return module, dm, before, after, path


def test_training_lowers_validation_perplexity(trained_seq2seq):
    _, _, before, after, _ = trained_seq2seq
    assert before["val/ppl"] > 300  # about the vocabulary size: an untrained model
    assert after["val/ppl"] < 0.1 * before["val/ppl"]


def test_validation_loss_is_the_mean_nll_over_every_target_token(trained_seq2seq):
    """val/loss and val/ppl against the NLL recomputed here from the model's logits on the val batches, in float64,
    summed over all target tokens and divided once (a mean of batch means, or a pad counted, would differ)."""
    module, dm, _, after, _ = trained_seq2seq
    nll, tokens = 0.0, 0
    module.eval()
    with torch.no_grad():
        for batch in dm.val_dataloader():
            logits, target = module(batch["src"], batch["tgt"][:, :-1]).double(), batch["tgt"][:, 1:]
            nll += F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=0, reduction="sum").item()
            tokens += int((target != 0).sum())
    module.train()
    assert tokens > 2000  # 200 val pairs
    assert after["val/loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert after["val/ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def val_batch(dm: TranslationDataModule) -> dict:
    return next(iter(dm.val_dataloader()))


def assert_same_model(module: TranslationModule, loaded: TranslationModule, dm: TranslationDataModule) -> None:
    batch = val_batch(dm)
    module.eval(), loaded.eval()
    assert type(loaded) is type(module) and loaded.config == module.config
    with torch.no_grad():
        expected = module(batch["src"], batch["tgt"][:, :-1])
        assert torch.equal(loaded(batch["src"], batch["tgt"][:, :-1]), expected)
    assert loaded.tokenizer.to_bytes() == module.tokenizer.to_bytes()
    assert loaded.tokenizer.encode(batch["src_text"]) == module.tokenizer.encode(batch["src_text"])


def test_seq2seq_checkpoint_round_trip(trained_seq2seq):
    module, dm, _, _, path = trained_seq2seq
    loaded = Seq2SeqModule.load_from_checkpoint(path)
    assert_same_model(module, loaded, dm)
    assert loaded.hparams == module.hparams

    model, tokenizer, meta = checkpoint.load(path)  # the safe, Lightning-free loader
    batch = val_batch(dm)
    assert meta["arch"] == "seq2seq" and not model.training
    with torch.no_grad():
        assert torch.equal(model(batch["src"], batch["tgt"][:, :-1]), module(batch["src"], batch["tgt"][:, :-1]))
    assert tokenizer.to_bytes() == module.tokenizer.to_bytes()
    assert module.translate_ids(batch["src"][:4]) == loaded.translate_ids(batch["src"][:4])


def test_decoder_only_checkpoint_round_trip(tokenizer_file, tmp_path):
    torch.manual_seed(0)
    dm = datamodule(tokenizer_file, limit_val_pairs=32)
    module = DecoderOnlyModule(preset="tiny", vocab_size=1000, bleu_every=0,
                               config={"prefix_mode": "causal", "positions": "rope", "segment_embeddings": True})
    trainer = quiet_trainer(max_steps=3, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "decoder_only.ckpt")
    loaded = DecoderOnlyModule.load_from_checkpoint(tmp_path / "decoder_only.ckpt")
    assert_same_model(module, loaded, dm)
    model, tokenizer, meta = checkpoint.load(tmp_path / "decoder_only.ckpt")
    batch = val_batch(dm)
    assert meta["arch"] == "decoder_only" and model.config.prefix_mode == "causal"
    with torch.no_grad():
        assert torch.equal(model(batch["src"], batch["tgt"][:, :-1]), module(batch["src"], batch["tgt"][:, :-1]))
    assert tokenizer.to_bytes() == module.tokenizer.to_bytes()


def fails_in_one_line(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("translator: error: "), err
    return err[-1]


@pytest.mark.parametrize("field, value, expected", [
    ("d_modle", "64", "unknown Seq2SeqConfig field(s) ['d_modle']"),
    ("d_model", "wide", "d_model='wide': expected int"),
    ("norm_first", "1", "norm_first=1: expected bool"),
])
def test_a_bad_model_config_field_is_one_line(field, value, expected, tokenizer_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", DEBUG, *data_args(tokenizer_file), f"--model.init_args.config.{field}", value]
    assert expected in fails_in_one_line(args, capsys)


def test_a_checkpoint_of_the_old_init_args_is_refused_by_name_and_still_loads(checkpoints, tokenizer_file, tmp_path,
                                                                              monkeypatch, capsys):
    """Before the model fields moved under `config`, the hyper-parameters held them as init args (d_model: null, ...):
    `--ckpt_path` refuses such a checkpoint in one line; `checkpoint.load` still reads its weights and training time."""
    old = torch.load(checkpoints["seq2seq"], weights_only=True)
    old["hyper_parameters"].pop("config")
    old["hyper_parameters"].update(d_model=None, positions="sinusoidal", n_encoder_layers=None)
    old["callbacks"].pop("Timer")
    old["translator"]["elapsed_s"] = 12.5
    path = tmp_path / "old.ckpt"
    torch.save(old, path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["translator"])
    line = fails_in_one_line(["test", "--config", DEBUG, *data_args(tokenizer_file), "--ckpt_path", str(path)], capsys)
    assert str(path) in line and "saved before the model fields moved under `config`" in line and "d_model" in line
    model, _, meta = checkpoint.load(path)
    assert meta["arch"] == "seq2seq" and checkpoint.training_seconds(checkpoint.read(path)) == 12.5
    assert checkpoint.training_seconds(checkpoint.read(checkpoints["seq2seq"])) > 0  # the Timer's, in a new one


# ---- evaluation --------------------------------------------------------------------------------------------------
def write_split(root: Path, split: str, pairs: list[tuple[str, str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for k, lang in enumerate(("de", "en")):
        (root / f"{split}.{lang}").write_text("".join(p[k] + "\n" for p in pairs), encoding="utf-8")
    return root


@pytest.fixture
def tested(monkeypatch) -> list[TranslationModule]:
    """Collects the module of every `translator test` (TranslationModule.on_test_end)."""
    seen: list[TranslationModule] = []
    monkeypatch.setattr(TranslationModule, "on_test_end", lambda self: seen.append(self), raising=False)
    return seen


def test_test_scores_every_line_and_refuses_a_subset(checkpoints, tokenizer_file, tmp_path, monkeypatch, capsys,
                                                     tested):  # fmt: skip
    """`translator test` on real Multi30k test lines with over-long and empty pairs injected: every line is scored
    (test/sentences), the over-long ones cut and counted (test/truncated); a BLEU over part of the split is refused in
    one line unless --data.allow_partial_test."""
    pairs = read_pairs("test_2016_flickr", 40)
    long = (" ".join([pairs[0][0]] * 12), " ".join([pairs[0][1]] * 12))  # far over debug.yaml's max_len=64
    pairs[5:5], pairs[20:20] = [long, ("", pairs[1][1]), (pairs[2][0], "")], [long, ("  ", "  "), long]
    data = write_split(tmp_path / "data", "test", pairs)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["translator"])  # LightningCLI warns about pytest's own arguments
    args = ["test", "--config", DEBUG, *data_args(tokenizer_file), "--data.path", str(data), "--data.test_split", "test",
            "--ckpt_path", str(checkpoints["seq2seq"]), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    main([*args, "--trainer.limit_test_batches", "1.0"])
    metrics = tested[-1].trainer.callback_metrics
    assert metrics["test/sentences"] == len(pairs) == 46 and metrics["test/truncated"] == 3
    assert metrics["test/chrf"] > 0 and torch.isfinite(metrics["test/loss"])

    partial = [*args, "--trainer.limit_test_batches", "1"]  # one batch: part of the split
    with pytest.raises(SystemExit) as info:
        main([*partial, "--data.allow_partial_test", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("translator: error: ") and "of the 46 lines" in err[-1] and "allow_partial_test" in err[-1]
    main([*partial, "--data.allow_partial_test", "true"])  # opted in (debug.yaml does, for its smoke runs)
    assert 0 < tested[-1].trainer.callback_metrics["test/sentences"] < 46


def test_validation_bleu_decodes_the_same_lines_spread_over_the_split(tokenizer_file):
    """bleu_sentences=40 of the 1014 val lines: every 26th line by index (39 lines), so every length is sampled, the
    same lines at every validation, not each batch's or rank's first (the shortest: batches are sorted by length)."""
    dm = datamodule(tokenizer_file, limit_val_pairs=None)
    module = Seq2SeqModule(preset="tiny", vocab_size=1000, bleu_sentences=40)
    scored: list[list[str]] = []
    bleu = module.val_metrics["bleu"]
    update = bleu.update
    bleu.update = lambda hyps, refs: (scored[-1].extend(refs), update(hyps, refs))
    for _ in range(2):
        scored.append([])
        metrics = quiet_trainer().validate(module, datamodule=dm, verbose=False)[0]
        assert metrics["val/bleu_sentences"] == len(scored[-1]) == 39 and metrics["val/sentences"] == 1014
    references = [en for _, en in read_pairs("val", 1014)]
    assert sorted(scored[0]) == sorted(scored[1]) == sorted(references[::26])
    words = sorted(len(r.split()) for r in references)
    chosen = [len(r.split()) for r in scored[0]]
    assert min(chosen) <= words[len(words) // 10] and max(chosen) >= words[len(words) * 3 // 4]  # short and long


def test_an_empty_source_translates_to_an_empty_line(trained_seq2seq):
    module, dm, *_ = trained_seq2seq
    src = val_batch(dm)["src"][:3]
    alone = module.translate_ids(src)
    src[1] = 0  # the middle row's source is empty: all pad
    assert module.translate_ids(src) == [alone[0], "", alone[2]] and alone[1]


# ---- optimiser and schedule --------------------------------------------------------------------------------------
def lr_trace(module: TranslationModule, steps: int) -> list[float]:
    """The learning rate each of the first `steps` optimizer steps uses, stepping the scheduler as Lightning does."""
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        assert optimizer.param_groups[1]["lr"] == lrs[-1]  # both groups follow the schedule
        optimizer.step()
        scheduler.step()
    return lrs


def test_inverse_sqrt_schedule_warms_up_linearly_then_decays_as_inverse_sqrt():
    peak, warmup = 1e-3, 10
    module = Seq2SeqModule(preset="tiny", vocab_size=100, lr=peak, warmup_steps=warmup, schedule="inverse_sqrt")
    lrs = lr_trace(module, 200)  # no Trainer attached: inverse_sqrt needs no horizon
    for s, lr in enumerate(lrs, start=1):  # s: the 1-based optimizer step
        expected = peak * s / warmup if s < warmup else peak * math.sqrt(warmup / s)
        assert lr == pytest.approx(expected, rel=1e-12), s
    assert max(lrs) == pytest.approx(peak) and lrs.index(max(lrs)) == warmup - 1
    assert lrs[4 * warmup - 1] == pytest.approx(peak / 2)  # 4x the warmup: half the peak


def test_cosine_schedule_reaches_zero_at_max_steps():
    peak, warmup, max_steps = 1e-3, 10, 100
    module = Seq2SeqModule(preset="tiny", vocab_size=100, lr=peak, warmup_steps=warmup, schedule="cosine")
    module.trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False)
    lrs = lr_trace(module, max_steps)
    assert lrs[: warmup - 1] == pytest.approx([peak * s / warmup for s in range(1, warmup)])
    assert lrs[warmup - 1] == pytest.approx(peak)
    halfway = warmup + (max_steps - warmup) // 2
    assert lrs[halfway - 1] == pytest.approx(peak / 2)
    assert all(a > b for a, b in zip(lrs[warmup - 1 :], lrs[warmup:]))  # strictly decreasing after the peak
    assert lrs[-1] == 0.0  # step max_steps itself runs at lr 0

    with pytest.raises(ValueError, match="max_steps"):  # no horizon: refuse instead of decaying to 0 at warmup
        module.trainer = L.Trainer(max_epochs=-1, logger=False, enable_progress_bar=False)
        module.configure_optimizers()


@pytest.mark.parametrize("cls", [Seq2SeqModule, DecoderOnlyModule])
def test_compiled_training_loss_and_gradients_equal_eager(cls):
    """compile=True compiles forward and loss together (torch.compile, inductor on CPU): same loss, same gradients."""
    torch.manual_seed(0)
    eager, compiled = cls(preset="tiny", vocab_size=100), cls(preset="tiny", vocab_size=100, compile=True)
    compiled.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(5, 100, (4, 9), generator=g), torch.randint(5, 100, (4, 7), generator=g)
    src[1, 6:], tgt[:, 0], tgt[2, 5:] = 0, 2, 0  # pads on both sides
    losses = []
    for module in (eager, compiled):
        loss = module._train_loss(src, tgt)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    tokens = torch.tensor(12.5)  # DDP's normalisation (TranslationModule.training_loss): the count is a tensor input
    torch.testing.assert_close(compiled._train_loss(src, tgt, tokens), eager._train_loss(src, tgt, tokens),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="torch.compile mode"):
        cls(preset="tiny", vocab_size=100, compile="fast")


def uneven_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two ranks' batches (src, tgt): 4 rows of 6 target tokens, and 2 rows of 3 and 1 (padded to 7)."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for rows, lengths in ((4, [7, 7, 7, 7]), (2, [4, 2])):
        src, tgt = torch.randint(5, 100, (rows, 9), generator=g), torch.randint(5, 100, (rows, 8), generator=g)
        tgt[:, 0] = 2
        for r, n in enumerate(lengths):
            tgt[r, n:] = 0
        batches.append((src, tgt))
    return batches


def loss_module() -> Seq2SeqModule:
    torch.manual_seed(0)
    return Seq2SeqModule(preset="tiny", vocab_size=100, config={"dropout": 0.0, "attn_dropout": 0.0})


def _ddp_loss_rank(rank: int, port: int, out: str) -> None:
    """One rank of test_ddp_loss_is_the_mean_over_all_ranks_tokens: its loss and the DDP-averaged gradients."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        module = loss_module()
        module.model = nn.parallel.DistributedDataParallel(module.model)  # averages gradients in backward
        loss = module.training_loss(*uneven_batches()[rank])
        loss.backward()
        torch.save([loss.detach(), *(p.grad for p in module.parameters())], Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_loss_is_the_mean_over_all_ranks_tokens(tmp_path):
    """2 gloo processes with batches of 24 and 4 target tokens: the gradients DDP averages are those of the mean over
    all 28 tokens (not the mean of the two ranks' means), and the ranks' losses average to that mean. In one process
    the loss is the batch's token mean, as before."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # spawn: a fork after torch.compile (an earlier test) can deadlock on inductor's worker threads
    torch.multiprocessing.start_processes(_ddp_loss_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    module = loss_module()
    (src0, tgt0), (src1, tgt1) = uneven_batches()
    assert torch.equal(module.training_loss(src0, tgt0), token_loss(module.model, src0, tgt0, 0.1))  # 1 process
    tokens = torch.tensor(28.0)
    assert (tgt0[:, 1:] != 0).sum() + (tgt1[:, 1:] != 0).sum() == tokens
    mean = token_loss(module.model, src0, tgt0, 0.1, tokens) + token_loss(module.model, src1, tgt1, 0.1, tokens)
    mean.backward()
    torch.testing.assert_close((ranks[0][0] + ranks[1][0]) / 2, mean.detach())
    for rank in ranks:
        for got, p in zip(rank[1:], module.parameters()):
            torch.testing.assert_close(got, p.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "module",
    [
        lambda: Seq2SeqModule(preset="tiny", vocab_size=100),
        lambda: Seq2SeqModule(preset="tiny", vocab_size=100, config={"tie_embeddings": False, "positions": "learned"}),
        lambda: DecoderOnlyModule(preset="tiny", vocab_size=100,
                                  config={"positions": "learned", "segment_embeddings": True}),
        lambda: DecoderOnlyModule(preset="tiny", vocab_size=100,
                                  config={"activation": "swiglu", "tie_embeddings": False}),
    ],
    ids=["seq2seq-tied", "seq2seq-untied-learned", "decoder-learned-segments", "decoder-swiglu-untied"],
)
def test_weight_decay_only_on_linear_weights(module):
    """Norms, biases and embeddings (token, position, segment) get no weight decay; every Linear weight does."""
    module = module()
    groups = module.configure_optimizers()["optimizer"].param_groups
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == module.hparams.weight_decay > 0 and groups[1]["weight_decay"] == 0
    assert not decay & no_decay
    all_params = {id(p) for p in module.model.parameters()}  # tied weights counted once
    assert decay | no_decay == all_params
    assert sum(len(g["params"]) for g in groups) == len(all_params)
    for mod_name, mod in module.model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            should_decay = isinstance(mod, nn.Linear) and name == "weight" and id(p) not in embedding_ids(module)
            assert (id(p) in decay) == should_decay, f"{mod_name}.{name} ({type(mod).__name__})"
    assert any(isinstance(m, nn.Embedding) for m in module.model.modules()) and decay and no_decay


def embedding_ids(module: TranslationModule) -> set[int]:
    """A tied output projection shares the token embedding's weight: it counts as an embedding."""
    return {id(m.weight) for m in module.model.modules() if isinstance(m, nn.Embedding)}


# ---- DDP ---------------------------------------------------------------------------------------------------------
def translator_command() -> list[str]:
    """The installed console script next to this interpreter, else the module (Lightning relaunches either)."""
    script = Path(sys.executable).with_name("translator")
    return [sys.executable, str(script)] if script.is_file() else [sys.executable, "-m", "translator.cli"]


def last_val_row(metrics_csv: Path) -> dict[str, float]:
    with open(metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/")}


def test_ddp_fit_on_two_cpu_processes_syncs_validation_metrics(tokenizer_file, tmp_path, monkeypatch):
    """`translator fit` with 2 gloo processes, then validate its checkpoint in 1 process: the metrics the 2 ranks
    synced over their disjoint shards of the val pairs equal the single process's over all of them; BLEU over the
    same 32 of the 64 lines (debug.yaml's bleu_sentences), chosen by line index whatever the world size."""
    steps = 100
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    ddp = subprocess.run(
        [*translator_command(), "fit", "--config", DEBUG, *data_args(tokenizer_file), *quiet,
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", str(steps),
         "--trainer.val_check_interval", str(steps), "--trainer.num_sanity_val_steps", "0",
         "--trainer.logger.init_args.name", "ddp"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
        check=False,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    output = ddp.stdout + ddp.stderr
    assert "Starting with 2 processes" in output and "distributed_backend=gloo" in output
    synced = last_val_row(tmp_path / "checkpoints" / "ddp" / "metrics.csv")

    # the checkpoint of the weights that validation saw (written after it, at the last step)
    ckpts = [p for p in (tmp_path / "checkpoints").rglob("*.ckpt") if checkpoint.read(p)["global_step"] == steps]
    assert ckpts, sorted(map(str, (tmp_path / "checkpoints").rglob("*")))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    main(["validate", "--config", DEBUG, *data_args(tokenizer_file), *quiet, "--ckpt_path", str(ckpts[0]),
          "--trainer.logger.init_args.name", "single"])  # fmt: skip
    single = last_val_row(tmp_path / "checkpoints" / "single" / "metrics.csv")

    assert set(synced) == set(single) == {"val/loss", "val/ppl", "val/bleu", "val/chrf", "val/sentences",
                                          "val/truncated", "val/bleu_sentences"}
    for key in ("val/sentences", "val/truncated", "val/bleu_sentences"):
        assert synced[key] == single[key], key
    assert (single["val/sentences"], single["val/bleu_sentences"]) == (64, 32)
    assert synced["val/loss"] == pytest.approx(single["val/loss"], rel=1e-5)
    assert synced["val/ppl"] == pytest.approx(single["val/ppl"], rel=1e-5)
    assert synced["val/bleu"] == pytest.approx(single["val/bleu"], rel=1e-6, abs=1e-9)
    assert synced["val/chrf"] == pytest.approx(single["val/chrf"], rel=1e-6, abs=1e-9)
    assert single["val/chrf"] > 0  # hypotheses share character n-grams with the references: a real check


@pytest.mark.parametrize("native", [True, False])
def test_quickstart_trains_in_bf16_only_on_a_cpu_with_bf16_arithmetic(native, tokenizer_file, monkeypatch, caplog):
    """configs/quickstart.yaml asks for bf16-mixed; on a CPU without avx512_bf16 or AMX (emulated bf16, slower than
    float32) the CLI trains in 32-true and says so."""
    from translator import quantize
    from translator.cli import build

    monkeypatch.setattr(quantize, "bf16_supported", lambda: native)
    cli = build(["--config", str(REPO / "configs" / "quickstart.yaml"), *data_args(tokenizer_file)])
    assert cli.trainer.precision == ("bf16-mixed" if native else "32-true")
    assert ("no bf16 arithmetic" in caplog.text) is not native


@pytest.mark.parametrize("accelerator, cuda, precision, expected", [
    ("cpu", True, "bf16-mixed", "32-true"), ("auto", False, "bf16", "32-true"), ("auto", True, "bf16-mixed", None),
    ("gpu", False, "bf16-mixed", None), ("cpu", False, "32-true", None), ("cpu", False, "bf16-true", None)])
def test_bf16_mixed_on_a_cpu_without_bf16_arithmetic_runs_in_float32(accelerator, cuda, precision, expected,
                                                                   monkeypatch):
    """Only a CPU run (named, or `auto` without a GPU) that asks for bf16 autocast is switched; an explicit bf16-true
    and any GPU run are left alone."""
    from jsonargparse import Namespace

    from translator import cli, quantize

    monkeypatch.setattr(quantize, "bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    trainer = Namespace(accelerator=accelerator, precision=precision)
    cli._cpu_precision(trainer)
    assert trainer.precision == (expected or precision)


@pytest.mark.parametrize("override, expected", [([], 0.02), (["--model.init_args.config.init_std=null"], None),
                                                (["--model.init_args.config.init_std", "0.05"], 0.05)])
def test_quickstart_layout_and_a_command_line_null_resets_the_initialisation(override, expected, tokenizer_file):
    """configs/quickstart.yaml trains post-LN with N(0, 0.02) weights; `init_std=null` on the command line (which
    reaches the module's config dict as the string "None") brings Xavier initialisation back."""
    from translator.cli import build

    cli = build(["--config", str(REPO / "configs" / "quickstart.yaml"), *data_args(tokenizer_file), *override])
    config = cli.model.config
    assert config.norm_first is False and config.init_std == expected
    weight = cli.model.model.src_embed.weight  # N(0, init_std), or for None N(0, d^-1/2); the pad row is zero
    rows = torch.arange(len(weight)) != config.pad_id
    std = expected if expected is not None else config.d_model**-0.5
    assert weight[rows].std().item() == pytest.approx(std, rel=0.05)
