"""A zoo of architectures other projects wrote, built from their own constructors with random weights.

Each builder takes a directory to build in (a ``pathlib.Path`` or str) and returns the path of the
SavedModel it wrote there; nothing is downloaded (``weights=None``, keras_hub backbones from small
configs; their weights get the power-law spectra of trained ones, see ``_trained_like``). ``ZOO``
maps a name to its ``ZooModel``; ``heavy`` ones take long enough to compress that they run only
under ``pytest -m heavy`` (tools/run_heavy.py). The module is importable on its own (no pytest, no graphrewrite) so that
other checks (the op allow-list) can build the same models.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One architecture of the zoo.

    Attributes:
      build: directory -> path of the SavedModel written in it.
      heavy: slow to compress (big, many layers): only under ``-m heavy``.
      family: what kind of weights it exercises (for the README's table).
      language: a BERT/GPT-2/ViT-style model, held to the coverage target.
    """

    build: Callable[[Any], str]
    heavy: bool
    family: str
    language: bool = False


def _export(model: Any, directory: Any, name: str) -> str:
    path = os.path.join(str(directory), name)
    model.export(path, verbose=False)
    return path


def call(fn: Any, feed: dict) -> dict:
    """A signature's outputs, as numpy, on numpy inputs."""
    import tensorflow as tf

    return {k: v.numpy() for k, v in fn(**{n: tf.constant(x) for n, x in feed.items()}).items()}


def assert_bit_exact(src: str, out: str, inputs: dict, label: str) -> None:
    """Every signature of the rewritten ``out`` gives the original ``src``'s outputs bit for bit."""
    import tensorflow as tf

    original, rewritten = tf.saved_model.load(src), tf.saved_model.load(out)
    assert set(inputs) == set(original.signatures) and set(rewritten.signatures) >= set(inputs)
    for key, feed in inputs.items():
        want, got = call(original.signatures[key], feed), call(rewritten.signatures[key], feed)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{label} {key} {k}")


def assert_export_equals_alpha_zero(out: str, final: str, inputs: dict, label: str) -> None:
    """Every signature of the exported model ``final`` gives the rewritten ``out``'s outputs at alpha = 0."""
    import tensorflow as tf

    from graphrewrite.rewriting.verify import max_diff

    rewritten, exported = tf.saved_model.load(out), tf.saved_model.load(final)
    for site in rewritten.graphrewrite_sites:
        site.alpha.assign(0.0)
    for key, feed in inputs.items():
        want, got = call(rewritten.signatures[key], feed), call(exported.signatures[key], feed)
        for k in want:
            diff, rel = max_diff(want[k], got[k])
            assert rel <= 1e-4 or diff <= 1e-5, (label, key, k, diff, rel)


def _application(name: str, shape: tuple[int | None, ...]) -> Callable[[Any], str]:
    """A keras.applications constructor with random weights and a small input."""

    def build(directory: Any) -> str:
        import keras

        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, name)(weights=None, input_shape=shape, classes=10)
        return _export(model, directory, name.lower())

    return build


def lstm_text(directory: Any) -> str:
    """A text classifier: Embedding -> LSTM -> Dense."""
    import keras

    keras.utils.set_random_seed(1)
    ids = keras.Input((12,), dtype="int32", name="ids")
    h = keras.layers.Embedding(200, 32, name="embed")(ids)
    h = keras.layers.LSTM(48, name="lstm")(h)
    out = keras.layers.Dense(5, name="head")(h)
    return _export(keras.Model(ids, out), directory, "lstm_text")


def gru_text(directory: Any) -> str:
    """A text classifier: Embedding -> GRU -> SimpleRNN -> Dense."""
    import keras

    keras.utils.set_random_seed(2)
    ids = keras.Input((12,), dtype="int32", name="ids")
    h = keras.layers.Embedding(200, 32, name="embed")(ids)
    h = keras.layers.GRU(48, return_sequences=True, name="gru")(h)
    h = keras.layers.SimpleRNN(40, name="rnn")(h)
    out = keras.layers.Dense(5, name="head")(h)
    return _export(keras.Model(ids, out), directory, "gru_text")


def conv1d_text(directory: Any) -> str:
    """A 1-D convolutional classifier (Keras lowers Conv1D to Conv2D on an ExpandDims'd kernel)."""
    import keras

    keras.utils.set_random_seed(3)
    x = keras.Input((24, 16), name="signal")
    h = keras.layers.Conv1D(32, 5, activation="relu", name="conv_a")(x)
    h = keras.layers.Conv1D(48, 3, strides=2, padding="same", name="conv_b")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    out = keras.layers.Dense(6, name="head")(h)
    return _export(keras.Model(x, out), directory, "conv1d_text")


def conv_decoder(directory: Any) -> str:
    """A decoder: Dense -> Conv2DTranspose x2, plus a SeparableConv2D, Conv3D and a depthwise conv."""
    import keras

    keras.utils.set_random_seed(4)
    z = keras.Input((16,), name="z")
    h = keras.layers.Dense(4 * 4 * 32, name="project")(z)
    h = keras.layers.Reshape((4, 4, 32))(h)
    h = keras.layers.Conv2DTranspose(24, 3, strides=2, padding="same", activation="relu", name="up_a")(h)
    h = keras.layers.Conv2DTranspose(16, 3, strides=2, padding="same", name="up_b")(h)
    h = keras.layers.SeparableConv2D(24, 3, padding="same", name="separable")(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(h)
    v = keras.layers.Reshape((4, 16, 16, 6))(h)
    v = keras.layers.Conv3D(12, 2, name="conv3d")(v)
    out = keras.layers.GlobalAveragePooling3D()(v)
    return _export(keras.Model(z, out), directory, "conv_decoder")


def _matrix_rows(shape: tuple[int, ...]) -> int:
    """How many leading axes of a kernel form the rows of the matrix a layer multiplies by: the
    split nearest to square. A Dense or conv kernel ``[..., cin, cout]`` splits before its last axis,
    an attention query/key/value kernel ``[hidden, heads, head_dim]`` after its first, its output
    kernel ``[heads, head_dim, hidden]`` before its last: the views the matcher factors."""
    sizes = [int(np.prod(shape[:i])) for i in range(1, len(shape))]
    return max(range(1, len(shape)), key=lambda i: min(sizes[i - 1], int(np.prod(shape)) // sizes[i - 1]))


def _trained_like(model: Any) -> Any:
    """Gives every matrix-shaped weight the power-law spectrum (s_i ~ i^-1.5) trained weights have,
    keeping its singular vectors and Frobenius norm, in the matrix view the layer multiplies by
    (``_matrix_rows``; the spectrum of another reshape of the same kernel stays nearly flat). With
    i.i.d. Gaussian weights every singular value is worth its parameters, so a spectrum policy
    (--target-ratio) rightly keeps square kernels dense; trained language models are not like that."""
    for variable in model.weights:
        value = np.asarray(variable.numpy())
        if value.ndim < 2:
            continue
        rows = int(np.prod(value.shape[:_matrix_rows(value.shape)]))
        matrix = value.reshape(rows, -1).astype(np.float64)
        if min(matrix.shape) < 2:
            continue
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        decay = np.arange(1, s.size + 1) ** -1.5
        decay *= np.linalg.norm(s) / np.linalg.norm(decay)
        variable.assign(((u * decay) @ vt).reshape(value.shape).astype(value.dtype))
    return model


def _lm_config(hidden: int, layers: int, vocab: int) -> dict[str, int]:
    return {"vocabulary_size": vocab, "num_layers": layers, "num_heads": max(2, hidden // 64),
            "hidden_dim": hidden, "intermediate_dim": 4 * hidden, "max_sequence_length": 32}


def bert_tiny(directory: Any, hidden: int = 128, layers: int = 2, vocab: int = 1000, trained: bool = True) -> str:
    """keras_hub's BertBackbone from a small config (word, position and segment embeddings); larger
    ones and i.i.d. Gaussian weights (``trained=False``) for the coverage benchmark."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(5)
    backbone = keras_hub.models.BertBackbone(**_lm_config(hidden, layers, vocab))
    return _export(_trained_like(backbone) if trained else backbone, directory, "bert_tiny")


def gpt2_tiny(directory: Any, hidden: int = 128, layers: int = 2, vocab: int = 1000, trained: bool = True) -> str:
    """keras_hub's GPT2Backbone from a small config with its tied LM head (the token embedding
    read by the lookup and, transposed, by the logits MatMul), as GPT2CausalLM computes it."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(6)
    backbone = keras_hub.models.GPT2Backbone(**_lm_config(hidden, layers, vocab))
    backbone = _trained_like(backbone) if trained else backbone
    logits = backbone.token_embedding(backbone.output, reverse=True)
    return _export(keras.Model(backbone.input, logits), directory, "gpt2_tiny")


def vit_tiny(directory: Any, hidden: int = 128, layers: int = 2, vocab: int = 0, trained: bool = True) -> str:
    """keras_hub's ViTBackbone from a small config (patch Conv2D, position embedding, encoder);
    ``vocab`` is unused (the language models' signature)."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(7)
    backbone = keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=layers,
                                            num_heads=max(2, hidden // 64), hidden_dim=hidden, mlp_dim=4 * hidden)
    return _export(_trained_like(backbone) if trained else backbone, directory, "vit_tiny")


ZOO: dict[str, ZooModel] = {
    "EfficientNetB0": ZooModel(_application("EfficientNetB0", (32, 32, 3)), True, "conv, depthwise, swish"),
    "MobileNetV3Small": ZooModel(_application("MobileNetV3Small", (None, None, 3)), True,
                                 "conv, depthwise, hard-swish"),
    "DenseNet121": ZooModel(_application("DenseNet121", (32, 32, 3)), True, "conv, concatenation"),
    "ConvNeXtTiny": ZooModel(_application("ConvNeXtTiny", (32, 32, 3)), True, "depthwise, pointwise Dense"),
    "Xception": ZooModel(_application("Xception", (71, 71, 3)), True, "separable conv"),
    "ResNet50": ZooModel(_application("ResNet50", (32, 32, 3)), True, "conv, batch norm"),
    "lstm_text": ZooModel(lstm_text, True, "embedding, LSTM"),
    "gru_text": ZooModel(gru_text, True, "embedding, GRU, SimpleRNN"),
    "conv1d_text": ZooModel(conv1d_text, True, "Conv1D"),
    "conv_decoder": ZooModel(conv_decoder, False, "Conv2DTranspose, separable, Conv3D, depthwise"),
    "bert_tiny": ZooModel(bert_tiny, True, "embeddings, attention", language=True),
    "gpt2_tiny": ZooModel(gpt2_tiny, False, "tied embedding / LM head, attention", language=True),
    "vit_tiny": ZooModel(vit_tiny, True, "patch conv, position embedding, attention", language=True),
}


def sample_inputs(path: str, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Deterministic inputs for every signature of a SavedModel: token ids below 100 (masks and
    segments 0 or 1), unknown dimensions 2 (batch) or 32, floats standard normal."""
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    rng = np.random.default_rng(seed)
    return {key: _feed(fn, rng, 2, masked=False) for key, fn in loaded.signatures.items()}


def calibration_inputs(path: str, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``count`` seeded examples of the serving signature, as ``sample_inputs`` makes them but
    with masks all ones (every token real, as calibration data would be)."""
    import tensorflow as tf

    function = tf.saved_model.load(path).signatures["serving_default"]
    return _feed(function, np.random.default_rng(seed), count, masked=True)


def _feed(fn: Any, rng: np.random.Generator, batch: int, masked: bool) -> dict[str, np.ndarray]:
    """One signature's inputs: the batch dimension ``batch``, other unknown dimensions 32; token
    ids below 100, masks all ones where ``masked`` (else 0 or 1), other integers (segments) 0 or
    1, booleans true, floats standard normal."""
    import tensorflow as tf

    feed = {}
    for name, spec in sorted(fn.structured_input_signature[1].items()):
        shape = [(batch if i == 0 else 32) if d is None else d for i, d in enumerate(spec.shape.as_list())]
        if spec.dtype.is_integer and masked and "mask" in name:
            feed[name] = np.ones(shape, spec.dtype.as_numpy_dtype)
        elif spec.dtype.is_integer:  # token ids in the vocabulary; masks, segments 0 or 1
            high = 100 if "ids" in name and "segment" not in name else 2
            feed[name] = rng.integers(0, high, shape).astype(spec.dtype.as_numpy_dtype)
        elif spec.dtype == tf.bool:
            feed[name] = np.ones(shape, bool)
        else:
            feed[name] = rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype)
    return feed
