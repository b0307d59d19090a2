"""Generates the small trained models shipped in testdata/ (deterministic; run from anywhere).

    python testdata/make_testdata.py            # rewrites testdata/digits_mlp, digits_cnn, digits.npz

* ``digits_mlp``: a Keras 3 MLP 64-256-128-10 trained on scikit-learn's bundled digits data
  (8x8 images, 10 classes), exported with ``model.export()``. The README's first command
  compresses it.
* ``digits_cnn``: a small Keras 3 CNN (two Conv2D layers, one Dense head) on the same data.
* ``digits.npz``: that split itself (``x_train``, ``y_train``, ``x_test``, ``y_test``), so the
  README's quickstart fine-tunes and evaluates on the real data without scikit-learn.

The split is fixed (``train_test_split(..., test_size=0.25, random_state=0)``); pixels are scaled
to [0, 1]. ``digits_split()`` is shared with the tests and benchmarks.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) of the bundled digits data, x as float32 in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, data.target.astype(np.int64), test_size=0.25, random_state=0)
    return x_train, y_train, x_test, y_test


def save_split(path: str = os.path.join(HERE, "digits.npz")) -> str:
    """Writes ``digits_split()`` as a compressed .npz (the same bytes on every run)."""
    x_train, y_train, x_test, y_test = digits_split()
    with open(path, "wb") as f:
        np.savez_compressed(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def train_mlp(seed: int = 0, epochs: int = 40):
    import keras

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = digits_split()
    inputs = keras.Input((64,), name="pixels")
    h = keras.layers.Dense(256, activation="relu", name="dense_1")(inputs)
    h = keras.layers.Dense(128, activation="relu", name="dense_2")(h)
    outputs = keras.layers.Dense(10, name="logits")(h)
    model = keras.Model(inputs, outputs, name="digits_mlp")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0, shuffle=True)
    acc = model.evaluate(x_test, y_test, verbose=0)[1]
    return model, acc


def train_cnn(seed: int = 0, epochs: int = 30):
    import keras

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = digits_split()
    inputs = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv_1")(inputs)
    h = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv_2")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(10, name="logits")(h)
    model = keras.Model(inputs, outputs, name="digits_cnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train.reshape(-1, 8, 8, 1), y_train, epochs=epochs, batch_size=64, verbose=0)
    acc = model.evaluate(x_test.reshape(-1, 8, 8, 1), y_test, verbose=0)[1]
    return model, acc


def _export(model, name: str) -> str:
    path = os.path.join(HERE, name)
    shutil.rmtree(path, ignore_errors=True)
    model.export(path, verbose=False)
    return path


def main() -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    mlp, acc = train_mlp()
    print(f"digits_mlp: test accuracy {acc:.4f} -> {_export(mlp, 'digits_mlp')}")
    cnn, acc = train_cnn()
    print(f"digits_cnn: test accuracy {acc:.4f} -> {_export(cnn, 'digits_cnn')}")
    print(f"digits split -> {save_split()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
