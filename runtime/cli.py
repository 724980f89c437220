"""`ferrisres-run MODEL.tern --prompt TEXT`: stream generated text to stdout, a summary to stderr."""

import sys
import time
from dataclasses import dataclass, field

from argparse_dataclass import ArgumentParser

from ferrisres.format.cli import run_main

from .model import load

PROG = "ferrisres-run"


@dataclass
class Args:
    model: str = field(metadata={"args": ["model"], "help": "the .tern artifact"})
    prompt: str = field(metadata={"args": ["-p", "--prompt"], "help": "text to continue"})
    max_tokens: int = field(default=256, metadata={"args": ["-n", "--max-tokens"], "help": "stop after this many new tokens (default 256)"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy (default); higher = more random"})
    seed: int = field(default=0, metadata={"help": "sampling seed (default 0): same seed, same text"})


def main(argv: list[str] | None = None) -> int:
    args = ArgumentParser(Args, prog=PROG, description=__doc__).parse_args(argv)
    return run_main(PROG, lambda: _run(args), (ValueError,))


def _run(args: Args) -> int:
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    start = time.perf_counter()
    model = load(args.model)
    prompt_ids = model.encode(args.prompt)
    load_seconds = time.perf_counter() - start
    generation = model.generate(prompt_ids, args.max_tokens, args.temperature, args.seed)
    try:
        for _, piece in generation:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    finally:
        print(_summary(generation, load_seconds), file=sys.stderr)
    return 0


def _summary(g, load_seconds: float) -> str:
    prompt_rate = len(g.prompt_ids) / g.prefill_seconds if g.prefill_seconds else 0.0
    decode_rate = g.decode_steps / g.decode_seconds if g.decode_seconds else 0.0
    return (
        f"load {load_seconds:.2f} s | prompt {len(g.prompt_ids)} tokens, {prompt_rate:.1f} tok/s | "
        f"generated {len(g.tokens)} tokens, {decode_rate:.1f} tok/s | stop: {g.stop_reason or 'interrupted'}"
    )


if __name__ == "__main__":
    sys.exit(main())
