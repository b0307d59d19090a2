"""Reads calibration data (example inputs of one signature) and checks it against the signature.

Accepted forms of DATA, like the TFLite converter's representative dataset:

* an ``.npz`` file whose array names are the signature's input names (first axis: examples);
* a directory of TFRecord files (``*.tfrecord``, ``*.tfrecords``, ``*.rec``) of ``tf.train.Example``
  records whose feature names are the input names (float/int64 lists, reshaped to the input's
  shape without its batch dimension, which must then be fully known);
* in Python: a mapping of name -> array (all examples), or any iterable of such mappings, each a
  batch (arrays of the input's rank) or one example (one axis less).

Everything is read into memory (a few hundred examples are expected) and checked before the model
runs: the names must be exactly the signature's inputs, the kinds of dtype must match (float data
for a float input, integers for an integer one; values are cast to the input's dtype), the shapes
must fit the input's known dimensions, every input must hold the same number of examples (at
least one), and float values must be finite. A failure is one CalibrationDataError line.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite.errors import CalibrationDataError, first_line

Calibration = str | os.PathLike | Mapping[str, Any] | Iterable[Mapping[str, Any]]
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".rec")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One signature input as the checks see it: its name, shape (None: unknown) and numpy dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype


def read(source: Calibration, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """The calibration examples of ``source`` as one checked array per input (see the module doc)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            raw = _read_tfrecords(path, specs)
        elif os.path.isfile(path):
            raw = _read_npz(path)
        else:
            raise CalibrationDataError(f"{path}: no such file or directory")
    elif isinstance(source, Mapping):
        raw = {str(k): np.asarray(v) for k, v in source.items()}
    else:
        raw = _concatenate(source, specs)
    return check(raw, specs)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise CalibrationDataError(f"{path}: a single .npy array; use an .npz with one array per input")
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError) as exc:
        raise CalibrationDataError(f"{path}: not a readable .npz file ({first_line(exc)})") from None


def _read_tfrecords(path: str, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(TFRECORD_SUFFIXES))
    if not files:
        raise CalibrationDataError(f"{path}: no TFRecord files ({', '.join(TFRECORD_SUFFIXES)}) in this directory")
    by_name = {s.name: s for s in specs}
    columns: dict[str, list[np.ndarray]] = {}
    try:
        for record in tf.data.TFRecordDataset(files):
            example = tf.train.Example.FromString(record.numpy())
            for name, feature in example.features.feature.items():
                columns.setdefault(name, []).append(_feature_value(name, feature, by_name.get(name)))
    except (tf.errors.OpError, ValueError) as exc:
        raise CalibrationDataError(f"{path}: unreadable TFRecord data ({first_line(exc)})") from None
    counts = {name: len(values) for name, values in columns.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(f"{path}: the records do not all have the same features ({counts})")
    return {name: np.stack(values) for name, values in columns.items()}


def _feature_value(name: str, feature: Any, spec: InputSpec | None) -> np.ndarray:
    """One feature of one record, reshaped to the input's shape without its batch dimension."""
    kind = feature.WhichOneof("kind")
    if kind == "float_list":
        value = np.asarray(feature.float_list.value, np.float32)
    elif kind == "int64_list":
        value = np.asarray(feature.int64_list.value, np.int64)
    else:
        raise CalibrationDataError(f"feature {name!r}: {kind or 'empty'} features are not supported (float or int64)")
    if spec is None:
        return value  # an unknown name: reported by check() with the others
    shape = spec.shape[1:]
    if any(d is None for d in shape):
        raise CalibrationDataError(
            f"feature {name!r}: the input's shape {_shape_text(spec.shape)} is not fully known, so a flat "
            "TFRecord list cannot be reshaped; use an .npz")
    if value.size != int(np.prod(shape, dtype=np.int64)):
        raise CalibrationDataError(
            f"feature {name!r}: {value.size} values per example, the input {_shape_text(spec.shape)} needs "
            f"{int(np.prod(shape, dtype=np.int64))}")
    return value.reshape(shape)


def _concatenate(batches: Iterable[Mapping[str, Any]], specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """Joins an iterable of batches (or single examples) into one array per input."""
    ranks = {s.name: len(s.shape) for s in specs}
    columns: dict[str, list[np.ndarray]] = {}
    try:
        items = iter(batches)
    except TypeError:
        raise CalibrationDataError(
            f"calibration data of type {type(batches).__name__}: expected a path, a dict of arrays "
            "or an iterable of dicts") from None
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise CalibrationDataError(f"calibration item {i} is a {type(item).__name__}, not a dict of arrays")
        for name, value in item.items():
            array = np.asarray(value)
            if name in ranks and array.ndim == ranks[name] - 1:
                array = array[None]  # one example
            columns.setdefault(str(name), []).append(array)
    lengths = {name: len(parts) for name, parts in columns.items()}
    if len(set(lengths.values())) > 1:
        raise CalibrationDataError(f"the calibration items do not all have the same names ({lengths})")
    out = {}
    for name, parts in columns.items():
        shapes = {p.shape[1:] for p in parts}
        if len(shapes) > 1:
            raise CalibrationDataError(f"input {name!r}: calibration items of different shapes {sorted(shapes)}")
        out[name] = np.concatenate(parts)
    return out


def check(raw: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """The arrays cast to the inputs' dtypes, or one CalibrationDataError saying what does not fit."""
    wanted = {s.name for s in specs}
    missing, unknown = sorted(wanted - set(raw)), sorted(set(raw) - wanted)
    if missing or unknown:
        raise CalibrationDataError(
            f"calibration names {sorted(raw)} do not match the signature's inputs {sorted(wanted)}"
            + (f" (missing {missing})" if missing else "") + (f" (unknown {unknown})" if unknown else ""))
    out = {}
    for spec in specs:
        array = np.asarray(raw[spec.name])
        if array.dtype.kind not in _KINDS.get(spec.dtype.kind, spec.dtype.kind):
            raise CalibrationDataError(
                f"input {spec.name!r}: calibration data of dtype {array.dtype}, the signature wants {spec.dtype}")
        if array.ndim != len(spec.shape) or any(
                d is not None and d != a for d, a in zip(spec.shape[1:], array.shape[1:])):
            raise CalibrationDataError(
                f"input {spec.name!r}: calibration data of shape {list(array.shape)} does not fit the "
                f"signature's {_shape_text(spec.shape)}")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise CalibrationDataError(f"input {spec.name!r}: calibration data holds NaN or infinite values")
        out[spec.name] = array.astype(spec.dtype, copy=False)
    counts = {name: len(a) for name, a in out.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(f"the inputs hold different numbers of examples ({counts})")
    if not counts or not next(iter(counts.values())):
        raise CalibrationDataError("the calibration data holds no examples")
    return out


# Which kinds of data each kind of input accepts: floats take float or integer data (pixels as
# integers); integers and booleans take their own kind only (a float id is a mistake).
_KINDS = {"f": "fiu", "i": "iu", "u": "iu", "b": "b"}


def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"


__all__ = ["Calibration", "InputSpec", "check", "read"]
