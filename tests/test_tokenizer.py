"""Joint SentencePiece tokenizer: round trips on real German/English, stable special ids, (de)serialisation."""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import pytest
import sentencepiece as spm

from translator.tokenizer import BOS_ID, EOS_ID, PAD_ID, SEP_ID, UNK_ID, Tokenizer, interleave

MULTI30K = Path(__file__).parents[1].parent / "shared" / "data" / "multi30k"
pytestmark = pytest.mark.skipif(not MULTI30K.is_dir(), reason=f"Multi30k not found at {MULTI30K}")


def sentences(split: str, lang: str, n: int | None = None) -> list[str]:
    with gzip.open(MULTI30K / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        return [line.strip() for line in itertools.islice(f, n)]


@pytest.fixture(scope="module")
def train_text() -> list[str]:
    return list(interleave(zip(sentences("train", "de", 3000), sentences("train", "en", 3000))))


@pytest.fixture(scope="module")
def tok(train_text: list[str]) -> Tokenizer:
    return Tokenizer.train(train_text, vocab_size=1000)


def test_round_trip_on_unseen_german_and_english(tok: Tokenizer, train_text: list[str]) -> None:
    covered = set("".join(train_text))  # characters outside training text become <unk>, by design
    text = [s for s in sentences("val", "de") + sentences("val", "en") if set(s) <= covered]
    assert len(text) > 2000
    assert tok.decode(tok.encode(text)) == text
    hard = [s for s in text if any(c in s for c in "äöüÄÖÜß") and any(c in s for c in ",.!?\"'-")]
    assert len(hard) > 100 and any("ß" in s for s in hard)  # umlauts, ß and punctuation are among them
    assert (
        tok.decode(tok.encode(["Die Straße ist groß, müde Bären schlafen."]))[0]
        == "Die Straße ist groß, müde Bären schlafen."
    )


def test_special_ids_are_stable(tok: Tokenizer, train_text: list[str]) -> None:
    small = Tokenizer.train(train_text[:1000], vocab_size=300)
    for t in (tok, small):
        assert (t.pad_id, t.unk_id, t.bos_id, t.eos_id, t.sep_id) == (0, 1, 2, 3, 4)
        assert t.pieces([PAD_ID, UNK_ID, BOS_ID, EOS_ID, SEP_ID]) == ["<pad>", "<unk>", "<s>", "</s>", "<sep>"]
    assert (tok.vocab_size, small.vocab_size) == (1000, 300)
    ids = tok.encode(train_text[:200])
    assert all(i > SEP_ID or i == UNK_ID for seq in ids for i in seq)  # encode adds no specials
    assert tok.encode(["☃"])[0][-1] == UNK_ID  # a character never seen


def test_decode_drops_specials(tok: Tokenizer) -> None:
    ids = tok.encode(["Ein Hund läuft."])[0]
    assert tok.decode([[BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID], [SEP_ID, *ids]]) == ["Ein Hund läuft."] * 2


def test_sentencepiece_itself_drops_the_control_symbols(tok: Tokenizer) -> None:
    """Why `Tokenizer.decode` needs no filter: pad, bos, eos and <sep> are control symbols, which SentencePiece's own
    decode drops wherever they stand (first, last, between pieces, repeated); <unk> is not one (it prints ' ⁇ ')."""
    specials = [PAD_ID, BOS_ID, EOS_ID, SEP_ID]
    assert [tok.sp.is_control(i) for i in specials] == [True] * 4 and not tok.sp.is_control(UNK_ID)
    text = sentences("val", "de", 40) + sentences("val", "en", 40)
    for k, ids in enumerate(tok.encode(text)):
        mixed = list(ids)
        for j, special in enumerate(specials * 2):  # each special twice, spread over the sentence
            mixed.insert((k + 7 * j) % (len(mixed) + 1), special)
        assert tok.sp.decode(mixed) == tok.sp.decode(ids) == tok.decode([mixed])[0]
    assert "⁇" in tok.sp.decode([UNK_ID, *tok.encode(["Hund"])[0]])


def test_a_model_whose_sep_is_user_defined_is_refused(train_text: list[str], tmp_path: Path) -> None:
    """A model trained with <sep> as a user-defined symbol (encode makes it from the text "<sep>", decode prints
    it) cannot be used: translations would contain "<sep>"."""
    model = tmp_path / "user"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(train_text[:1000]), model_prefix=str(model), vocab_size=300,
                                   pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                                   user_defined_symbols=["<sep>"], minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=f"{model}.model")
    assert sp.piece_to_id("<sep>") == SEP_ID and sp.decode([SEP_ID]) == "<sep>"  # what decode would print
    with pytest.raises(ValueError, match=r"user\.model: <sep> must be SentencePiece control symbols"):
        Tokenizer.from_file(f"{model}.model")


def test_bytes_and_file_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    text = sentences("test_2016_flickr", "de", 50)
    again = Tokenizer.from_bytes(tok.to_bytes())
    assert again == tok and hash(again) == hash(tok) and again.encode(text) == tok.encode(text)
    tok.save(tmp_path / "t.model")
    assert Tokenizer.from_file(tmp_path / "t.model") == tok
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_bytes(b"not a model")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer.from_file(tmp_path / "missing.model")
