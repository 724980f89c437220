"""Every Gemma 4 text variant, and LoRA: f32 artifacts of tiny E4B-, 26B-A4B- and 31B-structured models
against transformers (tests/fixtures/reference/VARIANTS.md), their ternary students running, and an
adapter merged before conversion against transformers + peft's merged model."""

import numpy as np
import pytest
from artifact_weights import dequantized_weights, float32_bound, oracle_tolerance
from conftest import FIXTURES, reference
from reference_forward import reference_logits

from ferrisres.convert.build import convert
from ferrisres.convert.student import Options
from ferrisres.runtime import load
from ferrisres.runtime.kv_cache import KVCache

VARIANTS = ("tiny_gemma4_e4b", "tiny_gemma4_26b", "tiny_gemma4_31b")


@pytest.mark.parametrize("checkpoint", VARIANTS)
def test_f32_artifact_matches_transformers(converted, checkpoint):
    model, ref = load(converted(checkpoint, "f32")), reference(checkpoint)
    atol = oracle_tolerance(model, ref)
    np.testing.assert_allclose(model.logits(ref["ids"]), ref["logits"], rtol=0, atol=atol)
    cache = KVCache(model.config)
    logits = model.forward(ref["ids"], cache, last_only=True)
    for step, (token, expected) in enumerate(zip(ref["greedy"], ref["greedy_logits"])):
        np.testing.assert_allclose(logits[-1], expected, rtol=0, atol=atol, err_msg=f"decode step {step}")
        logits = model.forward([token], cache, last_only=True)


def test_variant_structures_are_what_they_claim(converted):
    e4b, moe, dense31 = (load(converted(c, "f32")).config for c in VARIANTS)
    assert set(e4b.kv_heads) == {2} and not e4b.moe_block and len(set(e4b.intermediate_sizes)) == 1 and e4b.ple_dim
    assert moe.moe_block and moe.num_experts == 4 and moe.top_k_experts == 2 and moe.k_eq_v and not moe.ple_dim
    assert dense31.k_eq_v and not dense31.ple_dim and all(dense31.has_own_kv(i) for i in range(dense31.num_layers))


@pytest.mark.parametrize("checkpoint", VARIANTS)
def test_ternary_student_runs_and_equals_fake_quant_forward(converted, checkpoint):
    """Within the float32 bound of the runtime's products (with every product in float64 the runtime and
    the reference agree to 7e-7)."""
    model = load(converted(checkpoint, "ternary"))
    ids = reference(checkpoint)["ids"]
    expected = reference_logits(dequantized_weights(model.artifact), model.config, ids)
    np.testing.assert_allclose(model.logits(ids), expected, rtol=0, atol=float32_bound(model, ids))
    assert len([s for s in model.generate(ids.tolist(), max_tokens=8, temperature=0)]) >= 1


def test_native_moe_experts_are_ternarized_as_they_are(converted):
    model = load(converted("tiny_gemma4_26b", "ternary"))
    info = model.artifact.tensors["layers.0.experts.gate_up_proj"]
    assert info.encoding == "ternary-g2" and info.shape == (4, 64, 64) and info.stored_shape == (4, 64, 2, 16)
    assert model.artifact.tensors["layers.0.experts.gate_up_proj.weight_scale"].shape == (4, 64, 2, 1)
    assert model.artifact.tensors["layers.0.router.proj"].encoding == "f32"


@pytest.mark.parametrize("quant", ["f32", "ternary"])
def test_lora_merged_before_conversion_matches_peft(tmp_path, quant):
    ref = reference("tiny_gemma4_lora")
    out = tmp_path / "lora.tern"
    convert(FIXTURES / "tiny_gemma4", out, Options(quant=quant, lora=str(FIXTURES / "tiny_gemma4_lora")), progress=False)
    model = load(out)
    if quant == "f32":  # peft's merged model in float32 against ours: both within the float32 bound
        atol = 2 * float32_bound(model, ref["ids"])
        np.testing.assert_allclose(model.logits(ref["ids"]), ref["logits"], rtol=0, atol=atol)
    # the adapter really changed it: by far more than any float32 bound here (< 7e-3)
    assert np.abs(model.logits(ref["ids"]) - ref["base_logits"]).max() > 0.1
