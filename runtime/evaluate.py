"""`ferrisres-eval TEACHER.tern STUDENT.tern`: how much of the teacher a student keeps.

On one token sequence: each model's perplexity, KL(teacher || student) of the next-token
distributions, top-1 agreement, the cosine of every layer's hidden states, and the relative error
of the student's projection weights against the teacher's.
"""

import json
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ferrisres.format import ArtifactError, decode_f32
from ferrisres.cli import parse_args, read_text, run_main

from .kv_cache import KVCache
from .model import Model, load

PROG = "ferrisres-eval"
FORWARD_TOKENS = 256  # tokens per forward pass through the KV cache: progress is told after each


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def dequantized(model: Model, name: str) -> np.ndarray:
    """A weight of the artifact as float32 with its scales applied, in the basis of the unrotated input
    (whole tensor: for evaluation only)."""
    info = model.artifact.tensors[name]
    if len(info.shape) == 1:
        return decode_f32(model.artifact.tensor(name), info.encoding)
    return np.stack([linear.dequantize() for linear in model.weights.linears_of(name)]).reshape(info.shape)


def compare(teacher: Model, student: Model, ids: list[int], chunk: int = 128, progress=None,
            student_forward_tokens: int | None = None) -> dict:
    """Quality numbers of `student` against `teacher` on `ids` (both artifacts of the same model).

    Logits are made `chunk` positions at a time from the last hidden states, so memory stays bounded
    even for a 262144-token vocabulary over thousands of positions. `progress(text)`, if given, is told
    how far the work is after each chunk of it. The student's forward passes take
    `student_forward_tokens` tokens each (default FORWARD_TOKENS): as few as decoding takes, to measure the
    kernels of decoding."""
    report = progress or (lambda text: None)
    student_forward_tokens = student_forward_tokens or FORWARD_TOKENS
    hidden = {role: _hidden_states(model, ids, lambda done, r=role: report(f"{r} forward {done}/{len(ids)} tokens"), tokens)
              for role, model, tokens in (("teacher", teacher, FORWARD_TOKENS), ("student", student, student_forward_tokens))}
    targets = np.asarray([*ids[1:], -1])
    nll = {"teacher": 0.0, "student": 0.0}
    kl_sum, agree = 0.0, 0
    for start in range(0, len(ids), chunk):
        rows = slice(start, start + chunk)
        logp = {role: log_softmax(m.decoder.logits_of(hidden[role][-1][rows])) for role, m in
                (("teacher", teacher), ("student", student))}
        predicted = targets[rows] >= 0  # the last position predicts nothing we know
        for role in nll:
            nll[role] -= float(logp[role][np.flatnonzero(predicted), targets[rows][predicted]].sum())
        kl_sum += float(np.sum(np.exp(logp["teacher"]) * (logp["teacher"] - logp["student"])))
        agree += int(np.sum(logp["teacher"].argmax(-1) == logp["student"].argmax(-1)))
        report(f"logits compared {min(start + chunk, len(ids))}/{len(ids)} positions")
    n = len(ids)
    return {
        "tokens": n,
        "teacher_perplexity": float(np.exp(nll["teacher"] / (n - 1))),
        "student_perplexity": float(np.exp(nll["student"] / (n - 1))),
        "kl_teacher_student": kl_sum / n,
        "top1_agreement": agree / n,
        "layer_cosine": [float(np.mean(_cosine(t, s))) for t, s in zip(hidden["teacher"], hidden["student"])],
        "weight_relative_error": _weight_error(teacher, student),
    }


def _hidden_states(model: Model, ids: list[int], progress, chunk: int) -> list[np.ndarray]:
    """Every layer's output [tokens, hidden] over `ids`, computed `chunk` tokens at a time through the
    KV cache (exact: a causal model), so progress can be told along the way."""
    cache, parts = KVCache(model.config), []
    for start in range(0, len(ids), chunk):
        layers: list[np.ndarray] = []
        model.decoder.forward(np.asarray(ids[start : start + chunk]), cache, last_only=True, hidden_states=layers)
        parts.append(layers)
        progress(min(start + chunk, len(ids)))
    return [np.concatenate(layer) for layer in zip(*parts)]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _weight_error(teacher: Model, student: Model) -> float | None:
    """||W_student - W_teacher|| / ||W_teacher|| over all ternary projections both artifacts hold."""
    error = norm = 0.0
    for name, info in student.artifact.tensors.items():
        if not info.encoding.startswith("ternary") or name not in teacher.artifact.tensors:
            continue
        t = dequantized(teacher, name).astype(np.float64)
        error += float(np.sum((dequantized(student, name) - t) ** 2))
        norm += float(np.sum(t**2))
    return float(np.sqrt(error / norm)) if norm else None


@dataclass
class Args:
    teacher: str = field(metadata={"args": ["teacher"], "help": "the unquantized artifact (ferrisres-convert --quant f32)"})
    student: str = field(metadata={"args": ["student"], "help": "the student artifact of the same checkpoint"})
    text: Optional[str] = field(default=None, metadata={"help": "UTF-8 text file to evaluate on (default: --ids)"})
    ids: Optional[str] = field(default=None, metadata={"help": "comma-separated token ids to evaluate on"})
    json: bool = field(default=False, metadata={"help": "print JSON"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, PROG, __doc__, argv)
    return run_main(PROG, lambda: _evaluate(args), (ArtifactError, ValueError))


def _evaluate(args: Args) -> int:
    teacher, student = load(args.teacher), load(args.student)
    if teacher.config.to_json() != student.config.to_json() and teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError("the two artifacts are not of the same model")
    if _quant(teacher) == "ternary" and _quant(student) != "ternary":
        print(f"{PROG}: warning: the teacher {args.teacher} is a ternary student and the student {args.student} "
              "is not: are they swapped? (KL and agreement are measured from the first one's view)", file=sys.stderr)
    if (args.text is None) == (args.ids is None):
        raise ValueError("give exactly one of --text and --ids")
    if args.text is not None:
        ids = teacher.encode(read_text(args.text, "text"))
    else:
        try:
            ids = [int(t) for t in args.ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--ids must be comma-separated integers, got {args.ids[:40]!r}") from None
    if len(ids) < 2:
        raise ValueError("evaluating needs at least 2 tokens (each predicts the next)")
    bad = [i for i in ids if not 0 <= i < teacher.config.vocab_size]
    if bad:
        raise ValueError(f"token id {str(bad[0])[:40]} is outside the vocabulary (0..{teacher.config.vocab_size - 1})")
    report = compare(teacher, student, ids, progress=lambda text: print(f"{PROG}: {text}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(_rounded(report), indent=2))
    else:
        weight_error = report["weight_relative_error"]
        print(f"tokens {report['tokens']}: perplexity teacher {report['teacher_perplexity']:.4g}, "
              f"student {report['student_perplexity']:.4g}; KL(teacher||student) {report['kl_teacher_student']:.4f}; "
              f"top-1 agreement {report['top1_agreement']:.3f}; weight error "
              + ("-" if weight_error is None else f"{weight_error:.3f}"))
        print("layer cosine: " + " ".join(f"{c:.3f}" for c in report["layer_cosine"]))
    return 0


def _quant(model: Model) -> str | None:
    return model.student_config.get("quant")


def _rounded(value, digits: int = 6):
    """Numbers to `digits` significant digits: more than float32 computation (and the comparison) holds."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    return value


if __name__ == "__main__":
    sys.exit(main())
