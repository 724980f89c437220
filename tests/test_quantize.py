"""Ternary quantizers (convert/quantize.py).

`ferrisres`: bit-for-bit the FerrisRes original's per-tensor quantizer
(docs/design.md, "The student"), checked against a deliberately literal port of the
Rust code below: a Python loop of float32 scalars, nothing vectorized.

Row schemes: absmean-row and lsq-row share one ternary pattern; lsq-row's scale is the least-squares
optimum for it; packed codes round-trip through the format's unpacker.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from conftest import FIXTURES, run_tool
from safetensors.numpy import load_file

from ferrisres.convert.quantize import SCHEMES, ternarize
from ferrisres.format import pack_ternary, unpack_ternary
from ferrisres.format.schema import SCALE_SUFFIX
from ferrisres.runtime import load

f32 = np.float32
ABSMEAN_NORM = f32(0.7978845608)  # the Rust constant, an f32


# -- the Rust original, literally -----------------------------------------------------------------


def rust_f32_round(x: np.float32) -> float:
    """Rust's f32::round: the nearest integer, halfway cases away from zero, computed exactly (a float32
    converts exactly to a Python float, and a - floor(a) is then exact)."""
    if math.isnan(x):
        return math.nan
    a = abs(float(x))
    r = math.floor(a)
    if a - r >= 0.5:
        r += 1
    return math.copysign(r, float(x))


def rust_quantize(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """quantize_ternary(w): per tensor.

        let sum: f32 = w.iter().map(|x| x.abs()).sum();      // sequential f32 accumulation
        let alpha = if sum == 0.0 { 1.0 } else { (sum / n as f32) / ABSMEAN_NORM };
        let inv = 1.0 / alpha;
        t_i = (w_i * inv).round().clamp(-1.0, 1.0) as i32    // NaN -> 0
    """
    flat = [f32(v) for v in np.asarray(w, dtype=np.float32).reshape(-1)]
    total = f32(0)
    for v in flat:
        total = f32(total + f32(abs(v)))
    if total == f32(0):
        alpha = f32(1)
    else:
        alpha = f32(f32(total / f32(len(flat))) / ABSMEAN_NORM)
    inv = f32(f32(1) / alpha)
    codes = []
    for v in flat:
        r = rust_f32_round(f32(v * inv))
        codes.append(0 if math.isnan(r) else int(min(max(r, -1.0), 1.0)))
    return np.array(codes, dtype=np.int8).reshape(np.shape(w)), alpha


def reachable_alpha(approx: float, n: int) -> np.float32:
    """An alpha near `approx` that some float32 sum over n elements gives (not every float32 is one)."""
    total = f32(approx * float(ABSMEAN_NORM) * n)
    return f32(f32(total / f32(n)) / ABSMEAN_NORM)


def sum_for_alpha(alpha: np.float32, n: int) -> np.float32:
    """A float32 sum of |w| over n elements for which the original computes exactly `alpha`."""
    s = f32(float(alpha) * float(ABSMEAN_NORM) * n)
    for step in range(200):
        for candidate in (s, np.nextafter(s, f32(np.inf))):
            if f32(f32(candidate / f32(n)) / ABSMEAN_NORM) == alpha:
                return candidate
        s = np.nextafter(s, f32(-np.inf)) if step % 2 else np.nextafter(s, f32(np.inf))
    raise AssertionError(f"no float32 sum gives alpha {alpha}")


def tensor_with_alpha(alpha: np.float32, probes: list[np.float32], shape: tuple[int, int], seed: int,
                      decades: float = 0) -> np.ndarray:
    """A float32 tensor whose original alpha is exactly `alpha`, holding `probes` at its first positions.

    Random fillers (magnitudes spread over `decades` orders of magnitude) bring the sequential sum of
    |w| to ~85 % of the sum that gives `alpha`; the last element is the exact difference (Sterbenz:
    exactly representable), so the float32 sum hits it exactly.
    """
    n = shape[0] * shape[1]
    target = sum_for_alpha(alpha, n)
    rng = np.random.default_rng(seed)
    fillers = rng.uniform(-1, 1, n - len(probes) - 1) * rng.permutation(np.logspace(0, decades, n - len(probes) - 1))
    probe_sum = sum(abs(float(p)) for p in probes)
    fillers *= (0.85 * float(target) - probe_sum) / np.abs(fillers).sum()
    values = [f32(p) for p in probes] + [f32(v) for v in fillers]
    partial = f32(0)
    for v in values:
        partial = f32(partial + f32(abs(v)))
    assert target / 2 <= partial <= target
    last = f32(target - partial)
    assert f32(partial + last) == target
    w = np.array(values + [last], dtype=np.float32).reshape(shape)
    assert rust_quantize(w)[1] == alpha
    return w


def assert_bit_exact(w: np.ndarray) -> tuple[np.ndarray, np.float32]:
    codes, scale = ternarize(w, "ferrisres")
    want_codes, want_alpha = rust_quantize(w)
    assert scale.dtype == np.float32 and scale.shape == (1,)
    assert scale[0].tobytes() == want_alpha.tobytes(), f"alpha {scale[0]!r} != {want_alpha!r}"
    assert codes.shape == w.shape
    bad = np.argwhere(codes != want_codes)
    assert bad.size == 0, [(tuple(i), float(w[tuple(i)]), int(codes[tuple(i)]), int(want_codes[tuple(i)])) for i in bad[:8]]
    return want_codes, want_alpha


# -- the ferrisres scheme -------------------------------------------------------------------------


@pytest.mark.parametrize("shape,seed", [((16, 24), 0), ((7, 13), 1), ((1, 1), 2), ((3, 64), 3)])
def test_ferrisres_matches_the_original_on_gaussian_tensors(shape, seed):
    w = (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)
    codes, _ = assert_bit_exact(w)
    assert set(np.unique(codes)) <= {-1, 0, 1}


def test_ferrisres_exact_half_ties_round_away_from_zero():
    """alpha = 1/16 exactly (so 1/alpha = 16 and w * (1/alpha) is exact): w/alpha hits +-0.5, +-1.5,
    +-2.5 exactly. Rust rounds them away from zero (np.round would give 0, +-2, +-2), then clamps."""
    alpha = f32(1 / 16)
    ratios = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 1.0, -1.0, 0.0, -0.0,
              float(np.nextafter(f32(0.5), f32(1))), -float(np.nextafter(f32(0.5), f32(1)))]
    w = tensor_with_alpha(alpha, [f32(r) * alpha for r in ratios], (8, 8), seed=0)
    codes, _ = assert_bit_exact(w)
    assert codes.reshape(-1)[: len(ratios)].tolist() == [1, -1, 1, -1, 1, -1, 1, -1, 0, 0, 1, -1]


def test_ferrisres_just_below_half_rounds_to_zero():
    """The float32 just below 0.5 (0.49999997) must give code 0: Rust's round is exact. The shortcut
    floor(|x| + 0.5) evaluated in float32 gives 1, because 0.49999997 + 0.5 rounds up to 1.0."""
    alpha = f32(1 / 16)
    below = float(np.nextafter(f32(0.5), f32(0)))
    ratios = [below, -below, float(np.nextafter(f32(below), f32(0))), 1.5 - 2**-24 * 2, 0.25]
    w = tensor_with_alpha(alpha, [f32(r) * alpha for r in ratios], (8, 8), seed=1)
    codes, _ = assert_bit_exact(w)
    assert codes.reshape(-1)[: len(ratios)].tolist() == [0, 0, 0, 1, 0]


def test_ferrisres_multiplies_by_the_reciprocal():
    """With alpha not a power of two, w * (1/alpha) and w / alpha can round differently; the original
    multiplies by the float32 reciprocal. Probe a value on the 0.5 boundary where the two disagree."""
    just_below = np.nextafter(f32(0.5), f32(0))  # as a product it tests rounding, not the reciprocal

    def code(x: np.float32) -> int:
        return int(np.clip(rust_f32_round(x), -1, 1))

    found = []
    for approx in np.random.default_rng(6).uniform(0.02, 0.1, 200):
        alpha = reachable_alpha(float(approx), 64)
        inv = f32(f32(1) / alpha)
        probe = f32(0.5 * float(alpha))
        for _ in range(8):
            probe = np.nextafter(probe, f32(-np.inf))
        for _ in range(16):
            product, quotient = f32(probe * inv), f32(probe / alpha)
            if code(product) != code(quotient) and product != just_below:
                found.append(probe)
            probe = np.nextafter(probe, f32(np.inf))
        if found:
            break
    assert found, "no probe value separates w * (1/alpha) from w / alpha"
    expected = code(f32(found[0] * inv))
    w = tensor_with_alpha(alpha, found[:1] + [-found[0]], (8, 8), seed=2)
    codes, _ = assert_bit_exact(w)
    assert codes.reshape(-1)[:2].tolist() == [expected, -expected]


def test_ferrisres_sums_sequentially_in_float32():
    """A 4096-value tensor with magnitudes over 4 decades: numpy's pairwise float32 sum and a float64
    sum give a different alpha than the original's sequential float32 sum, and two probes sitting on
    the rounding boundary under the true alpha (exactly 0.5, and two float32 steps below 0.5) make
    that difference change the codes."""
    def probe_at(ratio: np.float32, alpha: np.float32) -> np.float32 | None:
        """A float32 w with w * (1/alpha) == ratio exactly in float32, if there is one."""
        inv = f32(f32(1) / alpha)
        p = f32(float(ratio) * float(alpha))
        for _ in range(40):
            p = np.nextafter(p, f32(-np.inf))
        for _ in range(80):
            if f32(p * inv) == ratio:
                return p
            p = np.nextafter(p, f32(np.inf))
        return None

    below_half = np.nextafter(np.nextafter(f32(0.5), f32(0)), f32(0))  # 0.49999994
    for approx in (0.0472, 0.0513, 0.0391, 0.0617, 0.0444, 0.0538):
        alpha = reachable_alpha(approx, 64 * 64)
        tie, below = probe_at(f32(0.5), alpha), probe_at(below_half, alpha)
        if tie is not None and below is not None:
            break
    assert tie is not None and below is not None, "no alpha with both probes"
    w = tensor_with_alpha(alpha, [tie, below], (64, 64), seed=3, decades=4)
    codes, _ = assert_bit_exact(w)
    assert codes.reshape(-1)[:2].tolist() == [1, 0]
    flat = np.abs(w.reshape(-1))
    naive = {
        "pairwise f32": f32(f32(np.sum(flat, dtype=np.float32) / f32(w.size)) / ABSMEAN_NORM),
        "f64": f32(f32(np.sum(flat, dtype=np.float64) / w.size) / ABSMEAN_NORM),
    }
    for name, a in naive.items():
        assert a != alpha, f"{name} sum gives the same alpha: the tensor does not discriminate"
        naive_codes = np.clip([rust_f32_round(f32(v * f32(f32(1) / a))) for v in w.reshape(-1)[:2]], -1, 1)
        assert naive_codes.tolist() != [1, 0], f"{name} sum gives the same codes: the probes do not discriminate"


def test_ferrisres_all_zero_tensor_has_alpha_1():
    for w in (np.zeros((4, 6), np.float32), np.full((3, 5), -0.0, np.float32)):
        codes, alpha = assert_bit_exact(w)
        assert alpha == f32(1) and not codes.any()


def test_ferrisres_scheme_in_an_artifact_is_the_original_on_the_source_weights(tmp_path):
    """End to end, through the command line: `--scheme ferrisres --method rtn --planes 1` stores the
    original's codes and alpha for each projection (per row: no groups, no rotation)."""
    out = tmp_path / "ferrisres.tern"
    result = run_tool("ferrisres-convert", str(FIXTURES / "tiny_gemma4"), "-o", str(out), "--quiet",
                      "--scheme", "ferrisres", "--method", "rtn", "--planes", "1")
    assert result.returncode == 0, result.stderr
    model = load(out)
    source = load_file(FIXTURES / "tiny_gemma4" / "model.safetensors")
    for name in ("layers.0.per_layer_input_gate", "layers.3.self_attn.k_proj", "layers.9.per_layer_projection"):
        info = model.artifact.tensors[name]
        assert info.encoding == "ternary"
        codes = unpack_ternary(model.artifact.tensor(name), info.shape[-1])
        scale = model.artifact.tensor(name + SCALE_SUFFIX)
        want_codes, want_alpha = rust_quantize(source[f"model.{name}.weight"])
        assert scale.shape == (1,) and scale[0].tobytes() == want_alpha.tobytes(), name
        assert np.array_equal(codes, want_codes), name
    assert model.student_config["scheme"] == "ferrisres"


# -- the row schemes -------------------------------------------------------------------------------


# A float32 row statistic of n = 37 values (a sum in any order, then one division): within (n + 2) u of
# the exact one (n u for the sum, u for the division, u for the result's rounding).
ROW_RTOL = (37 + 2) * 2.0**-24


def row_test_matrix(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((12, 37)) * rng.uniform(0.01, 1, (12, 1))).astype(np.float32)
    w[3] = 0  # an all-zero row
    w[5] = 0
    w[5, 7] = -0.3  # a single non-zero
    w[8] = rng.laplace(size=37).astype(np.float32)  # heavy tails
    return w


def squared_error(w: np.ndarray, t: np.ndarray, scale) -> np.ndarray:
    return np.sum((w.astype(np.float64) - np.asarray(scale, np.float64)[:, None] * t) ** 2, axis=1)


def test_absmean_and_lsq_rows_share_one_pattern():
    w = row_test_matrix()
    t_absmean, s_absmean = ternarize(w, "absmean-row")
    t_lsq, s_lsq = ternarize(w, "lsq-row")
    assert t_absmean.dtype == t_lsq.dtype == np.int8 and t_absmean.shape == w.shape
    assert np.array_equal(t_absmean, t_lsq)
    assert s_absmean.shape == s_lsq.shape == (12,) and s_absmean.dtype == s_lsq.dtype == np.float32
    # absmean-row: gamma = mean |w| of the row, t = clamp(round(w / gamma)) (exact rounding of the f32 quotient)
    gamma = np.mean(np.abs(w.astype(np.float64)), axis=1)
    nonzero_rows = gamma > 0
    np.testing.assert_allclose(s_absmean[nonzero_rows], gamma[nonzero_rows], rtol=ROW_RTOL)
    expected = [[int(np.clip(rust_f32_round(f32(v / s)), -1, 1)) for v in row] for row, s in zip(w, s_absmean)]
    assert np.array_equal(t_absmean, np.array(expected))
    # the all-zero row: zero codes, scale 1 in both
    assert not t_lsq[3].any() and s_lsq[3] == 1 and s_absmean[3] == 1
    assert t_lsq[5].tolist() == [0] * 7 + [-1] + [0] * 29


def test_lsq_row_scale_is_the_least_squares_optimum_for_its_codes():
    w = row_test_matrix(1)
    t, scale = ternarize(w, "lsq-row")
    t64 = t.astype(np.float64)
    nonzero = np.count_nonzero(t, axis=1)
    closed_form = np.einsum("ij,ij->i", w.astype(np.float64), t64) / np.maximum(nonzero, 1)
    np.testing.assert_allclose(scale[nonzero > 0], closed_form[nonzero > 0], rtol=ROW_RTOL)
    best = squared_error(w, t64, scale)
    for delta in (1e-4, 1e-3, 1e-2, 0.1, 0.5):
        for factor in (1 - delta, 1 + delta):
            assert np.all(squared_error(w, t64, scale * factor) >= best), (delta, factor)
    # it never reconstructs worse than absmean-row's scale for the same codes
    _, s_absmean = ternarize(w, "absmean-row")
    assert np.all(best <= squared_error(w, t64, s_absmean) + 1e-12)  # float64 sums of ~1: residue far below


def test_optimal_row_is_the_best_ternary_approximation():
    """Brute force over all 3^8 patterns of short rows: optimal-row's error is the minimum, its scale
    is the least-squares one for its codes, and it is never worse than lsq-row."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((6, 8)) * rng.uniform(0.01, 1, (6, 1))).astype(np.float32)
    w[2] = 0
    t, scale = ternarize(w, "optimal-row")
    err = squared_error(w, t.astype(np.float64), scale)
    patterns = np.array([p for p in itertools.product((-1, 0, 1), repeat=8) if any(p)], dtype=np.float64)
    w64 = w.astype(np.float64)
    projections = w64 @ patterns.T  # [rows, patterns]
    brute = np.sum(w64**2, axis=1) - np.max(projections**2 / np.count_nonzero(patterns, axis=1), axis=1)
    # the scale is stored in float32 (relative u), but at the least-squares optimum the error is flat in the
    # scale: it moves by O(u^2) relative, far below 1e-6; atol for the all-zero row's float64 zero
    np.testing.assert_allclose(err, brute, rtol=1e-6, atol=1e-12)
    for delta in (1e-4, 1e-2, 0.5):
        for factor in (1 - delta, 1 + delta):
            assert np.all(squared_error(w, t.astype(np.float64), scale * factor) >= err)
    t_lsq, s_lsq = ternarize(w, "lsq-row")
    assert np.all(err <= squared_error(w, t_lsq.astype(np.float64), s_lsq) * (1 + 1e-6) + 1e-12)  # as above


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n_in", [1, 2, 3, 4, 5, 7, 37, 64])
def test_packed_codes_round_trip(scheme, n_in):
    w = np.random.default_rng(n_in).standard_normal((6, n_in)).astype(np.float32)
    w[1] = 0  # an all-zero row
    t, _ = ternarize(w, scheme)
    packed = pack_ternary(t)
    assert packed.dtype == np.uint8 and packed.shape == (w.shape[0], (n_in + 3) // 4)
    assert np.array_equal(unpack_ternary(packed, n_in), t.astype(np.float32))
    codes = (packed[..., None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
    assert not np.any(codes == 3)  # 0b11 is invalid
    padding = codes.reshape(w.shape[0], -1)[:, n_in:]
    assert np.all(padding == 1)  # padded with zero codes (0b01)
