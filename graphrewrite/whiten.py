"""Output-space error from calibration statistics: damped Gram whitening (numpy/scipy only).

A site computes ``y = x @ W`` for the rows ``x`` of its input activations (for a Conv2D, the im2col
patches). With ``X`` the calibration rows and ``G = X^T X / rows`` their Gram, the output-space
error of a replacement ``M`` is

    ||X (A - M)||_F^2 / rows = tr((A - M)^T G (A - M)).

``G`` is rank-deficient whenever some input never varies (the digits' blank border pixels, dead
ReLUs, fewer rows than features), so the factorisations use the damped Gram

    G_d = G + lambda I,    lambda = DAMPING * tr(G) / m,

whose objective ``||X (A - M)||^2 / rows + lambda ||A - M||^2`` is the output error plus a small
share of the plain weight error: where the data say nothing, the weight-space answer (plain SVD)
decides, instead of an arbitrary one. ``lambda`` is relative to the mean input energy, so it does
not depend on the scale of the activations. The upper Cholesky factor ``S`` (``G_d = S^T S``)
whitens: ``tr(E^T G_d E) = ||S E||_F^2``, so the best rank-k ``M`` is ``S^-1`` times the truncated
SVD of ``S A`` (the truncation-aware whitening of SVD-LLM, Wang et al. 2024: exact for the damped
objective, unlike a diagonal activation scaling such as ASVD's). Because the damped objective's
optimum is at least as good as plain SVD's on it, and plain SVD's weight error is the smallest, its
undamped output error on the calibration rows is never above plain SVD's.

An embedding lookup's rows are one-hot, so its Gram is diagonal (each table row's share of the
lookups) and is passed as that vector: ``S`` is then ``diag(sqrt(g + lambda))``, and the whitened
factorisation is an SVD of the table with each row weighted by its damped lookup frequency. There
the damping is LOOKUP_DAMPING: a few hundred examples see a small part of a large vocabulary,
and the rows they miss keep that share of the mean weight (see LOOKUP_DAMPING).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

# 1% of the mean input energy. Some damping is needed: the digits CNN head's Gram (1024 features,
# 512 examples, so rank <= 512) fails Cholesky at 1e-8. And it costs nothing measurable: on the
# digits models, from 1e-5 to 1e-1 the relative output errors at k = 3 and 10 move by less than
# 0.001, on the calibration images and on held-out ones alike.
DAMPING = 1e-2


# A lookup table's rows the calibration data never hit keep this share of the mean row weight
# (the Laplace-style prior of a frequency estimated from a small sample): with 1.0 the weights are
# the lookup counts plus as many lookups again spread evenly over the vocabulary, so the factors
# serve the rows seen in proportion to their use without giving up on the others. Measured on
# random 50 x 12 tables, k = 4, 240 skewed lookups hitting 30 rows (3 draws): damping 0.01 / 0.1 /
# 1.0 gives the unseen rows 1.17 / 1.16 / 1.10 times plain SVD's error on them, and the looked-up
# rows 0.79 / 0.79 / 0.81 times plain SVD's: a small trade, taken for the rows a sample misses.
LOOKUP_DAMPING = 1.0


def damped(gram: np.ndarray, damping: float | None = None) -> np.ndarray:
    """``G + lambda I`` with ``lambda = damping * tr(G) / m`` (the identity where G is zero); a
    diagonal Gram (a vector) stays a vector and defaults to LOOKUP_DAMPING."""
    g = np.asarray(gram, np.float64)
    diagonal = g.ndim == 1
    if damping is None:
        damping = LOOKUP_DAMPING if diagonal else DAMPING
    m = g.shape[0]
    scale = float(np.sum(g) if diagonal else np.trace(g)) / m
    lam = damping * scale if scale > 0 else 1.0
    return g + lam if diagonal else g + lam * np.eye(m)


def whitener(gram: np.ndarray, damping: float | None = None) -> np.ndarray:
    """The upper-triangular ``S`` with ``S^T S = G + lambda I`` (for a diagonal Gram, its diagonal)."""
    g = damped(gram, damping)
    return np.sqrt(g) if g.ndim == 1 else scipy.linalg.cholesky(g, lower=False, check_finite=False)


def _apply(s_factor: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``S A`` (float64)."""
    a = np.asarray(matrix, np.float64)
    return s_factor[:, None] * a if s_factor.ndim == 1 else s_factor @ a


def whitened_svd(matrix: np.ndarray, gram: np.ndarray, damping: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(S, U, s, V^T)`` with ``S A = U diag(s) V^T`` (float64, economy SVD)."""
    s_factor = whitener(gram, damping)
    u, s, vt = scipy.linalg.svd(_apply(s_factor, matrix), full_matrices=False, lapack_driver="gesdd",
                                check_finite=False)
    return s_factor, u, s, vt


def whitened_spectrum(matrix: np.ndarray, gram: np.ndarray, damping: float | None = None) -> np.ndarray:
    """Singular values of ``S A``: their tails are the damped output-space errors of each rank."""
    return scipy.linalg.svdvals(_apply(whitener(gram, damping), matrix), check_finite=False)


def low_rank(matrix: np.ndarray, gram: np.ndarray, k: int, damping: float | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(B, C)``, m x k and k x n, minimising ``tr((A - BC)^T G_d (A - BC))``.

    ``B = S^-1 U_k sqrt(s_k)`` and ``C = sqrt(s_k) V_k^T``: the singular values are split evenly in
    the whitened space, as plain low rank splits them in weight space.
    """
    s_factor, u, s, vt = whitened_svd(matrix, gram, damping)
    root = np.sqrt(s[:k])
    scaled = u[:, :k] * root[None, :]
    b = scaled / s_factor[:, None] if s_factor.ndim == 1 else scipy.linalg.solve_triangular(
        s_factor, scaled, lower=False, check_finite=False)
    return b.astype(np.float32), (root[:, None] * vt[:k]).astype(np.float32)


def output_error(matrix: np.ndarray, approx: np.ndarray, gram: np.ndarray) -> float:
    """``||X (A - M)||_F / ||X A||_F`` from the (undamped) Gram: the relative output error."""
    a = np.asarray(matrix, np.float64)
    e = a - np.asarray(approx, np.float64)
    g = np.asarray(gram, np.float64)
    weigh = (lambda t: g[:, None] * t) if g.ndim == 1 else (lambda t: g @ t)  # noqa: E731 - one line
    total = float(np.sum(a * weigh(a)))
    if total <= 0:
        return 0.0
    return float(np.sqrt(max(float(np.sum(e * weigh(e))), 0.0) / total))
