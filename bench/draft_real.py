"""Speculative decoding (--draft ngram) on real weights: Gemma 3 270M's bf16 teacher, copy-heavy prompt.

The synthetic E2B checkpoint has random weights, which never copy their prompt, so prompt lookup finds
nothing to draft there; a real model does copy. Needs `make real-demo` first (the artifact in .cache/).
Writes bench/draft_real.json: plain vs drafted decode, medians of 3 runs each, and whether the tokens match.
"""

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

from ferrisres.runtime import load

ROOT = Path(__file__).resolve().parent.parent
PARAGRAPH = ("The river town wakes slowly in winter. Fishermen check their nets, the baker lights the ovens, "
             "and the ferry waits at the pier for the first passengers of the day. ")


def main() -> None:
    model = load(ROOT / ".cache/gemma3-270m-bf16.tern")
    prompt = model.encode(PARAGRAPH * 3 + "The river town wakes")
    runs = {"plain": [], "ngram": []}
    tokens = {}
    for _ in range(3):
        for name, draft in (("plain", None), ("ngram", "ngram")):
            generation = model.generate(prompt, max_tokens=64, temperature=0, draft=draft)
            for _step in generation:
                pass
            runs[name].append(generation.decode_tokens / generation.decode_seconds)
            tokens[name] = generation.tokens
            acceptance = generation.acceptance_rate
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {
        "commit": commit, "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "prompt_tokens": len(prompt), "new_tokens": 64,
        "plain_decode_tok_s_median": statistics.median(runs["plain"]),
        "ngram_decode_tok_s_median": statistics.median(runs["ngram"]),
        "speedup": statistics.median(runs["ngram"]) / statistics.median(runs["plain"]),
        "acceptance_rate": acceptance, "same_tokens": tokens["plain"] == tokens["ngram"],
    }
    (ROOT / "bench/draft_real.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
