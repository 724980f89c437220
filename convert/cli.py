"""`ferrisres-convert MODEL_PATH -o OUT.tern`: a Gemma 4 checkpoint folder -> one `.tern` artifact.

The artifact is written to `.OUT.tern.<random>.partial` beside OUT.tern and renamed when complete,
so OUT.tern is either the old file or the new, whole one. A failure (bad input, disk full, Ctrl-C
or SIGTERM) removes the partial file; a SIGKILL or power loss cannot, so each run first removes
the partial files of the same output that no running conversion holds (see format/writer.py).
Exit codes: 0 done, 1 bad input or a failed write, 130 interrupted (SIGINT), 143 terminated (SIGTERM).
"""


import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ferrisres.format import Artifact
from ferrisres.format.cli import parse_args, run_main
from ferrisres.format.memory import memory_summary
from ferrisres.format.writer import remove_stale_partials

from .build import QUANTS, Options, convert
from .errors import ConversionError
from .quantize import DEFAULT_SCHEME, SCHEMES

PROG = "ferrisres-convert"


@dataclass
class Args:
    model_path: str = field(metadata={"args": ["model_path"], "help": "Hugging Face checkpoint folder, or a GGUF file"})
    output: str = field(metadata={"args": ["-o", "--output"], "help": "artifact to write (.tern)"})
    quant: str = field(
        default="ternary",
        metadata={"choices": QUANTS, "help": "ternary student (default), or the unquantized teacher in bf16/f16/f32"},
    )
    scheme: str = field(
        default=DEFAULT_SCHEME, metadata={"choices": SCHEMES, "help": f"ternary scale scheme (default {DEFAULT_SCHEME})"}
    )
    moe_experts: int = field(default=0, metadata={"help": "expand every dense MLP into N >= 2 experts with a router (default: dense)"})
    moe_top_k: int = field(default=2, metadata={"help": "experts each token uses (default 2)"})
    moe_noise: float = field(default=0.01, metadata={"help": "noise added to experts 1.. relative to each tensor's RMS (default 0.01)"})
    seed: int = field(default=0, metadata={"help": "seed of the MoE noise and router init (default 0)"})
    attnres: bool = field(default=False, metadata={"help": "add Block AttnRes between blocks ending at full-attention layers"})
    attnres_gate: float = field(default=0.0, metadata={"help": "AttnRes gate of every block (default 0: the student equals the model without it; 1: FerrisRes's ungated form)"})
    lora: Optional[str] = field(default=None, metadata={"help": "PEFT LoRA adapter folder, merged into the weights before quantization"})
    force: bool = field(default=False, metadata={"help": "replace OUTPUT if it exists"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar or log lines"})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(Args, PROG, __doc__, argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format=f"{PROG}: %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return run_main(PROG, lambda: _convert(args, argv), (ConversionError,))
    except _Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM, raised where the conversion is, so that the partial file is removed on the way out."""


def _terminate(signum, frame):
    raise _Terminated()


def _convert(args: Args, argv: list[str]) -> int:
    out = Path(args.output)
    if out.exists() and not args.force:
        raise ConversionError(f"{out} already exists (pass --force to replace it)")
    if out.is_dir():
        raise ConversionError(f"{out} is a folder")
    if out.exists() and not out.is_file():  # --force -o /dev/null would have replaced the device
        raise ConversionError(f"{out} is not a regular file (a device, FIFO or socket); it is never replaced")
    _remove_stale_partials(out)
    convert(
        Path(args.model_path), out, Options(
            quant=args.quant, scheme=args.scheme, moe_experts=args.moe_experts, moe_top_k=args.moe_top_k,
            moe_noise=args.moe_noise, seed=args.seed, attnres=args.attnres, attnres_gate=args.attnres_gate,
            lora=args.lora),
        overwrite=args.force, command_line=[PROG, *_without_output_path(argv)], progress=not args.quiet,
    )
    size = out.stat().st_size
    with Artifact.open(out) as artifact:
        summary = memory_summary(artifact)
    logging.getLogger("ferrisres.convert").info("wrote %s (%.1f MB, %s):\n%s", out, size / 1e6, args.quant, summary)
    return 0


def _remove_stale_partials(out: Path) -> None:
    """Partial files of `out` left by conversions that were killed (their writer's lock is gone)."""
    log = logging.getLogger("ferrisres.convert")
    removed, in_use = remove_stale_partials(out)
    for path in removed:
        log.info("removed %s, left by an interrupted conversion", path)
    for path in in_use:
        log.warning("%s is being written by another conversion to the same output, or is locked", path)


def _without_output_path(argv: list[str]) -> list[str]:
    """The command line as recorded in the artifact: the output's folder is left out so that
    converting the same input to two places gives byte-identical files."""
    out = []
    for i, a in enumerate(argv):
        prev = argv[i - 1] if i else ""
        if prev in ("-o", "--output"):
            a = Path(a).name
        elif a.startswith("--output="):
            a = "--output=" + Path(a.split("=", 1)[1]).name
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
