"""Accuracy kept: the digits MLP and CNN (scikit-learn's bundled digits, fixed split and seeds).

Two budgets, issue 8's: about 48% and 29% of the kernel parameters (weights a method leaves dense
are counted). The reference's rule runs at the rank that comes closest to each budget; graphrewrite's
--target-ratio policy runs at the budget itself. Every variant is fine-tuned the same way (45
epochs of 42 steps, batch 32, Adam 1e-3), and fine-tuned accuracies are the mean of two seeds of
batch order (``--seeds``):

* gradual: compression_lib's schedule (alpha 1 -> 0 by 0.01 every 2 steps from step 0, so alpha
  is 0 after about 200 of the 1890 steps);
* abrupt: the same factors with alpha = 0 from the first step, then the same fine-tuning;
* one-shot: truncated SVD at alpha = 0, no fine-tuning;
* best policy: --target-ratio at the budget, gradual schedule.

Targets (issue 8): at about 48% the best policy loses nothing; at about 29% it loses at most 1
point. Prints a table like the reference's CIFAR-10 one and exits non-zero when a target is missed.

    python benchmarks/bench_accuracy.py [--epochs 45] [--seeds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import common
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata"))
from make_testdata import digits_split  # noqa: E402

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata")
GRADUAL = {"begin_compression_step": 0, "compression_frequency": 2, "alpha_decrement_value": 0.01}
ABRUPT = {"begin_compression_step": 0, "compression_frequency": 1, "alpha_decrement_value": 1.0}


def accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(model.serve(tf.constant(x)).numpy(), axis=1) == y))


def fine_tune(model, x, y, epochs: int, seed: int = 0, after_epoch=None) -> None:
    """The README's fine-tuning loop; ``after_epoch(epoch)`` (1-based) is called after each epoch."""
    import graphrewrite

    optimizer = tf.keras.optimizers.Adam(1e-3)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(yb, model.serve(xb), from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        graphrewrite.compression_update(model, optimizer.iterations)

    rng = np.random.default_rng(seed)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x))
        for i in range(0, len(order) - 31, 32):
            batch = order[i:i + 32]
            step(tf.constant(x[batch]), tf.constant(y[batch]))
        if after_epoch is not None:
            after_epoch(epoch)


def kernel_ratio(plan) -> float:
    """Kept share of all candidate weights' parameters (skipped ones stay dense)."""
    dense = sum(int(np.prod(s.shape)) for s in plan.skipped)
    return (plan.params_after + dense) / (plan.params_before + dense)


def closest_rank(src: str, target: float) -> tuple[int, float]:
    from graphrewrite import hparams
    from graphrewrite.rewriting import pipeline

    best = None
    for rank in range(110, 1000, 10):
        _, plan, _ = pipeline.plan_model(src, hparams.resolve(None, {"rank": rank}))
        ratio = kernel_ratio(plan)
        if best is None or abs(ratio - target) < abs(best[1] - target):
            best = (rank, ratio)
    return best


def run(src: str, x_train, y_train, x_test, y_test, hp: dict, epochs: int, work: str, tag: str,
        selection=None, tune: bool = True, alpha0: bool = False, seed: int = 0) -> tuple[float, float]:
    import graphrewrite
    from graphrewrite import hparams

    out = os.path.join(work, f"{tag}_{seed}")
    result = graphrewrite.compress(src, out, hparams.resolve(None, hp), verify=False,
                                   **({"selection": selection} if selection else {}))
    model = tf.saved_model.load(out)
    if alpha0:
        for site in model.graphrewrite_sites:
            site.alpha.assign(0.0)
    if tune:
        fine_tune(model, x_train, y_train, epochs, seed)
    assert all(float(s.alpha.numpy()) == 0.0 for s in model.graphrewrite_sites)
    return accuracy(model, x_test, y_test), kernel_ratio(result.plan)


def mean_over_seeds(data: tuple, hp: dict, args, work: str, tag: str, **kw) -> tuple[float, float]:
    """Mean accuracy of ``args.seeds`` fine-tunings (batch orders), and the kept parameter ratio."""
    runs = [run(*data, hp, args.epochs, work, tag, seed=seed, **kw) for seed in range(args.seeds)]
    return float(np.mean([acc for acc, _ in runs])), runs[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=45)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    from graphrewrite.rewriting.plan import Selection
    from graphrewrite.rewriting.rankpolicy import Policy

    x_train, y_train, x_test, y_test = digits_split()
    targets = common.Targets()
    rows = []
    work = tempfile.mkdtemp(prefix="bench-accuracy-")
    try:
        for name, reshape in (("digits_mlp", (-1, 64)), ("digits_cnn", (-1, 8, 8, 1))):
            src = os.path.join(TESTDATA, name)
            xtr, xte = x_train.reshape(reshape), x_test.reshape(reshape)
            base = accuracy(tf.saved_model.load(src), xte, y_test)
            rows.append([name, "uncompressed", "100%", f"{base:.2%}", "", "", "", ""])
            for target in (0.48, 0.29):
                rank, _ = closest_rank(src, target)
                tag = f"{name}_{rank}"

                data = (src, xtr, y_train, xte, y_test)
                gradual, ratio = mean_over_seeds(data, {"rank": rank, **GRADUAL}, args, work, tag + "_g")
                abrupt, _ = mean_over_seeds(data, {"rank": rank, **ABRUPT}, args, work, tag + "_a")
                oneshot, _ = run(*data, {"rank": rank, **GRADUAL}, 0, work, tag + "_o", tune=False, alpha0=True)
                best, best_ratio = mean_over_seeds(data, GRADUAL, args, work, tag + "_b",
                                                   selection=Selection(policy=Policy(target_ratio=target)))
                limit = 0.0 if target >= 0.45 else 0.01
                ok = targets.check(best >= base - limit - 1e-9,
                                   f"{name} at {best_ratio:.0%}: best policy {best:.2%} vs {base:.2%}")
                rows.append([name, f"rank={rank} / target-ratio={target:g}", f"{ratio:.0%} / {best_ratio:.0%}", "",
                             f"{gradual:.2%}", f"{abrupt:.2%}", f"{oneshot:.2%}", f"{best:.2%} {ok}"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# test accuracy on digits (450 held-out images), {args.epochs} epochs of fine-tuning, "
          f"mean of {args.seeds} seeds; {common.machine()}")
    print(common.table(["model", "compression", "kernel params kept", "uncompressed", "gradual (reference)",
                        "abrupt", "one-shot SVD", "best policy (target)"], rows))
    targets.exit()


if __name__ == "__main__":
    main()
