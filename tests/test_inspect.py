"""`ferrisres-inspect`: what an artifact holds (config, quantization, bytes by kind) and whether it is intact."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import FIXTURES, PER_ROW, run_tool
from ferrisres.format import FORMAT_VERSION, Artifact
from ferrisres.format.tables import stored_columns

INSPECT = "ferrisres-inspect"
FLIPPED = "layers.3.mlp.up_proj"  # a ternary weight


def fixture_config(name: str = "tiny_gemma4") -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def ternary_bytes(path: Path) -> int:
    """Bytes of the packed two-plane ternary weights, from their logical shapes: 4 weights a byte per plane."""
    with Artifact.open(path) as a:
        return sum(
            2 * info.shape[0] * ((info.shape[1] + 3) // 4) for info in a.tensors.values() if info.encoding == "ternary-g2"
        )


def test_inspect_shows_base3_packing_and_its_bytes(converted):
    student = converted("tiny_gemma4", method="rtn", packing="base3")
    out = run_tool(INSPECT, str(student)).stdout
    assert ("rtn, 2 planes (3 in the MLP down projections), tied scales, group 64, rotate 64, base-3 packing (5 codes "
            "per byte)" in out), out
    for planes in (2, 3):
        with Artifact.open(student) as a:  # 13 bytes per 64 codes of a row and plane, 5 codes a byte after
            expected = sum(planes * info.shape[0] * (info.shape[1] // 64 * 13 + -(-(info.shape[1] % 64) // 5))
                           for info in a.tensors.values() if info.encoding == f"ternary5-g{planes}")
        assert expected and amount(kind_line(out, f"linear weights (ternary5-g{planes})")) == expected


def all_tensor_bytes(path: Path) -> int:
    with Artifact.open(path) as a:
        return sum(a.tensor(name).nbytes for name in a.tensors)


def amount(line: str) -> int:
    """The byte count at the end of a `bytes by kind` line (`  linear weights (ternary)   202,240`)."""
    return int(line.split()[-1].replace(",", ""))


def kind_line(stdout: str, kind: str) -> str:
    lines = [line for line in stdout.splitlines() if line.strip().startswith(kind)]
    assert len(lines) == 1, f"{kind!r} not listed once in:\n{stdout}"
    return lines[0]


@pytest.fixture(scope="module")
def student(converted) -> Path:
    return converted("tiny_gemma4")


def test_text_summary(student):
    c = fixture_config()
    result = run_tool(INSPECT, str(student))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout

    # the config summary, against the checkpoint's own config.json
    full = [i for i, t in enumerate(c["layer_types"]) if t == "full_attention"]
    assert f"{c['num_hidden_layers']} layers" in out
    assert f"full attention at {full}" in out
    assert f"hidden {c['hidden_size']}" in out
    assert f"vocab {c['vocab_size']}" in out
    assert f"window {c['sliding_window']}" in out
    assert f"PLE {c['hidden_size_per_layer_input']}" in out
    assert f"{c['num_kv_shared_layers']} KV-shared layers" in out
    assert f"head dims {sorted({c['head_dim'], c['global_head_dim']})}" in out
    # the quantization scheme
    assert re.search(r"quant ternary, gptq, 2 planes \(3 in the MLP down projections\), tied scales, group 64, rotate 64, "
                     r"2-bit packing \(4 codes per byte\), "
                     r"calibrated on teacher \(8192 tokens\)", out), out
    assert "head tied, tables embed_tokens int6-g32 / embed_tokens_per_layer int6-g32" in out
    # bytes by kind
    assert "bytes by kind:" in out
    assert amount(kind_line(out, "linear weights (ternary-g2)")) == ternary_bytes(student)
    assert "output head copy" not in out  # the head is the token embedding
    assert amount(kind_line(out, "token embedding (int6-g32)")) == c["vocab_size"] * stored_columns("int6-g32", c["hidden_size"])
    with Artifact.open(student) as a:
        n_tensors = len(a.tensors)
    assert f"{n_tensors} tensors" in out
    assert ".tern %d.%d" % FORMAT_VERSION in out
    assert "no chat template: prompts run as raw text" in out  # tiny_gemma4 ships none
    assert "verify" not in out  # digests are only checked on request


def test_chat_template_presence_is_reported(tmp_path):
    out = tmp_path / "chat.tern"
    template = FIXTURES / "gemma4_it/chat_template.jinja"
    convert = run_tool("ferrisres-convert", str(FIXTURES / "tiny_gemma4"), "-o", str(out), "--quiet",
                       "--chat-template", str(template))
    assert convert.returncode == 0, convert.stderr
    assert "template from chat_template.jinja" in run_tool(INSPECT, str(out)).stdout
    assert json.loads(run_tool(INSPECT, str(out), "--json").stdout)["chat_template"] == "chat_template.jinja"


def test_text_summary_follows_the_artifact(converted):
    """Another scheme and a float teacher: the summary reports what is in the file, not a constant."""
    ferrisres = converted("tiny_gemma4", **PER_ROW, scheme="ferrisres")
    out = run_tool(INSPECT, str(ferrisres)).stdout
    assert "quant ternary, scheme ferrisres" in out

    one_plane = run_tool(INSPECT, str(converted("tiny_gemma4", method="rtn", planes=1))).stdout
    assert "quant ternary, rtn, 1 plane, group 64, rotate 64," in one_plane, one_plane  # no plane scales to tie

    teacher = converted("tiny_gemma4_bf16", quant="bf16")
    result = run_tool(INSPECT, str(teacher))
    assert result.returncode == 0, result.stderr
    assert "quant bf16" in result.stdout
    assert "(ternary)" not in result.stdout and "(int8)" not in result.stdout
    with Artifact.open(teacher) as a:
        linear_bf16 = sum(i.nbytes for i in a.tensors.values() if i.encoding == "bf16" and len(i.shape) == 2
                          and not i.name.startswith("embed_tokens"))
    assert linear_bf16 > 0
    assert amount(kind_line(result.stdout, "linear weights (bf16)")) == linear_bf16


def test_json(student):
    c = fixture_config()
    result = run_tool(INSPECT, str(student), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    m = report["model"]
    assert m["layers"] == c["num_hidden_layers"]
    assert m["hidden_size"] == c["hidden_size"]
    assert m["vocab_size"] == c["vocab_size"]
    assert m["heads"] == c["num_attention_heads"]
    assert m["full_attention_layers"] == [i for i, t in enumerate(c["layer_types"]) if t == "full_attention"]
    assert m["kv_shared_layers"] == c["num_kv_shared_layers"]
    assert report["student"]["quant"] == "ternary"
    assert report["student"]["method"] == "gptq" and report["student"]["planes"] == 2
    assert report["student"]["tables"] == {"embed_tokens": "int6-g32", "embed_tokens_per_layer": "int6-g32"}
    assert report["format_version"] == "%d.%d" % FORMAT_VERSION
    assert report["file_bytes"] == student.stat().st_size
    assert report["chat_template"] is None

    by_kind = report["bytes_by_kind"]
    assert by_kind["linear weights (ternary-g2)"] == ternary_bytes(student)
    assert by_kind["token embedding (int6-g32)"] == c["vocab_size"] * stored_columns("int6-g32", c["hidden_size"])
    assert sum(by_kind.values()) == all_tensor_bytes(student)
    with Artifact.open(student) as a:
        assert report["tensors"] == len(a.tensors)
    assert "verify" not in report


def test_verify_intact(student):
    result = run_tool(INSPECT, str(student), "--verify")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "all digests match" in result.stdout

    result = run_tool(INSPECT, str(student), "--verify", "--json")
    assert result.returncode == 0, result.stderr
    v = json.loads(result.stdout)["verify"]
    with Artifact.open(student) as a:
        assert v == {"tensors": len(a.tensors), "documents": len(a.documents), "mismatched": []}


@pytest.fixture
def corrupted(student, tmp_path) -> Path:
    """A copy of the student with one byte flipped in the middle of FLIPPED's data."""
    path = tmp_path / "corrupt.tern"
    shutil.copy(student, path)
    with Artifact.open(path) as a:
        info = a.tensors[FLIPPED]
    at = info.offset + info.nbytes // 2
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ 0x5A]))
    return path


def test_verify_names_the_flipped_tensor(corrupted):
    result = run_tool(INSPECT, str(corrupted), "--verify")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{INSPECT}: error: ")
    named = re.findall(r"tensors/[\w.]+", lines[0])
    assert named == [f"tensors/{FLIPPED}"], lines[0]
    assert "1 MISMATCHED" in result.stdout


def test_verify_json_names_the_flipped_tensor(corrupted):
    result = run_tool(INSPECT, str(corrupted), "--verify", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["verify"]["mismatched"] == [f"tensors/{FLIPPED}"]


def test_without_verify_a_corrupt_copy_is_still_described(corrupted):
    """Digests are checked only with --verify: plain inspection reads metadata, not every byte."""
    result = run_tool(INSPECT, str(corrupted))
    assert result.returncode == 0, result.stderr
    assert "bytes by kind:" in result.stdout


def test_a_student_config_field_of_another_type_is_shown_as_recorded(converted, tmp_path):
    from hostile import document, with_documents

    base = converted("tiny_gemma4")
    odd = with_documents(base, tmp_path / "odd.tern", student_config_json={**document(base, "student_config.json"),
                                                                            "packing": [1]})
    result = run_tool(INSPECT, str(odd))
    assert result.returncode == 0 and not result.stderr, result.stderr  # was: TypeError, unhashable type 'list'
    assert ", [1]," in result.stdout
