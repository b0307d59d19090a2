"""The op allow-list: every op of real models is on it, no I/O family is, and it matches the
registry as tools/allowlist.py classifies it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import models
import pytest

from graphrewrite.rewriting import scan as scan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One representative (or more) per family that does I/O, blocks, or runs other code; all are
# registered ops of TensorFlow 2.21 (checked below, so a renamed op cannot make this pass).
IO_OPS = {
    "files": ["ReadFile", "WriteFile", "MatchingFiles", "ImmutableConst", "FileSystemSetConfiguration",
              "InitializeTableFromTextFileV2", "LoadAndRemapMatrix", "RecordInput", "DecodeProtoV2",
              "EncodeProto", "DumpTensor", "CalibrationStatisticsSaver"],
    "savers": ["Save", "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice", "MergeV2Checkpoints"],
    "datasets": ["TFRecordDataset", "CacheDataset", "CacheDatasetV2", "DatasetFromGraph", "IteratorGetNext",
                 "MakeIterator", "TensorSliceDataset", "SnapshotDatasetV2", "DatasetToTFRecord", "LoadDataset"],
    "summaries": ["WriteScalarSummary", "CreateSummaryFileWriter", "ScalarSummary", "ImportEvent"],
    "debuggers": ["DebugIdentityV3", "DebugNumericSummaryV2", "DebugNanCount"],
    "Python": ["PyFunc", "PyFuncStateless", "EagerPyFunc"],
    "rpc and remote": ["RpcCall", "RpcClient", "DataServiceDatasetV4", "_Send", "_Recv", "XlaSendToHost"],
    "collectives": ["CollectiveReduceV2", "CollectiveBcastSend", "NcclAllReduce", "CollectivePermute"],
    "queues and staging": ["FIFOQueueV2", "QueueDequeueV2", "Barrier", "Stage", "MapStage",
                           "ConditionalAccumulator", "MutexLock"],
    "sleep": ["SleepDataset", "SleepIdentityOp", "Timestamp"],
    "programs in strings": ["XlaCallModule", "DatasetToGraphV2", "TPUPartitionedCall", "BatchFunction"],
}


def _registered(op: str) -> bool:
    from tensorflow.python.framework import op_def_registry

    return op_def_registry.get(op) is not None


@pytest.mark.parametrize("family", sorted(IO_OPS))
def test_io_families_are_not_allowed(family):
    allowed = scan_lib.allowed_ops()
    for op in IO_OPS[family]:
        assert _registered(op), op
        assert op not in allowed, op


def test_the_list_is_what_the_registry_gives():
    # tools/allowlist.py --check in a fresh process, whose registry holds TensorFlow's ops alone:
    # a TensorFlow upgrade or a filter edit shows here. (In this process a test that imported
    # keras_hub before this one has added tensorflow_text's ops: 1948 registered, not 1910.)
    check = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "allowlist.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "allowed_ops.txt is up to date" in check.stdout, check.stdout[-3000:]
    spec = importlib.util.spec_from_file_location("allowlist_tool", os.path.join(ROOT, "tools", "allowlist.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ops = tool.registered_ops()
    _, denied, _ = tool.classify(ops)
    assert 800 < len(scan_lib.allowed_ops()) < len(ops) / 2 + 100
    assert "SaveV2" in denied["files, checkpoints and savers"] and "WriteFile" in denied["files, checkpoints and savers"]


def _keras3_layers(path: str) -> None:
    """Keras 3 ``model.export``: embeddings, Conv1D, GRU, LayerNorm, dropout, attention, Dense."""
    import keras

    tokens = keras.Input((12,), dtype="int32")
    x = keras.layers.Embedding(50, 16)(tokens)
    x = keras.layers.Conv1D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GRU(16, return_sequences=True)(x)
    x = keras.layers.LayerNormalization()(x)
    x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.MultiHeadAttention(2, 8)(x, x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.BatchNormalization()(x)
    keras.Model(tokens, keras.layers.Dense(3)(x)).export(path, verbose=False)


def _tf_keras_layers(path: str) -> None:
    """tf.keras (Keras 2) SavedModel: Conv2D, pooling, BatchNorm, LSTM, embeddings, dropout."""
    import tf_keras

    image = tf_keras.Input((8, 8, 1))
    x = tf_keras.layers.Conv2D(4, 3, activation="relu")(image)
    x = tf_keras.layers.MaxPooling2D()(x)
    x = tf_keras.layers.BatchNormalization()(x)
    x = tf_keras.layers.Reshape((3, 12))(x)
    x = tf_keras.layers.LSTM(6)(x)
    ids = tf_keras.Input((4,), dtype="int32")
    e = tf_keras.layers.Flatten()(tf_keras.layers.Embedding(20, 3)(ids))
    x = tf_keras.layers.Dropout(0.3)(tf_keras.layers.Concatenate()([x, e]))
    model = tf_keras.Model([image, ids], tf_keras.layers.Dense(2, activation="softmax")(x))
    model.save(path, save_format="tf")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> list[str]:
    """The testdata models, every tests/models.py builder, and two models of many layer kinds."""
    root = tmp_path_factory.mktemp("allowlist_zoo")
    paths = [os.path.join(models.TESTDATA, "digits_mlp"), os.path.join(models.TESTDATA, "digits_cnn")]
    builders = {**models.BUILDERS, "keras3_layers": _keras3_layers, "tf_keras_layers": _tf_keras_layers}
    for name, build in builders.items():
        path = str(root / name)
        build(path)
        paths.append(path)
    return paths


def test_every_op_of_the_zoo_is_allowed(zoo):
    for path in zoo:
        assert scan_lib.refusals(path) == [], path


def test_the_zoo_holds_the_saver_and_control_flow_it_should(zoo):
    # The allow-list is not passed vacuously: the zoo runs saver ops (allowed only by structure)
    # and functional control flow (GRU, LSTM), and a TF1 graph.
    from graphrewrite.rewriting.scan import read_saved_model_proto

    seen = set()
    for path in zoo:
        for mg in read_saved_model_proto(path).meta_graphs:
            seen.update(n.op for n in mg.graph_def.node)
            seen.update(n.op for f in mg.graph_def.library.function for n in f.node_def)
    assert {"SaveV2", "RestoreV2", "MergeV2Checkpoints", "While", "VariableV2", "ResourceGather"} <= seen
    assert len(seen - scan_lib.allowed_ops()) == 3  # exactly the three saver ops
