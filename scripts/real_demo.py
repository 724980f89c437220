"""`make real-demo`: Gemma 3 270M (real weights) through convert -> artifact -> runtime.

Fetches the GGUF (scripts/fetch_gemma3.py), converts it twice (the bf16 teacher and the default
ternary student), and prints their greedy continuations of a few prompts side by side, then the
student's quality against the teacher on bench/report_text.txt.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from fetch_gemma3 import default_cache, fetch

from ferrisres.runtime import load
from ferrisres.runtime.evaluate import compare

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):",
           "The three primary colors are"]


def converted(gguf: Path, out: Path, *options: str) -> Path:
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "ferrisres.convert.cli", str(gguf), "-o", str(out), *options], check=True)
    return out


def main() -> int:
    cache = default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    gguf = fetch(cache)
    teacher = load(converted(gguf, cache / "gemma3-270m-bf16.tern", "--quant", "bf16"))
    student = load(converted(gguf, cache / "gemma3-270m-ternary.tern"))
    for prompt in PROMPTS:
        print(f"\n=== {prompt!r}")
        for name, model in (("teacher (bf16)", teacher), ("student (ternary)", student)):
            text = _greedy(model, prompt)
            print(f"  {name:18} " + textwrap.shorten(repr(text), 110))
    ids = teacher.encode((ROOT / "bench/report_text.txt").read_text(encoding="utf-8"))
    report = compare(teacher, student, ids)
    print(f"\non bench/report_text.txt ({report['tokens']} tokens): perplexity teacher {report['teacher_perplexity']:.2f}, "
          f"student {report['student_perplexity']:.1f}; KL(teacher||student) {report['kl_teacher_student']:.2f}; "
          f"top-1 agreement {report['top1_agreement']:.1%}")
    return 0


def _greedy(model, prompt: str) -> str:
    generation = model.generate(model.encode(prompt), max_tokens=24, temperature=0)
    for _ in generation:
        pass
    return generation.text


if __name__ == "__main__":
    sys.exit(main())
