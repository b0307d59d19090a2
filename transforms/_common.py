"""Small helpers shared by the compression methods (size plans, refusals, products, random init).

Sizes are judged in bytes, with 4 bytes per stored float: methods that store sign bits or uint8 codes
shrink a weight even where they store as many elements as it has, and a byte count is the one
measure that treats every method alike. TensorFlow is imported inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite.transforms.base import Refusal, SizePlan

FLOAT_BYTES = 4
DTYPE_BYTES = {"float32": 4, "int32": 4, "uint8": 1}
INIT_SEED = 0  # the fixed seed of the random initial values of options 9, 10 and 12


def plan_or_refusal(m: int, n: int, k: int | None, params: int, bytes_after: int,
                    details: Mapping[str, Any], what: str, allow_larger: bool) -> SizePlan | Refusal:
    """The size plan, or a refusal where the compressed form takes no fewer bytes than the weight
    (unless ``allow_larger``, the transform's flag: the reference compresses those sites too).

    Args:
      m, n: the matrix view's shape.
      k: the method's inner dimension, or None.
      params: stored elements of the compressed form.
      bytes_after: its bytes (float32 weights assumed: 4 bytes per float).
      details: method-specific sizes; ``bytes_after`` is added.
      what: how the refusal names the configuration, e.g. ``"rank=200 gives k=11 on 20x20"``.
      allow_larger: plan the site even where it would not shrink.
    """
    before = FLOAT_BYTES * m * n
    if bytes_after >= before and not allow_larger:
        return Refusal(f"{what}: factors ({bytes_after} bytes) would not be smaller than the weight "
                       f"({before} bytes)")
    return SizePlan(m, n, k, params, {**details, "bytes_after": int(bytes_after)})


def divisibility(pairs: Sequence[tuple[str, int, int, str]]) -> Refusal | None:
    """The first ``(name, value, dim, what)`` whose value does not divide dim, as a refusal."""
    for name, value, dim, what in pairs:
        if dim % value:
            return Refusal(f"{name}={value} does not divide the {dim} {what}")
    return None


def uniform_init(shapes: Sequence[tuple[str, tuple[int, ...], float]]) -> dict[str, np.ndarray]:
    """``uniform(-limit, limit)`` float32 values for ``(name, shape, limit)``, drawn in order from
    the fixed seed ``INIT_SEED``, so every call gives the same values."""
    rng = np.random.default_rng(INIT_SEED)
    return {name: rng.uniform(-limit, limit, size=shape).astype(np.float32)
            for name, shape, limit in shapes}


def xavier_limit(rows: float, cols: float, divisor: float = 2.0) -> float:
    """The reference's ``sqrt(3 / max(1, (rows + cols) / divisor))`` initialiser limit."""
    return float(np.sqrt(3.0 / max(1.0, (rows + cols) / divisor)))


def tf_constants(values: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The values as TF constants (the in-graph 'factorisation' of the randomly initialised methods)."""
    import tensorflow as tf

    return {name: tf.constant(value) for name, value in values.items()}


def right_matmul(x: Any, w: Any) -> Any:
    """``x @ w`` for x of shape [..., m] and a 2-D w (cast to x's dtype)."""
    import tensorflow as tf

    w = tf.cast(w, x.dtype)
    return tf.matmul(x, w) if x.shape.rank == 2 else tf.tensordot(x, w, axes=[[-1], [0]])


def on_rows(x: Any, n: int, fn: Callable[[Any], Any]) -> Any:
    """``fn`` applied to x flattened to [rows, m], reshaped back to [..., n]."""
    import tensorflow as tf

    if x.shape.rank == 2:
        return fn(x)
    flat = tf.reshape(x, [-1, x.shape[-1] if x.shape[-1] is not None else tf.shape(x)[-1]])
    y = tf.reshape(fn(flat), tf.concat([tf.shape(x)[:-1], [n]], axis=0))
    y.set_shape(x.shape[:-1].concatenate([n]))
    return y


def dense_by_identity(matmul: Callable[[Any], Any], m: int) -> Any:
    """The m x n matrix of a linear map given as ``x -> x @ W`` (its image of the identity)."""
    import tensorflow as tf

    return matmul(tf.eye(m, dtype=tf.float32))
