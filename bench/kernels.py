"""Microbenchmark of one product `x @ W.T` per encoding at Gemma 4 E2B's shapes: numpy vs fused kernels
(`fast`, and `int8` where it applies: its inputs rounded to int8).

    python bench/kernels.py [--repeats 15] [--tokens 1,2,4,8,16] [--out bench/kernels.json]

Random weights in each stored encoding (the default student's two-plane grouped ternary, packed 2 bits
per code and base-3, 5 codes per byte; the per-row ternary; the tied head over an int8 and an int6-g32
table); each timing is the median of `--repeats` calls, the kernels alternated so that a change in the
machine's load falls on all of them. Needs the fast extra (numba).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from ferrisres.format.encodings import BASE3_TERNARY, pack_base3, pack_ternary
from ferrisres.format.tables import GROUPED_TABLES, pack_table_rows, table_groups
from ferrisres.runtime import kernels
from ferrisres.runtime.fast_kernels import INT8_TABLES, attach
from ferrisres.runtime.kernels import Linear

# (name, out, in, encoding): E2B's MLP gate/up and its double-wide down projection in both packings, the
# per-row ternary, the tied head over an int8 table and over an int6-g32 one (unpacked to int8 values at load,
# read packed by the int8 kernel)
SHAPES = [("gate/up 6144x1536", 6144, 1536, "ternary-g2"), ("gate/up 6144x1536", 6144, 1536, "ternary5-g2"),
          ("down 1536x12288", 1536, 12288, "ternary-g2"), ("down 1536x12288", 1536, 12288, "ternary5-g2"),
          ("gate/up 6144x1536", 6144, 1536, "ternary"), ("head 262144x1536", 262144, 1536, "int8"),
          ("head 262144x1536", 262144, 1536, "int6-g32")]


def linear(out: int, n_in: int, encoding: str, rng) -> Linear:
    if encoding == "int8":
        return Linear(rng.integers(-127, 128, (out, n_in), dtype=np.int8), encoding, (out, n_in),
                      scale=rng.random(out, dtype=np.float32))
    if encoding in GROUPED_TABLES:
        q = rng.integers(-32, 32, (out, n_in), dtype=np.int8)
        scales = rng.random((out, table_groups(encoding, n_in))).astype(np.float16)
        return Linear(pack_table_rows(q, encoding)[:, None, :], encoding, (out, n_in), group_scale=scales[:, None, :])
    codes = rng.integers(-1, 2, (out, n_in), dtype=np.int8)
    packed = (pack_base3 if encoding in BASE3_TERNARY else pack_ternary)(codes)
    if encoding == "ternary":
        return Linear(packed, encoding, (out, n_in), scale=rng.random(out, dtype=np.float32))
    planes = np.stack([packed, np.roll(packed, 1, axis=0)], axis=1)
    scales = rng.random((out, 2, n_in // 64)).astype(np.float16)
    return Linear(planes, encoding, (out, n_in), group_scale=scales, rotation=64)


def timed(f, x, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f(x)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tokens", default="1", help="comma-separated token counts per call")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--shapes", default=None, help="comma-separated shape names to measure (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "kernels.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    names = list(dict.fromkeys(name for name, *_ in SHAPES))
    for name in names if args.shapes is None else args.shapes.split(","):
        # every encoding of one shape, numpy and fast, timed in turn: the packings meet the same load
        products = []
        for _, out, n_in, encoding in (s for s in SHAPES if s[0] == name):
            fast = linear(out, n_in, encoding, rng)
            copies = {kind: Linear(fast.data, fast.encoding, (out, n_in), fast.scale, fast.group_scale, fast.rotation)
                      for kind in ("numpy", "int8")}
            if encoding in GROUPED_TABLES:  # as model.load keeps a table's head
                fast.keep_int8()
                copies["numpy"].keep_int8()
                if encoding not in INT8_TABLES:
                    copies["int8"].keep_int8()
            attach([fast])
            attach([copies["int8"]], int8=True)
            kinds = {"numpy": copies["numpy"], "fast": fast}
            if copies["int8"].fast.int8_isa is not None:  # the encodings int8 inputs apply to
                kinds["int8"] = copies["int8"]
            for kernel in (fast, copies["int8"]):
                kernel.fast.max_tokens = 1 << 30  # the fused kernel for every token count measured
            products.append((encoding, out, n_in, kinds))
        for threads in map(int, args.threads.split(",")):
            kernels.set_threads(threads)
            for tokens in map(int, args.tokens.split(",")):
                x = rng.standard_normal((tokens, products[0][2]))
                times = {(encoding, kind): [] for encoding, _, _, kinds in products for kind in kinds}
                for encoding, _, _, kinds in products:
                    for product in kinds.values():
                        product(x)  # warm: pages, buffers, compiled code
                for _ in range(args.repeats):
                    for encoding, _, _, kinds in products:
                        for kind, product in kinds.items():
                            times[encoding, kind] += timed(product, x, 1)
                for encoding, out, n_in, kinds in products:
                    row = {"shape": name, "encoding": encoding, "threads": threads, "tokens": tokens,
                           **{f"{k}_ms": 1e3 * float(np.median(times[encoding, k])) for k in kinds}}
                    for k in kinds:
                        row[f"{k}_ns_per_weight"] = row[f"{k}_ms"] * 1e6 / (out * n_in * tokens)
                    rows.append(row)
                    print(f"{name:18} {encoding:11} threads {threads} tokens {tokens:2}: "
                          + ", ".join(f"{k} {row[f'{k}_ms']:8.2f} ms" for k in kinds), flush=True)
    machine = {"cpu": _cpu(), "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
               "load_average": os.getloadavg()}
    args.out.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "rows": rows}, indent=1) + "\n")


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
