"""Run work on untrusted input in a forked child process, under a memory limit and a deadline.

Some work on hostile input cannot be bounded from inside: HDF5 allocates whatever a length field in
the file declares before it checks it, and a Jinja template can loop for ever or build gigabytes in
one C-level string operation. A thread cannot be stopped, and a MemoryError in this process could
strike anywhere; a child can be killed, and its address-space limit (RLIMIT_AS) turns a runaway
allocation into an error inside it. The child sends back its result as JSON, or the message of its
error (never a pickle: the child has just parsed hostile bytes); it leaves with os._exit, so nothing
of the parent (buffers, atexit handlers) runs twice.
Linux (fork, /proc); the child only computes, so the threads fork does not copy are not missed.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import time
from collections.abc import Callable

_MAX_REPLY = 1 << 28  # bytes of a result


def run_isolated(work: Callable[[], object], *, seconds: float, memory: int, error: type[Exception],
                 what: str) -> object:
    """`work()` run in a child allowed `memory` more bytes of address space and `seconds` of time: its
    result (JSON-serializable). An `error` it raises is raised here with the same message; any other
    failure (another exception, a timeout, a crash) raises `error` saying that `what` failed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            _limit_address_space(memory)
            try:
                reply = {"result": work()}
            except error as e:
                reply = {"error": str(e)}
            except Exception as e:  # noqa: BLE001 - every failure of the work is the parent's to report
                reply = {"error": f"{what} failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})"}
            reply = json.dumps(reply).encode()
            with os.fdopen(write_end, "wb") as out:
                out.write(reply)
        finally:
            os._exit(0)
    os.close(write_end)
    reply = None
    try:
        reply = _read(read_end, time.monotonic() + seconds)
    finally:
        os.close(read_end)
        if not isinstance(reply, bytes):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if reply is None:
        raise error(f"{what} did not finish in {seconds:.0f} s")
    if reply is _TOO_LARGE:
        raise error(f"{what} gave a result larger than {_MAX_REPLY >> 20} MiB")
    if not reply:
        raise error(f"{what} ended abnormally ({_describe(status)})")
    reply = json.loads(reply)
    if "error" in reply:
        raise error(reply["error"])
    return reply["result"]


_TOO_LARGE = object()


def _read(fd: int, deadline: float):
    """What the child writes until it closes the pipe; None when the deadline passes first."""
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > _MAX_REPLY:
            return _TOO_LARGE
        chunks.append(chunk)


def _limit_address_space(extra: int) -> None:
    """Allow this process `extra` bytes of address space beyond what it uses now (never above its limit)."""
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = used + extra if soft == resource.RLIM_INFINITY else min(soft, used + extra)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
