"""The one interface every compression method implements.

A method sees a weight only as its matrix view ``W`` (m x n, inputs x outputs: ``y = x @ W``), as a
numpy array at rewrite time and as a tensor inside the saved functions. It never sees protobufs or
graphs. What it decides:

* ``check(m, n)``: the size plan (k, parameters after) or a ``Refusal`` with the reason, which
  ``inspect`` prints ("rank 200 gives k=10 on 10x20: no saving").
* ``factor_specs(plan)``: the variables it needs (name, shape, dtype, trainable).
* ``factorize(W)`` (numpy, LAPACK/scipy) and ``factorize_tf(W)`` (in-graph, for the ``use_tpu``
  update path): initial values of those variables from a weight.
* ``dense(f)``: the m x n weight the factors imply, ``W_c``; ``matmul(x, f)``: ``x @ W_c`` computed
  the cheap way (``(x @ B) @ C`` for low rank, never forming ``B @ C``).

Blended methods (``blended = True``) are gated by alpha: ``W = alpha * A + (1 - alpha) * W_c``.
Others replace the weight outright (options 9, 10, 12, as in the reference).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np


@dataclasses.dataclass(frozen=True)
class SizePlan:
    """What a method will build for one m x n matrix.

    Attributes:
      m: rows of the matrix view (input features).
      n: columns (output features).
      k: the inner dimension (rank, dictionary size, centroids, ...) or None where it has none.
      params_after: number of stored values of the compressed form.
      details: method-specific sizes, recorded in the manifest.
    """

    m: int
    n: int
    k: int | None
    params_after: int
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return self.m * self.n

    def structure_key(self) -> tuple[Any, ...]:
        """What the built ops depend on: the plan without the statistics recorded beside it (which
        SVD found the factors, a rank policy's kept energy and error). Sites with equal keys, op
        and shapes share their traced functions."""
        informational = {"svd", "policy", "kept_energy", "relative_error", "error_space", "output_error",
                         "output_error_plain"}
        details = tuple(sorted((k, repr(v)) for k, v in self.details.items() if k not in informational))
        return (self.m, self.n, self.k, self.params_after, details)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A site a method will not rewrite, and why (printed by inspect, kept in the manifest)."""

    reason: str


@dataclasses.dataclass(frozen=True)
class FactorSpec:
    """One variable a method needs per site."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool


class Transform(abc.ABC):
    """Base of all compression methods; subclasses are final.

    Args:
      hparams: the complete, validated hyperparameter dict (graphrewrite.hparams.resolve).
      allow_larger: also plan sites whose compressed form is not smaller than the weight (the
        reference compresses those too; graphrewrite refuses them unless asked).
    """

    name: ClassVar[str]
    option: ClassVar[int]
    blended: ClassVar[bool] = True
    # factorize_calibrated accepts a whiten.OutputGram (known only through the weight's outputs):
    # the calibration pass may then keep the n x n Gram of a narrow weight's outputs instead
    outputs_suffice: ClassVar[bool] = False

    def __init__(self, hparams: Mapping[str, Any], allow_larger: bool = False) -> None:
        self.hparams = dict(hparams)
        self.allow_larger = allow_larger

    @abc.abstractmethod
    def check(self, m: int, n: int) -> SizePlan | Refusal:
        """The size plan for an m x n matrix, or the reason it is not rewritten."""

    @abc.abstractmethod
    def factor_specs(self, plan: SizePlan) -> list[FactorSpec]:
        """The variables of one site, in a fixed order."""

    @abc.abstractmethod
    def factorize(self, matrix: np.ndarray, plan: SizePlan) -> dict[str, np.ndarray]:
        """Initial values of the factor variables from the weight (numpy)."""

    def factorize_calibrated(self, matrix: np.ndarray, plan: SizePlan,
                             gram: np.ndarray) -> dict[str, np.ndarray] | None:
        """Initial factor values fitted to the weight's outputs on calibration data, or None where the
        method has no data-aware form (``factorize`` is used then).

        Args:
          matrix: the weight's m x n matrix view.
          plan: its size plan.
          gram: ``X^T X / rows`` (m x m) of the rows X that multiply the matrix
            (graphrewrite.rewriting.calibration.statistics), in any of graphrewrite.whiten's forms (an OutputGram only where ``outputs_suffice``).
        """
        return None

    def factorize_tf(self, matrix: Any, plan: SizePlan) -> dict[str, Any]:
        """In-graph factorisation for the ``use_tpu`` update path; methods without one refuse."""
        raise NotImplementedError(f"{self.name} has no in-graph factorisation")

    @abc.abstractmethod
    def dense(self, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        """The m x n weight the factors imply (a tensor)."""

    def matmul(self, x: Any, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        """``x @ dense(factors)`` for x of shape [..., m]; override where a cheaper order exists."""
        import tensorflow as tf

        w = tf.cast(self.dense(factors, plan), x.dtype)
        return tf.tensordot(x, w, axes=[[-1], [0]]) if x.shape.rank != 2 else tf.matmul(x, w)

    def flops(self, plan: SizePlan) -> int:
        """Multiply-adds x 2 of ``x @ W_c`` per row of x (per output position of a convolution).

        The default is the dense product ``2 m n``, right for methods that rebuild ``W_c`` (k-means
        codebook lookups, masks); methods with a cheaper product say so.
        """
        return 2 * plan.m * plan.n

    def export_form(self, values: Mapping[str, np.ndarray], plan: SizePlan) -> tuple[Transform, dict[str, np.ndarray]]:
        """The method and factor values the exported (inference) model stores; by default these.

        A method whose training form stores more than its inference form needs (block-diagonal's
        ``mask`` method keeps a dense m x n C) converts here.
        """
        return self, dict(values)

    def mask(self, factors: Mapping[str, Any], plan: SizePlan) -> Any | None:
        """An m x n 0/1 mask applied to the dense path as well (``alpha * (A * M) + ...``), or None.

        Only k-means + pruning (option 8) has one; the compressed path applies it inside ``dense``.
        """
        return None

    def scheduled_updates(self, factors: Mapping[str, Any], matrix: Any, step: Any, plan: SizePlan) -> list[Any]:
        """Assign ops a method runs at every schedule update besides alpha's (TF; default none).

        Args:
          factors: the site's factor variables.
          matrix: a callable returning the current weight's matrix view (read lazily).
          step: the global step (int64 tensor).
        """
        return []

    def low_rank(self, factors: Mapping[str, Any], plan: SizePlan) -> tuple[Any, Any] | None:
        """(B, C) with ``W_c = B @ C`` where the method has that form, so convolutions can be split."""
        return None

    def numpy_dense(self, values: Mapping[str, np.ndarray], plan: SizePlan) -> np.ndarray:
        """``dense`` on numpy values (for reports); the default runs the TF version eagerly."""
        import tensorflow as tf

        out = self.dense({k: tf.constant(v) for k, v in values.items()}, plan)
        return np.asarray(out)
