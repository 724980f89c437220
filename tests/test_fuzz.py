"""Damaged and hostile `.tern` files never crash, hang or mislead the tools.

Hundreds of mutants of small valid artifacts (the tiny Gemma 4 converted as a ternary student with
int8 tables, as one with its default int6 token table and an int4 per-layer table, as an f32 teacher,
and from its bf16 checkpoint with bf16 tables) go through both tools as a user runs them:

    ferrisres-run MUTANT -p Hi -n 2 --raw
    ferrisres-inspect MUTANT --verify

Each mutation kind says which outcomes it may have, and the test checks every mutant against that:
- "refused": both tools end with one `<tool>: error: ...` line (exit 1) naming the file and the
  problem;
- "runs, verify fails": the data changed but the structure did not; the runtime runs (or stops with
  a clean error) and `--verify` fails naming exactly the changed dataset(s);
- "intact": both succeed, and every tensor the reader hands out is byte-identical to the original's
  (checked inside the inspect process, from the original digests);
- "run refuses, inspect ok": a valid container whose content the runtime cannot use (a tokenizer
  that does not load), said in one clean line.
A traceback, a signal (segfault, abort), a timeout, an unexpected exit code, any stray stderr line or
an outcome the mutation kind does not allow fails the test.

Speed: starting Python with numpy and h5py costs ~0.3 s, 2 x 700 times. So the mutants
(`fuzz_mutants.py`) are made and run by one driver process (`fuzz_driver.py`) that imports the tools
once and forks a process per tool run; this file judges what they did. A few mutants are then run
again through the real console scripts, to check the in-process runs answer exactly as they do.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from fuzz_common import (INSPECT, INSPECT_REFUSES, INTACT, REFUSED, RUN, RUN_REFUSES, TOOL_ARGS, TOOL_TIMEOUT,
                         VERIFY_FAILS, Mutant, layout)
from fuzz_mutants import build_mutants

HERE = Path(__file__).resolve().parent
MAX_RSS_MB = 600  # no tool run may use more, whatever shape a mutant declares
DRIVER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false"}
BAD = "BAD"


def tool_outcome(tool: str, t: dict) -> tuple[str, str]:
    """("ok" | "error" | "digest" | "crash" | "hang" | "unclean", the error line or a reason)."""
    if t["timeout"]:
        return "hang", f"no answer in {TOOL_TIMEOUT:.0f} s"
    if t["rc"] < 0:
        return "crash", f"killed by signal {-t['rc']} ({signal.Signals(-t['rc']).name})"
    return _outcome(tool, t["rc"], t["stderr"])


def _outcome(tool: str, rc: int, err: str) -> tuple[str, str]:
    if "Traceback" in err:
        return "crash", "traceback: " + err.strip().splitlines()[-1][:200]
    lines = err.splitlines()
    if rc == 0:
        clean = err == "" if tool == INSPECT else len(lines) == 1 and "Warning" not in err and "error" not in err
        return ("ok", "") if clean else ("unclean", f"exit 0 with stderr {err[:300]!r}")
    errors = [line for line in lines if line.startswith(f"{tool}: error: ")]
    others = [line for line in lines if line not in errors]
    summary_only = not others or (tool == RUN and len(others) == 1 and "Warning" not in others[0])
    if rc == 1 and len(errors) == 1 and lines[-1] == errors[0] and summary_only:
        return ("digest" if "digest mismatch" in errors[0] else "error"), errors[0]
    return "unclean", f"exit {rc} with stderr {err[:300]!r}"


def judge(m: Mutant, r: dict) -> tuple[str, list[str]]:
    """The mutant's outcome class, and what is wrong with it (nothing, when it is what its kind allows)."""
    if "worker_error" in r:
        return BAD, [f"could not be made or run: {r['worker_error'].strip().splitlines()[-1]}"]
    run_kind, run_line = tool_outcome(RUN, r["tools"][RUN])
    inspect_kind, inspect_line = tool_outcome(INSPECT, r["tools"][INSPECT])
    problems = []
    for tool, kind, line in ((RUN, run_kind, run_line), (INSPECT, inspect_kind, inspect_line)):
        if kind in ("crash", "hang", "unclean"):
            problems.append(f"{tool}: {kind}: {line}")
        rss = r["tools"][tool]["max_rss_mb"]
        if rss > MAX_RSS_MB:
            problems.append(f"{tool}: used {rss:.0f} MB")
    if problems:
        return BAD, problems
    if run_kind == "error" and inspect_kind == "error":
        outcome = REFUSED
    elif inspect_kind == "digest":
        outcome = VERIFY_FAILS
    elif run_kind == "ok" and inspect_kind == "ok":
        outcome = INTACT
    elif run_kind == "error" and inspect_kind == "ok":
        outcome = RUN_REFUSES
    else:
        outcome = INSPECT_REFUSES
    if outcome not in m.expect:
        problems.append(f"{outcome}, expected {' or '.join(sorted(m.expect))}: run: {run_line or 'ok'} | "
                        f"inspect: {inspect_line or 'ok'}")
    if outcome in (REFUSED, RUN_REFUSES):
        lines = [run_line] if outcome == RUN_REFUSES else [run_line, inspect_line]
        for line in lines:
            missing = [w for w in m.words if w not in line]
            if missing:
                problems.append(f"error line does not name {missing}: {line}")
        if outcome == REFUSED and r["path"] not in inspect_line:
            problems.append(f"error line does not name the file: {inspect_line}")
    if outcome == VERIFY_FAILS and m.verify is not None:
        found = re.search(r"digest mismatch in (.+?): ", inspect_line)
        named = sorted(found.group(1).split(", ")) if found else None
        if named != sorted(m.verify):
            problems.append(f"--verify named {named}, not {sorted(m.verify)}")
    content = r["tools"][INSPECT]["content"]
    if outcome == INTACT and content is not None and m.same_data and (content["changed"] or content["missing tensors"]):
        problems.append(f"verify passed but the reader hands out changed data: {content}")
    if outcome == INTACT and content is not None and (content["extra"] or content["missing documents"]):
        outcome = INTACT + " (documents differ)"
    return outcome, problems


# ---------------------------------------------------------------------------------------------------------
# the test


def test_fuzz(converted, tmp_path):
    bases = {
        "ternary": converted("tiny_gemma4", tables="int8"),
        "f32": converted("tiny_gemma4", "f32"),
        "bf16": converted("tiny_gemma4_bf16", tables="bf16"),
        "grouped": converted("tiny_gemma4", per_layer_table="int4-g32"),  # the default int6 token table (and head)
        "base3": converted("tiny_gemma4", method="rtn", packing="base3"),
    }
    work = tmp_path / "mutants"
    work.mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"bases": {k: str(v) for k, v in bases.items()}, "work": str(work),
                                "jobs": os.cpu_count() or 2}))
    out = tmp_path / "results.json"
    env = {**os.environ, **DRIVER_ENV}
    t0 = time.perf_counter()
    driver = subprocess.run([sys.executable, str(HERE / "fuzz_driver.py"), str(spec), str(out)], env=env,
                            capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - t0
    assert driver.returncode == 0 and out.exists(), f"the fuzz driver failed:\n{driver.stderr[-3000:]}"
    results = json.loads(out.read_text())
    mutants = build_mutants(bases)
    assert set(results) == {m.name for m in mutants}

    tally: dict[str, Counter] = defaultdict(Counter)
    problems: dict[str, list[str]] = {}
    for m in mutants:
        outcome, wrong = judge(m, results[m.name])
        tally[m.family][outcome] += 1
        if wrong:
            problems[m.name] = wrong

    runs = [t for r in results.values() if "tools" in r for t in r["tools"].values()]
    print(f"\n{len(mutants)} mutants, {len(runs)} tool runs in {seconds:.1f} s with {os.cpu_count()} workers; "
          f"a tool run takes {np.mean([t['seconds'] for t in runs]) * 1000:.0f} ms on average, "
          f"{max(t['seconds'] for t in runs):.2f} s at most, {max(t['max_rss_mb'] for t in runs):.0f} MB at most")
    classes = sorted({c for counts in tally.values() for c in counts})
    print(f"{'mutation kind':<22}" + "".join(f"{c[:24]:>26}" for c in classes))
    for family, counts in tally.items():
        print(f"{family:<22}" + "".join(f"{counts.get(c, 0):>26}" for c in classes))
    total = Counter()
    for counts in tally.values():
        total.update(counts)
    print(f"{'all':<22}" + "".join(f"{total.get(c, 0):>26}" for c in classes))

    assert not problems, f"{len(problems)} mutants misbehave:\n" + "\n".join(
        f"  {name}: {'; '.join(p)}" for name, p in list(problems.items())[:60])
    assert len(mutants) >= 300
    for label in ("ternary", "f32"):  # every dataset had a byte of its data changed (bf16: its bf16 tensors)
        flipped = {m.name.split("/", 2)[2] for m in mutants if m.name.startswith(f"data flip/{label}/")}
        assert flipped == set(layout(bases[label])), f"data flips of {label} miss datasets"

    # The in-process runs answer as the real console scripts do: same exit code, same error line.
    from conftest import run_tool

    checked = 0
    for m in mutants:
        if not m.keep:
            continue
        r = results[m.name]
        for tool in (RUN, INSPECT):
            real = run_tool(tool, r["path"], *TOOL_ARGS[tool], timeout=60, env=env)
            fake = r["tools"][tool]
            assert real.returncode == fake["rc"], (m.name, tool, real.returncode, fake["rc"], real.stderr)
            assert tool_outcome(tool, {"rc": real.returncode, "stderr": real.stderr, "timeout": False}) == \
                tool_outcome(tool, fake), (m.name, tool, real.stderr, fake["stderr"])
            if tool == INSPECT:
                assert real.stdout == fake["stdout"], (m.name, real.stdout, fake["stdout"])
            checked += 1
    assert checked >= 20


def test_no_code_execution_paths():
    """The code that reads artifacts and checkpoints (format/, runtime/, convert/) has no way to run what
    a file holds: no pickle or marshal, no eval/exec/compile/__import__, no np.load (it can unpickle),
    no Jinja outside the immutable sandbox."""
    root = HERE.parent
    unpicklers = {"pickle", "_pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
    found = []
    for folder in ("format", "runtime", "convert", "cli"):
        for path in sorted((root / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, ast.Import):
                    found += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in unpicklers]
                elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in unpicklers:
                    found.append(f"{where} imports from {node.module}")
                elif isinstance(node, ast.Call):
                    f = node.func
                    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                    if isinstance(f, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                        found.append(f"{where} calls {name}()")
                    if name in ("Environment", "SandboxedEnvironment", "Template", "NativeEnvironment"):
                        found.append(f"{where} builds a Jinja {name} (not the immutable sandbox)")
                    if name == "load" and isinstance(f, ast.Attribute) and getattr(f.value, "id", "") in ("np", "numpy"):
                        found.append(f"{where} calls np.load (it can unpickle)")
                    if any(k.arg == "allow_pickle" for k in node.keywords):
                        found.append(f"{where} passes allow_pickle")
    assert not found, "\n".join(found)
    assert "ImmutableSandboxedEnvironment" in (root / "runtime" / "chat_template.py").read_text()
