"""The speed paths compute exactly what the plain greedy path computes: speculative decoding with
prompt-lookup drafts, rows split over threads, and the KV-shared prefill shortcut."""

import itertools

import numpy as np
import pytest
from artifact_weights import float32_bound
from conftest import reference

from ferrisres.runtime import load, set_threads
from ferrisres.runtime.kv_cache import KVCache


def copy_heavy_prompt(model) -> list[int]:
    """A prompt that repeats itself, so its continuation keeps matching earlier n-grams."""
    rng = np.random.default_rng(3)
    phrase = rng.integers(5, model.config.vocab_size, 12).tolist()
    return [model.config.bos_token_id, *phrase, *phrase, *phrase]


@pytest.mark.parametrize("checkpoint,quant", [("tiny_gemma4", "ternary"), ("tiny_gemma4", "f32"), ("tiny_gemma4_26b", "ternary")])
def test_speculative_decoding_gives_the_greedy_text(converted, checkpoint, quant):
    model = load(converted(checkpoint, quant))
    prompt = copy_heavy_prompt(model)
    plain = model.generate(prompt, max_tokens=40, temperature=0)
    drafted = model.generate(prompt, max_tokens=40, temperature=0, draft="ngram")
    assert [s.token for s in drafted] == [s.token for s in plain]
    assert drafted.text == plain.text and drafted.stop_reason == plain.stop_reason
    assert drafted.drafted > 0 and drafted.accepted > 0  # the path under test really ran


def test_speculative_decoding_leaves_the_cache_as_plain_decoding_does(converted):
    """After rejected drafts are taken back, the cache holds exactly the accepted tokens."""
    model = load(converted("tiny_gemma4", "ternary"))
    generation = model.generate(copy_heavy_prompt(model), max_tokens=30, temperature=0, draft="ngram")
    lookup, rounds = generation._drafts, itertools.count()

    def every_other_last_draft_wrong(token):  # rejections, whatever the BLAS kernel's rounding makes greedy pick
        drafts = lookup(token)
        if drafts and next(rounds) % 2 == 0:
            drafts[-1] = (drafts[-1] + 1) % model.config.vocab_size
        return drafts

    generation._drafts = every_other_last_draft_wrong
    steps = list(generation)
    assert generation.accepted < generation.drafted  # some drafts were rejected and taken back
    ids = generation.context
    assert ids == [*generation.prompt_ids, *[s.token for s in steps][: len(ids) - len(generation.prompt_ids)]]
    next_logits = model.forward([steps[-1].token], generation.cache, last_only=True)
    full = [*ids, steps[-1].token]
    atol = 2 * float32_bound(model, full)  # cached and full: two float32 runs, each within the bound
    np.testing.assert_allclose(next_logits[-1], model.logits(full)[-1], rtol=0, atol=atol)


def test_draft_needs_greedy_decoding(converted):
    model = load(converted("tiny_gemma4", "ternary"))
    with pytest.raises(ValueError, match="temperature 0"):
        model.generate("Hello", max_tokens=4, temperature=0.7, draft="ngram")


def test_rows_split_over_threads_give_the_same_text(converted):
    model = load(converted("tiny_gemma4", "ternary"))
    prompt = reference("tiny_gemma4")["ids"].tolist()
    tokens = [s.token for s in model.generate(prompt, max_tokens=24, temperature=0)]
    logits = model.logits(prompt)
    try:
        set_threads(2)
        assert [s.token for s in model.generate(prompt, max_tokens=24, temperature=0)] == tokens
        np.testing.assert_array_equal(model.logits(prompt), logits)  # each row is computed the same way
    finally:
        set_threads(1)


def test_prefill_shortcut_equals_the_full_last_position(converted):
    """last_only prefill skips all but the last position from the first KV-shared layer on."""
    model = load(converted("tiny_gemma4", "ternary"))
    ids = reference("tiny_gemma4")["ids"]
    assert model.decoder.first_shared_layer == 5
    last = model.forward(ids, KVCache(model.config), last_only=True)
    atol = 2 * float32_bound(model, ids)  # shortcut and full: two float32 runs, each within the bound
    np.testing.assert_allclose(last[-1], model.logits(ids)[-1], rtol=0, atol=atol)


def test_resident_int8_cache_gives_the_same_logits(converted):
    path = converted("tiny_gemma4", "ternary")
    ids = reference("tiny_gemma4")["ids"]
    cached = load(path, cache="int8")
    assert all(linear.encoding != "ternary" for linear in cached.weights.linears())
    np.testing.assert_array_equal(cached.logits(ids), load(path).logits(ids))
