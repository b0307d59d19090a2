"""Reliability of the command line on bad input, untrusted models and interrupted runs.

Every bad input is one line on stderr and its own exit status, and the input stays byte-for-byte
as it was; the output appears atomically (also when the process is SIGKILLed at any moment); models
with file, network or process ops are refused before anything of them runs. The option and path
cases already in test_cli.py are not repeated here. There is no option to pick a signature (only
``--tag-set``), so "unknown signature" has no case.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from test_cli import MLP, ROOT, run, tree_digest

CHECKPOINT_DATA = os.path.join("variables", "variables.data-00000-of-00001")
CHECKPOINT_INDEX = os.path.join("variables", "variables.index")


def assert_one_line_error(capsys, argv: list[str], status: int, message: str, *untouched: str) -> str:
    """Runs the CLI; it must fail with ``status`` and one stderr line holding ``message``."""
    before = [tree_digest(path) for path in untouched]
    code, _, err = run(capsys, *argv)
    assert code == status, err
    assert err.count("\n") == 1 and err.startswith("graphrewrite: error: "), err
    assert message in err, err
    assert [tree_digest(path) for path in untouched] == before
    return err


def flip_bytes(path: str, every: int = 97) -> None:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    for i in range(len(data) // 3, len(data), every):
        data[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(data)


def truncate(path: str, keep: int) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:keep])


def _half(path: str) -> None:
    truncate(path, os.path.getsize(path) // 2)


# -- damaged models --------------------------------------------------------------------------------

CHECKPOINT_DAMAGE: dict[str, Callable[[str], None]] = {
    "index deleted": lambda model: os.remove(os.path.join(model, CHECKPOINT_INDEX)),
    "data deleted": lambda model: os.remove(os.path.join(model, CHECKPOINT_DATA)),
    "variables/ deleted": lambda model: shutil.rmtree(os.path.join(model, "variables")),
    "data truncated": lambda model: _half(os.path.join(model, CHECKPOINT_DATA)),
    "data emptied": lambda model: truncate(os.path.join(model, CHECKPOINT_DATA), 0),
    "data bytes flipped": lambda model: flip_bytes(os.path.join(model, CHECKPOINT_DATA)),
    "index bytes flipped": lambda model: flip_bytes(os.path.join(model, CHECKPOINT_INDEX), every=13),
}


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGE))
@pytest.mark.parametrize("model", ["digits_mlp", "tf1_builder"])
def test_damaged_checkpoint_is_one_line(capsys, tmp_path, model_factory, copy_model, model, damage):
    src = copy_model(model_factory(model)[0])
    CHECKPOINT_DAMAGE[damage](src)
    out = tmp_path / "out"
    assert_one_line_error(capsys, ["compress", src, str(out), "--rank=200"], 3, src, src)
    assert not out.exists()


@pytest.mark.parametrize("keep", [0, 1, 7, 0.5, -1])
def test_truncated_saved_model_pb(capsys, tmp_path, copy_model, keep):
    src = copy_model(MLP)
    pb = os.path.join(src, "saved_model.pb")
    size = os.path.getsize(pb)
    truncate(pb, int(size * keep) if isinstance(keep, float) else keep % size)
    out = tmp_path / "out"
    err = assert_one_line_error(capsys, ["compress", src, str(out), "--rank=200"], 3, "saved_model.pb", src)
    assert "corrupted" in err or "truncated" in err
    assert not out.exists()
    assert_one_line_error(capsys, ["scan", src], 3, "saved_model.pb", src)


def _cli_subprocess(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "graphrewrite.cli", *argv], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


@pytest.mark.heavy  # 28 s; test_fast_cli keeps the CLI's quiet stderr in the default suite
def test_tf1_model_keeps_stderr_clean(tmp_path, model_factory, copy_model):
    # TensorFlow's Python warnings (deprecations, reference variables) must not reach stderr: a
    # success with -q prints nothing there, and a failure prints exactly its one line.
    src = copy_model(model_factory("tf1_builder")[0])
    proc = _cli_subprocess("compress", src, str(tmp_path / "out"), "--rank=200", "-q")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    flip_bytes(os.path.join(src, CHECKPOINT_DATA))
    proc = _cli_subprocess("compress", src, str(tmp_path / "again"), "--rank=200")
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1, proc.stderr


def test_rewritten_model_without_its_manifest_is_refused(capsys, tmp_path, compressed_factory, copy_model):
    # Deleting the manifest asset must not make a rewritten model look like an original one.
    _, out, _, _ = compressed_factory("digits_mlp", rank=200)
    src = copy_model(out)
    os.remove(os.path.join(src, "assets", "graphrewrite_manifest.json"))
    again = tmp_path / "again"
    assert_one_line_error(capsys, ["compress", src, str(again), "--rank=200"], 7, "already rewritten", src)
    assert not again.exists()


# -- where the output goes -------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[..., str]]:
    """``tmpfs(size, read_only=False)`` mounts a small tmpfs (root only; skips where it cannot)."""
    mounted: list[str] = []

    def mount(size: str, read_only: bool = False) -> str:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        if shutil.which("mount") is None:
            pytest.skip("no mount command to make a tmpfs")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(str(point))
        return str(point)

    yield mount
    for point in mounted:
        subprocess.run(["umount", point], check=False)


def test_unwritable_output_location(capsys, tmp_path, tmpfs):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        where = str(parent)
        if os.access(where, os.W_OK):  # root ignores permission bits: use a read-only mount
            where = tmpfs("1m", read_only=True)
        out = os.path.join(where, "out")
        assert_one_line_error(capsys, ["compress", MLP, out, "--rank=200"], 5, "cannot write", MLP)
        assert os.listdir(where) == []
    finally:
        parent.chmod(0o700)


def test_full_disk_on_a_small_tmpfs(capsys, tmpfs):
    where = tmpfs("256k")
    out = os.path.join(where, "out")
    assert_one_line_error(capsys, ["compress", MLP, out, "--rank=200"], 5, out, MLP)
    assert os.listdir(where) == []  # neither the output nor its temporary directory is left


# The limit is set inside the child: preexec_fn is unsafe in a process with threads (TensorFlow's).
_LIMITED = """
import resource, signal, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
from graphrewrite.cli import main
main(sys.argv[1:])
"""


def test_full_disk_by_a_file_size_limit(tmp_path):
    # The same failure as a full disk (a write that cannot complete), without root.
    out = tmp_path / "out"
    before = tree_digest(MLP)
    proc = subprocess.run([sys.executable, "-c", _LIMITED, "compress", MLP, str(out), "--rank=200"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("graphrewrite: error: "), proc.stderr
    assert os.listdir(tmp_path) == []
    assert tree_digest(MLP) == before


def test_output_directory_gets_the_usual_permissions(capsys, tmp_path):
    # The output is renamed from a mkdtemp directory (mode 0700); a model served by another user
    # (a serving container, a shared volume) must be readable like any directory the user makes.
    umask = os.umask(0o022)
    try:
        out = tmp_path / "out"
        code, _, err = run(capsys, "compress", MLP, str(out), "--rank=200", "--fast", "-q")
        assert code == 0, err
        assert out.stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(umask)


# -- untrusted models ------------------------------------------------------------------------------


# kind (":" how the serving function is tied to the saver) -> the op to be named.
UNSAFE_OPS = {"write_file": "WriteFile", "print_to_file": "PrintV2", "saver_op": "SaveV2",
              "saver_op:edge": "SaveV2", "saver_op:attr": "SaveV2", "read_table": "InitializeTableFromTextFileV2"}


def _unsafe_model(path: str, kind: str, target: str) -> None:
    """A tf.Module SavedModel whose serving signature writes ``target`` in the way ``kind`` says
    (``read_table``: reads a file into a lookup table instead)."""
    import tensorflow as tf

    class Unsafe(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal((64, 300), seed=(1, 2)))
            if kind == "read_table":
                vocab = os.path.join(os.path.dirname(path), "vocabulary.txt")
                with open(vocab, "w") as f:
                    f.write("a\nb\n")
                self.table = tf.lookup.StaticHashTable(tf.lookup.TextFileInitializer(
                    vocab, tf.string, tf.lookup.TextFileIndex.WHOLE_LINE, tf.int64,
                    tf.lookup.TextFileIndex.LINE_NUMBER), -1)

        @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32)])
        def serve(self, x):
            y = tf.matmul(x, self.w)
            if kind == "write_file":
                tf.io.write_file(target, tf.strings.as_string(tf.reduce_sum(y)))
            elif kind == "print_to_file":
                tf.print(tf.reduce_sum(y), output_stream="file://" + target)
            elif kind == "read_table":
                y = y + tf.cast(self.table.lookup(tf.constant("b")), tf.float32)
            else:  # a checkpoint written anywhere: a saver op outside the saver
                save = tf.raw_ops.SaveV2(prefix=target, tensor_names=["y"], shape_and_slices=[""], tensors=[y])
                with tf.control_dependencies([save]):
                    y = tf.identity(y)
            return {"y": y}

    module = Unsafe()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


def _link_serving_to_the_saver(path: str, how: str) -> None:
    """Makes the serving function look "reached by the SaverDef" while the model loads and runs as
    before: by a control edge from the serving call node to the saver's restore node, or by one
    more function attribute on the restore node naming the serving function."""
    from tensorflow.core.protobuf import saved_model_pb2

    pb = os.path.join(path, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    with open(pb, "rb") as f:
        proto.ParseFromString(f.read())
    meta = proto.meta_graphs[0]
    restore = next(n for n in meta.graph_def.node if n.name == meta.saver_def.restore_op_name)
    serving = next(n for n in meta.graph_def.node if "signature_wrapper" in n.attr["f"].func.name)
    if how == "edge":
        restore.input.append(f"^{serving.name}")
    else:
        restore.attr["also"].func.name = serving.attr["f"].func.name
    with open(pb, "wb") as f:
        f.write(proto.SerializeToString())


@pytest.fixture(scope="module")
def unsafe_models(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """kind -> (model path, the file its serving signature writes)."""
    root = tmp_path_factory.mktemp("unsafe")
    models = {}
    for kind in UNSAFE_OPS:
        name = kind.replace(":", "-")
        path, target = str(root / name), str(root / f"{name}.written")
        _unsafe_model(path, kind.split(":")[0], target)
        if ":" in kind:
            _link_serving_to_the_saver(path, kind.split(":")[1])
        models[kind] = (path, target)
    return models


def _written(target: str) -> list[str]:
    folder, name = os.path.split(target)
    return [f for f in os.listdir(folder) if f.startswith(name)]


@pytest.mark.parametrize("kind", sorted(UNSAFE_OPS))
def test_unsafe_model_is_refused_before_it_runs(capsys, tmp_path, unsafe_models, kind):
    path, target = unsafe_models[kind]
    op = UNSAFE_OPS[kind]
    out = tmp_path / "out"
    err = assert_one_line_error(capsys, ["compress", path, str(out), "--rank=200"], 4, op, path)
    assert "--allow-unsafe-ops" in err
    assert not out.exists() and _written(target) == []
    code, stdout, err = run(capsys, "scan", path)
    assert code == 4 and op in stdout and err.count("\n") == 1, (stdout, err)
    code, _, err = run(capsys, "inspect", path, "--rank=200")
    assert code == 4 and op in err, err
    assert _written(target) == []


def test_allow_unsafe_ops_proceeds_with_one_warning(capsys, tmp_path, unsafe_models):
    path, target = unsafe_models["write_file"]
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", path, str(out), "--rank=200", "--allow-unsafe-ops")
    assert code == 0, err
    assert "rewrote 1 site(s)" in stdout
    assert err.count("\n") == 1 and err.startswith("graphrewrite: warning:") and "WriteFile" in err, err
    os.remove(target)  # verification ran the signature, as the user allowed


# Ops that read or list files, or reach another machine, that the deny list does not name yet.
UNLISTED_OPS = {
    "RecordInput": {"file_pattern": b"/etc/*"},
    "MatchingFilesDataset": {},
    "ExperimentalMatchingFilesDataset": {},
    "SnapshotChunkDataset": {},
    "ListSnapshotChunksDataset": {},
    "RemoteCall": {},
    "StatsAggregatorSetSummaryWriter": {},
    "DecodeProtoV2": {"descriptor_source": b"/etc/passwd"},
}


@pytest.mark.parametrize("op", sorted(UNLISTED_OPS))
def test_scan_names_file_and_network_ops(capsys, copy_model, op):
    from tensorflow.core.protobuf import saved_model_pb2

    src = copy_model(MLP)
    pb = os.path.join(src, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    with open(pb, "rb") as f:
        proto.ParseFromString(f.read())
    function = next(f for f in proto.meta_graphs[0].graph_def.library.function
                    if "traced" not in f.signature.name)
    node = function.node_def.add(name="injected", op=op)
    for key, value in UNLISTED_OPS[op].items():
        node.attr[key].s = value
    with open(pb, "wb") as f:
        f.write(proto.SerializeToString())
    code, stdout, _ = run(capsys, "scan", src)
    assert code == 4 and op in stdout, stdout


def _inject_write_into_source_functions(model: str, target: str) -> None:
    """Adds a WriteFile that every source function kept for ``export`` runs before its output."""
    from tensorflow.core.framework import graph_pb2, types_pb2

    path = os.path.join(model, "assets", "graphrewrite_ir.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for function in data["functions"].values():
        graph = graph_pb2.GraphDef()
        graph.ParseFromString(base64.b64decode(function["graph_def"]))
        for name, text in (("injected_name", target), ("injected_text", "written")):
            const = graph.node.add(name=name, op="Const")
            const.attr["dtype"].type = types_pb2.DT_STRING
            const.attr["value"].tensor.dtype = types_pb2.DT_STRING
            const.attr["value"].tensor.string_val.append(text.encode())
        graph.node.add(name="injected_write", op="WriteFile", input=["injected_name", "injected_text"])
        output = function["outputs"][0].split(":")[0]
        next(n for n in graph.node if n.name == output).input.append("^injected_write")
        function["graph_def"] = base64.b64encode(graph.SerializeToString()).decode("ascii")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def test_export_scans_the_source_functions_it_rebuilds(capsys, tmp_path, compressed_factory, copy_model):
    # export rebuilds the functions kept in graphrewrite_ir.json: they are part of the model too.
    _, rewritten, _, _ = compressed_factory("digits_mlp", rank=200)
    src = copy_model(rewritten)
    target = str(tmp_path / "written_by_export")
    _inject_write_into_source_functions(src, target)
    final = tmp_path / "final"
    assert_one_line_error(capsys, ["export", src, str(final), "--force"], 4, "WriteFile", src)
    assert not final.exists() and not os.path.exists(target)
    code, stdout, _ = run(capsys, "scan", src)
    assert code == 4 and "WriteFile" in stdout


# -- atomic output under SIGKILL -------------------------------------------------------------------

# argv: MODEL OUT [options]; TARGET is OUT.
_KILLER = """
import os, signal, sys
TARGET = os.path.abspath(sys.argv[2])
{patch}
from graphrewrite.cli import main
main(["compress", *sys.argv[1:], "--rank=200"])
"""

# Deterministic kill points, patched into the CLI process.
KILL_POINTS = {
    "after the save": """
import tensorflow as tf
_save = tf.saved_model.save
def _save_then_die(*args, **kwargs):
    _save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
tf.saved_model.save = _save_then_die
""",
    "after moving the previous output away": """
_replace = os.replace
def _replace_then_die(src, dst, **kwargs):
    _replace(src, dst, **kwargs)
    if os.path.abspath(src) == TARGET:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = _replace_then_die
""",
}


def _is_complete_model(path: str) -> bool:
    proc = _cli_subprocess("scan", path)
    return proc.returncode == 0 and "rewritten by graphrewrite" in proc.stdout


def assert_previous_or_nothing(out: str, previous: str | None, returncode: int) -> None:
    """After a run that may have been killed: no output, the previous one, or a complete new one."""
    if returncode == 0:
        assert _is_complete_model(out)
    elif previous is None:
        assert not os.path.lexists(out), os.listdir(out)
    else:
        assert os.path.isdir(out), "the previous output is gone"
        assert tree_digest(out) == previous
    base = os.path.basename(out)
    strays = [n for n in os.listdir(os.path.dirname(out)) if n != base]
    assert all(n.startswith(f".{base}.graphrewrite-") for n in strays), strays


def _previous_output(out: str) -> str:
    shutil.copytree(MLP, out)
    return tree_digest(out)


@pytest.mark.parametrize("point, overwrite", [  # one representative case in the default suite
    pytest.param("after the save", False, marks=pytest.mark.heavy), ("after the save", True),
    pytest.param("after moving the previous output away", True, marks=pytest.mark.heavy),
])
def test_killed_at_a_fixed_point_leaves_previous_or_nothing(tmp_path, point, overwrite):
    out = str(tmp_path / "out")
    previous = _previous_output(out) if overwrite else None
    code = _KILLER.format(patch=KILL_POINTS[point])
    argv = [sys.executable, "-c", code, MLP, out, "-q"] + (["--overwrite"] if overwrite else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-2000:]
    assert_previous_or_nothing(out, previous, proc.returncode)


def _big_model(path: str) -> None:
    """~420 MB of weights that save slowly, one small site that factorises quickly."""
    import numpy as np
    import tensorflow as tf

    class Big(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            rng = np.random.default_rng(0)
            self.table = tf.Variable(rng.standard_normal((100_000, 1024), dtype=np.float32), name="table")
            self.w = tf.Variable(rng.standard_normal((2048, 512), dtype=np.float32), name="w")

        @tf.function(input_signature=[tf.TensorSpec([None, 2048], tf.float32), tf.TensorSpec([None], tf.int32)])
        def serve(self, x, ids):
            return {"y": tf.matmul(x, self.w), "rows": tf.gather(self.table, ids)}

    module = Big()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("big") / "src")
    _big_model(path)
    return path


def _temporary_weights(out: str) -> bool:
    """True once the temporary directory beside ``out`` holds some bytes of the weights."""
    parent, base = os.path.split(out)
    for name in os.listdir(parent):
        if name.startswith(f".{base}.graphrewrite-tmp-"):
            variables = os.path.join(parent, name, "variables")
            for root, _, files in os.walk(variables):
                if any(os.path.getsize(os.path.join(root, f)) > 0 for f in files):
                    return True
    return False


PHASES: dict[str, Callable[[str, str], bool]] = {
    "load": lambda line, out: "loading and inlining" in line,
    "factorisation": lambda line, out: "factorizing" in line,
    "save": lambda line, out: _temporary_weights(out),
    "verification": lambda line, out: "verifying" in line,
}


def _kill_during(argv: list[str], phase: str, out: str) -> subprocess.Popen:
    """Runs the CLI with progress lines and SIGKILLs it as soon as ``phase`` has begun."""
    proc = subprocess.Popen([sys.executable, "-m", "graphrewrite.cli", *argv, "--progress"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True)
    reader.start()
    line, deadline = "", time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.005)
        except queue.Empty:
            pass
        if PHASES[phase](line, out):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    return proc


@pytest.mark.heavy
@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_sigkill_during_a_phase_leaves_previous_or_nothing(tmp_path, big_model, phase, overwrite):
    out = str(tmp_path / "out")
    previous = _previous_output(out) if overwrite else None
    before = tree_digest(big_model)
    argv = ["compress", big_model, out, "--rank=200"] + (["--overwrite"] if overwrite else [])
    proc = _kill_during(argv, phase, out)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before its {phase} could be interrupted"
    assert_previous_or_nothing(out, previous, proc.returncode)
    if phase in ("save", "verification"):  # the kill hit a model being written beside the target
        assert [n for n in os.listdir(tmp_path) if ".graphrewrite-tmp-" in n]
    assert tree_digest(big_model) == before
