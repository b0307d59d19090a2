"""Hostile models, built at test time, one or more per class of attack found by the adversarial
review (issue 15): saver abuse, I/O ops the old deny list missed, reads outside the model, model
code that hangs or exhausts memory, symlinks and special files, forged output lines, and the exit
statuses of bad weights and failing ops.

Each case checks what a user relies on: no file appears outside OUT, the input stays
byte-identical, the exit status and the single stderr line are the documented ones, and the run
ends within a bound.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from test_cli import run, tree_digest

BOUND_S = 120  # every refusal below comes well within this (the TensorFlow import aside)
FORGED = "x\ngraphrewrite: rewrote 1 site(s), verified OK\x1b[2J\u202e"


def _digest(path: str) -> str:
    """tree_digest that never follows a link nor reads a special file (a link to /dev/zero)."""
    import hashlib
    import stat

    digest = hashlib.sha256()
    for base, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(base, name)
            mode = os.lstat(full).st_mode
            digest.update(os.path.relpath(full, path).encode() + str(stat.S_IFMT(mode)).encode())
            if stat.S_ISLNK(mode):
                digest.update(os.readlink(full).encode())
            elif stat.S_ISREG(mode):
                with open(full, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()


def _listing(root: str, skip: str | None = None) -> set[str]:
    """Every path under ``root`` (``skip`` and what is under it left out)."""
    found = set()
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(base, name)
            if skip is None or not (full == skip or full.startswith(skip + os.sep)):
                found.add(os.path.relpath(full, root))
    return found


def assert_refused(capsys, argv: list[str], status: int, message: str, model: str, watch: str,
                   out: str | None = None, bound: float = BOUND_S) -> str:
    """Runs the CLI on a hostile ``model``: it must fail with ``status`` and one stderr line
    holding ``message`` within ``bound`` seconds, leave ``model`` byte-identical, write nothing under
    ``watch`` (OUT aside: it must not exist either) nor in the working directory."""
    before = _digest(model), _listing(watch, out), set(os.listdir("."))
    started = time.monotonic()
    code, _, err = run(capsys, *argv)
    assert time.monotonic() - started < bound
    assert code == status, err
    assert err.count("\n") == 1 and err.startswith("graphrewrite: error: "), err
    assert message in err, err
    assert (_digest(model), _listing(watch, out), set(os.listdir("."))) == before
    assert out is None or not os.path.lexists(out)
    return err


def _module_model(path: str, kind: str = "plain") -> None:
    """A tf.Module SavedModel ``serve(x) = x @ W`` (64 x 300, one site at --rank=200), with the
    hostile part ``kind`` names in its signature or weight."""
    import numpy as np
    import tensorflow as tf

    shape = [16384, 16384, 64] if kind == "huge_input" else [None, 64]
    weight = np.random.default_rng(0).standard_normal((64, 300)).astype("float32")
    if kind == "nan_weight":
        weight[3, 7] = np.nan

    class Hostile(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(weight, name="hostile_weight")

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)])
        def serve(self, x):
            y = tf.matmul(tf.reshape(x, [-1, 64]), self.w)
            if kind == "hang":  # a loop whose condition never fails (and cannot be folded)
                y += tf.while_loop(lambda i: i + 0.0 * tf.reduce_sum(x) > -1.0, lambda i: i + 1.0, [0.0])[0]
            elif kind == "op_error":  # log of a negative number: CheckNumerics raises
                y = tf.debugging.check_numerics(tf.math.log(y - 1e6), "the model's own check")
            return {"y": y}

    module = Hostile()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def _edit_proto(path: str, edit) -> None:
    from tensorflow.core.protobuf import saved_model_pb2

    pb = os.path.join(path, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    with open(pb, "rb") as f:
        proto.ParseFromString(f.read())
    edit(proto.meta_graphs[0])
    with open(pb, "wb") as f:
        f.write(proto.SerializeToString())


def _string_const(container, name: str, value: str):
    node = container.add(name=name, op="Const")
    node.attr["dtype"].type = 7  # DT_STRING
    node.attr["value"].tensor.dtype = 7
    node.attr["value"].tensor.string_val.append(value.encode())
    return node


@pytest.fixture(scope="module")
def bases(tmp_path_factory, model_factory) -> dict[str, str]:
    """Clean models to copy and make hostile: a tf.Module one and a TF1 Builder one."""
    root = tmp_path_factory.mktemp("hostile_bases")
    tf2 = str(root / "tf2")
    _module_model(tf2)
    return {"tf2": tf2, "tf1": model_factory("tf1_builder")[0]}


@pytest.fixture
def hostile(tmp_path, bases):
    """``hostile(base, edit)`` -> a copy of a base model inside ``tmp_path/model``, edited."""

    def make(base: str, edit=None) -> str:
        path = str(tmp_path / "model")
        shutil.copytree(bases[base], path)
        if edit is not None:
            _edit_proto(path, edit)
        return path

    return make


# -- 1. the saver exemption -----------------------------------------------------------------------


def _tf1_save_in_restore(target: str | None):
    """A SaveV2 run by the TF1 restore op, to ``target`` (or to the model's own prefix: the load
    would overwrite the input's checkpoint)."""

    def edit(meta) -> None:
        graph = meta.graph_def
        save = next(n for n in graph.node if n.name == "save/SaveV2")
        evil = graph.node.add()
        evil.CopyFrom(save)
        evil.name = "evil/SaveV2"
        if target is None:
            evil.input[0] = "save/Const"
        else:
            _string_const(graph.node, "evil/prefix", target)
            evil.input[0] = "evil/prefix"
        next(n for n in graph.node if n.name == "save/restore_all").input.append("^evil/SaveV2")

    return edit


def _tf1_restore_in_a_signature(meta) -> None:
    """A signature output read by the saver's RestoreV2: run there, its prefix is the default
    filename, a path relative to wherever graphrewrite runs."""
    signature = next(iter(meta.signature_def.values()))
    signature.outputs["leak"].name = "save/RestoreV2:0"
    signature.outputs["leak"].dtype = 1


def _tf2_restore_op_is_the_signature(meta) -> None:
    serving = next(n for n in meta.graph_def.node if "signature_wrapper" in n.attr["f"].func.name)
    meta.saver_def.restore_op_name = serving.name


def _tf2_save_inside_restore(target: str):
    def edit(meta) -> None:
        restore = next(f for f in meta.graph_def.library.function if "traced_restore" in f.signature.name)
        _string_const(restore.node_def, "evil_prefix", target)
        save = restore.node_def.add(name="evil_save", op="SaveV2",
                                    input=["evil_prefix:output:0", "RestoreV2/tensor_names:output:0",
                                           "RestoreV2/shape_and_slices:output:0", "RestoreV2/tensor_names:output:0"])
        save.attr["dtypes"].list.type.append(7)
        restore.control_ret["evil_save"] = "evil_save"

    return edit


@pytest.mark.parametrize("case", ["tf1 chosen path", "tf1 own prefix", "tf1 restore in a signature", "tf2 restore op",
                                  "tf2 save in restore"])
def test_saver_abuse_is_refused(capsys, tmp_path, hostile, case):
    target = str(tmp_path / "escaped")
    base, edit = {
        "tf1 chosen path": ("tf1", _tf1_save_in_restore(target)),
        "tf1 own prefix": ("tf1", _tf1_save_in_restore(None)),
        "tf1 restore in a signature": ("tf1", _tf1_restore_in_a_signature),
        "tf2 restore op": ("tf2", _tf2_restore_op_is_the_signature),
        "tf2 save in restore": ("tf2", _tf2_save_inside_restore(target)),
    }[case]
    model = hostile(base, edit)
    out = str(tmp_path / "out")
    op = "RestoreV2" if "signature" in case else "SaveV2"
    assert_refused(capsys, ["compress", model, out, "--rank=200"], 4, op, model, str(tmp_path), out)
    assert_refused(capsys, ["inspect", model, "--rank=200"], 4, op, model, str(tmp_path))
    assert not os.path.exists(target)


# -- 2. I/O ops the deny list missed, wherever they sit --------------------------------------------


def _inject(op: str, attrs: dict, where: str):
    """Adds an ``op`` node to the serving function, a TF1 main_op, or as a function attribute."""

    def edit(meta) -> None:
        if where == "tf1 main_op":
            node = meta.graph_def.node.add(name="evil_init", op=op)
            meta.collection_def["saved_model_main_op"].node_list.value.append("evil_init")
        else:
            function = next(f for f in meta.graph_def.library.function if "traced" not in f.signature.name)
            if where == "attribute":  # a call whose function attribute names a primitive op
                node = function.node_def.add(name="evil_call", op="PartitionedCall")
                node.attr["f"].func.name = op
                return
            node = function.node_def.add(name="evil", op=op)
        for key, value in attrs.items():
            node.attr[key].s = value

    return edit


INJECTED = {
    "DumpTensor": ("tf2", "function", {}),
    "CacheDatasetV2": ("tf2", "function", {}),
    "CalibrationStatisticsSaver": ("tf2", "function", {}),
    "DatasetFromGraph": ("tf2", "function", {}),  # runs a GraphDef held in a string constant
    "WriteFile": ("tf2", "attribute", {}),
    "PrintV2": ("tf2", "function", {"output_stream": b"file:///tmp/escaped"}),
    "ReadFile": ("tf1", "tf1 main_op", {}),
}


@pytest.mark.parametrize("op", sorted(INJECTED))
def test_io_ops_are_refused_by_name_and_place(capsys, tmp_path, hostile, op):
    base, where, attrs = INJECTED[op]
    model = hostile(base, _inject(op, attrs, where))
    code, stdout, err = run(capsys, "scan", model)
    assert code == 4 and err.count("\n") == 1, err
    refused = [line for line in stdout.splitlines() if line.startswith("  refused: ")]
    assert len(refused) == 1 and op in refused[0], stdout
    assert ("the graph" if where == "tf1 main_op" else "in function __inference_") in refused[0]
    out = str(tmp_path / "out")
    assert_refused(capsys, ["compress", model, out, "--rank=200"], 4, op, model, str(tmp_path), out)


# -- 3. reads outside the model --------------------------------------------------------------------


@pytest.fixture
def rewritten(tmp_path, compressed_factory) -> str:
    path = str(tmp_path / "rewritten")
    shutil.copytree(compressed_factory("digits_mlp", rank=200)[1], path)
    return path


def _asset_outside(name: str):
    def edit(meta) -> None:
        asset = next(a for a in meta.asset_file_def if a.filename == "graphrewrite_ir.json")
        asset.filename = name

    return edit


def test_an_asset_pointing_out_of_the_model_is_refused(capsys, tmp_path, rewritten):
    shutil.copy(os.path.join(rewritten, "assets", "graphrewrite_ir.json"), tmp_path / "outside.json")
    _edit_proto(rewritten, _asset_outside("../../outside.json"))
    final = str(tmp_path / "final")
    for argv in (["export", rewritten, final, "--force"], ["inspect", rewritten], ["scan", rewritten]):
        assert_refused(capsys, argv, 3, "points outside the model's assets", rewritten, str(tmp_path), final)


def test_an_asset_linked_out_of_the_model_is_refused(capsys, tmp_path, rewritten):
    ir = os.path.join(rewritten, "assets", "graphrewrite_ir.json")
    shutil.move(ir, tmp_path / "outside.json")
    os.symlink(tmp_path / "outside.json", ir)
    final = str(tmp_path / "final")
    for argv in (["export", rewritten, final, "--force"], ["inspect", rewritten]):
        assert_refused(capsys, argv, 3, "symbolic link out of the model", rewritten, str(tmp_path), final)


# -- 4. model code that hangs or exhausts memory ---------------------------------------------------


@pytest.mark.parametrize("kind, env, status, message", [
    ("hang", {"GRAPHREWRITE_RUN_TIMEOUT": "10"}, 10, "did not finish within 10 s"),
    ("huge_input", {"GRAPHREWRITE_RUN_MEMORY": str(8 << 30)}, 10, "ran out of memory of 8.0 GiB"),
    ("plain", {"GRAPHREWRITE_RUN_MEMORY": str(1 << 28)}, 10, "running the input model"),  # 256 MiB: TF cannot start
    ("op_error", {}, 3, "the model's own ops failed: InvalidArgumentError"),
])
def test_model_code_runs_in_the_sandbox(capsys, tmp_path, monkeypatch, kind, env, status, message):
    model = str(tmp_path / "model")
    _module_model(model, kind)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = str(tmp_path / "out")
    assert_refused(capsys, ["compress", model, out, "--rank=200"], status, message, model, str(tmp_path), out)


def test_the_sandbox_has_no_network_and_writes_no_file():
    from graphrewrite.rewriting import sandbox

    assert sandbox.network_isolated()  # CI runs as root on Linux, where a namespace is allowed
    limits = sandbox.Limits(30.0, None)
    assert sandbox.run("graphrewrite.rewriting.sandbox:interfaces", limits=limits) == []
    assert sandbox.run("graphrewrite.rewriting.sandbox:interfaces", limits=sandbox.Limits(30.0, None, allow_io=True))


# -- 5. symlinks and special files in the input; an OUT that is a symlink ---------------------------


@pytest.mark.parametrize("kind, message", [
    ("link to a file outside", "symbolic link out of the model"),
    ("link to a directory outside", "symbolic link out of the model"),
    ("link to /dev/zero", "symbolic link out of the model"),
    ("fifo", "is a FIFO, not a regular file"),
])
def test_links_out_and_special_files_are_input_errors(capsys, tmp_path, hostile, kind, message):
    model = hostile("tf2")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("secret")
    entry = os.path.join(model, "assets", "vocabulary.txt")
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    if kind == "fifo":
        os.mkfifo(entry)
    else:
        os.symlink({"link to a file outside": secret / "key.txt", "link to a directory outside": secret,
                    "link to /dev/zero": "/dev/zero"}[kind], entry)
    out = str(tmp_path / "out")
    for method in ("none", "low_rank"):
        assert_refused(capsys, ["compress", model, out, "--rank=200", "--method", method], 3, message, model,
                       str(tmp_path), out)


def test_method_none_copies_links_inside_the_model_as_files(capsys, tmp_path, hostile):
    model = hostile("tf2")
    os.makedirs(os.path.join(model, "assets"), exist_ok=True)
    with open(os.path.join(model, "assets", "a.txt"), "w") as f:
        f.write("inside")
    os.symlink("a.txt", os.path.join(model, "assets", "b.txt"))
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", model, str(out), "--method", "none", "-q")
    assert code == 0, err
    copied = out / "assets" / "b.txt"
    assert not copied.is_symlink() and copied.read_text() == "inside"


def test_an_out_that_is_a_symlink_leaves_no_stale_temporary(capsys, tmp_path, bases):
    target = tmp_path / "previous"
    shutil.copytree(bases["tf2"], target)
    before = tree_digest(str(target))
    out = tmp_path / "out"
    os.symlink(target, out)
    code, _, err = run(capsys, "compress", bases["tf2"], str(out), "--rank=200", "--overwrite", "-q")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["out", "previous"]  # no hidden .out.graphrewrite-* left
    assert not out.is_symlink() and (out / "saved_model.pb").is_file()
    assert tree_digest(str(target)) == before  # the link was replaced, not what it pointed at


# -- 6. names that forge output lines --------------------------------------------------------------


def _forged_names(meta) -> None:
    function = next(f for f in meta.graph_def.library.function if "traced" not in f.signature.name)
    function.node_def.add(name=FORGED, op="WriteFile")
    meta.signature_def[FORGED].CopyFrom(meta.signature_def["serving_default"])


def test_model_names_are_escaped_in_every_line(capsys, tmp_path, hostile):
    model = hostile("tf2", _forged_names)
    out = str(tmp_path / "out")
    err = assert_refused(capsys, ["compress", model, out, "--rank=200"], 4, "WriteFile", model, str(tmp_path), out)
    assert "\\x0agraphrewrite: rewrote" in err and "\x1b" not in err and "\\u202e" in err
    code, stdout, _ = run(capsys, "scan", model)
    assert code == 4 and "\x1b" not in stdout and "\u202e" not in stdout
    assert [line.split(" ")[0] for line in stdout.splitlines()] == ["tag", "", "not"], stdout
    code, stdout, _ = run(capsys, "scan", model, "--json")
    found = json.loads(stdout)["meta_graphs"][0]
    assert FORGED in found["signatures"] and found["unsafe_ops"][0]["node"] == FORGED  # JSON stays exact


# -- 7. exit statuses of bad weights ---------------------------------------------------------------


def test_a_nan_weight_is_an_input_error_naming_it(capsys, tmp_path):
    model = str(tmp_path / "model")
    _module_model(model, "nan_weight")
    out = str(tmp_path / "out")
    assert_refused(capsys, ["compress", model, out, "--rank=200"], 3, "weight 'hostile_weight' holds NaN or Inf",
                   model, str(tmp_path), out)


# -- heavy: a graph that crashes TensorFlow; a killed graphrewrite leaves nothing running ----------


def _chain(length: int):
    """A chain of ``length`` Identity ops before the serving function's output."""

    def edit(meta) -> None:
        function = next(f for f in meta.graph_def.library.function if f.signature.name.startswith("__inference_serve"))
        key = next(iter(function.ret))
        previous = function.ret[key]
        for i in range(length):
            function.node_def.add(name=f"chain{i}", op="Identity", input=[previous]).attr["T"].type = 1
            previous = f"chain{i}:output:0"
        function.ret[key] = previous

    return edit


@pytest.mark.heavy
def test_a_graph_that_crashes_tensorflow_stops_with_one_line(capsys, tmp_path, hostile):
    # 300,000 chained ops: TensorFlow's load or first call overflows its stack (SIGSEGV), in the
    # sandbox, before graphrewrite's own process loads the model (3.5 minutes on 2 cores).
    model = hostile("tf2", _chain(300_000))
    out = str(tmp_path / "out")
    assert_refused(capsys, ["compress", model, out, "--rank=200"], 10, "crashed (signal SIGSEGV)", model,
                   str(tmp_path), out, bound=600)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


@pytest.mark.heavy
def test_a_killed_run_leaves_no_sandbox_running(tmp_path):
    import signal
    import subprocess
    import sys

    from test_cli import ROOT

    model = str(tmp_path / "model")
    _module_model(model, "hang")
    env = {**os.environ, "GRAPHREWRITE_RUN_TIMEOUT": "600"}
    proc = subprocess.Popen([sys.executable, "-m", "graphrewrite.cli", "compress", model, str(tmp_path / "out"),
                             "--rank=200"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    server = worker = None
    while time.monotonic() < deadline and worker is None:  # wait until the worker runs the model
        server = next(iter(_children(proc.pid)), None)
        worker = next(iter(_children(server)), None) if server else None
        time.sleep(0.5)
    assert worker is not None
    time.sleep(5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone = time.monotonic() + 10
    while time.monotonic() < gone and any(os.path.exists(f"/proc/{p}") for p in (server, worker)):
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{p}") for p in (server, worker))
