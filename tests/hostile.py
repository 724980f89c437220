"""What the hostile-input test families share: run a tool as a user would, but boxed in, and judge it.

Every run is a fresh process of the console script under a timeout and an address-space limit
(RLIMIT_AS), so a hang is a timeout, a runaway allocation fails inside the tool (where it must end in
one clean line), and neither can take the machine down. `refused` states the outcome every hostile
input must have: exit 1, exactly one line `<tool>: error: ...` naming the file (or flag) and the
problem, no traceback, no stray warning line, no signal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TIMEOUT = 60.0  # seconds: a normal run of the tiny model takes well under 5
MEMORY_LIMIT = 1 << 30  # bytes of address space: numpy, h5py and tokenizers start in ~0.5 GB
_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_mb: float  # the largest resident set of the tool and of any child process it waited for


def run_boxed(tool: str, *args: str, memory: int = MEMORY_LIMIT, timeout: float = TIMEOUT,
              stdin: bytes | None = None) -> Run:
    """Run console script `tool` with `args` (str or bytes) under the limits."""
    exe = str(Path(sys.executable).parent / tool)
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as given, \
            tempfile.NamedTemporaryFile("r") as report:
        given.write(stdin or b"")
        given.seek(0)
        p = subprocess.Popen([sys.executable, "-c", _LAUNCHER, report.name, str(memory), exe, *args], stdin=given,
                             stdout=out, stderr=err, env={**os.environ, **_ENV}, start_new_session=True)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            raise
        status, peak_kb = map(int, report.read().split())
        out.seek(0)
        err.seek(0)
        decode = lambda b: b.decode("utf-8", "replace")  # noqa: E731
        return Run([tool, *map(str, args)], os.waitstatus_to_exitcode(status), decode(out.read()),
                   decode(err.read()), time.monotonic() - start, peak_kb / 1024)


# The tool runs as the child of a small, freshly exec'd launcher that reports its wait status and peak
# memory: a process forked from pytest itself would count pytest's resident pages as its own until
# it execs (Linux carries the high-water mark across exec).
_LAUNCHER = """
import os, resource, sys
report, memory, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    os.execv(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    f.write(f"{status} {usage.ru_maxrss}")
"""


def refused(run: Run, *fragments: str) -> str:
    """Assert `run` ended as bad input must: exit 1, one `<tool>: error:` line containing `fragments`."""
    lines = run.stderr.splitlines()
    where = f"{run.args}: exit {run.returncode}, stderr:\n{run.stderr[-3000:]}"
    assert run.returncode == 1, where  # a signal shows as a negative code
    assert "Traceback" not in run.stderr, where
    assert len(lines) == 1 and lines[0].startswith(f"{run.args[0]}: error: "), where
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in: {lines[0]}"
    return lines[0]


def ran(run: Run) -> None:
    """Assert `run` succeeded with no traceback or warning on stderr beyond its summary."""
    assert run.returncode == 0 and "Traceback" not in run.stderr and "Warning" not in run.stderr, \
        f"{run.args}: exit {run.returncode}, stderr:\n{run.stderr[-3000:]}"


# ---- making hostile artifacts from a valid one ----

def with_documents(src: Path, dst: Path, **documents: str | bytes | dict | None) -> Path:
    """A copy of artifact `src` at `dst` whose documents are replaced (None deletes one), digests right:
    `with_documents(a, b, tokenizer_json=...)` (underscores stand for the dots of the names)."""
    import h5py

    from ferrisres.format.spec import digest

    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+", alignment_threshold=1, alignment_interval=4096) as f:
        for key, content in documents.items():
            name = key.replace("_json", ".json").replace("_jinja", ".jinja")
            if f"meta/{name}" in f:
                del f[f"meta/{name}"]
            if content is None:
                continue
            if isinstance(content, dict):
                content = json.dumps(content)
            raw = np.frombuffer(content.encode("utf-8") if isinstance(content, str) else content, dtype=np.uint8)
            ds = f["meta"].create_dataset(name, data=raw)
            ds.attrs["encoding"] = "bytes"
            ds.attrs["blake2b"] = digest(raw)
    return dst


def document(path: Path, name: str):
    """Document `name` of artifact `path`, parsed when it is JSON."""
    from ferrisres.format import Artifact

    with Artifact.open(path, check_model=False) as artifact:
        text = artifact.document(name)
    return json.loads(text) if name.endswith(".json") else text
