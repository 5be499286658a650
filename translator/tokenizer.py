"""Joint German-English SentencePiece tokenizer with stable special ids.

The ids of the special pieces never change, whatever the corpus or the vocabulary size:

    0 <pad>   1 <unk>   2 <s> (bos)   3 </s> (eos)   4 <sep>

All but <unk> are SentencePiece control symbols: `encode` never produces them from text and `decode` drops them,
wherever they are (tests/test_tokenizer.py checks both on SentencePiece itself), so decoded hypotheses need no filter.

The model is carried as bytes (``to_bytes`` / ``from_bytes``) so that a checkpoint holds its own tokenizer.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID, SEP_ID = 0, 1, 2, 3, 4
SEP_PIECE = "<sep>"


class Tokenizer:
    """A thin wrapper over ``SentencePieceProcessor`` that pins the special ids."""

    pad_id, unk_id, bos_id, eos_id, sep_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID, SEP_ID

    def __init__(self, model_proto: bytes, source: str = "<bytes>") -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_proto)
        except Exception as err:  # sentencepiece raises a bare RuntimeError/OSError here
            raise ValueError(f"{source}: not a SentencePiece model ({err})") from None
        specials = {"<pad>": PAD_ID, "<unk>": UNK_ID, "<s>": BOS_ID, "</s>": EOS_ID, SEP_PIECE: SEP_ID}
        found = {piece: sp.piece_to_id(piece) for piece in specials}
        if found != specials:
            raise ValueError(
                f"{source}: SentencePiece model lacks translator's special ids (expected {specials}, found {found}); "
                "train it with `translator-tokenizer` or Tokenizer.train"
            )
        # decode() relies on SentencePiece dropping control symbols; a user-defined <sep> would be printed as text
        plain = [piece for piece, i in specials.items() if i != UNK_ID and not sp.is_control(i)]
        if plain:
            raise ValueError(
                f"{source}: {', '.join(plain)} must be SentencePiece control symbols (decode would print them as text); "
                "train the model again with `translator-tokenizer` or Tokenizer.train"
            )
        self.sp = sp
        self._proto = bytes(model_proto)

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        vocab_size: int = 8000,
        model_type: str = "unigram",
        max_sentences: int = 2_000_000,
        character_coverage: float = 1.0,
    ) -> Tokenizer:
        """Train a joint model on an iterable of sentences (German and English interleaved).

        An error raised while reading ``sentences`` (bad data: ``translator.data`` names the file and line) is re-raised
        as itself: SentencePiece reads every sentence before it trains, and would report it as its own failure, with
        the Python traceback folded into the message.
        """
        read_error: list[Exception] = []

        def read() -> Iterator[str]:
            try:
                yield from sentences
            except Exception as err:
                read_error.append(err)
                raise

        proto = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=read(),
                model_writer=proto,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                # a control symbol: encode() never produces it from text, so a literal "<sep>" in a sentence
                # cannot fake the separator
                control_symbols=[SEP_PIECE],
                # keep digits and cased text as they are: BLEU is computed on detokenised, cased output
                normalization_rule_name="nmt_nfkc",
                minloglevel=2,
            )
        except RuntimeError as err:
            if read_error:
                raise read_error[0] from None
            raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size}): {err}") from None
        return cls(proto.getvalue())

    @classmethod
    def from_bytes(cls, data: bytes) -> Tokenizer:
        return cls(data)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(path.read_bytes(), source=str(path))

    def to_bytes(self) -> bytes:
        return self._proto

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self._proto)

    # ---- use -------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids without bos/eos, one list per text."""
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: list[list[int]]) -> list[str]:
        """Text for each id list; special ids (pad, bos, eos, sep: control symbols) are dropped by SentencePiece."""
        return self.sp.decode(ids)

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and other._proto == self._proto

    def __hash__(self) -> int:
        return hash(self._proto)


def interleave(pairs: Iterable[tuple[str, str]]) -> Iterator[str]:
    """Flatten (src, tgt) pairs into one stream of sentences for joint training."""
    for src, tgt in pairs:
        yield src
        yield tgt
