#!/usr/bin/env python3
"""Performance at real E2B scale: `make bench` (full, ~15 min on a quiet machine) or `make bench QUICK=1` (tiny model, ~1 min).

    python bench/run.py [--quick] [--keep] [--reuse] [--skip-profile] [--out bench]
    python bench/run.py --report-only bench/results.json      # rewrite BENCHMARKS.md from the data

1. Makes (or reuses) the synthetic Gemma 4 E2B checkpoints of bench/make_synthetic_e2b.py in bench/.cache/.
2. Converts the main one three ways: dense ternary student, 2-expert top-2 MoE student
   (`--moe-experts 2`), bf16 teacher (`--quant bf16`); the other sizes dense, for the scaling table.
3. Measures, each in its own subprocess (so peak RSS is per measurement) and as medians over repeats:
   conversion wall time and peak RSS; artifact size; load time (open -> ready to generate, tokenizer
   included); prefill tok/s at 64 and 256 prompt tokens; decode tok/s over N new tokens after a context
   of 64, 512 and 2048 random token ids; peak RSS while decoding; n-gram draft decoding if
   `Model.generate` accepts `draft="ngram"`; the machine's DRAM read bandwidth (BLAS sgemv over 1 GiB,
   1 thread and default threads) and the decode ceiling it implies for the bytes each artifact reads per
   token (every tensor a decode step touches, from the artifact's own tensor sizes, plus the KV cache).
4. Writes bench/results.json and BENCHMARKS.md (targets beside measurements, bandwidth bound, ratio,
   scaling tables), and in the full run a profile of decode steps (bench/profile_decode.py).

Everything runs through the public Python API (`ferrisres.runtime.load`, `Model.generate`) and the
converter's command line entry point (`ferrisres.convert.cli.main`), from a snapshot of the product code
taken at the start (bench/.cache/snapshot/<digest>), so that edits made during a run cannot mix versions.
OPENBLAS_* variables are left as the environment has them and recorded. A failed measurement is recorded
and the run goes on. Artifacts are deleted at the end unless --keep; --reuse takes kept artifacts (and
their conversion measurements, from bench/.cache/logs/workers.jsonl) of the same product code.
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

CACHE = HERE / ".cache"
ARTIFACTS = CACHE / "artifacts"
LOGS = CACHE / "logs"
WORKER_ENV: dict[str, str] = {}  # PYTHONPATH of the product code snapshot (set in main)
RESULT_MARK = "@@RESULT "
GB = 1e9

# Targets of issue 5 (medians on the 2-core machine).
TARGETS = {
    "decode_dense": (">=", 1.5, "tok/s", 2.5),
    "decode_moe": (">=", 0.8, "tok/s", None),
    "draft_speedup": (">=", 2.0, "x", None),
    "prefill_256": (">=", 25.0, "tok/s", None),
    "load": ("<=", 1.0, "s", None),
    "decode_rss": ("<=", 1.5 * GB, "GB", None),
    "convert_time": ("<=", 3600.0, "s", None),  # issue 10: the calibrated default, <= 60 min and 6 GB
    "convert_rss": ("<=", 6 * GB, "GB", None),
}

FULL = dict(
    scale="full", scaling_scales=["tiny", "half", "full"], convert_repeats=1, scaling_convert_repeats=1,
    load_repeats=5, prefill_lengths=[64, 256], prefill_repeats=3,
    decode_contexts=[64, 512, 2048], decode_new=64, decode_repeats={64: 3, 512: 1, 2048: 1},
    moe_contexts=[64], moe_repeats=2, teacher_new=16, draft_new=64, draft_repeats=2,
    scaling_decode_new=32, profile=True,
)
QUICK = dict(
    scale="tiny", scaling_scales=["tiny"], convert_repeats=1, scaling_convert_repeats=1,
    load_repeats=3, prefill_lengths=[64, 256], prefill_repeats=2,
    decode_contexts=[64, 512, 2048], decode_new=16, decode_repeats={64: 2, 512: 1, 2048: 1},
    moe_contexts=[64], moe_repeats=1, teacher_new=8, draft_new=16, draft_repeats=1,
    scaling_decode_new=0, profile=False,
)

# The dense student with other table encodings than its default (int8 tables, tied head): issue 11.
TABLE_VARIANTS = {"dense-bf16-tables": ["--tables", "bf16"], "dense-int4-per-layer": ["--per-layer-table", "int4-g32"]}
LLAMA_CPP_TQ2_0_BYTES = 2.79 * GB  # llama.cpp's TQ2_0 GGUF of the same checkpoint (issue 11)

# A paragraph repeated: a prompt a copying model continues by copying (n-gram drafts then hit).
COPY_PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog near the river bank, while the old farmer watches from "
    "his house on the hill and counts the sheep that walk back home before the night comes. "
)


# =============================================================================== worker side

class RssSampler(threading.Thread):
    """Polls /proc/self/status: the peaks of VmRSS, RssAnon (heap) and RssFile (mapped files)."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def sample(self) -> dict:
        now = _status()
        for k in self.FIELDS:
            self.peak[k] = max(self.peak[k], now.get(k, 0))
        return now

    def reset(self):
        self.peak = dict.fromkeys(self.FIELDS, 0)
        _reset_hwm()
        self.sample()

    def stop(self) -> dict:
        self._done.set()
        self.join()
        self.sample()
        status = _status()
        return {"peak_rss_bytes": self.peak["VmRSS"], "peak_rss_anon_bytes": self.peak["RssAnon"],
                "peak_rss_file_bytes": self.peak["RssFile"], "vm_hwm_bytes": status.get("VmHWM", 0),
                "end_rss_bytes": status.get("VmRSS", 0)}


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def _reset_hwm() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _result(obj: dict) -> None:
    print(RESULT_MARK + json.dumps(obj), flush=True)


def _context_ids(vocab: int, n: int, seed: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng([seed, n])
    return [2] + rng.integers(494, vocab, n - 1).tolist()  # BOS, then ordinary pieces (no specials or bytes)


def worker_bandwidth(args: dict) -> None:
    """BLAS sgemv over a 1 GiB float32 matrix: DRAM read GB/s (threads as the environment sets them)."""
    import numpy as np

    rows, cols = 1 << 18, 1024  # 1 GiB
    a = np.empty((rows, cols), dtype=np.float32)
    a.fill(1.0)
    x = np.ones(cols, dtype=np.float32)
    y = np.empty(rows, dtype=np.float32)
    np.dot(a, x, out=y)
    times = []
    for _ in range(args.get("repeats", 7)):
        t = time.perf_counter()
        np.dot(a, x, out=y)
        times.append(time.perf_counter() - t)
    _result({"bytes": a.nbytes, "seconds": times, "gbps": a.nbytes / statistics.median(times) / GB,
             "best_gbps": a.nbytes / min(times) / GB})


def worker_convert(args: dict) -> None:
    """One conversion through the converter's own entry point; wall time and memory of this process."""
    sampler = RssSampler(0.1)
    sampler.start()
    from ferrisres.convert.cli import main as convert_main

    start = time.perf_counter()
    rc = convert_main([args["source"], "-o", args["out"], "--force", "--quiet", *args.get("extra", [])])
    seconds = time.perf_counter() - start
    mem = sampler.stop()
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    _result({"rc": rc, "seconds": seconds, "ru_maxrss_bytes": ru.ru_maxrss * 1024, "user_s": ru.ru_utime,
             "sys_s": ru.ru_stime, "size_bytes": os.path.getsize(args["out"]) if rc == 0 else None, **mem})


def worker_load(args: dict) -> None:
    """Open -> ready to generate (artifact opened and validated, tokenizer parsed), then one token."""
    t0 = time.perf_counter()
    from ferrisres.runtime import load

    t1 = time.perf_counter()
    model = load(args["path"])
    t2 = time.perf_counter()
    model.tokenizer  # parsed on first use; generating text needs it
    t3 = time.perf_counter()
    gen = model.generate([2, 1000, 2000], max_tokens=1, temperature=0.0)
    for _ in gen:
        pass
    t4 = time.perf_counter()
    _result({"import_s": t1 - t0, "open_s": t2 - t1, "tokenizer_s": t3 - t2, "load_s": t3 - t1,
             "first_token_s": t4 - t3, "peak_rss_bytes": _status().get("VmHWM", 0)})


def worker_prefill(args: dict) -> None:
    """Prompt processing rate: generate(max_tokens=1) on random prompts, its prefill time."""
    from ferrisres.runtime import load

    model = load(args["path"])
    model.tokenizer
    vocab = model.config.vocab_size

    def prefill(ids) -> float:
        gen = model.generate(ids, max_tokens=1, temperature=0.0)
        for _ in gen:
            pass
        return gen.prefill_seconds

    prefill(_context_ids(vocab, 8, 99))  # warm-up: maps every weight page
    out = {}
    for n in args["lengths"]:
        times = [prefill(_context_ids(vocab, n, r)) for r in range(args["repeats"])]
        out[str(n)] = {"seconds": times, "tok_s": n / statistics.median(times)}
    out["peak_rss_bytes"] = _status().get("VmHWM", 0)
    _result(out)


def _forward_rate(gen) -> float | None:
    """Tokens per second of the forward passes alone (the Generation's own timing; its field names vary)."""
    tokens = getattr(gen, "decode_tokens", getattr(gen, "decode_steps", None))
    seconds = getattr(gen, "decode_seconds", None)
    return tokens / seconds if tokens and seconds else None


def _timed_generation(model, ids, new: int, **options) -> dict:
    """Decode `new` tokens after prefilling `ids`; per-token wall times (sampling and detokenizing included)."""
    gen = model.generate(ids, max_tokens=new, temperature=0.0, **options)
    stamps, tokens = [], []
    for step in gen:
        stamps.append(time.perf_counter())
        tokens.append(step.token)
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    steps = len(gaps)
    wall = stamps[-1] - stamps[0] if steps else float("nan")
    return {"prefill_s": gen.prefill_seconds, "decoded": steps, "wall_s": wall,
            "tok_s": steps / wall if steps else None,
            "median_step_tok_s": 1 / statistics.median(gaps) if steps else None,
            "forward_tok_s": _forward_rate(gen),
            "stop_reason": gen.stop_reason, "tokens": tokens,
            "drafted": getattr(gen, "drafted", None), "accepted": getattr(gen, "accepted", None)}


def worker_decode(args: dict) -> None:
    """Decode after a random context; peak RSS of the decode phase (VmHWM reset after the prefill)."""
    sampler = RssSampler(0.05)
    sampler.start()
    from ferrisres.runtime import load

    model = load(args["path"])
    model.tokenizer
    ids = _context_ids(model.config.vocab_size, args["context"], args.get("seed", 0))
    before_decode = {}

    def reset():  # after the prefill: what decoding itself needs
        before_decode.update(peak_rss_prefill_bytes=sampler.peak["VmRSS"], vm_hwm_prefill_bytes=_status().get("VmHWM", 0))
        sampler.reset()

    gen = model.generate(ids, max_tokens=args["new"] + 1, temperature=0.0)
    stamps, tokens = [], []
    for step in gen:
        stamps.append(time.perf_counter())
        tokens.append(step.token)
        if len(stamps) == 1:
            reset()
    mem = sampler.stop()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    steps = len(gaps)
    wall = stamps[-1] - stamps[0] if steps else float("nan")
    _result({"context": args["context"], "prefill_s": gen.prefill_seconds, "decoded": steps, "wall_s": wall,
             "tok_s": steps / wall if steps else None,
             "median_step_tok_s": 1 / statistics.median(gaps) if steps else None,
             "forward_tok_s": _forward_rate(gen),
             "stop_reason": gen.stop_reason, "tokens_head": tokens[:8], **before_decode, **mem})


def worker_draft(args: dict) -> None:
    """Plain greedy vs `draft="ngram"` greedy on a copy-heavy prompt, interleaved; same tokens required."""
    from ferrisres.runtime import load

    model = load(args["path"])
    model.tokenizer
    verify = _verify_cost(model)
    para = model.encode(COPY_PARAGRAPH, add_bos=False)
    ids = [2] + para * 3 + para[: len(para) // 2]
    _timed_generation(model, ids[:16], 2)  # warm-up
    runs = {"plain": [], "ngram": []}
    for _ in range(args["repeats"]):
        runs["plain"].append(_timed_generation(model, ids, args["new"]))
        runs["ngram"].append(_timed_generation(model, ids, args["new"], draft="ngram"))
    plain = statistics.median(r["tok_s"] for r in runs["plain"])
    ngram = statistics.median(r["tok_s"] for r in runs["ngram"])
    same = all(a["tokens"] == b["tokens"] for a, b in zip(runs["plain"], runs["ngram"]))
    for rs in runs.values():
        for r in rs:
            r["tokens"] = r["tokens"][:16]
    _result({"prompt_tokens": len(ids), "plain_tok_s": plain, "ngram_tok_s": ngram,
             "speedup": ngram / plain, "same_tokens": same, "runs": runs, "verify": verify})


def _verify_cost(model, context: int = 64, sizes=(1, 4, 11), repeats: int = 3) -> dict:
    """What speculative decoding can gain at most: the time of one forward over k new tokens (all their
    logits) relative to k = 1, at `context`. k tokens accepted per forward would give k / ratio."""
    from ferrisres.runtime.kv_cache import KVCache

    cache = KVCache(model.config)
    model.forward(_context_ids(model.config.vocab_size, context, 5), cache, last_only=True)
    out = {}
    for k in sizes:
        times = []
        for r in range(repeats + 1):
            state = cache.snapshot()
            t = time.perf_counter()
            model.forward(_context_ids(model.config.vocab_size, k + 1, r)[1:], cache)
            times.append(time.perf_counter() - t)
            cache.restore(state)
        out[str(k)] = statistics.median(times[1:])
    return {"context": context, "seconds": out,
            "ideal_speedup": {k: int(k) * out["1"] / v for k, v in out.items()}}


def worker_profile(args: dict) -> None:
    import profile_decode

    _result(profile_decode.profile(args["path"], context=args.get("context", 64), steps=args.get("steps", 4)))


WORKERS = {"bandwidth": worker_bandwidth, "convert": worker_convert, "load": worker_load,
           "prefill": worker_prefill, "decode": worker_decode, "draft": worker_draft, "profile": worker_profile}


# =========================================================================== orchestrator side

def run_worker(kind: str, args: dict, env: dict | None = None, timeout: float = 7200, label: str = "") -> dict:
    """Run a worker in a fresh interpreter; its result, wall time, the child's rusage and the load average."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{time.strftime('%H%M%S')}-{kind}-{label or 'run'}.log"
    load_before = os.getloadavg()
    start = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(args)],
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
    for sub in ("runtime", "convert", "format"):
        for f in sorted((ROOT / sub).glob("*.py")):
            h.update(f.name.encode() + f.read_bytes())
    return {"commit": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "--", "runtime", "convert", "format").splitlines(),
            "product_code_digest": h.hexdigest()}


def per_token_bytes(path: Path, context: int) -> dict:
    """Bytes one decode step reads: every weight tensor a step touches (one row of the embedding tables),
    the int8/tied head, MoE experts in proportion top_k/experts, and the K/V cache at `context`."""
    from ferrisres.format import Artifact

    with Artifact.open(path) as a:
        c = a.config
        weights, parts = 0, {}
        for name, info in a.tensors.items():
            n = info.nbytes
            table = name.removesuffix(".weight_scale")  # a quantized table's scales are read as the table is
            if table in ("embed_tokens", "embed_tokens_per_layer"):
                if table == "embed_tokens" and "lm_head" not in a.tensors:
                    kind = "head (tied embedding)"  # the whole table is the output projection
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, fewer repeats (checks the harness, < 2 min)")
    ap.add_argument("--keep", action="store_true", help="keep the converted artifacts in bench/.cache/artifacts")
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse artifacts kept (--keep) from an earlier run of the same product code, with their conversion measurements")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for results.json of a full run (BENCHMARKS.md goes to the repo root)")
    ap.add_argument("--report-only", type=Path, metavar="RESULTS_JSON", help="rewrite the markdown report from a results.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("worker_args", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        WORKERS[args.worker](json.loads(args.worker_args))
        return 0

    if args.report_only:
        r = json.loads(args.report_only.read_text())
        md_path = ROOT / "BENCHMARKS.md" if r["mode"] == "full" else CACHE / "quick" / "BENCHMARKS.md"
        md_path.write_text(report(r))
        print(f"wrote {md_path}", file=sys.stderr)
        return 0
    plan = QUICK if args.quick else FULL
    started = time.perf_counter()
    results = {"mode": "quick" if args.quick else "full", "plan": plan, "machine": machine_info(), "code": code_info()}
    snapshot = snapshot_code(results["code"]["product_code_digest"])
    sys.path.insert(0, str(snapshot))
    WORKER_ENV["PYTHONPATH"] = os.pathsep.join([str(snapshot), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    results["code"]["snapshot"] = str(snapshot)
    print(f"bench ({results['mode']}): load average {results['machine']['loadavg']}; product code snapshot {snapshot}",
          file=sys.stderr)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    failures = results["failures"] = []

    def attempt(kind, wargs, **kw):
        """A worker's result, or {"error": ...} (recorded; the run goes on)."""
        try:
            return run_worker(kind, wargs, **kw)
        except RuntimeError as e:
            failures.append({"kind": kind, "label": kw.get("label"), "error": str(e)[-1500:]})
            print(f"  FAILED: {str(e).splitlines()[0]}", file=sys.stderr)
            return {"error": str(e)[-1500:]}

    # -- checkpoints
    sources = {s: synth.build(s) for s in dict.fromkeys([plan["scale"], *plan["scaling_scales"]])}
    results["checkpoints"] = {s: json.loads((p / "SYNTHETIC.json").read_text()) for s, p in sources.items()}
    results["tokenizer"] = synth.check_tokenizer((sources[plan["scale"]] / "tokenizer.json").read_text(encoding="utf-8"))

    # -- bandwidth
    bw1 = run_worker("bandwidth", {}, env={"OPENBLAS_NUM_THREADS": "1"}, label="1 thread")
    bwn = run_worker("bandwidth", {}, label="default threads")
    results["bandwidth"] = {"one_thread_gbps": bw1["gbps"], "default_threads_gbps": bwn["gbps"], "runs": [bw1, bwn]}

    # -- conversions
    main_scale = plan["scale"]
    # The dense student is converted with the default (calibrated) options: its time and memory are the
    # conversion targets. The others are rounded to nearest (--method rtn): the same encodings, so the
    # same decoding speed, in seconds instead of most of an hour.
    variants = {"dense": [], "moe2": ["--moe-experts", "2", "--moe-top-k", "2", "--method", "rtn"],
                "bf16": ["--quant", "bf16"], **TABLE_VARIANTS}
    jobs = [(name, main_scale, extra, plan["convert_repeats"]) for name, extra in variants.items()]
    jobs += [("dense", s, ["--method", "rtn"], plan["scaling_convert_repeats"]) for s in plan["scaling_scales"]
             if s != main_scale]
    arts, conv, scaling_convert = {}, {}, {}
    for name, scale, extra, repeats in jobs:
        out = ARTIFACTS / f"{scale}-{name}.tern"
        wargs = {"source": str(sources[scale]), "out": str(out), "extra": extra}
        earlier = _earlier_conversion(wargs, snapshot.name) if args.reuse else None
        if earlier is not None:
            print(f"  convert   {scale} {name}: reusing {out.name} and its measurement", file=sys.stderr)
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
    results["bytes_per_token"] = {name: {str(ctx): per_token_bytes(p, ctx) for ctx in plan["decode_contexts"]}
                                  for name, p in arts.items()}

    # -- load
    results["load"] = {}
    for name, p in arts.items():
        n = plan["load_repeats"] if name == "dense" else max(1, plan["load_repeats"] // 2)
        runs = [r for r in (attempt("load", {"path": str(p)}, label=name) for _ in range(n)) if "error" not in r]
        if runs:
            results["load"][name] = {k: median(r[k] for r in runs) for k in ("load_s", "open_s", "tokenizer_s", "import_s", "first_token_s")}
            results["load"][name]["runs"] = runs

    # -- prefill
    results["prefill"] = {}
    for name, p in arts.items():
        reps = plan["prefill_repeats"] if name == "dense" else 1
        lengths = plan["prefill_lengths"] if name == "dense" else plan["prefill_lengths"][-1:]
        results["prefill"][name] = attempt("prefill", {"path": str(p), "lengths": lengths, "repeats": reps}, label=name)

    # -- decode
    decode = {name: {} for name in arts}

    def measure_decode(name, ctx, new, repeats):
        runs = [attempt("decode", {"path": str(arts[name]), "context": ctx, "new": new, "seed": r},
                        label=f"{name} ctx {ctx} #{r}") for r in range(repeats)]
        decode[name][str(ctx)] = _summ_decode(runs)

    for ctx in plan["decode_contexts"]:
        measure_decode("dense", ctx, plan["decode_new"], plan["decode_repeats"][ctx])
    if "moe2" in arts:
        for ctx in plan["moe_contexts"]:
            measure_decode("moe2", ctx, plan["decode_new"], plan["moe_repeats"])
    if "bf16" in arts:
        measure_decode("bf16", 64, plan["teacher_new"], 1)
    for name in TABLE_VARIANTS:  # as the dense student's context-64 runs, to compare with them
        if name in arts:
            measure_decode(name, 64, plan["decode_new"], plan["decode_repeats"][64])
    results["decode"] = decode

    # -- draft
    results["draft"] = attempt("draft", {"path": str(arts["dense"]), "new": plan["draft_new"],
                                         "repeats": plan["draft_repeats"]}, label="dense ngram")

    # -- scaling: decode vs model size
    results["scaling_decode"] = {}
    if plan["scaling_decode_new"]:
        for s, v in results["scaling_convert"].items():
            if s == main_scale:
                results["scaling_decode"][s] = decode["dense"]["64"]
            elif "error" not in v:
                r = attempt("decode", {"path": v["artifact"], "context": 64, "new": plan["scaling_decode_new"]},
                            label=f"{s} dense ctx 64")
                results["scaling_decode"][s] = _summ_decode([r])

    # -- profile
    if plan["profile"] and not args.skip_profile:
        results["profile"] = attempt("profile", {"path": str(arts["dense"]), "context": 64, "steps": 4}, label="dense")

    results["artifact_sizes"] = {name: p.stat().st_size for name, p in arts.items()}
    results["total_seconds"] = time.perf_counter() - started
    results["machine"]["loadavg_end"] = os.getloadavg()
    if not args.keep:
        for p in ARTIFACTS.glob("*.tern"):
            p.unlink()
    # The quick run checks the harness: its tiny-model numbers go to bench/.cache/quick/, never over the real ones.
    json_path, md_path = (args.out / "results.json", ROOT / "BENCHMARKS.md") if not args.quick else \
        (CACHE / "quick" / "results.json", CACHE / "quick" / "BENCHMARKS.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    results = _without_machine_paths(results)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md = report(results)
    md_path.write_text(md)
    print(md)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


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


def _earlier_conversion(wargs: dict, digest: str) -> dict | None:
    """With --reuse: the last successful conversion record (workers.jsonl) of this exact job by the same
    product code, if its artifact is still there."""
    if not Path(wargs["out"]).exists() or not (LOGS / "workers.jsonl").exists():
        return None
    found = None
    for line in (LOGS / "workers.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "convert" and rec["args"] == wargs and rec.get("code_digest") == digest \
                and rec["result"].get("rc") == 0:
            found = rec["result"]
    return found


def snapshot_code(digest: str) -> Path:
    """A copy of the product packages as they are now, which every worker imports (PYTHONPATH), so that
    edits made while the benchmark runs cannot mix two versions of the code in one measurement."""
    root = CACHE / "snapshot" / digest
    if not (root / "ferrisres").is_dir():
        import shutil

        tmp = CACHE / "snapshot" / (digest + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        for sub in ("runtime", "convert", "format"):
            shutil.copytree(ROOT / sub, tmp / "ferrisres" / sub, ignore=shutil.ignore_patterns("__pycache__"))
        tmp.rename(root)
    return root


# ================================================================================== report

def _fmt(v, unit=""):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if unit == "GB":
        return f"{v / GB:.2f} GB"
    if unit == "s":
        return f"{v:.2f} s"
    if unit == "x":
        return f"{v:.2f}x"
    return f"{v:.2f} {unit}".strip()


def _met(key, value):
    if value is None or isinstance(value, str):
        return "–"
    op, goal, _, stretch = TARGETS[key]
    ok = value >= goal if op == ">=" else value <= goal
    s = "yes" if ok else "**no**"
    if stretch is not None and value >= stretch:
        s += " (stretch too)"
    return s


def _g(obj, *path):
    """obj[path...] or None if anything on the way is missing or failed."""
    for k in path:
        if not isinstance(obj, dict) or "error" in obj or k not in obj:
            return None
        obj = obj[k]
    return obj


def report(r: dict) -> str:
    m = r["machine"]
    bw1, bwn = r["bandwidth"]["one_thread_gbps"], r["bandwidth"]["default_threads_gbps"]
    scale = r["plan"]["scale"]
    bpt = r.get("bytes_per_token", {})
    dec = r.get("decode", {})

    def bound(name, ctx, bw=bw1):
        b = _g(bpt, name, str(ctx), "total")
        return None if b is None else bw * GB / b

    draft = r.get("draft", {})
    if "error" in draft:
        draft_v = "failed (see results.json)"
    elif "speedup" not in draft:
        draft_v = "not measured"
    elif not draft.get("same_tokens"):
        draft_v = f"{draft['speedup']:.2f}x but different tokens"
    else:
        draft_v = draft["speedup"]
    rows = [
        ("decode, dense ternary, context 64", "decode_dense", _g(dec, "dense", "64", "tok_s"), bound("dense", 64)),
        ("decode, 2-expert top-2 MoE, context 64", "decode_moe", _g(dec, "moe2", "64", "tok_s"), bound("moe2", 64)),
        ("decode with `draft=\"ngram\"`, copy-heavy prompt, vs plain", "draft_speedup", draft_v, None),
        ("prefill, 256-token prompt (dense)", "prefill_256", _g(r, "prefill", "dense", "256", "tok_s"), None),
        ("load: open -> ready to generate, tokenizer included (dense)", "load", _g(r, "load", "dense", "load_s"), None),
        ("peak RSS while decoding the dense student (context 64)", "decode_rss", _g(dec, "dense", "64", "decode_peak_rss_bytes"), None),
        (f"conversion of the {scale} checkpoint (dense ternary), wall time", "convert_time", _g(r, "convert", "dense", "seconds"), None),
        ("conversion peak RSS (ru_maxrss, dense ternary)", "convert_rss", _g(r, "convert", "dense", "ru_maxrss_bytes"), None),
    ]
    env = ", ".join(f"{k}={v}" for k, v in sorted(m["openblas_env"].items())) or "none set"
    dirty = r["code"]["dirty"]
    lines = [
        f"# Benchmarks at {'E2B' if scale == 'full' else scale + ' (reduced E2B)'} scale",
        "",
        f"Measured by `make bench{' QUICK=1' if r['mode'] == 'quick' else ''}` (bench/run.py) on a synthetic checkpoint with "
        f"the exact Gemma 4 E2B text shapes and random weights (bench/make_synthetic_e2b.py, scale `{scale}`). "
        "Every number is a median over runs, each in its own process.",
        f"Code: commit {r['code']['commit'][:12]}" + (f" + uncommitted changes in {len(dirty)} product files" if dirty else "")
        + f" (product code digest {r['code']['product_code_digest']}, run from a snapshot of it); {m['date']}.",
        "",
        f"Machine: {m['cpu'].get('model name')} (family {m['cpu'].get('cpu family')} model {m['cpu'].get('model')}; "
        f"{', '.join(m['cpu'].get('flags', []))}), {m['cores']} cores, L3 {m['l3']}, {m['ram_bytes'] / 2**30:.1f} GiB RAM; "
        f"Python {m['python']}, numpy {m['numpy']}, {m['blas']['name']} {m['blas']['version']} (kernel core {m['blas']['corename']}). "
        f"OpenBLAS environment: {env} (left as found).",
        f"Load average (1/5/15 min) at start {_la(m['loadavg'])}, at end {_la(m.get('loadavg_end'))}"
        + (": the machine was shared with other jobs, so these numbers are pessimistic" if m["loadavg"][0] > 1.5 else "")
        + "; each measurement's load average is in results.json.",
        "",
        f"DRAM read bandwidth (BLAS sgemv over a 1 GiB float32 matrix, median of 7): **{bw1:.1f} GB/s on 1 thread**, "
        f"{bwn:.1f} GB/s with OpenBLAS's default threads. The bandwidth bound is the 1-thread bandwidth divided by the "
        "bytes a decode step reads (table below): the speed if decoding did nothing but stream its weights once.",
        "",
        "## Targets",
        "",
        *(["**Quick run: a tiny model to check the harness. The targets are for the full E2B size; "
           "the 'met' column means nothing here.**", ""] if r["mode"] == "quick" else []),
        "| target | goal | measured (median) | bandwidth bound | measured / bound | met |",
        "|---|---|---|---|---|---|",
    ]
    for label, key, value, bnd in rows:
        op, goal, unit, stretch = TARGETS[key]
        goal_s = f"{op} {_fmt(goal, unit)}" + (f" (stretch {_fmt(stretch, unit)})" if stretch else "")
        value_s = _fmt(value, unit if not isinstance(value, str) else "")
        ratio = f"{value / bnd:.1%}" if bnd and isinstance(value, (int, float)) else "–"
        lines.append(f"| {label} | {goal_s} | {value_s} | {_fmt(bnd, 'tok/s') if bnd else '–'} | {ratio} | {_met(key, value)} |")

    lines += ["", "Details:", ""]
    for name in ("dense", "moe2", "bf16"):
        cv = _g(r, "convert", name)
        if cv is None:
            lines.append(f"- conversion {name}: failed (see results.json)")
            continue
        lines.append(f"- conversion {name}: {cv['seconds']:.0f} s, peak RSS {cv['ru_maxrss_bytes'] / GB:.2f} GB "
                     f"(mapped files {cv['peak_rss_file_bytes'] / GB:.2f} GB + heap {cv['peak_rss_anon_bytes'] / GB:.2f} GB), "
                     f"artifact {cv['size_bytes'] / GB:.2f} GB")
    ld = _g(r, "load", "dense")
    if ld:
        lines.append(f"- load (dense): open + validate {ld['open_s']:.3f} s + tokenizer.json parse {ld['tokenizer_s']:.3f} s "
                     f"(a {r['tokenizer']['json_mb']} MB tokenizer.json, vocabulary 262144); before that, importing the "
                     f"runtime {ld['import_s']:.2f} s; the first token after load {ld['first_token_s']:.2f} s (maps the weights in)")
    dd = _g(dec, "dense", "64")
    if dd:
        lines.append(f"- decode memory (dense, context 64): peak RSS while decoding {dd['decode_peak_rss_bytes'] / GB:.2f} GB "
                     f"(mapped artifact pages {dd['decode_peak_rss_file_bytes'] / GB:.2f} GB + heap {dd['decode_peak_rss_anon_bytes'] / GB:.2f} GB); "
                     f"whole process including the prefill {dd['process_peak_rss_bytes'] / GB:.2f} GB")
    for name in ("moe2", "bf16"):
        for ctx, v in dec.get(name, {}).items():
            if "error" in v:
                lines.append(f"- decode {name}, context {ctx}: failed (see results.json)")
                continue
            lines.append(f"- decode {name}, context {ctx}: {_fmt(v['tok_s'], 'tok/s')} (bound {_fmt(bound(name, int(ctx)), 'tok/s')}), "
                         f"peak RSS while decoding {v['decode_peak_rss_bytes'] / GB:.2f} GB")
    for name, p in r.get("prefill", {}).items():
        if "error" in p:
            lines.append(f"- prefill {name}: failed (see results.json)")
            continue
        lines.append(f"- prefill {name}: " + ", ".join(f"{n} tokens {v['tok_s']:.1f} tok/s" for n, v in p.items() if n.isdigit()))
    if "speedup" in draft:
        lines.append(f"- draft: plain {draft['plain_tok_s']:.2f} tok/s, ngram {draft['ngram_tok_s']:.2f} tok/s on a "
                     f"{draft['prompt_tokens']}-token copy-heavy prompt (a paragraph 3.5 times); same tokens: {draft['same_tokens']}; "
                     f"drafted/accepted per run: {[(x.get('drafted'), x.get('accepted')) for x in draft['runs']['ngram']]}. "
                     "Random weights need not copy the paragraph, so the acceptance rate here says little about a real model.")
    if draft.get("verify"):
        v = draft["verify"]
        lines.append("- draft ceiling: one forward over k new tokens (all logits) at context 64 takes "
                     + ", ".join(f"{1000 * t:.0f} ms (k={k})" for k, t in v["seconds"].items())
                     + "; if every draft were accepted that is at most "
                     + ", ".join(f"{x:.1f}x (k={k})" for k, x in v["ideal_speedup"].items()) + " plain decoding")
    for f in r.get("failures", []):
        lines.append(f"- **failed**: {f['kind']} {f['label']}: `{f['error'].strip().splitlines()[-1][:200]}`")

    lines += ["", "### Embedding tables", "",
              "The dense student with each table encoding (`--tables`, `--per-layer-table`; the default is int8 "
              f"for both, the head tied to the int8 embedding), beside llama.cpp's TQ2_0 GGUF ({LLAMA_CPP_TQ2_0_BYTES / GB:.2f} GB):", "",
              "| student | artifact | decode tok/s @64 | peak RSS while decoding |", "|---|---|---|---|"]
    for name in ("dense-bf16-tables", "dense", "dense-int4-per-layer"):
        cv, dv = _g(r, "convert", name), _g(dec, name, "64")
        if cv is None or dv is None or "error" in dv:
            lines.append(f"| {name} | failed (see results.json) | | |")
            continue
        lines.append(f"| {name} | {cv['size_bytes'] / GB:.2f} GB | {_fmt(dv['tok_s'], 'tok/s')} "
                     f"| {dv['decode_peak_rss_bytes'] / GB:.2f} GB |")

    lines += ["", "### Bytes read per decoded token", "",
              "| artifact | layers | head | embedding rows | other | KV cache @64 | total @64 | bound @64 (1 thread / default threads) |",
              "|---|---|---|---|---|---|---|---|"]
    for name, per_ctx in bpt.items():
        b = per_ctx["64"]
        p = b["parts"]
        head = p.get("head", 0) + p.get("head (tied embedding)", 0)
        lines.append(f"| {name} | {p.get('layers', 0) / 1e6:.0f} MB | {head / 1e6:.0f} MB | {p.get('embedding rows', 0) / 1e3:.0f} kB "
                     f"| {p.get('other', 0) / 1e6:.1f} MB | {b['kv_cache'] / 1e6:.1f} MB | {b['total'] / 1e6:.0f} MB "
                     f"| {bw1 * GB / b['total']:.1f} / {bwn * GB / b['total']:.1f} tok/s |")
    lines += ["", "Layers: every ternary projection with its scales, norms and layer scalars (MoE: top_k/experts of the experts); "
              "head: the int8 copy with its scales, or the whole tied bf16 embedding for the teacher; other: the PLE projection "
              "and final norm; KV cache: float32 keys and values every layer attends over."]

    lines += ["", "## Scaling", "", "Decode (dense ternary) vs context length (random-token context, then greedy decoding):", "",
              "| context | decode tok/s (wall) | per-step median | forward passes only | bytes/token | bound | measured / bound | prefill of the context |",
              "|---|---|---|---|---|---|---|---|"]
    for ctx, v in dec.get("dense", {}).items():
        if "error" in v:
            lines.append(f"| {ctx} | failed | | | | | | |")
            continue
        bnd = bound("dense", ctx)
        lines.append(f"| {ctx} | {_fmt(v['tok_s'])} | {_fmt(v['median_step_tok_s'])} | {_fmt(v['forward_tok_s'])} "
                     f"| {bpt['dense'][ctx]['total'] / 1e6:.0f} MB | {bnd:.1f} | {v['tok_s'] / bnd:.1%} "
                     f"| {v['prefill_s']:.1f} s ({int(ctx) / v['prefill_s']:.1f} tok/s) |")
    lines += ["", "Conversion (dense ternary) vs model size:", "",
              "| scale | source checkpoint | conversion | peak RSS (ru_maxrss) | mapped files | heap | artifact | decode tok/s @64 |",
              "|---|---|---|---|---|---|---|---|"]
    for s, v in r.get("scaling_convert", {}).items():
        ck = r["checkpoints"][s]
        sd = _g(r, "scaling_decode", s, "tok_s")
        head = f"| {s} ({ck['layers']} layers, hidden {ck['hidden']}) | {ck['safetensors_bytes'] / GB:.2f} GB "
        if "error" in v:
            lines.append(head + "| failed | | | | | |")
            continue
        lines.append(head + f"| {v['seconds']:.0f} s | {v['ru_maxrss_bytes'] / GB:.2f} GB | {v['peak_rss_file_bytes'] / GB:.2f} GB "
                     f"| {v['peak_rss_anon_bytes'] / GB:.2f} GB | {v['size_bytes'] / GB:.2f} GB | {_fmt(sd)} |")
    prof = r.get("profile")
    if prof and "markdown" in prof:
        lines += ["", "## Profile of decode steps (dense, context 64)", "", "From bench/profile_decode.py.", "", prof["markdown"]]
    lines += ["", f"Total benchmark time {r['total_seconds'] / 60:.1f} min. Raw data: "
              f"{'bench/results.json' if r['mode'] == 'full' else 'bench/.cache/quick/results.json'}.", ""]
    return "\n".join(lines)


def _la(la) -> str:
    return "–" if la is None else " / ".join(f"{x:.1f}" for x in la)


if __name__ == "__main__":
    sys.exit(main())
