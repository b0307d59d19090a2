"""Regenerates (or, with ``--check``, diffs) graphrewrite's op allow-list from TensorFlow's registry.

The allow-list (``graphrewrite/rewriting/allowed_ops.txt``) names the op types a model may contain to be
loaded and run without ``--allow-unsafe-ops``: pure math, array, control-flow, variable and
resource ops. It is derived here from every op TensorFlow registers, in two reviewed steps:

1. ``DENIED``: families that do I/O or block (files, datasets, summaries, debuggers, Python,
   RPC, collectives and devices, queues and staging areas, sleeps, savers, test-only ops). An op
   matching one of them is never allowed, whatever else it matches.
2. ``FAMILIES``: what a model is made of. An op is allowed when it matches one of these.

Ops matching neither are left out and printed for review: a new TensorFlow release adds ops, and
each needs a decision. Run ``python tools/allowlist.py`` after a TensorFlow upgrade and review the
diff; ``--check`` exits 1 when the checked-in list differs from what the registry gives.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LIST = os.path.join(HERE, os.pardir, "graphrewrite", "rewriting", "allowed_ops.txt")

# family -> regex (full match) of op types that do I/O, reach other processes, or block.
DENIED: dict[str, str] = {
    "files, checkpoints and savers": r".*(File(?!name)|Reader|Writer|Save|Restore|Checkpoint|Snapshot|Record"
                                     r"|Matching|LMDB|Sql|CSV|Vocab|Remap|CalibrationStatistics"
                                     r"|DumpTensor|ImmutableConst|Fdo).*|LoadAndRemapMatrix"
                                     r"|Load[A-Z].*|ShardedFilespec",
    "datasets and iterators": r".*(Dataset|Iterator|Optional|MemoryCache|SeedGenerator"
                              r"|ThreadPool|StatsAggregator|GetOptions|GlobalIterId).*"
                              r"|(Compress|Uncompress)Element|GetElementAtIndex",
    "summaries and events": r".*(Summary|Event).*",
    "debuggers": r"Debug.*|CheckPinned",
    "Python callbacks": r".*Py.*",
    "network and other processes": r".*(Rpc|Remote|DataService|Heartbeat|Send|Recv|Infeed|Outfeed"
                                   r"|HostCompute|Nccl|Collective|AllToAll|AllGather|AllReduce"
                                   r"|ReduceScatter|CrossReplica|DTensor|TPU|Tpu|Mesh|Session|Distributed"
                                   r"|SyncDevice|Deadline|TaskId).*",
    "XLA and device programs": r"Xla.*|_.*|Mkl.*|Risc.*|MlirPassthroughOp|Copy|CopyHost"
                               r"|HostConst|BatchFunction",
    "queues, barriers, staging areas and locks": r".*(Queue|Barrier|Stage|Accumulator|Mutex|Notification"
                                                 r").*|Batch|Unbatch|UnbatchGrad|(Ordered)?Map(Clear|IncompleteSize"
                                                 r"|Peek|Size|Unstage|UnstageNoKey)",
    "sleeps and clocks": r".*(Sleep|Timestamp).*",
    "process control": r"Abort|ControlTrigger",
    "graphs and programs held in strings": r".*FromGraph.*|.*ToGraph.*|.*Proto.*",
}

# family -> regex (full match) of op types a trained model is made of.
FAMILIES: dict[str, str] = {
    "graph plumbing and control flow": r"Const|Placeholder(V2|WithDefault)?|Identity(N)?|NoOp|StopGradient"
                                       r"|PreventGradient|(Stateful)?PartitionedCall|(Stateless)?(If|While"
                                       r"|Case)|For|(Ref)?(Switch|Merge|Enter|Exit|NextIteration|Identity"
                                       r"|Select)|LoopCond|SymbolicGradient|EnsureShape|CheckNumerics(V2)?"
                                       r"|Assert|GuaranteeConst|DisableCopyOnRead|FakeParam|DeepCopy"
                                       r"|Empty|MakeUnique|IsTensorFloat32Enabled|DeviceIndex|ToBool",
    "variables and resources": r"VarHandleOp|ReadVariableOp|(Assign|AssignAdd|AssignSub)(VariableOp)?"
                               r"|VarIsInitializedOp|VariableShape|DestroyResourceOp|Variable(V2)?"
                               r"|IsVariableInitialized|(Destroy)?TemporaryVariable|CountUpTo"
                               r"|Resource(Apply|SparseApply|Scatter|Gather|CountUpTo).*|(Sparse)?Apply.*|Scatter.*"
                               r"|(Resource)?StridedSliceAssign"
                               r"|IsResourceHandleRefCounting|MakeWeakResourceHandle",
    "lookup tables filled from tensors": r"(Anonymous)?(Mutable(Dense)?)?HashTable(OfTensors)?(V2)?"
                                         r"|LookupTable(Find|Import|Insert|Export|Size|Remove)(V2)?"
                                         r"|InitializeTable(V2)?",
    "tensor lists, arrays, maps and stacks": r"(Empty)?TensorList.*|TensorArray.*|(Empty)?TensorMap.*"
                                             r"|Stack(V2|Push|PushV2|Pop|PopV2|Close|CloseV2)?",
    "array manipulation": r"Reshape|Transpose|ConjugateTranspose|Concat(V2|Offset)?|ParallelConcat|Slice"
                          r"|StridedSlice(Grad)?|TensorStridedSliceUpdate|Gather(V2|Nd)?|Pack|Unpack"
                          r"|Split(V)?|Squeeze|ExpandDims|Tile(Grad)?|Pad(V2)?|MirrorPad(Grad)?|Fill"
                          r"|ZerosLike|OnesLike|Shape(N)?|Size|Rank|Range|LinSpace|OneHot|Reverse(V2"
                          r"|Sequence)?|Roll|Where|BroadcastTo|BroadcastArgs|BroadcastGradientArgs"
                          r"|Diag(Part)?|Matrix(Band|Diag|SetDiag).*|BatchMatrix(BandPart|Diag"
                          r"|DiagPart|SetDiag)|InvertPermutation|Unique.*|ListDiff|SetSize"
                          r"|(Dense|Sparse)To(Dense|Sparse)SetOperation|DynamicPartition"
                          r"|(Parallel)?DynamicStitch|(Space|Batch)To(Batch|Space)(ND)?"
                          r"|SpaceToDepth|DepthToSpace|Bitcast|Cast|Bucketize|Searchsorted|LowerBound"
                          r"|UpperBound|UnravelIndex|TensorScatter.*|Inplace(Add|Sub|Update)"
                          r"|Extract(ImagePatches|VolumePatches)|TopK.*|NthElement|KthOrderStatistic"
                          r"|ApproxTopK|DataFormat(DimMap|VecPermute)|Snapshot|ConcatOffset|Cross"
                          r"|Bincount|DenseBincount|(Dense|Sparse|Ragged)CountSparseOutput"
                          r"|HistogramFixedWidth|EditDistance|Unique",
    "math": r"Abs|Acos(h)?|Add(N|V2)?|AccumulateNV2|Angle|All|Any|ApproximateEqual|ArgM(ax|in)|Asin(h)?"
            r"|Atan(h|2)?|Bessel.*|Betainc|Bitwise(And|Or|Xor)|Ceil|ClipByValue|Complex(Abs)?|Conj"
            r"|Cos(h)?|Cum(sum|prod|ulativeLogsumexp)|Dawsn|Digamma|Div(NoNan)?|Equal|Erf(c|inv)?"
            r"|EuclideanNorm|Exp(int|m1)?|Floor(Div|Mod)?|FresnelCos|FresnelSin|Greater(Equal)?"
            r"|Igamma(GradA|c)?|Imag|Inv(Grad)?|Invert|IsFinite|IsInf|IsNan|LeftShift|Less(Equal)?"
            r"|Lgamma|Log(1p)?|Logical(And|Not|Or)|Max(imum)?|Mean|Min(imum)?|Mod|Mul(NoNan)?|Ndtri"
            r"|Neg|NextAfter|NotEqual|Polygamma|PopulationCount|Pow|Prod|Real(Div)?|Reciprocal(Grad)?"
            r"|RightShift|Rint|Round|Rsqrt(Grad)?|Segment.*|Select(V2)?|Sigmoid(Grad)?|Sign|Sin(h)?"
            r"|Spence|Sqrt(Grad)?|Square|SquaredDifference|Sub|Sum|Tan(h|hGrad)?|Truncate(Div|Mod)"
            r"|UnsortedSegment(Max|Min|Prod|Sum)|Xdivy|Xlog1py|Xlogy|Zeta|Range|Bucketize"
            r"|StochasticCastToInt|ReduceJoin",
    "linear algebra": r"(Batch)?MatMul|BatchMatMul(V2|V3)?|SparseMatMul|Einsum|(Batch)?Cholesky(Grad)?"
                      r"|(Batch)?Qr|(Batch)?Svd|Eig|(Batch)?SelfAdjointEig(V2)?|(Batch)?Matrix(Inverse"
                      r"|Determinant|Solve|SolveLs|TriangularSolve|Exponential|Logarithm|SquareRoot)"
                      r"|LogMatrixDeterminant|Lu|TridiagonalMatMul|TridiagonalSolve|BandedTriangularSolve",
    "neural network layers": r"Conv(2D|3D)?(Backprop(Filter|Input)(V2)?)?|DepthwiseConv2dNative.*"
                             r"|(Max|Avg)Pool.*|Fractional(Max|Avg)Pool.*|Dilation2D.*|BiasAdd(Grad|V1)?"
                             r"|Relu(6)?(Grad)?|LeakyRelu(Grad)?|Elu(Grad)?|Selu(Grad)?|Softplus(Grad)?"
                             r"|Softsign(Grad)?|(Log)?Softmax|(Sparse)?SoftmaxCrossEntropyWithLogits"
                             r"|FusedBatchNorm.*|BatchNormWithGlobalNormalization(Grad)?|LRN(Grad)?|L2Loss"
                             r"|InTopK(V2)?|CTC(Loss|LossV2|GreedyDecoder|BeamSearchDecoder)"
                             r"|(LSTM|GRU)BlockCell(Grad)?|BlockLSTM(Grad)?(V2)?|FusedPadConv2D"
                             r"|FusedResizeAndPadConv2D|NearestNeighbors|CudnnRNN.*",
    "random numbers": r"Random.*|Stateless(Random|Truncated|Multinomial|Parameterized|Shuffle"
                      r"|SampleDistorted).*|Stateful(Random|Standard|Truncated|Uniform).*|Multinomial"
                      r"|TruncatedNormal|ParameterizedTruncatedNormal|Rng(ReadAndSkip|Skip)"
                      r"|NonDeterministicInts|(All|FixedUnigram|LearnedUnigram|LogUniform|ThreadUnsafeUnigram"
                      r"|Uniform)CandidateSampler|ComputeAccidentalHits|SobolSample",
    "strings": r"String(Join|Length|Lower|Upper|NGrams|Split|SplitV2|Strip|ToHashBucket.*|ToNumber"
               r"|Format)|(Static)?Regex(FullMatch|Replace)|Substr|AsString|Unicode.*|ShardedFilename"
               r"|(Decode|Encode)Base64|Fingerprint|UnsortedSegmentJoin",
    "parsing and decoding of tensors (no I/O)": r"Parse(Example|ExampleV2|SingleExample|SequenceExample"
                                                r"|SequenceExampleV2|SingleSequenceExample|Tensor)"
                                                r"|SerializeTensor|Decode(Raw|PaddedRaw|JSONExample"
                                                r"|Compressed|Jpeg|AndCropJpeg|Png|Gif|Bmp|Image|WebP"
                                                r"|Wav)|Encode(Jpeg|JpegVariableQuality|Png|Wav)"
                                                r"|ExtractJpegShape",
    "images": r"Resize.*|CropAndResize.*|Adjust(Contrast|Contrastv2|Hue|Saturation)|HSVToRGB|RGBToHSV"
              r"|(Combined)?NonMaxSuppression.*|DrawBoundingBoxes(V2)?|ExtractGlimpse(V2)?"
              r"|ImageProjectiveTransformV[23]|SampleDistortedBoundingBox(V2)?|ScaleAndTranslate(Grad)?"
              r"|GenerateBoundingBoxProposals",
    "sparse tensors": r"Sparse(Add|AddGrad|Concat|Cross|CrossHashed|CrossV2|DenseCwise.*|FillEmptyRows"
                      r"|FillEmptyRowsGrad|Reduce.*|Reorder|Reshape|Segment.*|Slice|SliceGrad|Softmax"
                      r"|SparseMaximum|SparseMinimum|Split|TensorDenseAdd|TensorDenseMatMul|ToDense"
                      r"|Matrix.*|TensorToCSRSparseMatrix|Bincount)|CSRSparseMatrix.*|DenseToCSRSparseMatrix"
                      r"|(Deserialize|Serialize)(Many)?Sparse",
    "ragged tensors": r"Ragged(Gather|Range|TensorToSparse|TensorToTensor|TensorToVariant"
                      r"|TensorFromVariant|TensorToVariantGradient|Cross|Bincount|FillEmptyRows"
                      r"|FillEmptyRowsGrad)",
    "quantization": r"(Fake)?Quantize.*|Dequantize|Quantized.*|Requantize.*|RequantizationRange.*"
                    r"|FakeQuant.*|UniformQuantize.*|UniformDequantize|UniformRequantize",
    "signal processing": r"(Batch)?I?R?FFT(2D|3D|ND)?|AudioSpectrogram|Mfcc",
    "composite tensors": r"CompositeTensorVariant(From|To)Components",
}


def registered_ops() -> list[str]:
    """Every op type TensorFlow registers in this installation."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow  # noqa: F401 - registers the ops
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.python.client import pywrap_tf_session as c_api

    ops = op_def_pb2.OpList()
    ops.ParseFromString(bytes(c_api.TF_GetBuffer(c_api.TF_GetAllOpList())))
    return sorted(op.name for op in ops.op)


def classify(ops: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """(allowed by family, denied by family, unclassified)."""
    allowed: dict[str, list[str]] = {family: [] for family in FAMILIES}
    denied: dict[str, list[str]] = {family: [] for family in DENIED}
    left = []
    for op in ops:
        deny = next((f for f, pattern in DENIED.items() if re.fullmatch(pattern, op)), None)
        allow = next((f for f, pattern in FAMILIES.items() if re.fullmatch(pattern, op)), None)
        if deny is not None:
            denied[deny].append(op)
        elif allow is not None:
            allowed[allow].append(op)
        else:
            left.append(op)
    return allowed, denied, left


def render(allowed: dict[str, list[str]], total: int) -> str:
    import tensorflow as tf

    count = sum(len(v) for v in allowed.values())
    lines = [
        "# graphrewrite's op allow-list: the op types a model may hold to be loaded and run without",
        "# --allow-unsafe-ops. Generated by tools/allowlist.py from TensorFlow "
        f"{tf.__version__}'s registry ({count} of {total} ops); edit the filter there, not this file.",
    ]
    for family, ops in allowed.items():
        lines += ["", f"# {family}", *ops]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="diff against the checked-in list; exit 1 if it differs")
    parser.add_argument("--show-left-out", action="store_true", help="print the unclassified ops for review")
    args = parser.parse_args()
    ops = registered_ops()
    allowed, _, left = classify(ops)
    text = render(allowed, len(ops))
    if args.show_left_out:
        print("unclassified (left out):", " ".join(left))
    if args.check:
        with open(LIST, encoding="utf-8") as f:
            current = f.read()
        diff = list(difflib.unified_diff(current.splitlines(), text.splitlines(), "checked in", "registry",
                                         lineterm=""))
        print("\n".join(diff) if diff else "allowed_ops.txt is up to date")
        return 1 if diff else 0
    with open(LIST, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {LIST}: {sum(map(len, allowed.values()))} allowed, {len(left)} unclassified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
