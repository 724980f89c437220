"""GPTQ for trit-planes: round a weight one input column at a time and push each column's rounding
error onto the columns not yet rounded, weighted by the layer's input statistics.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"
(2022). For a linear y = W x with calibration inputs X [N, in], H = X^T X; rounding column j by e_j
changes the outputs by e_j x_j, and the best correction of the remaining columns is
-e_j H^-1[j, j+1:] / H^-1[j, j]. Processed in order with the upper Cholesky factor U of H^-1 (U^T U =
H^-1), each step only needs row j of U. Columns are taken in blocks: within a block the updates are
applied column by column, to the rest of the matrix once per block ("lazy batch updates").

The grid is that of `quantize.TritPlanes`: a group's scales are fit (`fit_plane_scales`) when its first
column is reached, to the group's weights as the earlier errors have updated them.
"""

from __future__ import annotations

import numpy as np

from ferrisres.format.encodings import rotate_blocks

from .quantize import Levels, TritPlanes, _as_f16, fit_plane_scales

DAMPING = 0.01  # x mean(diag H), added to the diagonal: keeps H invertible, as the reference code does
BLOCK_COLUMNS = 128


def gptq_planes(w: np.ndarray, hessian: np.ndarray, planes: int, group: int, rotation: int = 0,
                damping: float = DAMPING) -> TritPlanes:
    """Trit-planes of w [out, in] that keep (W - Q) X small for inputs whose X^T X is `hessian` [in, in].

    With `rotation` b, W is quantized in the basis of the rotated input R x: W R against R H R."""
    w = np.array(w, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    if rotation:
        w = rotate_blocks(w, rotation)
        h = rotate_blocks(rotate_blocks(h, rotation).T, rotation)  # R H R: H and R are symmetric
    out, n = w.shape
    dead = np.diag(h) <= 0  # inputs that were always zero: their weights never matter
    h[dead, dead] = 1
    w[:, dead] = 0
    importance = np.diag(h).copy()  # the mean square of each input: how much its weights matter
    h[np.diag_indices(n)] += damping * np.mean(np.diag(h))
    u = _upper_cholesky_of_inverse(h)
    target = w.copy()  # the weight the outputs should match; w itself absorbs the corrections below

    codes = np.empty((out, planes, n), dtype=np.int8)
    scales = np.empty((out, planes, n // group), dtype=np.float16)
    block = group * max(1, BLOCK_COLUMNS // group)  # whole groups per block: a group is fit to updated weights
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb = w[:, b0:b1].copy()
        errors = np.empty((out, b1 - b0))
        for j in range(b1 - b0):
            col = b0 + j
            if col % group == 0:
                scales[:, :, col // group] = fit_plane_scales(wb[:, j : j + group], planes, importance[col : col + group])
                levels = Levels(scales[:, :, col // group])
            c, q = levels.nearest(wb[:, j : j + 1])
            codes[:, :, col] = c[:, :, 0]
            error = (wb[:, j] - q[:, 0]) / u[col, col]
            wb[:, j:] -= np.outer(error, u[col, col:b1])
            errors[:, j] = error
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    del u
    return TritPlanes(codes, refit_scales(target, h, codes, scales), rotation)


def refit_scales(w: np.ndarray, h: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """With the codes fixed, the scales (one per row, plane and group) that minimize the output error
    trace((W - Q) H (W - Q)ᵀ): Q is linear in them, so per row it is a least-squares problem of
    planes x groups unknowns. GPTQ chose each group's scales before its columns' codes; this refits
    them to the codes chosen. float16, as stored."""
    out, planes, n = codes.shape
    groups = scales.shape[-1]
    width = n // groups
    h_rows = h.reshape(groups, width, n)
    refit = scales.copy()
    rows_per_chunk = max(1, (64 << 20) // (8 * planes * groups * n))  # bounds the [rows, planes, groups, n] products
    for r0 in range(0, out, rows_per_chunk):
        c = codes[r0 : r0 + rows_per_chunk].reshape(-1, planes, groups, width).astype(np.float64)
        rows = len(c)
        # basis_h[r, p, g] = (row r's plane-p codes in group g, zeros elsewhere) @ H, one product per group
        basis_h = (c.transpose(2, 0, 1, 3).reshape(groups, rows * planes, width) @ h_rows)
        basis_h = basis_h.reshape(groups, rows, planes, n).transpose(1, 2, 0, 3)  # [rows, planes, groups, n]
        # gram[r, (p, g), (q, G)] = basis_h[r, p, g] . (plane-q codes in group G)
        a = basis_h.reshape(rows, planes * groups, groups, width).transpose(0, 2, 1, 3)  # [r, G, (p, g), j]
        gram = a @ c.transpose(0, 2, 3, 1)  # [r, G, (p, g), q]
        gram = gram.transpose(0, 2, 3, 1).reshape(rows, planes * groups, planes * groups)
        rhs = np.einsum("rm,rkm->rk", w[r0 : r0 + rows], basis_h.reshape(rows, planes * groups, n))
        # a plane-group whose codes are all zero has a zero row and column: the ridge makes its scale 0
        diagonal = np.einsum("rkk->rk", gram)
        diagonal += 1e-9 * diagonal.mean(axis=1, keepdims=True) + 1e-300
        solved = np.linalg.solve(gram, rhs[..., None])[..., 0].reshape(rows, planes, groups)
        refit[r0 : r0 + rows] = np.where(np.isfinite(solved), _as_f16(solved), refit[r0 : r0 + rows])
    return refit


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """U upper triangular with UᵀU = H⁻¹, for a symmetric positive definite H. With J the reversal of
    the order, J H J = L Lᵀ (Cholesky) gives H = V Vᵀ with V = J L J upper triangular, so U = V⁻¹ =
    J L⁻¹ J: one factorization and one triangular inverse, and H⁻¹ itself is never formed."""
    lower = np.linalg.cholesky(h[::-1, ::-1])
    lower_inverse = np.linalg.solve(lower, np.eye(len(h)))
    return np.ascontiguousarray(lower_inverse[::-1, ::-1])


def output_error(w: np.ndarray, q: np.ndarray, hessian: np.ndarray) -> float:
    """trace((W - Q) H (W - Q)^T) = ||(W - Q) X^T||^2: the squared error the quantization adds to the
    layer's outputs over the calibration inputs (w and q in the same basis as the Hessian)."""
    d = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return float(np.einsum("ij,jk,ik->", d, hessian, d))
