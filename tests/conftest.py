"""Shared fixtures: real Multi30k pairs and a small joint SentencePiece tokenizer trained on them."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import pytest

from translator.tokenizer import Tokenizer, interleave

MULTI30K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multi30k"


def read_pairs(split: str, n: int) -> list[tuple[str, str]]:
    """The first n (German, English) pairs of a Multi30k split; skips the test when the data is missing."""
    de, en = MULTI30K / f"{split}.de.gz", MULTI30K / f"{split}.en.gz"
    if not (de.is_file() and en.is_file()):
        pytest.skip(f"Multi30k {split} data not found under {MULTI30K}")
    with gzip.open(de, "rt", encoding="utf-8") as f_de, gzip.open(en, "rt", encoding="utf-8") as f_en:
        return [(d.strip(), e.strip()) for d, e in itertools.islice(zip(f_de, f_en), n)]


@pytest.fixture(scope="session")
def train_pairs() -> list[tuple[str, str]]:
    return read_pairs("train", 3000)


@pytest.fixture(scope="session")
def tokenizer(train_pairs: list[tuple[str, str]]) -> Tokenizer:
    """A 1000-piece joint tokenizer (under a second to train)."""
    return Tokenizer.train(interleave(train_pairs), vocab_size=1000)
