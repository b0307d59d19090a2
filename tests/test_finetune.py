"""Fine-tuning a rewritten model with every front end: a TF2 loop, Keras fit, a tf.compat.v1
session, tf.distribute, XLA; and re-saving what was fine-tuned."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import graphrewrite
from graphrewrite.rewriting import manifest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "testdata"))
from make_testdata import digits_split  # noqa: E402

SCHEDULE = dict(rank=300, begin_compression_step=0, compression_frequency=2, alpha_decrement_value=0.02)
# alpha reaches 0 after about 505 of the 1260 fine-tuning steps (30 epochs of 42 batches).
QUALITY = dict(rank=300, begin_compression_step=0, compression_frequency=5, alpha_decrement_value=0.01)


def accuracy(fn, x, y) -> float:
    return float(np.mean(np.argmax(fn(tf.constant(x)).numpy(), axis=1) == y))


def test_tf2_loop_reaches_alpha_zero_and_keeps_accuracy(compressed_factory):
    """A plain GradientTape loop with compression_update(optimizer.iterations); the digits MLP at
    about half its kernel parameters loses at most one accuracy point after the schedule."""
    src, out, result, _ = compressed_factory("digits_mlp", **QUALITY)
    assert 0.45 < result.plan.params_after / result.plan.params_before < 0.5
    x_train, y_train, x_test, y_test = digits_split()
    original = tf.saved_model.load(src)
    baseline = accuracy(original.serve, x_test, y_test)

    model = tf.saved_model.load(out)
    optimizer = tf.keras.optimizers.Adam(1e-3)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x)
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        graphrewrite.compression_update(model, optimizer.iterations)
        return loss

    rng = np.random.default_rng(0)
    for _ in range(30):
        order = rng.permutation(len(x_train))
        for i in range(0, len(order) - 31, 32):
            batch = order[i:i + 32]
            train_step(tf.constant(x_train[batch]), tf.constant(y_train[batch]))
    alphas = [float(s.alpha.numpy()) for s in model.graphrewrite_sites]
    assert alphas == [0.0, 0.0, 0.0]
    tuned = accuracy(model.serve, x_test, y_test)
    assert tuned >= baseline - 0.01, (baseline, tuned)


def test_keras_fit_with_tfsmlayer_and_callback(compressed_factory, tmp_path):
    import keras

    _, out, _, _ = compressed_factory("digits_mlp", **SCHEDULE)
    x_train, y_train, _, _ = digits_split()
    layer = graphrewrite.RewrittenLayer(out, call_endpoint="serve", trainable=True)
    inputs = keras.Input((64,))
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    log_dir = str(tmp_path / "logs")
    callback = graphrewrite.CompressionCallback(log_dir=log_dir)
    rewritten = layer._reloaded_obj
    weight_before = rewritten.graphrewrite_sites[0].weight.numpy().copy()
    model.fit(x_train[:320], y_train[:320], batch_size=32, epochs=2, verbose=0, callbacks=[callback])
    # 20 steps; updates due at steps 1, 3, ..., 19: ten decrements of 0.02.
    alphas = callback.last_result["alpha"].numpy()
    np.testing.assert_allclose(alphas, [0.8] * 3, atol=1e-6)
    assert int(rewritten.global_step.numpy()) == 20
    assert np.abs(rewritten.graphrewrite_sites[0].weight.numpy() - weight_before).max() > 0
    tags = set()
    values = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.add(value.tag)
                values[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
    assert "model_compression_summaries/dense_1/kernel/alpha" in tags
    assert "model_compression_summaries/logits/kernel/b_matrix_norm" in tags
    assert "model_compression_summaries/dense_2/kernel/a_matrix_norm" in tags
    assert values[("model_compression_summaries/dense_1/kernel/alpha", 20)] == pytest.approx(0.8)


def test_tf1_session_with_hook(compressed_factory):
    _, out, _, _ = compressed_factory("digits_mlp", **SCHEDULE)
    x_train, y_train, _, _ = digits_split()
    graph = tf.Graph()
    with graph.as_default():
        model = tf.saved_model.load(out)
        x = tf.compat.v1.placeholder(tf.float32, [None, 64])
        y = tf.compat.v1.placeholder(tf.int64, [None])
        logits = model.signatures["serving_default"](pixels=x)["output_0"]
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        global_step = tf.compat.v1.train.get_or_create_global_step()
        train_op = tf.compat.v1.train.AdamOptimizer(1e-3).minimize(
            loss, global_step=global_step, var_list=list(model.trainable_variables))
        hook = graphrewrite.CompressionHook(model)
        losses = []
        with tf.compat.v1.train.MonitoredTrainingSession(hooks=[hook]) as session:
            for i in range(30):
                feed = {x: x_train[i * 32:(i + 1) * 32], y: y_train[i * 32:(i + 1) * 32]}
                losses.append(session.run([loss, train_op], feed)[0])
            alphas = session.run([s.alpha for s in model.graphrewrite_sites])
            last = session.run([s.last_update for s in model.graphrewrite_sites])
            step = session.run(model.global_step)
    # global step 1..30 after each run; due at 1, 3, ..., 29: fifteen updates.
    np.testing.assert_allclose(alphas, [0.7] * 3, atol=1e-6)
    assert last == [29, 29, 29] and step == 30
    assert np.isfinite(losses).all()


def _run_script(*args, env=None, timeout=600):
    script = os.path.join(HERE, "scripts", "distributed_finetune.py")
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", [pytest.param("inside", marks=pytest.mark.heavy), "outside"])  # inside: 110 s
def test_mirrored_strategy_keeps_replicas_identical(compressed_factory, where):
    _, out, _, _ = compressed_factory("digits_mlp", **SCHEDULE)
    result = _run_script(out, "mirrored", where, "30")
    assert result["replicas"] == 2
    assert result["max_spread"] == 0.0
    assert result["alpha"] == pytest.approx([0.7] * 3)  # due at 1, 3, ..., 29
    assert result["last_update"] == [29] * 3 and result["global_step"] == 30


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.heavy
def test_multi_worker_mirrored_strategy(compressed_factory):
    _, out, _, _ = compressed_factory("digits_mlp", **SCHEDULE)
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    script = os.path.join(HERE, "scripts", "distributed_finetune.py")
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                                     "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen([sys.executable, script, out, "multiworker", "outside", "12"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert results[0]["digest"] == results[1]["digest"]
    assert results[0]["alpha"] == pytest.approx([0.88] * 3)  # due at 1, 3, ..., 11


def test_xla_forward_train_step_and_update_compile(compressed_factory):
    _, out, _, inputs = compressed_factory("digits_mlp", **SCHEDULE)
    model = tf.saved_model.load(out)
    x = tf.constant(inputs["serving_default"]["pixels"])
    y = tf.constant([1, 2, 3, 4, 5], tf.int64)
    optimizer = tf.keras.optimizers.SGD(0.01)

    @tf.function(jit_compile=True)
    def forward(x):
        return model(x)

    @tf.function(jit_compile=True)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function(jit_compile=True)
    def update(step):
        return graphrewrite.compression_update(model, step)

    np.testing.assert_allclose(forward(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
    for site in model.graphrewrite_sites:
        site.alpha.assign(0.5)
    first = float(train_step(x, y))
    for _ in range(5):
        last = float(train_step(x, y))
    assert last < first
    assert update(tf.constant(1, tf.int64))["updated"].numpy()
    assert "HloModule" in forward.experimental_get_compiler_ir(x)(stage="hlo")


def test_resaved_model_keeps_everything_and_trains_on(compressed_factory, tmp_path):
    _, out, _, inputs = compressed_factory("digits_mlp", **SCHEDULE)
    model = tf.saved_model.load(out)
    for step in (1, 3, 5):
        graphrewrite.compression_update(model, tf.constant(step, tf.int64))
    plain = str(tmp_path / "plain")
    tf.saved_model.save(model, plain)  # TensorFlow keeps only the default signature this way
    assert set(tf.saved_model.load(plain).signatures) == {"serving_default"}
    resaved = str(tmp_path / "tuned")
    tf.saved_model.save(model, resaved, signatures=model.signatures)
    again = tf.saved_model.load(resaved)
    assert set(again.signatures) == set(model.signatures)
    assert manifest.read_from_object(again)["sites"] == manifest.read_dir(out)["sites"]
    assert [float(s.alpha.numpy()) for s in again.graphrewrite_sites] == pytest.approx([0.94] * 3)
    assert [int(s.last_update.numpy()) for s in again.graphrewrite_sites] == [5] * 3
    assert int(again.global_step.numpy()) == 5
    x = tf.constant(inputs["serving_default"]["pixels"])
    np.testing.assert_allclose(again(x).numpy(), model(x).numpy(), rtol=1e-6)
    result = graphrewrite.compression_update(again, tf.constant(7, tf.int64))
    assert result["alpha"].numpy() == pytest.approx([0.92] * 3)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(again(x) ** 2)
    assert all(g is not None for g in tape.gradient(loss, again.trainable_variables))
