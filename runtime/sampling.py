"""Next-token choice: repetition penalty, temperature, top-k, top-p (nucleus) and min-p, then a draw.

The order is the one Hugging Face transformers and llama.cpp use: penalties on the raw logits, then
temperature, then the truncations, each on the distribution the previous one left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. temperature 0 means greedy (the other fields are then ignored)."""

    temperature: float = 0.0
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1 = all
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one; 0 = none
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context; 1 = off
    seed: int = 0

    def __post_init__(self):
        # Upper bounds too: a top_k or seed of 10^23 is no int64, and 1e300 overflows the arithmetic.
        checks = (
            # below 1e-6 (but 0: greedy), logits / temperature overflow to infinity and the draw is NaN
            ("temperature", lambda v: v == 0 or 1e-6 <= v <= 1e6, "0 or in [1e-6, 1e6]"),
            ("top_k", lambda v: isinstance(v, int) and 0 <= v < 2**31, "an integer in [0, 2^31)"),
            ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
            ("min_p", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("repetition_penalty", lambda v: 1e-6 <= v <= 1e6, "in [1e-6, 1e6]"),
            ("seed", lambda v: isinstance(v, int) and 0 <= v < 2**64, "an integer in [0, 2^64)"),
        )
        for name, ok, expected in checks:
            value = getattr(self, name)
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not is_number or not ok(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be {expected}, got {str(value)[:40]}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, context: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it: seen tokens' positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or len(context) == 0:
        return logits
    logits = logits.copy()
    seen = np.unique(context)
    values = logits[seen]
    logits[seen] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def token_probabilities(logits: np.ndarray, params: SamplingParams, context: np.ndarray) -> np.ndarray:
    """float64 [vocab]: the distribution the next token is drawn from (zeros for excluded tokens)."""
    z = apply_repetition_penalty(logits.astype(np.float64), context, params.repetition_penalty)
    if params.greedy:
        p = np.zeros_like(z)
        p[int(np.argmax(z))] = 1.0
        return p
    z = z / params.temperature
    if 0 < params.top_k < len(z):
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        keep = cumulative - p[order] < params.top_p  # every token needed to reach top_p, at least one
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
    if params.min_p > 0:
        p = np.where(p >= params.min_p * p.max(), p, 0.0)
    return p / p.sum()


def sample(logits: np.ndarray, params: SamplingParams, context: np.ndarray, rng: np.random.Generator) -> int:
    """The next token id."""
    if not np.isfinite(logits).all():
        raise FloatingPointError("the model produced non-finite logits (NaN or Inf): the artifact's weights are broken")
    if params.greedy and params.repetition_penalty == 1.0:
        return int(np.argmax(logits))
    p = token_probabilities(logits, params, context)
    if params.greedy:
        return int(np.argmax(p))
    return int(rng.choice(len(p), p=p))
