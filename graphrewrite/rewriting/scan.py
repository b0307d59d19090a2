"""Looks at a SavedModel without executing anything: files, tag sets, signatures, refused ops.

A SavedModel is a program: loading it runs restore ops (and, for TF1 models, an init op), and
calling it runs whatever ops its functions hold. So before anything is loaded, the directory is
checked (regular files inside it only), ``saved_model.pb`` is parsed as a protobuf, and every op of
the graph and of every library function (called or not, by op type or through a function
attribute) must be on the allow-list of pure math, array, control-flow, variable and resource ops
(``allowed_ops.txt``). The saver's SaveV2/RestoreV2/MergeV2Checkpoints are allowed only where the
model's own saver is recognised by its structure. An op that reads a graph or program from a
string (DatasetFromGraph, XlaCallModule, ...) is not on the list, so such strings stay inert data.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from graphrewrite.errors import InputModelError, first_line

MANIFEST_ASSET = "graphrewrite_manifest.json"
IR_ASSET = "graphrewrite_ir.json"

ALLOWED_OPS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allowed_ops.txt")

# The saver ops a model's own saver holds, and the inputs of each that name checkpoint prefixes.
# They write or read files, so they are allowed only where the saver's structure is recognised.
SAVER_PREFIX_INPUTS: dict[str, tuple[int, ...]] = {
    "SaveV2": (0,), "MergeV2Checkpoints": (0, 1), "RestoreV2": (0,)}
_WRITERS = frozenset({"SaveV2", "MergeV2Checkpoints"})
_READERS = frozenset({"RestoreV2"})
_PRINT_OPS = frozenset({"Print", "PrintV2"})
_CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})


@functools.cache
def allowed_ops() -> frozenset[str]:
    """The op types a model may hold without ``--allow-unsafe-ops`` (graphrewrite/rewriting/allowed_ops.txt,
    generated from TensorFlow's registry by tools/allowlist.py)."""
    with open(ALLOWED_OPS_FILE, encoding="utf-8") as f:
        return frozenset(line.strip() for line in f if line.strip() and not line.startswith("#"))


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
    source_functions: str | None = None  # the text of graphrewrite_ir.json as scanned

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
    """Parses ``saved_model.pb`` (or ``.pbtxt``) of a directory (checked by check_tree first),
    with one-line errors."""
    from graphrewrite import preflight
    from graphrewrite.tfimport import import_tensorflow_quietly

    preflight.model_dir(path)
    check_tree(path)
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


def _node_name(edge: str) -> str:
    return edge.lstrip("^").split(":")[0]


def _data_inputs(node: Any) -> list[str]:
    return [_node_name(e) for e in node.input if not e.startswith("^")]


def _is_suffix(name: str, nodes: dict[str, Any]) -> bool:
    """A checkpoint-name suffix: string constants without ``..`` (``_temp/part``), or a Select or
    Identity of such constants (TensorFlow picks ``.part`` for ``s3://`` prefixes)."""
    node = nodes.get(name)
    if node is None:
        return False
    if node.op == "Const":
        tensor = node.attr["value"].tensor
        return tensor.dtype == 7 and all(b".." not in v and not v.startswith(b"/") for v in tensor.string_val)
    if node.op in ("Select", "SelectV2"):
        return all(_is_suffix(i, nodes) for i in _data_inputs(node)[1:])
    return node.op == "Identity" and all(_is_suffix(i, nodes) for i in _data_inputs(node))


def _is_own_prefix(name: str, nodes: dict[str, Any], prefix: str) -> bool:
    """Whether tensor ``name`` is the saver's filename (``prefix``), perhaps sharded, suffixed or
    packed as TensorFlow's own savers do: nothing else reaches it."""
    if name == prefix:
        return True
    node = nodes.get(name)
    if node is None:
        return False
    inputs = _data_inputs(node)
    if node.op in ("Identity", "Pack"):
        return bool(inputs) and all(_is_own_prefix(i, nodes, prefix) for i in inputs)
    if node.op == "StringJoin":
        return (not node.attr["separator"].s and bool(inputs) and _is_own_prefix(inputs[0], nodes, prefix)
                and all(_is_suffix(i, nodes) for i in inputs[1:]))
    if node.op == "ShardedFilename":
        return bool(inputs) and _is_own_prefix(inputs[0], nodes, prefix)
    return False


def _saver_nodes(nodes: dict[str, Any], prefix: str, ops: frozenset[str]) -> set[str]:
    """Nodes with an op of ``ops`` whose every prefix input is the saver's own filename."""
    found = set()
    for name, node in nodes.items():
        if node.op in ops:
            inputs = _data_inputs(node)
            positions = SAVER_PREFIX_INPUTS[node.op]
            if len(inputs) > max(positions) and all(_is_own_prefix(inputs[p], nodes, prefix) for p in positions):
                found.add(name)
    return found


def _ancestors(roots: Iterable[str], nodes: dict[str, Any]) -> set[str]:
    seen: set[str] = set()
    stack = [r for r in roots if r in nodes]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(i for i in map(_node_name, nodes[name].input) if i in nodes)
    return seen


def _fetched(meta_graph: Any) -> set[str]:
    """Every node a SavedModel names to run or read, besides its saver: signature tensors, init
    ops and collections."""
    names = set()
    for sig in meta_graph.signature_def.values():
        names.update(_node_name(t.name) for t in (*sig.inputs.values(), *sig.outputs.values()) if t.name)
    for collection in meta_graph.collection_def.values():
        names.update(_node_name(v) for v in collection.node_list.value)
    return names


def saver_exempt(meta_graph: Any) -> tuple[set[str], set[str]]:
    """The model's own saver, recognised by structure: (graph nodes, library functions) whose
    SaveV2/RestoreV2/MergeV2Checkpoints are allowed."""
    nodes, functions = _saver_exemptions(meta_graph)
    return nodes, set(functions)


def _saver_exemptions(meta_graph: Any) -> tuple[set[str], dict[str, set[str]]]:
    """(graph nodes, {saver function: its nodes}) whose saver ops are the model's own saver's.

    A saver op is the model's own only when every prefix it writes or reads is the SaverDef's
    filename tensor (sharded and suffixed the way TensorFlow does it, never with ``..``), writes
    happen only on the save side (never reached from the restore op, a signature, an init op or a
    collection), and, for TF2, the save and restore functions are called by the SaverDef's nodes
    alone, with the filename as their first argument. Names prove nothing: every other saver op
    is refused like any file op.
    """
    nodes = {n.name: n for n in meta_graph.graph_def.node}
    saver = meta_graph.saver_def
    prefix = _node_name(saver.filename_tensor_name)
    roots = {"save": _node_name(saver.save_tensor_name), "restore": _node_name(saver.restore_op_name)}
    if not prefix or prefix not in nodes or not all(r in nodes for r in roots.values()):
        return set(), {}
    # Run by a signature, an init op or a collection, the filename would be its default (a path
    # relative to wherever graphrewrite runs): saver ops reachable from there are never exempt.
    fetched = _ancestors(_fetched(meta_graph), nodes)
    restore_side = _ancestors([roots["restore"]], nodes)
    save_side = _ancestors([roots["save"]], nodes)
    exempt = {n for n in _saver_nodes(nodes, prefix, _WRITERS) if n in save_side and n not in restore_side | fetched}
    exempt |= {n for n in _saver_nodes(nodes, prefix, _READERS) if n in restore_side and n not in fetched}
    library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    sides = _saver_functions(meta_graph, nodes, prefix, roots)
    return exempt, {f: _function_saver_nodes(library[f], side) for f, side in sides.items()}


def _saver_functions(meta_graph: Any, nodes: dict[str, Any], prefix: str, roots: dict[str, str]) -> dict[str, str]:
    """TF2: {function: "save" or "restore"} for the functions the SaverDef's call nodes run, when
    those nodes alone call them and pass the filename as their first argument."""
    sides = {}
    for side, root in roots.items():
        node = nodes[root]
        inputs = _data_inputs(node)
        if node.op not in _CALL_OPS or not inputs or inputs[0] != prefix:
            return {}
        sides[node.attr["f"].func.name] = side
    library = {f.signature.name for f in meta_graph.graph_def.library.function}
    if len(sides) != 2 or not set(sides) <= library:
        return {}
    everywhere = [*meta_graph.graph_def.node, *(n for f in meta_graph.graph_def.library.function for n in f.node_def)]
    callers = sorted(n.name for n in everywhere if set(called_functions(n)) & set(sides))
    return sides if callers == sorted(roots.values()) else {}


def _function_saver_nodes(function: Any, side: str) -> set[str]:
    """The saver ops of a recognised save (``side="save"``) or restore function that work on its
    first argument, the filename."""
    if not function.signature.input_arg:
        return set()
    nodes = {n.name: n for n in function.node_def}
    return _saver_nodes(nodes, function.signature.input_arg[0].name,
                        _WRITERS if side == "save" else _READERS)


def called_functions(node: Any) -> list[str]:
    """The functions (or ops) a node runs through its attributes, and its op type itself."""
    names = []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        names.extend(f.name for f in value.list.func)
    if node.op not in ("Const", "Placeholder"):
        names.append(node.op)  # a node whose op type is a library function calls it
    return names


def _check_node(node: Any, where: str, library: set[str], exempt: bool) -> list[Finding]:
    """Why ``node`` may not run: an op type that is neither allowed nor a library function, or
    a function attribute naming such an op (TensorFlow runs a primitive op named there)."""
    allowed = allowed_ops()
    found = []
    if node.op in _PRINT_OPS:
        stream = node.attr["output_stream"].s.decode("utf-8", "replace") if "output_stream" in node.attr else ""
        if stream.startswith("file://"):
            found.append(Finding(where, node.name, node.op, f"prints to {stream}"))
    elif not (node.op in allowed or node.op in library or (exempt and node.op in SAVER_PREFIX_INPUTS)):
        found.append(Finding(where, node.name, node.op, "not on the allow-list of pure ops"))
    for value in node.attr.values():
        for target in ([value.func.name] if value.HasField("func") else []) + [f.name for f in value.list.func]:
            if target not in library and target not in allowed:
                found.append(Finding(where, node.name, target, f"named by a function attribute of {node.op}"))
    return found


def _scan_graph(graph_def: Any, where: str, exempt_nodes: set[str] = frozenset(),
                exempt_functions: Mapping[str, set[str]] | None = None) -> tuple[list[Finding], int]:
    """Findings and op count of a GraphDef's nodes and library functions (every function, called
    or not: a function is code the loader may reach by name)."""
    library = {f.signature.name for f in graph_def.library.function}
    exempt_functions = exempt_functions or {}
    findings = []
    count = 0
    for node in graph_def.node:
        count += 1
        findings.extend(_check_node(node, where, library, node.name in exempt_nodes))
    for function in graph_def.library.function:
        fname = function.signature.name
        exempt = exempt_functions.get(fname, set())
        for node in function.node_def:
            count += 1
            findings.extend(_check_node(node, f"function {fname}", library, node.name in exempt))
    return findings, count


def scan_meta_graph(meta_graph: Any, extra: tuple[Finding, ...] = ()) -> MetaGraphInfo:
    exempt_nodes, exempt_functions = _saver_exemptions(meta_graph)
    findings, count = _scan_graph(meta_graph.graph_def, "the graph", exempt_nodes, exempt_functions)
    return MetaGraphInfo(
        tags=tuple(meta_graph.meta_info_def.tags),
        signatures=tuple(sorted(meta_graph.signature_def.keys())),
        object_based=len(meta_graph.object_graph_def.nodes) > 0,
        findings=tuple(findings) + extra,
        op_count=count,
    )


def _source_function_findings(path: str) -> tuple[str | None, tuple[Finding, ...]]:
    """(the text of the flat source functions a rewritten model keeps for ``export``, the
    findings in them); (None, ()) when the model has none."""
    import base64
    import binascii
    import json

    from google.protobuf import message
    from tensorflow.core.framework import graph_pb2

    asset = os.path.join(path, "assets", IR_ASSET)
    if not os.path.isfile(asset):
        return None, ()
    try:
        with open(asset, encoding="utf-8") as f:
            text = f.read()
        findings = []
        for key, function in json.loads(text)["functions"].items():
            graph = graph_pb2.GraphDef()
            graph.ParseFromString(base64.b64decode(function["graph_def"]))
            findings.extend(_scan_graph(graph, f"source function {key} ({IR_ASSET})")[0])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError,
            binascii.Error, message.DecodeError) as exc:
        raise InputModelError(f"{path}: damaged {IR_ASSET} ({first_line(exc, limit=None)})") from None
    return text, tuple(findings)


def _object_graph_has(meta_graph: Any, child: str) -> bool:
    nodes = meta_graph.object_graph_def.nodes
    return bool(nodes) and any(c.local_name == child for c in nodes[0].children)


_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
          (stat.S_ISSOCK, "socket"))


def check_tree(path: str) -> None:
    """Every entry of the model directory is a regular file or directory inside it.

    A symbolic link is accepted only when it resolves to a regular file or directory inside the
    model; links out of it, dangling links and special files (FIFOs, devices, sockets) are input
    errors: TensorFlow and the copy of ``--method none`` would read (or block on) them.
    """
    root = os.path.realpath(path)

    def refuse(error: OSError) -> None:
        raise InputModelError(f"{path}: cannot read {error.filename} ({error.strerror})")

    for base, dirs, files in os.walk(path, onerror=refuse):
        for name in dirs + files:
            full = os.path.join(base, name)
            rel = os.path.relpath(full, path)
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                target = os.path.realpath(full)
                if not target.startswith(root + os.sep):
                    raise InputModelError(f"{path}: {rel} is a symbolic link out of the model")
                if not os.path.exists(target):
                    raise InputModelError(f"{path}: {rel} is a dangling symbolic link")
                mode = os.stat(full).st_mode
            kind = next((k for test, k in _KINDS if test(mode)), None)
            if kind is not None:
                raise InputModelError(f"{path}: {rel} is a {kind}, not a regular file")


def _check_assets(path: str, meta_graph: Any) -> None:
    """Each asset the model declares is a plain name inside its ``assets/`` (check_tree made sure
    that whatever is there is a regular file inside the model; a missing one fails the load)."""
    for asset in meta_graph.asset_file_def:
        name = asset.filename
        parts = name.replace("\\", "/").split("/")
        if not name or os.path.isabs(name) or ".." in parts:
            raise InputModelError(f"{path}: asset {name!r} points outside the model's assets")


def scan(path: str) -> ScanResult:
    """Checks the directory and its assets, parses ``path`` and scans every MetaGraph; raises
    InputModelError if it is not a SavedModel.

    A model rewritten by graphrewrite is recognised by its manifest or, if that was removed, by its
    ``graphrewrite_sites`` attribute; the source functions it keeps for ``export`` are scanned too,
    and their text kept, so that ``export`` rebuilds exactly what was scanned.
    """
    proto = read_saved_model_proto(path)
    for mg in proto.meta_graphs:
        _check_assets(path, mg)
    source_functions, extra = _source_function_findings(path)
    infos = tuple(scan_meta_graph(mg, extra) for mg in proto.meta_graphs)
    rewritten = os.path.isfile(os.path.join(path, "assets", MANIFEST_ASSET)) or any(
        _object_graph_has(mg, "graphrewrite_sites") for mg in proto.meta_graphs)
    return ScanResult(path=path, meta_graphs=infos, rewritten=rewritten, source_functions=source_functions)


def refusals(path: str, tags: Iterable[str] | None = None) -> list[Finding]:
    """What the scan refuses in the SavedModel at ``path`` (every MetaGraph, or the one with
    ``tags``): an empty list means it may be loaded and run without ``--allow-unsafe-ops``."""
    found = scan(path)
    infos = found.meta_graphs if tags is None else (found.meta_graph(tags),)
    return [finding for info in infos for finding in info.findings]
