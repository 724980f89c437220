"""Sampling: what each knob does to the next-token distribution, and how bad values are refused.

Acceptance: top-k 1 is greedy; at temperature 1 the same seed gives the same text and another seed
another text; top-p keeps the smallest prefix of the sorted distribution whose mass reaches p and
renormalizes; min-p drops tokens with p < min_p x max p; the repetition penalty divides positive and
multiplies negative logits of tokens already seen (transformers' definition); temperature divides
the logits; invalid values raise ValueError naming the parameter, and ferrisres-run refuses them with
one line naming the flag and its range (exit 1, no traceback).

The distribution checks use hand-made logits whose probabilities are known exactly, with the
truncation points chosen well away from a tie, so the expected result does not depend on rounding.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from ferrisres.runtime import load
from ferrisres.runtime.sampling import SamplingParams, sample, token_probabilities

from conftest import run_tool

NO_CONTEXT = np.empty(0, dtype=np.int64)
# float64 softmax and renormalization of a handful of values: a few dozen roundings of 2^-53 at most
RTOL = 1e-12
ATOL = 1e-15  # a probability the filter removes must come back as 0, not as a float64 residue above this


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def logits_of(probs) -> np.ndarray:
    """Logits whose softmax is `probs` (float64, so the probabilities come back to ~1e-16)."""
    return np.log(np.asarray(probs, dtype=np.float64))


def expect(probs, kept) -> np.ndarray:
    """`probs` restricted to the indices `kept` and renormalized."""
    probs = np.asarray(probs, dtype=np.float64)
    out = np.zeros_like(probs)
    out[list(kept)] = probs[list(kept)]
    return out / out.sum()


# ---------------------------------------------------------------------------------------------------------
# top-k 1 is greedy


def test_top_k_1_is_greedy_for_random_logits_and_seeds():
    rng = np.random.default_rng(1234)
    for trial in range(300):
        vocab = int(rng.integers(2, 300))
        logits = (rng.standard_normal(vocab) * rng.uniform(0.01, 20)).astype(np.float32)
        temperature = float(rng.uniform(0.05, 5.0))
        params = SamplingParams(temperature=temperature, top_k=1, seed=trial)
        expected = int(np.argmax(logits))
        p = token_probabilities(logits, params, NO_CONTEXT)
        assert p[expected] == 1.0 and p.sum() == 1.0, (trial, p[expected])
        for draw_seed in range(3):
            token = sample(logits, params, NO_CONTEXT, np.random.default_rng(1000 * trial + draw_seed))
            assert token == expected, (trial, draw_seed, token, expected)


def test_top_k_1_generation_equals_greedy_generation(converted):
    model = load(converted("tiny_gemma4", "ternary"))
    greedy = [s.token for s in model.generate("Hello world", max_tokens=20, temperature=0.0)]
    for seed in (0, 1, 2):
        top1 = [s.token for s in model.generate("Hello world", max_tokens=20, temperature=1.0, top_k=1, seed=seed)]
        assert top1 == greedy, seed


# ---------------------------------------------------------------------------------------------------------
# seeds


def test_same_seed_same_text_other_seed_other_text(converted):
    model = load(converted("tiny_gemma4", "ternary"))

    def run(seed: int) -> tuple[list[int], str]:
        g = model.generate("Hello", max_tokens=20, temperature=1.0, seed=seed)
        tokens = [s.token for s in g]
        assert len(tokens) == 20, g.stop_reason
        return tokens, g.text

    first = run(0)
    assert run(0) == first, "the same seed must give the same tokens and text"
    assert run(0) == first
    for other in (1, 2):
        tokens, text = run(other)
        assert tokens != first[0], f"seed {other} gave the same tokens as seed 0"
        assert text != first[1], f"seed {other} gave the same text as seed 0"


def test_seeded_draws_follow_the_distribution():
    """sample() draws from token_probabilities(): never an excluded token, and every kept one shows up."""
    probs = [0.1, 0.4, 0.05, 0.3, 0.15]
    params = SamplingParams(temperature=1.0, top_p=0.8)  # keeps 0.4, 0.3, 0.15
    drawn = {sample(logits_of(probs), params, NO_CONTEXT, np.random.default_rng(seed)) for seed in range(300)}
    assert drawn == {1, 3, 4}


# ---------------------------------------------------------------------------------------------------------
# top-p


# Sorted: 0.4 (index 1), 0.3 (index 3), 0.2 (index 0), 0.1 (index 2); cumulative 0.4, 0.7, 0.9, 1.0.
TOP_P_PROBS = [0.2, 0.4, 0.1, 0.3]


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.35, {1}),  # 0.4 alone reaches 0.35
        (0.4 - 1e-6, {1}),
        (0.5, {1, 3}),  # 0.4 < 0.5, 0.7 >= 0.5
        (0.65, {1, 3}),
        (0.75, {1, 3, 0}),  # 0.7 < 0.75, 0.9 >= 0.75
        (0.85, {1, 3, 0}),
        (0.95, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_smallest_prefix_reaching_p_and_renormalizes(top_p, kept):
    p = token_probabilities(logits_of(TOP_P_PROBS), SamplingParams(temperature=1.0, top_p=top_p), NO_CONTEXT)
    np.testing.assert_allclose(p, expect(TOP_P_PROBS, kept), rtol=RTOL, atol=ATOL)
    assert set(np.flatnonzero(p)) == kept
    assert math.isclose(p.sum(), 1.0, rel_tol=RTOL)


def test_top_p_hand_computed_values():
    # Written out by hand: top_p 0.75 keeps 0.4, 0.3, 0.2 (sum 0.9) -> 4/9, 3/9, 2/9.
    p = token_probabilities(logits_of(TOP_P_PROBS), SamplingParams(temperature=1.0, top_p=0.75), NO_CONTEXT)
    np.testing.assert_allclose(p, [2 / 9, 4 / 9, 0.0, 3 / 9], rtol=RTOL, atol=ATOL)


def test_top_p_applies_to_the_tempered_distribution():
    """Temperature comes first: flattening the distribution lets more tokens into the nucleus."""
    probs = [0.6, 0.3, 0.1]
    at_1 = token_probabilities(logits_of(probs), SamplingParams(temperature=1.0, top_p=0.6), NO_CONTEXT)
    np.testing.assert_allclose(at_1, [1.0, 0.0, 0.0], atol=ATOL)
    # at temperature 2: p ~ sqrt(probs) = [0.4727, 0.3343, 0.1930]; 0.4727 < 0.6 <= 0.8070 -> two tokens
    tempered = softmax(logits_of(probs) / 2.0)
    at_2 = token_probabilities(logits_of(probs), SamplingParams(temperature=2.0, top_p=0.6), NO_CONTEXT)
    np.testing.assert_allclose(at_2, expect(tempered, {0, 1}), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------
# min-p


MIN_P_PROBS = [0.15, 0.05, 0.5, 0.1, 0.2]


@pytest.mark.parametrize(
    "min_p, kept",
    [
        (0.05, {0, 1, 2, 3, 4}),  # threshold 0.025: all stay
        (0.15, {0, 2, 3, 4}),  # threshold 0.075: 0.05 goes
        (0.25, {0, 2, 4}),  # threshold 0.125: 0.1 and 0.05 go
        (0.35, {2, 4}),  # threshold 0.175
        (0.5, {2}),  # threshold 0.25: only the top token
    ],
)
def test_min_p_drops_tokens_below_min_p_times_max(min_p, kept):
    p = token_probabilities(logits_of(MIN_P_PROBS), SamplingParams(temperature=1.0, min_p=min_p), NO_CONTEXT)
    np.testing.assert_allclose(p, expect(MIN_P_PROBS, kept), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------
# repetition penalty and temperature


def test_repetition_penalty_divides_positive_multiplies_negative_seen_logits():
    logits = np.array([2.0, -1.0, 0.5, -0.5, 1.0, 0.0], dtype=np.float32)
    context = np.array([0, 1, 1, 5, 0], dtype=np.int64)  # seen: 0 (positive), 1 (negative, twice), 5 (zero)
    p = token_probabilities(logits, SamplingParams(temperature=1.0, repetition_penalty=2.0), context)
    penalized = [2.0 / 2, -1.0 * 2, 0.5, -0.5, 1.0, 0.0 * 2]  # seen counted once, whatever how often
    np.testing.assert_allclose(p, softmax(penalized), rtol=RTOL, atol=ATOL)

    p = token_probabilities(logits, SamplingParams(temperature=1.0, repetition_penalty=0.5), context)
    np.testing.assert_allclose(p, softmax([4.0, -0.5, 0.5, -0.5, 1.0, 0.0]), rtol=RTOL, atol=ATOL)


def test_repetition_penalty_then_temperature():
    logits = np.array([3.0, -2.0, 1.0], dtype=np.float32)
    p = token_probabilities(logits, SamplingParams(temperature=0.5, repetition_penalty=1.5), np.array([0, 1]))
    np.testing.assert_allclose(p, softmax(np.array([3.0 / 1.5, -2.0 * 1.5, 1.0]) / 0.5), rtol=RTOL, atol=ATOL)


def test_repetition_penalty_applies_to_greedy_choice():
    logits = np.array([2.0, 1.5, -4.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, SamplingParams(), np.array([0]), rng) == 0
    # token 0 seen: 2.0 / 2 = 1.0 < 1.5 -> token 1
    assert sample(logits, SamplingParams(repetition_penalty=2.0), np.array([0]), rng) == 1
    assert sample(logits, SamplingParams(repetition_penalty=2.0), np.array([2]), rng) == 0


def test_repetition_penalty_leaves_unseen_tokens_alone():
    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    p = token_probabilities(logits, SamplingParams(temperature=1.0, repetition_penalty=3.0), NO_CONTEXT)
    np.testing.assert_allclose(p, softmax(logits), rtol=RTOL)


@pytest.mark.parametrize("temperature", [0.25, 0.7, 1.0, 3.0])
def test_temperature_divides_logits(temperature):
    logits = np.array([1.5, -0.25, 0.0, 2.75, -3.0], dtype=np.float32)
    p = token_probabilities(logits, SamplingParams(temperature=temperature), NO_CONTEXT)
    np.testing.assert_allclose(p, softmax(logits.astype(np.float64) / temperature), rtol=RTOL, atol=ATOL)


def test_temperature_zero_is_greedy():
    logits = np.array([0.1, 0.3, 0.2], dtype=np.float32)
    p = token_probabilities(logits, SamplingParams(temperature=0.0), NO_CONTEXT)
    assert p.tolist() == [0.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------------------
# invalid values


INVALID = [
    ("temperature", -1.0),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", float("nan")),
    ("min_p", 1.0),
    ("min_p", -0.1),
    ("min_p", float("nan")),
    ("top_k", -1),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", float("nan")),
    ("seed", -1),  # numpy's generator refuses negative seeds
]


@pytest.mark.parametrize("name, value", INVALID)
def test_invalid_parameter_raises_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


# flag, value, the range the message must state
INVALID_FLAGS = [
    ("--temperature", "-1", "0 or in [1e-6, 1e6]"),
    ("--temperature", "nan", "0 or in [1e-6, 1e6]"),
    ("--top-p", "0", "(0, 1]"),
    ("--top-p", "1.5", "(0, 1]"),
    ("--min-p", "1", "[0, 1)"),
    ("--top-k", "-1", "[0, 2^31)"),
    ("--repetition-penalty", "0", "[1e-6, 1e6]"),
    ("--seed", "-1", "[0, 2^64)"),
]


@pytest.mark.parametrize("flag, value, expected_range", INVALID_FLAGS)
def test_run_rejects_invalid_sampling_flag(converted, flag, value, expected_range):
    result = run_tool("ferrisres-run", str(converted("tiny_gemma4", "ternary")), "-p", "Hello", flag, value, "-n", "4")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {result.stderr!r}"
    assert lines[0].startswith("ferrisres-run: error: "), lines[0]
    assert re.search(re.escape(flag) + r"\b", lines[0]), f"{flag} not named in {lines[0]!r}"
    assert expected_range in lines[0], f"range {expected_range!r} not stated in {lines[0]!r}"
    assert result.stdout == "", result.stdout
