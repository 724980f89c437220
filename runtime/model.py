"""`load(path)`: an artifact, ready to compute logits, generate text and chat."""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from functools import cached_property

import numpy as np
from tokenizers import Tokenizer

from ferrisres.format import Artifact, ArtifactError
from ferrisres.format.documents import check_document, check_loaded_tokenizer
from ferrisres.format.isolated import Isolated
from ferrisres.format.tables import GROUPED_TABLES

from .chat_template import render_chat, special_token_variables, template_of
from .gemma4 import Gemma4
from .generate import Completion, Generation
from .kv_cache import KVCache
from .sampling import SamplingParams
from .scheduler import Scheduler
from .weights import Weights

# The check of tokenizer.json in a child (Model._check_tokenizer_document): E2B's 13 MB took 0.8 s and 0.25 GB
# (measured); a document of the largest size allowed (MAX_DOCUMENT) that needs more is refused
TOKENIZER_CHECK_SECONDS, TOKENIZER_CHECK_MEMORY = 60.0, 2 << 30
# Sampling fields a generation_config.json may set, and the names SamplingParams gives them.
_GENERATION_DEFAULTS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                        "repetition_penalty": "repetition_penalty"}


class Model:
    """A loaded artifact: config, tokenizer, and the Gemma 4 decoder over the memory-mapped weights."""

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.config = artifact.config
        self.student_config = artifact.json("student_config.json") or {}
        self.generation_config = artifact.json("generation_config.json") or {}
        self.tokenizer_config = artifact.json("tokenizer_config.json") or {}
        self.weights = Weights(artifact)
        self.decoder = Gemma4(artifact.config, self.weights)
        self.kernel = "numpy"  # which products run: "numpy", "fast" or "int8" (fused kernels attached by `load`)
        self.compile_seconds = 0.0  # spent compiling (or loading from numba's cache) the fast kernels
        self._tokenizer_problem: str | None = None
        self._tokenizer_check: Isolated | None = Isolated(
            lambda: check_document("tokenizer.json", artifact.document("tokenizer.json")) and None,
            seconds=TOKENIZER_CHECK_SECONDS, memory=TOKENIZER_CHECK_MEMORY, error=ArtifactError,
            what="checking tokenizer.json")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The checkpoint's `tokenizers` tokenizer (parsed on first use: it is tens of MB for Gemma)."""
        try:
            self._check_tokenizer_document()
            with _library_panics(ArtifactError, "tokenizer.json cannot be loaded"):
                try:
                    tokenizer = Tokenizer.from_str(self.artifact.document("tokenizer.json"))
                except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
                    raise ArtifactError(f"tokenizer.json cannot be loaded ({e})") from None
            check_loaded_tokenizer(tokenizer)  # what the library made of it, before it encodes anything
        except ArtifactError as e:
            raise ArtifactError(f"{self.artifact.path}: {e}") from None
        release_freed_heap()
        return tokenizer

    def _check_tokenizer_document(self) -> None:
        """The fields of tokenizer.json checked (documents.py) before the tokenizers library reads it: a
        library that builds whatever the document declares (a matcher over megabytes of added tokens takes
        gigabytes) is only handed what passed. Its tens of MB of JSON are parsed in a child, bounded, which
        `__init__` starts so that it runs while the weights load; the outcome is kept for later calls."""
        if self._tokenizer_check is not None:
            check, self._tokenizer_check = self._tokenizer_check, None
            try:
                check.result()
            except ArtifactError as e:
                self._tokenizer_problem = str(e)
        if self._tokenizer_problem is not None:
            raise ArtifactError(self._tokenizer_problem)

    @cached_property
    def _longest_token(self) -> int:
        """Characters of the vocabulary's longest token: no token of a text stands for more."""
        longest = max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=1)
        release_freed_heap()  # the vocabulary's copy: 50 MB kept for E2B's, measured
        return longest

    @cached_property
    def chat_template(self) -> str | None:
        """The checkpoint's Jinja chat template, if it has one."""
        file = self.artifact.document("chat_template.jinja") if "chat_template.jinja" in self.artifact.documents else None
        return template_of(self.tokenizer_config, file)

    def default_sampling(self, **overrides) -> SamplingParams:
        """The generation config's sampling settings (greedy unless it says do_sample), then `overrides`."""
        g = self.generation_config
        values = {}
        if g.get("do_sample"):
            values = {ours: g[theirs] for theirs, ours in _GENERATION_DEFAULTS.items() if g.get(theirs) is not None}
            values.setdefault("temperature", 1.0)
        elif g.get("repetition_penalty") is not None:
            values["repetition_penalty"] = g["repetition_penalty"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**values)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text` as is. With `add_bos`, they start with exactly one BOS (never doubled)."""
        context = self.config.max_position_embeddings
        if len(text) > context * self._longest_token:  # cannot fit: refused before tokenizing it all
            raise ValueError(f"the prompt has {len(text)} characters, more than {context} tokens of context can hold")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # the tokenizers library would raise a TypeError
                raise ValueError(f"the text is not valid Unicode: a lone surrogate at character {e.start}") from None
        # (a panic: a pattern past its regex engine's retry limit, with a hostile tokenizer)
        with _library_panics(ValueError, "the tokenizer failed on this text"):
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.config.bos_token_id
        if add_bos:
            leading = next((k for k, t in enumerate(ids) if t != bos), len(ids))  # BOS tokens it starts with
            ids = ids[leading - 1 :] if leading else [bos, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of token ids (special tokens left out unless `skip_special_tokens` is False)."""
        with _library_panics(ValueError, "the tokenizer failed to decode the reply"):  # (a decoder the checks did not foresee)
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **template_options) -> str:
        """The prompt text for `messages` by the artifact's chat template; `template_options` are passed
        to the template (Gemma 4's read e.g. `enable_thinking`, `tools`)."""
        if self.chat_template is None:
            raise ValueError("this artifact has no chat template (use raw text prompts)")
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           **{**special_token_variables(self.tokenizer_config), **template_options})

    def forward(self, ids, cache: KVCache, last_only: bool = False) -> np.ndarray:
        return self.decoder.forward(self.checked_ids(ids), cache, last_only)

    def prefill(self, ids, cache: KVCache) -> None:
        """Extend `cache` with `ids`, computing no logits (the layers that only read the cache are skipped)."""
        self.decoder.prefill_batch([(self.checked_ids(ids), cache)])

    def logits(self, ids) -> np.ndarray:
        """float32 [T, vocab]: a full forward over `ids` with a fresh cache."""
        return self.forward(ids, KVCache(self.config))

    def generate(self, prompt: str | list[int], max_tokens: int = 256, stop: tuple[str, ...] = (),
                 max_context: int | None = None, top: bool = False, draft: str | None = None,
                 **sampling) -> Generation:
        """Continue `prompt` (text, sent as is after one BOS, or token ids); iterate the result for `Step`s.

        Stops at any EOS id of the generation config, at a `stop` string (not included in the text), after
        `max_tokens`, or when the context limit is reached. `sampling`: temperature, top_k, top_p, min_p,
        repetition_penalty, seed (defaults from the artifact's generation config; temperature 0 = greedy).
        `draft="ngram"`: speculative decoding by prompt lookup (greedy only; the same text, in fewer passes).
        `top=True` fills each step's 5 likeliest tokens.
        """
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return Generation(self, self.checked_ids(ids).tolist(), self.default_sampling(**sampling), max_tokens,
                          self.config.eos_token_ids, stop, max_context=max_context, top=top, draft=draft)

    def generate_batch(self, prompts: list[str | list[int]], max_tokens: int = 256, max_context: int | None = None,
                       **sampling) -> list[Completion]:
        """Continue every prompt (as `generate` does), advancing all of them in one forward per step: a
        few sequences cost little more than one. It is the server's scheduler, run to the end. Returns
        one `Completion` per prompt."""
        generations = [self.generate(p, max_tokens, max_context=max_context, **sampling) for p in prompts]
        if not generations:
            return []
        scheduler = Scheduler(self, max_batch=len(generations), max_queue=0)
        failures: list[Exception] = []
        for g in generations:
            scheduler.submit(g, lambda event: failures.append(event) if isinstance(event, Exception) else None)
        while scheduler.step():
            pass
        if failures:
            raise failures[0]
        return [Completion(g.tokens, g.text, g.stop_reason) for g in generations]

    def chat(self, messages: list[dict], max_tokens: int = 256, **options) -> Generation:
        """Reply to `messages` ([{"role": "user", "content": "..."}, ...]) using the chat template."""
        return self.generate(self.encode(self.render_chat(messages)), max_tokens, **options)

    def checked_ids(self, ids) -> np.ndarray:
        """`ids` as int64, refused (ValueError) when empty or outside the vocabulary."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("no token ids to process")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids


KERNELS = ("numpy", "fast", "int8", "auto")
FAST_EXTRA = "pip install 'ferrisres[fast]'"
# auto takes the fast kernels for models with at least this many bytes of matrices: below, importing numba
# and loading its compiled kernels (~1 s, ~170 MB resident) costs more than they save (the tiny test models)
AUTO_FAST_BYTES = 16 << 20


def release_freed_heap() -> None:
    """Give the C heap's free memory back to the system, where the C library is glibc. Parsing Gemma's
    tokenizer.json (checked in Python, then by the tokenizers library) frees about 240 MB that glibc would
    otherwise keep for the process's lifetime (measured on the E2B tokenizer; tests/test_memory.py), a
    sixth of what decoding a one-plane E2B student keeps resident. Elsewhere (musl, macOS, Windows) there
    is no such call and nothing is done."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return
    trim(0)


@contextmanager
def _library_panics(error: type[Exception], what: str):
    """A Rust panic inside the tokenizers library, which reaches Python as pyo3's PanicException (a
    BaseException, not an Exception), raised as `error`: `what`, with the panic's first line. Anything else
    (KeyboardInterrupt, ...) passes through."""
    try:
        yield
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        line = str(e).splitlines()[0][:200] if str(e) else "a panic"
        raise error(f"{what} (the tokenizers library failed: {line})") from None


def load(path: str | os.PathLike, cache: str | None = None, kernel: str = "numpy") -> Model:
    """Open and validate the artifact at `path`; weights stay on disk until used.

    `cache="int8"` unpacks every ternary matrix once into RAM as int8 (a tied student's levels, a byte a
    weight: ~1.8 GB more for E2B), which makes each token faster through numpy (2.2x for E2B), for users
    with memory to spare (the fused kernels gain nothing from it, and int8's reads of the packed codes are faster).
    `kernel="fast"` runs the products of a few tokens at a time (decoding) through fused compiled kernels
    (the `fast` extra: numba); "numpy", the default here, is the reference path. `kernel="int8"` is "fast"
    with the inputs of the ternary products rounded to int8 per group of 64 (as llama.cpp does), and of the
    tied head over an int6 table per group of 32, which it reads packed instead of unpacking it to int8 at
    load: E2B decodes about 3x faster, and no longer equal to the reference (fast_kernels.py; x86-64 with
    AVX2). "auto" (ferrisres-run's default) takes int8 where numba is installed and the CPU has it, else
    fast, and numpy without numba or for a tiny model (AUTO_FAST_BYTES).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r} (known: {', '.join(KERNELS)})")
    if cache not in (None, "int8"):
        raise ValueError(f"unknown cache {cache!r} (known: int8)")
    if kernel in ("fast", "int8"):
        _fast_kernels(required=True)  # refused before any work
    model = Model(Artifact.open(path))
    weights = model.weights
    if kernel == "auto":
        kernel = _auto_kernel([*weights.linears(), weights.head])
    if weights.head.encoding in GROUPED_TABLES and not (kernel == "int8" and weights.head.encoding in _int8_tables()):
        weights.head.keep_int8()  # once: its int8 products beat decoding 4 or 6 bits a weight every token
        model.artifact.release_pages()  # the packed table's pages just read are not read again
    linears = [*weights.linears(), weights.head]
    if cache == "int8":
        for linear in weights.linears():
            linear.keep_int8()
    if kernel != "numpy":
        model.compile_seconds = _fast_kernels(required=True)(linears, int8=kernel == "int8")
        model.kernel = kernel
    return model


def _auto_kernel(linears) -> str:
    """What kernel="auto" runs: int8 when numba imports and this CPU has the instructions (AVX2 and F16C),
    fast when only numba is there, numpy without numba or for a model under AUTO_FAST_BYTES of matrices."""
    if sum(linear.data.nbytes for linear in linears) < AUTO_FAST_BYTES or _fast_kernels(required=False) is None:
        return "numpy"
    from .fast_kernels import int8_isas
    return "int8" if int8_isas() else "fast"


def _int8_tables() -> tuple[str, ...]:
    """The table encodings the int8 kernel reads packed, as the tied head (numba is there: checked before)."""
    from .fast_kernels import INT8_TABLES
    return INT8_TABLES


def _fast_kernels(required: bool):
    """`fast_kernels.attach`, or None when numba does not import (an error if `required`)."""
    try:
        from .fast_kernels import attach
    except ImportError as e:
        if required:
            raise ValueError(f"the fast kernels need numba ({e}): {FAST_EXTRA}") from None
        return None
    return attach
