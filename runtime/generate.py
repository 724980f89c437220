"""Token generation: prefill the new tokens once, then one cached forward per generated token, until a stop.

Iterating a `Generation` yields a `Step` per token whose `text` is what a terminal should print
next: a character split over several byte-fallback tokens is held back until it is complete, and
text that could be the start of a stop string is held back until it is clear that it is not.
"""

from __future__ import annotations

import codecs
import re
import time
from typing import NamedTuple

import numpy as np

from .kv_cache import SLACK, KVCache
from .sampling import SamplingParams, sample, token_probabilities

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback pieces
MAX_NGRAM = 3  # prompt lookup matches the last 3, 2 or 1 tokens
DRAFT_TOKENS = min(10, SLACK - 1)  # drafts verified per forward pass; the cache can take back SLACK
HELD_BYTES = 16  # a run of byte tokens waits for its end up to this many bytes (Generation._holds_back_bytes)
# Prompt tokens per forward pass: a whole prompt at once holds activations that grow with it (a 16k-token
# prompt of E2B peaked at 6.5 GB, 2.2 GB in passes), and shorter passes are faster per token while their
# activations stay in cache (E2B, int8 kernel, 1024 tokens in passes of 128: 1.06x passes of 256, 1.2x the
# whole; numpy's sgemm 0.96x).
PREFILL_CHUNK = 128


class Step(NamedTuple):
    """One generated token. A run stopped by EOS ends with a step for the EOS token itself (not in
    `Generation.tokens`), whose text is whatever was still held back."""

    token: int
    text: str  # the new text to show (may be empty while a character or a possible stop string is incomplete)
    seconds: float  # time of the forward pass that produced this token's logits
    top: tuple[tuple[int, float], ...] | None  # the 5 likeliest tokens and probabilities, when asked for


class Generation:
    """An iterator of `Step`s; afterwards `tokens`, `text`, `stop_reason` and the timings describe the run.

    `cache` and `context` continue an earlier conversation: the cache holds `context` (the token ids
    already processed), and only `new_ids` are prefilled, PREFILL_CHUNK tokens a pass. Set `on_prefill`
    to a function (done, total) to hear how a prompt longer than that is getting on.
    """

    def __init__(self, model, new_ids: list[int], params: SamplingParams, max_tokens: int,
                 stop_ids=frozenset(), stop_strings=(), cache: KVCache | None = None,
                 context: list[int] | None = None, max_context: int | None = None, top: bool = False,
                 draft: str | None = None):
        self.model = model
        self.prompt_ids = list(new_ids)
        self.params = params
        self.max_tokens = max_tokens
        self.stop_ids = frozenset(stop_ids)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.cache = cache if cache is not None else KVCache(model.config)
        self.context = list(context or [])  # every token id in the cache, for the repetition penalty
        self.max_context = max_context or model.config.max_position_embeddings
        self.want_top = top
        self.draft = draft
        self.on_prefill = None
        self.tokens: list[int] = []
        self.stop_reason: str | None = None  # "eos", "stop_string", "max_tokens", "context_full"; None while running
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0  # time in the forward passes after the prefill
        self.decode_tokens = 0  # tokens (EOS included) chosen from those passes' logits
        self.drafted = self.accepted = 0  # speculative decoding: draft tokens proposed, and confirmed
        self._text = ""  # decoded text of `tokens`, cut at a stop string
        self._shown = 0  # characters of it handed out so far
        self._start = len(self.context) + len(self.prompt_ids)  # position of the first generated token
        if self._start > self.max_context:
            raise ValueError(f"the prompt needs {self._start} tokens of context; the limit is {self.max_context}")
        if draft not in (None, "ngram"):
            raise ValueError(f"unknown draft method {draft!r} (known: ngram)")
        if draft and not params.greedy:
            raise ValueError("speculative decoding (--draft) gives exactly greedy decoding's text: it needs temperature 0")
        if draft and self.cache.attnres_sums is not None:
            raise ValueError("speculative decoding cannot take back Block AttnRes positions: use it without --draft")

    def __iter__(self):
        if self.max_tokens <= 0:
            self.stop_reason = "max_tokens"
            return
        rng = np.random.default_rng(self.params.seed)
        start = time.perf_counter()
        logits = self._forward(self.prompt_ids, all_positions=False)
        self.prefill_seconds = seconds = time.perf_counter() - start
        while True:
            token = sample(logits[-1], self.params, np.asarray(self.context, dtype=np.int64), rng)
            yield self.take(token, logits[-1], seconds)
            if self.stop_reason is not None:
                return
            drafts = self._drafts(token) if self.draft else []
            start = time.perf_counter()
            logits = self._forward([token, *drafts], all_positions=bool(drafts))
            seconds = time.perf_counter() - start
            self.decode_seconds += seconds
            for j, proposed in enumerate(drafts):  # greedy verification: keep drafts while they are what greedy picks
                fed = len(self.context) - len(drafts) + j  # context length when draft j is chosen
                if sample(logits[j], self.params, np.asarray(self.context[:fed], dtype=np.int64), rng) != proposed:
                    self._take_back(len(drafts) - j)
                    logits = logits[j : j + 1]
                    break
                self.accepted += 1
                yield self.take(proposed, logits[j], seconds)
                if self.stop_reason is not None:
                    self._take_back(len(drafts) - j - 1)
                    return
            else:
                logits = logits[-1:]

    def take(self, token: int, logits: np.ndarray, seconds: float) -> Step:
        """Record one chosen token (from `logits`, computed in `seconds`): the step to hand out. Sets
        `stop_reason` when generation stops here. Iterating calls it; so does a server's scheduler
        (runtime/scheduler.py), which runs the forward passes of many generations itself."""
        self.decode_tokens += 1 if self.tokens or self.stop_reason else 0
        top = self._top(logits) if self.want_top else None
        if token in self.stop_ids:  # a last step for the EOS token shows any text still held back
            self.stop_reason = "eos"
            return Step(token, self._take_text(final=True), seconds, top)
        self.tokens.append(token)
        self._update_text()
        if self.stop_reason is None and len(self.tokens) >= self.max_tokens:
            self.stop_reason = "max_tokens"
        if self.stop_reason is None and self._start + len(self.tokens) >= self.max_context:
            self.stop_reason = "context_full"
        return Step(token, self._take_text(final=self.stop_reason is not None), seconds, top)

    def _drafts(self, token: int) -> list[int]:
        """Prompt lookup: the tokens that followed the latest earlier occurrence of the last n-gram."""
        room = min(DRAFT_TOKENS, self.max_tokens - len(self.tokens), self.max_context - self._start - len(self.tokens))
        sequence = np.asarray([*self.context, token])
        for n in range(MAX_NGRAM, 0, -1):
            if room <= 0 or len(sequence) <= n:
                break
            tail = sequence[-n:]
            windows = np.lib.stride_tricks.sliding_window_view(sequence[:-1], n)
            starts = np.flatnonzero((windows == tail).all(axis=1))
            if len(starts):
                follow = sequence[starts[-1] + n : starts[-1] + n + room]
                self.drafted += len(follow)
                return follow.tolist()
        return []

    @property
    def text(self) -> str:
        """All generated text (without the stop string or EOS)."""
        return self._text

    def _forward(self, ids: list[int], all_positions: bool) -> np.ndarray:
        """A forward step that leaves the cache as it was if interrupted (Ctrl-C), so a chat can go on."""
        state = self.cache.snapshot()
        try:
            if all_positions:
                logits = self.model.forward(ids, self.cache)
            else:  # a chunk at a time, as a chat turn extends the cache: a long prompt's activations stay bounded
                starts = range(0, max(len(ids), 1), PREFILL_CHUNK)
                for start in starts[:-1]:  # only the last chunk's logits are wanted
                    self.model.prefill(ids[start : start + PREFILL_CHUNK], self.cache)
                    if self.on_prefill is not None:
                        self.on_prefill(start + PREFILL_CHUNK, len(ids))
                logits = self.model.forward(ids[starts[-1] :], self.cache, last_only=True)
                if self.on_prefill is not None and len(starts) > 1:
                    self.on_prefill(len(ids), len(ids))
        except BaseException:
            self.cache.restore(state)
            raise
        self.context.extend(ids)
        return logits

    def _take_back(self, n: int) -> None:
        """Forget the last `n` tokens fed (rejected drafts)."""
        if n:
            self.cache.truncate(self.cache.length - n)
            del self.context[-n:]

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def _update_text(self) -> None:
        text = self.model.decode(self.tokens)
        found = [at for stop in self.stop_strings if (at := text.find(stop, max(0, self._shown - len(stop) + 1))) >= 0]
        if found:  # the earliest stop string wins, whatever the order they were given in
            text = text[: min(found)]
            self.stop_reason = "stop_string"
        self._text = text

    def _take_text(self, final: bool) -> str:
        """The part of the text that can be shown now."""
        end = len(self._text)
        if not final:
            if self._holds_back_bytes():
                return ""
            end -= max((_overlap(self._text, s) for s in self.stop_strings), default=0)
        piece = self._text[self._shown : max(end, self._shown)]
        self._shown += len(piece)
        return piece

    def _holds_back_bytes(self) -> bool:
        """Does the text end in a run of byte tokens (byte fallback) that must wait? The tokenizer decodes a
        run at once: its bytes as UTF-8 if they are valid, else each byte as U+FFFD, so a byte to come can
        change how the ones before it read (a carriage return then a stray continuation byte read as two
        U+FFFD; an emoji then one, as five). A run waits for a piece or the end to follow it, but not past
        HELD_BYTES bytes (a model stuck in bytes would show nothing), and never shows part of a character."""
        tail = b""
        for token in reversed(self.tokens[-HELD_BYTES:]):
            byte = _BYTE_TOKEN.fullmatch(self.model.tokenizer.id_to_token(token) or "")
            if byte is None:
                break
            tail = bytes([int(byte.group(1), 16)]) + tail
        if 0 < len(tail) < HELD_BYTES:
            return True
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(tail, final=False)
        return bool(decoder.getstate()[0])  # bytes held back, waiting for the rest of a character

    def _top(self, logits: np.ndarray) -> tuple[tuple[int, float], ...]:
        """The 5 likeliest tokens at the sampling temperature (the model's own distribution when greedy)."""
        p = token_probabilities(logits, SamplingParams(temperature=self.params.temperature or 1.0), np.empty(0, np.int64))
        best = np.argpartition(-p, 5)[:5]
        return tuple((int(i), float(p[i])) for i in best[np.argsort(-p[best])])


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class Completion(NamedTuple):
    """One sequence of a batch: its generated token ids (without an EOS), their text, and why it stopped
    ("eos", "max_tokens" or "context_full")."""

    tokens: list[int]
    text: str
    stop_reason: str
