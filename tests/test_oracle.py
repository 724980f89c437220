"""Rung 1: an unquantized f32 artifact computes what transformers' Gemma 4 computes (docs/design.md),
to within the float32 rounding of both (`artifact_weights.oracle_tolerance`)."""

import numpy as np
import pytest
from artifact_weights import oracle_tolerance
from conftest import CHECKPOINTS, reference

from ferrisres.runtime import load
from ferrisres.runtime.kv_cache import KVCache


@pytest.fixture(scope="module", params=CHECKPOINTS)
def case(request, converted):
    return load(converted(request.param, "f32")), reference(request.param)


def test_logits_match_transformers(case):
    model, ref = case
    logits = model.logits(ref["ids"])
    assert logits.dtype == np.float32 and logits.shape == ref["logits"].shape
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=oracle_tolerance(model, ref))


def test_cached_greedy_decode_matches_transformers(case):
    """Each decode step's logits, not just the argmax: the reference continuation may repeat tokens."""
    model, ref = case
    cache = KVCache(model.config)
    atol = oracle_tolerance(model, ref)
    logits = model.forward(ref["ids"], cache, last_only=True)
    for step, (token, expected) in enumerate(zip(ref["greedy"], ref["greedy_logits"])):
        np.testing.assert_allclose(logits[-1], expected, rtol=0, atol=atol, err_msg=f"decode step {step}")
        assert int(np.argmax(logits[-1])) == token
        logits = model.forward([token], cache, last_only=True)


def test_generate_greedy_continuation_is_identical(case):
    model, ref = case
    generation = model.generate(ref["ids"].tolist(), max_tokens=len(ref["greedy"]), temperature=0)
    assert [step.token for step in generation] == ref["greedy"].tolist()
    assert generation.stop_reason == "max_tokens"
