"""Measure each ternary scheme against its teacher: `make quality` (writes bench/quality.json and QUALITY.md).

For every checkpoint, the f32 teacher and one student per scheme are converted, then compared with
`ferrisres.runtime.evaluate.compare`: relative weight error, perplexities, KL(teacher || student) of the
next-token distributions, top-1 agreement, last-layer hidden-state cosine. The real Gemma 3 270M (when
fetched, see scripts/fetch_gemma3.py) is measured on bench/report_text.txt; the tiny checkpoints have
random weights, so their numbers say how faithfully a scheme reproduces a network, not language quality.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ferrisres.convert.build import convert
from ferrisres.convert.quantize import SCHEMES
from ferrisres.convert.student import Options
from ferrisres.runtime import load
from ferrisres.runtime.evaluate import compare

from tables import SECTION as TABLES_SECTION

ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / ".cache" / "gemma-3-270m-q4_k_m.gguf"
CHECKPOINTS = ["tiny_gemma4", "tiny_gemma4_bf16", "tiny_gemma4_e4b", "tiny_gemma4_26b", "tiny_gemma4_31b"]
SEQUENCES = 4  # random token sequences of 64 tokens each, plus the fixture's own prompt


def sequences(vocab: int, fixture_ids: np.ndarray) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [fixture_ids.tolist()] + [[2, *rng.integers(5, vocab, 63).tolist()] for _ in range(SEQUENCES)]


def measure(folder: Path, work: Path) -> dict[str, dict]:
    teacher_path = work / f"{folder.name}-f32.tern"
    convert(folder, teacher_path, Options(quant="f32"), progress=False)
    teacher = load(teacher_path)
    ids = np.load(ROOT / "tests/fixtures/reference" / f"{folder.name}.npz")["ids"]
    results = {}
    for scheme in SCHEMES:
        path = work / f"{folder.name}-{scheme}.tern"
        convert(folder, path, Options(scheme=scheme), progress=False)
        runs = [compare(teacher, load(path), seq) for seq in sequences(teacher.config.vocab_size, ids)]
        results[scheme] = {
            "weight_relative_error": runs[0]["weight_relative_error"],
            "kl_teacher_student": float(np.mean([r["kl_teacher_student"] for r in runs])),
            "top1_agreement": float(np.mean([r["top1_agreement"] for r in runs])),
            "last_layer_cosine": float(np.mean([r["layer_cosine"][-1] for r in runs])),
        }
    return results


def measure_real(gguf: Path, work: Path) -> dict[str, dict]:
    teacher_path = work / "gemma3-270m-f32.tern"
    convert(gguf, teacher_path, Options(quant="f32"), progress=False)
    teacher = load(teacher_path)
    ids = teacher.encode((ROOT / "bench/report_text.txt").read_text(encoding="utf-8"))
    results = {}
    for scheme in SCHEMES:
        path = work / f"gemma3-270m-{scheme}.tern"
        convert(gguf, path, Options(scheme=scheme), progress=False)
        r = compare(teacher, load(path), ids)
        results[scheme] = {**{k: r[k] for k in ("weight_relative_error", "kl_teacher_student", "top1_agreement",
                                                "teacher_perplexity", "student_perplexity")},
                           "last_layer_cosine": r["layer_cosine"][-1]}
        path.unlink()
    return results


def main() -> int:
    table = {}
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache" if GGUF.exists() else None) as work:
        if GGUF.is_file():
            table["gemma3_270m (real, report_text.txt)"] = measure_real(GGUF, Path(work))
        for name in CHECKPOINTS:
            folder = ROOT / "tests/fixtures" / name
            if folder.is_dir():
                table[name] = measure(folder, Path(work))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    (ROOT / "bench/quality.json").write_text(json.dumps({"commit": commit, "results": table}, indent=2) + "\n")
    lines = ["| checkpoint | scheme | weight rel. error | KL(teacher‖student) | top-1 agreement | last-layer cosine | perplexity teacher / student |",
             "|---|---|---|---|---|---|---|"]
    for name, schemes in table.items():
        best = min(schemes, key=lambda s: schemes[s]["kl_teacher_student"])
        for scheme, r in schemes.items():
            mark = " **(lowest KL)**" if scheme == best else ""
            ppl = f"{r['teacher_perplexity']:.2f} / {r['student_perplexity']:.3g}" if "student_perplexity" in r else "-"
            lines.append(f"| {name} | {scheme}{mark} | {r['weight_relative_error']:.4f} | {r['kl_teacher_student']:.4f} "
                         f"| {r['top1_agreement']:.3f} | {r['last_layer_cosine']:.3f} | {ppl} |")
    means = {s: np.mean([table[n][s]["kl_teacher_student"] for n in table]) for s in SCHEMES}
    lines += ["", "Mean KL over checkpoints: " + ", ".join(f"{s} {v:.4f}" for s, v in sorted(means.items(), key=lambda kv: kv[1]))]
    report = "\n".join(lines)
    quality_md = ROOT / "QUALITY.md"
    old = quality_md.read_text(encoding="utf-8") if quality_md.exists() else ""
    tables = old[old.index(TABLES_SECTION):] if TABLES_SECTION in old else ""  # written by bench/tables.py
    quality_md.write_text(
        f"# Ternary schemes against their teacher\n\nMeasured by `make quality` (bench/quality.py) at commit {commit} "
        f"on {platform.machine()} / Python {platform.python_version()}. {__doc__.split(chr(10))[2].strip()}\n\n"
        + report + "\n" + ("\n" + tables if tables else ""))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
