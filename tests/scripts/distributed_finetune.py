"""Fine-tunes a rewritten model under a tf.distribute strategy; prints one JSON line of results.

    python distributed_finetune.py MODEL mirrored inside|outside
    TF_CONFIG=... python distributed_finetune.py MODEL multiworker outside

Run in its own process: logical devices and TF_CONFIG must be set before TensorFlow starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main() -> None:
    path, kind, where = sys.argv[1:4]
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 30
    if kind == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import graphrewrite

    with strategy.scope():
        model = tf.saved_model.load(path)
        optimizer = tf.keras.optimizers.SGD(0.05)
    rng = np.random.default_rng(0)
    x = rng.random((64, 64)).astype("float32")
    y = rng.integers(0, 10, 64)
    data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8 * strategy.num_replicas_in_sync)
    batches = iter(strategy.experimental_distribute_dataset(data))

    @tf.function
    def train_step(batch):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                logits = model(xb)
                loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(yb, logits, from_logits=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            if where == "inside":
                graphrewrite.compression_update(model, optimizer.iterations)
            return loss

        loss = strategy.run(replica_step, args=batch)
        if where == "outside":
            graphrewrite.compression_update(model, optimizer.iterations)
        return strategy.reduce("MEAN", loss, axis=None)

    for _ in range(steps):
        train_step(next(batches))

    def copies(variable):
        return [np.asarray(t.numpy()) for t in strategy.experimental_local_results(variable)]

    spread = 0.0
    variables = list(model.variables)
    for variable in variables:
        values = copies(variable)
        spread = max([spread] + [float(np.abs(values[0].astype(np.float64) - v).max()) for v in values[1:]])
    digest = hashlib.sha256(b"".join(copies(v)[0].tobytes() for v in variables)).hexdigest()
    print(json.dumps({
        "replicas": len(copies(variables[0])),
        "max_spread": spread,
        "alpha": [float(copies(s.alpha)[0]) for s in model.graphrewrite_sites],
        "last_update": [int(copies(s.last_update)[0]) for s in model.graphrewrite_sites],
        "global_step": int(copies(model.global_step)[0]),
        "digest": digest,
    }))


if __name__ == "__main__":
    main()
