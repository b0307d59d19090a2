"""Small SavedModels of every kind users have, built deterministically for the tests.

Each builder writes a SavedModel into ``path`` and returns a dict of example inputs per signature
(``{signature_key: {input_name: array}}``) so tests can compare outputs.
"""

from __future__ import annotations

import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(os.path.dirname(HERE), "testdata")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def keras3_multi_input(path: str) -> dict:
    """Keras 3 model with two named inputs (one through its own Dense) and two outputs."""
    import keras

    keras.utils.set_random_seed(1)
    a = keras.Input((12,), name="features")
    b = keras.Input((6,), name="extra")
    h = keras.layers.Dense(32, activation="tanh", name="fa")(a)
    g = keras.layers.Dense(16, activation="tanh", name="fb")(b)
    h = keras.layers.Concatenate()([h, g])
    out1 = keras.layers.Dense(24, name="head_a")(h)
    out2 = keras.layers.Dense(20, name="head_b")(h)
    model = keras.Model({"features": a, "extra": b}, {"score": out1, "aux": out2})
    model.export(path, verbose=False)
    rng = _rng(1)
    return {"serving_default": {"features": rng.standard_normal((3, 12)).astype("float32"),
                                "extra": rng.standard_normal((3, 6)).astype("float32")}}


def keras3_attention(path: str) -> dict:
    """Keras 3 MultiHeadAttention (BatchMatMulV2 on reshaped kernels) and an EinsumDense."""
    import keras

    keras.utils.set_random_seed(2)
    x = keras.Input((6, 32), name="tokens")
    h = keras.layers.MultiHeadAttention(num_heads=4, key_dim=16, name="mha")(x, x)
    h = keras.layers.EinsumDense("abc,cd->abd", output_shape=(None, 48), name="proj")(h)
    model = keras.Model(x, h)
    model.export(path, verbose=False)
    return {"serving_default": {"tokens": _rng(2).standard_normal((2, 6, 32)).astype("float32")}}


def keras3_mixed_precision(path: str) -> dict:
    """Keras 3 mixed_float16 model: kernels are float32 variables read through Cast."""
    import keras

    keras.utils.set_random_seed(3)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x = keras.Input((40,), name="x")
        h = keras.layers.Dense(64, activation="relu", name="d1")(x)
        out = keras.layers.Dense(16, name="d2", dtype="float32")(h)
        model = keras.Model(x, out)
        model.export(path, verbose=False)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return {"serving_default": {"x": _rng(3).standard_normal((4, 40)).astype("float32")}}


def keras3_lstm(path: str) -> dict:
    """Keras 3 LSTM (weights reach a While loop) followed by a Dense head."""
    import keras

    keras.utils.set_random_seed(4)
    x = keras.Input((5, 8), name="seq")
    h = keras.layers.LSTM(32, name="lstm")(x)
    out = keras.layers.Dense(40, name="head")(h)
    model = keras.Model(x, out)
    model.export(path, verbose=False)
    return {"serving_default": {"seq": _rng(4).standard_normal((2, 5, 8)).astype("float32")}}


def tf_keras_dropout_bn(path: str) -> dict:
    """A tf.keras (Keras 2, tf_keras) model with Dropout and BatchNormalization, saved as TF."""
    import tf_keras

    tf_keras.utils.set_random_seed(5)
    x = tf_keras.Input((30,), name="inputs")
    h = tf_keras.layers.Dense(64, activation="relu", name="dense_a")(x)
    h = tf_keras.layers.BatchNormalization(name="bn")(h)
    h = tf_keras.layers.Dropout(0.3)(h)
    out = tf_keras.layers.Dense(20, name="dense_b")(h)
    model = tf_keras.Model(x, out)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((8, 30), "float32"), np.ones((8, 20), "float32"), verbose=0, epochs=1)
    model.save(path, save_format="tf")
    return {"serving_default": {"inputs": _rng(5).standard_normal((4, 30)).astype("float32")}}


def tf_module_multi_signature(path: str) -> dict:
    """A raw tf.Module: two signatures sharing weights; MatMul transpose_b, weight-first MatMul,
    an Einsum with a 3-D weight, and a Conv2D."""
    import tensorflow as tf

    rng = _rng(6)

    class Net(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w_t = tf.Variable(rng.standard_normal((40, 48)).astype("float32"), name="w_t")
            self.w_e = tf.Variable(rng.standard_normal((40, 8, 10)).astype("float32"), name="w_e")
            self.w_first = tf.Variable(rng.standard_normal((30, 40)).astype("float32"), name="w_first")
            self.kernel = tf.Variable(rng.standard_normal((3, 3, 4, 24)).astype("float32"), name="kernel")
            self.bias = tf.Variable(rng.standard_normal((40,)).astype("float32"), name="bias")

        def trunk(self, x):
            return tf.nn.relu(tf.matmul(x, self.w_t, transpose_b=True) + self.bias)  # [b, 40]

        @tf.function(input_signature=[tf.TensorSpec([None, 48], tf.float32, name="x")])
        def classify(self, x):
            h = self.trunk(x)
            return {"logits": tf.einsum("bi,ihk->bhk", h, self.w_e)}

        @tf.function(input_signature=[tf.TensorSpec([None, 48], tf.float32, name="x"),
                                      tf.TensorSpec([None, 8, 8, 4], tf.float32, name="image")])
        def embed(self, x, image):
            h = self.trunk(x)
            first = tf.transpose(tf.matmul(self.w_first, h, transpose_b=True))  # weight as operand a
            conv = tf.nn.conv2d(image, self.kernel, strides=1, padding="SAME")
            return {"embedding": first, "features": tf.reduce_mean(conv, axis=[1, 2])}

    net = Net()
    tf.saved_model.save(net, path, signatures={"serving_default": net.classify, "embed": net.embed})
    return {
        "serving_default": {"x": rng.standard_normal((3, 48)).astype("float32")},
        "embed": {"x": rng.standard_normal((3, 48)).astype("float32"),
                  "image": rng.standard_normal((2, 8, 8, 4)).astype("float32")},
    }


def tf1_builder(path: str) -> dict:
    """A TF1 graph-mode model written with tf.compat.v1.saved_model.Builder (VariableV2 weights)."""
    import tensorflow as tf

    rng = _rng(7)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 36], name="x")
        with tf.compat.v1.variable_scope("layer1"):
            w1 = tf.compat.v1.get_variable("weights", initializer=rng.standard_normal((36, 64)).astype("float32"),
                                           use_resource=False)
            b1 = tf.compat.v1.get_variable("biases", initializer=np.zeros(64, "float32"), use_resource=False)
        with tf.compat.v1.variable_scope("layer2"):
            w2 = tf.compat.v1.get_variable("weights", initializer=rng.standard_normal((64, 32)).astype("float32"),
                                           use_resource=False)
        h = tf.nn.relu(tf.matmul(x, w1) + b1)
        y = tf.identity(tf.matmul(h, w2), name="y")
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(path)
            sig = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
            builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map={"serving_default": sig})
            builder.save()
    return {"serving_default": {"x": rng.standard_normal((5, 36)).astype("float32")}}


BUILDERS = {
    "keras3_multi_input": keras3_multi_input,
    "keras3_attention": keras3_attention,
    "keras3_mixed_precision": keras3_mixed_precision,
    "keras3_lstm": keras3_lstm,
    "tf_keras_dropout_bn": tf_keras_dropout_bn,
    "tf_module_multi_signature": tf_module_multi_signature,
    "tf1_builder": tf1_builder,
}


def matrix_model(path: str, matrices: dict) -> None:
    """A tf.Module whose signature returns ``x @ W`` for each named weight (all n x n)."""
    import tensorflow as tf

    class Matrices(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weights = {k: tf.Variable(np.asarray(v, "float32"), name=k) for k, v in matrices.items()}

    module = Matrices()
    n = next(iter(matrices.values())).shape[0]

    @tf.function(input_signature=[tf.TensorSpec([None, n], tf.float32, name="x")])
    def serve(x):
        return {k: tf.matmul(x, w) for k, w in module.weights.items()}

    module.serve = serve
    tf.saved_model.save(module, path, signatures={"serving_default": serve})
