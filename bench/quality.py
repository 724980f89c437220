"""How much of its teacher each kind of student keeps: `make quality` writes out/quality/quality.json and
QUALITY.md; `make quality UPDATE=1` (--update) writes the committed bench/quality.json and QUALITY.md.

For every checkpoint the f32 teacher and one student per quantization below are converted (each
conversion a separate `ferrisres-convert` process, timed, its peak memory measured), then compared with
`ferrisres.runtime.evaluate.compare`: perplexity of both, KL(teacher || student) of the next-token
distributions, top-1 agreement, last-layer hidden-state cosine, relative weight error, and the bits per
decoder weight the student stores. The real Gemma 3 270M (when fetched, see scripts/fetch_gemma3.py) is
measured on bench/report_text.txt; the tiny checkpoint has random weights, so its numbers say how
faithfully a student reproduces a network, not language quality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ferrisres.format.encodings import GROUPED_TERNARY
from ferrisres.runtime import load
from ferrisres.runtime.evaluate import compare

from run import machine_info
from tables import SECTION as TABLES_SECTION

ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / ".cache" / "gemma-3-270m-q4_k_m.gguf"
TINY = ROOT / "tests/fixtures/tiny_gemma4"
CONVERT = Path(sys.executable).parent / "ferrisres-convert"
STUDENTS = {  # name -> ferrisres-convert flags
    "gptq, 2 planes, 3 in the down projections (default)": [],
    "gptq, 2 planes, 3 in the down projections, free plane scales (--plane-scales free)": ["--plane-scales", "free"],
    "gptq, 2 planes everywhere (--down-planes 2)": ["--down-planes", "2"],
    "rtn, 2 planes, 3 in the down projections": ["--method", "rtn"],
    "gptq, 1 plane": ["--planes", "1"],
    "rtn, 1 plane": ["--method", "rtn", "--planes", "1"],
    "per-row absmean (the original student)": ["--method", "rtn", "--planes", "1", "--group", "row", "--rotate", "none"],
}


# Students also measured as `--kernel int8` decodes them: each ternary product takes its inputs rounded to int8
# per group of 64, the tied head over the int6 table per group of 32 (runtime/fast_kernels.py). Fed 8 tokens a
# forward, a few as decoding does.
INT8_KERNEL_STUDENTS = ("gptq, 2 planes, 3 in the down projections (default)",)
INT8_FORWARD_TOKENS = 8


def converted(source: Path, out: Path, flags: list[str]) -> dict:
    """Run ferrisres-convert; its wall time and peak resident memory. It runs as the child of a small,
    freshly started launcher: forked from this process, it would count this process's resident pages
    as its own (Linux carries the high-water mark across exec)."""
    start = time.perf_counter()
    launched = subprocess.run([sys.executable, "-c", _LAUNCHER, str(CONVERT), str(source), "-o", str(out), "--quiet",
                               *flags], capture_output=True, text=True)
    status, peak_kb = map(int, launched.stdout.split()[-2:])
    if status:
        raise SystemExit(f"quality: converting {source.name} {' '.join(flags)} failed: {launched.stderr.strip()}")
    return {"convert_seconds": time.perf_counter() - start, "convert_peak_rss_gb": peak_kb * 1024 / 1e9}


_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(status, usage.ru_maxrss)
"""


def bits_per_weight(path: Path) -> float:
    """Stored bits per weight of the decoder's ternary projections, scales included."""
    model = load(path)
    bits = weights = 0
    for name, info in model.artifact.tensors.items():
        if info.encoding == "ternary" or info.encoding in GROUPED_TERNARY:
            bits += 8 * (info.nbytes + model.artifact.tensors[name + ".weight_scale"].nbytes)
            weights += int(np.prod(info.shape))
    return bits / weights


def progress(text: str) -> None:
    print(f"quality: {text}", file=sys.stderr, flush=True)


def measure(source: Path, ids_of, work: Path, students: list[str], extra_flags: tuple[str, ...] = ()) -> dict[str, dict]:
    progress(f"{source.stem}: converting the f32 teacher")
    teacher_path = work / f"{source.stem}-f32.tern"
    converted(source, teacher_path, ["--quant", "f32"])
    teacher = load(teacher_path)
    ids = ids_of(teacher)
    results = {}
    for name in students:
        flags = [*STUDENTS[name], *extra_flags]
        progress(f"{source.stem}: converting the student: {name}")
        path = work / f"{source.stem}-student.tern"
        cost = converted(source, path, [*flags, "--force"])
        runs = {name: compare(teacher, load(path), ids, progress=lambda text, n=name: progress(f"{source.stem}: {n}: {text}"))}
        if name in INT8_KERNEL_STUDENTS:
            runs[f"{name}, --kernel int8"] = compare(
                teacher, load(path, kernel="int8"), ids, student_forward_tokens=INT8_FORWARD_TOKENS,
                progress=lambda text, n=name: progress(f"{source.stem}: {n}, --kernel int8: {text}"))
        for row, r in runs.items():
            results[row] = {"flags": " ".join(flags), "bits_per_weight": bits_per_weight(path), **cost,
                            **{k: r[k] for k in ("teacher_perplexity", "student_perplexity", "kl_teacher_student",
                                                 "top1_agreement", "weight_relative_error")},
                            "last_layer_cosine": r["layer_cosine"][-1]}
        path.unlink()
    return results


def report_ids(teacher) -> list[int]:
    return teacher.encode((ROOT / "bench/report_text.txt").read_text(encoding="utf-8"))


def tiny_ids(teacher) -> list[int]:
    rng = np.random.default_rng(0)
    return [2, *rng.integers(5, teacher.config.vocab_size, 255).tolist()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--update", action="store_true", help="write the committed bench/quality.json and QUALITY.md")
    parser.add_argument("--student", action="append", choices=list(STUDENTS),
                        help="measure only this student (repeatable; not with --update, which writes the whole table)")
    parser.add_argument("--seed", type=int, help="convert with this seed of the calibration text (the committed "
                        "table is seed 0's): how much a student's figures owe to the text it was calibrated on")
    args = parser.parse_args()
    update, students = args.update, args.student or list(STUDENTS)
    if update and (args.student or args.seed is not None):
        parser.error("--update writes the whole table with the default seed: no --student, no --seed")
    extra_flags = ("--seed", str(args.seed)) if args.seed is not None else ()
    json_path, report_path = (ROOT / "bench/quality.json", ROOT / "QUALITY.md") if update else \
        (ROOT / "out/quality/quality.json", ROOT / "out/quality/QUALITY.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    table = {}
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache" if GGUF.exists() else None) as work:
        if GGUF.is_file():
            table["Gemma 3 270M (real weights, report_text.txt)"] = measure(GGUF, report_ids, Path(work), students, extra_flags)
        table["tiny_gemma4 (random weights, 256 random tokens)"] = measure(TINY, tiny_ids, Path(work), students, extra_flags)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    # the CPU and BLAS kernel too: GPTQ's sequential choices turn their rounding differences into other students
    info = machine_info()
    machine = (f"{info['cpu'].get('model name')}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy "
               f"{info['numpy']}, OpenBLAS kernel {info['blas']['corename']}")
    seed = args.seed or 0
    json_path.write_text(json.dumps({"commit": commit, "machine": machine, "seed": seed, "results": table}, indent=2) + "\n")
    lines = ["| checkpoint | student | bits/weight | perplexity (teacher / student) | KL(teacher‖student) | top-1 agreement "
             "| last-layer cosine | conversion time, peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for checkpoint, students in table.items():
        for name, r in students.items():
            lines.append(f"| {checkpoint} | {name} | {r['bits_per_weight']:.2f} | {r['teacher_perplexity']:.2f} / "
                         f"{r['student_perplexity']:.4g} ({r['student_perplexity'] / r['teacher_perplexity']:.2f}x) "
                         f"| {r['kl_teacher_student']:.3f} | {100 * r['top1_agreement']:.1f}% | {r['last_layer_cosine']:.3f} "
                         f"| {r['convert_seconds']:.0f} s, {r['convert_peak_rss_gb']:.2f} GB |")
    report = "\n".join(lines)
    old = (ROOT / "QUALITY.md").read_text(encoding="utf-8") if (ROOT / "QUALITY.md").exists() else ""
    tables = old[old.index(TABLES_SECTION):] if TABLES_SECTION in old else ""  # written by bench/tables.py
    report_path.write_text(
        "# How much of its teacher a student keeps\n\n"
        f"Measured by `make quality` (bench/quality.py) at commit {commit}{f' with --seed {seed}' if seed else ''} on {machine}. "
        + " ".join(__doc__.split("\n\n")[1].split()) + "\n\n" + report + "\n" + ("\n" + tables if tables else ""))
    print(report)
    progress(f"wrote {json_path.relative_to(ROOT)} and {report_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
