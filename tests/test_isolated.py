"""format/isolated.py: work on untrusted input in a bounded child, collected now or later."""

from __future__ import annotations

import gc
import os
import time

import pytest

from ferrisres.format.isolated import Isolated, run_isolated


class Refused(Exception):
    pass


def _children() -> set[int]:
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        return {int(pid) for pid in f.read().split()}


def test_a_result_comes_back_and_errors_come_back_as_the_given_type():
    assert run_isolated(lambda: {"a": [1, 2]}, seconds=10, memory=1 << 30, error=Refused, what="work") == {"a": [1, 2]}

    def refuse():
        raise Refused("no")
    with pytest.raises(Refused, match="^no$"):
        run_isolated(refuse, seconds=10, memory=1 << 30, error=Refused, what="work")
    with pytest.raises(Refused, match="work failed .MemoryError"):
        run_isolated(lambda: len(bytearray(1 << 31)), seconds=10, memory=1 << 28, error=Refused, what="work")
    with pytest.raises(Refused, match="work did not finish in 1 s"):
        run_isolated(lambda: time.sleep(30), seconds=1, memory=1 << 30, error=Refused, what="work")


def test_work_started_now_is_collected_later_and_a_child_never_collected_is_reaped():
    pending = Isolated(lambda: os.getpid(), seconds=10, memory=1 << 30, error=Refused, what="work")
    child = pending.pid
    assert child in _children()
    time.sleep(0.2)  # the caller's own work meanwhile
    assert pending.result() == child and child not in _children()
    with pytest.raises(RuntimeError, match="already taken"):
        pending.result()

    # collected after its deadline: work done in time counts, however late the caller asks for it
    pending = Isolated(lambda: "done", seconds=1, memory=1 << 30, error=Refused, what="work")
    time.sleep(1.5)
    assert pending.result() == "done"
    pending = Isolated(lambda: time.sleep(30), seconds=1, memory=1 << 30, error=Refused, what="work")
    time.sleep(1.5)
    with pytest.raises(Refused, match="work did not finish in 1 s"):
        pending.result()

    for forget in (lambda p: p.close(), lambda p: None):  # closed, or dropped and garbage-collected
        pending = Isolated(lambda: time.sleep(30), seconds=60, memory=1 << 30, error=Refused, what="work")
        child = pending.pid
        forget(pending)
        del pending
        gc.collect()
        assert child not in _children()  # killed and reaped: no zombie left behind
