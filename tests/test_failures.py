"""Converter failures lose nothing: no file under the final name unless it is complete, no temporary
file left behind, and one line saying what went wrong.

- the artifact is written to `.NAME.<random>.partial` and renamed; an existing output is refused
  without --force, and with --force it is replaced only by a complete artifact;
- a full disk (a 1 MB tmpfs) ends in `cannot write ...: No space left on device`, temp removed,
  at whatever point the space runs out;
- SIGINT mid-conversion: exit 130, SIGTERM: exit 143, nothing under the final name, no temp;
- SIGKILL mid-conversion: nothing under the final name; the partial file stays, and the next
  conversion to that output removes it (a partial file still locked by a live writer is kept);
- truncated or corrupt safetensors, NaN/Inf in a weight, missing tokenizer files: one line naming
  the file or tensor, nothing left.

The conversions to interrupt use a synthetic checkpoint: the tiny Gemma 4 config with 60 layers
(~1700 datasets to write, a few seconds), generated with numpy and `safetensors.numpy.save_file`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, run_tool
from ferrisres.format import ArtifactWriter, weight_shapes
from ferrisres.format.writer import partial_files, remove_stale_partials

CONVERT, INSPECT = "ferrisres-convert", "ferrisres-inspect"
LATE_TENSOR = "model.layers.9.mlp.down_proj.weight"  # read near the end of a tiny_gemma4 conversion


def files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def assert_one_error_line(result, *words: str, code: int = 1) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {result.stderr!r}"
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def copy_checkpoint(tmp_path: Path, name: str = "tiny_gemma4") -> Path:
    ck = tmp_path / "checkpoint"
    shutil.copytree(FIXTURES / name, ck)
    return ck


# ---------------------------------------------------------------------------------------------------------
# a checkpoint slow enough to interrupt


@pytest.fixture(scope="session")
def deep_checkpoint(tmp_path_factory) -> Path:
    """tiny_gemma4 with 60 layers (no KV sharing): ~1000 weights, a few seconds to convert."""
    from ferrisres.convert.hf_config import eos_token_ids, model_config, read_config

    ck = tmp_path_factory.mktemp("deep") / "checkpoint"
    ck.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(FIXTURES / "tiny_gemma4" / name, ck / name)
    config = json.loads((FIXTURES / "tiny_gemma4" / "config.json").read_text())
    layers = 60
    config.update(num_hidden_layers=layers, num_kv_shared_layers=0,
                  layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * (layers // 5))
    (ck / "config.json").write_text(json.dumps(config))
    text, _ = read_config(ck)
    shapes = weight_shapes(model_config(text, eos_token_ids(text, None)))
    rng = np.random.default_rng(0)
    tensors = {
        "model." + name + ("" if name.endswith("layer_scalar") else ".weight"):
            (rng.standard_normal(shape, dtype=np.float32) * 0.05) for name, shape in shapes.items()
    }
    save_file(tensors, str(ck / "model.safetensors"))
    return ck


def start_conversion(checkpoint: Path, out: Path, *args: str) -> subprocess.Popen:
    tool = Path(sys.executable).parent / CONVERT
    return subprocess.Popen([str(tool), str(checkpoint), "-o", str(out), "--quiet", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_partial(proc: subprocess.Popen, out: Path, min_bytes: int = 1 << 20, timeout: float = 60) -> Path:
    """The conversion's partial file, once it holds `min_bytes` (the conversion is then well under way)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the conversion ended before it could be interrupted: {proc.communicate()}"
        found = partial_files(out)
        if found and found[0].exists() and found[0].stat().st_size >= min_bytes:
            return found[0]
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no partial file appeared")


# ---------------------------------------------------------------------------------------------------------
# the temporary file and the rename


def test_writer_uses_a_locked_partial_file_then_renames(tmp_path):
    out = tmp_path / "model.tern"
    with ArtifactWriter(out) as w:
        w.add_tensor("t", np.ones((4, 4), np.float32), "f32")
        (partial,) = partial_files(out)
        assert partial.name.startswith(".model.tern.") and partial.name.endswith(".partial")
        assert not out.exists(), "the final name exists before the artifact is complete"
        removed, in_use = remove_stale_partials(out)  # a live writer's file is never taken for stale
        assert (removed, in_use) == ([], [partial]) and partial.exists()
    assert files(tmp_path) == ["model.tern"]
    assert partial_files(out) == []


def test_existing_output_is_refused_without_force_and_replaced_whole_with_it(tmp_path):
    out = tmp_path / "model.tern"
    out.write_bytes(b"the previous artifact\n" * 100)

    refused = run_tool(CONVERT, str(FIXTURES / "tiny_gemma4"), "-o", str(out), "--quiet")

    assert_one_error_line(refused, str(out), "already exists", "--force")
    assert out.read_bytes() == b"the previous artifact\n" * 100
    assert files(tmp_path) == ["model.tern"]

    before = out.stat().st_ino
    replaced = run_tool(CONVERT, str(FIXTURES / "tiny_gemma4"), "-o", str(out), "--quiet", "--force")

    assert replaced.returncode == 0, replaced.stderr
    assert files(tmp_path) == ["model.tern"]
    assert out.stat().st_ino != before, "the output was rewritten in place instead of replaced by a rename"
    assert run_tool(INSPECT, str(out), "--verify").returncode == 0


# ---------------------------------------------------------------------------------------------------------
# disk full


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of that size, unmounted at the end."""
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        folder = tmp_path / f"disk-{size}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.mark.parametrize("size", ["64k", "400k", "1m", "2m"])
def test_disk_full(small_disk, size):
    """The tiny artifact is ~3 MB: each size runs out at another point (documents, tensors, the end)."""
    disk = small_disk(size)
    out = disk / "model.tern"

    result = run_tool(CONVERT, str(FIXTURES / "tiny_gemma4"), "-o", str(out), "--quiet")

    assert_one_error_line(result, CONVERT, f"cannot write {out}", "No space left on device")
    assert files(disk) == [], "the partial file (or an output) was left on the full disk"


def test_disk_full_with_force_keeps_the_old_artifact(small_disk, converted):
    disk = small_disk("1m")
    out = disk / "model.tern"
    out.write_bytes(b"the previous artifact\n" * 1000)

    result = run_tool(CONVERT, str(FIXTURES / "tiny_gemma4"), "-o", str(out), "--quiet", "--force")

    assert_one_error_line(result, "No space left on device")
    assert files(disk) == ["model.tern"]
    assert out.read_bytes() == b"the previous artifact\n" * 1000


# ---------------------------------------------------------------------------------------------------------
# signals


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_mid_conversion_leaves_nothing(deep_checkpoint, tmp_path, sig, code, word):
    out = tmp_path / "model.tern"
    proc = start_conversion(deep_checkpoint, out, "--method", "rtn")  # the artifact's partial file itself
    wait_for_partial(proc, out)

    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)

    assert proc.returncode == code, (proc.returncode, stderr)
    assert "Traceback" not in stderr
    assert stderr.splitlines() == [f"{CONVERT}: {word}"], stderr
    assert files(tmp_path) == [], "a partial file or an output was left behind"


def test_sigkill_leaves_a_partial_that_the_next_run_removes(deep_checkpoint, tmp_path):
    out = tmp_path / "model.tern"
    proc = start_conversion(deep_checkpoint, out, "--method", "rtn")
    partial = wait_for_partial(proc, out)

    proc.kill()
    proc.communicate(timeout=60)

    assert files(tmp_path) == [partial.name], "SIGKILL cannot clean up: the partial file stays, alone"
    assert not out.exists()

    result = run_tool(CONVERT, str(FIXTURES / "tiny_gemma4"), "-o", str(out))  # not --quiet: it says so

    assert result.returncode == 0, result.stderr
    assert f"removed {partial}, left by an interrupted conversion" in result.stderr
    assert files(tmp_path) == ["model.tern"]
    assert run_tool(INSPECT, str(out), "--verify").returncode == 0


def wait_for_calibration(proc: subprocess.Popen, out: Path, timeout: float = 120) -> Path:
    """The work folder of a calibrating conversion, once its temporary float model is being written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the conversion ended before it could be interrupted: {proc.communicate()}"
        for folder in (p for p in partial_files(out) if p.name.endswith(".work")):
            if any(f.stat().st_size >= 1 << 20 for f in folder.iterdir() if f.is_file()):
                return folder
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no work folder appeared")


def test_sigterm_while_calibrating_leaves_nothing(deep_checkpoint, tmp_path):
    out = tmp_path / "model.tern"
    proc = start_conversion(deep_checkpoint, out)
    wait_for_calibration(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and stderr.splitlines() == [f"{CONVERT}: terminated"], stderr
    assert files(tmp_path) == [], "the calibration's work folder was left behind"


def test_sigkill_while_calibrating_leaves_a_work_folder_that_the_next_run_removes(deep_checkpoint, tmp_path):
    out = tmp_path / "model.tern"
    proc = start_conversion(deep_checkpoint, out)
    folder = wait_for_calibration(proc, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert files(tmp_path) == [folder.name]

    result = run_tool(CONVERT, str(FIXTURES / "tiny_gemma4"), "-o", str(out), "--method", "rtn")
    assert result.returncode == 0, result.stderr
    assert f"removed {folder}, left by an interrupted conversion" in result.stderr
    assert files(tmp_path) == ["model.tern"]


def test_partial_of_a_running_conversion_is_kept(tmp_path):
    """A partial file whose lock is held (a conversion still writing it) is not removed."""
    out = tmp_path / "model.tern"
    busy = tmp_path / ".model.tern.abcd1234.partial"
    busy.write_bytes(b"being written")
    other = tmp_path / ".other.tern.abcd1234.partial"  # another output's: not ours to judge
    other.write_bytes(b"x")
    with open(busy, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)

        result = run_tool(CONVERT, str(FIXTURES / "tiny_gemma4"), "-o", str(out), "--quiet")

    assert result.returncode == 0, result.stderr
    assert f"{busy} is being written by another conversion" in result.stderr
    assert files(tmp_path) == sorted([busy.name, other.name, "model.tern"])


# ---------------------------------------------------------------------------------------------------------
# bad input found mid-way


def rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header with `edit(header)`, keeping its data bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


def set_entry(name: str, **changes):
    return lambda header: header[name].update(changes)


def swap_offsets(header):
    a, b = header["model.layers.0.input_layernorm.weight"], header["model.layers.0.post_attention_layernorm.weight"]
    a["data_offsets"] = b["data_offsets"]  # two tensors on the same bytes


CORRUPT_SAFETENSORS = {
    "header length past the end": (lambda p: p.write_bytes(struct.pack("<Q", 10**9) + p.read_bytes()[8:]),
                                   ("model.safetensors", "header length")),
    "header not JSON": (lambda p: p.write_bytes(p.read_bytes()[:8] + b"\xff" + p.read_bytes()[9:]),
                        ("model.safetensors", "corrupt")),
    "shape overflowing int64": (lambda p: rewrite_header(p, set_entry(LATE_TENSOR, shape=[2**40, 2**40])),
                                (LATE_TENSOR,)),
    "negative shape": (lambda p: rewrite_header(p, set_entry(LATE_TENSOR, shape=[-256, -64])), (LATE_TENSOR,)),
    "offsets as strings": (lambda p: rewrite_header(p, set_entry(LATE_TENSOR, data_offsets=["0", "4"])),
                           (LATE_TENSOR,)),
    "offsets past the end": (lambda p: rewrite_header(p, set_entry(LATE_TENSOR, data_offsets=[10**12, 10**12 + 65536])),
                             (LATE_TENSOR, "outside the file")),
    "overlapping tensors": (lambda p: rewrite_header(p, swap_offsets), ("overlap",)),
    "unsupported dtype": (lambda p: rewrite_header(p, set_entry(LATE_TENSOR, dtype="I32")), (LATE_TENSOR, "I32")),
    "truncated data": (lambda p: p.write_bytes(p.read_bytes()[:-1000]), ("model.safetensors", "truncated")),
}


@pytest.mark.parametrize("damage", CORRUPT_SAFETENSORS, ids=list(CORRUPT_SAFETENSORS))
def test_corrupt_safetensors(tmp_path, damage):
    ck = copy_checkpoint(tmp_path)
    make, words = CORRUPT_SAFETENSORS[damage]
    make(ck / "model.safetensors")
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    result = run_tool(CONVERT, str(ck), "-o", str(out_dir / "model.tern"), "--quiet")

    assert_one_error_line(result, CONVERT, *words)
    assert files(out_dir) == []


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("tensor", [LATE_TENSOR, "model.embed_tokens.weight"])
def test_non_finite_weight(tmp_path, tensor, value):
    """Found while writing (the partial file exists by then): named, and the partial file removed."""
    ck = copy_checkpoint(tmp_path)
    tensors = load_file(ck / "model.safetensors")
    tensors[tensor][-1, -1] = value
    save_file(tensors, ck / "model.safetensors")
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    result = run_tool(CONVERT, str(ck), "-o", str(out_dir / "model.tern"), "--quiet")

    assert_one_error_line(result, tensor, "NaN or Inf")
    assert files(out_dir) == []


def test_missing_tokenizer(tmp_path):
    ck = copy_checkpoint(tmp_path)
    (ck / "tokenizer.json").unlink()
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    result = run_tool(CONVERT, str(ck), "-o", str(out_dir / "model.tern"), "--quiet")

    assert_one_error_line(result, str(ck), "tokenizer.json")
    assert files(out_dir) == []


def test_tokenizer_not_utf8(tmp_path):
    ck = copy_checkpoint(tmp_path)
    (ck / "tokenizer.json").write_bytes(b"\xff\xfe not UTF-8")
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    result = run_tool(CONVERT, str(ck), "-o", str(out_dir / "model.tern"), "--quiet")

    assert files(out_dir) == []
    assert_one_error_line(result, "tokenizer.json")


SWALLOWED_SIGNAL = """
import signal, sys, time
from ferrisres.convert import cli

class Finalized:
    def __del__(self):
        signal.raise_signal(getattr(signal, sys.argv[1]))  # handled in here, where Python drops the exception

def conversion(args):
    Finalized()
    time.sleep(5)  # the conversion goes on unless the signal is delivered again
    return 0

cli._convert = conversion
sys.exit(cli.main(["model", "-o", "model.tern"]))
"""


@pytest.mark.parametrize("sig, code, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_signal_landing_in_a_finalizer_still_stops_the_conversion(tmp_path, sig, code, word):
    """h5py frees its objects in weakref callbacks; a signal whose exception is raised in one is printed and
    dropped by Python. ferrisres-convert sends it again, so the conversion still stops, with one line."""
    result = subprocess.run([sys.executable, "-c", SWALLOWED_SIGNAL, sig], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert (result.returncode, result.stderr.splitlines()) == (code, [f"{CONVERT}: {word}"]), result.stderr
