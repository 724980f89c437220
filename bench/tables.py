"""Measure each embedding-table encoding against float tables: `make quality-tables` (writes
bench/tables.json and the "Embedding tables" section of QUALITY.md).

On the real Gemma 3 270M (when fetched, see scripts/fetch_gemma3.py), whose token embedding (tied to the
head) is 168M of its 268M parameters: the f32 teacher with each table encoding against the plain f32
teacher on bench/report_text.txt (`ferrisres.runtime.evaluate.compare`), and the size of the ternary
student with each. No real Gemma 4 weights exist here, so the per-layer table is measured only on the
tiny Gemma 4 (random weights): the teacher with just that table re-encoded, on the fixture's prompt.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ferrisres.convert.build import convert
from ferrisres.convert.student import Options
from ferrisres.convert.gguf_source import GGUFSource
from ferrisres.convert.tables import DEFAULT_TABLES, TABLE_CHOICES, quantize_table_rows
from ferrisres.format.tables import decode_table_rows
from ferrisres.runtime import load
from ferrisres.runtime.evaluate import compare

ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / ".cache" / "gemma-3-270m-q4_k_m.gguf"
TINY = ROOT / "tests/fixtures/tiny_gemma4"
TINY_IDS = np.load(ROOT / "tests/fixtures/reference/tiny_gemma4.npz")["ids"]
SECTION = "## Embedding tables"
MAX_PERPLEXITY_RISE = 0.01  # the default is the smallest encoding within 1% of the float teacher's perplexity
DECODE_PROMPT, DECODE_NEW = 64, 32  # the students' decode speed: tokens per second after a 64-token prompt
KERNELS = ("numpy", "fast")


def quality(model: Path, work: Path, ids_of, option: str) -> dict[str, dict]:
    """compare() of the f32 teacher with each encoding of `option` (an Options field) against the plain f32 teacher."""
    teacher_path = work / "teacher.tern"
    convert(model, teacher_path, Options(quant="f32"), progress=False, overwrite=True)
    teacher = load(teacher_path)
    ids = ids_of(teacher)
    results = {}
    for encoding in TABLE_CHOICES:
        path = work / f"teacher-{encoding}.tern"
        convert(model, path, Options(quant="f32", **{option: encoding}), progress=False, overwrite=True)
        encoded = load(path)
        r = compare(teacher, encoded, ids)
        results[encoding] = {k: r[k] for k in ("tokens", "teacher_perplexity", "student_perplexity", "kl_teacher_student",
                                               "top1_agreement")}
        results[encoding]["perplexity_rise"] = r["student_perplexity"] / r["teacher_perplexity"] - 1
        results[encoding]["head_ms"] = head_milliseconds(encoded)
        path.unlink()
    return results


def head_milliseconds(model, repeats: int = 7) -> float:
    """Median time of one token through the model's output head (numpy kernels, one thread)."""
    x = np.random.default_rng(0).standard_normal((1, model.config.hidden_size)).astype(np.float32)
    model.weights.head(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.weights.head(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def table_errors(model: Path, rows_per_block: int = 32768) -> dict[str, float]:
    """Relative RMS error, ||dequantized - w|| / ||w||, of the token embedding in each quantized encoding."""
    source = GGUFSource(model)
    shape = source.tensors["model.embed_tokens.weight"].shape
    errors = {}
    for encoding in TABLE_CHOICES[1:]:
        error = norm = 0.0
        for r0 in range(0, shape[0], rows_per_block):
            w = source.read_f32("model.embed_tokens.weight", shape, (r0, min(r0 + rows_per_block, shape[0])))
            q, scale = quantize_table_rows(w, encoding, "embed_tokens")
            error += float(np.sum((decode_table_rows(q, encoding, scale, shape[1]) - w).astype(np.float64) ** 2))
            norm += float(np.sum(w.astype(np.float64) ** 2))
        errors[encoding] = float(np.sqrt(error / norm))
    return errors


def students(model: Path, work: Path, rounds: int = 3) -> dict[str, dict]:
    """Bytes and decode speed (numpy and fast kernels, one thread) of the default student with each table
    encoding, rounded to nearest (--method rtn): the same encodings, sizes and speed as the calibrated
    conversion, in seconds instead of minutes. Speeds are medians of `rounds` runs, the encodings and
    kernels alternated in each round so that a change in the machine's load falls on all of them."""
    paths = {encoding: work / f"student-{encoding}.tern" for encoding in TABLE_CHOICES}
    for encoding, path in paths.items():
        convert(model, path, Options(tables=encoding, method="rtn"), progress=False, overwrite=True)
    rates = {(encoding, kernel): [] for encoding in paths for kernel in KERNELS}
    for _ in range(rounds):
        for encoding, path in paths.items():
            for kernel in KERNELS:
                rates[encoding, kernel].append(decode_rate(path, kernel))
    measured = {encoding: {"bytes": path.stat().st_size,
                           **{f"decode_tok_s_{kernel}": statistics.median(rates[encoding, kernel]) for kernel in KERNELS}}
                for encoding, path in paths.items()}
    for path in paths.values():
        path.unlink()
    return measured


def decode_rate(path: Path, kernel: str) -> float:
    """Tokens per second of greedy decoding after a DECODE_PROMPT-token prompt: the median step, the first
    4 left out (caches warming up)."""
    model = load(path, kernel=kernel)
    stamps = [time.perf_counter() for _ in model.generate(list(range(1000, 1000 + DECODE_PROMPT)),
                                                          max_tokens=DECODE_NEW, temperature=0)]
    return 1 / statistics.median(np.diff(stamps)[4:])


def smallest_within(results: dict[str, dict]) -> str:
    """The smallest encoding within the perplexity bound (TABLE_CHOICES run from the largest to the smallest)."""
    return [e for e in TABLE_CHOICES if results[e]["perplexity_rise"] <= MAX_PERPLEXITY_RISE][-1]


def main() -> int:
    if sys.argv[1:] == ["--report-only"]:  # rewrite the QUALITY.md section from bench/tables.json
        data = json.loads((ROOT / "bench/tables.json").read_text())
        write_section(report(data["gemma3_270m"], data["gemma3_270m_students"], data["gemma3_270m_table_error"],
                             data["tiny_gemma4_per_layer_table"], data["commit"], data["machine"]))
        return 0
    if not GGUF.is_file():
        print(f"{GGUF.name} is not fetched (scripts/fetch_gemma3.py): nothing to measure", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as work:
        work = Path(work)
        real = quality(GGUF, work, lambda t: t.encode((ROOT / "bench/report_text.txt").read_text(encoding="utf-8")),
                       "tables")
        student = students(GGUF, work)
        errors = table_errors(GGUF)
        per_layer = quality(TINY, work, lambda t: TINY_IDS.tolist(), "per_layer_table")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    machine = f"{platform.machine()} / Python {platform.python_version()}"
    (ROOT / "bench/tables.json").write_text(json.dumps(
        {"commit": commit, "machine": machine, "gemma3_270m": real, "gemma3_270m_students": student,
         "gemma3_270m_table_error": errors,
         "tiny_gemma4_per_layer_table": per_layer, "chosen": smallest_within(real)}, indent=2) + "\n")
    write_section(report(real, student, errors, per_layer, commit, machine))
    return 0


def write_section(section: str) -> None:
    """Replace (or append) this script's section of QUALITY.md, keeping what `make quality` wrote."""
    quality_md = ROOT / "QUALITY.md"
    text = quality_md.read_text(encoding="utf-8")
    kept = text[: text.index(SECTION)] if SECTION in text else text + "\n"
    quality_md.write_text(kept + section)
    print(section)


def report(real: dict, student: dict, errors: dict, per_layer: dict, commit: str, machine: str) -> str:
    chosen = smallest_within(real)
    lines = [SECTION, "", f"Measured by `make quality-tables` (bench/tables.py) at commit {commit} on {machine}. "
             "Gemma 3 270M (real weights, bench/report_text.txt, "
             f"{real[chosen]['tokens']} tokens): the f32 teacher with its token embedding (which is also its tied head) "
             "stored in each encoding, against the plain f32 teacher; and the ternary student's artifact with each.", "",
             "| tables | table rel. RMS error | perplexity (f32 tables: %.3f) | rise | KL(f32‖this) | top-1 agreement "
             "| head, numpy, 1 token | ternary student artifact | student decode, numpy / fast |"
             % real[chosen]["teacher_perplexity"], "|---|---|---|---|---|---|---|---|---|"]
    for encoding, r in real.items():
        mark = " **(default)**" if encoding == chosen else ""
        error = f"{errors[encoding]:.4f}" if encoding in errors else "-"
        lines.append(f"| {encoding}{mark} | {error} | {r['student_perplexity']:.3f} | {100 * r['perplexity_rise']:+.2f}% "
                     f"| {r['kl_teacher_student']:.5f} | {r['top1_agreement']:.3f} | {r['head_ms']:.1f} ms "
                     f"| {student[encoding]['bytes'] / 1e6:.1f} MB | {student[encoding]['decode_tok_s_numpy']:.1f} / "
                     f"{student[encoding]['decode_tok_s_fast']:.1f} tok/s |")
    lines += ["", f"The default is the smallest encoding whose perplexity rises by at most {MAX_PERPLEXITY_RISE:.0%}. The "
              "head reads the whole table for every token: an int4 or int6 table is unpacked once, at load, into resident "
              "int8 values with its group scales (exact), so its head costs a multiply per weight more than int8's, not "
              "a 4- or 6-bit decode (head: median of 7 one-token products through the numpy kernels; decode: tokens per "
              f"second of the rounded-to-nearest student after a {DECODE_PROMPT}-token prompt, the median step of "
              f"{DECODE_NEW}, median of 3 runs alternated between encodings; one thread, the measuring machine).", "",
              "The per-layer table of Gemma 4 (tiny Gemma 4, random weights, the fixture's prompt; only that table "
              "re-encoded in the f32 teacher):", "", "| per-layer table | KL(f32‖this) | top-1 agreement |", "|---|---|---|"]
    lines += [f"| {e} | {r['kl_teacher_student']:.6f} | {r['top1_agreement']:.3f} |" for e, r in per_layer.items()]
    kl = {e: per_layer[e]["kl_teacher_student"] for e in per_layer}
    d = DEFAULT_TABLES
    lines += ["", f"The per-layer table's default is {d} too, the token table's: it cannot be measured on real weights "
              "here. Its rows are scaled, added to a normalized projection of the hidden state, "
              "multiplied elementwise by a gate and projected before the norm that follows, so that norm rescales the "
              f"result but keeps each value's relative error, which {d} makes {100 * errors[d]:.1f}% of the table's RMS on "
              f"Gemma 3's embedding (int8: {100 * errors['int8']:.1f}%, int4-g32: {100 * errors['int4-g32']:.0f}%). On that "
              f"real embedding, whose error reaches the logits directly through the tied head, {d} costs "
              f"{100 * real[d]['perplexity_rise']:+.2f}% of perplexity and int4-g32 "
              f"{100 * real['int4-g32']['perplexity_rise']:+.0f}%; on the tiny Gemma 4 the per-layer table alone moves the "
              f"next-token distribution by KL {kl[d]:.4f} in {d} ({kl[d] / kl['int8']:.1f}x int8's) and "
              f"{kl['int4-g32']:.2f} in int4-g32 ({kl['int4-g32'] / kl['int8']:.0f}x). So int4 stays an option for size "
              "(`--per-layer-table int4-g32`, the E2B sizes are in the README), to be made the default only if real "
              "Gemma 4 weights show its cost is small."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
