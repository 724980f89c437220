"""Rung 2: the runtime on a ternary (or bf16/f16) artifact equals a plain numpy forward over the
artifact's dequantized weights, so the kernels add no error beyond float32 rounding."""

import numpy as np
import pytest
from artifact_weights import dequantized_weights, float32_bound
from conftest import PER_ROW, reference
from reference_forward import reference_logits

from ferrisres.runtime import load


ENCODINGS = {  # every way the converter stores a projection
    "gptq-2-planes-rotated": {},  # the default
    "gptq-1-plane": {"planes": 1, "rotate": 0},
    "rtn-2-planes-row-scale": {"method": "rtn", "group": 0},
    "per-row": PER_ROW,
    "gptq-2-planes-base3": {"packing": "base3"},
    "rtn-1-plane-base3-row-scale": {"method": "rtn", "planes": 1, "group": 0, "packing": "base3"},
}


@pytest.mark.parametrize(
    "checkpoint,quant,options",
    [
        *[("tiny_gemma4", "ternary", options) for options in ENCODINGS.values()],
        ("tiny_gemma4_bf16", "ternary", {}),
        ("tiny_gemma4_bf16", "ternary", PER_ROW),
        ("tiny_gemma4", "bf16", {}),
        ("tiny_gemma4", "f16", {}),
    ],
    ids=[*ENCODINGS, "bf16-source", "bf16-source-per-row", "bf16-teacher", "f16-teacher"],
)
def test_runtime_equals_fake_quant_forward(converted, checkpoint, quant, options):
    """The reference runs in float64: the difference is the runtime's own float32 rounding."""
    model = load(converted(checkpoint, quant, **options))
    ids = reference(checkpoint)["ids"]
    expected = reference_logits(dequantized_weights(model.artifact), model.config, ids)
    # float32 products over these reductions and depths: 7e-4 to 3e-3 here, 15-50x what any OpenBLAS
    # kernel gives; a decoding or scaling error moves the logits by > 0.1 (test_student_differs_...).
    # A product of two (three) planes sums twice (three times) the terms and a rotated input is rounded once
    # more: a factor of about sqrt(3) on the products' rounding at most, well inside that margin.
    np.testing.assert_allclose(model.logits(ids), expected, rtol=0, atol=float32_bound(model, ids))


def test_default_student_has_two_rotated_trit_planes_and_three_in_the_down_projections(converted):
    model = load(converted("tiny_gemma4", "ternary"))
    info = model.artifact.tensors["layers.0.mlp.gate_proj"]
    assert info.encoding == "ternary-g2" and info.shape == (256, 64) and info.stored_shape == (256, 2, 16)
    assert info.rotation == 64
    scale = model.artifact.tensors["layers.0.mlp.gate_proj.weight_scale"]
    assert scale.encoding == "f16" and scale.shape == (256, 2, 1)
    down = model.artifact.tensors["layers.0.mlp.down_proj"]  # the down projections carry a third plane
    assert down.encoding == "ternary-g3" and down.stored_shape == (64, 3, 64) and down.rotation == 64
    assert model.artifact.tensors["layers.0.mlp.down_proj.weight_scale"].shape == (64, 3, 4)  # in 256: 4 groups
    o_proj = model.artifact.tensors["layers.0.self_attn.o_proj"]  # in = 32: one group, rotation of 32
    assert model.artifact.tensors["layers.0.self_attn.o_proj.weight_scale"].shape == (64, 2, 1) and o_proj.rotation == 32
    assert model.artifact.tensors["embed_tokens"].encoding == "int6-g32" and "lm_head" not in model.artifact.tensors


def test_per_row_student_weights_are_ternary_with_row_scales(converted):
    model = load(converted("tiny_gemma4", "ternary", **PER_ROW))
    info = model.artifact.tensors["layers.0.mlp.gate_proj"]
    assert info.encoding == "ternary" and info.shape == (256, 64) and info.stored_shape == (256, 16)
    assert model.artifact.tensors["layers.0.mlp.gate_proj.weight_scale"].shape == (256,)
    codes = model.artifact.tensor("layers.0.mlp.gate_proj")
    assert not np.any((codes[..., None] >> np.array([0, 2, 4, 6], np.uint8)) & 3 == 3)  # no invalid code
    assert model.artifact.tensors["embed_tokens"].encoding == "int6-g32" and "lm_head" not in model.artifact.tensors
    assert model.artifact.tensors["layers.0.input_layernorm"].encoding == "f32"


def test_student_differs_from_teacher(converted):
    """Guards the comparison above: ternarization changes the function by far more than float32 rounding
    may, so a tolerance of that rounding cannot hide a wrong weight."""
    ids = reference("tiny_gemma4")["ids"]
    teacher = load(converted("tiny_gemma4", "f32")).logits(ids)
    student = load(converted("tiny_gemma4", "ternary"))
    assert np.abs(teacher - student.logits(ids)).max() > 10 * float32_bound(student, ids)
