"""Calibration statistics beyond Dense and Conv2D, and the subsampled patch rows that bound the pass's cost."""

from __future__ import annotations

import os

import numpy as np
import pytest
from test_calibration import CNN

from graphrewrite import whiten


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory):
    """One Keras model with a lookup table (tokens), a Conv2DTranspose and a strided pointwise Conv2D
    (image), and a Conv3D (volume)."""
    import keras

    keras.utils.set_random_seed(3)
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    image = keras.Input((4, 4, 3), name="image")
    volume = keras.Input((4, 4, 4, 2), name="volume")
    embedded = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(50, 12, name="table")(tokens))
    up = keras.layers.Flatten()(keras.layers.Conv2DTranspose(5, 2, strides=2, name="up")(image))
    deep = keras.layers.Flatten()(keras.layers.Conv3D(4, 3, padding="same", name="deep")(volume))
    point = keras.layers.Flatten()(keras.layers.Conv2D(4, 1, strides=2, name="point")(image))
    out = keras.layers.Dense(3)(keras.layers.Concatenate()([embedded, up, deep, point]))
    path = os.path.join(str(tmp_path_factory.mktemp("mixed")), "model")
    keras.Model([tokens, image, volume], out).export(path, verbose=False)
    return path


@pytest.fixture(scope="module")
def mixed_statistics(mixed_model):
    from graphrewrite.rewriting import loader
    from graphrewrite.rewriting.calibration import reader, statistics

    model = loader.load(mixed_model, ["serve"], True)
    specs = statistics.input_specs(model, "serving_default")
    rng = np.random.default_rng(0)
    # token ids 0..29 only, skewed: rows 30..49 of the table are never looked up
    raw = {"tokens": np.minimum(rng.geometric(0.15, (40, 6)) - 1, 29).astype(np.int32),
           "image": rng.standard_normal((40, 4, 4, 3)).astype(np.float32),
           "volume": rng.standard_normal((40, 4, 4, 4, 2)).astype(np.float32)}
    data = reader.read(raw, specs)
    with pytest.MonkeyPatch.context() as patch:  # every patch row: exact Grams to compare with numpy
        patch.setattr(statistics, "ROWS_PER_FEATURE", 10**6)
        stats = statistics.collect(model, data, "serving_default", batch_size=16)
    return model, data, stats, {model.infos[k].name.split("/")[-2]: k for k in stats.grams}


def test_lookup_gram_is_the_diagonal_of_lookup_counts(mixed_statistics):
    _, data, stats, keys = mixed_statistics
    gram = stats.grams[keys["table"]]
    assert gram.shape == (50,) and stats.rows[keys["table"]] == 240
    np.testing.assert_allclose(gram, np.bincount(data["tokens"].ravel(), minlength=50) / 240, rtol=1e-6)
    assert np.all(gram[30:] == 0)


def test_conv_transpose_pointwise_and_conv3d_grams(mixed_statistics):
    _, data, stats, keys = mixed_statistics
    assert not stats.missing
    pixels = data["image"].reshape(-1, 3).astype(np.float64)  # every input pixel's 3 channels
    np.testing.assert_allclose(stats.grams[keys["up"]], pixels.T @ pixels / len(pixels), rtol=1e-5, atol=1e-7)
    strided = data["image"][:, ::2, ::2, :].reshape(-1, 3).astype(np.float64)  # 1 x 1, stride 2: no patches
    np.testing.assert_allclose(stats.grams[keys["point"]], strided.T @ strided / len(strided), rtol=1e-5, atol=1e-7)
    # Conv3D: 3 x 3 x 3 patches of the zero-padded volume, ordered (kd, kh, kw, cin) like the kernel
    v = np.pad(data["volume"].astype(np.float64), ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    patches = np.stack([v[:, d:d + 4, h:h + 4, w:w + 4] for d in range(3) for h in range(3) for w in range(3)],
                       axis=-2).reshape(-1, 54)
    assert stats.rows[keys["deep"]] == len(patches) == 40 * 64
    np.testing.assert_allclose(stats.grams[keys["deep"]], patches.T @ patches / len(patches), rtol=1e-4, atol=1e-6)


def test_row_weighted_lookup_factors(mixed_statistics):
    model, _, stats, keys = mixed_statistics
    table = model.variables[keys["table"]].numpy().astype(np.float64)
    counts = stats.grams[keys["table"]]
    k = 4
    b, c = whiten.low_rank(table, counts, k)
    # the diagonal path equals the dense one on np.diag of the same (damped) Gram
    dense_b, dense_c = whiten.low_rank(table, np.diag(counts), k, damping=whiten.LOOKUP_DAMPING)
    np.testing.assert_allclose(b @ c, dense_b @ dense_c, atol=1e-5)
    approx = b.astype(np.float64) @ c
    u, s, vt = np.linalg.svd(table, full_matrices=False)
    plain = (u[:, :k] * s[:k]) @ vt[:k]
    error = whiten.output_error(table, approx, counts)
    assert error < whiten.output_error(table, plain, counts)  # better on the lookups it was fitted to
    # rows never looked up still get a share: their error stays within 2x plain SVD's on them
    unseen = np.linalg.norm(table[30:] - approx[30:]) / np.linalg.norm(table[30:] - plain[30:])
    assert unseen < 2.0


def test_patch_rows_are_a_seeded_sample_of_bounded_size(monkeypatch):
    from make_testdata import digits_split

    from graphrewrite.rewriting import loader
    from graphrewrite.rewriting.calibration import statistics

    model = loader.load(CNN, ["serve"], True)
    data = {"image": digits_split()[0][:256].reshape(-1, 8, 8, 1)}
    first = statistics.collect(model, data, "serving_default", batch_size=32)
    again = statistics.collect(model, data, "serving_default", batch_size=32)
    monkeypatch.setattr(statistics, "ROWS_PER_FEATURE", 10**6)
    exact = statistics.collect(model, data, "serving_default", batch_size=32)
    names = {model.infos[k].name.split("/")[0]: k for k in first.grams}
    # 8 batches of 32 x 64 = 2,048 patch rows; kept: 16 per feature over the pass, 16 m / 8 a batch
    # (conv_2: 576 of 2,048), but at least one an example (conv_1's 9 features: 32, not 18)
    assert first.rows[names["conv_1"]] == 8 * 32 and first.rows[names["conv_2"]] == 8 * 576
    assert exact.rows[names["conv_2"]] == 8 * 2048 and first.rows[names["logits"]] == 256  # one row an image
    # the head: 256 rows for 1,024 features, kept as rows (no 1,024 x 1,024 Gram of rank 256)
    assert isinstance(first.grams[names["logits"]], whiten.RowGram)
    assert first.grams[names["logits"]].rows.shape == (256, 1024)
    np.testing.assert_array_equal(first.grams[names["conv_2"]], again.grams[names["conv_2"]])  # seeded
    # the sample's Gram is close to all rows' and its whitened factors nearly as good on all rows
    conv_2 = exact.grams[names["conv_2"]]
    assert np.linalg.norm(first.grams[names["conv_2"]] - conv_2) / np.linalg.norm(conv_2) < 0.1
    kernel = model.variables[names["conv_2"]].numpy().reshape(288, 64)
    for k in (4, 8):
        sampled = np.matmul(*whiten.low_rank(kernel, first.grams[names["conv_2"]], k))
        best = np.matmul(*whiten.low_rank(kernel, conv_2, k))
        plain = np.matmul(*whiten.low_rank(kernel, np.eye(288), k))
        errors = [whiten.output_error(kernel, w, conv_2) for w in (sampled, best, plain)]
        assert errors[1] <= errors[0] < min(1.05 * errors[1], errors[2])


@pytest.mark.parametrize("rows,m,n", [(12, 40, 9), (40, 40, 30)])
def test_row_gram_whitening_equals_the_dense_one(rows, m, n):
    """A site with no more rows than features keeps its rows: the same factors, errors and spectrum
    as the m x m Gram they imply, without forming or factorising it."""
    rng = np.random.default_rng(rows)
    x, a = rng.standard_normal((rows, m)) @ rng.standard_normal((m, m)), rng.standard_normal((m, n))
    gram = whiten.RowGram((x / np.sqrt(rows)).astype(np.float32))
    dense = whiten.dense(gram)
    np.testing.assert_allclose(dense, x.T @ x / rows, rtol=1e-5, atol=1e-5 * np.abs(dense).max())
    np.testing.assert_allclose(whiten.whitened_spectrum(a, gram), whiten.whitened_spectrum(a, dense), rtol=1e-6)
    for k in (1, 5):
        b, c = whiten.low_rank(a, gram, k)
        dense_b, dense_c = whiten.low_rank(a, dense, k)
        np.testing.assert_allclose(b @ c, dense_b @ dense_c, atol=1e-4 * np.abs(a).max())
        assert whiten.output_error(a, b @ c, gram) == pytest.approx(whiten.output_error(a, b @ c, dense), rel=1e-6)
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        assert whiten.output_error(a, b @ c, gram) <= whiten.output_error(a, (u[:, :k] * s[:k]) @ vt[:k], gram)


def test_a_weight_with_row_kept_and_gram_readers_sums_both():
    from graphrewrite.rewriting.calibration import statistics

    rng = np.random.default_rng(5)
    few, many = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal((20, 8)).astype(np.float32)
    alone = statistics._Sum(8)
    alone.add(few, 3, as_rows=True)
    assert isinstance(alone.result(), whiten.RowGram)
    np.testing.assert_allclose(whiten.dense(alone.result()), few.T.astype(np.float64) @ few / 3, rtol=1e-5)
    both = statistics._Sum(8)
    both.add(few, 3, as_rows=True)
    both.add(many.T @ many, 20, as_rows=False)
    x = np.concatenate([few, many]).astype(np.float64)
    np.testing.assert_allclose(both.result(), x.T @ x / 23, rtol=1e-5)


def test_compress_with_lookup_conv_transpose_and_conv3d_statistics(mixed_model, mixed_statistics, tmp_path):
    """End to end: the three new kinds of site are factorised from their statistics, and on the
    calibration data their output error is never above plain factors' at the same k."""
    import graphrewrite
    from graphrewrite import hparams

    _, data, _, _ = mixed_statistics
    result = graphrewrite.compress(mixed_model, str(tmp_path / "out"), hparams.resolve(None, {"rank": 300}),
                                   overwrite=True, calibration=data)
    by_name = {s["variable"].split("/")[-2]: s["details"] for s in result.manifest["sites"]}
    for name in ("table", "up", "deep", "point"):
        details = by_name[name]
        assert details["factors"] == "calibrated", details
        assert details["output_error"] <= details["output_error_plain"] + 1e-6
    assert by_name["table"]["output_error"] < by_name["table"]["output_error_plain"]


def test_rows_of_unknown_length_are_reduced_to_a_gram(tmp_path):
    """A sequence input of unknown length: the rows per example are not known when the pass is
    traced, so the Gram is formed whatever their number (here 40 x 3 = 120 rows for 128 features,
    which with a known length would be kept as rows)."""
    import keras

    from graphrewrite.rewriting import loader
    from graphrewrite.rewriting.calibration import reader, statistics

    keras.utils.set_random_seed(4)
    tokens = keras.Input((None, 128), name="steps")
    keras.Model(tokens, keras.layers.Dense(4, name="proj")(tokens)).export(str(tmp_path / "m"), verbose=False)
    model = loader.load(str(tmp_path / "m"), ["serve"], True)
    x = np.random.default_rng(1).standard_normal((40, 3, 128)).astype(np.float32)
    data = reader.read({"steps": x}, statistics.input_specs(model, "serving_default"))
    (gram,) = statistics.collect(model, data, "serving_default", batch_size=16).grams.values()
    rows = x.reshape(-1, 128).astype(np.float64)
    assert isinstance(gram, np.ndarray) and gram.shape == (128, 128)
    np.testing.assert_allclose(gram, rows.T @ rows / 120, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rows,m,n,dead", [(200, 40, 12, 0), (20, 40, 12, 0), (200, 30, 8, 7)])
def test_output_gram_whitening_equals_the_input_one(rows, m, n, dead):
    """A weight with fewer outputs than inputs can be calibrated from ``A^T G A`` and ``tr(G)``
    alone (whiten.OutputGram): the same damped factors, spectrum and output errors as ``G``."""
    rng = np.random.default_rng(rows + dead)
    x, a = rng.standard_normal((rows, m)) @ rng.standard_normal((m, m)), rng.standard_normal((m, n))
    x[:, :dead] = 0.0
    gram = x.T @ x / rows
    outputs = whiten.OutputGram(a.T @ gram @ a, float(np.trace(gram)), m)
    np.testing.assert_allclose(whiten.whitened_spectrum(a, outputs), whiten.whitened_spectrum(a, gram),
                               rtol=1e-6, atol=1e-9 * whiten.whitened_spectrum(a, gram)[0])
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    for k in (1, 4, n - 1):
        b, c = whiten.low_rank(a, outputs, k)
        dense_b, dense_c = whiten.low_rank(a, gram, k)
        np.testing.assert_allclose(b @ c, dense_b @ dense_c, atol=1e-5 * np.abs(a).max())
        # the factors themselves, not only their product: the same split and signs
        np.testing.assert_allclose(b, dense_b, atol=1e-4 * np.abs(dense_b).max())
        np.testing.assert_allclose(c, dense_c, atol=1e-4 * np.abs(dense_c).max())
        plain = (u[:, :k] * s[:k]) @ vt[:k]
        for approx in (b @ c, plain):
            assert whiten.output_error(a, approx, outputs) == pytest.approx(whiten.output_error(a, approx, gram),
                                                                            rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match="input Gram"):  # a replacement outside A's column space
        whiten.output_error(a, rng.standard_normal((m, n)), outputs)
    with pytest.raises(TypeError):
        whiten.dense(outputs)


def test_output_errors_of_a_rank_deficient_weight():
    """A weight with dead and repeated output columns (rank below n): the output error from its
    output Gram (P from a least-squares solve, the normal equations being singular) is the input
    Gram's, for plain and calibrated factors; a replacement outside its column space is refused."""
    rng = np.random.default_rng(5)
    x, a = rng.standard_normal((300, 30)), rng.standard_normal((30, 10))
    a[:, 0], a[:, 1] = 0.0, a[:, 2]  # a dead filter and a duplicated one: rank 8
    gram = x.T @ x / 300
    outputs = whiten.OutputGram(a.T @ gram @ a, float(np.trace(gram)), 30)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    for k in (2, 5):
        for approx in (np.matmul(*whiten.low_rank(a, gram, k)), (u[:, :k] * s[:k]) @ vt[:k]):
            assert whiten.output_error(a, approx, outputs) == pytest.approx(whiten.output_error(a, approx, gram),
                                                                            rel=1e-6, abs=1e-9)
    outside = a.copy()
    outside[:, 0] = rng.standard_normal(30)
    with pytest.raises(ValueError, match="input Gram"):
        whiten.output_error(a, outside, outputs)


@pytest.fixture(scope="module")
def conv_zoo_model(tmp_path_factory):
    """Convolutions of every layout the output Grams must line up with (strided 3 x 3 'same',
    dilated 5 x 5 'valid', strided pointwise, Conv1D), a Dense on a sequence and a head."""
    import keras

    keras.utils.set_random_seed(4)
    image = keras.Input((12, 12, 6), name="image")
    sequence = keras.Input((10, 8), name="sequence")
    parts = [keras.layers.Conv2D(4, 3, strides=2, padding="same", name="strided")(image),
             keras.layers.Conv2D(3, 5, dilation_rate=2, name="dilated")(image),
             keras.layers.Conv2D(2, 1, strides=2, name="point")(image),
             keras.layers.Conv1D(3, 3, padding="same", name="temporal")(sequence),
             keras.layers.Dense(5, name="tokens")(sequence),
             keras.layers.Conv2D(9, 1, name="wide")(image)]  # more outputs than inputs: input Gram
    flat = keras.layers.Concatenate()([keras.layers.Flatten()(p) for p in parts])
    path = os.path.join(str(tmp_path_factory.mktemp("convs")), "model")
    keras.Model([image, sequence], keras.layers.Dense(3, name="head")(flat)).export(path, verbose=False)
    return path


def test_output_grams_are_the_input_grams_seen_through_the_weight(conv_zoo_model, monkeypatch):
    """collect(outputs=True) keeps, for each narrow weight, ``A^T G A`` and ``tr(G)`` of all its
    rows, without sampling: the input Gram ``G`` of every patch row seen through the weight; the
    other weights' Grams are unchanged."""
    from graphrewrite.rewriting import loader
    from graphrewrite.rewriting.calibration import reader, statistics
    from graphrewrite.rewriting.match import match_function

    model = loader.load(conv_zoo_model, ["serve"], True)
    rng = np.random.default_rng(0)
    raw = {"image": rng.standard_normal((40, 12, 12, 6)).astype(np.float32),
           "sequence": rng.standard_normal((40, 10, 8)).astype(np.float32)}
    data = reader.read(raw, statistics.input_specs(model, "serving_default"))
    sampled = statistics.collect(model, data, "serving_default", batch_size=8)
    outputs = statistics.collect(model, data, "serving_default", batch_size=8, outputs=True)
    with monkeypatch.context() as patch:  # every patch row
        patch.setattr(statistics, "ROWS_PER_FEATURE", 10**6)
        inputs = statistics.collect(model, data, "serving_default", batch_size=8)
    uses, _ = match_function(model.functions["signature:serving_default"], dict(model.infos))
    views = {u.variable: u.view for u in uses}
    names = {model.infos[k].name.split("/")[-2]: k for k in views}
    assert not inputs.missing and not outputs.missing
    narrow = {name for name, key in names.items() if isinstance(outputs.grams.get(key), whiten.OutputGram)}
    assert narrow == {"strided", "dilated", "point", "temporal", "tokens", "head"}
    for name in narrow:
        assert outputs.rows[names[name]] == inputs.rows[names[name]], name
        assert outputs.held_rows[names[name]] == inputs.held_rows[names[name]], name
    # the default input Grams sample the strided convolution's patches (16 rows a feature: 173 of a
    # batch's 288), not the dilated one's (128 a batch for 150 features)
    assert sampled.rows[names["strided"]] == 5 * 173 and sampled.rows[names["dilated"]] == 40 * 4 * 4
    assert outputs.rows[names["strided"]] == 40 * 6 * 6 and outputs.rows[names["dilated"]] == 40 * 4 * 4
    assert isinstance(outputs.grams[names["wide"]], np.ndarray)  # as collected without outputs
    np.testing.assert_array_equal(outputs.grams[names["wide"]], sampled.grams[names["wide"]])
    for name in narrow:
        key = names[name]
        a = model.matrix(key, views[key]).astype(np.float64)
        for got, gram in ((outputs.grams[key], inputs.grams[key]), (outputs.fitted(key), inputs.fitted(key))):
            g = whiten.dense(gram)
            expected = a.T @ g @ a
            np.testing.assert_allclose(got.h, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max(), err_msg=name)
            assert got.trace == pytest.approx(np.trace(g), rel=1e-5) and got.m == a.shape[0]
            np.testing.assert_allclose(np.matmul(*whiten.low_rank(a, got, 2)), np.matmul(*whiten.low_rank(a, gram, 2)),
                                       atol=1e-4 * np.abs(a).max(), err_msg=name)


def test_compress_from_output_grams_writes_what_input_grams_would(capsys, tmp_path, monkeypatch):
    """compress --calibration (low rank) collects output Grams for the digits CNN's narrow weights
    (conv_2 and the head); forced to input Grams of every patch row (the output Grams' rows: all of
    them) it writes the same factors, output errors, error feedback and model check. (The passes run
    here, not in the sandbox, for the patched row count to reach them.)"""
    import tensorflow as tf
    from make_testdata import digits_split
    from test_cli import run

    from graphrewrite.rewriting import manifest, sandbox
    from graphrewrite.rewriting.calibration import statistics
    from graphrewrite.transforms.low_rank import LowRank

    run_job = sandbox.run

    def here(target, *args, **kwargs):
        module, _, name = target.partition(":")
        if module == statistics.__name__ and name in ("collect_job", "feedback_job"):
            return getattr(statistics, name)(*args)
        return run_job(target, *args, **kwargs)

    monkeypatch.setattr(sandbox, "run", here)
    monkeypatch.setattr(statistics, "ROWS_PER_FEATURE", 10**6)

    images = digits_split()[0][:256].reshape(-1, 8, 8, 1)
    np.savez(tmp_path / "cal.npz", image=images)
    written, asked = {}, []
    calibrate = statistics.calibrate
    monkeypatch.setattr(statistics, "calibrate", lambda *a, **k: asked.append(k["outputs"]) or calibrate(*a, **k))
    for name, outputs in (("outputs", True), ("inputs", False)):
        monkeypatch.setattr(LowRank, "outputs_suffice", outputs)
        out = str(tmp_path / name)
        code, _, err = run(capsys, "compress", CNN, out, "--target-ratio=0.29", "-q", "--calibration",
                           str(tmp_path / "cal.npz"))
        assert code == 0, err
        written[name] = (manifest.read_dir(out), tf.saved_model.load(out))
    (first, model), (second, reference) = written["outputs"], written["inputs"]
    assert asked == [True, False] and first["options"]["calibration"]["passes"] == 4
    assert first["options"]["calibration"]["model_check"]["kept"] == \
        second["options"]["calibration"]["model_check"]["kept"]
    calibrated = 0
    for entry, other_entry in zip(first["sites"], second["sites"]):
        assert entry["id"] == other_entry["id"]
        site, other = entry["details"], other_entry["details"]
        assert site.get("factors") == other.get("factors")
        calibrated += site.get("factors") == "calibrated"
        for key in ("output_error", "output_error_plain", "output_error_first_pass"):
            assert (key in site) == (key in other)
            if key in site:
                assert site[key] == pytest.approx(other[key], rel=1e-3, abs=1e-5), (entry["id"], key)
        assert site.get("feedback") == other.get("feedback")
    assert calibrated == 2
    for loaded in (model, reference):  # the compressed models (alpha = 0) compute the same
        for site in loaded.graphrewrite_sites:
            site.alpha.assign(0.0)
    x = tf.constant(digits_split()[0][-200:].reshape(-1, 8, 8, 1))
    expected = reference.serve(x).numpy()
    np.testing.assert_allclose(model.serve(x).numpy(), expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
