"""Training-step cost of a rewritten model before, during and after blending.

An MLP of four 2048x2048 Dense layers, compressed at rank=400 (k = 512, theoretical FLOP ratio of
the compressed product k(m+n)/(mn) = 0.5), one process, batch 256; SGD steps through the loaded
SavedModel, timed in alternation with the original model's. Targets (issue 3): alpha = 1 at most
1.1x the original step, 0 < alpha < 1 at most 1.6x, alpha = 0 at most 0.8x.

An embedding site (``--part embedding``): a 32000 x 512 table looked up by 256 x 16 ids, averaged,
and a Dense head, compressed at rank=400 (k = 128). Its gradients for A and B are IndexedSlices
(the rows looked up); the same steps with the gradients made dense show what a dense update of the
table would cost. Target: every sparse step at most 0.5x its densified twin.

    python benchmarks/bench_finetune_step.py [--part mlp|embedding|both] [--width 2048] [--batch 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import common
import numpy as np
import tensorflow as tf


def train_step_fn(model, x, y, densify: bool = False):
    optimizer = tf.keras.optimizers.SGD(1e-4)
    variables = list(model.trainable_variables)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model.serve(x) - y) ** 2)
        grads = tape.gradient(loss, variables)
        if densify:  # an embedding's IndexedSlices made into whole tables, as a dense gradient would be
            grads = [tf.convert_to_tensor(g) for g in grads]
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    return lambda: step().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("mlp", "embedding", "both"), default="both")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rank", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    targets = common.Targets()
    if args.part != "embedding":
        mlp(args, targets)
    if args.part != "mlp":
        embedding(args.rounds, targets)
    targets.exit()


def mlp(args: argparse.Namespace, targets: common.Targets) -> None:
    import graphrewrite
    from graphrewrite import hparams

    work = tempfile.mkdtemp(prefix="bench-finetune-")
    try:
        src, out = os.path.join(work, "mlp"), os.path.join(work, "mlp_rewritten")
        common.build_mlp(src, args.width, args.layers)
        graphrewrite.compress(src, out, hparams.resolve(None, {"rank": args.rank}), verify=False)
        original, rewritten = tf.saved_model.load(src), tf.saved_model.load(out)
        rng = np.random.default_rng(0)
        x = tf.constant(rng.standard_normal((args.batch, args.width)).astype(np.float32))
        y = tf.constant(rng.standard_normal((args.batch, args.width)).astype(np.float32))
        k = rewritten.graphrewrite_sites[0].factors["b"].shape[1]
        flop_ratio = k * 2 * args.width / args.width ** 2

        def at(alpha: float):
            step = train_step_fn(rewritten, x, y)

            def run():
                for site in rewritten.graphrewrite_sites:
                    site.alpha.assign(alpha)
                return step()

            return run

        times = common.interleaved_medians({
            "original": train_step_fn(original, x, y), "alpha=1": at(1.0), "alpha=0.5": at(0.5),
            "alpha=0": at(0.0)}, rounds=args.rounds)
        base = times["original"]
        limits = {"alpha=1": 1.1, "alpha=0.5": 1.6, "alpha=0": 0.8}
        rows = [["original", f"{base * 1e3:.1f}", "1.00", "1.00", "", ""]]
        theory = {"alpha=1": 1.0, "alpha=0.5": 1.0 + flop_ratio, "alpha=0": flop_ratio}
        for name in ("alpha=1", "alpha=0.5", "alpha=0"):
            ratio = times[name] / base
            rows.append([name, f"{times[name] * 1e3:.1f}", f"{ratio:.2f}", f"{theory[name]:.2f}",
                         f"<= {limits[name]}", targets.check(ratio <= limits[name], f"{name} step {ratio:.2f}x")])
        print(f"# training step, {args.layers}x Dense {args.width}x{args.width}, rank={args.rank} (k={k}), "
              f"batch {args.batch}; {common.machine()}")
        print(common.table(["model", "step ms", "ratio", "FLOP ratio", "target", ""], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)



def embedding(rounds: int, targets: common.Targets, vocab: int = 32000, dim: int = 512) -> None:
    import keras

    import graphrewrite
    from graphrewrite import hparams

    work = tempfile.mkdtemp(prefix="bench-finetune-embedding-")
    try:
        src, out = os.path.join(work, "embedding"), os.path.join(work, "embedding_rewritten")
        keras.utils.set_random_seed(0)
        ids = keras.Input((16,), dtype="int32", name="ids")
        pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(vocab, dim, name="embed")(ids))
        keras.Model(ids, keras.layers.Dense(8, name="head")(pooled)).export(src, verbose=False)
        graphrewrite.compress(src, out, hparams.resolve(None, {"rank": 400}), verify=False)
        original, rewritten = tf.saved_model.load(src), tf.saved_model.load(out)
        rng = np.random.default_rng(0)
        x = tf.constant(rng.integers(0, vocab, (256, 16)).astype(np.int32))
        y = tf.constant(rng.standard_normal((256, 8)).astype(np.float32))

        def at(alpha: float, densify: bool):
            step = train_step_fn(rewritten, x, y, densify)

            def run():
                for site in rewritten.graphrewrite_sites:
                    site.alpha.assign(alpha)
                return step()

            return run

        fns = {"original": train_step_fn(original, x, y), "original, dense": train_step_fn(original, x, y, True)}
        for alpha in (1.0, 0.5, 0.0):
            fns[f"alpha={alpha:g}"], fns[f"alpha={alpha:g}, dense"] = at(alpha, False), at(alpha, True)
        times = common.interleaved_medians(fns, rounds=rounds)
        rows = []
        for name in ("original", "alpha=1", "alpha=0.5", "alpha=0"):
            sparse, dense = times[name], times[f"{name}, dense"]
            rows.append([name, f"{sparse * 1e3:.1f}", f"{dense * 1e3:.1f}", f"{sparse / dense:.2f}",
                         targets.check(sparse <= 0.5 * dense, f"{name} embedding step {sparse / dense:.2f}x dense")])
        [site] = [s for s in rewritten.graphrewrite_sites if s.weight.name.startswith("embed/")]
        k = site.factors["b"].shape[1]
        print(f"# training step, Embedding {vocab}x{dim} (k={k}) + Dense head, 256 x 16 ids; {common.machine()}")
        print(common.table(["model", "sparse gradients, ms", "made dense, ms", "ratio", "<= 0.5"], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
