"""Matrix views: how a weight variable of any shape is seen as the m x n matrix that is compressed.

A view is a short list of steps, each ``("reshape", shape)`` or ``("transpose", perm)``, taking the
variable's value to ``W`` (m x n, inputs x outputs, so that the op computes ``x @ W``). Examples:
a Dense kernel [in, out] has the empty view; a MatMul with ``transpose_b`` has one transpose; a
Conv2D kernel [kh, kw, cin, cout] is reshaped to [kh*kw*cin, cout]; a Keras 3 attention projection
[d, heads, head_dim] read through a Reshape is [d, heads*head_dim]. Reshapes and transposes keep the
Frobenius norm, so errors measured on the view are errors of the weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Step = tuple[str, tuple[int, ...]]
View = tuple[Step, ...]


def resolve_reshape(shape: Sequence[int], target: Sequence[int]) -> tuple[int, ...] | None:
    """The static target shape (with one -1 resolved), or None if it does not fit ``shape``."""
    size = int(np.prod(shape, dtype=np.int64))
    target = [int(d) for d in target]
    if target.count(-1) > 1 or any(d < -1 for d in target):
        return None
    known = int(np.prod([d for d in target if d != -1], dtype=np.int64))
    if -1 in target:
        if known == 0 or size % known:
            return None
        target[target.index(-1)] = size // known
    elif known != size:
        return None
    return tuple(target)


def shape_after(shape: Sequence[int], steps: View) -> tuple[int, ...]:
    out = tuple(int(d) for d in shape)
    for kind, arg in steps:
        out = tuple(arg) if kind == "reshape" else tuple(out[p] for p in arg)
    return out


def apply_numpy(array: np.ndarray, steps: View) -> np.ndarray:
    for kind, arg in steps:
        array = array.reshape(arg) if kind == "reshape" else np.transpose(array, arg)
    return array


def apply_tf(tensor: Any, steps: View) -> Any:
    import tensorflow as tf

    for kind, arg in steps:
        tensor = tf.reshape(tensor, arg) if kind == "reshape" else tf.transpose(tensor, arg)
    return tensor


def inverse(steps: View, shape: Sequence[int]) -> View:
    """The steps taking the matrix of ``steps`` back to a variable of ``shape``."""
    shapes = [tuple(shape)]
    for step in steps:
        shapes.append(shape_after(shapes[-1], (step,)))
    return tuple(("reshape", before) if kind == "reshape" else ("transpose", tuple(int(p) for p in np.argsort(arg)))
                 for (kind, arg), before in zip(reversed(steps), reversed(shapes[:-1])))


def invert_numpy(array: np.ndarray, steps: View, shape: Sequence[int]) -> np.ndarray:
    """``invert_tf`` in numpy: the matrix back to the variable's ``shape``."""
    return apply_numpy(array, inverse(steps, shape))


def invert_tf(tensor: Any, steps: View, shape: Sequence[int]) -> Any:
    """The inverse of ``steps`` for a variable of ``shape``: matrix back to the variable's shape."""
    return apply_tf(tensor, inverse(steps, shape))


def to_json(steps: View) -> list[list[Any]]:
    return [[kind, list(arg)] for kind, arg in steps]


def from_json(data: Sequence[Sequence[Any]]) -> View:
    return tuple((str(kind), tuple(int(a) for a in arg)) for kind, arg in data)


def simplify(steps: View, shape: Sequence[int]) -> View:
    """Drops no-op steps (identity transposes, reshapes to the current shape)."""
    out: list[Step] = []
    current = tuple(shape)
    for kind, arg in steps:
        if kind == "transpose" and tuple(arg) == tuple(range(len(arg))):
            continue
        if kind == "reshape" and tuple(arg) == current:
            continue
        if kind == "reshape" and out and out[-1][0] == "reshape":
            out.pop()
        out.append((kind, tuple(arg)))
        current = shape_after(current, ((kind, arg),))
    return tuple(out)
