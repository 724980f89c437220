"""Quantized embedding tables (format 1.1, int6 1.4): the int4 and int6 packings, the quantizers' error bounds, rung 2 for
every table encoding (the runtime, tied head included, against a float64 forward over the tables as
SPEC.md dequantizes them), what the converter writes, and what the reader refuses."""

import h5py
import numpy as np
import pytest
from artifact_weights import dequantized_weights, float32_bound
from conftest import FIXTURES, reference, run_tool
from reference_forward import reference_logits

from ferrisres.convert.build import Options, convert
from ferrisres.convert.errors import ConversionError
from ferrisres.convert.tables import TABLE_CHOICES, grouped_rows
from ferrisres.format import Artifact, ArtifactError
from ferrisres.format.tables import pack_table_rows, unpack_table_rows
from ferrisres.runtime import load



def test_int4_packing_is_as_specified():
    """Codes q + 8, even column in the low nibble; a row is padded to whole groups with code 8 (zero)."""
    packed = pack_table_rows(np.array([[-8, 7, 0, 1, -1]]), "int4-g32")
    assert packed.shape == (1, 16)
    np.testing.assert_array_equal(packed[0, :4], [0xF0, 0x98, 0x87, 0x88])
    assert np.all(packed[0, 3:] == 0x88)
    scale = np.array([[0.5]], np.float16)
    np.testing.assert_array_equal(unpack_table_rows(packed, scale, "int4-g32")[0, :6], [-4, 3.5, 0, 0.5, -0.5, 0])


def test_int6_packing_is_as_specified():
    """SPEC.md's example: codes q + 32, a row padded to 128 values with code 32 (low nibble 0, high bits 2);
    byte j < 64 holds the low nibbles of columns j and j + 64, byte 64 + j the high bits of columns j, j + 32,
    j + 64, j + 96."""
    packed = pack_table_rows(np.array([[-32, 31, 0, 1, -1]]), "int6-g32")
    assert packed.shape == (1, 96)
    np.testing.assert_array_equal(packed[0, :5], [0x00, 0x0F, 0x00, 0x01, 0x0F])
    assert np.all(packed[0, 5:64] == 0)
    np.testing.assert_array_equal(packed[0, 64:69], [0xA8, 0xAB, 0xAA, 0xAA, 0xA9])
    assert np.all(packed[0, 69:] == 0xAA)
    scale = np.array([[0.5, 1, 1, 1]], np.float16)
    np.testing.assert_array_equal(unpack_table_rows(packed, scale, "int6-g32")[0, :6], [-16, 15.5, 0, 0.5, -0.5, 0])
    every = np.resize(np.arange(-32, 32), (3, 128))  # every value at every position of the row's quarters
    every[1], every[2] = every[1, ::-1], np.roll(every[2], 17)
    np.testing.assert_array_equal(unpack_table_rows(pack_table_rows(every, "int6-g32"), np.ones((3, 4), np.float16),
                                                    "int6-g32"), every)


@pytest.mark.parametrize("encoding,group,largest", [("int4-g32", 32, 7), ("int4-g64", 64, 7), ("int6-g32", 32, 31)])
def test_grouped_rows_error_is_at_most_half_a_step(encoding, group, largest):
    """scale = max|group| / m rounded to float16 (m = 7 for int4, 31 for int6), and q = rint(w / scale)
    with that stored scale: so |w - scale * q| <= scale / 2 exactly (|w / scale| <= m (1 + 2^-11) < m + 0.5,
    no clipping)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((40, 100)) * rng.uniform(1e-3, 10, (40, 1))).astype(np.float32)
    w[3] = 0  # an all-zero row: scale 0, codes 0
    packed, scale = grouped_rows(w, encoding, "t")
    bits = 4 if encoding.startswith("int4") else 6
    groups = -(-100 // group) if bits == 4 else 128 // group  # int6 rows: a multiple of 128 values
    assert packed.shape == (40, groups * group * bits // 8) and scale.shape == (40, groups) and scale.dtype == np.float16
    peak = np.abs(np.pad(w, ((0, 0), (0, groups * group - 100)))).reshape(40, groups, group).max(axis=2)
    np.testing.assert_array_equal(scale, (peak / largest).astype(np.float16))
    values = unpack_table_rows(packed, scale, encoding)
    step = np.repeat(scale.astype(np.float32), group, axis=1)
    assert np.all(np.abs(values[:, :100] - w) <= step[:, :100] / 2 * (1 + 1e-6))
    assert np.all(values[:, 100:] == 0) and np.all(values[3] == 0)


@pytest.mark.parametrize("encoding", ["int4-g64", "int6-g32"])
def test_grouped_rows_refuse_values_beyond_float16_scales(encoding):
    with pytest.raises(ConversionError, match=rf"^embed_tokens: values up to 1e\+07 do not fit {encoding} with float16"):
        grouped_rows(np.full((2, 64), 1e7, np.float32), encoding, "embed_tokens")


@pytest.mark.parametrize("tables,per_layer", [(t, None) for t in TABLE_CHOICES] + [("int8", "int4-g64")])
def test_runtime_equals_reference_over_dequantized_tables(converted, tables, per_layer):
    """Rung 2 for each table encoding, the tied head reading the quantized embedding itself."""
    model = load(converted("tiny_gemma4", tables=tables, per_layer_table=per_layer, method="rtn"))
    tensors = model.artifact.tensors
    assert tensors["embed_tokens"].encoding == tables
    assert tensors["embed_tokens_per_layer"].encoding == (per_layer or tables)
    assert ("lm_head" in tensors) == (tables == "bf16")  # bf16 tables keep the int8 head copy
    ids = reference("tiny_gemma4")["ids"]
    weights = dequantized_weights(model.artifact)
    expected = reference_logits(weights, model.config, ids)
    atol = float32_bound(model, ids)  # float32 products over these reductions and depths (test_student.py)
    np.testing.assert_allclose(model.logits(ids), expected, rtol=0, atol=atol)
    # guard: the comparison sees the tables' quantization (float tables move the reference far beyond it)
    if tables != "bf16":
        teacher = Artifact.open(converted("tiny_gemma4", "f32"))
        exact = dict(weights, **{n: teacher.tensor(n) for n in ("embed_tokens", "embed_tokens_per_layer")})
        assert np.abs(reference_logits(exact, model.config, ids) - expected).max() > 10 * atol
        teacher.close()


@pytest.mark.parametrize("encoding", ["int8", "int6-g32", "int4-g64"])
def test_per_layer_table_is_read_by_rows_only(converted, monkeypatch, encoding):
    """The per-layer table (E2B: 262144 x 8960) is never viewed whole: each step reads the rows of its
    tokens, and those rows' scales, from the file."""
    path = converted("tiny_gemma4", per_layer_table=encoding, method="rtn")
    whole, rows = [], []
    tensor, read_rows = Artifact.tensor, Artifact.rows
    monkeypatch.setattr(Artifact, "tensor", lambda self, name: (whole.append(name), tensor(self, name))[1])
    monkeypatch.setattr(Artifact, "rows", lambda self, name, ids: (rows.append((name, list(ids))), read_rows(self, name, ids))[1])
    ids = reference("tiny_gemma4")["ids"]
    load(path).logits(ids)
    assert not [n for n in whole if n.startswith("embed_tokens_per_layer")]
    assert ("embed_tokens_per_layer", list(ids)) in rows and ("embed_tokens_per_layer.weight_scale", list(ids)) in rows


def test_table_sizes_are_as_specified(converted):
    """Sizes as SPEC.md says: vocab x 64 int8 + float32 row scales; int4: half a byte per value (rows padded
    to whole groups: the per-layer table's 80 values take 3 groups of 32), int6: three quarters of a byte
    (rows padded to 128 values, 4 groups) + float16 group scales."""
    sizes = {}
    for tables in ("int8", "int6-g32", "int4-g32"):
        a = Artifact.open(converted("tiny_gemma4", tables=tables, method="rtn"))
        sizes[tables] = {n: a.tensors[n].nbytes for n in
                         ("embed_tokens", "embed_tokens.weight_scale", "embed_tokens_per_layer", "embed_tokens_per_layer.weight_scale")}
        a.close()
    assert sizes["int8"] == {"embed_tokens": 512 * 64, "embed_tokens.weight_scale": 512 * 4,
                             "embed_tokens_per_layer": 512 * 80, "embed_tokens_per_layer.weight_scale": 512 * 4}
    assert sizes["int4-g32"] == {"embed_tokens": 512 * 32, "embed_tokens.weight_scale": 512 * 2 * 2,
                                 "embed_tokens_per_layer": 512 * 48, "embed_tokens_per_layer.weight_scale": 512 * 3 * 2}
    assert sizes["int6-g32"] == {"embed_tokens": 512 * 96, "embed_tokens.weight_scale": 512 * 4 * 2,
                                 "embed_tokens_per_layer": 512 * 96, "embed_tokens_per_layer.weight_scale": 512 * 4 * 2}


def test_teacher_keeps_its_tables_unless_asked(converted):
    teacher = Artifact.open(converted("tiny_gemma4", "f32"))
    assert {teacher.tensors[n].encoding for n in ("embed_tokens", "embed_tokens_per_layer")} == {"f32"}
    teacher.close()
    model = load(converted("tiny_gemma4", "f32", tables="int4-g64"))
    assert model.artifact.tensors["embed_tokens"].encoding == "int4-g64" and "lm_head" not in model.artifact.tensors
    student = model.artifact.document("student_config.json")
    assert '"tables": {"embed_tokens": "int4-g64", "embed_tokens_per_layer": "int4-g64"}' in student
    ids = reference("tiny_gemma4")["ids"]
    expected = reference_logits(dequantized_weights(model.artifact), model.config, ids)
    np.testing.assert_allclose(model.logits(ids), expected, rtol=0, atol=float32_bound(model, ids))


def test_per_layer_table_flag_needs_a_per_layer_table(tmp_path):
    out = tmp_path / "x.tern"
    with pytest.raises(ConversionError, match="^--per-layer-table: this model has no per-layer embedding table$"):
        convert(FIXTURES / "tiny_gemma3", out, Options(per_layer_table="int8"), progress=False)
    with pytest.raises(ConversionError, match="^--tables must be one of bf16, int8, int6-g32, int4-g32, int4-g64, got 'int5'$"):
        convert(FIXTURES / "tiny_gemma4", out, Options(tables="int5"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_table_encoding_flag_names_the_choices(tmp_path):
    """argparse's own refusal, as for every flag with choices: one error line (exit 2)."""
    result = run_tool("ferrisres-convert", str(FIXTURES / "tiny_gemma4"), "-o", str(tmp_path / "x.tern"), "--tables", "int4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "ferrisres-convert: error: argument --tables: invalid choice: 'int4' (choose from 'bf16', 'int8', 'int6-g32', 'int4-g32', 'int4-g64')"]
    assert list(tmp_path.iterdir()) == []


def _rewrite(path, name, data=None, attrs=None):
    """Replace dataset /tensors/<name> (its data and/or attributes), aligned as the writer aligns."""
    with h5py.File(path, "r+", alignment_threshold=1, alignment_interval=4096) as f:
        key = f"tensors/{name}"
        old_attrs, old_data = dict(f[key].attrs), f[key][...]
        del f[key]
        ds = f.create_dataset(key, data=old_data if data is None else data)
        ds.attrs.update({k: v for k, v in {**old_attrs, **(attrs or {})}.items() if v is not None})


@pytest.mark.parametrize("case,edit,message", [
    ("scale float32", lambda p: _rewrite(p, "embed_tokens.weight_scale", np.ones((512, 2), "<f4"), {"encoding": "f32"}),
     "tensor embed_tokens.weight_scale is missing or not float16 [512, 2] (the scales of a table stored as int4-g32)"),
    ("scale per tensor", lambda p: _rewrite(p, "embed_tokens.weight_scale", np.ones(1, "<f2"), {"shape": np.array([1])}),
     "tensor embed_tokens.weight_scale is missing or not float16 [512, 2]"),
    ("int4 rows one byte short", lambda p: _rewrite(p, "embed_tokens", np.zeros((512, 31), np.uint8)),
     "dataset /tensors/embed_tokens is stored as [512, 31], which does not hold logical shape [512, 64]"),
    ("int4 projection", lambda p: _rewrite(p, "layers.0.self_attn.q_proj", np.zeros((32, 32), np.uint8),
                                           {"encoding": "int4-g32", "rotation": None}),
     "tensor layers.0.self_attn.q_proj has encoding int4-g32, expected one of ternary, ternary-g1, ternary-g2, ternary-g3, ternary5-g1, ternary5-g2, ternary5-g3, int8, bf16, f16, f32"),
])
def test_reader_refuses_malformed_int4_tables(converted, tmp_path, case, edit, message):
    path = tmp_path / "x.tern"
    path.write_bytes(converted("tiny_gemma4", tables="int4-g32", method="rtn").read_bytes())
    edit(path)
    with pytest.raises(ArtifactError) as e:
        Artifact.open(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_reader_refuses_int6_rows_of_the_wrong_width(converted, tmp_path):
    path = tmp_path / "x.tern"
    path.write_bytes(converted("tiny_gemma4", tables="int6-g32", method="rtn").read_bytes())
    _rewrite(path, "embed_tokens", np.zeros((512, 48), np.uint8))  # two groups' bytes: rows are 128 values
    with pytest.raises(ArtifactError, match=r"dataset /tensors/embed_tokens is stored as \[512, 48\], which does not "
                                            r"hold logical shape \[512, 64\]"):
        Artifact.open(path)
