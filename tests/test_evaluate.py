"""`ferrisres-eval TEACHER STUDENT`: the quality numbers, rounded, with progress on stderr, and a warning
when the two look swapped."""

import json
import re

from conftest import reference, run_tool

EVAL = "ferrisres-eval"


def ids_argument() -> str:
    return ",".join(map(str, reference("tiny_gemma4")["ids"][:24]))


def test_a_model_against_itself_keeps_everything(converted):
    teacher = str(converted("tiny_gemma4", "f32"))
    result = run_tool(EVAL, teacher, teacher, "--ids", ids_argument(), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens"] == 24 and report["teacher_perplexity"] == report["student_perplexity"]
    assert report["kl_teacher_student"] == 0 and report["top1_agreement"] == 1
    assert all(c == 1 for c in report["layer_cosine"])


def test_numbers_are_rounded_and_progress_is_shown(converted):
    teacher, student = str(converted("tiny_gemma4", "f32")), str(converted("tiny_gemma4", "ternary"))
    result = run_tool(EVAL, teacher, student, "--ids", ids_argument(), "--json")
    assert result.returncode == 0, result.stderr
    for number in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", result.stdout):
        assert len(number.lstrip("-").split("e")[0].replace(".", "").strip("0")) <= 6, number  # 6 significant digits
    assert re.search(r"teacher forward 24/24 tokens", result.stderr)
    assert re.search(r"student forward 24/24 tokens", result.stderr)
    assert "warning" not in result.stderr
    text = run_tool(EVAL, teacher, student, "--ids", ids_argument()).stdout
    assert re.search(r"weight error \d\.\d{3}\b", text), text


def test_swapped_teacher_and_student_are_warned_about(converted):
    teacher, student = str(converted("tiny_gemma4", "f32")), str(converted("tiny_gemma4", "ternary"))
    result = run_tool(EVAL, student, teacher, "--ids", ids_argument())
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "swapped" in warnings[0], result.stderr
