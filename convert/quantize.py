"""Ternary quantization: W ~ scale * t with t in {-1, 0, +1}, one scale per output row or per tensor.

Schemes (`--scheme`), the default chosen by measurement (QUALITY.md):
- `optimal-row`: per row, the pattern and scale with the least squared reconstruction error (exact).
- `lsq-row`:    per row, the pattern of `absmean-row` with the least-squares scale for it
                (mean |w| over the row's non-zero codes), the best reconstruction for that pattern.
- `absmean-row`: per row, BitNet b1.58's absmean: gamma = mean|w|, t = clamp(round(w / gamma)), scale gamma.
- `ferrisres`:  per tensor, bit-exact with the FerrisRes original: alpha = mean|W| / 0.7978845608 with the
                sum accumulated sequentially in float32, t = clamp(round_half_away(W * (1/alpha))).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ferrisres.format.encodings import rotate_blocks

SCHEMES = ("optimal-row", "lsq-row", "absmean-row", "ferrisres")
DEFAULT_SCHEME = "absmean-row"  # lowest KL to the teacher on real weights (Gemma 3 270M, QUALITY.md)
_ROWS_PER_BLOCK = 1024  # optimal-row sorts rows: bound its temporaries
FERRISRES_ABSMEAN_NORM = np.float32(0.7978845608)  # sqrt(2/pi): mean|w| / sigma of a Gaussian


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Rust's f32::round, exactly (np.round rounds half to even; floor(|x| + 0.5) rounds 0.49999997 up,
    because the addition itself rounds): the fractional part x - trunc(x) is exact."""
    whole = np.trunc(x)
    return np.where(np.abs(x - whole) >= 0.5, whole + np.sign(x), whole)


def ternarize(w: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """Ternary codes int8 [out, in] and float32 scales ([out] per row, [1] per tensor) for float32 `w`."""
    if scheme == "ferrisres":
        return _ternarize_ferrisres(w)
    if scheme == "optimal-row":
        parts = [_ternarize_optimal(w[r : r + _ROWS_PER_BLOCK]) for r in range(0, len(w), _ROWS_PER_BLOCK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    gamma = np.mean(np.abs(w), axis=1, dtype=np.float32)
    safe = np.where(gamma > 0, gamma, np.float32(1))
    t = np.clip(round_half_away(w / safe[:, None]), -1, 1).astype(np.int8)
    if scheme == "absmean-row":
        return t, safe.astype(np.float32)
    if scheme == "lsq-row":
        nonzero = np.count_nonzero(t, axis=1)
        projected = np.einsum("ij,ij->i", w, t.astype(np.float32))  # sum |w| over the non-zero codes
        scale = np.where(nonzero > 0, projected / np.maximum(nonzero, 1), np.float32(1))
        return t, scale.astype(np.float32)
    raise ValueError(f"unknown scheme {scheme!r}")


def _ternarize_optimal(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ternary pattern and scale with the least squared error: keeping the k largest |w|
    leaves an error of sum(w^2) - (sum of those |w|)^2 / k, so the best k maximizes that last term."""
    magnitude = np.abs(w).astype(np.float64)
    order = np.argsort(-magnitude, axis=1, kind="stable")
    top_sums = np.cumsum(np.take_along_axis(magnitude, order, axis=1), axis=1)
    k = np.argmax(top_sums**2 / np.arange(1, w.shape[1] + 1), axis=1) + 1  # non-zero codes per row
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(w.shape[1])[None, :], axis=1)
    t = (np.sign(w) * (rank < k[:, None])).astype(np.int8)
    scale = top_sums[np.arange(len(w)), k - 1] / k
    return t, np.where(top_sums[:, -1] > 0, scale, 1.0).astype(np.float32)


def _ternarize_ferrisres(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = w.reshape(-1)
    total = np.cumsum(np.abs(flat), dtype=np.float32)[-1]  # sequential float32 accumulation, as Rust's iter().sum()
    if total == 0:
        alpha = np.float32(1)
    else:
        alpha = (total / np.float32(flat.size)) / FERRISRES_ABSMEAN_NORM
    t = np.clip(round_half_away(w * (np.float32(1) / alpha)), -1, 1).astype(np.int8)
    return t, np.array([alpha], dtype=np.float32)


def int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: w ~ scale[:, None] * q, scale = max|row| / 127."""
    scale = np.max(np.abs(w), axis=1) / np.float32(127)
    safe = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
    return q, safe


# ---- grouped trit-planes: W ~ sum_p scale[p, group] * T_p, T_p in {-1, 0, +1} ----

@dataclass
class TritPlanes:
    """A weight [out, in] as ternary planes with a float16 scale per row, plane and group of columns.
    With `rotation` b > 0 the planes encode W R (R: block Hadamard of order b), to multiply R x."""

    codes: np.ndarray  # int8 [out, planes, in]
    scales: np.ndarray  # float16 [out, planes, groups]
    rotation: int = 0

    def dequantized(self) -> np.ndarray:
        """float64 [out, in] in the rotated basis (what multiplies R x)."""
        out, planes, n = self.codes.shape
        groups = self.scales.shape[-1]
        w = self.codes.reshape(out, planes, groups, n // groups) * self.scales.astype(np.float64)[..., None]
        return w.sum(axis=1).reshape(out, n)


def group_size_for(n_in: int, requested: int) -> int:
    """The largest divisor of the input width that is at most `requested` (every group then has the same width)."""
    return max(d for d in range(1, min(requested, n_in) + 1) if n_in % d == 0)


def rotation_for(n_in: int, requested: int) -> int:
    """The largest power of two at most `requested` that divides the input width (0: no rotation)."""
    block = requested
    while block > 1 and n_in % block:
        block //= 2
    return block if block > 1 else 0


def fit_plane_scales(w: np.ndarray, planes: int, importance: np.ndarray | None = None,
                     refinements: int = 4, tied: bool = False) -> np.ndarray:
    """float16-representable scales [out, planes] for one group of columns w [out, g] (float64).

    The fit minimizes the squared error of the group's weights, each column weighted by its
    `importance` (GPTQ passes the diagonal of H: the mean square of that input, so a weight that
    multiplies large inputs counts more; None: all equal). Plane 1 keeps, per row, the k largest |w|
    with the best scale for the best k (the exact least-squares ternary fit when all weigh the same);
    each further plane does the same with what the planes before it leave. Then, alternately, every
    weight takes its nearest of the levels the planes form (9 for two, 27 for three) and the scales are
    refit to those codes by weighted least squares. `tied`: the scales are 3^(planes-1), ..., 3, 1 times
    one step (`fit_tied_step`)."""
    d = np.ones(w.shape[1]) if importance is None else np.maximum(importance, 1e-30)
    if tied and planes > 1:
        return tied_scales(fit_tied_step(w, d, planes), planes)
    fits, rest = [], w
    for _ in range(planes):
        t, a = _weighted_ternary_fit(rest, d)
        fits.append(a)
        rest = rest - a[:, None] * t
    scales = np.stack(fits, axis=1)
    if planes == 1:
        return _as_f16(scales)
    for _ in range(refinements):
        c = nearest_codes(w, scales).astype(np.float64)  # [out, planes, g]
        weighted = c * d
        gram = weighted @ c.transpose(0, 2, 1)  # [out, planes, planes]
        rhs = (weighted @ w[:, :, None])[:, :, 0]
        refit, solvable = _solve_small_gram(gram, rhs)
        scales = np.where(solvable[:, None], refit, scales)  # a singular row keeps its scales
    return _as_f16(scales)


TIED_STARTS = np.linspace(1.0, 0.1, 16)  # fit_tied_step's starting steps: the largest |w| at this fraction of the grid


def fit_tied_step(w: np.ndarray, d: np.ndarray, planes: int, iterations: int = 8) -> np.ndarray:
    """Per row of w [out, g], the step of the uniform grid of 3^planes levels, -(3^planes - 1)/2 to
    (3^planes - 1)/2 steps, that tied planes form, fit like `fit_plane_scales` (importance `d`): weights
    rounded to the grid, the step refit to them by weighted least squares, from TIED_STARTS starting steps
    (the largest |w| on the outermost level, or inside it), the best kept per row. The error is far from
    convex in the step (27 levels: many local minima): measured on random and heavy-tailed rows, 4 starts
    left the three-plane steps' error 2% above the best a fine search finds on average (up to 46% for a
    row), 16 starts 0.2% (two planes: 0.4% below it, the refit landing between the search's points)."""
    half = (3**planes - 1) // 2
    absmax = np.abs(w).max(axis=1)
    best_step, best_error = np.zeros(len(w)), np.full(len(w), np.inf)
    for start in TIED_STARTS:
        step = absmax * start / half
        for _ in range(iterations):
            levels = np.clip(np.rint(w / np.where(step > 0, step, 1.0)[:, None]), -half, half)
            norm = (d * levels * levels).sum(axis=1)
            step = np.where(norm > 0, (d * w * levels).sum(axis=1) / np.where(norm > 0, norm, 1.0), 0.0)
        levels = np.clip(np.rint(w / np.where(step > 0, step, 1.0)[:, None]), -half, half)
        error = (d * (w - step[:, None] * levels) ** 2).sum(axis=1)
        better = error < best_error
        best_step, best_error = np.where(better, step, best_step), np.where(better, error, best_error)
    return best_step


def tied_scales(step: np.ndarray, planes: int) -> np.ndarray:
    """float16 scales [..., planes] of tied planes from their steps [...]: plane p's is 3^(planes-1-p) times
    the step, exactly (what the runtime checks, format.encodings.tied_planes). So the step keeps 7 significant
    bits (x 9 needs 4 more of float16's 11) and is a whole multiple of float16's smallest subnormal, 2^-24."""
    top = 3 ** (planes - 1)
    step = np.clip(np.asarray(step, dtype=np.float64), -65504 / top * (1 - 2**-7), 65504 / top * (1 - 2**-7))
    fraction, exponent = np.frexp(step)
    step = np.round(np.ldexp(np.round(fraction * 128) / 128, exponent) * 2.0**24) / 2.0**24
    return (step[..., None] * 3.0 ** np.arange(planes - 1, -1, -1)).astype(np.float16)


def _solve_small_gram(gram: np.ndarray, rhs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [out, p] with gram x = rhs for each row's small Gram matrix gram [out, p, p], by a Cholesky
    factorization written out over the p <= 3 unknowns and vectorized over the rows (numpy's batched
    solve costs microseconds per tiny matrix: seconds per E2B layer). A row whose matrix is singular
    (a plane with no non-zero code, or two planes with the same codes) is marked unsolvable."""
    p = gram.shape[1]
    scale = np.einsum("opp->o", gram)
    lower = np.zeros_like(gram)
    solvable = scale > 0
    for j in range(p):
        pivot = gram[:, j, j] - np.sum(lower[:, j, :j] ** 2, axis=1)
        solvable &= pivot > 1e-12 * scale
        lower[:, j, j] = np.sqrt(np.where(solvable, pivot, 1.0))
        for i in range(j + 1, p):
            lower[:, i, j] = (gram[:, i, j] - np.sum(lower[:, i, :j] * lower[:, j, :j], axis=1)) / lower[:, j, j]
    y = np.zeros_like(rhs)
    for i in range(p):  # L y = rhs
        y[:, i] = (rhs[:, i] - np.sum(lower[:, i, :i] * y[:, :i], axis=1)) / lower[:, i, i]
    x = np.zeros_like(rhs)
    for i in reversed(range(p)):  # Lᵀ x = y
        x[:, i] = (y[:, i] - np.sum(lower[:, i + 1 :, i] * x[:, i + 1 :], axis=1)) / lower[:, i, i]
    return x, solvable


def _weighted_ternary_fit(w: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of w [out, g]: codes sign(w) on the k largest |w| and scale a minimizing
    sum_j d_j (w_j - a t_j)^2 for that support, with the k that minimizes it. For a support S the best
    scale is sum_S d|w| / sum_S d and the error drops by (sum_S d|w|)^2 / sum_S d."""
    magnitude = np.abs(w)
    order = np.argsort(-magnitude, axis=1, kind="stable")
    weighted = np.cumsum(np.take_along_axis(magnitude, order, axis=1) * d[order], axis=1)
    weight = np.cumsum(d[order], axis=1)
    k = np.argmax(weighted**2 / weight, axis=1)  # index of the last kept weight
    rows = np.arange(len(w))
    scale = weighted[rows, k] / weight[rows, k]
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(w.shape[1])[None, :], axis=1)
    t = np.sign(w) * (rank <= k[:, None])
    return t, np.where(weighted[:, -1] > 0, scale, 0.0)


class Levels:
    """The values one group of a row can take with its scales [out, planes]: 3 ** planes (3, 9 or 27),
    sorted per row, so the nearest level of a weight is found by comparing it with the midpoints."""

    CODES = {p: np.array(list(itertools.product((-1, 0, 1), repeat=p)), dtype=np.int8) for p in (1, 2, 3)}

    def __init__(self, scales: np.ndarray):
        codes = self.CODES[scales.shape[1]]
        values = scales.astype(np.float64) @ codes.T  # [out, levels]
        order = np.argsort(values, axis=1, kind="stable")
        self.values = np.take_along_axis(values, order, axis=1)
        self.codes = codes[order]  # [out, levels, planes]
        self.midpoints = (self.values[:, 1:] + self.values[:, :-1]) / 2
        # flat views for np.take, which is an order of magnitude faster than fancy indexing here
        self._row_starts = np.arange(len(values))[:, None] * values.shape[1]
        self._flat_codes = self.codes.reshape(-1, self.codes.shape[-1])
        self._midpoints_by_level = np.ascontiguousarray(self.midpoints.T)

    def nearest(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes [out, planes, n] and values [out, n] of the nearest levels to w [out, n] (a tie goes down)."""
        index = np.zeros(w.shape, dtype=np.uint8)  # at most 26: uint8 sums are 1.8x faster than intp ones
        for midpoint in self._midpoints_by_level:  # the level's index: how many midpoints lie below w
            index += w > midpoint[:, None]
        flat = self._row_starts + index
        return np.moveaxis(np.take(self._flat_codes, flat, axis=0), -1, 1), np.take(self.values, flat)


def nearest_codes(w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """For each weight of w [out, g], the codes [out, planes, g] of its nearest level sum_p scale_p * t_p."""
    return Levels(scales).nearest(w)[0]


def round_to_planes(w: np.ndarray, planes: int, group: int, rotation: int = 0, tied: bool = False) -> TritPlanes:
    """Round-to-nearest trit-planes of float32 w [out, in] (no calibration): each group's scales are fit
    to its own weights (`tied`: see fit_plane_scales), then every weight takes the nearest level."""
    w = w.astype(np.float64)
    if rotation:
        w = rotate_blocks(w, rotation)
    out, n = w.shape
    groups = n // group
    codes = np.empty((out, planes, n), dtype=np.int8)
    scales = np.empty((out, planes, groups), dtype=np.float16)
    for g in range(groups):
        cols = slice(g * group, (g + 1) * group)
        scales[:, :, g] = fit_plane_scales(w[:, cols], planes, tied=tied)
        codes[:, :, cols] = nearest_codes(w[:, cols], scales[:, :, g])
    return TritPlanes(codes, scales, rotation)


def _as_f16(scales: np.ndarray) -> np.ndarray:
    """Scales as the artifact stores them (float16): the codes are chosen against these exact values."""
    return np.clip(scales, -65504, 65504).astype(np.float16)
