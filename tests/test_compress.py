"""End to end: every kind of SavedModel in, a retrainable low-rank SavedModel out."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from graphrewrite import hparams
from graphrewrite.rewriting import manifest

# model -> {variable: (op type, m, n, k)} at rank=200, and the variables skipped with a reason.
EXPECTED = {
    "digits_mlp": ({"dense_1/kernel": ("MatMul", 64, 256, 32), "dense_2/kernel": ("MatMul", 256, 128, 64),
                    "logits/kernel": ("MatMul", 128, 10, 5)}, {}),
    "digits_cnn": ({"conv_1/kernel": ("Conv2D", 9, 32, 5), "conv_2/kernel": ("Conv2D", 288, 64, 32),
                    "logits/kernel": ("MatMul", 1024, 10, 5)}, {}),
    "keras3_multi_input": ({"fa/kernel": ("MatMul", 12, 32, 6), "fb/kernel": ("MatMul", 6, 16, 3),
                            "head_a/kernel": ("MatMul", 48, 24, 12), "head_b/kernel": ("MatMul", 48, 20, 10)}, {}),
    "keras3_attention": ({"mha/query/kernel": ("BatchMatMulV2", 32, 64, 16),
                          "mha/key/kernel": ("BatchMatMulV2", 32, 64, 16),
                          "mha/value/kernel": ("BatchMatMulV2", 32, 64, 16),
                          "mha/attention_output/kernel": ("BatchMatMulV2", 64, 32, 16),
                          "proj/kernel": ("BatchMatMulV2", 32, 48, 16)}, {}),
    "keras3_mixed_precision": ({"d1/kernel": ("MatMul", 40, 64, 20), "d2/kernel": ("MatMul", 64, 16, 8)}, {}),
    "keras3_lstm": ({"head/kernel": ("MatMul", 32, 40, 16), "lstm/lstm_cell/kernel": ("MatMul", 8, 128, 4),
                     "lstm/lstm_cell/recurrent_kernel": ("MatMul", 32, 128, 16)}, {}),  # read in and before the loop
    "tf_keras_dropout_bn": ({"dense_a/kernel": ("MatMul", 30, 64, 15), "dense_b/kernel": ("MatMul", 64, 20, 10)}, {}),
    "tf_module_multi_signature": ({"w_t": ("MatMul", 48, 40, 20), "w_e": ("Einsum", 40, 80, 20),
                                   "w_first": ("MatMul", 40, 30, 15), "kernel": ("Conv2D", 36, 24, 12)}, {}),
    "tf1_builder": ({"layer1/weights": ("MatMul", 36, 64, 18), "layer2/weights": ("MatMul", 64, 32, 16)}, {}),
}
KINDS = sorted(EXPECTED)


def outputs(fn, inputs):
    return {k: v.numpy() for k, v in fn(**{n: tf.constant(x) for n, x in inputs.items()}).items()}


@pytest.mark.parametrize("name", KINDS)
def test_sites_and_skip_reasons(compressed_factory, name):
    _, out, result, _ = compressed_factory(name, rank=200)
    sites, skips = EXPECTED[name]
    got = {s.variable.name: (s.op_type, s.size.m, s.size.n, s.size.k) for s in result.plan.sites}
    assert got == sites
    got_skips = {s.variable: s.reason for s in result.plan.skipped}
    assert set(got_skips) == set(skips)
    for var, fragment in skips.items():
        assert fragment in got_skips[var]
    data = manifest.read_dir(out)
    assert [s["variable"] for s in data["sites"]] == [s.variable.name for s in result.plan.sites]
    for s in data["sites"]:
        op_type, m, n, k = sites[s["variable"]]
        assert (s["op_type"], s["matrix"], s["k"]) == (op_type, [m, n], k)
        assert s["params_before"] == m * n and s["params_after"] == k * (m + n)
        assert s["option"] == 1 and s["method"] == "low_rank"
        assert not s["variable"].startswith("unknown")
        assert s["op"] and "StatefulPartitionedCall" not in s["op"]
    assert data["skipped"] == [{"op": s.op, "op_type": s.op_type, "variable": s.variable,
                                "shape": list(s.shape), "reason": s.reason} for s in result.plan.skipped]
    assert data["hparams"]["rank"] == 200


@pytest.mark.parametrize("name", KINDS)
def test_alpha_one_reproduces_every_signature(compressed_factory, name):
    src, out, result, inputs = compressed_factory(name, rank=200)
    original = tf.saved_model.load(src)
    rewritten = tf.saved_model.load(out)
    assert set(rewritten.signatures) == set(original.signatures) | {"compression_update"}
    for key, fn in original.signatures.items():
        new = rewritten.signatures[key]
        assert new.structured_input_signature[1].keys() == fn.structured_input_signature[1].keys()
        for k, spec in fn.structured_input_signature[1].items():
            got = new.structured_input_signature[1][k]
            assert (got.dtype, got.shape.as_list()) == (spec.dtype, spec.shape.as_list())
        feed = inputs.get(key) or next(iter(inputs.values()))
        want, got = outputs(fn, feed), outputs(new, feed)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    assert result.verification["max_rel_diff_alpha0"] > 0  # compression does change something


def _loss(model, inputs):
    total = 0.0
    for key, feed in inputs.items():
        out = model.signatures[key](**{n: tf.constant(x) for n, x in feed.items()})
        total += sum(tf.reduce_sum(tf.cast(v, tf.float32) ** 2) for v in out.values())
    return total


@pytest.mark.parametrize("name", KINDS)
def test_gradients_reach_every_trainable_weight_and_training_moves_factors(compressed_factory, name):
    _, out, result, inputs = compressed_factory(name, rank=200)
    model = tf.saved_model.load(out)
    for site in model.graphrewrite_sites:
        site.alpha.assign(0.5)
    names = [v.name for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        loss = _loss(model, inputs)
    grads = tape.gradient(loss, model.trainable_variables)
    missing = [n for n, g in zip(names, grads) if g is None]
    assert not missing
    before = [s.factors["b"].numpy().copy() for s in model.graphrewrite_sites]
    tf.keras.optimizers.SGD(1e-3).apply_gradients(zip(grads, model.trainable_variables))
    after = [s.factors["b"].numpy() for s in model.graphrewrite_sites]
    assert all(np.abs(a - b).max() > 0 for a, b in zip(after, before))


def test_model_contract_attributes(compressed_factory):
    _, out, result, inputs = compressed_factory("digits_mlp", rank=200)
    model = tf.saved_model.load(out)
    assert int(model.global_step.numpy()) == 0
    assert len(model.graphrewrite_sites) == 3
    assert list(model.regularization_losses) == []
    variables = {v.name for v in model.variables}
    trainable = {v.name for v in model.trainable_variables}
    assert {"dense_1/kernel:0", "dense_1/kernel/b_matrix:0", "dense_1/kernel/c_matrix:0",
            "dense_1/kernel/alpha:0", "graphrewrite_global_step:0"} <= variables
    assert "dense_1/kernel/alpha:0" not in trainable and "dense_1/kernel/c_matrix:0" in trainable
    x = tf.constant(inputs["serving_default"]["pixels"])
    np.testing.assert_allclose(model(x).numpy(), model.serve(x).numpy())
    site = model.graphrewrite_sites[0]
    assert site.weight.name == "dense_1/kernel:0"
    assert site.factors["b"].shape == (64, 32) and site.factors["c"].shape == (32, 256)


def test_initial_factors_are_the_truncated_svd_of_the_weight(compressed_factory):
    _, out, _, _ = compressed_factory("digits_mlp", rank=200)
    model = tf.saved_model.load(out)
    for site in model.graphrewrite_sites:
        a = site.weight.numpy()
        b, c = site.factors["b"].numpy(), site.factors["c"].numpy()
        k = b.shape[1]
        u, s, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
        np.testing.assert_allclose(b @ c, (u[:, :k] * s[:k]) @ vt[:k], atol=1e-4)


def test_alpha_zero_equals_the_factored_model(compressed_factory):
    _, out, _, inputs = compressed_factory("digits_mlp", rank=200)
    model = tf.saved_model.load(out)
    x = inputs["serving_default"]["pixels"]
    weights = {}
    for site in model.graphrewrite_sites:
        site.alpha.assign(0.0)
        weights[site.weight.name] = site.factors["b"].numpy() @ site.factors["c"].numpy()
    h = x
    for layer in ("dense_1", "dense_2", "logits"):
        kernel = weights[f"{layer}/kernel:0"]
        bias = next(v for v in model.variables if v.name == f"{layer}/bias:0").numpy()
        h = h @ kernel + bias
        if layer != "logits":
            h = np.maximum(h, 0)
    np.testing.assert_allclose(model.serve(tf.constant(x)).numpy(), h, rtol=1e-4, atol=1e-4)


def test_training_mode_function_of_tf_keras_models_is_kept(compressed_factory):
    src, out, _, inputs = compressed_factory("tf_keras_dropout_bn", rank=200)
    original, model = tf.saved_model.load(src), tf.saved_model.load(out)
    x = tf.constant(inputs["serving_default"]["inputs"])
    np.testing.assert_allclose(model(x, training=False).numpy(), original(x, training=False).numpy(), atol=1e-5)
    moving_mean = next(v for v in model.variables if "moving_mean" in v.name)
    before = moving_mean.numpy().copy()
    model(x, training=True)  # batch statistics update the moving mean, as in the original
    assert np.abs(moving_mean.numpy() - before).max() > 0


def test_hparams_string_is_recorded(compressed_factory):
    text = ("name=cifar10_compression,alpha_decrement_value=0.005,begin_compression_step=40000,"
            "end_compression_step=100000,compression_frequency=100,compression_option=1,use_tpu=True,"
            "update_option=0,rank=200")
    expected = hparams.resolve(text)
    _, out, _, _ = compressed_factory("digits_mlp", **{k: v for k, v in expected.items()})
    assert manifest.read_dir(out)["hparams"] == expected


def test_weights_are_not_embedded_in_the_graph(compressed_factory):
    # Weights live in the checkpoint only, never as constants in saved_model.pb (2 GB limit).
    _, out, _, _ = compressed_factory("digits_cnn", rank=200)
    with open(os.path.join(out, "saved_model.pb"), "rb") as f:
        proto = f.read()
    model = tf.saved_model.load(out)
    floats = [v for v in model.variables if v.dtype == tf.float32 and v.shape.num_elements() >= 64]
    assert len(floats) >= 8  # 3 kernels, 5 factors (conv_1 bias has 32 values)
    for v in floats:
        assert v.numpy().tobytes()[:256] not in proto, v.name


def test_saved_model_cli_reads_the_output(compressed_factory):
    _, out, _, _ = compressed_factory("keras3_multi_input", rank=200)
    proc = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show",
                           "--dir", out, "--all"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "signature_def['serving_default']" in proc.stdout
    assert "signature_def['compression_update']" in proc.stdout
    assert "inputs['features']" in proc.stdout and "outputs['score']" in proc.stdout


def test_inlining_helper_flattens_nested_functions():
    from graphrewrite.rewriting.graph import Graph
    from graphrewrite.rewriting.loader import inline_function

    w = tf.Variable(tf.ones([4, 3]))

    @tf.function
    def inner(x):
        return tf.matmul(x, w)

    @tf.function(input_signature=[tf.TensorSpec([None, 4])])
    def outer(x):
        return inner(x) + 1.0

    graph = Graph(inline_function(outer.get_concrete_function()))
    ops = {n.op for n in graph}
    assert "StatefulPartitionedCall" not in ops and "PartitionedCall" not in ops
    matmul = next(n for n in graph if n.op == "MatMul")
    assert graph[matmul.data_inputs[1].node].op == "ReadVariableOp"


def test_inlining_keeps_how_control_flow_runs():
    # The inlining helper marks every While/If "_lower_using_switch_merge: False" to keep them
    # functional; that attribute also decides whether the runtime lowers them, so each gets back
    # the value its tf.function gave it (True here; not set under XLA), not False.
    from graphrewrite.rewriting.loader import _LOWERING, inline_function

    w = tf.Variable(tf.ones([4, 4]))

    @tf.function(jit_compile=True)
    def compiled(x):
        return tf.while_loop(lambda i, h: i < 2, lambda i, h: (i + 1, tf.matmul(h, w)), (0, x))[1]

    @tf.function
    def inner(x):
        h = tf.while_loop(lambda i, h: i < 3, lambda i, h: (i + 1, tf.tanh(tf.matmul(h, w))), (0, x))[1]
        return tf.cond(tf.reduce_sum(h) > 0, lambda: h * 2.0, lambda: h) + compiled(x)

    @tf.function(input_signature=[tf.TensorSpec([None, 4])])
    def outer(x):
        return inner(x) + 1.0

    concrete = outer.get_concrete_function()

    def flags(graph_def):
        nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
        return sorted((n.attr["body"].func.name or n.attr["then_branch"].func.name,
                       n.attr[_LOWERING].b if _LOWERING in n.attr else None)
                      for n in nodes if n.op in ("While", "StatelessWhile", "If", "StatelessIf"))

    before, after = flags(concrete.graph.as_graph_def()), flags(inline_function(concrete))
    assert after == before and {flag for _, flag in before} == {True, None}
    assert sum(flag is True for _, flag in before) == 2  # the loop and the cond; the compiled loop: not set


def test_big_models_are_verified_in_memory(monkeypatch, model_factory, tmp_path):
    # Above VERIFY_IN_MEMORY_ABOVE bytes of weights compress does not reload its output (that
    # would hold the weights twice): it checks the rebuilt model before saving, then the files.
    from graphrewrite import compress
    from graphrewrite.rewriting import pipeline

    monkeypatch.setattr(pipeline, "VERIFY_IN_MEMORY_ABOVE", 0)
    src, inputs = model_factory("digits_mlp")
    result = compress(src, str(tmp_path / "out"), hparams.resolve(None, {"rank": 200}))
    assert result.verification["mode"] == "in memory, saved files checked"
    reloaded = tf.saved_model.load(str(tmp_path / "out"))
    x = tf.constant(inputs["serving_default"]["pixels"])
    original = tf.saved_model.load(src)
    np.testing.assert_allclose(reloaded.serve(x).numpy(), original.serve(x).numpy(), atol=1e-5)
    assert result.verification["max_rel_diff_alpha0"] > 0
    assert [float(s.alpha.numpy()) for s in reloaded.graphrewrite_sites] == [1.0] * 3


def test_verification_catches_a_wrong_rewrite(monkeypatch, model_factory, tmp_path):
    from graphrewrite import compress
    from graphrewrite.errors import VerificationError
    from graphrewrite.rewriting import build

    original = build.site_output

    def off_by_one(*args, **kwargs):
        return original(*args, **kwargs) + 1.0

    monkeypatch.setattr(build, "site_output", off_by_one)
    src, _ = model_factory("digits_mlp")
    with pytest.raises(VerificationError, match="differs from the input model at alpha = 1"):
        compress(src, str(tmp_path / "out"), hparams.resolve(None, {"rank": 200}))
    assert not (tmp_path / "out").exists()


def test_sites_of_one_kind_share_a_gated_function_but_keep_their_own_weights(tmp_path):
    """Three equally shaped weights go through one shared gated function (one custom gradient saved,
    not three); each must still compute with its own A and factors, at every alpha."""
    from models import matrix_model

    import graphrewrite
    from graphrewrite.rewriting.pipeline import read_saved_model_proto

    rng = np.random.default_rng(7)
    matrices = {name: rng.standard_normal((24, 24)).astype(np.float32) for name in ("a", "b", "c")}
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    matrix_model(src, matrices)
    graphrewrite.compress(src, out, hparams.resolve(None, {"rank": 300}))
    library = read_saved_model_proto(out).meta_graphs[0].graph_def.library
    gates = {f.signature.name for f in library.function if "gate_body" in f.signature.name}
    assert len(gates) == 1, gates
    assert len(library.registered_gradients) == 1  # one custom gradient saved for the three sites
    model = tf.saved_model.load(out)
    x = rng.standard_normal((5, 24)).astype(np.float32)
    by_name = {site.weight.name.split(":")[0]: site for site in model.graphrewrite_sites}
    assert sorted(by_name) == ["a", "b", "c"]
    for alpha in (1.0, 0.3, 0.0):
        for site in model.graphrewrite_sites:
            site.alpha.assign(alpha)
        got = model.signatures["serving_default"](x=tf.constant(x))
        for name, site in by_name.items():
            w_c = site.factors["b"].numpy() @ site.factors["c"].numpy()
            want = x @ (alpha * matrices[name] + (1 - alpha) * w_c)
            np.testing.assert_allclose(got[name].numpy(), want, rtol=1e-4, atol=1e-4)


class _Noisy(tf.Module):
    """A MatMul model whose signature adds noise from a stateful random op: always (``always``),
    or only where the unknown dimension is sampled at 4 or more (``always`` False); with
    ``positions`` rows, it also adds a row of a table that long per position, which fails on
    longer sequences (a position embedding)."""

    def __init__(self, always: bool, positions: int = 0) -> None:
        super().__init__()
        self.kernel = tf.Variable(np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32))
        self.table = tf.Variable(np.ones((max(positions, 1), 16), np.float32))
        self.always, self.positions = always, positions

    @tf.function(input_signature=[tf.TensorSpec([None, None, 16], tf.float32)])
    def serve(self, x):
        if self.positions:  # Python bools: decided when the function is traced
            x = x + tf.gather(self.table, tf.range(tf.shape(x)[1]))
        y = tf.reduce_mean(tf.matmul(x, self.kernel), axis=1)
        if self.always:
            return {"y": y + tf.random.uniform(tf.shape(y))}
        return {"y": tf.cond(tf.shape(x)[1] >= 4, lambda: y + tf.random.uniform(tf.shape(y)), lambda: y)}


def _noisy_model(path, always: bool, positions: int = 0) -> str:
    module = _Noisy(always, positions)
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    return str(path)


def test_reference_inputs_must_reproduce(tmp_path):
    """verify.reproducible: unknown dimensions at 32 first; a signature answering the same inputs
    differently there, or failing there, is sampled at 8 and then 2; one that never reproduces
    is not compared, and says why."""
    from graphrewrite.rewriting import verify

    def load(name, always, positions=0):
        return tf.saved_model.load(_noisy_model(tmp_path / name, always, positions)).signatures["serving_default"]

    large = load("large", False)  # noisy at 4 and more
    assert verify.sample_sizes(large.structured_input_signature[1]) == [32, 8, 2]
    inputs, outputs = verify.reproducible(large)
    assert inputs["x"].shape == (2, 2, 16) and outputs["y"].shape == (2, 64)
    inputs, _ = verify.reproducible(load("short", False, positions=4))  # fails at 32 and 8
    assert inputs["x"].shape == (2, 2, 16)
    assert verify.reproducible(load("always", True)) == (
        "its outputs differ between two calls on the same inputs (random ops, or values the model leaves "
        "undefined at the sampled sizes: 32, 8, 2)")
    assert verify.reproducible(load("always_short", True, positions=4)) == (
        "its outputs differ between two calls on the same inputs (random ops, or values the model leaves "
        "undefined at the sampled sizes: 2; it fails at 32, 8)")
    with pytest.raises(tf.errors.InvalidArgumentError):  # fails at every size: the error stands
        verify.reproducible(load("shorter", False, positions=1))
    many = {"x": tf.TensorSpec([None] * 5, tf.float32)}  # 32^5 values: over SAMPLE_ELEMENTS
    assert verify.sample_sizes(many) == [8, 2] and verify.sample_sizes({"x": tf.TensorSpec([4], tf.float32)}) == [2]


def test_a_signature_that_does_not_reproduce_is_reported_unchecked(tmp_path, capsys):
    """compress and export write the model and name the signature they could not verify, with why,
    instead of failing on noise (before: compress refused such a model as a wrong rewrite) or
    passing by chance (MobileNetV3 at 2 x 2)."""
    from test_cli import run

    src = _noisy_model(tmp_path / "always", True)
    out, final = str(tmp_path / "out"), str(tmp_path / "final")
    for argv in (["compress", src, out, "--rank=400", "-q"], ["export", out, final, "--force"]):
        code, text, err = run(capsys, *argv)
        assert code == 0, err
        assert "not verified: signature 'serving_default': its outputs differ between two calls" in text, text
        assert "but those below" in text
    assert manifest.read_dir(out)["verification"]["signatures"]["serving_default"]["checked"] is False
    small = _noisy_model(tmp_path / "small", False)  # noisy at 32 and 8, reproducible at 2: checked there
    code, text, err = run(capsys, "compress", small, str(tmp_path / "small_out"), "--rank=400", "-q")
    assert code == 0 and "not verified" not in text, err
    assert manifest.read_dir(str(tmp_path / "small_out"))["verification"]["signatures"]["serving_default"]["checked"]
