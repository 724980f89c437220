"""Converter inputs and outputs: checkpoint layouts it must accept, and reproducible artifacts (rung 5)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from artifact_weights import dequantized_weights, float32_bound
from conftest import FIXTURES, reference, run_tool
from reference_forward import reference_logits
from safetensors.numpy import load_file, save_file

from ferrisres.convert.build import Options, convert
from ferrisres.runtime import load


def test_same_input_gives_byte_identical_artifacts_wherever_the_files_are(tmp_path, monkeypatch):
    """The same input content and options, through the real CLI: from two copies of the checkpoint (and of
    a LoRA adapter and a chat template) in differently named folders, by absolute and relative paths, to
    differently named outputs, one replacing an existing file with --force: the same bytes."""
    outputs = []
    for n, (folder, flags) in enumerate([("a/checkpoint", []), ("elsewhere/deeper/my-model", ["--force"])]):
        source = tmp_path / folder
        shutil.copytree(FIXTURES / "tiny_gemma4", source)
        shutil.copytree(FIXTURES / "tiny_gemma4_lora", source.parent / f"adapter-{n}")
        template = source.parent / "chat_template.jinja"
        shutil.copy(FIXTURES / "gemma4_it/chat_template.jinja", template)
        out = source.parent / f"output-{n}.tern"
        if "--force" in flags:
            out.write_bytes(b"an older artifact")
            monkeypatch.chdir(source.parent)  # relative paths this time
            source, template, out = Path(source.name), Path(template.name), Path(out.name)
        result = run_tool("ferrisres-convert", str(source), "-o", str(out), "--lora", str(out.parent / f"adapter-{n}"),
                          "--chat-template", str(template), "--quiet", *flags)
        assert result.returncode == 0, result.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert str(tmp_path).encode() not in outputs[0] and b"output-" not in outputs[0] and b"--force" not in outputs[0]


def test_sharded_f16_checkpoint_converts(tmp_path):
    """model.safetensors.index.json with two shards, f16 tensors: same weights as the f16-rounded source."""
    source = FIXTURES / "tiny_gemma4"
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    for shard, members in shards.items():
        save_file({n: tensors[n].astype(np.float16) for n in members}, folder / shard)
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / f, folder / f)
    convert(folder, tmp_path / "sharded.tern", Options(quant="f32"), progress=False)
    model = load(tmp_path / "sharded.tern")
    ids = reference("tiny_gemma4")["ids"]
    weights = dequantized_weights(model.artifact)
    assert np.array_equal(weights["layers.0.mlp.up_proj"], tensors["model.layers.0.mlp.up_proj.weight"].astype(np.float16).astype(np.float32))
    atol = float32_bound(model, ids)  # the runtime's float32 products vs the exact reference
    np.testing.assert_allclose(model.logits(ids), reference_logits(weights, model.config, ids), rtol=0, atol=atol)


def test_multimodal_and_text_only_names_give_the_same_model(converted):
    """The real E2B stores text weights under model.language_model.*; towers are dropped."""
    text = load(converted("tiny_gemma4", "ternary"))
    multimodal = load(converted("tiny_gemma4_mm", "ternary"))
    assert set(text.artifact.tensors) == set(multimodal.artifact.tensors)
    for name in text.artifact.tensors:
        assert np.array_equal(text.artifact.tensor(name), multimodal.artifact.tensor(name)), name


def test_artifact_embeds_tokenizer_generation_config_and_provenance(converted):
    model = load(converted("tiny_gemma4", "ternary"))
    docs = model.artifact.documents
    assert {"model_config.json", "student_config.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "provenance.json"} <= set(docs)
    assert model.artifact.document("tokenizer.json") == (FIXTURES / "tiny_gemma4" / "tokenizer.json").read_text()
    provenance = json.loads(model.artifact.document("provenance.json"))
    assert set(provenance) == {"converter", "options", "source_files"}  # no paths, no command line as typed
    assert set(provenance["source_files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert all(digest.startswith("blake2b-256:") for digest in provenance["source_files"].values())
    assert provenance["options"]["quant"] == "ternary" and provenance["options"]["method"] == "gptq"
    assert provenance["options"]["calibration"] == {"source": "teacher", "tokens": 8192}
    assert provenance["options"]["moe"] is None and provenance["options"]["attnres"] is None
    assert model.config.eos_token_ids == (1,)


def test_bf16_tables_keep_a_bf16_source_exact_with_an_int8_head_copy(converted):
    model = load(converted("tiny_gemma4_bf16", "ternary", tables="bf16"))
    assert model.artifact.tensors["embed_tokens"].encoding == "bf16"
    assert model.artifact.tensors["embed_tokens_per_layer"].encoding == "bf16"
    assert model.artifact.tensors["lm_head"].encoding == "int8"


def test_generating_imports_no_converter_dependency(converted):
    """A machine that only runs artifacts needs numpy, h5py and tokenizers: nothing else is imported."""
    code = (
        "import sys\nfrom ferrisres.runtime import load\n"
        f"model = load({str(converted('tiny_gemma4', 'ternary'))!r})\n"
        "list(model.generate('Hello', max_tokens=4))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('safetensors', 'tqdm', 'torch') or m.startswith('ferrisres.convert')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("quant", ["ternary", "f32"])
def test_run_prints_text_and_summary(converted, quant):
    result = run_tool("ferrisres-run", str(converted("tiny_gemma4", quant)), "--prompt", "Hello world", "-n", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    summary = result.stderr.strip().splitlines()[-1]
    assert "prompt 7 tokens" in summary and "generated 12 tokens" in summary and "tok/s" in summary


def test_chat_template_option_embeds_the_file_and_refuses_a_broken_one(tmp_path):
    template = FIXTURES / "gemma4_it/chat_template.jinja"
    out = tmp_path / "chat.tern"
    result = run_tool("ferrisres-convert", str(FIXTURES / "tiny_gemma4"), "-o", str(out), "--chat-template", str(template), "--quiet")
    assert result.returncode == 0, result.stderr
    model = load(out)
    assert model.artifact.document("chat_template.jinja") == template.read_text(encoding="utf-8")
    assert "<|turn>user" in model.render_chat([{"role": "user", "content": "Hi"}])  # Gemma 4's turn markers
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% if x %}never closed")
    result = run_tool("ferrisres-convert", str(FIXTURES / "tiny_gemma4"), "-o", str(tmp_path / "b.tern"),
                      "--chat-template", str(broken), "--quiet")
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(broken) in result.stderr and not (tmp_path / "b.tern").exists()


def test_calibration_from_a_text_file(tmp_path):
    """--calibration FILE: the student is calibrated on that text (cut into sequences of 128 tokens), the
    artifact records that a text file was used and provenance its digest, never its path."""
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"word{i % 97} and more words {i}" for i in range(2000)), encoding="utf-8")
    out = tmp_path / "file.tern"
    convert(FIXTURES / "tiny_gemma4", out, Options(calibration=str(text), calibration_tokens=512), progress=False)
    model = load(out)
    assert model.student_config["calibration"] == {"source": "text file", "tokens": 512}
    provenance = json.loads(model.artifact.document("provenance.json"))
    assert "calibration/calibration.txt" in provenance["source_files"] and str(tmp_path) not in json.dumps(provenance)
    teacher_calibrated = tmp_path / "teacher.tern"
    convert(FIXTURES / "tiny_gemma4", teacher_calibrated, Options(calibration_tokens=512), progress=False)
    assert load(teacher_calibrated).artifact.tensor("layers.0.mlp.down_proj").tobytes() != \
        model.artifact.tensor("layers.0.mlp.down_proj").tobytes()


def test_calibration_text_shorter_than_a_sequence_is_one_line_and_leaves_nothing(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("too short", encoding="utf-8")
    result = run_tool("ferrisres-convert", str(FIXTURES / "tiny_gemma4"), "-o", str(tmp_path / "x.tern"),
                      "--calibration", str(text), "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "fewer than one sequence of 127" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]
