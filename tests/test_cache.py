"""Rung 3: a KV-cached decode step computes exactly what a full recompute does, also far past the
sliding window (8 tokens in the tiny models), so the ring buffer and the shared-KV layers are exercised."""

import numpy as np
import pytest
from artifact_weights import float32_bound
from conftest import reference

from ferrisres.runtime import load
from ferrisres.runtime.kv_cache import SLACK, KVCache, SlidingLayerCache



@pytest.mark.parametrize("quant", ["ternary", "f32"])
@pytest.mark.parametrize("prompt_length", [3, 40])
def test_cached_decode_equals_full_recompute(converted, quant, prompt_length):
    model = load(converted("tiny_gemma4", quant))
    ids = reference("tiny_gemma4")["ids"][:prompt_length].tolist()
    rng = np.random.default_rng(0)
    cache = KVCache(model.config)
    logits = model.forward(ids, cache, last_only=True)
    differences = []
    for _ in range(30):  # sampled, so the sequence does not settle into one repeated token
        token = int(rng.choice(model.config.vocab_size, p=_softmax(logits[-1])))
        ids.append(token)
        logits = model.forward([token], cache, last_only=True)
        differences.append(float(np.abs(logits[-1] - model.logits(ids)[-1]).max()))
    assert len(ids) > 3 * model.config.sliding_window
    # two float32 runs that batch differently, each within the float32 bound of the exact logits
    assert max(differences) <= 2 * float32_bound(model, ids), differences


def test_prefill_in_pieces_equals_one_prefill(converted):
    """A multi-token step onto a non-empty cache (as a chat turn does), longer than the window."""
    model = load(converted("tiny_gemma4", "ternary"))
    ids = reference("tiny_gemma4")["ids"].tolist()
    cache = KVCache(model.config)
    first = model.forward(ids[:5], cache)
    second = model.forward(ids[5:], cache)
    # Different token counts take different BLAS kernels (summation orders): two float32 runs, each
    # within the float32 bound of the exact logits; a structural error would be orders of magnitude larger.
    atol = 2 * float32_bound(model, ids)
    np.testing.assert_allclose(np.concatenate([first, second]), model.logits(ids), rtol=0, atol=atol)


def test_prefill_runs_only_the_layers_that_write_the_cache_and_fills_it_as_a_forward_does(converted, monkeypatch):
    """`Model.prefill` (a long prompt's chunks but the last) skips the KV-shared layers and the head: the
    cache it leaves is exactly the one a forward leaves, so what follows computes the same numbers."""
    model = load(converted("tiny_gemma4", "ternary"))
    ids = reference("tiny_gemma4")["ids"].tolist()
    assert model.decoder.cache_layers == 5  # of 10 layers: its config.json shares the last 5 layers' keys
    by_forward, by_prefill = KVCache(model.config), KVCache(model.config)
    model.forward(ids[:21], by_forward, last_only=True)
    ran = []
    monkeypatch.setattr(model.decoder, "logits_of", lambda x: pytest.fail("prefill computed logits"))
    monkeypatch.setattr(model.decoder, "_layer_forward", lambda i, *a, _f=model.decoder._layer_forward: ran.append(i) or _f(i, *a))
    model.prefill(ids[:21], by_prefill)
    monkeypatch.undo()
    assert ran == list(range(model.decoder.cache_layers)) and by_prefill.length == 21
    np.testing.assert_array_equal(model.forward(ids[21:], by_prefill), model.forward(ids[21:], by_forward))


def test_sliding_cache_memory_is_bounded(converted):
    model = load(converted("tiny_gemma4", "ternary"))
    cache = KVCache(model.config)
    model.forward(list(range(5, 105)), cache)
    window = model.config.sliding_window
    sliding = [c for i, c in cache.layers.items() if not model.config.is_full(i)]
    assert sliding and all(c.keys.shape[0] == window + SLACK for c in sliding)
    assert cache.length == 100


def _softmax(z):
    p = np.exp(z.astype(np.float64) - z.max())
    return p / p.sum()


def test_sliding_ring_grows_with_the_tokens_and_keeps_the_window():
    """A wide window starts small and grows; every query still sees exactly its window, and empty slots
    hold zeros (attention weighs them 0, and 0 * NaN would poison the output)."""
    window = 100
    ring = SlidingLayerCache(window, 1, 2)
    keys = np.random.default_rng(0).standard_normal((460, 1, 2)).astype(np.float32)
    start = 0
    for count in [64, 1, 1, 30, 5, 1, 100, 1, 1, 150]:
        positions = np.arange(start, start + count)
        got_keys, got_values, got_positions = ring.update(keys[positions], keys[positions], positions)
        assert np.isfinite(got_values).all()
        last = positions[-1]
        visible = (got_positions >= 0) & (got_positions <= last) & (got_positions > last - window)
        order = np.argsort(got_positions[visible])
        assert got_positions[visible][order].tolist() == list(range(max(0, last - window + 1), last + 1))
        np.testing.assert_array_equal(got_keys[visible][order], keys[max(0, last - window + 1) : last + 1])
        start += count
    assert len(ring.keys) == window + SLACK
