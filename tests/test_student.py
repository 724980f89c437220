"""Rung 2: the runtime on a ternary (or bf16/f16) artifact equals a plain numpy forward over the
artifact's dequantized weights, so the kernels add no error beyond float32 rounding."""

import numpy as np
import pytest
from artifact_weights import dequantized_weights, float32_bound
from conftest import reference
from reference_forward import reference_logits

from ferrisres.runtime import load


@pytest.mark.parametrize(
    "checkpoint,quant",
    [("tiny_gemma4", "ternary"), ("tiny_gemma4_bf16", "ternary"), ("tiny_gemma4", "bf16"), ("tiny_gemma4", "f16")],
)
def test_runtime_equals_fake_quant_forward(converted, checkpoint, quant):
    """The reference runs in float64: the difference is the runtime's own float32 rounding."""
    model = load(converted(checkpoint, quant))
    ids = reference(checkpoint)["ids"]
    expected = reference_logits(dequantized_weights(model.artifact), model.config, ids)
    # float32 products over these reductions and depths: 7e-4 to 3e-3 here, 15-50x what any OpenBLAS
    # kernel gives; a decoding or scaling error moves the logits by > 0.1 (test_student_differs_...)
    np.testing.assert_allclose(model.logits(ids), expected, rtol=0, atol=float32_bound(model, ids))


def test_ternary_student_weights_are_ternary_with_row_scales(converted):
    model = load(converted("tiny_gemma4", "ternary"))
    info = model.artifact.tensors["layers.0.mlp.gate_proj"]
    assert info.encoding == "ternary" and info.shape == (256, 64) and info.stored_shape == (256, 16)
    assert model.artifact.tensors["layers.0.mlp.gate_proj.weight_scale"].shape == (256,)
    codes = model.artifact.tensor("layers.0.mlp.gate_proj")
    assert not np.any((codes[..., None] >> np.array([0, 2, 4, 6], np.uint8)) & 3 == 3)  # no invalid code
    assert model.artifact.tensors["lm_head"].encoding == "int8"
    assert model.artifact.tensors["layers.0.input_layernorm"].encoding == "f32"


def test_student_differs_from_teacher(converted):
    """Guards the comparison above: ternarization changes the function by far more than float32 rounding
    may, so a tolerance of that rounding cannot hide a wrong weight."""
    ids = reference("tiny_gemma4")["ids"]
    teacher = load(converted("tiny_gemma4", "f32")).logits(ids)
    student = load(converted("tiny_gemma4", "ternary"))
    assert np.abs(teacher - student.logits(ids)).max() > 10 * float32_bound(student, ids)
