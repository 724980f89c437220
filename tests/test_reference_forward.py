"""The numpy reference forward (tests/reference_forward.py) against the transformers oracle fixtures.

For each tiny Gemma 4 fixture folder, the reference run on the checkpoint's own float32 (or bf16-widened)
weights must reproduce the oracle's logits, intermediates and greedy continuation in tests/fixtures/reference/.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from ferrisres.convert.hf_config import eos_token_ids, model_config, read_config
from ferrisres.format import FULL, SLIDING, ModelConfig, bf16_to_f32, weight_shapes
from reference_forward import float32_bounds, forward, reference_logits

FIXTURES = Path(__file__).parent / "fixtures"
NAMES = ["tiny_gemma4", "tiny_gemma4_bf16", "tiny_gemma4_mm"]
TEXT_PREFIXES = ("model.language_model.", "model.")  # Gemma4ForConditionalGeneration, Gemma4ForCausalLM


def read_safetensors_f32(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as float32 (F32 as is, BF16 widened exactly)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        buf, shape = data[start:end], info["shape"]
        if info["dtype"] == "F32":
            out[name] = np.frombuffer(buf, dtype="<f4").reshape(shape).copy()
        elif info["dtype"] == "BF16":
            out[name] = bf16_to_f32(np.frombuffer(buf, dtype="<u2")).reshape(shape)
        else:
            raise AssertionError(f"{path}: {name} has unexpected dtype {info['dtype']}")
    return out


def load_config(folder: Path) -> ModelConfig:
    text, _ = read_config(folder)
    generation = json.loads((folder / "generation_config.json").read_text())
    return model_config(text, eos_token_ids(text, generation))


def artifact_weights(folder: Path, config: ModelConfig) -> dict[str, np.ndarray]:
    """The checkpoint's text weights under artifact names, checked against weight_shapes(config)."""
    expected = weight_shapes(config)
    weights, ignored = {}, []
    for hf_name, array in read_safetensors_f32(folder / "model.safetensors").items():
        prefix = next((p for p in TEXT_PREFIXES if hf_name.startswith(p)), None)
        name = hf_name[len(prefix) :] if prefix else hf_name
        name = name.removesuffix(".weight")
        if name in expected:
            assert array.shape == expected[name], (name, array.shape, expected[name])
            weights[name] = array
        else:
            ignored.append(name)
    assert sorted(set(expected) - set(weights)) == []
    # the only text tensors left out are the unused k/v weights of KV-shared layers (as in the real E2B file)
    shared = {f"layers.{i}.self_attn.{t}" for i in range(config.num_layers) if not config.has_own_kv(i)
              for t in ("k_proj", "v_proj", "k_norm")}
    text_ignored = [n for n in ignored if n.startswith("layers.") or n in ("embed_tokens", "norm")]
    assert set(text_ignored) <= shared, sorted(set(text_ignored) - shared)
    return weights


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    folder = FIXTURES / request.param
    config = load_config(folder)
    ref = dict(np.load(FIXTURES / "reference" / f"{request.param}.npz"))
    return request.param, config, artifact_weights(folder, config), ref


@pytest.mark.parametrize("name", NAMES)
def test_fixture_config_resolves_as_expected(name):
    """The tiny fixtures' per-layer facts (the ModelConfig the reference is run with)."""
    c = load_config(FIXTURES / name)
    full = {4, 9}
    assert c.num_layers == 10 and c.hidden_size == 64 and c.num_heads == 2 and c.vocab_size == 512
    assert c.layer_types == tuple(FULL if i in full else SLIDING for i in range(10))
    assert c.head_dims == tuple(32 if i in full else 16 for i in range(10))
    assert c.kv_heads == (1,) * 10
    assert c.kv_sources == (0, 1, 2, 3, 4, 3, 3, 3, 3, 4)
    assert c.intermediate_sizes == (256,) * 5 + (512,) * 5
    assert c.sliding_window == 8 and c.ple_dim == 8 and c.final_logit_softcapping == 30.0
    assert c.rope[SLIDING].rope_type == "default" and c.rope[SLIDING].theta == 10000.0
    assert c.rope[FULL].rope_type == "proportional" and c.rope[FULL].partial_rotary_factor == 0.25
    assert c.rope[FULL].theta == 1e6 and not c.k_eq_v and c.eos_token_ids == (1,)


def test_logits_and_intermediates_match_oracle(case):
    name, config, weights, ref = case
    logits, inter = forward(weights, config, ref["ids"])
    assert logits.shape == ref["logits"].shape
    bounds = float32_bounds(weights, config, ref["ids"])
    # intermediates first: a failure names the first stage that drifts
    report = []
    for key in ["embeds", "ple_token", "ple"] + [f"layer_{i:02d}" for i in range(config.num_layers)] + ["final_norm"]:
        want = ref[f"inter_{key}"]
        diff = float(np.max(np.abs(inter[key] - want)))
        report.append(f"{key}: {diff:.2e} (bound {bounds[key]:.2e})")
        # the oracle's float32 products move each value by up to the bound, its elementwise float32
        # math (embedding scale, norms) by one rounding of the value: u |want| at most
        atol = bounds[key] + 2.0**-24 * float(np.max(np.abs(want)))
        assert diff <= atol, f"{name}: {key} differs by {diff} (bound {atol}); " + ", ".join(report)
    diff = float(np.max(np.abs(logits - ref["logits"])))
    print(f"{name}: max |logits diff| {diff:.3e}; " + ", ".join(report))
    assert diff <= bounds["logits"], f"{name}: logits differ by {diff}"
    assert np.array_equal(reference_logits(weights, config, ref["ids"]), logits)


def test_greedy_matches_oracle(case):
    name, config, weights, ref = case
    seq = [int(t) for t in ref["ids"]]
    atol = float32_bounds(weights, config, [*seq, *ref["greedy"][:-1]])["logits"]  # the oracle's float32
    out = []
    for step in range(len(ref["greedy"])):
        last = reference_logits(weights, config, seq)[-1]
        diff = float(np.max(np.abs(last - ref["greedy_logits"][step])))
        assert diff <= atol, f"{name}: greedy step {step} logits differ by {diff} (bound {atol})"
        out.append(int(np.argmax(last)))
        seq.append(out[-1])
    assert out == [int(t) for t in ref["greedy"]], f"{name}: greedy {out} != oracle {ref['greedy'].tolist()}"
