"""What the three ferrisres command-line tools share: bad input ends in one line on stderr, never a traceback.

Exit codes: 0 success, 1 bad input or a failed check, 130 interrupted (Ctrl-C), 141 output pipe closed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from argparse_dataclass import ArgumentParser

from .errors import ArtifactError


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
    args = parser.parse_args(rest)
    return (args, values) if repeatable else args


def run_main(prog: str, body: Callable[[], int], user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a tool's `body`, turning expected failures into `prog: error: message` and an exit code."""
    try:
        return body()
    except (ArtifactError, *user_errors) as e:
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


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 1


def _closed_pipe() -> int:
    # The reader went away (e.g. `| head`): point stdout at /dev/null so the exit flush cannot fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141
