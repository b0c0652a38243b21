"""SentencePiece tokenizer, trained by the project, with an exact round trip.

`decode(encode(s)) == s` for every string: identity normalisation, no dummy prefix, no
whitespace folding, and byte fallback for any character outside the vocabulary. Newlines
are ordinary characters (pieces such as ".\\n\\n" are learnt). Two SentencePiece quirks are
worked around here:

* its trainer drops a sentence's trailing newline, so training text is fed in chunks cut
  just *before* a newline, which then leads the next chunk;
* it writes spaces as U+2581 ("▁") and decodes every "▁" piece back to a space, so a
  literal U+2581 in the text is encoded as its three UTF-8 byte pieces, which decode to it.

Ids: 0 unknown (never produced, thanks to byte fallback), 1 end of document (`eos_id`,
the document separator of the token shards), then 256 byte pieces, then learnt pieces.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from leviathan.errors import DataError

KINDS = ("bpe", "unigram")
TRAINER_VERSION = 1  # part of a dataset's fingerprint: bump when the training options change
META = "\u2581"  # SentencePiece's whitespace symbol
ENCODE_PIECE_CHARS = 4096  # texts are encoded in word-aligned pieces of about this length
CHUNK_CHARS = 4096  # training sentences are at most this long (SentencePiece skips longer)
MAX_SENTENCES = 200_000  # beyond this many chunks (~800 MB) the trainer samples, seeded
# Unigram training sums over threads, so its result depends on their number: fixed here, the
# same corpus gives the same model on every machine (BPE's is thread-independent anyway).
TRAIN_THREADS = 4
# Characters rarer than the last 0.01% of occurrences get no piece of their own (they are
# written as UTF-8 bytes), so a large alphabet (CJK, say) does not eat a small vocabulary.
CHARACTER_COVERAGE = 0.9999


class Tokenizer:
    """A loaded SentencePiece model; see the module docstring for the guarantees."""

    def __init__(self, model_proto: bytes, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises bare RuntimeError/OSError
            raise DataError(f"{path or 'tokenizer'}: not a SentencePiece model ({e})") from None
        self.model_proto = bytes(model_proto)
        self.vocab_size: int = self._sp.get_piece_size()
        self.eos_id: int = self._sp.eos_id()
        if self.eos_id < 0:
            raise DataError(f"{path or 'tokenizer'}: the model has no end-of-sequence piece")
        meta_bytes = META.encode("utf-8")
        self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in meta_bytes]
        self._byte_fallback = all(self._sp.is_byte(i) for i in self._meta_ids)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """The model at `path` (a `.model` file written by `train` or by SentencePiece)."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read tokenizer model {path}: {e.strerror}") from None
        return cls(data, path)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        kind: str = "bpe",
        vocab_size: int = 4096,
        path: str | os.PathLike | None = None,
        *,
        seed: int = 0,
        num_threads: int | None = None,
    ) -> Tokenizer:
        """Train a `kind` ("bpe" or "unigram") model of `vocab_size` pieces on `texts`.

        Deterministic for given texts, kind, size, seed and `num_threads` (default
        TRAIN_THREADS on every machine). Written to `path` (a `.model` file) when given.
        DataError when SentencePiece cannot reach `vocab_size`.
        """
        if kind not in KINDS:
            raise DataError(f"tokenizer kind {kind!r} is not one of {', '.join(KINDS)}")
        threads = num_threads or TRAIN_THREADS
        spm.set_random_generator_seed(seed)
        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=training_chunks(texts),
                model_writer=out,
                model_type=kind,
                vocab_size=vocab_size,
                character_coverage=CHARACTER_COVERAGE,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                max_sentence_length=4 * CHUNK_CHARS + 16,
                input_sentence_size=MAX_SENTENCES,
                shuffle_input_sentence=True,
                unk_id=0,
                eos_id=1,
                bos_id=-1,
                pad_id=-1,
                num_threads=threads,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise DataError(_training_error(str(e), kind, vocab_size)) from None
        tok = cls(out.getvalue())
        if path is not None:
            tok.save(path)
        return tok

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.write_bytes(self.model_proto)
        self.path = path

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no separator added)."""
        if META not in text or not self._byte_fallback:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(META)):
            if i:
                ids.extend(self._meta_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """`[self.encode(t) for t in texts]`, on several threads."""
        plain = [i for i, t in enumerate(texts) if META not in t]
        out: list[list[int]] = [[] for _ in texts]
        if plain:
            threads = num_threads or min(4, os.cpu_count() or 1)
            encoded = self._sp.encode([texts[i] for i in plain], num_threads=threads)
            for i, ids in zip(plain, encoded, strict=True):
                out[i] = ids
        for i, t in enumerate(texts):
            if META in t:
                out[i] = self.encode(t)
        return out

    def encode_arrays(
        self, texts: Sequence[str], dtype: np.dtype, num_threads: int = 1
    ) -> list[np.ndarray]:
        """`encode` of each text as a `dtype` array, long texts cut into word-aligned pieces
        first: SentencePiece's BPE is slower per character on long inputs, and no piece
        spans a space that follows a non-space (a word start), so the ids are the same."""
        pieces: list[str] = []
        owners: list[int] = []
        for i, text in enumerate(texts):
            for piece in word_pieces(text):
                pieces.append(piece)
                owners.append(i)
        encoded = self.encode_batch(pieces, num_threads=num_threads)
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        for i, ids in zip(owners, encoded, strict=True):
            parts[i].append(np.asarray(ids, dtype=dtype))
        empty = np.zeros(0, dtype=dtype)
        return [np.concatenate(p) if len(p) > 1 else (p[0] if p else empty) for p in parts]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; end-of-document ids decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    @property
    def kind(self) -> str:
        """ "bpe" or "unigram" (or another SentencePiece model type), read from the model."""
        try:
            from sentencepiece import sentencepiece_model_pb2 as pb
        except ImportError:  # protobuf missing
            return "unknown"
        proto = pb.ModelProto()
        proto.ParseFromString(self.model_proto)
        return pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower()

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({self.path or '<memory>'}, vocab_size={self.vocab_size})"


def training_chunks(texts: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """`texts` cut into pieces of at most `size` characters, each cut made just before a
    newline (SentencePiece's trainer drops a trailing one) or, inside a long line, before
    a space; empty and whitespace-only pieces are skipped."""
    for text in texts:
        start, n = 0, len(text)
        while start < n:
            end = min(start + size, n)
            if end < n:
                for sep in "\n ":
                    cut = text.rfind(sep, start + 1, end + 1)
                    while cut > start + 1 and text[cut - 1] == sep:
                        cut -= 1  # before the whole run, so no piece ends with `sep`
                    if cut > start:
                        end = cut
                        break
            piece = text[start:end]
            if piece.strip():
                yield piece
            start = end


def word_pieces(text: str, size: int = ENCODE_PIECE_CHARS) -> Iterator[str]:
    """`text` cut, every `size` characters or so, just before a space that follows a
    non-space: the start of a SentencePiece word, so encoding the pieces one by one gives
    the ids of the whole. A stretch with no such space is not cut."""
    start, n = 0, len(text)
    while n - start > size:
        cut = text.find(" ", start + size)
        while cut != -1 and text[cut - 1] == " ":
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _training_error(message: str, kind: str, vocab_size: int) -> str:
    top = re.search(r"value <= (\d+)", message)
    if top:
        return (
            f"data.tokenizer.vocab_size {vocab_size} is too large for this corpus: a {kind} "
            f"tokenizer of it can have at most {top.group(1)} pieces; lower the vocab size "
            "or add text"
        )
    low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if low:
        return (
            f"data.tokenizer.vocab_size {vocab_size} is too small: the {kind} tokenizer "
            f"needs at least {low.group(2)} pieces (256 bytes, specials and the corpus's "
            "characters); raise the vocab size"
        )
    if "sentences_.empty()" in message:
        return f"cannot train the {kind} tokenizer: its training text is empty"
    detail = message.rsplit("] ", 1)[-1].strip() or message
    return f"training the {kind} tokenizer (vocab_size {vocab_size}) failed: {detail}"
