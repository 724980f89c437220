"""`ferrisres-run MODEL.tern --prompt TEXT`: stream generated text to stdout, a summary to stderr.

The prompt goes through the artifact's chat template when it has one (`--raw` sends it as is).
Sampling defaults come from the artifact's generation config; flags override them.
`--interactive` chats turn by turn, keeping the KV cache between turns.
"""

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from ferrisres.cli import parse_args, read_text, run_main
from ferrisres.format import ArtifactError
from ferrisres.format.sizes import size_summary

from .chat import ChatSession
from .chat_template import ChatTemplateError
from .generate import Generation
from .kernels import default_threads, set_threads, threads, usable_cpus
from .model import KERNELS, Model, load
from .sampling import SamplingParams

PROG = "ferrisres-run"
PROGRESS_AFTER = 2.0  # seconds of prefill before its progress is shown
SLOW_COMPILE = 2.0  # seconds of compiling the fast kernels worth a note (loading them from numba's cache takes less)
MAX_THREADS = 256  # far above any useful count; each thread is a real OS thread with its own stack


@dataclass
class Args:
    model: str = field(metadata={"args": ["model"], "help": "the .tern artifact"})
    prompt: Optional[str] = field(default=None, metadata={"args": ["-p", "--prompt"], "help": "the prompt; - reads it from stdin"})
    prompt_file: Optional[str] = field(default=None, metadata={"help": "read the prompt from this UTF-8 file (- = stdin)"})
    system: Optional[str] = field(default=None, metadata={"help": "system prompt (chat template only)"})
    raw: bool = field(default=False, metadata={"help": "send the prompt as is (after one BOS), without the chat template"})
    interactive: bool = field(default=False, metadata={"args": ["-i", "--interactive"], "help": "multi-turn chat; /reset, /exit"})
    max_tokens: int = field(default=256, metadata={"args": ["-n", "--max-tokens"], "help": "most new tokens per reply (default 256)"})
    temperature: Optional[float] = field(default=None, metadata={"help": "randomness, >= 0; 0 = greedy (default: generation config, else 0)"})
    top_k: Optional[int] = field(default=None, metadata={"help": "sample from the k likeliest tokens (0 = all)"})
    top_p: Optional[float] = field(default=None, metadata={"help": "sample from the smallest set reaching probability p, in (0, 1]"})
    min_p: Optional[float] = field(default=None, metadata={"help": "drop tokens below min_p x the likeliest one's probability, in [0, 1)"})
    repetition_penalty: Optional[float] = field(default=None, metadata={"help": "> 1 discourages repeating tokens (1 = off)"})
    seed: int = field(default=0, metadata={"help": "sampling seed (default 0): same seed, same text"})
    greedy: bool = field(default=False, metadata={"help": "always pick the likeliest token (temperature 0)"})
    stop: Optional[str] = field(default=None, metadata={"help": "stop when this text appears (not printed); repeatable"})
    max_context: Optional[int] = field(default=None, metadata={"help": "context limit in tokens (default: the model's)"})
    draft: Optional[str] = field(default=None, metadata={"choices": ["ngram"], "help": "speculative decoding: 'ngram' drafts tokens by prompt lookup and verifies them in one pass (greedy only; same text, faster on text that repeats)"})
    threads: Optional[int] = field(default=None, metadata={"help": "threads that split each matrix's rows (default: the physical cores this process may use, within its CPU quota; on a machine busy with other work, fewer can be faster)"})
    cache: Optional[str] = field(default=None, metadata={"choices": ["int8"], "help": "int8: unpack the ternary weights once into RAM (a byte a weight, a byte a plane for free plane scales) for faster decoding with --kernel numpy"})
    kernel: str = field(default="auto", metadata={"choices": list(KERNELS), "help": "matrix products: numpy (the reference), fast (fused compiled kernels: pip install 'ferrisres[fast]'), int8 (fast, with the ternary products' inputs rounded to int8 as llama.cpp does: faster, not equal to the reference; x86-64 with AVX2), auto (default: int8 where the fast extra and the CPU allow it, else fast; numpy without the extra or for a tiny model)"})
    verbose: bool = field(default=False, metadata={"args": ["-v", "--verbose"], "help": "per-token log and memory diagnostic on stderr"})


def main(argv: list[str] | None = None) -> int:
    args, stops = parse_args(Args, PROG, __doc__, argv, repeatable="--stop")
    return run_main(PROG, lambda: _run(args, stops), (ArtifactError, ValueError, ChatTemplateError, FloatingPointError))


def _run(args: Args, stops: list[str]) -> int:
    notes = []  # said once the run is known to go ahead, so that an error stays one line
    options = _generation_options(args, stops, notes)
    start = time.perf_counter()
    model = load(args.model, cache=args.cache, kernel=args.kernel)
    load_seconds = time.perf_counter() - start
    if model.compile_seconds > SLOW_COMPILE:
        notes.append(f"compiled the fast kernels in {model.compile_seconds:.1f} s (kept in numba's cache for the next runs)")
    if args.cache and not any(info.encoding.startswith("ternary") for info in model.artifact.tensors.values()):
        notes.append(f"--cache {args.cache} changes nothing: {model.artifact.path.name} has no ternary weights to unpack")
    elif args.cache and model.kernel == "int8":
        notes.append(f"--cache {args.cache} sends the ternary weights through the float32 kernel, slower than the int8 "
                     "kernel over the packed ones: leave it out, or use it with --kernel numpy")
    if args.verbose:
        _print_memory(model)
    if args.interactive:
        return _chat(model, args, options, load_seconds, notes)
    prompt = _read_prompt(args)
    if model.chat_template and not args.raw:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        ids = model.encode(model.render_chat(messages))
    else:
        if args.system:
            raise ValueError("--system needs the chat template (this artifact has none, or --raw was given)")
        ids = model.encode(prompt)
    generation = model.generate(ids, args.max_tokens, **options)
    if not model.chat_template and not args.raw:
        notes.append(f"{model.artifact.path.name} has no chat template, so the prompt runs as raw text "
                     "(ferrisres-convert --chat-template FILE adds one; --raw says this is meant)")
    _print_notes(notes)
    try:
        _stream(generation, args.verbose, load_seconds)
    except MemoryError:
        raise MemoryError(f"{args.model}: out of memory with a prompt of {len(ids)} tokens (a shorter prompt needs "
                          "less)") from None
    return 0


def _generation_options(args: Args, stops: list[str], notes: list[str]) -> dict:
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.max_context is not None and args.max_context <= 0:
        raise ValueError(f"--max-context must be > 0, got {args.max_context}")
    sampling = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")}
    if args.greedy:
        sampling["temperature"] = 0.0
    try:
        SamplingParams(**{k: v for k, v in sampling.items() if v is not None})  # reject bad values before loading
    except ValueError as e:
        name, rest = str(e).split(" ", 1)
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None
    if args.draft and not args.greedy and args.temperature is None:
        sampling["temperature"] = 0.0  # drafting verifies greedy choices: make greedy the default for it
    for flag, text in (("--prompt", args.prompt), ("--system", args.system), *(("--stop", t) for t in stops)):
        _check_utf8(flag, text)
    set_threads(checked_threads(args.threads, notes))
    return {"stop": tuple(stops), "max_context": args.max_context, "top": args.verbose, "draft": args.draft, **sampling}


def checked_threads(requested: int | None, notes: list[str]) -> int:
    """The thread count of `--threads` (None: `default_threads()`), checked, and capped at the CPUs this
    process may use, with a note: more threads than CPUs only adds switching between them."""
    if requested is None:
        return default_threads()
    if not 1 <= requested <= MAX_THREADS:
        raise ValueError(f"--threads must be in [1, {MAX_THREADS}], got {str(requested)[:40]}")
    cpus = usable_cpus()
    if requested > cpus:
        notes.append(f"--threads {requested} is more than the {cpus} CPUs this process can use: using {cpus}")
    return min(requested, cpus)


def _check_utf8(flag: str, text: str | None) -> None:
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates, which no tokenizer takes."""
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{flag} is not valid UTF-8 (character {e.start})") from None


def _read_prompt(args: Args) -> str:
    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give exactly one of --prompt and --prompt-file (or --interactive)")
    source = args.prompt_file if args.prompt is None else (args.prompt if args.prompt == "-" else None)
    if source is None:
        return args.prompt
    return read_text(source, "prompt")


def _stream(generation: Generation, verbose: bool, load_seconds: float | None) -> None:
    """Print the generation as it comes; then, also when Ctrl-C stops it, the summary line."""
    generation.on_prefill = _prefill_progress()
    line_open = False  # generated text on the terminal's current line
    try:
        for step in generation:
            if verbose:
                _print_step(generation, step, line_open)
                line_open = False
            if step.text:
                sys.stdout.write(step.text)
                sys.stdout.flush()
                line_open = True
    except KeyboardInterrupt:
        _end_line(line_open)
        print(_summary(generation, load_seconds), file=sys.stderr)
        raise
    _end_line(line_open)
    print(_summary(generation, load_seconds), file=sys.stderr)


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)


def _prefill_progress():
    """A reporter of a long prompt's prefill, chunk by chunk, on one stderr line (a line per chunk when
    stderr is not a terminal), once the prefill has taken more than PROGRESS_AFTER seconds."""
    start, shown = time.perf_counter(), False

    def report(done: int, total: int) -> None:
        nonlocal shown
        if not shown and time.perf_counter() - start < PROGRESS_AFTER:
            return
        shown = True
        line = f"{PROG}: prefill {done}/{total} tokens"
        if sys.stderr.isatty():
            print("\r" + line, end="\n" if done == total else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    return report


def _end_line(line_open: bool) -> None:
    if line_open:
        sys.stdout.write("\n")
        sys.stdout.flush()


def _chat(model: Model, args: Args, options: dict, load_seconds: float, notes: list[str]) -> int:
    if model.chat_template is None or args.raw:
        raise ValueError("--interactive needs the artifact's chat template (it has none, or --raw was given)")
    _print_notes(notes)
    session = ChatSession(model, args.system, options.pop("max_context"))
    print(f"{PROG}: chatting with {model.artifact.path.name}. /reset starts over, /exit or Ctrl-D quits, "
          "Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            print(f"{PROG}: conversation reset", file=sys.stderr)
            continue
        if not command:
            continue
        generation = session.reply(line, args.max_tokens, **options)
        try:
            _stream(generation, args.verbose, None)
        except KeyboardInterrupt:
            print(f"{PROG}: reply stopped", file=sys.stderr)
        finally:
            session.finish()


def _summary(g: Generation, load_seconds: float | None) -> str:
    def rate(tokens: int, seconds: float) -> str:
        return f"{tokens / seconds:.1f} tok/s" if seconds else "- tok/s"

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    load = f"load {load_seconds:.2f} s | " if load_seconds is not None else ""
    return (
        f"{load}prompt {len(g.prompt_ids)} tokens, {rate(len(g.prompt_ids), g.prefill_seconds)} | "
        f"generated {len(g.tokens)} tokens, {rate(g.decode_tokens, g.decode_seconds)} | "
        + (f"drafts accepted {g.acceptance_rate:.0%} | " if g.acceptance_rate is not None else "")
        + f"stop: {g.stop_reason or 'interrupted'} | kernel {g.model.kernel} | threads {threads()} | peak RSS {peak:.0f} MiB"
    )


def _print_step(g: Generation, step, line_open: bool) -> None:
    tokenizer = g.model.tokenizer
    what = "eos" if step.token in g.stop_ids else f"{len(g.tokens):4d}"
    top = ", ".join(f"{tokenizer.id_to_token(i)!r} {p:.3f}" for i, p in step.top or ())
    print(("\n" if line_open else "") + f"[step {what}] id {step.token:6d} {tokenizer.id_to_token(step.token)!r:>14} "
          f"{step.seconds * 1000:8.1f} ms | top: {top}", file=sys.stderr)


def _print_memory(model: Model) -> None:
    print(f"{PROG}: {model.artifact.path}, weights by kind:\n{size_summary(model.artifact)}", file=sys.stderr)
    mapped, resident = _mapping_sizes(str(model.artifact.path.resolve()))
    if mapped is not None:
        print(f"  mapped {mapped / 1e6:.1f} MB, resident now {resident / 1e6:.1f} MB "
              "(pages are read as the layers first touch them)", file=sys.stderr)


def _mapping_sizes(path: str) -> tuple[int | None, int]:
    """Size and resident bytes of this process's mappings of `path` (Linux /proc; None elsewhere)."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None, 0
    mapped = resident = 0
    current = False
    for line in lines:
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5:  # a mapping's header line
            current = len(parts) >= 6 and parts[-1] == path
        elif current and parts[0] in ("Size:", "Rss:"):
            value = int(parts[1]) * 1024
            mapped += value if parts[0] == "Size:" else 0
            resident += value if parts[0] == "Rss:" else 0
    return mapped, resident


if __name__ == "__main__":
    sys.exit(main())
