"""What `make bench` measures: the targets, the full and quick plans, the student variants and the prompt
of the draft measurement (bench/run.py runs them)."""

GB = 1e9

# Targets (medians on the 2-core machine): (comparison, goal, unit, stretch goal)
TARGETS = {
    "decode_dense": (">=", 1.5, "tok/s", 2.5),
    "decode_moe": (">=", 0.8, "tok/s", None),
    "draft_speedup": (">=", 2.0, "x", None),
    "prefill_256": (">=", 25.0, "tok/s", None),
    "load": ("<=", 1.0, "s", None),
    "decode_rss": ("<=", 1.5 * GB, "GB", None),
    "prefill_16k_rss": ("<=", 2 * GB, "GB", None),  # a 16k-token prompt, then decoding: the whole process's peak
    "convert_time": ("<=", 3600.0, "s", None),  # the calibrated default: <= 60 min and 6 GB
    "convert_rss": ("<=", 6 * GB, "GB", None),
    "serve_8_streams": (">=", 5.0, "x", None),  # ferrisres-serve: aggregate tok/s at 8 streams over 1 stream
}

# The kernel of every runtime measurement: what ferrisres-run and ferrisres-serve use by default (int8 when
# the fast extra is installed, as `make` installs it, and the CPU has AVX2). The dense student is also decoded
# at context 64 with each reference kernel: numpy (all a runtime-only install has) and fast (float32 inputs:
# equal to numpy within rounding).
KERNEL = "auto"
REFERENCE_KERNELS = ["numpy", "fast"]

FULL = dict(
    scale="full", scaling_scales=["tiny", "half", "full"], convert_repeats=1, scaling_convert_repeats=1,
    load_repeats=5, prefill_lengths=[64, 256], prefill_repeats=3,
    decode_contexts=[64, 512, 2048, 16384], decode_new=64, decode_repeats={64: 3, 512: 1, 2048: 1, 16384: 1},
    moe_contexts=[64], moe_repeats=2, teacher_new=16, draft_new=64, draft_repeats=2,
    scaling_decode_new=32, profile=True, serve_streams=[1, 2, 4, 8], serve_prompt=16, serve_new=32,
    kernel=KERNEL, reference_kernels=REFERENCE_KERNELS,
)
QUICK = dict(
    scale="tiny", scaling_scales=["tiny"], convert_repeats=1, scaling_convert_repeats=1,
    load_repeats=3, prefill_lengths=[64, 256], prefill_repeats=2,
    decode_contexts=[64, 512, 2048], decode_new=16, decode_repeats={64: 2, 512: 1, 2048: 1},
    moe_contexts=[64], moe_repeats=1, teacher_new=8, draft_new=16, draft_repeats=1,
    scaling_decode_new=0, profile=False, serve_streams=[1, 2, 4, 8], serve_prompt=16, serve_new=16,
    kernel=KERNEL, reference_kernels=REFERENCE_KERNELS,
)

# The dense student with other table encodings than its default (int6-g32 tables, the head tied to the
# token one), and one-plane (1.58-bit) students, packed 5 codes a byte, with bf16 tables, int8 tables, and an
# int8 token table beside an int4 per-layer one: issue 11's sizes, each beside the same student's bf16 tables.
# Same encodings as the dense student, so rounded to nearest (--method rtn): calibration changes no size and
# no decoding speed, and would add most of an hour each.
TABLE_VARIANTS = {"dense-bf16-tables": ["--tables", "bf16", "--method", "rtn"],
                  "dense-int8-tables": ["--tables", "int8", "--method", "rtn"],
                  "dense-int4-per-layer": ["--per-layer-table", "int4-g32", "--method", "rtn"],
                  "one-plane-bf16-tables": ["--planes", "1", "--packing", "base3", "--tables", "bf16", "--method", "rtn"],
                  "one-plane-int8-tables": ["--planes", "1", "--packing", "base3", "--tables", "int8", "--method", "rtn"],
                  "one-plane-int4-per-layer": ["--planes", "1", "--packing", "base3", "--tables", "int8",
                                               "--per-layer-table", "int4-g32", "--method", "rtn"]}
# llama.cpp's TQ2_0 GGUF of the same checkpoint: a fallback for the report when `make bench PEERS=1` has
# not measured it (results["peers"]["gguf"]["bytes"]), from an earlier measurement
LLAMA_CPP_TQ2_0_BYTES = 2.79 * GB

# `make bench PEERS=1` (bench/peers.py): llama.cpp's llama-bench beside ferrisres's decode and prefill
# workers, at each thread count pinned to as many cores; llama-bench's decode test is tg`new` at depth
# `context`, as ferrisres decodes `new` tokens after a `context`-token prompt; prefill is pp`prompt`.
# Two students, each decoded with the kernels named here and prefilled once (prefill takes the numpy path
# whatever the kernel): the default (two planes, three in the down projections), and the one-plane student,
# the same kind of model as TQ2_0 (one ternary plane, a scale per block of weights) and about its size.
PEER_STUDENTS = {"default": ["numpy", "fast", "int8"], "one-plane": ["fast", "int8"]}
# Prefill of each student with each of these kernels: numpy's sgemm over the whole prompt, and the int8
# kernel 16 tokens at a time (`--kernel fast` prefills through numpy: a prompt is more tokens than it takes)
PEER_PREFILL_KERNELS = ["numpy", "int8"]
# Batching: llama-bench's forward of `batch` tokens against one (pp8 against pp1), beside ferrisres's
# scheduler advancing `batch` sequences against one (`batch_new` tokens each after `context`), with the
# int8 kernel: what more sequences at once gain on each side (issue 12's and the server's 5x target).
PEERS = dict(threads=[1, 2], context=64, new=64, prompt=256, repetitions=3, students=PEER_STUDENTS,
             prefill_kernels=PEER_PREFILL_KERNELS, batch=8, batch_new=16, batch_kernel="int8")
QUICK_PEERS = dict(threads=[1, 2], context=16, new=16, prompt=64, repetitions=2, students=PEER_STUDENTS,
                   prefill_kernels=PEER_PREFILL_KERNELS, batch=8, batch_new=4, batch_kernel="int8")
# How `--only peers` converts them (in the full run, the default is that run's calibrated dense student):
# rounded to nearest, the encodings and speed of the calibrated conversion without its hour.
PEER_CONVERSIONS = {"default": ["--method", "rtn"], "one-plane": ["--planes", "1", "--method", "rtn"]}

# A paragraph repeated: a prompt a copying model continues by copying (n-gram drafts then hit).
COPY_PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog near the river bank, while the old farmer watches from "
    "his house on the hill and counts the sheep that walk back home before the night comes. "
)
