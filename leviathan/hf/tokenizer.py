"""A run's SentencePiece model as a Hugging Face fast tokenizer (`tokenizer.json`) that
gives the same ids and the same text back (`leviathan.data.tokenizer` says how the run's
encodes: identity normalisation, no dummy prefix, byte fallback).

SentencePiece writes a space as "\u2581" and so must encode a literal "\u2581" as its three
UTF-8 bytes. Here the pieces carry real spaces instead: no normaliser and no
pre-tokeniser touch the text, a literal "\u2581" is in no piece and falls back to its
bytes, as in the run. BPE merges are SentencePiece's order: a pair's rank is the score of
the piece it makes. The specials (unknown, end of document) are not read from the text
(`split_special_tokens`), as SentencePiece reads "</s>" as four characters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from leviathan.errors import DataError

if TYPE_CHECKING:
    from tokenizers.models import Model
    from transformers import PreTrainedTokenizerFast

META = "\u2581"  # SentencePiece's whitespace symbol
NORMAL = 1  # sentencepiece_model.proto: ModelProto.SentencePiece.Type
TOKENS_MODEL = {1: "unigram", 2: "bpe"}  # TrainerSpec.ModelType


def hf_tokenizer(model_proto: bytes, max_length: int) -> PreTrainedTokenizerFast:
    """The fast tokenizer of a serialized SentencePiece model; `max_length`: the model's
    context (block_size), which tools read as the longest input."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Tokenizer, decoders
    from transformers import PreTrainedTokenizerFast

    proto = pb.ModelProto()
    proto.ParseFromString(model_proto)
    kind = TOKENS_MODEL.get(proto.trainer_spec.model_type)
    if kind is None or not proto.trainer_spec.byte_fallback:
        raise DataError(
            "tokenizer.model: only BPE and unigram models with byte fallback (as leviathan "
            "trains them) convert to tokenizer.json"
        )
    pieces = [(hf_piece(p), p.score, p.type == NORMAL) for p in proto.pieces]
    unk = proto.trainer_spec.unk_id
    tok = Tokenizer(bpe_model(pieces, unk) if kind == "bpe" else unigram_model(pieces, unk))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    eos = proto.pieces[proto.trainer_spec.eos_id].piece
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=proto.pieces[unk].piece,
        eos_token=eos,
        model_max_length=max_length,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )


def hf_piece(piece: Any) -> str:
    """The piece's text: the whitespace symbol of a learnt piece as the space it stands for."""
    return piece.piece.replace(META, " ") if piece.type == NORMAL else piece.piece


def bpe_model(pieces: list[tuple[str, float, bool]], unk: int) -> Model:
    """BPE over the pieces, merges ranked by the score of the piece each one makes."""
    from tokenizers.models import BPE

    vocab = {text: i for i, (text, _, _) in enumerate(pieces)}
    merges = []
    for text, score, normal in pieces:
        if not normal:
            continue
        splits = [(text[:i], text[i:]) for i in range(1, len(text))]
        pairs = [(a, b) for a, b in splits if a in vocab and b in vocab]
        merges += [(-score, vocab[a], vocab[b], a, b) for a, b in pairs]
    ranked = [(a, b) for *_, a, b in sorted(merges)]
    return BPE(vocab, ranked, unk_token=pieces[unk][0], fuse_unk=True, byte_fallback=True)


def unigram_model(pieces: list[tuple[str, float, bool]], unk: int) -> Model:
    """Unigram over the pieces and their log-probabilities. Unlike SentencePiece, it can
    read a special or byte piece's name ("</s>", "<0x41>") in the text as that piece: the
    one place a unigram export's ids differ from the run's (docs/export.md)."""
    from tokenizers.models import Unigram

    return Unigram([(text, score) for text, score, _ in pieces], unk_id=unk, byte_fallback=True)
