"""Fine-tuning front ends: a Keras callback and a tf.compat.v1 SessionRunHook.

Both run ``graphrewrite.compression_update`` (graphrewrite.training.update) once per training step with
the step count as global step, which is what compression_lib asks of its users ("append
``all_update_op()`` to the train op and make sure ``global_step`` is incremented").
"""

from __future__ import annotations

import re
from typing import Any

import keras
import tensorflow as tf

from graphrewrite.training.update import compression_update, model_handles


def find_rewritten(obj: Any) -> Any:
    """The loaded rewritten SavedModel behind ``obj``: itself, a TFSMLayer, or a Keras model holding one."""
    if hasattr(obj, "graphrewrite_sites"):
        return obj
    reloaded = getattr(obj, "_reloaded_obj", None)  # keras.layers.TFSMLayer
    if reloaded is not None and hasattr(reloaded, "graphrewrite_sites"):
        return reloaded
    for layer in getattr(obj, "layers", []) or []:
        try:
            return find_rewritten(layer)
        except ValueError:
            continue
    raise ValueError(f"{type(obj).__name__} holds no model rewritten by graphrewrite")


class RewrittenLayer(keras.layers.TFSMLayer):
    """``keras.layers.TFSMLayer`` whose weights have names Keras optimizers accept.

    TFSMLayer names its weights after the TensorFlow variables (``dense_1_kernel:0``); the ``:0``
    makes Keras 3 optimizers with slot variables (Adam, RMSprop, ...) fail with "not a valid scope
    name", for any SavedModel. This layer strips it; the weights are still the model's own variables,
    so fitting the Keras model trains the rewritten model in place.

    Args:
      filepath: the rewritten SavedModel directory.
      call_endpoint: the function or signature to call (``serve`` for Keras 3 models).
      call_training_endpoint: the function to call with ``training=True``, if any.
      trainable: whether its weights train.
    """

    def _add_existing_weight(self, weight: Any) -> None:
        from keras.src import backend

        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", weight.name.split(":")[0])
        variable = backend.Variable(initializer=weight, trainable=weight.trainable, dtype=weight.dtype,
                                    shape=weight.shape, name=name)
        self._track_variable(variable)


class CompressionCallback(keras.callbacks.Callback):
    """Runs the compression update after every training batch of ``Model.fit``.

    Args:
      rewritten: the loaded rewritten model, or a TFSMLayer / Keras model that holds it; None to
        find a TFSMLayer in the model being fitted.
      log_dir: where to write TensorBoard scalars (alpha, last update step and the Frobenius norms of
        A, B and C per site, as the reference's ``add_compression_summaries``); None for no logs.
      summary_every: write the scalars every this many steps.
    """

    def __init__(self, rewritten: Any = None, log_dir: str | None = None, summary_every: int = 1) -> None:
        super().__init__()
        self._given = rewritten
        self._rewritten: Any = None
        self._log_dir = log_dir
        self._every = max(1, int(summary_every))
        self._writer: Any = None
        self.last_result: dict[str, Any] | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._rewritten = find_rewritten(self._given if self._given is not None else self.model)
        if self._log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(self._log_dir)

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        step = tf.convert_to_tensor(self.model.optimizer.iterations, tf.int64)
        self.last_result = compression_update(self._rewritten, step)
        if self._writer is not None and int(step) % self._every == 0:
            write_summaries(self._rewritten, self._writer, int(step))

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._writer is not None:
            self._writer.flush()


def write_summaries(model: Any, writer: Any, step: int) -> None:
    """Scalars of every site under ``<name>_summaries/<variable>/``, as the reference names them."""
    handles = model_handles(model)
    from graphrewrite.rewriting import manifest as manifest_lib

    data = manifest_lib.read_from_object(model)
    scope = f"{data['hparams'].get('name', 'model_compression')}_summaries"
    with writer.as_default(step=step):
        for handle, site in zip(handles, data["sites"]):
            prefix = f"{scope}/{site['variable']}"
            state = handle.state
            _scalar(f"{prefix}/alpha", state.alpha)
            _scalar(f"{prefix}/last_alpha_update_step", state.last_update)
            _scalar(f"{prefix}/a_matrix_norm", tf.norm(state.weight))
            for name, var in sorted(state.factors.items()):
                if var.dtype.is_floating:
                    _scalar(f"{prefix}/{name}_matrix_norm", tf.norm(var))


def _scalar(tag: str, value: Any) -> None:
    """A TensorBoard scalar through core TF (``tf.summary.scalar`` needs the tensorboard package)."""
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    tf.summary.write(tag, tf.cast(value, tf.float32), metadata=metadata.SerializeToString())


class CompressionHook(tf.compat.v1.train.SessionRunHook):
    """Runs the compression update after every ``session.run`` of the train op (graph mode).

    Load the rewritten model into the graph with ``tf.saved_model.load`` inside
    ``graph.as_default()``, build the loss on its signature, and pass this hook to
    ``MonitoredTrainingSession``; the update reads the graph's global step.

    Args:
      model: the rewritten model loaded into the current graph.
      global_step: the step tensor or variable; defaults to the graph's global step.
    """

    def __init__(self, model: Any, global_step: Any = None) -> None:
        self._model = model
        self._global_step = global_step
        self._update: Any = None

    def begin(self) -> None:
        step = self._global_step if self._global_step is not None else tf.compat.v1.train.get_global_step()
        if step is None:
            raise ValueError("CompressionHook needs a global step (tf.compat.v1.train.get_or_create_global_step())")
        self._update = compression_update(self._model, tf.convert_to_tensor(step))

    def after_run(self, run_context: Any, run_values: Any) -> None:
        run_context.session.run(self._update)
