"""The converter never leaves an artifact its own reader refuses, and never takes a name it was not given
(classes 6 and 7 of issue 13).

- input the runtime would refuse (a NaN rope theta, a BOS id outside the vocabulary, a malformed
  tokenizer_config.json or tokenizer.json) is refused before anything is written: one line naming the
  checkpoint and the field, exit 1, no partial file, and with --force the old artifact is intact;
- whatever slips past those checks is caught by reopening the complete file with the reader before it
  takes the final name;
- a file created under the final name during a conversion is never replaced without --force;
- a cleaner that locks a new partial file before its writer does cannot make the writer write into a
  file that is then deleted (which put a file without its data under the final name).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES
from ferrisres.format import Artifact, ArtifactError, ArtifactWriter
from ferrisres.format.writer import partial_files
from hostile import refused, run_boxed

CONVERT = "ferrisres-convert"


def _checkpoint(tmp_path: Path, edit_file: str, change) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(FIXTURES / "tiny_gemma4", folder)
    path = folder / edit_file
    path.write_text(change(path.read_text()))
    return folder


def _json_edit(change):
    return lambda text: json.dumps(change(json.loads(text)))


def _rope_nan(c):
    c["rope_parameters"]["full_attention"]["rope_theta"] = float("nan")
    return c


@pytest.mark.parametrize("edit_file, change, fragment", [
    ("config.json", _json_edit(_rope_nan), "rope full_attention must be"),
    ("config.json", _json_edit(lambda c: {**c, "bos_token_id": 512}), "bos_token_id 512 is not below vocab_size 512"),
    ("tokenizer_config.json", _json_edit(lambda c: {**c, "chat_template": 42}), "chat_template must be"),
    ("tokenizer_config.json", lambda text: "[1, 2]", "tokenizer_config.json"),
    ("tokenizer.json", _json_edit(lambda t: {**t, "padding": {"strategy": {"Fixed": 10**12}}}), "padding must be null"),
], ids=["rope-theta-nan", "bos-outside-vocab", "chat-template-type", "tokenizer-config-not-object", "padding"])
def test_input_the_reader_would_refuse_is_refused_before_writing(converted, tmp_path, edit_file, change, fragment):
    folder = _checkpoint(tmp_path, edit_file, change)
    out = tmp_path / "out.tern"
    shutil.copyfile(converted("tiny_gemma4"), out)
    before = out.read_bytes()
    refused(run_boxed(CONVERT, str(folder), "-o", str(out), "--force", "--quiet"), str(folder), fragment)
    assert out.read_bytes() == before, "the old artifact must be intact"
    assert partial_files(out) == []


def _write_small(path: Path, check=None, overwrite=False, during=None) -> None:
    with ArtifactWriter(path, overwrite=overwrite, check=check) as w:
        w.add_document("model_config.json", "{}")
        w.add_tensor("x", np.zeros(4, np.float32), "f32")
        if during:
            during()


def test_a_file_the_check_refuses_never_takes_the_final_name(tmp_path):
    out = tmp_path / "out.tern"
    out.write_bytes(b"the old artifact")

    def refuse(written: Path):
        assert written != out and written.exists()
        raise ArtifactError(f"{written}: refused")

    with pytest.raises(ArtifactError, match="refused"):
        _write_small(out, check=refuse, overwrite=True)
    assert out.read_bytes() == b"the old artifact" and partial_files(out) == []


def test_the_converter_reopens_what_it_wrote_before_renaming(tmp_path, monkeypatch):
    """What the pre-write checks miss (simulated: a reader refusing every file) leaves nothing behind."""
    from ferrisres.convert import build
    from ferrisres.convert.build import Options, convert
    from ferrisres.convert.errors import ConversionError

    def reader_refuses(path, **kwargs):
        raise ArtifactError(f"{path}: simulated refusal")

    monkeypatch.setattr(build.Artifact, "open", reader_refuses)
    out = tmp_path / "out.tern"
    with pytest.raises(ConversionError, match="the artifact written would not open, so it was not kept: .*simulated"):
        convert(FIXTURES / "tiny_gemma4", out, Options(quant="f32"), progress=False)
    assert not out.exists() and partial_files(out) == []


def test_a_file_created_under_the_final_name_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "out.tern"
    with pytest.raises(ArtifactError, match="was created by someone else while this artifact was being written"):
        _write_small(out, during=lambda: out.write_bytes(b"someone else's"))
    assert out.read_bytes() == b"someone else's" and partial_files(out) == []


def test_with_force_the_final_name_is_replaced(tmp_path):
    out = tmp_path / "out.tern"
    _write_small(out, overwrite=True, during=lambda: out.write_bytes(b"someone else's"))
    with Artifact.open(out, check_model=False) as a:
        assert set(a.tensors) == {"x"}


def test_a_cleaner_locking_the_new_partial_first_cannot_break_the_artifact(tmp_path, monkeypatch):
    """The cleaner (remove_stale_partials in another conversion) locks the partial file between its
    creation and the writer's lock, then deletes it: the writer must start over with a new file."""
    real_mkstemp = tempfile.mkstemp
    cleaner = []

    def mkstemp_raced(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if not cleaner:
            held = os.open(name, os.O_RDONLY)
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the cleaner wins the lock...
            os.unlink(name)  # ...and deletes what it believes was left by a killed writer
            cleaner.append(held)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_raced)
    out = tmp_path / "out.tern"
    data = np.arange(4096, dtype=np.float32)
    with ArtifactWriter(out) as w:
        w.add_document("model_config.json", "{}")
        w.add_tensor("x", data, "f32")
    os.close(cleaner[0])
    with Artifact.open(out, check_model=False) as a:
        assert a.verify() == [] and np.array_equal(a.tensor("x"), data)


def test_force_never_replaces_what_is_not_a_regular_file(tmp_path):
    """`--force -o /dev/null` would have replaced the device with the artifact (as root): a FIFO stands in."""
    fifo = tmp_path / "out.tern"
    os.mkfifo(fifo)
    refused(run_boxed(CONVERT, str(FIXTURES / "tiny_gemma4"), "-o", str(fifo), "--force", "--quiet"),
            f"{fifo} is not a regular file")
    assert fifo.is_fifo() and partial_files(fifo) == []
