"""The weight-bearing ops graphrewrite rewrites: MatMul, BatchMatMulV2/V3, Conv2D/3D, Conv2DBackpropInput,
Einsum, lookups (GatherV2/ResourceGather) and While loop inputs (recurrent kernels); DepthwiseConv2dNative
only to say why not.

One small adapter per op type answers two kinds of question:

* at plan time, from the node alone: which operand can be a weight, and how the operand is seen as
  the m x n matrix ``W`` with ``y = x @ W`` (its op-level view steps), or why it cannot be;
* at build time, with tensors: the op itself with a replacement weight, the same op with a low-rank
  weight computed as two cheap products (``(x @ B) @ C``; a Conv2D becomes a kh x kw x cin -> k
  convolution followed by a 1 x 1 k -> cout one), or the op applied through a function of the
  flattened input (for methods with their own cheap product).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from graphrewrite.rewriting.graph import Node
from graphrewrite.views import View


@dataclasses.dataclass(frozen=True)
class OperandView:
    """How the weight operand of one op is seen as a matrix."""

    steps: View  # operand -> W (m x n)
    m: int
    n: int


MatrixFn = Callable[[Any], Any]


class OpAdapter:
    """Base of the op adapters (one per op type; subclasses are final).

    ``rows_per_example``: ``activation_rows`` of one example are many (a convolution's patches), so
    calibration statistics are gathered one example at a time to bound their memory.
    """

    op_types: ClassVar[tuple[str, ...]]
    rows_per_example: ClassVar[bool] = False
    # Both paths cost little (a lookup): blend them directly, without a gate (graphrewrite.rewriting.sites).
    cheap: ClassVar[bool] = False

    def weight_positions(self, node: Node) -> tuple[int, ...]:
        return (0, 1)

    def weight_dtype(self, node: Node) -> Any:
        """The dtype enum of the weight operand."""
        return node.attr("T")

    def describe(self, node: Node, pos: int, shape: tuple[int, ...],
                 constants: Mapping[int, Any] | None = None) -> OperandView | str:
        """The operand's matrix view, or the reason this operand cannot be a compressed weight.

        ``constants``: the values of the op's constant data inputs, by position (a gather's axis).
        """
        raise NotImplementedError

    def apply(self, node: Node, inputs: list[Any]) -> Any:
        """The original op on ``inputs`` (one of which may be a replacement weight)."""
        raise NotImplementedError

    def apply_low_rank(self, node: Node, inputs: list[Any], pos: int, b: Any, c: Any) -> Any | None:
        """The op with weight ``B @ C`` computed without forming it; None if not possible."""
        return None

    def apply_matrix_fn(self, node: Node, inputs: list[Any], pos: int, fn: MatrixFn) -> Any | None:
        """The op with ``x @ W`` replaced by ``fn(x)`` on the flattened input; None if unsupported."""
        return None

    def activation_position(self, pos: int) -> int:
        """The input position of the activation that multiplies the weight at input ``pos``."""
        return 1 - pos

    def activation_rows(self, node: Node, x: Any, pos: int, weight_shape: tuple[int, ...]) -> Any | None:
        """The rows that multiply W (``[rows, m]``) from the op's other operand ``x``, for calibration
        statistics; None where not supported (the site then factorises from its weight alone)."""
        return None


def _transpose_last2(t: Any) -> Any:
    import tensorflow as tf

    rank = t.shape.rank
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return tf.transpose(t, perm)


class _MatMulLike(OpAdapter):
    """Shared logic of MatMul and BatchMatMul: ``y = op_a(a) @ op_b(b)``; the weight is 2-D."""

    flags: ClassVar[tuple[str, str]]

    def _flags(self, node: Node) -> tuple[bool, bool]:
        return bool(node.attr(self.flags[0], False)), bool(node.attr(self.flags[1], False))

    def describe(self, node: Node, pos: int, shape: tuple[int, ...],
                 constants: Mapping[int, Any] | None = None) -> OperandView | str:
        if len(shape) != 2:
            return f"the weight operand of {node.op} has shape {list(shape)}, not a matrix (batch dimensions)"
        ta, tb = self._flags(node)
        rows, cols = shape
        if pos == 1:  # y = op_a(x) @ op_b(W): W's matrix is op_b(W)
            return OperandView((("transpose", (1, 0)),), cols, rows) if tb else OperandView((), rows, cols)
        # y = op_a(W) @ op_b(x) = (op_b(x)^T @ op_a(W)^T)^T: the matrix is op_a(W)^T
        return OperandView((), rows, cols) if ta else OperandView((("transpose", (1, 0)),), cols, rows)

    def apply_low_rank(self, node: Node, inputs: list[Any], pos: int, b: Any, c: Any) -> Any:
        import tensorflow as tf

        ta, tb = self._flags(node)
        x = inputs[1 - pos]
        if pos == 1:
            return tf.matmul(tf.matmul(x, b, adjoint_a=ta), c)
        return tf.matmul(c, tf.matmul(b, x, adjoint_a=True, adjoint_b=tb), adjoint_a=True)

    def apply_matrix_fn(self, node: Node, inputs: list[Any], pos: int, fn: MatrixFn) -> Any:
        ta, tb = self._flags(node)
        x = inputs[1 - pos]
        if pos == 1:
            return fn(_transpose_last2(x) if ta else x)
        return _transpose_last2(fn(x if tb else _transpose_last2(x)))

    def activation_rows(self, node: Node, x: Any, pos: int, weight_shape: tuple[int, ...]) -> Any:
        import tensorflow as tf

        ta, tb = self._flags(node)
        rows = (_transpose_last2(x) if ta else x) if pos == 1 else (x if tb else _transpose_last2(x))
        return tf.reshape(rows, [-1, tf.shape(rows)[-1]])


@dataclasses.dataclass(frozen=True)
class MatMul(_MatMulLike):
    op_types: ClassVar[tuple[str, ...]] = ("MatMul",)
    flags: ClassVar[tuple[str, str]] = ("transpose_a", "transpose_b")

    def apply(self, node: Node, inputs: list[Any]) -> Any:
        import tensorflow as tf

        ta, tb = self._flags(node)
        return tf.raw_ops.MatMul(a=inputs[0], b=inputs[1], transpose_a=ta, transpose_b=tb)


@dataclasses.dataclass(frozen=True)
class BatchMatMul(_MatMulLike):
    op_types: ClassVar[tuple[str, ...]] = ("BatchMatMulV2", "BatchMatMulV3", "BatchMatMul")
    flags: ClassVar[tuple[str, str]] = ("adj_x", "adj_y")

    def describe(self, node: Node, pos: int, shape: tuple[int, ...],
                 constants: Mapping[int, Any] | None = None) -> OperandView | str:
        if node.op == "BatchMatMulV3" and len({node.attr("Ta"), node.attr("Tb"), node.attr("Tout")}) != 1:
            return "BatchMatMulV3 with mixed input/output dtypes is not rewritten"
        return super().describe(node, pos, shape, constants)

    def apply(self, node: Node, inputs: list[Any]) -> Any:
        import tensorflow as tf

        adj_x, adj_y = self._flags(node)
        return tf.matmul(inputs[0], inputs[1], adjoint_a=adj_x, adjoint_b=adj_y)


@dataclasses.dataclass(frozen=True)
class Conv(OpAdapter):
    """Conv2D and Conv3D (Conv1D arrives as a Conv2D on an ExpandDims'd kernel): the kernel
    [*spatial, cin, cout] is the matrix [prod(spatial) * cin, cout]; low rank is a convolution to k
    channels followed by a 1 x ... x 1 one to cout."""

    op_types: ClassVar[tuple[str, ...]] = ("Conv2D", "Conv3D")
    rows_per_example: ClassVar[bool] = True

    def weight_positions(self, node: Node) -> tuple[int, ...]:
        return (1,)

    def describe(self, node: Node, pos: int, shape: tuple[int, ...],
                 constants: Mapping[int, Any] | None = None) -> OperandView | str:
        if pos != 1:
            return f"the weight is the {node.op} input, not its filter"
        rows = int(np.prod(shape[:-1]))
        return OperandView((("reshape", (rows, shape[-1])),), rows, shape[-1])

    def _conv(self, node: Node, x: Any, kernel: Any, first: bool) -> Any:
        import tensorflow as tf

        ones = [1] * (5 if node.op == "Conv3D" else 4)
        attrs = {"strides": node.attr("strides"), "padding": node.attr("padding"),
                 "data_format": node.attr("data_format", "NDHWC" if node.op == "Conv3D" else "NHWC"),
                 "dilations": node.attr("dilations", ones)}
        if not first:
            attrs.update(strides=ones, padding="VALID", dilations=ones)
        if node.op == "Conv2D":
            attrs["explicit_paddings"] = (node.attr("explicit_paddings", []) or []) if first else []
            attrs["use_cudnn_on_gpu"] = bool(node.attr("use_cudnn_on_gpu", True))
        return getattr(tf.raw_ops, node.op)(input=x, filter=kernel, **attrs)

    def apply(self, node: Node, inputs: list[Any]) -> Any:
        return self._conv(node, inputs[0], inputs[1], first=True)

    @staticmethod
    def _channel_axis(node: Node) -> int:
        return 1 if node.attr("data_format", "NHWC").startswith("NC") else -1

    def _ungrouped(self, node: Node, x: Any, spatial: Sequence[int], cin: int) -> bool:
        """Whether ``x`` has the kernel's ``cin`` channels (on the op's channel axis): not grouped."""
        return x.shape.rank == len(spatial) + 2 and x.shape[self._channel_axis(node)] == cin

    def patch_energy(self, node: Node, x: Any, weight_shape: tuple[int, ...]) -> Any | None:
        """The squared norms of all the im2col rows of ``x`` summed, without forming them: the
        input's squared norm summed over channels, through the op's own window, strides, dilations
        and padding with a filter of ones. None for a grouped convolution."""
        import tensorflow as tf

        *spatial, cin, _ = weight_shape
        if not self._ungrouped(node, x, spatial, cin):
            return None
        energy = tf.reduce_sum(tf.square(x), self._channel_axis(node), keepdims=True)
        return tf.reduce_sum(self._conv(node, energy, tf.ones([*spatial, 1, 1], x.dtype), first=True))

    def apply_low_rank(self, node: Node, inputs: list[Any], pos: int, b: Any, c: Any) -> Any | None:
        import tensorflow as tf

        x, w = inputs
        *spatial, cin, cout = w.shape.as_list()
        if not self._ungrouped(node, x, spatial, cin):  # grouped: no split
            return None
        k = b.shape[-1]
        first = self._conv(node, x, tf.reshape(b, [*spatial, cin, k]), first=True)
        return self._conv(node, first, tf.reshape(c, [1] * len(spatial) + [k, cout]), first=False)

    def activation_rows(self, node: Node, x: Any, pos: int, weight_shape: tuple[int, ...]) -> Any | None:
        """The im2col patches, ordered (kh, kw, cin) (Conv3D: (kd, kh, kw, cin)) like the kernel's matrix view."""
        import tensorflow as tf

        *spatial, cin, _ = weight_shape
        if node.op == "Conv3D":
            return self._volume_rows(node, x, spatial, cin)
        if len(spatial) not in (1, 2):
            return None
        kh, kw = [1] * (2 - len(spatial)) + list(spatial)  # Conv1D: Keras' ExpandDims'd [1, kw] kernel
        strides, rates = list(node.attr("strides")), list(node.attr("dilations", [1, 1, 1, 1]))
        padding, pads = node.attr("padding"), list(node.attr("explicit_paddings", []) or [])
        if node.attr("data_format", "NHWC") == "NCHW":
            x = tf.transpose(x, [0, 2, 3, 1])
            strides, rates = ([v[0], v[2], v[3], v[1]] for v in (strides, rates))
            pads = pads[:2] + pads[4:] + pads[2:4] if pads else pads
        if x.shape.rank != 4 or x.shape[-1] != cin:  # grouped convolution
            return None
        if padding == "EXPLICIT":
            x = tf.pad(x, [pads[i:i + 2] for i in range(0, 8, 2)])
            padding = "VALID"
        if kh == kw == 1:  # a pointwise convolution's patches are its (strided) pixels: no extraction
            return tf.reshape(x[:, ::strides[1], ::strides[2], :], [-1, cin])
        patches = tf.image.extract_patches(x, sizes=[1, kh, kw, 1], strides=[1, strides[1], strides[2], 1],
                                           rates=[1, rates[1], rates[2], 1], padding=padding)
        return tf.reshape(patches, [-1, kh * kw * cin])

    @staticmethod
    def _volume_rows(node: Node, x: Any, spatial: list[int], cin: int) -> Any | None:
        """Conv3D's patches (``tf.extract_volume_patches``, which has no dilation: None with one)."""
        import tensorflow as tf

        strides = list(node.attr("strides"))
        if node.attr("data_format", "NDHWC") != "NDHWC" or any(r != 1 for r in node.attr("dilations", [1] * 5)):
            return None
        if x.shape.rank != 5 or x.shape[-1] != cin:
            return None
        patches = tf.extract_volume_patches(x, ksizes=[1, *spatial, 1], strides=strides, padding=node.attr("padding"))
        return tf.reshape(patches, [-1, int(np.prod(spatial)) * cin])


@dataclasses.dataclass(frozen=True)
class ConvTranspose(OpAdapter):
    """Conv2DBackpropInput (Keras' Conv2DTranspose): filter [kh, kw, cout, cin] spreads each input
    pixel's cin vector over kh x kw x cout outputs, the matrix [cin, kh*kw*cout]; low rank is a
    1 x 1 convolution cin -> k followed by the transposed convolution k -> cout."""

    op_types: ClassVar[tuple[str, ...]] = ("Conv2DBackpropInput",)
    rows_per_example: ClassVar[bool] = True

    def weight_positions(self, node: Node) -> tuple[int, ...]:
        return (1,)

    def activation_position(self, pos: int) -> int:
        return 2  # out_backprop: input 0 is the output's size

    def activation_rows(self, node: Node, x: Any, pos: int, weight_shape: tuple[int, ...]) -> Any | None:
        """Each input pixel's cin vector: the row that multiplies the [cin, kh*kw*cout] matrix. Its
        product is the pixel's kh x kw x cout contribution before overlapping ones are summed, so the
        output-space error is exact for stride >= kernel (no overlap) and, with overlap, leaves out
        the cross terms of neighbouring pixels' errors."""
        import tensorflow as tf

        cin = weight_shape[3]
        if node.attr("data_format", "NHWC") == "NCHW":
            x = tf.transpose(x, [0, 2, 3, 1])
        return tf.reshape(x, [-1, cin]) if x.shape.rank == 4 and x.shape[-1] == cin else None

    def describe(self, node: Node, pos: int, shape: tuple[int, ...],
                 constants: Mapping[int, Any] | None = None) -> OperandView | str:
        kh, kw, cout, cin = shape
        return OperandView((("transpose", (3, 0, 1, 2)), ("reshape", (cin, kh * kw * cout))), cin, kh * kw * cout)

    def _attrs(self, node: Node) -> dict[str, Any]:
        return {"strides": node.attr("strides"), "padding": node.attr("padding"),
                "explicit_paddings": node.attr("explicit_paddings", []) or [],
                "data_format": node.attr("data_format", "NHWC"), "dilations": node.attr("dilations", [1, 1, 1, 1]),
                "use_cudnn_on_gpu": bool(node.attr("use_cudnn_on_gpu", True))}

    def apply(self, node: Node, inputs: list[Any]) -> Any:
        import tensorflow as tf

        return tf.raw_ops.Conv2DBackpropInput(input_sizes=inputs[0], filter=inputs[1], out_backprop=inputs[2],
                                              **self._attrs(node))

    def apply_low_rank(self, node: Node, inputs: list[Any], pos: int, b: Any, c: Any) -> Any | None:
        import tensorflow as tf

        sizes, w, x = inputs
        kh, kw, cout, cin = w.shape.as_list()
        data_format = node.attr("data_format", "NHWC")
        if x.shape.rank != 4 or x.shape[1 if data_format == "NCHW" else -1] != cin:
            return None
        k = b.shape[-1]
        narrow = tf.raw_ops.Conv2D(input=x, filter=tf.reshape(b, [1, 1, cin, k]), strides=[1, 1, 1, 1],
                                   padding="VALID", data_format=data_format)
        spread = tf.transpose(tf.reshape(c, [k, kh, kw, cout]), [1, 2, 3, 0])
        return tf.raw_ops.Conv2DBackpropInput(input_sizes=sizes, filter=spread, out_backprop=narrow,
                                              **self._attrs(node))


@dataclasses.dataclass(frozen=True)
class Depthwise(OpAdapter):
    """DepthwiseConv2dNative: recognised only to say why it is left dense."""

    op_types: ClassVar[tuple[str, ...]] = ("DepthwiseConv2dNative",)

    def weight_positions(self, node: Node) -> tuple[int, ...]:
        return (1,)

    def describe(self, node: Node, pos: int, shape: tuple[int, ...],
                 constants: Mapping[int, Any] | None = None) -> OperandView | str:
        return ("a depthwise kernel filters each channel on its own (kh x kw x multiplier per channel): "
                "it has no input-by-output matrix for low rank to factor")


@dataclasses.dataclass(frozen=True)
class Loop(OpAdapter):
    """A While loop input carrying a weight's handle into the body, where MatMuls read it (a recurrent
    kernel; graphrewrite.rewriting.loops checks the body). The matrix is the 2-D weight as it is; the loop is
    rebuilt by graphrewrite.rewriting.recurrent, never applied here."""

    op_types: ClassVar[tuple[str, ...]] = ("While", "StatelessWhile")

    def weight_positions(self, node: Node) -> tuple[int, ...]:
        return ()  # a loop takes the handle, never a read: the matcher finds it from the handles

    def describe(self, node: Node, pos: int, shape: tuple[int, ...],
                 constants: Mapping[int, Any] | None = None) -> OperandView | str:
        if len(shape) != 2:
            return f"the weight read inside {node.op} '{node.name}' has shape {list(shape)}, not a matrix"
        return OperandView((), shape[0], shape[1])


@dataclasses.dataclass(frozen=True)
class Gather(OpAdapter):
    """An embedding lookup ``gather(W, ids)`` (GatherV2 of a read, or ResourceGather of the handle):
    the lookup of one-hot rows, ``onehot(ids) @ W``, so W [vocabulary, width] is the matrix as it is;
    low rank is ``gather(B, ids) @ C``, which never forms ``B @ C``."""

    op_types: ClassVar[tuple[str, ...]] = ("GatherV2", "ResourceGather")
    cheap: ClassVar[bool] = True

    def weight_positions(self, node: Node) -> tuple[int, ...]:
        return (0,)

    def weight_dtype(self, node: Node) -> Any:
        return node.attr("dtype" if node.op == "ResourceGather" else "Tparams")

    def describe(self, node: Node, pos: int, shape: tuple[int, ...],
                 constants: Mapping[int, Any] | None = None) -> OperandView | str:
        if len(shape) != 2:
            return f"a lookup in a table of shape {list(shape)}, not a matrix"
        axis = (constants or {}).get(2)
        if node.op == "GatherV2" and (axis is None or int(np.asarray(axis).reshape(-1)[0]) != 0):
            return f"a gather along an axis other than a constant 0 ({node.name})"
        if node.attr("batch_dims", 0):
            return f"a gather with batch dimensions ({node.name})"
        return OperandView((), shape[0], shape[1])

    def apply(self, node: Node, inputs: list[Any]) -> Any:
        import tensorflow as tf

        if node.op == "ResourceGather" and inputs[0].dtype == tf.resource:
            return tf.raw_ops.ResourceGather(resource=inputs[0], indices=inputs[1], dtype=node.attr("dtype"),
                                             validate_indices=bool(node.attr("validate_indices", True)))
        return tf.gather(inputs[0], inputs[1])

    def apply_low_rank(self, node: Node, inputs: list[Any], pos: int, b: Any, c: Any) -> Any:
        import tensorflow as tf

        return tf.tensordot(tf.gather(b, inputs[1]), c, axes=1)


@dataclasses.dataclass(frozen=True)
class Einsum(OpAdapter):
    op_types: ClassVar[tuple[str, ...]] = ("Einsum",)

    @staticmethod
    def _parse(node: Node) -> tuple[list[str], str] | None:
        equation = node.attr("equation", "").replace(" ", "")
        if "->" not in equation or "." in equation:
            return None
        lhs, out = equation.split("->")
        operands = lhs.split(",")
        return (operands, out) if len(operands) == 2 else None

    def _letters(self, node: Node, pos: int) -> tuple[str, str, str, str, str] | str:
        parsed = self._parse(node)
        if parsed is None:
            return f"einsum equation {node.attr('equation')!r} is not of the form 'ab,bc->ac' (no '...')"
        operands, out = parsed
        w, x = operands[pos], operands[1 - pos]
        if len(set(w)) != len(w) or len(set(x)) != len(x):
            return f"einsum equation {node.attr('equation')!r} repeats a letter within an operand"
        ins = "".join(ch for ch in w if ch in x and ch not in out)
        outs = "".join(ch for ch in w if ch in out and ch not in x)
        if len(ins) + len(outs) != len(w):
            return f"einsum equation {node.attr('equation')!r}: the weight has batch or summed-out axes"
        if not ins or not outs:
            return f"einsum equation {node.attr('equation')!r}: the weight has no input or no output axis"
        return w, x, out, ins, outs

    def describe(self, node: Node, pos: int, shape: tuple[int, ...],
                 constants: Mapping[int, Any] | None = None) -> OperandView | str:
        letters = self._letters(node, pos)
        if isinstance(letters, str):
            return letters
        w, _, _, ins, outs = letters
        perm = tuple(w.index(ch) for ch in ins + outs)
        m = 1
        for ch in ins:
            m *= shape[w.index(ch)]
        n = 1
        for ch in outs:
            n *= shape[w.index(ch)]
        steps: View = ((("transpose", perm),) if perm != tuple(range(len(w))) else ()) + (("reshape", (m, n)),)
        return OperandView(steps, m, n)

    def apply(self, node: Node, inputs: list[Any]) -> Any:
        import tensorflow as tf

        return tf.einsum(node.attr("equation"), inputs[0], inputs[1])

    def apply_low_rank(self, node: Node, inputs: list[Any], pos: int, b: Any, c: Any) -> Any:
        import tensorflow as tf

        letters = self._letters(node, pos)
        assert not isinstance(letters, str)
        w_letters, x_letters, out, ins, outs = letters
        w = inputs[pos]
        dims = dict(zip(w_letters, w.shape.as_list()))
        used = set(w_letters + x_letters + out)
        z = next(ch for ch in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA" if ch not in used)
        keep = "".join(ch for ch in x_letters if ch not in ins)
        k = b.shape[-1]
        b_r = tf.reshape(b, [dims[ch] for ch in ins] + [k])
        c_r = tf.reshape(c, [k] + [dims[ch] for ch in outs])
        t = tf.einsum(f"{x_letters},{ins}{z}->{keep}{z}", inputs[1 - pos], b_r)
        return tf.einsum(f"{keep}{z},{z}{outs}->{out}", t, c_r)

    def activation_rows(self, node: Node, x: Any, pos: int, weight_shape: tuple[int, ...]) -> Any | None:
        """The input's contracted axes moved last (in the weight's order) and flattened."""
        import tensorflow as tf

        letters = self._letters(node, pos)
        if isinstance(letters, str):
            return None
        w_letters, x_letters, _, ins, _ = letters
        keep = "".join(ch for ch in x_letters if ch not in ins)
        m = 1
        for ch in ins:
            m *= weight_shape[w_letters.index(ch)]
        return tf.reshape(tf.einsum(f"{x_letters}->{keep}{ins}", x), [-1, m])


ADAPTERS: dict[str, OpAdapter] = {
    op: adapter for adapter in (MatMul(), BatchMatMul(), Conv(), ConvTranspose(), Depthwise(), Loop(), Gather(),
                                Einsum()) for op in adapter.op_types
}
