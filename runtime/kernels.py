"""numpy kernels: `y = x @ W.T` for a weight in any artifact encoding.

A packed ternary (or bf16/f16/int8) matrix is never expanded whole. Its rows are decoded a
cache-sized chunk at a time into one reusable float32 buffer, and each chunk is multiplied by all
tokens at once (sgemv for one token, sgemm for a prompt). Ternary decoding is one `np.take`
through a 256-entry table whose items are the four float32 weights a byte holds: the fastest
numpy unpacking measured on a 2-core machine (docs/kernels.md).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import ThreadpoolController

from ferrisres.format import ternary_lut
from ferrisres.format.encodings import BASE3_TERNARY, GROUPED_TERNARY, base3_lut, base3_slots, rotate_blocks, tied_planes
from ferrisres.format.tables import GROUPED_TABLES, table_bits, table_values

CHUNK_BYTES = 2 << 20  # float32 bytes of decoded rows per chunk: 1-4 MiB measured best
# Up to this many tokens, group scales multiply partial sums (Linear._rows_matmul). Measured on E2B's
# shapes: faster at every count up to 64 (gate/up 35 against 40 ms at 64 tokens, the three-plane 12288-wide
# down 140 against 276), slower for gate/up from about 100 (a prompt's sgemm over the scaled chunk wins).
GROUPED_MATVEC_TOKENS = 64
# More tokens than that (a prompt) go through sgemm, in chunks of at least this many rows: each sgemm call
# packs the whole input again, so chunks of a few rows of a wide matrix leave it mostly packing. Measured
# at 256 tokens on E2B's 1536 x 12288 three-plane down projection: 349 ms in chunks of 14 rows (2 MiB),
# 183 ms in chunks of 112, 176 ms in 224; the 6144 x 1536 gate/up (170-row chunks) changes by < 10%.
PROMPT_CHUNK_ROWS = 128
_TERNARY = ternary_lut()  # [256, 4] float32: the four codes of a packed byte
_LUT16 = _TERNARY.view(np.complex128).reshape(256)  # 16-byte items: one packed byte -> 4 float32
BASE3_SLOTS = 8  # decoded float32 per base-3 byte: its 5 codes, then 3 zeros
_BASE3_LUT = np.pad(base3_lut(), ((0, 0), (0, BASE3_SLOTS - 5)))  # [256, 8]
_BASE3_LUT32 = _BASE3_LUT.view("V32").reshape(256)  # 32-byte items: one base-3 byte -> 8 float32
# Tied planes (format.encodings.tied_planes): a column's codes are the balanced-ternary digits of one level, so
# numpy decodes the level, not each plane. Two planes' bytes b0, b1 index (b0 << 8 | b1) a table of the four
# levels 3 t0 + t1 they hold, as int8 (a 256 KB table: float32 items, 1 MB, were slower to gather); a third plane
# before them adds 9 t through a table of its own. One gather per two planes and one float32 row instead of
# one per plane: E2B's gate/up 1.45x faster for one token, its three-plane down 1.5x (docs/kernels.md).
_PAIR_LEVELS = (3 * _TERNARY[:, None] + _TERNARY[None, :]).reshape(65536, 4).astype(np.int8).view(np.int32).ravel()
_NINE_LEVELS = (9 * _TERNARY).astype(np.int8).view(np.int32).ravel()  # a first plane of three: four levels 9 t
_local = threading.local()  # each thread's decode buffers, one per row width
_pool: ThreadPoolExecutor | None = None  # workers that split a matrix's rows; None = one thread
_threads = 1


def set_threads(n: int) -> None:
    """Split every matrix's rows over `n` threads (numpy releases the GIL while it unpacks and multiplies).

    BLAS itself is pinned to one thread: its own threading on each chunk's small product costs far
    more in synchronisation than it gains (28x slower decode measured on a loaded 2-core machine).
    """
    global _pool, _threads
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    ThreadpoolController().limit(limits=1, user_api="blas")
    if _pool is not None:
        _pool.shutdown()
    _pool = ThreadPoolExecutor(n, thread_name_prefix="ferrisres") if n > 1 else None
    _threads = n


def threads() -> int:
    """The thread count `set_threads` set (the fused kernels split rows over as many)."""
    return _threads


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: taskset, cgroups' cpusets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads(sysfs: Path = Path("/sys"), cgroups: Path = Path("/proc/self/cgroup")) -> int:
    """The thread count used unless told: the physical cores among the CPUs this process may run on, and
    no more than the CPU time its cgroups allow (a container's `--cpus`, systemd's CPUQuota), rounded
    down. A core's second hardware thread shares its vector units and its path to memory, which is what
    these products are bound by, so, like llama.cpp's default, it is not counted; threads beyond a CPU
    quota wait for each other's time slices (a thread sharing its core ran a step at less than half
    speed). Where the topology cannot be read (not Linux), every usable CPU counts, hardware threads
    included. `cgroups`: the process's cgroup membership (/proc/self/cgroup)."""
    return max(1, min(_physical_cores(sysfs / "devices/system/cpu"), _cpu_quota(sysfs / "fs/cgroup", cgroups)))


def _physical_cores(topology: Path) -> int:
    if not hasattr(os, "sched_getaffinity"):
        return usable_cpus()
    cores = set()
    for cpu in os.sched_getaffinity(0):
        try:  # the CPUs sharing this one's core, e.g. "0,64" or "0-1": the same text for each of them
            cores.add((topology / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except (OSError, ValueError):
            return usable_cpus()
    return len(cores)


def _cpu_quota(root: Path, cgroups: Path) -> int | float:
    """Whole CPUs' worth of time per period that the process's cgroup and its ancestors allow, the
    smallest of their limits (cgroup v2's cpu.max, v1's cfs quota under cpu/), at least one; infinity
    when none is set or readable. Each limit file is looked for from the process's own cgroup up to the
    mount's root, which in a container with its own cgroup namespace is the container's cgroup."""
    try:
        lines = cgroups.read_text().splitlines()
    except (OSError, ValueError):
        lines = []
    places = []  # (directory of the hierarchy's root, the process's cgroup within it, v2?)
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            places.append((root, path, True))
        elif "cpu" in controllers.split(","):
            places.append((root / "cpu", path, False))
    places = places or [(root, "/", True), (root / "cpu", "/", False)]
    limit = math.inf
    for base, path, v2 in places:
        parts = [part for part in path.split("/") if part]
        for depth in range(len(parts), -1, -1):
            limit = min(limit, _cpu_limit(base.joinpath(*parts[:depth]), v2))
    return limit


def _cpu_limit(directory: Path, v2: bool) -> int | float:
    """One cgroup's CPU limit in whole CPUs (at least one), infinity when it has none or it cannot be read."""
    try:
        if v2:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
        else:
            quota, period = ((directory / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        quota, period = int(quota), int(period)
    except (OSError, ValueError):  # no such cgroup here, or "max": no limit
        return math.inf
    return max(1, quota // period) if quota > 0 and period > 0 else math.inf


class Linear:
    """A weight matrix [out, in] in its stored encoding, with an optional per-row or per-tensor scale.

    Grouped ternary (`ternary-g1`/`-g2`): `data` [out, planes, in/4] packed codes and `group_scale`
    [out, planes, groups] float16, W = sum over planes of the group's scale times the codes; with
    `rotation` b > 0 the weight multiplies the input rotated by a block Hadamard matrix of order b.
    A grouped int4 or int6 table read as the tied head is one plane of packed rows (`data` [out, 1, packed
    bytes], `group_scale` [out, 1, groups]). int8 codes with group scales are either of these kept
    unpacked (`keep_int8`: [out, planes, padded width]).
    """

    def __init__(self, data: np.ndarray, encoding: str, shape: tuple[int, int], scale: np.ndarray | None = None,
                 group_scale: np.ndarray | None = None, rotation: int = 0):
        self.data = data
        self.encoding = encoding
        self.out_features, self.in_features = shape
        self.scale = scale
        self.group_scale = group_scale
        self.rotation = rotation
        self.planes = GROUPED_TERNARY.get(encoding, 1)
        # numpy decodes a tied matrix's rows as one plane of levels, multiplied by the last plane's scales
        self.tied = (encoding in GROUPED_TERNARY and encoding not in BASE3_TERNARY and self.planes > 1
                     and tied_planes(group_scale))
        self.positions = None  # where each input column lies in a decoded row, when not at its own index
        if encoding in BASE3_TERNARY:
            self.width = data.shape[-1] * BASE3_SLOTS
            self.positions = base3_positions(self.in_features)
        elif encoding == "ternary" or encoding in GROUPED_TERNARY:
            self.width = data.shape[-1] * 4  # decoded row width (of one plane): padded to whole bytes
        elif encoding in GROUPED_TABLES:
            self.width = data.shape[-1] * 8 // table_bits(encoding)  # padded to whole groups
        else:
            self.width = data.shape[-1]  # the input's width; more when int8 codes are padded to whole groups
        self.rows_per_chunk = max(1, CHUNK_BYTES // (4 * self.width * self.decoded_planes))
        self.fast = None  # fast_kernels.FastMatmul when attached: the product of a few tokens at a time

    @property
    def decoded_planes(self) -> int:
        """Planes of a decoded row (`_decode`): one for tied planes, whose levels are decoded at once."""
        return 1 if self.tied else self.planes

    @property
    def decoded_scales(self) -> np.ndarray | None:
        """The group scales of the decoded planes [out, decoded_planes, groups]."""
        return self.group_scale[:, -1:] if self.tied else self.group_scale

    def __call__(self, x: np.ndarray, dtype=np.float64) -> np.ndarray:
        """x [T, in] -> [T, out]: the product is float32 (BLAS), the result float64 so that the model's
        elementwise math (norms, activations, attention) runs in float64, which costs little: those
        are vectors. Measured on the tiny models, it cuts the runtime's rounding error by 5x. The head
        asks for float32 (`dtype`): its 262144-wide logits are float32 in the end."""
        x = rotated_input(x, self.rotation) if self.rotation else x.astype(np.float32, copy=False)
        if self.fast is not None and len(x) <= self.fast.max_tokens:
            y = self.fast(x)
        else:
            y = x @ self.data.T if self.encoding == "f32" else self._chunked_matmul(x)
        y = y.astype(dtype, copy=False)
        if self.scale is not None:
            y *= self.scale if self.scale.size > 1 else self.scale[0]
        return y

    def keep_int8(self) -> None:
        """Unpack a ternary matrix once into resident int8 codes (4x its packed size in RAM): each use
        then only casts them, skipping the table lookup (docs/kernels.md: ~1.4x faster). An int4 or int6
        table's values likewise (exact: its group scales stay), so that the head's products run near the
        int8 table's speed instead of decoding 4 or 6 bits per weight per token."""
        if self.encoding in GROUPED_TABLES:
            self.data = table_values(self.data[:, 0], self.encoding)[:, None, :]
            self.encoding = "int8"
        elif self.encoding in BASE3_TERNARY:  # one base-3 byte -> its 8 decoded slots as int8
            self.data = np.take(_BASE3_LUT.astype(np.int8).view(np.uint64).reshape(256), self.data).view(np.int8)
            self.encoding = "int8"
        elif self.tied:  # one plane of levels, with the last plane's scales: 1/planes of the codes' RAM
            levels = np.empty((self.out_features, 1, self.width), dtype=np.int8)
            for r0 in range(0, self.out_features, self.rows_per_chunk):
                rows = self.data[r0 : r0 + self.rows_per_chunk]
                levels[r0 : r0 + len(rows), 0] = self._levels(rows).view(np.int8)
            self.data = levels
            # one decoded plane before and after: rows_per_chunk stays
            self.encoding, self.planes, self.group_scale, self.tied = "int8", 1, self.decoded_scales, False
        elif self.encoding == "ternary" or self.encoding in GROUPED_TERNARY:
            lut8 = _TERNARY.astype(np.int8).view(np.int32).reshape(256)  # one packed byte -> 4 int8
            self.data = np.take(lut8, self.data).view(np.int8)
            self.encoding = "int8"

    def dequantize(self) -> np.ndarray:
        """The whole matrix as float32 (scales applied) in the basis of the unrotated input, so that
        y = x @ W.T: for tests and tools, not for inference."""
        w = np.empty((self.out_features, self.decoded_planes * self.width), dtype=np.float32)
        self._decode(0, self.out_features, w)
        w = w.reshape(self.out_features, self.decoded_planes, self.width).sum(axis=1)
        w = w[:, : self.in_features] if self.positions is None else w[:, self.positions]
        if self.scale is not None:
            w *= self.scale[:, None] if self.scale.size > 1 else self.scale[0]
        # y = W' (R x) = (W' R) x, and rotating each row's blocks computes W' R (R is symmetric)
        return rotate_blocks(w, self.rotation) if self.rotation else w

    def _chunked_matmul(self, x: np.ndarray) -> np.ndarray:
        x = decoded_input(x, self.width, self.positions)
        yt = np.empty((self.out_features, x.shape[0]), dtype=np.float32)  # transposed: a chunk's rows are contiguous
        rows = self.rows_per_chunk if len(x) <= GROUPED_MATVEC_TOKENS else max(self.rows_per_chunk, PROMPT_CHUNK_ROWS)
        chunks = range(0, self.out_features, rows)
        if _pool is None or len(chunks) < 2:
            self._rows_matmul(x, yt, chunks, rows)
        else:
            parts = [chunks[k::_threads] for k in range(_threads)]  # interleaved, so the parts are equal
            for future in [_pool.submit(self._rows_matmul, x, yt, part, rows) for part in parts if len(part)]:
                future.result()
        return yt.T if x.shape[0] == 1 else np.ascontiguousarray(yt.T)

    def _rows_matmul(self, x: np.ndarray, yt: np.ndarray, chunks, rows: int) -> None:
        """yt[rows] = W[rows] @ x.T for each chunk of `rows` rows starting at the offsets in `chunks`.

        With group scales and a few tokens, each group's partial products come from one batched matmul
        over the unscaled codes and the scales multiply those (a [rows, groups] array), not every weight:
        1.3-1.4x faster for one token on E2B's shapes than scaling the chunk, whose broadcast multiply
        costs as much as the unpacking. For a prompt the single sgemm over the scaled chunk is faster,
        its planes first summed into one matrix: a pass over the chunk that saves the sgemm a product per
        extra plane."""
        planes = self.decoded_planes
        buffer = _buffer(planes * self.width, rows)
        grouped = self.group_scale is not None and x.shape[0] <= GROUPED_MATVEC_TOKENS
        if grouped:  # [x | x] [T, planes * width] -> [planes * groups, group, T]: the inputs of each group
            groups = planes * self.group_scale.shape[-1]
            xg = np.ascontiguousarray(np.tile(x, planes).T).reshape(groups, -1, x.shape[0])
        for r0 in chunks:
            r1 = min(r0 + rows, self.out_features)
            w = buffer[: r1 - r0]
            self._decode(r0, r1, w, scaled=not grouped)
            if grouped:
                partial = np.matmul(w.reshape(r1 - r0, groups, -1).transpose(1, 0, 2), xg)  # [groups, rows, T]
                scales = self.decoded_scales[r0:r1].reshape(r1 - r0, groups).T.astype(np.float32)
                np.einsum("grt,gr->rt", partial, scales, out=yt[r0:r1])
                continue
            if planes > 1:  # plane 1 += the others, in place: a [rows, width] view with the chunk's row stride
                decoded = w.reshape(r1 - r0, planes, self.width)
                w = decoded[:, 0]
                for p in range(1, planes):
                    np.add(w, decoded[:, p], out=w)
            if x.shape[0] == 1:
                np.dot(w, x[0], out=yt[r0:r1, 0])
            else:
                np.dot(w, x.T, out=yt[r0:r1])

    def _decode(self, r0: int, r1: int, out: np.ndarray, scaled: bool = True) -> None:
        """Rows r0:r1 as float32 into `out` [rows, planes * width] (without the per-row scale; without
        the group scales too unless `scaled`)."""
        rows = self.data[r0:r1]
        if self.tied:
            np.copyto(out, self._levels(rows).view(np.int8), casting="safe")
        elif self.encoding in BASE3_TERNARY:
            np.take(_BASE3_LUT32, rows.reshape(len(rows), -1), out=out.view("V32"), mode="clip")
        elif self.encoding == "ternary" or self.encoding in GROUPED_TERNARY:
            np.take(_LUT16, rows.reshape(len(rows), -1), out=out.view(np.complex128), mode="clip")
        elif self.encoding == "bf16":
            np.left_shift(rows, 16, out=out.view(np.uint32), dtype=np.uint32)
        elif self.encoding in GROUPED_TABLES:
            np.copyto(out, table_values(rows[:, 0], self.encoding), casting="safe")
        else:  # f16, f32, int8 (a table's, or codes kept by keep_int8 or unpacked from an int4/int6 table)
            np.copyto(out, rows.reshape(len(rows), -1), casting="safe")
        if scaled and self.group_scale is not None:
            # float16 -> float32 once per chunk (a few KB): broadcast from float16 numpy would convert each
            # scale again for every weight it multiplies, 5x slower than the unpacking itself
            scales = self.decoded_scales[r0:r1].astype(np.float32)  # [rows, planes, groups]
            grouped = out.reshape(len(rows), self.decoded_planes, scales.shape[-1], -1)
            np.multiply(grouped, scales[..., None], out=grouped)

    def _levels(self, rows: np.ndarray) -> np.ndarray:
        """Tied rows [rows, planes, bytes] -> their levels sum_p 3^(planes-1-p) t_p, four int8 in each int32
        [rows, bytes] (a reused buffer)."""
        index = _buffer(rows.shape[-1], len(rows), np.uint16)
        np.left_shift(rows[:, -2], 8, out=index, dtype=np.uint16)
        np.bitwise_or(index, rows[:, -1], out=index)
        levels = np.take(_PAIR_LEVELS, index, mode="clip", out=_buffer(rows.shape[-1], len(rows), np.int32))
        if self.planes == 3:
            first = np.take(_NINE_LEVELS, rows[:, 0], mode="clip", out=_buffer(rows.shape[-1], len(rows), np.int32, 1))
            np.add(levels.view(np.int8), first.view(np.int8), out=levels.view(np.int8))  # |level| <= 13 fits int8
        return levels


def base3_positions(n_in: int) -> np.ndarray:
    """int64 [n_in]: where each input column lies in a row of decoded base-3 bytes (BASE3_SLOTS per byte)."""
    slots = base3_slots(n_in)
    return slots // 5 * BASE3_SLOTS + slots % 5


def decoded_input(x: np.ndarray, width: int, positions: np.ndarray | None = None) -> np.ndarray:
    """x [T, in] laid out as a decoded row of `width`: each column at its position (its own index when
    `positions` is None), zeros under the padding and the unused slots, whose weights are zero too."""
    if positions is None:
        return x if x.shape[1] == width else np.pad(x, ((0, 0), (0, width - x.shape[1])))
    out = np.zeros((len(x), width), dtype=x.dtype)
    out[:, positions] = x
    return out


def rotated_input(x: np.ndarray, block: int) -> np.ndarray:
    """x rotated by the block Hadamard matrix of order `block`, as float32. q/k/v (and gate/up) share
    their input: the last rotation is kept, so it is computed once for all of them."""
    last = getattr(_local, "rotation", None)
    if last is not None and last[0] is x and last[1] == block:
        return last[2]
    rotated = rotate_blocks(np.asarray(x, dtype=np.float64), block).astype(np.float32)
    _local.rotation = (x, block, rotated)  # holds x itself, so its id cannot be reused while kept
    return rotated


def _buffer(width: int, rows: int, dtype=np.float32, which: int = 0) -> np.ndarray:
    """This thread's reusable buffer of `rows` rows of `width` (`which`-th of its width and dtype), the first
    `rows` rows of one kept per width, dtype and `which`."""
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (width, np.dtype(dtype), which)
    buffer = buffers.get(key)
    if buffer is None or buffer.shape[0] < rows:
        buffer = buffers[key] = np.empty((rows, width), dtype=dtype)
    return buffer[:rows]


set_threads(default_threads())

