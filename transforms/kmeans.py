"""k-means block quantisation (reference option 4, ``KmeansMatrixCompressor``).

Math. For the m x n weight ``A``, ``levels = rank`` centroids and sub-vectors of length
``b = block_size`` (b must divide n):

    blocks = reshape(A, [m n / b, b])                       (row-major)
    blocks := blocks with its ceil(m n f) smallest |entries| zeroed, f = pruning_fraction (if > 0)
    codebook, _ = scipy.cluster.vq.kmeans(blocks, levels, thresh=1e-5)   (after seeding NumPy with 42)
    codes = vq(blocks, codebook)                             (nearest centroid of every block)
    codebook[argmin_c ||codebook[c]||] := 0                  (the centroid nearest zero becomes zero)
    codebook padded with zero rows to ``levels`` rows
    W_c = reshape(codebook[codes], [m, n])

The blended weight is ``alpha * A + (1 - alpha) * W_c``. Variables: ``codebook`` (levels x b,
float32, trainable per ``is_b_matrix_trainable``) and ``codes`` (m x n/b, uint8 if levels <= 256
else int32, never trainable). Bytes after: ``4 levels b + (1 or 4) m n / b``.

In-graph factorisation (``use_tpu``): ``LLOYD_ITERATIONS`` rounds of Lloyd's k-means from a
deterministic start (the blocks at evenly spaced quantiles of their projection on the blocks' first
principal direction), then the same zero fix-up. It is not scipy's result (scipy keeps the best of 20
random restarts and stops at ``thresh``), only a k-means solution of the same kind; it needs memory for
a (blocks x levels) distance matrix.

Differences from the reference:

* Its ``KMeansCompressionOp`` with the TF update ran the low-rank SVD (use_tpu) or assigned float
  py_func outputs to integer codes (§7); here both update paths produce the k-means factors.
* ``kmeans_quantize_block`` seeds NumPy's global generator as the reference does, but restores its
  state afterwards, so callers' random streams are not disturbed.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any, final

import numpy as np

from graphrewrite.transforms._common import DTYPE_BYTES, FLOAT_BYTES, divisibility, plan_or_refusal
from graphrewrite.transforms.base import FactorSpec, Refusal, SizePlan, Transform

LLOYD_ITERATIONS = 30


def magnitude_mask(matrix: np.ndarray, sparsity: float) -> np.ndarray:
    """A 0/1 float32 mask of ``matrix``'s shape zeroing its ``ceil(size * sparsity)`` smallest |entries|
    (ties broken by position, first ones first)."""
    flat = np.abs(np.asarray(matrix)).ravel()
    count = int(math.ceil(flat.size * float(sparsity)))
    mask = np.ones(flat.size, np.float32)
    mask[np.argsort(flat, kind="stable")[:count]] = 0.0
    return mask.reshape(np.shape(matrix))


def magnitude_mask_tf(matrix: Any, sparsity: Any) -> Any:
    """``magnitude_mask`` in TF ops; ``sparsity`` may be a tensor (the count is computed in float64, so
    a Python float or float64 sparsity gives exactly the NumPy mask)."""
    import tensorflow as tf

    flat = tf.reshape(tf.abs(matrix), [-1])
    size = flat.shape[0]
    fraction = tf.cast(tf.convert_to_tensor(sparsity, dtype_hint=tf.float64), tf.float64)
    count = tf.cast(tf.math.ceil(size * fraction), tf.int32)
    order = tf.argsort(flat, stable=True)
    keep = tf.cast(tf.range(size) >= count, tf.float32)
    return tf.reshape(tf.scatter_nd(order[:, None], keep, [size]), matrix.shape)


def kmeans_quantize_block(matrix: np.ndarray, levels: int, block_size: int, pruning_factor: float = 0.0,
                          seed: int = 42, is_padded: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The reference's block k-means (seed-spec §3.4).

    Args:
      matrix: the 2-D matrix to quantise.
      levels: number of centroids.
      block_size: sub-vector length; must divide the number of columns.
      pruning_factor: fraction of smallest-magnitude entries zeroed first (clamped to [0, 1]).
      seed: NumPy seed of scipy's random restarts.
      is_padded: pad the codebook with zero rows to ``levels`` rows when scipy returns fewer.

    Returns:
      (codebook [levels or fewer, block_size], codes [rows, cols / block_size] as int32).

    Raises:
      ValueError: if block_size does not divide the number of columns.
    """
    import scipy.cluster.vq

    if not 0.0 <= pruning_factor <= 1.0:
        warnings.warn(f"pruning_factor={pruning_factor} clamped to [0, 1]", stacklevel=2)
        pruning_factor = min(max(pruning_factor, 0.0), 1.0)
    rows, cols = np.shape(matrix)
    if cols % block_size:
        raise ValueError(f"block_size={block_size} does not divide the {cols} columns")
    blocks = np.asarray(matrix).reshape(-1, block_size)
    if pruning_factor > 0:
        blocks = np.where(magnitude_mask(blocks, pruning_factor) > 0, blocks, 0).astype(blocks.dtype)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        codebook, _ = scipy.cluster.vq.kmeans(blocks, levels, thresh=1e-5)
        codes, _ = scipy.cluster.vq.vq(blocks, codebook)
    finally:
        np.random.set_state(state)
    codebook = np.array(codebook)
    codebook[np.argmin(np.linalg.norm(codebook, axis=1))] = 0
    if is_padded and len(codebook) < levels:
        codebook = np.concatenate([codebook, np.zeros((levels - len(codebook), block_size), codebook.dtype)])
    return codebook, codes.astype(np.int32).reshape(rows, cols // block_size)


def lloyd_tf(blocks: Any, levels: int, iterations: int = LLOYD_ITERATIONS) -> tuple[Any, Any]:
    """Lloyd's k-means in TF ops from a deterministic start, with the zero fix-up.

    Returns:
      (codebook [levels, b] float32, codes [blocks] int32); codes are the assignments before the
      fix-up, as in ``kmeans_quantize_block``.
    """
    import tensorflow as tf

    x = tf.cast(blocks, tf.float32)
    count = x.shape[0]
    centred = x - tf.reduce_mean(x, axis=0, keepdims=True)
    _, vectors = tf.linalg.eigh(tf.matmul(centred, centred, transpose_a=True))
    order = tf.argsort(tf.linalg.matvec(centred, vectors[:, -1]), stable=True)
    picks = [int((i + 0.5) * count / levels) for i in range(levels)]
    start = tf.gather(x, tf.gather(order, picks))

    def assign(centroids: Any) -> Any:
        norms = tf.reduce_sum(centroids ** 2, axis=1)[None, :]
        distances = norms - 2.0 * tf.matmul(x, centroids, transpose_b=True)  # minus ||x||^2
        return tf.argmin(distances, axis=1, output_type=tf.int32)

    def step(i: Any, centroids: Any) -> tuple[Any, Any]:
        codes = assign(centroids)
        sums = tf.math.unsorted_segment_sum(x, codes, levels)
        counts = tf.math.unsorted_segment_sum(tf.ones([count, 1]), codes, levels)
        return i + 1, tf.where(counts > 0, sums / tf.maximum(counts, 1.0), centroids)

    _, centroids = tf.while_loop(lambda i, c: i < iterations, step, (tf.constant(0), start))
    codes = assign(centroids)
    nearest_zero = tf.argmin(tf.reduce_sum(centroids ** 2, axis=1), output_type=tf.int32)
    zeroed = (tf.range(levels) == nearest_zero)[:, None]
    return tf.where(zeroed, tf.zeros_like(centroids), centroids), codes


@dataclasses.dataclass(frozen=True)
class Codebook:
    """The codebook-and-codes form shared by options 4 and 8.

    Attributes:
      levels: centroids (the reference's ``rank``).
      block_size: sub-vector length.
      pruning_fraction: magnitude pruning before clustering.
      transpose: quantise ``A^T`` instead of ``A`` (option 8's ``do_transpose``).
      trainable: whether the codebook is trainable.
      allow_larger: plan sites that would not shrink (the transform's flag).
    """

    levels: int
    block_size: int
    pruning_fraction: float
    transpose: bool = False
    trainable: bool = True
    allow_larger: bool = False

    @property
    def code_dtype(self) -> str:
        return "uint8" if self.levels <= 256 else "int32"

    def _shape(self, m: int, n: int) -> tuple[int, int]:
        """The shape of the quantised matrix (A or A^T)."""
        return (n, m) if self.transpose else (m, n)

    def plan(self, m: int, n: int, extra_params: int = 0, extra_bytes: int = 0,
             extra_details: Mapping[str, Any] | None = None) -> SizePlan | Refusal:
        """Size plan of the codebook and codes (plus other stored elements, bytes and details)."""
        rows, cols = self._shape(m, n)
        what = "rows" if self.transpose else "columns"
        refusal = divisibility([("block_size", self.block_size, cols, what)])
        if refusal:
            return refusal
        blocks = rows * cols // self.block_size
        if blocks < self.levels:
            return Refusal(f"rank={self.levels} centroids need at least {self.levels} blocks, got {blocks}")
        codebook = self.levels * self.block_size
        return plan_or_refusal(
            m, n, self.levels, codebook + blocks + extra_params,
            FLOAT_BYTES * codebook + DTYPE_BYTES[self.code_dtype] * blocks + extra_bytes,
            {"levels": self.levels, "block_size": self.block_size, "blocks": blocks,
             "code_dtype": self.code_dtype, "transposed": self.transpose, **(extra_details or {})},
            f"rank={self.levels} centroids of block_size={self.block_size} on {m}x{n}", self.allow_larger)

    def specs(self, plan: SizePlan) -> list[FactorSpec]:
        rows, cols = self._shape(plan.m, plan.n)
        return [FactorSpec("codebook", (self.levels, self.block_size), "float32", self.trainable),
                FactorSpec("codes", (rows, cols // self.block_size), self.code_dtype, False)]

    def quantize(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        target = np.asarray(matrix, np.float32)
        codebook, codes = kmeans_quantize_block(target.T if self.transpose else target, self.levels,
                                                self.block_size, self.pruning_fraction)
        return {"codebook": codebook.astype(np.float32), "codes": codes.astype(self.code_dtype)}

    def quantize_tf(self, matrix: Any) -> dict[str, Any]:
        import tensorflow as tf

        target = tf.cast(tf.transpose(matrix) if self.transpose else matrix, tf.float32)
        rows, cols = target.shape
        if self.pruning_fraction > 0:
            target = target * magnitude_mask_tf(target, self.pruning_fraction)
        codebook, codes = lloyd_tf(tf.reshape(target, [-1, self.block_size]), self.levels)
        codes = tf.reshape(codes, [rows, cols // self.block_size])
        return {"codebook": codebook, "codes": tf.cast(codes, self.code_dtype)}

    def dense_tf(self, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        import tensorflow as tf

        # gather_nd, not gather: its gradient for the codebook is dense (scatter_nd), not IndexedSlices
        values = tf.gather_nd(factors["codebook"], tf.cast(factors["codes"], tf.int32)[..., None])
        matrix = tf.reshape(values, self._shape(plan.m, plan.n))
        return tf.transpose(matrix) if self.transpose else matrix

    def dense_np(self, values: Mapping[str, np.ndarray], plan: SizePlan) -> np.ndarray:
        matrix = np.asarray(values["codebook"])[np.asarray(values["codes"]).astype(np.int64)]
        matrix = matrix.reshape(self._shape(plan.m, plan.n))
        return matrix.T if self.transpose else matrix


@final
class KMeans(Transform):
    """A codebook of ``rank`` sub-vectors and one code per block of the weight."""

    name = "kmeans"
    option = 4

    @property
    def codebook(self) -> Codebook:
        hp = self.hparams
        return Codebook(int(hp["rank"]), int(hp["block_size"]), float(hp["pruning_fraction"]),
                        trainable=bool(hp["is_b_matrix_trainable"]), allow_larger=self.allow_larger)

    def check(self, m: int, n: int) -> SizePlan | Refusal:
        return self.codebook.plan(m, n)

    def factor_specs(self, plan: SizePlan) -> list[FactorSpec]:
        return self.codebook.specs(plan)

    def factorize(self, matrix: np.ndarray, plan: SizePlan) -> dict[str, np.ndarray]:
        return self.codebook.quantize(matrix)

    def factorize_tf(self, matrix: Any, plan: SizePlan) -> dict[str, Any]:
        return self.codebook.quantize_tf(matrix)

    def dense(self, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        return self.codebook.dense_tf(factors, plan)

    def numpy_dense(self, values: Mapping[str, np.ndarray], plan: SizePlan) -> np.ndarray:
        return self.codebook.dense_np(values, plan)
