"""Looks at a SavedModel without executing anything: parse, tag sets, signatures, unsafe ops.

A SavedModel is a program: loading it runs restore ops (and, for TF1 models, an init op), and
calling it runs whatever ops its functions hold. So before anything is loaded, ``saved_model.pb`` is
parsed as a protobuf and every op of the graph and of every library function is checked against a
deny list of file, network and process ops. The saver functions every model has (SaveV2, RestoreV2,
MergeV2Checkpoints, ...) are exempt only where the SaverDef reaches them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

from graphrewrite.errors import InputModelError, first_line

MANIFEST_ASSET = "graphrewrite_manifest.json"
IR_ASSET = "graphrewrite_ir.json"

# op type -> what it does, for the one-line refusal.
DENIED_OPS: dict[str, str] = {
    **{op: "reads files" for op in (
        "ReadFile", "MatchingFiles", "ImmutableConst", "LoadAndRemapMatrix", "GenerateVocabRemapping",
        "Restore", "RestoreV2", "RestoreSlice", "TFRecordReader", "TFRecordReaderV2",
        "TextLineReader", "TextLineReaderV2", "FixedLengthRecordReader",
        "FixedLengthRecordReaderV2", "WholeFileReader", "WholeFileReaderV2", "LMDBReader",
        "TFRecordDataset", "TFRecordDatasetV2", "FixedLengthRecordDataset",
        "FixedLengthRecordDatasetV2", "TextLineDataset", "CSVDataset", "CSVDatasetV2",
        "ExperimentalCSVDataset", "SqlDataset", "ExperimentalSqlDataset", "LMDBDataset",
        "ExperimentalLMDBDataset", "LoadDataset", "SnapshotDataset", "SnapshotDatasetV2",
        "SnapshotDatasetReader", "SnapshotNestedDatasetReader", "SnapshotChunkDataset",
        "ListSnapshotChunksDataset", "MatchingFilesDataset", "ExperimentalMatchingFilesDataset",
        "RecordInput", "ReaderReadV2", "ReaderRead", "ReaderReadUpToV2", "ReaderReadUpTo",
        "ReaderRestoreStateV2", "ReaderRestoreState", "ReadFileV2",
        # Lookup tables filled from a file named by a tensor: vocabularies come from the model's
        # assets, but the op reads any path it is given (--allow-unsafe-ops once checked).
        "InitializeTableFromTextFile", "InitializeTableFromTextFileV2")},
    **{op: "writes files" for op in (
        "WriteFile", "Save", "SaveV2", "SaveSlices", "MergeV2Checkpoints", "DeleteFile",
        "SaveDataset", "SaveDatasetV2", "DatasetToTFRecord", "ExperimentalDatasetToTFRecord",
        "DistributedSave", "CreateSummaryFileWriter", "CreateSummaryDbWriter", "WriteSummary",
        "WriteScalarSummary", "WriteHistogramSummary", "WriteImageSummary", "WriteAudioSummary",
        "WriteGraphSummary", "WriteRawProtoSummary", "ImportEvent", "FlushSummaryWriter",
        "CloseSummaryWriter", "FileSystemSetConfiguration", "StatsAggregatorSetSummaryWriter",
        "SummaryWriter", "WriteTextFile")},
    **{op: "talks to the network" for op in (
        "Rpc", "TryRpc", "RpcClient", "RpcServer", "RpcServerStart", "RpcServerRegister", "RpcCall",
        "RpcCheckStatus", "DeleteRpcFutureResource", "DataServiceDataset", "DataServiceDatasetV2",
        "DataServiceDatasetV3", "DataServiceDatasetV4", "RegisterDataset", "RegisterDatasetV2",
        "RemoteCall", "CollectiveBcastRecv", "CollectiveBcastSend")},
    **{op: "runs debugger I/O" for op in (
        "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3", "DebugNanCount", "DebugNumericSummary",
        "DebugNumericSummaryV2")},
    **{op: "runs Python code" for op in ("PyFunc", "PyFuncStateless", "EagerPyFunc")},
}
# Saver ops that are fine inside the functions/nodes the SaverDef reaches.
SAVER_OPS = frozenset({"SaveV2", "RestoreV2", "MergeV2Checkpoints", "Save", "SaveSlices",
                       "Restore", "RestoreSlice", "DeleteFile"})


@dataclasses.dataclass(frozen=True)
class Finding:
    """One denied op: where it is (graph or function name), its node name, type and why."""

    where: str
    node: str
    op: str
    why: str

    def __str__(self) -> str:
        return f"{self.op} '{self.node}' in {self.where} ({self.why})"


@dataclasses.dataclass(frozen=True)
class MetaGraphInfo:
    """What scanning one MetaGraphDef found."""

    tags: tuple[str, ...]
    signatures: tuple[str, ...]
    object_based: bool
    findings: tuple[Finding, ...]
    op_count: int


@dataclasses.dataclass(frozen=True)
class ScanResult:
    """What scanning a SavedModel directory found (nothing was executed)."""

    path: str
    meta_graphs: tuple[MetaGraphInfo, ...]
    rewritten: bool

    def meta_graph(self, tags: Iterable[str]) -> MetaGraphInfo:
        wanted = set(tags)
        for info in self.meta_graphs:
            if set(info.tags) == wanted:
                return info
        available = "; ".join(",".join(i.tags) or "(none)" for i in self.meta_graphs)
        raise InputModelError(
            f"{self.path}: no MetaGraph with tag set {','.join(sorted(wanted))!r} (available: {available})"
        )


def read_saved_model_proto(path: str) -> Any:
    """Parses ``saved_model.pb`` (or ``.pbtxt``) of a directory, with one-line errors."""
    from graphrewrite import preflight
    from graphrewrite.tfimport import import_tensorflow_quietly

    preflight.model_dir(path)
    import_tensorflow_quietly()
    from google.protobuf import message, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    pb = os.path.join(path, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    try:
        if os.path.isfile(pb):
            with open(pb, "rb") as f:
                data = f.read()
            proto.ParseFromString(data)
        else:
            with open(os.path.join(path, "saved_model.pbtxt"), encoding="utf-8") as f:
                text_format.Parse(f.read(), proto)
    except (message.DecodeError, text_format.ParseError, UnicodeDecodeError, ValueError) as exc:
        raise InputModelError(f"{path}: saved_model.pb is corrupted ({first_line(exc, limit=None)})") from None
    except OSError as exc:
        raise InputModelError(f"{path}: cannot read saved_model.pb ({exc.strerror})") from None
    if not proto.meta_graphs:
        raise InputModelError(f"{path}: saved_model.pb holds no MetaGraph (truncated or corrupted)")
    for mg in proto.meta_graphs:
        if not mg.graph_def.node and not mg.graph_def.library.function:
            raise InputModelError(f"{path}: saved_model.pb holds an empty graph (truncated or corrupted)")
    return proto


def saver_exempt(meta_graph: Any) -> tuple[set[str], set[str]]:
    """Nodes and functions of the saver: where saver ops are expected.

    TF1: the nodes the SaverDef's save and restore tensors depend on, within the saver's own name
    scope (``save/``). TF2: the functions the save and restore nodes call, and what those call. A
    control edge from another node to the saver does not make that node's ops exempt.
    """
    graph = meta_graph.graph_def
    nodes = {n.name: n for n in graph.node}
    functions = {f.signature.name: f for f in graph.library.function}
    saver = meta_graph.saver_def
    roots = [t.split(":")[0].lstrip("^") for t in (saver.save_tensor_name, saver.restore_op_name) if t]
    roots = [r for r in roots if r in nodes]
    scopes = {r.split("/")[0] + "/" for r in roots if "/" in r}
    exempt_nodes: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in exempt_nodes:
            continue
        exempt_nodes.add(name)
        for edge in nodes[name].input:
            source = edge.split(":")[0].lstrip("^")
            if source in nodes and any(source.startswith(scope) for scope in scopes):
                stack.append(source)
    exempt_functions: set[str] = set()
    pending = [f for r in roots for f in _call_targets(nodes[r])]
    while pending:
        fname = pending.pop()
        if fname in exempt_functions or fname not in functions:
            continue
        exempt_functions.add(fname)
        for node in functions[fname].node_def:
            pending.extend(_call_targets(node))
    return exempt_nodes, exempt_functions


def _call_targets(node: Any) -> list[str]:
    """The function a call node runs (its ``f``, or its op type when that names a function)."""
    if node.op in ("PartitionedCall", "StatefulPartitionedCall"):
        return [node.attr["f"].func.name] if "f" in node.attr else []
    return [node.op]


def called_functions(node: Any) -> list[str]:
    names = []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        names.extend(f.name for f in value.list.func)
    if node.op not in ("Const", "Placeholder"):
        names.append(node.op)  # a node whose op type is a library function calls it
    return names


def _check_node(node: Any, where: str, exempt: bool) -> Finding | None:
    why = DENIED_OPS.get(node.op)
    if node.op == "PrintV2":
        stream = node.attr["output_stream"].s.decode("utf-8", "replace") if "output_stream" in node.attr else ""
        if stream.startswith("file://"):
            return Finding(where, node.name, node.op, f"prints to {stream}")
        return None
    if node.op in ("DecodeProtoV2", "EncodeProto"):
        source = node.attr["descriptor_source"].s.decode("utf-8", "replace") if "descriptor_source" in node.attr else ""
        if source and source not in ("local://", "bytes://"):
            return Finding(where, node.name, node.op, f"reads the descriptor file {source}")
        return None
    if why is None or (exempt and node.op in SAVER_OPS):
        return None
    return Finding(where, node.name, node.op, why)


def _scan_graph(graph_def: Any, where: str, exempt_nodes: set[str] = frozenset(),
                exempt_functions: set[str] = frozenset()) -> tuple[list[Finding], int]:
    """Findings and op count of a GraphDef's nodes and library functions."""
    findings = []
    count = 0
    for node in graph_def.node:
        count += 1
        found = _check_node(node, where, node.name in exempt_nodes)
        if found:
            findings.append(found)
    for function in graph_def.library.function:
        fname = function.signature.name
        for node in function.node_def:
            count += 1
            found = _check_node(node, f"function {fname}", fname in exempt_functions)
            if found:
                findings.append(found)
    return findings, count


def scan_meta_graph(meta_graph: Any, extra: tuple[Finding, ...] = ()) -> MetaGraphInfo:
    findings, count = _scan_graph(meta_graph.graph_def, "the graph", *saver_exempt(meta_graph))
    return MetaGraphInfo(
        tags=tuple(meta_graph.meta_info_def.tags),
        signatures=tuple(sorted(meta_graph.signature_def.keys())),
        object_based=len(meta_graph.object_graph_def.nodes) > 0,
        findings=tuple(findings) + extra,
        op_count=count,
    )


def _source_function_findings(path: str) -> tuple[Finding, ...]:
    """Findings in the flat source functions a rewritten model keeps for ``export``."""
    import base64
    import binascii
    import json

    from google.protobuf import message
    from tensorflow.core.framework import graph_pb2

    asset = os.path.join(path, "assets", IR_ASSET)
    if not os.path.isfile(asset):
        return ()
    try:
        with open(asset, encoding="utf-8") as f:
            functions = json.load(f)["functions"]
        findings = []
        for key, function in functions.items():
            graph = graph_pb2.GraphDef()
            graph.ParseFromString(base64.b64decode(function["graph_def"]))
            findings.extend(_scan_graph(graph, f"source function {key} ({IR_ASSET})")[0])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError,
            binascii.Error, message.DecodeError) as exc:
        raise InputModelError(f"{path}: damaged {IR_ASSET} ({first_line(exc, limit=None)})") from None
    return tuple(findings)


def _object_graph_has(meta_graph: Any, child: str) -> bool:
    nodes = meta_graph.object_graph_def.nodes
    return bool(nodes) and any(c.local_name == child for c in nodes[0].children)


def scan(path: str) -> ScanResult:
    """Parses ``path`` and scans every MetaGraph; raises InputModelError if it is not a SavedModel.

    A model rewritten by graphrewrite is recognised by its manifest or, if that was removed, by its
    ``graphrewrite_sites`` attribute; the source functions it keeps for ``export`` are scanned too.
    """
    proto = read_saved_model_proto(path)
    extra = _source_function_findings(path)
    infos = tuple(scan_meta_graph(mg, extra) for mg in proto.meta_graphs)
    rewritten = os.path.isfile(os.path.join(path, "assets", MANIFEST_ASSET)) or any(
        _object_graph_has(mg, "graphrewrite_sites") for mg in proto.meta_graphs)
    return ScanResult(path=path, meta_graphs=infos, rewritten=rewritten)
