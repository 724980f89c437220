"""Bad input never ends in a traceback or a half-written file.

Acceptance: bad input (missing config.json or tensor, wrong tensor shape, a config that is not Gemma 4,
existing output without `--force`, a file that is not a `.tern`, a `.tern` of a newer major version)
exits non-zero with one line naming the problem, no traceback, and leaves no partial file.

Every case runs the real console script in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, run_tool

CONVERT, RUN, INSPECT = "ferrisres-convert", "ferrisres-run", "ferrisres-inspect"
REMOVED = "model.layers.3.mlp.up_proj.weight"  # a ternary weight of a layer with its own KV (tiny_gemma4: [256, 64])


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file (hidden ones too) under `folder`, relative path -> contents (None for a folder)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(Path(root, d), folder)] = None
        for f in files:
            out[os.path.relpath(Path(root, f), folder)] = Path(root, f).read_bytes()
    return out


def assert_clean_failure(result, tool: str, *names: str) -> str:
    """Exit 1 (the documented code for bad input), one `tool: error: ...` line on stderr naming the problem."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {result.stderr!r}"
    line = lines[0]
    assert line.startswith(f"{tool}: error: "), line
    for name in names:
        assert name in line, f"{name!r} not named in {line!r}"
    assert result.stdout == "", f"unexpected stdout: {result.stdout!r}"
    return line


# ---------------------------------------------------------------------------------------------------------
# ferrisres-convert: bad checkpoints


def _copy_checkpoint(tmp_path: Path, name: str = "tiny_gemma4") -> Path:
    ck = tmp_path / "checkpoint"
    shutil.copytree(FIXTURES / name, ck)
    return ck


def _edit_config(ck: Path, **changes) -> None:
    path = ck / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(ck: Path, edit) -> None:
    path = ck / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def no_config(ck: Path) -> tuple[str, ...]:
    (ck / "config.json").unlink()
    return (str(ck), "config.json")


def llama_config(ck: Path) -> tuple[str, ...]:
    _edit_config(ck, model_type="llama")
    return (str(ck / "config.json"), "llama", "Gemma 4")


def gemma2_config(ck: Path) -> tuple[str, ...]:
    _edit_config(ck, model_type="gemma2")
    return (str(ck / "config.json"), "gemma2", "Gemma 4")


def config_not_json(ck: Path) -> tuple[str, ...]:
    (ck / "config.json").write_text('{"model_type": "gemma4_text",')
    return (str(ck / "config.json"), "JSON")


def missing_tensor(ck: Path) -> tuple[str, ...]:
    _edit_tensors(ck, lambda t: t.pop(REMOVED))
    return (REMOVED, "missing")


def transposed_tensor(ck: Path) -> tuple[str, ...]:
    def edit(t):
        t[REMOVED] = np.ascontiguousarray(t[REMOVED].T)

    _edit_tensors(ck, edit)
    return (REMOVED, "shape", "[64, 256]", "[256, 64]")


def truncated_tensor(ck: Path) -> tuple[str, ...]:
    def edit(t):
        t[REMOVED] = np.ascontiguousarray(t[REMOVED][:100])

    _edit_tensors(ck, edit)
    return (REMOVED, "shape", "[100, 64]", "[256, 64]")


def wrong_embedding_shape(ck: Path) -> tuple[str, ...]:
    # read in blocks of rows (a different code path from the per-weight reads)
    def edit(t):
        t["model.embed_tokens.weight"] = np.ascontiguousarray(t["model.embed_tokens.weight"][:, :32])

    _edit_tensors(ck, edit)
    return ("model.embed_tokens.weight", "shape")


def truncated_safetensors_data(ck: Path) -> tuple[str, ...]:
    path = ck / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return (str(path), "truncated")


def truncated_safetensors_header(ck: Path) -> tuple[str, ...]:
    path = ck / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:200])
    return (str(path),)


def no_safetensors(ck: Path) -> tuple[str, ...]:
    (ck / "model.safetensors").unlink()
    return (str(ck), "model.safetensors")


BAD_CHECKPOINTS = [
    no_config, llama_config, gemma2_config, config_not_json, missing_tensor, transposed_tensor,
    truncated_tensor, wrong_embedding_shape, truncated_safetensors_data, truncated_safetensors_header,
    no_safetensors,
]


@pytest.mark.parametrize("damage", BAD_CHECKPOINTS, ids=lambda f: f.__name__)
def test_convert_bad_checkpoint(tmp_path, damage):
    ck = _copy_checkpoint(tmp_path)
    names = damage(ck)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    checkpoint_before = tree(ck)

    result = run_tool(CONVERT, str(ck), "-o", str(out_dir / "model.tern"), "--quiet")

    assert_clean_failure(result, CONVERT, *names)
    assert tree(out_dir) == {}, "output folder is not empty (partial file or output left behind)"
    assert tree(ck) == checkpoint_before, "the checkpoint folder was modified"


def test_convert_bad_checkpoint_multimodal_names(tmp_path):
    """A missing tensor in a checkpoint with multimodal names (model.language_model.*) is named as such."""
    ck = _copy_checkpoint(tmp_path, "tiny_gemma4_mm")
    name = REMOVED.replace("model.", "model.language_model.", 1)
    _edit_tensors(ck, lambda t: t.pop(name))
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    result = run_tool(CONVERT, str(ck), "-o", str(out_dir / "model.tern"), "--quiet")

    assert_clean_failure(result, CONVERT, name, "missing")
    assert tree(out_dir) == {}


@pytest.mark.parametrize(
    "changes, names",
    [
        ({"num_key_value_heads": 0}, ("num_key_value_heads",)),
        ({"num_hidden_layers": "ten"}, ("num_hidden_layers",)),
        ({"num_hidden_layers": None}, ("num_hidden_layers",)),
        ({"hidden_size": -1}, ("hidden_size",)),
    ],
    ids=["zero-kv-heads", "layers-not-a-number", "layers-null", "negative-hidden-size"],
)
def test_convert_gemma4_config_with_invalid_values(tmp_path, changes, names):
    """A Gemma 4 config.json whose values are wrong is bad input too: one line, no traceback."""
    ck = _copy_checkpoint(tmp_path)
    _edit_config(ck, **changes)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    result = run_tool(CONVERT, str(ck), "-o", str(out_dir / "model.tern"), "--quiet")

    # the message must at least say which key is wrong; a traceback never is the answer
    assert_clean_failure(result, CONVERT, *names)
    assert tree(out_dir) == {}


def test_convert_failure_without_quiet_ends_in_one_error_line(tmp_path):
    """Without --quiet, informational log lines may precede the error, but exactly one line is the error,
    it is the last one, and nothing else (no traceback, no stray text) is printed."""
    ck = _copy_checkpoint(tmp_path)
    missing_tensor(ck)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    result = run_tool(CONVERT, str(ck), "-o", str(out_dir / "model.tern"))

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith(f"{CONVERT}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert REMOVED in errors[0]
    assert all(line.startswith(f"{CONVERT}: ") for line in lines), result.stderr
    assert tree(out_dir) == {}


# ---------------------------------------------------------------------------------------------------------
# ferrisres-convert: bad output paths


def test_convert_refuses_existing_output_without_force(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.tern"
    out.write_bytes(b"precious bytes that must survive\n" * 100)
    before = tree(out_dir)

    result = run_tool(CONVERT, str(FIXTURES / "tiny_gemma4"), "-o", str(out), "--quiet")

    assert_clean_failure(result, CONVERT, str(out), "--force")
    assert tree(out_dir) == before, "existing output changed, or a partial file was left"


def test_convert_force_with_bad_checkpoint_keeps_existing_output(tmp_path):
    """--force replaces the output only when the new artifact is complete: a failed conversion
    (here mid-write, at a missing tensor) leaves the old file byte-for-byte and no partial file."""
    ck = _copy_checkpoint(tmp_path)
    names = missing_tensor(ck)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.tern"
    out.write_bytes(b"the previous artifact\n" * 100)
    before = tree(out_dir)

    result = run_tool(CONVERT, str(ck), "-o", str(out), "--force", "--quiet")

    assert_clean_failure(result, CONVERT, *names)
    assert tree(out_dir) == before


def test_convert_into_missing_folder(tmp_path):
    missing = tmp_path / "no" / "such" / "folder"
    before = tree(tmp_path)

    result = run_tool(CONVERT, str(FIXTURES / "tiny_gemma4"), "-o", str(missing / "model.tern"), "--quiet")

    assert_clean_failure(result, CONVERT, str(missing), "does not exist")
    assert not (tmp_path / "no").exists(), "the tool created the missing folder"
    assert tree(tmp_path) == before


def test_convert_checks_the_output_folder_before_reading_the_input(tmp_path):
    """A missing output folder is reported at once, not after the work: here the input is broken too,
    and the one error is the output's."""
    ck = _copy_checkpoint(tmp_path)
    missing_tensor(ck)
    missing = tmp_path / "no-such-folder"

    result = run_tool(CONVERT, str(ck), "-o", str(missing / "model.tern"), "--quiet")

    assert_clean_failure(result, CONVERT, str(missing), "does not exist")


@pytest.mark.parametrize("module,flags", [("gguf", ["--quiet"]), ("tqdm", [])])
def test_convert_without_the_convert_extra_names_it(tmp_path, module, flags):
    """A runtime-only install (`pip install ferrisres`) has neither gguf (GGUF input) nor tqdm (the progress
    bar): one line says which extra to install, instead of a traceback."""
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF" + bytes(60))  # the magic is enough: the gguf package is needed to read on
    model = source if module == "gguf" else FIXTURES / "tiny_gemma4"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = (f"import sys; sys.modules[{module!r}] = None\n"  # as if not installed: its import fails
            "from ferrisres.convert.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, str(model), "-o", str(out_dir / "m.tern"), *flags],
                            capture_output=True, text=True, timeout=120)

    assert_clean_failure(result, CONVERT, module, "pip install 'ferrisres[convert]'")
    assert tree(out_dir) == {}


def test_convert_output_is_a_folder(tmp_path):
    out = tmp_path / "model.tern"
    out.mkdir()
    (out / "keep").write_text("x")
    before = tree(tmp_path)

    result = run_tool(CONVERT, str(FIXTURES / "tiny_gemma4"), "-o", str(out), "--force", "--quiet")

    assert_clean_failure(result, CONVERT, str(out), "folder")
    assert tree(tmp_path) == before


def test_convert_missing_checkpoint_folder(tmp_path):
    missing = tmp_path / "no-checkpoint"
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    result = run_tool(CONVERT, str(missing), "-o", str(out_dir / "model.tern"), "--quiet")

    assert_clean_failure(result, CONVERT, str(missing))
    assert tree(out_dir) == {}
    assert not missing.exists()


# ---------------------------------------------------------------------------------------------------------
# ferrisres-run and ferrisres-inspect: bad artifacts


def text_file(folder: Path, good: Path) -> tuple[Path, tuple[str, ...]]:
    path = folder / "notes.tern"
    path.write_text("this is not an HDF5 file\n" * 20)
    return path, ("not a .tern",)


def empty_file(folder: Path, good: Path) -> tuple[Path, tuple[str, ...]]:
    path = folder / "empty.tern"
    path.write_bytes(b"")
    return path, ("not a .tern",)


def a_folder(folder: Path, good: Path) -> tuple[Path, tuple[str, ...]]:
    path = folder / "folder.tern"
    path.mkdir()
    return path, ("not a regular file",)


def no_such_file(folder: Path, good: Path) -> tuple[Path, tuple[str, ...]]:
    return folder / "absent.tern", ("no such file",)


def truncated_artifact(folder: Path, good: Path) -> tuple[Path, tuple[str, ...]]:
    path = folder / "truncated.tern"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, ()


def plain_hdf5(folder: Path, good: Path) -> tuple[Path, tuple[str, ...]]:
    path = folder / "plain.tern"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(10)
    return path, ("not a .tern",)


def newer_major_version(folder: Path, good: Path) -> tuple[Path, tuple[str, ...]]:
    path = folder / "future.tern"
    shutil.copy(good, path)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = "2.0"
    return path, ("2.0", "newer")


def other_format_attr(folder: Path, good: Path) -> tuple[Path, tuple[str, ...]]:
    path = folder / "other.tern"
    shutil.copy(good, path)
    with h5py.File(path, "r+") as f:
        f.attrs["format"] = "someone.elses.format"
    return path, ("not a .tern", "someone.elses.format")


BAD_ARTIFACTS = [
    text_file, empty_file, a_folder, no_such_file, truncated_artifact, plain_hdf5, newer_major_version,
    other_format_attr,
]


@pytest.fixture(scope="module")
def good_artifact(converted) -> Path:
    return converted("tiny_gemma4")


@pytest.mark.parametrize("tool", [RUN, INSPECT])
@pytest.mark.parametrize("make", BAD_ARTIFACTS, ids=lambda f: f.__name__)
def test_bad_artifact(tmp_path, good_artifact, tool, make):
    folder = tmp_path / "artifacts"
    folder.mkdir()
    path, names = make(folder, good_artifact)
    before = tree(folder)
    args = ["-p", "hello", "-n", "1"] if tool == RUN else []

    result = run_tool(tool, str(path), *args)

    assert_clean_failure(result, tool, str(path), *names)
    assert tree(folder) == before, "the tool created or changed a file"


@pytest.mark.parametrize("tool", [RUN, INSPECT])
def test_newer_minor_version_is_accepted(tmp_path, good_artifact, tool):
    """The contrast case: only a newer *major* version is refused; 1.7 still opens."""
    path = tmp_path / "minor.tern"
    shutil.copy(good_artifact, path)
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = "1.7"
    args = ["-p", "hello", "-n", "1"] if tool == RUN else []

    result = run_tool(tool, str(path), *args)

    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr
