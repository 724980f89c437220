"""The student's options (docs/design.md: the student, and the correctness ladder's rungs 2-5): MoE expansion, Block AttnRes, seeds,
Gemma 4's own MoE block, and the option combinations the converter must refuse.

Every artifact is made through `ferrisres.convert.build.convert` (or the `ferrisres-convert` console
script) and run through `ferrisres.runtime.load`; the independent float64 reference is
tests/reference_forward.py on the artifact's dequantized weights.

Every comparison of a float32 run with the exact reference is held to the float32 bound of that model
and prompt (tests/reference_forward.py, `float32_bounds`); two float32 runs that batch differently to
twice it. A real error (a wrong routing, a wrong prefix mean) moves the logits by > 0.1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from artifact_weights import dequantized_weights, float32_bound, oracle_tolerance
from conftest import FIXTURES, PER_ROW, reference, run_tool
from reference_forward import reference_logits

from ferrisres.convert.build import convert
from ferrisres.convert.errors import ConversionError
from ferrisres.convert.student import Options
from ferrisres.format.schema import SCALE_SUFFIX
from ferrisres.runtime import load
from ferrisres.runtime.kv_cache import KVCache

NOISE = 0.5  # MoE noise for the runtime-vs-reference cases: large, so the experts (and the routing) really differ
CHANGED = 0.1  # how far an option that is on must move the logits: > 10x the largest float32 bound here (7e-3)
EXPERTS_TOP_K = [(2, 1), (2, 2), (4, 1), (4, 2)]
MLP = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def student(tmp_path_factory):
    """student(checkpoint="tiny_gemma4", **options) -> artifact path, converted once per session."""
    folder = tmp_path_factory.mktemp("student_options")
    cache: dict[tuple, Path] = {}

    def get(checkpoint: str | Path = "tiny_gemma4", **options) -> Path:
        source = checkpoint if isinstance(checkpoint, Path) else FIXTURES / checkpoint
        key = (str(source), tuple(sorted(options.items())))
        if key not in cache:
            out = folder / f"{len(cache):03d}-{source.name}.tern"
            convert(source, out, Options(**options), progress=False)
            cache[key] = out
        return cache[key]

    return get


def ids() -> np.ndarray:
    return reference("tiny_gemma4")["ids"]  # 40 tokens, 5 sliding windows


def assert_close(got, want, model, prompt, what: str) -> None:
    """Two float32 runs of `model` on `prompt`: each within the float32 bound of the exact logits."""
    diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
    bound = float32_bound(model, prompt)
    assert diff <= 2 * bound, f"{what}: {diff:.3g} > 2 x the float32 bound {bound:.3g}"


def assert_runtime_equals_reference(model, weights=None, prompt=None) -> np.ndarray:
    """Rung 2: the runtime's logits equal the float64 reference's on the same (dequantized) weights."""
    weights = dequantized_weights(model.artifact) if weights is None else weights
    prompt = ids() if prompt is None else prompt
    got = model.logits(prompt)
    diff = float(np.abs(got - reference_logits(weights, model.config, prompt)).max())
    bound = float32_bound(model, prompt)
    assert diff <= bound, f"runtime vs reference: {diff:.3g} > the float32 bound {bound:.3g}"
    return got


def assert_cached_decode_equals_recompute(model, prompt_length: int = 3, steps: int = 25) -> None:
    """Rung 3: prefill a short prompt, then sample `steps` tokens one at a time through the KV cache (past
    the sliding window); every step's logits must equal the same position of one full recompute (causal,
    so row p of a forward over the whole sequence is the recompute of its first p + 1 tokens)."""
    seq = ids()[:prompt_length].tolist()
    rng = np.random.default_rng(0)
    cache = KVCache(model.config)
    cached = [model.forward(seq, cache, last_only=True)[-1]]
    for _ in range(steps):
        z = cached[-1].astype(np.float64)
        p = np.exp(z - z.max())
        seq.append(int(rng.choice(len(p), p=p / p.sum())))  # sampled: no collapse into one repeated token
        cached.append(model.forward(seq[-1:], cache, last_only=True)[-1])
    assert len(seq) > model.config.sliding_window + 4  # the ring buffers wrap
    full = model.logits(seq)
    assert_close(np.array(cached), full[prompt_length - 1 :], model, seq, "cached decode vs recompute")


# -- MoE expansion ------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts,top_k", EXPERTS_TOP_K)
def test_moe_without_noise_equals_dense(student, experts, top_k):
    """Rung 4: with noise 0 every expert is the dense MLP, so routing cannot change the output. (Rounded
    to nearest: calibrated, each expert would be fit to the tokens routed to it.)"""
    dense = load(student(method="rtn"))
    moe = load(student(method="rtn", moe_experts=experts, moe_top_k=top_k, moe_noise=0.0))
    assert (moe.config.mlp_experts, moe.config.mlp_top_k) == (experts, top_k)
    assert moe.student_config["moe"] == {"experts": experts, "top_k": top_k, "noise": 0.0, "seed": 0}
    for i in range(moe.config.num_layers):
        for e in range(experts):
            for proj in MLP:
                for suffix in ("", SCALE_SUFFIX):
                    assert np.array_equal(moe.artifact.tensor(f"layers.{i}.mlp.experts.{e}.{proj}{suffix}"),
                                          dense.artifact.tensor(f"layers.{i}.mlp.{proj}{suffix}"))
    assert_close(moe.logits(ids()), dense.logits(ids()), dense, ids(), "MoE without noise vs dense")
    # the reference's MoE code agrees too: identical experts, weights summing to 1
    reference_dense = reference_logits(dequantized_weights(dense.artifact), dense.config, ids())
    reference_moe = reference_logits(dequantized_weights(moe.artifact), moe.config, ids())
    # float64 sums in another order: |logits| < 30 times 2^-53 per operation, ~1e-14; 1e-9 is far above it
    np.testing.assert_allclose(reference_moe, reference_dense, rtol=0, atol=1e-9)


@pytest.mark.parametrize("experts,top_k", EXPERTS_TOP_K)
def test_moe_student_runtime_equals_reference_and_cached_decode(student, experts, top_k):
    """Rungs 2 and 3 for a MoE student whose experts really differ."""
    model = load(student(moe_experts=experts, moe_top_k=top_k, moe_noise=NOISE))
    got = assert_runtime_equals_reference(model)
    assert_cached_decode_equals_recompute(model)
    # guard: the experts (hence the routing) matter
    dense = load(student()).logits(ids())
    assert np.abs(got - dense).max() > CHANGED
    codes = [model.artifact.tensor(f"layers.0.mlp.experts.{e}.gate_proj") for e in range(experts)]
    assert all(np.mean(codes[0] != c) > 0.2 for c in codes[1:])


def test_moe_top_k_changes_the_output(student):
    """Guards the top-k selection: with 4 distinct experts, top-1 and top-2 are different models."""
    top1 = load(student(moe_experts=4, moe_top_k=1, moe_noise=NOISE)).logits(ids())
    top2 = load(student(moe_experts=4, moe_top_k=2, moe_noise=NOISE)).logits(ids())
    assert np.abs(top1 - top2).max() > CHANGED


def test_same_seed_gives_byte_identical_artifact(tmp_path):
    """Rung 5 with the seeded parts (expert noise, router init, calibration text), every expert calibrated."""
    options = Options(moe_experts=2, moe_top_k=1, moe_noise=NOISE, seed=7, attnres=True)
    outputs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        convert(FIXTURES / "tiny_gemma4", tmp_path / name / "model.tern", options, progress=False)
        outputs.append((tmp_path / name / "model.tern").read_bytes())
    assert outputs[0] == outputs[1]


def test_different_seed_gives_different_experts_but_expert_0_is_dense(student):
    dense = load(student(method="rtn"))
    seeds = [load(student(method="rtn", moe_experts=4, moe_top_k=2, moe_noise=NOISE, seed=s)) for s in (0, 1)]
    for i in range(dense.config.num_layers):
        for proj in MLP:
            name = f"layers.{i}.mlp.experts.{{}}.{proj}"
            for model in seeds:
                for suffix in ("", SCALE_SUFFIX):
                    assert np.array_equal(model.artifact.tensor(name.format(0) + suffix),
                                          dense.artifact.tensor(f"layers.{i}.mlp.{proj}{suffix}")), (i, proj)
            for e in (1, 2, 3):
                a, b = (m.artifact.tensor(name.format(e)) for m in seeds)
                assert not np.array_equal(a, b), (i, proj, e)
        routers = [m.artifact.tensor(f"layers.{i}.mlp.router") for m in seeds]
        assert routers[0].dtype == np.float32 and not np.array_equal(*routers)
    assert seeds[1].student_config["moe"]["seed"] == 1


def test_expert_noise_is_relative_to_the_tensor_rms(student):
    """In an f32 artifact the experts are the dense weights plus noise of moe_noise x RMS, expert 0 exact."""
    dense = load(student(quant="f32"))
    moe = load(student(quant="f32", moe_experts=3, moe_top_k=2, moe_noise=0.1, seed=3))
    for i in (0, 9):
        for proj in MLP:
            w = dense.artifact.tensor(f"layers.{i}.mlp.{proj}")
            assert np.array_equal(moe.artifact.tensor(f"layers.{i}.mlp.experts.0.{proj}"), w)
            rms = np.sqrt(np.mean(np.square(w, dtype=np.float64)))
            noises = [moe.artifact.tensor(f"layers.{i}.mlp.experts.{e}.{proj}") - w for e in (1, 2)]
            # n >= 16384 Gaussian draws: the sample RMS is within 0.1 / sqrt(2n) <= 6e-4 (1 sigma) of 0.1 and
            # the mean within 0.1 rms / sqrt(n) <= 8e-4 rms; 0.01 is > 12 sigma; the correlation of two
            # independent draws has sigma 1 / sqrt(n) <= 8e-3, 0.05 is > 6 sigma
            for noise in noises:
                assert abs(np.sqrt(np.mean(np.square(noise, dtype=np.float64))) / rms - 0.1) < 0.01
                assert abs(np.mean(noise)) < 0.01 * rms
            assert abs(np.corrcoef(noises[0].ravel(), noises[1].ravel())[0, 1]) < 0.05  # independent draws
    # and the router starts near uniform
    router = moe.artifact.tensor("layers.0.mlp.router")
    assert router.shape == (3, moe.config.hidden_size)
    logits = router @ np.ones(moe.config.hidden_size, dtype=np.float32)
    assert np.abs(logits).max() < 0.5


# -- Block AttnRes ------------------------------------------------------------------------------------


def test_attnres_blocks_end_at_full_attention_layers(student):
    model = load(student(method="rtn", attnres=True, attnres_gate=1.0))
    assert model.config.attnres and model.config.attnres_blocks() == [range(0, 5), range(5, 10)]
    assert np.array_equal(model.artifact.tensor("attnres_gates"), np.ones(2, dtype=np.float32))
    assert model.student_config["attnres"] == {"gate": 1.0}


def test_attnres_gate_0_matches_transformers_and_equals_no_attnres(student):
    """Rungs 1 and 4: gate 0 adds exactly nothing."""
    oracle = reference("tiny_gemma4")
    plain = load(student(quant="f32"))
    gated = load(student(quant="f32", attnres=True, attnres_gate=0.0))
    assert gated.config.attnres and "attnres_gates" in gated.artifact.tensors
    got = gated.logits(oracle["ids"])
    np.testing.assert_allclose(got, oracle["logits"], rtol=0, atol=oracle_tolerance(gated, oracle))
    assert np.array_equal(got, plain.logits(oracle["ids"]))
    # greedy continuation through the KV cache, as transformers'
    seq, cache, greedy = oracle["ids"].tolist(), KVCache(gated.config), []
    logits = gated.forward(seq, cache, last_only=True)
    for _ in range(len(oracle["greedy"])):
        greedy.append(int(np.argmax(logits[-1])))
        logits = gated.forward(greedy[-1:], cache, last_only=True)
    assert greedy == oracle["greedy"].tolist()
    # the reference agrees: its AttnRes term with gate 0 is exactly zero
    weights = dequantized_weights(gated.artifact)
    assert np.array_equal(reference_logits(weights, gated.config, oracle["ids"]),
                          reference_logits(dequantized_weights(plain.artifact), plain.config, oracle["ids"]))


@pytest.mark.parametrize("quant", ["ternary", "f32"])
def test_attnres_gate_1_runtime_equals_reference_and_cached_decode(student, quant):
    """Rungs 2 and 3 with the AttnRes term on (FerrisRes's ungated form)."""
    method = {"method": "rtn"} if quant == "ternary" else {}  # calibration runs AttnRes students only with gate 0
    model = load(student(quant=quant, attnres=True, attnres_gate=1.0, **method))
    got = assert_runtime_equals_reference(model)
    assert_cached_decode_equals_recompute(model)
    # ...and it is really on
    assert np.abs(got - load(student(quant=quant, attnres=True, attnres_gate=0.0, **method)).logits(ids())).max() > CHANGED


def test_attnres_prefill_in_pieces_equals_one_prefill(student):
    """A multi-token step onto a non-empty cache (a chat turn) continues the AttnRes prefix sums."""
    model = load(student(method="rtn", attnres=True, attnres_gate=1.0))
    cache = KVCache(model.config)
    pieces = [model.forward(ids()[:5], cache), model.forward(ids()[5:17], cache), model.forward(ids()[17:], cache)]
    assert_close(np.concatenate(pieces), model.logits(ids()), model, ids(), "prefill in pieces vs one prefill")


def test_attnres_prefill_without_logits_still_runs_every_layer(student):
    """AttnRes's running sums (in the cache) take every layer's output, so a prefill that computes no
    logits cannot skip the KV-shared layers: it leaves exactly the cache a forward leaves."""
    model = load(student(method="rtn", attnres=True, attnres_gate=1.0))
    assert model.decoder.cache_layers == model.config.num_layers
    by_forward, by_prefill = KVCache(model.config), KVCache(model.config)
    model.forward(ids()[:11], by_forward, last_only=True)
    model.prefill(ids()[:11], by_prefill)
    np.testing.assert_array_equal(by_prefill.attnres_sums, by_forward.attnres_sums)
    np.testing.assert_array_equal(model.forward(ids()[11:], by_prefill), model.forward(ids()[11:], by_forward))


@pytest.mark.parametrize("gates", [(0.0, 1.0), (1.0, 0.0), (0.5, -2.0)])
def test_attnres_gates_are_per_block(student, tmp_path, gates):
    """The converter writes one value for every block; an artifact with different gates per block
    (set here in a copy, digest updated) must apply gate b at the end of block b, as the reference does."""
    import shutil

    import h5py

    from ferrisres.format.spec import DIGEST_ATTR, TENSOR_GROUP, digest

    path = tmp_path / "gates.tern"
    shutil.copy(student(method="rtn", attnres=True, attnres_gate=1.0), path)
    values = np.array(gates, dtype=np.float32)
    with h5py.File(path, "r+") as f:
        dataset = f[TENSOR_GROUP]["attnres_gates"]
        dataset[...] = values
        dataset.attrs[DIGEST_ATTR] = digest(values)
    model = load(path)
    assert np.array_equal(model.artifact.tensor("attnres_gates"), values) and model.artifact.verify() == []
    got = assert_runtime_equals_reference(model)
    assert_cached_decode_equals_recompute(model, steps=12)
    both = load(student(method="rtn", attnres=True, attnres_gate=1.0)).logits(ids())
    assert np.abs(got - both).max() > CHANGED


def test_attnres_with_moe(student):
    """Both additions at once: the AttnRes sums and the router see the same stream."""
    model = load(student(method="rtn", moe_experts=2, moe_top_k=1, moe_noise=NOISE, attnres=True, attnres_gate=1.0))
    assert_runtime_equals_reference(model)
    assert_cached_decode_equals_recompute(model, steps=12)


# -- Gemma 4's own MoE block (26B-A4B): tests/fixtures/tiny_gemma4_26b, with a transformers oracle ------


MOE_BLOCK = "tiny_gemma4_26b"  # 4 experts, top-2, moe_intermediate 32, k_eq_v, no PLE


def test_gemma4_moe_block_matches_transformers(student):
    """Rung 1 for Gemma 4's own MoE block: the f32 artifact (runtime) and the reference on its weights."""
    oracle = reference(MOE_BLOCK)
    model = load(student(MOE_BLOCK, quant="f32"))
    c = model.config
    assert c.moe_block and (c.num_experts, c.top_k_experts, c.moe_intermediate_size) == (4, 2, 32)
    atol = oracle_tolerance(model, oracle)
    np.testing.assert_allclose(model.logits(oracle["ids"]), oracle["logits"], rtol=0, atol=atol)
    weights = dequantized_weights(model.artifact)
    np.testing.assert_allclose(reference_logits(weights, c, oracle["ids"]), oracle["logits"], rtol=0, atol=atol)


@pytest.mark.parametrize("options", [{}, {**PER_ROW, "scheme": "ferrisres"}, {"method": "rtn", "attnres": True, "attnres_gate": 1.0}],
                         ids=["default", "ferrisres", "attnres"])
def test_gemma4_moe_block_student_runtime_equals_reference(student, options):
    """Rungs 2 and 3 with the MoE block's experts ternarized (3-D [E, out, in] tensors)."""
    oracle = reference(MOE_BLOCK)
    model = load(student(MOE_BLOCK, **options))
    c = model.config
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        info = model.artifact.tensors[f"layers.0.{name}"]
        assert info.encoding in ("ternary", "ternary-g2", "ternary-g3") and info.shape[0] == c.num_experts
    for name in ("router.proj", "router.scale", "router.per_expert_scale"):
        assert model.artifact.tensors[f"layers.0.{name}"].encoding == "f32"
    weights = dequantized_weights(model.artifact)
    got = assert_runtime_equals_reference(model, weights, oracle["ids"])
    assert_cached_decode_equals_recompute(model, steps=12)
    # guard: the MoE block contributes (silencing it moves the logits)
    silenced = dict(weights)
    for i in range(c.num_layers):
        silenced[f"layers.{i}.router.per_expert_scale"] = np.zeros(c.num_experts, np.float32)
    assert np.abs(got - reference_logits(silenced, c, oracle["ids"])).max() > CHANGED


def test_moe_expansion_of_a_model_with_its_own_moe_block_is_refused(tmp_path):
    out = tmp_path / "x.tern"
    with pytest.raises(ConversionError, match="--moe-experts"):
        convert(FIXTURES / MOE_BLOCK, out, Options(moe_experts=2), progress=False)
    assert list(tmp_path.iterdir()) == []


# -- refused combinations -----------------------------------------------------------------------------


BAD = [
    ({"moe_experts": 1}, ["--moe-experts", "1"], "--moe-experts"),
    ({"moe_experts": 4, "moe_top_k": 5}, ["--moe-experts", "4", "--moe-top-k", "5"], "--moe-top-k"),
    ({"moe_experts": 2, "moe_top_k": 0}, ["--moe-experts", "2", "--moe-top-k", "0"], "--moe-top-k"),
    ({"moe_experts": 2, "moe_noise": -0.1}, ["--moe-experts", "2", "--moe-noise", "-0.1"], "--moe-noise"),
]
BAD_IDS = ["one-expert", "top-k-above-experts", "top-k-0", "negative-noise"]


@pytest.mark.parametrize("options,flags,flag", BAD, ids=BAD_IDS)
def test_unsupported_options_fail_before_writing(tmp_path, options, flags, flag):
    out = tmp_path / "x.tern"
    with pytest.raises(ConversionError, match=flag):
        convert(FIXTURES / "tiny_gemma4", out, Options(**options), progress=False)
    assert list(tmp_path.iterdir()) == []  # no artifact, no partial file


@pytest.mark.parametrize("options,flags,flag", BAD, ids=BAD_IDS)
def test_unsupported_flags_fail_with_one_line(tmp_path, options, flags, flag):
    out = tmp_path / "x.tern"
    result = run_tool("ferrisres-convert", str(FIXTURES / "tiny_gemma4"), "-o", str(out), *flags)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ferrisres-convert: error: ") and flag in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


# Values the converter should refuse too (found while writing the above): today a negative seed with MoE
# ends in a numpy ValueError traceback mid-conversion, and non-finite noise or gates are accepted and give
# an artifact with NaN/inf weights or logits (NaN noise even passes NaN through optimal-row's int8 cast).
MORE_BAD = [
    ({"moe_experts": 2, "seed": -1}, "--seed"),
    ({"moe_experts": 2, "moe_noise": float("nan")}, "--moe-noise"),
    ({"moe_experts": 2, "moe_noise": float("inf")}, "--moe-noise"),
    ({"attnres": True, "attnres_gate": float("nan")}, "--attnres-gate"),
    ({"attnres": True, "attnres_gate": float("inf")}, "--attnres-gate"),
]


@pytest.mark.parametrize("options,flag", MORE_BAD, ids=["negative-seed", "nan-noise", "inf-noise", "nan-gate", "inf-gate"])
def test_non_finite_or_negative_values_are_refused(tmp_path, options, flag):
    out = tmp_path / "x.tern"
    with pytest.raises(ConversionError, match=flag):
        convert(FIXTURES / "tiny_gemma4", out, Options(**options), progress=False)
    assert list(tmp_path.iterdir()) == []
