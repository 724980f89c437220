"""Rung 2: the runtime on a ternary (or bf16/f16) artifact equals a plain numpy forward over the
artifact's dequantized weights, so the kernels add no error beyond float32 rounding."""

import numpy as np
import pytest
from artifact_weights import dequantized_weights
from conftest import reference
from reference_forward import reference_logits

from ferrisres.runtime import load

ATOL = 1e-4  # design.md §5 rung 2, for the ternary student
TEACHER_ATOL = 1e-3  # bf16/f16 teachers: float32 noise of the deeper, unquantized paths, as in rung 1


@pytest.mark.parametrize(
    "checkpoint,quant,atol",
    [
        ("tiny_gemma4", "ternary", ATOL),
        ("tiny_gemma4_bf16", "ternary", ATOL),
        ("tiny_gemma4", "bf16", TEACHER_ATOL),
        ("tiny_gemma4", "f16", TEACHER_ATOL),
    ],
)
def test_runtime_equals_fake_quant_forward(converted, checkpoint, quant, atol):
    """The reference runs in float64: the difference is the runtime's own float32 rounding."""
    model = load(converted(checkpoint, quant))
    ids = reference(checkpoint)["ids"]
    expected = reference_logits(dequantized_weights(model.artifact), model.config, ids)
    np.testing.assert_allclose(model.logits(ids), expected, rtol=0, atol=atol)


def test_ternary_student_weights_are_ternary_with_row_scales(converted):
    model = load(converted("tiny_gemma4", "ternary"))
    info = model.artifact.tensors["layers.0.mlp.gate_proj"]
    assert info.encoding == "ternary" and info.shape == (256, 64) and info.stored_shape == (256, 16)
    assert model.artifact.tensors["layers.0.mlp.gate_proj.weight_scale"].shape == (256,)
    codes = model.artifact.tensor("layers.0.mlp.gate_proj")
    assert not np.any((codes[..., None] >> np.array([0, 2, 4, 6], np.uint8)) & 3 == 3)  # no invalid code
    assert model.artifact.tensors["embed_tokens"].encoding == "int8" and "lm_head" not in model.artifact.tensors
    assert model.artifact.tensors["layers.0.input_layernorm"].encoding == "f32"


def test_student_differs_from_teacher(converted):
    """Guards the comparison above: ternarization must actually have changed the function."""
    ids = reference("tiny_gemma4")["ids"]
    teacher = load(converted("tiny_gemma4", "f32")).logits(ids)
    student = load(converted("tiny_gemma4", "ternary")).logits(ids)
    assert np.abs(teacher - student).max() > 0.1
