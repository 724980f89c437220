"""Rebuild a Hugging Face `tokenizers` tokenizer from a GGUF file's SentencePiece vocabulary.

llama.cpp stores a SentencePiece model (`tokenizer.ggml.model = "llama"`) as three parallel arrays:
pieces, scores and token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
For a BPE SentencePiece model such as Gemma's, the score of a normal piece is its merge priority
(-rank), so the merges can be regenerated: every split of a normal piece into two normal pieces is a
merge, ranked by the piece's score. The result is the same pipeline as transformers' GemmaTokenizer
(and the published Gemma 3 `tokenizer.json`): BPE with byte fallback over the `<0xNN>` pieces,
' ' -> '▁' normalizer, no prefix space, decoder '▁' -> ' ' + byte fallback + fuse.

How each token type becomes what SentencePiece does with it:
- normal pieces: the BPE vocabulary and the merges;
- byte pieces `<0x00>`..`<0xFF>`: in the vocabulary, reached only by byte fallback;
- control (and unknown) pieces: special added tokens, matched in the raw text (`<start_of_turn>`
  in a chat template), never produced by merges;
- user-defined pieces (Gemma: runs of spaces, newlines and tabs, some HTML tags): atomic pieces that
  SentencePiece matches longest-first before BPE and never merges; here non-special added tokens
  matched on the normalized text. llama.cpp's converter wrote their '▁' as ' '; it is restored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .errors import ConversionError

MAX_PIECE = 256  # characters of one vocabulary piece

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's '▁'
END_OF_TURN = "<end_of_turn>"  # Gemma's chat turn end: instruction-tuned models stop there too


@dataclass(frozen=True)
class GGUFVocab:
    """The `tokenizer.ggml.*` metadata of a GGUF file, as plain Python values."""

    model: str
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    eot_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | None = None
    model_max_length: int | None = None
    tokenizer_class: str | None = None

    @classmethod
    def from_metadata(cls, meta: dict, *, model_max_length: int | None = None, tokenizer_class: str | None = None) -> "GGUFVocab":
        """From a GGUF metadata dict (key -> value, arrays as lists)."""
        p = "tokenizer.ggml."
        model = meta.get(p + "model")
        tokens, scores, types = meta.get(p + "tokens"), meta.get(p + "scores"), meta.get(p + "token_type")
        if model is None or tokens is None:
            raise ConversionError("GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens are missing)")
        if model != "llama":
            raise ConversionError(f"GGUF tokenizer model {model!r} is not supported (only SentencePiece, 'llama')")
        n = len(tokens)
        if scores is None or types is None or len(scores) != n or len(types) != n:
            raise ConversionError("GGUF tokenizer: tokenizer.ggml.scores / token_type are missing or not one per token")
        # merges are found by splitting each piece at every position: a megabyte piece would take for ever
        if not all(isinstance(t, str) and len(t) <= MAX_PIECE for t in tokens):
            raise ConversionError(f"GGUF tokenizer: tokenizer.ggml.tokens must be strings of at most {MAX_PIECE} "
                                  "characters (Gemma's longest has 31)")
        if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores) or not all(
                isinstance(t, int) for t in types):
            raise ConversionError("GGUF tokenizer: tokenizer.ggml.scores must be finite numbers, token_type integers")
        ids = {}
        for key, name in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("unk_id", "unknown_token_id"),
                          ("pad_id", "padding_token_id"), ("eot_id", "eot_token_id")):
            value = meta.get(p + name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n):
                raise ConversionError(f"GGUF tokenizer: {p}{name}={value} is not a token id (vocabulary of {n})")
            ids[key] = None if value is None else int(value)
        return cls(
            model=model, tokens=list(tokens), scores=[float(s) for s in scores], types=[int(t) for t in types], **ids,
            add_bos=bool(meta.get(p + "add_bos_token", True)), add_eos=bool(meta.get(p + "add_eos_token", False)),
            add_space_prefix=bool(meta.get(p + "add_space_prefix", False)),
            chat_template=meta.get("tokenizer.chat_template"), model_max_length=model_max_length,
            tokenizer_class=tokenizer_class,
        )

    @cached_property
    def pieces(self) -> list[str]:
        """The pieces as SentencePiece spells them (user-defined ones with their '▁' restored)."""
        return [t.replace(" ", SPACE) if ty == USER_DEFINED else t for t, ty in zip(self.tokens, self.types)]

    def token(self, i: int | None) -> str | None:
        return None if i is None else self.pieces[i]


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE model, in rank order.

    `scores` holds the mergeable (normal) pieces in id order. Every split of such a piece into two
    mergeable pieces is a merge with the piece's score; merges are ranked by score (highest first),
    then longer left part, then longer right part, ties kept in id order: the same ordering as
    transformers' `generate_merges`.
    """
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in scores and piece[i:] in scores]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def build_tokenizer(v: GGUFVocab) -> Tokenizer:
    """The `tokenizers` tokenizer equivalent to the GGUF's SentencePiece model."""
    pieces = v.pieces
    vocab: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        if piece in vocab:
            raise ConversionError(f"GGUF tokenizer: piece {piece!r} appears twice (ids {vocab[piece]} and {i})")
        vocab[piece] = i
    mergeable = {p: s for p, s, t in zip(pieces, v.scores, v.types) if t == NORMAL}
    unk = v.token(v.unk_id)
    if unk is None and "<unk>" in vocab:
        unk = "<unk>"
    if not any(t == BYTE for t in v.types):
        raise ConversionError("GGUF tokenizer has no byte pieces <0x00>..<0xFF> (byte fallback is needed)")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab, mergeable), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    replace = normalizers.Replace(" ", SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if v.add_space_prefix else replace
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")  # as GemmaTokenizer; no-op after the normalizer
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if v.add_space_prefix else []))

    specials = [AddedToken(p, special=True, normalized=False) for p, t in zip(pieces, v.types) if t in (CONTROL, UNKNOWN)]
    user = [AddedToken(p, special=False, normalized=True) for p, t in zip(pieces, v.types) if t == USER_DEFINED]
    tok.add_special_tokens(specials)
    tok.add_tokens(user)

    bos = v.token(v.bos_id) if v.add_bos else None
    eos = v.token(v.eos_id) if v.add_eos else None

    def wrap(seq: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in (bos, seq, eos) if t is not None]

    specials_used = [(t, vocab[t]) for t in dict.fromkeys((bos, eos)) if t is not None]
    tok.post_processor = processors.TemplateProcessing(single=wrap("$A", 0), pair=wrap("$A", 0) + wrap("$B", 1),
                                                       special_tokens=specials_used)
    return tok


def eos_token_ids(v: GGUFVocab) -> list[int]:
    """Stop ids: EOS, the end-of-turn token if the GGUF names one, and Gemma's <end_of_turn> control
    token (instruction-tuned Gemma 3 stops at <eos> 1 and <end_of_turn> 106)."""
    ids = [v.eos_id, v.eot_id]
    if END_OF_TURN in v.tokens:
        i = v.tokens.index(END_OF_TURN)
        if v.types[i] == CONTROL:
            ids.append(i)
    return list(dict.fromkeys(i for i in ids if i is not None))


def tokenizer_documents(v: GGUFVocab) -> dict[str, str | dict]:
    """tokenizer.json, tokenizer_config.json and generation_config.json as a checkpoint folder has them."""
    config = {
        "add_bos_token": v.add_bos,
        "add_eos_token": v.add_eos,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
    }
    for key, i in (("bos_token", v.bos_id), ("eos_token", v.eos_id), ("unk_token", v.unk_id), ("pad_token", v.pad_id)):
        if i is not None:
            config[key] = v.token(i)
    if v.model_max_length:
        config["model_max_length"] = v.model_max_length
    if v.tokenizer_class:
        config["tokenizer_class"] = v.tokenizer_class
    if v.chat_template:
        config["chat_template"] = v.chat_template
    generation = {"eos_token_id": eos_token_ids(v)}
    if v.bos_id is not None:
        generation["bos_token_id"] = v.bos_id
    if v.pad_id is not None:
        generation["pad_token_id"] = v.pad_id
    return {
        "tokenizer.json": build_tokenizer(v).to_str(),
        "tokenizer_config.json": config,
        "generation_config.json": generation,
    }
