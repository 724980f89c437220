"""`make bench` with --reuse: a kept artifact is taken again only when the code it depends on is unchanged."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import run  # noqa: E402


def _snapshot(root: Path) -> Path:
    """The product packages laid out as bench/run.py's snapshots are (root/ferrisres/<package>)."""
    for sub in run.PRODUCT_PACKAGES:
        shutil.copytree(ROOT / sub, root / "ferrisres" / sub, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edit(snapshot: Path, file: str) -> None:
    path = snapshot / "ferrisres" / file
    path.write_text(path.read_text() + "\n# edited\n")


def test_conversion_digest_follows_the_code_an_artifact_depends_on_and_nothing_else(tmp_path):
    base = run.conversion_digest(_snapshot(tmp_path / "base"))
    assert run.conversion_digest(_snapshot(tmp_path / "again")) == base
    for file in ("runtime/fast_kernels.py", "runtime/server.py", "runtime/cli.py"):  # not run by a conversion
        edited = _snapshot(tmp_path / file.replace("/", "-"))
        _edit(edited, file)
        assert run.conversion_digest(edited) == base, file
    for file in ("convert/gptq.py", "format/writer.py", "runtime/gemma4.py", "runtime/model.py"):  # calibration runs these
        edited = _snapshot(tmp_path / file.replace("/", "-"))
        _edit(edited, file)
        assert run.conversion_digest(edited) != base, file
