"""Token generation: prefill the prompt once, then one cached forward per new token, until a stop.

`Generation` is an iterator of (token id, text piece). Text pieces are what a terminal should print:
a character split over several byte-fallback tokens is held back until it is complete.
"""

from __future__ import annotations

import codecs
import re
import time
from dataclasses import dataclass, field

import numpy as np

from .kv_cache import KVCache

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback pieces


def sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0, else a draw from softmax(logits / temperature)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(len(p), p=p))


@dataclass
class Generation:
    """Iterate for (token id, text piece); afterwards the fields describe the run."""

    model: object
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()
    tokens: list[int] = field(default_factory=list)
    stop_reason: str | None = None  # "eos" or "max_tokens"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0  # time in the forward passes of decode steps
    decode_steps: int = 0

    def __iter__(self):
        if self.max_tokens <= 0:
            self.stop_reason = "max_tokens"
            return
        rng = np.random.default_rng(self.seed)
        cache = KVCache(self.model.config)
        start = time.perf_counter()
        logits = self.model.forward(self.prompt_ids, cache, last_only=True)
        self.prefill_seconds = time.perf_counter() - start
        shown = ""  # the text handed out so far
        while True:
            token = sample(logits[-1], self.temperature, rng)
            if token in self.stop_ids:
                self.stop_reason = "eos"
                return
            self.tokens.append(token)
            last = len(self.tokens) >= self.max_tokens
            piece = ""
            if last or not self._ends_in_partial_character():
                text = self.text
                piece, shown = text[len(shown) :], text
            yield token, piece
            if last:
                self.stop_reason = "max_tokens"
                return
            start = time.perf_counter()
            logits = self.model.forward([token], cache, last_only=True)
            self.decode_seconds += time.perf_counter() - start
            self.decode_steps += 1

    def _ends_in_partial_character(self) -> bool:
        """Do the last tokens end in bytes that start a valid UTF-8 character (byte fallback) but not all of it?"""
        tail = b""
        for token in reversed(self.tokens[-4:]):
            byte = _BYTE_TOKEN.fullmatch(self.model.tokenizer.id_to_token(token) or "")
            if byte is None:
                break
            tail = bytes([int(byte.group(1), 16)]) + tail
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(tail, final=False)
        return bool(decoder.getstate()[0])  # bytes held back, waiting for the rest of a character

    @property
    def text(self) -> str:
        return self.model.tokenizer.decode(self.tokens, skip_special_tokens=True)
