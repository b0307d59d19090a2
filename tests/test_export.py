"""``export``: the final model keeps only the compressed factors, equals alpha = 0, is smaller."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import graphrewrite
from graphrewrite.errors import ExportRefusedError, InputModelError
from graphrewrite.rewriting import manifest
from graphrewrite.rewriting.exporting import export

MODELS = ["digits_mlp", "digits_cnn", "keras3_attention", "keras3_mixed_precision", "keras3_multi_input",
          "keras3_lstm", "tf_keras_dropout_bn", "tf_module_multi_signature", "tf1_builder"]
# The default suite exports one model per kind of op and of SavedModel (MatMul, Conv2D, BatchMatMulV2
# + Einsum, TF1); the others (mixed precision, multi-input, LSTM, tf.keras training functions) run
# with -m heavy, as they cost 10-20 s each.
DEFAULT = {"digits_mlp", "digits_cnn", "keras3_attention", "tf_module_multi_signature", "tf1_builder"}
EXPORTED = [name if name in DEFAULT else pytest.param(name, marks=pytest.mark.heavy) for name in MODELS]


def outputs(fn, feed):
    return {k: v.numpy() for k, v in fn(**{n: tf.constant(x) for n, x in feed.items()}).items()}


@pytest.fixture(scope="module")
def exported(compressed_factory, tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            _, out, result, inputs = compressed_factory(name, rank=200)
            final = str(tmp_path_factory.mktemp("final") / name)
            cache[name] = (out, final, export(out, final, force=True), inputs)
        return cache[name]

    return get


@pytest.mark.parametrize("name", EXPORTED)
def test_export_equals_the_rewritten_model_at_alpha_zero(exported, name):
    out, final, result, inputs = exported(name)
    rewritten, model = tf.saved_model.load(out), tf.saved_model.load(final)
    for site in rewritten.graphrewrite_sites:
        site.alpha.assign(0.0)
    assert set(model.signatures) == set(rewritten.signatures) - {"compression_update"}
    for key, feed in inputs.items():
        want, got = outputs(rewritten.signatures[key], feed), outputs(model.signatures[key], feed)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)
    assert result.max_rel_diff_alpha0 is not None and result.max_rel_diff_alpha0 < 1e-4


@pytest.mark.parametrize("name", EXPORTED)
def test_export_drops_the_dense_weights_and_the_schedule(exported, name):
    out, final, result, _ = exported(name)
    data = manifest.read_dir(out)
    model = tf.saved_model.load(final)
    names = {v.name for v in model.variables}
    for site in data["sites"]:
        assert f"{site['variable']}:0" not in names
    assert not hasattr(model, "compression_update") and not hasattr(model, "global_step")
    assert not any("alpha" in n or "last_alpha_update_step" in n for n in names)
    assert manifest.read_dir(final) is None
    kept = sum(int(np.prod(v.shape)) for v in model.variables)
    uncompressed = kept - data["totals"]["params_after"]
    rewritten = tf.saved_model.load(out)
    others = sum(int(np.prod(v.shape)) for v in rewritten.graphrewrite_source_variables
                 if v.name.split(":")[0] not in {s["variable"] for s in data["sites"]})
    assert uncompressed == others  # factors plus the weights that were not compressed, nothing else
    # The weights on disk shrink; the whole directory (result.bytes_*) also holds the functions,
    # which for these tiny test models can outweigh the weights.
    weights = [manifest.dir_bytes(os.path.join(path, "variables")) for path in (out, final)]
    assert weights[1] < weights[0] and result.bytes_after == manifest.dir_bytes(final)


def test_low_rank_is_two_products_and_conv_two_convolutions(exported):
    _, final, _, _ = exported("digits_cnn")
    model = tf.saved_model.load(final)
    graph = model.signatures["serving_default"].graph
    ops = []

    def walk(g):
        for op in g.get_operations():
            ops.append(op)
            if op.type in ("StatefulPartitionedCall", "PartitionedCall"):
                walk(g._get_function(op.get_attr("f").name).graph)

    walk(graph)
    convs = [op.inputs[1].shape.as_list() for op in ops if op.type == "Conv2D"]
    assert [3, 3, 1, 5] in convs and [1, 1, 5, 32] in convs and [3, 3, 32, 32] in convs
    matmuls = [op.inputs[1].shape.as_list() for op in ops if op.type == "MatMul"]
    assert matmuls == [[1024, 5], [5, 10]]  # (x @ B) @ C, never B @ C


def test_refused_while_alpha_is_above_zero(compressed_factory, tmp_path):
    _, out, _, _ = compressed_factory("digits_mlp", rank=200)
    with pytest.raises(ExportRefusedError, match="alpha is still 1 at 3 of 3 sites"):
        export(out, str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()


def test_force_reports_the_output_shift(exported):
    _, _, result, _ = exported("digits_mlp")
    assert result.max_alpha == 1.0 and result.output_shift > 0.1


def test_the_comparison_runs_the_tuned_model_in_the_sandbox_only(compressed_factory, tmp_path, monkeypatch):
    """The tuned model's functions run only in the sandbox: in this process its signatures raise."""
    from graphrewrite.rewriting import exporting, sandbox

    _, out, _, _ = compressed_factory("digits_mlp", rank=200)
    jobs = []
    real_run, real_load = sandbox.run, exporting._load_tuned

    def record(target, *args, **kwargs):
        jobs.append(target)
        return real_run(target, *args, **kwargs)

    def load_without_running(*args, **kwargs):
        tuned, data, source = real_load(*args, **kwargs)
        tuned.signatures = _Refusing(tuned.signatures)
        return tuned, data, source

    monkeypatch.setattr(sandbox, "run", record)
    monkeypatch.setattr(exporting, "_load_tuned", load_without_running)
    result = export(out, str(tmp_path / "final"), force=True)
    assert "graphrewrite.rewriting.exporting:compare_job" in jobs
    assert result.output_shift > 0.1 and result.max_rel_diff_alpha0 < 1e-4


class _Refusing(dict):
    """Signature functions that fail when called (they are listed, as _source_model needs)."""

    def __init__(self, signatures):
        super().__init__({k: self._refuse for k in signatures})

    @staticmethod
    def _refuse(**_):
        raise AssertionError("the tuned model ran in graphrewrite's own process")


def test_export_after_fine_tuning_resave_and_checkpoint(compressed_factory, tmp_path):
    _, out, _, inputs = compressed_factory("digits_mlp", rank=200, begin_compression_step=0,
                                           compression_frequency=1, alpha_decrement_value=0.5)
    model = tf.saved_model.load(out)
    x = tf.constant(inputs["serving_default"]["pixels"])
    optimizer = tf.keras.optimizers.SGD(0.01)
    for step in range(1, 6):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(x) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        graphrewrite.compression_update(model, tf.constant(step, tf.int64))
    assert [float(s.alpha.numpy()) for s in model.graphrewrite_sites] == [0.0] * 3
    expected = model(x).numpy()

    resaved = str(tmp_path / "tuned")
    tf.saved_model.save(model, resaved)  # the plain way
    final = str(tmp_path / "final")
    result = export(resaved, final)
    assert result.max_alpha == 0.0
    final_model = tf.saved_model.load(final)
    np.testing.assert_allclose(final_model.serve(x).numpy(), expected, rtol=1e-4, atol=1e-5)

    checkpoint = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt" / "tuned"))
    final2 = str(tmp_path / "final2")
    export(out, final2, checkpoint=checkpoint)
    final2_model = tf.saved_model.load(final2)
    np.testing.assert_allclose(final2_model.serve(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputModelError, match="not a checkpoint of this model"):
        bad = tf.train.Checkpoint(other=tf.Variable(1.0)).save(str(tmp_path / "bad" / "x"))
        export(out, str(tmp_path / "final3"), checkpoint=bad)


def test_not_a_rewritten_model_is_refused(model_factory, tmp_path):
    src, _ = model_factory("digits_mlp")
    with pytest.raises(InputModelError, match="not a model rewritten by graphrewrite"):
        export(src, str(tmp_path / "final"))


def test_tflite_conversion_keeps_the_factors_small(exported, model_factory, tmp_path):
    src, _ = model_factory("digits_mlp")
    _, final, _, _ = exported("digits_mlp")
    original = tf.lite.TFLiteConverter.from_saved_model(src).convert()
    compressed = tf.lite.TFLiteConverter.from_saved_model(final).convert()
    # Constant folding must not rebuild B @ C: the file shrinks like the parameters (0.70x).
    assert len(compressed) < 0.8 * len(original)
    interpreter = tf.lite.Interpreter(model_content=compressed)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()[0]
    x = np.random.default_rng(0).random((1, 64)).astype(np.float32)
    interpreter.resize_tensor_input(details["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(details["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    final_model = tf.saved_model.load(final)
    np.testing.assert_allclose(got, final_model.serve(tf.constant(x)).numpy(), rtol=1e-4, atol=1e-4)
