#!/usr/bin/env python3
"""Performance at real E2B scale: `make bench` (full, ~1 h 40 min on a 2-core Xeon, most of it the calibrated
conversion) or `make bench QUICK=1` (tiny model, ~2 min).

    python bench/run.py [--quick] [--keep] [--reuse] [--skip-profile] [--peers] [--out bench]
    python bench/run.py --only peers [--quick]           # the llama.cpp comparison alone, into results.json
    python bench/run.py --only tables [--quick]          # the table-encoding variants alone, into results.json
    python bench/run.py --report-only bench/results.json      # rewrite BENCHMARKS.md from the data

1. Makes (or reuses) the synthetic Gemma 4 E2B checkpoints of bench/make_synthetic_e2b.py in bench/.cache/.
2. Converts the main one three ways: dense ternary student (the calibrated default), 2-expert top-2 MoE
   student (`--moe-experts 2`, rounded to nearest), bf16 teacher (`--quant bf16`); the other sizes dense,
   rounded to nearest, for the scaling table.
3. Measures, each in its own subprocess (so peak RSS is per measurement) and as medians over repeats, with
   the runtime's default kernel (`--kernel auto`: int8 with the fast extra, which `make` installs; plan.KERNEL),
   the dense student also with numpy and fast (plan.REFERENCE_KERNELS):
   conversion wall time and peak RSS; artifact size; load time (open -> ready to generate, tokenizer
   included); prefill tok/s at 64 and 256 prompt tokens; decode tok/s over N new tokens after a context
   of 64, 512 and 2048 random token ids; peak RSS while decoding; n-gram draft decoding
   (`draft="ngram"`) against plain greedy; ferrisres-serve's aggregate tok/s at 1, 2, 4 and 8 concurrent
   streams and time to first token, alone and joining busy streams; the machine's DRAM read bandwidth (BLAS sgemv over 1 GiB,
   1 thread and default threads) and the decode ceiling it implies for the bytes each artifact reads per
   token (every tensor a decode step touches, from the artifact's own tensor sizes, plus the KV cache).
4. With --peers (`make bench PEERS=1`): builds llama.cpp, converts the same checkpoint to its TQ2_0
   GGUF and runs its llama-bench beside ferrisres's decode and prefill workers, at 1 and 2 threads, each
   pinned to as many cores (bench/peers.py), for the dense student and the one-plane student (`--planes 1`,
   the same kind of model as TQ2_0). `--only peers` does just that, with both students rounded to nearest
   (`--method rtn`: the default's encodings, so its speed, in minutes), and merges the result into the
   existing results.json. `--only tables` converts and decodes the table-encoding variants
   (plan.TABLE_VARIANTS) beside that dense student, in one run, and merges them the same way.
5. Writes bench/results.json and BENCHMARKS.md (targets beside measurements, bandwidth bound, ratio,
   scaling tables), and in the full run a profile of decode steps (bench/profile_decode.py).

What is measured is in plan.py, each measurement in workers.py, the markdown in report.py.

Everything runs through the public Python API (`ferrisres.runtime.load`, `Model.generate`) and the
converter's command line entry point (`ferrisres.convert.cli.main`), from a snapshot of the product code
taken at the start (bench/.cache/snapshot/<digest>), so that edits made during a run cannot mix versions.
OPENBLAS_* variables are left as the environment has them and recorded. A failed measurement is recorded
and the run goes on. Artifacts are deleted at the end unless --keep; --reuse takes kept artifacts (and
their conversion measurements, from bench/.cache/logs/workers.jsonl) made by the same conversion code: the
same files of what a conversion imports (`conversion_digest`: convert/, format/ and the runtime's numpy path,
which calibration runs), so that a change to the fused kernels, the server or a CLI is measured without
converting again.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import make_synthetic_e2b as synth  # noqa: E402
import peers  # noqa: E402
from plan import FULL, PEER_CONVERSIONS, PEERS, QUICK, QUICK_PEERS, TABLE_VARIANTS  # noqa: E402
from report import report  # noqa: E402
from workers import RESULT_MARK  # noqa: E402

CACHE = HERE / ".cache"
ARTIFACTS = CACHE / "artifacts"
LOGS = CACHE / "logs"
PRODUCT_PACKAGES = ("runtime", "convert", "format", "cli")  # the folders installed as ferrisres.*
WORKER_ENV: dict[str, str] = {}  # PYTHONPATH of the product code snapshot (set in main)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, fewer repeats (checks the harness, < 2 min)")
    ap.add_argument("--keep", action="store_true", help="keep the converted artifacts in bench/.cache/artifacts")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts kept (--keep) from an earlier run of the same product code, with their conversion measurements (with --only tables: any kept variant)")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for results.json of a full run (BENCHMARKS.md goes to the repo root)")
    ap.add_argument("--peers", action="store_true", help="also measure llama.cpp's TQ2_0 beside ferrisres (bench/peers.py; builds it once)")
    ap.add_argument("--only", choices=["peers", "tables"],
                    help="only the llama.cpp comparison, or only the table-encoding variants, merged into the existing results.json")
    ap.add_argument("--report-only", type=Path, metavar="RESULTS_JSON", help="rewrite the markdown report from a results.json")
    args = ap.parse_args(argv)

    if args.report_only:
        r = json.loads(args.report_only.read_text())
        md_path = ROOT / "BENCHMARKS.md" if r["mode"] == "full" else CACHE / "quick" / "BENCHMARKS.md"
        md_path.write_text(report(r))
        print(f"wrote {md_path}", file=sys.stderr)
        return 0
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    results = {"mode": "quick" if args.quick else "full", "plan": plan, "machine": machine_info(), "code": code_info()}
    snapshot = use_snapshot(results)
    print(f"bench ({results['mode']}): load average {results['machine']['loadavg']}; product code snapshot {snapshot}",
          file=sys.stderr)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    attempt = Attempts()
    results["failures"] = attempt.failures
    if args.only == "peers":
        return peers_only(results, plan, attempt, args.out, args.quick, started)
    if args.only == "tables":
        return tables_only(results, plan, attempt, args.out, args.quick, started, args.keep, args.reuse)

    sources = {s: synth.build(s) for s in dict.fromkeys([plan["scale"], *plan["scaling_scales"]])}
    results["checkpoints"] = {s: json.loads((p / "SYNTHETIC.json").read_text()) for s, p in sources.items()}
    results["tokenizer"] = synth.check_tokenizer((sources[plan["scale"]] / "tokenizer.json").read_text(encoding="utf-8"))
    results["bandwidth"] = measure_bandwidth()
    results["code"]["conversion_digest"] = conversion_digest(snapshot)
    arts, written = measure_conversions(results, plan, sources, attempt,
                                        results["code"]["conversion_digest"] if args.reuse else None)
    kernel = plan["kernel"]
    results["load"] = measure_load(plan, arts, attempt)
    results["bytes_per_token"] = per_token_bytes_of(arts, plan, results["load"])
    results["prefill"] = measure_prefill(plan, arts, attempt)
    results["decode"] = measure_decode(plan, arts, attempt)
    results["decode_kernels"] = measure_reference_kernels(plan, arts["dense"], attempt)
    results["draft"] = attempt("draft", {"path": str(arts["dense"]), "new": plan["draft_new"], "kernel": kernel,
                                         "repeats": plan["draft_repeats"]}, label="dense ngram")
    results["scaling_decode"] = measure_scaling_decode(results, plan, attempt)
    results["serve"] = attempt("serve", {"path": str(arts["dense"]), "streams": plan["serve_streams"], "kernel": kernel,
                                         "prompt": plan["serve_prompt"], "new": plan["serve_new"]}, label="dense streams")
    if plan["profile"] and not args.skip_profile:
        results["profile"] = attempt("profile", {"path": str(arts["dense"]), "context": 64, "steps": 4, "kernel": kernel},
                                     label="dense")
    if args.peers:
        students = {"default": arts["dense"], "one-plane": kept_artifact(sources[plan["scale"]], plan, attempt, "one-plane")}
        results["peers"] = peers.measure(sources[plan["scale"]], students, QUICK_PEERS if args.quick else PEERS, attempt)
        results["peers"]["ferrisres_artifact"] = ("the dense student of this run (calibrated default), and the one-plane "
                                                  "student (`--planes 1`) rounded to nearest")

    results["artifact_sizes"] = {name: p.stat().st_size for name, p in arts.items()}
    results["total_seconds"] = time.perf_counter() - started
    results["machine"]["loadavg_end"] = os.getloadavg()
    if not args.keep:  # this run's artifacts only: the rtn ones of --only peers / tables stay for their next run
        for p in written:
            p.unlink(missing_ok=True)
    write_results(_with_earlier_parts(results, args.out, args.quick), args.out, args.quick)
    return 0


def use_snapshot(results: dict) -> Path:
    """Snapshot the product code (snapshot_code) and make this process and every worker import it."""
    snapshot = snapshot_code(results["code"]["product_code_digest"])
    sys.path.insert(0, str(snapshot))
    WORKER_ENV["PYTHONPATH"] = os.pathsep.join([str(snapshot), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    results["code"]["snapshot"] = str(snapshot)
    return snapshot


def peers_only(run: dict, plan: dict, attempt: "Attempts", out: Path, quick: bool, started: float) -> int:
    """`--only peers`: the llama.cpp comparison on the students of plan.PEER_CONVERSIONS, rounded to
    nearest (kept in bench/.cache/artifacts for the next run: the same encodings as the calibrated
    conversion, so the same speed), written into the existing results.json as results["peers"] with this run's machine and code."""
    json_path = _results_to_extend(out, quick, "peers")
    source = synth.build(plan["scale"])
    students = {name: kept_artifact(source, plan, attempt, name) for name in PEER_CONVERSIONS}
    measured = peers.measure(source, students, QUICK_PEERS if quick else PEERS, attempt)
    run["machine"]["loadavg_end"] = os.getloadavg()
    measured.update(ferrisres_artifact="students converted with --method rtn (the calibrated conversion's encodings, so its "
                                       "size and speed): the default, and the one-plane student (`--planes 1`)",
                    machine=run["machine"], code=run["code"], failures=attempt.failures,
                    total_seconds=time.perf_counter() - started)
    results = json.loads(json_path.read_text())
    results["peers"] = measured
    write_results(results, out, quick)
    return 0


def tables_only(run: dict, plan: dict, attempt: "Attempts", out: Path, quick: bool, started: float, keep: bool,
                reuse: bool) -> int:
    """`--only tables`: the dense student rounded to nearest (as `--only peers`) and its table-encoding
    variants, converted and decoded in one run (sizes; decode tok/s and peak RSS after a 64-token context,
    the repeats alternated between the students so that a drift of the machine falls on all of them),
    written into the existing results.json as results["tables"] with this run's machine and code. The
    variants are deleted at the end unless `keep`; with `reuse`, those kept by an earlier run are decoded
    again, not converted (their conversion is not what this measures)."""
    json_path = _results_to_extend(out, quick, "tables")
    source = synth.build(plan["scale"])
    arts, convert = {"dense": kept_artifact(source, plan, attempt)}, {}
    for name, extra in TABLE_VARIANTS.items():
        arts[name] = ARTIFACTS / f"{plan['scale']}-{name}.tern"
        if reuse and arts[name].exists():
            print(f"  convert   {plan['scale']} {name}: reusing {arts[name].name}", file=sys.stderr)
            continue
        r = attempt("convert", {"source": str(source), "out": str(arts[name]), "extra": extra}, label=f"{plan['scale']} {name}")
        convert[name] = _summ_convert([r])
    arts = {name: p for name, p in arts.items() if p.exists() and "error" not in convert.get(name, {})}
    for name, p in arts.items():
        convert.setdefault(name, {})["size_bytes"] = p.stat().st_size
    runs = {name: [] for name in arts}
    for r in range(plan["decode_repeats"][64]):
        for name, p in arts.items():
            runs[name].append(attempt("decode", {"path": str(p), "context": 64, "new": plan["decode_new"], "seed": r},
                                      label=f"{name} ctx 64 #{r}"))
    run["machine"]["loadavg_end"] = os.getloadavg()
    measured = {"convert": convert, "decode": {name: {"64": _summ_decode(rs)} for name, rs in runs.items()},
                "dense": "converted with --method rtn (the default's encodings, so its size and speed)",
                "machine": run["machine"], "code": run["code"], "failures": attempt.failures,
                "total_seconds": time.perf_counter() - started}
    if not keep:
        for name, p in arts.items():
            if name != "dense":
                p.unlink()
    results = json.loads(json_path.read_text())
    results["tables"] = measured
    write_results(results, out, quick)
    return 0


def _with_earlier_parts(results: dict, out: Path, quick: bool) -> dict:
    """`results` with the `--only` parts (peers, tables) of the results.json it replaces, when this run did
    not measure them: each carries its own machine and code, which the report prints beside it."""
    json_path = _results_path(out, quick)
    earlier = json.loads(json_path.read_text()) if json_path.exists() else {}
    return {**{part: earlier[part] for part in ("peers", "tables") if part in earlier}, **results}


def _results_path(out: Path, quick: bool) -> Path:
    """Where a run's results.json goes: the quick run's tiny-model numbers never over the real ones."""
    return CACHE / "quick" / "results.json" if quick else out / "results.json"


def _results_to_extend(out: Path, quick: bool, part: str) -> Path:
    json_path = _results_path(out, quick)
    if not json_path.exists():
        raise SystemExit(f"--only {part}: no {json_path} to add to (run the bench once first)")
    return json_path


def kept_artifact(source: Path, plan: dict, attempt: "Attempts", student: str = "default") -> Path:
    """A student of plan.PEER_CONVERSIONS (rounded to nearest), converted once and kept in bench/.cache/artifacts."""
    name = {"default": "dense"}.get(student, student)
    artifact = ARTIFACTS / f"{plan['scale']}-{name}-rtn.tern"
    if not artifact.exists():
        r = attempt("convert", {"source": str(source), "out": str(artifact), "extra": PEER_CONVERSIONS[student]},
                    label=f"{plan['scale']} {name} rtn")
        if "error" in r or r.get("rc") != 0:
            raise SystemExit(f"the {name} rtn conversion failed (see {LOGS})")
    return artifact


class Attempts:
    """Runs the workers of one benchmark: a failed measurement is recorded in `failures` and the run goes on."""

    def __init__(self):
        self.failures: list[dict] = []

    def __call__(self, kind: str, wargs: dict, **kw) -> dict:
        """A worker's result, or {"error": ...}."""
        try:
            return run_worker(kind, wargs, **kw)
        except RuntimeError as e:
            self.failures.append({"kind": kind, "label": kw.get("label"), "error": str(e)[-1500:]})
            print(f"  FAILED: {str(e).splitlines()[0]}", file=sys.stderr)
            return {"error": str(e)[-1500:]}


def measure_bandwidth() -> dict:
    one = run_worker("bandwidth", {}, env={"OPENBLAS_NUM_THREADS": "1"}, label="1 thread")
    default = run_worker("bandwidth", {}, label="default threads")
    return {"one_thread_gbps": one["gbps"], "default_threads_gbps": default["gbps"], "runs": [one, default]}


def measure_conversions(results: dict, plan: dict, sources: dict, attempt: Attempts, reuse: str | None) -> dict:
    """Converts the main checkpoint into every variant and the other scales dense (results["convert"],
    results["scaling_convert"]); the artifacts of the main scale that converted, by variant, and the paths of
    all the run's artifacts. `reuse`: a conversion digest (`conversion_digest`): kept artifacts, and their
    measurements, of conversion code with this digest are taken instead of converting."""
    main_scale = plan["scale"]
    # The dense student is converted with the default (calibrated) options: its time and memory are the
    # conversion targets. The MoE student is rounded to nearest (--method rtn): the same encodings, so the
    # same decoding speed, in minutes instead of most of an hour. The table-encoding variants are
    # `--only tables`'s (sizes, not this run's targets: they would add two hours).
    variants = {"dense": [], "moe2": ["--moe-experts", "2", "--moe-top-k", "2", "--method", "rtn"],
                "bf16": ["--quant", "bf16"]}
    jobs = [(name, main_scale, extra, plan["convert_repeats"]) for name, extra in variants.items()]
    jobs += [("dense", s, ["--method", "rtn"], plan["scaling_convert_repeats"]) for s in plan["scaling_scales"]
             if s != main_scale]
    arts, conv, scaling_convert, written = {}, {}, {}, []
    for name, scale, extra, repeats in jobs:
        out = ARTIFACTS / f"{scale}-{name}.tern"
        written.append(out)
        wargs = {"source": str(sources[scale]), "out": str(out), "extra": extra}
        earlier = _earlier_conversion(wargs, reuse) if reuse else None
        if earlier is not None:
            print(f"  convert   {scale} {name}: reusing {out.name} and its measurement (code {earlier['code_digest']})",
                  file=sys.stderr)
            runs = [earlier]
        else:
            runs = [attempt("convert", wargs, label=f"{scale} {name}") for _ in range(repeats)]
        summary = _summ_convert(runs)
        summary["artifact"] = str(out)
        if scale == main_scale:
            arts[name], conv[name] = out, summary
        if name == "dense":
            scaling_convert[scale] = summary
    results["convert"] = conv
    results["scaling_convert"] = {s: scaling_convert[s] for s in plan["scaling_scales"] if s in scaling_convert}
    arts = {name: p for name, p in arts.items() if p.exists() and "error" not in conv[name]}
    if "dense" not in arts:
        raise SystemExit("the dense conversion failed: nothing to measure (see bench/.cache/logs)")
    return arts, written


def measure_load(plan: dict, arts: dict, attempt: Attempts) -> dict:
    out = {}
    for name, p in arts.items():
        n = plan["load_repeats"] if name == "dense" else max(1, plan["load_repeats"] // 2)
        runs = [r for r in (attempt("load", {"path": str(p), "kernel": plan["kernel"]}, label=name) for _ in range(n))
                if "error" not in r]
        if runs:
            out[name] = {k: median(r[k] for r in runs)
                         for k in ("load_s", "open_s", "kernels_s", "tokenizer_s", "import_s", "first_token_s")}
            out[name]["kernel"] = runs[0]["kernel"]
            out[name]["runs"] = runs
    return out


def measure_prefill(plan: dict, arts: dict, attempt: Attempts) -> dict:
    out = {}
    for name, p in arts.items():
        reps = plan["prefill_repeats"] if name == "dense" else 1
        lengths = plan["prefill_lengths"] if name == "dense" else plan["prefill_lengths"][-1:]
        out[name] = attempt("prefill", {"path": str(p), "lengths": lengths, "repeats": reps, "kernel": plan["kernel"]},
                            label=name)
    return out


def measure_decode(plan: dict, arts: dict, attempt: Attempts) -> dict:
    """Decode rates by variant and context: the dense student at every context, the others at 64."""
    decode = {name: {} for name in arts}

    def measure(name, ctx, new, repeats):
        runs = [attempt("decode", {"path": str(arts[name]), "context": ctx, "new": new, "seed": r, "kernel": plan["kernel"]},
                        label=f"{name} ctx {ctx} #{r}") for r in range(repeats)]
        decode[name][str(ctx)] = _summ_decode(runs)

    for ctx in plan["decode_contexts"]:
        measure("dense", ctx, plan["decode_new"], plan["decode_repeats"][ctx])
    if "moe2" in arts:
        for ctx in plan["moe_contexts"]:
            measure("moe2", ctx, plan["decode_new"], plan["moe_repeats"])
    if "bf16" in arts:
        measure("bf16", 64, plan["teacher_new"], 1)
    return decode


def measure_reference_kernels(plan: dict, dense: Path, attempt: Attempts) -> dict:
    """The dense student at context 64 decoded with each of plan["reference_kernels"] (numpy: what a
    runtime-only install runs; fast: float32 inputs, the reference's results), a run each."""
    return {k: _summ_decode([attempt("decode", {"path": str(dense), "context": 64, "new": plan["decode_new"], "kernel": k},
                                     label=f"dense ctx 64 --kernel {k}")]) for k in plan["reference_kernels"]}


def measure_scaling_decode(results: dict, plan: dict, attempt: Attempts) -> dict:
    """Decode vs model size: the dense student of every scale at context 64."""
    out = {}
    if not plan["scaling_decode_new"]:
        return out
    for s, v in results["scaling_convert"].items():
        if s == plan["scale"]:
            out[s] = results["decode"]["dense"]["64"]
        elif "error" not in v:
            r = attempt("decode", {"path": v["artifact"], "context": 64, "new": plan["scaling_decode_new"],
                                   "kernel": plan["kernel"]},
                        label=f"{s} dense ctx 64")
            out[s] = _summ_decode([r])
    return out


def write_results(results: dict, out: Path, quick: bool) -> None:
    json_path = _results_path(out, quick)
    md_path = CACHE / "quick" / "BENCHMARKS.md" if quick else ROOT / "BENCHMARKS.md"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    results = _without_machine_paths(results)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md = report(results)
    md_path.write_text(md)
    print(md)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)


def run_worker(kind: str, args: dict, env: dict | None = None, timeout: float = 7200, label: str = "",
               pin: str | None = None) -> dict:
    """Run a worker in a fresh interpreter (pinned to the cores `pin` with taskset, e.g. "0,1");
    its result, wall time, the child's rusage and the load average."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{time.strftime('%H%M%S')}-{kind}-{label or 'run'}.log"
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.Popen([*(["taskset", "-c", pin] if pin else []), sys.executable, str(HERE / "workers.py"), kind, json.dumps(args)],
                             stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **WORKER_ENV, **(env or {})},
                             cwd=ROOT)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        out = p.stdout.read()
        _, status, rusage = os.wait4(p.pid, 0)
        timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    result = None
    for line in out.splitlines():
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK):])
    if p.returncode != 0 or result is None:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"worker {kind} {label} failed (exit {p.returncode}); log {log}:\n{tail}")
    result["_worker"] = {"wall_s": wall, "child_maxrss_bytes": rusage.ru_maxrss * 1024,
                         "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    print(f"  {kind:<9} {label:<28} {wall:7.1f} s  load {load_before[0]:.1f}", file=sys.stderr, flush=True)
    with open(LOGS / "workers.jsonl", "a") as f:  # every result as it comes, should a later step fail
        f.write(json.dumps({"kind": kind, "label": label, "args": args, "result": result,
                            "code_digest": WORKER_ENV.get("PYTHONPATH", "").split(os.pathsep)[0].rsplit("/", 1)[-1]}) + "\n")
    return result


def machine_info() -> dict:
    import numpy as np

    cpu = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            k, v = k.strip(), v.strip()
            if k in ("model name", "cpu family", "model", "stepping") and k not in cpu:
                cpu[k] = v
            if k == "flags" and "flags" not in cpu:
                cpu["flags"] = [x for x in v.split() if x in ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "f16c")]
    mem = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("MemTotal", "MemAvailable"):
                mem[k] = int(v.split()[0]) * 1024
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "l3": l3.read_text().strip() if l3.exists() else None,
        "ram_bytes": mem.get("MemTotal"), "ram_available_bytes": mem.get("MemAvailable"),
        "python": platform.python_version(), "numpy": np.__version__,
        "blas": {"name": blas.get("name"), "version": blas.get("version"), "config": blas.get("openblas configuration"),
                 "corename": _openblas_corename()},
        "openblas_env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP_", "MKL_"))},
        "kernel": platform.release(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg": os.getloadavg(),
    }


def _openblas_corename() -> str | None:
    import ctypes

    try:
        libs = {line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line}
        for lib in libs:
            f = getattr(ctypes.CDLL(lib), "scipy_openblas_get_corename64_", None)
            if f is not None:
                f.restype = ctypes.c_char_p
                return f().decode()
    except OSError:
        pass
    return None


def code_info() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    h = hashlib.blake2b(digest_size=8)
    for sub in PRODUCT_PACKAGES:
        for f in sorted((ROOT / sub).glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "--", *PRODUCT_PACKAGES).splitlines(),
            "product_code_digest": h.hexdigest()}


def per_token_bytes_of(arts: dict, plan: dict, load: dict) -> dict:
    """per_token_bytes of every artifact at every decode context, its head read as the kernel that loaded
    it reads it (the load worker records which ran)."""
    return {name: {str(ctx): per_token_bytes(p, ctx, load.get(name, {}).get("kernel", "numpy"))
                   for ctx in plan["decode_contexts"]} for name, p in arts.items()}


def per_token_bytes(path: Path, context: int, kernel: str) -> dict:
    """Bytes one decode step reads: every weight tensor a step touches (one row of the embedding tables),
    the tied head as `kernel` reads it, MoE experts in proportion top_k/experts, and the K/V cache at
    `context`."""
    from ferrisres.format import Artifact
    from ferrisres.format.tables import GROUPED_TABLES, table_bits

    packed = ()  # the table encodings this kernel's head reads as stored
    if kernel == "int8":
        from ferrisres.runtime.fast_kernels import INT8_TABLES as packed

    with Artifact.open(path) as a:
        c = a.config
        weights, parts = 0, {}
        for name, info in a.tensors.items():
            n = info.nbytes
            table = name.removesuffix(".weight_scale")  # a quantized table's scales are read as the table is
            if table in ("embed_tokens", "embed_tokens_per_layer"):
                if table == "embed_tokens" and "lm_head" not in a.tensors:
                    kind = "head (tied embedding)"  # the whole table is the output projection, read as
                    # stored by the int8 kernel, else as the int8 values it is unpacked to at load
                    if info.encoding in GROUPED_TABLES and info.encoding not in packed:
                        n = n * 8 // table_bits(info.encoding)
                else:
                    n = n // info.shape[0]  # one row
                    kind = "embedding rows"
            elif name.startswith("lm_head"):
                kind = "head"
            elif ".mlp.experts." in name and c.mlp_experts:
                n = n * c.mlp_top_k / c.mlp_experts
                kind = "layers"
            else:
                kind = "layers" if name.startswith("layers.") else "other"
            weights += n
            parts[kind] = parts.get(kind, 0) + n
        kv = 0
        for i in range(c.num_layers):
            src = c.kv_sources[i]
            keys = context if c.is_full(i) else min(context, c.sliding_window)
            kv += 2 * keys * c.kv_heads[src] * c.head_dims[src] * 4  # float32 keys and values
        return {"weights": int(weights), "kv_cache": kv, "total": int(weights + kv), "parts": {k: int(v) for k, v in parts.items()}}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _without_machine_paths(value):
    """`value` with this checkout's and Python's locations made relative: results.json is committed, and
    where the files were on the measuring machine says nothing about the figures."""
    if isinstance(value, str):
        return value.replace(str(ROOT) + os.sep, "").replace(sys.base_prefix + os.sep, "<python>/")
    if isinstance(value, list):
        return [_without_machine_paths(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_machine_paths(v) for k, v in value.items()}
    return value


def _summ_convert(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r and r.get("rc") == 0]
    if not ok:
        return {"error": next((r["error"] for r in runs if "error" in r), f"exit code {runs[0].get('rc')}"), "runs": runs}
    return {"seconds": median(r["seconds"] for r in ok), "ru_maxrss_bytes": median(r["ru_maxrss_bytes"] for r in ok),
            "peak_rss_anon_bytes": median(r["peak_rss_anon_bytes"] for r in ok),
            "peak_rss_file_bytes": median(r["peak_rss_file_bytes"] for r in ok),
            "size_bytes": ok[0]["size_bytes"], "runs": runs}


def _summ_decode(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"], "runs": runs}
    return {"tok_s": median(r["tok_s"] for r in ok), "median_step_tok_s": median(r["median_step_tok_s"] for r in ok),
            "forward_tok_s": median(r["forward_tok_s"] for r in ok), "prefill_s": median(r["prefill_s"] for r in ok),
            "decode_peak_rss_bytes": median(r["vm_hwm_bytes"] for r in ok),
            "decode_peak_rss_anon_bytes": median(r["peak_rss_anon_bytes"] for r in ok),
            "decode_peak_rss_file_bytes": median(r["peak_rss_file_bytes"] for r in ok),
            "process_peak_rss_bytes": median(r["_worker"]["child_maxrss_bytes"] for r in ok),
            "failed_runs": len(runs) - len(ok), "runs": runs}


def _earlier_conversion(wargs: dict, conversion: str) -> dict | None:
    """With --reuse: the last successful conversion record (workers.jsonl) of this exact job by code whose
    conversion digest is `conversion`, if its artifact is still there; its result, with the product code
    digest that made it under "code_digest"."""
    if not Path(wargs["out"]).exists() or not (LOGS / "workers.jsonl").exists():
        return None
    found = None
    for line in (LOGS / "workers.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "convert" and rec["args"] == wargs and rec["result"].get("rc") == 0 \
                and _snapshot_conversion_digest(rec.get("code_digest")) == conversion:
            found = {**rec["result"], "code_digest": rec["code_digest"]}
    return found


# What a conversion imports: the converter, and the runtime's package (load, the numpy path) for calibration
CONVERSION_IMPORTS = ("ferrisres.convert.cli", "ferrisres.convert.build", "ferrisres.convert.calibrate", "ferrisres.runtime")
_conversion_digests: dict[str, str | None] = {}


def _snapshot_conversion_digest(code_digest: str | None) -> str | None:
    if code_digest not in _conversion_digests:
        root = CACHE / "snapshot" / str(code_digest)
        _conversion_digests[code_digest] = conversion_digest(root) if (root / "ferrisres").is_dir() else None
    return _conversion_digests[code_digest]


def conversion_digest(snapshot: Path) -> str:
    """The digest of the product files an artifact depends on, in a code snapshot: every file of convert/
    and format/, and every other ferrisres module that importing CONVERSION_IMPORTS loads (lazy imports
    inside the converter are of its own package, already counted). The fused kernels, the server and the
    CLIs are not among them: calibration runs the numpy path (`load`'s default kernel)."""
    listing = ("import importlib, sys\n"
               f"for name in {CONVERSION_IMPORTS!r}: importlib.import_module(name)\n"
               "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.startswith('ferrisres') and getattr(m, '__file__', None)))")
    imported = subprocess.run([sys.executable, "-c", listing], capture_output=True, text=True, check=True, cwd=snapshot,
                              env={**os.environ, "PYTHONPATH": str(snapshot)}).stdout.split()
    files = {Path(f).resolve() for f in imported}
    files |= {f.resolve() for sub in ("convert", "format") for f in (snapshot / "ferrisres" / sub).glob("*.py")}
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(files):
        relative = f.relative_to(snapshot.resolve())  # raises if the import came from elsewhere than the snapshot
        h.update(str(relative).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def snapshot_code(digest: str) -> Path:
    """A copy of the product packages as they are now, which every worker imports (PYTHONPATH), so that
    edits made while the benchmark runs cannot mix two versions of the code in one measurement."""
    root = CACHE / "snapshot" / digest
    if not (root / "ferrisres").is_dir():
        import shutil

        tmp = CACHE / "snapshot" / (digest + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in PRODUCT_PACKAGES:
            shutil.copytree(ROOT / sub, tmp / "ferrisres" / sub, ignore=shutil.ignore_patterns("__pycache__"))
        tmp.rename(root)
    return root


if __name__ == "__main__":
    sys.exit(main())
