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
    from graphrewrite.rewriting import calibration, loader, statistics

    model = loader.load(mixed_model, ["serve"], True)
    specs = statistics.input_specs(model, "serving_default")
    rng = np.random.default_rng(0)
    # token ids 0..29 only, skewed: rows 30..49 of the table are never looked up
    raw = {"tokens": np.minimum(rng.geometric(0.15, (40, 6)) - 1, 29).astype(np.int32),
           "image": rng.standard_normal((40, 4, 4, 3)).astype(np.float32),
           "volume": rng.standard_normal((40, 4, 4, 4, 2)).astype(np.float32)}
    data = calibration.read(raw, specs)
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

    from graphrewrite.rewriting import loader, statistics

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
    from graphrewrite.rewriting import statistics

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

    from graphrewrite.rewriting import calibration, loader, statistics

    keras.utils.set_random_seed(4)
    tokens = keras.Input((None, 128), name="steps")
    keras.Model(tokens, keras.layers.Dense(4, name="proj")(tokens)).export(str(tmp_path / "m"), verbose=False)
    model = loader.load(str(tmp_path / "m"), ["serve"], True)
    x = np.random.default_rng(1).standard_normal((40, 3, 128)).astype(np.float32)
    data = calibration.read({"steps": x}, statistics.input_specs(model, "serving_default"))
    (gram,) = statistics.collect(model, data, "serving_default", batch_size=16).grams.values()
    rows = x.reshape(-1, 128).astype(np.float64)
    assert isinstance(gram, np.ndarray) and gram.shape == (128, 128)
    np.testing.assert_allclose(gram, rows.T @ rows / 120, rtol=1e-5, atol=1e-7)
