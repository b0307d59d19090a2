"""Rewrite time of ``compress`` against its floor, on a ResNet50-size and a BERT-base-size model.

The floor, measured in the same process: loading the model, a LAPACK SVD (gesdd) of every matrix
compress factors, and saving the loaded model again. Targets (issue 8): ``compress`` (verification
included) at most 1.5x the floor; where k is much smaller than min(m, n) the randomized SVD keeps
the factorisation itself below the full-SVD floor. Peak memory of ``compress`` (RSS of a child
process) is reported against the model's weight bytes. Random weights (the figures do not depend
on training); the models are built with Keras 3.

    python benchmarks/bench_rewrite_time.py [--only resnet50|bert] [--rank 400] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import common


def build_resnet50(path: str) -> None:
    import keras

    keras.utils.set_random_seed(0)
    keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3)).export(path, verbose=False)


def build_bert_base(path: str, layers: int = 12, width: int = 768, heads: int = 12, ffn: int = 3072,
                    vocab: int = 30522, length: int = 128) -> None:
    import keras

    keras.utils.set_random_seed(0)
    tokens = keras.Input((length,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(vocab, width, name="embeddings")(tokens)
    for i in range(layers):
        a = keras.layers.MultiHeadAttention(heads, width // heads, name=f"layer_{i}_attention")(h, h)
        h = keras.layers.LayerNormalization(name=f"layer_{i}_ln1")(h + a)
        f = keras.layers.Dense(ffn, activation="gelu", name=f"layer_{i}_ffn_in")(h)
        f = keras.layers.Dense(width, name=f"layer_{i}_ffn_out")(f)
        h = keras.layers.LayerNormalization(name=f"layer_{i}_ln2")(h + f)
    keras.Model(tokens, h).export(path, verbose=False)


def floor(src: str, rank: int, scratch: str) -> dict[str, float]:
    """Load + full SVD of every planned matrix + save, timed separately (one process)."""
    import scipy.linalg
    import tensorflow as tf

    from graphrewrite import hparams, views
    from graphrewrite.rewriting import pipeline

    _, plan, _ = pipeline.plan_model(src, hparams.resolve(None, {"rank": rank}))
    start = time.perf_counter()
    loaded = tf.saved_model.load(src)
    t_load = time.perf_counter() - start
    by_name = {v.name[:-2]: v for v in loaded.variables}
    start = time.perf_counter()
    for site in plan.sites:
        matrix = views.apply_numpy(by_name[site.variable.name].numpy(), site.view)
        scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesdd", check_finite=False)
    t_svd = time.perf_counter() - start
    start = time.perf_counter()
    tf.saved_model.save(loaded, os.path.join(scratch, "resaved"), signatures=loaded.signatures)
    t_save = time.perf_counter() - start
    weights = sum(v.numpy().nbytes for v in loaded.variables)
    return {"load": t_load, "svd": t_svd, "save": t_save, "total": t_load + t_svd + t_save,
            "sites": len(plan.sites), "weight_bytes": weights}


def timed_compress(src: str, out: str, rank: int, fast: bool) -> dict[str, float]:
    """``graphrewrite compress`` in a child process: wall time (after TF import) and peak RSS."""
    code = (
        "import json, sys, time\n"
        "import tensorflow\n"
        "from graphrewrite import compress, hparams\n"
        "start = time.perf_counter()\n"
        f"r = compress({src!r}, {out!r}, hparams.resolve(None, {{'rank': {rank}}}), verify={not fast})\n"
        "print(json.dumps({'seconds': time.perf_counter() - start, 'svd': [s.size.details.get('svd') for s in r.plan.sites]}))\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_rss"] = max(peak, before) * 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["resnet50", "bert"], default=None)
    parser.add_argument("--rank", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each measurement; the best counts")
    args = parser.parse_args()
    builders = {"resnet50": ("ResNet50 (25.6M params)", build_resnet50),
                "bert": ("BERT-base-size encoder (110M params)", build_bert_base)}
    targets = common.Targets()
    rows = []
    for key, (label, build) in builders.items():
        if args.only and key != args.only:
            continue
        work = tempfile.mkdtemp(prefix=f"bench-rewrite-{key}-")
        try:
            src = os.path.join(work, "src")
            build(src)
            # The machines are shared: each figure is the best of --repeat runs, taken in turns.
            runs = []
            for i in range(args.repeat):
                runs.append((floor(src, args.rank, os.path.join(work, f"floor{i}")),
                             timed_compress(src, os.path.join(work, f"out{i}"), args.rank, fast=False),
                             timed_compress(src, os.path.join(work, f"out_fast{i}"), args.rank, fast=True)))
            base = {key: min(r[0][key] for r in runs) for key in ("load", "svd", "save")}
            base.update(total=base["load"] + base["svd"] + base["save"], sites=runs[0][0]["sites"],
                        weight_bytes=runs[0][0]["weight_bytes"])
            full = min((r[1] for r in runs), key=lambda r: r["seconds"])
            full["peak_rss"] = max(r[1]["peak_rss"] for r in runs)
            fast = min((r[2] for r in runs), key=lambda r: r["seconds"])
            ratio = full["seconds"] / base["total"]
            methods = sorted({m or "full" for m in full["svd"]})
            rows.append([label, base["sites"], f"{base['load']:.1f} + {base['svd']:.1f} + {base['save']:.1f} = {base['total']:.1f}",
                         f"{full['seconds']:.1f}", f"{fast['seconds']:.1f}", f"{ratio:.2f}",
                         targets.check(ratio <= 1.5, f"{label}: compress {ratio:.2f}x the floor"),
                         f"{full['peak_rss'] / 2**30:.2f} GiB / {base['weight_bytes'] / 2**30:.2f} GiB",
                         ",".join(methods)])
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"# compress wall time (s) vs the floor; rank={args.rank}; {common.machine()}")
    print(common.table(["model", "sites", "floor: load + SVD + save", "compress", "compress --fast",
                        "ratio", "target <= 1.5", "peak RSS / weights", "SVD"], rows))
    targets.exit()


if __name__ == "__main__":
    main()
