"""Compressing a SavedModel with more than 2 GB of weights: peak memory, time, no weight in a protobuf.

Writes a tf.Module SavedModel with ``--count`` float32 variables of ``--rows`` x ``--cols`` (by
default three 1 GiB weights, 3.2 GB in all: more than a protobuf can hold), then runs
``graphrewrite compress --rank=400`` on it in a subprocess and measures its wall time and peak RSS
(``wait4``'s ``ru_maxrss`` of that one process). Two TensorFlow-only baselines, each in its own
process, are measured the same way: importing TensorFlow (its own footprint) and importing it and
loading the model. Target: peak RSS of compress at most 2x the weights plus TensorFlow's own
footprint. It also checks that no protobuf of the output holds a weight: every file outside
``variables/`` must stay far below one weight's size, and no Const of ``saved_model.pb`` may hold
more than 1 MB. Tall weights keep the SVDs short; all temporary files are removed at the end.

    python benchmarks/big_model.py [--rows 1048576] [--cols 256] [--count 3] [--rank 400]
                                   [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import common

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONST_LIMIT = 1 << 20

_WRITE = """
import sys
import numpy as np
import tensorflow as tf

path, rows, cols, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])


class Big(tf.Module):
    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.weights = []
        for i in range(count):
            value = rng.standard_normal((rows, cols), dtype=np.float32)
            self.weights.append(tf.Variable(value, name=f"w{i}"))
            del value

    @tf.function(input_signature=[tf.TensorSpec([None, rows], tf.float32)])
    def serve(self, x):
        return {"y": tf.add_n([tf.matmul(x, w) for w in self.weights])}


module = Big()
tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
"""

_IMPORT = "import tensorflow as tf; tf.constant(1.0).numpy()"
_LOAD = "import sys, tensorflow as tf; m = tf.saved_model.load(sys.argv[1]); print(len(m.weights))"


class Run:
    """One measured process: wall seconds, peak RSS, timestamped stderr lines, sampled RSS."""

    def __init__(self, argv: list[str]) -> None:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        self.lines: list[tuple[float, str]] = []
        self.samples: list[tuple[float, int]] = []
        done = threading.Event()

        def read() -> None:
            for line in proc.stderr:
                self.lines.append((time.monotonic() - start, line.rstrip()))

        def sample() -> None:
            while not done.wait(0.1):
                rss = _rss(proc.pid)
                if rss:
                    self.samples.append((time.monotonic() - start, rss))

        threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=sample, daemon=True)]
        for thread in threads:
            thread.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
        finally:
            done.set()
        self.seconds = time.monotonic() - start
        self.peak = usage.ru_maxrss * 1024
        for thread in threads:
            thread.join(timeout=10)
        if os.waitstatus_to_exitcode(status) != 0:
            tail = "\n".join(line for _, line in self.lines[-20:])
            raise SystemExit(f"{' '.join(argv[:4])}... failed ({os.waitstatus_to_exitcode(status)}):\n{tail}")

    def phases(self) -> list[list[str]]:
        """Each progress line with its start time and the largest RSS sampled until the next one."""
        rows = []
        for i, (begin, line) in enumerate(self.lines):
            end = self.lines[i + 1][0] if i + 1 < len(self.lines) else self.seconds
            rss = max((r for t, r in self.samples if begin <= t <= end), default=0)
            rows.append([f"{begin:.1f}", line.removeprefix("graphrewrite: ")[:60], gb(rss)])
        return rows


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def largest_const(saved_model_pb: str) -> int:
    """Bytes of the largest Const value in the graph or any library function."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(saved_model_pb, "rb") as f:
        proto.ParseFromString(f.read())
    largest = 0
    for meta in proto.meta_graphs:
        nodes = list(meta.graph_def.node)
        for function in meta.graph_def.library.function:
            nodes.extend(function.node_def)
        for node in nodes:
            if node.op == "Const":
                largest = max(largest, node.attr["value"].tensor.ByteSize())
    return largest


def files_outside_variables(model: str) -> dict[str, int]:
    sizes = {}
    for base, _, files in os.walk(model):
        if os.path.relpath(base, model).split(os.sep)[0] == "variables":
            continue
        for name in files:
            path = os.path.join(base, name)
            sizes[os.path.relpath(path, model)] = os.path.getsize(path)
    return sizes


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1 << 20)
    parser.add_argument("--cols", type=int, default=256)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--rank", type=int, default=400)
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the models are written")
    parser.add_argument("--keep", action="store_true", help="keep the models (they are large)")
    args = parser.parse_args()

    weight_bytes = args.rows * args.cols * 4 * args.count
    need = int(weight_bytes * 2.6)  # input, rewritten output (A + factors), temporary copies
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        raise SystemExit(f"{args.workdir}: {gb(free)} free, {gb(need)} needed")
    work = tempfile.mkdtemp(prefix="graphrewrite-big-", dir=args.workdir)
    try:
        src, out = os.path.join(work, "src"), os.path.join(work, "out")
        write_s = Run([sys.executable, "-c", _WRITE, src, str(args.rows), str(args.cols), str(args.count)]).seconds
        tf_rss = Run([sys.executable, "-c", _IMPORT]).peak
        load_rss = Run([sys.executable, "-c", _LOAD, src]).peak
        run = Run([sys.executable, "-m", "graphrewrite.cli", "compress", src, out, f"--rank={args.rank}", "--progress"])
        seconds, peak = run.seconds, run.peak
        outside = files_outside_variables(out)
        biggest_file = max(outside.values())
        const = largest_const(os.path.join(out, "saved_model.pb"))
        one_weight = args.rows * args.cols * 4
        limit = 2 * weight_bytes + tf_rss

        targets = common.Targets()
        rows = [
            ["weights", f"{args.count} x {args.rows}x{args.cols} float32", gb(weight_bytes), ""],
            ["TensorFlow import (its footprint)", "", gb(tf_rss), ""],
            ["TensorFlow import + load", "", gb(load_rss), f"{load_rss / weight_bytes:.2f}x weights"],
            ["compress peak RSS", f"rank={args.rank}", gb(peak), f"{peak / weight_bytes:.2f}x weights"],
            ["  target", "2 x weights + TF import", gb(limit),
             targets.check(peak <= limit, f"peak RSS {gb(peak)} > {gb(limit)}")],
            ["  compress minus TF import", "", gb(peak - tf_rss), f"{(peak - tf_rss) / weight_bytes:.2f}x weights"],
            ["compress wall time", "", f"{seconds:.0f} s", ""],
            ["writing the input model", "", f"{write_s:.0f} s", ""],
            ["largest file outside variables/", max(outside, key=outside.get), f"{biggest_file:,} B",
             targets.check(biggest_file < one_weight // 100, "a file outside variables/ holds a weight")],
            ["largest Const in saved_model.pb", "", f"{const:,} B",
             targets.check(const <= CONST_LIMIT, f"a Const of {const:,} bytes")],
        ]
        print(f"# compress of a {gb(weight_bytes)} SavedModel; {common.machine()}")
        print(common.table(["what", "detail", "value", ""], rows))
        print(common.table(["s", "compress phase", "max RSS sampled"], run.phases()))
        targets.exit()
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash must not dump gigabytes of core
    main()
