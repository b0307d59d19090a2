"""k-means with magnitude pruning (reference option 8, ``KMeansPruningCompressionOp``).

Math. A 0/1 mask ``M`` (m x n) zeroes the smallest-magnitude entries of the weight ``A``; the pruned
weight is quantised as in option 4 (``transforms.kmeans``: codebook and codes of ``A * M``, or of
``(A * M)^T`` with ``do_transpose``), and the mask applies to both paths:

    W = alpha * (A * M) + (1 - alpha) * (reshape(codebook[codes], [m, n]) * M)

``dense`` returns the second term's ``W_c * M``; ``mask`` returns ``M`` for the caller's ``A * M``.
Outside the compression range the reference serves ``A * M`` alone.

Pruning schedule (tf.model_pruning's polynomial decay), for the mask updates during training:

    p = clip((step - sparsity_function_begin_step)
             / (sparsity_function_end_step - sparsity_function_begin_step), 0, 1)
    s(step) = target_sparsity + (initial_sparsity - target_sparsity) * (1 - p) ** sparsity_function_exponent
    M = 1 except at the ceil(m n s) smallest |A| entries (ties: first positions first)

Initial mask at rewrite time and at the first k-means update: the magnitude mask at
``pruning_fraction`` when it is > 0, else at ``s(begin_pruning_step)``. Variables: ``codebook``,
``codes`` (as option 4) and ``mask`` (m x n uint8 0/1, never trainable; graphrewrite's update moves it).

Differences from the reference:

* Its codes are int32 whatever ``rank`` is; here they are uint8 when rank <= 256, as in option 4
  (the same values in a quarter of the bytes), and the mask is stored as uint8, not float32.
* The mask follows the magnitude rule above (an exact count of zeros) rather than model_pruning's
  histogram threshold; block pruning (block_height/width, pooling) is not applied.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, final

import numpy as np

from graphrewrite.transforms.base import FactorSpec, Refusal, SizePlan, Transform
from graphrewrite.transforms.kmeans import Codebook, magnitude_mask, magnitude_mask_tf

__all__ = ["KMeansPruning", "magnitude_mask", "magnitude_mask_tf", "sparsity_at", "sparsity_at_tf"]


def _sparsity(step: Any, hparams: Mapping[str, Any], clip: Callable[[Any], Any]) -> Any:
    begin = int(hparams["sparsity_function_begin_step"])
    span = max(int(hparams["sparsity_function_end_step"]) - begin, 1)  # end <= begin: a one-step ramp
    initial, target = float(hparams["initial_sparsity"]), float(hparams["target_sparsity"])
    progress = clip((step - begin) / span)
    return target + (initial - target) * (1.0 - progress) ** float(hparams["sparsity_function_exponent"])


def sparsity_at(step: int, hparams: Mapping[str, Any]) -> float:
    """The scheduled sparsity at a global step (Python numbers)."""
    return float(_sparsity(float(step), hparams, lambda p: min(max(p, 0.0), 1.0)))


def sparsity_at_tf(step: Any, hparams: Mapping[str, Any]) -> Any:
    """``sparsity_at`` for a step tensor (float64 scalar result)."""
    import tensorflow as tf

    def clip(p: Any) -> Any:
        return tf.clip_by_value(tf.cast(p, tf.float64), 0.0, 1.0)

    return _sparsity(tf.cast(step, tf.float64), hparams, clip)


@final
class KMeansPruning(Transform):
    """Option 4's codebook and codes of the magnitude-pruned weight, plus the pruning mask."""

    name = "kmeans_pruning"
    option = 8

    @property
    def codebook(self) -> Codebook:
        hp = self.hparams
        return Codebook(int(hp["rank"]), int(hp["block_size"]), float(hp["pruning_fraction"]),
                        transpose=bool(hp["do_transpose"]), trainable=bool(hp["is_b_matrix_trainable"]),
                        allow_larger=self.allow_larger)

    @property
    def initial_sparsity(self) -> float:
        """The sparsity of the mask that ``factorize`` returns."""
        fraction = float(self.hparams["pruning_fraction"])
        if fraction > 0:
            return fraction
        return sparsity_at(int(self.hparams["begin_pruning_step"]), self.hparams)

    def check(self, m: int, n: int) -> SizePlan | Refusal:
        return self.codebook.plan(m, n, m * n, m * n, {"mask_dtype": "uint8"})

    def factor_specs(self, plan: SizePlan) -> list[FactorSpec]:
        return self.codebook.specs(plan) + [FactorSpec("mask", (plan.m, plan.n), "uint8", False)]

    def factorize(self, matrix: np.ndarray, plan: SizePlan) -> dict[str, np.ndarray]:
        a = np.asarray(matrix, np.float32)
        mask = magnitude_mask(a, self.initial_sparsity)
        values = self.codebook.quantize(np.where(mask > 0, a, 0).astype(np.float32))
        return {**values, "mask": mask.astype(np.uint8)}

    def factorize_tf(self, matrix: Any, plan: SizePlan) -> dict[str, Any]:
        import tensorflow as tf

        a = tf.cast(matrix, tf.float32)
        mask = magnitude_mask_tf(a, self.initial_sparsity)
        values = self.codebook.quantize_tf(tf.where(mask > 0, a, 0.0))
        return {**values, "mask": tf.cast(mask, tf.uint8)}

    def dense(self, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        return self.codebook.dense_tf(factors, plan) * self.mask(factors, plan)

    def scheduled_updates(self, factors: Mapping[str, Any], matrix: Any, step: Any, plan: SizePlan) -> list[Any]:
        """The pruning mask update: every ``pruning_frequency`` steps from ``begin_pruning_step`` to
        ``end_pruning_step`` (-1: no end), the magnitude mask of the current A at ``s(step)``."""
        import tensorflow as tf

        hp = self.hparams
        begin, end, every = int(hp["begin_pruning_step"]), int(hp["end_pruning_step"]), int(hp["pruning_frequency"])
        due = tf.logical_and(step >= begin, tf.equal((step - begin) % every, 0))
        if end >= 0:
            due = tf.logical_and(due, step <= end)

        def update() -> Any:
            mask = magnitude_mask_tf(tf.cast(matrix(), tf.float32), sparsity_at_tf(step, hp))
            with tf.control_dependencies([factors["mask"].assign(tf.cast(mask, tf.uint8))]):
                return tf.constant(True)

        return [tf.cond(due, update, lambda: tf.constant(False))]

    def mask(self, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        import tensorflow as tf

        return tf.cast(factors["mask"], tf.float32)

    def numpy_dense(self, values: Mapping[str, np.ndarray], plan: SizePlan) -> np.ndarray:
        return self.codebook.dense_np(values, plan) * np.asarray(values["mask"], np.float32)
