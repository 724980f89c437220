"""The fused kernels (`--kernel fast`, runtime/fast_kernels.py) compute what the numpy path, the reference,
computes: every encoding's product within float32 rounding of it, the same greedy tokens on the tiny
models; and batched generation gives each prompt the tokens it gets alone. Without numba (the fast
extra) the kernel tests skip, and asking for the fast kernel is one line naming the extra."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
from artifact_weights import float32_bound
from conftest import PER_ROW, reference, run_tool

from ferrisres.convert.quantize import tied_scales
from ferrisres.format.encodings import BASE3_TERNARY, pack_base3, pack_ternary
from ferrisres.format.tables import pack_table_rows, table_groups
from ferrisres.runtime import load, set_threads
from ferrisres.runtime import model as model_module
from ferrisres.runtime.kernels import Linear, rotated_input
from ferrisres.runtime.kv_cache import KVCache

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="numba is not installed (pip install 'ferrisres[fast]'): fast kernels untested")


def weights(encoding: str, out: int, n_in: int, rng, group: int = 64, rotation: int = 0, tied: bool = False):
    """A Linear in `encoding` with random stored values, and |W| [out, in] in its stored basis, summed
    over planes as the products are (each plane's |scale x code|). `tied`: grouped ternary planes whose
    scales are tied (each 3 times the next one's), as the converter writes them by default."""
    if encoding.startswith("ternary"):
        planes = int(encoding[-1]) if encoding != "ternary" else 1
        codes = rng.integers(-1, 2, (out, planes, n_in))
        base3 = encoding in BASE3_TERNARY
        packed = np.stack([(pack_base3 if base3 else pack_ternary)(codes[:, p]) for p in range(planes)], axis=1)
        packed[0, 0, 0] = 0xF7 if base3 else 0xFF  # bytes no writer writes, read as zero weights by both paths
        codes[0, 0, : 5 if base3 else 4] = 0
        if encoding == "ternary":
            scale = rng.random(out, dtype=np.float32)
            return Linear(packed[:, 0], encoding, (out, n_in), scale=scale), np.abs(codes[:, 0]) * scale[:, None]
        scales = (rng.random((out, planes, n_in // group)) + 0.1).astype(np.float16)
        if tied:
            scales = np.ascontiguousarray(np.moveaxis(tied_scales(rng.random((out, n_in // group)) + 0.1, planes), -1, 1))
        per_column = np.repeat(scales.astype(np.float32), group, axis=2)
        linear = Linear(packed, encoding, (out, n_in), group_scale=scales, rotation=rotation)
        return linear, (np.abs(codes) * per_column).sum(axis=1)
    if encoding.startswith(("int4", "int6")):
        size, largest = int(encoding[-2:]), 8 if encoding.startswith("int4") else 32
        q = rng.integers(-largest, largest, (out, n_in))
        scales = (rng.random((out, table_groups(encoding, n_in))) + 0.1).astype(np.float16)  # of the padded row
        magnitude = np.abs(q) * np.repeat(scales.astype(np.float32), size, axis=1)[:, :n_in]
        packed = pack_table_rows(q, encoding)[:, None, :]  # the tied head's rows as stored: one plane
        return Linear(packed, encoding, (out, n_in), group_scale=scales[:, None, :]), magnitude
    if encoding == "int8":
        q = rng.integers(-127, 128, (out, n_in), dtype=np.int8)
        scale = rng.random(out, dtype=np.float32)
        return Linear(q, encoding, (out, n_in), scale=scale), np.abs(q) * scale[:, None]
    w = rng.standard_normal((out, n_in)).astype(np.float32)
    data = (w.view(np.uint32) >> 16).astype(np.uint16) if encoding == "bf16" else w.astype(np.float16)
    return Linear(data, encoding, (out, n_in)), np.abs(Linear(data, encoding, (out, n_in)).dequantize())


CASES = [  # encoding, out, in, group, rotation: padded rows, groups of 16 bytes and of other sizes, base-3 rows
    # of whole blocks and with a short last block
    ("ternary", 37, 70, 0, 0), ("ternary-g1", 40, 256, 64, 64), ("ternary-g2", 40, 256, 64, 0),
    ("ternary-g2", 33, 96, 32, 32), ("ternary-g2", 24, 40, 4, 0), ("ternary5-g1", 40, 256, 64, 64),
    ("ternary5-g2", 40, 256, 128, 0), ("ternary5-g2", 33, 70, 70, 0), ("ternary-g3", 40, 256, 64, 64),
    ("ternary5-g3", 40, 256, 64, 0), ("int4-g32", 30, 70, 0, 0),
    ("int4-g64", 30, 200, 0, 0), ("int6-g32", 30, 70, 0, 0), ("int6-g32", 30, 256, 0, 0), ("int8", 50, 130, 0, 0), ("bf16", 20, 100, 0, 0), ("f16", 20, 100, 0, 0),
]


@needs_numba
@pytest.mark.parametrize("encoding,out,n_in,group,rotation", CASES, ids=[f"{c[0]}-{c[2]}-g{c[3]}" for c in CASES])
def test_each_encoding_equals_the_numpy_product(encoding, out, n_in, group, rotation):
    from ferrisres.runtime.fast_kernels import attach

    rng = np.random.default_rng(n_in)
    linear, magnitude = weights(encoding, out, n_in, rng, group, rotation)
    pairs = [(linear, Linear(linear.data, linear.encoding, (out, n_in), linear.scale, linear.group_scale, linear.rotation))]
    if encoding.startswith(("int4", "int6")):  # a table's head, unpacked to int8 values at load for these kernels
        pairs[0][1].keep_int8()
    if encoding.startswith("ternary-g"):  # and the same codes kept resident as int8 (`--cache int8`)
        numpy_int8, fast_int8 = (Linear(linear.data, encoding, (out, n_in), linear.scale, linear.group_scale,
                                        linear.rotation) for _ in range(2))
        numpy_int8.keep_int8(), fast_int8.keep_int8()
        pairs.append((numpy_int8, fast_int8))
    for reference_linear, fast in pairs:
        attach([fast])
        fast.fast.max_tokens = 8  # the fused kernel for every token count below
        for tokens in (1, 2, 5):
            x = rng.standard_normal((tokens, n_in))
            xr = np.abs(rotated_input(x, rotation) if rotation else x)
            # Both sum the same float32 products in other orders, each within the probabilistic float32 bound
            # 4 sqrt(n) 2^-24 sum|w x| of the exact sum (3.8e-6 at n = 256): together within 1e-5 sum|w x|.
            np.testing.assert_array_less(np.abs(fast(x) - reference_linear(x)), 1e-5 * (xr @ magnitude.T) + 1e-30)


@needs_numba
def test_rows_split_over_threads_give_identical_products():
    from ferrisres.runtime.fast_kernels import PARALLEL_BYTES, attach

    rng = np.random.default_rng(0)
    linear, _ = weights("ternary-g2", 2 * PARALLEL_BYTES // 128, 256, rng)  # large enough to use the threads
    attach([linear])
    x = rng.standard_normal((1, 256))
    one = linear(x)
    try:
        set_threads(2)
        np.testing.assert_array_equal(linear(x), one)  # each row is the same sum, whichever thread does it
    finally:
        set_threads(1)


ARTIFACTS = {  # every encoding an artifact's Linears can hold, the tied int8 / int6 / int4 heads, MoE experts
    "default student": ("tiny_gemma4", "ternary", {}),
    "base-3 student": ("tiny_gemma4", "ternary", {"packing": "base3"}),
    "per-row": ("tiny_gemma4", "ternary", PER_ROW),
    "int4 tables": ("tiny_gemma4", "ternary", {"tables": "int4-g32", "method": "rtn"}),
    "int6 tables": ("tiny_gemma4", "ternary", {"tables": "int6-g32", "method": "rtn"}),
    "bf16 teacher": ("tiny_gemma4_bf16", "bf16", {}),
    "f16 teacher": ("tiny_gemma4", "f16", {}),
    "26B MoE block": ("tiny_gemma4_26b", "ternary", {"method": "rtn"}),
}


@needs_numba
@pytest.mark.parametrize("name", ARTIFACTS)
def test_greedy_generation_is_the_same_with_the_fast_kernels(converted, name):
    checkpoint, quant, options = ARTIFACTS[name]
    path = converted(checkpoint, quant, **options)
    prompt = reference("tiny_gemma4")["ids"].tolist()
    plain, fast = load(path), load(path, kernel="fast")
    assert (plain.kernel, fast.kernel) == ("numpy", "fast")
    attached = [linear for linear in [*fast.weights.linears(), fast.weights.head] if linear.fast is not None]
    assert attached and fast.weights.head.fast is not None
    tokens = [s.token for s in plain.generate(prompt, max_tokens=24, temperature=0)]
    assert [s.token for s in fast.generate(prompt, max_tokens=24, temperature=0)] == tokens
    # a decode step's logits (one token: the fused kernels ran), two float32 computations within the bound each
    ids = [*prompt, *tokens[:-1]]
    logits = []
    for model in (plain, fast):
        cache = KVCache(model.config)
        model.forward(ids[:-1], cache, last_only=True)
        logits.append(model.forward(ids[-1:], cache, last_only=True))
    np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=2 * float32_bound(plain, ids))


@needs_numba
@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_resident_int8_codes_run_through_the_fast_kernel(converted, packing):
    path = converted("tiny_gemma4", "ternary", **({"packing": packing} if packing != "2bit" else {}))
    model = load(path, cache="int8", kernel="fast")
    codes = [linear for linear in model.weights.linears() if linear.encoding == "int8"]  # (the PLE projection is f32)
    assert len(codes) > 10 and all(linear.fast is not None and linear.data.ndim == 3 for linear in codes)
    prompt = reference("tiny_gemma4")["ids"].tolist()
    expected = [s.token for s in load(path).generate(prompt, max_tokens=16, temperature=0)]
    assert [s.token for s in model.generate(prompt, max_tokens=16, temperature=0)] == expected


@pytest.mark.parametrize("kernel", ["numpy", pytest.param("fast", marks=needs_numba), pytest.param("int8", marks=needs_numba)])
def test_batched_generation_gives_each_prompt_its_own_tokens(converted, kernel):
    model = load(converted("tiny_gemma4", "ternary"), kernel=kernel)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(5, model.config.vocab_size, n).tolist() for n in (6, 11, 1)]
    reasons = []
    for max_context in (None, 14):  # 14: the longer prompts fill the context before max_tokens
        batch = model.generate_batch(prompts, max_tokens=12, temperature=0, max_context=max_context)
        for prompt, completion in zip(prompts, batch):
            alone = model.generate(prompt, max_tokens=12, temperature=0, max_context=max_context)
            list(alone)
            assert (completion.tokens, completion.text, completion.stop_reason) == (alone.tokens, alone.text,
                                                                                    alone.stop_reason)
            reasons.append(completion.stop_reason)
    assert {"max_tokens", "context_full"} <= set(reasons)


def available_int8_isas() -> list[str]:
    """The int8 kernel's instruction sets this CPU has (fast_kernels.INT8_ISAS), each tested."""
    if importlib.util.find_spec("numba") is None:
        return []
    from ferrisres.runtime.fast_kernels import int8_isas
    return int8_isas()


def rounded_inputs(x: np.ndarray, width: int, group: int = 64) -> np.ndarray:
    """x [T, n] as the int8 kernel takes it (fast_kernels._quantized_input), in float64: padded with zeros to
    `width`, each group of `group` (64 for ternary, 32 for an int6 table) rounded to rint(x / s) * s with
    s = absmax / 127 in float32."""
    x = np.pad(np.asarray(x, dtype=np.float32), ((0, 0), (0, width - x.shape[1])))
    groups = x.reshape(len(x), -1, group)
    s = np.abs(groups).max(axis=-1, keepdims=True) / np.float32(127)
    s[s == 0] = 1
    return (np.rint(np.clip(groups / s, -127, 127)) * s.astype(np.float64)).reshape(len(x), width)


INT8_CASES = [  # encoding, out, in, rotation, tied: whole 64-byte chunks, chunks and a tail of 2 groups, a tail
    # alone, with free and tied planes; an int6 table's rows (W/4 bytes of high bits: 64 a chunk): 2 chunks and a
    # last one overlapping the second by 32 bytes, one chunk, a row too short for one
    ("ternary-g1", 40, 512, 64, False), ("ternary-g2", 33, 640, 0, False), ("ternary-g3", 24, 64, 64, False),
    ("ternary-g2", 33, 640, 0, True), ("ternary-g3", 24, 64, 64, True), ("ternary-g3", 17, 1536, 64, True),
    ("int6-g32", 33, 640, 0, False), ("int6-g32", 20, 200, 0, False), ("int6-g32", 30, 70, 0, False)]


@needs_numba
@pytest.mark.parametrize("isa", available_int8_isas())
@pytest.mark.parametrize("encoding,out,n_in,rotation,tied", INT8_CASES,
                         ids=[f"{c[0]}-{c[2]}{'-tied' if c[4] else ''}" for c in INT8_CASES])
def test_int8_inputs_give_the_product_of_the_inputs_rounded_per_group(isa, encoding, out, n_in, rotation, tied):
    from ferrisres.runtime.fast_kernels import INT8_TABLES, TABLE_GROUP, attach

    rng = np.random.default_rng(n_in)
    linear, magnitude = weights(encoding, out, n_in, rng, 64, rotation, tied)
    plain = Linear(linear.data, encoding, (out, n_in), group_scale=linear.group_scale)  # takes the rotated input
    attach([linear], int8=True)
    linear.fast.int8_isa = isa
    assert linear.fast.tied == tied  # tied planes' codes are multiplied as one number, once per token
    group = TABLE_GROUP if encoding in INT8_TABLES else 64
    for tokens in (1, 2, 5, 19):  # 19: more than INT8_TOKENS, so a prompt's blocks of 16 and 3 tokens
        x = rng.standard_normal((tokens, n_in)) * 10.0 ** rng.integers(-3, 4, (tokens, 1))
        x[0, :64] = 0  # a group of zeros
        xq = rounded_inputs(rotated_input(x, rotation) if rotation else x, linear.width, group)[:, :n_in]
        # Integer sums are exact; the products of their scales and their sum over lanes round in float32, as
        # the reference's float32 sgemm of the same rounded inputs does: each within 4 sqrt(n) 2^-24 sum|w x|.
        np.testing.assert_array_less(np.abs(linear(x) - plain(xq)), 1e-5 * (np.abs(xq) @ magnitude.T) + 1e-30)
    x = x.copy()  # (a new array: the rotation of the last input is kept by identity)
    x[0, 5] = np.nan  # a non-finite input spoils its products, as in float32
    y = linear(x)
    assert np.isnan(y[0]).all() and np.isfinite(y[1:]).all()


@needs_numba
def test_the_int8_kernel_takes_strided_weights_and_scales_as_their_values():
    """A Linear whose codes and scales are views with other strides than their shape's (not what an artifact
    maps, but what a caller may build) multiplies the same values: the kernel reads arrays by pointer."""
    from ferrisres.runtime.fast_kernels import attach

    rng = np.random.default_rng(5)
    linear, _ = weights("ternary-g2", 20, 512, rng)
    strided = Linear(np.swapaxes(np.swapaxes(linear.data, 0, 1).copy(), 0, 1), "ternary-g2", (20, 512),
                     group_scale=np.moveaxis(np.moveaxis(linear.group_scale, 2, 0).copy(), 0, 2))
    assert not strided.data.flags.c_contiguous and not strided.group_scale.flags.c_contiguous
    attach([linear, strided], int8=True)
    x = rng.standard_normal((3, 512))
    np.testing.assert_array_equal(strided(x), linear(x))


@needs_numba
def test_every_int8_product_of_a_generation_is_the_product_of_its_rounded_inputs(converted):
    """The int8 kernel on the default student: every 2-bit ternary product in groups of 64 columns takes it, and so
    does the tied head over the int6 table, read packed; each call while generating gives the product of its
    own inputs rounded (so the wiring, rotations and padding are right); other encodings keep float32 inputs."""
    from ferrisres.runtime.fast_kernels import TABLE_GROUP

    model = load(converted("tiny_gemma4", "ternary"), kernel="int8")
    assert model.kernel == "int8"
    linears = [linear for linear in model.weights.linears() if linear.fast is not None]
    ternary = [linear for linear in linears if linear.fast.int8_isa is not None]
    in_groups_of_64 = [linear for linear in linears if linear.encoding in ("ternary-g1", "ternary-g2", "ternary-g3")
                       and linear.width // linear.group_scale.shape[-1] == 64]  # (narrower inputs have narrower groups)
    assert len(ternary) > 10 and in_groups_of_64 == ternary
    assert all(linear.fast.tied == (linear.planes > 1) for linear in ternary)  # the default: tied planes
    head = model.weights.head
    assert head.encoding == "int6-g32" and head.fast.int8_isa is not None
    for linear in [*ternary, head]:
        linear.fast = Recording(linear.fast)
    tokens = [s.token for s in model.generate(reference("tiny_gemma4")["ids"].tolist(), max_tokens=6, temperature=0)]
    assert len(tokens) == 6
    for linear in [*ternary, head]:
        shape = (linear.out_features, linear.in_features)
        plain = Linear(linear.data, linear.encoding, shape, group_scale=linear.group_scale)
        magnitude = sum(np.abs(Linear(linear.data[:, p:p + 1], linear.encoding if linear is head else "ternary-g1", shape,
                                      group_scale=linear.group_scale[:, p:p + 1]).dequantize())
                        for p in range(linear.planes))  # |W| summed over planes, as the products are
        assert linear.fast.calls  # the decode steps ran through it
        for x, y in linear.fast.calls:
            xq = rounded_inputs(x, linear.width, TABLE_GROUP if linear is head else 64)[:, : linear.in_features]
            np.testing.assert_array_less(np.abs(y - plain(xq)), 1e-5 * (np.abs(xq) @ magnitude.T) + 1e-30)


class Recording:
    """A Linear's fused product that records each call's input (already rotated) and output."""

    def __init__(self, fast):
        self.fast, self.max_tokens, self.calls = fast, fast.max_tokens, []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.fast(x)
        self.calls.append((x.copy(), y.copy()))
        return y


@needs_numba
def test_the_int8_kernel_is_refused_in_one_line_on_a_cpu_without_avx2(converted, monkeypatch):
    from ferrisres.runtime import fast_kernels

    monkeypatch.setattr(fast_kernels, "int8_isas", lambda: [])
    with pytest.raises(ValueError, match=r"needs an x86-64 CPU with AVX2 and F16C: use --kernel fast$"):
        load(converted("tiny_gemma4", "ternary"), kernel="int8")


@needs_numba
def test_run_says_which_kernel_ran(converted):
    path = str(converted("tiny_gemma4", "ternary"))
    texts = {}
    for kernel in ("numpy", "fast", "auto"):  # auto: numpy for a model as tiny as this one
        result = run_tool("ferrisres-run", path, "-p", "Hello", "--raw", "--greedy", "-n", "8", "--kernel", kernel)
        assert result.returncode == 0, result.stderr
        summary = result.stderr.strip().splitlines()[-1]
        assert f"| kernel {'numpy' if kernel == 'auto' else kernel} |" in summary
        texts[kernel] = result.stdout
    assert texts["fast"] == texts["numpy"] == texts["auto"]
    result = run_tool("ferrisres-run", path, "-p", "Hello", "--raw", "--greedy", "-n", "8", "--kernel", "int8")
    assert result.returncode == 0 and "| kernel int8 |" in result.stderr.strip().splitlines()[-1], result.stderr


@needs_numba
def test_run_says_that_the_int8_cache_slows_the_int8_kernel(converted):
    path = str(converted("tiny_gemma4", "ternary"))
    notes = {}
    for kernel in ("numpy", "int8"):
        result = run_tool("ferrisres-run", path, "-p", "Hello", "--raw", "--greedy", "-n", "2", "--kernel", kernel,
                          "--cache", "int8")
        assert result.returncode == 0, result.stderr
        notes[kernel] = "--cache int8 sends the ternary weights through the float32 kernel" in result.stderr
    assert notes == {"numpy": False, "int8": True}


@needs_numba
def test_auto_takes_the_int8_kernel_for_a_model_that_is_not_tiny(converted, monkeypatch):
    from ferrisres.runtime import fast_kernels

    path = converted("tiny_gemma4", "ternary")
    assert load(path, kernel="auto").kernel == "numpy"
    monkeypatch.setattr(model_module, "AUTO_FAST_BYTES", 0)  # as if it were large
    assert load(path, kernel="auto").kernel == ("int8" if available_int8_isas() else "fast")
    monkeypatch.setattr(fast_kernels, "int8_isas", lambda: [])  # a CPU without AVX2: the float kernels
    assert load(path, kernel="auto").kernel == "fast"
    monkeypatch.setitem(sys.modules, "numba", None)  # numba not installed: auto falls back to numpy
    monkeypatch.delitem(sys.modules, "ferrisres.runtime.fast_kernels")
    assert load(path, kernel="auto").kernel == "numpy"
    with pytest.raises(ValueError, match=r"pip install 'ferrisres\[fast\]'"):
        load(path, kernel="fast")


def test_fast_kernel_without_numba_is_one_line_naming_the_extra(converted, tmp_path):
    """numba made unimportable by a stand-in package that fails to import: --kernel fast refuses in one line."""
    (tmp_path / "numba").mkdir()
    (tmp_path / "numba" / "__init__.py").write_text("raise ImportError('numba is not installed')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    path = str(converted("tiny_gemma4", "ternary"))
    refused = run_tool("ferrisres-run", path, "-p", "Hello", "--raw", "-n", "2", "--kernel", "fast", env=env)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "ferrisres[fast]" in refused.stderr
