"""GPTQ on trit-planes (convert/gptq.py) against independent references, on small matrices.

- The error feedback equals the Optimal Brain Quantizer it accelerates (Frantar & Alistarh 2022),
  written here the slow, literal way: after each column the inverse Hessian of the remaining columns
  is updated by Gaussian elimination; no Cholesky factor, no lazy blocks. (gptq.py computes the same
  choices as Babai's nearest plane with a Cholesky factor of H itself: this is the check that it does.)
- The Cholesky factorization it uses, blocked and in place, equals numpy's.
- On correlated inputs with an outlier channel it reaches a much smaller layer-output error than
  round-to-nearest, for one, two and three planes, with and without the Hadamard rotation.
- With H = I (no input correlation) there is nothing to compensate: it is round-to-nearest exactly.
- The planes' values: every weight is one of the 3 (9, 27) levels of its group's float16 scales.
- Tied planes (the default): each plane's scale is exactly 3 times the next one's in float16, whatever the
  step, so a group's levels are a uniform grid; the refit step is the least-squares one for the codes, and
  GPTQ still beats round-to-nearest on it.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from ferrisres.convert.calibrate import CalibratingLinear, HessianCache
from ferrisres.convert.gptq import _cholesky_in_place, gptq_planes, output_error
from ferrisres.convert.quantize import (_solve_small_gram, fit_plane_scales, fit_tied_step, nearest_codes,
                                        round_to_planes, tied_scales)
from ferrisres.format.encodings import hadamard, rotate_blocks, tied_planes


def correlated_inputs(n: int, tokens: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, n)) @ (np.eye(n) + 0.3 * rng.standard_normal((n, n)))
    x[:, 3] *= 20  # an outlier channel, as real activations have
    return x


def obq_reference(w: np.ndarray, h: np.ndarray, planes: int, group: int, damping: float) -> np.ndarray:
    """Quantize columns left to right; after each, move its error onto the remaining columns with the
    inverse Hessian, then remove that column from the inverse (Gaussian elimination)."""
    w = w.astype(np.float64).copy()
    importance = np.diag(h).copy()
    h = h + damping * np.mean(np.diag(h)) * np.eye(len(h))
    h_inv = np.linalg.inv(h)
    codes = np.zeros((w.shape[0], planes, w.shape[1]), dtype=np.int8)
    for j in range(w.shape[1]):
        if j % group == 0:
            scales = fit_plane_scales(w[:, j : j + group], planes, importance[j : j + group]).astype(np.float64)
        codes[:, :, j] = nearest_codes(w[:, j : j + 1], scales)[:, :, 0]
        q = np.sum(codes[:, :, j] * scales, axis=1)
        error = (w[:, j] - q) / h_inv[j, j]
        w[:, j:] -= np.outer(error, h_inv[j, j:])
        h_inv -= np.outer(h_inv[:, j], h_inv[j, :]) / h_inv[j, j]
    return codes


@pytest.mark.parametrize("planes", [1, 2, 3])
def test_error_feedback_equals_the_optimal_brain_quantizer(planes):
    rng = np.random.default_rng(planes)
    n = 24  # three groups within one block of columns; the next test crosses blocks
    w = rng.standard_normal((6, n))
    x = correlated_inputs(n, 400, seed=7)
    h = x.T @ x / len(x)
    got = gptq_planes(w, h, planes, group=8, damping=0.01)
    np.testing.assert_array_equal(got.codes, obq_reference(w, h, planes, group=8, damping=0.01))


def test_lazy_blocks_change_nothing():
    """Columns past a block (128) get the block's errors at once, not column by column: same codes."""
    rng = np.random.default_rng(3)
    n = 256
    w = rng.standard_normal((4, n))
    x = correlated_inputs(n, 600, seed=11)
    h = x.T @ x / len(x)
    np.testing.assert_array_equal(gptq_planes(w, h, 2, group=64).codes, obq_reference(w, h, 2, group=64, damping=0.01))


@pytest.mark.parametrize("planes,tied", [(1, False), (2, False), (3, False), (2, True), (3, True)])
@pytest.mark.parametrize("rotation", [0, 64])
def test_output_error_well_below_round_to_nearest(planes, tied, rotation):
    rng = np.random.default_rng(0)
    n = 256
    w = rng.standard_normal((64, n)) * 0.02
    x = correlated_inputs(n, 2048, seed=1)
    h = x.T @ x / len(x)

    def effective(tp):  # the weight that multiplies the unrotated input
        return rotate_blocks(tp.dequantized(), tp.rotation) if tp.rotation else tp.dequantized()

    rtn = output_error(w, effective(round_to_planes(w, planes, 64, rotation, tied)), h)
    gptq = output_error(w, effective(gptq_planes(w, h, planes, 64, rotation, tied=tied)), h)
    # measured: 0.30-0.51 of round-to-nearest's error on this input; GPTQ must at least clearly win
    assert gptq < 0.7 * rtn, (gptq, rtn)


@pytest.mark.parametrize("planes", [1, 2, 3])
def test_uncorrelated_inputs_leave_nothing_to_compensate(planes):
    """H = I without damping: the inverse is diagonal, so no error moves: round-to-nearest's codes
    exactly. The scales are then refit to those codes by least squares: never a larger error."""
    w = np.random.default_rng(5).standard_normal((8, 128)).astype(np.float32)
    got = gptq_planes(w, np.eye(128), planes, group=32, damping=0.0)
    rtn = round_to_planes(w, planes, group=32)
    np.testing.assert_array_equal(got.codes, rtn.codes)
    assert np.sum((got.dequantized() - w) ** 2) <= np.sum((rtn.dequantized() - w) ** 2) * (1 + 1e-3)


def test_scale_refit_is_the_least_squares_optimum_for_the_codes():
    """Moving any one refit scale either way raises the output error (up to float16 rounding)."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((3, 64))
    x = correlated_inputs(64, 500, seed=3)
    h = x.T @ x / len(x)
    tp = gptq_planes(w, h, 2, group=32, damping=0.0)
    best = output_error(w, tp.dequantized(), h)
    for index in np.ndindex(tp.scales.shape):
        for step in (-0.01, 0.01):
            moved = tp.scales.astype(np.float64)
            moved[index] *= 1 + step
            worse = output_error(w, type(tp)(tp.codes, moved, 0).dequantized(), h)
            assert worse >= best * (1 - 1e-4), (index, step)


@pytest.mark.parametrize("planes", [1, 2, 3])
def test_every_weight_is_a_level_of_its_groups_scales(planes):
    w = np.random.default_rng(2).standard_normal((16, 128))
    x = correlated_inputs(128, 300, seed=2)
    tp = gptq_planes(w, x.T @ x, planes, group=32)
    assert tp.codes.shape == (16, planes, 128) and tp.scales.shape == (16, planes, 4)
    assert tp.scales.dtype == np.float16 and set(np.unique(tp.codes)) <= {-1, 0, 1}
    levels = np.sum(tp.codes.reshape(16, planes, 4, 32) * tp.scales.astype(np.float64)[..., None], axis=1)
    np.testing.assert_array_equal(tp.dequantized(), levels.reshape(16, 128))


def test_each_plane_fits_a_group_better_than_the_planes_before():
    """A further plane fits what the planes before it leave: the group's squared error drops several-fold."""
    w = np.random.default_rng(4).standard_normal((32, 64))
    error = {}
    for planes in (1, 2, 3):
        scales = fit_plane_scales(w, planes).astype(np.float64)
        q = np.sum(nearest_codes(w, scales) * scales[:, :, None], axis=1)
        error[planes] = np.sum((w - q) ** 2)
    assert error[2] < 0.25 * error[1] and error[3] < 0.25 * error[2], error


@pytest.mark.parametrize("planes", [2, 3])
def test_the_scales_small_systems_are_solved_exactly_and_singular_ones_flagged(planes):
    rng = np.random.default_rng(planes)
    a = rng.standard_normal((50, planes, 7))
    gram, rhs = a @ a.transpose(0, 2, 1), rng.standard_normal((50, planes))
    gram[0] = 0  # a row whose planes are all zero
    gram[1, -1], gram[1, :, -1] = gram[1, 0], gram[1, :, 0]  # two planes with the same codes
    gram[1, -1, -1] = gram[1, 0, 0]
    x, solvable = _solve_small_gram(gram, rhs)
    assert not solvable[0] and not solvable[1] and solvable[2:].all()
    np.testing.assert_allclose(x[2:], np.linalg.solve(gram[2:], rhs[2:, :, None])[..., 0], rtol=1e-9, atol=1e-9)


def test_hadamard_is_orthonormal_and_symmetric():
    for n in (2, 8, 64):
        h = hadamard(n)
        np.testing.assert_allclose(h @ h, np.eye(n), atol=1e-12)
        np.testing.assert_array_equal(h, h.T)
    with pytest.raises(ValueError):
        hadamard(48)


@pytest.mark.parametrize("n, block", [(100, 16), (64, 64), (37, 512)])
def test_blocked_cholesky_in_place_equals_numpy(n, block):
    h = correlated_inputs(n, 3 * n, seed=n).T @ correlated_inputs(n, 3 * n, seed=n)
    a = h.copy()
    _cholesky_in_place(a, block=block)
    # both are backward stable: they agree to a few units of float64 rounding of H's largest entries
    np.testing.assert_allclose(a, np.linalg.cholesky(h), rtol=0, atol=1e-12 * np.abs(h).max())


def test_stacked_rows_are_quantized_as_each_alone():
    """Calibration quantizes linears that share an input (q/k/v, gate/up) as one stacked matrix: that is
    exact only because GPTQ treats each row independently given H."""
    rng = np.random.default_rng(7)
    x = correlated_inputs(128, 512, seed=7)
    h = x.T @ x / len(x)
    a, b = rng.standard_normal((12, 128)), rng.standard_normal((5, 128))
    stacked = gptq_planes(np.concatenate([a, b]), h, 2, group=64, rotation=64)
    for rows, w in ((slice(0, 12), a), (slice(12, 17), b)):
        alone = gptq_planes(w, h, 2, group=64, rotation=64)
        np.testing.assert_array_equal(stacked.codes[rows], alone.codes)
        np.testing.assert_array_equal(stacked.scales[rows], alone.scales)


def test_a_calibrated_layer_lets_go_of_its_weights_and_hessians():
    """Calibration holds one layer at a time: once its linears' results are taken, nothing of them
    stays alive without the cyclic collector (which numpy-heavy code seldom triggers). Linears that
    share an input refer to each other; before this was released, E2B kept every layer's Hessians."""
    rng = np.random.default_rng(3)
    x = correlated_inputs(128, 256, seed=3)
    hessians = HessianCache()
    linears = [CalibratingLinear(rng.standard_normal((n, 128)).astype(np.float32), 2, 64, 64, False, hessians)
               for n in (8, 4)]
    CalibratingLinear.share_input(linears)
    gc.disable()
    try:
        for linear in linears:
            linear(x)
        results = [linear.result() for linear in linears]
        alive = [weakref.ref(linear) for linear in linears] + [weakref.ref(hessians.hessian)]
        hessians.clear()
        del linears, linear
        assert [ref() for ref in alive] == [None] * len(alive)
    finally:
        gc.enable()
    assert [r.codes.shape for r in results] == [(8, 2, 128), (4, 2, 128)]


@pytest.mark.parametrize("planes", [2, 3])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_tied_planes_form_a_uniform_grid(planes, method):
    """Every plane's scale is 3 times the next one's, exactly in float16, so each weight is a whole number
    of steps (the last plane's scale) between -(3^planes - 1)/2 and (3^planes - 1)/2: the runtime's tied
    kernel multiplies that number (format.encodings.tied_planes)."""
    rng = np.random.default_rng(planes)
    w = rng.standard_normal((16, 128)) * 0.02
    x = correlated_inputs(128, 300, seed=2)
    tp = round_to_planes(w, planes, 32, tied=True) if method == "rtn" else gptq_planes(w, x.T @ x, planes, 32, tied=True)
    assert tied_planes(tp.scales)
    s = tp.scales.astype(np.float64)
    np.testing.assert_array_equal(s[:, :-1], 3 * s[:, 1:])
    steps = tp.dequantized().reshape(16, 4, 32) / s[:, -1, :, None]
    np.testing.assert_allclose(steps, np.rint(steps), atol=1e-9)
    assert np.abs(steps).max() <= (3**planes - 1) // 2 and np.abs(np.rint(steps)).max() > (3 ** (planes - 1) - 1) // 2


@pytest.mark.parametrize("planes", [2, 3])
def test_tied_scales_are_exact_for_any_step(planes):
    """Zero, float16 subnormals, the largest steps float16 can hold 3^(planes-1) times, negative ones (a
    refit may give them): tied exactly, finite, within 2^-7 of the step asked for (or 2^-24 below float16's
    normal range)."""
    step = np.array([[0.0, 1e-9, 3e-7, 5e-6, 1e-3, 0.1234, 7.0, 300.0, 65504 / 3 ** (planes - 1), -0.02, 1e9]])
    scales = tied_scales(step, planes)
    assert scales.shape == (1, 11, planes) and np.isfinite(scales.astype(np.float64)).all()
    assert tied_planes(np.moveaxis(scales, -1, 1))
    got = scales[..., -1].astype(np.float64)
    asked = np.clip(step, -65504 / 3 ** (planes - 1), 65504 / 3 ** (planes - 1))
    assert (np.abs(got - asked) <= np.maximum(np.abs(asked) * 2**-7, 2**-24)).all(), got


def test_the_tied_step_fit_is_near_the_best_step():
    """The fitted steps' errors are on average within 1% of the least a fine search of steps finds, and no
    row's 25% above it (with 27 levels the error has many local minima)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((256, 64)) * rng.random((256, 1))
    w[1:50] *= rng.standard_t(2, (49, 64))  # heavy tails
    w[0] = 0  # an all-zero row: step 0
    d = rng.random(64) + 0.5
    for planes in (2, 3):
        half = (3**planes - 1) // 2
        levels = lambda step: np.clip(np.rint(w[1:, None, :] / step[..., None]), -half, half)  # noqa: E731
        error = lambda step: (d * (w[1:, None, :] - step[..., None] * levels(step)) ** 2).sum(axis=-1)  # noqa: E731
        fitted = fit_tied_step(w, d, planes)
        candidates = np.abs(w[1:]).max(axis=1, keepdims=True) / half * np.linspace(0.02, 1.2, 3001)[None, :]
        ratio = error(fitted[1:, None])[:, 0] / error(candidates).min(axis=1)
        assert fitted[0] == 0 and ratio.mean() < 1.01 and ratio.max() < 1.25, (ratio.mean(), ratio.max())


def test_the_tied_refit_step_is_the_least_squares_optimum_for_the_codes():
    """Moving a group's step (all its tied planes together) either way raises the output error (up to the
    step's rounding to 7 significant bits)."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((3, 64))
    x = correlated_inputs(64, 500, seed=3)
    h = x.T @ x / len(x)
    tp = gptq_planes(w, h, 2, group=32, damping=0.0, tied=True)
    best = output_error(w, tp.dequantized(), h)
    for row, group in np.ndindex(3, 2):
        for step in (-0.02, 0.02):
            moved = tp.scales.astype(np.float64)
            moved[row, :, group] *= 1 + step
            worse = output_error(w, type(tp)(tp.codes, moved, 0).dequantized(), h)
            assert worse >= best * (1 - 1e-3), (row, group, step)

