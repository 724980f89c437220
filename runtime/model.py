"""`load(path)`: an artifact, ready to compute logits and generate text."""

from __future__ import annotations

import json
import os
from functools import cached_property

import numpy as np
from tokenizers import Tokenizer

from ferrisres.format import Artifact, ArtifactError

from .gemma4 import Gemma4
from .generate import Generation
from .kv_cache import KVCache


class Model:
    """A loaded artifact: its config, tokenizer and Gemma 4 decoder over the memory-mapped weights."""

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.config = artifact.config
        self.student_config = self._json("student_config.json")
        self.generation_config = self._json("generation_config.json") if "generation_config.json" in artifact.documents else {}
        self.decoder = Gemma4(artifact)

    def _json(self, name: str) -> dict:
        try:
            value = json.loads(self.artifact.document(name))
        except ValueError:
            raise ArtifactError(f"{self.artifact.path}: document {name} is not valid JSON") from None
        if not isinstance(value, dict):
            raise ArtifactError(f"{self.artifact.path}: document {name} is not a JSON object")
        return value

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The checkpoint's `tokenizers` tokenizer (parsed on first use: it is tens of MB for Gemma)."""
        try:
            return Tokenizer.from_str(self.artifact.document("tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise ArtifactError(f"{self.artifact.path}: tokenizer.json cannot be loaded ({e})") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, starting with exactly one BOS (Gemma needs it; never doubled)."""
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        bos = self.config.bos_token_id
        while ids[:2] == [bos, bos]:
            ids = ids[1:]
        return ids if ids[:1] == [bos] else [bos, *ids]

    def forward(self, ids, cache: KVCache, last_only: bool = False) -> np.ndarray:
        return self.decoder.forward(self._checked(ids), cache, last_only)

    def logits(self, ids) -> np.ndarray:
        """float32 [T, vocab]: a full forward over `ids` with a fresh cache."""
        return self.forward(ids, KVCache(self.config))

    def generate(self, prompt: str | list[int], max_tokens: int = 256, temperature: float = 0.0,
                 seed: int = 0) -> Generation:
        """Iterator of (token id, text piece), stopping at an EOS id or after `max_tokens`.

        `prompt` is text (encoded with BOS) or token ids. Temperature 0 is greedy; `seed` makes sampling
        reproducible. The returned object also reports tokens, stop reason and timings.
        """
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return Generation(self, self._checked(ids).tolist(), max_tokens, temperature, seed,
                          frozenset(self.config.eos_token_ids))

    def _checked(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("no token ids to process")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids


def load(path: str | os.PathLike) -> Model:
    """Open and validate the artifact at `path`; weights stay on disk until used."""
    return Model(Artifact.open(path))
