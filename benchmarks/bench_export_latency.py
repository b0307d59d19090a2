"""Inference latency of the exported (final) model against the original.

1. An MLP of four 2048x2048 Dense layers at rank=400 (k = 512), batch 64: the theoretical speedup of
   each layer is m n / (k (m + n)) = 2.0; target: measured speedup >= 0.7 x that.
2. A conv net (four 3x3 Conv2D 128 -> 128 on 32x32 images, batch 16) at rank=400: each kernel is
   the 1152x128 matrix, k = min(1152, 128, ceil(128 * 100 / 400)) = 32, so each convolution becomes
   a 3x3x128 -> 32 and a 1x1 32 -> 128 one: FLOP speedup 1152 * 128 / (32 * 1280) = 3.6; target:
   measured speedup >= 0.7 x the FLOP speedup.

3. An embedding table of 32000 x 512 (a BERT-size vocabulary) looked up by 64 x 128 token ids at
   rank=400 (k = 128): the exported model does ``gather(B, ids) @ C``, never ``B @ C``. A lookup
   itself costs no multiply-adds, so the exported one costs more arithmetic (2 k n per token)
   for 4x fewer parameters: no FLOP target; figures reported (the table's FLOP column is "-").

4. An LSTM of 512 units over 64 steps of 512 features (batch 16) at rank=400: kernel and recurrent
   kernel are 512 x 2048 each, k = 128; the exported loop body computes ``(x @ B) @ C`` for both:
   FLOP speedup of the products 512 * 2048 / (128 * 2560) = 3.2; target: measured speedup >= 0.7 x
   that (the cell's element-wise gates and the loop itself are not counted).

All exported at alpha = 0 straight after compress (--force: one-shot), timed in alternation.

    python benchmarks/bench_export_latency.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import common
import numpy as np
import tensorflow as tf


def build_convnet(path: str, channels: int = 128, layers: int = 4, size: int = 32) -> None:
    import keras

    keras.utils.set_random_seed(0)
    x = keras.Input((size, size, channels), name="image")
    h = x
    for i in range(layers):
        h = keras.layers.Conv2D(channels, 3, padding="same", activation="relu", name=f"conv_{i}")(h)
    keras.Model(x, h).export(path, verbose=False)


def build_embedding(path: str, vocabulary: int = 32000, width: int = 512) -> None:
    import keras

    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int32", name="ids")
    keras.Model(ids, keras.layers.Embedding(vocabulary, width, name="embed")(ids)).export(path, verbose=False)


def build_lstm(path: str, units: int = 512, steps: int = 64, width: int = 512) -> None:
    import keras

    keras.utils.set_random_seed(0)
    x = keras.Input((steps, width), name="sequence")
    keras.Model(x, keras.layers.LSTM(units, name="lstm")(x)).export(path, verbose=False)


def measure(name: str, build, shape: tuple[int, ...], rank: int, work: str, rounds: int,
            targets: common.Targets) -> list[str]:
    import graphrewrite
    from graphrewrite import hparams
    from graphrewrite.rewriting import manifest

    src, mid, final = (os.path.join(work, f"{name}_{s}") for s in ("src", "rewritten", "final"))
    build(src)
    graphrewrite.compress(src, mid, hparams.resolve(None, {"rank": rank}), verify=False)
    graphrewrite.export(mid, final, force=True, verify=False)
    totals = manifest.read_dir(mid)["totals"]
    lookup = totals["flops_before"] == 0
    flop_speedup = 0.0 if lookup else totals["flops_before"] / totals["flops_after"]
    original, exported = tf.saved_model.load(src), tf.saved_model.load(final)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 32000, shape).astype(np.int32) if lookup
                    else rng.standard_normal(shape).astype(np.float32))
    run_original = tf.function(lambda: original.serve(x))
    run_exported = tf.function(lambda: exported.serve(x))
    times = common.interleaved_medians({"original": lambda: run_original().numpy(),
                                        "exported": lambda: run_exported().numpy()}, rounds=rounds)
    speedup = times["original"] / times["exported"]
    ms = [f"{times['original'] * 1e3:.2f}", f"{times['exported'] * 1e3:.2f}", f"{speedup:.2f}"]
    if lookup:
        return [name, *ms, "-", "-", f"none ({totals['params_before']:,} -> {totals['params_after']:,} params)"]
    ok = targets.check(speedup >= 0.7 * flop_speedup, f"{name} speedup {speedup:.2f} < 0.7 x {flop_speedup:.2f}")
    return [name, *ms, f"{flop_speedup:.2f}", f"{speedup / flop_speedup:.2f}", ok]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-export-")
    targets = common.Targets()
    try:
        rows = [
            measure("MLP 4x2048, rank=400, batch 64", common.build_mlp, (64, 2048), 400, work, args.rounds, targets),
            measure("Conv 4x3x3x128, rank=400, 16x32x32", build_convnet, (16, 32, 32, 128), 400, work,
                    args.rounds, targets),
            measure("Embedding 32000x512, rank=400, 64x128 ids", build_embedding, (64, 128), 400, work,
                    args.rounds, targets),
            measure("LSTM 512 units, 64 steps, rank=400, batch 16", build_lstm, (16, 64, 512), 400, work,
                    args.rounds, targets),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# exported-model latency; {common.machine()}")
    print(common.table(["model", "original ms", "exported ms", "speedup", "FLOP speedup", "fraction", "target >= 0.7"],
                       rows))
    targets.exit()


if __name__ == "__main__":
    main()
