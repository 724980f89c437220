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
import weakref
from collections.abc import Callable

_MAX_REPLY = 1 << 28  # bytes of a result


def run_isolated(work: Callable[[], object], *, seconds: float, memory: int, error: type[Exception],
                 what: str) -> object:
    """`work()` run in a child allowed `memory` more bytes of address space and `seconds` of time: its
    result (JSON-serializable). An `error` it raises is raised here with the same message; any other
    failure (another exception, a timeout, a crash) raises `error` saying that `what` failed."""
    return Isolated(work, seconds=seconds, memory=memory, error=error, what=what).result()


class Isolated:
    """`run_isolated` started now and collected later (`result`), so that the caller works meanwhile; a
    child never collected is killed and reaped when this is closed or collected by the garbage collector."""

    def __init__(self, work: Callable[[], object], *, seconds: float, memory: int, error: type[Exception], what: str):
        self.seconds, self.error, self.what = seconds, error, what
        self.deadline = time.monotonic() + seconds
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
        self.pid, self.read_end = pid, read_end
        # at exit too (atexit, while os is still there), unlike __del__
        self._finalizer = weakref.finalize(self, _kill_and_reap, pid, read_end)

    def result(self) -> object:
        reply, status = self._collect()
        if reply is None:
            raise self.error(f"{self.what} did not finish in {self.seconds:.0f} s")
        if reply is _TOO_LARGE:
            raise self.error(f"{self.what} gave a result larger than {_MAX_REPLY >> 20} MiB")
        if not reply:
            raise self.error(f"{self.what} ended abnormally ({_describe(status)})")
        reply = json.loads(reply)
        if "error" in reply:
            raise self.error(reply["error"])
        return reply["result"]

    def close(self) -> None:
        """Kill the child if it is still at work, and reap it."""
        self._finalizer()
        self.pid = None

    def _collect(self):
        if self.pid is None:
            raise RuntimeError(f"{self.what}: the result was already taken or closed")
        self._finalizer.detach()
        reply = None
        try:
            reply = _read(self.read_end, self.deadline)
        finally:
            os.close(self.read_end)
            if not isinstance(reply, bytes):
                os.kill(self.pid, signal.SIGKILL)
            _, status = os.waitpid(self.pid, 0)
            self.pid = None
        return reply, status


def _kill_and_reap(pid: int, read_end: int) -> None:
    os.close(read_end)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


_TOO_LARGE = object()


def _read(fd: int, deadline: float):
    """What the child writes until it closes the pipe; None when the deadline passes before its reply
    begins. The deadline bounds the work, which ends before the child writes a byte; so a reply already
    waiting when the caller collects late (after a long prefill, say) is the child's in time, and once it
    has begun the rest is read to the end."""
    chunks, size = [], 0
    while True:
        if not chunks and not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
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
