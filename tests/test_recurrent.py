"""Recurrent kernels (Keras LSTM/GRU/SimpleRNN weights read inside While bodies) are sites: bit for
bit at alpha = 1, gradients reach every factor through the loop, XLA compiles the loop, the re-saved
model trains, and the export computes ``(x @ B) @ C`` inside the loop, equal to alpha = 0."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
import zoo

from graphrewrite import compress, hparams
from graphrewrite.rewriting.exporting import export
from graphrewrite.rewriting.match import match_function
from graphrewrite.rewriting.pipeline import plan_model

HPARAMS = {"rank": 400}  # k = min(m, n) / 4: the square SimpleRNN recurrent kernel is smaller too
CASES = [pytest.param("LSTM"), pytest.param("GRU", marks=pytest.mark.heavy),
         pytest.param("SimpleRNN", marks=pytest.mark.heavy), pytest.param("tf_keras.LSTM", marks=pytest.mark.heavy)]


def _rnn(layer: str, directory: str) -> str:
    """Input [7, 12] -> a Keras recurrent layer of 32 units -> Dense(4), exported with Keras' own export
    (``tf_keras.``: a tf.keras model saved as a SavedModel, whose loop takes the kernels' values)."""
    path = os.path.join(directory, layer.lower())
    if layer.startswith("tf_keras."):
        import tf_keras

        tf_keras.utils.set_random_seed(3)
        rnn = getattr(tf_keras.layers, layer.split(".")[1])(32, input_shape=(7, 12), name="rnn")
        tf_keras.Sequential([rnn, tf_keras.layers.Dense(4, name="head")]).save(path, save_format="tf")
        return path
    import keras

    keras.utils.set_random_seed(3)
    x = keras.Input((7, 12), name="x")
    h = getattr(keras.layers, layer)(32, name="rnn")(x)
    model = keras.Model(x, keras.layers.Dense(4, name="head")(h))
    model.export(path, verbose=False)
    return path


@pytest.fixture(scope="module")
def rnn_run(tmp_path_factory):
    """``rnn_run(layer)`` -> (source, rewritten, final, CompressResult, inputs), each built once."""
    cache: dict[str, tuple] = {}

    def get(layer: str) -> tuple:
        if layer not in cache:
            root = tmp_path_factory.mktemp(layer)
            src = _rnn(layer, str(root))
            out, final = str(root / "rewritten"), str(root / "final")
            result = compress(src, out, hparams.resolve(None, HPARAMS), verify=False)
            export(out, final, force=True, verify=False)  # the tests below compare it themselves
            cache[layer] = (src, out, final, result, zoo.sample_inputs(src))
        return cache[layer]

    return get


def _loss(outputs):
    rng = np.random.default_rng(0)
    return tf.add_n([tf.reduce_sum(v * rng.standard_normal(v.shape).astype("float32")) for v in outputs.values()])


@pytest.mark.parametrize("layer", CASES)
def test_both_kernels_are_sites_read_by_the_loop(rnn_run, layer):
    result = rnn_run(layer)[3]
    cell = {s.variable.name.split("/")[-1]: s for s in result.plan.sites if s.variable.name.startswith("rnn/")}
    assert sorted(cell) == ["kernel", "recurrent_kernel"]
    for site in cell.values():
        assert any(u.op_type in ("While", "StatelessWhile") for u in site.uses), site.variable.name
    assert not any("While" in group for group in result.plan.left_dense)


@pytest.mark.parametrize("layer", CASES)
def test_bit_exact_at_alpha_one_on_every_signature(rnn_run, layer):
    src, out, _, _, inputs = rnn_run(layer)
    zoo.assert_bit_exact(src, out, inputs, layer)


@pytest.mark.parametrize("layer", CASES)
def test_gradients_reach_every_factor_and_xla_compiles_serving(rnn_run, layer):
    _, out, _, _, inputs = rnn_run(layer)
    model = tf.saved_model.load(out)
    for site in model.graphrewrite_sites:
        site.alpha.assign(0.5)
    serve = model.signatures["serving_default"]
    feed = {n: tf.constant(x) for n, x in inputs["serving_default"].items()}
    weights = [f for site in model.graphrewrite_sites for f in (site.weight, *site.factors.values())]
    with tf.GradientTape() as tape:
        loss = _loss(serve(**feed))
    for weight, grad in zip(weights, tape.gradient(loss, weights)):
        assert grad is not None and np.count_nonzero(tf.convert_to_tensor(grad).numpy()) > 0, weight.name
    compiled = tf.function(lambda f: serve(**f), jit_compile=True)
    for k, value in compiled(feed).items():
        np.testing.assert_allclose(value.numpy(), serve(**feed)[k].numpy(), rtol=1e-5, atol=1e-6)


def test_resaved_model_reloads_and_trains(rnn_run, tmp_path):
    _, out, _, _, inputs = rnn_run("LSTM")
    model = tf.saved_model.load(out)
    for site in model.graphrewrite_sites:
        site.alpha.assign(0.5)
    tf.saved_model.save(model, str(tmp_path / "again"), signatures=dict(model.signatures))
    again = tf.saved_model.load(str(tmp_path / "again"))
    feed = {n: tf.constant(x) for n, x in inputs["serving_default"].items()}
    serve = again.signatures["serving_default"]
    optimizer = tf.keras.optimizers.SGD(0.05)
    losses = []
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(serve(**feed)["output_0"] ** 2)
        optimizer.apply_gradients(zip(tape.gradient(loss, again.trainable_variables), again.trainable_variables))
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("layer", CASES)
def test_export_equals_alpha_zero_with_both_products_inside_the_loop(rnn_run, layer):
    _, out, final, _, inputs = rnn_run(layer)
    zoo.assert_export_equals_alpha_zero(out, final, inputs, layer)
    # The exported loop body: each kernel's MatMul multiplies (x @ B) by C, and the body reads no
    # variable any more (A is gone; B and C come in as loop invariants).
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(final, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    library = proto.meta_graphs[0].graph_def.library.function
    bodies = [f for f in library if "while_body" in f.signature.name and "_graphrewrite_" in f.signature.name]
    assert bodies
    for body in bodies:
        matmuls = [n for n in body.node_def if n.op == "MatMul"]
        assert len(matmuls) == 4, [n.name for n in matmuls]  # two kernels, two products each
        firsts = {f"{n.name}:product:0" for n in matmuls if n.name.endswith("/graphrewrite_first")}
        assert len(firsts) == 2 and all(any(i in firsts for i in n.input) for n in matmuls if n.name + ":product:0"
                                        not in firsts)
        reads = {f"{n.name}:value:0" for n in body.node_def if n.op == "ReadVariableOp"}
        assert not [i for n in matmuls for i in n.input if i in reads]


def test_a_loop_reading_the_weight_otherwise_stays_dense_with_the_reason(tmp_path):
    class Scaled(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(tf.random.stateless_normal((16, 16), seed=(1, 2)))

        @tf.function(input_signature=[tf.TensorSpec((None, 16), tf.float32)])
        def __call__(self, x):
            # the body multiplies by w and also reads it with a Sum: a recurrent site must be MatMuls only
            return tf.while_loop(lambda i, h: i < 3, lambda i, h: (i + 1, tf.matmul(h, self.w) + tf.reduce_sum(self.w)),
                                 (tf.constant(0), x))[1]

    module = Scaled()
    tf.saved_model.save(module, str(tmp_path / "m"), signatures={"serving_default": module.__call__})
    model, plan, _ = plan_model(str(tmp_path / "m"), hparams.resolve(None, HPARAMS))
    assert not plan.sites
    [group] = plan.left_dense
    assert "While" in group and plan.left_dense[group] == [1, 256]
    reasons = {b.reason for fir in model.functions.values() for b in match_function(fir, model.infos)[1]}
    assert reasons and all("whose body reads it with Sum" in r for r in reasons), reasons


@pytest.mark.heavy
def test_transposed_products_inside_a_loop(tmp_path):
    # h @ W1^T, W2 @ g and W3^T @ g: each becomes two products with B and C in the right order.
    class Loop(tf.Module):
        def __init__(self) -> None:
            self.w = [tf.Variable(tf.random.stateless_normal((16, 16), seed=(i, 7))) for i in range(3)]

        @tf.function(input_signature=[tf.TensorSpec((None, 16), tf.float32)])
        def __call__(self, x):
            def body(i, h, g):
                w1, w2, w3 = self.w
                return (i + 1, tf.tanh(tf.matmul(h, w1, transpose_b=True)),
                        tf.tanh(tf.matmul(w2, g)) + tf.tanh(tf.matmul(w3, g, transpose_a=True)))

            _, h, g = tf.while_loop(lambda i, h, g: i < 3, body, (tf.constant(0), x, tf.transpose(x)))
            return {"h": h, "g": g}

    module = Loop()
    src, out, final = (str(tmp_path / name) for name in ("src", "out", "final"))
    tf.saved_model.save(module, src, signatures={"serving_default": module.__call__})
    result = compress(src, out, hparams.resolve(None, HPARAMS), verify=False)
    assert len(result.plan.sites) == 3 and {u.op_type for s in result.plan.sites for u in s.uses} == {"While"}
    export(out, final, force=True, verify=False)
    original, rewritten = tf.saved_model.load(src), tf.saved_model.load(out)
    for rows in (1, 2, 8):
        feed = {"x": np.random.default_rng(rows).standard_normal((rows, 16)).astype("float32")}
        want = zoo.call(original.signatures["serving_default"], feed)
        for k, value in zoo.call(rewritten.signatures["serving_default"], feed).items():
            # bit for bit: the loops run lowered, as the original's do (loader.inline_function);
            # run as functions, oneDNN rounded h @ W1^T differently at batches 1-8 (up to 1.9e-6)
            np.testing.assert_array_equal(value, want[k])
    for site in rewritten.graphrewrite_sites:
        site.alpha.assign(0.0)
    at_zero = zoo.call(rewritten.signatures["serving_default"], feed)
    got = zoo.call(tf.saved_model.load(final).signatures["serving_default"], feed)
    for k in at_zero:
        np.testing.assert_allclose(got[k], at_zero[k], rtol=1e-4, atol=1e-5)
        assert np.abs(at_zero[k] - want[k]).max() > 1e-3  # alpha = 0 is the compressed model
