"""The fuzz test's driver: `python tests/fuzz_driver.py SPEC OUT`, run by test_fuzz.py.

It imports the tools once and forks: a worker per mutant makes the mutant and forks one fresh process
per tool run, which calls the tool's `main(argv)` with stdout and stderr redirected to files. Every tool
run is still its own process, so a segfault, an abort or a hang in h5py or HDF5 is seen as such (signal,
timeout) and cannot take the driver down. OUT gets, by mutant name, each tool's exit code, output, time
and peak memory.
"""

from __future__ import annotations

import gc
import io
import json
import os
import resource
import select
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from fuzz_common import INSPECT, RUN, TOOL_ARGS, TOOL_TIMEOUT, Mutant, layout
from fuzz_mutants import build_mutants

MEMORY_LIMIT = 3 << 30  # address space of each tool run: a huge allocation fails rather than swamps CI


def drive(spec_path: str, out_path: str) -> None:
    """Make and run every mutant of the base artifacts SPEC names, `jobs` workers at a time."""
    import ferrisres.format.inspect  # noqa: F401  (imported once here, used in every forked tool run)
    import ferrisres.runtime.cli  # noqa: F401

    spec = json.loads(Path(spec_path).read_text())
    bases = {k: Path(v) for k, v in spec["bases"].items()}
    work = Path(spec["work"])
    mutants = build_mutants(bases)
    originals = {label: {d.key: [d.digest, d.encoding, list(d.shape), list(d.stored_shape)]
                         for d in layout(path).values()} for label, path in bases.items()}
    jobs = max(1, int(spec["jobs"]))
    pending = list(enumerate(mutants))
    gc.freeze()  # forked children then do not copy the driver's pages to collect them
    running: dict[int, tuple[int, Mutant, Path]] = {}
    results = {}
    sys.stdout.flush()
    sys.stderr.flush()
    while pending or running:
        while pending and len(running) < jobs:
            i, m = pending.pop(0)
            folder = work / f"m{i:04d}"
            folder.mkdir()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    _worker(m, bases, folder, originals.get(m.base))
                except BaseException:
                    (folder / "worker-error.txt").write_text(traceback.format_exc())
                    code = 1
                os._exit(code)
            running[pid] = (i, m, folder)
        pid, status = os.waitpid(-1, 0)
        if pid not in running:
            continue
        i, m, folder = running.pop(pid)
        result_file = folder / "result.json"
        if result_file.exists():
            results[m.name] = json.loads(result_file.read_text())
        else:
            error = folder / "worker-error.txt"
            results[m.name] = {"worker_error": error.read_text() if error.exists() else f"worker died ({status})"}
        results[m.name]["path"] = str(folder / "mutant.tern")
        if not m.keep and "worker_error" not in results[m.name]:
            shutil.rmtree(folder, ignore_errors=True)
    Path(out_path).write_text(json.dumps(results))


def _worker(m: Mutant, bases: dict[str, Path], folder: Path, original: dict | None) -> None:
    target = folder / "mutant.tern"
    t0 = time.perf_counter()
    m.make(bases.get(m.base), target)
    result = {"make_seconds": time.perf_counter() - t0, "tools": {}}
    for tool in (RUN, INSPECT):
        result["tools"][tool] = _run_tool(tool, target, folder, original)
    (folder / "result.json").write_text(json.dumps(result))


def _run_tool(tool: str, target: Path, folder: Path, original: dict | None) -> dict:
    out, err, content = folder / f"{tool}.out", folder / f"{tool}.err", folder / f"{tool}.content.json"
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _tool_process(tool, target, out, err, content, original)
    timed_out = not _wait_for(pid, TOOL_TIMEOUT)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    return {
        "rc": os.waitstatus_to_exitcode(status),
        "timeout": timed_out,
        "seconds": time.perf_counter() - t0,
        "max_rss_mb": usage.ru_maxrss / 1024,
        "stdout": out.read_text(errors="replace")[:4000] if out.exists() else "",
        "stderr": err.read_text(errors="replace")[:8000] if err.exists() else "",
        "content": json.loads(content.read_text()) if content.exists() else None,
    }


def _wait_for(pid: int, timeout: float) -> bool:
    """True when the child ended within `timeout` (it is not reaped)."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.005)
        return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _tool_process(tool: str, target: Path, out: Path, err: Path, content: Path, original: dict | None):
    """A forked tool run: the tool's main() as its console script would call it. Never returns."""
    code = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                      errors="backslashreplace", line_buffering=True)
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        if tool == RUN:
            from ferrisres.runtime.cli import main
        else:
            from ferrisres.format.inspect import main
        try:
            code = main([str(target), *TOOL_ARGS[tool]])
            code = 0 if code is None else code
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()  # what the console script would show
            code = 1
        if tool == INSPECT and code == 0 and original is not None:
            content.write_text(json.dumps(_content(target, original)))
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
        code = 99
    os._exit(code)


def _content(target: Path, original: dict) -> dict:
    """How what the reader hands out differs from the original artifact: tensors must not differ at all;
    documents may be missing or extra (their names are not covered by digests), not changed."""
    from ferrisres.format import Artifact
    from ferrisres.format.spec import digest

    seen, changed = set(), []
    with Artifact.open(target, check_model=False) as a:
        for group, items in (("meta", a.documents), ("tensors", a.tensors)):
            for name, info in items.items():
                key = f"{group}/{name}"
                seen.add(key)
                view = a.tensor(name) if group == "tensors" else a._view(info)
                now = [digest(np.ascontiguousarray(view)), info.encoding, list(info.shape), list(info.stored_shape)]
                if key in original and now != original[key]:
                    changed.append(key)
    missing = sorted(set(original) - seen)
    return {
        "changed": changed,
        "missing tensors": [k for k in missing if k.startswith("tensors/")],
        "missing documents": [k for k in missing if k.startswith("meta/")],
        "extra": sorted(seen - set(original)),
    }


if __name__ == "__main__":
    drive(sys.argv[1], sys.argv[2])
