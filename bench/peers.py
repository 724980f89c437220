"""llama.cpp as a peer in `make bench PEERS=1`: fetch, build, convert, and run its llama-bench.

The source is the llama.cpp tree vendored in the package registry's llama-cpp-python sdist (the only
place this machine can get it from: package registries are reachable, GitHub is not). Everything is
cached in bench/.cache/peers/, keyed by the sdist version and the vendored llama.cpp commit, so a rerun
reuses the build and the GGUF:

    peers/llama-cpp-python-<version>/     the sdist, its extracted tree, the cmake build, build.json
    peers/convert-venv-torch<version>/    a bench-only venv for convert_hf_to_gguf.py (CPU torch)
    peers/gguf/<checkpoint>-<commit>-TQ2_0.gguf (+ .json: how it was made, the tensor types chosen)

llama.cpp is built CPU only, Release, with -DGGML_NATIVE=ON: for this machine's instruction set, as a
user building it would. Only llama-bench and llama-quantize are built. None of its code is committed.

    python bench/peers.py build|venv|gguf CHECKPOINT   # one step by hand (bench/run.py calls measure)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE / ".cache" / "peers"

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # its vendor/llama.cpp is commit 0c1e57098 (Gemma 4 and TQ2_0)
TORCH_VERSION = "2.13.0"  # pinned exactly: the CPU build on this machine's disk, never a CUDA one
# What convert_hf_to_gguf.py imports beyond torch and the vendored gguf-py (its requirements file pins
# torch 2.11 and transformers 4.57, which does not know Gemma 4; the newest transformers does)
CONVERT_PACKAGES = ["numpy", "sentencepiece", "transformers", "protobuf", "safetensors"]
TARGETS = ("llama-bench", "llama-quantize")
QUANT = "TQ2_0"


def _run(cmd: list, log: Path, **kw) -> None:
    """Run `cmd` with its output appended to `log`; a failure raises with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, **kw).returncode
    if rc != 0:
        raise RuntimeError(f"{Path(str(cmd[0])).name} failed (exit {rc}); log {log}:\n" + log.read_text(errors="replace")[-1500:])


def du(path: Path) -> int:
    """Bytes a file or folder takes (apparent sizes)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def package_dir() -> Path:
    return PEERS / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"


def fetch_source() -> dict:
    """The sdist from the package registry, extracted: its vendored llama.cpp folder and commit."""
    pkg = package_dir()
    src = pkg / "src"
    llama = src / "vendor" / "llama.cpp"
    if not llama.is_dir():
        pkg.mkdir(parents=True, exist_ok=True)
        sdist = pkg / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
        if not sdist.exists():
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                  f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", pkg], pkg / "fetch.log")
        tmp = pkg / "src.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(sdist) as t:
            t.extractall(tmp, filter="data")
        (top,) = tmp.iterdir()  # llama_cpp_python-<version>/
        top.rename(src)
        tmp.rmdir()
    # the sdist keeps the submodule's git metadata: the exact vendored commit
    head = src / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    commit = head.read_text().strip() if head.exists() else "unknown"
    return {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "commit": commit, "source": llama}


def build() -> dict:
    """llama-bench and llama-quantize, built once per version (build.json records how and at what cost)."""
    src = fetch_source()
    pkg = package_dir()
    record = pkg / "build.json"
    if record.exists():
        out = json.loads(record.read_text())
        if all((pkg / "build" / "bin" / t).exists() for t in TARGETS):
            out["reused"] = True
            return out
    build_dir = pkg / "build"
    log = pkg / "build.log"
    log.unlink(missing_ok=True)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
             "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DGGML_OPENMP=ON",
             "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF", f"-DLLAMA_BUILD_COMMIT={src['commit'][:9]}"]
    t0 = time.perf_counter()
    _run(["cmake", "-S", src["source"], "-B", build_dir, *flags], log)
    configure_s = time.perf_counter() - t0
    _run(["cmake", "--build", build_dir, "--config", "Release", "-j2", "--target", *TARGETS], log)
    out = {"llama_cpp_python": src["llama_cpp_python"], "commit": src["commit"], "cmake_flags": flags,
           "targets": list(TARGETS), "configure_s": configure_s, "build_s": time.perf_counter() - t0,
           "sdist_bytes": du(next(pkg.glob("*.tar.gz"))), "source_bytes": du(pkg / "src"),
           "build_bytes": du(build_dir)}
    record.write_text(json.dumps(out, indent=1) + "\n")
    out["reused"] = False
    return out


def binary(name: str) -> Path:
    return package_dir() / "build" / "bin" / name


def _venv_record() -> Path:
    """What convert_venv made (versions, time, size), in the venv's own folder."""
    return PEERS / f"convert-venv-torch{TORCH_VERSION}" / "ferrisres-bench.json"


def convert_venv() -> dict:
    """A bench-only venv for convert_hf_to_gguf.py: CPU torch pinned, the vendored gguf-py, the rest newest."""
    record = _venv_record()
    venv = record.parent
    python = venv / "bin" / "python"
    if record.exists():
        return {**json.loads(record.read_text()), "python": python, "reused": True}
    src = fetch_source()
    shutil.rmtree(venv, ignore_errors=True)
    log = PEERS / "convert-venv.log"
    log.unlink(missing_ok=True)
    t0 = time.perf_counter()
    _run([sys.executable, "-m", "venv", venv], log)
    _run([python, "-m", "pip", "install", "--quiet", f"torch=={TORCH_VERSION}", *CONVERT_PACKAGES,
          src["source"] / "gguf-py"], log)
    versions = subprocess.run([python, "-c", "import torch, transformers, gguf, numpy; print(torch.__version__, "
                               "transformers.__version__, numpy.__version__)"], capture_output=True, text=True).stdout.split()
    out = {"torch": versions[0] if versions else None, "transformers": versions[1] if len(versions) > 1 else None,
           "numpy": versions[2] if len(versions) > 2 else None, "seconds": time.perf_counter() - t0, "bytes": du(venv)}
    record.write_text(json.dumps(out, indent=1) + "\n")
    return {**out, "python": python, "reused": False}


# Run in the convert venv: the type of every tensor of a GGUF file (what llama-quantize chose)
_TENSOR_TYPES = """
import json, sys, gguf
r = gguf.GGUFReader(sys.argv[1])
by_type, tensors = {}, {}
for t in r.tensors:
    name = t.tensor_type.name
    n = by_type.setdefault(name, {"tensors": 0, "bytes": 0})
    n["tensors"] += 1
    n["bytes"] += int(t.n_bytes)
    tensors[t.name] = name
print(json.dumps({"by_type": by_type, "tensors": tensors}))
"""


def gguf_file(checkpoint: Path) -> dict:
    """The checkpoint converted by llama.cpp's convert_hf_to_gguf.py (f16), then `llama-quantize ... TQ2_0`
    with its defaults (it picks the types of the embedding and output tensors itself: recorded). Cached by
    checkpoint and llama.cpp commit; the f16 intermediate is deleted once quantized (its size is recorded)."""
    src = fetch_source()
    out_dir = PEERS / "gguf"
    stem = f"{checkpoint.name}-{src['commit'][:9]}"
    final = out_dir / f"{stem}-{QUANT}.gguf"
    record = out_dir / f"{stem}-{QUANT}.json"
    if final.exists() and record.exists():
        return {**json.loads(record.read_text()), "path": final, "reused": True}
    venv = convert_venv()
    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / f"{stem}-f16.gguf"
    log = out_dir / f"{stem}.log"
    log.unlink(missing_ok=True)
    t0 = time.perf_counter()
    _run([venv["python"], src["source"] / "convert_hf_to_gguf.py", checkpoint, "--outfile", f16, "--outtype", "f16"],
         log, env={**os.environ, "PYTHONPATH": str(src["source"] / "gguf-py")})
    convert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _run([binary("llama-quantize"), f16, final, QUANT], log)
    quantize_s = time.perf_counter() - t0
    types = subprocess.run([venv["python"], "-c", _TENSOR_TYPES, final], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(src["source"] / "gguf-py")})
    chosen = json.loads(types.stdout) if types.returncode == 0 else {"error": types.stderr[-500:]}
    out = {"commit": src["commit"], "checkpoint": checkpoint.name, "quant": QUANT, "convert_s": convert_s,
           "quantize_s": quantize_s, "f16_bytes": f16.stat().st_size, "bytes": final.stat().st_size,
           "tensor_types": chosen.get("by_type"), "special_tensor_types": _special(chosen.get("tensors", {}))}
    f16.unlink()
    record.write_text(json.dumps(out, indent=1) + "\n")
    return {**out, "path": final, "reused": False}


def _special(tensors: dict) -> dict:
    """The types llama-quantize gave the tensors that are not the layers' projections (embeddings, output)."""
    return {n: t for n, t in tensors.items() if not n.startswith("blk.") and not n.endswith("_norm.weight")}


def measure(checkpoint: Path, students: dict[str, Path], plan: dict, attempt) -> dict:
    """llama.cpp's TQ2_0 GGUF of `checkpoint` beside ferrisres's `students` of it (name -> artifact, those of
    plan["students"]), at each thread count of plan["threads"], both pinned to the same cores: decode
    (plan["new"] tokens after plan["context"]) with each student's kernels, and prefill (plan["prompt"]
    tokens) once per student. `attempt` runs a ferrisres worker (bench/run.py's Attempts, with its `pin`)
    and records failures; a failure of llama.cpp's side is recorded in it too, and the run goes on."""
    out = {"plan": plan}
    t0 = time.perf_counter()
    try:
        out["build"] = build()
        out["gguf"] = gguf_file(checkpoint)
        if _venv_record().exists():  # made with the GGUF, by this run or an earlier one
            out["venv"] = json.loads(_venv_record().read_text())
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        attempt.failures.append({"kind": "peers", "label": "llama.cpp build or GGUF", "error": str(e)[-1500:]})
        print(f"  FAILED: llama.cpp: {str(e).splitlines()[0]}", file=sys.stderr)
        out["error"] = str(e)[-1500:]
    out["setup_s"] = time.perf_counter() - t0
    cores = sorted(os.sched_getaffinity(0))
    out["by_threads"] = {}
    for n in plan["threads"]:
        cpus = ",".join(map(str, cores[:n]))
        row = out["by_threads"][str(n)] = {"cpus": cpus}
        if "error" not in out:
            row["llama_cpp"] = {}
            for n_prompt, n_gen, depth in ((plan["prompt"], 0, 0), (0, plan["new"], plan["context"]), (f"1,{plan['batch']}", 0, 0)):
                cmd = llama_bench_command(out["gguf"]["path"], n, cpus, n_prompt, n_gen, depth, plan["repetitions"])
                try:
                    for t in run_llama_bench(cmd):
                        row["llama_cpp"][t["test"]] = t
                        print(f"  llama-bench {t['test']:<10} {n} thread(s) {t['tok_s']:7.2f} tok/s", file=sys.stderr, flush=True)
                except (RuntimeError, ValueError, KeyError, subprocess.SubprocessError) as e:
                    attempt.failures.append({"kind": "llama-bench", "label": " ".join(cmd[3:]), "error": str(e)[-1500:]})
                    print(f"  FAILED: llama-bench: {str(e).splitlines()[0]}", file=sys.stderr)
        row["ferrisres"] = {name: _measure_student(students[name], kernels, n, cpus, plan, attempt, name)
                            for name, kernels in plan["students"].items()}
    out["artifact_bytes"] = {name: p.stat().st_size if p.exists() else None for name, p in students.items()}
    out["total_s"] = time.perf_counter() - t0
    if "gguf" in out:
        out["gguf"]["path"] = str(out["gguf"]["path"])
    return out


def _measure_student(artifact: Path, kernels: list[str], threads: int, cpus: str, plan: dict, attempt, name: str) -> dict:
    """One student at one thread count: {kernel: decode tok/s (median) and runs, ..., "prefill": {kernel: tok/s
    and run},
    "batch": {sequences: aggregate tok/s (median) and runs} for one and plan["batch"] sequences}."""
    common = {"path": str(artifact), "threads": threads}
    side = {}
    for kernel in kernels:
        runs = [attempt("decode", {**common, "kernel": kernel, "context": plan["context"], "new": plan["new"], "seed": r},
                        pin=cpus, label=f"peers {name} {kernel} {threads}t ctx {plan['context']} #{r}")
                for r in range(plan["repetitions"])]
        side[kernel] = {"decode_tok_s": _median_rate(runs), "decode_runs": runs}
    side["prefill"] = {}
    for kernel in plan["prefill_kernels"]:
        p = attempt("prefill", {**common, "kernel": kernel, "lengths": [plan["prompt"]], "repeats": plan["repetitions"]},
                    pin=cpus, label=f"peers {name} {kernel} {threads}t prefill {plan['prompt']}")
        side["prefill"][kernel] = {"tok_s": p.get(str(plan["prompt"]), {}).get("tok_s"), "run": p}
    side["batch"] = {}
    for sequences in (1, plan["batch"]):
        runs = [attempt("batch", {**common, "kernel": plan["batch_kernel"], "sequences": sequences, "context": plan["context"],
                                  "new": plan["batch_new"], "seed": r},
                        pin=cpus, label=f"peers {name} {plan['batch_kernel']} {threads}t {sequences} sequences #{r}")
                for r in range(plan["repetitions"])]
        side["batch"][str(sequences)] = {"tok_s": _median_rate(runs), "runs": runs}
    return side


def _median_rate(runs: list[dict]) -> float | None:
    """The median tok/s of the worker runs that measured one (None if none did)."""
    rates = [r["tok_s"] for r in runs if "error" not in r and r.get("tok_s")]
    return statistics.median(rates) if rates else None


def llama_bench_command(gguf: Path, threads: int, cpus: str, n_prompt: int | str, n_gen: int, depth: int,
                        repetitions: int) -> list[str]:
    """llama-bench pinned to `cpus` with taskset (as ferrisres's workers are), JSON output; `n_prompt` may
    list several sizes ("1,8": a test each)."""
    return ["taskset", "-c", cpus, str(binary("llama-bench")), "-m", str(gguf), "-t", str(threads),
            "-p", str(n_prompt), "-n", str(n_gen), "-d", str(depth), "-r", str(repetitions), "-o", "json"]


def run_llama_bench(cmd: list[str], timeout: float = 3600) -> list[dict]:
    """One llama-bench run: its tests, parsed (parse_llama_bench); the wall time and load around it."""
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    logs = PEERS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    raw = logs / f"{time.strftime('%H%M%S')}-llama-bench-t{cmd[cmd.index('-t') + 1]}-p{cmd[cmd.index('-p') + 1]}.json"
    raw.write_text(p.stdout)  # as llama-bench wrote it; its stderr beside it
    raw.with_suffix(".log").write_text(p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"llama-bench failed (exit {p.returncode}): {p.stderr[-1500:]}")
    tests = parse_llama_bench(p.stdout)
    for t in tests:
        t["_run"] = {"wall_s": time.perf_counter() - t0, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    return tests


def parse_llama_bench(text: str) -> list[dict]:
    """llama-bench's `-o json` output: per test, its name (pp256, tg64@d64) and the median of its
    per-repetition rates (llama-bench itself reports the mean), with the fields that say what ran."""
    out = []
    for t in json.loads(text):
        if t["n_prompt"] and not t["n_gen"]:
            name = f"pp{t['n_prompt']}"
        elif t["n_gen"] and not t["n_prompt"]:
            name = f"tg{t['n_gen']}"
        else:
            name = f"pp{t['n_prompt']}+tg{t['n_gen']}"
        if t.get("n_depth"):
            name += f"@d{t['n_depth']}"
        out.append({"test": name, "tok_s": statistics.median(t["samples_ts"]), "samples_ts": t["samples_ts"],
                    "avg_ts": t["avg_ts"], "stddev_ts": t["stddev_ts"], "n_threads": t["n_threads"],
                    "n_prompt": t["n_prompt"], "n_gen": t["n_gen"], "n_depth": t.get("n_depth", 0),
                    "model_size": t["model_size"], "model_n_params": t["model_n_params"],
                    "model_type": t["model_type"], "build_commit": t["build_commit"], "cpu_info": t["cpu_info"],
                    "flash_attn": t.get("flash_attn"), "type_k": t.get("type_k")})
    return out


if __name__ == "__main__":
    step = sys.argv[1] if len(sys.argv) > 1 else ""
    steps = {"build": build, "venv": convert_venv, "gguf": lambda: gguf_file(Path(sys.argv[2]))}
    if step in steps and (step != "gguf" or len(sys.argv) > 2):
        print(json.dumps(steps[step](), indent=1, default=str))
    else:
        sys.exit(f"usage: python bench/peers.py build|venv|gguf CHECKPOINT (got {' '.join(sys.argv[1:])!r})")
