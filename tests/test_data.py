"""Data pipeline on real Multi30k/IWSLT data: formats, errors, token budget, sharding, DDP and exact resume."""

from __future__ import annotations

import collections
import gzip
import itertools
import json
import logging
import os
import random
import runpy
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import datasets
import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from translator.data import (
    ResumableDataLoader,
    TokenBatches,
    TranslationDataModule,
    load_pairs,
    pad,
    round_up,
    token_budget_batches,
)
from translator.module import Seq2SeqModule
from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

DATA = Path(__file__).parents[1].parent / "shared" / "data"
MULTI30K, IWSLT = DATA / "multi30k", DATA / "iwslt2017" / "validation.jsonl"
pytestmark = pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"shared data not found at {DATA}")

Pairs = list[tuple[str, str]]


def raw_pairs(split: str, n: int | None = None) -> Pairs:
    """Multi30k pairs read with plain gzip, independently of the code under test."""
    with (
        gzip.open(MULTI30K / f"{split}.de.gz", "rt", encoding="utf-8") as de,
        gzip.open(MULTI30K / f"{split}.en.gz", "rt", encoding="utf-8") as en,
    ):
        return [(d.strip(), e.strip()) for d, e in itertools.islice(zip(de, en), n)]


def write_text(path: Path, lines: list[str]) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return path


def write_parallel(root: Path, split: str, pairs: Pairs, gz: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_text(root / f"{split}.de{ext}", [d for d, _ in pairs])
    write_text(root / f"{split}.en{ext}", [e for _, e in pairs])
    return root


def numbered(pairs: Pairs) -> Pairs:
    """Make every pair unique (Multi30k repeats a few sentences) so that pairs can be used as ids."""
    return [(f"{i}: {d}", f"{i}: {e}") for i, (d, e) in enumerate(pairs)]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tok") / "m30k-1000.model"
    tokenizer.save(path)
    return path


# ---- sources -----------------------------------------------------------------------------------------------------
def test_every_format_yields_the_same_pairs(tmp_path: Path) -> None:
    pairs = raw_pairs("val", 60)
    translation = [json.dumps({"translation": {"de": d, "en": e}}, ensure_ascii=False) for d, e in pairs]
    columns = [json.dumps({"en": e, "de": d}, ensure_ascii=False) for d, e in pairs]
    hub = tmp_path / "hub"  # a dataset repository as on the hub: README configs + parquet, opened by load_dataset
    (hub / "de-en").mkdir(parents=True)
    datasets.Dataset.from_dict({"translation": [{"de": d, "en": e} for d, e in pairs]}).to_parquet(
        hub / "de-en" / "train-00000-of-00001.parquet"
    )
    (hub / "README.md").write_text(
        "---\nconfigs:\n- config_name: de-en\n  data_files:\n  - split: train\n    path: de-en/train-*\n---\n"
    )
    cols = tmp_path / "cols"  # bentrevett/multi30k layout: {train,val,test}.jsonl with de/en columns
    cols.mkdir()
    write_text(cols / "val.jsonl", columns)
    sources = {
        "text": (write_parallel(tmp_path / "text", "train", pairs), "train", None),
        "text.gz": (write_parallel(tmp_path / "gz", "train", pairs, gz=True), "train", None),
        "translation.jsonl": (write_text(tmp_path / "t.jsonl", translation), "train", None),
        "translation.jsonl.gz": (write_text(tmp_path / "t.jsonl.gz", translation), "train", None),
        "columns.jsonl dir": (cols, "validation", None),
        "tsv": (write_text(tmp_path / "p.tsv", [f"{d}\t{e}" for d, e in pairs]), "train", None),
        "hub-like": (hub, "train", "de-en"),
    }
    for label, (path, split, name) in sources.items():
        assert list(load_pairs(path, split, name=name)) == pairs, label
    assert list(load_pairs(tmp_path / "text", "train", src_lang="en", tgt_lang="de")) == [(e, d) for d, e in pairs]


def test_real_sources() -> None:
    assert list(load_pairs(MULTI30K, "validation")) == raw_pairs("val")  # "validation" finds val.*
    iwslt = list(load_pairs(IWSLT))
    first = json.loads(IWSLT.open(encoding="utf-8").readline())["translation"]
    assert len(iwslt) == 888 and iwslt[0] == (first["de"].strip(), first["en"].strip())


def test_empty_pairs_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pairs = raw_pairs("val", 5)
    path = write_parallel(tmp_path, "train", pairs[:2] + [("  ", pairs[2][1]), (pairs[3][0], "")] + pairs[4:])
    with caplog.at_level(logging.INFO, logger="translator.data"):
        assert list(load_pairs(path)) == pairs[:2] + pairs[4:]
    assert "skipped 2 empty" in caplog.text


BAD_INPUTS = {
    # name: (files to write {name: bytes}, path under tmp, expected error, substrings of its message)
    "line counts": (
        {"train.de": b"a\nb\nc\n", "train.en": b"x\ny\n"},
        ".",
        ValueError,
        ["train.de has 3", "train.en has 2"],
    ),
    "missing tgt file": ({"train.de": b"a\n"}, ".", FileNotFoundError, ["train.de", "train.en.gz"]),
    "missing split": (
        {"val.de": b"a\n", "val.en": b"x\n"},
        ".",
        FileNotFoundError,
        ["train.de.gz", "train.jsonl", "['val']"],
    ),
    "missing file": ({}, "nope.jsonl", FileNotFoundError, ["nope.jsonl"]),
    "bad utf-8": (
        {"train.de": b"a\nb\n\xff\xfeoops\n", "train.en": b"x\ny\nz\n"},
        ".",
        ValueError,
        ["train.de:3", "UTF-8"],
    ),
    "bad utf-8 jsonl": (
        {"d.jsonl": b'{"de": "a", "en": "b"}\n{"de": "\xc3", "en": "b"}\n'},
        "d.jsonl",
        ValueError,
        ["d.jsonl:2", "UTF-8"],
    ),
    "jsonl without key": (
        {"d.jsonl": b'{"de": "a", "en": "b"}\n{"translation": {"de": "a"}}\n'},
        "d.jsonl",
        ValueError,
        ["d.jsonl:2", "'en'"],
    ),
    "invalid json": (
        {"d.jsonl": b'{"de": "a", "en": "b"}\n{"de": "a",\n'},
        "d.jsonl",
        ValueError,
        ["d.jsonl:2", "invalid JSON"],
    ),
    "tsv without tab": ({"d.tsv": b"a\tb\nno tab here\n"}, "d.tsv", ValueError, ["d.tsv:2", "tab"]),
    "empty after filtering": ({"d.tsv": b" \t \n\t\n"}, "d.tsv", ValueError, ["d.tsv", "no usable pairs", "2 empty"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_file_and_line(tmp_path: Path, case: str) -> None:
    files, path, error, expected = BAD_INPUTS[case]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(error) as info:
        list(load_pairs(tmp_path / path))
    assert all(s in str(info.value) for s in expected), str(info.value)


# ---- token-budget batches ----------------------------------------------------------------------------------------
def test_token_budget_batches_respect_the_budget() -> None:
    rng = random.Random(0)
    lengths = sorted((rng.randint(1, 60), rng.randint(3, 62)) for _ in range(2000))
    for max_tokens, multiple in [(130, 1), (300, 8), (4096, 8)]:
        batches = token_budget_batches(lengths, max_tokens, multiple)
        assert sorted(itertools.chain(*batches)) == list(range(len(lengths)))
        for b in batches:
            s, t = (round_up(max(lengths[i][k] for i in b), multiple) for k in (0, 1))
            assert len(b) * (s + t) <= max_tokens
    with pytest.raises(ValueError, match="alone"):
        token_budget_batches([(70, 70)], 130)


@pytest.mark.parametrize("multiple", [1, 8])
def test_pad_right_pads_to_a_multiple(multiple: int) -> None:
    """The one padder (training, predict, translate) against a row-by-row reference, empty rows included."""
    rng = random.Random(multiple)
    rows = [[rng.randrange(1, 1000) for _ in range(rng.choice([0, 1, 5, 13, 17]))] for _ in range(50)]
    width = round_up(max(map(len, rows)), multiple)
    expected = torch.tensor([row + [PAD_ID] * (width - len(row)) for row in rows], dtype=torch.long)
    out = pad(rows, pad_to_multiple=multiple)
    assert out.dtype == torch.long and torch.equal(out, expected)
    assert pad([[], []]).shape == (2, 0) and torch.equal(pad([[7, 8], [9]], "cpu"), torch.tensor([[7, 8], [9, PAD_ID]]))


@pytest.mark.parametrize("max_tokens, max_len, multiple", [(4096, 128, 8), (600, 20, 8), (300, 30, 1)])
def test_batches_fit_budget_and_length_limit(
    tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture, max_tokens: int, max_len: int, multiple: int
) -> None:
    stream = load_pairs(MULTI30K, "val")
    batches = TokenBatches(stream, tokenizer, max_tokens, max_len, multiple, buffer_size=500, shuffle=True)
    with caplog.at_level(logging.INFO, logger="translator.data"):
        seen = []
        for batch in batches:
            src, tgt = batch["src"], batch["tgt"]
            assert src.dtype == tgt.dtype == torch.long and src.shape[1] % multiple == 0 == tgt.shape[1] % multiple
            assert src.numel() + tgt.numel() <= max_tokens
            src_len, tgt_len = (src != PAD_ID).sum(1), (tgt != PAD_ID).sum(1)
            assert src_len.max() <= max_len and tgt_len.max() <= max_len + 2 and src_len.min() > 0
            assert (tgt[:, 0] == BOS_ID).all() and (tgt.gather(1, tgt_len[:, None] - 1) == EOS_ID).all()
            assert not ((src == BOS_ID) | (src == EOS_ID)).any()
            # right-padded: no real token after a pad
            assert ((src != PAD_ID).long().diff(dim=1) <= 0).all() and ((tgt != PAD_ID).long().diff(dim=1) <= 0).all()
            assert tokenizer.decode(src[:1].tolist())[0] == tokenizer.decode(tokenizer.encode(batch["src_text"][:1]))[0]
            seen += zip(batch["src_text"], batch["tgt_text"])
    pairs = list(stream)
    kept = [p for p in pairs if max(map(len, tokenizer.encode(list(p)))) <= max_len]
    assert collections.Counter(seen) == collections.Counter(kept)  # every kept pair exactly once
    dropped = len(pairs) - len(kept)
    assert (f"dropped {dropped} of" in caplog.text) == (dropped > 0)


# ---- sharding, DDP ----------------------------------------------------------------------------------------------
def test_two_ranks_two_workers_are_disjoint_and_cover(tmp_path: Path, tokenizer: Tokenizer) -> None:
    pairs = numbered(raw_pairs("val", 403))
    stream = load_pairs(write_parallel(tmp_path, "val", pairs), "val")
    per_worker: list[list[str]] = []
    for rank in range(2):
        batches = TokenBatches(stream, tokenizer, max_tokens=1024, rank=rank, world_size=2)
        loader = DataLoader(batches, batch_size=None, num_workers=2)
        texts = [b["src_text"] for b in loader]
        assert len(texts) > 2  # both workers of the rank produced batches
        per_worker.append(list(itertools.chain(*texts)))
    every = list(itertools.chain(*per_worker))
    assert len(every) == len(set(every)) == len(pairs)  # disjoint and covering
    assert set(every) == {d for d, _ in pairs}
    assert sorted(len(p) for p in per_worker) == [201, 202]  # 403 pairs: uneven ranks


def _write_hub_files(root: Path, pairs: Pairs, n_files: int) -> list[Path]:
    """Hub-style JSON-lines shards ``train-0000k-of-0000n.jsonl``: ``load_pairs`` opens the directory with
    ``datasets.load_dataset(dir, split=..., streaming=True)``, as it does a hub id. Pair i goes to file i // size."""
    root.mkdir(parents=True, exist_ok=True)
    size = -(-len(pairs) // n_files)
    files = [root / f"train-{k:05d}-of-{n_files:05d}.jsonl" for k in range(n_files)]
    for k, file in enumerate(files):
        rows = pairs[k * size : (k + 1) * size]
        file.write_text("".join(json.dumps({"translation": {"de": d, "en": e}}) + "\n" for d, e in rows))
    return files


def test_multi_file_hub_dataset_gives_each_reader_whole_files(tmp_path: Path, tokenizer: Tokenizer) -> None:
    pairs = numbered(raw_pairs("val", 403))
    files = _write_hub_files(tmp_path / "hub", pairs, 4)
    file_of = {d: i * 4 // len(pairs) for i, (d, _) in enumerate(pairs)}  # 101 pairs per file
    stream = load_pairs(tmp_path / "hub", "train")
    assert stream.kind == "hub" and stream.streams[0].num_shards == 4

    # 2 ranks x 2 DataLoader workers, through the real loader: every pair exactly once, each rank two whole files
    per_rank = []
    for rank in range(2):
        batches = TokenBatches(stream, tokenizer, 1024, rank=rank, world_size=2)
        loader = DataLoader(batches, batch_size=None, num_workers=2)
        per_rank.append([t for b in loader for t in b["src_text"]])
    every = [t for texts in per_rank for t in texts]
    assert sorted(every) == sorted(d for d, _ in pairs)
    for texts in per_rank:
        owned = {file_of[t] for t in texts}
        assert len(owned) == 2 and len(texts) == sum(file_of[d] in owned for d, _ in pairs)

    # each reader opens only its own file (an audit hook sees every open() of this process; it cannot be removed,
    # so it records only this test's files)
    opened: list[str] = []
    sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" and str(args[0]).startswith(
        str(tmp_path / "hub")) else None)
    for k in range(4):
        opened.clear()
        assert {file_of[d] for d, _ in stream.shard(k, 4)} == {k}
        assert opened == [str(files[k])]

    # training passes read the files in a shuffled order, interleaved: the same order for every shard (a partition)
    # and a pass starts with pairs from every file, not with the whole of file 0 (files stored in domain order)
    shuffled = [list(stream.shard(k, 2, file_seed=(0, 1))) for k in range(2)]
    assert sorted(p for shard in shuffled for p in shard) == sorted(pairs)
    assert shuffled[0] == list(stream.shard(0, 2, file_seed=(0, 1)))  # deterministic: exact resume re-reads it
    alone = list(stream.shard(0, 1, file_seed=(0, 1)))
    assert {file_of[d] for d, _ in alone[:20]} == {0, 1, 2, 3}

    # fallback, more readers than files: every reader reads the stream and keeps pairs k, k + 8, ...
    fallback = [list(stream.shard(k, 8)) for k in range(8)]
    assert sorted(sum(fallback, [])) == sorted(pairs)
    assert fallback[3] == pairs[3::8]
    assert sorted(p for k in range(8) for p in stream.shard(k, 8, file_seed=(0, 1))) == sorted(pairs)


def test_parquet_hub_dataset_is_split_by_row_group(tmp_path: Path) -> None:
    pairs = numbered(raw_pairs("val", 80))
    (tmp_path / "hub").mkdir()
    for k in range(2):  # the hub's layout: a few Parquet files, each of several row groups (here 4 of 10 pairs)
        rows = [{"de": d, "en": e} for d, e in pairs[k * 40 : (k + 1) * 40]]
        pq.write_table(pa.table({"translation": rows}), tmp_path / "hub" / f"train-{k:05d}-of-00002.parquet", 10)
    stream = load_pairs(tmp_path / "hub", "train")
    assert stream.streams[0].num_shards == 8  # row groups
    shards = [list(stream.shard(k, 8)) for k in range(8)]
    assert sorted(p for shard in shards for p in shard) == sorted(pairs)
    assert all(shard in [pairs[i : i + 10] for i in range(0, 80, 10)] for shard in shards)  # whole row groups


def with_bad_lines(pairs: Pairs) -> Pairs:
    """Real pairs with over-long (source, target, both) and empty (source, target, both, blank) pairs injected."""
    (d0, e0), (d1, e1) = pairs[0], pairs[1]
    long_de, long_en = " ".join([d0] * 12), " ".join([e0] * 12)  # far over max_len=64 tokens
    bad = [(long_de, long_en), (long_de, e1), (d1, long_en), ("", e1), (d1, ""), ("", ""), ("  ", " ")]
    out = list(pairs)
    for k, pair in enumerate(bad):
        out.insert(7 + 11 * k, pair)
    return out


def test_evaluation_scores_every_line(tmp_path: Path, tokenizer: Tokenizer, tokenizer_file: Path) -> None:
    """Validation/test batches hold every line of the split once, over 2 ranks x 2 workers: over-long pairs cut to
    max_len (the text kept whole for BLEU, a cut target without eos) and flagged, empty pairs kept."""
    pairs = with_bad_lines(raw_pairs("test_2016_flickr", 120))
    data = write_parallel(tmp_path, "test", pairs)
    max_len = 64
    rows = []
    for rank in range(2):
        batches = TokenBatches(load_pairs(data, "test"), tokenizer, 1024, max_len, rank=rank, world_size=2,
                               evaluation=True)  # fmt: skip
        for b in DataLoader(batches, batch_size=None, num_workers=2):
            assert b["num_pairs"] == len(pairs) and b["src"].numel() + b["tgt"].numel() <= 1024
            for j, i in enumerate(b["index"]):
                src, tgt = b["src"][j], b["tgt"][j]
                rows.append((i, b["src_text"][j], b["tgt_text"][j], src[src != PAD_ID].tolist(),
                             tgt[tgt != PAD_ID].tolist(), b["truncated"][j]))  # fmt: skip
    assert sorted(r[0] for r in rows) == list(range(len(pairs)))  # every line, once
    cut = 0
    for i, src_text, tgt_text, src, tgt, truncated in rows:
        d, e = (t.strip() for t in pairs[i])
        assert (src_text, tgt_text) == (d, e)  # whole, for BLEU
        (d_ids,), (e_ids,) = tokenizer.encode([d]), tokenizer.encode([e])
        assert src == d_ids[:max_len]
        assert tgt == [BOS_ID, *e_ids[:max_len], *([EOS_ID] if len(e_ids) <= max_len else [])]
        assert truncated == (max(len(d_ids), len(e_ids)) > max_len)
        cut += truncated
    assert cut == 3 and sum(not r[3] for r in rows) == 3  # the injected pairs: 3 over-long, 3 empty sources

    dm = TranslationDataModule(str(data), tokenizer=str(tokenizer_file), num_workers=0, max_tokens=1024, max_len=max_len)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert sorted(i for b in batches for i in b["index"]) == list(range(len(pairs)))
    assert sum(sum(b["truncated"]) for b in batches) == 3


class _Recorder(Seq2SeqModule):
    """A tiny translation module that also writes the pairs each rank validates on."""

    def __init__(self, out_dir: str) -> None:
        super().__init__(preset="tiny", vocab_size=1000, warmup_steps=1, bleu_sentences=10)
        self.out_dir = out_dir

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not self.trainer.sanity_checking:
            with open(Path(self.out_dir) / f"rank{self.global_rank}.txt", "a", encoding="utf-8") as f:
                f.write("".join(t + "\n" for t in batch["src_text"]))
        super().validation_step(batch, batch_idx)


def test_ddp_fit_with_uneven_validation_finishes_with_disjoint_shards(tmp_path: Path, tokenizer_file: Path) -> None:
    """2-process `fit` (where Lightning wraps the model in DDP and training runs collectives) with a validation of
    101 pairs, 51 and 50 per rank in different numbers of batches: it finishes, each pair is validated once, and the
    metrics synced at epoch end cover all of them."""
    pairs = numbered(raw_pairs("val", 101))
    data = write_parallel(tmp_path / "data", "val", pairs)
    write_parallel(data, "train", pairs)
    dm = TranslationDataModule(str(data), val_split="val", tokenizer=str(tokenizer_file), max_tokens=400, num_workers=0)
    # fork, not spawn: on CPU, spawn hands the module's tensors to both ranks in shared memory, so in-place metric
    # updates would add up across ranks. The timeout turns a hang into an error.
    strategy = DDPStrategy(start_method="fork", process_group_backend="gloo", timeout=timedelta(seconds=60))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=3, val_check_interval=3,
        check_val_every_n_epoch=None, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(_Recorder(str(tmp_path)), datamodule=dm)
    seen = [(tmp_path / f"rank{r}.txt").read_text(encoding="utf-8").splitlines() for r in range(2)]
    assert sorted(map(len, seen)) == [50, 51] and not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {d for d, _ in pairs}
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"])  # logged at step 0, synced over the ranks
    assert metrics["val/sentences"] == 101 and metrics["val/bleu_sentences"] == 10  # lines 0, 11, ..., 99


# ---- exact resume --------------------------------------------------------------------------------------------------
def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["src_text"] == y["src_text"] and torch.equal(x["tgt"], y["tgt"]) for x, y in zip(a, b)
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_state_resumes_exactly(tokenizer: Tokenizer, workers: int) -> None:
    def loader() -> ResumableDataLoader:  # endless, shuffled; ~10 batches per pass, so this crosses passes
        stream = load_pairs(MULTI30K, "val")
        return ResumableDataLoader(TokenBatches(stream, tokenizer, 2048, shuffle=True, passes=None, seed=3), workers)

    k, more = 7, 9  # odd counts: the resumed loaders' first batch is due from another worker than batch 0
    first = loader()
    it = iter(first)
    head = list(itertools.islice(it, k))
    state = first.state_dict()
    assert state["batches_seen"] == k
    rest = list(itertools.islice(it, more + 5))
    resumed = loader()
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert _same(list(itertools.islice(it, more)), rest[:more])
    state = resumed.state_dict()
    assert state["batches_seen"] == k + more
    again = loader()  # resuming a resumed run
    again.load_state_dict(state)
    assert _same(list(itertools.islice(again, 5)), rest[more:])
    assert not _same(head[:1], rest[:1])


class _TrainRecorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.seen: list[str] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["src_text"][0])
        return (self.w * batch["src"].float().mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_lightning_checkpoint_resumes_the_stream_exactly(tmp_path: Path, tokenizer_file: Path) -> None:
    def fit(ckpt_path: str | None = None) -> list[str]:
        dm = TranslationDataModule(
            str(MULTI30K), train_split="val", tokenizer=str(tokenizer_file), max_tokens=1024, num_workers=0
        )
        ckpt = ModelCheckpoint(
            tmp_path / ("resumed" if ckpt_path else "full"), "{step}", every_n_train_steps=3, save_top_k=-1
        )
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=7,
            limit_val_batches=0,
            logger=False,
            callbacks=[ckpt],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        model = _TrainRecorder()
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen

    full = fit()
    resumed = fit(str(tmp_path / "full" / "step=3.ckpt"))
    assert len(full) == 7 and resumed == full[3:]


# ---- DataModule and tokenizer script ----------------------------------------------------------------------------
def test_translate_depends_on_data_and_not_the_reverse() -> None:
    """One batcher and one padder: translator.translate imports them from translator.data, which imports no
    translate; and translate loads only batching.py, not the sources' `datasets` or the DataModule's Lightning."""

    def modules_after(statement: str) -> set[str]:
        code = f"import sys; {statement}; print(' '.join(sys.modules))"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        return set(proc.stdout.split())

    assert "translator.translate" not in modules_after("from translator.data import TranslationDataModule, pad")
    assert not {"datasets", "lightning", "translator.data.sources"} & modules_after("import translator.translate")


def test_datamodule_trains_tokenizer_once_and_links_sizes(tmp_path: Path, tokenizer_file: Path) -> None:
    data = write_parallel(tmp_path / "data", "train", raw_pairs("train", 1500))
    for lang in ("de", "en"):
        shutil.copy(MULTI30K / f"val.{lang}.gz", data / f"val.{lang}.gz")
    kwargs = {"path": str(data), "tokenizer_dir": str(tmp_path / "toks"), "vocab_size": 300, "num_workers": 0}
    dm = TranslationDataModule(**kwargs)
    assert dm.vocab_size == 300 and dm.pad_id == PAD_ID
    dm.prepare_data()
    (saved,) = (tmp_path / "toks").iterdir()
    assert saved == dm.tokenizer_path and saved.name.startswith("data-300-")
    stamp = saved.stat().st_mtime_ns
    again = TranslationDataModule(**kwargs)
    again.prepare_data()  # reused, not retrained
    again.setup("fit")
    assert saved.stat().st_mtime_ns == stamp and again.tokenizer.vocab_size == 300
    batch = next(iter(again.val_dataloader()))
    assert set(batch) == {"src", "tgt", "src_text", "tgt_text", "index", "truncated", "num_pairs"}
    assert batch["src"].max() < 300 and batch["num_pairs"] == 1014  # evaluation batches say where each row comes from
    assert TranslationDataModule(path=str(data), vocab_size=123, tokenizer=str(tokenizer_file)).vocab_size == 1000
    with pytest.raises(ValueError, match="max_tokens"):
        TranslationDataModule(max_tokens=100)


def test_train_tokenizer_script(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "train_tokenizer.py"))
    data = write_parallel(tmp_path / "data", "train", raw_pairs("train", 1000))
    out = tmp_path / "out" / "tok.model"
    assert script["main"](["--data", str(data), "--vocab-size", "200", "--out", str(out)]) == 0
    assert Tokenizer.from_file(out).vocab_size == 200
    assert script["main"](["--data", str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "no such file" in caplog.text
    with pytest.raises(SystemExit):
        script["main"](["--data", str(data), "--vocab-size", "3", "--out", str(out)])
