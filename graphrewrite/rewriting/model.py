"""The intermediate form every loader produces and every later stage reads.

A loaded model is a set of flat functions (one per signature and per variant of each exported
tf.function), each a ``Graph`` whose variable reads and handles are labelled with the variable they
belong to. Matching and planning read only this; building turns it back into TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from graphrewrite import views
from graphrewrite.rewriting.graph import Graph


@dataclasses.dataclass(frozen=True)
class VariableInfo:
    """A model variable as the planner sees it."""

    key: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool


@dataclasses.dataclass
class FunctionIR:
    """One flat function of the model.

    Attributes:
      key: unique label, e.g. ``signature:serving_default`` or ``function:serve#0``.
      graph: the inlined graph.
      inputs: tensor names of the user inputs, in flat order.
      outputs: tensor names of the outputs, in flat order.
      handles: node name -> variable key, for nodes that produce a variable's resource handle.
      reads: node name -> variable key, for nodes whose output 0 is the variable's current value.
      captures: node name -> index into ``LoadedModel.captured``, for other captured tensors.
    """

    key: str
    graph: Graph
    inputs: list[str]
    outputs: list[str]
    handles: dict[str, str]
    reads: dict[str, str]
    captures: dict[str, int]


@dataclasses.dataclass
class Variant:
    """One traced form of an exported callable: its flat function and Python-level structure."""

    function: str
    input_signature: Any  # (args, kwargs) nest of TensorSpecs and Python values
    output_structure: Any  # nest of TensorSpecs


@dataclasses.dataclass
class Entry:
    """An exported callable to rebuild: a signature, or a tf.function attribute of the root."""

    kind: str  # "signature" or "function"
    name: str
    variants: list[Variant]
    # The Python parameters of a function entry: (name, default) pairs, NO_DEFAULT for required.
    parameters: list[tuple[str, Any]] | None = None


NO_DEFAULT = object()


@dataclasses.dataclass
class LoadedModel:
    """Everything the pipeline needs from the input model."""

    path: str
    kind: str  # "tf2" or "tf1"
    variables: dict[str, Any]  # key -> tf.Variable
    infos: dict[str, VariableInfo]
    functions: dict[str, FunctionIR]
    entries: list[Entry]
    captured: list[Any]  # non-variable captured tensors
    resources: list[Any]  # trackables owning captured resources (kept tracked when saving)
    regularization_losses: list[Any]
    source: Any  # the loaded object (kept alive, used to compute reference outputs)
    signature_functions: dict[str, Any]  # signature key -> callable of the original model
    # graphrewrite.rewriting.calibration.statistics.Statistics when compress was given calibration data
    calibration: Any = None

    def matrix(self, key: str, view: Any) -> Any:
        """The float32 matrix that the site reading variable ``key`` through ``view``
        (graphrewrite.views) multiplies: what every factorisation and error starts from."""
        return views.apply_numpy(self.variables[key].numpy(), view).astype(np.float32, copy=False)
