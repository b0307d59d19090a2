"""Fuzzing the model parser and the manifest: damaged input is a clear error, never a crash.

Hypothesis mutates the shipped model's ``saved_model.pb`` (byte flips, truncation, insertions, and
structured edits of the protobuf: deleted nodes and functions, changed op types, corrupted attribute
values, renamed inputs, dropped signature outputs, emptied object-graph nodes) and the manifest JSON
of a rewritten model (read by ``inspect`` and ``export``), and runs the command line in-process on
each. The command must succeed, or fail with a known status (2..8) and exactly one stderr line
starting ``graphrewrite: error:``; never status 70 (an internal error) and never a traceback.

The default run is bounded and deterministic (under a minute) so that CI is not flaky. A longer,
randomised run, for example before a release:

    GRAPHREWRITE_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py

``GRAPHREWRITE_FUZZ_EXAMPLES`` sets ``max_examples`` of every test here and turns derandomisation
off, so each long run explores new inputs. Hypothesis prints the failing input; add it as an
``@example`` so that it stays a regression case.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_cli import MLP

from graphrewrite.cli import main

LONG_RUN = os.environ.get("GRAPHREWRITE_FUZZ_EXAMPLES")
KNOWN_STATUSES = range(2, 11)  # 10: the model crashed or hung in the sandbox


def fuzz(examples: int) -> settings:
    """Hypothesis settings: ``examples`` in CI, GRAPHREWRITE_FUZZ_EXAMPLES (randomised) when set."""
    return settings(max_examples=int(LONG_RUN) if LONG_RUN else examples, derandomize=not LONG_RUN,
                    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def cli(*argv: str) -> tuple[int, str]:
    """Runs the command line in-process; returns (exit status, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    return code, err.getvalue()


def assert_clear(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    if code == 0:
        assert all(line.startswith("graphrewrite:") for line in err.splitlines()), err
        return
    assert code in KNOWN_STATUSES, err
    assert err.count("\n") == 1 and err.startswith("graphrewrite: error: "), err


@contextlib.contextmanager
def model_with(saved_model_pb: bytes) -> Iterator[str]:
    """A copy of the shipped model with ``saved_model_pb`` in place of its graph, and a scratch dir."""
    with tempfile.TemporaryDirectory(prefix="graphrewrite-fuzz-") as scratch:
        model = os.path.join(scratch, "model")
        shutil.copytree(MLP, model)
        with open(os.path.join(model, "saved_model.pb"), "wb") as f:
            f.write(saved_model_pb)
        yield model


def compress_status(saved_model_pb: bytes) -> tuple[int, str]:
    with model_with(saved_model_pb) as model:
        return cli("compress", model, os.path.join(os.path.dirname(model), "out"), "--rank=200")


# -- raw bytes -------------------------------------------------------------------------------------

with open(os.path.join(MLP, "saved_model.pb"), "rb") as _f:
    ORIGINAL_PB = _f.read()

BYTE_EDITS = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(b"")),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
), min_size=1, max_size=4)


def apply_bytes(data: bytes, edits: list[tuple[str, int, Any]]) -> bytes:
    out = bytearray(data)
    for kind, position, value in edits:
        at = position % (len(out) + 1)
        if kind == "flip" and at < len(out):
            out[at] ^= value
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = value
    return bytes(out)


@fuzz(30)
@given(BYTE_EDITS)
def test_byte_mutations_of_saved_model_pb(edits):
    assert_clear(*compress_status(apply_bytes(ORIGINAL_PB, edits)))


# -- structured protobuf edits ---------------------------------------------------------------------

OP_TYPES = ["NoSuchOp", "Identity", "MatMul", "Const", "NoOp", "AddV2", "ReadVariableOp", "Placeholder",
            "StatefulPartitionedCall"]
STRUCTURED_KINDS = ["delete_node", "op_type", "attr", "rename_input", "drop_output", "input_dtype",
                    "delete_function", "empty_object", "delete_graph_node"]
# One edit: (kind, which function or node: an index, or a name substring in @example, which
# element inside it, a value index).
STRUCTURED_EDITS = st.lists(st.tuples(st.sampled_from(STRUCTURED_KINDS), st.integers(0, 1000),
                                      st.integers(0, 1000), st.integers(0, 1000)), min_size=1, max_size=3)


def _pick(items: Any, selector: int | str, name: Any = None) -> Any:
    if isinstance(selector, str):
        return next(item for item in items if selector in name(item))
    return items[selector % len(items)]


def _corrupt_attr(attr: Any, key: str, value: int) -> None:
    choice = value % 5
    if choice == 0:
        attr[key].type = 7  # DT_STRING
    elif choice == 1:
        attr[key].i = -1
    elif choice == 2:
        attr[key].s = b"\xff\x00garbage"
    elif choice == 3:
        attr[key].shape.unknown_rank = True
    else:
        del attr[key]


def apply_structured(data: bytes, edits: list[tuple[str, int | str, int, int]]) -> bytes:
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(data)
    meta = proto.meta_graphs[0]
    functions = meta.graph_def.library.function
    signatures = meta.signature_def
    for kind, which, inner, value in edits:
        function = _pick(functions, which, lambda f: f.signature.name) if functions else None
        nodes = function.node_def if function is not None else []
        if kind == "delete_node" and nodes:
            del nodes[inner % len(nodes)]
        elif kind == "op_type" and nodes:
            nodes[inner % len(nodes)].op = OP_TYPES[value % len(OP_TYPES)]
        elif kind == "attr" and nodes:
            node = nodes[inner % len(nodes)]
            if node.attr:
                _corrupt_attr(node.attr, sorted(node.attr)[value % len(node.attr)], value)
        elif kind == "rename_input" and nodes:
            node = nodes[inner % len(nodes)]
            if node.input:
                node.input[value % len(node.input)] = ["missing:0", "missing", "^missing"][value % 3]
        elif kind == "drop_output":
            signature = signatures[sorted(signatures)[inner % len(signatures)]]
            if signature.outputs:
                del signature.outputs[sorted(signature.outputs)[value % len(signature.outputs)]]
        elif kind == "input_dtype":
            signature = signatures[sorted(signatures)[inner % len(signatures)]]
            for key in signature.inputs:
                signature.inputs[key].dtype = value % 30
        elif kind == "delete_function" and functions:
            functions.remove(function)
        elif kind == "empty_object":
            objects = meta.object_graph_def.nodes
            del _pick(objects, which).children[:]
        elif kind == "delete_graph_node" and meta.graph_def.node:
            del meta.graph_def.node[inner % len(meta.graph_def.node)]
    return proto.SerializeToString()


@fuzz(8)
@given(STRUCTURED_EDITS)
@example([("op_type", "__inference___call__", 1, 0)])  # an op type TensorFlow does not know
@example([("empty_object", 0, 0, 0)])  # the root object lost its children
@example([("empty_object", 7, 0, 0)])  # the signature map lost its children
def test_structured_mutations_of_saved_model_pb(edits):
    assert_clear(*compress_status(apply_structured(ORIGINAL_PB, edits)))


# -- the manifest of a rewritten model -------------------------------------------------------------

VALUES = [None, -1, 0, 1, 10**12, 1.5, "", "x", [], [1], [-1, 2], {}, {"a": 1}, True]
# One edit: (which path: an index, or the path itself in @example, delete or set, a value index).
MANIFEST_EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["set", "delete"]),
                                    st.integers(0, len(VALUES) - 1)), min_size=1, max_size=3)


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    if prefix:
        yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from _paths(child, prefix + (key,))


def apply_manifest(data: dict[str, Any], edits: list[tuple[int | tuple, str, int]]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for which, action, value in edits:
        paths = list(_paths(data))
        if not paths:
            break
        path = which if isinstance(which, tuple) else paths[which % len(paths)]
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        if action == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(VALUES[value])
    return data


@pytest.fixture(scope="module")
def rewritten(compressed_factory) -> str:
    return compressed_factory("digits_mlp", rank=200)[1]


@contextlib.contextmanager
def rewritten_with(rewritten: str, data: dict[str, Any]) -> Iterator[str]:
    """A copy of the rewritten model with ``data`` as its manifest."""
    with tempfile.TemporaryDirectory(prefix="graphrewrite-fuzz-") as scratch:
        model = os.path.join(scratch, "model")
        os.makedirs(os.path.join(model, "assets"))
        for name in ("saved_model.pb", "fingerprint.pb", os.path.join("assets", "graphrewrite_ir.json")):
            shutil.copyfile(os.path.join(rewritten, name), os.path.join(model, name))  # no links out: refused
        shutil.copytree(os.path.join(rewritten, "variables"), os.path.join(model, "variables"))
        with open(os.path.join(model, "assets", "graphrewrite_manifest.json"), "w", encoding="utf-8") as f:
            json.dump(data, f)
        yield model


def _manifest(rewritten: str) -> dict[str, Any]:
    with open(os.path.join(rewritten, "assets", "graphrewrite_manifest.json"), encoding="utf-8") as f:
        return json.load(f)


@fuzz(12)  # plus the five examples; GRAPHREWRITE_FUZZ_EXAMPLES runs longer (30 cost 29 s of CI)
@given(edits=MANIFEST_EDITS)
@example(edits=[(("totals", "skipped"), "delete", 0)])
@example(edits=[(("sites", 0, "k"), "delete", 0)])
@example(edits=[(("sites", 0, "matrix", 1), "delete", 0)])
@example(edits=[(("totals", "ratio"), "set", VALUES.index("x"))])
@example(edits=[(("options",), "set", VALUES.index(1))])
def test_manifest_mutations_inspect(rewritten, edits):
    with rewritten_with(rewritten, apply_manifest(_manifest(rewritten), edits)) as model:
        assert_clear(*cli("inspect", model))
        assert_clear(*cli("inspect", model, "--json"))


@fuzz(5)
@given(edits=MANIFEST_EDITS)
@example(edits=[(("sites", 0, "matrix", 1), "delete", 0)])
@example(edits=[(("sites", 0, "uses", 0, "node"), "set", VALUES.index("x"))])
def test_manifest_mutations_export(rewritten, edits):
    with rewritten_with(rewritten, apply_manifest(_manifest(rewritten), edits)) as model:
        final = os.path.join(os.path.dirname(model), "final")
        assert_clear(*cli("export", model, final, "--force", "--fast"))
