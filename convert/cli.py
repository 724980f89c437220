"""`ferrisres-convert MODEL_PATH -o OUT.tern`: a Gemma 4 checkpoint folder -> one `.tern` artifact.

The artifact is written to `.OUT.tern.<random>.partial` beside OUT.tern and renamed when complete,
so OUT.tern is either the old file or the new, whole one. A failure (bad input, disk full, Ctrl-C
or SIGTERM) removes the partial file; a SIGKILL or power loss cannot, so each run first removes
the partial files of the same output that no running conversion holds (see format/writer.py).
Exit codes: 0 done, 1 bad input or a failed write, 2 a flag refused, 130 interrupted (SIGINT), 143 terminated
(SIGTERM).
"""


import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ferrisres.format import Artifact, ArtifactError
from ferrisres.cli import parse_args, run_main
from ferrisres.format.sizes import size_summary
from ferrisres.format.writer import remove_stale_partials

from .build import QUANTS, Options, convert
from .student import PACKINGS
from .errors import ConversionError, require_extra
from .quantize import DEFAULT_SCHEME, SCHEMES
from .tables import DEFAULT_TABLES, TABLE_CHOICES

PROG = "ferrisres-convert"


@dataclass
class Args:
    model_path: str = field(metadata={"args": ["model_path"], "help": "Hugging Face checkpoint folder, or a GGUF file"})
    output: str = field(metadata={"args": ["-o", "--output"], "help": "artifact to write (.tern)"})
    quant: str = field(
        default="ternary",
        metadata={"choices": QUANTS, "help": "ternary student (default), or the unquantized teacher in bf16/f16/f32"},
    )
    method: str = field(default="gptq", metadata={"choices": ["gptq", "rtn"], "help": "gptq: calibrated, each column's rounding error compensated in the others (default); rtn: round to nearest, no calibration"})
    planes: int = field(default=2, metadata={"choices": [1, 2], "help": "ternary planes per weight: 2 (default; 4.5 bits/weight, and see --down-planes) or 1 (the strict 1.58-bit student, ~2.25)"})
    down_planes: Optional[int] = field(default=None, metadata={"choices": [1, 2, 3], "help": "ternary planes of the MLP down projections, which carry the most error per weight (default: 3 with --planes 2, ~5 bits/weight overall; 1 with --planes 1)"})
    plane_scales: str = field(default="tied", metadata={"choices": ["tied", "free"], "help": "tied (default): each plane's scales are 3 times the next one's, so a weight's planes form one uniform grid of 9 or 27 levels, multiplied at once by --kernel int8; free: each plane its own scales, fit to its group (what earlier versions wrote)"})
    group: Optional[str] = field(default=None, metadata={"help": "input columns per scale (default 64; with --scheme: row), or 'row' for one scale per row"})
    rotate: Optional[str] = field(default=None, metadata={"help": "rotate each linear's input by block Hadamard matrices of this order (default 64; with --scheme: none), or 'none'"})
    packing: str = field(default="2bit", metadata={"choices": PACKINGS, "help": "how grouped ternary codes are packed: 2bit (4 per byte, default) or base3 (5 per byte, 19%% smaller weights)"})
    calibration: str = field(default="teacher", metadata={"help": "calibration text: 'teacher' (sampled from the model itself, default) or a UTF-8 text file"})
    calibration_tokens: int = field(default=8192, metadata={"help": "calibration tokens (default 8192, in sequences of 128)"})
    scheme: Optional[str] = field(
        default=None, metadata={"choices": SCHEMES, "help": f"the original per-row student's scale scheme (with --method rtn --planes 1; {DEFAULT_SCHEME} when the flags ask for that student)"}
    )
    tables: Optional[str] = field(
        default=None,
        metadata={"choices": TABLE_CHOICES, "help": "encoding of the token and per-layer embedding tables: int8 per "
                  "row, int6 per group of 32 values, int4 per group of 32 or 64 (default for a student: "
                  f"{DEFAULT_TABLES}; a teacher keeps its --quant)"},
    )
    per_layer_table: Optional[str] = field(
        default=None, metadata={"choices": TABLE_CHOICES, "help": "encoding of the per-layer embedding table alone"},
    )
    moe_experts: int = field(default=0, metadata={"help": "expand every dense MLP into N >= 2 experts with a router (default: dense)"})
    moe_top_k: int = field(default=2, metadata={"help": "experts each token uses (default 2)"})
    moe_noise: float = field(default=0.01, metadata={"help": "noise added to experts 1.. relative to each tensor's RMS (default 0.01)"})
    seed: int = field(default=0, metadata={"help": "seed of the calibration text, the MoE noise and router init (default 0)"})
    attnres: bool = field(default=False, metadata={"help": "add Block AttnRes between blocks ending at full-attention layers"})
    attnres_gate: float = field(default=0.0, metadata={"help": "AttnRes gate of every block (default 0: the student equals the model without it; 1: FerrisRes's ungated form)"})
    lora: Optional[str] = field(default=None, metadata={"help": "PEFT LoRA adapter folder, merged into the weights before quantization"})
    chat_template: Optional[str] = field(default=None, metadata={"help": "Jinja chat template file to embed (replaces the checkpoint's, if any)"})
    force: bool = field(default=False, metadata={"help": "replace OUTPUT if it exists"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar or log lines"})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(Args, PROG, __doc__, argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format=f"{PROG}: %(message)s")
    previous, previous_hook = signal.signal(signal.SIGTERM, _terminate), sys.unraisablehook
    sys.unraisablehook = _redeliver_swallowed_signals(previous_hook)
    try:
        return run_main(PROG, lambda: _convert(args), (ArtifactError, ConversionError))
    except _Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook


class _Terminated(BaseException):
    """SIGTERM, raised where the conversion is, so that the partial file is removed on the way out."""


def _terminate(signum, frame):
    raise _Terminated()


def _redeliver_swallowed_signals(hook):
    """An unraisablehook that sends the signal again when its exception landed in a finalizer (h5py frees
    its objects in weakref callbacks), where Python prints and drops it and the conversion would go on.
    It is sent a moment later from another thread, so that it lands after the finalizer (or is sent again)."""

    def report(unraisable) -> None:
        signum = {_Terminated: signal.SIGTERM, KeyboardInterrupt: signal.SIGINT}.get(type(unraisable.exc_value))
        if signum is None:
            hook(unraisable)
            return
        resend = threading.Timer(0.01, os.kill, (os.getpid(), signum))
        resend.daemon = True
        resend.start()

    return report


def _convert(args: Args) -> int:
    out = Path(args.output)
    _check_output(out, args.force)
    if not args.quiet:
        require_extra("tqdm", "the progress bar (or pass --quiet)")
    _remove_stale_partials(out)
    per_row = args.scheme is not None  # the original student: one scale per row, by this scheme
    convert(
        Path(args.model_path), out, Options(
            quant=args.quant, method=args.method, planes=args.planes, down_planes=args.down_planes, plane_scales=args.plane_scales, group=_size_flag("--group", args.group, "row", per_row),
            rotate=_size_flag("--rotate", args.rotate, "none", per_row), packing=args.packing,
            calibration=args.calibration,
            calibration_tokens=args.calibration_tokens, scheme=args.scheme or DEFAULT_SCHEME, moe_experts=args.moe_experts, moe_top_k=args.moe_top_k,
            moe_noise=args.moe_noise, seed=args.seed, attnres=args.attnres, attnres_gate=args.attnres_gate,
            lora=args.lora, chat_template=args.chat_template, tables=args.tables,
            per_layer_table=args.per_layer_table),
        overwrite=args.force, progress=not args.quiet,
    )
    size = out.stat().st_size
    with Artifact.open(out) as artifact:
        summary = size_summary(artifact)
    logging.getLogger("ferrisres.convert").info("wrote %s (%.1f MB, %s):\n%s", out, size / 1e6, args.quant, summary)
    return 0


def _size_flag(flag: str, value: str | None, off: str, per_row: bool) -> int:
    """A size flag's value: a positive integer, or `off` (0). Not given: 64, or `off` for the per-row
    student that --scheme asks for."""
    if value is None:
        return 0 if per_row else 64
    if value == off:
        return 0
    if not value.isdigit() or int(value) == 0 or len(value) > 6:
        raise ConversionError(f"{flag} must be a positive integer or '{off}', got {value!r}")
    return int(value)
def _check_output(out: Path, force: bool) -> None:
    """Everything about the output that can be known before any work, so no work is lost to it."""
    if out.is_dir():
        raise ConversionError(f"{out} is a folder")
    if out.exists() and not out.is_file():  # --force -o /dev/null would have replaced the device
        raise ConversionError(f"{out} is not a regular file (a device, FIFO or socket); it is never replaced")
    if out.exists() and not force:
        raise ConversionError(f"{out} already exists (pass --force to replace it)")
    folder = out.parent
    if not folder.is_dir():
        raise ConversionError(f"{out}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConversionError(f"{out}: the folder {folder} is not writable")


def _remove_stale_partials(out: Path) -> None:
    """Partial files of `out` left by conversions that were killed (their writer's lock is gone)."""
    log = logging.getLogger("ferrisres.convert")
    removed, in_use = remove_stale_partials(out)
    for path in removed:
        log.info("removed %s, left by an interrupted conversion", path)
    for path in in_use:
        log.warning("%s is being written by another conversion to the same output, or is locked", path)


if __name__ == "__main__":
    sys.exit(main())
