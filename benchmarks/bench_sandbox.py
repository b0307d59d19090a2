"""What running the model in the sandbox costs (graphrewrite.rewriting.sandbox), against running it in process.

Measured in one process, as the CLI and the test suite use it: the one-off start of the sandbox
server (a Python that imports TensorFlow, overlapped with the scan and load in ``compress``), an
empty job (on the reused worker, and on a fresh one as after a failure), and the two jobs ``compress`` runs on the
digits MLP, each against the same work done in this process: the reference outputs of the input
model (load + every signature on sample inputs) and the verification of the rewritten model
(reload + alpha = 1 and alpha = 0 outputs). Target: at most 1 s of overhead per ``compress``
beyond the in-process work, so that the test suite's ~100 compress calls stay affordable.

    python benchmarks/bench_sandbox.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import common

HERE = os.path.dirname(os.path.abspath(__file__))
MLP = os.path.join(HERE, os.pardir, "testdata", "digits_mlp")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    from graphrewrite import compress, hparams
    from graphrewrite.rewriting import sandbox, verify

    start = time.perf_counter()
    sandbox.run("graphrewrite.rewriting.sandbox:interfaces")
    server = time.perf_counter() - start
    empty = common.median_time(lambda: sandbox.run("graphrewrite.rewriting.sandbox:interfaces"), args.repeat, warmup=0)
    flip = iter([True, False] * args.repeat)  # other limits each time: a new worker per job
    fresh = common.median_time(lambda: sandbox.run("graphrewrite.rewriting.sandbox:interfaces",
                                                   limits=sandbox.Limits(60.0, None, next(flip))), args.repeat, warmup=0)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        compress(MLP, out, hparams.resolve(None, {"rank": 200}))
        expected = verify.reference_job(MLP, ["serve"])
        rows = []
        for name, job, job_args in (("reference outputs", "reference_job", (MLP, ["serve"])),
                                    ("verification", "verify_output", (expected, out, True))):
            inside = common.median_time(lambda j=job, a=job_args: sandbox.run(f"graphrewrite.rewriting.verify:{j}", *a),
                                        args.repeat, warmup=0)
            local = common.median_time(lambda j=job, a=job_args: getattr(verify, j)(*a), args.repeat, warmup=0)
            rows.append([name, f"{local:.2f} s", f"{inside:.2f} s", f"{inside - local:+.2f} s"])
    print(common.machine())
    print(f"sandbox server start (once per process, overlapped with the scan and load): {server:.1f} s")
    print(f"empty job, reused worker (pipe round trip): {empty * 1000:.0f} ms; on a fresh worker (fork, "
          f"limits, network namespace, as after a failure): {fresh * 1000:.0f} ms")
    print(common.table(["digits MLP", "in process", "in the sandbox", "overhead"], rows))
    overhead = sum(float(r[3].split()[0]) for r in rows)
    print(f"overhead per compress: {overhead:+.2f} s (target <= 1 s)")
    return 0 if overhead <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
