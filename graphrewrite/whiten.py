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

A weight with fewer outputs than inputs (n < m) can be calibrated from its outputs instead
(``OutputGram``): the damped optimum above is ``M = A V_k V_k^T``, ``V_k`` the leading eigenvectors
of ``(S A)^T (S A) = A^T G_d A = A^T G A + lambda A^T A``, where ``A^T G A = Y^T Y / rows`` is the
Gram of the op's own outputs ``Y = X A`` (computed by the model anyway) and ``lambda`` needs only
``tr(G)``, the mean squared norm of the input rows. The same factors (``B = A V_k s_k^-1/2``,
``C = s_k^1/2 V_k^T`` is exactly ``S^-1 U_k s_k^1/2``) and the same spectrum then cost an n x n
product per row instead of m x m; the output error of any replacement ``M = A P`` (plain SVD's and
the whitened factors are both of that form) is ``tr((I - P)^T A^T G A (I - P))``. What needs the
input Gram itself (input/output's block Grams, error feedback's ``X~``, a replacement outside A's
column space such as distilled factors) does not take this form.

A weight whose outputs the model reads only up to a shift of each row (they reach a softmax, or
an argmax, or outputs declared logits, through bias additions alone: adding the same number to
every entry of a row changes nothing there) carries its Gram wrapped in ``ShiftFree``: every error
is then measured on the outputs with each row's mean removed, ``E -> E C`` with the centring
``C = I - 1 1^T / n``. The best rank-k fit of that objective is ``S^-1 [S A C]_k`` (the above for
the matrix ``A C``; with an OutputGram, ``A V_k V_k^T`` with ``V_k`` from ``C h C + lambda C A^T A
C``): the factors spend no rank on what all of a row's outputs share. Its centred output error
is never above plain SVD's, as before; its uncentred one can be (the shared part is left out).
"""

from __future__ import annotations

import dataclasses

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


@dataclasses.dataclass(frozen=True)
class RowGram:
    """A Gram kept as its rows, ``G = rows^T rows`` (``rows``: N x m, already divided by sqrt of the
    row count), where a site sees no more rows than it has features (the calibration pass keeps
    them instead of forming an m x m product whose rank is at most N)."""

    rows: np.ndarray


@dataclasses.dataclass(frozen=True)
class OutputGram:
    """An input Gram ``G`` known through the weight's outputs: ``h = A^T G A`` (n x n, float64, the
    Gram of ``Y = X A``), ``trace = tr(G)`` and ``m``, G's size; see the module docstring. Valid
    only with the matrix ``A`` it was measured through."""

    h: np.ndarray
    trace: float
    m: int


@dataclasses.dataclass(frozen=True)
class ShiftFree:
    """The Gram ``gram`` of a weight whose outputs matter only up to a shift of each row (see the
    module docstring): the factorisation, spectrum and errors below measure ``E C``."""

    gram: RowGram | OutputGram | np.ndarray
    why: str = ""


Gram = np.ndarray | RowGram | OutputGram | ShiftFree  # m x m, a diagonal (m,), rows, outputs, or shift-free


def inner(gram: Gram) -> Gram:
    """The Gram itself (``ShiftFree`` unwrapped)."""
    return gram.gram if isinstance(gram, ShiftFree) else gram


def like(gram: Gram, other: Gram) -> Gram:
    """``other`` measured as ``gram`` is (wrapped in ShiftFree where ``gram`` is)."""
    return dataclasses.replace(gram, gram=inner(other)) if isinstance(gram, ShiftFree) else other


def _times_c(t: np.ndarray) -> np.ndarray:
    """``T C``: each row of ``T`` less its mean (C the centring of the n outputs)."""
    return t - t.mean(axis=1, keepdims=True)


def _centred(matrix: np.ndarray, gram: Gram) -> tuple[np.ndarray, Gram]:
    """``(A C, the Gram as measured through A C)`` for a ShiftFree Gram, else ``(A, gram)``."""
    a = np.asarray(matrix, np.float64)
    if not isinstance(gram, ShiftFree):
        return a, gram
    g = gram.gram
    if isinstance(g, OutputGram):  # (A C)^T G (A C) = C h C (h and C symmetric)
        g = OutputGram(_times_c(_times_c(np.asarray(g.h, np.float64)).T), g.trace, g.m)
    return _times_c(a), g


def dense(gram: Gram) -> np.ndarray:
    """The m x m float64 matrix of any form of Gram but outputs (which do not determine it)."""
    gram = inner(gram)
    if isinstance(gram, OutputGram):
        raise TypeError("an OutputGram does not determine the input Gram")
    if isinstance(gram, RowGram):
        r = np.asarray(gram.rows, np.float64)
        return r.T @ r
    g = np.asarray(gram, np.float64)
    return np.diag(g) if g.ndim == 1 else g


def _diagonal(gram: Gram) -> bool:
    gram = inner(gram)
    return not isinstance(gram, (RowGram, OutputGram)) and np.ndim(gram) == 1


def _lambda(gram: Gram, damping: float | None) -> float:
    """``damping * tr(G) / m`` (1 where G is zero); damping defaults by the Gram's form."""
    gram = inner(gram)
    if damping is None:
        damping = LOOKUP_DAMPING if _diagonal(gram) else DAMPING
    if isinstance(gram, OutputGram):
        trace, m = float(gram.trace), gram.m
    elif isinstance(gram, RowGram):
        trace, m = float(np.sum(np.square(gram.rows, dtype=np.float64))), gram.rows.shape[1]
    else:
        g = np.asarray(gram, np.float64)
        trace, m = float(np.sum(g) if g.ndim == 1 else np.trace(g)), g.shape[0]
    return damping * trace / m if trace > 0 else 1.0


def damped(gram: Gram, damping: float | None = None) -> np.ndarray:
    """``G + lambda I`` with ``lambda = damping * tr(G) / m``; a diagonal Gram (a vector) stays a
    vector and defaults to LOOKUP_DAMPING."""
    lam = _lambda(gram, damping)
    if _diagonal(gram):
        return np.asarray(gram, np.float64) + lam
    g = dense(gram)
    return g + lam * np.eye(g.shape[0])


@dataclasses.dataclass(frozen=True)
class _Root:
    """A square root ``S`` of ``G_d`` (``S^T S = G_d``) that can apply ``S`` and solve with it.

    Dense: the upper Cholesky factor. Diagonal: ``sqrt(g + lambda)``. Rows ``R = P diag(r) Q^T``
    (thin SVD, N <= m): the symmetric root ``Q diag(sqrt(r^2 + lambda)) Q^T + sqrt(lambda)(I - Q Q^T)``,
    applied in O(N m n) without an m x m matrix (the m^3 Cholesky of a rank-N Gram is avoided).
    """

    kind: str
    factor: np.ndarray
    basis: np.ndarray | None = None
    lam: float = 0.0

    def apply(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "diagonal":
            return self.factor[:, None] * a
        if self.kind == "rows":
            return self.basis @ ((self.factor - np.sqrt(self.lam))[:, None] * (self.basis.T @ a)) + np.sqrt(self.lam) * a
        return self.factor @ a

    def solve(self, b: np.ndarray) -> np.ndarray:
        if self.kind == "diagonal":
            return b / self.factor[:, None]
        if self.kind == "rows":
            inverse = 1.0 / self.factor - 1.0 / np.sqrt(self.lam)
            return self.basis @ (inverse[:, None] * (self.basis.T @ b)) + b / np.sqrt(self.lam)
        return scipy.linalg.solve_triangular(self.factor, b, lower=False, check_finite=False)


def _root(gram: Gram, damping: float | None) -> _Root:
    gram = inner(gram)
    if isinstance(gram, RowGram):
        lam = _lambda(gram, damping)
        _, r, qt = scipy.linalg.svd(np.asarray(gram.rows, np.float64), full_matrices=False, check_finite=False)
        return _Root("rows", np.sqrt(r ** 2 + lam), qt.T, lam)
    g = damped(gram, damping)
    if g.ndim == 1:
        return _Root("diagonal", np.sqrt(g))
    return _Root("dense", scipy.linalg.cholesky(g, lower=False, check_finite=False))


def whitened_svd(matrix: np.ndarray, gram: Gram, damping: float | None = None
                 ) -> tuple[_Root, np.ndarray, np.ndarray, np.ndarray]:
    """``(S, U, s, V^T)`` with ``S A = U diag(s) V^T`` (float64, economy SVD)."""
    root = _root(gram, damping)
    u, s, vt = scipy.linalg.svd(root.apply(np.asarray(matrix, np.float64)), full_matrices=False,
                                lapack_driver="gesdd", check_finite=False)
    return root, u, s, vt


def _outputs_eigh(matrix: np.ndarray, gram: OutputGram, damping: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``(s, V)``: the singular values (descending) and right singular vectors of ``S A``, from the
    eigendecomposition of ``A^T G_d A = h + lambda A^T A``."""
    a = np.asarray(matrix, np.float64)
    if gram.h.shape != (a.shape[1],) * 2 or gram.m != a.shape[0]:
        raise ValueError(f"an OutputGram of {gram.m} x {gram.h.shape[0]} does not fit a {a.shape} matrix")
    w, v = scipy.linalg.eigh(np.asarray(gram.h, np.float64) + _lambda(gram, damping) * (a.T @ a), check_finite=False)
    return np.sqrt(np.maximum(w[::-1], 0.0)), v[:, ::-1]


def whitened_spectrum(matrix: np.ndarray, gram: Gram, damping: float | None = None) -> np.ndarray:
    """Singular values of ``S A`` (``S A C`` where shift-free): their tails are the damped
    output-space errors of each rank."""
    matrix, gram = _centred(matrix, gram)
    if isinstance(gram, OutputGram):
        s, _ = _outputs_eigh(matrix, gram, damping)
        return s[:min(np.shape(matrix))]
    return scipy.linalg.svdvals(_root(gram, damping).apply(np.asarray(matrix, np.float64)), check_finite=False)


def low_rank(matrix: np.ndarray, gram: Gram, k: int, damping: float | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(B, C)``, m x k and k x n, minimising ``tr((A - BC)^T G_d (A - BC))``.

    ``B = S^-1 U_k sqrt(s_k)`` and ``C = sqrt(s_k) V_k^T``: the singular values are split evenly in
    the whitened space, as plain low rank splits them in weight space. With an OutputGram, the same
    factors as ``B = A V_k s_k^-1/2`` (directions of zero whitened energy get zero columns). Each
    pair's sign is fixed (``_signed``), so both forms give the same factors, not only the same product.
    A ShiftFree Gram: the same for ``A C`` (``C V_k = V_k``: the factors reproduce ``S A C``'s best
    rank k, nothing of what a row's outputs share).
    """
    matrix, gram = _centred(matrix, gram)
    if isinstance(gram, OutputGram):
        s, v = _outputs_eigh(matrix, gram, damping)
        s, v = s[:k], v[:, :k]
        inverse = np.divide(1.0, np.sqrt(s), out=np.zeros_like(s), where=s > s[:1] * 1e-12) if k else s
        b = np.asarray(matrix, np.float64) @ (v * inverse[None, :])
        return _signed(b, np.sqrt(s)[:, None] * v.T)
    root, u, s, vt = whitened_svd(matrix, gram, damping)
    half = np.sqrt(s[:k])
    return _signed(root.solve(u[:, :k] * half[None, :]), half[:, None] * vt[:k])


def _signed(b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(B, C)`` in float32 with each pair (column of B, row of C) flipped so that the row of C's
    entry of largest magnitude is positive: a singular vector's sign is the solver's choice."""
    rows = np.arange(c.shape[0])
    flip = np.where(c[rows, np.argmax(np.abs(c), axis=1)] < 0, -1.0, 1.0) if c.size else np.ones(c.shape[0])
    return (b * flip[None, :]).astype(np.float32), (c * flip[:, None]).astype(np.float32)


def output_error(matrix: np.ndarray, approx: np.ndarray, gram: Gram) -> float:
    """``||X (A - M)||_F / ||X A||_F`` from the (undamped) Gram: the relative output error (with an
    OutputGram, for ``M = A P`` only: a ValueError otherwise); with a ShiftFree Gram,
    ``||X (A - M) C||_F / ||X A C||_F``."""
    a = np.asarray(matrix, np.float64)
    free = isinstance(gram, ShiftFree)
    gram = inner(gram)
    if isinstance(gram, OutputGram):  # E = A (I - P) for the P with M = A P
        p = _coefficients(a, np.asarray(approx, np.float64))
        q = np.eye(a.shape[1]) - p
        h = np.asarray(gram.h, np.float64)
        if free:  # E C = A (I - P) C; the energy, tr(C h C)
            q = _times_c(q)
        total = float(np.trace(h) - np.sum(h) / len(h)) if free else float(np.trace(h))
        error = float(np.sum(q * (h @ q)))
        return float(np.sqrt(max(error, 0.0) / total)) if total > 0 else 0.0
    e = a - np.asarray(approx, np.float64)
    if free:
        a, e = _times_c(a), _times_c(e)
    total, error = _energy(a, gram), _energy(e, gram)
    return float(np.sqrt(max(error, 0.0) / total)) if total > 0 else 0.0


def _coefficients(a: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """``P`` with ``A P = M`` (``approx``); a ValueError where no P fits (M outside A's column space).
    By the normal equations (a Cholesky of the n x n ``A^T A``: m n^2, where a least-squares solve
    by SVD costs several times that, which on ResNet50's 53 weights was 9 of compress's 120 s), or,
    where A is rank-deficient or they do not reproduce M, by a pivoted-QR least-squares solve."""
    scale = max(float(np.linalg.norm(approx)), float(np.linalg.norm(a)) * 1e-6, 1e-30)
    try:
        p = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a.T @ a, check_finite=False), a.T @ approx,
                                   check_finite=False)
        if np.all(np.isfinite(p)) and float(np.linalg.norm(a @ p - approx)) <= 1e-6 * scale:
            return p
    except np.linalg.LinAlgError:
        pass
    p, *_ = scipy.linalg.lstsq(a, approx, check_finite=False, lapack_driver="gelsy")
    if float(np.linalg.norm(a @ p - approx)) > 1e-3 * scale:
        raise ValueError("the replacement is not A P: its output error needs the input Gram")
    return p


def _energy(t: np.ndarray, gram: Gram) -> float:
    """``tr(T^T G T)``."""
    if isinstance(gram, RowGram):
        return float(np.sum(np.square(np.asarray(gram.rows, np.float64) @ t)))
    g = np.asarray(gram, np.float64)
    return float(np.sum(t * (g[:, None] * t if g.ndim == 1 else g @ t)))


def feedback_target(matrix: np.ndarray, gram_tilde: np.ndarray, cross: np.ndarray,
                    damping: float | None = None) -> np.ndarray:
    """The matrix ``A'`` whose whitened fit under ``gram_tilde`` is the error-feedback fit.

    When the sites before this one are compressed, its input rows are ``X~`` instead of ``X``, and
    what the compressed model should reproduce is still the original output ``X A``. The damped
    objective ``||X A - X~ M||^2 / rows + lambda ||A - M||^2`` equals, up to a constant,
    ``tr((A' - M)^T G~_d (A' - M))`` with ``G~_d = G~ + lambda I`` (``G~ = X~^T X~ / rows``,
    ``lambda`` from ``G~`` as in ``damped``) and

        A' = G~_d^-1 (K + lambda I) A,     K = X~^T X / rows (``cross``),

    so ``low_rank(A', G~, k)`` is its exact rank-k optimum (expand both sides: the terms in ``M``
    agree). With ``X~ = X``, ``A' = A``. Both matrices dense m x m.
    """
    a = np.asarray(matrix, np.float64)
    g = damped(gram_tilde, damping)
    lam = _lambda(gram_tilde, damping)
    rhs = np.asarray(cross, np.float64) @ a + lam * a
    return scipy.linalg.solve(g, rhs, assume_a="pos", check_finite=False).astype(np.float32)


def chained_error(matrix: np.ndarray, approx: np.ndarray, gram: np.ndarray, gram_tilde: np.ndarray,
                  cross: np.ndarray) -> float:
    """``||X A - X~ M||_F / ||X A||_F`` from ``X^T X``, ``X~^T X~`` and ``X~^T X`` (over the same rows):
    the relative error of the site's outputs in the compressed model against the original's
    (``(X A - X~ M) C`` and ``X A C`` where ``gram`` is ShiftFree)."""
    a, m = np.asarray(matrix, np.float64), np.asarray(approx, np.float64)
    if isinstance(gram, ShiftFree):
        a, m = _times_c(a), _times_c(m)
    gram, gram_tilde = inner(gram), inner(gram_tilde)
    total = _energy(a, gram)
    error = total - 2.0 * float(np.sum(m * (np.asarray(cross, np.float64) @ a))) + _energy(m, gram_tilde)
    return float(np.sqrt(max(error, 0.0) / total)) if total > 0 else 0.0
