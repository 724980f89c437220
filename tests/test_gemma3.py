"""Gemma 3, built from the same decoder: tiny checkpoints against transformers' Gemma3ForCausalLM, and
the real Gemma 3 270M (a llama.cpp GGUF) against transformers run on the same dequantized weights."""

import numpy as np
import pytest
from artifact_weights import oracle_tolerance
from conftest import GEMMA3_GGUF, GEMMA3_MISSING, ROOT, reference

from ferrisres.convert.build import convert
from ferrisres.convert.student import Options
from ferrisres.runtime import load
from ferrisres.runtime.kv_cache import KVCache



@pytest.mark.parametrize("checkpoint", ["tiny_gemma3", "tiny_gemma3_scaled"])
def test_f32_artifact_matches_transformers(converted, checkpoint):
    """tiny_gemma3_scaled adds linear RoPE scaling on full layers, a final soft-cap and an attention soft-cap
    (its reference applies that soft-cap as Gemma 2 defines it: transformers 5.24 stores but skips it)."""
    model, ref = load(converted(checkpoint, "f32")), reference(checkpoint)
    assert model.config.architecture == "gemma3_text" and not model.config.value_norm
    atol = oracle_tolerance(model, ref)
    np.testing.assert_allclose(model.logits(ref["ids"]), ref["logits"], rtol=0, atol=atol)
    cache = KVCache(model.config)
    logits = model.forward(ref["ids"], cache, last_only=True)
    for step, (token, expected) in enumerate(zip(ref["greedy"], ref["greedy_logits"])):
        np.testing.assert_allclose(logits[-1], expected, rtol=0, atol=atol, err_msg=f"decode step {step}")
        logits = model.forward([token], cache, last_only=True)


def test_ternary_gemma3_student_runs(converted):
    model = load(converted("tiny_gemma3", "ternary"))
    generation = model.generate(reference("tiny_gemma3")["ids"].tolist(), max_tokens=8, temperature=0)
    assert len(list(generation)) == 8 and generation.stop_reason == "max_tokens"


@pytest.fixture(scope="module")
def gemma3_270m(tmp_path_factory):
    if not GEMMA3_GGUF.is_file():
        pytest.skip(GEMMA3_MISSING)
    out = tmp_path_factory.mktemp("gemma3") / "gemma3-270m-f32.tern"
    convert(GEMMA3_GGUF, out, Options(quant="f32"), progress=False)
    return load(out), np.load(ROOT / "tests/fixtures/reference/gemma3_270m.npz")


@pytest.mark.parametrize("prompt", range(4))
def test_real_gemma3_greedy_equals_transformers(gemma3_270m, prompt):
    model, ref = gemma3_270m
    ids = ref[f"prompt{prompt}_ids"].tolist()
    generation = model.generate(ids, max_tokens=20, temperature=0)
    assert [s.token for s in generation] == ref[f"prompt{prompt}_greedy"].tolist(), model.tokenizer.decode(generation.tokens)


def test_real_gemma3_perplexity_within_one_percent(gemma3_270m):
    model, ref = gemma3_270m
    ids = ref["report_ids"].tolist()
    assert model.encode((ROOT / "bench/report_text.txt").read_text(encoding="utf-8")) == ids  # same tokenizer
    hidden = []
    model.decoder.forward(np.asarray(ids), KVCache(model.config), last_only=True, hidden_states=hidden)
    nll = 0.0
    for start in range(0, len(ids) - 1, 256):
        logits = model.decoder.logits_of(hidden[-1][start : min(start + 256, len(ids) - 1)]).astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(logp)), ids[start + 1 : start + 1 + len(logp)]].sum()
    perplexity = np.exp(nll / (len(ids) - 1))
    # float32 logits within ~1e-3 of transformers' move the mean log-likelihood by ~1e-3, 0.1% of perplexity
    assert abs(perplexity / float(ref["perplexity"]) - 1) < 0.01, (perplexity, float(ref["perplexity"]))
