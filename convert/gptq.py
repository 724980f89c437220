"""GPTQ for trit-planes: round a weight one input column at a time and push each column's rounding
error onto the columns not yet rounded, weighted by the layer's input statistics.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(2022). For a linear y = W x with calibration inputs X [N, in] and H = X^T X, the output error of a
row is (w - q) H (w - q)^T. GPTQ rounds column j, then moves the columns not yet rounded to their best
continuous values given the rounding so far (the Optimal Brain Surgeon update), so that each column
is rounded from the value that best compensates the errors before it.

The same sequence of choices needs no inverse of H (Chen et al., "The Geometry of LLM Quantization:
GPTQ as Babai's Nearest Plane Algorithm", 2025). Factor H = V V^T with V upper triangular; the error is
||(w - q) V||^2, and column k of (w - q) V involves only the columns j <= k. With d = w - q, the
compensated value of column k is therefore w_k + (sum over j < k of d_j V[j, k]) / V[k, k]: rounding
it makes column k of the error as small as it can be given the columns before, which is GPTQ's rule.
So one Cholesky factorization replaces GPTQ's inverse and second factorization (for E2B's 12288-wide
down projections that was most of the time). Columns are taken in blocks: the sum over the columns of
earlier blocks is one matrix product per block, within a block it is updated column by column.

The grid is that of `quantize.TritPlanes`: a group's scales are fit (`fit_plane_scales`) when its first
column is reached, to the group's weights as GPTQ would have updated them by then (the continuous
optimum given the earlier columns: one small triangular solve per group).
"""

from __future__ import annotations

import numpy as np

from ferrisres.format.encodings import rotate_blocks

from .quantize import Levels, TritPlanes, _as_f16, fit_plane_scales, tied_scales

DAMPING = 0.01  # x mean(diag H), added to the diagonal: keeps H invertible, as the reference code does
BLOCK_COLUMNS = 128


def gptq_planes(w: np.ndarray, hessian: np.ndarray, planes: int, group: int, rotation: int = 0,
                damping: float = DAMPING, tied: bool = False) -> TritPlanes:
    """Trit-planes of w [out, in] that keep (W - Q) X small for inputs whose X^T X is `hessian` [in, in].

    With `rotation` b, W is quantized in the basis of the rotated input R x: W R against R H R. With `tied`,
    the planes' scales are tied (`quantize.fit_plane_scales`), the refit too."""
    w = np.array(w, dtype=np.float64)
    if rotation:  # in H's own dtype (float32 from calibration): it is widened only to be factored
        w = rotate_blocks(w, rotation)
        h = rotate_blocks(rotate_blocks(hessian, rotation).T, rotation)  # R H R: H and R are symmetric
    else:
        h = np.array(hessian)
    out, n = w.shape
    dead = np.diag(h) <= 0  # inputs that were always zero: their weights never matter
    h[dead, dead] = 1
    w[:, dead] = 0
    importance = np.diag(h).astype(np.float64)  # the mean square of each input: how much its weights matter
    h[np.diag_indices(n)] += damping * np.mean(importance)
    v = _upper_cholesky(h)

    # Column-major work arrays ([column, row]): each step reads and writes whole columns, contiguous
    wt = np.ascontiguousarray(w.T)
    del w
    codes = np.empty((n, planes, out), dtype=np.int8)
    scales = np.empty((out, planes, n // group), dtype=np.float16)
    errors = np.empty((n, out))  # d = w - q of the columns rounded so far
    block = group * max(1, BLOCK_COLUMNS // group)  # whole groups per block
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        carried = v[:b0, b0:b1].T @ errors[:b0]  # sum over j < k of d_j V[j, k], for the earlier blocks
        for k in range(b0, b1):
            if k % group == 0:
                cols = slice(k, k + group)
                # the group as GPTQ has updated it: the continuous d that zeroes its error columns
                compensated = (wt[cols] + _solve_upper_left(v[cols, cols], carried[k - b0 : k - b0 + group])).T
                scales[:, :, k // group] = fit_plane_scales(compensated, planes, importance[cols], tied=tied)
                levels = Levels(scales[:, :, k // group])
            c, q = levels.nearest((wt[k] + carried[k - b0] / v[k, k])[:, None])
            codes[k] = c[:, :, 0].T
            errors[k] = wt[k] - q[:, 0]
            carried[k - b0 + 1 :] += np.outer(v[k, k + 1 : b1], errors[k])
    del v, errors, carried  # the factor of H (1.2 GB for a 12288-wide input) is not needed by the refit
    codes = np.ascontiguousarray(codes.transpose(2, 1, 0))
    return TritPlanes(codes, refit_scales(wt.T, h, codes, scales, tied), rotation)


def refit_scales(w: np.ndarray, h: np.ndarray, codes: np.ndarray, scales: np.ndarray, tied: bool = False) -> np.ndarray:
    """With the codes fixed, the scales (one per row, plane and group) that minimize the output error
    trace((W - Q) H (W - Q)ᵀ): Q is linear in them, so per row it is a least-squares problem of
    planes x groups unknowns. GPTQ chose each group's scales before its columns' codes; this refits
    them to the codes chosen. float16, as stored. `tied`: one step per group, that of each weight's level
    sum_p 3^(planes-1-p) t_p."""
    out, planes, n = codes.shape
    if tied and planes > 1:
        levels = sum(codes[:, p] * np.int8(3 ** (planes - 1 - p)) for p in range(planes))  # at most 13: int8
        step = refit_scales(w, h, levels[:, None], scales[:, -1:])[:, 0]
        return np.ascontiguousarray(tied_scales(step, planes).transpose(0, 2, 1))
    groups = scales.shape[-1]
    width = n // groups
    h32 = h.astype(np.float32, copy=False)  # products in float32: the refit scales are stored in float16
    h_rows = h32.reshape(groups, width, n)
    refit = scales.copy()
    computed = np.broadcast_to((np.arange(groups)[:, None] <= np.arange(groups))[None, :, None, :],
                               (planes, groups, planes, groups)).reshape(planes * groups, -1)  # where G >= g
    rows_per_chunk = max(1, (8 << 20) // (4 * planes * n))  # one group's [rows, planes, n] product stays in cache
    for r0 in range(0, out, rows_per_chunk):
        c = codes[r0 : r0 + rows_per_chunk].reshape(-1, planes, groups, width).astype(np.float32)
        rows = len(c)
        c_by_group = np.ascontiguousarray(c.transpose(2, 0, 1, 3)).reshape(groups, rows * planes, width)
        # gram[r, p, g, q, G] = (row r's plane-p codes in group g) H_gG (its plane-q codes in group G),
        # computed for G >= g and mirrored: gram is symmetric
        gram = np.zeros((rows, planes, groups, planes, groups), dtype=np.float32)
        for g in range(groups):
            basis_h = (c_by_group[g] @ h_rows[g, :, g * width :]).reshape(rows, planes, groups - g, width)
            gram[:, :, g, :, g:] = np.einsum("rpGj,rqGj->rpqG", basis_h, c[:, :, g:])
        gram = gram.reshape(rows, planes * groups, planes * groups).astype(np.float64)
        gram = np.where(computed, gram, gram.transpose(0, 2, 1))
        # rhs[r, p, g] = (row r's plane-p codes in group g) H w_r
        wh = (w[r0 : r0 + rows].astype(np.float32) @ h32).reshape(rows, 1, groups, width)
        rhs = np.einsum("rpgj,rpgj->rpg", c, np.broadcast_to(wh, c.shape)).reshape(rows, -1).astype(np.float64)
        # a plane-group whose codes are all zero has a zero row and column: the ridge makes its scale 0
        diagonal = np.einsum("rkk->rk", gram)
        diagonal += 1e-9 * diagonal.mean(axis=1, keepdims=True) + 1e-300
        solved = np.linalg.solve(gram, rhs[..., None])[..., 0].reshape(rows, planes, groups)
        refit[r0 : r0 + rows] = np.where(np.isfinite(solved), _as_f16(solved), refit[r0 : r0 + rows])
    return refit


def _upper_cholesky(h: np.ndarray) -> np.ndarray:
    """V upper triangular with V Vᵀ = H (float64), for a symmetric positive definite H: with J the
    reversal of the order, J H J = L Lᵀ gives V = J L J, returned as a reversed view of L."""
    lower = np.empty(h.shape, dtype=np.float64)
    np.copyto(lower, h[::-1, ::-1])
    _cholesky_in_place(lower)
    return lower[::-1, ::-1]


def _cholesky_in_place(a: np.ndarray, block: int = 512) -> None:
    """Overwrite the symmetric positive definite a with its lower Cholesky factor L (a = L Lᵀ), a block
    column at a time. numpy's own factorization holds two more n x n copies: 2.4 GB for the 12288-wide
    Hessians of Gemma 4 E2B's down projections. The work is in the trailing updates, matrix products."""
    n = len(a)
    for j0 in range(0, n, block):
        j1 = min(j0 + block, n)
        diagonal = np.linalg.cholesky(a[j0:j1, j0:j1])
        a[j0:j1, j0:j1] = diagonal
        a[j0:j1, j1:] = 0
        if j1 == n:
            break
        panel = np.linalg.solve(diagonal, a[j1:, j0:j1].T).T  # L21 = A21 L11⁻ᵀ
        a[j1:, j0:j1] = panel
        for k0 in range(j1, n, block):  # A22 -= L21 L21ᵀ, lower part only, a strip of columns at a time
            k1 = min(k0 + block, n)
            a[k0:, k0:k1] -= panel[k0 - j1 :] @ panel[k0 - j1 : k1 - j1].T


def _solve_upper_left(v: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x [m, rows] with Vᵀ x = b, V [m, m] upper triangular: the rows' x V = b, column-major (m is one group)."""
    return np.linalg.solve(v.T, b)


def output_error(w: np.ndarray, q: np.ndarray, hessian: np.ndarray) -> float:
    """trace((W - Q) H (W - Q)^T) = ||(W - Q) X^T||^2: the squared error the quantization adds to the
    layer's outputs over the calibration inputs (w and q in the same basis as the Hessian)."""
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.einsum("ij,jk,ik->", d, hessian, d))
