"""Continuous batching: one thread advances every active generation in one forward pass per step.

Each step feeds every active sequence its next tokens: its last chosen token once decoding, or the
next `prefill_chunk` tokens of its prompt, so that a long prompt is prefilled a chunk per step beside
the others' decode tokens instead of stalling them (in longer chunks while no one is decoding). A submitted generation waits in a bounded queue
and joins at the next step when one of the `max_batch` slots is free; a cancelled one (its client
went away) leaves at once, or as soon as the step under way ends, and its KV cache goes with it.

The forward is `Gemma4.forward_batch`: every weight is decoded once per step for all the sequences,
so a step for several costs little more than a step for one. Each sequence samples from its own
logits with its own random generator, seeded as `Generation` seeds it, so it gets the tokens it gets
alone (up to float32 rounding of the batched products).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .generate import PREFILL_CHUNK as ALONE_CHUNK  # a lone generation's prefill chunk (128 tokens)
from .generate import Generation, Step
from .sampling import sample

# Prompt tokens a sequence prefills per step while others are decoding: at E2B scale a 64-token chunk
# takes about two decode steps' time, the most a long prompt should delay everyone else's next token.
# With no one decoding, chunks are as long as a lone generation's (ALONE_CHUNK): longer chunks
# prefill faster per token (each weight is unpacked once for all of a chunk's tokens).
PREFILL_CHUNK = 64


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full."""


class Finished(NamedTuple):
    """The last event of a sequence that ran to its end."""

    stop_reason: str  # Generation.stop_reason: eos, stop_string, max_tokens or context_full
    prompt_tokens: int
    completion_tokens: int


class Sequence:
    """One generation being served. Its events go to `listener`, from the scheduler's thread: a `Step`
    per token, then `Finished`, or an exception if it failed."""

    def __init__(self, generation: Generation, listener: Callable[[Step | Finished | Exception], None]):
        self.generation = generation
        self.listener = listener
        self.rng = np.random.default_rng(generation.params.seed)
        self.unfed = list(generation.prompt_ids)  # prompt tokens not yet in the cache
        self.last: int | None = None  # the token chosen last, fed at the next step
        self.cancelled = False

    def feed(self, prefill_chunk: int) -> list[int]:
        if self.unfed:
            return self.unfed[:prefill_chunk]
        return [self.last]

    def advance(self, fed: list[int], logits: np.ndarray, seconds: float) -> bool:
        """Account for the step that fed `fed` and produced `logits` [1, vocab]; True when it is done."""
        g = self.generation
        g.context.extend(fed)
        if self.unfed:
            del self.unfed[: len(fed)]
            if self.unfed:  # still prefilling: this chunk's logits are not a prediction anyone asked for
                return False
        token = sample(logits[-1], g.params, np.asarray(g.context, dtype=np.int64), self.rng)
        self.listener(g.take(token, logits[-1], seconds))
        self.last = token
        if g.stop_reason is None:
            return False
        self.listener(Finished(g.stop_reason, len(g.prompt_ids), len(g.tokens)))
        return True


class Scheduler:
    """The thread that runs every sequence: `submit` a Generation, `cancel` it, `stop` the thread."""

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int = PREFILL_CHUNK):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_queue >= 0")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.active: list[Sequence] = []
        self.waiting: deque[Sequence] = deque()
        self.steps = 0  # forward passes run so far
        self._lock = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ferrisres-scheduler", daemon=True)

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join()

    def submit(self, generation: Generation, listener) -> Sequence:
        """Queue `generation`; it joins the batch at the next step with a free slot. Raises QueueFull."""
        if generation.max_tokens <= 0:
            raise ValueError("max_tokens must be >= 1")
        sequence = Sequence(generation, listener)
        with self._lock:
            if len(self.active) + len(self.waiting) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{len(self.active)} requests running and {len(self.waiting)} waiting")
            self.waiting.append(sequence)
            self._lock.notify()
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """Drop `sequence` now (a step under way finishes without it): nothing more reaches its listener."""
        with self._lock:
            sequence.cancelled = True
            if sequence in self.active:
                self.active.remove(sequence)
            elif sequence in self.waiting:
                self.waiting.remove(sequence)
            self._lock.notify()

    def status(self) -> dict:
        with self._lock:
            return {"active": len(self.active), "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "steps": self.steps}

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.active and not self.waiting:
                    self._lock.wait()
                if self._stopping:
                    return
            self.step()

    def step(self) -> bool:
        """Admit waiting sequences into free slots, then advance every active one by one forward pass.
        False when there was nothing to run. (The thread calls this in a loop; tests may call it directly.)"""
        with self._lock:
            while self.waiting and len(self.active) < self.max_batch:
                self.active.append(self.waiting.popleft())
            batch = list(self.active)
        if not batch:
            return False
        decoding = any(not s.unfed for s in batch)
        feeds = [s.feed(self.prefill_chunk if decoding else max(self.prefill_chunk, ALONE_CHUNK)) for s in batch]
        sequences = [(np.asarray(ids, dtype=np.int64), s.generation.cache) for s, ids in zip(batch, feeds)]
        start = time.perf_counter()
        try:
            if all(len(s.unfed) > len(ids) for s, ids in zip(batch, feeds)):  # no one's prompt ends: no logits
                self.model.decoder.prefill_batch(sequences)
                logits = [None] * len(batch)
            else:
                logits = self.model.decoder.forward_batch(sequences, last_only=True)
        except Exception as e:  # noqa: BLE001 - (out of memory, ...) every sequence of the step fails with it
            self._finish(batch, e)
            return True
        seconds = time.perf_counter() - start
        self.steps += 1
        done = []
        for s, ids, rows in zip(batch, feeds, logits):
            if s.cancelled:
                continue
            try:
                if s.advance(ids, rows, seconds):
                    done.append(s)
            except Exception as e:  # noqa: BLE001 - (non-finite logits, ...) this sequence alone fails
                self._finish([s], e)
        self._finish(done)
        return True

    def _finish(self, sequences: list[Sequence], error: Exception | None = None) -> None:
        with self._lock:
            for s in sequences:
                if s in self.active:
                    self.active.remove(s)
        if error is not None:
            for s in sequences:
                if not s.cancelled:
                    s.listener(error)
