"""Several sequences in one forward (`Gemma4.forward_batch`, what calibration runs) compute what each
computes alone: prefill and decode steps, sequences of equal and of different lengths."""

from __future__ import annotations

import numpy as np
import pytest
from artifact_weights import float32_bound

from ferrisres.runtime import load
from ferrisres.runtime.kv_cache import KVCache


@pytest.mark.parametrize("lengths", [(7, 7, 7), (5, 9, 1)], ids=["aligned", "ragged"])
def test_batched_forward_equals_one_sequence_at_a_time(converted, lengths):
    model = load(converted("tiny_gemma4", "f32"))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, model.config.vocab_size, n) for n in lengths]
    alone = [model.decoder.forward(p, KVCache(model.config)) for p in prompts]
    caches = [KVCache(model.config) for _ in prompts]
    batched = model.decoder.forward_batch(list(zip(prompts, caches)))
    # the same float32 products, summed over other batch shapes: within twice the float32 bound
    atol = 2 * max(float32_bound(model, p) for p in prompts)
    for a, b in zip(alone, batched):
        np.testing.assert_allclose(b, a, rtol=0, atol=atol)
    # then one decode step for all, on the caches the batch filled (positions 7, 7, 7 or 5, 9, 1)
    steps = [rng.integers(5, model.config.vocab_size, 1) for _ in prompts]
    stepped = model.decoder.forward_batch(list(zip(steps, caches)), last_only=True)
    for prompt, step, got in zip(prompts, steps, stepped):
        full = model.decoder.forward(np.concatenate([prompt, step]), KVCache(model.config))[-1:]
        np.testing.assert_allclose(got, full, rtol=0, atol=atol)
    assert [c.length for c in caches] == [n + 1 for n in lengths]
