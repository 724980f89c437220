"""What every ferrisres command-line tool shares (convert, run, inspect, eval, serve): bad input ends in one
line on stderr, never a traceback.

It imports nothing of ferrisres: each tool names the errors that are its user's.
Exit codes: 0 success, 1 bad input or a failed check, 2 a flag the parser refuses, 130 interrupted
(Ctrl-C), 141 output pipe closed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from argparse_dataclass import ArgumentParser

MAX_TEXT_BYTES = 64 << 20  # far more text than any context holds (131,072 tokens are ~0.5 MB of text)


def parse_args(options_class, prog: str, description: str, argv: list[str] | None, repeatable: str | None = None):
    """Parse `argv` into the dataclass `options_class`. The flag `repeatable` (e.g. "--stop") may be
    given many times; its values are returned as a list beside the options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values, rest = [], []
    i = 0
    while i < len(argv):
        if repeatable and argv[i] == repeatable and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
            continue
        if repeatable and argv[i].startswith(repeatable + "="):
            values.append(argv[i].split("=", 1)[1])
        else:
            rest.append(argv[i])
        i += 1
    parser = ArgumentParser(options_class, prog=prog, description=description,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: sys.exit(fail(prog, message) + 1)  # argparse's usage block above it hid it
    args = parser.parse_args(rest)
    return (args, values) if repeatable else args


def run_main(prog: str, body: Callable[[], int], user_errors: tuple[type[BaseException], ...]) -> int:
    """Run a tool's `body`, turning expected failures (`user_errors`: the errors whose message is meant for
    the user, e.g. ArtifactError) into `prog: error: message` and an exit code."""
    try:
        return body()
    except user_errors as e:
        return fail(prog, str(e))
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            return _closed_pipe()
        where = f"{e.filename}: " if e.filename else ""
        return fail(prog, f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except MemoryError as e:  # raised anywhere: a tool that knows what was too large says so in the message
        return fail(prog, str(e) or "out of memory")


def read_text(source: str, what: str) -> str:
    """The UTF-8 text of file `source` (- = stdin), read to a bound: a text file given to a tool may be
    /dev/zero or a pipe that never ends."""
    where = "stdin" if source == "-" else source
    with (open(sys.stdin.fileno(), "rb", closefd=False) if source == "-" else open(source, "rb")) as f:
        data = f.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise ValueError(f"{what} from {where} is larger than {MAX_TEXT_BYTES >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} from {where} is not valid UTF-8 (byte {e.start})") from None


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


def _closed_pipe() -> int:
    # The reader went away (e.g. `| head`): point stdout at /dev/null so the exit flush cannot fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141
